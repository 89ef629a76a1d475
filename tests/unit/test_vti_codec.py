"""A vti's codec over a namespace's xfrm tables (tunl.tunnel.vti), two sides at a time, with
the semantics of ip_vti.c and xfrm:

  egress    the tunnel's okey is the packet's mark: it picks the out policy, whose template
            and mark pick the state; ESP in tunnel mode; the outer header as
            xfrm4_mode_tunnel_output() writes it (proto 50, TTL 64, the state's addresses,
            the inner DF, the inner TOS with CE carried as ECT(0))
  ingress   the tunnel's ikey is the packet's mark: the state is looked up by (dst, SPI)
            and that mark (else XfrmInNoStates), the packet is checked and decrypted, and an
            in policy with the mark must allow it (none: XfrmInNoPols; block: XfrmInPolBlock)
            with a template the state fits (else XfrmInTmplMismatch)

Packets are moved through buffers laid out as the userspace engine lays them out: egress
reads the inner packet into buf[HEADROOM:] and encap() returns (start, end) of the ESP
packet; ingress receives the outer packet at buf[0:], demux() finds its header and
decap_at() returns (offset, length) of the inner packet. The outer header and the ESP
payload are checked with scapy, an independent dissector and ESP implementation.
"""
from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.utils import checksum

from tunl.model import TunnelMode, TunnelSpec
from tunl.tunnel import vti
from tunl.tunnel.outer import HEADROOM
from tunl.tunnel.vti import VtiCodec, Xfrm
from tunl.wire import ipv4
from tunl.wire.drop import Drop
from tunl.xfrm import Algo, XfrmPolicy, XfrmState

MAX_PACKET = 65535                    # the engine's buffers
GCM, CBC, SHA = "rfc4106(gcm(aes))", "cbc(aes)", "hmac(sha256)"
A, B = IPv4Address("192.0.2.1"), IPv4Address("198.51.100.2")     # the vti's two ends
A_IN, B_IN = "10.62.1.1", "10.62.1.2"                               # inside the tunnel
SPI_AB, SPI_BA = 0x1000, 0x2000
MARK = 7
SUITES = ["gcm", "cbc"]


def key(seed: int, n: int) -> bytes:
    return bytes((seed * 7 + i) & 0xFF for i in range(n))


def algos(suite: str, seed: int) -> dict:
    """`aead rfc4106(gcm(aes)) KEY 128` (AES-128 key and 4 bytes of salt), or `enc cbc(aes)
    KEY auth-trunc hmac(sha256) KEY 128`."""
    if suite == "gcm":
        return {"aead": Algo(GCM, key(seed, 20), 128)}
    return {"enc": Algo(CBC, key(seed, 16)), "auth": Algo(SHA, key(seed + 1, 32), 128)}


def sa(src, dst, spi, suite, seed, mark=MARK) -> XfrmState:
    return XfrmState(src, dst, spi, reqid=1, mark=mark, replay_window=32, **algos(suite, seed))


def side(me: IPv4Address, peer: IPv4Address, suite: str, *, ikey=MARK, okey=MARK,
         in_policy: bool = True, in_tmpl=None) -> tuple[Xfrm, VtiCodec]:
    """One host: both states (the same on both sides, as `ip xfrm state add` gives them to
    each), its out and in policy (mirrored), and its vti."""
    x = Xfrm()
    x.add_state(sa(A, B, SPI_AB, suite, 1))
    x.add_state(sa(B, A, SPI_BA, suite, 2))
    x.add_policy(XfrmPolicy("out", tmpl_src=me, tmpl_dst=peer, tmpl_reqid=1, mark=MARK))
    if in_policy:
        src, dst = in_tmpl or (peer, me)
        x.add_policy(XfrmPolicy("in", tmpl_src=src, tmpl_dst=dst, tmpl_reqid=1, mark=MARK))
    spec = TunnelSpec(name="vti1", mode=TunnelMode.VTI, local=me, remote=peer, ikey=ikey,
                      okey=okey)
    return x, VtiCodec(spec, x)


