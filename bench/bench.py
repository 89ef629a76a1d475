"""Benchmark tunl's userspace data plane against the bare underlay it runs over.

Run as root:  .venv/bin/python bench/bench.py [--time 5] [--pings 200] [--mode ipip gre sit | all]
                                             [--json]

Two fresh network namespaces, tl-bench-<random>-a and -b, joined by a veth pair (the underlay),
get a one-to-one tunnel of each mode asked for (as in tests/integration/test_dataplane.py).
iperf3 (one TCP stream, a -> b) and ping (a -> b) run first over the underlay addresses, then
over each tunnel's inner addresses; meanwhile the CPU time of each namespace's tunld is read
from /proc. A benchmark, not a test:
it asserts nothing about time. It always removes what it made, also on Ctrl-C or failure, and
ends only processes it started or that live in its own namespaces.
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
# The one place to add a mode: its device, its words for `tunl tunnel add`, and the inner
# addresses of a and b (with prefix); b's address is what ping and iperf3 aim at.
MODES = {
    "ipip": ("tunl0", "mode ipip", "10.42.1.1/24", "10.42.2.1/24"),
    "gre": ("gre1", "mode gre key 42", "10.43.1.1/24", "10.43.2.1/24"),
    "sit": ("sit1", "mode sit", "2001:db8:1::1/64", "2001:db8:2::1/64"),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"tl-bench-{tag}-a", f"tl-bench-{tag}-b"
        self.made: list[str] = []              # namespaces created, in order
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []              # tunld names its log by the namespace's inode

    def run(self, ns: str, cmd: str, timeout: float = 60) -> str:
        p = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd], capture_output=True,
                           text=True, timeout=timeout, env=ENV)
        if p.returncode != 0:
            raise RuntimeError(f"[{ns}] {cmd} -> exit {p.returncode}\n{p.stdout}{p.stderr}")
        return p.stdout

    def setup(self, modes: list[str]) -> None:
        for ns in (self.a, self.b):
            self.made.append(ns)              # first: an interrupt must not leak it
            subprocess.run(["ip", "netns", "add", ns], check=True)
            log = f"/run/tunl/tunld.net-{os.stat(f'/run/netns/{ns}').st_ino}.log"
            if not os.path.exists(log):       # inodes are reused: never remove another's log
                self.logs.append(log)
        subprocess.run(["ip", "link", "add", "eth0", "netns", self.a, "type", "veth", "peer",
                        "name", "eth0", "netns", self.b], check=True)
        for ns, me in ((self.a, A_UL), (self.b, B_UL)):
            self.run(ns, f"ip link set lo up && ip addr add {me}/16 dev eth0 && ip link set eth0 up")
        for mode in modes:
            dev, words, a_in, b_in = MODES[mode]
            for ns, me, peer, mine, theirs in ((self.a, A_UL, B_UL, a_in, b_in),
                                               (self.b, B_UL, A_UL, b_in, a_in)):
                net = ipaddress.ip_interface(theirs).network
                self.run(ns, f"{TUNL} tunnel add {dev} {words} remote {peer} local {me}")
                self.run(ns, f"ip addr add {mine} dev {dev} && ip link set {dev} up && "
                             f"ip route add {net} dev {dev}")
        for dst in [B_UL] + [target(m) for m in modes]:   # both paths carry traffic
            self.run(self.a, f"ping -n -c 3 -i 0.2 -W 2 {dst}")

    def tunld_pid(self, ns: str) -> int:
        return json.loads(self.run(ns, f"{TUNL} -j daemon status"))["pid"]

    def iperf(self, dst: str, seconds: int) -> dict:
        srv = subprocess.Popen(["ip", "netns", "exec", self.b, "iperf3", "-s", "-1", "-J"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.procs.append(srv)
        deadline = time.monotonic() + 10
        while "5201" not in self.run(self.b, "ss -Hltn 'sport = :5201'"):
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 server did not listen: {srv.communicate()[1]}")
            time.sleep(0.05)
        out = json.loads(self.run(self.a, f"iperf3 -c {dst} -t {seconds} -J", timeout=seconds + 60))
        srv.communicate(timeout=30)
        if "error" in out:
            raise RuntimeError(f"iperf3 to {dst}: {out['error']}")
        end = out["end"]
        return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
                "retransmits": end["sum_sent"].get("retransmits"),
                "seconds": end["sum_received"]["seconds"]}

    def ping(self, dst: str, count: int) -> dict:
        out = self.run(self.a, f"ping -n -q -c {count} -i 0.01 -W 2 {dst}", timeout=count + 60)
        loss = float(re.search(r"([\d.]+)% packet loss", out).group(1))
        rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
        return {"loss": loss, **dict(zip(("min", "avg", "max", "mdev"), map(float, rtt.groups())))}

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for ns in reversed(self.made):
            end_netns(ns)
        for log in self.logs:
            try:
                os.unlink(log)
            except FileNotFoundError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()


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


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


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


def target(mode: str) -> str:
    return str(ipaddress.ip_interface(MODES[mode][3]).ip)


def measure(bench: Bench, args) -> list[dict]:
    """Rows of metric, unit, the bare figure, and per mode its figure and ratio to bare."""
    ping = {"bare": bench.ping(B_UL, args.pings)}
    tcp = {"bare": bench.iperf(B_UL, args.time)}
    cpu: dict[str, dict] = {}
    pids = {ns: bench.tunld_pid(ns) for ns in (bench.a, bench.b)}
    for mode in args.mode:
        ping[mode] = bench.ping(target(mode), args.pings)
        before = {ns: cpu_seconds(pid) for ns, pid in pids.items()}
        tcp[mode] = bench.iperf(target(mode), args.time)
        cpu[mode] = {ns: cpu_seconds(pid) - before[ns] for ns, pid in pids.items()}
    rows = [("TCP throughput", "Mbit/s", {k: v["mbps"] for k, v in tcp.items()}),
            ("TCP retransmits", "", {k: v["retransmits"] for k, v in tcp.items()})]
    rows += [(f"ping RTT {q}", "ms", {k: v[q] for k, v in ping.items()})
             for q in ("min", "avg", "max", "mdev")]
    rows.append(("ping loss", "%", {k: v["loss"] for k, v in ping.items()}))
    for ns, side in ((bench.a, "a"), (bench.b, "b")):
        rows += [(f"tunld {side} CPU load in TCP", "% core",
                  {m: 100 * cpu[m][ns] / tcp[m]["seconds"] for m in args.mode}),
                 (f"tunld {side} RSS", "MiB", {m: rss_mib(pids[ns]) for m in args.mode})]
    out = []
    for metric, unit, by in rows:
        bare = by.get("bare")
        out.append({"metric": metric, "unit": unit, "bare": bare,
                    **{m: by[m] for m in args.mode},
                    **{f"{m}/bare": by[m] / bare if bare and by[m] is not None else None
                       for m in args.mode}})
    return out


def fmt(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"


def table(rows: list[dict], mach: dict, args) -> str:
    cols = ["bare"] + [c for m in args.mode for c in (m, f"{m}/bare")]
    lines = [f"tunl bench, modes {' '.join(args.mode)}: iperf3 TCP 1 stream {args.time}s, "
             f"ping x{args.pings} at 10 ms, a -> b",
             f"{'metric':<26}{'unit':>7}" + "".join(f"{c:>11}" for c in cols)]
    for r in rows:
        cells = [format(r[c], ".3g") if "/" in c and r[c] is not None else fmt(r.get(c))
                 for c in cols]
        lines.append(f"{r['metric']:<26}{r['unit']:>7}" + "".join(f"{c:>11}" for c in cells))
    lines.append(f"machine: {mach['cpu']}, nproc {mach['nproc']}, kernel {mach['kernel']}, "
                 f"Python {mach['python']}, load {mach['loadavg']:.2f}, {mach['date']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=5, metavar="SECONDS", help="iperf3 -t (5)")
    ap.add_argument("--pings", type=int, default=200, metavar="N", help="ping -c (200)")
    ap.add_argument("--mode", nargs="+", choices=sorted(MODES) + ["all"], default=["ipip"],
                    help="one or more modes, or all (ipip)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if "all" in args.mode:
        args.mode = list(MODES)
    args.mode = list(dict.fromkeys(args.mode))
    if args.time < 1 or args.pings < 1:
        ap.error("--time and --pings must be at least 1")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, TUN devices)")

    interrupt_on_signals()
    bench, mach = Bench(), machine()        # the load before the bench adds its own
    try:
        bench.setup(args.mode)
        rows = measure(bench, args)
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
        print(json.dumps({"mode": args.mode, "time": args.time, "pings": args.pings,
                          "machine": mach, "metrics": rows}, indent=2))
    else:
        print(table(rows, mach, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
