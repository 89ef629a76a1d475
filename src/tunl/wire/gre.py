"""GRE header (RFC 2784, with key and sequence number of RFC 2890).

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |C|R|K|S| Reserved0       | Ver |         Protocol Type         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      Checksum (optional)      |       Reserved1 (Optional)    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         Key (optional)                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 Sequence Number (Optional)                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

R is RFC 1701's routing bit (RFC 2784 made it part of Reserved0); the kernel refuses it.
"""
from __future__ import annotations

import struct

from .checksum import inet_checksum
from .drop import Drop

CSUM, ROUTING, KEY, SEQ = 0x8000, 0x4000, 0x2000, 0x1000
VERSION_MASK = 0x0007
# bits the kernel refuses (gre_parse_header(): GRE_VERSION | GRE_ROUTING); it ignores the
# other Reserved0 bits (RFC 1701's strict source route and recursion control, ...)
REJECT = ROUTING | VERSION_MASK
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
ETH_P_WCCP = 0x883E                     # Cisco WCCP redirection, decoded as IPv4
ETH_P_ERSPAN, ETH_P_ERSPAN2 = 0x88BE, 0x22EB
BASE_HLEN = 4


def header_len(flags: int) -> int:
    """gre_calc_hlen(): 4, plus 4 for each of checksum, key and sequence number."""
    return BASE_HLEN + 4 * bool(flags & CSUM) + 4 * bool(flags & KEY) + 4 * bool(flags & SEQ)


def pack_into(buf, off: int, flags: int, proto: int, key: int = 0, seq: int = 0) -> int:
    """Write the header at buf[off:]; the checksum field, if any, is left zero (see
    fill_checksum()). Returns the header length."""
    struct.pack_into("!HH", buf, off, flags, proto)
    pos = off + BASE_HLEN
    if flags & CSUM:
        struct.pack_into("!I", buf, pos, 0)     # checksum and Reserved1
        pos += 4
    if flags & KEY:
        struct.pack_into("!I", buf, pos, key)
        pos += 4
    if flags & SEQ:
        struct.pack_into("!I", buf, pos, seq)
        pos += 4
    return pos - off


def fill_checksum(buf, off: int, end: int) -> None:
    """RFC 2784 §2.5: the checksum covers the GRE header and the payload, buf[off:end], with
    the checksum field zero while it is computed (gre_build_header() zeroes it first)."""
    buf[off + 4] = buf[off + 5] = 0
    c = inet_checksum(memoryview(buf)[off:end])
    buf[off + 4], buf[off + 5] = c >> 8, c & 0xFF


def checksum_ok(v, off: int, end: int) -> bool:
    """Does the checksum of the header at v[off:] verify over v[off:end]? (What
    skb_checksum_simple_validate() finds in gre_parse_header(); only meaningful with C set.)"""
    return inet_checksum(memoryview(v)[off:end]) == 0


def parse(v, off: int, end: int) -> tuple[int, int, int | None, int | None, int] | Drop:
    """(flags, proto, key, seq, header length) of the header at v[off:end], or why not.

    Like gre_parse_header(): version or routing bits set drop the packet (GRE_FLAGS); a header
    longer than what is there drops it (MALFORMED); key and seq are None when absent. The
    checksum is not verified here (see checksum_ok()): the caller decides where a bad one is
    counted. A WCCP packet (no flags, type 0x883E) is taken as IPv4, and its 4-byte WCCPv2
    redirect header, there unless the payload starts with an IPv4 version nibble, is counted
    in the header length, as gre_parse_header() does.
    """
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
        pos += 4
    key = seq = None
    if flags & KEY:
        key = (v[pos] << 24) | (v[pos + 1] << 16) | (v[pos + 2] << 8) | v[pos + 3]
        pos += 4
    if flags & SEQ:
        seq = (v[pos] << 24) | (v[pos + 1] << 16) | (v[pos + 2] << 8) | v[pos + 3]
    if flags == 0 and proto == ETH_P_WCCP:
        if end - off <= hlen:               # skb_header_pointer() finds no byte: -EINVAL
            return Drop.MALFORMED
        proto = ETH_P_IP
        if v[off + hlen] & 0xF0 != 0x40:
            hlen += 4
            if end - off < hlen:            # __iptunnel_pull_header() cannot pull it
                return Drop.MALFORMED
    return flags, proto, key, seq, hlen
