"""GRE header (RFC 2784, with key and sequence number of RFC 2890)."""
from __future__ import annotations

import struct

from .checksum import inet_checksum
from .drop import Drop

CSUM, ROUTING, KEY, SEQ = 0x8000, 0x4000, 0x2000, 0x1000
VERSION_MASK = 0x0007
# bits the kernel refuses (gre_parse_header(): version and routing)
REJECT = ROUTING | VERSION_MASK
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
BASE_HLEN = 4


def header_len(flags: int) -> int:
    return BASE_HLEN + 4 * bool(flags & CSUM) + 4 * bool(flags & KEY) + 4 * bool(flags & SEQ)


def pack_into(buf, off: int, flags: int, proto: int, key: int = 0, seq: int = 0) -> int:
    """Write the header at buf[off:]; the checksum field, if any, is left zero (see
    fill_checksum()). Returns the header length."""
    struct.pack_into("!HH", buf, off, flags, proto)
    pos = off + BASE_HLEN
    if flags & CSUM:
        struct.pack_into("!I", buf, pos, 0)
        pos += 4
    if flags & KEY:
        struct.pack_into("!I", buf, pos, key)
        pos += 4
    if flags & SEQ:
        struct.pack_into("!I", buf, pos, seq)
        pos += 4
    return pos - off


def fill_checksum(buf, off: int, end: int) -> None:
    """RFC 2784 §2.5: the checksum covers the GRE header and the payload."""
    c = inet_checksum(memoryview(buf)[off:end])
    buf[off + 4], buf[off + 5] = c >> 8, c & 0xFF


def parse(v, off: int, end: int) -> tuple[int, int, int | None, int | None, int] | Drop:
    """(flags, proto, key, seq, header length) of the header at v[off:end], or why not.

    Like gre_parse_header(): version or routing bits set drop the packet; a checksum that
    does not verify over header and payload drops it (as a CRC error)."""
    if end - off < BASE_HLEN:
        return Drop.MALFORMED
    flags = (v[off] << 8) | v[off + 1]
    if flags & REJECT:
        return Drop.GRE_FLAGS
    hlen = header_len(flags)
    if end - off < hlen:
        return Drop.MALFORMED
    proto = (v[off + 2] << 8) | v[off + 3]
    pos = off + BASE_HLEN
    if flags & CSUM:
        if inet_checksum(v[off:end]) != 0:
            return Drop.BAD_CSUM
        pos += 4
    key = seq = None
    if flags & KEY:
        key = int.from_bytes(v[pos:pos + 4], "big")
        pos += 4
    if flags & SEQ:
        seq = int.from_bytes(v[pos:pos + 4], "big")
    return flags, proto, key, seq, hlen
