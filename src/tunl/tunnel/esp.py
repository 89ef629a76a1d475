"""One ESP security association (RFC 4303) in IPv4 tunnel mode, as a vti's state carries it:
what `ip xfrm state add src A dst B proto esp spi S mode tunnel ...` sets up in the kernel,
with its algorithms, sequence numbers and anti-replay window.

Algorithms, by the kernel's names (xfrm_algo.c), keys as `ip xfrm` takes them:

  aead rfc4106(gcm(aes)) KEY ICV   RFC 4106: KEY is the AES key (16, 24, 32 bytes) and a
                                   4-byte salt; 8-byte explicit IV; nonce = salt || IV (§4);
                                   AAD = SPI || sequence number (§5, 32-bit numbers); ICV
                                   64, 96 or 128 bits (§3; the kernel's rfc4106 setauthsize)
  enc cbc(aes) KEY                 RFC 3602: AES-128/192/256 in CBC, a random 16-byte IV
  auth-trunc hmac(sha256) KEY BITS RFC 4868: HMAC-SHA-256 over header, IV and ciphertext,
                                   truncated to BITS (128 by RFC 4868 §2.1; the kernel takes
                                   any multiple of 8 up to 256, tunl 96..256)

Outbound, like xfrm_output() → esp_output() of xfrm4 tunnel mode: the inner IPv4 packet is
the payload, next header 4; padding 1, 2, 3 ... to the cipher block (4 for GCM, 16 for CBC,
esp_output(): blksize = ALIGN(crypto_aead_blocksize(), 4)); the sequence number is oseq + 1,
from 1, and one that would cycle to 0 is refused (RFC 4303 §3.3.3; xfrm_replay_overflow():
XfrmOutStateSeqError). The GCM IV is the 64-bit sequence number XOR a random value drawn
once per SA, as the kernel's seqiv does: unique per key without a random draw per packet
(RFC 4106 §3.1 asks only that an IV never repeat under a key).

Inbound, in the order of xfrm_input() and esp_input():
  1. xfrm_parse_spi(): 8 bytes for SPI and sequence number, else ESP_HEADER
  2. the SPI is this SA's (the caller looked it up; another is XFRM_NO_STATE)
  3. xfrm_replay_check(): sequence number 0 or left of the window → ESP_TOO_OLD, already
     received → ESP_REPLAY (RFC 4303 §3.4.3: before the integrity check, it is cheap)
  4. esp_input(): room for IV and ICV (and, for CBC, whole blocks) else ESP_LENGTH
  5. the ICV (RFC 4303 §3.4.4), in constant time → ESP_ICV
  6. decrypt; esp_remove_trailer(): pad length must leave a payload, and the pad bytes must
     be 1, 2, 3 ... (§2.4) → ESP_PADDING
  7. xfrm_replay_advance(): the window moves, only now that the packet authenticated
     (§3.4.3) and its trailer made sense, as in the kernel
  8. xfrm4_remove_tunnel_encap(): next header 4 and a whole IPv4 header → else
     ESP_NEXT_HEADER (XfrmInStateModeError; the kernel also advanced the window first)
Every failure is a Drop, counted by the caller under XFRM_MIB[reason]; nothing raises.

Anti-replay is the kernel's classic (non-ESN) window, xfrm_replay_check()/_advance(): `seq`
is the highest sequence number received, bit i of `bitmap` says seq - i was received. With
replay_window 0 nothing is checked and nothing recorded (seq stays 0), as in the kernel. The
kernel's bitmap is a u32; windows of up to 4096 are kept here as a Python int.

Extended sequence numbers (RFC 4303 §2.2.1, `flag esn`) are not supported: refused.
"""
from __future__ import annotations

import hmac as _hmac
from secrets import token_bytes
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError
from ..wire.drop import Drop
from ..wire.esp import ESP_HLEN, NEXTHDR_IPIP, SEQ_MAX, parse_trailer, trailer
from ..wire.ipv4 import IPV4_HLEN

__all__ = ["AEAD_GCM", "AUTH_SHA256", "ENC_CBC", "MAX_REPLAY_WINDOW", "XFRM_MIB",
           "XFRM_STATE_STATS", "EspSA"]

AEAD_GCM = "rfc4106(gcm(aes))"
ENC_CBC = "cbc(aes)"
AUTH_SHA256 = "hmac(sha256)"
# the kernel's compat names for the same algorithms (xfrm_algo.c: .compat)
_ENC_NAMES = {ENC_CBC: ENC_CBC, "aes": ENC_CBC}
_AUTH_NAMES = {AUTH_SHA256: AUTH_SHA256, "sha256": AUTH_SHA256}

