"""ESP in IPv4 tunnel mode (RFC 4303) for a vti's SA, with the semantics of the kernel's
xfrm_input()/esp_input() and xfrm_output()/esp_output():

  aead rfc4106(gcm(aes))    KEY = AES key + 4-byte salt, 8-byte IV, AAD = SPI || seq,
                            ICV 64/96/128 (RFC 4106)
  enc cbc(aes) + auth-trunc hmac(sha256)
                            random 16-byte IV (RFC 3602), HMAC over header, IV, ciphertext
                            truncated to 96..256 bits (RFC 4868)
  egress    next header 4; padding 1, 2, 3 ... to 4 (GCM) or 16 (CBC) bytes; seq from 1;
            one that would cycle → ESP_SEQ_OVERFLOW
  ingress   header → replay check → length → ICV → decrypt → padding → the window moves
            → next header 4; each failure its Drop, never an exception

Independent references: the ESP test vectors of draft-mcgrew-gcm-test-01 (by an author of
GCM, for RFC 4106 implementers), RFC 3602 §4 cases 7 and 8 (tunnel mode AES-CBC ESP),
RFC 4868 §2.7.2.1 (HMAC-SHA-256-128), and scapy's SecurityAssociation as a second ESP
implementation.
"""
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers import ipsec as scapy_ipsec
from scapy.layers.inet import IP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

from tunl.errors import ConfigError
from tunl.tunnel import esp as tesp
from tunl.tunnel.esp import XFRM_MIB, XFRM_STATE_STATS, EspSA
from tunl.wire import esp as wesp
from tunl.wire.drop import Drop

GCM, CBC, SHA = "rfc4106(gcm(aes))", "cbc(aes)", "hmac(sha256)"
SPI = 0x1000
LOCAL, REMOTE = "192.0.2.1", "198.51.100.2"
KEY16, KEY24, KEY32 = bytes(range(16)), bytes(range(24)), bytes(range(32))
SALT = b"\xca\xfe\xba\xbe"
AUTH = bytes(range(0x40, 0x60))
# scapy: IP(src="10.42.1.2", dst="10.42.2.3", ttl=64, id=1, flags="DF")
#        / ICMP(type=8, id=0x77, seq=1) / b"ping"
INNER = bytes.fromhex("4500002000014000400123840a2a01020a2a0203080018b70077000170696e67")


def gcm(key=KEY16, icv=128, **kw) -> EspSA:
    return EspSA(SPI, aead=(GCM, key + SALT, icv), **kw)


def cbc(key=KEY16, trunc=128, **kw) -> EspSA:
    return EspSA(SPI, enc=(CBC, key), auth=(SHA, AUTH, trunc), **kw)


def ipv4(payload: bytes = b"", src=b"\x0a\x2a\x01\x02", dst=b"\x0a\x2a\x02\x03") -> bytes:
    """An IPv4 packet whose header is right (scapy rebuilds it byte for byte)."""
    return bytes(IP(src=".".join(map(str, src)), dst=".".join(map(str, dst)), proto=253,
                    id=7) / Raw(payload))


def seqiv(iv_hex: str, seq: int):
    """random_bytes for an SA whose GCM IV at sequence number seq is iv_hex (the IV is
    seq XOR a value drawn once, as the kernel's seqiv)."""
    x = (int.from_bytes(bytes.fromhex(iv_hex), "big") ^ seq).to_bytes(8, "big")
    return lambda n: x[:n]


# ---- wire format ---------------------------------------------------------------------------

def test_peek_reads_spi_and_sequence_number_without_copying():
    v = memoryview(bytes.fromhex("deadbeef00000102") + b"rest")
    assert wesp.peek(v) == (0xDEADBEEF, 0x102)
    assert wesp.peek(b"\xff" * 8) == (0xFFFFFFFF, 0xFFFFFFFF)
    for n in range(8):
        assert wesp.peek(bytes(n)) is Drop.ESP_HEADER      # xfrm_parse_spi(): HdrError


def test_pack_header_into():
    buf = bytearray(12)
    wesp.pack_header_into(buf, 2, 0x01020304, 0xA0B0C0D0)
    assert buf.hex() == "0000" "01020304" "a0b0c0d0" "0000"


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("n", range(0, 40))
def test_trailer_pads_as_esp_output(n, block):
    # esp_output(): clen = ALIGN(len + 2, blksize); plen = clen - len; pad 1..plen-2
    clen = (n + 2 + block - 1) // block * block
    plen = clen - n
    want = bytes(range(1, plen - 1)) + bytes((plen - 2, 4))
    assert wesp.trailer(n, block, 4) == want
    assert wesp.pad_len(n, block) == plen - 2
    assert wesp.parse_trailer(bytes(n) + want) == ((n, 4) if n else Drop.ESP_PADDING)


@pytest.mark.parametrize("pt", [
    b"", b"\x04", b"\x00\x04",                       # no payload byte left
    b"\x45\x01\x02\x03\x04",                         # pad length 3 leaves no payload
    b"\x45\x45\x01\x03\x02\x04",                     # pad bytes not 1, 2
    b"\x45\x45\x00\x02\x02\x04",
    b"\x45" + bytes(20) + b"\xff\x04",               # pad length past the start
])
def test_parse_trailer_refuses_bad_padding(pt):
    assert wesp.parse_trailer(pt) is Drop.ESP_PADDING


# ---- RFC / draft test vectors, byte for byte ---------------------------------------------------

class Nh1SA(EspSA):
    """draft-mcgrew-gcm-test-01's packets carry next header 1; the vectors are otherwise
    ESP as tunl sends it."""
    NEXT_HEADER = 1


