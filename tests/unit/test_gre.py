"""GRE over IPv4 (IP protocol 47) with the semantics of the kernel's ip_gre.c.

Egress (ipgre_xmit() → __gre_xmit() → gre_build_header() → ip_tunnel_xmit()):
  type      0x0800 for an IPv4 inner packet, 0x86DD for IPv6; nothing else is sent
  flags     C, K, S as ocsum, okey, oseq say; version 0, no routing bit
  key       okey (a key of 0 is a key: K set, field 0)
  seq       o_seqno, then incremented: atomic_fetch_inc() since commit ff827beb706e ("ip_gre:
            Make o_seqno start from 0 in native mode", 2022), so 0, 1, 2 ... as RFC 2890
            §2.2 says ("The first datagram is sent with a sequence number of 0")
  checksum  RFC 2784 §2.5, over the GRE header (with key and seq) and the payload
  outer     as for ipip (ttl, tos, DF: see test_ipip.py), protocol 47
  overhead  20 + 4 + 4 per option: the device MTU over 1500 is 1476 minus 4 per option
Ingress (gre_rcv() → gre_parse_header(), then ip_tunnel_rcv() on the tunnel found):
  version != 0 or routing bit → GRE_FLAGS; a header cut short → MALFORMED
  checksum present and wrong → BAD_CSUM (gre_parse_header(), before anything else)
  checksum present without icsum, or icsum without one → CSUM_MISMATCH (rx_crc_errors)
  iseq: no sequence number, or (s32)(seq - i_seqno) < 0 with i_seqno != 0 → OUT_OF_SEQ
        (rx_fifo_errors); else i_seqno = seq + 1
  type 0x0800 → the inner packet must pass ip_rcv(), 0x86DD → ipv6_rcv(); else WRONG_PROTO
"""
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE
from scapy.packet import Raw

from tunl.model import TunnelMode, TunnelSpec
from tunl.tunnel import gre
from tunl.tunnel.gre import HEADROOM, GreCodec
from tunl.wire import ipv4, ipv6
from tunl.wire.checksum import inet_checksum
from tunl.wire.drop import Drop
from tunl.wire.ipv4 import IPv4Header
from tunl.wire.ipv6 import IPv6Header

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3
GRE_MODE = TunnelMode.GRE
LOCAL, REMOTE = "192.0.2.1", "198.51.100.2"
SPEC = TunnelSpec(name="gre1", mode=GRE_MODE, local=IPv4Address(LOCAL),
                  remote=IPv4Address(REMOTE), ttl=64)
IDENT = 0x1234

# scapy: IP(src="10.42.1.2", dst="10.42.2.3", ttl=64, id=1, flags="DF")
#        / ICMP(type=8, id=0x77, seq=1) / b"ping"
INNER4 = bytes.fromhex("4500002000014000400123840a2a01020a2a0203080018b70077000170696e67")
# scapy: IPv6(src="fd00:42:1::2", dst="fd00:42:2::3", hlim=64)
#        / ICMPv6EchoRequest(id=0x77, seq=1, data=b"ping")
INNER6 = bytes.fromhex("60000000000c3a40fd000042000100000000000000000002"
                       "fd0000420002000000000000000000038000a5e20077000170696e67")


def rx(**opts) -> GreCodec:
    return GreCodec(TunnelSpec(name="gre1", mode=GRE_MODE, **opts))


def encap(codec: GreCodec, inner: bytes, dst: str = REMOTE, ident: int = IDENT):
    """(buffer, start) after encapsulating inner, read into buf[HEADROOM:] as from a TUN fd."""
    buf = bytearray(b"\xa5" * HEADROOM + inner)
    start = codec.encap(buf, HEADROOM, len(inner), IPv4Address(dst).packed, ident)
    return buf, start


def send(codec: GreCodec, inner: bytes, **kw) -> bytes:
    buf, start = encap(codec, inner, **kw)
    assert not isinstance(start, Drop)
    return bytes(buf[start:])


