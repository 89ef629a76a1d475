"""IPv6 in IPv4 (RFC 4213, protocol 41) with ISATAP (RFC 5214) and 6rd (RFC 5969), with the
semantics of the kernel's net/ipv6/sit.c.

The rules, from ipip6_tunnel_xmit():
  tos   exactly 1 = the inner traffic class, any other value is fixed (`if (tos == 1)`); then
        INET_ECN_encapsulate(): the outer ECN field is the inner one, CE sent as ECT(0)
  ttl   fixed, or 0 = the inner hop limit
  DF    the tunnel's (pmtudisc), cleared when the path MTU leaves less than 1280 bytes for
        the IPv6 packet (RFC 4213 §3.2.2); an IPv6 packet larger than max(path MTU - 20, 1280)
        with DF is answered with an ICMPv6 Packet Too Big
  dst   the remote; without one, ISATAP (the next hop's embedded IPv4), then 6rd/6to4 (the
        IPv4 bits after the 6rd prefix, RFC 5969 §4 / RFC 3056 §2), then an IPv4-compatible
        next hop (::a.b.c.d)
and from ipip6_rcv() / packet_is_spoofed(): isatap_chksrc() on an ISATAP tunnel, is_spoofed_6rd()
(with only_dnatted()) on a sit tunnel without remote, then the checks of ipv6_rcv() and RFC 6040.
"""
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6PacketTooBig, IPerror6, IPv6,
                                in6_chksum)
from scapy.packet import Raw

from tunl.model import TunnelMode, TunnelSpec
from tunl.tunnel import sit
from tunl.tunnel.sit import HEADROOM, SitCodec
from tunl.wire import ipv4
from tunl.wire.checksum import inet_checksum
from tunl.wire.drop import Drop

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3
SIT, ISATAP = TunnelMode.SIT, TunnelMode.ISATAP


def v4(text: str) -> bytes:
    return IPv4Address(text).packed


def v6(text: str) -> bytes:
    return IPv6Address(text).packed


def codec(**kw) -> SitCodec:
    kw.setdefault("mode", SIT)
    return SitCodec(TunnelSpec(name="sit1", **kw))


def inner6(src="2001:db8:1::1", dst="2001:db8:2::2", tc=0, hlim=64, payload=b"data") -> bytes:
    return bytes(IPv6(src=src, dst=dst, tc=tc, hlim=hlim, nh=59) / Raw(payload))


def encap(c: SitCodec, inner: bytes, dst="198.51.100.2", ident=0, path_mtu=None):
    """(buffer, start) after encapsulating inner, read into buf[HEADROOM:] as from a TUN fd."""
    buf = bytearray(b"\xa5" * HEADROOM + inner)
    start = c.encap(buf, HEADROOM, len(inner), v4(dst) if isinstance(dst, str) else dst, ident,
                    **({} if path_mtu is None else {"path_mtu": path_mtu}))
    return buf, start


def outer(inner: bytes, src="192.0.2.1", dst="198.51.100.2", tos=0) -> bytearray:
    """A protocol-41 packet as another host (scapy) sends it."""
    return bytearray(bytes(IP(src=src, dst=dst, tos=tos, proto=41) / Raw(inner)))


def check_decap(buf: bytearray, n: int, c: SitCodec):
    """decap() must drop, or return the place of an inner IPv6 packet the kernel accepts."""
    got = sit.decap(buf, n, c)
    if isinstance(got, Drop):
        return got
    off, length = got
    assert isinstance(off, int) and isinstance(length, int)
    assert ipv4.validate(buf[:n]) is None and buf[9] == 41
    assert off == (buf[0] & 0x0F) * 4
    assert off + length <= (buf[2] << 8 | buf[3])      # inside the outer packet
    assert length >= 40 and buf[off] >> 4 == 6
    assert length == 40 + (buf[off + 4] << 8 | buf[off + 5])
    return got


def expected_tos(spec_tos: int, inner_tc: int) -> int:
    base = inner_tc if spec_tos == 1 else spec_tos
    ecn = inner_tc & 3
    return (base & 0xFC) | (ECT0 if ecn == CE else ecn)


# ---- a hex vector, both ways -------------------------------------------------------------------

# ICMPv6 echo request 2001:db8:1::1 -> 2001:db8:2::2 (id 0x1234, seq 1, "sit!") from
# 192.0.2.1 to 198.51.100.2: IPv4 header with DF, ttl 64, protocol 0x29 = 41, then the
# untouched IPv6 packet (version 6, payload length 12, next header 0x3a, hop limit 64)
VECTOR = bytes.fromhex(
    "45000048" "01014000" "40294d55" "c0000201" "c6336402"
    "60000000" "000c3a40" "20010db8000100000000000000000001" "20010db8000200000000000000000002"
    "80002a81" "12340001" "73697421")
VECTOR_INNER = VECTOR[20:]


def test_vector_is_what_scapy_builds():
    inner = IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", hlim=64) / ICMPv6EchoRequest(
        id=0x1234, seq=1, data=b"sit!")
    assert bytes(IP(src="192.0.2.1", dst="198.51.100.2", ttl=64, id=0x0101, flags="DF")
                 / inner) == VECTOR


def test_encap_builds_the_vector():
    c = codec(local=IPv4Address("192.0.2.1"), remote=IPv4Address("198.51.100.2"), ttl=64)
    buf, start = encap(c, VECTOR_INNER, "198.51.100.2", 0x0101)
    assert bytes(buf[start:]) == VECTOR


