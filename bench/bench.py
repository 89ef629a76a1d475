"""Benchmark tunl's data planes, eBPF and userspace, against the bare underlay they run over.

Run as root:  .venv/bin/python bench/bench.py [--time 5] [--pings 200] [--json]
                                             [--mode ipip gre sit vti-gcm vti-cbc | all]
                                             [--plane ebpf userspace | all]

Three fresh network namespaces: hosts tl-bench-<random>-a and -b, joined by a veth pair eth0 (the
underlay: 172.16.232.172/16 and .194/16, fd00::a/64 and fd00::b/64), and a container -c behind a
bridge mybr0 on a (c: 10.42.11.2/24 and 2001:db8:11::2/64, default routes via mybr0's
10.42.11.1 and 2001:db8:11::1; a forwards). Measured, in this order:

  bare       over the underlay, with b's route to the container's subnet via a's underlay address
             (IPv4, and IPv6 when sit is asked for: sit carries IPv6, so its ratios are to bare v6)
  per plane  one plane after the other, since two tunnels of the same mode, local, remote and key
             cannot coexist: a one-to-one tunnel of each mode on a and b (as in
             tests/integration/test_dataplane.py), then per mode, with b's route to the
             container's subnet into that mode's tunnel device, then the tunnels deleted.

Each measurement: iperf3, one TCP stream, a -> b ("local"), c -> b routed by a ("forwarded") and
b -> c ("into container"), to b's tunnel address (bare: its underlay address); ping a -> b at
10 ms; tunld's CPU time during the local run; and on the eBPF plane, from `tunl -j tunnel show`
around each TCP run, the packets the tunnels on a and b moved on the fast path (the tc programs)
and on the slow path (tunld), so that a run that fell back to the slow path shows.

vti-gcm and vti-cbc are vti tunnels with ESP (rfc4106(gcm(aes)) 128-bit key; cbc(aes) with
hmac(sha256)-128), their states and policies added with `tunl xfrm`, on the userspace plane
only (a vti's ESP is tunld's own work); vti-cbc runs between second underlay addresses
(172.16.233.172 and .194), since two vtis between the same addresses are one to the kernel's
lookup and to tunl's.

A benchmark, not a test: it asserts nothing about time; it prints the goals and whether these
figures meet them. A measurement that fails says so in its cell and the others go on. It always
removes what it made, also on Ctrl-C or failure, and ends only processes it started or that live
in its own namespaces.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import uuid

BIN = os.path.dirname(sys.executable)
TUNL = os.path.join(BIN, "tunl")
ENV = {**os.environ, "PATH": BIN + ":" + os.environ.get("PATH", "")}
A_UL, B_UL = "172.16.232.172", "172.16.232.194"       # underlay, /16, on veth eth0
A_UL6, B_UL6 = "fd00::a", "fd00::b"                   # the same link, /64, for bare IPv6
# The container c behind a's bridge: its subnet, the bridge's address (c's gateway), c's address.
C_NET, C_GW, C_ME = "10.42.11.0/24", "10.42.11.1/24", "10.42.11.2/24"
C_NET6, C_GW6, C_ME6 = "2001:db8:11::/64", "2001:db8:11::1/64", "2001:db8:11::2/64"
# The one place to add a mode: its device, its words for `tunl tunnel add`, and the inner
# addresses of a and b (with prefix); b's address is what ping and iperf3 aim at.
MODES = {
    "ipip": ("tunl0", "mode ipip", "10.42.1.1/24", "10.42.2.1/24"),
    "gre": ("gre1", "mode gre key 42", "10.43.1.1/24", "10.43.2.1/24"),
    "sit": ("sit1", "mode sit", "2001:db8:1::1/64", "2001:db8:2::1/64"),
    "vti-gcm": ("vti1", "mode vti ikey 7 okey 7", "10.44.1.1/24", "10.44.2.1/24"),
    "vti-cbc": ("vti2", "mode vti ikey 8 okey 8", "10.45.1.1/24", "10.45.2.1/24"),
}
# vti: the mark (its ikey and okey), the algorithm words of `tunl xfrm state add`, the
# underlay addresses of a and b it runs between
KEY16, KEY20, KEY32 = "0x" + "11" * 16, "0x" + "22" * 20, "0x" + "33" * 32
A_UL2, B_UL2 = "172.16.233.172", "172.16.233.194"
XFRM = {
    "vti-gcm": (7, f"aead 'rfc4106(gcm(aes))' {KEY20} 128", (A_UL, B_UL)),
    "vti-cbc": (8, f"enc 'cbc(aes)' {KEY16} auth-trunc 'hmac(sha256)' {KEY32} 128",
                (A_UL2, B_UL2)),
}
PLANES = ("ebpf", "userspace")
TCP_RUNS = {"local": "TCP local", "forwarded": "TCP forwarded", "into": "TCP into container"}
GOAL_RATIO, GOAL_ADDED_US = 0.85, 30        # the eBPF plane's goals, against bare
SLOW_SHARE = 0.01                           # above this share of packets, a run "fell back"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Failed(Exception):
    """One measurement did not give a figure; the others go on."""


class Bench:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.a, self.b, self.c = (f"tl-bench-{tag}-{h}" for h in "abc")
        self.made: list[str] = []              # namespaces created, in order
        self.procs: list[subprocess.Popen] = []

    def run(self, ns: str, cmd: str, timeout: float = 60) -> str:
        p = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd], capture_output=True,
                           text=True, timeout=timeout, env=ENV)
        if p.returncode != 0:
            raise RuntimeError(f"[{ns}] {cmd} -> exit {p.returncode}\n{p.stdout}{p.stderr}")
        return p.stdout

    def setup(self) -> None:
        """The hosts, the underlay, the container behind a's bridge, and the bare routes."""
        for ns in (self.a, self.b, self.c):
            self.made.append(ns)              # first: an interrupt must not leak it
            subprocess.run(["ip", "netns", "add", ns], check=True)   # tunld's log goes with it
        subprocess.run(["ip", "link", "add", "eth0", "netns", self.a, "type", "veth", "peer",
                        "name", "eth0", "netns", self.b], check=True)
        subprocess.run(["ip", "link", "add", "eth0", "netns", self.c, "type", "veth", "peer",
                        "name", "veth-c", "netns", self.a], check=True)
        for ns, me, me6, me2 in ((self.a, A_UL, A_UL6, A_UL2), (self.b, B_UL, B_UL6, B_UL2)):
            self.run(ns, f"ip link set lo up && ip addr add {me}/16 dev eth0 && "
                         f"ip addr add {me2}/16 dev eth0 && "
                         f"ip addr add {me6}/64 dev eth0 nodad && ip link set eth0 up")
        self.run(self.a, "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && "
                         "ip link add mybr0 type bridge forward_delay 0 && "
                         "ip link set veth-c master mybr0 && ip link set veth-c up && "
                         f"ip addr add {C_GW} dev mybr0 && ip addr add {C_GW6} dev mybr0 nodad && "
                         "ip link set mybr0 up")
        self.run(self.c, f"ip link set lo up && ip addr add {C_ME} dev eth0 && "
                         f"ip addr add {C_ME6} dev eth0 nodad && ip link set eth0 up && "
                         f"ip route add default via {addr(C_GW)} && "
                         f"ip -6 route add default via {addr(C_GW6)}")
        self.run(self.b, f"ip route add {C_NET} via {A_UL} dev eth0 && "
                         f"ip -6 route add {C_NET6} via {A_UL6} dev eth0")

    def route_to_container(self, dev: str | None, v6: bool) -> None:
        """b's route to the container's subnet: into tunnel dev, or (None) via a's underlay."""
        if v6:
            self.run(self.b, f"ip -6 route replace {C_NET6} "
                             + (f"dev {dev}" if dev else f"via {A_UL6} dev eth0"))
        else:
            self.run(self.b, f"ip route replace {C_NET} "
                             + (f"dev {dev}" if dev else f"via {A_UL} dev eth0"))

    def add_tunnel(self, plane: str, mode: str) -> None:
        dev, words, a_in, b_in = MODES[mode]
        nodad = " nodad" if ":" in a_in else ""
        a_ul, b_ul = XFRM[mode][2] if mode in XFRM else (A_UL, B_UL)
        for ns, me, peer, mine, theirs in ((self.a, a_ul, b_ul, a_in, b_in),
                                           (self.b, b_ul, a_ul, b_in, a_in)):
            net = ipaddress.ip_interface(theirs).network
            self.run(ns, f"{TUNL} tunnel add {dev} {words} remote {peer} local {me} "
                         f"--dataplane {plane}")
            if mode in XFRM:
                mark, algo, _ = XFRM[mode]
                for spi, (src, dst) in ((0x100 + mark, (a_ul, b_ul)), (0x200 + mark, (b_ul, a_ul))):
                    self.run(ns, f"{TUNL} xfrm state add src {src} dst {dst} proto esp spi "
                                 f"{spi:#x} reqid 1 mode tunnel mark {mark} {algo} "
                                 "replay-window 32")
                for way, src, dst in (("out", me, peer), ("in", peer, me)):
                    self.run(ns, f"{TUNL} xfrm policy add dir {way} tmpl src {src} dst {dst} "
                                 f"proto esp reqid 1 mode tunnel mark {mark}")
            got = self.show(ns, dev)["dataplane"]
            if got != plane:
                raise RuntimeError(f"[{ns}] {dev}: asked for the {plane} plane, got {got}")
            self.run(ns, f"ip addr add {mine} dev {dev}{nodad} && ip link set {dev} up && "
                         f"ip route add {net} dev {dev}")

    def del_tunnel(self, mode: str) -> list[str]:
        """Delete the mode's tunnel on a and b, where it is; the errors, if any."""
        dev, errors = MODES[mode][0], []
        for ns in (self.a, self.b):
            try:
                links = [line.split()[0].split("@")[0]
                         for line in self.run(ns, "ip -br link").splitlines()]
                if dev in links:
                    self.run(ns, f"{TUNL} tunnel del {dev}")
            except (RuntimeError, subprocess.SubprocessError) as e:
                errors.append(str(e).strip())
        return errors

    def show(self, ns: str, dev: str) -> dict:
        found = json.loads(self.run(ns, f"{TUNL} -j tunnel show {dev}"))
        if len(found) != 1:
            raise RuntimeError(f"[{ns}] tunl -j tunnel show {dev}: {len(found)} tunnels")
        return found[0]

    def tunld_pid(self, ns: str) -> int:
        return json.loads(self.run(ns, f"{TUNL} -j daemon status"))["pid"]

    def reach(self, ns: str, dst: str, tries: int = 10) -> None:
        """Wait until dst answers a ping from ns (neighbours, DAD, the path's first packets)."""
        for _ in range(tries):
            p = subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1",
                                dst], capture_output=True, text=True, timeout=30, env=ENV)
            if p.returncode == 0:
                return
        raise Failed(f"no answer to ping {self.host(ns)} -> {dst} in {tries} tries")

    def host(self, ns: str) -> str:
        return ns.rsplit("-", 1)[1]

    def iperf(self, client: str, server: str, dst: str, seconds: int) -> dict:
        self.reach(client, dst)
        srv = subprocess.Popen(["ip", "netns", "exec", server, "iperf3", "-s", "-1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=ENV)
        self.procs.append(srv)
        try:
            deadline = time.monotonic() + 10
            while "5201" not in self.run(server, "ss -Hltn 'sport = :5201'"):
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise Failed(f"iperf3 server in {self.host(server)} did not listen")
                time.sleep(0.05)
            p = subprocess.run(["ip", "netns", "exec", client, "iperf3", "-c", dst, "-t",
                                str(seconds), "-J", "--connect-timeout", "5000"],
                               capture_output=True, text=True, timeout=seconds + 60, env=ENV)
            try:
                out = json.loads(p.stdout)
            except ValueError:
                raise Failed(f"iperf3 {self.host(client)} -> {dst}: exit {p.returncode} "
                             f"{p.stderr.strip()}") from None
            if "error" in out:
                raise Failed(f"iperf3 {self.host(client)} -> {dst}: {out['error']}")
            end = out["end"]
            return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
                    "retransmits": end["sum_sent"].get("retransmits"),
                    "seconds": end["sum_received"]["seconds"]}
        except subprocess.TimeoutExpired:
            raise Failed(f"iperf3 {self.host(client)} -> {dst}: no end in {seconds + 60} s") \
                from None
        finally:
            stop([srv], timeout=5)
            srv.stderr.close()
            self.procs.remove(srv)

    def ping(self, dst: str, count: int) -> dict:
        self.reach(self.a, dst)
        out = subprocess.run(["ip", "netns", "exec", self.a, "ping", "-n", "-q", "-c",
                              str(count), "-i", "0.01", "-W", "2", dst], capture_output=True,
                             text=True, timeout=count + 60, env=ENV).stdout
        loss = re.search(r"([\d.]+)% packet loss", out)
        rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
        if not (loss and rtt):
            raise Failed(f"ping a -> {dst}: no answer\n{out.strip()}")
        return {"loss": float(loss.group(1)),
                **dict(zip(("min", "avg", "max", "mdev"), map(float, rtt.groups())))}

    def paths(self, dev: str) -> dict:
        """The eBPF counters of dev's tunnels on a and b: {"a": {...}, "b": {...}}."""
        return {self.host(ns): self.show(ns, dev)["ebpf"] for ns in (self.a, self.b)}

    def close(self) -> None:
        for ns in reversed(self.made):
            end_netns(ns)
        stop(self.procs)


def stop(procs: list[subprocess.Popen], timeout: float = 2) -> None:
    """End processes this run started: TERM, then KILL what is still there after timeout."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def interrupt_on_signals() -> None:
    """SIGINT (even if inherited ignored), SIGTERM and SIGHUP end a run as Ctrl-C does, so
    that what it made is removed."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def end_netns(ns: str) -> None:
    """End every process in a namespace of ours (TERM, then KILL), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = netns_pids(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # the name may hold spaces and ')'
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime (fields 14, 15)


def machine() -> dict:
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return {"cpu": info.get("model name") or info.get("Hardware") or platform.machine(),
            "nproc": len(os.sched_getaffinity(0)), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def addr(iface: str) -> str:
    return str(ipaddress.ip_interface(iface).ip)


def target(mode: str) -> str:
    return addr(MODES[mode][3])


def attempt(what, *args) -> dict:
    """what(*args), or {"error": why} when it failed: one failure must not end the run."""
    try:
        return what(*args)
    except (Failed, RuntimeError, subprocess.SubprocessError, OSError, ValueError,
            KeyError) as e:
        return {"error": str(e).strip()}


def measure_one(bench: Bench, args, dst: str, into: str, dev: str | None = None,
                ebpf: bool = False) -> dict:
    """Ping and the three TCP runs to dst (b's address) and into (c's address); with a tunnel
    device, tunld's CPU in the local run and, on the eBPF plane, the packets on each path."""
    out = {"ping": attempt(bench.ping, dst, args.pings)}
    pids = {}
    if dev:
        for ns in (bench.a, bench.b):
            try:
                pids[bench.host(ns)] = bench.tunld_pid(ns)
            except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError):
                pass
    runs = {"local": (bench.a, bench.b, dst), "forwarded": (bench.c, bench.b, dst),
            "into": (bench.b, bench.c, into)}
    for run, (client, server, to) in runs.items():
        before = attempt(bench.paths, dev) if ebpf else None
        cpu0 = {h: attempt(cpu_seconds, pid) for h, pid in pids.items()}
        out[run] = attempt(bench.iperf, client, server, to, args.time)
        if run == "local" and "error" not in out[run]:
            cpu1 = {h: attempt(cpu_seconds, pid) for h, pid in pids.items()}
            out["cpu"] = {h: 100 * (cpu1[h] - cpu0[h]) / out[run]["seconds"] for h in pids
                          if isinstance(cpu0[h], float) and isinstance(cpu1[h], float)}
        if ebpf:
            after = attempt(bench.paths, dev)
            if "error" in before or "error" in after:
                out.setdefault("paths", {})[run] = {"error": (before.get("error")
                                                              or after.get("error"))}
            else:
                out.setdefault("paths", {})[run] = {
                    **{k: sum(after[h][k] - before[h][k] for h in after)
                       for k in ("fast_tx", "slow_tx", "fast_rx", "slow_rx")},
                    "by_host": {h: {k: after[h][k] - before[h][k]
                                    for k in ("fast_tx", "slow_tx", "fast_rx", "slow_rx")}
                                for h in after},
                    "slow_tx_why": sorted({w for h in after for w in after[h]["slow_tx_why"]}),
                    "slow_rx_why": sorted({w for h in after for w in after[h]["slow_rx_why"]})}
    return out