def check(buf, n: int, codec: GreCodec):
    """demux() + decap_at() must drop, or return the place of an inner packet the kernel
    would hand to ip_rcv()/ipv6_rcv(), inside the GRE payload."""
    r = gre.demux(buf, n)
    if isinstance(r, Drop):
        return r
    ihl, end, key, ctx = r
    assert ipv4.validate(memoryview(buf)[:n]) is None and buf[9] == 47
    assert ihl == (buf[0] & 0x0F) * 4 and end == (buf[2] << 8 | buf[3]) <= n
    assert key is None or 0 <= key < 2**32
    gre_sum = inet_checksum(bytes(buf[ihl:end]))    # before RFC 6040 may rewrite the inner
    got = codec.decap_at(buf, ihl, end, ctx)
    if isinstance(got, Drop):
        return got
    off, length = got
    flags, ptype, seq, hlen = ctx
    assert off == ihl + hlen and hlen >= 4 and off + length <= end
    inner = bytes(buf[off:off + length])
    if ptype == 0x0800:
        assert ipv4.validate(inner) is None and (inner[2] << 8 | inner[3]) == length
    else:
        assert ptype == 0x86DD
        assert ipv6.validate(inner) is None and 40 + (inner[4] << 8 | inner[5]) == length
    assert bool(flags & 0x8000) == codec.icsum
    if flags & 0x8000:
        assert gre_sum == 0
    if codec.iseq:
        assert seq is not None
    return got


def scapy_wire(inner: bytes, ptype: int = 0x0800, src: str = REMOTE, dst: str = LOCAL,
               tos: int = 0, **g) -> bytearray:
    """A received GRE packet as scapy builds it (its GRE checksum when chksum_present)."""
    return bytearray(bytes(IP(src=src, dst=dst, tos=tos) / GRE(proto=ptype, **g) / Raw(inner)))


def decap(wire: bytearray, codec: GreCodec):
    return check(wire, len(wire), codec)


# ---- hex vectors -------------------------------------------------------------------------
# outer header: scapy's IP(src=LOCAL, dst=REMOTE, ttl=64, id=0x1234, flags="DF", proto=47);
# GRE header: laid out by RFC 2784 §2.1 / RFC 2890 §2, checksums from scapy's GRE

OUT_8 = "4500003c12344000402f3c28c0000201c6336402"    # outer for 4 + 4 bytes of GRE options
VECTORS = {
    "plain-ipv4": ({}, INNER4, [
        "4500003812344000402f3c2cc0000201c6336402" "0000 0800"]),
    "key-ipv4": ({"okey": 42, "ikey": 42}, INNER4, [
        OUT_8 + "2000 0800 0000002a"]),
    "key0-ipv4": ({"okey": 0, "ikey": 0}, INNER4, [
        OUT_8 + "2000 0800 00000000"]),
    "seq-ipv4": ({"oseq": True, "iseq": True}, INNER4, [
        OUT_8 + "1000 0800 00000000",                  # the first packet carries 0
        OUT_8 + "1000 0800 00000001",
        OUT_8 + "1000 0800 00000002"]),
    "csum-ipv4": ({"ocsum": True, "icsum": True}, INNER4, [
        OUT_8 + "8000 0800 77ff 0000"]),
    "all-ipv4": ({"ocsum": True, "icsum": True, "okey": 0x0A0B0C0D, "ikey": 0x0A0B0C0D,
                  "oseq": True, "iseq": True}, INNER4, [
        "4500004412344000402f3c20c0000201c6336402" "b000 0800 31e7 0000 0a0b0c0d 00000000"]),
    "ikey-not-okey": ({"ikey": 1, "okey": 2}, INNER4, [
        OUT_8 + "2000 0800 00000002"]),               # okey is sent; ikey is for receiving
    "plain-ipv6": ({}, INNER6, [
        "4500004c12344000402f3c18c0000201c6336402" "0000 86dd"]),
    "all-ipv6": ({"ocsum": True, "icsum": True, "okey": 0x0A0B0C0D, "ikey": 0x0A0B0C0D,
                  "oseq": True, "iseq": True}, INNER6, [
        "4500005812344000402f3c0cc0000201c6336402" "b000 86dd 1903 0000 0a0b0c0d 00000000"]),
}
VECTOR_IDS = list(VECTORS)


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_hex_vectors(name):
    changes, inner, packets = VECTORS[name]
    codec = GreCodec(SPEC.with_(**changes))
    for want in packets:
        assert send(codec, inner).hex() == want.replace(" ", "") + inner.hex()


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_hex_vectors_dissected_by_scapy(name):
    changes, inner, packets = VECTORS[name]
    spec = SPEC.with_(**changes)
    codec = GreCodec(spec)
    for i, _ in enumerate(packets):
        wire = send(codec, inner)
        p = IP(wire)
        assert (p.version, p.ihl, p.src, p.dst, p.ttl, p.tos, p.id, p.proto) == (
            4, 5, LOCAL, REMOTE, 64, 0, IDENT, 47)
        assert str(p.flags) == "DF" and p.frag == 0 and p.len == len(wire)
        stored = p.chksum
        del p.chksum
        assert IP(bytes(p)).chksum == stored
        g = IP(wire)[GRE]
        assert (g.chksum_present, g.routing_present, g.key_present, g.seqnum_present) == (
            int(spec.ocsum), 0, int(spec.okey is not None), int(spec.oseq))
        assert (g.strict_route_source, g.recursion_control, g.flags, g.version) == (0, 0, 0, 0)
        assert g.proto == (0x0800 if inner[0] >> 4 == 4 else 0x86DD)
        if spec.okey is not None:
            assert g.key == spec.okey
        if spec.oseq:
            assert g.sequence_number == i
        if spec.ocsum:
            stored = g.chksum
            assert g.offset == 0                # Reserved1
            g.chksum = None                     # scapy recomputes it in post_build()
            assert GRE(bytes(g)).chksum == stored
        assert bytes(g.payload) == inner
        assert isinstance(g.payload, IP if inner[0] >> 4 == 4 else IPv6)


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_hex_vectors_built_by_scapy_decapsulate(name):
    changes, inner, packets = VECTORS[name]
    spec = SPEC.with_(**changes)
    codec = GreCodec(spec)
    for i, _ in enumerate(packets):
        g = {"chksum_present": int(spec.ocsum), "key_present": int(spec.okey is not None),
             "seqnum_present": int(spec.oseq)}
        if spec.okey is not None:
            g["key"] = spec.okey
        if spec.oseq:
            g["sequence_number"] = i
        wire = scapy_wire(inner, 0x0800 if inner[0] >> 4 == 4 else 0x86DD, **g)
        hlen = 4 + 4 * (spec.ocsum + (spec.okey is not None) + spec.oseq)
        key = gre.demux(wire, len(wire))[2]
        assert key == spec.okey
        assert decap(wire, codec) == (20 + hlen, len(inner))
        assert bytes(wire[20 + hlen:]) == inner


