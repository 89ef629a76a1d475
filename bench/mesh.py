"""Benchmark the overlay's control plane, `tunl mesh`, at 1,000 peers over a real etcd cluster.

Run as root:  .venv/bin/python bench/mesh.py [--peers 1000] [--agents 3] [--trials 50]
                                             [--quiet 30] [--restarts 3] [--expiries 5] [--json]

What runs, all in fresh network namespaces tlb-<random>-*:

  hub    a namespace with a bridge br0 (198.18.0.1/24, RFC 2544's benchmarking range) and a
         3-member etcd cluster (tunl.lab.etcd.EtcdCluster) listening on 198.18.0.1. This
         script itself enters the hub namespace (setns) before anything else, so that etcd, the
         registrations, the health checks and every metrics scrape live there; the root
         namespace gets no device, address or route, and all traffic stays inside the lab.
  a0..   one namespace per real agent, joined to br0 by a veth (eth0, 198.18.0.11, .12, ...):
         that address is the agent's public IP and the path to etcd. An etcd on 127.0.0.1 of
         the root namespace would be out of the agents' reach; this way etcd listens on an
         address every agent routes to, and the root namespace gets no bridge or veth.
         Each runs `tunl mesh agent --registry etcd://198.18.0.1:P0,P1,P2 --public-ip
         198.18.0.1N --node bench-aN --metrics 9101` with the default TTL (20 s) and resync
         (10 s), and the data plane `auto` gives.

The overlay is 10.64.0.0/10 with /24 subnets. --peers leases are registered straight into
etcd through the mesh's own Registry/Store API (one etcd lease each, granted for an hour so
that nothing renews them, and a claim of flannel's key); their public IPs are in 100.64.0.0/10,
which no agent uses. Measured, in this order:

  start        the registrations' rate, and the time until every agent holds all routes
               (--peers + agents - 1 each) after they were started together.
  quiet        --quiet seconds with no registry change. Per agent: CPU (utime+stime from
               /proc/PID/stat, % of one core) and RSS (VmRSS; VmHWM is the peak). The no-op
               reconcile: in a quiet interval every reconcile an agent runs is a periodic resync
               that has nothing to change, so the deltas of its tunl_mesh_reconcile_seconds
               histogram (sum / count, scraped from --metrics over the bridge) give one pass's
               mean time, and its buckets bound the slowest. Registry operations: etcd's
               grpc_server_started_total by method, summed over the three members, before and
               after (every request through etcd's JSON gateway is one gRPC call, a keepalive
               is one LeaseKeepAlive stream; peer traffic is not gRPC and the bench sends
               nothing meanwhile). Renewals = LeaseKeepAlive calls; Range calls are the agents'
               full listings (one every 60 s per agent; the watch has the rest); Watch calls
               are watch streams opened again. Printed: the requests of
               a renewal itself, and all registry requests divided by renewals; and, scaled to
               --peers such agents, requests/s and the bytes etcd sends (grpc sent bytes).
  convergence  --trials joins and expiries, alternating, each a fresh /24 under its own etcd
               lease. Join: t0 just before the claim (a txn put) is sent; expiry: t0 just
               before the lease is revoked (revoke, not TTL run-out, for these timings: etcd
               deletes the key at once, so what is timed is the agents). The end is the moment
               the route is added/deleted on the LAST agent, taken from an rtnetlink socket
               opened in each agent's namespace (RTMGRP_IPV4_ROUTE, proto 116), timestamped by
               one reader thread on this script's monotonic clock as each message arrives.
               Percentiles are nearest-rank: with 50 trials p99 is the slowest of them.
               Then --expiries leases left to run out (TTL 2 s, never renewed): from the grant
               sent + 2 s to the route gone on every agent; that includes etcd's own expiry
               check (every 500 ms), so it is printed apart and not judged.
  resync       agent a0 stopped (SIGTERM), its proto-116 routes flushed, started again: from the
               spawn to the last of its routes added, --restarts times. The agent's stderr lines
               are timestamped as they arrive, which splits this into the process start (Python
               and imports, to the first log line), registry (config, lease, tunnel, listing, to
               "registry ... answers") and programming (plan and the route adds).
               Between the join/expiry trials, the agents' reconcile histogram and CPU give the
               mean reconcile pass and the agent CPU per registry event.

Goals, printed as met or MISSED: p99 convergence <= 1 s (join and revoke-expiry), full resync
<= 1 s (the slowest restart, spawn to last route), agent RSS <= 60 MB (the largest).

A benchmark, not a test: it asserts nothing about time. It always removes what it made (agents,
tunld, etcd, namespaces, their state directories under /run/tunl, its work directory), also on
Ctrl-C or failure, and ends only processes it started or that live in its own namespaces.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from ipaddress import IPv4Address, IPv4Network

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_seconds, interrupt_on_signals, machine  # noqa: E402  (bench/bench.py)
from tunl.daemon.state import netns_id  # noqa: E402
from tunl.lab import netns as lab  # noqa: E402
from tunl.lab.etcd import EtcdCluster  # noqa: E402
from tunl.mesh.agent import DEFAULT_TTL, RESYNC  # noqa: E402
from tunl.mesh.network import Lease  # noqa: E402
from tunl.mesh.registry import Registry  # noqa: E402
from tunl.mesh.store import open_store  # noqa: E402

BIN = os.path.dirname(sys.executable)
TUNL = os.path.join(BIN, "tunl")
ENV = {**os.environ, "PATH": BIN + ":" + os.environ.get("PATH", "")}
HUB_IP = "198.18.0.1"                     # br0 in the hub: etcd listens here
AGENT_IP = "198.18.0.{}"                  # eth0 of agent i: 11 + i
NETWORK, SUBNET_LEN = "10.64.0.0/10", 24   # room for 16,383 subnets
FAKE_IPS = IPv4Address("100.64.0.0")      # the registered leases' public IPs
FAKE_TTL = 3600                           # s: never renewed, never runs out within a run
RUNOUT_TTL = 2                            # s: the leases left to run out
METRICS_PORT = 9101
REGISTRARS = 8                            # threads registering the --peers leases
STEP_TIMEOUT = 15.0                       # s a trial waits for every agent, then: timed out
GOAL_CONVERGE, GOAL_RESYNC, GOAL_RSS_MB = 1.0, 1.0, 60.0

CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33
RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST = 1
RTPROT_TUNL = 116
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` names (Python 3.11 has no
    os.setns)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def now() -> float:
    return time.monotonic()


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None of nothing."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def median(xs: list[float]) -> float | None:
    return pct(xs, 0.5)


# -- the routes of every agent, as the kernel announces them ------------------------------------

def _parse_routes(buf: bytes, n: int):
    """(type, dst) of each IPv4 proto-116 RTM_NEWROUTE/RTM_DELROUTE in one netlink datagram."""
    off = 0
    while off + 16 <= n:
        length, kind = struct.unpack_from("=IH", buf, off)
        if length < 16 or off + length > n:
            return
        if kind in (RTM_NEWROUTE, RTM_DELROUTE) and length >= 28:
            family, dst_len = buf[off + 16], buf[off + 17]
            proto = buf[off + 21]
            if family == socket.AF_INET and proto == RTPROT_TUNL:
                a, end, dst = off + 28, off + length, "0.0.0.0"
                while a + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", buf, a)
                    if alen < 4:
                        break
                    if atype == RTA_DST and alen >= 8:
                        dst = socket.inet_ntoa(bytes(buf[a + 4:a + 8]))
                    a += (alen + 3) & ~3
                yield kind, f"{dst}/{dst_len}"
        off += (length + 3) & ~3


class RouteWatch:
    """One rtnetlink socket per agent namespace, subscribed to IPv4 route changes, all read by
    one thread that timestamps each datagram on arrival. Per agent: the proto-116 routes it
    holds now, and when each destination was last added and last deleted."""

    def __init__(self):
        self.cond = threading.Condition()
        self.socks: dict[str, socket.socket] = {}
        self.routes: dict[str, set[str]] = {}
        self.added: dict[str, dict[str, float]] = {}
        self.deleted: dict[str, dict[str, float]] = {}
        self.overflows: dict[str, int] = {}
        self.ns: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, ns: str) -> str:
        """Open the socket inside ns (this thread visits it and comes back); ns's tunl state id."""
        target = os.open(f"{lab.NETNS_RUN_DIR}/{ns}", os.O_RDONLY)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            setns(target)
            try:
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
                s.bind((0, RTMGRP_IPV4_ROUTE))
                ident = netns_id()
            finally:
                setns(home)
        finally:
            os.close(target)
            os.close(home)
        s.setblocking(False)
        with self.cond:
            self.socks[name], self.ns[name] = s, ns
            self.routes[name], self.added[name], self.deleted[name] = set(), {}, {}
            self.overflows[name] = 0
        return ident

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="route-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select
        buf = bytearray(1 << 20)
        while not self._stop.is_set():
            by_fd = {s.fileno(): name for name, s in self.socks.items()}
            ready, _, _ = select.select(list(by_fd), [], [], 0.2)
            for fd in ready:
                name = by_fd[fd]
                s = self.socks[name]
                while True:
                    try:
                        n = s.recv_into(buf)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno == errno.ENOBUFS:      # lost messages: read the truth again
                            self.overflows[name] += 1
                            self._reread(name)
                            continue
                        raise
                    t = now()
                    with self.cond:
                        for kind, dst in _parse_routes(buf, n):
                            if kind == RTM_NEWROUTE:
                                self.routes[name].add(dst)
                                self.added[name][dst] = t
                            else:
                                self.routes[name].discard(dst)
                                self.deleted[name][dst] = t
                        self.cond.notify_all()

    def _reread(self, name: str) -> None:
        out = subprocess.run(["ip", "-n", self.ns[name], "-4", "route", "show", "proto",
                              str(RTPROT_TUNL)], capture_output=True, text=True).stdout
        have = {line.split()[0] for line in out.splitlines() if line.strip()}
        with self.cond:
            self.routes[name] = {d if "/" in d else d + "/32" for d in have}
            self.cond.notify_all()

    def wait(self, pred, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def count(self, name: str) -> int:
        with self.cond:
            return len(self.routes[name])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for s in self.socks.values():
            s.close()


# -- agents -------------------------------------------------------------------------------------

class AgentProc:
    """One `tunl mesh agent` in its namespace; its stderr lines timestamped as they arrive (and
    kept in <workdir>/<name>.log)."""

    def __init__(self, name: str, ns: str, ip: str, url: str, workdir: str):
        self.name, self.ns, self.ip, self.url = name, ns, ip, url
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.p: subprocess.Popen | None = None
        self.lines: list[tuple[float, str]] = []
        self.t_spawn = 0.0
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.lines = []
        argv = ["ip", "netns", "exec", self.ns, TUNL, "mesh", "agent", "--registry", self.url,
                "--public-ip", self.ip, "--node", f"bench-{self.name}", "--metrics",
                str(METRICS_PORT)]
        self.t_spawn = now()
        # `ip netns exec` execs the command: the PID is the agent's own
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=ENV)
        self._reader = threading.Thread(target=self._read, args=(self.p,), daemon=True)
        self._reader.start()

    def _read(self, p: subprocess.Popen) -> None:
        with open(self.log_path, "ab") as log:
            for line in p.stderr:
                self.lines.append((now(), line.decode(errors="replace").rstrip()))
                log.write(line)
        p.stderr.close()

    def first(self, pattern: str) -> float | None:
        """When the first stderr line matching pattern came (since the last start)."""
        rx = re.compile(pattern)
        for t, line in list(self.lines):
            if rx.search(line):
                return t
        return None

    def tail(self, n: int = 8) -> str:
        return "\n    ".join(line for _, line in self.lines[-n:])

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def stop(self, timeout: float = 10) -> None:
        p = self.p
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if self._reader is not None:
            self._reader.join(2)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.ip}:{METRICS_PORT}/metrics", timeout=5) as r:
            return prom(r.read().decode())