def test_encap_dissected_by_scapy():
    inner = bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", tc=0xB9, hlim=33)
                  / ICMPv6EchoRequest(id=7, seq=9, data=b"hello"))
    c = codec(local=IPv4Address("192.0.2.1"), tos=1)
    buf, start = encap(c, inner, "198.51.100.2", 0x4242)
    p = IP(bytes(buf[start:]))
    assert (p.src, p.dst, p.proto, p.ttl, p.tos, p.id, p.len) == (
        "192.0.2.1", "198.51.100.2", 41, 33, 0xB9, 0x4242, len(inner) + 20)
    assert str(p.flags) == "DF" and p.frag == 0 and p.ihl == 5
    stored = p.chksum
    del p.chksum
    assert IP(bytes(p)).chksum == stored
    q = p.payload
    assert isinstance(q, IPv6)
    assert (q.src, q.dst, q.tc, q.hlim) == ("2001:db8:1::1", "2001:db8:2::2", 0xB9, 33)
    assert (q[ICMPv6EchoRequest].id, q[ICMPv6EchoRequest].data) == (7, b"hello")
    assert bytes(q) == inner


def test_decap_the_vector():
    c = codec(remote=IPv4Address("192.0.2.1"))
    wire = bytearray(VECTOR)
    assert sit.decap(wire, len(wire), c) == (20, len(VECTOR_INNER))
    assert bytes(wire[20:]) == VECTOR_INNER


def test_decap_scapy_built_packet():
    inner = IPv6(src="2001:db8:2::2", dst="2001:db8:1::1") / ICMPv6EchoRequest(data=b"x" * 50)
    wire = bytearray(bytes(IP(src="198.51.100.2", dst="192.0.2.1") / inner))
    assert IP(bytes(wire)).proto == 41                 # scapy fills in IPPROTO_IPV6
    c = codec(remote=IPv4Address("198.51.100.2"))
    assert sit.decap(wire, len(wire), c) == (20, len(inner))
    assert bytes(wire[20:]) == bytes(inner)


# ---- egress: the outer header ------------------------------------------------------------------

addresses4 = st.builds(IPv4Address, st.integers(1, 2**32 - 1))


@st.composite
def inner_packets(draw, max_payload=1400):
    """Any IPv6 packet: traffic class, flow label, hop limit, next header, addresses."""
    return bytes(IPv6(src=str(IPv6Address(draw(st.binary(min_size=16, max_size=16)))),
                      dst=str(IPv6Address(draw(st.binary(min_size=16, max_size=16)))),
                      tc=draw(st.integers(0, 255)), fl=draw(st.integers(0, 2**20 - 1)),
                      hlim=draw(st.integers(0, 255)), nh=draw(st.integers(0, 255)))
                 / Raw(draw(st.binary(max_size=max_payload))))


@st.composite
def specs(draw):
    pmtudisc = draw(st.booleans())
    ttl = draw(st.integers(0, 255)) if pmtudisc else 0        # a fixed ttl needs pmtudisc
    tos = draw(st.sampled_from([0, 1, 0x10, 0x13, 0xB8, 0xFF]) | st.integers(0, 255))
    return TunnelSpec(name="sit1", mode=SIT, local=draw(st.none() | addresses4),
                      remote=draw(addresses4.filter(lambda a: not a.is_multicast)),
                      ttl=ttl, tos=tos, pmtudisc=pmtudisc)


@settings(max_examples=300)
@given(specs(), inner_packets(max_payload=200), addresses4, st.integers(0, 0xFFFF))
def test_encap_equals_scapy_built_packet_byte_for_byte(spec, inner, dst, ident):
    buf, start = encap(SitCodec(spec), inner, dst.packed, ident)
    assert start == HEADROOM - 20
    assert bytes(buf[:start]) == b"\xa5" * start          # nothing written before the header
    tc = ((inner[0] & 0x0F) << 4) | (inner[1] >> 4)
    want = IP(src=str(spec.local or "0.0.0.0"), dst=str(dst), ttl=spec.ttl or inner[7],
              tos=expected_tos(spec.tos, tc), id=ident, flags="DF" if spec.pmtudisc else 0,
              proto=41) / Raw(inner)
    assert bytes(buf[start:]) == bytes(want)


@pytest.mark.parametrize("inner_tc,outer_tos", [
    (0x00, 0x00), (0xB8, 0xB8), (0xB9, 0xB9), (0xBA, 0xBA),
    (0xBB, 0xBA),                                   # inner CE -> outer ECT(0)
    (0x03, 0x02)])
def test_tos_inherit_takes_the_traffic_class(inner_tc, outer_tos):
    buf, start = encap(codec(tos=1), inner6(tc=inner_tc))
    assert buf[start + 1] == outer_tos


@pytest.mark.parametrize("spec_tos,inner_tc,outer_tos", [
    (0x10, 0xB8, 0x10), (0x10, 0x01, 0x11), (0x10, 0x03, 0x12),
    # only tos 1 means inherit in ipip6_tunnel_xmit() (ip_tunnel_xmit() tests bit 0): 0x13
    # is a fixed 0x10 whose ECN bits INET_ECN_encapsulate() replaces with the inner ones
    (0x13, 0xB9, 0x11), (0x13, 0xB8, 0x10), (0xFF, 0x00, 0xFC)])
def test_fixed_tos(spec_tos, inner_tc, outer_tos):
    buf, start = encap(codec(tos=spec_tos), inner6(tc=inner_tc))
    assert buf[start + 1] == outer_tos


@pytest.mark.parametrize("hlim", [1, 64, 255])
def test_ttl_inherits_the_hop_limit_and_a_fixed_ttl_overrides(hlim):
    buf, start = encap(codec(ttl=0), inner6(hlim=hlim))
    assert buf[start + 8] == hlim
    buf, start = encap(codec(ttl=200), inner6(hlim=hlim))
    assert buf[start + 8] == 200