# ---- egress --------------------------------------------------------------------------------

OPTIONS = [dict(ocsum=c, okey=k, oseq=s) for c in (False, True) for k in (None, 7)
           for s in (False, True)]


@pytest.mark.parametrize("opts", OPTIONS)
def test_overhead_and_mtu(opts):
    n = opts["ocsum"] + (opts["okey"] is not None) + opts["oseq"]
    spec = SPEC.with_(**opts)
    codec = GreCodec(spec)
    assert codec.overhead == gre.overhead(spec) == 20 + 4 + 4 * n
    assert 1500 - codec.overhead == 1476 - 4 * n       # ip_tunnel_bind_dev()
    assert HEADROOM >= codec.overhead
    buf, start = encap(codec, INNER4)
    assert start == HEADROOM - codec.overhead
    assert bytes(buf[:start]) == b"\xa5" * start       # nothing written in front
    assert bytes(buf[HEADROOM:]) == INNER4             # the inner packet untouched
    assert GreCodec(SPEC).overhead == TunnelMode.GRE.overhead == 24


def test_receive_options_do_not_change_what_is_sent():
    a = send(GreCodec(SPEC), INNER4)
    assert send(GreCodec(SPEC.with_(ikey=9, iseq=True, icsum=True)), INNER4) == a


def test_sequence_numbers_count_from_0_and_wrap():
    codec = GreCodec(SPEC.with_(oseq=True))
    seqs = [IP(send(codec, INNER4))[GRE].sequence_number for _ in range(4)]
    assert seqs == [0, 1, 2, 3]
    codec.o_seqno = 0xFFFFFFFE          # a u32 in the kernel (atomic_t, taken as unsigned)
    seqs = [IP(send(codec, INNER4))[GRE].sequence_number for _ in range(3)]
    assert seqs == [0xFFFFFFFE, 0xFFFFFFFF, 0]


def test_sequence_numbers_are_per_tunnel_and_mixed_versions_share_them():
    a, b = GreCodec(SPEC.with_(oseq=True)), GreCodec(SPEC.with_(oseq=True))
    assert IP(send(a, INNER4))[GRE].sequence_number == 0
    assert IP(send(a, INNER6))[GRE].sequence_number == 1
    assert IP(send(b, INNER6))[GRE].sequence_number == 0


@pytest.mark.parametrize("inner", [
    b"", b"\x45" + bytes(18),                   # shorter than an IPv4 header
    b"\x60" + bytes(38),                        # shorter than an IPv6 header
    b"\x55" + bytes(40), b"\x05" + bytes(40), b"\xf5" + bytes(40)])
