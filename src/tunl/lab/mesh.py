"""A lab's mesh: `tunl mesh` for real, one agent in each member's namespace.

start: the registry (sqlite: a file in the lab's run dir; etcd: a 3-member cluster in the
       underlay namespace, listening on etcd_address, which br0 gets), `tunl mesh init` once
       (with --cross-subnet for `cross_subnet = true`), `tunl mesh agent` in each member's
       namespace in the background (its log: <run dir>/agent-<host>.log), then wait until every
       member has a route (proto 116) to every other member's subnet, via that member's
       underlay address: on-link on tunl0, or, in a cross-subnet mesh, on eth0 to a member
       whose underlay address is on-link to its own (the same underlay subnet).
move:  a member readdressed into another segment (`lab demo`): its agent stopped, `tunl mesh
       leave` (its lease released, its routes removed), its underlay moved (control.move_host),
       its agent started again with the new public IP; then wait until whole again.
stop:  nothing of its own: `control.down` ends the agents and the etcd members with the other
       processes of the namespaces, then removes the run dir and the registry in it.

What a member has is read with `ip -n NS -j` (the routes of proto 116, the address of mybr0),
as a person would check it, never from the registry: the lab checks the mesh from outside.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from typing import Callable

from . import netns
from .etcd import EtcdCluster
from .netns import LabError
from .topology import (BRIDGE, ETCD_MEMBERS, MESH_BRIDGE, MESH_DEV, Host, Mesh, Topology)

RTPROT_TUNL = "116"         # the agent's route protocol (tunl.mesh.plan.RTPROT_TUNL)
CONVERGE_WITHIN = 30.0      # seconds for every member to have every route, at `lab up`
POLL = 0.05                 # seconds between looks at the members' routes
ETCD_PORT = 2379            # etcd's client ports 2379..2381, its peer ports 2382..2384
RESYNC = 1            # s: a lab agent reads its address and routes again this often
UNDERLAY_DEV = "eth0"       # a host's underlay device (control._build_host)
LOG_TAIL = 5                # lines of an agent's log quoted when it fails
CLONE_NEWNET = 0x40000000   # <linux/sched.h>

Log = Callable[[str], None]


def registry_url(topo: Topology) -> str:
    """The registry the agents share: a file every namespace sees (they share the file system),
    or the etcd members on the underlay."""
    mesh = topo.mesh
    assert mesh is not None
    if mesh.registry == "sqlite":
        return f"sqlite://{topo.run_dir}/mesh.db"
    return "etcd://" + ",".join(f"{mesh.etcd_address}:{ETCD_PORT + i}"
                                for i in range(ETCD_MEMBERS))


def agent_argv(topo: Topology, h: Host) -> list[str]:
    """`tunl mesh agent` for member h, its public IP that of its underlay device."""
    assert topo.mesh is not None
    return ["tunl", "mesh", "agent", "--registry", registry_url(topo), "--iface", UNDERLAY_DEV,
            "--node", h.name, "--ttl", str(topo.mesh.ttl), "--resync", str(RESYNC),
            "--subnet-file", f"{topo.run_dir}/{h.name}.subnet.env"]


def init_argv(topo: Topology) -> list[str]:
    mesh = topo.mesh
    assert mesh is not None
    return ["tunl", "mesh", "init", "--registry", registry_url(topo), "--network",
            str(mesh.network), "--subnet-len", str(mesh.subnet_len), "--mode", mesh.mode] \
        + (["--cross-subnet"] if mesh.cross_subnet else [])


def route_dev(h: Host, g: Host, cross_subnet: bool) -> str:
    """The device of member h's route to member g's subnet: the underlay device when a
    cross-subnet mesh routes to g directly (g's underlay address is on-link to h's), else the
    tunnel."""
    return UNDERLAY_DEV if cross_subnet and h.same_subnet(g) else MESH_DEV


# -- what a member has --------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeState:
    subnet: IPv4Network | None                         # from the address of mybr0
    routes: dict[IPv4Network, tuple[str | None, str]]  # proto 116: dst -> (gateway, dev)


def parse_routes(text: str) -> dict[IPv4Network, tuple[str | None, str]]:
    """`ip -j -4 route show proto 116`: {dst: (gateway, dev)}."""
    out = {}
    for r in json.loads(text or "[]"):
        dst = r.get("dst", "")
        if dst == "default":
            dst = "0.0.0.0/0"
        try:
            out[IPv4Network(dst)] = (r.get("gateway"), r.get("dev", ""))
        except ValueError:
            continue
    return out


def parse_subnet(text: str) -> IPv4Network | None:
    """`ip -j -4 addr show dev mybr0`: the network of its first IPv4 address."""
    for link in json.loads(text or "[]"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                return IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
    return None


def node_state(ns: str) -> NodeState:
    r = netns.run(["ip", "-n", ns, "-j", "-4", "route", "show", "proto", RTPROT_TUNL],
                  timeout=10)
    routes = parse_routes(r.stdout) if r.returncode == 0 else {}
    r = netns.run(["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", MESH_BRIDGE], timeout=10)
    subnet = parse_subnet(r.stdout) if r.returncode == 0 else None
    return NodeState(subnet, routes)


def missing(members: list[Host], states: dict[str, NodeState],
            cross_subnet: bool = False) -> list[str]:
    """What keeps the mesh from being whole (pure): for each member, each other member's
    subnet it has no route to (or one via another gateway or device: route_dev), and each route
    of proto 116 it has to no member's subnet. Empty when every member routes to every other."""
    out = []
    subnets = {h.name: states[h.name].subnet for h in members}
    for h in members:
        if subnets[h.name] is None:
            out.append(f"{h.name}: no subnet yet ({MESH_BRIDGE} has no address)")
    for h in members:
        routes = dict(states[h.name].routes)
        for g in members:
            subnet = subnets[g.name]
            if g is h or subnet is None:
                continue
            got = routes.pop(subnet, None)
            want = (str(g.address.ip), route_dev(h, g, cross_subnet))
            if got is None:
                out.append(f"{h.name}: no route to {g.name}'s {subnet}")
            elif got != want:
                out.append(f"{h.name}: {subnet} via {got[0]} dev {got[1]}, not via {want[0]}"
                           f" dev {want[1]}")
        for dst, (via, dev) in sorted(routes.items()):
            out.append(f"{h.name}: a route to {dst} via {via} dev {dev}, no member's subnet")
    return out


