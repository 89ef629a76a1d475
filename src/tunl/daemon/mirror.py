"""tunld's copy of the kernel state its tunnels depend on, kept in step by events.

Routes are kept only for the tunnel devices (their next hops are the NBMA outer destinations);
links for every device (the MTU of the path to an outer destination is its device's); IPv6
prefixes for the tunnel devices (sit's ipv6_chk_prefix()). Each event costs in proportion to
what it changes: an event about another device changes nothing here, and a route added to a
tunnel rebuilds that tunnel's table only. An overflow of the event socket costs one dump.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..kernel.rtnl import AF_INET, AF_INET6, RTN_UNICAST
from ..model import Route

RT_TABLE_LOCAL = 255


@dataclass
class Changes:
    """What a batch of messages changed: tunnels whose routes or prefixes changed, tunnels
    whose link changed or went away, and whether any route, link or address changed at all
    (then the paths to outer destinations are looked up again)."""
    routes: set = field(default_factory=set)
    prefixes: set = field(default_factory=set)
    links: set = field(default_factory=set)
    gone: set = field(default_factory=set)
    # tunnels whose routes the kernel may have removed without a word (fib_sync_down_dev()
    # when a device goes down, fib_sync_down_addr() when an IPv4 address goes): dump them again
    redump: set = field(default_factory=set)
    any: bool = False

    def update(self, other: "Changes") -> None:
        self.routes |= other.routes
        self.prefixes |= other.prefixes
        self.links |= other.links
        self.gone |= other.gone
        self.redump |= other.redump
        self.any = self.any or other.any


def _route_key(m) -> tuple:
    # what tells two kernel routes apart (fib_table_insert(), ip6_ins_rt())
    return (m.family, m.table, m.dst, m.priority, m.tos)


class Mirror:
    def __init__(self):
        self.watched: set[int] = set()                 # ifindexes of the tunnels
        self.routes: dict[int, dict[tuple, Route]] = {}
        self.prefixes: dict[int, set] = {}
        self.links: dict[int, object] = {}             # every link: index -> LinkMsg

    def watch(self, ifindex: int, routes=(), addrs=()) -> None:
        """Start mirroring a tunnel device, from a dump of its routes and addresses."""
        self.watched.add(ifindex)
        self.routes[ifindex] = {}
        self.prefixes[ifindex] = set()
        for m in routes:
            self._route(m)
        for m in addrs:
            self._addr(m)

    def unwatch(self, ifindex: int) -> None:
        self.watched.discard(ifindex)
        self.routes.pop(ifindex, None)
        self.prefixes.pop(ifindex, None)

    def load(self, watched: set[int], routes, links, addrs) -> Changes:
        """Replace everything from full dumps (start, and after an event overflow)."""
        self.watched = set(watched)
        self.links = {m.index: m for m in links}
        for i in self.watched:
            self.routes[i] = {}
            self.prefixes[i] = set()
        for m in routes:
            self._route(m)
        for m in addrs:
            self._addr(m)
        gone = {i for i in self.watched if i not in self.links}
        w = self.watched
        return Changes(routes=set(w), prefixes=set(w), links=set(w), gone=gone, any=True)

    def apply(self, msgs) -> Changes:
        ch = Changes()
        for m in msgs:
            ch.any = True
            kind = type(m).__name__
            if kind == "RouteMsg":
                if m.replace and m.new:
                    ch.redump |= self._replaced(m)
                if m.oif in self.watched and self._route(m):
                    ch.routes.add(m.oif)
            elif kind == "LinkMsg":
                old = self.links.get(m.index)
                if m.new:
                    self.links[m.index] = m
                else:
                    self.links.pop(m.index, None)
                if m.index in self.watched:
                    (ch.links if m.new else ch.gone).add(m.index)
                    if m.new and old is not None and old.up != m.up:
                        ch.redump.add(m.index)
            elif kind == "AddrMsg":
                if m.index in self.watched and self._addr(m):
                    ch.prefixes.add(m.index)
                if not m.new and m.family == AF_INET:
                    ch.redump |= self.watched
        return ch

    def _replaced(self, m) -> set[int]:
        """The other tunnels that have a route with the key of one that replaced a route: the
        replace may have moved it from one of them (or replaced one of several with the key,
        which only a dump tells apart)."""
        key = _route_key(m)
        return {index for index, table in self.routes.items()
                if index != m.oif and key in table}

    def reload(self, ifindexes, routes) -> None:
        """Some tunnels' routes anew, from one dump of their devices."""
        for i in ifindexes:
            if i in self.watched:
                self.routes[i] = {}
        for m in routes:
            if m.oif in ifindexes:
                self._route(m)

    def _route(self, m) -> bool:
        table = self.routes.get(m.oif)
        if table is None or m.type != RTN_UNICAST or m.table == RT_TABLE_LOCAL:
            return False
        key = _route_key(m)
        if m.new:
            r = Route(m.dst, m.gateway, m.table)
            if table.get(key) == r:
                return False
            table[key] = r
            return True
        return table.pop(key, None) is not None

    def _addr(self, m) -> bool:
        prefixes = self.prefixes.get(m.index)
        if prefixes is None or m.family != AF_INET6 or m.address is None:
            return False
        p = ipaddress.IPv6Network(f"{m.address}/{m.prefixlen}", strict=False)
        if m.new:
            if p in prefixes:
                return False
            prefixes.add(p)
            return True
        if p not in prefixes:
            return False
        prefixes.discard(p)      # a second address with the same prefix: the next dump fixes it
        return True

    def tunnel_routes(self, ifindex: int) -> list[Route]:
        return list(self.routes.get(ifindex, {}).values())

    def tunnel_prefixes(self, ifindex: int) -> tuple:
        return tuple(self.prefixes.get(ifindex, ()))

    def index(self, name: str) -> int | None:
        for i, m in list(self.links.items()):
            if m.name == name:
                return i
        return None

    def mtu(self, ifindex: int) -> int | None:
        m = self.links.get(ifindex)
        return m.mtu if m is not None else None