def test_encap_refuses_what_is_not_ip_and_spends_no_sequence_number(inner):
    codec = GreCodec(SPEC.with_(oseq=True))
    assert encap(codec, inner)[1] is Drop.NOT_IPV4
    assert IP(send(codec, INNER4))[GRE].sequence_number == 0


def test_ipv6_inner_outer_header_rules():
    # ip_tunnel_xmit(): ttl 0 inherits the hop limit, tos 1 the traffic class (ECN with CE
    # sent as ECT(0)); DF comes from pmtudisc alone, an IPv6 packet has no DF bit
    inner = bytes(IPv6(src="fd00::1", dst="fd00::2", hlim=9, tc=0xB9, nh=59))
    p = IP(send(GreCodec(SPEC.with_(ttl=0, tos=1)), inner))
    assert (p.ttl, p.tos, str(p.flags)) == (9, 0xB9, "DF")
    ce = bytes(IPv6(src="fd00::1", dst="fd00::2", tc=0xBB, nh=59))
    assert IP(send(GreCodec(SPEC.with_(ttl=0, tos=1)), ce)).tos == 0xBA
    p = IP(send(GreCodec(SPEC.with_(ttl=0, pmtudisc=False)), inner))
    assert (p.flags, p.ttl) == (0, 9)


def test_source_any_without_local():
    p = IP(send(GreCodec(SPEC.with_(local=None)), INNER4))
    assert p.src == "0.0.0.0" and p.proto == 47


# ---- egress against scapy, for any tunnel ---------------------------------------------------

addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
keys = st.none() | st.integers(0, 2**32 - 1)
options = st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@st.composite
def inner4(draw, max_payload=300):
    h = IPv4Header(draw(addresses), draw(addresses), draw(st.integers(0, 255)),
                   ttl=draw(st.integers(0, 255)), tos=draw(st.integers(0, 255)),
                   ident=draw(st.integers(0, 0xFFFF)), flags_frag=draw(st.integers(0, 0xFFFF)),
                   options=draw(options))
    return h.build(draw(st.binary(max_size=max_payload)))


@st.composite
def inner6(draw, max_payload=300):
    a6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
    h = IPv6Header(draw(a6), draw(a6), draw(st.integers(0, 255)), hlim=draw(st.integers(0, 255)),
                   tc=draw(st.integers(0, 255)), flow=draw(st.integers(0, 2**20 - 1)))
    return h.build(draw(st.binary(max_size=max_payload)))


def inners(max_payload=300):
    return inner4(max_payload) | inner6(max_payload)


@st.composite
def specs(draw):
    pmtudisc = draw(st.booleans())
    ttl = draw(st.integers(0, 255)) if pmtudisc else 0
    local = draw(st.none() | addresses.filter(lambda a: not a.is_unspecified))
    remote = draw(st.none() | addresses.filter(lambda a: not a.is_multicast or local))
    return TunnelSpec(name="gre1", mode=GRE_MODE, local=local, remote=remote, ttl=ttl,
                      tos=draw(st.integers(0, 255)), pmtudisc=pmtudisc, okey=draw(keys),
                      ikey=draw(keys), oseq=draw(st.booleans()), iseq=draw(st.booleans()),
                      ocsum=draw(st.booleans()), icsum=draw(st.booleans()))


def mirror(spec: TunnelSpec) -> TunnelSpec:
    """The far end's receive options for what spec sends."""
    return spec.with_(ikey=spec.okey, iseq=spec.oseq, icsum=spec.ocsum)


def expected_tos(spec: TunnelSpec, inner_tos: int) -> int:
    base = inner_tos if spec.tos & 1 else spec.tos & 0xFE
    ecn = inner_tos & 3
    return (base & 0xFC) | (ECT0 if ecn == CE else ecn)


def tc_of(inner: bytes) -> int:
    return inner[1] if inner[0] >> 4 == 4 else ((inner[0] & 0x0F) << 4) | (inner[1] >> 4)


@settings(max_examples=250)
@given(specs(), inners(max_payload=100), addresses, st.integers(0, 0xFFFF),
       st.integers(0, 3))
