"""IPv4 in IPv4 (RFC 2003, IP protocol 4) with the semantics of the kernel's ipip.c.

Only IPv4 inner packets are carried (ipip_tunnel_xmit() drops anything else as a tx error).
The outer header is written in place in the headroom in front of the inner packet.
"""
from __future__ import annotations

from ..model import TunnelSpec
from ..wire.drop import Drop
from ..wire.ipv4 import IPV4_HLEN, PROTO_IPIP
from .outer import HEADROOM, Outer, check_inner, keyless_demux, validate_outer

__all__ = ["HEADROOM", "OVERHEAD", "IpipCodec", "IpipEncap", "demux", "decap"]

OVERHEAD = IPV4_HLEN
PROTO = PROTO_IPIP


class IpipCodec:
    proto = PROTO_IPIP
    versions = (4,)

    __slots__ = ("outer",)

    def __init__(self, spec: TunnelSpec):
        self.outer = Outer(spec)

    @property
    def overhead(self) -> int:
        return OVERHEAD

    def encap(self, buf, off: int, n: int, dst: bytes, ident: int) -> int | Drop:
        """Put the outer header in front of buf[off:off+n]; returns where the packet starts."""
        if n < IPV4_HLEN or buf[off] >> 4 != 4:
            return Drop.NOT_IPV4
        start = off - IPV4_HLEN
        self.outer.write(buf, start, off, n + IPV4_HLEN, PROTO_IPIP, dst, ident)
        return start

    def decap_at(self, buf, ihl: int, end: int, ctx=None) -> tuple[int, int] | Drop:
        """The inner packet of a checked outer packet whose tunnel has been found."""
        return check_inner(buf, ihl, end, 4, buf[1])


IpipEncap = IpipCodec


def outer_df(buf, off: int) -> bool:
    return bool(buf[off + 6] & 0x40)


def demux(buf, n: int):
    """(header length, end, key, context) of a received packet for the tunnel lookup."""
    return keyless_demux(buf, n, PROTO_IPIP)


def decap(buf, n: int) -> tuple[int, int] | Drop:
    """Check the outer packet buf[:n] and its inner IPv4 packet; returns (offset, length).

    buf must be writable: an outer CE is copied into the inner header (RFC 6040).
    """
    r = validate_outer(buf, n, PROTO_IPIP)
    if r.__class__ is Drop:
        return r
    return check_inner(buf, r[0], r[1], 4, buf[1])
