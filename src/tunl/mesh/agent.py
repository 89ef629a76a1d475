"""The mesh agent: one per node. It leases the node's subnet, builds the walkthrough's
one-to-many setup on the node (bridge with the subnet's gateway, a tunnel device without remote
carrying the subnet's .0/32), and keeps one on-link route per other node,

    ip route add 10.42.2.0/24 via <node's public IP> dev tunl0 onlink proto 116

in step with the registry: on every registry event and on a periodic resync it computes
plan(desired, actual) and carries it out. Only routes with its protocol number are its own.

While the registry cannot be reached, nothing is withdrawn: forwarding stays as it was, and the
agent tries again every RETRY seconds, so it reconverges within a second or two of the
registry's return. Time comes from an injected clock and waits from an injected `wait`.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Callable, Protocol

from ..errors import TunlError
from . import network as nw
from .network import BadLeaseError, Lease, NetworkConfig
from .plan import RTPROT_TUNL, Op, Route, apply, direct_dev, plan
from .registry import Registry
from .store import CompactedError, Event, RegistryError, Watch

log = logging.getLogger("tunl.mesh")

DEFAULT_TTL = 20          # s: a dead node's routes are gone everywhere within 2 × TTL
RESYNC = 10.0             # s between full resyncs (registry listed again, routes read again)
RETRY = 0.25              # s between tries while the registry is down
RELIST = 60.0             # s between full listings of the registry (the watch has the rest)
LOG_EACH = 8              # more route changes than this at once: one summary line


class Host(Protocol):
    """What the agent changes on its node (KernelHost; FakeHost in fake.py for tests)."""

    def ensure_local(self, lease: Lease, previous: Lease | None) -> dict[str, str]: ...

    def routes(self) -> set[Route]: ...

    def apply(self, ops: list[Op]) -> list[tuple[Op, str]]:
        """Carry out ops; the ones refused, each with why."""

    def links(self) -> list[tuple[IPv4Network, str]]:
        """This host's connected underlay prefixes and their devices (--cross-subnet)."""

    def masquerade(self, network: IPv4Network, subnet: IPv4Network) -> str:
        """Masquerade traffic from the overlay to the outside (--ip-masq); how."""

    def members(self, addrs: frozenset[IPv4Address]) -> str:
        """Let only these outer sources send into the tunnel; how it went ("nftables",
        "tunld", or why there is no such protection here)."""


@dataclass
class AgentConfig:
    public_ip: IPv4Address
    node: str
    dev: str = "tunl0"
    bridge: str = "mybr0"
    ttl: int = DEFAULT_TTL
    resync: float = RESYNC
    prefer: IPv4Network | None = None          # the subnet this node held before, if known
    ipmasq: bool = False                       # --ip-masq: masquerade overlay → outside
    block: float = 1.0                         # s a step waits for registry events at most


@dataclass
class Status:
    """What the agent knows, for metrics and `tunl mesh show`."""
    lease: Lease | None = None
    lease_id: int = 0
    peers: int = 0
    routes: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    registry_up: bool = False
    registry_errors: int = 0
    reconciles: int = 0
    last_reconcile: float = 0.0              # seconds it took
    route_errors: int = 0
    direct: int = 0                          # routes to peers without encapsulation
    members: int = 0                         # outer sources the tunnel accepts
    members_how: str = ""                    # what enforces that, or why nothing does