def test_encap_equals_scapy_built_packet_byte_for_byte(spec, inner, dst, ident, earlier):
    codec = GreCodec(spec)
    for _ in range(earlier):
        send(codec, inner)
    v4 = inner[0] >> 4 == 4
    inner_ttl = inner[8] if v4 else inner[7]
    inner_df = v4 and bool(inner[6] & 0x40)
    g = GRE(proto=0x0800 if v4 else 0x86DD, chksum_present=int(spec.ocsum),
            key_present=int(spec.okey is not None), seqnum_present=int(spec.oseq))
    if spec.okey is not None:
        g.key = spec.okey
    if spec.oseq:
        g.sequence_number = earlier
    want = IP(src=str(spec.local or "0.0.0.0"), dst=str(dst), ttl=spec.ttl or inner_ttl,
              tos=expected_tos(spec, tc_of(inner)), id=ident,
              flags="DF" if spec.pmtudisc or inner_df else 0, proto=47) / g / Raw(inner)
    assert send(codec, inner, dst=str(dst), ident=ident) == bytes(want)


# ---- round trip ---------------------------------------------------------------------------

@settings(max_examples=400)
@given(specs(), st.lists(inners(), min_size=1, max_size=4), addresses,
       st.integers(0, 0xFFFF))
def test_encap_then_decap_returns_exactly_the_inner_packet(spec, packets, dst, ident):
    tx, far = GreCodec(spec), GreCodec(mirror(spec))
    hlen = 4 + 4 * (spec.ocsum + (spec.okey is not None) + spec.oseq)
    for inner in packets:
        wire = bytearray(send(tx, inner, dst=str(dst), ident=ident))
        assert gre.demux(wire, len(wire))[2] == spec.okey     # what the lookup matches
        assert check(wire, len(wire), far) == (20 + hlen, len(inner))
        assert bytes(wire[20 + hlen:]) == inner


# ---- ingress: demux -------------------------------------------------------------------------

def test_demux_returns_the_key_for_the_lookup():
    w = scapy_wire(INNER4)
    assert gre.demux(w, len(w))[2] is None
    w = scapy_wire(INNER4, key_present=1, key=0)
    assert gre.demux(w, len(w))[2] == 0
    w = scapy_wire(INNER4, key_present=1, key=0xFFFFFFFF, chksum_present=1, seqnum_present=1,
                   sequence_number=3)
    ihl, end, key, ctx = gre.demux(w, len(w))
    assert (ihl, end, key) == (20, len(w), 0xFFFFFFFF)
    assert ctx == (0xB000, 0x0800, 3, 16)


def test_the_codec_does_not_match_keys():
    # ikey 1 / okey 2: the lookup gives this tunnel packets with key 1; decap_at() itself
    # takes what it is given (ip_tunnel_key_match() is the lookup's)
    codec = rx(ikey=1, okey=2)
    for k in (1, 2, None):
        g = {"key_present": 1, "key": k} if k is not None else {}
        assert decap(scapy_wire(INNER4, **g), codec) == (20 + (8 if k else 4), len(INNER4))


@pytest.mark.parametrize("version", [1, 7])
def test_demux_gre_version_other_than_0(version):
    w = scapy_wire(INNER4, version=version)
    assert gre.demux(w, len(w)) is Drop.GRE_FLAGS


def test_demux_routing_bit():
    w = scapy_wire(bytes(4) + INNER4, routing_present=1)    # an RFC 1701 offset word
    assert gre.demux(w, len(w)) is Drop.GRE_FLAGS


@pytest.mark.parametrize("g", [{}, {"key_present": 1, "key": 5}, {"seqnum_present": 1},
                               {"chksum_present": 1, "key_present": 1, "seqnum_present": 1}])
def test_demux_gre_header_cut_short(g):
    hlen = len(bytes(GRE(**g)))
    for cut in range(hlen):
        w = bytearray(ipv4.build(REMOTE, LOCAL, 47, bytes(GRE(proto=0x0800, **g))[:cut]))
        assert gre.demux(w, len(w)) is Drop.MALFORMED


def test_demux_outer_checks():
    good = scapy_wire(INNER4)
    ipip = bytearray(ipv4.build(REMOTE, LOCAL, 4, INNER4))
    assert gre.demux(ipip, len(ipip)) is Drop.WRONG_PROTO
    bad = bytearray(good)
    bad[10] ^= 1
    assert gre.demux(bad, len(bad)) is Drop.BAD_CHECKSUM
    assert gre.demux(good, 19) is Drop.MALFORMED
    assert gre.demux(good, len(good) - 1) is Drop.BAD_LENGTH