def prom(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


# -- the lab ------------------------------------------------------------------------------------

class Lab:
    def __init__(self, args):
        self.args = args
        tag = uuid.uuid4().hex[:6]
        self.hub = f"tlb-{tag}-hub"
        self.agent_ns = [f"tlb-{tag}-a{i}" for i in range(args.agents)]
        self.made: list[str] = []
        self.state_dirs: list[str] = []
        self.workdir = tempfile.mkdtemp(prefix=f"tlb-mesh-{tag}-")
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)   # the root namespace, to go back
        self.cluster: EtcdCluster | None = None
        self.watch = RouteWatch()
        self.agents: list[AgentProc] = []
        self.store = None

    def setup(self) -> None:
        self.made.append(self.hub)
        lab.add(self.hub)
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                    ["addr", "add", f"{HUB_IP}/24", "dev", "br0"], ["link", "set", "br0", "up"]):
            lab.ip(*cmd, ns=self.hub)
        for i, ns in enumerate(self.agent_ns):
            self.made.append(ns)
            lab.add(ns)
            lab.ip("link", "set", "lo", "up", ns=ns)
            lab.ip("link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns,
                   ns=self.hub)
            lab.ip("link", "set", f"p{i}", "master", "br0", "up", ns=self.hub)
            lab.ip("addr", "add", f"{AGENT_IP.format(11 + i)}/24", "dev", "eth0", ns=ns)
            lab.ip("link", "set", "eth0", "up", ns=ns)
            self.state_dirs.append(os.path.join("/run/tunl", self.watch.add(f"a{i}", ns)))
        self.watch.start()
        fd = os.open(f"{lab.NETNS_RUN_DIR}/{self.hub}", os.O_RDONLY)
        try:
            setns(fd)       # from here on this process (etcd, registrar, scrapes) is in the hub
        finally:
            os.close(fd)
        self.cluster = EtcdCluster(3, self.workdir, host=HUB_IP)
        self.cluster.start()
        self.agents = [AgentProc(f"a{i}", ns, AGENT_IP.format(11 + i), self.cluster.url,
                                 self.workdir) for i, ns in enumerate(self.agent_ns)]

    def close(self) -> None:
        """Undo everything, each step on its own: one that fails must not skip the others."""
        steps = [(f"stop agent {a.name}", lambda a=a: a.stop(5)) for a in self.agents]
        steps += [(f"end processes in {ns}", lambda ns=ns: lab.end_processes(ns))  # tunld too
                  for ns in self.agent_ns if ns in self.made]
        if self.store is not None:
            steps.append(("close registry client", self.store.close))
        if self.cluster is not None:
            steps.append(("stop etcd", self.cluster.stop))
        steps += [("close route watch", self.watch.close),
                  ("back to the root namespace", lambda: setns(self.home))]
        for ns in reversed(self.made):
            steps.append((f"delete {ns}", lambda ns=ns: (lab.end_processes(ns), lab.delete(ns))))
        for what, step in steps:
            try:
                step()
            except Exception as e:         # noqa: BLE001  (cleanup goes on, and says so)
                print(f"cleanup: {what}: {type(e).__name__}: {e}", file=sys.stderr)
        os.close(self.home)
        for d in self.state_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def expected(self) -> int:
        return self.args.peers + self.args.agents - 1

    def etcd_calls(self) -> dict[str, float]:
        """grpc_server_started_total by method, and the bytes etcd sent to clients, summed over
        the members."""
        out: dict[str, float] = {}
        for u in self.cluster.client_urls:
            with urllib.request.urlopen(u + "/metrics", timeout=5) as r:
                m = prom(r.read().decode())
            for k, v in m.items():
                if k.startswith("grpc_server_started_total{"):
                    method = re.search(r'grpc_method="([^"]+)"', k).group(1)
                    out[method] = out.get(method, 0) + v
                elif k == "etcd_network_client_grpc_sent_bytes_total":
                    out["sent_bytes"] = out.get("sent_bytes", 0) + v
        return out


