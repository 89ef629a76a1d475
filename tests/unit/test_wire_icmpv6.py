"""ICMPv6 codec (RFC 4443), cross-checked with scapy's dissector and checksum.

Expected values come from RFC 4443 (message layouts, §2.4 (c): an error carries as much of the
offending packet as fits in the minimum IPv6 MTU, 1280 - 40 - 8 = 1232 bytes) and from scapy,
which computes the checksum over the RFC 8200 §8.1 pseudo-header on its own.
"""
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import UDP, UDPerror
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6PacketTooBig,
                                IPerror6, IPv6, in6_chksum)
from scapy.packet import Raw

from tunl.wire import icmpv6, ipv6
from tunl.wire.icmpv6 import Icmpv6Message

SRC = IPv6Address("2001:db8:1::1").packed
DST = IPv6Address("2001:db8:2::2").packed

addresses = st.binary(min_size=16, max_size=16)


def offending(size: int, nh: int = 17) -> bytes:
    """A packet from 2001:db8:1::1 to 2001:db8:2::2, `size` bytes long in all."""
    return ipv6.build("2001:db8:1::1", "2001:db8:2::2", nh,
                      (bytes(range(256)) * 300)[:size - 40], hlim=61)


def scapy_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """The ICMPv6 checksum scapy computes for a message whose checksum field is zeroed."""
    zeroed = message[:2] + b"\0\0" + message[4:]
    under = IPv6(src=str(IPv6Address(src)), dst=str(IPv6Address(dst)), nh=58)
    return in6_chksum(58, under, zeroed)


# ---- build and parse ---------------------------------------------------------------------------

@settings(max_examples=300)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1),
       st.binary(max_size=300), addresses, addresses)
def test_build_checksum_agrees_with_scapy_and_parse_round_trips(t, c, rest, data, src, dst):
    wire = Icmpv6Message(t, c, rest, data).build(src, dst)
    assert len(wire) == 8 + len(data)
    # RFC 4443 §2.1: type, code, checksum, then the message body
    assert wire[0] == t and wire[1] == c and wire[8:] == data
    assert int.from_bytes(wire[4:8], "big") == rest
    assert int.from_bytes(wire[2:4], "big") == scapy_checksum(src, dst, wire)
    assert Icmpv6Message.parse(wire, src, dst) == Icmpv6Message(t, c, rest, data)


def test_checksum_covers_the_pseudo_header():
    wire = Icmpv6Message(128, 0, 1, b"x").build(SRC, DST)
    Icmpv6Message.parse(wire, SRC, DST)
    with pytest.raises(ValueError, match="bad checksum"):
        Icmpv6Message.parse(wire, SRC, IPv6Address("2001:db8:2::3").packed)


def test_echo_request_equals_scapy_byte_for_byte():
    m = Icmpv6Message(icmpv6.ECHO_REQUEST, 0, (0x1234 << 16) | 7, b"ping")
    want = bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2")
                 / ICMPv6EchoRequest(id=0x1234, seq=7, data=b"ping"))[40:]
    assert m.build(SRC, DST) == want


def test_parse_scapy_built_echo_reply():
    wire = bytes(IPv6(src="2001:db8:2::2", dst="2001:db8:1::1")
                 / ICMPv6EchoReply(id=9, seq=0xBEEF, data=b"pong"))[40:]
    m = Icmpv6Message.parse(wire, DST, SRC)
    assert (m.type, m.code, m.rest >> 16, m.rest & 0xFFFF, m.data) == (129, 0, 9, 0xBEEF, b"pong")


def test_parse_scapy_built_packet_too_big():
    quoted = offending(200)
    wire = bytes(IPv6(src="2001:db8:2::2", dst="2001:db8:1::1")
                 / ICMPv6PacketTooBig(mtu=1400) / Raw(quoted))[40:]
    m = Icmpv6Message.parse(wire, DST, SRC)
    assert (m.type, m.code, m.mtu, m.data) == (2, 0, 1400, quoted)


def test_parse_refuses_short_or_corrupt_messages():
    with pytest.raises(ValueError, match="shorter than 8"):
        Icmpv6Message.parse(b"\x80\x00\x00\x00\x00\x00\x00", SRC, DST)
    wire = bytearray(Icmpv6Message(128, 0, 1, b"abc").build(SRC, DST))
    wire[-1] ^= 0x01
    with pytest.raises(ValueError, match="bad checksum"):
        Icmpv6Message.parse(wire, SRC, DST)


# ---- errors: Packet Too Big (RFC 4443 §3.2) ----------------------------------------------------

def test_quote_keeps_at_most_1232_bytes():
    big = offending(1500)
    assert icmpv6.quote(big) == big[:1232]
    small = offending(100)
    assert icmpv6.quote(small) == small


def test_packet_too_big_fields():
    m = icmpv6.packet_too_big(offending(1400), 1280)
    assert (m.type, m.code, m.mtu) == (2, 0, 1280)
    # RFC 4443 §3.2: type 2, code 0, then the 32-bit MTU
    assert m.build(DST, SRC)[4:8] == (1280).to_bytes(4, "big")


def test_error_packet_dissected_by_scapy():
    orig = offending(1400)
    pkt = icmpv6.error_packet("2001:db8:2::2", orig, icmpv6.packet_too_big(orig, 1300))
    assert len(pkt) == 1280                # RFC 4443 §2.4 (c): no more than the minimum MTU
    p = IPv6(pkt)
    assert (p.src, p.dst, p.nh, p.hlim, p.tc, p.fl, p.plen) == (
        "2001:db8:2::2", "2001:db8:1::1", 58, 64, 0, 0, 1240)
    ptb = p[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, 1300)
    assert ptb.cksum == scapy_checksum(DST, SRC, pkt[40:])
    quoted = p[IPerror6]
    assert (quoted.src, quoted.dst, quoted.nh, quoted.hlim) == (
        "2001:db8:1::1", "2001:db8:2::2", 17, 61)
    assert bytes(ptb.payload) == orig[:1232]


def test_error_packet_about_a_small_packet_quotes_all_of_it():
    orig = bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2") / UDP(sport=1, dport=2) / b"hi")
    pkt = icmpv6.error_packet(DST, orig, icmpv6.packet_too_big(orig, 1280), hlim=255)
    p = IPv6(pkt)
    assert p.hlim == 255 and p.plen == 8 + len(orig)
    assert bytes(p[ICMPv6PacketTooBig].payload) == orig
    assert p[IPerror6][UDPerror].dport == 2
    stored = p[ICMPv6PacketTooBig].cksum
    del p[ICMPv6PacketTooBig].cksum          # scapy computes it again from the layers
    assert IPv6(bytes(p))[ICMPv6PacketTooBig].cksum == stored


@settings(max_examples=100)
@given(st.integers(40, 2000), st.integers(1280, 65535), addresses)
def test_error_packet_checksum_verified_by_scapy(size, mtu, src):
    orig = offending(size)
    pkt = icmpv6.error_packet(src, orig, icmpv6.packet_too_big(orig, mtu))
    assert len(pkt) == min(size, 1232) + 48
    msg = pkt[40:]
    assert int.from_bytes(msg[2:4], "big") == scapy_checksum(src, orig[8:24], msg)
