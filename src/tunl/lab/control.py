"""Bring a lab up and down, and find the namespace of a node in a running lab.

up:  tl-<lab>-ul with bridge br0 (with segments: one bridge per segment, br0, br1, ..., each
     with its router address, and ip_forward on: the underlay namespace routes between them);
     per host a namespace tl-<lab>-<host> whose eth0 is a veth into br0 (its segment's bridge),
     with the host's underlay address (and a default route via its segment's router), lo up
     and ip_forward on; then each host's
     commands in order (`ip netns exec NS sh -c CMD`, with `tunl` on PATH); then, for a lab
     with a [mesh], its registry and an agent per member, until every member routes to every
     other (mesh.py); then each container: a namespace tl-<lab>-<host>-<container> whose eth0
     is a veth into the host's bridge, with a default route via the gateway. Any failure,
     Ctrl-C included, tears the whole lab down before the error goes on.
down: end the processes in each of the lab's namespaces (a mesh's agents and etcd members
     among them), then delete the namespaces (which takes their links with them), then the
     lab's run dir (a mesh's registry and logs). Idempotent: a lab that is not up gives an
     empty report (`tunl lab down` says so, and exits 1).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING, Callable, Sequence

from . import netns
from .netns import LabError
from .topology import BRIDGE, BRIDGE_PREFIX, UNDERLAY, Host, Topology, ns_prefix, run_dir, split_ns

if TYPE_CHECKING:
    from .mesh import MeshLab

COMMAND_TIMEOUT = 60.0      # seconds for one of a host's commands

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class DownReport:
    namespaces: tuple[str, ...]
    processes: int


# -- up --------------------------------------------------------------------------------------

def lab_namespaces(lab: str) -> list[str]:
    """The namespaces of `lab` that exist now."""
    prefix = ns_prefix(lab)
    return [ns for ns in netns.list_ns() if ns.startswith(prefix)]


def check_not_up(topo: Topology) -> None:
    """LabError when a lab of that name is up; nothing was created, so nothing is torn down:
    those namespaces are not ours."""
    existing = lab_namespaces(topo.name)
    if existing:
        shown = topo.ns_underlay if topo.ns_underlay in existing else existing[0]
        raise LabError(f'lab "{topo.name}" is already up (namespace {shown} exists):'
                       " run `tunl lab down FILE` first")


def up(topo: Topology, *, log: Log = _quiet,
       timeout: float = COMMAND_TIMEOUT) -> "MeshLab | None":
    """Build the lab; on any failure (or KeyboardInterrupt) tear it down and re-raise. Returns
    the running mesh of a lab with a [mesh], else None."""
    check_not_up(topo)
    try:
        return _build(topo, log, timeout)
    except BaseException:
        with uninterrupted():
            down(topo.name)
        raise


def _build(topo: Topology, log: Log, timeout: float) -> "MeshLab | None":
    mtu = str(topo.underlay.mtu)
    ul = topo.ns_underlay
    segments = topo.underlay.segments
    if not segments:
        log(f"[{UNDERLAY}] namespace {ul}, bridge {BRIDGE} mtu {mtu}")
    netns.add(ul)
    netns.ip("link", "set", "lo", "up", ns=ul)
    if not segments:
        netns.ip("link", "add", BRIDGE, "mtu", mtu, "type", "bridge", ns=ul)
        netns.ip("link", "set", BRIDGE, "up", ns=ul)
    for seg in segments:
        log(f"[{UNDERLAY}] namespace {ul}, bridge {seg.bridge} mtu {mtu}: segment {seg.cidr},"
            f" router {seg.router}")
        # a bridge takes its lowest port's MAC unless given one: a port that moves between
        # bridges would change the router's MAC under the hosts' ARP caches
        mac = f"02:74:6c:00:00:{int(seg.bridge[len(BRIDGE_PREFIX):]) + 1:02x}"
        netns.ip("link", "add", seg.bridge, "address", mac, "mtu", mtu, "type", "bridge", ns=ul)
        netns.ip("addr", "add", str(seg.router_interface), "dev", seg.bridge, ns=ul)
        netns.ip("link", "set", seg.bridge, "up", ns=ul)
    if segments:
        # the underlay namespace is the router between the segments
        log(f"[{UNDERLAY}] net.ipv4.ip_forward=1")
        netns.set_sysctl(ul, "net.ipv4.ip_forward", "1")
    for h in topo.hosts:
        with _about(h):
            _build_host(topo, h, mtu, log)
    for h in topo.hosts:
        ns = topo.ns_host(h)
        for cmd in h.commands:
            log(f"[{h.name}] {cmd}")
            r = netns.sh(ns, cmd, timeout=timeout)
            if r.returncode != 0:
                why = r.last_error_line
                raise LabError(f'host "{h.name}": command "{cmd}" failed (exit {r.returncode})'
                               + (f": {why}" if why else ""))
            _echo(log, h.name, r)
    running = None
    if topo.mesh is not None:
        from . import mesh
        running = mesh.start(topo, log)
    for h in topo.hosts:
        ns = topo.ns_host(h)
        for c in h.containers:
            with _about(h, c.name):
                cns = topo.ns_container(h, c)
                log(f"[{h.name}] container {c.name}: namespace {cns}, {c.address}"
                    f" on {c.bridge}, default via {c.gateway}")
                netns.add(cns)
                netns.ip("link", "add", c.port, "type", "veth", "peer", "name", "eth0",
                         "netns", cns, ns=ns)
                netns.ip("link", "set", c.port, "master", c.bridge, "up", ns=ns)
                netns.ip("addr", "add", str(c.address), "dev", "eth0", ns=cns)
                netns.ip("link", "set", "eth0", "up", ns=cns)
                netns.ip("link", "set", "lo", "up", ns=cns)
                netns.ip("route", "add", "default", "via", str(c.gateway), ns=cns)
    return running


def _build_host(topo: Topology, h: Host, mtu: str, log: Log) -> None:
    ns, ul = topo.ns_host(h), topo.ns_underlay
    bridge, seg = topo.bridge_of(h), topo.segment_of(h)
    log(f"[{h.name}] namespace {ns}, eth0 {h.address} (peer {h.port} on {bridge})"
        + (f", default via {seg.router}" if seg else ""))
    netns.add(ns)
    # created in the namespaces directly: the root namespace never sees these names
    netns.ip("link", "add", h.port, "mtu", mtu, "type", "veth",
             "peer", "name", "eth0", "mtu", mtu, "netns", ns, ns=ul)
    netns.ip("link", "set", h.port, "master", bridge, "up", ns=ul)
    netns.ip("addr", "add", str(h.address), "dev", "eth0", ns=ns)
    netns.ip("link", "set", "eth0", "up", ns=ns)
    netns.ip("link", "set", "lo", "up", ns=ns)
    if seg is not None:
        netns.ip("route", "add", "default", "via", str(seg.router), "dev", "eth0", ns=ns)
    # hosts route for their containers, as a node routes for its pods
    netns.set_sysctl(ns, "net.ipv4.ip_forward", "1")


def move_host(topo: Topology, h: Host, address: IPv4Interface, log: Log = _quiet) -> Host:
    """Readdress host h into the segment of `address`, as a machine moved to another subnet:
    its port goes to that segment's bridge, its eth0 gets the new address (the old one, and the
    routes through it, go), its default route the new segment's router. Returns h as it now is.
    """
    seg = topo.underlay.segment(address)
    if seg is None or address.network != seg.cidr:
        raise LabError(f'host "{h.name}": {address} is no address of a segment of the underlay')
    ns, ul = topo.ns_host(h), topo.ns_underlay
    log(f"[{h.name}] eth0 {h.address} -> {address} (peer {h.port} on {seg.bridge}), default"
        f" via {seg.router}")
    netns.ip("link", "set", h.port, "nomaster", ns=ul)
    netns.ip("link", "set", h.port, "master", seg.bridge, "up", ns=ul)
    netns.ip("addr", "flush", "dev", "eth0", ns=ns)
    netns.ip("addr", "add", str(address), "dev", "eth0", ns=ns)
    netns.ip("route", "replace", "default", "via", str(seg.router), "dev", "eth0", ns=ns)
    return replace(h, address=address)


@contextmanager
def _about(h: Host, container: str | None = None):
    """Prefix a failing step's error with the host (and container) it was for."""
    try:
        yield
    except LabError as e:
        where = f'host "{h.name}": ' + (f'container "{container}": ' if container else "")
        raise LabError(where + str(e)) from e