def inner(payload: bytes = b"ping", src=A_IN, dst=B_IN, tos=0, df=True) -> bytes:
    return bytes(IP(src=src, dst=dst, tos=tos, ttl=63, id=0x77, flags="DF" if df else 0) /
                 ICMP(id=5, seq=1) / payload)


def send(codec: VtiCodec, packet: bytes, ident: int = 1, remote=B) -> bytes | Drop:
    """The engine's egress: the inner packet behind the headroom, encap() (given the
    tunnel's remote, as the engine gives it), the (start, end) it returns is what goes to
    the raw socket."""
    buf = bytearray(HEADROOM + MAX_PACKET)
    buf[HEADROOM:HEADROOM + len(packet)] = packet
    r = codec.encap(buf, HEADROOM, len(packet), remote.packed, ident)
    if r.__class__ is Drop:
        return r
    start, end = r
    assert start == HEADROOM - 20 and end > HEADROOM + len(packet)
    return bytes(buf[start:end])


def receive(codec: VtiCodec, packet: bytes) -> bytes | Drop:
    """The engine's ingress: the outer packet at buf[0:], demux(), decap_at()."""
    buf = bytearray(MAX_PACKET + 1)
    buf[:len(packet)] = packet
    r = vti.demux(buf, len(packet))
    if r.__class__ is Drop:
        return r
    ihl, end, _key, ctx = r
    r = codec.decap_at(buf, ihl, end, ctx)
    if r.__class__ is Drop:
        return r
    off, ln = r
    return bytes(buf[off:off + ln])


def mib(x: Xfrm) -> dict:
    return {k: v for k, v in x.counters().items() if v}


def scapy_sa(suite: str, spi: int, seed: int, src, dst) -> SecurityAssociation:
    a = algos(suite, seed)
    if suite == "gcm":
        return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=a["aead"].key,
                                   tunnel_header=IP(src=str(src), dst=str(dst)))
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-CBC", crypt_key=a["enc"].key,
                               auth_algo="SHA2-256-128", auth_key=a["auth"].key,
                               tunnel_header=IP(src=str(src), dst=str(dst)))


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("suite", SUITES)
def test_a_packet_goes_from_a_to_b_and_back(suite):
    xa, va = side(A, B, suite)
    xb, vb = side(B, A, suite)
    for n, payload in enumerate((b"", b"x", b"ping" * 50, bytes(range(256)) * 5), 1):
        there = inner(payload)
        assert receive(vb, send(va, there)) == there
        back = inner(payload, src=B_IN, dst=A_IN)
        assert receive(va, send(vb, back, remote=A)) == back
        # one sequence number per packet on each SA, as each side keeps it
        assert xa.states[(B.packed, SPI_AB)].esp.oseq == n
        assert xb.states[(B.packed, SPI_AB)].esp.seq == n
        assert xb.states[(A.packed, SPI_BA)].esp.oseq == n
        assert xa.states[(A.packed, SPI_BA)].esp.seq == n
    assert mib(xa) == {} and mib(xb) == {}


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("tos, outer_tos", [
    (0x00, 0x00), (0xB8, 0xB8),            # the DS field is copied
    (0x01, 0x01), (0x02, 0x02),            # ECT(1), ECT(0) copied
    (0xBB, 0xBA),                          # CE is carried as ECT(0) (INET_ECN_encapsulate())
])
@pytest.mark.parametrize("df", [True, False])
def test_the_outer_header_is_what_xfrm4_tunnel_mode_writes(suite, tos, outer_tos, df):
    _, va = side(A, B, suite)
    packet = send(va, inner(b"data", tos=tos, df=df), ident=0x1234)
    o = IP(packet)
    assert (o.version, o.ihl, o.proto, o.ttl) == (4, 5, 50, 64)
    assert (o.src, o.dst) == (str(A), str(B))
    assert o.tos == outer_tos
    assert (o.flags == "DF") == df and o.frag == 0
    assert o.len == len(packet) and o.id == 0x1234
    assert checksum(packet[:20]) == 0                      # the header checksum verifies
    assert o[ESP].spi == SPI_AB and o[ESP].seq == 1
    # scapy, a second ESP implementation, opens it with the state's keys
    got = scapy_sa(suite, SPI_AB, 1, A, B).decrypt(o)
    assert bytes(got) == inner(b"data", tos=tos, df=df)