def test_df_follows_pmtudisc():
    buf, start = encap(codec(), inner6())
    assert buf[start + 6:start + 8] == b"\x40\x00"
    buf, start = encap(codec(pmtudisc=False), inner6())
    assert buf[start + 6:start + 8] == b"\x00\x00"


def test_encap_refuses_what_is_not_ipv6():
    c = codec()
    assert encap(c, bytes(IP(dst="10.0.0.1") / Raw(b"x" * 40)))[1] is Drop.NOT_IPV6
    assert encap(c, inner6()[:39])[1] is Drop.NOT_IPV6       # no room for an IPv6 header
    assert encap(c, b"")[1] is Drop.NOT_IPV6


def test_codec_shape():
    c = codec()
    assert sit.PROTO == c.proto == 41 == TunnelMode.SIT.proto
    assert c.versions == (6,)
    assert c.overhead == sit.OVERHEAD == 20 == TunnelMode.SIT.overhead
    assert sit.CODEC is SitCodec and HEADROOM >= 20


# ---- round trip --------------------------------------------------------------------------------

@st.composite
def tunnels(draw):
    """A spec and a codec whose receive checks the encapsulated packet passes."""
    local = draw(addresses4)
    spec = draw(specs()).with_(local=local)
    kind = draw(st.sampled_from(["p2p", "nbma", "isatap"]))
    if kind == "nbma":
        spec = spec.with_(remote=None)
    elif kind == "isatap":
        spec = spec.with_(mode=ISATAP, remote=None, prl=((local, False),))
    return spec, SitCodec(spec)


def outside_6to4(pkt: bytes) -> bool:
    return pkt[8:10] != b"\x20\x02" and pkt[24:26] != b"\x20\x02"


@settings(max_examples=500)
@given(tunnels(), inner_packets(), addresses4, st.integers(0, 0xFFFF))
def test_encap_then_decap_returns_exactly_the_inner_packet(tunnel, inner, dst, ident):
    spec, c = tunnel
    if spec.mode is SIT and spec.remote is None:
        assume(outside_6to4(inner))              # the 6to4 checks are tested below
    buf, start = encap(c, inner, dst.packed, ident)
    wire = bytearray(buf[start:])
    assert check_decap(wire, len(wire), c) == (20, len(inner))
    assert bytes(wire[20:]) == inner


@pytest.mark.parametrize("outer_ecn,inner_ecn,result", [
    (CE, ECT0, CE), (CE, ECT1, CE), (CE, CE, CE),
    (ECT1, ECT0, ECT1),                          # RFC 6040 §4.2
    (ECT0, ECT1, ECT1), (NOT_ECT, ECT0, ECT0), (ECT0, NOT_ECT, NOT_ECT),
    (CE, NOT_ECT, Drop.ECN)])
def test_decap_ecn(outer_ecn, inner_ecn, result):
    inner = inner6(tc=0xB8 | inner_ecn)
    wire = outer(inner, tos=0x20 | outer_ecn)
    got = sit.decap(wire, len(wire), codec(remote=IPv4Address("192.0.2.1")))
    if result is Drop.ECN:
        assert got is Drop.ECN
        return
    assert got == (20, len(inner))
    got_inner = IPv6(bytes(wire[20:]))
    assert got_inner.tc == 0xB8 | result
    assert bytes(wire[22:]) == inner[2:]        # nothing else changes


# ---- ingress -----------------------------------------------------------------------------------

def test_decap_ignores_padding_after_the_inner_and_the_outer_packet():
    inner = inner6()
    wire = outer(inner + b"\0" * 6) + b"\xff" * 10
    c = codec(remote=IPv4Address("192.0.2.1"))
    assert sit.decap(wire, len(wire), c) == (20, len(inner))


def test_decap_drop_reasons():
    c = codec(remote=IPv4Address("192.0.2.1"))
    inner = inner6()

    def d(pkt):
        return sit.decap(bytearray(pkt), len(pkt), c)

    good = bytes(outer(inner))
    assert d(good) == (20, len(inner))
    assert d(ipv4.build("192.0.2.1", "198.51.100.2", 4, inner)) is Drop.WRONG_PROTO
    assert d(good[:10] + bytes([good[10] ^ 1]) + good[11:]) is Drop.BAD_CHECKSUM
    assert d(good[:-1]) is Drop.BAD_LENGTH
    assert d(bytes(outer(inner[:39]))) is Drop.MALFORMED           # tunnel64_rcv()
    assert d(bytes(outer(bytes(IP(dst="10.0.0.1") / Raw(b"x" * 40))))) is Drop.MALFORMED
    assert d(bytes(outer(inner[:-1]))) is Drop.BAD_LENGTH           # payload length too long


# ---- 6rd and 6to4: the outer destination (try_6rd()) ------------------------------------------

@pytest.mark.parametrize("inner_dst,ipv4_dst", [
    # RFC 3056 §2: 2002:V4ADDR::/48
    ("2002:c000:0201::1", "192.0.2.1"),
    ("2002:cb00:7101:2a::99", "203.0.113.1"),
    ("2002:0a00:0001:ffff:0:5efe:1.2.3.4", "10.0.0.1")])
def test_6to4_is_the_default(inner_dst, ipv4_dst):
    assert codec().outer_dst(v6(inner_dst), None) == v4(ipv4_dst)