@pytest.mark.parametrize("ptype", [0x88BE, 0x22EB])
def test_demux_erspan_is_not_for_a_gre_tunnel(ptype):
    # gre_rcv() hands ERSPAN to erspan_rcv(); an ipgre tunnel never sees it
    w = scapy_wire(bytes(8) + INNER4, ptype, seqnum_present=1)
    assert gre.demux(w, len(w)) is Drop.WRONG_PROTO


def test_demux_does_not_verify_the_checksum():
    w = scapy_wire(INNER4, chksum_present=1)
    w[24] ^= 0xFF
    assert gre.demux(w, len(w))[3][0] == 0x8000
    assert decap(w, rx(icsum=True)) is Drop.BAD_CSUM


# ---- ingress: ip_tunnel_rcv() rules --------------------------------------------------------

def test_checksum_present_but_not_configured():
    assert decap(scapy_wire(INNER4, chksum_present=1), rx()) is Drop.CSUM_MISMATCH
    assert decap(scapy_wire(INNER4, chksum_present=1), rx(icsum=True)) == (28, len(INNER4))


def test_checksum_configured_but_absent():
    assert decap(scapy_wire(INNER4), rx(icsum=True)) is Drop.CSUM_MISMATCH
    assert decap(scapy_wire(INNER4), rx()) == (24, len(INNER4))


@pytest.mark.parametrize("icsum", [True, False])
@pytest.mark.parametrize("where", [24, 25, 28, 40, -1])     # checksum field, inner, last byte
def test_checksum_wrong_is_dropped_first(icsum, where):
    w = scapy_wire(INNER4, chksum_present=1)
    w[where] ^= 0x10
    assert decap(w, rx(icsum=icsum)) is Drop.BAD_CSUM


def test_checksum_covers_the_whole_gre_payload_not_link_padding():
    # inside the outer total length after the inner packet: checksummed, not delivered
    w = scapy_wire(INNER4 + b"\x01\x02\x03", chksum_present=1)
    assert decap(w, rx(icsum=True)) == (28, len(INNER4))
    w[-1] ^= 1
    assert decap(w, rx(icsum=True)) is Drop.BAD_CSUM
    # after the outer total length (ip_rcv_core() trims it): not checksummed
    w = scapy_wire(INNER4, chksum_present=1) + b"\xff\x00\xff"
    assert decap(w, rx(icsum=True)) == (28, len(INNER4))


def seq_run(codec: GreCodec, seqs, **g):
    """Decapsulate one packet per entry (None: without a sequence number)."""
    out = []
    for s in seqs:
        opts = dict(g) if s is None else dict(g, seqnum_present=1, sequence_number=s)
        out.append(decap(scapy_wire(INNER4, **opts), codec))
    return out


OK4 = (24, len(INNER4))
OK4S = (28, len(INNER4))


def test_iseq_refuses_a_packet_without_sequence_number():
    assert seq_run(rx(iseq=True), [None]) == [Drop.OUT_OF_SEQ]
    assert seq_run(rx(iseq=True), [4, None, 5]) == [OK4S, Drop.OUT_OF_SEQ, OK4S]


def test_iseq_accepts_any_first_number_then_only_newer_ones():
    got = seq_run(rx(iseq=True), [1000, 1001, 1005, 1004, 1005, 1000, 1006])
    assert got == [OK4S, OK4S, OK4S, Drop.OUT_OF_SEQ, Drop.OUT_OF_SEQ, Drop.OUT_OF_SEQ, OK4S]


def test_iseq_first_packet_with_seq_0():
    assert seq_run(rx(iseq=True), [0, 0, 1]) == [OK4S, Drop.OUT_OF_SEQ, OK4S]


def test_iseq_is_serial_number_arithmetic():
    # (s32)(seq - i_seqno) < 0: up to 2^31 - 1 ahead is newer, 2^31 ahead counts as older
    assert seq_run(rx(iseq=True), [100, 101 + 0x7FFFFFFF]) == [OK4S, OK4S]
    assert seq_run(rx(iseq=True), [100, 101 + 0x80000000]) == [OK4S, Drop.OUT_OF_SEQ]
    assert seq_run(rx(iseq=True), [0xFFFFFFF0, 3, 2]) == [OK4S, OK4S, Drop.OUT_OF_SEQ]


def test_iseq_after_0xffffffff_expects_0_which_accepts_anything():
    # i_seqno = seq + 1 wraps to 0, and i_seqno 0 means "no packet seen yet"
    got = seq_run(rx(iseq=True), [0xFFFFFFFF, 0x7000, 0x6FFF])
    assert got == [OK4S, OK4S, Drop.OUT_OF_SEQ]


