"""The Internet checksum (RFC 1071)."""


def inet_checksum(data) -> int:
    """One's complement of the one's complement sum of the 16-bit big-endian words of data.

    Summing 16-bit words modulo 0xffff equals the whole big-endian number modulo 0xffff
    (2**16 ≡ 1), so one bigint modulo does the work in C. Returns the value to store
    big-endian; checksumming data that already holds its checksum gives 0.
    """
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    s = int.from_bytes(b, "big") % 0xFFFF
    if s == 0 and any(b):
        s = 0xFFFF  # a non-zero sum that folds to "negative zero"
    return ~s & 0xFFFF