@pytest.mark.parametrize("prefix,relay,inner_dst,ipv4_dst", [
    # RFC 5969 §4: 6rd prefix (n bits) | IPv4 address bits (o = 32 - IPv4MaskLen) | subnet
    # 2001:db8::/32 and all 32 bits: CE 198.51.100.2 delegates 2001:db8:c633:6402::/64
    ("2001:db8::/32", "0.0.0.0/0", "2001:db8:c633:6402::1", "198.51.100.2"),
    # IPv4MaskLen 8 (relay 10.0.0.0/8): CE 10.100.200.1 delegates 2001:db8:64c8:0100::/56
    ("2001:db8::/32", "10.0.0.0/8", "2001:db8:64c8:1ab::1", "10.100.200.1"),
    # IPv4MaskLen 16: 24-bit prefix, 16 IPv4 bits, /40 delegated
    ("2001:d00::/24", "172.16.0.0/16", "2001:d01:0203:4455::1", "172.16.1.2"),
    # a prefix that is not a multiple of 32 or 16 bits: /33 plus 24 bits
    ("2001:db8:8000::/33", "10.0.0.0/8", "2001:db8:8102:0380::1", "10.2.4.7"),
    # IPv4MaskLen 32: every CE of the domain embeds no bits; the relay is the address
    ("2001:db8::/32", "192.0.2.1/32", "2001:db8:ffff::1", "192.0.2.1")])
def test_6rd_examples(prefix, relay, inner_dst, ipv4_dst):
    c = codec(ip6rd_prefix=IPv6Network(prefix), ip6rd_relay_prefix=IPv4Network(relay))
    assert c.outer_dst(v6(inner_dst), None) == v4(ipv4_dst)
    # with a 6rd prefix set, 2002::/16 is no longer special
    assert c.outer_dst(v6("2002:c000:0201::1"), None) is None


@st.composite
def sixrd_cases(draw):
    """(prefix, relay, IPv4 address, 6rd address) built by hand from RFC 5969 §4."""
    rlen = draw(st.integers(0, 32))
    o = 32 - rlen
    plen = draw(st.integers(0, 64 - o))
    prefix_bits = draw(st.integers(0, 2**plen - 1))
    relay_bits = draw(st.integers(0, 2**rlen - 1))
    low = draw(st.integers(0, 2**o - 1))
    ipv4 = (relay_bits << o) | low
    rest_len = 128 - plen - o
    rest = draw(st.integers(0, 2**rest_len - 1))
    addr = (prefix_bits << (128 - plen)) | (low << rest_len) | rest
    prefix = IPv6Network((prefix_bits << (128 - plen), plen))
    relay = IPv4Network((relay_bits << o, rlen))
    return prefix, relay, ipv4, addr


@settings(max_examples=500)
@given(sixrd_cases())
def test_6rd_embedded_address_round_trips(case):
    prefix, relay, ipv4_addr, addr = case
    assume(ipv4_addr != 0)          # try_6rd() giving 0.0.0.0 means "none": tested below
    c = codec(ip6rd_prefix=prefix, ip6rd_relay_prefix=relay)
    assert c.outer_dst(addr.to_bytes(16, "big"), None) == ipv4_addr.to_bytes(4, "big")
    # the IPv4 in the inner destination wins over the route's next hop
    assert c.outer_dst(addr.to_bytes(16, "big"), v6("::192.0.2.99")) == ipv4_addr.to_bytes(4, "big")


def test_6rd_embedding_nothing_falls_back_to_the_next_hop():
    # try_6rd() returns 0 for 2002:0:0::/48, so ipip6_tunnel_dst_find() decides
    c = codec()
    assert c.outer_dst(v6("2002::1"), v6("::192.0.2.9")) == v4("192.0.2.9")
    assert c.outer_dst(v6("2002::1"), None) is None


@pytest.mark.parametrize("inner_dst,nexthop,ipv4_dst", [
    # IPV6_ADDR_COMPATv4 next hop: ::a.b.c.d, not :: and not ::1
    ("2001:db8:ffff::1", "::192.0.2.9", "192.0.2.9"),
    ("2001:db8:ffff::1", "::0.0.0.2", "0.0.0.2"),
    ("2001:db8:ffff::1", "::1", None),
    ("2001:db8:ffff::1", "::ffff:192.0.2.9", None),     # IPv4-mapped is not compatible
    ("2001:db8:ffff::1", "fe80::1", None),
    ("2001:db8:ffff::1", "2001:db8::c000:209", None),
    # no gateway: the inner destination is the neighbour
    ("::192.0.2.7", None, "192.0.2.7"),
    ("2001:db8:ffff::1", None, None),
    ("::1", None, None),
    ("::", None, None),
    # a neighbour of :: is the inner destination (IPV6_ADDR_ANY)
    ("::192.0.2.7", "::", "192.0.2.7"),
    ("2001:db8:ffff::1", "::", None)])
def test_ipv4_compatible_next_hop(inner_dst, nexthop, ipv4_dst):
    got = codec().outer_dst(v6(inner_dst), None if nexthop is None else v6(nexthop))
    assert got == (None if ipv4_dst is None else v4(ipv4_dst))


def test_remote_is_the_destination_of_a_point_to_point_sit_tunnel():
    c = codec(remote=IPv4Address("203.0.113.5"))
    assert c.outer_dst(v6("2002:c000:0201::1"), None) == v4("203.0.113.5")
    assert c.outer_dst(v6("2001:db8::1"), v6("fe80::1")) == v4("203.0.113.5")


# ---- ISATAP: the outer destination (ipip6_tunnel_dst_find(.., true)) ---------------------------