@pytest.mark.parametrize("suite", SUITES)
def test_b_takes_what_scapy_seals_with_the_state_keys(suite):
    _, vb = side(B, A, suite)
    s = scapy_sa(suite, SPI_AB, 1, A, B)
    packet = inner(b"from scapy")
    assert receive(vb, bytes(s.encrypt(IP(packet)))) == packet


# ---- marks: okey out, ikey in -----------------------------------------------------------------

@pytest.mark.parametrize("suite", SUITES)
def test_okey_picks_the_out_policy_and_its_state(suite):
    x, _ = side(A, B, suite)
    x.add_state(sa(A, B, 0x1100, suite, 3, mark=8))
    x.add_policy(XfrmPolicy("out", tmpl_src=A, tmpl_dst=B, tmpl_reqid=1, mark=8))
    for okey, spi in ((MARK, SPI_AB), (8, 0x1100)):
        v = VtiCodec(TunnelSpec(name="vti1", mode=TunnelMode.VTI, local=A, remote=B,
                                ikey=MARK, okey=okey), x)
        packet = send(v, inner())
        assert IP(packet)[ESP].spi == spi
    assert x.states[(B.packed, SPI_AB)].esp.oseq == 1
    assert x.states[(B.packed, 0x1100)].esp.oseq == 1


@pytest.mark.parametrize("suite", SUITES)
def test_an_okey_no_out_policy_has_is_dropped_as_XfrmOutPolBlock(suite):
    # tunl counts a vti's packet that no out policy takes in XfrmOutPolBlock (the kernel's
    # vti_xmit() counts it in the device's tx_carrier_errors only)
    x, _ = side(A, B, suite)
    v = VtiCodec(TunnelSpec(name="vti1", mode=TunnelMode.VTI, local=A, remote=B, ikey=MARK,
                            okey=9), x)
    assert send(v, inner()) is Drop.XFRM_OUT_NO_POLICY
    assert mib(x) == {"XfrmOutPolBlock": 1}
    assert x.states[(B.packed, SPI_AB)].esp.oseq == 0        # no sequence number spent


@pytest.mark.parametrize("suite", SUITES)
def test_an_out_policy_whose_mark_no_state_has_is_XfrmOutNoStates(suite):
    x, _ = side(A, B, suite)
    x.add_policy(XfrmPolicy("out", tmpl_src=A, tmpl_dst=B, tmpl_reqid=1, mark=9))
    v = VtiCodec(TunnelSpec(name="vti1", mode=TunnelMode.VTI, local=A, remote=B, ikey=MARK,
                            okey=9), x)
    assert send(v, inner()) is Drop.XFRM_OUT_NO_STATE
    assert mib(x) == {"XfrmOutNoStates": 1}
    # a template for other ends finds no state either
    x2, v2 = side(A, B, suite)
    x2.add_policy(XfrmPolicy("out", tmpl_src=A, tmpl_dst=IPv4Address("203.0.113.9"),
                             mark=MARK), update=True)
    assert send(v2, inner()) is Drop.XFRM_OUT_NO_STATE
    assert mib(x2) == {"XfrmOutNoStates": 1}