# draft-mcgrew-gcm-test-01 §4, the cases with 32-bit sequence numbers: (KEY = AES key ||
# salt, SPI, seq, explicit IV, payload, whole ESP packet). The payload of the AES-192 case is
# 38 bytes: its last two "IP" bytes are the trailer (pad length 0, next header 1).
GCM_VECTORS = {
    "aes128": (
        "feffe9928665731c6d6a8f9467308308" "cafebabe", 0x0000A5F8, 0x0A, "facedbaddecaf888",
        "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d00100"
        "00010000000000000373697009637962" "65726369747902646b0000010001",
        "0000a5f80000000afacedbaddecaf888"
        "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c"
        "3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd1"
        "83b70d3aa8bc6ee4c309e9d85a41ad4a"),
    "aes192": (
        "feffe9928665731c6d6a8f9467308308feffe9928665731c" "cafebabe", 0x0000A5F8, 0x0A,
        "facedbaddecaf888",
        "45000028a4ad4000400678800a01038f0a010612802306b8cb712602dd6bb03e501016d07568",
        "0000a5f80000000afacedbaddecaf888"
        "a5b1f8066029aea40e598b8122de02420938b3ab33f828e687b8858b5bfbdbd0315b27452144cc77"
        "95457b9652037f5318027b5b4cd7a636"),
    "aes256": (
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab" "11223344",
        0x4A2CBFE3, 2, "0102030405060708",
        "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee000000000"
        "7002400020bf0000020405b401010402",
        "4a2cbfe3000000020102030405060708"
        "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763"
        "748a637985771d347f0545659f14e99def842d8e" "b335f4eecfdbf831824b4c4915956c96"),
}


@pytest.mark.parametrize("name", list(GCM_VECTORS))
def test_gcm_esp_vectors_of_draft_mcgrew_gcm_test(name):
    key, spi, seq, iv, payload, packet = GCM_VECTORS[name]
    key, payload, packet = bytes.fromhex(key), bytes.fromhex(payload), bytes.fromhex(packet)
    tx = Nh1SA(spi, aead=(GCM, key, 128), random_bytes=seqiv(iv, seq))
    tx.oseq = seq - 1
    assert tx.encrypt(payload) == packet
    rx = Nh1SA(spi, aead=(GCM, key, 128), replay_window=32)
    assert rx.decrypt(memoryview(packet)) == payload
    # the same packet to tunl's vti SA: it authenticates and decrypts, but next header 1 is
    # no IPv4 tunnel packet; the window has moved, as xfrm_input() moves it before the mode
    sa = EspSA(spi, aead=(GCM, key, 128), replay_window=32)
    assert sa.decrypt(memoryview(packet)) is Drop.ESP_NEXT_HEADER
    assert (sa.seq, sa.bitmap) == (seq, 1)
    # and scapy reads it the same way
    s = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key)
    got = s.decrypt(IP(bytes(IP(src=REMOTE, dst=LOCAL, proto=50) / Raw(packet))))
    assert bytes(got.payload) == payload and got.proto == 1


# RFC 3602 §4 cases 7 and 8: two packets of one tunnel mode SA (SPI 0x8765, seq 2 and 5),
# AES-128-CBC; the RFC's packets carry no ICV, tunl's add HMAC-SHA-256-128 after them.
CBC_KEY = bytes.fromhex("0123456789abcdef0123456789abcdef")
CBC_VECTORS = [
    (2, "f4e765244f6407adf13dc1380f673f37",
     "45000054090400004001f988c0a87b03c0a87bc808009f76a90a0100b49c083d02a20400"
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b"
     "2c2d2e2f3031323334353637",
     "0000876500000002f4e765244f6407adf13dc1380f673f37773b5241a4c449225e4f3ce5"
     "ed611b0c237ca96cf74a93013c1b0ea1a0cf70f8e4ecaec78ac53aad7a0f022b859243c6"
     "47752e94a859352b8a4d4d2decd136e5c177f132ad3fbfb2201ac9904c74ee0a109e0ca1"
     "e4dfe9d5a100b842f1c22f0d"),
    (5, "85d47224b5f3dd5d2101d4ea8dffab22",
     "45000044090c00004001f990c0a87b03c0a87bc80800d63caa0a0200c69c083da3de0300"
     "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
     "000087650000000585d47224b5f3dd5d2101d4ea8dffab2215b92683819596a8047232cc"
     "00f7048fe45318e11f8a0f62ede3c3fc61203bb50f980a08c9843fd3a1b06d5c07ff9639"
     "b7eb7dfb3512e5de435e7207ed971ef3d2726d9b5ef6affc6d17a0decbb13892"),
]


def test_cbc_esp_vectors_of_rfc3602_cases_7_and_8():
    ivs = iter(bytes.fromhex(c[1]) for c in CBC_VECTORS)
    tx = EspSA(0x8765, enc=(CBC, CBC_KEY), auth=(SHA, AUTH, 128),
               random_bytes=lambda n: next(ivs))
    rx = EspSA(0x8765, enc=(CBC, CBC_KEY), auth=(SHA, AUTH, 128), replay_window=32)
    s = SecurityAssociation(ESP, spi=0x8765, crypt_algo="AES-CBC", crypt_key=CBC_KEY,
                            auth_algo="SHA2-256-128", auth_key=AUTH,
                            tunnel_header=IP(src=LOCAL, dst=REMOTE))
    for seq, _, inner, rfc in CBC_VECTORS:
        inner, rfc = bytes.fromhex(inner), bytes.fromhex(rfc)
        tx.oseq = seq - 1
        packet = tx.encrypt(inner)
        assert packet[:-16] == rfc                       # header, IV, ciphertext: the RFC's
        assert packet[-16:] == hmac.digest(AUTH, rfc, "sha256")[:16]
        assert rx.decrypt(memoryview(packet)) == inner
        got = s.decrypt(IP(bytes(IP(src=REMOTE, dst=LOCAL, proto=50) / Raw(packet))))
        assert bytes(got) == inner
    assert rx.replay_context() == "anti-replay context: seq 0x5, oseq 0x0, bitmap 0x00000009"


