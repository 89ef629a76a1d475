"""ESP packet format (RFC 4303 §2): header, payload, trailer, ICV.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ----
    |               Security Parameters Index (SPI)                 | ^Int.
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |Cov-
    |                      Sequence Number                          | |ered
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ | ----
    |                    IV (explicit, per algorithm)               | |   ^
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |   |
    ~                    Payload Data (variable)                    ~ |   |
    +               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |Conf
    |               |     Padding (0-255 bytes)                     | |ide-
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |ntia
    |                               |  Pad Length   | Next Header   | v lity
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ------
    |         Integrity Check Value-ICV   (variable)                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The IV is RFC 4303 §2.3's "synchronization data in the payload": 8 bytes for AES-GCM
(RFC 4106 §3.1), 16 for AES-CBC (RFC 3602 §3). Padding, pad length and next header are
encrypted with the payload; the ICV follows the ciphertext (§2.8).

Everything here is the format alone; the algorithms and the SA's state are tunnel.esp's.
"""
from __future__ import annotations

from .drop import Drop

PROTO_ESP = 50              # IP protocol number of ESP (RFC 4303 §2)
ESP_HLEN = 8                # SPI and sequence number
OFF_SPI, OFF_SEQ = 0, 4
TRAILER_LEN = 2             # pad length and next header (§2.5, §2.6)
MAX_PAD = 255               # §2.4: 0 to 255 bytes of padding
NEXTHDR_IPIP = 4            # the inner packet of IPv4 tunnel mode is IPv4 (IPPROTO_IPIP)
SEQ_MAX = 0xFFFFFFFF        # 32-bit sequence numbers (no ESN: §2.2.1 is not used)

# RFC 4303 §2.4: "the Padding bytes are initialized with a series of (unsigned, 1-byte)
# integer values. The first padding byte appended to the plaintext is numbered 1, with
# subsequent padding bytes making up a monotonically increasing sequence"
PAD_BYTES = bytes(range(1, MAX_PAD + 1))


def peek(v) -> tuple[int, int] | Drop:
    """(SPI, sequence number) of the ESP packet at v[0:], without allocating; the receive
    path picks the SA by the SPI and checks the sequence number before any crypto.

    Like xfrm_parse_spi(): fewer than 8 bytes is ESP_HEADER (XfrmInHdrError)."""
    if len(v) < ESP_HLEN:
        return Drop.ESP_HEADER
    return ((v[0] << 24) | (v[1] << 16) | (v[2] << 8) | v[3],
            (v[4] << 24) | (v[5] << 16) | (v[6] << 8) | v[7])


def pack_header_into(buf, off: int, spi: int, seq: int) -> None:
    """Write SPI and sequence number at buf[off:off+8], in network byte order."""
    buf[off:off + ESP_HLEN] = spi.to_bytes(4, "big") + seq.to_bytes(4, "big")


def pad_len(n: int, block: int) -> int:
    """Padding bytes after n bytes of payload, as esp_output() pads: the payload, padding
    and the two trailer bytes fill whole blocks of `block` bytes, the cipher's block size
    aligned to 4 (blksize = ALIGN(crypto_aead_blocksize(), 4)); §2.4 asks for no more than
    that and for a 4-byte aligned ciphertext, which block (a multiple of 4) gives."""
    return -(n + TRAILER_LEN) % block


def trailer(n: int, block: int, next_header: int) -> bytes:
    """Padding 1, 2, 3 ..., pad length and next header for n bytes of payload (§2.4-§2.6),
    as esp_output_fill_trailer() writes it (no TFC padding)."""
    p = -(n + TRAILER_LEN) % block
    return PAD_BYTES[:p] + bytes((p, next_header))


def parse_trailer(pt) -> tuple[int, int] | Drop:
    """(payload length, next header) of a decrypted payload pt (payload, padding, trailer),
    or ESP_PADDING.

    Like esp_remove_trailer(): a pad length that leaves no payload byte is garbage. Then
    RFC 4303 §2.4: the receiver checks the padding it was sent is 1, 2, 3 ... (the kernel
    does not look at the pad bytes; tunl does, and so drops what only a broken or forging
    sender would produce)."""
    n = len(pt)
    if n < TRAILER_LEN + 1:
        return Drop.ESP_PADDING
    padlen = pt[n - 2]
    end = n - TRAILER_LEN - padlen
    if end <= 0:
        return Drop.ESP_PADDING
    if padlen and pt[end:n - TRAILER_LEN] != PAD_BYTES[:padlen]:
        return Drop.ESP_PADDING
    return end, pt[n - 1]
