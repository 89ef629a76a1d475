"""IPv6 header codec (RFC 8200 §3) and the ipv6_rcv() checks, cross-checked with scapy's IPv6."""
from dataclasses import replace
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from tunl.wire import ipv6
from tunl.wire.drop import Drop
from tunl.wire.ipv6 import IPV6_HLEN, IPv6Header

addresses = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
headers = st.builds(IPv6Header, src=addresses, dst=addresses, nh=st.integers(0, 255),
                    hlim=st.integers(0, 255), tc=st.integers(0, 255),
                    flow=st.integers(0, 2**20 - 1))
payloads = st.binary(max_size=300)


# ---- building and parsing, against scapy ---------------------------------------------------

@settings(max_examples=300)
@given(headers, payloads)
def test_build_dissected_by_scapy(h, payload):
    pkt = h.build(payload)
    p = IPv6(pkt[:IPV6_HLEN])   # the header only: scapy may choke on a random payload
    assert (p.version, p.tc, p.fl, p.plen, p.nh, p.hlim) == (
        6, h.tc, h.flow, len(payload), h.nh, h.hlim)
    assert (IPv6Address(p.src), IPv6Address(p.dst)) == (h.src, h.dst)
    assert pkt[IPV6_HLEN:] == payload


@settings(max_examples=300)
@given(headers, payloads)
def test_build_equals_scapy_byte_for_byte(h, payload):
    want = IPv6(src=str(h.src), dst=str(h.dst), nh=h.nh, hlim=h.hlim, tc=h.tc, fl=h.flow)
    assert h.build(payload) == bytes(want / Raw(payload))


@settings(max_examples=300)
@given(headers, payloads)
def test_parse_scapy_built_packets_and_round_trip(h, payload):
    pkt = bytes(IPv6(src=str(h.src), dst=str(h.dst), nh=h.nh, hlim=h.hlim, tc=h.tc,
                     fl=h.flow) / Raw(payload))
    got = IPv6Header.parse(pkt)
    assert got == replace(h, plen=len(payload))
    assert got.build(pkt[IPV6_HLEN:]) == pkt


def test_build_helper():
    pkt = ipv6.build("fd00::1", "fd00::2", ipv6.NH_ICMPV6, b"abc", hlim=9, tc=0xB8)
    p = IPv6(pkt)
    assert (p.src, p.dst, p.nh, p.hlim, p.tc, p.plen) == ("fd00::1", "fd00::2", 58, 9, 0xB8, 3)


# ---- validate(): ipv6_rcv() ---------------------------------------------------------------

def test_validate_accepts_a_packet_and_padding_after_it():
    pkt = bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest())
    assert ipv6.validate(pkt) is None
    assert ipv6.validate(pkt + bytes(7)) is None        # pskb_trim_rcsum() trims it


def test_validate_empty_payload():
    assert ipv6.validate(bytes(IPv6(nh=59))) is None


@pytest.mark.parametrize("n", [0, 1, 39])
def test_validate_too_short(n):
    assert ipv6.validate(bytes(IPv6())[:n]) is Drop.MALFORMED


@pytest.mark.parametrize("version", [0, 4, 5, 7, 15])
def test_validate_wrong_version(version):
    pkt = bytearray(bytes(IPv6(nh=59)))
    pkt[0] = version << 4 | (pkt[0] & 0x0F)
    assert ipv6.validate(pkt) is Drop.MALFORMED


def test_validate_payload_length_past_the_end():
    pkt = bytes(IPv6(nh=59) / Raw(b"0123456789"))
    assert ipv6.validate(pkt[:-1]) is Drop.BAD_LENGTH   # ipv6_rcv(): "truncated"
    assert ipv6.validate(pkt) is None


def test_parse_refuses_what_validate_refuses():
    with pytest.raises(ValueError, match="bad_total_length"):
        IPv6Header.parse(bytes(IPv6(nh=59) / Raw(b"xy"))[:-1])
    with pytest.raises(ValueError, match="malformed"):
        IPv6Header.parse(bytes(30))


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_validate_arbitrary_bytes(data):
    why = ipv6.validate(data)
    ok = len(data) >= 40 and data[0] >> 4 == 6 and 40 + (data[4] << 8 | data[5]) <= len(data)
    assert (why is None) == ok


# ---- traffic class, straddling bytes 0 and 1 ----------------------------------------------

@settings(max_examples=300)
@given(st.integers(0, 255), st.integers(0, 2**20 - 1), st.integers(0, 8))
def test_traffic_class_reads_what_scapy_wrote(tc, flow, off):
    pkt = b"\x99" * off + bytes(IPv6(tc=tc, fl=flow, nh=59))
    assert ipv6.traffic_class(pkt, off) == tc


@settings(max_examples=300)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**20 - 1), st.integers(0, 8))
def test_set_traffic_class_changes_only_the_traffic_class(old, new, flow, off):
    pkt = bytes(IPv6(src="fd00::1", dst="fd00::2", tc=old, fl=flow, hlim=7, nh=59))
    buf = bytearray(b"\x99" * off + pkt)
    ipv6.set_traffic_class(buf, off, new)
    assert buf[:off] == b"\x99" * off
    assert bytes(buf[off:]) == bytes(IPv6(src="fd00::1", dst="fd00::2", tc=new, fl=flow,
                                          hlim=7, nh=59))
    assert ipv6.traffic_class(buf, off) == new


# ---- the upper-layer checksum ---------------------------------------------------------------

@settings(max_examples=200)
@given(addresses, addresses, st.integers(0, 0xFFFF), st.binary(max_size=100))
def test_pseudo_checksum_equals_scapys_icmpv6_checksum(src, dst, ident, data):
    pkt = IPv6(bytes(IPv6(src=str(src), dst=str(dst)) / ICMPv6EchoRequest(id=ident, data=data)))
    icmp = bytearray(bytes(pkt[ICMPv6EchoRequest]))
    want = pkt[ICMPv6EchoRequest].cksum
    icmp[2:4] = b"\0\0"
    assert ipv6.pseudo_checksum(src.packed, dst.packed, 58, icmp) == want
