"""The Internet checksum (RFC 1071), against hand vectors, a word-by-word reference and scapy."""
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.utils import checksum as scapy_checksum

from tunl.wire.checksum import inet_checksum


def reference_checksum(data: bytes) -> int:
    """RFC 1071 §4.1 literally: add 16-bit words with end-around carry, then complement."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def test_rfc1071_example():
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its complement
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_wikipedia_ipv4_header_vector():
    # the worked example of the IPv4 header checksum: 4500 0073 0000 4000 4011 ____ c0a8 0001 c0a8 00c7
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert inet_checksum(hdr) == 0xB861
    assert inet_checksum(hdr[:10] + b"\xb8\x61" + hdr[12:]) == 0


def test_all_zero_and_empty_data_checksum_to_ffff():
    assert inet_checksum(b"") == 0xFFFF
    assert inet_checksum(b"\0" * 20) == 0xFFFF


def test_negative_zero_sum_gives_zero_checksum():
    # the words sum to ffff ("negative zero"): the checksum is 0, not ffff
    assert inet_checksum(b"\xff\xff") == 0
    assert inet_checksum(b"\x12\x34\xed\xcb") == 0


def test_odd_length_is_padded_with_a_zero_byte_at_the_end():
    assert inet_checksum(b"\x01") == ~0x0100 & 0xFFFF
    assert inet_checksum(b"\xab\xcd\xef") == inet_checksum(b"\xab\xcd\xef\x00")


def test_accepts_bytearray_and_memoryview():
    data = bytes(range(37))
    want = inet_checksum(data)
    assert inet_checksum(bytearray(data)) == want
    assert inet_checksum(memoryview(data)) == want
    assert inet_checksum(memoryview(b"xx" + data)[2:]) == want


@settings(max_examples=1000)
@given(st.binary(max_size=1600))
def test_equals_word_by_word_reference(data):
    assert inet_checksum(data) == reference_checksum(data)


@settings(max_examples=500)
@given(st.binary(max_size=1600))
def test_equals_scapy(data):
    assert inet_checksum(data) == scapy_checksum(data)


@settings(max_examples=1000)
@given(st.binary(max_size=1500), st.data())
def test_data_with_its_checksum_inserted_checksums_to_zero(data, draw):
    # a zeroed 16-bit field at an even offset, as in every header that carries one
    off = draw.draw(st.integers(0, len(data) // 2)) * 2
    buf = bytearray(data[:off] + b"\0\0" + data[off:])
    c = inet_checksum(buf)
    buf[off:off + 2] = c.to_bytes(2, "big")
    assert inet_checksum(buf) == 0


@settings(max_examples=300)
@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0), st.data())
def test_order_of_words_does_not_matter(data, draw):
    words = [data[i:i + 2] for i in range(0, len(data), 2)]
    shuffled = draw.draw(st.permutations(words))
    assert inet_checksum(b"".join(shuffled)) == inet_checksum(data)