def measure(bench: Bench, args) -> dict:
    """{"bare": …, "bare6": … (with sit), "<plane>": {"<mode>": …}}: see measure_one()."""
    results = {"bare": measure_one(bench, args, B_UL, addr(C_ME))}
    if "sit" in args.mode:
        results["bare6"] = measure_one(bench, args, B_UL6, addr(C_ME6))
    for plane in args.plane:
        results[plane] = {}
        added = []
        for mode in args.mode:                # all of a plane's tunnels at once, as a host would
            if mode in XFRM and plane != "userspace":
                continue                      # a vti's ESP is tunld's work, on userspace only
            try:
                bench.add_tunnel(plane, mode)
                added.append(mode)
            except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
                results[plane][mode] = {"error": f"tunnel add: {str(e).strip()}"}
        for mode in added:
            dev, v6 = MODES[mode][0], mode == "sit"
            try:
                bench.route_to_container(dev, v6)
            except (RuntimeError, subprocess.SubprocessError) as e:
                results[plane][mode] = {"error": f"route into {dev}: {str(e).strip()}"}
            else:
                results[plane][mode] = measure_one(bench, args, target(mode),
                                                   addr(C_ME6 if v6 else C_ME), dev,
                                                   ebpf=plane == "ebpf")
            bench.route_to_container(None, v6)     # back via the underlay: must not fail
        for mode in args.mode:
            if mode in XFRM and plane != "userspace":
                continue
            errors = bench.del_tunnel(mode)
            if errors:                        # the next plane's add will fail: say why
                results[plane].setdefault(mode, {})["del_error"] = "; ".join(errors)
    return results