def subnet(config, i: int) -> IPv4Network:
    """The i-th /SUBNET_LEN of the network (0 is the network's first, never leased)."""
    net = config.network
    return IPv4Network((int(net.network_address) + (i << (32 - config.subnet_len)),
                        config.subnet_len))


def fake_ip(j: int) -> IPv4Address:
    return FAKE_IPS + (j // 254) * 256 + j % 254 + 1


def progress(t0: float, what: str) -> None:
    print(f"[{now() - t0:5.0f} s] {what}", file=sys.stderr, flush=True)


# -- the measurements ---------------------------------------------------------------------------

def register(reg: Registry, config, i: int, ttl: int = FAKE_TTL) -> tuple[int, float, float]:
    """Lease subnet i to fake node i: (lease id, t before the claim, the claim's RTT)."""
    s = subnet(config, i)
    lease_id = reg.store.grant(ttl)
    lease = Lease(s, fake_ip(i), config.mode, f"fake-{i}")
    t0 = now()
    if not reg.store.claim(reg.key(s), lease.to_json(), lease_id, 0):
        raise RuntimeError(f"claim of {s} refused: the subnet is taken")
    return lease_id, t0, now() - t0


def register_many(lab_: Lab, prefix: str, config, indexes) -> None:
    """register() for each index, REGISTRARS at a time, each thread with its own client."""
    from concurrent.futures import ThreadPoolExecutor
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "reg"):
            local.reg = Registry(open_store(lab_.cluster.url, time.time)[0], prefix)
            with lock:
                stores.append(local.reg.store)
        register(local.reg, config, i)

    lock, stores = threading.Lock(), []
    try:
        with ThreadPoolExecutor(REGISTRARS) as pool:
            for _ in pool.map(one, indexes):
                pass
    finally:
        for st in stores:
            st.close()