@pytest.mark.parametrize("inner_dst,nexthop,ipv4_dst", [
    ("2001:db8::1", "fe80::5efe:192.0.2.1", "192.0.2.1"),
    ("2001:db8::1", "fe80::200:5efe:198.51.100.1", "198.51.100.1"),
    ("2001:db8::1", "2001:db8:1:2:0:5efe:10.1.2.3", "10.1.2.3"),
    ("fe80::5efe:192.0.2.7", None, "192.0.2.7"),         # on-link: the destination itself
    ("2001:db8::1", "fe80::1", None),
    ("2001:db8::1", "fe80::100:5efe:192.0.2.1", None),   # only 0000: or 0200:5efe
    ("2001:db8::1", "fe80::5eff:192.0.2.1", None),
    ("2001:db8::1", "ff02::5efe:192.0.2.1", None),       # not unicast
    ("2001:db8::1", "::", None),                         # IPV6_ADDR_ANY is not unicast
    ("2002:c000:0201::1", "fe80::1", None),              # ISATAP comes before 6to4
    ("2002:c000:0201::1", None, None),
    # an ISATAP next hop embedding 0.0.0.0 leaves dst 0: 6to4, then the compatible check
    ("2002:c000:0201::1", "fe80::5efe:0.0.0.0", "192.0.2.1")])
def test_isatap_next_hop(inner_dst, nexthop, ipv4_dst):
    c = codec(mode=ISATAP)
    got = c.outer_dst(v6(inner_dst), None if nexthop is None else v6(nexthop))
    assert got == (None if ipv4_dst is None else v4(ipv4_dst))


def test_isatap_asks_the_next_hop_even_with_a_remote():
    c = codec(mode=ISATAP, remote=IPv4Address("203.0.113.5"))
    assert c.outer_dst(v6("2001:db8::1"), v6("fe80::5efe:192.0.2.1")) == v4("192.0.2.1")
    assert c.outer_dst(v6("2001:db8::1"), v6("fe80::1")) is None


# ---- ISATAP interface identifiers (RFC 5214 §6.1, __ipv6_isatap_ifid()) -------------------------

@pytest.mark.parametrize("ipv4_addr,iid", [
    ("192.0.2.1", "0000:5efe:c000:0201"),        # documentation (test_192): local
    ("10.1.2.3", "0000:5efe:0a01:0203"),
    ("172.31.255.255", "0000:5efe:ac1f:ffff"),
    ("192.168.0.1", "0000:5efe:c0a8:0001"),
    ("169.254.1.1", "0000:5efe:a9fe:0101"),
    ("127.0.0.1", "0000:5efe:7f00:0001"),
    ("198.19.0.1", "0000:5efe:c613:0001"),       # 198.18.0.0/15
    ("192.88.99.1", "0000:5efe:c058:6301"),      # 6to4 anycast
    ("224.0.0.1", "0000:5efe:e000:0001"),
    ("255.255.255.255", "0000:5efe:ffff:ffff"),
    ("8.8.8.8", "0200:5efe:0808:0808"),          # global: the u bit is set
    ("198.51.100.1", "0200:5efe:c633:6401"),     # not on the kernel's list
    ("172.32.0.1", "0200:5efe:ac20:0001")])
def test_isatap_interface_identifier(ipv4_addr, iid):
    assert sit.isatap_iid(ipv4_addr) == bytes.fromhex(iid.replace(":", ""))
    assert sit.isatap_iid(IPv4Address(ipv4_addr)) == bytes.fromhex(iid.replace(":", ""))


def test_isatap_address_and_recognition():
    assert sit.isatap_iid("0.0.0.0") is None
    assert sit.isatap_address("fe80::/64", "192.0.2.1") == IPv6Address("fe80::5efe:c000:201")
    assert sit.isatap_address("2001:db8:1:2::/64", "8.8.8.8") == IPv6Address(
        "2001:db8:1:2:200:5efe:808:808")
    with pytest.raises(ValueError):
        sit.isatap_address("2001:db8::/96", "192.0.2.1")
    for yes in ("fe80::5efe:192.0.2.1", "fe80::200:5efe:1.2.3.4", "2001:db8::5efe:0.0.0.0"):
        assert sit.is_isatap(v6(yes)) and sit.is_isatap(IPv6Address(yes))
    for no in ("fe80::1", "fe80::300:5efe:1.2.3.4", "fe80::100:5efe:1.2.3.4",
               "fe80::5eff:1.2.3.4", "fe80::1:5efe:1.2.3.4", "::192.0.2.1"):
        assert not sit.is_isatap(v6(no))


@settings(max_examples=200)
@given(addresses4, st.integers(0, 2**64 - 1).filter(lambda p: p >> 56 != 0xFF))  # unicast
def test_isatap_address_round_trips_through_outer_dst(a, prefix64):
    addr = sit.isatap_address(IPv6Network((prefix64 << 64, 64)), a)
    assert sit.is_isatap(addr)
    assert codec(mode=ISATAP).outer_dst(v6("2001:db8::1"), addr.packed) == a.packed


# ---- ISATAP: the source check (isatap_chksrc()) -------------------------------------------------

ROUTER = IPv4Address("192.0.2.254")


def isatap_codec(*prefixes):
    c = codec(mode=ISATAP, local=IPv4Address("198.51.100.2"), prl=((ROUTER, True),))
    c.set_prefixes(prefixes)
    return c


def isatap_rcv(c, outer_src, inner_src):
    wire = outer(inner6(src=inner_src, dst="fe80::5efe:198.51.100.2"), src=outer_src)
    return sit.decap(wire, len(wire), c)


def test_isatap_accepts_anything_from_a_potential_router():
    c = isatap_codec()
    assert isatap_rcv(c, "192.0.2.254", "2001:db8::1") == (20, 44)
    assert isatap_rcv(c, "192.0.2.254", "fe80::5efe:1.2.3.4") == (20, 44)
    assert isatap_rcv(c, "192.0.2.254", "2002:0102:0304::1") == (20, 44)   # no 6to4 check


