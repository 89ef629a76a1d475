"""ECN across a tunnel: the tables below are written from the RFCs and include/net/inet_ecn.h,
not from tunl's code.

Codepoints (RFC 3168 §5): Not-ECT 00, ECT(1) 01, ECT(0) 10, CE 11.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunl.tunnel import ecn, ipip
from tunl.wire import ipv4
from tunl.wire.checksum import inet_checksum
from tunl.wire.drop import Drop

NOT_ECT, ECT1, ECT0, CE = 0b00, 0b01, 0b10, 0b11
NAMES = {NOT_ECT: "Not-ECT", ECT1: "ECT(1)", ECT0: "ECT(0)", CE: "CE"}

# Encapsulation, INET_ECN_encapsulate() (RFC 3168 §9.1.1 full functionality, which Linux
# follows): the outer ECN field is a copy of the inner one, except that CE becomes ECT(0).
ENCAP = {NOT_ECT: NOT_ECT, ECT1: ECT1, ECT0: ECT0, CE: ECT0}

DROP = "drop"
# Decapsulation, RFC 6040 §4.2 Figure 4: DECAP[inner][outer] is the ECN field of the packet
# that leaves the tunnel egress. Linux implements every cell in INET_ECN_decapsulate(),
# including ECT(1) over ECT(0) -> ECT(1) (INET_ECN_set_ect1()).
DECAP = {
    #          outer: Not-ECT  ECT(0)   ECT(1)   CE
    NOT_ECT: {NOT_ECT: NOT_ECT, ECT0: NOT_ECT, ECT1: NOT_ECT, CE: DROP},
    ECT0:    {NOT_ECT: ECT0,    ECT0: ECT0,    ECT1: ECT1,    CE: CE},
    ECT1:    {NOT_ECT: ECT1,    ECT0: ECT1,    ECT1: ECT1,    CE: CE},
    CE:      {NOT_ECT: CE,      ECT0: CE,      ECT1: CE,      CE: CE},
}
# __INET_ECN_decapsulate() return value: 2 drop, 1 accept and log (the (!!!) cells of a
# not-ECT inner packet under an ECT outer header), 0 accept.
VERDICT = {(i, o): 0 for i in DECAP for o in DECAP}
VERDICT.update({(NOT_ECT, ECT0): 1, (NOT_ECT, ECT1): 1, (NOT_ECT, CE): 2})

CELLS = [(i, o) for i in DECAP for o in DECAP[i]]
CELL_IDS = [f"inner {NAMES[i]}, outer {NAMES[o]}" for i, o in CELLS]
DSCPS = [0x00, 0x28, 0xB8, 0xFC]


def test_codepoint_constants_match_rfc3168():
    assert (ecn.NOT_ECT, ecn.ECT_1, ecn.ECT_0, ecn.CE, ecn.MASK) == (0, 1, 2, 3, 3)
    assert (ecn.OK, ecn.OK_LOG, ecn.DROP) == (0, 1, 2)


@pytest.mark.parametrize("inner", list(ENCAP), ids=[NAMES[i] for i in ENCAP])
@pytest.mark.parametrize("outer_dscp", DSCPS)
@pytest.mark.parametrize("inner_dscp", DSCPS)
def test_encapsulate_table(inner, outer_dscp, inner_dscp):
    for outer_ecn in (NOT_ECT, ECT1, ECT0, CE):  # whatever ECN the fixed outer tos carried
        got = ecn.encapsulate(outer_dscp | outer_ecn, inner_dscp | inner)
        assert got == outer_dscp | ENCAP[inner]


@settings(max_examples=300)
@given(st.integers(0, 255), st.integers(0, 255))
def test_encapsulate_never_sends_ce_and_keeps_the_outer_dscp(outer, inner):
    got = ecn.encapsulate(outer, inner)
    assert got & 3 != CE
    assert got & 0xFC == outer & 0xFC


@pytest.mark.parametrize("inner,outer", CELLS, ids=CELL_IDS)
def test_decapsulate_verdict(inner, outer):
    verdict, set_ce = ecn.decapsulate(0xA0 | outer, 0x48 | inner)
    assert verdict == VERDICT[inner, outer]
    if verdict != ecn.DROP:
        # CE is set on the inner packet where the table turns an ECT inner into CE, never
        # where the result is not CE (setting it again on a CE inner packet changes nothing)
        if DECAP[inner][outer] == CE and inner != CE:
            assert set_ce
        if DECAP[inner][outer] != CE:
            assert not set_ce


def outer_over(inner_tos: int, outer_tos: int) -> tuple[bytearray, bytes]:
    inner = ipv4.build("10.42.1.5", "10.42.2.7", ipv4.PROTO_UDP, b"payload!", tos=inner_tos,
                       ttl=63)
    outer = ipv4.build("172.16.0.1", "172.16.0.2", ipv4.PROTO_IPIP, inner, tos=outer_tos)
    return bytearray(outer), inner


@pytest.mark.parametrize("dscp", [0x00, 0xB8])
@pytest.mark.parametrize("inner,outer", CELLS, ids=CELL_IDS)
def test_ipip_decap_applies_rfc6040_table(inner, outer, dscp):
    buf, sent = outer_over(dscp | inner, 0x20 | outer)
    got = ipip.decap(buf, len(buf))
    want = DECAP[inner][outer]
    if want == DROP:
        assert got is Drop.ECN
        return
    off, n = got
    out = bytes(buf[off:off + n])
    assert out[1] == dscp | want, f"inner ECN {out[1] & 3:02b}, want {want:02b}"
    assert ipv4.validate(out) is None  # the checksum follows the change
    # nothing but the ECN field and the checksum changes
    assert out[:1] + out[2:10] + out[12:] == sent[:1] + sent[2:10] + sent[12:]


@pytest.mark.parametrize("ihl", [5, 6, 15])
@pytest.mark.parametrize("inner", [ECT0, ECT1, CE])
def test_set_ce_on_ipv4_marks_ce_and_fixes_the_checksum(inner, ihl):
    opts = b"\x01" * (4 * (ihl - 5))
    pkt = ipv4.IPv4Header(ipv4.IPv4Address("1.1.1.1"), ipv4.IPv4Address("2.2.2.2"), 6,
                          tos=0x88 | inner, options=opts).build(b"tcp")
    buf = bytearray(b"\xee" * 4 + pkt)
    ecn.set_ce(buf, 4)
    assert buf[:4] == b"\xee" * 4
    assert buf[5] == 0x88 | CE
    assert inet_checksum(buf[4:4 + ihl * 4]) == 0
    assert buf[4 + 12:] == pkt[12:] and buf[4] == pkt[0] and buf[6:14] == pkt[2:10]


@pytest.mark.parametrize("inner", [NOT_ECT, ECT1, ECT0, CE], ids=NAMES.values())
def test_set_ect1_on_ipv4_changes_only_ect0(inner):
    # IP_ECN_set_ect1(): only an ECT(0) header becomes ECT(1); the checksum follows
    pkt = ipv4.build("1.1.1.1", "2.2.2.2", 17, b"udp", tos=0x20 | inner)
    buf = bytearray(pkt)
    ecn.set_ect1(buf, 0)
    assert buf[1] == 0x20 | (ECT1 if inner == ECT0 else inner)
    assert ipv4.validate(buf) is None
    assert buf[12:] == pkt[12:]


@pytest.mark.parametrize("inner", [NOT_ECT, ECT1, ECT0, CE], ids=NAMES.values())
def test_ecn_marks_on_ipv6_change_only_the_ecn_bits_of_the_traffic_class(inner):
    from tunl.wire import ipv6
    pkt = ipv6.build("2001:db8::1", "2001:db8::2", 17, b"udp", tc=0xA8 | inner, flow=0xABCDE)
    buf = bytearray(pkt)
    ecn.set_ect1(buf, 0)
    assert ipv6.traffic_class(buf) == 0xA8 | (ECT1 if inner == ECT0 else inner)
    ecn.set_ce(buf, 0)
    assert ipv6.traffic_class(buf) == 0xA8 | CE
    assert buf[0] >> 4 == 6 and buf[2:] == pkt[2:] and buf[1] & 0x0F == pkt[1] & 0x0F
