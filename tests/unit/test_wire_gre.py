"""The GRE header codec (RFC 2784, RFC 2890), cross-checked with scapy's GRE layer.

What the kernel's gre_parse_header() refuses: a version other than 0 and the routing bit of
RFC 1701 (GRE_VERSION | GRE_ROUTING); it ignores the other Reserved0 bits. The header is 4
bytes plus 4 for each of checksum (with Reserved1), key and sequence number, in that order.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import GRE
from scapy.packet import Raw

from tunl.wire import gre
from tunl.wire.drop import Drop

u32 = st.integers(0, 2**32 - 1)
OPTION_SETS = [(c, k, s) for c in (0, 1) for k in (0, 1) for s in (0, 1)]


def flags_of(csum, key, seq):
    return (0x8000 if csum else 0) | (0x2000 if key else 0) | (0x1000 if seq else 0)


def scapy_gre(csum, key, seq, proto, k=0, sq=0, payload=b""):
    g = GRE(chksum_present=csum, key_present=key, seqnum_present=seq, proto=proto)
    if key:
        g.key = k
    if seq:
        g.sequence_number = sq
    return bytes(g / Raw(payload)) if payload else bytes(g)


def ours(csum, key, seq, proto, k=0, sq=0, payload=b"", lead=0):
    """The header and payload as pack_into() and fill_checksum() write them at buf[lead:]."""
    flags = flags_of(csum, key, seq)
    hlen = 4 + 4 * (csum + key + seq)
    buf = bytearray(b"\xee" * (lead + hlen) + payload)
    assert gre.pack_into(buf, lead, flags, proto, k, sq) == hlen
    if csum:
        gre.fill_checksum(buf, lead, len(buf))
    assert buf[:lead] == b"\xee" * lead         # nothing written in front of the header
    return bytes(buf[lead:])


# ---- lengths -----------------------------------------------------------------------------

@pytest.mark.parametrize("csum,key,seq", OPTION_SETS)
def test_header_len_is_4_plus_4_per_option(csum, key, seq):
    want = 4 + 4 * (csum + key + seq)       # RFC 2784 §2.1, RFC 2890 §2
    assert gre.header_len(flags_of(csum, key, seq)) == want
    assert len(scapy_gre(csum, key, seq, 0x0800)) == want
    # bits that carry no field do not change the length
    assert gre.header_len(flags_of(csum, key, seq) | 0x0F78) == want


# ---- building, against scapy -------------------------------------------------------------

@pytest.mark.parametrize("csum,key,seq", OPTION_SETS)
@pytest.mark.parametrize("proto", [0x0800, 0x86DD])
def test_pack_into_equals_scapy(csum, key, seq, proto):
    payload = bytes(range(37))      # odd length: the checksum pads with a zero byte
    assert ours(csum, key, seq, proto, 0xDEADBEEF, 0x01020304, payload, lead=3) == \
        scapy_gre(csum, key, seq, proto, 0xDEADBEEF, 0x01020304, payload)


@settings(max_examples=300)
@given(st.sampled_from(OPTION_SETS), st.integers(0, 0xFFFF), u32, u32,
       st.binary(max_size=200))
def test_pack_into_equals_scapy_for_any_field(opts, proto, k, sq, payload):
    csum, key, seq = opts
    assert ours(csum, key, seq, proto, k, sq, payload) == \
        scapy_gre(csum, key, seq, proto, k, sq, payload)


def test_fill_checksum_ignores_what_was_in_the_checksum_field():
    payload = b"\x45" + bytes(30)
    buf = bytearray(8 + len(payload))
    buf[8:] = payload
    gre.pack_into(buf, 0, gre.CSUM, 0x0800)
    buf[4:6] = b"\x12\x34"                  # stale bytes: gre_build_header() zeroes first
    gre.fill_checksum(buf, 0, len(buf))
    assert bytes(buf) == scapy_gre(1, 0, 0, 0x0800, payload=payload)


def test_hex_vector_all_options():
    # RFC 2784/2890 layout: C K S flags, type, checksum + reserved1, key, sequence number
    want = bytes.fromhex("b000 0800 02ce 0000 0000 002a 0000 0007 4500")
    assert ours(1, 1, 1, 0x0800, 42, 7, b"\x45\x00") == want
    assert scapy_gre(1, 1, 1, 0x0800, 42, 7, b"\x45\x00") == want


# ---- parsing ---------------------------------------------------------------------------

@settings(max_examples=300)
@given(st.sampled_from(OPTION_SETS), st.integers(0, 0xFFFF), u32, u32,
       st.binary(max_size=64), st.binary(max_size=8), st.binary(max_size=8))
def test_parse_scapy_built_headers(opts, proto, k, sq, payload, before, after):
    csum, key, seq = opts
    if proto == gre.ETH_P_WCCP and opts == (0, 0, 0):
        proto = 0x0800                       # WCCP is decoded: see its own test
    wire = scapy_gre(csum, key, seq, proto, k, sq, payload)
    v = before + wire + after
    got = gre.parse(v, len(before), len(before) + len(wire))
    assert got == (flags_of(csum, key, seq), proto, k if key else None, sq if seq else None,
                   4 + 4 * (csum + key + seq))


@pytest.mark.parametrize("version", range(1, 8))
def test_parse_refuses_versions_other_than_0(version):
    # version 1 is PPTP's enhanced GRE (RFC 2637): not a GRE tunnel's packet
    wire = bytes(GRE(version=version, proto=0x0800) / Raw(b"\x45" + bytes(19)))
    assert gre.parse(wire, 0, len(wire)) is Drop.GRE_FLAGS


def test_parse_refuses_the_routing_bit():
    wire = bytes(GRE(routing_present=1, proto=0x0800)) + bytes(8)
    assert wire[0] == 0x40
    assert gre.parse(wire, 0, len(wire)) is Drop.GRE_FLAGS


@pytest.mark.parametrize("bits", [0x0800, 0x0700, 0x0078, 0x0FF8])
def test_parse_ignores_the_other_reserved_bits(bits):
    # strict source route, recursion control and the rest of Reserved0: gre_parse_header()
    # looks only at version and routing
    wire = bytes(GRE(key_present=1, key=9, proto=0x0800))
    wire = bytes([wire[0] | bits >> 8, wire[1] | bits & 0xFF]) + wire[2:]
    assert gre.parse(wire, 0, len(wire)) == (0x2000 | bits, 0x0800, 9, None, 8)


@pytest.mark.parametrize("csum,key,seq", OPTION_SETS)
def test_parse_refuses_a_header_cut_short(csum, key, seq):
    wire = scapy_gre(csum, key, seq, 0x0800, 1, 2)
    for cut in range(len(wire)):
        assert gre.parse(wire, 0, cut) is Drop.MALFORMED
        assert gre.parse(wire + b"\x45" * 20, 0, cut) is Drop.MALFORMED  # end, not len(v)
    assert gre.parse(wire, 0, len(wire)) == (flags_of(csum, key, seq), 0x0800,
                                             1 if key else None, 2 if seq else None,
                                             len(wire))


def test_parse_does_not_verify_the_checksum():
    wire = bytearray(scapy_gre(1, 0, 0, 0x0800, payload=b"\x45" * 21))
    wire[4] ^= 0xFF
    assert gre.parse(wire, 0, len(wire)) == (0x8000, 0x0800, None, None, 8)
    assert not gre.checksum_ok(wire, 0, len(wire))


def test_key_0_is_a_key():
    wire = scapy_gre(0, 1, 0, 0x0800, 0)
    assert gre.parse(wire, 0, len(wire))[2] == 0
    assert gre.parse(scapy_gre(0, 0, 0, 0x0800), 0, 4)[2] is None


# ---- the checksum ----------------------------------------------------------------------

@settings(max_examples=300)
@given(st.sampled_from([o for o in OPTION_SETS if o[0]]), u32, u32,
       st.binary(max_size=100), st.data())
def test_checksum_ok_verifies_scapy_checksums_and_catches_every_bit_flip(opts, k, sq,
                                                                          payload, data):
    csum, key, seq = opts
    wire = bytearray(scapy_gre(csum, key, seq, 0x0800, k, sq, payload))
    assert gre.checksum_ok(wire, 0, len(wire))
    # one flipped bit changes the one's complement sum by ±2^i: always caught
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 0x80 >> (bit % 8)
    assert not gre.checksum_ok(wire, 0, len(wire))


def test_checksum_covers_exactly_off_to_end():
    wire = scapy_gre(1, 0, 0, 0x0800, payload=b"\x45\x01\x02")
    v = b"\xff\xff" + wire + b"\x07"
    assert gre.checksum_ok(v, 2, 2 + len(wire))
    assert not gre.checksum_ok(v, 2, len(v))


# ---- WCCP: decoded as IPv4 by gre_parse_header() ------------------------------------------

def test_wccp_v1_is_ipv4_right_after_the_base_header():
    wire = bytes.fromhex("0000 883e") + b"\x45" + bytes(19)
    assert gre.parse(wire, 0, len(wire)) == (0, 0x0800, None, None, 4)


def test_wccp_v2_skips_the_redirect_header():
    # a WCCPv2 redirect header (draft-wilson-wrec-wccp-v2 §4.12) does not start with 0x4_
    wire = bytes.fromhex("0000 883e 0000 0000") + b"\x45" + bytes(19)
    assert gre.parse(wire, 0, len(wire)) == (0, 0x0800, None, None, 8)


def test_wccp_needs_the_byte_it_looks_at_and_the_redirect_header():
    assert gre.parse(bytes.fromhex("0000 883e"), 0, 4) is Drop.MALFORMED
    assert gre.parse(bytes.fromhex("0000 883e 00 00"), 0, 6) is Drop.MALFORMED


def test_wccp_only_without_flags():
    wire = bytes.fromhex("2000 883e 0000 0001 0000 0000")
    assert gre.parse(wire, 0, len(wire)) == (0x2000, 0x883E, 1, None, 8)