@pytest.mark.parametrize("outer_src,inner_src,prefixes,ok", [
    # the inner source is the ISATAP address of the outer source, in a prefix on the device
    ("192.0.2.9", "fe80::5efe:192.0.2.9", ["fe80::/64"], True),
    ("192.0.2.9", "fe80::200:5efe:192.0.2.9", ["fe80::/64"], True),
    ("192.0.2.9", "2001:db8:1:2:0:5efe:192.0.2.9", ["fe80::/64", "2001:db8:1:2::/64"], True),
    ("192.0.2.9", "2001:db8:1:2:0:5efe:192.0.2.9", ["2001:db8:1::/48"], True),
    # ipv6_chk_prefix() uses the prefix length of each address on the device
    ("192.0.2.9", "2001:db8:1:2:0:5efe:192.0.2.9", [IPv6Interface("2001:db8:1:3::1/64")],
     False),
    ("192.0.2.9", "2001:db8:1:2:0:5efe:192.0.2.9", [IPv6Interface("2001:db8:1:3::1/48")],
     True),
    # and not otherwise
    ("192.0.2.9", "fe80::5efe:192.0.2.9", [], False),
    ("192.0.2.9", "2001:db8:1:2:0:5efe:192.0.2.9", ["2001:db8:1:3::/64"], False),
    ("192.0.2.9", "fe80::5efe:192.0.2.10", ["fe80::/64"], False),
    ("192.0.2.9", "fe80::1", ["fe80::/64"], False),
    ("192.0.2.9", "fe80::300:5efe:192.0.2.9", ["fe80::/64"], False),
    ("192.0.2.253", "2001:db8::1", ["fe80::/64"], False)])
def test_isatap_source_check(outer_src, inner_src, prefixes, ok):
    c = isatap_codec(*[IPv6Network(p) if isinstance(p, str) else p for p in prefixes])
    assert isatap_rcv(c, outer_src, inner_src) == ((20, 44) if ok else Drop.ISATAP_SOURCE)


def test_isatap_prefixes_are_state_the_data_plane_updates():
    c = isatap_codec()
    assert isatap_rcv(c, "192.0.2.9", "fe80::5efe:192.0.2.9") is Drop.ISATAP_SOURCE
    c.set_prefixes(["fe80::5efe:c633:6402/64"])          # as `ip -6 addr` lists it
    assert isatap_rcv(c, "192.0.2.9", "fe80::5efe:192.0.2.9") == (20, 44)
    c.set_prefixes(())
    assert isatap_rcv(c, "192.0.2.9", "fe80::5efe:192.0.2.9") is Drop.ISATAP_SOURCE


def test_isatap_inner_packet_still_checked():
    c = isatap_codec()
    wire = outer(inner6()[:39], src="192.0.2.254")
    assert sit.decap(wire, len(wire), c) is Drop.MALFORMED


# ---- 6rd / 6to4: the spoofing checks (is_spoofed_6rd(), only_dnatted()) ------------------------

def sixrd_rcv(c, outer_src, inner_src, outer_dst="198.51.100.2",
              inner_dst="2002:c633:6402::1"):
    wire = outer(inner6(src=inner_src, dst=inner_dst), src=outer_src, dst=outer_dst)
    return sit.decap(wire, len(wire), c)


@pytest.mark.parametrize("outer_src,inner_src,ok", [
    ("192.0.2.1", "2002:c000:0201::1", True),
    ("192.0.2.1", "2002:c000:0201:ffff::5", True),
    ("192.0.2.2", "2002:c000:0201::1", False),       # Src spoofed
    ("192.0.2.2", "2001:db8::1", True),              # native IPv6 through a relay
    ("192.0.2.2", "fe80::1", True)])
def test_6to4_source_must_embed_the_outer_source(outer_src, inner_src, ok):
    assert sixrd_rcv(codec(), outer_src, inner_src) == (
        (20, 44) if ok else Drop.SIXRD_SOURCE)


@pytest.mark.parametrize("inner_dst,ok", [
    ("2002:c633:6402::1", True),
    ("2002:c633:6402:7::1", True),
    ("2001:db8::1", True),
    ("2002:c633:6403::1", False)])                   # Dst spoofed
def test_6to4_destination_must_embed_the_outer_destination(inner_dst, ok):
    got = sixrd_rcv(codec(), "192.0.2.1", "2002:c000:0201::1", inner_dst=inner_dst)
    assert got == ((20, 44) if ok else Drop.SIXRD_SOURCE)


def test_6to4_destination_of_a_nat_passes_when_it_is_on_the_device():
    # only_dnatted(): 16 + 32 bits of the inner destination match an address of the device
    c = codec()
    args = ("192.0.2.1", "2002:c000:0201::1", "198.51.100.2", "2002:0a00:0002:1::1")
    assert sixrd_rcv(c, *args) is Drop.SIXRD_SOURCE
    c.set_prefixes([IPv6Interface("2002:0a00:0002::1/16")])    # a 6to4 host behind a NAT
    assert sixrd_rcv(c, *args) == (20, 44)
    c.set_prefixes([IPv6Interface("2002:0a00:0003::1/16")])
    assert sixrd_rcv(c, *args) is Drop.SIXRD_SOURCE
    c.set_prefixes([IPv6Network("2002:0a00:0002:5::/64")])
    assert sixrd_rcv(c, *args) == (20, 44)
    # the source gets no such exception
    c.set_prefixes([IPv6Network("2002:c000:0202::/64")])
    assert sixrd_rcv(c, "192.0.2.1", "2002:c000:0202::1") is Drop.SIXRD_SOURCE