# The table: its columns are bare (and bare v6), then per plane and mode the figure and its
# ratio to the bare figure of the same IP version; its rows are these.
def columns(args) -> list[tuple[str, str, str | None]]:
    """(label, key into the results, the baseline's key or None)."""
    cols = [("bare", "bare", None)] + ([("bare v6", "bare6", None)] if "sit" in args.mode else [])
    short = {"ebpf": "ebpf", "userspace": "user"}
    return cols + [(f"{short[p]} {m}", f"{p}/{m}", "bare6" if m == "sit" else "bare")
                   for p in args.plane for m in args.mode if m not in XFRM or p == "userspace"]


def case(results: dict, key: str) -> dict:
    if "/" in key:
        plane, mode = key.split("/")
        return results[plane][mode]
    return results[key]


def figure(c: dict, run: str, field: str):
    """A figure of one measurement: a number, None (not measured) or the string "failed"."""
    if "error" in c:
        return "failed"
    r = c.get(run)
    if r is None:
        return None
    return "failed" if "error" in r else r.get(field)


def added_us(c: dict, base: dict | None):
    if base is None:
        return None
    t, b = figure(c, "ping", "avg"), figure(base, "ping", "avg")
    if "failed" in (t, b):
        return "failed"
    return (t - b) * 1000


