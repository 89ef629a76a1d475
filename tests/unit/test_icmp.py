"""ICMP codec (RFC 792, RFC 1191), cross-checked with scapy's dissector."""
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPerror
from scapy.packet import Raw

from tunl.wire import icmp, ipv4
from tunl.wire.checksum import inet_checksum
from tunl.wire.drop import Drop
from tunl.wire.icmp import IcmpMessage


def offending(size: int = 100, tos: int = 0) -> bytes:
    """A UDP-looking packet from 10.0.0.1 to 10.9.9.9, `size` bytes long."""
    return ipv4.build("10.0.0.1", "10.9.9.9", ipv4.PROTO_UDP,
                      (bytes(range(256)) * 8)[:size - 20], tos=tos)


# ---- round trips -------------------------------------------------------------------------

@settings(max_examples=500)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1),
       st.binary(max_size=600))
def test_build_parse_round_trip(t, c, rest, data):
    wire = IcmpMessage(t, c, rest, data).build()
    assert len(wire) == 8 + len(data)
    assert inet_checksum(wire) == 0
    assert IcmpMessage.parse(wire) == IcmpMessage(t, c, rest, data)


def test_echo_fields():
    m = icmp.echo(icmp.ECHO_REQUEST, 0x1234, 0xBEEF, b"ping")
    assert (m.type, m.code, m.ident, m.seq, m.data) == (8, 0, 0x1234, 0xBEEF, b"ping")
    # RFC 792: type, code, checksum, identifier, sequence number, data
    wire = m.build()
    assert wire[:2] == b"\x08\x00" and wire[4:8] == b"\x12\x34\xbe\xef" and wire[8:] == b"ping"


def test_parse_refuses_short_or_corrupt_messages():
    with pytest.raises(ValueError, match="shorter than 8"):
        IcmpMessage.parse(b"\x08\x00\xf7\xff\x00\x00\x00")
    wire = bytearray(icmp.echo(icmp.ECHO_REPLY, 1, 2, b"abc").build())
    wire[-1] ^= 0x01
    with pytest.raises(ValueError, match="bad checksum"):
        IcmpMessage.parse(wire)


# ---- errors: sizes and fields as icmp_send() makes them ----------------------------------

def test_quote_keeps_at_most_548_bytes():
    # icmp_send(): the whole error fits in 576 bytes: 576 - 20 (IP) - 8 (ICMP) = 548
    big = offending(1400)
    assert icmp.quote(big) == big[:548]
    small = offending(60)
    assert icmp.quote(small) == small


def test_frag_needed_carries_the_next_hop_mtu_in_the_low_16_bits():
    m = icmp.dest_unreach(icmp.FRAG_NEEDED, offending(), mtu=1480)
    assert (m.type, m.code, m.mtu) == (3, 4, 1480)
    assert m.build()[4:8] == b"\x00\x00\x05\xc8"  # RFC 1191: unused (16) | next-hop MTU (16)


def test_other_unreachables_carry_no_mtu():
    m = icmp.dest_unreach(icmp.PORT_UNREACH, offending(), mtu=1480)
    assert (m.type, m.code, m.rest) == (3, 3, 0)


def test_error_packet_dissected_by_scapy():
    orig = offending(1400)
    msg = icmp.dest_unreach(icmp.FRAG_NEEDED, orig, mtu=1380)
    pkt = icmp.error_packet("192.0.2.254", orig, msg, ttl=61)
    assert len(pkt) == 576
    p = IP(pkt)
    assert (p.src, p.dst, p.proto, p.ttl) == ("192.0.2.254", "10.0.0.1", 1, 61)
    assert p.tos == 0xC0 and int(p.flags) == 0 and p.frag == 0 and p.len == 576
    stored = p.chksum
    del p.chksum
    assert IP(bytes(p)).chksum == stored
    i = p[ICMP]
    assert (i.type, i.code, i.nexthopmtu) == (3, 4, 1380)
    stored = i.chksum
    del i.chksum
    assert ICMP(bytes(i)).chksum == stored
    q = p[IPerror]
    assert (q.src, q.dst, q.proto, q.len) == ("10.0.0.1", "10.9.9.9", 17, 1400)
    assert pkt[28:] == orig[:548]