# RFC 4868 §2.7.2.1, AUTH256-1 and AUTH256-2 (HMAC-SHA-256 with 32-byte keys, truncated)
@pytest.mark.parametrize("key, data, full", [
    (b"\x0b" * 32, b"Hi There",
     "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"),
    (b"Jefe" * 8, b"what do ya want for nothing?",
     "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6"),
])
@pytest.mark.parametrize("trunc", [96, 128, 256])
def test_hmac_sha256_vectors_of_rfc4868(key, data, full, trunc):
    sa = EspSA(SPI, enc=(CBC, KEY16), auth=(SHA, key, trunc))
    assert sa.icv(data).hex() == full[:trunc // 4]
    assert sa.icv(memoryview(data)).hex() == full[:trunc // 4]


# ---- interoperation with scapy's ESP ------------------------------------------------------------

def scapy_sa(sa_kind: str, key: bytes, icv: int, monkeypatch=None):
    if sa_kind == "gcm":
        return SecurityAssociation(ESP, spi=SPI, crypt_algo="AES-GCM", crypt_key=key + SALT,
                                   crypt_icv_size=icv // 8,
                                   tunnel_header=IP(src=LOCAL, dst=REMOTE))
    name = "SHA2-256-128"
    if icv != 128:
        name = f"SHA2-256-{icv}"
        monkeypatch.setitem(scapy_ipsec.AUTH_ALGOS, name, scapy_ipsec.AuthAlgo(
            name, mac=scapy_ipsec.AUTH_ALGOS["SHA2-256-128"].mac,
            digestmod=scapy_ipsec.AUTH_ALGOS["SHA2-256-128"].digestmod, icv_size=icv // 8))
    return SecurityAssociation(ESP, spi=SPI, crypt_algo="AES-CBC", crypt_key=key,
                               auth_algo=name, auth_key=AUTH,
                               tunnel_header=IP(src=LOCAL, dst=REMOTE))


def tunl_sa(sa_kind: str, key: bytes, icv: int, **kw) -> EspSA:
    return gcm(key, icv, **kw) if sa_kind == "gcm" else cbc(key, icv, **kw)


SUITES = [("gcm", k, i) for k in (KEY16, KEY24, KEY32) for i in (64, 96, 128)] + \
         [("cbc", k, i) for k in (KEY16, KEY24, KEY32) for i in (96, 128, 256)]
# scapy's AES-GCM is PyCA's AESGCM, which takes only a 128-bit tag: the 64 and 96-bit
# ICVs are checked against a GCM opened by the test below
SCAPY_SUITES = [s for s in SUITES if s[0] == "cbc" or s[2] == 128]


@pytest.mark.parametrize("kind, key, icv", SCAPY_SUITES,
                         ids=[f"{s}-{len(k) * 8}-icv{i}" for s, k, i in SCAPY_SUITES])
def test_scapy_decrypts_what_tunl_encrypts_and_back(kind, key, icv, monkeypatch):
    tx = tunl_sa(kind, key, icv)
    rx = tunl_sa(kind, key, icv, replay_window=32)
    s = scapy_sa(kind, key, icv, monkeypatch)
    for payload in (b"", b"x", b"ab" * 7, bytes(range(256)) * 5):
        inner = ipv4(payload)
        packet = tx.encrypt(inner)
        got = s.decrypt(IP(bytes(IP(src=LOCAL, dst=REMOTE, proto=50) / Raw(packet))))
        assert bytes(got) == inner
        from_scapy = s.encrypt(IP(inner))
        assert from_scapy.proto == 50 and from_scapy.src == LOCAL
        assert rx.decrypt(memoryview(bytes(from_scapy[ESP]))) == inner
    # both count 1, 2, 3, 4 from 1
    assert tx.oseq == 4 and s.seq_num == 5 and rx.seq == 4 and rx.bitmap == 0xF


@settings(max_examples=40)
@given(st.sampled_from(["gcm", "cbc"]), st.binary(max_size=1480), st.integers(1, 2**32 - 1))
def test_scapy_interop_any_payload_and_sequence_number(kind, payload, seq):
    inner = ipv4(payload)
    tx, rx = tunl_sa(kind, KEY32, 128), tunl_sa(kind, KEY32, 128, replay_window=64)
    s = scapy_sa(kind, KEY32, 128)
    tx.oseq = seq - 1
    packet = tx.encrypt(inner)
    assert wesp.peek(packet) == (SPI, seq)
    got = s.decrypt(IP(bytes(IP(src=LOCAL, dst=REMOTE, proto=50) / Raw(packet))))
    assert bytes(got) == inner
    assert rx.decrypt(bytes(s.encrypt(IP(inner), seq_num=seq)[ESP])) == inner
    assert rx.seq == seq


@pytest.mark.parametrize("key", [KEY16, KEY24, KEY32])
@pytest.mark.parametrize("icv", [64, 96])
def test_truncated_gcm_icv_is_the_leftmost_bytes_of_the_tag(key, icv):
    # RFC 4106 §3 (NIST SP 800-38D: MSB_t of the tag)
    tx, rx = gcm(key, icv), gcm(key, icv, replay_window=32)
    for payload in (b"", b"x" * 13, bytes(1000)):
        inner = ipv4(payload)
        packet = tx.encrypt(inner)
        hdr, iv = packet[:8], packet[8:16]
        pt = inner + wesp.trailer(len(inner), 4, 4)
        full = AESGCM(key).encrypt(SALT + iv, pt, hdr)
        assert packet == hdr + iv + full[:-16] + full[-16:][:icv // 8]
        assert rx.decrypt(packet) == inner
        assert open_gcm(packet, key, icv // 8) == pt


# ---- egress ----------------------------------------------------------------------------------

def open_gcm(packet: bytes, key=KEY16, icvlen=16) -> bytes:
    """The plaintext (payload, padding, trailer) of a GCM packet, opened without tunl."""
    nonce = SALT + packet[8:16]
    d = Cipher(algorithms.AES(key), modes.GCM(nonce, packet[-icvlen:], icvlen)).decryptor()
    d.authenticate_additional_data(packet[:8])
    return d.update(packet[16:-icvlen]) + d.finalize()


def open_cbc(packet: bytes, key=KEY16, icvlen=16) -> bytes:
    assert hmac.compare_digest(hmac.digest(AUTH, packet[:-icvlen], "sha256")[:icvlen],
                               packet[-icvlen:])
    d = Cipher(algorithms.AES(key), modes.CBC(packet[8:24])).decryptor()
    return d.update(packet[24:-icvlen]) + d.finalize()


@pytest.mark.parametrize("kind", ["gcm", "cbc"])
@pytest.mark.parametrize("n", [20, 21, 22, 23, 24, 30, 31, 32, 33, 46, 47, 1400, 1500])
def test_layout_padding_and_lengths(kind, n):
    sa = tunl_sa(kind, KEY16, 128)
    inner = ipv4(bytes(n - 20))
    packet = sa.encrypt(inner)
    iv, block = (8, 4) if kind == "gcm" else (16, 16)
    pt = open_gcm(packet) if kind == "gcm" else open_cbc(packet)
    clen = (n + 2 + block - 1) // block * block        # esp_output()
    assert len(pt) == clen and len(packet) == 8 + iv + clen + 16
    assert len(packet) % 4 == 0                        # RFC 4303 §2.4
    p = clen - n - 2
    assert pt == inner + bytes(range(1, p + 1)) + bytes((p, 4))
    assert packet[:8] == struct.pack("!II", SPI, 1)
    assert sa.max_overhead >= len(packet) - n


def test_sequence_numbers_count_from_1_and_never_cycle():
    sa = gcm()
    assert [wesp.peek(sa.encrypt(INNER))[1] for _ in range(3)] == [1, 2, 3]
    assert sa.oseq == 3
    sa.oseq = 0xFFFFFFFE
    assert wesp.peek(sa.encrypt(INNER))[1] == 0xFFFFFFFF
    # RFC 4303 §3.3.3: the counter would cycle; xfrm_replay_overflow(): -EOVERFLOW
    assert sa.encrypt(INNER) is Drop.ESP_SEQ_OVERFLOW
    assert sa.encrypt(INNER) is Drop.ESP_SEQ_OVERFLOW
    assert sa.oseq == 0xFFFFFFFF
    assert XFRM_MIB[Drop.ESP_SEQ_OVERFLOW] == "XfrmOutStateSeqError"


def test_gcm_iv_is_the_sequence_number_under_a_fixed_mask():
    # like seqiv: unique per packet of an SA without a random draw per packet
    sa = gcm(random_bytes=lambda n: bytes.fromhex("0102030405060708")[:n])
    ivs = [sa.encrypt(INNER)[8:16] for _ in range(3)]
    assert [int.from_bytes(iv, "big") ^ 0x0102030405060708 for iv in ivs] == [1, 2, 3]
    a, b = gcm(), gcm()            # two SAs draw two masks
    assert a.encrypt(INNER)[8:16] != b.encrypt(INNER)[8:16]


def test_cbc_iv_is_drawn_per_packet():
    draws = []

    def rnd(n):
        draws.append(n)
        return bytes([len(draws)]) * n
    sa = cbc(random_bytes=rnd)
    ivs = [sa.encrypt(INNER)[8:24] for _ in range(3)]
    assert draws == [16, 16, 16] and ivs == [bytes([i]) * 16 for i in (1, 2, 3)]


@pytest.mark.parametrize("inner", [b"", b"\x45" + bytes(18), b"\x60" + bytes(39),
                                   b"\x05" + bytes(40)])
def test_encrypt_refuses_what_is_not_ipv4_and_spends_no_number(inner):
    sa = gcm()
    assert sa.encrypt(inner) is Drop.NOT_IPV4
    assert sa.oseq == 0


def test_encrypt_refuses_what_no_ipv4_packet_could_carry():
    sa = cbc()
    assert sa.encrypt(b"\x45" + bytes(65534)) is Drop.TOO_BIG
    assert sa.oseq == 0
    n = sa.inner_mtu(0xFFFF)
    assert len(sa.encrypt(b"\x45" + bytes(n - 1))) + 20 <= 0xFFFF


def test_inner_mtu_as_xfrm_state_mtu():
    assert gcm().inner_mtu(1500) == 1446
    assert gcm(KEY32, 64).inner_mtu(1500) == 1454
    assert cbc().inner_mtu(1500) == 1438
    for sa in (gcm(), cbc(), cbc(trunc=96), gcm(icv=96)):
        for mtu in (576, 1280, 1500, 9000):
            n = sa.inner_mtu(mtu)
            assert 20 + len(sa.encrypt(b"\x45" + bytes(n - 1))) <= mtu
            assert 20 + len(sa.encrypt(b"\x45" + bytes(n))) > mtu


# ---- round trips ----------------------------------------------------------------------------

suites = st.sampled_from(SUITES)


@settings(max_examples=150)
@given(suites, st.lists(st.binary(max_size=1480), min_size=1, max_size=5))
def test_encrypt_then_decrypt_returns_exactly_the_inner_packet(suite, payloads):
    kind, key, icv = suite
    tx = tunl_sa(kind, key, icv)
    rx = tunl_sa(kind, key, icv, replay_window=32)
    for i, payload in enumerate(payloads, 1):
        inner = ipv4(payload)
        packet = tx.encrypt(memoryview(inner))
        assert isinstance(packet, bytes)
        assert len(packet) == 8 + tx.ivlen + len(inner) + wesp.pad_len(len(inner), tx.block) \
            + 2 + icv // 8
        assert rx.decrypt(memoryview(packet)) == inner
        assert rx.seq == i and tx.oseq == i
    assert rx.bitmap == (1 << len(payloads)) - 1


@settings(max_examples=50)
@given(st.sampled_from(["gcm", "cbc"]), st.lists(st.binary(max_size=200), min_size=2,
                                                  max_size=8), st.randoms())
def test_decrypt_in_any_order_within_the_window(kind, payloads, rnd):
    tx, rx = tunl_sa(kind, KEY16, 128), tunl_sa(kind, KEY16, 128, replay_window=32)
    packets = [(ipv4(p), tx.encrypt(ipv4(p))) for p in payloads]
    rnd.shuffle(packets)
    for inner, packet in packets:
        assert rx.decrypt(packet) == inner
    assert rx.seq == len(payloads) and rx.bitmap == (1 << len(payloads)) - 1


# ---- anti-replay (RFC 4303 §3.4.3) -----------------------------------------------------------

def sent(n: int, kind="gcm", **kw):
    """An SA's first n packets, by sequence number (1..n)."""
    tx = tunl_sa(kind, KEY16, 128, **kw)
    return {i: tx.encrypt(INNER) for i in range(1, n + 1)}


def test_in_order_then_duplicates_and_too_old():
    pk = sent(40)
    rx = gcm(replay_window=32)
    for i in range(1, 40):
        assert rx.decrypt(pk[i]) == INNER
    assert rx.replay_context() == "anti-replay context: seq 0x27, oseq 0x0, bitmap 0xffffffff"
    assert rx.decrypt(pk[39]) is Drop.ESP_REPLAY
    assert rx.decrypt(pk[8]) is Drop.ESP_REPLAY           # diff 31: in the window, seen
    assert rx.decrypt(pk[7]) is Drop.ESP_TOO_OLD          # diff 32: left of it
    assert rx.decrypt(pk[1]) is Drop.ESP_TOO_OLD
    assert rx.decrypt(pk[40]) == INNER
    assert XFRM_MIB[Drop.ESP_REPLAY] == XFRM_MIB[Drop.ESP_TOO_OLD] == "XfrmInStateSeqError"
    assert XFRM_STATE_STATS == {Drop.ESP_TOO_OLD: "replay-window", Drop.ESP_REPLAY: "replay",
                                Drop.ESP_ICV: "failed"}


def test_reordered_within_the_window_and_the_bitmap_as_the_kernel_keeps_it():
    pk = sent(50)
    rx = gcm(replay_window=32)
    assert rx.decrypt(pk[5]) == INNER
    assert (rx.seq, rx.bitmap) == (5, 0b1)
    assert rx.decrypt(pk[3]) == INNER
    assert (rx.seq, rx.bitmap) == (5, 0b101)
    assert rx.decrypt(pk[3]) is Drop.ESP_REPLAY
    assert rx.decrypt(pk[9]) == INNER                       # bitmap << 4 | 1
    assert (rx.seq, rx.bitmap) == (9, 0b1010001)
    assert rx.decrypt(pk[50]) == INNER                      # diff 41 >= 32: bitmap = 1
    assert (rx.seq, rx.bitmap) == (50, 1)
    assert rx.decrypt(pk[19]) == INNER                      # diff 31, the window's last
    assert rx.decrypt(pk[18]) is Drop.ESP_TOO_OLD
    assert rx.replay_context() == "anti-replay context: seq 0x32, oseq 0x0, bitmap 0x80000001"


def test_a_small_window_keeps_the_kernels_u32_bitmap():
    pk = sent(12)
    rx = gcm(replay_window=4)
    for i in (1, 2, 3, 4, 5, 6):
        assert rx.decrypt(pk[i]) == INNER
    assert rx.bitmap == 0b111111            # older bits stay in the u32, as in the kernel
    assert rx.decrypt(pk[2]) is Drop.ESP_TOO_OLD            # diff 4 >= 4
    assert rx.decrypt(pk[3]) is Drop.ESP_REPLAY


def test_window_0_checks_nothing_and_records_nothing():
    pk = sent(3)
    rx = gcm()
    for i in (3, 1, 1, 3, 2):
        assert rx.decrypt(pk[i]) == INNER
    assert rx.replay_context() == "anti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000"


def test_sequence_number_0_is_never_accepted_with_a_window():
    nonce_iv = bytes(8)                 # a packet with sequence number 0, built without tunl
    hdr = struct.pack("!II", SPI, 0)
    ct = AESGCM(KEY16).encrypt(SALT + nonce_iv, INNER + b"\x01\x02\x02\x04", hdr)
    packet = hdr + nonce_iv + ct
    assert gcm().decrypt(packet) == INNER             # window 0: the kernel takes it too
    assert gcm(replay_window=32).decrypt(packet) is Drop.ESP_TOO_OLD


@pytest.mark.parametrize("kind", ["gcm", "cbc"])
def test_the_window_moves_only_after_authentication(kind):
    pk = sent(3, kind)
    tx = tunl_sa(kind, KEY16, 128)
    tx.oseq = 999
    high = bytearray(tx.encrypt(INNER))
    high[-1] ^= 1                                     # forged: seq 1000, bad ICV
    rx = tunl_sa(kind, KEY16, 128, replay_window=32)
    assert rx.decrypt(pk[1]) == INNER
    assert rx.decrypt(high) is Drop.ESP_ICV
    assert (rx.seq, rx.bitmap) == (1, 1)              # not moved: 2 and 3 still come in
    assert rx.decrypt(pk[3]) == INNER and rx.decrypt(pk[2]) == INNER
    high[-1] ^= 1
    assert rx.decrypt(high) == INNER and rx.seq == 1000


@pytest.mark.parametrize("window", [2, 31, 32, 33, 64, 1000, 4096])
def test_large_windows(window):
    rx = gcm(replay_window=window)
    tx = gcm()
    tx.oseq = 5000
    top = tx.encrypt(INNER)                           # 5001
    tx.oseq = 5001 - window
    edge = tx.encrypt(INNER)                          # diff window - 1: the last in it
    tx.oseq = 5000 - window
    old = tx.encrypt(INNER)                           # diff window: out
    assert rx.decrypt(top) == INNER
    assert rx.decrypt(edge) == INNER
    assert rx.decrypt(edge) is Drop.ESP_REPLAY
    assert rx.decrypt(old) is Drop.ESP_TOO_OLD
    assert rx.bitmap == 1 | (1 << (window - 1))


@settings(max_examples=60)
@given(st.integers(1, 64), st.lists(st.integers(1, 120), max_size=60))
def test_window_against_a_model(window, order):
    """RFC 4303 §3.4.3: accept iff new, and not left of the window of the highest seen."""
    tx = gcm()
    pk = {}
    for i in range(1, 121):
        pk[i] = tx.encrypt(INNER)
    rx = gcm(replay_window=window)
    seen, top = set(), 0
    for s in order:
        if s > top:
            want = INNER
        elif top - s >= window:
            want = Drop.ESP_TOO_OLD
        elif s in seen:
            want = Drop.ESP_REPLAY
        else:
            want = INNER
        assert rx.decrypt(pk[s]) == want
        if want == INNER:
            seen.add(s)
            top = max(top, s)
    assert rx.seq == top
    assert all((rx.bitmap >> (top - s)) & 1 for s in seen if top - s < window)


# ---- tampering and malformed packets ---------------------------------------------------------

@settings(max_examples=200)
@given(st.sampled_from(SUITES), st.binary(max_size=300), st.data())
def test_a_flipped_bit_anywhere_is_dropped(suite, payload, data):
    kind, key, icv = suite
    packet = bytearray(tunl_sa(kind, key, icv).encrypt(ipv4(payload)))
    bit = data.draw(st.integers(0, len(packet) * 8 - 1))
    packet[bit // 8] ^= 0x80 >> (bit % 8)
    rx = tunl_sa(kind, key, icv, replay_window=32)
    want = Drop.XFRM_NO_STATE if bit < 32 else Drop.ESP_ICV
    if wesp.peek(packet)[1] == 0:
        want = Drop.ESP_TOO_OLD             # sequence 1 flipped to 0: before the ICV
    assert rx.decrypt(memoryview(packet)) is want
    assert (rx.seq, rx.bitmap) == (0, 0)


@pytest.mark.parametrize("kind", ["gcm", "cbc"])
def test_wrong_keys(kind):
    packet = tunl_sa(kind, KEY16, 128).encrypt(INNER)
    if kind == "gcm":
        assert tunl_sa(kind, bytes(16), 128).decrypt(packet) is Drop.ESP_ICV
    assert EspSA(SPI, enc=(CBC, bytes(16)), auth=(SHA, bytes(32), 128)).decrypt(packet) \
        is Drop.ESP_ICV
    if kind == "gcm":
        assert EspSA(SPI, aead=(GCM, KEY16 + b"salt", 128)).decrypt(packet) is Drop.ESP_ICV
        assert gcm(icv=96).decrypt(packet) is Drop.ESP_ICV
    else:
        other = EspSA(SPI, enc=(CBC, KEY16), auth=(SHA, bytes(32), 128))
        assert other.decrypt(packet) is Drop.ESP_ICV
        assert cbc(trunc=96).decrypt(packet) is Drop.ESP_ICV
        # the right auth key and another enc key: it authenticates, then decrypts to
        # garbage, which the trailer checks catch (this IV's garbage: a pad length too long)
        packet = cbc(random_bytes=lambda n: bytes(n)).encrypt(INNER)
        assert cbc(bytes(16)).decrypt(packet) is Drop.ESP_PADDING
    assert XFRM_MIB[Drop.ESP_ICV] == "XfrmInStateProtoError"


def sealed_gcm(pt: bytes, seq: int = 1) -> bytes:
    """A GCM ESP packet of the test SA around any plaintext, built without tunl."""
    hdr = struct.pack("!II", SPI, seq)
    iv = b"\x11" * 8
    return hdr + iv + AESGCM(KEY16).encrypt(SALT + iv, pt, hdr)


def sealed_cbc(ct_pt: bytes, seq: int = 1) -> bytes:
    """A CBC ESP packet around any plaintext of whole blocks (or, if not, raw bytes as the
    'ciphertext'), with a valid ICV, built without tunl."""
    hdr = struct.pack("!II", SPI, seq)
    iv = b"\x22" * 16
    if len(ct_pt) % 16 == 0 and ct_pt:
        e = Cipher(algorithms.AES(KEY16), modes.CBC(iv)).encryptor()
        ct = e.update(ct_pt) + e.finalize()
    else:
        ct = ct_pt
    msg = hdr + iv + ct
    return msg + hmac.digest(AUTH, msg, "sha256")[:16]


P44 = INNER + bytes(12)      # 44 bytes of payload + 4 of trailer: whole blocks for CBC too
BAD = {
    # plaintext (payload, padding, trailer) → the drop
    "pad-bytes-not-1-2": (P44 + b"\x02\x01\x02\x04", Drop.ESP_PADDING),
    "pad-bytes-zero": (P44 + b"\x00\x00\x02\x04", Drop.ESP_PADDING),
    "pad-length-past-payload": (P44 + b"\x01\x02\x30\x04", Drop.ESP_PADDING),
    "pad-length-leaves-nothing": (bytes(range(1, 31)) + b"\x1e\x04", Drop.ESP_PADDING),
    "next-header-ipv6": (P44 + b"\x01\x02\x02\x29", Drop.ESP_NEXT_HEADER),
    "next-header-none": (P44 + b"\x01\x02\x02\x3b", Drop.ESP_NEXT_HEADER),
    "next-header-icmp": (P44 + b"\x01\x02\x02\x01", Drop.ESP_NEXT_HEADER),
    "inner-shorter-than-ipv4": (b"\x45" + bytes(11) + b"\x01\x02\x02\x04",
                                Drop.ESP_NEXT_HEADER),
}


@pytest.mark.parametrize("name", list(BAD))
def test_authenticated_but_bad_trailer(name):
    pt, want = BAD[name]
    rx = gcm(replay_window=32)
    assert rx.decrypt(sealed_gcm(pt, seq=7)) is want
    # xfrm_input(): the window moves after esp_input() succeeded, before the mode's check
    assert rx.seq == (7 if want is Drop.ESP_NEXT_HEADER else 0)
    rx = cbc(replay_window=32)
    assert rx.decrypt(sealed_cbc(pt, seq=7)) is want
    assert rx.seq == (7 if want is Drop.ESP_NEXT_HEADER else 0)
    assert XFRM_MIB[want] in ("XfrmInStateProtoError", "XfrmInStateModeError")


def test_a_correct_foreign_packet_with_longer_padding_is_taken():
    # RFC 4303 §2.4 lets a sender pad more than it needs (up to 255); 1, 2, 3 ... is all
    # that is checked
    pt = INNER + bytes(range(1, 15)) + b"\x0e\x04"
    assert gcm().decrypt(sealed_gcm(pt)) == INNER
    assert cbc().decrypt(sealed_cbc(pt)) == INNER
    pt = INNER + bytes(range(1, 31)) + b"\x1e\x04"
    assert gcm().decrypt(sealed_gcm(pt)) == INNER and cbc().decrypt(sealed_cbc(pt)) == INNER


@pytest.mark.parametrize("ct", [b"", b"\x00" * 15, b"\x00" * 17, b"\x00" * 33])
def test_cbc_ciphertext_not_whole_blocks(ct):
    # the ICV is checked first (authenc), then the cipher refuses the length
    assert cbc().decrypt(sealed_cbc(ct)) is Drop.ESP_LENGTH
    assert XFRM_MIB[Drop.ESP_LENGTH] == "XfrmInStateProtoError"


@pytest.mark.parametrize("kind", ["gcm", "cbc"])
def test_every_truncation_is_a_drop(kind):
    packet = tunl_sa(kind, KEY16, 128).encrypt(INNER)
    iv = 8 if kind == "gcm" else 16
    rx = tunl_sa(kind, KEY16, 128, replay_window=32)
    for n in range(len(packet)):
        got = rx.decrypt(memoryview(packet)[:n])
        if n < 8:
            assert got is Drop.ESP_HEADER
        elif n < 8 + iv + 16:
            assert got is Drop.ESP_LENGTH
        else:
            assert got is Drop.ESP_ICV
    assert rx.seq == 0
    assert XFRM_MIB[Drop.ESP_HEADER] == "XfrmInHdrError"


def test_another_spi_is_no_state_of_this_sa():
    packet = EspSA(SPI + 1, aead=(GCM, KEY16 + SALT, 128)).encrypt(INNER)
    assert gcm().decrypt(packet) is Drop.XFRM_NO_STATE
    assert XFRM_MIB[Drop.XFRM_NO_STATE] == "XfrmInNoStates"


@settings(max_examples=300)
@given(st.sampled_from(SUITES), st.binary(max_size=120), st.booleans(),
       st.integers(0, 64))
def test_decrypt_of_arbitrary_bytes_never_raises(suite, junk, with_spi, window):
    kind, key, icv = suite
    rx = tunl_sa(kind, key, icv, replay_window=window)
    data = (struct.pack("!I", SPI) + junk) if with_spi else junk
    got = rx.decrypt(memoryview(data))
    assert isinstance(got, Drop) and got in XFRM_MIB
    assert isinstance(rx.decrypt(bytes(data)), Drop)
    assert (rx.seq, rx.bitmap) == (0, 0)


# ---- configuration ---------------------------------------------------------------------------

CONFIG_ERRORS = [
    (dict(aead=(GCM, KEY16, 128)),
     "aead rfc4106(gcm(aes)): KEY is 20, 28 or 36 bytes (AES key + 4 bytes salt), not 16"),
    (dict(aead=(GCM, KEY16 + SALT, 32)),
     "aead rfc4106(gcm(aes)): ICV is 64, 96 or 128 bits (RFC 4106 §3), not 32"),
    (dict(aead=("gcm(aes)", KEY16 + SALT, 128)),
     'aead "gcm(aes)": tunl knows aead rfc4106(gcm(aes))'),
    (dict(aead=("rfc4309(ccm(aes))", KEY16 + b"abc", 128)),
     'aead "rfc4309(ccm(aes))": tunl knows aead rfc4106(gcm(aes))'),
    (dict(aead=(GCM, (KEY16 + SALT).hex(), 128)),
     "aead rfc4106(gcm(aes)): KEY is bytes, not str"),
    (dict(aead=(GCM, KEY16 + SALT)), "aead: (name, KEY, ICV bits), not"),
    (dict(aead=(GCM, KEY16 + SALT, 128), enc=(CBC, KEY16)),
     "enc with aead: aead rfc4106(gcm(aes)) encrypts and authenticates alone; give aead, "
     "or enc with auth-trunc"),
    (dict(aead=(GCM, KEY16 + SALT, 128), auth=(SHA, AUTH, 128)),
     "auth-trunc with aead: aead rfc4106(gcm(aes)) encrypts and authenticates alone; give "
     "aead, or enc with auth-trunc"),
    (dict(enc=(CBC, KEY16)),
     "enc cbc(aes) without auth-trunc: tunl sends no unauthenticated ESP; add auth-trunc "
     "hmac(sha256) KEY 128"),
    (dict(auth=(SHA, AUTH, 128)),
     "auth-trunc without enc: give enc cbc(aes) KEY too (tunl sends no ESP with NULL "
     "encryption)"),
    (dict(), "esp: give aead rfc4106(gcm(aes)) KEY ICV-BITS, or enc cbc(aes) KEY with "
             "auth-trunc hmac(sha256) KEY BITS"),
    (dict(enc=("cbc(des3_ede)", KEY24), auth=(SHA, AUTH, 128)),
     'enc "cbc(des3_ede)": tunl knows enc cbc(aes)'),
    (dict(enc=(CBC, KEY16 + b"x"), auth=(SHA, AUTH, 128)),
     "enc cbc(aes): KEY is 16, 24 or 32 bytes (AES-128, -192, -256), not 17"),
    (dict(enc=(CBC, KEY16), auth=("hmac(sha1)", AUTH[:20], 96)),
     'auth-trunc "hmac(sha1)": tunl knows auth-trunc hmac(sha256)'),
    (dict(enc=(CBC, KEY16), auth=(SHA, AUTH[:20], 128)),
     "auth-trunc hmac(sha256): KEY is 32 bytes (RFC 4868 §2.1.1), not 20"),
    (dict(enc=(CBC, KEY16), auth=(SHA, AUTH, 64)),
     "auth-trunc hmac(sha256): the ICV is 96..256 bits in steps of 8 (128 by RFC 4868 "
     "§2.1), not 64"),
    (dict(enc=(CBC, KEY16), auth=(SHA, AUTH, 100)),
     "auth-trunc hmac(sha256): the ICV is 96..256 bits in steps of 8 (128 by RFC 4868 "
     "§2.1), not 100"),
    (dict(enc=(CBC, KEY16), auth=(SHA, AUTH, 264)),
     "auth-trunc hmac(sha256): the ICV is 96..256 bits in steps of 8 (128 by RFC 4868 "
     "§2.1), not 264"),
    (dict(aead=(GCM, KEY16 + SALT, 128), replay_window=4097),
     "replay-window 4097: 0 (off) .. 4096 packets"),
    (dict(aead=(GCM, KEY16 + SALT, 128), replay_window=-1),
     "replay-window -1: 0 (off) .. 4096 packets"),
    (dict(aead=(GCM, KEY16 + SALT, 128), esn=True),
     "flag esn: tunl's ESP has no extended sequence numbers (RFC 4303 §2.2.1); leave esn out"),
]


@pytest.mark.parametrize("kw, message", CONFIG_ERRORS,
                         ids=[m[:40] for _, m in CONFIG_ERRORS])
def test_constructor_errors_are_one_line_naming_the_word_and_the_rule(kw, message):
    with pytest.raises(ConfigError) as e:
        EspSA(SPI, **kw)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(message)


@pytest.mark.parametrize("spi", [0, -1, 2**32, "0x100", True, None])
def test_spi_errors(spi):
    with pytest.raises(ConfigError, match=r"^spi .*: a number of 1\.\.4294967295 \(0 is "
                                          r"reserved, RFC 4303 §2\.1\)$"):
        EspSA(spi, aead=(GCM, KEY16 + SALT, 128))


def test_accepted_configurations():
    for k in (KEY16, KEY24, KEY32):
        for icv in (64, 96, 128):
            sa = EspSA(0xFFFFFFFF, aead=(GCM, k + SALT, icv), replay_window=4096)
            assert (sa.ivlen, sa.icvlen, sa.block) == (8, icv // 8, 4)
        for trunc in range(96, 257, 8):
            sa = EspSA(1, enc=(CBC, k), auth=(SHA, AUTH, trunc))
            assert (sa.ivlen, sa.icvlen, sa.block) == (16, trunc // 8, 16)
    # the kernel's compat names; a truncation left out is RFC 4868's 128
    sa = EspSA(SPI, enc=("aes", KEY16), auth=("sha256", AUTH, None))
    assert sa.icvlen == 16
    assert EspSA(SPI, enc=(CBC, KEY16), auth=(SHA, AUTH)).icvlen == 16
    assert EspSA(SPI, aead=(GCM, bytearray(KEY16 + SALT), 128)).encrypt(INNER)


def test_the_mib_table_names_kernel_counters():
    kernel = {"XfrmInHdrError", "XfrmInNoStates", "XfrmInStateSeqError",
              "XfrmInStateProtoError", "XfrmInStateModeError", "XfrmInNoPols",
              "XfrmInTmplMismatch", "XfrmOutStateSeqError", "XfrmOutStateModeError",
              "XfrmOutPolBlock", "XfrmOutNoStates"}
    assert set(XFRM_MIB.values()) <= kernel
    esp_reasons = {d for d in Drop if d.name.startswith(("ESP_", "XFRM_"))}
    assert esp_reasons <= set(XFRM_MIB)
    values = [d.value for d in Drop]
    assert len(values) == len(set(values))          # no reason aliases another
    assert XFRM_MIB[Drop.ESP_NEXT_HEADER] == "XfrmInStateModeError"
    assert XFRM_MIB[Drop.ESP_PADDING] == "XfrmInStateProtoError"


def test_the_module_is_pure():
    src = open(tesp.__file__).read() + open(wesp.__file__).read()
    for word in ("import os", "import socket", "import select", "import logging", "scapy"):
        assert word not in src
