"""What the agent should change, computed without touching anything (pure):

    plan(desired, actual) -> [Op]

`desired` are the on-link routes the registry asks for (one per other node:
`10.42.2.0/24 via 172.16.0.2 dev tunl0 onlink`; with --cross-subnet, a node on one of this
host's own underlay subnets gets a plain route over that device instead:
`10.42.2.0/24 via 172.16.0.2 dev eth0`, no encapsulation); `actual` are the routes on this host that carry
the agent's route protocol number, on any device. A route the agent did not tag is never in
`actual`, so it is never touched; one it tagged and no longer wants is deleted.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

RTPROT_TUNL = 116        # tunl's route protocol number; `ip route show proto 116`


@dataclass(frozen=True, order=True)
class Route:
    dst: IPv4Network
    via: IPv4Address | None
    dev: str
    onlink: bool = True

    def __str__(self) -> str:
        via = f" via {self.via}" if self.via else ""
        return f"{self.dst}{via} dev {self.dev}{' onlink' if self.onlink else ''}"


@dataclass(frozen=True)
class Op:
    verb: str            # "add" | "replace" | "delete"
    route: Route

    def __str__(self) -> str:
        return f"{self.verb} {self.route}"


def direct_dev(links: list[tuple[IPv4Network, str]], ip: IPv4Address) -> str | None:
    """The device over which `ip` is directly reachable (the longest of this host's connected
    underlay prefixes that holds it), or None: it must go through the tunnel. Flannel's
    DirectRouting asks the same of `ip route get` (no gateway: directly reachable)."""
    best: tuple[IPv4Network, str] | None = None
    for net, dev in links:
        if ip in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, dev)
    return best[1] if best else None


def plan(desired: set[Route] | frozenset[Route], actual: set[Route] | frozenset[Route]) -> list[Op]:
    """The fewest ops that make `actual` equal `desired`: deletes first (a stale route never
    outlives its replacement's add by more than one op), then replaces, then adds; each group
    in address order, so the same inputs always give the same list."""
    want = {r.dst: r for r in desired}
    have: dict[IPv4Network, list[Route]] = {}
    for r in actual:
        have.setdefault(r.dst, []).append(r)
    deletes, replaces, adds = [], [], []
    for dst, routes in have.items():
        w = want.get(dst)
        if w is None:
            deletes.extend(Op("delete", r) for r in routes)
        elif w not in routes:
            replaces.append(Op("replace", w))
            deletes.extend(Op("delete", r) for r in routes[1:])
        else:
            deletes.extend(Op("delete", r) for r in routes if r != w)
    for dst, w in want.items():
        if dst not in have:
            adds.append(Op("add", w))
    return sorted(deletes, key=lambda o: o.route) + sorted(replaces, key=lambda o: o.route) + \
        sorted(adds, key=lambda o: o.route)


def apply(ops: list[Op], actual: set[Route]) -> set[Route]:
    """The routes after `ops` (the model the property tests check plan() against)."""
    out = set(actual)
    for op in ops:
        if op.verb == "delete":
            out.discard(op.route)
        else:
            out = {r for r in out if r.dst != op.route.dst} | {op.route}
    return out
