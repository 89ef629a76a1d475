"""IPv4 fragmentation (ipv4.fragment, the slow path of Linux ip_do_fragment()): properties,
hand-made vectors, and scapy's fragment()/defragment() as an independent implementation.

Scapy dissects with stop_dissection_after=IP: the payload stays Raw, so scapy does not rebuild a
UDP or TCP header it thinks it knows (a UDP length field taken from random bytes would make its
rebuilt packet shorter than ours).
"""
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet import defragment as scapy_defragment
from scapy.layers.inet import fragment as scapy_fragment

from tunl.wire import ipv4
from tunl.wire.drop import Drop
from tunl.wire.ipv4 import DF, MF, OFFSET_MASK, IPv4Header

# ---- packets to fragment -------------------------------------------------------------------

addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
NOOP = b"\x01"
RR, LSRR, SSRR = 0x07, 0x83, 0x89          # record route (not copied), source routes (copied)
EXP, EXP_COPIED = 0x1E, 0x9E               # RFC 4727 experimental options, without/with copy


def option(kind: int, data: bytes) -> bytes:
    return bytes([kind, 2 + len(data)]) + data


def route(kind: int):
    """A record or source route: pointer 4, then 0 to 2 addresses."""
    return st.integers(0, 2).flatmap(lambda k: st.binary(min_size=4 * k, max_size=4 * k)).map(
        lambda addrs: option(kind, b"\x04" + addrs))


one_option = st.one_of(
    st.just(NOOP), route(RR), route(LSRR), route(SSRR),
    st.builds(option, st.sampled_from([EXP, EXP_COPIED]), st.binary(max_size=4)))


def padded(opts: list[bytes]) -> bytes:
    """The options area: the options, then End of Option List and zeros to a multiple of 4."""
    b = b"".join(opts)
    return b + bytes(-len(b) % 4)


option_lists = st.lists(one_option, max_size=5).filter(lambda opts: len(padded(opts)) <= 40)


def later_options(opts: list[bytes]) -> bytes:
    """What fragments after the first carry, worked out from the list the packet was built
    from: copied options and NOOPs as they were, every other option's bytes as NOOPs."""
    return padded([o if o == NOOP or o[0] & 0x80 else NOOP * len(o) for o in opts])


@st.composite
def packets(draw, *, whole=False, max_payload=9000):
    """(packet, header, options list, trailing padding length). Unless whole, the packet may
    itself be a fragment (MF, or an offset that keeps the datagram within 65535 bytes)."""
    # st.binary() keeps to a few dozen bytes and Hypothesis's buffer could not hold 9000 drawn
    # bytes anyway: the bytes come from a seeded generator, the size half the time from
    # Hypothesis (small sizes and edges), half the time uniformly from the generator
    rng = draw(st.randoms(use_true_random=False))
    size = draw(st.one_of(st.integers(0, max_payload), st.none()))
    payload = rng.randbytes(rng.randint(0, max_payload) if size is None else size)
    opts = draw(option_lists)
    flags = 0 if whole else draw(st.sampled_from([0, MF]))
    room = (0xFFFF - 20 - 40 - len(payload)) // 8
    offset = 0 if whole else draw(st.sampled_from([0, 0, draw(st.integers(0, room))]))
    h = IPv4Header(draw(addresses), draw(addresses), draw(st.integers(0, 255)),
                   ttl=draw(st.integers(0, 255)), tos=draw(st.integers(0, 255)),
                   ident=draw(st.integers(0, 0xFFFF)), flags_frag=flags | offset,
                   options=padded(opts))
    trailer = draw(st.integers(0, 20))
    pkt = h.build(payload)
    return pkt + bytes(trailer), IPv4Header.parse(pkt), opts, trailer


mtus = st.integers(68, 1500)

# ---- reading fragments ---------------------------------------------------------------------


def hlen(f) -> int:
    return (f[0] & 0x0F) * 4


def total(f) -> int:
    return int.from_bytes(f[2:4], "big")