def _echo(log: Log, name: str, r: netns.Result) -> None:
    for text in (r.stdout, r.stderr):
        for line in text.splitlines():
            log(f"[{name}]   {line}")


# -- down ------------------------------------------------------------------------------------

def _depth(ns: str) -> int:
    """Containers first, then hosts, the underlay last."""
    parts = split_ns(ns)
    node = parts[1] if parts else ""
    if node == UNDERLAY:
        return 0
    return 1 + node.count("-")


def down(lab: str, *, log: Log = _quiet) -> DownReport:
    """End every process in the lab's namespaces, then delete the namespaces."""
    names = sorted(lab_namespaces(lab), key=_depth, reverse=True)
    if not names:
        return DownReport((), 0)
    ended = 0
    for ns in names:
        n = netns.end_processes(ns)
        if n:
            log(f"{ns}: ended {n} process{'es' if n != 1 else ''}")
        ended += n
    for ns in names:
        log(f"{ns}: deleted")
        netns.delete(ns)
    if os.path.isdir(run_dir(lab)):
        log(f"{run_dir(lab)}: removed")
        shutil.rmtree(run_dir(lab), ignore_errors=True)
    return DownReport(tuple(names), ended)


@contextmanager
def uninterrupted():
    """Ignore Ctrl-C while tearing down, so that a second Ctrl-C cannot leave half a lab."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# -- finding nodes ---------------------------------------------------------------------------

def running_labs() -> dict[str, list[str]]:
    """{lab: [node, ...]} of the labs up now.

    A lab is up when its underlay namespace tl-<lab>-ul is there: other tools' namespaces that
    merely start with "tl-" (test fixtures, benchmarks) are no lab.
    """
    labs: dict[str, list[str]] = {}
    for ns in netns.list_ns():
        parts = split_ns(ns)
        if parts:
            labs.setdefault(parts[0], []).append(parts[1])
    return {lab: nodes for lab, nodes in labs.items() if UNDERLAY in nodes}


def find_node(node: str, lab: str | None = None) -> str:
    """The namespace of NODE (a host, `host-container`, or `ul`) in the one lab that has it."""
    labs = running_labs()
    if lab is not None:
        if lab not in labs:
            raise LabError(f'lab "{lab}" is not up')
        if node not in labs[lab]:
            raise LabError(f'lab "{lab}" has no node "{node}" (it has: '
                           f'{", ".join(sorted(labs[lab]))})')
        return f"tl-{lab}-{node}"
    having = sorted(name for name, nodes in labs.items() if node in nodes)
    if not having:
        up_ = ", ".join(sorted(labs)) or "none"
        raise LabError(f'no running lab has a node "{node}" (labs up: {up_})')
    if len(having) > 1:
        raise LabError(f'node "{node}" is in several running labs ({", ".join(having)}):'
                       " choose one with --lab")
    return f"tl-{having[0]}-{node}"


def exec_in(ns: str, argv: Sequence[str]) -> int:
    """Run argv in namespace ns with the terminal; returns its exit code (128+N for signal N).

    Ctrl-C goes to the command (it is in our process group) and the command decides; we wait.
    """
    try:
        p = subprocess.Popen(netns.exec_argv(ns, argv), env=netns.tool_env())
    except FileNotFoundError as e:
        raise LabError("ip: not found (install iproute2)") from e
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        code = p.wait()
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
    return 128 - code if code < 0 else code