def test_without_iseq_sequence_numbers_are_ignored():
    assert seq_run(rx(), [5, 3, None, 3, 0xFFFFFFFF, 0]) == [OK4S, OK4S, OK4, OK4S, OK4S, OK4S]


def test_checksum_drops_come_before_the_sequence_number():
    codec = rx(iseq=True, icsum=True)
    bad = scapy_wire(INNER4, chksum_present=1, seqnum_present=1, sequence_number=50)
    bad[-1] ^= 1
    assert decap(bad, codec) is Drop.BAD_CSUM
    assert decap(scapy_wire(INNER4, seqnum_present=1, sequence_number=60), codec) \
        is Drop.CSUM_MISMATCH
    # neither moved i_seqno
    assert seq_run(codec, [10], chksum_present=1) == [(32, len(INNER4))]


def test_sequence_number_is_taken_before_the_inner_packet_is_checked():
    # ip_tunnel_rcv() sets i_seqno; ip_rcv() drops the bad inner packet later
    codec = rx(iseq=True)
    bad_inner = bytearray(INNER4)
    bad_inner[10] ^= 1
    w = scapy_wire(bytes(bad_inner), seqnum_present=1, sequence_number=10)
    assert decap(w, codec) is Drop.BAD_CHECKSUM
    assert seq_run(codec, [9, 10, 11]) == [Drop.OUT_OF_SEQ, Drop.OUT_OF_SEQ, OK4S]


@pytest.mark.parametrize("ptype", [0x6558, 0x8847, 0x0806, 0x0000, 0x86DE])
def test_protocol_types_other_than_ip(ptype):
    assert decap(scapy_wire(INNER4, ptype), rx()) is Drop.WRONG_PROTO


def test_protocol_type_must_match_the_inner_version():
    # ip_rcv() and ipv6_rcv() check the version nibble
    assert decap(scapy_wire(INNER6, 0x0800), rx()) is Drop.MALFORMED
    assert decap(scapy_wire(INNER4 + bytes(20), 0x86DD), rx()) is Drop.MALFORMED
    assert decap(scapy_wire(INNER6, 0x86DD), rx()) == (24, len(INNER6))


def test_inner_packet_checks():
    assert decap(scapy_wire(INNER4[:-1]), rx()) is Drop.BAD_LENGTH
    assert decap(scapy_wire(INNER6[:-1], 0x86DD), rx()) is Drop.BAD_LENGTH
    assert decap(scapy_wire(INNER4[:19]), rx()) is Drop.MALFORMED
    assert decap(scapy_wire(b""), rx()) is Drop.MALFORMED


def inner_with_tos(version: int, tos: int) -> bytes:
    if version == 4:
        return bytes(IP(src="10.42.1.2", dst="10.42.2.3", tos=tos) / ICMP())
    return bytes(IPv6(src="fd00::1", dst="fd00::2", tc=tos, nh=59))


@pytest.mark.parametrize("version", [4, 6])
def test_ecn_decapsulation(version):
    ptype = 0x0800 if version == 4 else 0x86DD
    # RFC 6040 §4.2: outer CE over a not-ECT inner packet is dropped
    assert decap(scapy_wire(inner_with_tos(version, 0xB8), ptype, tos=CE), rx()) is Drop.ECN
    # outer CE over ECT(0): the inner packet is marked CE (an IPv4 checksum made right)
    w = scapy_wire(inner_with_tos(version, 0xB8 | ECT0), ptype, tos=CE)
    off, length = decap(w, rx())
    assert bytes(w[off:off + length]) == inner_with_tos(version, 0xB8 | CE)


def test_wccp_is_taken_as_ipv4():
    assert decap(scapy_wire(INNER4, 0x883E), rx()) == (24, len(INNER4))
    w = scapy_wire(bytes(4) + INNER4, 0x883E)      # WCCPv2: a 4-byte redirect header first
    assert decap(w, rx()) == (28, len(INNER4))


def test_module_decap_is_demux_then_decap_at():
    w = scapy_wire(INNER4, chksum_present=1)
    assert gre.decap(bytearray(w), len(w), rx(icsum=True)) == (28, len(INNER4))
    assert gre.decap(bytearray(w), len(w), rx()) is Drop.CSUM_MISMATCH
    assert gre.decap(bytearray(w), 10, rx()) is Drop.MALFORMED


# ---- robustness: arbitrary bytes never make demux() or decap_at() raise ---------------------