def run(lab_: Lab, args, res: dict, t_start: float) -> None:
    progress(t_start, "namespaces, etcd (3 members) ...")
    lab_.setup()
    res["etcd"] = subprocess.run(["etcd", "--version"], capture_output=True,
                                 text=True).stdout.split("\n")[0].replace("etcd Version: ", "")
    init = subprocess.run([TUNL, "mesh", "init", "--registry", lab_.cluster.url, "--network",
                           NETWORK, "--subnet-len", str(SUBNET_LEN)], capture_output=True,
                          text=True, env=ENV)
    if init.returncode != 0:
        raise RuntimeError(f"tunl mesh init: {init.stderr.strip()}")
    store, prefix = open_store(lab_.cluster.url, time.time)
    lab_.store = store
    reg = Registry(store, prefix)
    config = reg.config()
    last = args.peers + 200 + args.trials + args.expiries
    if last >= config.size:
        raise RuntimeError(f"--peers {args.peers}: the network {config.network} has only "
                           f"{config.size} subnets")

    progress(t_start, f"registering {args.peers} leases ...")
    t0 = now()
    register_many(lab_, prefix, config, range(1, args.peers + 1))
    res["register_s"] = now() - t0

    progress(t_start, f"starting {args.agents} agents ...")
    names = [a.name for a in lab_.agents]
    t0 = now()
    for a in lab_.agents:
        a.start()
    want = lab_.expected()
    ok = lab_.watch.wait(lambda: all(len(lab_.watch.routes[n]) >= want for n in names)
                         or not all(a.alive() for a in lab_.agents), 180)
    dead = [a for a in lab_.agents if not a.alive()]
    if dead or not ok:
        a = dead[0] if dead else lab_.agents[0]
        raise RuntimeError(f"agents did not converge to {want} routes each "
                           f"({[lab_.watch.count(n) for n in names]}); {a.name}'s log:\n    "
                           f"{a.tail()}")
    res["cold_start_s"] = now() - t0
    res["dataplane"] = dataplane(lab_)
    time.sleep(2)        # the agents' first renewals and the last reconciles settle

    quiet(lab_, args, res, t_start)
    converge(lab_, args, res, reg, config, t_start)
    runout(lab_, args, res, reg, config, t_start)
    resync(lab_, args, res, t_start)


