"""Longest-prefix match over the kernel's routes on one tunnel device.

The kernel routes a packet to the TUN device and the next hop is lost on the way; this table,
a mirror of the routes on the device, gives it back: the gateway of the matching route is the
outer destination (rt_nexthop() in ip_tunnel_xmit(), the neighbour in ipip6_tunnel_xmit()).
"""
from __future__ import annotations

from typing import Iterable

from ..model import Route


class Fib:
    """Routes of one address family. Immutable once built: the data plane swaps in a new
    table, it never edits one."""

    __slots__ = ("_lens", "routes")

    def __init__(self, routes: Iterable[Route] = (), bits: int = 32):
        self.routes = tuple(routes)
        full = (1 << bits) - 1
        by_len: dict[int, dict[int, bytes | None]] = {}
        for r in sorted(self.routes, key=lambda r: r.table != 254):   # main table wins a tie
            gw = r.gateway.packed if r.gateway else None
            by_len.setdefault(r.dst.prefixlen, {}).setdefault(int(r.dst.network_address), gw)
        self._lens = tuple((plen, (full << (bits - plen)) & full, by_len[plen])
                           for plen in sorted(by_len, reverse=True))

    def lookup(self, dst: int) -> tuple[bool, bytes | None]:
        """(found, gateway) for a destination given as an integer."""
        for _plen, mask, nets in self._lens:
            hit = nets.get(dst & mask, 0)
            if hit != 0:
                return True, hit
        return False, None

    def __len__(self) -> int:
        return len(self.routes)