def test_6rd_spoofing_uses_the_configured_prefix():
    c = codec(ip6rd_prefix=IPv6Network("2001:db8::/32"),
              ip6rd_relay_prefix=IPv4Network("10.0.0.0/8"))
    # 2001:db8:6402:0100::/56 is 10.100.2.1's; 2002::/16 is native traffic now
    ok = sixrd_rcv(c, "10.100.2.1", "2001:db8:6402:1ff::1", "10.1.1.1", "2001:db8:0101:0100::1")
    assert ok == (20, 44)
    assert sixrd_rcv(c, "10.100.2.2", "2001:db8:6402:1ff::1", "10.1.1.1",
                     "2001:db8:0101:0100::1") is Drop.SIXRD_SOURCE
    assert sixrd_rcv(c, "10.100.2.1", "2001:db8:6402:1ff::1", "10.1.1.2",
                     "2001:db8:0101:0100::1") is Drop.SIXRD_SOURCE
    assert sixrd_rcv(c, "192.0.2.2", "2002:c000:0201::1", "10.1.1.1", "2001:db9::1") == (20, 44)


@settings(max_examples=200)
@given(sixrd_cases(), addresses4)
def test_6rd_source_check_property(case, other):
    prefix, relay, ipv4_addr, addr = case
    c = codec(ip6rd_prefix=prefix, ip6rd_relay_prefix=relay)
    a6, a4 = str(IPv6Address(addr)), str(IPv4Address(ipv4_addr))
    # a CE talking to itself through a relay: both inner addresses embed the outer ones
    wire = outer(inner6(src=a6, dst=a6), src=a4, dst=a4)
    assert sit.decap(wire, len(wire), c) == (20, 44)
    wire = outer(inner6(src=a6, dst=a6), src=str(other), dst=a4)
    want = (20, 44) if other == IPv4Address(ipv4_addr) else Drop.SIXRD_SOURCE
    assert sit.decap(wire, len(wire), c) == want


def test_point_to_point_tunnel_has_no_6to4_checks():
    # packet_is_spoofed(): IFF_POINTOPOINT tunnels (with a remote) are not checked
    c = codec(remote=IPv4Address("192.0.2.2"))
    assert sixrd_rcv(c, "192.0.2.2", "2002:c000:0201::1", inner_dst="2002:0101:0101::1") == (
        20, 44)


# ---- path MTU and ICMPv6 Packet Too Big ---------------------------------------------------------

@pytest.mark.parametrize("n,path_mtu,mtu", [
    (1480, 1500, None), (1481, 1500, 1480),
    (1280, 1300, None), (1281, 1300, 1280),
    (1280, 1299, None), (1281, 1299, 1280),          # below 1280: 1280, DF cleared
    (1281, 576, 1280), (1281, 100, 1280),
    (9000, 9000, 8980)])
def test_too_big(n, path_mtu, mtu):
    assert sit.too_big(n, path_mtu) == mtu


@settings(max_examples=300)
@given(st.integers(40, 65535), st.integers(68, 65535))
def test_too_big_never_reports_below_1280(n, path_mtu):
    mtu = sit.too_big(n, path_mtu)
    limit = max(path_mtu - 20, 1280)
    assert mtu == (limit if n > limit else None)
    assert mtu is None or mtu >= 1280


def test_too_big_needs_df():
    assert codec().too_big(1481, 1500) == 1480
    assert codec(pmtudisc=False).too_big(1481, 1500) is None


def outer_frag(buf, start) -> int:
    return (buf[start + 6] << 8) | buf[start + 7]


def test_encap_with_a_path_mtu():
    c = codec()
    big = inner6(payload=b"x" * 1441)                           # 1481 bytes
    assert encap(c, big, path_mtu=1500)[1] is Drop.PACKET_TOO_BIG
    buf, start = encap(c, big, path_mtu=1501)
    assert outer_frag(buf, start) == 0x4000
    # RFC 4213 §3.2.2: under 1280 bytes of room the packet goes out without DF
    small = inner6(payload=b"x" * 1240)                         # 1280 bytes
    buf, start = encap(c, small, path_mtu=1300)
    assert outer_frag(buf, start) == 0x4000
    buf, start = encap(c, small, path_mtu=1299)
    assert outer_frag(buf, start) == 0
    p = IP(bytes(buf[start:]))
    stored = p.chksum
    del p.chksum
    assert IP(bytes(p)).chksum == stored                     # the checksum follows the flags
    assert encap(c, inner6(payload=b"x" * 1241), path_mtu=1299)[1] is Drop.PACKET_TOO_BIG
    # mtu < IPV4_MIN_MTU (68): the kernel refuses everything
    assert encap(c, inner6(), path_mtu=87)[1] is Drop.TOO_BIG
    assert outer_frag(*encap(c, inner6(), path_mtu=88)) == 0
    # nopmtudisc: never refused, never DF
    buf, start = encap(codec(pmtudisc=False), big, path_mtu=1300)
    assert outer_frag(buf, start) == 0


def big_packet(src="2001:db8:1::1", dst="2001:db8:2::2", size=1400, nh=17) -> bytes:
    return bytes(IPv6(src=src, dst=dst, nh=nh, hlim=63) / Raw(bytes(range(256)) * 8))[:size]


def fix_plen(pkt: bytes) -> bytes:
    return pkt[:4] + (len(pkt) - 40).to_bytes(2, "big") + pkt[6:]


