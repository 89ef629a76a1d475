"""IPv4-in-IPv4 encapsulation and decapsulation with the kernel's ip_tunnel semantics.

The outer header rules, from ip_tunnel_xmit():
  ttl  fixed, or 0 = the inner ttl
  tos  fixed, or bit 0 set = the inner tos; then INET_ECN_encapsulate(): the outer ECN field is
       the inner one, except that CE becomes ECT(0)
  DF   set when pmtudisc is on OR the inner packet has DF (frag_off = tnl_params->frag_off |
       inner DF); never MF or a fragment offset
"""
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from tunl.model import TunnelMode, TunnelSpec
from tunl.tunnel import ipip
from tunl.tunnel.ipip import HEADROOM, IpipEncap
from tunl.wire import ipv4
from tunl.wire.checksum import inet_checksum
from tunl.wire.drop import Drop
from tunl.wire.ipv4 import IPv4Header

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3

addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
options = st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@st.composite
def inner_packets(draw, max_payload=1400):
    """Any IPv4 packet the kernel would accept: options, fragments, any protocol."""
    h = IPv4Header(draw(addresses), draw(addresses), draw(st.integers(0, 255)),
                   ttl=draw(st.integers(0, 255)), tos=draw(st.integers(0, 255)),
                   ident=draw(st.integers(0, 0xFFFF)), flags_frag=draw(st.integers(0, 0xFFFF)),
                   options=draw(options))
    return h.build(draw(st.binary(max_size=max_payload)))


@st.composite
def specs(draw):
    pmtudisc = draw(st.booleans())
    ttl = draw(st.integers(0, 255)) if pmtudisc else 0  # a fixed ttl needs pmtudisc
    local = draw(st.none() | addresses.filter(lambda a: not a.is_unspecified))
    remote = draw(st.none() | addresses.filter(lambda a: not a.is_multicast or local))
    return TunnelSpec(name="tunl0", local=local, remote=remote,
                      ttl=ttl, tos=draw(st.integers(0, 255)), pmtudisc=pmtudisc)


def encap(spec: TunnelSpec, inner: bytes, dst: str | bytes = "172.16.0.2", ident: int = 0):
    """(buffer, start) after encapsulating inner, read into buf[HEADROOM:] as from a TUN fd."""
    buf = bytearray(b"\xa5" * HEADROOM + inner)
    if isinstance(dst, str):
        dst = IPv4Address(dst).packed
    start = IpipEncap(spec).encap(buf, HEADROOM, len(inner), dst, ident)
    return buf, start


def expected_tos(spec: TunnelSpec, inner_tos: int) -> int:
    base = inner_tos if spec.tos & 1 else spec.tos & 0xFE
    ecn = inner_tos & 3
    return (base & 0xFC) | (ECT0 if ecn == CE else ecn)


def check_decap(buf: bytearray, n: int):
    """decap() must drop, or return the place of an inner packet the kernel would accept."""
    got = ipip.decap(buf, n)
    if isinstance(got, Drop):
        return got
    off, length = got
    assert isinstance(off, int) and isinstance(length, int)
    assert 20 <= off <= 60 and length >= 20 and off + length <= n
    assert ipv4.validate(buf[:n]) is None and buf[9] == ipv4.PROTO_IPIP
    assert off == (buf[0] & 0x0F) * 4
    assert off + length <= (buf[2] << 8 | buf[3])  # inside the outer packet, not its padding
    inner = bytes(buf[off:off + length])
    assert ipv4.validate(inner) is None
    assert (inner[2] << 8) | inner[3] == length  # exactly the inner packet, no padding
    return got


# ---- egress: the outer header --------------------------------------------------------------

@settings(max_examples=500)
@given(specs(), inner_packets(max_payload=200), addresses, st.integers(0, 0xFFFF))
def test_outer_header_follows_ip_tunnel_xmit(spec, inner, dst, ident):
    buf, start = encap(spec, inner, dst.packed, ident)
    assert start == HEADROOM - 20
    assert bytes(buf[:start]) == b"\xa5" * start  # nothing written before the outer header
    assert bytes(buf[HEADROOM:]) == inner          # the inner packet is untouched
    outer = IPv4Header.parse(buf[start:])
    assert outer.ihl == 5 and outer.options == b""
    assert outer.total_len == len(inner) + 20
    assert outer.proto == 4 and outer.ident == ident and outer.dst == dst
    assert outer.src == (spec.local or IPv4Address("0.0.0.0"))
    assert outer.ttl == (spec.ttl or inner[8])
    assert outer.tos == expected_tos(spec, inner[1])
    inner_df = bool(inner[6] & 0x40)
    assert outer.flags_frag == (ipv4.DF if spec.pmtudisc or inner_df else 0)