@pytest.mark.parametrize("suite", SUITES)
def test_ikey_must_match_the_in_state_mark(suite):
    _, va = side(A, B, suite)
    xb, _ = side(B, A, suite)
    wrong = VtiCodec(TunnelSpec(name="vti1", mode=TunnelMode.VTI, local=B, remote=A,
                                ikey=9, okey=MARK), xb)
    packet = send(va, inner())
    assert receive(wrong, packet) is Drop.XFRM_NO_STATE
    assert mib(xb) == {"XfrmInNoStates": 1}
    st_ab = xb.states[(B.packed, SPI_AB)].esp
    assert (st_ab.seq, st_ab.bitmap) == (0, 0)               # the state never saw it
    right = VtiCodec(TunnelSpec(name="vti1", mode=TunnelMode.VTI, local=B, remote=A,
                                ikey=MARK, okey=MARK), xb)
    assert receive(right, packet) == inner()


@pytest.mark.parametrize("suite", SUITES)
def test_an_unknown_spi_is_XfrmInNoStates(suite):
    xb, vb = side(B, A, suite)
    xb.del_state(B, SPI_AB)
    _, va = side(A, B, suite)
    assert receive(vb, send(va, inner())) is Drop.XFRM_NO_STATE
    assert mib(xb) == {"XfrmInNoStates": 1}


@pytest.mark.parametrize("suite", SUITES)
def test_no_in_policy_is_XfrmInNoPols(suite):
    _, va = side(A, B, suite)
    xb, vb = side(B, A, suite, in_policy=False)
    packet = send(va, inner())
    assert receive(vb, packet) is Drop.XFRM_NO_POLICY
    assert mib(xb) == {"XfrmInNoPols": 1}
    # the packet authenticated, so the window moved before the policy check (xfrm_input())
    assert xb.states[(B.packed, SPI_AB)].esp.seq == 1
    # an in policy with another mark is no policy for this vti
    xb.add_policy(XfrmPolicy("in", tmpl_src=A, tmpl_dst=B, tmpl_reqid=1, mark=9))
    assert receive(vb, send(va, inner())) is Drop.XFRM_NO_POLICY
    assert mib(xb) == {"XfrmInNoPols": 2}


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("tmpl", [(IPv4Address("203.0.113.9"), B),
                                  (A, IPv4Address("203.0.113.9")), (B, A)])
def test_an_in_policy_naming_other_ends_is_XfrmInTmplMismatch(suite, tmpl):
    _, va = side(A, B, suite)
    xb, vb = side(B, A, suite, in_tmpl=tmpl)
    assert receive(vb, send(va, inner())) is Drop.XFRM_TMPL_MISMATCH
    assert mib(xb) == {"XfrmInTmplMismatch": 1}


@pytest.mark.parametrize("suite", SUITES)
def test_an_in_policy_with_another_reqid_is_XfrmInTmplMismatch(suite):
    _, va = side(A, B, suite)
    xb, vb = side(B, A, suite)
    xb.add_policy(XfrmPolicy("in", tmpl_src=A, tmpl_dst=B, tmpl_reqid=2, mark=MARK),
                  update=True)
    assert receive(vb, send(va, inner())) is Drop.XFRM_TMPL_MISMATCH
    assert mib(xb) == {"XfrmInTmplMismatch": 1}


@pytest.mark.parametrize("suite", SUITES)
def test_action_block_drops_both_ways_where_its_selector_takes_the_packet(suite):
    # a block policy of higher precedence (a lower priority number) for one inner host
    xa, va = side(A, B, suite)
    xb, vb = side(B, A, suite)
    one = IPv4Network("10.62.1.3/32")
    xa.add_policy(XfrmPolicy("out", dst=one, mark=MARK, action="block"))
    for x in (xa, xb):
        for p in list(x.policies):
            if p.action == "allow":
                x.add_policy(replace(p, priority=100), update=True)
    assert [p.action for p in xa.policies if p.dir == "out"] == ["block", "allow"]
    assert send(va, inner(dst="10.62.1.3")) is Drop.XFRM_OUT_NO_POLICY
    assert mib(xa) == {"XfrmOutPolBlock": 1}
    assert receive(vb, send(va, inner())) == inner()         # the allow policy still works
    # in: __xfrm_policy_check() counts a block policy in XfrmInPolBlock
    xb.add_policy(XfrmPolicy("in", src=IPv4Network("10.62.1.1/32"), mark=MARK,
                             action="block"))
    assert receive(vb, send(va, inner())) is Drop.XFRM_NO_POLICY
    assert mib(xb) == {"XfrmInPolBlock": 1}
    assert receive(vb, send(va, inner(src="10.62.1.5"))) == inner(src="10.62.1.5")


