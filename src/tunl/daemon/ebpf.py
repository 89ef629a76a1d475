"""tunld's side of the eBPF data plane: the programs of bpf/ attached to a namespace's eBPF
tunnels and underlay devices, and the maps they read kept in step with the kernel.

An eBPF tunnel is a userspace tunnel (a TUN device whose queue tunld reads, the engine
ready to move its packets) with the programs in front: the egress program on the device
encapsulates what it can and leaves the rest in the queue, the ingress program on every
underlay device decapsulates what it can and leaves the rest to the raw sockets. So the
engine is the slow path, with every rule of the userspace data plane, and nothing changes
for a packet but which of the two moves it.

What the programs read and tunld keeps:
  tunl_tunnels  the tunnel's outer header and its slow-path flags
  tunl_rx       how ip_tunnel_lookup() tells the tunnels apart
  tunl_routes   the IPv4 routes on the device (their next hops: NBMA), from the route mirror
  tunl_paths    the outer route to each peer (device, preferred source, path MTU), from
                `ip route get` and the path MTUs the engine learns from ICMP
  tunl_members  the outer sources a tunnel with a member set takes packets from; its
                F_MEMBERS flag is set only once they are written, and cleared before they
                are deleted, so that a change never lets an outsider in
"""
from __future__ import annotations

import logging
import os
import socket
from ipaddress import IPv4Address

from ..bpf import programs as P
from ..model import TunnelMode, TunnelSpec

log = logging.getLogger("tunl.daemon")

ARPHRD_ETHER = 1
MEMBERS_SLOW = "members: the set does not fit the eBPF map; tunld checks it"
PROTO = {TunnelMode.IPIP: 4, TunnelMode.GRE: 47, TunnelMode.SIT: 41, TunnelMode.ISATAP: 41}
MODE = {TunnelMode.IPIP: P.MODE_IPIP, TunnelMode.GRE: P.MODE_GRE, TunnelMode.SIT: P.MODE_SIT,
        TunnelMode.ISATAP: P.MODE_SIT}


def slow_reasons(spec: TunnelSpec) -> tuple[list[str], list[str]]:
    """Why this tunnel's transmitted / received packets take the slow path (every packet)."""
    tx, rx = [], []
    if spec.mode is TunnelMode.GRE:
        if spec.oseq:
            tx.append("oseq: sequence numbers are one counter for the tunnel")
        if spec.ocsum:
            tx.append("ocsum: a checksum over the whole packet")
        if spec.iseq:
            rx.append("iseq: the order check keeps per-tunnel state")
        if spec.icsum:
            rx.append("icsum: a checksum over the whole packet")
    if spec.mode is TunnelMode.ISATAP:
        tx.append("isatap: the next hop's embedded IPv4 address")
        rx.append("isatap: the potential router list")
    elif spec.mode is TunnelMode.SIT and not spec.remote:
        tx.append("sit without remote: 6rd and IPv4-compatible next hops")
        rx.append("sit without remote: 6rd source checks")
    if spec.mode in (TunnelMode.SIT, TunnelMode.ISATAP) and not P.feature_flags() & P.F_DECAP_L3:
        rx.append("this kernel has no BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (Linux 6.3)")
    return tx, rx


def tnl_for(spec: TunnelSpec, ifindex: int, link: int, capture: bool = False,
            down: bool = False, members: str | None = None) -> tuple[P.Tnl, P.RxKey]:
    """members: None (anyone may send), "map" (the program checks tunl_members) or "slow"
    (the set is tunld's alone: every received packet takes the slow path)."""
    tx, rx = slow_reasons(spec)
    if capture:
        tx = tx + ["capture"]
    if down:          # the slow path counts what a down device drops (TunnelDown)
        tx, rx = tx + ["down"], rx + ["down"]
    if members == "slow":
        rx = rx + [MEMBERS_SLOW]
    flags = P.feature_flags()
    flags |= P.F_MEMBERS if members == "map" else 0
    flags |= P.F_PMTUDISC if spec.pmtudisc else 0
    flags |= P.F_OKEY if spec.okey is not None else 0
    flags |= P.F_SLOW_TX if tx else 0
    flags |= P.F_SLOW_RX if rx else 0
    local = spec.local.packed if spec.local else None
    remote = spec.remote.packed if spec.remote else None
    okey = (spec.okey or 0).to_bytes(4, "big")
    tnl = P.Tnl(ifindex, link, P.b4(local), P.b4(remote), P.b4(okey), MODE[spec.mode],
                spec.ttl, spec.tos & 0xFF, flags)
    ikey = spec.ikey if spec.mode is TunnelMode.GRE else None
    rxk = P.RxKey(P.b4(local), P.b4(remote), P.b4((ikey or 0).to_bytes(4, "big")),
                  PROTO[spec.mode], 1 if ikey is not None else 0, 0)
    return tnl, rxk


