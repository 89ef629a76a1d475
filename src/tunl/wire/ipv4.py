"""IPv4 header (RFC 791): named offsets for the hot path, a dataclass for everything else."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from .checksum import inet_checksum
from .drop import Drop

IPV4_HLEN = 20
# offsets into the header
OFF_VER_IHL, OFF_TOS, OFF_TOTLEN, OFF_ID, OFF_FRAG, OFF_TTL, OFF_PROTO, OFF_CSUM = (
    0, 1, 2, 4, 6, 8, 9, 10)
OFF_SRC, OFF_DST = 12, 16
DF = 0x4000
MF = 0x2000
OFFSET_MASK = 0x1FFF

PROTO_ICMP, PROTO_IPIP, PROTO_TCP, PROTO_UDP, PROTO_IPV6, PROTO_GRE = 1, 4, 6, 17, 41, 47

HDR = struct.Struct("!BBHHHBBH4s4s")


def validate(v) -> Drop | None:
    """The checks of ip_rcv_core(): version, header length, checksum, total length.

    Returns None for a packet the kernel would accept, else the reason to drop it.
    A packet may be followed by padding: total length may be less than len(v).
    """
    n = len(v)
    if n < IPV4_HLEN or v[0] >> 4 != 4:
        return Drop.MALFORMED
    ihl = (v[0] & 0x0F) * 4
    if ihl < IPV4_HLEN or ihl > n:
        return Drop.BAD_HLEN
    if inet_checksum(v[:ihl]) != 0:
        return Drop.BAD_CHECKSUM
    tot = (v[2] << 8) | v[3]
    if tot < ihl or tot > n:
        return Drop.BAD_LENGTH
    return None


def pack_header_into(buf, off: int, *, tos: int, total_len: int, ident: int, frag: int,
                     ttl: int, proto: int, src: bytes, dst: bytes) -> None:
    """Write a 20-byte header with its checksum at buf[off:off+20]."""
    HDR.pack_into(buf, off, 0x45, tos, total_len, ident, frag, ttl, proto, 0, src, dst)
    fix_checksum(buf, off)


def fix_checksum(buf, off: int) -> None:
    """Recompute the header checksum of the IPv4 header at buf[off:] in place."""
    hlen = (buf[off] & 0x0F) * 4
    buf[off + OFF_CSUM] = buf[off + OFF_CSUM + 1] = 0
    c = inet_checksum(memoryview(buf)[off:off + hlen])
    buf[off + OFF_CSUM], buf[off + OFF_CSUM + 1] = c >> 8, c & 0xFF


@dataclass(frozen=True)
class IPv4Header:
    src: IPv4Address
    dst: IPv4Address
    proto: int
    ttl: int = 64
    tos: int = 0
    ident: int = 0
    flags_frag: int = DF
    total_len: int = IPV4_HLEN
    ihl: int = 5
    checksum: int = 0
    options: bytes = b""

    @property
    def df(self) -> bool:
        return bool(self.flags_frag & DF)

    @classmethod
    def parse(cls, data) -> "IPv4Header":
        """Decode a header; raises ValueError naming the rule it breaks."""
        why = validate(data)
        if why is not None:
            raise ValueError(f"not a valid IPv4 packet: {why.value}")
        ver_ihl, tos, tot, ident, frag, ttl, proto, csum, src, dst = HDR.unpack_from(data)
        ihl = ver_ihl & 0x0F
        return cls(IPv4Address(src), IPv4Address(dst), proto, ttl, tos, ident, frag, tot, ihl,
                   csum, bytes(data[IPV4_HLEN:ihl * 4]))

    def build(self, payload: bytes = b"") -> bytes:
        """Header (with options and a fresh checksum) followed by payload."""
        if len(self.options) % 4:
            raise ValueError("IPv4 options are padded to a multiple of 4 bytes")
        hlen = IPV4_HLEN + len(self.options)
        buf = bytearray(hlen + len(payload))
        HDR.pack_into(buf, 0, 0x40 | (hlen // 4), self.tos, len(buf), self.ident,
                      self.flags_frag, self.ttl, self.proto, 0, self.src.packed, self.dst.packed)
        buf[IPV4_HLEN:hlen] = self.options
        buf[OFF_CSUM:OFF_CSUM + 2] = inet_checksum(buf[:hlen]).to_bytes(2, "big")
        buf[hlen:] = payload
        return bytes(buf)


def build(src, dst, proto: int, payload: bytes, **kw) -> bytes:
    """A whole IPv4 packet; src and dst as strings or IPv4Address."""
    return IPv4Header(IPv4Address(src), IPv4Address(dst), proto, **kw).build(payload)


# ---- fragmentation (slow path) -------------------------------------------------------------

IPOPT_END, IPOPT_NOOP, IPOPT_COPY = 0, 1, 0x80
IP_MAX_LEN = 0xFFFF


def fragment(packet, mtu: int) -> list[bytes] | Drop:
    """Split one IPv4 packet into fragments of at most mtu bytes, like ip_do_fragment()'s slow
    path (RFC 791 §3.2, "An Example Fragmentation Procedure").

    Total length is authoritative: bytes after it are padding and are not sent. A packet that
    fits comes back whole (without its padding), DF set or not. One that does not fit is dropped
    as TOO_BIG if it has DF (like ip_fragment(): the caller sends ICMP fragmentation needed) or
    if mtu cannot carry its header and 8 bytes of data. A packet that fails validate() returns
    that reason.
    """
    why = validate(packet)
    if why is not None:
        return why
    v = memoryview(packet)
    hlen = (v[0] & 0x0F) * 4
    total = (v[OFF_TOTLEN] << 8) | v[OFF_TOTLEN + 1]
    if total <= mtu:
        return [bytes(v[:total])]
    frag_off = (v[OFF_FRAG] << 8) | v[OFF_FRAG + 1]
    room = mtu - hlen                        # data bytes a fragment can carry
    if frag_off & DF or room < 8:
        return Drop.TOO_BIG
    offset = (frag_off & OFFSET_MASK) * 8    # in bytes; nonzero when fragmenting a fragment
    if offset + total - hlen > IP_MAX_LEN:
        # The datagram it belongs to would end past 65535 bytes: no receiver can reassemble it
        # (ip_frag_reasm() drops it as oversized) and its later offsets would not fit 13 bits.
        return Drop.BAD_LENGTH
    more = frag_off & MF                     # a fragment that was not the last keeps MF on all

    first_header = bytes(v[:hlen])
    # Options are fixed up once, and only when the packet starts the datagram: a later fragment
    # already carries only copied options (the "dirty, but effective trick" of ip_frag_ipcb()).
    later_header = _options_fragment(first_header) if offset == 0 else first_header

    out = []
    ptr, left = hlen, total - hlen
    while left > 0:
        n = min(left, room)
        if n < left:
            n &= ~7                          # all but the last carry a multiple of 8 bytes
        left -= n
        buf = bytearray(hlen + n)
        buf[:hlen] = later_header if out else first_header
        buf[hlen:] = v[ptr:ptr + n]
        # like ip_frag_next(): the new field holds the offset and MF only; DF is known clear
        # here and the reserved bit is not copied
        flags = MF if left or more else 0
        struct.pack_into("!H", buf, OFF_TOTLEN, hlen + n)
        struct.pack_into("!H", buf, OFF_FRAG, flags | (offset >> 3))
        fix_checksum(buf, 0)
        out.append(bytes(buf))
        ptr += n
        offset += n
    return out


def _options_fragment(header: bytes) -> bytes:
    """The header for every fragment after the first: like Linux ip_options_fragment(), each
    option without the copy bit (RFC 791 §3.1: copied flag 0x80) is overwritten with IPOPT_NOOP
    bytes, so the header keeps its length and all fragments but the first share one header.
    (RFC 791 lets a sender drop such options and shorten the header; neither Linux nor tunl does.)
    The walk stops, as Linux's does, at End of Option List or at an option whose length is bad.
    """
    h = bytearray(header)
    i, end = IPV4_HLEN, len(h)
    while i < end:
        kind = h[i]
        if kind == IPOPT_END:
            break
        if kind == IPOPT_NOOP:
            i += 1
            continue
        if i + 1 >= end:
            break
        n = h[i + 1]
        if n < 2 or n > end - i:
            break
        if not kind & IPOPT_COPY:
            h[i:i + n] = bytes([IPOPT_NOOP]) * n
        i += n
    return bytes(h)