GCM_KEY_BYTES = (20, 28, 36)        # RFC 4106 §8.1: AES key + 4 bytes of salt
GCM_SALT = 4
GCM_IV = 8                          # RFC 4106 §3.1
GCM_ICV_BITS = (64, 96, 128)        # RFC 4106 §3
GCM_BLOCK = 4                       # a stream mode: the ciphertext is only aligned to 4
CBC_KEY_BYTES = (16, 24, 32)        # RFC 3602 §2.2
CBC_IV = CBC_BLOCK = 16             # RFC 3602 §2.4, §3
SHA256_KEY_BYTES = 32               # RFC 4868 §2.1.1
SHA256_TRUNC_BITS = range(96, 257, 8)
SHA256_DEFAULT_TRUNC = 128          # RFC 4868 §2.1
MAX_REPLAY_WINDOW = 4096

# The kernel's counter (/proc/net/xfrm_stat, LINUX_MIB_XFRM*) for each reason an ESP packet
# or a vti's xfrm lookup is dropped; tunld prints these names.
XFRM_MIB: dict[Drop, str] = {
    # inbound: xfrm_input()
    Drop.ESP_HEADER: "XfrmInHdrError",              # xfrm_parse_spi() failed
    Drop.XFRM_NO_STATE: "XfrmInNoStates",           # no state for the SPI (the caller's)
    Drop.ESP_TOO_OLD: "XfrmInStateSeqError",        # xfrm_replay_check(): left of the window
    Drop.ESP_REPLAY: "XfrmInStateSeqError",         # xfrm_replay_check(): a duplicate
    Drop.ESP_LENGTH: "XfrmInStateProtoError",       # esp_input(): -EINVAL
    Drop.ESP_ICV: "XfrmInStateProtoError",          # esp_input(): -EBADMSG
    Drop.ESP_PADDING: "XfrmInStateProtoError",      # esp_remove_trailer(): -EINVAL
    Drop.ESP_NEXT_HEADER: "XfrmInStateModeError",   # xfrm_inner_mode_input() failed
    Drop.XFRM_NO_POLICY: "XfrmInNoPols",            # __xfrm_policy_check(): no policy
    Drop.XFRM_TMPL_MISMATCH: "XfrmInTmplMismatch",  # the policy's template is another SA's
    # outbound: xfrm_lookup(), xfrm_output()
    Drop.ESP_SEQ_OVERFLOW: "XfrmOutStateSeqError",  # xfrm_replay_overflow(): -EOVERFLOW
    Drop.NOT_IPV4: "XfrmOutStateModeError",         # no IPv4 packet for IPv4 tunnel mode
    Drop.XFRM_OUT_NO_POLICY: "XfrmOutPolBlock",
    Drop.XFRM_OUT_NO_STATE: "XfrmOutNoStates",
}

# The per-state counters of `ip -s xfrm state` ("stats: replay-window N replay N failed N")
# that a drop also counts in (struct xfrm_stats). Sequence number 0 is counted as too old;
# the kernel counts it in neither.
XFRM_STATE_STATS: dict[Drop, str] = {
    Drop.ESP_TOO_OLD: "replay-window",
    Drop.ESP_REPLAY: "replay",
    Drop.ESP_ICV: "failed",
}

_MAX_PACKET = 0xFFFF


def _bytes(word: str, key) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise ConfigError(f"{word}: KEY is bytes, not {type(key).__name__}")
    return bytes(key)


def _algo_key(word: str, name, known: str, key, sizes: tuple[int, ...], rule: str,
              names: dict[str, str] | None = None) -> bytes:
    """KEY of `word name KEY`, as bytes: name must be known (or one of its compat names, by
    names), KEY one of sizes bytes long (rule says which, and why)."""
    if (name if names is None else names.get(name)) != known:
        raise ConfigError(f'{word} "{name}": tunl knows {word} {known}')
    key = _bytes(f"{word} {known}", key)
    if len(key) not in sizes:
        raise ConfigError(f"{word} {known}: KEY is {rule}, not {len(key)}")
    return key


def _icv_bits(word: str, known: str, bits, allowed, rule: str) -> None:
    if bits not in allowed or isinstance(bits, bool):
        raise ConfigError(f"{word} {known}: {rule}, not {bits!r}")