@pytest.mark.parametrize("pmtudisc,inner_df,outer_df", [
    (True, True, True), (True, False, True), (False, True, True), (False, False, False)])
def test_outer_df_is_pmtudisc_or_inner_df(pmtudisc, inner_df, outer_df):
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"x" * 30,
                       flags_frag=ipv4.DF if inner_df else 0)
    buf, start = encap(TunnelSpec(name="t", pmtudisc=pmtudisc), inner)
    assert ipip.outer_df(buf, start) is outer_df
    assert (buf[start + 6] << 8 | buf[start + 7]) & ~ipv4.DF == 0  # no MF, offset 0


def test_inner_fragment_does_not_make_an_outer_fragment():
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"x" * 16, flags_frag=ipv4.MF | 185)
    buf, start = encap(TunnelSpec(name="t", pmtudisc=False), inner)
    assert buf[start + 6:start + 8] == b"\0\0"


@pytest.mark.parametrize("inner_ttl", [1, 63, 255])
def test_ttl_inherit_takes_the_inner_ttl_and_fixed_ttl_overrides(inner_ttl):
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"", ttl=inner_ttl)
    buf, start = encap(TunnelSpec(name="t", ttl=0), inner)
    assert buf[start + 8] == inner_ttl
    buf, start = encap(TunnelSpec(name="t", ttl=17), inner)
    assert buf[start + 8] == 17


@pytest.mark.parametrize("inner_tos,outer_tos", [
    (0x00, 0x00), (0xB8, 0xB8), (0xB9, 0xB9), (0xBA, 0xBA),
    (0xBB, 0xBA),   # inner CE -> outer ECT(0)
    (0x03, 0x02)])
def test_tos_inherit_takes_the_inner_tos_with_ecn_rules(inner_tos, outer_tos):
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 6, b"", tos=inner_tos)
    buf, start = encap(TunnelSpec(name="t", tos=1), inner)
    assert buf[start + 1] == outer_tos


@pytest.mark.parametrize("spec_tos,inner_tos,outer_tos", [
    (0x10, 0x00, 0x10), (0x10, 0xB8, 0x10),   # fixed DS field, inner DSCP ignored
    (0x10, 0x01, 0x11), (0x10, 0x02, 0x12),   # ECN still copied from the inner packet
    (0x10, 0x03, 0x12),                       # CE -> ECT(0)
    (0x13, 0xB9, 0xB9),                       # bit 0 set: inherit, whatever the rest says
    (0x12, 0x00, 0x10)])                      # ECN bits of a fixed tos are not sent as such
def test_fixed_tos(spec_tos, inner_tos, outer_tos):
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 6, b"", tos=inner_tos)
    buf, start = encap(TunnelSpec(name="t", tos=spec_tos), inner)
    assert buf[start + 1] == outer_tos


def test_source_is_any_without_local_and_local_with_it():
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"")
    buf, start = encap(TunnelSpec(name="t"), inner)
    assert buf[start + 12:start + 16] == b"\0\0\0\0"
    buf, start = encap(TunnelSpec(name="t", local=IPv4Address("192.0.2.9")), inner)
    assert buf[start + 12:start + 16] == bytes([192, 0, 2, 9])


def test_encap_refuses_what_is_not_ipv4():
    six = bytes([0x60]) + bytes(39)
    assert encap(TunnelSpec(name="t"), six)[1] is Drop.NOT_IPV4
    assert encap(TunnelSpec(name="t"), bytes([0x45]) + bytes(18))[1] is Drop.NOT_IPV4


def test_overhead_matches_the_mode():
    assert ipip.OVERHEAD == TunnelMode.IPIP.overhead == 20
    assert HEADROOM >= ipip.OVERHEAD


# ---- egress against scapy --------------------------------------------------------------------

@settings(max_examples=200)
@given(specs(), inner_packets(max_payload=100), st.integers(0, 0xFFFF))
def test_encap_equals_scapy_built_packet_byte_for_byte(spec, inner, ident):
    buf, start = encap(spec, inner, "198.51.100.20", ident)
    inner_df = bool(inner[6] & 0x40)
    want = IP(src=str(spec.local or "0.0.0.0"), dst="198.51.100.20",
              ttl=spec.ttl or inner[8], tos=expected_tos(spec, inner[1]), id=ident,
              flags="DF" if spec.pmtudisc or inner_df else 0, proto=4) / Raw(inner)
    assert bytes(buf[start:]) == bytes(want)