# ---- anti-replay and integrity ----------------------------------------------------------------

@pytest.mark.parametrize("suite", SUITES)
def test_a_replayed_packet_is_XfrmInStateSeqError(suite):
    _, va = side(A, B, suite)
    xb, vb = side(B, A, suite)
    first = send(va, inner(b"1"))
    assert receive(vb, first) == inner(b"1")
    assert receive(vb, first) is Drop.ESP_REPLAY
    assert mib(xb) == {"XfrmInStateSeqError": 1}
    # out of order within the window is fine; left of the window is too old
    packets = [send(va, inner(b"%d" % i)) for i in range(2, 40)]
    assert receive(vb, packets[-1]) == inner(b"39")
    assert receive(vb, packets[-2]) == inner(b"38")
    assert receive(vb, packets[0]) is Drop.ESP_TOO_OLD       # seq 2, 37 behind 39
    assert receive(vb, packets[-2]) is Drop.ESP_REPLAY
    assert mib(xb) == {"XfrmInStateSeqError": 3}
    esp = xb.states[(B.packed, SPI_AB)].esp
    assert (esp.seq, esp.bitmap) == (39, 0b11)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("where", ["iv", "payload", "icv", "seq"])
def test_a_flipped_bit_is_XfrmInStateProtoError(suite, where):
    _, va = side(A, B, suite)
    xb, vb = side(B, A, suite)
    packet = bytearray(send(va, inner(b"x" * 40)))
    at = {"seq": 20 + 7, "iv": 20 + 8 + 1, "payload": 20 + 8 + 16 + 4,
          "icv": len(packet) - 1}[where]
    packet[at] ^= 0x10
    assert receive(vb, bytes(packet)) is Drop.ESP_ICV
    assert mib(xb) == {"XfrmInStateProtoError": 1}
    esp = xb.states[(B.packed, SPI_AB)].esp
    assert (esp.seq, esp.bitmap) == (0, 0)                   # the window did not move
    packet[at] ^= 0x10
    assert receive(vb, bytes(packet)) == inner(b"x" * 40)


# ---- never raises -----------------------------------------------------------------------------

def outer(payload: bytes) -> bytes:
    """A valid outer IPv4 header A -> B of protocol 50 in front of payload."""
    buf = bytearray(20 + len(payload))
    ipv4.pack_header_into(buf, 0, tos=0, total_len=len(buf), ident=1, frag=0, ttl=64,
                          proto=50, src=A.packed, dst=B.packed)
    buf[20:] = payload
    return bytes(buf)


@settings(max_examples=300)
@given(suite=st.sampled_from(SUITES),
       head=st.sampled_from([b"", SPI_AB.to_bytes(4, "big"),
                             SPI_AB.to_bytes(4, "big") + (1).to_bytes(4, "big"),
                             SPI_BA.to_bytes(4, "big")]),
       body=st.binary(max_size=300))
def test_decap_of_any_bytes_after_a_valid_outer_header_never_raises(suite, head, body):
    xb, vb = side(B, A, suite)
    packet = outer(head + body)
    buf = bytearray(MAX_PACKET + 1)
    buf[:len(packet)] = packet
    ihl, end, _key, ctx = vti.demux(buf, len(packet))
    got = vb.decap_at(buf, ihl, end, ctx)
    # nothing but a sealed packet gets through; every drop is counted in the MIB
    assert got.__class__ is Drop
    assert sum(xb.counters().values()) == 1