# -- etcd in the underlay namespace -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], object]):
    """fn() in a thread of its own that has entered namespace `ns` (setns(2) moves only the
    calling thread): its sockets are the namespace's. The thread ends with fn."""
    box: dict = {}

    def target():
        try:
            fd = os.open(os.path.join(netns.NETNS_RUN_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns {ns}: {os.strerror(e)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:          # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"in {ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class NsEtcdCluster(EtcdCluster):
    """EtcdCluster (etcd.py) with its members in network namespace `ns`: each member's command
    starts with `ip netns exec NS`, and the health checks are made from inside NS. The ports are
    fixed (a fresh namespace has none in use)."""

    def __init__(self, ns: str, workdir: str, host: str, size: int = ETCD_MEMBERS,
                 base_port: int = ETCD_PORT):
        super().__init__(size, workdir, host=host, base_port=base_port)
        self.ns = ns

    def _argv(self, i: int, state: str) -> list[str]:
        return netns.exec_argv(self.ns, super()._argv(i, state))

    def healthy(self, i: int, timeout: float = 1.0) -> bool:
        return bool(in_netns(self.ns, lambda: EtcdCluster.healthy(self, i, timeout)))


# -- the mesh of a lab ------------------------------------------------------------------------

def log_tail(path: str, lines: int = LOG_TAIL) -> list[str]:
    try:
        with open(path, "rb") as f:
            text = f.read()[-8192:].decode(errors="replace")
    except OSError:
        return ["(no log)"]
    return text.splitlines()[-lines:]


class MeshLab:
    """The running mesh of a lab that is up: its registry, its agents (processes of ours)."""

    def __init__(self, topo: Topology, log: Log, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        assert topo.mesh is not None
        self.topo = topo
        self.mesh: Mesh = topo.mesh
        self.members = list(topo.members)
        self.dir = topo.run_dir
        self.url = registry_url(topo)
        self.log = log
        self.clock, self.sleep = clock, sleep
        self.agents: dict[str, subprocess.Popen] = {}
        self.etcd: NsEtcdCluster | None = None
        self.joined_in: float | None = None          # seconds from the agents' start to whole

    def agent_log(self, h: Host | str) -> str:
        return os.path.join(self.dir, f"agent-{h if isinstance(h, str) else h.name}.log")

    # -- start ----------------------------------------------------------------------------------

    def start(self, within: float = CONVERGE_WITHIN) -> float:
        """Registry, init, agents; returns the seconds from the agents' start until every member
        has every route."""
        shutil.rmtree(self.dir, ignore_errors=True)       # a crashed lab's, not a running one's
        os.makedirs(self.dir, mode=0o700)
        if self.mesh.registry == "etcd":
            self.start_etcd()
        self.init()
        t0 = self.clock()
        for h in self.members:
            self.start_agent(h)
        self.wait_whole(t0, within)
        self.joined_in = self.clock() - t0
        return self.joined_in

    def start_etcd(self) -> None:
        if shutil.which("etcd") is None:
            raise LabError("etcd: not found (install etcd-server, or say registry = \"sqlite\")")
        ul, addr = self.topo.ns_underlay, self.mesh.etcd_address
        underlay = self.topo.underlay
        if not underlay.segments:
            iface = f"{addr}/{underlay.cidr.prefixlen}"
            self.log(f"[ul] {BRIDGE} {iface}; etcd, {ETCD_MEMBERS} members on {addr}")
            netns.ip("addr", "add", iface, "dev", BRIDGE, ns=ul)
        elif addr in {s.router for s in underlay.segments}:
            self.log(f"[ul] etcd, {ETCD_MEMBERS} members on {addr} (a router address: every"
                     " segment reaches it)")
        else:
            # a /32: the segments' connected routes stay as they are, and every host reaches
            # it through its router (or on-link, when it is in the host's segment: the underlay
            # namespace answers ARP for each of its addresses on every bridge)
            seg = underlay.segment(addr)
            bridge = seg.bridge if seg is not None else BRIDGE
            self.log(f"[ul] {bridge} {addr}/32; etcd, {ETCD_MEMBERS} members on {addr}")
            netns.ip("addr", "add", f"{addr}/32", "dev", bridge, ns=ul)
        self.etcd = NsEtcdCluster(ul, os.path.join(self.dir, "etcd"), str(addr))
        self.etcd.start()

    def init(self) -> None:
        argv = init_argv(self.topo)
        self.log(f"[ul] {' '.join(argv)}")
        r = netns.run(netns.exec_argv(self.topo.ns_underlay, argv), timeout=60,
                      env=netns.tool_env())
        if r.returncode != 0:
            raise LabError(f"mesh: {' '.join(argv[:3])} failed (exit {r.returncode})"
                           + (f": {r.last_error_line}" if r.last_error_line else ""))
        for line in r.stdout.splitlines():
            self.log(f"[ul]   {line}")

    def start_agent(self, h: Host) -> subprocess.Popen:
        """`tunl mesh agent` in h's namespace, in a session of its own (Ctrl-C at the terminal
        is for the lab, which ends the agents itself), its output appended to its log."""
        argv = agent_argv(self.topo, h)
        self.log(f"[{h.name}] {' '.join(argv)} &  (log {self.agent_log(h)})")
        with open(self.agent_log(h), "ab") as f:
            p = subprocess.Popen(netns.exec_argv(self.topo.ns_host(h), argv),
                                 stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                 env=netns.tool_env(), start_new_session=True)
        self.agents[h.name] = p
        return p

    def stop_agent(self, h: Host) -> int:
        """SIGTERM to h's agent (it keeps its lease and routes, as on a restart); its pid."""
        p = self.agents[h.name]
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        return p.pid

    def leave(self, h: Host) -> list[str]:
        """`tunl mesh leave` in h's namespace (its agent stopped first); its output lines."""
        argv = ["tunl", "mesh", "leave"]
        self.log(f"[{h.name}] {' '.join(argv)}")
        r = netns.run(netns.exec_argv(self.topo.ns_host(h), argv), timeout=30,
                      env=netns.tool_env())
        if r.returncode != 0:
            raise LabError(f'host "{h.name}": tunl mesh leave failed (exit {r.returncode})'
                           + (f": {r.last_error_line}" if r.last_error_line else ""))
        return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]

    def move(self, h: Host, address: IPv4Interface) -> Host:
        """Member h to `address` in another segment, its agent running: the underlay moved
        (control.move_host); the agent sees eth0's new address at its next resync and rewrites
        its lease (same subnet, new public IP), and every other member re-routes it. Returns h
        as it now is; the lab's members are updated (`missing` checks the routes to its new
        address). Whether the mesh is whole again is wait_whole's."""
        from . import control
        moved = control.move_host(self.topo, h, address, self.log)
        self.members = [moved if m.name == h.name else m for m in self.members]
        return moved

    def kill_agent(self, h: Host) -> int:
        """SIGKILL to h's agent (as a power loss would end it); its pid."""
        p = self.agents[h.name]
        p.send_signal(signal.SIGKILL)
        p.wait()
        return p.pid

    # -- looking --------------------------------------------------------------------------------

    def states(self, hosts: list[Host] | None = None) -> dict[str, NodeState]:
        return {h.name: node_state(self.topo.ns_host(h)) for h in hosts or self.members}

    def missing(self) -> list[str]:
        return missing(self.members, self.states(), self.mesh.cross_subnet)

    def _check_agents(self) -> None:
        for name, p in self.agents.items():
            if p.poll() is not None:
                tail = "; ".join(log_tail(self.agent_log(name), 2))
                raise LabError(f'host "{name}": tunl mesh agent exited ({p.returncode}): {tail}')

    def wait_whole(self, t0: float, within: float) -> float:
        """Until every member routes to every other; the seconds since t0. LabError naming
        what is missing after `within` seconds, or when an agent exits."""
        while True:
            gaps = self.missing()
            now = self.clock()
            if not gaps:
                return now - t0
            self._check_agents()
            if now - t0 > within:
                more = f" (and {len(gaps) - 3} more)" if len(gaps) > 3 else ""
                first = gaps[0].split(":", 1)[0]
                said = log_tail(self.agent_log(first), 1)
                raise LabError(f"mesh: not whole {within:g} s after the agents started: "
                               + "; ".join(gaps[:3]) + more
                               + (f"; {first}'s agent said last: {said[0]}" if said else ""))
            self.sleep(POLL)

    def wait_gone(self, subnet: IPv4Network, hosts: list[Host], t0: float,
                  within: float) -> dict[str, float | None]:
        """{host: seconds after t0 when its route to `subnet` was first seen gone}; None for a
        host that still had it `within` seconds after t0."""
        gone: dict[str, float | None] = {}
        while True:
            for h in hosts:
                if h.name not in gone and subnet not in self.states([h])[h.name].routes:
                    gone[h.name] = self.clock() - t0
            if len(gone) == len(hosts):
                return gone
            if self.clock() - t0 > within:
                return {h.name: gone.get(h.name) for h in hosts}
            self.sleep(POLL)

    def reap(self) -> None:
        """Collect the agents the lab's teardown ended (they are our children)."""
        for p in self.agents.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def start(topo: Topology, log: Log) -> MeshLab:
    lab = MeshLab(topo, log)
    lab.start()
    return lab