def underlay_devices(tunnels: set[int]) -> list[int]:
    """Every Ethernet device of the namespace: where an outer packet can arrive."""
    out = []
    for name in os.listdir("/sys/class/net"):
        try:
            with open(f"/sys/class/net/{name}/type") as f:
                if int(f.read()) != ARPHRD_ETHER:
                    continue
            index = socket.if_nametoindex(name)
        except (OSError, ValueError):
            continue
        if index not in tunnels:
            out.append(index)
    return out


class EbpfTunnels:
    """The eBPF tunnels of one namespace (a part of tunld, called under its lock)."""

    def __init__(self, route_get, programs: P.Programs | None = None):
        self.route_get = route_get            # (dst, src, oif) -> RouteGet | errno
        self.programs = programs or P.Programs()
        self.tunnels: dict[int, tuple[TunnelSpec, int]] = {}    # ifindex -> (spec, link)
        self.ingress: set[int] = set()
        self.capturing: dict[int, int] = {}     # ifindex -> pid of `tunl tunnel capture`
        self.down: set[int] = set()             # tunnels whose device is down
        # ifindex -> the outer sources (4 bytes each) it takes packets from; none: anyone
        self.members: dict[int, frozenset[bytes]] = {}
        self.members_slow: set[int] = set()     # their set did not fit tunl_members
        self.error: str | None = None

    # -- availability ---------------------------------------------------------------------------

    def available(self) -> str | None:
        """None when the programs load here, else why not (and the fix)."""
        try:
            self.programs.load(self._attached())
        except FileNotFoundError as e:
            return str(e)
        except OSError as e:
            return (f"the kernel refused the BPF programs ({e.strerror or e}); "
                    "tunl doctor says why")
        return None

    def _attached(self) -> list[tuple[int, int]]:
        return ([(i, P.BPF_TC_EGRESS) for i in self.tunnels]
                + [(i, P.BPF_TC_INGRESS) for i in underlay_devices(set(self.tunnels))])

    # -- tunnels --------------------------------------------------------------------------------

    def put(self, spec: TunnelSpec, ifindex: int, link: int = 0, routes=(), paths=None) -> None:
        """Add or update a tunnel: its entries, the egress program on its device and the
        ingress program on every underlay device."""
        old = self.tunnels.get(ifindex)
        self.programs.load(self._attached() + [(ifindex, P.BPF_TC_EGRESS)])
        members = self.members.get(ifindex)
        check = None
        if members is not None:                  # the set first, then the flag
            check = "map"
            try:
                self.programs.set_members(ifindex, members)
                self.members_slow.discard(ifindex)
            except OSError as e:
                if ifindex not in self.members_slow:
                    log.warning("%s: %d members do not fit the eBPF map (%s); tunld checks "
                                "every received packet", spec.name, len(members), e)
                self.members_slow.add(ifindex)
                check = "slow"
        else:
            self.members_slow.discard(ifindex)
        tnl, rxk = tnl_for(spec, ifindex, link, ifindex in self.capturing,
                           ifindex in self.down, check)
        if old is not None:
            _t, old_rx = tnl_for(old[0], ifindex, old[1])
            if bytes(old_rx) != bytes(rxk):
                self.programs.drop_rx(old_rx)
        self.programs.put_tunnel(tnl, rxk)
        if check != "map":                       # the flag is gone: then the entries
            self.programs.set_members(ifindex, ())
        self.tunnels[ifindex] = (spec, link)
        self.programs.attach_egress(ifindex)
        if old is None:
            log.debug("%s: eBPF egress program attached (ifindex %d)", spec.name, ifindex)
        else:
            log.debug("%s: its eBPF map entries rewritten", spec.name)
        self.attach_underlay()

    def set_members(self, ifindex: int, members: frozenset[bytes] | None) -> None:
        """The outer sources the tunnel takes packets from (None: anyone). For a tunnel not
        put yet (taken back after a restart), kept for its put()."""
        if members is None:
            self.members.pop(ifindex, None)
        else:
            self.members[ifindex] = members
        if ifindex in self.tunnels:
            spec, link = self.tunnels[ifindex]
            try:
                self.put(spec, ifindex, link)
            except OSError:
                # the flag may not say what the entries say: no packet of this tunnel takes
                # the fast path in; the slow path checks the set
                self.programs.drop_rx(tnl_for(spec, ifindex, link)[1])
                raise

    def slow_rx_why(self, ifindex: int) -> list[str]:
        """Why received packets take the slow path beyond what the spec says."""
        return [MEMBERS_SLOW] if ifindex in self.members_slow else []

    def capture(self, ifindex: int, pid: int | None) -> None:
        """While `tunl tunnel capture` (pid) runs, every transmitted packet of the tunnel
        takes the slow path through the device queue, where tcpdump sees it."""
        if pid is None:
            self.capturing.pop(ifindex, None)
        else:
            self.capturing[ifindex] = pid
        spec, link = self.tunnels[ifindex]
        self.put(spec, ifindex, link)

    def end_dead_captures(self) -> None:
        for ifindex, pid in list(self.capturing.items()):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.capture(ifindex, None)
            except PermissionError:
                pass

    def attach_underlay(self) -> None:
        """The ingress program on every underlay device there is now (new ones included)."""
        if not self.tunnels:
            return
        for index in underlay_devices(set(self.tunnels)):
            if index not in self.ingress:
                try:
                    self.programs.attach_ingress(index)
                    self.ingress.add(index)
                    log.debug("eBPF ingress program attached to ifindex %d", index)
                except OSError as e:
                    log.warning("cannot attach the ingress program to ifindex %d: %s", index, e)

    def remove(self, ifindex: int) -> None:
        self.capturing.pop(ifindex, None)
        self.down.discard(ifindex)
        self.members.pop(ifindex, None)
        self.members_slow.discard(ifindex)
        if self.tunnels.pop(ifindex, None) is None:
            return
        if self.programs.obj is not None:
            self.programs.drop_tunnel(ifindex)
        if not self.tunnels:
            self.shutdown()

    def shutdown(self) -> None:
        """No eBPF tunnel left: no program stays attached anywhere."""
        for index in underlay_devices(set()):
            self.programs.detach_ingress(index)
        self.ingress.clear()
        self.programs.close()
        log.debug("no eBPF tunnel left: the programs are detached and unloaded")

    # -- routes and paths -----------------------------------------------------------------------

    def sync(self, ifindex: int, routes, pmtu, up: bool = True) -> None:
        """The tunnel's routes (from the mirror) and the paths to its peers, as the maps need
        them. pmtu(dst, mtu) gives the path MTU in force (learned ones included)."""
        got = self.tunnels.get(ifindex)
        if got is None or self.programs.obj is None:
            return
        spec, link = got
        if up == (ifindex in self.down):
            (self.down.discard if up else self.down.add)(ifindex)
            self.put(spec, ifindex, link)
        table = {}
        for r in routes:
            if r.dst.version == 4 and r.table in (254, None):
                gw = r.gateway.packed if r.gateway is not None and r.gateway.version == 4 else None
                table[(r.dst.network_address.packed, r.dst.prefixlen)] = gw
        peers = set()
        if spec.remote:
            peers.add(spec.remote.packed)
        else:
            peers.update(gw for gw in table.values() if gw)
        paths = {}
        for dst in peers:
            got = self.route_get(socket.inet_ntoa(dst),
                                 str(spec.local) if spec.local else None, link or None)
            if isinstance(got, int) or got.oif is None:
                continue                       # no route: the slow path counts NoRoute
            src = spec.local.packed if spec.local else (
                got.prefsrc.packed if isinstance(got.prefsrc, IPv4Address) else None)
            if src is None:
                continue
            mtu = pmtu(dst, got.mtu or _mtu(got.oif))
            paths[dst] = (got.oif, src, mtu)
        self.programs.set_routes(ifindex, table if not spec.remote else {})
        self.programs.set_paths(ifindex, paths)

    # -- counters -------------------------------------------------------------------------------

    def status(self, ifindex: int, counters: dict) -> dict:
        """Add what the programs moved and dropped to the slow path's counters (in place);
        returns how many packets took which path."""
        c = self.programs.counters(ifindex) if self.programs.obj is not None else [0] * P.C_MAX
        counters["rx_packets"] += c[P.C_RX_PACKETS]
        counters["rx_bytes"] += c[P.C_RX_BYTES]
        counters["tx_packets"] += c[P.C_TX_PACKETS]
        counters["tx_bytes"] += c[P.C_TX_BYTES]
        if c[P.C_RX_ECN]:                 # like count_rx_drop(Drop.ECN)
            counters["rx_errors"] += c[P.C_RX_ECN]
            counters["rx_frame_errors"] += c[P.C_RX_ECN]
            rx = counters["rx_drop"]
            rx["ecn"] = rx.get("ecn", 0) + c[P.C_RX_ECN]
        if c[P.C_RX_NOT_MEMBER]:          # like count_rx_drop(Drop.NOT_MEMBER)
            counters["rx_errors"] += c[P.C_RX_NOT_MEMBER]
            rx = counters["rx_drop"]
            rx["not_member"] = rx.get("not_member", 0) + c[P.C_RX_NOT_MEMBER]
        if c[P.C_TX_DEAD_LOOP]:           # like count_tx_drop(Drop.DEAD_LOOP, "collisions")
            counters["tx_errors"] += c[P.C_TX_DEAD_LOOP]
            counters["collisions"] += c[P.C_TX_DEAD_LOOP]
            tx = counters["tx_drop"]
            tx["dead_loop"] = tx.get("dead_loop", 0) + c[P.C_TX_DEAD_LOOP]
        return {"fast_rx": c[P.C_RX_PACKETS], "fast_tx": c[P.C_TX_PACKETS],
                "slow_rx": c[P.C_RX_SLOW], "slow_tx": c[P.C_TX_SLOW],
                "attached": self.programs.attached(ifindex, ingress=False)}


def _mtu(ifindex: int) -> int:
    try:
        name = socket.if_indextoname(ifindex)
        with open(f"/sys/class/net/{name}/mtu") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1500