codecs = st.builds(lambda c, s: rx(icsum=c, iseq=s), st.booleans(), st.booleans())


def fix_ipv4_checksum(b: bytearray, off: int = 0) -> None:
    if len(b) - off < 20 or b[off] >> 4 != 4:
        return
    ihl = (b[off] & 0x0F) * 4
    if 20 <= ihl <= len(b) - off:
        b[off + 10:off + 12] = b"\0\0"
        b[off + 10:off + 12] = inet_checksum(b[off:off + ihl]).to_bytes(2, "big")


def fix_gre_checksum(b: bytearray) -> None:
    """Make a GRE checksum verify again, if the packet has a GRE header with C set."""
    if len(b) < 20:
        return
    ihl, end = (b[0] & 0x0F) * 4, min(len(b), b[2] << 8 | b[3])
    if ihl + 8 <= end and b[ihl] & 0x80:
        b[ihl + 4:ihl + 6] = b"\0\0"
        b[ihl + 4:ihl + 6] = inet_checksum(b[ihl:end]).to_bytes(2, "big")


@settings(max_examples=1000)
@given(st.binary(max_size=120), codecs)
def test_arbitrary_bytes(data, codec):
    check(bytearray(data), len(data), codec)


@settings(max_examples=1000)
@given(st.binary(min_size=20, max_size=20), st.binary(min_size=4, max_size=16),
       st.binary(max_size=80), codecs, st.booleans(), st.booleans())
def test_arbitrary_gre_under_a_valid_outer_header(hdr, greh, rest, codec, clean, fix_csum):
    # a GRE header of any flags over anything, with an outer header that passes; "clean"
    # clears the routing and version bits so that the later rules are reached
    b = bytearray(b"\x45" + hdr[1:2] + (20 + len(greh) + len(rest)).to_bytes(2, "big")
                  + hdr[4:20] + greh + rest)
    b[9] = 47
    if clean:
        b[20] &= ~0x40
        b[21] &= ~0x07
    if fix_csum:
        fix_gre_checksum(b)
    fix_ipv4_checksum(b)
    check(b, len(b), codec)


valid = st.tuples(specs(), inners(64)).map(lambda t: (t[0], send(GreCodec(t[0]), t[1])))


def receiver(spec: TunnelSpec, matched: bool, codec: GreCodec) -> GreCodec:
    """The far end of spec (so that a packet gets past the checksum and sequence rules), or
    any receiving tunnel."""
    return GreCodec(mirror(spec)) if matched else codec


@settings(max_examples=800)
@given(valid, st.data())
def test_truncated_valid_packets(sent, data):
    spec, pkt = sent
    k = data.draw(st.integers(0, len(pkt)))
    refit = data.draw(st.booleans())
    matched = data.draw(st.booleans())
    codec = data.draw(codecs)
    b = bytearray(pkt[:k])
    if refit and k >= 20:
        # the outer packet itself made shorter: its total length says k, so the cut falls
        # in the GRE header or the inner packet
        b[2:4] = k.to_bytes(2, "big")
        fix_ipv4_checksum(b)
        fix_gre_checksum(b)
    got = check(b, k, receiver(spec, matched, codec))
    # a short n over the full buffer behaves as a short buffer
    full = bytearray(pkt)
    full[:len(b)] = b
    assert check(full, k, receiver(spec, matched, GreCodec(codec_spec(codec)))) == got
    if k < len(pkt):
        assert isinstance(got, Drop)


def codec_spec(codec: GreCodec) -> TunnelSpec:
    return TunnelSpec(name="gre1", mode=GRE_MODE, icsum=codec.icsum, iseq=codec.iseq)


@settings(max_examples=1000)
@given(valid, st.lists(st.integers(0, 2**16), min_size=1, max_size=6), codecs,
       st.booleans(), st.booleans(), st.booleans())
def test_bit_flipped_valid_packets(sent, bits, codec, matched, fix_gre, fix_inner):
    spec, pkt = sent
    b = bytearray(pkt)
    for bit in bits:
        bit %= len(b) * 8
        b[bit // 8] ^= 0x80 >> (bit % 8)
    if fix_inner and len(b) >= 20:
        ihl = (b[0] & 0x0F) * 4
        if len(b) > ihl + 4:
            fix_ipv4_checksum(b, ihl + 4 + 4 * bin(b[ihl] & 0xB0).count("1"))
    if fix_gre:
        fix_gre_checksum(b)
    fix_ipv4_checksum(b)
    check(b, len(b), receiver(spec, matched, codec))