def dataplane(lab_: Lab) -> str:
    out = lab.sh(lab_.agent_ns[0], f"{TUNL} -j tunnel show tunl0")
    try:
        return json.loads(out.stdout)[0]["dataplane"]
    except (ValueError, IndexError, KeyError):
        return "?"


def quiet(lab_: Lab, args, res: dict, t_start: float) -> None:
    progress(t_start, f"quiet interval, {args.quiet:g} s ...")
    agents = lab_.agents
    m0 = [a.metrics() for a in agents]
    e0 = lab_.etcd_calls()
    c0 = [cpu_seconds(a.pid) for a in agents]
    t0 = now()
    time.sleep(args.quiet)
    c1 = [cpu_seconds(a.pid) for a in agents]
    t1 = now()
    e1 = lab_.etcd_calls()
    m1 = [a.metrics() for a in agents]
    dt = t1 - t0
    res["quiet_s"] = dt
    res["cpu_pct"] = [100 * (b - a) / dt for a, b in zip(c0, c1)]
    res["rss"] = [rss_kb(a.pid) for a in agents]
    s, c, slowest = 0.0, 0, 0.0
    for a, b in zip(m0, m1):
        n = int(b["tunl_mesh_reconcile_seconds_count"] - a["tunl_mesh_reconcile_seconds_count"])
        s += b["tunl_mesh_reconcile_seconds_sum"] - a["tunl_mesh_reconcile_seconds_sum"]
        c += n
        ba, bb = buckets(a), buckets(b)
        for le in sorted(bb):     # the smallest bucket bound that holds every pass of the window
            if n and bb[le] - ba.get(le, 0) >= n:
                slowest = max(slowest, le)
                break
    res["noop"] = {"passes": c, "mean_s": s / c if c else None, "slowest_le": slowest}
    calls = {k: e1.get(k, 0) - e0.get(k, 0) for k in e1 if k != "sent_bytes"}
    calls = {k: int(v) for k, v in calls.items() if v}
    renewals = calls.get("LeaseKeepAlive", 0)
    lists = calls.get("Range", 0)    # the agent reads nothing but full listings (every 60 s)
    gets = 0
    total = sum(calls.values())       # Watch too: a quiet watch stream is opened again
    res["registry"] = {"calls": calls, "renewals": renewals, "lists": lists, "gets": gets,
                       "total": total, "per_renewal": total / renewals if renewals else None,
                       "renewal_only": (total - lists - calls.get("Watch", 0)) / renewals
                       if renewals else None,
                       "sent_bytes_s": (e1["sent_bytes"] - e0["sent_bytes"]) / dt,
                       "expected_renewals": len(agents) * dt / (DEFAULT_TTL / 4)}


def buckets(m: dict[str, float]) -> dict[float, float]:
    """The reconcile histogram's cumulative buckets: {le: count} (+Inf as inf)."""
    out = {}
    for k, v in m.items():
        if k.startswith("tunl_mesh_reconcile_seconds_bucket{"):
            out[float(re.search(r'le="([^"]+)"', k).group(1))] = v
    return out


def converge(lab_: Lab, args, res: dict, reg: Registry, config, t_start: float) -> None:
    progress(t_start, f"convergence, {args.trials} joins and expiries ...")
    m0 = [a.metrics() for a in lab_.agents]
    c0 = [cpu_seconds(a.pid) for a in lab_.agents]
    try:
        _converge(lab_, args, res, reg, config)
    finally:
        c1 = [cpu_seconds(a.pid) for a in lab_.agents]
        m1 = [a.metrics() for a in lab_.agents]
        n = sum(b["tunl_mesh_reconcile_seconds_count"] - a["tunl_mesh_reconcile_seconds_count"]
                for a, b in zip(m0, m1))
        s = sum(b["tunl_mesh_reconcile_seconds_sum"] - a["tunl_mesh_reconcile_seconds_sum"]
                for a, b in zip(m0, m1))
        events = len(res.get("join", [])) + len(res.get("expiry", []))
        res["trials_reconcile"] = {"passes": int(n), "mean_s": s / n if n else None,
                                   "cpu_per_event_s": (sum(c1) - sum(c0)) / len(c0) / events
                                   if events else None}


