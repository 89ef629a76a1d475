"""IPv6 header (RFC 8200): named offsets for the hot path, a dataclass for everything else."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv6Address

from .checksum import inet_checksum
from .drop import Drop

IPV6_HLEN = 40
OFF_PLEN, OFF_NH, OFF_HLIM, OFF_SRC, OFF_DST = 4, 6, 7, 8, 24
MIN_MTU = 1280                  # RFC 8200 §5
NH_ICMPV6 = 58

HDR = struct.Struct("!IHBB16s16s")


def validate(v) -> Drop | None:
    """The checks of ipv6_rcv(): version and a payload length that fits (0 means a jumbogram,
    which a tunnel never carries)."""
    n = len(v)
    if n < IPV6_HLEN or v[0] >> 4 != 6:
        return Drop.MALFORMED
    plen = (v[4] << 8) | v[5]
    if plen + IPV6_HLEN > n:
        return Drop.BAD_LENGTH
    return None


def traffic_class(v, off: int = 0) -> int:
    return ((v[off] & 0x0F) << 4) | (v[off + 1] >> 4)


def set_traffic_class(buf, off: int, tc: int) -> None:
    buf[off] = 0x60 | (tc >> 4)
    buf[off + 1] = ((tc & 0x0F) << 4) | (buf[off + 1] & 0x0F)


def pseudo_checksum(src: bytes, dst: bytes, nh: int, payload) -> int:
    """The upper-layer checksum over the IPv6 pseudo-header (RFC 8200 §8.1)."""
    pseudo = src + dst + struct.pack("!I3xB", len(payload), nh)
    return inet_checksum(pseudo + bytes(payload))


@dataclass(frozen=True)
class IPv6Header:
    src: IPv6Address
    dst: IPv6Address
    nh: int
    hlim: int = 64
    tc: int = 0
    flow: int = 0
    plen: int = 0

    @classmethod
    def parse(cls, data) -> "IPv6Header":
        why = validate(data)
        if why is not None:
            raise ValueError(f"not a valid IPv6 packet: {why.value}")
        vtf, plen, nh, hlim, src, dst = HDR.unpack_from(data)
        return cls(IPv6Address(src), IPv6Address(dst), nh, hlim, (vtf >> 20) & 0xFF,
                   vtf & 0xFFFFF, plen)

    def build(self, payload: bytes = b"") -> bytes:
        vtf = (6 << 28) | (self.tc << 20) | self.flow
        return HDR.pack(vtf, len(payload), self.nh, self.hlim, self.src.packed,
                        self.dst.packed) + bytes(payload)


def build(src, dst, nh: int, payload: bytes, **kw) -> bytes:
    return IPv6Header(IPv6Address(src), IPv6Address(dst), nh, **kw).build(payload)