def frag_field(f) -> int:
    return int.from_bytes(f[6:8], "big")


def offset(f) -> int:
    return (frag_field(f) & OFFSET_MASK) * 8


def data(f) -> bytes:
    return bytes(f[hlen(f):total(f)])


def reassemble(frags) -> tuple[int, bytes, bool]:
    """A tiny ip_frag_queue(): (first offset, data, MF of the last) of fragments in any order
    that must join without gap or overlap, all but the last with MF set."""
    parts = sorted(frags, key=offset)
    start = pos = offset(parts[0])
    out = b""
    for f in parts:
        assert offset(f) == pos, "gap or overlap"
        out += data(f)
        pos += len(data(f))
    assert all(frag_field(f) & MF for f in parts[:-1])
    return start, out, bool(frag_field(parts[-1]) & MF)


# ---- properties ----------------------------------------------------------------------------

@settings(max_examples=300)
@given(packets(), mtus)
def test_fragments_fit_verify_and_reassemble_to_the_original(pkt_h, mtu):
    pkt, h, opts, _ = pkt_h
    frags = ipv4.fragment(pkt, mtu)
    n = h.total_len - h.ihl * 4
    if h.total_len <= mtu:
        assert frags == [pkt[:h.total_len]]
        return
    assert isinstance(frags, list) and len(frags) >= 2
    for i, f in enumerate(frags):
        assert isinstance(f, bytes)
        assert len(f) == total(f) <= mtu
        assert ipv4.validate(f) is None                      # checksum and lengths verify
        assert len(data(f)) > 0
        if i < len(frags) - 1:
            assert len(data(f)) % 8 == 0
        assert frag_field(f) & ~(MF | OFFSET_MASK) == 0      # no DF, no reserved bit
        # every field but total length, fragment field and checksum is the original's
        assert f[:2] == pkt[:2] and f[4:6] == pkt[4:6] and f[8:10] == pkt[8:10]
        assert f[12:20] == pkt[12:20]
        if i == 0 or h.flags_frag & OFFSET_MASK:             # Linux fixes options at offset 0
            assert f[20:hlen(f)] == h.options
        else:
            assert f[20:hlen(f)] == later_options(opts)
    start, payload, more = reassemble(frags)
    assert start == (h.flags_frag & OFFSET_MASK) * 8
    assert payload == pkt[h.ihl * 4:h.total_len] and len(payload) == n
    assert more == bool(h.flags_frag & MF)


@settings(max_examples=150)
@given(packets(), mtus, st.integers(68, 1500))
def test_fragmenting_the_fragments_again_still_reassembles(pkt_h, mtu, mtu2):
    pkt, h, _, _ = pkt_h
    frags = ipv4.fragment(pkt, mtu)
    again = [g for f in frags for g in ipv4.fragment(f, min(mtu, mtu2))]
    assert all(len(g) <= min(mtu, mtu2) for g in again)
    if len(again) == 1:
        assert again == [pkt[:h.total_len]]
        return
    start, payload, more = reassemble(again)
    assert (start, payload, more) == (
        (h.flags_frag & OFFSET_MASK) * 8, pkt[h.ihl * 4:h.total_len], bool(h.flags_frag & MF))


# ---- against scapy -------------------------------------------------------------------------

def dissect(f) -> IP:
    return IP(f, stop_dissection_after=IP)


@settings(max_examples=100)
@given(packets(max_payload=4000), mtus)
def test_offsets_flags_and_data_agree_with_scapy_fragment(pkt_h, mtu):
    pkt, h, opts, trailer = pkt_h
    ours = ipv4.fragment(pkt, mtu)
    if h.total_len <= mtu:
        assert ours == [pkt[:h.total_len]]
        return
    # scapy's fragsize is data bytes per fragment, ours the whole fragment: mtu - header
    theirs = scapy_fragment(dissect(pkt[:h.total_len]), fragsize=mtu - h.ihl * 4)
    assert len(ours) == len(theirs)
    for f, t in zip(ours, theirs):
        t = dissect(bytes(t))
        assert offset(f) == t.frag * 8
        assert bool(frag_field(f) & MF) == bool(t.flags.MF)
        assert data(f) == bytes(t.payload)
    # scapy copies every option into every fragment, so whole fragments agree byte for byte
    # where there is nothing to strip: the first fragment, and every one without options
    # (scapy keeps the original flags: only DF is ever set there, and then ours drops)
    assert ours[0] == bytes(theirs[0])
    if not h.options:
        assert ours == [bytes(t) for t in theirs]