def _converge(lab_: Lab, args, res: dict, reg: Registry, config) -> None:
    names = [a.name for a in lab_.agents]
    w = lab_.watch
    joins, expiries, rtt_claim, rtt_revoke, per_agent = [], [], [], [], {n: [] for n in names}
    timeouts = {"join": 0, "expiry": 0}
    rng = random.Random(1)
    for k in range(args.trials):
        i = args.peers + 200 + k
        dst = str(subnet(config, i))
        lease_id, t0, rtt = register(reg, config, i)
        rtt_claim.append(rtt)
        if w.wait(lambda: all(w.added[n].get(dst, 0) >= t0 for n in names), STEP_TIMEOUT):
            times = [w.added[n][dst] - t0 for n in names]
            joins.append(max(times))
            for n, t in zip(names, times):
                per_agent[n].append(t)
        else:
            timeouts["join"] += 1
        time.sleep(rng.uniform(0.05, 0.3))
        t0 = now()
        reg.store.revoke(lease_id)
        rtt_revoke.append(now() - t0)
        if w.wait(lambda: all(w.deleted[n].get(dst, 0) >= t0 for n in names), STEP_TIMEOUT):
            expiries.append(max(w.deleted[n][dst] - t0 for n in names))
        else:
            timeouts["expiry"] += 1
        time.sleep(rng.uniform(0.05, 0.3))
    res["join"], res["expiry"], res["timeouts"] = joins, expiries, timeouts
    res["rtt_claim"], res["rtt_revoke"] = rtt_claim, rtt_revoke
    res["join_first_agent"] = [min(per_agent[n][j] for n in names)
                               for j in range(min(len(v) for v in per_agent.values()))]


def runout(lab_: Lab, args, res: dict, reg: Registry, config, t_start: float) -> None:
    if not args.expiries:
        return
    progress(t_start, f"{args.expiries} leases left to run out (TTL {RUNOUT_TTL} s) ...")
    names = [a.name for a in lab_.agents]
    w = lab_.watch
    out, lost = [], 0
    for k in range(args.expiries):
        i = args.peers + 200 + args.trials + k
        dst = str(subnet(config, i))
        t_grant = now()
        lease_id = reg.store.grant(RUNOUT_TTL)
        lease = Lease(subnet(config, i), fake_ip(i), config.mode, f"fake-{i}")
        reg.store.claim(reg.key(subnet(config, i)), lease.to_json(), lease_id, 0)
        w.wait(lambda: all(w.added[n].get(dst, 0) >= t_grant for n in names), STEP_TIMEOUT)
        if w.wait(lambda: all(w.deleted[n].get(dst, 0) >= t_grant for n in names),
                  RUNOUT_TTL + STEP_TIMEOUT):
            out.append(max(w.deleted[n][dst] for n in names) - (t_grant + RUNOUT_TTL))
        else:
            lost += 1
    res["runout"], res["runout_lost"] = out, lost


def resync(lab_: Lab, args, res: dict, t_start: float) -> None:
    a = lab_.agents[0]
    w = lab_.watch
    want = lab_.expected()
    runs = []
    for r in range(args.restarts):
        progress(t_start, f"full resync {r + 1}/{args.restarts}: {a.name} restarted with its "
                          f"routes flushed ...")
        a.stop()
        lab.ip("route", "flush", "proto", str(RTPROT_TUNL), ns=a.ns)
        if not w.wait(lambda: not w.routes[a.name], 10):
            raise RuntimeError(f"{a.name}: {w.count(a.name)} routes left after the flush")
        time.sleep(0.5)
        a.start()
        t0 = a.t_spawn
        ok = w.wait(lambda: len(w.routes[a.name]) >= want or not a.alive(), 60)
        if not ok or not a.alive():
            raise RuntimeError(f"{a.name} restarted: {w.count(a.name)} of {want} routes; log:"
                               f"\n    {a.tail()}")
        with w.cond:
            adds = sorted(t for d, t in w.added[a.name].items() if t >= t0)
        up = a.first(r"^tunl mesh agent: node ")
        listed = a.first(r"registry .* answers")
        runs.append({"total": adds[-1] - t0, "first_route": adds[0] - t0,
                     "up": (up - t0) if up else None,
                     "registry": (listed - up) if up and listed else None,
                     "program": (adds[-1] - listed) if listed else None,
                     "routes": len(adds)})
        time.sleep(1)
    res["resync"] = runs
    res["rss_after_resync"] = rss_kb(a.pid)
    res["overflows"] = dict(w.overflows)


# -- the report ---------------------------------------------------------------------------------

def ms(v) -> str:
    return "-" if v is None else f"{v * 1000:,.1f}"