def test_packet_too_big_dissected_by_scapy():
    orig = fix_plen(big_packet())
    buf = bytearray(b"\0" * HEADROOM + orig)
    pkt = sit.packet_too_big(buf, HEADROOM, len(orig), 1280)
    p = IPv6(pkt)
    # from the inner destination back to the inner source, as the far side would answer
    assert (p.src, p.dst, p.nh, p.plen) == ("2001:db8:2::2", "2001:db8:1::1", 58, 1240)
    ptb = p[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, 1280)
    zeroed = pkt[40:42] + b"\0\0" + pkt[44:]
    assert ptb.cksum == in6_chksum(58, p, zeroed)
    assert (p[IPerror6].src, p[IPerror6].dst, p[IPerror6].hlim) == (
        "2001:db8:1::1", "2001:db8:2::2", 63)
    assert pkt[48:] == orig[:1232]                 # RFC 4443 §2.4 (c)


def test_packet_too_big_with_a_given_source():
    orig = fix_plen(big_packet(dst="ff0e::1"))
    assert sit.packet_too_big(orig, 0, len(orig), 1280) is None
    pkt = sit.packet_too_big(orig, 0, len(orig), 1280, src=v6("2001:db8:ffff::1"))
    assert IPv6(pkt).src == "2001:db8:ffff::1"


@pytest.mark.parametrize("inner,answered", [
    # icmp6_send(): no error to an unspecified or multicast source
    (bytes(IPv6(src="::", dst="2001:db8:2::2", nh=59) / Raw(b"x" * 1300)), False),
    (bytes(IPv6(src="ff02::1", dst="2001:db8:2::2", nh=59) / Raw(b"x" * 1300)), False),
    # is_ineligible(): never about an ICMPv6 error, but about an informational message
    (bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2") / ICMPv6PacketTooBig()
           / Raw(b"x" * 1300)), False),
    (bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2")
           / ICMPv6EchoRequest(data=b"x" * 1300)), True),
    # the same behind extension headers (ipv6_skip_exthdr())
    (bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", nh=0)
           / Raw(bytes([58, 0, 1, 4, 0, 0, 0, 0]))
           / ICMPv6PacketTooBig() / Raw(b"x" * 1300)), False),
    (bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", nh=60)
           / Raw(bytes([58, 0, 1, 4, 0, 0, 0, 0]))
           / ICMPv6EchoRequest(data=b"x" * 1300)), True),
    # a fragment that is not the first one: the ICMPv6 header is elsewhere, so answered
    (bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", nh=44)
           / Raw(bytes([58, 0, 0x00, 0x08, 0, 0, 0, 1]) + bytes([1]) + b"x" * 1300)), True),
    (bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:2::2", nh=44)
           / Raw(bytes([58, 0, 0x00, 0x01, 0, 0, 0, 1]) + bytes([1]) + b"x" * 1300)), False)])
def test_packet_too_big_is_not_sent_where_icmp6_send_would_not(inner, answered):
    got = sit.packet_too_big(inner, 0, len(inner), 1280)
    assert (got is not None) is answered
    if answered:
        assert IPv6(got)[ICMPv6PacketTooBig].mtu == 1280


# ---- robustness: arbitrary bytes never make decap() raise ---------------------------------------

CODECS = [codec(remote=IPv4Address("192.0.2.1")), codec(),
          codec(ip6rd_prefix=IPv6Network("2001:db8::/32"),
                ip6rd_relay_prefix=IPv4Network("10.0.0.0/8")),
          isatap_codec(IPv6Network("fe80::/64"))]


def fix_checksum(b: bytearray) -> None:
    if b and b[0] >> 4 == 4:
        ihl = (b[0] & 0x0F) * 4
        if 20 <= ihl <= len(b):
            b[10:12] = b"\0\0"
            b[10:12] = inet_checksum(b[:ihl]).to_bytes(2, "big")


@settings(max_examples=1500)
@given(st.binary(max_size=128), st.sampled_from(CODECS))
def test_decap_arbitrary_bytes(data, c):
    check_decap(bytearray(data), len(data), c)


@settings(max_examples=1500)
@given(st.binary(min_size=20, max_size=20), st.binary(max_size=120), st.booleans(),
       st.sampled_from(CODECS))
def test_decap_arbitrary_inner_under_a_valid_outer_header(hdr, inner, v6like, c):
    inner = bytearray(inner)
    if v6like and len(inner) >= 6:
        inner[0] = 0x60 | (inner[0] & 0x0F)
        inner[4:6] = max(len(inner) - 40, 0).to_bytes(2, "big")
    b = bytearray(b"\x45" + hdr[1:2] + (20 + len(inner)).to_bytes(2, "big") + hdr[4:20] + inner)
    b[9] = 41
    fix_checksum(b)
    check_decap(b, len(b), c)


@settings(max_examples=1000)
@given(inner_packets(max_payload=64), st.lists(st.integers(0, 2**16), min_size=1, max_size=6),
       st.booleans(), st.sampled_from(CODECS), st.data())
def test_decap_damaged_valid_packets(inner, bits, fix, c, data):
    b = outer(inner, src="192.0.2.1")
    for bit in bits:
        bit %= len(b) * 8
        b[bit // 8] ^= 0x80 >> (bit % 8)
    if fix:
        fix_checksum(b)
    k = data.draw(st.integers(0, len(b)))
    check_decap(b, k, c)
    check_decap(bytearray(b), len(b), c)


@settings(max_examples=200)
@given(st.binary(max_size=100), st.integers(0, 120), st.integers(1280, 65535))
def test_packet_too_big_never_raises(data, n, mtu):
    got = sit.packet_too_big(data, 0, min(n, len(data)), mtu)
    assert got is None or IPv6(got).nh == 58