ROWS = [  # label, (case, baseline case) -> figure, whether a ratio to bare is shown
    ("TCP local Mbit/s", lambda c, b: figure(c, "local", "mbps"), True),
    ("TCP forwarded Mbit/s", lambda c, b: figure(c, "forwarded", "mbps"), True),
    ("TCP into container Mbit/s", lambda c, b: figure(c, "into", "mbps"), True),
    ("ping RTT avg ms", lambda c, b: figure(c, "ping", "avg"), False),
    ("added RTT µs", added_us, False),
    ("ping loss %", lambda c, b: figure(c, "ping", "loss"), False),
    ("retransmits local", lambda c, b: figure(c, "local", "retransmits"), False),
    ("retransmits forwarded", lambda c, b: figure(c, "forwarded", "retransmits"), False),
    ("retransmits into container", lambda c, b: figure(c, "into", "retransmits"), False),
    ("tunld a CPU % in TCP local", lambda c, b: None if b is None else
        ("failed" if "error" in c else c.get("cpu", {}).get("a")), False),
    ("tunld b CPU % in TCP local", lambda c, b: None if b is None else
        ("failed" if "error" in c else c.get("cpu", {}).get("b")), False),
]


def ratio(v, base):
    if isinstance(v, (int, float)) and isinstance(base, (int, float)) and base > 0:
        return v / base
    return None