def verdict(met) -> str:
    return "not judged" if met is None else "met" if met else "MISSED"


def goals(res: dict) -> list[tuple[str, str, bool | None]]:
    out = []
    for key, label in (("join", "join"), ("expiry", "expiry (revoke)")):
        xs = res.get(key) or []
        p99 = pct(xs, 0.99)
        to = res.get("timeouts", {}).get(key, 0)
        met = None if p99 is None else (p99 <= GOAL_CONVERGE and not to)
        out.append((f"p99 convergence, {label} <= {GOAL_CONVERGE:g} s",
                    f"{ms(p99)} ms" + (f", {to} timed out" if to else ""), met))
    runs = res.get("resync") or []
    worst = max((r["total"] for r in runs), default=None)
    out.append((f"full resync of {res.get('expected', '?'):,} routes <= {GOAL_RESYNC:g} s "
                f"(slowest of {len(runs)})", f"{ms(worst)} ms",
                None if worst is None else worst <= GOAL_RESYNC))
    rss = [r["VmRSS"] / 1024 for r in res.get("rss") or []]
    if "rss_after_resync" in res:
        rss.append(res["rss_after_resync"]["VmRSS"] / 1024)
    top = max(rss, default=None)
    out.append((f"agent RSS <= {GOAL_RSS_MB:g} MB (largest)",
                "-" if top is None else f"{top:.1f} MB", None if top is None else
                top <= GOAL_RSS_MB))
    return out