class Agent:
    def __init__(self, registry: Registry, host: Host, cfg: AgentConfig,
                 clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], object] | None = None,
                 on_reconcile: Callable[[float], None] | None = None,
                 on_lease: Callable[["Agent"], None] | None = None,
                 address: Callable[[], IPv4Address] | None = None):
        self.registry, self.host, self.cfg = registry, host, cfg
        self.clock = clock
        self.stopping = threading.Event()
        self.wait = wait or self.stopping.wait
        self.on_reconcile = on_reconcile
        self.on_lease = on_lease
        self.address = address         # where the public IP comes from, when it may change
        self.status = Status()
        self.config: NetworkConfig | None = None
        self.leases: dict[IPv4Network, Lease] = {}
        self.keys: dict[str, IPv4Network] = {}
        self.revision = 0
        self.watch: Watch | None = None
        self.next_renew = 0.0
        self.next_resync = 0.0
        self.next_relist = 0.0
        self.actual: set[Route] | None = None      # the routes as last read or programmed
        self.links: list[tuple[IPv4Network, str]] = []   # this host's underlay subnets
        self.member_set: frozenset[IPv4Address] | None = None   # as last handed to the tunnel
        self.rng = random.Random()

    # -- registry ---------------------------------------------------------------------------

    def _down(self, e: Exception) -> None:
        if self.status.registry_up:
            log.warning("registry down, keeping every route as it is: %s", e)
        self.status.registry_up = False
        self.status.registry_errors += 1
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def _relist(self) -> None:
        """List every lease again and watch from the revision after the listing."""
        assert self.config is not None
        config = self.registry.config()
        if config != self.config:
            if (config.network, config.subnet_len, config.mode) == \
                    (self.config.network, self.config.subnet_len, self.config.mode):
                log.info("cross-subnet %s", "on" if config.direct_routing else "off")
                self.config = config
            else:
                log.warning("the registry's network is now %s %s; this agent keeps %s %s "
                            "until it is restarted", config.network, config.mode,
                            self.config.network, self.config.mode)
        listing = self.registry.listing(self.config)
        self.leases = dict(listing.leases)
        self.keys = {self.registry.key(s): s for s in listing.leases}
        self._log_refused(listing.refused)
        self.revision = listing.revision
        self.next_relist = self.clock() + RELIST
        if self.watch is not None:
            self.watch.close()
        self.watch = self.registry.store.watch(self.registry.subnets_prefix, self.revision + 1)
        if not self.status.registry_up:
            log.info("registry %s answers: %d leases at revision %d", self.registry.url,
                     len(self.leases), self.revision)
        self.status.registry_up = True

    def _log_refused(self, refused: dict[str, str]) -> None:
        for key, why in refused.items():
            if self.status.refused.get(key) != why:
                log.warning("refused: %s", why)
        self.status.refused = dict(refused)

    def _event(self, e: Event) -> None:
        assert self.config is not None
        self.revision = max(self.revision, e.revision)
        old = self.keys.pop(e.key, None)
        if old is not None:
            self.leases.pop(old, None)
        self.status.refused.pop(e.key, None)
        if e.kind == "delete":
            return
        try:
            lease = nw.parse_lease(self.config, e.key, e.value or b"")
        except BadLeaseError as err:
            self.status.refused[e.key] = str(err)
            log.warning("refused: %s", err)
            return
        self.leases[lease.subnet] = lease
        self.keys[e.key] = lease.subnet

    def _acquire(self) -> None:
        assert self.config is not None
        previous = self.status.lease
        prefer = previous.subnet if previous else self.cfg.prefer
        lease_id = self.registry.store.grant(self.cfg.ttl)
        lease = self.registry.acquire(self.config, self.cfg.public_ip, self.cfg.node, lease_id,
                                      prefer, self.rng)
        self.status.lease, self.status.lease_id = lease, lease_id
        self.next_renew = self.clock() + self.cfg.ttl / 4
        if previous != lease:
            log.info("leased %s for %s (public IP %s, TTL %d s)", lease.subnet, self.cfg.node,
                     lease.public_ip, self.cfg.ttl)
            made = self.host.ensure_local(lease, previous)
            if self.cfg.ipmasq:
                made["masquerade"] = self.host.masquerade(self.config.network, lease.subnet)
            for what, how in made.items():
                if how != "unchanged":
                    log.info("%s: %s", what, how)
        if self.on_lease:
            self.on_lease(self)

    def _renew(self) -> None:
        """One keepalive: the registry's one operation per renewal. (Whether the key itself is
        still ours, the watch says: _check_own.)"""
        ttl = self.registry.store.keepalive(self.status.lease_id)
        lease = self.status.lease
        if ttl is None or lease is None:
            log.warning("lease of %s ran out; claiming it again", lease.subnet if lease else "?")
            self._acquire()
        self.next_renew = self.clock() + self.cfg.ttl / 4

    # -- routes -----------------------------------------------------------------------------

    def desired(self) -> set[Route]:
        own = self.status.lease
        direct = self.config is not None and self.config.direct_routing
        out = set()
        for s, lease in self.leases.items():
            if own is not None and (s == own.subnet or lease.public_ip == own.public_ip):
                continue
            dev = direct_dev(self.links, lease.public_ip) if direct else None
            out.add(Route(s, lease.public_ip, dev, onlink=False) if dev else
                    Route(s, lease.public_ip, self.cfg.dev))
        return out

    def _members(self) -> None:
        """Hand the tunnel the overlay's nodes (every lease's public IP) when they changed:
        encapsulated packets from any other source are dropped."""
        want = frozenset(lease.public_ip for lease in self.leases.values())
        if self.status.lease is not None:
            want |= {self.status.lease.public_ip}
        if want == self.member_set:
            return
        try:
            self.status.members_how = self.host.members(want)
        except TunlError as e:
            log.warning("members: %s", e)
            self.status.members_how = f"failed: {e}"
            return
        self.member_set = want
        self.status.members = len(want)

    def reconcile(self, read: bool = False) -> list[Op]:
        """Plan against the routes as the agent last saw them (read from the kernel again when
        `read`, at a resync, or after a change the kernel refused) and carry the plan out."""
        t0 = self.clock()
        if read and self.config is not None and self.config.direct_routing:
            self.links = [(n, d) for n, d in self.host.links()
                          if d not in (self.cfg.dev, self.cfg.bridge)
                          and not n.overlaps(self.config.network)]
        self._members()
        desired = self.desired()
        if read or self.actual is None:
            self.actual = self.host.routes()
        ops = plan(desired, self.actual)
        try:
            failed = self.host.apply(ops) if ops else []
        except TunlError as e:
            failed = [(op, str(e)) for op in ops]
        for op, why in failed:
            self.status.route_errors += 1
            log.warning("%s: %s", op, why)
        done = [op for op in ops if op not in {f for f, _ in failed}]
        if len(done) > LOG_EACH:
            verbs = [op.verb for op in done]
            log.info("routes: %d added, %d replaced, %d deleted", verbs.count("add"),
                     verbs.count("replace"), verbs.count("delete"))
        for op in done:
            (log.debug if len(done) > LOG_EACH else log.info)("%s", op)
        self.actual = None if failed else apply(done, self.actual)
        took = self.clock() - t0
        self.status.peers = len(desired)
        self.status.routes = len(desired)
        self.status.direct = sum(1 for r in desired if r.dev != self.cfg.dev)
        self.status.reconciles += 1
        self.status.last_reconcile = took
        if self.on_reconcile:
            self.on_reconcile(took)
        return ops

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Until the registry answers: wait for it. Then lease, build, and converge."""
        while not self.stopping.is_set():
            try:
                self.config = self.registry.config()
                self._acquire()
                self._relist()
                self.reconcile(read=True)       # also removes this agent's stale routes
                self.next_resync = self.clock() + self.cfg.resync
                return
            except RegistryError as e:
                self._down(e)
                self.wait(RETRY)

    def step(self) -> None:
        now = self.clock()
        if self.watch is None:
            try:
                self._relist()
                if self.status.lease is None or now >= self.next_renew:
                    self._renew()
                self._check_own()
                self.reconcile(read=True)
            except RegistryError as e:
                self._down(e)
                self.wait(RETRY)
            return
        timeout = max(0.0, min(self.next_renew, self.next_resync, now + self.cfg.block) - now)
        try:
            events = self.watch.get(timeout)
            for e in events:
                self._event(e)
            self._check_own()
            if events:
                self.reconcile()
            now = self.clock()
            if now >= self.next_renew:
                self._renew()
            if now >= self.next_resync:      # the kernel read again; the registry listed
                self._check_address()         # again only now and then (the watch has it)
                if now >= self.next_relist:
                    self._relist()
                    self._check_own()
                self.reconcile(read=True)
                self.next_resync = now + self.cfg.resync
        except CompactedError as e:
            log.info("%s; listing again", e)
            self.watch = None
        except RegistryError as e:
            self._down(e)

    def _check_address(self) -> None:
        """The node's underlay address changed (DHCP, a move to another subnet): rewrite its
        lease with the new public IP and keep its subnet; every other node re-routes it."""
        own = self.status.lease
        if self.address is None or own is None:
            return
        try:
            ip = self.address()
        except TunlError as e:
            log.warning("public IP: %s", e)
            return
        if ip == own.public_ip:
            return
        log.info("public IP %s -> %s", own.public_ip, ip)
        self.cfg.public_ip = ip
        moved = Lease(own.subnet, ip, own.backend, own.node)
        if self.registry.move(moved, self.status.lease_id):
            self.status.lease = moved
            self.leases[moved.subnet] = moved
            if self.on_lease:
                self.on_lease(self)
        else:
            self._acquire()

    def _check_own(self) -> None:
        own = self.status.lease
        if own is not None and self.leases.get(own.subnet) != own:
            log.warning("the registry no longer holds %s for this node", own.subnet)
            self._acquire()            # deleted or taken under us: claim it (or another) again
            self.leases[self.status.lease.subnet] = self.status.lease

    def run(self) -> None:
        self.start()
        while not self.stopping.is_set():
            self.step()
        if self.watch is not None:
            self.watch.close()

    def stop(self) -> None:
        self.stopping.set()
        if self.watch is not None:
            self.watch.close()


FALLBACK = {"ipip": "tunl0", "gre": "gre0"}


class KernelHost:
    """The agent's node: the tunnel on whichever data plane `auto` (or `dataplane`) gives,
    the bridge and the routes over rtnetlink."""

    def __init__(self, dev: str, bridge: str, mode: str, dataplane: str = "auto"):
        from ..kernel.routes import HostNet
        self.dev, self.bridge, self.mode, self.dataplane = dev, bridge, mode, dataplane
        from ..kernel.routes import RouteTable
        self.net = HostNet()
        self.table = RouteTable(RTPROT_TUNL)
        self.made: dict[str, str] = {}

    def ensure_tunnel(self) -> str:
        from .. import planes
        from ..errors import ForeignDeviceError, NotFoundError
        from ..model import TunnelMode, TunnelSpec
        mode = TunnelMode(self.mode)
        try:
            _, spec = planes.find(self.dev)
        except NotFoundError:
            planes.for_new(mode, self.dataplane).add(TunnelSpec(name=self.dev, mode=mode))
            return "created"
        except ForeignDeviceError:
            if FALLBACK.get(self.mode) != self.dev:
                raise
            # the kernel's own catch-all device of the mode (made when the module loaded, and
            # never deleted): without local, remote or key it is the tunnel the mesh needs,
            # as Calico uses tunl0
            from ..planes.kernel import KernelPlane
            spec = TunnelSpec.from_dict(KernelPlane().show(self.dev)[0]["spec"])
            if spec.local or spec.remote or spec.ikey or spec.okey:
                raise
            return "unchanged (the kernel's fallback device)"
        if spec.mode is not mode or spec.remote is not None:
            raise ForeignDeviceError(f"{self.dev} exists as a tunnel with mode "
                                     f"{spec.mode.value}{' and a remote' if spec.remote else ''};"
                                     f" the mesh needs mode {self.mode} without remote")
        return "unchanged"

    def ensure_local(self, lease: Lease, previous: Lease | None) -> dict[str, str]:
        from ..kernel.routes import enable_forwarding
        net = self.net
        made = {f"tunnel {self.dev}": self.ensure_tunnel()}
        net.set_up(self.dev)
        made[f"bridge {self.bridge}"] = net.ensure_bridge(self.bridge)
        if previous is not None and previous.subnet != lease.subnet:
            net.remove_address(self.dev, IPv4Interface(f"{previous.subnet.network_address}/32"))
            net.remove_address(self.bridge, IPv4Interface(
                f"{previous.gateway}/{previous.subnet.prefixlen}"))
        made[f"address {lease.subnet.network_address}/32 dev {self.dev}"] = net.ensure_address(
            self.dev, IPv4Interface(f"{lease.subnet.network_address}/32"))
        made[f"address {lease.gateway}/{lease.subnet.prefixlen} dev {self.bridge}"] = \
            net.ensure_address(self.bridge,
                               IPv4Interface(f"{lease.gateway}/{lease.subnet.prefixlen}"))
        made["net.ipv4.ip_forward"] = enable_forwarding()
        self.made.update({k: v for k, v in made.items() if v == "created"})
        return made

    def links(self) -> list[tuple[IPv4Network, str]]:
        return self.net.links()

    def _plane(self):
        from .. import planes
        from ..errors import ForeignDeviceError
        from ..planes.kernel import KernelPlane
        try:
            return planes.find(self.dev)[0]
        except ForeignDeviceError:
            return KernelPlane()          # the kernel's fallback device (ensure_tunnel)

    def members(self, addrs: frozenset[IPv4Address]) -> str:
        from ..kernel import nft
        plane = self._plane()
        if plane.name == "kernel" and not nft.available():
            return ("none: the kernel's device takes encapsulated packets from any host "
                    "(install nftables)")
        plane.members(self.dev, addrs)
        return "nftables" if plane.name == "kernel" else "tunld"

    def masquerade(self, network: IPv4Network, subnet: IPv4Network) -> str:
        from ..kernel import nft
        if not nft.available():
            return "none: no nftables (install nftables)"
        nft.masquerade(network, subnet)
        self.made["masquerade"] = "created"
        return "nftables"

    def routes(self) -> set[Route]:
        found = self.table.dump()
        idx = self.net.index(self.dev)
        names = self.net._names() if any(oif != idx for _, _, oif, _ in found) else {}
        return {Route(dst, via, self.dev if oif == idx else names.get(oif, f"if{oif}"), onlink)
                for dst, via, oif, onlink in found}

    def apply(self, ops: list[Op]) -> list[tuple[Op, str]]:
        index = {}
        for op in ops:
            dev = op.route.dev
            if dev not in index:
                index[dev] = self.net.index(dev)
                if index[dev] is None and dev[:2] == "if" and dev[2:].isdigit():
                    index[dev] = int(dev[2:])        # a device without a name now (routes())
        failed = [(op, f'device "{op.route.dev}" does not exist') for op in ops
                  if index[op.route.dev] is None]
        todo = [op for op in ops if index[op.route.dev] is not None]
        refused = self.table.apply([(op.verb, op.route.dst, op.route.via, index[op.route.dev],
                                     op.route.onlink) for op in todo])
        return failed + [(todo[i], os.strerror(code)) for i, code in refused]

    def close(self) -> None:
        self.net.close()
        self.table.close()


def public_ip(given: str | None, iface: str | None) -> IPv4Address:
    """--public-ip, else the first IPv4 address of --iface, else the source of the default
    route (as flannel picks its external interface)."""
    from ..errors import ConfigError
    from ..kernel.routes import HostNet
    if given:
        try:
            return IPv4Address(given)
        except ValueError:
            raise ConfigError(f'--public-ip "{given}": an IPv4 address is a.b.c.d') from None
    with HostNet() as net:
        if iface:
            if net.index(iface) is None:
                raise ConfigError(f'--iface "{iface}": no such device')
            addrs = net.addresses(iface)
            if not addrs:
                raise ConfigError(f'--iface "{iface}": the device has no IPv4 address')
            return addrs[0].ip
        src = net.source_for("192.0.2.1")       # TEST-NET-1: only the route lookup, no packet
    if src is None:
        raise ConfigError("no default route to take the public IP from: "
                          "name it with --public-ip IP or --iface DEV")
    return src


def node_name() -> str:
    return os.uname().nodename
