"""IPv4 in IPv4 (RFC 2003) with the semantics of the kernel's ipip.c and ip_tunnel.c.

Egress follows ip_tunnel_xmit(): tos and ttl fixed or inherited from the inner header, ECN
copied (CE becomes ECT(0)), outer DF = pmtudisc OR inner DF. Ingress follows ip_tunnel_rcv():
the outer header as ip_rcv() checks it, ECN decapsulation, the inner packet checked the same way.
The outer header is written in place in the headroom in front of the inner packet.
"""
from __future__ import annotations

from ..model import TunnelSpec
from ..wire import ipv4
from ..wire.drop import Drop
from ..wire.ipv4 import DF, IPV4_HLEN, PROTO_IPIP
from . import ecn

HEADROOM = 64      # bytes kept free in front of every inner packet: room for any mode's header
OVERHEAD = IPV4_HLEN


class IpipEncap:
    """The fixed part of a tunnel's outer header, precomputed once per tunnel."""

    __slots__ = ("ttl", "tos", "tos_inherit", "pmtudisc", "src")

    def __init__(self, spec: TunnelSpec):
        self.ttl = spec.ttl                     # 0: inherit
        self.tos_inherit = bool(spec.tos & 1)
        self.tos = spec.tos & ~1
        self.pmtudisc = spec.pmtudisc
        # 0.0.0.0 lets the kernel fill in the source of the route, as ip_tunnel_xmit() does
        self.src = spec.local.packed if spec.local else b"\0\0\0\0"

    def encap(self, buf, off: int, n: int, dst: bytes, ident: int) -> int | Drop:
        """Put the outer header in front of buf[off:off+n]; returns where the packet starts."""
        if n < IPV4_HLEN or buf[off] >> 4 != 4:
            return Drop.NOT_IPV4
        inner_tos = buf[off + 1]
        tos = inner_tos if self.tos_inherit else self.tos
        ttl = self.ttl or buf[off + 8]
        frag = DF if self.pmtudisc or buf[off + 6] & 0x40 else 0
        start = off - IPV4_HLEN
        ipv4.pack_header_into(buf, start, tos=ecn.encapsulate(tos, inner_tos),
                              total_len=n + IPV4_HLEN, ident=ident, frag=frag, ttl=ttl,
                              proto=PROTO_IPIP, src=self.src, dst=dst)
        return start


def outer_df(buf, off: int) -> bool:
    return bool(buf[off + 6] & 0x40)


def decap(buf, n: int) -> tuple[int, int] | Drop:
    """Check the outer packet buf[:n] and its inner IPv4 packet; returns (offset, length).

    buf must be writable: an outer CE is copied into the inner header (RFC 6040).
    """
    v = memoryview(buf)[:n]
    why = ipv4.validate(v)
    if why is not None:
        return why
    if v[9] != PROTO_IPIP:
        return Drop.WRONG_PROTO
    ihl = (v[0] & 0x0F) * 4
    tot = (v[2] << 8) | v[3]
    inner = v[ihl:tot]
    why = ipv4.validate(inner)
    if why is not None:
        return why
    inner_len = (inner[2] << 8) | inner[3]
    verdict, set_ce = ecn.decapsulate(v[1], inner[1])
    if verdict == ecn.DROP:
        return Drop.ECN
    if set_ce:
        ecn.set_ce_ipv4(buf, ihl)
    elif verdict == ecn.OK and v[1] & ecn.MASK == ecn.ECT_1:
        ecn.set_ect1_ipv4(buf, ihl)     # like INET_ECN_decapsulate()
    return ihl, inner_len