def table(res: dict, args, mach: dict) -> str:
    L = []
    n = res.get("expected", args.peers + args.agents - 1)
    L.append(f"tunl mesh bench: {args.peers:,} registered leases + {args.agents} agents "
             f"(tunl mesh agent, TTL {DEFAULT_TTL} s, resync {RESYNC:g} s, data plane "
             f"{res.get('dataplane', '?')}), etcd {res.get('etcd', '?')} x 3 members; "
             f"{n:,} routes per agent")
    if "register_s" in res:
        L.append(f"  setup: {args.peers:,} registrations (grant + claim) in "
                 f"{res['register_s']:.1f} s ({args.peers / res['register_s']:,.0f}/s); "
                 + (f"{args.agents} agents started together held all {n:,} routes each after "
                    f"{res['cold_start_s']:.2f} s" if "cold_start_s" in res else ""))
    if "join" in res:
        L.append(f"convergence, registry change -> route on EVERY agent "
                 f"({args.trials} each)              p50 ms    p99 ms    max ms")
        rows = [("join: claim sent -> route added", res["join"]),
                ("expiry: revoke sent -> route deleted", res["expiry"]),
                ("  (join, first agent only)", res["join_first_agent"]),
                ("  (the claim request itself)", res["rtt_claim"]),
                ("  (the revoke request itself)", res["rtt_revoke"])]
        if res.get("runout") is not None:
            rows.append((f"expiry, TTL {RUNOUT_TTL} s run out: grant+TTL -> deleted "
                         f"(x{len(res['runout'])})", res["runout"]))
        for label, xs in rows:
            L.append(f"  {label:<58}{ms(pct(xs, .5)):>10}{ms(pct(xs, .99)):>10}"
                     f"{ms(max(xs) if xs else None):>10}")
        to = res.get("timeouts", {})
        if any(to.values()) or res.get("runout_lost"):
            L.append(f"  timed out (> {STEP_TIMEOUT:g} s): join {to.get('join', 0)}, expiry "
                     f"{to.get('expiry', 0)}, run-out {res.get('runout_lost', 0)}")
    tr = res.get("trials_reconcile")
    if tr and tr["mean_s"] is not None:
        L.append(f"  during the trials: {tr['passes']} reconcile passes on the agents, mean "
                 f"{ms(tr['mean_s'])} ms each (tunl_mesh_reconcile_seconds); agent CPU "
                 f"{ms(tr['cpu_per_event_s'])} ms per registry event, per agent")
    if res.get("resync"):
        runs = res["resync"]
        L.append(f"full resync: {runs[0]['routes']:,} routes, agent a0 restarted with its "
                 f"routes flushed ({len(runs)} times)   " + "  ".join(
                     f"run {i + 1:>2}" for i in range(len(runs))) + "   median  (ms)")
        for key, label in (("total", "spawn -> last route"),
                           ("up", "  spawn -> first log line (interpreter, imports)"),
                           ("registry", "  -> registry answers (config, lease, tunnel, list)"),
                           ("program", "  -> last route (plan, route adds)"),
                           ("first_route", "spawn -> first route")):
            xs = [r[key] for r in runs]
            L.append(f"  {label:<72}" + "  ".join(f"{ms(x):>6}" for x in xs)
                     + f"   {ms(median([x for x in xs if x is not None])):>6}")
    if "noop" in res:
        no = res["noop"]
        L.append(f"no-op reconcile pass at {n:,} peers: mean {ms(no['mean_s'])} ms over "
                 f"{no['passes']} passes (tunl_mesh_reconcile_seconds over the "
                 f"{res['quiet_s']:.0f} s quiet interval; every pass <= {no['slowest_le']:g} s)")
        rss = res["rss"]
        L.append(f"agents at {n:,} peers, {res['quiet_s']:.0f} s quiet: RSS "
                 + ", ".join(f"{r['VmRSS'] / 1024:.1f}" for r in rss) + " MB (peak VmHWM "
                 + ", ".join(f"{r['VmHWM'] / 1024:.1f}" for r in rss) + " MB); CPU "
                 + ", ".join(f"{c:.2f}" for c in res["cpu_pct"]) + " % of one core")
        if "rss_after_resync" in res:
            r = res["rss_after_resync"]
            L.append(f"  a0 after its last full resync: RSS {r['VmRSS'] / 1024:.1f} MB, "
                     f"peak {r['VmHWM'] / 1024:.1f} MB")
        g = res["registry"]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(g["calls"].items()))
        L.append(f"registry operations, {res['quiet_s']:.0f} s quiet (etcd "
                 f"grpc_server_started_total, 3 members): {calls}")
        if g["renewals"]:
            L.append(f"  {g['renewals']} renewals (expected ~{g['expected_renewals']:.0f}: "
                     f"every TTL/4 per agent): {g['renewal_only']:.2f} requests per renewal "
                     f"itself (LeaseKeepAlive); all registry requests "
                     f"per renewal {g['per_renewal']:.2f}, with {g['lists']} "
                     f"listings (Range of every lease, every 60 s per agent) and "
                     f"{g['calls'].get('Watch', 0)} watch streams opened again (every 30 s "
                     f"when quiet)")
            per_agent_rps = g["total"] / (args.agents * res["quiet_s"])
            per_agent_bps = g["sent_bytes_s"] / args.agents
            L.append(f"  per agent: {per_agent_rps:.2f} requests/s, etcd sends "
                     f"{per_agent_bps / 1024:.1f} KiB/s; {args.peers:,} such agents: "
                     f"{per_agent_rps * args.peers:,.0f} requests/s, "
                     f"{per_agent_bps * args.peers / 1e6:,.1f} MB/s from etcd")
    if any(res.get("overflows", {}).values()):
        L.append(f"  note: rtnetlink overflows (re-read): {res['overflows']}")
    L.append("goals:")
    for label, value, met in goals(res):
        L.append(f"  {label:<52} {value:>14}  {verdict(met)}")
    for f in res.get("failures", []):
        L.append(f"failed: {f}")
    L.append(f"machine: {mach['cpu']}, nproc {mach['nproc']}, kernel {mach['kernel']}, "
             f"Python {mach['python']}, load {mach['loadavg']:.2f}, {mach['date']}")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=1000, metavar="N",
                    help="leases registered straight into etcd (1000)")
    ap.add_argument("--agents", type=int, default=3, metavar="N",
                    help="real agents, one per namespace (3)")
    ap.add_argument("--trials", type=int, default=50, metavar="N",
                    help="joins and expiries timed (50 each)")
    ap.add_argument("--quiet", type=float, default=30, metavar="SECONDS",
                    help="the quiet interval for CPU, no-op reconciles, registry ops (30)")
    ap.add_argument("--restarts", type=int, default=3, metavar="N",
                    help="full resyncs timed (3)")
    ap.add_argument("--expiries", type=int, default=5, metavar="N",
                    help=f"leases left to run out, TTL {RUNOUT_TTL} s (5)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    if args.peers < 1 or not 1 <= args.agents <= 200 or args.trials < 1 or args.quiet < 10 \
            or args.restarts < 1 or args.expiries < 0:
        ap.error("--peers >= 1, --agents 1..200, --trials >= 1, --quiet >= 10, "
                 "--restarts >= 1, --expiries >= 0")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    if shutil.which("etcd") is None:
        ap.error("needs etcd (the etcd-server package)")

    interrupt_on_signals()
    mach = machine()           # the load before the bench adds its own
    res: dict = {"expected": args.peers + args.agents - 1, "failures": []}
    t_start = now()
    lab_ = Lab(args)
    code = 0
    try:
        run(lab_, args, res, t_start)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        res["failures"].append("interrupted")
        code = 130
    except (RuntimeError, OSError, ValueError, KeyError, lab.LabError,
            subprocess.SubprocessError) as e:
        res["failures"].append(f"{type(e).__name__}: {e}")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)        # a second Ctrl-C must not halve cleanup
        progress(t_start, "cleaning up ...")
        lab_.close()
    print(table(res, args, mach))
    if args.json:
        print(json.dumps({"args": vars(args), "machine": mach, "results": res}, indent=2,
                         default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