def rows(results: dict, args) -> list[dict]:
    """One dict per metric: the figure of each column and, where it makes sense, its ratio."""
    out = []
    for label, get, with_ratio in ROWS:
        row = {"metric": label}
        for _, key, base_key in columns(args):
            c, base = case(results, key), results[base_key] if base_key else None
            row[key] = get(c, base)
            if base_key and with_ratio:
                row[f"{key}/{base_key}"] = ratio(row[key], get(base, None))
        out.append(row)
    return out


def goals(results: dict, args) -> list[dict]:
    """Per mode on the eBPF plane: TCP local and forwarded >= GOAL_RATIO of bare, added RTT
    <= GOAL_ADDED_US, each met, missed, or not judged (the figure failed)."""
    if "ebpf" not in args.plane:
        return []
    out = []
    for mode in (m for m in args.mode if m not in XFRM):
        c, base = results["ebpf"][mode], results["bare6" if mode == "sit" else "bare"]
        g = {"mode": mode}
        for run in ("local", "forwarded"):
            r = ratio(figure(c, run, "mbps"), figure(base, run, "mbps"))
            g[run] = {"ratio": r, "met": None if r is None else r >= GOAL_RATIO}
        us = added_us(c, base)
        us = us if isinstance(us, float) else None
        g["added_rtt_us"] = {"us": us, "met": None if us is None else us <= GOAL_ADDED_US}
        out.append(g)
    return out


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return str(v) if isinstance(v, int) else f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"