@settings(max_examples=100)
@given(packets(max_payload=4000), mtus)
def test_scapy_reads_our_fragments_fields_and_checksums(pkt_h, mtu):
    pkt, _, _, _ = pkt_h
    for f in ipv4.fragment(pkt, mtu):
        p = dissect(f)
        assert p.frag * 8 == offset(f)
        assert int(p.flags) == frag_field(f) >> 13
        assert p.len == len(f)
        rebuilt = p.copy()
        del rebuilt.chksum
        assert dissect(bytes(rebuilt)).chksum == p.chksum


@settings(max_examples=100)
@given(packets(whole=True, max_payload=4000), mtus)
def test_scapy_defragment_gives_back_the_original(pkt_h, mtu):
    pkt, h, _, _ = pkt_h
    frags = ipv4.fragment(pkt, mtu)
    joined = scapy_defragment([dissect(f) for f in frags])
    assert len(joined) == 1
    assert bytes(joined[0]) == pkt[:h.total_len]


# ---- vectors and edge cases ------------------------------------------------------------------

SRC, DST = "192.0.2.1", "198.51.100.2"


def udp_sized(total_len: int, **kw) -> bytes:
    return ipv4.build(SRC, DST, ipv4.PROTO_UDP, bytes(i & 0xFF for i in range(total_len - 20)),
                      **kw)


def test_the_textbook_4000_byte_datagram_over_1500():
    pkt = udp_sized(4000, ident=0xBEEF, flags_frag=0)
    frags = ipv4.fragment(pkt, 1500)
    assert [len(f) for f in frags] == [1500, 1500, 1040]
    assert [frag_field(f) for f in frags] == [MF | 0, MF | 185, 370]
    assert all(f[4:6] == b"\xbe\xef" for f in frags)
    assert b"".join(data(f) for f in frags) == pkt[20:]


def test_the_last_fragment_is_not_rounded_down():
    # like ip_frag_next(): only a fragment that is not the last is cut to a multiple of 8
    pkt = udp_sized(20 + 1472 + 1479, flags_frag=0)
    frags = ipv4.fragment(pkt, 1499)
    assert [len(data(f)) for f in frags] == [1472, 1479]


def test_df_does_not_fragment():
    pkt = udp_sized(1600, flags_frag=DF)
    assert ipv4.fragment(pkt, 1500) is Drop.TOO_BIG
    assert ipv4.fragment(pkt, 1600) == [pkt]        # DF is only in the way of a packet too big


def test_a_packet_that_fits_comes_back_unchanged_from_any_buffer():
    pkt = udp_sized(1500, flags_frag=0)
    for buf in (pkt, bytearray(pkt), memoryview(pkt)):
        got = ipv4.fragment(buf, 1500)
        assert got == [pkt] and type(got[0]) is bytes


def test_trailing_padding_is_neither_sent_nor_fragmented():
    pkt = udp_sized(100, flags_frag=0)
    assert ipv4.fragment(pkt + bytes(14), 100) == [pkt]
    frags = ipv4.fragment(pkt + b"\xff" * 14, 68)
    assert b"".join(data(f) for f in frags) == pkt[20:]