def test_time_exceeded_dissected_by_scapy():
    orig = offending(84)
    pkt = icmp.error_packet("198.51.100.1", orig, icmp.time_exceeded(orig))
    p = IP(pkt)
    assert (p.dst, p.ttl, p.tos) == ("10.0.0.1", 64, 0xC0)
    assert (p[ICMP].type, p[ICMP].code) == (11, 0)
    assert (p[IPerror].src, p[IPerror].len) == ("10.0.0.1", 84)
    assert pkt[28:] == orig


def test_echo_dissected_by_scapy():
    wire = icmp.echo(icmp.ECHO_REQUEST, 77, 3, b"0123456789").build()
    p = ICMP(wire)
    assert (p.type, p.code, p.id, p.seq, p.load) == (8, 0, 77, 3, b"0123456789")
    assert p.chksum == int.from_bytes(wire[2:4], "big")
    del p.chksum
    assert bytes(ICMP(bytes(p))) == wire


# ---- scapy builds, tunl parses -----------------------------------------------------------

@settings(max_examples=100)
@given(st.integers(68, 0xFFFF), st.binary(max_size=40))
def test_scapy_frag_needed_parsed_by_tunl(mtu, tail):
    quoted = IP(src="172.16.0.1", dst="172.16.0.2", proto=4) / IP(src="10.1.0.1", dst="10.2.0.1")
    wire = bytes(ICMP(type=3, code=4, nexthopmtu=mtu) / quoted / Raw(tail))
    got = icmp.parse_error(wire)
    assert not isinstance(got, Drop)
    msg, q = got
    assert (msg.type, msg.code, msg.mtu) == (3, 4, mtu)
    assert q == bytes(quoted / Raw(tail))
    assert ipv4.IPv4Header.parse(q).dst == IPv4Address("172.16.0.2")


def test_scapy_echo_reply_parsed_by_tunl():
    wire = bytes(ICMP(type=0, id=0xABCD, seq=0x0102) / b"data")
    m = IcmpMessage.parse(wire)
    assert (m.type, m.ident, m.seq, m.data) == (0, 0xABCD, 0x0102, b"data")


def test_scapy_port_unreachable_parsed_by_tunl():
    orig = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)
    msg, q = icmp.parse_error(bytes(ICMP(type=3, code=3) / orig))
    assert (msg.type, msg.code) == (3, 3)
    assert q == bytes(orig)


# ---- parse_error(): what is not a usable error -------------------------------------------

def test_parse_error_drops_what_it_cannot_use():
    orig = offending(60)
    assert icmp.parse_error(icmp.echo(8, 1, 1, orig).build()) is Drop.MALFORMED  # not an error
    assert icmp.parse_error(icmp.dest_unreach(3, orig[:19]).build()) is Drop.MALFORMED  # no header
    bad = bytearray(icmp.time_exceeded(orig).build())
    bad[2] ^= 0xFF
    assert icmp.parse_error(bad) is Drop.MALFORMED
    assert icmp.parse_error(b"\x03\x04") is Drop.MALFORMED


@settings(max_examples=1000)
@given(st.binary(max_size=120))
def test_parse_error_never_raises(data):
    got = icmp.parse_error(data)
    if got is not Drop.MALFORMED:
        msg, q = got
        assert msg.type in (icmp.DEST_UNREACH, icmp.TIME_EXCEEDED) and len(q) >= 20


def test_error_packet_keeps_the_rt_tos_bits_of_the_offending_packet():
    # icmp_send(): RT_TOS(iph->tos) | IPTOS_PREC_INTERNETCONTROL; precedence and ECN are not kept
    orig = bytearray(offending(84))
    orig[1] = 0x33
    pkt = icmp.error_packet("198.51.100.1", bytes(orig), icmp.time_exceeded(bytes(orig)))
    assert IP(pkt).tos == 0xC0 | 0x12