def test_encap_dissected_by_scapy():
    inner = bytes(IP(src="10.42.1.2", dst="10.42.2.3", ttl=63, tos=0x2A)
                  / ICMP(type=8, id=9, seq=1) / b"hello")
    spec = TunnelSpec(name="tunl0", local=IPv4Address("172.16.165.1"), ttl=64, tos=1)
    buf, start = encap(spec, inner, "172.16.165.244", 0x4242)
    p = IP(bytes(buf[start:]))
    assert (p.src, p.dst, p.ttl, p.tos, p.proto, p.id) == (
        "172.16.165.1", "172.16.165.244", 64, 0x2A, 4, 0x4242)
    assert str(p.flags) == "DF" and p.len == len(inner) + 20
    stored = p.chksum
    del p.chksum
    assert IP(bytes(p)).chksum == stored
    q = p.payload
    assert isinstance(q, IP)
    assert (q.src, q.dst, q.ttl) == ("10.42.1.2", "10.42.2.3", 63)
    assert (q[ICMP].id, q[ICMP].load) == (9, b"hello")
    assert bytes(q) == inner


# ---- round trip ------------------------------------------------------------------------------

@settings(max_examples=1000)
@given(specs(), inner_packets(), addresses, st.integers(0, 0xFFFF))
def test_encap_then_decap_returns_exactly_the_inner_packet(spec, inner, dst, ident):
    buf, start = encap(spec, inner, dst.packed, ident)
    wire = bytearray(buf[start:])
    got = check_decap(wire, len(wire))
    assert got == (20, len(inner))
    assert bytes(wire[20:]) == inner


# ---- ingress -----------------------------------------------------------------------------------

def test_decap_scapy_built_packet():
    inner = IP(src="10.42.2.3", dst="10.42.1.2", ttl=64) / UDP(sport=53, dport=5353) / b"answer"
    wire = bytearray(bytes(IP(src="172.16.0.2", dst="172.16.0.1") / inner))
    assert IP(bytes(wire)).proto == 4  # scapy fills in IPPROTO_IPIP
    assert ipip.decap(wire, len(wire)) == (20, len(inner))
    assert bytes(wire[20:]) == bytes(inner)


def test_decap_outer_with_options():
    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())
    wire = bytearray(bytes(IP(src="1.1.1.1", dst="2.2.2.2", options=[b"\x94\x04\x00\x00"])
                           / Raw(inner)))
    wire[9] = 4
    wire[10:12] = b"\0\0"
    wire[10:12] = inet_checksum(wire[:24]).to_bytes(2, "big")
    assert ipip.decap(wire, len(wire)) == (24, len(inner))


def test_decap_ignores_padding_after_the_outer_and_the_inner_packet():
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"data")
    # inner packet followed by bytes inside the outer total length, then link padding
    outer = ipv4.build("1.1.1.1", "2.2.2.2", 4, inner + b"\0" * 6)
    wire = bytearray(outer + b"\xff" * 10)
    assert ipip.decap(wire, len(wire)) == (20, len(inner))
    # only the first n bytes of the buffer are the packet
    assert ipip.decap(bytearray(outer + inner), len(outer)) == (20, len(inner))


def test_decap_inner_packet_must_end_inside_the_outer_packet():
    # ip_rcv_core() trims the outer packet to its total length before the inner one is seen:
    # an inner packet that runs on into link padding is truncated
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"0123456789")
    wire = bytearray(ipv4.build("1.1.1.1", "2.2.2.2", 4, inner[:-4]) + inner[-4:] + b"\0" * 8)
    assert ipip.decap(wire, len(wire)) is Drop.BAD_LENGTH


def test_decap_drop_reasons():
    inner = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"data")
    good = ipv4.build("1.1.1.1", "2.2.2.2", 4, inner)

    def d(pkt):
        return ipip.decap(bytearray(pkt), len(pkt))

    assert d(ipv4.build("1.1.1.1", "2.2.2.2", 47, inner)) is Drop.WRONG_PROTO
    assert d(good[:10] + bytes([good[10] ^ 1]) + good[11:]) is Drop.BAD_CHECKSUM
    assert d(good[:19]) is Drop.MALFORMED
    assert d(good[:-1]) is Drop.BAD_LENGTH
    bad_inner = inner[:11] + bytes([inner[11] ^ 1]) + inner[12:]
    assert d(ipv4.build("1.1.1.1", "2.2.2.2", 4, bad_inner)) is Drop.BAD_CHECKSUM
    assert d(ipv4.build("1.1.1.1", "2.2.2.2", 4, b"\x60" + bytes(39))) is Drop.MALFORMED
    assert d(ipv4.build("1.1.1.1", "2.2.2.2", 4, inner[:19])) is Drop.MALFORMED
    assert d(ipv4.build("1.1.1.1", "2.2.2.2", 4, inner[:-1])) is Drop.BAD_LENGTH
    ce = ipv4.build("1.1.1.1", "2.2.2.2", 4, inner, tos=CE)  # inner is Not-ECT
    assert d(ce) is Drop.ECN