def test_an_mtu_that_cannot_carry_the_header_and_8_bytes():
    pkt = udp_sized(100, flags_frag=0)
    assert ipv4.fragment(pkt, 27) is Drop.TOO_BIG
    assert [len(data(f)) for f in ipv4.fragment(pkt, 28)] == [8] * 10
    big = ipv4.build(SRC, DST, 17, bytes(100), flags_frag=0, options=bytes(40))  # 60-byte header
    assert ipv4.fragment(big, 67) is Drop.TOO_BIG
    assert all(len(f) == 68 for f in ipv4.fragment(big, 68)[:-1])


def test_a_malformed_packet_returns_the_reason_of_validate():
    pkt = bytearray(udp_sized(2000, flags_frag=0))
    assert ipv4.fragment(b"", 1500) is Drop.MALFORMED
    assert ipv4.fragment(pkt[:1999], 1500) is Drop.BAD_LENGTH
    pkt[11] ^= 1
    assert ipv4.fragment(pkt, 1500) is Drop.BAD_CHECKSUM


def test_copied_options_go_to_every_fragment_others_only_to_the_first():
    lsrr = option(LSRR, b"\x04" + bytes([10, 0, 0, 1]))                 # copied
    rr = option(RR, b"\x04" + bytes(4))                                 # not copied
    exp = option(EXP_COPIED, b"\xaa\xbb")                               # made up, copied
    opts = lsrr + rr + exp + b"\x00\x00"                                # 7 + 7 + 4 + 2 = 20
    pkt = ipv4.build(SRC, DST, 17, bytes(range(200)), flags_frag=0, options=opts)
    frags = ipv4.fragment(pkt, 100)
    assert len(frags) == 4 and all(hlen(f) == 40 for f in frags)      # header length kept
    assert frags[0][20:40] == opts
    for f in frags[1:]:                                                 # ip_options_fragment()
        assert f[20:40] == lsrr + NOOP * 7 + exp + b"\x00\x00"
    assert b"".join(data(f) for f in frags) == bytes(range(200))


def test_the_option_walk_stops_like_linux_at_end_of_list_or_a_bad_length():
    after_end = option(RR, b"\x04" + bytes(4)) + b"\x00" + b"\x07\x03\x04" + b"\x00"
    bad_len = b"\x07\x01" + bytes(2)                                    # length 1 < 2
    for opts, later in [(after_end, NOOP * 7 + after_end[7:]), (bad_len, bad_len)]:
        pkt = ipv4.build(SRC, DST, 17, bytes(64), flags_frag=0, options=opts)
        frags = ipv4.fragment(pkt, 20 + len(opts) + 32)
        assert frags[0][20:20 + len(opts)] == opts
        assert all(f[20:20 + len(opts)] == later for f in frags[1:])


def test_fragmenting_a_fragment_keeps_offset_mf_and_the_options_it_has():
    rr = option(RR, b"\x04" + bytes(4)) + b"\x00"
    middle = ipv4.build(SRC, DST, 17, bytes(400), ident=7, flags_frag=MF | 100, options=rr)
    frags = ipv4.fragment(middle, 200)
    assert [frag_field(f) for f in frags] == [MF | 100, MF | 121, MF | 142]
    assert all(f[20:28] == rr for f in frags)          # not the first: options already fixed
    first = ipv4.build(SRC, DST, 17, bytes(400), ident=7, flags_frag=MF, options=rr)
    frags = ipv4.fragment(first, 200)
    assert [frag_field(f) for f in frags] == [MF | 0, MF | 21, MF | 42]
    assert frags[0][20:28] == rr and all(f[20:28] == NOOP * 7 + b"\x00" for f in frags[1:])


def test_the_reserved_bit_is_not_copied():
    pkt = udp_sized(200, flags_frag=0x8000)
    assert [frag_field(f) for f in ipv4.fragment(pkt, 100)] == [MF, MF | 10, 20]


def test_a_fragment_whose_datagram_would_pass_65535_bytes():
    late = ipv4.build(SRC, DST, 17, bytes(100), flags_frag=OFFSET_MASK)    # 65528 + 100
    assert ipv4.fragment(late, 68) is Drop.BAD_LENGTH
    assert ipv4.fragment(late, 1500) == [late]             # one that fits is not our business