def _xor3(a, b, c) -> bytes:
    """a XOR b XOR c, three 16-byte blocks."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
            ^ int.from_bytes(c, "big")).to_bytes(16, "big")


class EspSA:
    """One SA's algorithms, keys and sequence number state, both directions' rules.

    A vti has one for sending and one for receiving (two `ip xfrm state`s); nothing stops
    one object doing both, as in the tests. Not thread-safe: one owner per SA.

    State, as `ip xfrm state` shows it (replay_context()):
      oseq     the last sequence number sent (0: none yet)
      seq      the highest sequence number received (kept only with a replay window)
      bitmap   bit i: seq - i was received
    """

    # the next header of what is carried (xfrm4 tunnel mode: IPv4 in ESP)
    NEXT_HEADER = NEXTHDR_IPIP

    __slots__ = ("spi", "aead", "replay_window", "oseq", "seq", "bitmap", "ivlen", "icvlen",
                 "block", "_mask", "_random", "_gcm", "_gcm_key", "_salt", "_ivsalt", "_mac",
                 "_enc", "_dec", "_eprev", "_dprev", "_hdr")

    def __init__(self, spi: int, *, aead: tuple[str, bytes, int] | None = None,
                 enc: tuple[str, bytes] | None = None,
                 auth: tuple[str, bytes, int] | None = None, replay_window: int = 0,
                 esn: bool = False,
                 random_bytes: Callable[[int], bytes] = token_bytes):
        """spi: 1..2^32-1. aead: (name, KEY, ICV bits); or enc: (name, KEY) with auth:
        (name, KEY, truncation bits, None for 128). KEYs are bytes, as `ip xfrm` takes
        them (the GCM KEY with its salt). replay_window: 0 (off) .. 4096 packets.
        random_bytes(n): n random bytes (CBC IVs, the GCM IV mask); tests fix it."""
        if isinstance(spi, bool) or not isinstance(spi, int) or not 0 < spi <= SEQ_MAX:
            raise ConfigError(f"spi {spi!r}: a number of 1..4294967295 (0 is reserved, "
                              "RFC 4303 §2.1)")
        if esn:
            raise ConfigError("flag esn: tunl's ESP has no extended sequence numbers "
                              "(RFC 4303 §2.2.1); leave esn out")
        if isinstance(replay_window, bool) or not isinstance(replay_window, int) or \
                not 0 <= replay_window <= MAX_REPLAY_WINDOW:
            raise ConfigError(f"replay-window {replay_window!r}: 0 (off) .. "
                              f"{MAX_REPLAY_WINDOW} packets")
        self.spi = spi
        self.replay_window = replay_window
        self._mask = (1 << max(32, replay_window)) - 1   # the kernel's u32, or the window
        self.oseq = self.seq = self.bitmap = 0
        self._random = random_bytes
        self._hdr = spi.to_bytes(4, "big")
        self._gcm = self._gcm_key = self._salt = self._mac = None
        self._enc = self._dec = None
        self._ivsalt = 0
        self._eprev = self._dprev = bytes(CBC_BLOCK)
        if aead is not None:
            if enc is not None or auth is not None:
                word = "enc" if enc is not None else "auth-trunc"
                raise ConfigError(f"{word} with aead: aead {AEAD_GCM} encrypts and "
                                  "authenticates alone; give aead, or enc with auth-trunc")
            self._init_aead(aead)
        elif enc is not None:
            if auth is None:
                raise ConfigError(f"enc {enc[0] if isinstance(enc, tuple) and enc else enc}"
                                  f" without auth-trunc: tunl sends no unauthenticated ESP; "
                                  f"add auth-trunc {AUTH_SHA256} KEY 128")
            self._init_cbc(enc, auth)
        elif auth is not None:
            raise ConfigError(f"auth-trunc without enc: give enc {ENC_CBC} KEY too (tunl "
                              "sends no ESP with NULL encryption)")
        else:
            raise ConfigError(f"esp: give aead {AEAD_GCM} KEY ICV-BITS, or enc {ENC_CBC} KEY "
                              f"with auth-trunc {AUTH_SHA256} KEY BITS")

    def _init_aead(self, aead) -> None:
        if not isinstance(aead, tuple) or len(aead) != 3:
            raise ConfigError(f"aead: (name, KEY, ICV bits), not {aead!r:.40}")
        name, key, bits = aead
        key = _algo_key("aead", name, AEAD_GCM, key, GCM_KEY_BYTES,
                        "20, 28 or 36 bytes (AES key + 4 bytes salt)")
        _icv_bits("aead", AEAD_GCM, bits, GCM_ICV_BITS, "ICV is 64, 96 or 128 bits (RFC 4106 §3)")
        self.aead = True
        self.ivlen, self.icvlen, self.block = GCM_IV, bits // 8, GCM_BLOCK
        self._gcm_key = key[:-GCM_SALT]
        self._salt = key[-GCM_SALT:]
        self._gcm = AESGCM(self._gcm_key)
        # seqiv: IV = 64-bit sequence number XOR a random value fixed for the SA
        self._ivsalt = int.from_bytes(self._random(GCM_IV), "big")

    def _init_cbc(self, enc, auth) -> None:
        if not isinstance(enc, tuple) or len(enc) != 2:
            raise ConfigError(f"enc: (name, KEY), not {enc!r:.40}")
        if not isinstance(auth, tuple) or len(auth) not in (2, 3):
            raise ConfigError(f"auth-trunc: (name, KEY, truncation bits), not {auth!r:.40}")
        key = _algo_key("enc", enc[0], ENC_CBC, enc[1], CBC_KEY_BYTES,
                        "16, 24 or 32 bytes (AES-128, -192, -256)", _ENC_NAMES)
        bits = auth[2] if len(auth) == 3 and auth[2] is not None else SHA256_DEFAULT_TRUNC
        akey = _algo_key("auth-trunc", auth[0], AUTH_SHA256, auth[1], (SHA256_KEY_BYTES,),
                         "32 bytes (RFC 4868 §2.1.1)", _AUTH_NAMES)
        _icv_bits("auth-trunc", AUTH_SHA256, bits, SHA256_TRUNC_BITS,
                  "the ICV is 96..256 bits in steps of 8 (128 by RFC 4868 §2.1)")
        self.aead = False
        self.ivlen, self.icvlen, self.block = CBC_IV, bits // 8, CBC_BLOCK
        self._mac = crypto_hmac.HMAC(akey, hashes.SHA256())
        # One CBC context per direction for the SA's life, started from a zero IV: a packet
        # with IV iv is run through it with its first block XORed with iv ^ the context's
        # chaining block (the last ciphertext block it saw), which is exactly CBC from iv
        # (C1 = E(P1 ^ iv)). It saves a key schedule per packet.
        aes = algorithms.AES(key)
        self._enc = Cipher(aes, modes.CBC(bytes(CBC_BLOCK))).encryptor()
        self._dec = Cipher(aes, modes.CBC(bytes(CBC_BLOCK))).decryptor()

    # -- what the SA shows ------------------------------------------------------------------

    def replay_context(self) -> str:
        """The line `ip xfrm state` prints for the SA's replay state."""
        return (f"anti-replay context: seq {self.seq:#x}, oseq {self.oseq:#x}, "
                f"bitmap 0x{self.bitmap:08x}")

    @property
    def max_overhead(self) -> int:
        """The most bytes ESP adds to a packet: header, IV, padding, trailer, ICV."""
        return ESP_HLEN + self.ivlen + self.block - 1 + 2 + self.icvlen

    def inner_mtu(self, mtu: int) -> int:
        """The largest inner packet that fits an underlay MTU with the outer IPv4 header, as
        xfrm_state_mtu() computes it for tunnel mode (1446 over 1500 for GCM-128, 1438 for
        CBC with a 128-bit ICV)."""
        header = IPV4_HLEN + ESP_HLEN + self.ivlen
        return ((mtu - header - self.icvlen) & ~(self.block - 1)) - 2

    # -- outbound ---------------------------------------------------------------------------

    def encrypt(self, inner) -> bytes | Drop:
        """The ESP packet (header, IV, ciphertext, ICV) carrying the IPv4 packet inner, or
        why not: NOT_IPV4, TOO_BIG, ESP_SEQ_OVERFLOW. A refused packet spends no number."""
        n = len(inner)
        if n < IPV4_HLEN or inner[0] >> 4 != 4:
            return Drop.NOT_IPV4
        tail = trailer(n, self.block, self.NEXT_HEADER)
        if IPV4_HLEN + ESP_HLEN + self.ivlen + n + len(tail) + self.icvlen > _MAX_PACKET:
            return Drop.TOO_BIG
        seq = self.oseq
        if seq == SEQ_MAX:
            return Drop.ESP_SEQ_OVERFLOW        # RFC 4303 §3.3.3: no cycling without ESN
        seq += 1
        self.oseq = seq
        hdr = self._hdr + seq.to_bytes(4, "big")
        if self.aead:
            iv = (self._ivsalt ^ seq).to_bytes(GCM_IV, "big")
            nonce = self._salt + iv                      # RFC 4106 §4
            pt = b"".join((inner, tail))
            if self.icvlen == 16:
                return b"".join((hdr, iv, self._gcm.encrypt(nonce, pt, hdr)))
            e = Cipher(algorithms.AES(self._gcm_key), modes.GCM(nonce)).encryptor()
            e.authenticate_additional_data(hdr)
            ct = e.update(pt)
            e.finalize()
            return b"".join((hdr, iv, ct, e.tag[:self.icvlen]))     # RFC 4106 §3: MSBs
        iv = self._random(CBC_IV)
        first = _xor3(inner[:CBC_BLOCK], iv, self._eprev)
        ct = self._enc.update(b"".join((first, inner[CBC_BLOCK:], tail)))
        self._eprev = ct[-CBC_BLOCK:]
        msg = b"".join((hdr, iv, ct))
        return msg + self.icv(msg)

    def icv(self, data) -> bytes:
        """HMAC-SHA-256 of data under the SA's auth key, truncated to the SA's ICV length:
        its leftmost bits (RFC 4868 §2.1). For the enc + auth-trunc suite only."""
        mac = self._mac.copy()
        mac.update(data)
        return mac.finalize()[:self.icvlen]

    # -- inbound ----------------------------------------------------------------------------

    def check_replay(self, seq: int) -> Drop | None:
        """xfrm_replay_check(): may a packet with this sequence number be processed?"""
        w = self.replay_window
        if not w:
            return None
        if seq == 0:
            return Drop.ESP_TOO_OLD
        top = self.seq
        if seq > top:
            return None
        diff = top - seq
        if diff >= w:
            return Drop.ESP_TOO_OLD
        if (self.bitmap >> diff) & 1:
            return Drop.ESP_REPLAY
        return None

    def _advance(self, seq: int) -> None:
        """xfrm_replay_advance(): record an authenticated sequence number."""
        w = self.replay_window
        if not w:
            return
        top = self.seq
        if seq > top:
            diff = seq - top
            self.bitmap = ((self.bitmap << diff) | 1) & self._mask if diff < w else 1
            self.seq = seq
        else:
            self.bitmap |= 1 << (top - seq)

    def decrypt(self, esp) -> bytes | Drop:
        """The inner IPv4 packet of the ESP packet esp (from the SPI to the end of the ICV,
        outer header removed), or why it is dropped. Never raises on any input."""
        n = len(esp)
        if n < ESP_HLEN:
            return Drop.ESP_HEADER
        spi = (esp[0] << 24) | (esp[1] << 16) | (esp[2] << 8) | esp[3]
        if spi != self.spi:
            return Drop.XFRM_NO_STATE
        seq = (esp[4] << 24) | (esp[5] << 16) | (esp[6] << 8) | esp[7]
        if self.replay_window:
            why = self.check_replay(seq)
            if why is not None:
                return why
        v = memoryview(esp)
        ivend = ESP_HLEN + self.ivlen
        icv_at = n - self.icvlen
        if icv_at < ivend:
            return Drop.ESP_LENGTH
        if self.aead:
            nonce = self._salt + bytes(v[ESP_HLEN:ivend])
            try:
                if self.icvlen == 16:
                    pt = self._gcm.decrypt(nonce, v[ivend:], v[:ESP_HLEN])
                else:
                    d = Cipher(algorithms.AES(self._gcm_key),
                               modes.GCM(nonce, bytes(v[icv_at:]), self.icvlen)).decryptor()
                    d.authenticate_additional_data(v[:ESP_HLEN])
                    pt = d.update(v[ivend:icv_at])
                    d.finalize()
            except InvalidTag:
                return Drop.ESP_ICV
        else:
            if not _hmac.compare_digest(self.icv(v[:icv_at]), bytes(v[icv_at:])):
                return Drop.ESP_ICV
            clen = icv_at - ivend
            if clen == 0 or clen % CBC_BLOCK:
                return Drop.ESP_LENGTH      # the cipher refuses it after the ICV (-EINVAL)
            # the context's first block came out as D(C1) ^ (its chaining block); RFC 3602
            # §3 wants D(C1) ^ IV
            out = self._dec.update(v[ivend:icv_at])
            first = _xor3(out[:CBC_BLOCK], self._dprev, v[ESP_HLEN:ivend])
            self._dprev = bytes(v[icv_at - CBC_BLOCK:icv_at])
            pt = first + out[CBC_BLOCK:]
        r = parse_trailer(pt)
        if r.__class__ is Drop:
            return r
        end, nh = r
        self._advance(seq)
        if nh != self.NEXT_HEADER or end < IPV4_HLEN:
            return Drop.ESP_NEXT_HEADER
        return pt[:end]