def verdict(met) -> str:
    return "not judged (failed)" if met is None else "met" if met else "MISSED"


def table(results: dict, args, mach: dict) -> str:
    cols = columns(args)
    head = f"{'':<28}" + "".join(f"{label:>11}" + ("  ratio" if base else "")
                                 for label, _, base in cols)
    lines = [f"tunl bench: planes {' '.join(args.plane)} (user = userspace), modes "
             f"{' '.join(args.mode)}; iperf3 TCP 1 stream {args.time} s, ping a -> b x{args.pings}"
             " at 10 ms" + ("; sit against bare v6" if "sit" in args.mode else ""),
             "  local a -> b, forwarded c -> b via a, into container b -> c; ratio = to bare",
             head]
    for r in rows(results, args):
        cells = []
        for _, key, base in cols:
            cells.append(f"{fmt(r[key]):>11}")
            if base:
                q = r.get(f"{key}/{base}")
                cells.append(f"{q:>7.2f}" if q is not None else f"{'':>7}")
        lines.append(f"{r['metric']:<28}" + "".join(cells))

    g = goals(results, args)
    if g:
        lines.append(f"goals (eBPF plane): TCP >= {GOAL_RATIO} of bare, local and forwarded, "
                     f"for ipip, gre with key and sit; added RTT <= {GOAL_ADDED_US} µs")
        for x in g:
            lo, fw, rtt = x["local"], x["forwarded"], x["added_rtt_us"]
            lines.append(f"  {x['mode']:<5} local {fmt(lo['ratio'])} {verdict(lo['met'])}, "
                         f"forwarded {fmt(fw['ratio'])} {verdict(fw['met'])}, "
                         f"added RTT {fmt(rtt['us'])} µs {verdict(rtt['met'])}")
    else:
        lines.append("goals (eBPF >= 0.85 of bare, added RTT <= 30 µs): not judged, the eBPF "
                     "plane was not measured")

    if "ebpf" in args.plane:
        lines.append("eBPF plane, packets per TCP run on each path (tunnels on a and b together):")
        lines.append(f"  {'':<22}{'fast_tx':>10}{'slow_tx':>10}{'fast_rx':>10}{'slow_rx':>10}")
        for mode in (m for m in args.mode if m not in XFRM):
            c = results["ebpf"][mode]
            for run, label in TCP_RUNS.items():
                p = c.get("paths", {}).get(run) if "error" not in c else None
                name = f"{mode} {label[4:]}"
                if p is None or "error" in p:
                    lines.append(f"  {name:<22}  not read" + (f": {p['error']}" if p else ""))
                    continue
                total = p["fast_tx"] + p["slow_tx"] + p["fast_rx"] + p["slow_rx"]
                slow = p["slow_tx"] + p["slow_rx"]
                note = ("  <- SLOW PATH" if total and slow > SLOW_SHARE * total
                        else "  <- no packets" if not total else "")
                lines.append(f"  {name:<22}" + "".join(f"{p[k]:>10}" for k in
                             ("fast_tx", "slow_tx", "fast_rx", "slow_rx")) + note)
                for k in ("slow_tx_why", "slow_rx_why"):
                    if note and p[k]:
                        lines.append(f"    {k}: " + "; ".join(p[k]))

    for label, key, _ in cols:
        c = case(results, key)
        failures = [("", c)] if "error" in c else [(run, c.get(run)) for run in
                                                   ("ping", *TCP_RUNS)]
        for run, r in failures:
            if isinstance(r, dict) and "error" in r:
                why = r["error"].replace("\n", "\n    ")
                lines.append(f"failed: {label} {run}".rstrip() + f": {why}")
        if "del_error" in c:
            lines.append(f"failed: {label} tunnel del: {c['del_error']}")
    lines.append(f"machine: {mach['cpu']}, nproc {mach['nproc']}, kernel {mach['kernel']}, "
                 f"Python {mach['python']}, load {mach['loadavg']:.2f}, {mach['date']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=5, metavar="SECONDS", help="iperf3 -t (5)")
    ap.add_argument("--pings", type=int, default=200, metavar="N", help="ping -c (200)")
    ap.add_argument("--mode", nargs="+", choices=sorted(MODES) + ["all"], default=["all"],
                    help="one or more modes, or all (all: ipip gre sit vti-gcm vti-cbc)")
    ap.add_argument("--plane", nargs="+", choices=list(PLANES) + ["all"], default=["all"],
                    help="one or more data planes, or all (all: ebpf userspace)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    args.mode = list(MODES) if "all" in args.mode else list(dict.fromkeys(args.mode))
    args.plane = list(PLANES) if "all" in args.plane else list(dict.fromkeys(args.plane))
    if args.time < 1 or args.pings < 1:
        ap.error("--time and --pings must be at least 1")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, TUN devices)")

    interrupt_on_signals()
    bench, mach = Bench(), machine()        # the load before the bench adds its own
    try:
        bench.setup()
        results = measure(bench, args)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)        # a second Ctrl-C must not halve cleanup
        bench.close()
    if args.json:
        print(json.dumps({"mode": args.mode, "plane": args.plane, "time": args.time,
                          "pings": args.pings, "machine": mach, "results": results,
                          "metrics": rows(results, args), "goals": goals(results, args)},
                         indent=2))
    else:
        print(table(results, args, mach))
    return 0


if __name__ == "__main__":
    sys.exit(main())
