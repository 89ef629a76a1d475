"""IPv4 header codec and ip_rcv_core() checks, cross-checked with scapy's dissector."""
from dataclasses import replace
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from tunl.wire import ipv4
from tunl.wire.checksum import inet_checksum
from tunl.wire.drop import Drop
from tunl.wire.ipv4 import DF, IPV4_HLEN, MF, IPv4Header

addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
options = st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
headers = st.builds(
    IPv4Header,
    src=addresses, dst=addresses, proto=st.integers(0, 255), ttl=st.integers(0, 255),
    tos=st.integers(0, 255), ident=st.integers(0, 0xFFFF), flags_frag=st.integers(0, 0xFFFF),
    options=options)
payloads = st.binary(max_size=600)


def scapy_checksum_ok(data: bytes) -> bool:
    """The stored header checksum against scapy's own checksum of the header with that field
    zeroed (not a rebuild of the whole packet: scapy would also rebuild a payload it thinks it
    knows, IGMP for protocol 2, and may change the header while doing it)."""
    from scapy.utils import checksum
    ihl = (data[0] & 0x0F) * 4
    hdr = bytearray(data[:ihl])
    stored = int.from_bytes(hdr[10:12], "big")
    hdr[10:12] = b"\0\0"
    return checksum(bytes(hdr)) == stored


# ---- round trips -------------------------------------------------------------------------

@settings(max_examples=500)
@given(headers, payloads)
def test_build_parse_round_trip(h, payload):
    pkt = h.build(payload)
    got = IPv4Header.parse(pkt)
    hlen = IPV4_HLEN + len(h.options)
    assert got == replace(h, total_len=len(pkt), ihl=hlen // 4,
                          checksum=int.from_bytes(pkt[10:12], "big"))
    assert pkt[hlen:] == payload
    assert inet_checksum(pkt[:hlen]) == 0


@settings(max_examples=300)
@given(headers, payloads)
def test_parse_build_round_trip_is_byte_exact(h, payload):
    pkt = h.build(payload)
    assert IPv4Header.parse(pkt).build(pkt[IPV4_HLEN + len(h.options):]) == pkt


@settings(max_examples=300)
@given(headers.map(lambda h: replace(h, options=b"")), payloads)
def test_pack_header_into_writes_the_same_header_as_build(h, payload):
    buf = bytearray(7 + IPV4_HLEN + len(payload))
    buf[7 + IPV4_HLEN:] = payload
    ipv4.pack_header_into(buf, 7, tos=h.tos, total_len=IPV4_HLEN + len(payload), ident=h.ident,
                          frag=h.flags_frag, ttl=h.ttl, proto=h.proto, src=h.src.packed,
                          dst=h.dst.packed)
    assert bytes(buf[7:]) == h.build(payload)
    assert buf[:7] == bytes(7)  # nothing written in front of the header


