"""What every mode shares: the outer IPv4 header and the checks of the inner packet.

Egress, like ip_tunnel_xmit() (and ipip6_tunnel_xmit() for sit): tos fixed or inherited from
the inner header (IPv4 TOS or IPv6 traffic class), ECN copied with CE carried as ECT(0), ttl
fixed or inherited (TTL or hop limit), outer DF = pmtudisc OR inner IPv4 DF.
Ingress, like ip_tunnel_rcv(): the inner packet passes the checks of ip_rcv()/ipv6_rcv(), then
ECN is decapsulated (RFC 6040).
"""
from __future__ import annotations

from ..model import TunnelSpec
from ..wire import ipv4, ipv6
from ..wire.drop import Drop
from ..wire.ipv4 import DF, IPV4_HLEN
from ..wire.ipv6 import IPV6_HLEN
from . import ecn

HEADROOM = 64      # bytes kept free in front of every inner packet: room for any mode's header
ANY = b"\0\0\0\0"


class Outer:
    """The fixed part of a tunnel's outer header, precomputed once per tunnel."""

    __slots__ = ("ttl", "tos", "tos_inherit", "pmtudisc", "src")

    def __init__(self, spec: TunnelSpec):
        self.ttl = spec.ttl                     # 0: inherit
        self.tos_inherit = bool(spec.tos & 1)
        self.tos = spec.tos & ~1
        self.pmtudisc = spec.pmtudisc
        # 0.0.0.0 lets the kernel fill in the source of the route, as ip_tunnel_xmit() does
        self.src = spec.local.packed if spec.local else ANY

    def write(self, buf, start: int, inner: int, total_len: int, proto: int, dst: bytes,
              ident: int) -> None:
        """Write the outer header at buf[start:start+20] for the inner packet at buf[inner:]."""
        if buf[inner] >> 4 == 4:
            inner_tos, inner_ttl, inner_df = buf[inner + 1], buf[inner + 8], buf[inner + 6] & 0x40
        else:
            inner_tos, inner_ttl, inner_df = ipv6.traffic_class(buf, inner), buf[inner + 7], 0
        tos = inner_tos if self.tos_inherit else self.tos
        ipv4.pack_header_into(buf, start, tos=ecn.encapsulate(tos, inner_tos),
                              total_len=total_len, ident=ident,
                              frag=DF if self.pmtudisc or inner_df else 0,
                              ttl=self.ttl or inner_ttl, proto=proto, src=self.src, dst=dst)


def validate_outer(buf, n: int, proto: int) -> tuple[int, int] | Drop:
    """(header length, end of packet) of a received outer IPv4 packet of `proto`, or why not."""
    v = memoryview(buf)[:n]
    why = ipv4.validate(v)
    if why is not None:
        return why
    if v[9] != proto:
        return Drop.WRONG_PROTO
    return (v[0] & 0x0F) * 4, (v[2] << 8) | v[3]


def keyless_demux(buf, n: int, proto: int):
    """demux() of a mode without keys (ipip, sit): the outer checks, no key, no context."""
    r = validate_outer(buf, n, proto)
    if r.__class__ is Drop:
        return r
    return r[0], r[1], None, None


def check_inner(buf, off: int, end: int, version: int, outer_tos: int) -> tuple[int, int] | Drop:
    """Check the inner packet buf[off:end] of the given IP version and decapsulate ECN in
    place; returns (offset, length) of the inner packet without any padding."""
    v = memoryview(buf)[off:end]
    if version == 4:
        why = ipv4.validate(v)
        if why is not None:
            return why
        length, inner_tos = (v[2] << 8) | v[3], v[1]
    else:
        why = ipv6.validate(v)
        if why is not None:
            return why
        length, inner_tos = IPV6_HLEN + ((v[4] << 8) | v[5]), ipv6.traffic_class(v)
    verdict, set_ce = ecn.decapsulate(outer_tos, inner_tos)
    if verdict == ecn.DROP:
        return Drop.ECN
    if set_ce:
        ecn.set_ce(buf, off)
    elif outer_tos & ecn.MASK == ecn.ECT_1:
        ecn.set_ect1(buf, off)       # INET_ECN_decapsulate(): RFC 6040 §4.2
    return off, length


def inner_version(buf, off: int, n: int) -> int:
    """4 or 6 for a packet long enough to carry that header, else 0."""
    v = buf[off] >> 4 if n else 0
    if v == 4 and n >= IPV4_HLEN or v == 6 and n >= IPV6_HLEN:
        return v
    return 0


def v4_compatible(addr: bytes) -> bytes | None:
    """The IPv4 address in an IPv4-compatible IPv6 address ::a.b.c.d (IPV6_ADDR_COMPATv4:
    96 zero bits, and not :: or ::1), as ip_tunnel_xmit() and ipip6_tunnel_xmit() take a
    next hop; else None."""
    if addr[:12] != bytes(12) or int.from_bytes(addr[12:], "big") <= 1:
        return None
    return bytes(addr[12:])