# ---- ingress robustness: arbitrary bytes never make decap() raise --------------------------

valid_ipip = st.builds(
    lambda inner, tos, ttl, opts, pad: IPv4Header(
        IPv4Address("172.16.0.2"), IPv4Address("172.16.0.1"), 4, ttl=ttl, tos=tos,
        options=opts).build(inner) + pad,
    inner_packets(max_payload=64), st.integers(0, 255), st.integers(0, 255),
    st.sampled_from([b"", b"\x01\x01\x01\x00"]), st.binary(max_size=4))


def fix_outer_checksum(b: bytearray) -> None:
    """Recompute an IPv4 header checksum in place, if there is a header to checksum."""
    if not b or b[0] >> 4 != 4:
        return
    ihl = (b[0] & 0x0F) * 4
    if 20 <= ihl <= len(b):
        b[10:12] = b"\0\0"
        b[10:12] = inet_checksum(b[:ihl]).to_bytes(2, "big")


@settings(max_examples=3000)
@given(st.binary(max_size=128))
def test_decap_arbitrary_bytes(data):
    check_decap(bytearray(data), len(data))


@settings(max_examples=3000)
@given(st.binary(min_size=20, max_size=20), st.binary(max_size=100), st.booleans(),
       st.booleans(), st.booleans())
def test_decap_arbitrary_inner_under_a_valid_outer_header(hdr, inner, v4, fix_inner, fix_outer):
    # an outer header that passes (so the inner checks are reached) over anything, or over
    # something that looks like IPv4, with a total length and a checksum that hold
    inner = bytearray(inner)
    if v4 and len(inner) >= 4:
        inner[0] = 0x40 | (inner[0] & 0x0F)
        inner[2:4] = len(inner).to_bytes(2, "big")
    if fix_inner:
        fix_outer_checksum(inner)  # the same arithmetic for the inner header
    b = bytearray(b"\x45" + hdr[1:2] + (20 + len(inner)).to_bytes(2, "big") + hdr[4:20] + inner)
    b[9] = 4
    if fix_outer:
        fix_outer_checksum(b)
    check_decap(b, len(b))


@settings(max_examples=3000)
@given(valid_ipip, st.data())
def test_decap_truncated_valid_packets(pkt, draw):
    full = check_decap(bytearray(pkt), len(pkt))
    assert full is Drop.ECN or not isinstance(full, Drop)  # valid, unless RFC 6040 drops it
    k = draw.draw(st.integers(0, len(pkt)))
    buf = bytearray(pkt)
    got = check_decap(buf[:k], k)
    if not isinstance(got, Drop):
        # only the padding may have gone: the whole outer packet is still there
        assert k >= (pkt[2] << 8 | pkt[3])
    # a short n over the full buffer must behave the same as a short buffer
    assert check_decap(bytearray(pkt), k) == got


@settings(max_examples=3000)
@given(valid_ipip, st.lists(st.integers(0, 2**16), min_size=1, max_size=8), st.booleans(),
       st.booleans())
def test_decap_bit_flipped_valid_packets(pkt, bits, fix_outer, fix_inner):
    b = bytearray(pkt)
    for bit in bits:
        bit %= len(b) * 8
        b[bit // 8] ^= 0x80 >> (bit % 8)
    if fix_inner and len(b) > 40:
        inner = b[20:]
        fix_outer_checksum(inner)  # the same arithmetic for the inner header
        b[20:] = inner
    if fix_outer:
        fix_outer_checksum(b)
    check_decap(b, len(b))


@settings(max_examples=300)
@given(valid_ipip, st.integers(0, 255))
def test_decap_accepts_every_valid_packet_unless_ecn_says_drop(pkt, outer_tos):
    b = bytearray(pkt)
    b[1] = outer_tos
    fix_outer_checksum(b)
    ihl = (b[0] & 0x0F) * 4
    inner_tos = b[ihl + 1]
    got = check_decap(b, len(b))
    if outer_tos & 3 == CE and inner_tos & 3 == NOT_ECT:
        assert got is Drop.ECN
    else:
        assert got == (ihl, (b[ihl + 2] << 8) | b[ihl + 3])