def test_build_refuses_unpadded_options():
    with pytest.raises(ValueError, match="multiple of 4"):
        IPv4Header(IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8"), 17, options=b"\x01").build()


def test_build_helper_and_df_property():
    pkt = ipv4.build("10.0.0.1", "10.0.0.2", ipv4.PROTO_UDP, b"hi", ttl=9)
    h = IPv4Header.parse(pkt)
    assert (str(h.src), str(h.dst), h.proto, h.ttl, h.total_len) == (
        "10.0.0.1", "10.0.0.2", 17, 9, 22)
    assert h.df  # DF is the default, as for any socket doing path MTU discovery
    assert not replace(h, flags_frag=MF | 5).df


# ---- hex vectors -------------------------------------------------------------------------

def test_known_header_vector():
    # the textbook header 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7
    want = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
    h = IPv4Header(IPv4Address("192.168.0.1"), IPv4Address("192.168.0.199"), 17, ttl=64,
                   tos=0, ident=0, flags_frag=DF)
    pkt = h.build(bytes(0x73 - 20))
    assert pkt[:20] == want
    got = IPv4Header.parse(pkt)
    assert got.checksum == 0xB861 and got.total_len == 0x73 and got.df


# ---- against scapy -------------------------------------------------------------------------

@settings(max_examples=200)
@given(headers, payloads)
def test_tunl_build_dissected_by_scapy(h, payload):
    pkt = h.build(payload)
    p = IP(pkt)
    assert p.version == 4
    assert p.ihl == 5 + len(h.options) // 4
    assert (p.src, p.dst) == (str(h.src), str(h.dst))
    assert (p.ttl, p.tos, p.proto, p.id) == (h.ttl, h.tos, h.proto, h.ident)
    assert int(p.flags) == h.flags_frag >> 13
    assert p.frag == h.flags_frag & 0x1FFF
    assert p.len == len(pkt)
    assert scapy_checksum_ok(pkt)


@settings(max_examples=200)
@given(addresses, addresses, st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.sampled_from(["", "DF", "MF", "DF+MF"]), st.integers(0, 0x1FFF), st.binary(max_size=300))
def test_scapy_build_parsed_by_tunl(src, dst, ttl, tos, ident, flags, frag, payload):
    raw = bytes(IP(src=str(src), dst=str(dst), ttl=ttl, tos=tos, id=ident, flags=flags,
                   frag=frag, proto=253) / Raw(payload))
    p = IP(raw)
    h = IPv4Header.parse(raw)
    assert (h.src, h.dst) == (src, dst)
    assert (h.ttl, h.tos, h.ident, h.proto) == (ttl, tos, ident, 253)
    assert h.flags_frag == (int(p.flags) << 13) | frag
    assert h.df == ("DF" in flags)
    assert h.checksum == p.chksum
    assert h.total_len == len(raw) and h.ihl == 5 and h.options == b""
    assert ipv4.validate(raw) is None


def test_scapy_udp_packet_with_options_parsed_by_tunl():
    # a router alert option (94 04 0000) and a NOP-padded end of options list
    raw = bytes(IP(src="192.0.2.1", dst="198.51.100.7", options=[b"\x94\x04\x00\x00"])
                / UDP(sport=1000, dport=2000) / b"payload")
    h = IPv4Header.parse(raw)
    assert h.ihl == 6 and h.options == b"\x94\x04\x00\x00"
    assert h.proto == ipv4.PROTO_UDP and h.total_len == len(raw)
    assert h.checksum == IP(raw).chksum


# ---- validate(): the checks of ip_rcv_core() ---------------------------------------------

GOOD = ipv4.build("10.1.1.1", "10.2.2.2", ipv4.PROTO_UDP, b"x" * 12)


def with_checksum(pkt: bytes) -> bytes:
    """The header checksum recomputed after a deliberate change."""
    b = bytearray(pkt)
    ihl = (b[0] & 0x0F) * 4
    b[10:12] = b"\0\0"
    b[10:12] = inet_checksum(b[:ihl]).to_bytes(2, "big")
    return bytes(b)


def test_validate_accepts_a_good_packet_and_trailing_padding():
    assert ipv4.validate(GOOD) is None
    assert ipv4.validate(GOOD + b"\0" * 14) is None  # e.g. Ethernet padding after tot_len


def test_validate_too_short_or_wrong_version_is_malformed():
    assert ipv4.validate(b"") is Drop.MALFORMED
    assert ipv4.validate(GOOD[:19]) is Drop.MALFORMED
    assert ipv4.validate(with_checksum(b"\x65" + GOOD[1:])) is Drop.MALFORMED


def test_validate_header_length_below_5_or_past_the_end():
    assert ipv4.validate(with_checksum(b"\x44" + GOOD[1:])) is Drop.BAD_HLEN
    assert ipv4.validate(b"\x46" + GOOD[1:20]) is Drop.BAD_HLEN   # 24-byte header in 20 bytes


def test_validate_bad_checksum():
    b = bytearray(GOOD)
    b[11] ^= 1
    assert ipv4.validate(b) is Drop.BAD_CHECKSUM


def test_validate_total_length_smaller_than_header_or_past_the_end():
    short = with_checksum(GOOD[:2] + (19).to_bytes(2, "big") + GOOD[4:])
    assert ipv4.validate(short) is Drop.BAD_LENGTH
    long = with_checksum(GOOD[:2] + (len(GOOD) + 1).to_bytes(2, "big") + GOOD[4:])
    assert ipv4.validate(long) is Drop.BAD_LENGTH
    assert ipv4.validate(GOOD[:-1]) is Drop.BAD_LENGTH


def test_parse_raises_value_error_naming_the_rule():
    with pytest.raises(ValueError, match="bad_checksum"):
        IPv4Header.parse(GOOD[:11] + bytes([GOOD[11] ^ 0x80]) + GOOD[12:])


@settings(max_examples=500)
@given(headers, st.binary(max_size=64), st.data())
def test_any_single_bit_flip_in_the_header_is_dropped(h, payload, draw):
    pkt = bytearray(h.build(payload))
    hlen = IPV4_HLEN + len(h.options)
    bit = draw.draw(st.integers(0, hlen * 8 - 1))
    pkt[bit // 8] ^= 0x80 >> (bit % 8)
    assert isinstance(ipv4.validate(pkt), Drop)


@settings(max_examples=1000)
@given(st.binary(max_size=80))
def test_validate_never_raises_and_agrees_with_parse(data):
    why = ipv4.validate(data)
    assert why is None or isinstance(why, Drop)
    if why is None:
        IPv4Header.parse(data)
    else:
        with pytest.raises(ValueError):
            IPv4Header.parse(data)
