"""Does tunld hold up? Measure the daemon of the userspace data plane under abuse.

Run as root:  .venv/bin/python bench/stress.py [--only heal,burst,churn,scale,abuse,nbma]
                                               [--tunnels 200] [--routes 10000] [--json]

Each scenario builds its own fresh network namespaces, tl-bench-<random>-<scenario>-<host>,
each with its own tunld (started by tunl on demand), and removes them when it is done:

  heal   kill -9 of the data-plane process: time until a ping through a one-to-one ipip tunnel
         is answered with nothing typed (5 times); kill -9 of the supervisor under
         `ping -i 0.02`: packets lost.
  burst  --routes routes in one `ip -batch` burst, first on another device (a veth, d0), then
         on an NBMA tunnel: tunld's CPU until idle, when it goes idle, its RSS, the time of
         `tunl tunnel show` right after the burst, ping through a second tunnel meanwhile, and
         whether tunld's route mirror is exactly the kernel's routes.
  churn  250, 500, 1,000 and 2,000 routes added one netlink request at a time on d0 (and, an
         extra, 2,000 on the tunnel): tunld's CPU.
  scale  --tunnels GRE tunnels with distinct keys added through the CLI, each add timed; then
         `tunl tunnel show`, threads, RSS and CPU at rest.
  abuse  a non-root client (and, an extra, a root one) that dribbles a byte every 4 s while
         `tunl tunnel show` is timed; a 100 MiB request; 29 malformed requests, and a packet
         through each tunnel that a malformed request made.
  nbma   RSS of the data plane per 40,000 new outer destinations of an NBMA tunnel, where the
         outer packets go, and (an extra) the same with a rule that keeps them on the underlay.

For each figure it prints the value recorded before this work (BASELINE), the value now and the
goal, then the machine. A benchmark, not a test: it asserts nothing. A scenario that fails says
what failed in its rows and the others go on. It always removes what it made, also on Ctrl-C or
failure, and ends only processes it started or that live in its own namespaces, by pid.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import end_netns, interrupt_on_signals, machine as bench_machine, stop  # noqa: E402  (bench/bench.py, beside this one)
from tunl.lab.netns import mirror_rows  # noqa: E402

BIN = os.path.dirname(sys.executable)
TUNL = os.path.join(BIN, "tunl")
PY = sys.executable
SYS_PY = "/usr/bin/python3"         # for uid 65534, which cannot reach a venv under /root
# tunld of the userspace data plane is what is measured (and what the recorded figures are)
ENV = {**os.environ, "PATH": BIN + ":" + os.environ.get("PATH", ""), "TUNL_DATAPLANE": "userspace"}
A_UL, B_UL = "172.16.232.172", "172.16.232.194"       # underlay, /16, on veth eth0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SCENARIOS = ("heal", "burst", "churn", "scale", "abuse", "nbma")
CHURN = (250, 500, 1000, 2000)
HEAL_REPEATS = 5
NBMA_ROUND = 40000
MIB = 1024 * 1024

# metric key -> (scenario, label, before, goal). The "before" figures were recorded on this
# machine (2-core AMD EPYC VM) with tunl 0cb24e0, the commit before tunld's supervisor, rtnl
# mirror and one egress thread. "–": none recorded, or no goal set.
BASELINE: dict[str, tuple[str, str, str, str]] = {
    "heal.median": ("heal", "kill -9 data plane -> ping answered, median of 5",
                    "never (nothing in 30 s)", "≤ 1 s"),
    "heal.max": ("heal", "kill -9 data plane -> ping answered, max of 5",
                 "never (nothing in 30 s)", "≤ 1 s"),
    "heal.supervisor": ("heal", "kill -9 supervisor under ping -i 0.02: lost",
                        "– (no supervisor then)", "0"),
    "burst.d0.cpu": ("burst", "{routes} routes on d0: tunld CPU, burst to idle",
                     "100–170 % CPU until restart (5,000 routes)", "–"),
    "burst.d0.idle": ("burst", "{routes} routes on d0: idle after last route",
                      "never: overflow, then busy until restart (5,000)", "≤ 2 s"),
    "burst.d0.show": ("burst", "{routes} routes on d0: tunl tunnel show right after",
                      "9–11 s", "not delayed"),
    "burst.d0.rss": ("burst", "{routes} routes on d0: tunld RSS after", "–", "–"),
    "burst.tunl0.cpu": ("burst", "{routes} routes on tunl0: tunld CPU, burst to idle",
                        "100–170 % CPU until restart (5,000 routes)", "–"),
    "burst.tunl0.idle": ("burst", "{routes} routes on tunl0: idle after last route",
                         "never: overflow, then busy until restart (5,000)", "≤ 2 s"),
    "burst.tunl0.show": ("burst", "{routes} routes on tunl0: tunl tunnel show right after",
                         "9–11 s", "not delayed"),
    "burst.tunl0.rss": ("burst", "{routes} routes on tunl0: tunld RSS after", "–", "–"),
    "burst.tunl0.mirror": ("burst", "{routes} routes on tunl0: mirror vs kernel",
                           "overflow (events lost)", "exact"),
    "burst.ping": ("burst", "ping avg via 2nd tunnel during tunl0 burst (20)",
                   "113 ms", "–"),
    "burst.log": ("burst", "tunld log growth, both bursts", "73 MB in 3.5 min", "–"),
    "churn.250": ("churn", "250 routes one by one on d0: tunld CPU", "3 s (100 % CPU)",
                  "∝ N, ≪ time to add"),
    "churn.500": ("churn", "500 routes one by one on d0: tunld CPU", "12 s (100 % CPU)",
                  "∝ N, ≪ time to add"),
    "churn.1000": ("churn", "1,000 routes one by one on d0: tunld CPU", "39 s (100 % CPU)",
                   "∝ N, ≪ time to add"),
    "churn.2000": ("churn", "2,000 routes one by one on d0: tunld CPU", "167 s (100 % CPU)",
                   "∝ N, ≪ time to add"),
    "churn.rss": ("churn", "tunld RSS after 2,000 routes one by one", "171 MB", "–"),
    "churn.tunl0": ("churn", "2,000 routes one by one on tunl0 (extra)", "–",
                    "∝ N, ≪ time to add"),
    "scale.cli": ("scale", "tunl tunnel show, no tunnel yet (CLI floor), median 3", "–", "–"),
    "scale.mean": ("scale", "{tunnels} GRE tunnels via CLI: add, mean", "≈4.5 s (895 s / 200)",
                   "–"),
    "scale.p95": ("scale", "{tunnels} GRE tunnels via CLI: add, p95", "–", "–"),
    "scale.max": ("scale", "{tunnels} GRE tunnels via CLI: add, max", "42 s", "–"),
    "scale.last10": ("scale", "{tunnels} GRE tunnels via CLI: add, mean of last 10",
                     "12.8 s", "≤ 0.5 s"),
    "scale.total": ("scale", "{tunnels} GRE tunnels via CLI: all adds", "895 s", "–"),
    "scale.show": ("scale", "tunl tunnel show with {tunnels}, median of 5", "13–14 s",
                   "well under 1 s"),
    "scale.threads": ("scale", "tunld threads (data plane) with {tunnels}", "204",
                      "bounded"),
    "scale.rss": ("scale", "tunld RSS (data plane + supervisor)", "640–685 MB", "≤ 100 MB"),
    "scale.idle": ("scale", "tunld CPU at rest with {tunnels}, over 10 s",
                   "97.7 % of a core", "≈ 0"),
    "abuse.slow": ("abuse", "show while uid 65534 sends 1 byte / 4 s",
                   "delayed 39.6 s", "not delayed"),
    "abuse.slow_root": ("abuse", "show while root sends 1 byte / 4 s (extra)", "–",
                        "not delayed"),
    "abuse.big.cpu": ("abuse", "100 MiB request (root): tunld CPU", "55 s",
                      "bounded (cut at 64 KiB)"),
    "abuse.big.rss": ("abuse", "100 MiB request (root): tunld RSS growth", "200 MB",
                      "bounded"),
    "abuse.malformed": ("abuse", "29 malformed root requests: internal error",
                        "23 of 29", "0"),
    "abuse.accepted": ("abuse", "29 malformed root requests: accepted (extra)", "–", "0"),
    "nbma.round1": ("nbma", "RSS growth, 1st 40,000 new outer destinations",
                    "+9.7 MB (~260 B each)", "no growth per dest"),
    "nbma.round2": ("nbma", "RSS growth, 2nd 40,000 new outer destinations",
                    "+9.7 MB (~260 B each)", "no growth per dest"),
    "nbma.loop": ("nbma", "outer packets per datagram; reaching the underlay", "–",
                  "1; all"),
    "nbma.u.round1": ("nbma", "RSS growth, 3rd 40,000, + rule ipproto 255 (extra)",
                      "–", "no growth per dest"),
    "nbma.u.round2": ("nbma", "RSS growth, 4th 40,000, + rule ipproto 255 (extra)",
                      "–", "no growth per dest"),
    "nbma.cost": ("nbma", "tunld CPU per datagram to a new dest (+ rule)", "~420 µs", "–"),
}


# -- namespaces and processes ---------------------------------------------------------------

class Lab:
    """The namespaces this run made (and the logs and state directories of their tunlds), and
    the processes it started."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.made: dict[str, list[str]] = {}      # namespace -> files to remove with it
        self.procs: list[subprocess.Popen] = []

    def ns(self, scenario: str, host: str) -> str:
        ns = f"tl-bench-{self.tag}-{scenario}-{host}"
        self.made[ns] = []                       # first: an interrupt must not leak it
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        # tunld keeps its record and its log in a directory named by the namespace's cookie
        state = self.run(ns, f"{PY} -c 'from tunl.daemon.state import state_dir; "
                             "print(state_dir())'").strip()
        self.made[ns] += [p for p in (state,) if p.startswith("/run/tunl/")
                          and not os.path.exists(p)]
        self.run(ns, "ip link set lo up")
        return ns

    def run(self, ns: str, cmd: str, timeout: float = 60) -> str:
        p = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd], capture_output=True,
                           text=True, timeout=timeout, env=ENV)
        if p.returncode != 0:
            raise RuntimeError(f"[{ns}] {cmd[:200]} -> exit {p.returncode}: "
                               f"{(p.stdout + p.stderr).strip()[:500]}")
        return p.stdout

    def exec(self, ns: str, argv: list[str], timeout: float = 60,
             stdin: str | None = None) -> subprocess.CompletedProcess:
        """argv in ns without a shell (ip netns exec execs it: less to start)."""
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, timeout=timeout, env=ENV, input=stdin)

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=ENV, text=True, **kw)
        self.procs.append(p)
        return p

    def timed(self, ns: str, argv: list[str], timeout: float = 120) -> tuple[float, str]:
        """Seconds argv took in ns; raises if it failed."""
        t0 = time.monotonic()
        p = self.exec(ns, argv, timeout=timeout)
        took = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"[{ns}] {' '.join(argv)[:200]} -> exit {p.returncode}: "
                               f"{(p.stdout + p.stderr).strip()[:500]}")
        return took, p.stdout

    def tunl(self, ns: str, args: str, timeout: float = 120) -> str:
        return self.timed(ns, [TUNL, *args.split()], timeout)[1]

    def status(self, ns: str) -> dict:
        return json.loads(self.tunl(ns, "-j daemon status"))

    def counters(self, ns: str, dev: str) -> dict:
        return next(t["stats"] for t in json.loads(self.tunl(ns, "-j -s tunnel show"))
                    if t["ifname"] == dev)

    def batch(self, ns: str, lines: list[str], timeout: float = 600) -> None:
        p = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                           text=True, capture_output=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"[{ns}] ip -batch -> exit {p.returncode}: {p.stderr.strip()[:300]}")

    def underlay(self, a: str, b: str) -> None:
        """A veth pair eth0 between a (A_UL) and b (B_UL), as bench.py's."""
        subprocess.run(["ip", "link", "add", "eth0", "netns", a, "type", "veth", "peer",
                        "name", "eth0", "netns", b], check=True, capture_output=True)
        for ns, me in ((a, A_UL), (b, B_UL)):
            self.run(ns, f"ip addr add {me}/16 dev eth0 && ip link set eth0 up")

    def drop(self, ns: str) -> None:
        """End every process in ns (TERM, then KILL), delete it, remove its tunld's files."""
        files = self.made.pop(ns, [])
        end_netns(ns)
        for path in files:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def reap(self) -> None:
        stop(self.procs)
        self.procs.clear()

    def close(self) -> None:
        self.reap()
        for ns in reversed(list(self.made)):
            self.drop(ns)




def proc_stat(pid: int) -> tuple[int, int]:
    """(utime + stime in ticks, RSS in bytes) of a live process; OSError when it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # the name may hold spaces and ')'
    if fields[0] in "ZX":
        raise ProcessLookupError(pid)
    return int(fields[11]) + int(fields[12]), int(fields[21]) * PAGE   # fields 14, 15, 24


def age(pid: int) -> float:
    """Seconds since the process started."""
    with open(f"/proc/{pid}/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19]) / CLK_TCK     # field 22
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start


def cpu_seconds(pid: int) -> float:
    return proc_stat(pid)[0] / CLK_TCK


def status_field(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def rss_mb(pid: int) -> float:
    return status_field(pid, "VmRSS") / 1024


class Sampler(threading.Thread):
    """CPU ticks and RSS of one process every 50 ms, from start() until stop()."""

    def __init__(self, pid: int, step: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.step = pid, step
        self.samples: list[tuple[float, int, int]] = []      # (monotonic, ticks, rss)
        self.dead_at: float | None = None
        self._halt = threading.Event()
        self.samples.append((time.monotonic(), *proc_stat(pid)))

    def run(self) -> None:
        while not self._halt.wait(self.step):
            try:
                self.samples.append((time.monotonic(), *proc_stat(self.pid)))
            except OSError:
                self.dead_at = time.monotonic()
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def ticks_at(self, t: float) -> int:
        """Ticks of the last sample taken at or before t."""
        got = self.samples[0][1]
        for when, ticks, _ in list(self.samples):
            if when > t:
                break
            got = ticks
        return got

    def last_change(self) -> float:
        """When the ticks were last seen to change (the first sample's time if never)."""
        s = list(self.samples)
        for i in range(len(s) - 1, 0, -1):
            if s[i][1] != s[i - 1][1]:
                return s[i][0]
        return s[0][0]

    def peak_rss(self) -> int:
        return max(r for _, _, r in list(self.samples))

    def wait_idle(self, after: float, quiet: float = 0.5, timeout: float = 60) -> float | None:
        """Wait until the ticks have not changed for `quiet` s past `after`; return when they
        last changed, or None if the process was still busy after `timeout` s."""
        deadline = after + timeout
        while True:
            if self.dead_at is not None:
                raise RuntimeError(f"tunld (pid {self.pid}) died")
            now = time.monotonic()
            last = self.last_change()
            if now - max(last, after) >= quiet:
                return last
            if now > deadline:
                return None
            time.sleep(self.step)


def wait_for(cond, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError):
            got = None
        if got:
            return got
        time.sleep(step)
    return None


def machine() -> dict:
    """bench.machine(), and the tunl revision measured."""
    # read-only git: no index refresh (GIT_OPTIONAL_LOCKS=0), nothing written
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    rev = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, env=git).stdout.strip()
    if rev and subprocess.run(["git", "-C", top, "status", "--porcelain", "-uno"],
                              capture_output=True, text=True, env=git).stdout.strip():
        rev += " + uncommitted changes"
    info = bench_machine()
    return {**info, "tunl": rev or "?", "date": info.pop("date")}


# -- results --------------------------------------------------------------------------------

class Results:
    def __init__(self, args):
        self.args = args
        self.now: dict[str, str] = {}
        self.values: dict[str, object] = {}
        self.failures: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []      # (scenario, text): printed below the table
        self.interrupted = False

    def note(self, scenario: str, text: str) -> None:
        self.notes.append((scenario, text))

    def put(self, key: str, now: str, value: object = None) -> None:
        self.now[key] = now
        self.values[key] = value

    def fail(self, scenario: str, what: str) -> None:
        self.failures.append((scenario, what))
        short = what.splitlines()[0][:160] if what else "failed"
        for key, (scen, *_rest) in BASELINE.items():
            if scen == scenario and key not in self.now:
                self.put(key, f"FAILED: {short}")

    def label(self, key: str) -> str:
        return BASELINE[key][1].format(routes=f"{self.args.routes:,}",
                                       tunnels=f"{self.args.tunnels:,}")

    def rows(self) -> list[dict]:
        out = []
        for key, (scen, _label, before, goal) in BASELINE.items():
            if scen not in self.args.only:
                continue
            out.append({"key": key, "scenario": scen, "metric": self.label(key),
                        "before": before,
                        "now": self.now.get(key, "interrupted" if self.interrupted else
                                            "not measured"),
                        "goal": goal, "value": self.values.get(key)})
        return out


def s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s" if x < 100 else f"{x:,.0f} s"


def mb(x: float) -> str:
    return f"{x:.1f} MB"


def cpu_line(cpu: float, over: float) -> str:
    return f"{cpu:.2f} s ({100 * cpu / over:.0f} % of a core over {over:.1f} s)" if over > 0 \
        else f"{cpu:.2f} s"


# -- 1. heal --------------------------------------------------------------------------------

def o2o(lab: Lab, scenario: str) -> tuple[str, str]:
    """Two namespaces and a one-to-one ipip tunnel between them (10.42.1.1 <-> 10.42.2.1)."""
    a, b = lab.ns(scenario, "a"), lab.ns(scenario, "b")
    lab.underlay(a, b)
    for ns, me, peer, mine, theirs in ((a, A_UL, B_UL, "10.42.1", "10.42.2"),
                                       (b, B_UL, A_UL, "10.42.2", "10.42.1")):
        lab.tunl(ns, f"tunnel add tunl0 mode ipip remote {peer} local {me}")
        lab.run(ns, f"ip addr add {mine}.1/24 dev tunl0 && ip link set tunl0 up && "
                    f"ip route add {theirs}.0/24 dev tunl0")
    lab.run(a, "ping -n -c 3 -i 0.2 -W 2 10.42.2.1")
    return a, b


def ping_once(lab: Lab, ns: str, dst: str) -> bool:
    return lab.exec(ns, ["ping", "-n", "-c1", "-W0.05", dst], timeout=10).returncode == 0


def ping_back_after(lab: Lab, ns: str, dst: str, since: float, timeout: float) -> float | None:
    """Seconds from `since` until a ping from ns to dst is answered, None if none is within
    timeout. One shell in ns runs `ping -c1 -W0.05` again as soon as the last gave up (every
    ~55 ms), without the cost of entering the namespace each time."""
    p = lab.popen(ns, ["sh", "-c", f"until ping -n -q -c1 -W0.05 {dst} >/dev/null 2>&1; "
                                   "do sleep 0.005; done"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Popen.wait(timeout) polls with sleeps of up to 50 ms; a blocking wait sees the end at once
    timer = threading.Timer(max(0.0, since + timeout - time.monotonic()), p.kill)
    timer.start()
    try:
        code = p.wait()
    finally:
        timer.cancel()
    return time.monotonic() - since if code == 0 else None


def heal(lab: Lab, args, res: Results) -> None:
    a, _b = o2o(lab, "heal")
    took: list[float | None] = []
    for _ in range(HEAL_REPEATS):
        st = lab.status(a)
        # a data plane that dies within QUICK_DEATH (2 s) of its start is restarted after a
        # backoff: let it live 3 s, so that this measures healing, not a crash loop
        time.sleep(max(0.0, 3.0 - age(st["pid"])))
        if not wait_for(lambda: ping_once(lab, a, "10.42.2.1"), 10):
            raise RuntimeError("no traffic through the tunnel before the kill")
        os.kill(st["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        t = ping_back_after(lab, a, "10.42.2.1", t0, 30)
        took.append(t)
        if t is None:
            break
        if not wait_for(lambda: lab.status(a)["pid"] != st["pid"], 10):
            raise RuntimeError("traffic is back but status shows no new data plane")
    got = [t for t in took if t is not None]
    every = ", ".join(s(t) if t is not None else "never in 30 s" for t in took)
    if len(got) == len(took):
        res.put("heal.median", f"{s(statistics.median(got))} ({every})", statistics.median(got))
        res.put("heal.max", s(max(got)), max(got))
    else:
        res.put("heal.median", f"never in 30 s ({every}; stopped there)", None)
        res.put("heal.max", "never in 30 s", None)

    # the supervisor, under a steady ping
    st = lab.status(a)
    pinger = lab.popen(a, ["ping", "-n", "-q", "-i", "0.02", "-c", "200", "-W", "1",
                           "10.42.2.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    os.kill(st["supervisor"], signal.SIGKILL)
    t0 = time.monotonic()
    new = wait_for(lambda: (x := lab.status(a))["supervisor"] != st["supervisor"] and x, 5)
    t_new = time.monotonic() - t0 if new else None
    out, _ = pinger.communicate(timeout=30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if not m:
        raise RuntimeError(f"ping under the supervisor kill: {out.strip()[:200]}")
    sent, got_ = int(m.group(1)), int(m.group(2))
    detail = []
    if new:
        detail.append(f"new supervisor in {s(t_new)}")
        detail.append("same data plane" if new["pid"] == st["pid"] else
                      f"data plane changed {st['pid']} -> {new['pid']}")
    else:
        detail.append("no new supervisor within 5 s")
    res.put("heal.supervisor", f"{sent - got_} of {sent} ({'; '.join(detail)})", sent - got_)


# -- 2. burst -------------------------------------------------------------------------------

def host_route(base: str, i: int) -> str:
    """The i-th /32 after base (a dotted quad)."""
    b = [int(x) for x in base.split(".")]
    n = (b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3]) + i
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def kernel_routes(lab: Lab, ns: str, dev: str) -> list:
    """The kernel's routes on dev as tunld's mirror lists them (tests/integration/
    test_tunld.py kernel_routes())."""
    return sorted(row for fam in (4, 6) for row in mirror_rows(
        json.loads(lab.run(ns, f"ip -{fam} -j route show table all dev {dev}")), fam))


def mirror(lab: Lab, ns: str, dev: str) -> list:
    """tunld's mirror of the routes on dev (test_tunld.py mirror())."""
    return json.loads(lab.run(ns, f"{PY} -c 'import json; from tunl.daemon import client; "
                                  f"print(json.dumps(client.call(\"routes\", name=\"{dev}\")))'"))


def mirror_diff(lab: Lab, ns: str, dev: str) -> tuple[int, int]:
    want = {tuple(r) for r in kernel_routes(lab, ns, dev)}
    have = {tuple(r) for r in mirror(lab, ns, dev)}
    return len(want ^ have), len(want)


def burst_phase(lab: Lab, ns: str, pid: int, lines: list[str]) -> dict:
    """One `ip -batch` burst: CPU from its start until idle, the time from its end until idle,
    `tunl tunnel show` right after it, RSS after."""
    sampler = Sampler(pid)
    sampler.start()
    try:
        t0 = time.monotonic()
        lab.batch(ns, lines)
        t1 = time.monotonic()
        show, _ = lab.timed(ns, [TUNL, "tunnel", "show"])
        last = sampler.wait_idle(t1, quiet=0.5, timeout=60)
    finally:
        sampler.stop()
    end = last if last is not None else time.monotonic()
    cpu = (sampler.ticks_at(end) - sampler.ticks_at(t0)) / CLK_TCK
    return {"burst_s": t1 - t0, "show_s": show, "cpu_s": cpu, "over_s": end - t0,
            "idle_after_s": None if last is None else max(0.0, last - t1),
            "rss_mb": rss_mb(pid)}


def burst(lab: Lab, args, res: Results) -> None:
    n = args.routes
    a, b = lab.ns("burst", "a"), lab.ns("burst", "b")
    lab.underlay(a, b)
    lab.tunl(a, "tunnel add tunl0 mode ipip")
    lab.run(a, "ip addr add 10.42.1.0/32 dev tunl0 && ip link set tunl0 up && "
               "ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up")
    # a second tunnel, one-to-one to b, to ping through while tunl0's routes arrive
    for ns, me, peer, mine, theirs in ((a, A_UL, B_UL, "10.44.1", "10.44.2"),
                                       (b, B_UL, A_UL, "10.44.2", "10.44.1")):
        lab.tunl(ns, f"tunnel add p0 mode ipip remote {peer} local {me}")
        lab.run(ns, f"ip addr add {mine}.1/24 dev p0 && ip link set p0 up && "
                    f"ip route add {theirs}.0/24 dev p0")
    lab.run(a, "ping -n -c 3 -i 0.2 -W 2 10.44.2.1")
    st = lab.status(a)
    pid = st["pid"]
    log = st.get("log")
    log0 = os.path.getsize(log) if log and os.path.exists(log) else 0
    time.sleep(0.5)

    d0 = burst_phase(lab, a, pid, [f"route add {host_route('100.64.0.0', i)}/32 dev d0"
                                   for i in range(n)])
    d0["resyncs"] = lab.status(a)["resyncs"] - st["resyncs"]
    put_burst(res, "d0", d0)

    pinger = lab.popen(a, ["ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "2",
                           "10.44.2.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = [f"route add {host_route('10.64.0.0', i)}/32 via 172.16.{i % 200}.{1 + i % 250} "
             f"dev tunl0 onlink" for i in range(n)]
    t0 = time.monotonic()
    tn = burst_phase(lab, a, pid, lines)
    tn["resyncs"] = lab.status(a)["resyncs"] - st["resyncs"] - d0["resyncs"]
    put_burst(res, "tunl0", tn)
    out, _ = pinger.communicate(timeout=60)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    loss = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if rtt and loss:
        res.put("burst.ping", f"{float(rtt.group(2)):.2f} ms (max {float(rtt.group(3)):.1f} "
                f"ms, {int(loss.group(1)) - int(loss.group(2))} of {loss.group(1)} lost)",
                float(rtt.group(2)))
    else:
        tail = out.strip().splitlines()[-1][:80] if out.strip() else "?"
        res.put("burst.ping", f"no answer ({tail})")

    diff, want = mirror_diff(lab, a, "tunl0")
    if diff == 0:
        res.put("burst.tunl0.mirror", f"exact ({want:,} routes)", 0)
    else:
        late = wait_for(lambda: mirror_diff(lab, a, "tunl0")[0] == 0, 10, step=0.5)
        took = time.monotonic() - t0
        res.put("burst.tunl0.mirror", f"{diff:,} of {want:,} differ when idle" +
                (f"; exact {took:.1f} s after the burst began" if late else
                 "; still not exact 10 s later"), diff)
    log1 = os.path.getsize(log) if log and os.path.exists(log) else 0
    res.put("burst.log", f"+{(log1 - log0) / 1024:.1f} KiB", log1 - log0)
    after = lab.status(a)
    if after["pid"] != pid:
        res.fail("burst", f"the data plane was restarted ({pid} -> {after['pid']})")


def put_burst(res: Results, where: str, r: dict) -> None:
    res.put(f"burst.{where}.cpu", cpu_line(r["cpu_s"], r["over_s"]) +
            f"; the burst took {s(r['burst_s'])}; {r['resyncs']} resyncs", r["cpu_s"])
    res.put(f"burst.{where}.idle", "busy 60 s after the burst" if r["idle_after_s"] is None
            else s(r["idle_after_s"]), r["idle_after_s"])
    res.put(f"burst.{where}.show", s(r["show_s"]), r["show_s"])
    res.put(f"burst.{where}.rss", mb(r["rss_mb"]), r["rss_mb"])


# -- 3. churn -------------------------------------------------------------------------------

CHURN_SCRIPT = r"""
import sys, time
from pyroute2 import IPRoute
n, dev = int(sys.argv[1]), sys.argv[2]
ipr = IPRoute()
idx = ipr.link_lookup(ifname=dev)[0]
t0 = time.monotonic()
for i in range(n):
    if dev == "d0":
        ipr.route("add", dst=f"100.64.{i >> 8}.{i & 255}/32", oif=idx)
    else:      # on the tunnel: on-link routes with a gateway, as `ip route ... onlink`
        ipr.route("add", dst=f"10.64.{i >> 8}.{i & 255}/32", oif=idx,
                  gateway=f"172.16.{i % 200}.{1 + i % 250}", flags=4)   # RTNH_F_ONLINK
print(time.monotonic() - t0)
ipr.close()
"""


def churn(lab: Lab, args, res: Results) -> None:
    rss = None
    for n, dev in [(n, "d0") for n in CHURN] + [(2000, "tunl0")]:
        key = f"churn.{n}" if dev == "d0" else f"churn.{dev}"
        ns = lab.ns("churn", f"{n}{dev}")
        try:
            lab.tunl(ns, "tunnel add tunl0 mode ipip")
            lab.run(ns, "ip addr add 10.42.1.0/32 dev tunl0 && ip link set tunl0 up && "
                        "ip link add d0 type veth peer name d1 && ip link set d0 up && "
                        "ip link set d1 up")
            pid = lab.status(ns)["pid"]
            time.sleep(0.5)
            sampler = Sampler(pid)
            sampler.start()
            try:
                t0 = time.monotonic()
                took, out = lab.timed(ns, [PY, "-c", CHURN_SCRIPT, str(n), dev], timeout=600)
                t1 = time.monotonic()
                last = sampler.wait_idle(t1, quiet=0.5, timeout=120)
            finally:
                sampler.stop()
            adding = float(out.strip().splitlines()[-1])
            end = last if last is not None else time.monotonic()
            during = (sampler.ticks_at(t1) - sampler.ticks_at(t0)) / CLK_TCK
            after = (sampler.ticks_at(end) - sampler.ticks_at(t1)) / CLK_TCK
            total = during + after
            tail = "busy 120 s after" if last is None else f"idle {s(max(0.0, last - t1))} after"
            extra = ""
            if dev != "d0":
                diff, want = mirror_diff(lab, ns, dev)
                extra = (f"; mirror exact ({want:,} routes)" if diff == 0 else
                         f"; mirror: {diff} of {want:,} differ")
            res.put(key, f"{total:.2f} s = {total / n * 1e6:.0f} µs/route "
                    f"({during:.2f} during + {after:.2f} after; adding took "
                    f"{adding:.2f} s; {tail}{extra})", total)
            if dev == "d0":
                rss = rss_mb(pid)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
            res.put(key, f"FAILED: {str(e).splitlines()[0][:160]}")
            res.failures.append(("churn", f"{n} routes on {dev}: {e}"))
        finally:
            lab.drop(ns)
    if rss is not None:
        res.put("churn.rss", mb(rss), rss)


# -- 4. scale -------------------------------------------------------------------------------

def scale(lab: Lab, args, res: Results) -> None:
    n = args.tunnels
    ns = lab.ns("scale", "a")
    lab.run(ns, f"ip link add d0 type veth peer name d1 && ip addr add {A_UL}/16 dev d0 && "
                "ip link set d0 up && ip link set d1 up")
    lab.status(ns)                      # starts tunld
    floor = statistics.median(lab.timed(ns, [TUNL, "tunnel", "show"])[0] for _ in range(3))
    res.put("scale.cli", s(floor), floor)
    pid = lab.status(ns)["pid"]
    took: list[float] = []
    budget = 420.0
    t_all = time.monotonic()
    stopped = ""
    for i in range(n):
        t, _ = lab.timed(ns, [TUNL, "tunnel", "add", f"g{i}", "mode", "gre", "key", str(i + 1),
                              "remote", B_UL, "local", A_UL], timeout=120)
        took.append(t)
        if time.monotonic() - t_all > budget and i + 1 < n:
            stopped = f" (stopped at {i + 1} of {n}: over {budget:.0f} s)"
            break
    total = time.monotonic() - t_all
    srt = sorted(took)
    p95 = srt[min(len(srt) - 1, int(round(0.95 * (len(srt) - 1))))]
    res.put("scale.mean", s(statistics.mean(took)) + stopped, statistics.mean(took))
    res.put("scale.p95", s(p95), p95)
    res.put("scale.max", f"{s(max(took))} (add #{took.index(max(took)) + 1})", max(took))
    res.put("scale.last10", s(statistics.mean(took[-10:])), statistics.mean(took[-10:]))
    res.put("scale.total", s(total), total)
    lab.batch(ns, [f"link set g{i} up" for i in range(len(took))])
    shows = []
    for _ in range(5):
        t, out = lab.timed(ns, [TUNL, "tunnel", "show"])
        shows.append(t)
    lines = sum(line.startswith("g") for line in out.splitlines())
    res.put("scale.show", f"{s(statistics.median(shows))} (max {s(max(shows))}; "
            f"{lines} g-lines)", statistics.median(shows))
    st = lab.status(ns)
    if st["pid"] != pid:
        raise RuntimeError(f"the data plane was restarted during the adds ({pid} -> {st['pid']})")
    sup = st["supervisor"]
    res.put("scale.threads", f"{status_field(pid, 'Threads')} (supervisor "
            f"{status_field(sup, 'Threads')})", status_field(pid, "Threads"))
    dp_rss, sup_rss = rss_mb(pid), rss_mb(sup)
    res.put("scale.rss", f"{mb(dp_rss + sup_rss)} ({mb(dp_rss)} + {mb(sup_rss)})",
            dp_rss + sup_rss)
    time.sleep(1.0)
    c0, s0, t0 = cpu_seconds(pid), cpu_seconds(sup), time.monotonic()
    time.sleep(10.0)
    c1, s1, t1 = cpu_seconds(pid), cpu_seconds(sup), time.monotonic()
    res.put("scale.idle", f"{100 * (c1 - c0) / (t1 - t0):.1f} % of a core (supervisor "
            f"{100 * (s1 - s0) / (t1 - t0):.1f} %)", 100 * (c1 - c0) / (t1 - t0))


# -- 5. abuse -------------------------------------------------------------------------------

SLOW_CLIENT = r"""
import json, socket, sys, time
period, life = float(sys.argv[1]), float(sys.argv[2])
ev = []
t0 = time.monotonic()
def note(what):
    ev.append([round(time.monotonic() - t0, 2), what])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect("\0tunl/tunld")
    note("connected")
    while time.monotonic() - t0 < life:
        try:
            s.send(b"{")
        except OSError as e:
            note("send: " + type(e).__name__)
            s.setblocking(False)          # an answer may be waiting before the close
            try:
                data = s.recv(4096)
                if data:
                    note("answer: " + data.decode(errors="replace").strip()[:120])
            except OSError:
                pass
            break
        s.settimeout(period)
        try:
            data = s.recv(4096)
        except socket.timeout:
            continue
        except OSError as e:
            note("recv: " + type(e).__name__)
            break
        if not data:
            note("closed by tunld")
            break
        note("answer: " + data.decode(errors="replace").strip()[:120])
except OSError as e:
    note("error: " + type(e).__name__ + " " + str(e))
print(json.dumps(ev))
"""

BIG_CLIENT = r"""
import json, socket, sys, time
total = int(sys.argv[1])
chunk = b"a" * 65536
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0tunl/tunld")
s.settimeout(30)
sent, err = 0, None
t0 = time.monotonic()
try:
    s.sendall(b'{"op": "show", "name": "')
    while sent < total:
        sent += s.send(chunk[: total - sent])
except OSError as e:
    err = type(e).__name__
t1 = time.monotonic()
reply = b""
try:
    s.settimeout(3)
    while True:
        d = s.recv(65536)
        if not d:
            break
        reply += d
except OSError:
    pass
print(json.dumps({"sent": sent, "error": err, "secs": t1 - t0,
                  "reply": reply.decode(errors="replace").strip()[:200]}))
"""

MALFORMED_CLIENT = r"""
import json, socket, sys
out = []
for line in sys.stdin.read().split():
    req = bytes.fromhex(line)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    data = b""
    try:
        s.connect("\0tunl/tunld")
        s.sendall(req)
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    except OSError as e:
        data += ("<" + type(e).__name__ + ">").encode()
    s.close()
    out.append(data.decode(errors="replace"))
print(json.dumps(out))
"""

# ~what a careless or hostile root client sends: not JSON, not an object, wrong types, missing
# and unknown arguments, and specs whose contents are wrong in every way from_dict can meet
MALFORMED: list[bytes] = [
    b"hello\n",
    b"\n",
    b"\xff\xfe{}\n",
    b"[1, 2]\n",
    b'{"op": "show", "op": "status"}\n',
    b'{"op": ["show"]}\n',
    b'{"op": "nosuch"}\n',
    b'{"op": "show", "name": 5}\n',
    b'{"op": "del"}\n',
    b'{"op": "add", "spec": []}\n',
    b'{"op": "add", "spec": {}}\n',
    b'{"op": "add", "spec": {"name": "x", "mode": "nosuch"}}\n',
    b'{"op": "add", "spec": {"name": 5}}\n',
    b'{"op": "add", "spec": {"name": "m14", "bogus": 1}}\n',
    b'{"op": "add", "spec": {"name": "m15", "ttl": "64"}}\n',
    b'{"op": "add", "spec": {"name": "m16", "ttl": 1.5, "remote": "172.16.232.116"}}\n',
    b'{"op": "add", "spec": {"name": "m17", "remote": "not-an-ip"}}\n',
    b'{"op": "add", "spec": {"name": "m18", "remote": 5}}\n',
    b'{"op": "add", "spec": {"name": "m19", "mode": "gre", "ikey": "abc"}}\n',
    b'{"op": "add", "spec": {"name": "m20", "mode": "gre", "ikey": true, "okey": true, '
    b'"remote": "172.16.232.120"}}\n',
    b'{"op": "add", "spec": {"name": "m21", "mode": "isatap", "prl": [["192.0.2.1"]]}}\n',
    b'{"op": "add", "spec": {"name": "m22", "mode": "sit", "ip6rd_prefix": "2001:db8::/300"}}\n',
    b'{"op": "add", "spec": {"name": "m23", "remote": "192.0.2.23", "pmtudisc": "no"}}\n',
    b'{"op": "add", "spec": {"name": "m24", "dev": ["eth0"]}}\n',
    b'{"op": "add", "spec": {"name": "' + b"n" * 300 + b'"}}\n',
    b'{"op": "change", "spec": {"name": "tunl0", "mode": "ipip", "local": "1.2.3.4.5"}}\n',
    b'{"op": "prl", "name": "x", "action": "add", "addr": "bad", "default": true}\n',
    b'{"op": "prl", "name": "isa0", "action": "bogus", "addr": "192.0.2.1", "default": true}\n',
    b'{"op": "sixrd", "name": "sit0", "prefix": "bad", "relay": "also bad"}\n',
]


def slow_client_run(lab: Lab, ns: str, as_root: bool, life: float,
                    show_at: list[float]) -> tuple[list[float], list]:
    """Start a client that sends a byte every 4 s for `life` s; time `tunl tunnel show` at the
    given seconds after it started. Returns the show times and what the client saw."""
    argv = ([PY] if as_root else
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYS_PY])
    client = lab.popen(ns, [*argv, "-c", SLOW_CLIENT, "4", str(life)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    shows = []
    for at in show_at:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        shows.append(lab.timed(ns, [TUNL, "tunnel", "show"], timeout=120)[0])
    out, err = client.communicate(timeout=life + 30)
    try:
        events = json.loads(out)
    except ValueError:
        events = [[0, f"client failed: {(out + err).strip()[:200]}"]]
    return shows, events


def abuse(lab: Lab, args, res: Results) -> None:
    ns = lab.ns("abuse", "a")
    lab.run(ns, f"ip link add eth0 type veth peer name eth1 && ip addr add {A_UL}/16 dev eth0 "
                "&& ip link set eth0 up && ip link set eth1 up")
    lab.tunl(ns, f"tunnel add tunl0 mode ipip remote {B_UL} local {A_UL}")
    lab.tunl(ns, "tunnel add isa0 mode isatap")
    lab.tunl(ns, f"tunnel add sit0 mode sit remote 172.16.1.2 local {A_UL}")
    st = lab.status(ns)
    pid = st["pid"]
    log = st.get("log")
    alone = [lab.timed(ns, [TUNL, "tunnel", "show"])[0] for _ in range(3)]
    base = statistics.median(alone)

    # (a) a client that dribbles: non-root (as specified), then root (an extra)
    for key, root, who, seconds, gaps in (("abuse.slow", False, "uid 65534", 12.0,
                                           [0.5, 4.5, 8.5]),
                                          ("abuse.slow_root", True, "root", 6.0,
                                           [0.2, 0.2, 0.2])):
        try:
            shows, ev = slow_client_run(lab, ns, root, seconds, gaps)
            res.put(key, f"{s(statistics.median(shows))}, max {s(max(shows))} (alone "
                    f"{s(base)})", max(shows) - base)
            res.note("abuse", f"{who} slow client: {summary(ev)}")
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
            res.put(key, f"FAILED: {str(e).splitlines()[0][:160]}")
            res.failures.append(("abuse", f"{who} slow client: {e}"))

    # (b) a 100 MiB request
    time.sleep(0.5)
    sampler = Sampler(pid)
    sampler.start()
    try:
        r = lab.exec(ns, [PY, "-c", BIG_CLIENT, str(100 * MIB)], timeout=300)
        t1 = time.monotonic()
        last = sampler.wait_idle(t1, quiet=0.5, timeout=60)
    finally:
        sampler.stop()
    end = last if last is not None else time.monotonic()
    cpu = (sampler.ticks_at(end) - sampler.samples[0][1]) / CLK_TCK
    growth = (sampler.peak_rss() - sampler.samples[0][2]) / MIB
    try:
        big = json.loads(r.stdout)
        said = (f"client sent {big['sent'] / 1024:,.0f} KiB in {s(big['secs'])}, then "
                f"{big['error'] or 'no error'}; answer: {big['reply'][:160] or 'none'}")
    except ValueError:
        said = f"client failed: {(r.stdout + r.stderr).strip()[:200]}"
    res.put("abuse.big.cpu", f"{cpu:.2f} s", cpu)
    res.note("abuse", f"100 MiB request: {said}")
    res.put("abuse.big.rss", f"+{growth:.1f} MB at peak (now {mb(rss_mb(pid))})", growth)

    # (c) malformed requests
    log0 = os.path.getsize(log) if log and os.path.exists(log) else 0
    r = lab.exec(ns, [PY, "-c", MALFORMED_CLIENT], timeout=300,
                 stdin="\n".join(m.hex() for m in MALFORMED))
    replies = json.loads(r.stdout)
    internal, accepted, kinds = [], [], {}
    for i, (req, rep) in enumerate(zip(MALFORMED, replies), 1):
        try:
            j = json.loads(rep)
        except ValueError:
            j = None
        if not isinstance(j, dict):
            kind = "no JSON answer: " + rep[:40]
        elif j.get("ok"):
            kind = "accepted"
            accepted.append(i)
        elif "internal error" in str(j.get("message", "")):
            kind = "internal error"
            internal.append(i)
        else:
            kind = str(j.get("error"))
        kinds[kind] = kinds.get(kind, 0) + 1
        res.values.setdefault("abuse.replies", []).append(
            {"request": req.decode(errors="replace")[:120], "reply": rep[:300]})
    traces = 0
    if log and os.path.exists(log):
        with open(log, "rb") as f:
            f.seek(log0)
            traces = f.read().count(b"Traceback")
    show = lab.exec(ns, [TUNL, "tunnel", "show"])
    after = lab.status(ns)["pid"]
    extra = []
    if show.returncode != 0:
        extra.append(f"then tunl tunnel show fails: {(show.stdout + show.stderr).strip()[:120]}")
    if after != pid:
        extra.append(f"data plane restarted {pid} -> {after}")
    res.put("abuse.malformed", f"{len(internal)} of {len(MALFORMED)}" +
            (f" (#{', #'.join(map(str, internal))})" if internal else "") +
            f"; replies: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}; "
            f"{traces} tracebacks in the log" + ("; " + "; ".join(extra) if extra else ""),
            len(internal))
    # what an accepted malformed spec does to the packets that go through it
    fates = []
    for i in accepted:
        name = json.loads(MALFORMED[i - 1])["spec"]["name"]
        spec = {k: v for k, v in json.loads(MALFORMED[i - 1])["spec"].items() if k != "name"}
        fates.append(f"#{i} {json.dumps(spec)}")
        res.note("abuse", f"accepted #{i} {json.dumps(spec)}: {one_packet(lab, ns, name, i)}")
    res.put("abuse.accepted", f"{len(accepted)} of {len(MALFORMED)}" +
            (f": {', '.join(fates)}" if accepted else ""), len(accepted))


def one_packet(lab: Lab, ns: str, dev: str, i: int) -> str:
    """Send a ping into tunnel dev; say what tunld's counters and log make of it."""
    log = lab.status(ns).get("log")
    log0 = os.path.getsize(log) if log and os.path.exists(log) else 0
    before = lab.counters(ns, dev)
    lab.run(ns, f"ip addr add 10.77.{i}.1/24 dev {dev} && ip link set {dev} up")
    lab.exec(ns, ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "0.3", f"10.77.{i}.2"])
    time.sleep(0.2)
    after = lab.counters(ns, dev)
    traces = 0
    if log and os.path.exists(log):
        with open(log, "rb") as f:
            f.seek(log0)
            traces = f.read().count(b"Traceback")
    sent = after["tx_packets"] - before["tx_packets"]
    drops = {k: v - before["tx_drop"].get(k, 0) for k, v in after["tx_drop"].items()
             if v - before["tx_drop"].get(k, 0)}
    show = lab.exec(ns, [TUNL, "tunnel", "show", dev]).stdout.strip()
    return (f"2 pings -> {sent} sent" + "".join(f", {v} {k}" for k, v in drops.items()) +
            f", {traces} tracebacks; shown as \"{show[len(dev) + 2:][:60]}\"")


def summary(events: list) -> str:
    return "; ".join(f"{what} at {t:g} s" for t, what in events)


# -- 6. nbma --------------------------------------------------------------------------------

UDP_SENDER = r"""
import socket, sys, time
b0, b1 = (int(x) for x in sys.argv[1].split("."))
n = int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
errors = 0
for i in range(n):
    try:
        s.sendto(b"x", (f"{b0}.{b1}.{i >> 8 & 255}.{i & 255}", 9))
    except OSError:
        errors += 1
    if i % 50 == 49:
        time.sleep(0.01)
print(time.monotonic() - t0, errors)
"""


def nbma(lab: Lab, args, res: Results) -> None:
    a, b = lab.ns("nbma", "a"), lab.ns("nbma", "b")
    lab.underlay(a, b)
    lab.tunl(a, f"tunnel add tunl0 mode ipip local {A_UL}")
    # 10.96.0.0/13 into the tunnel, whose outer destination is then the inner one; so that
    # those are routed over the underlay, not back into the tunnel, tunld looks the outer path
    # up from the tunnel's local address, which table 100 sends to b. 10.96 warms up; 10.97
    # and 10.98 are the two rounds of 40,000 new destinations as specified, 10.99 and 10.100
    # two more with the outer packets routed by their protocol too (see below).
    lab.run(a, "ip addr add 10.42.1.0/32 dev tunl0 && ip link set tunl0 up && "
               "ip route add 10.96.0.0/13 dev tunl0 && "
               f"ip rule add from {A_UL} lookup 100 && "
               f"ip route add 10.96.0.0/13 via {B_UL} dev eth0 table 100")
    pid = lab.status(a)["pid"]

    def kernel_dropped() -> int:
        return int(lab.run(a, "cat /sys/class/net/tunl0/statistics/tx_dropped").strip())

    def b_rx() -> int:
        return int(lab.run(b, "cat /sys/class/net/eth0/statistics/rx_packets").strip())

    def round_(base: str, n: int) -> dict:
        tx0, kd0, rx0 = lab.counters(a, "tunl0")["tx_packets"], kernel_dropped(), b_rx()
        r0, c0 = rss_mb(pid), cpu_seconds(pid)
        took, _ = lab.timed(a, [PY, "-c", UDP_SENDER, base, str(n)], timeout=600)
        last = [-1]

        def settled() -> bool:         # tunld has sent what it will send
            tx = lab.counters(a, "tunl0")["tx_packets"]
            done = tx == last[0]
            last[0] = tx
            return done
        wait_for(settled, 30, step=0.5)
        r1, c1 = rss_mb(pid), cpu_seconds(pid)
        return {"sent": n, "tx": last[0] - tx0, "kernel_dropped": kernel_dropped() - kd0,
                "b_rx": b_rx() - rx0, "rss_before": r0, "rss_after": r1, "cpu": c1 - c0,
                "secs": took}

    def put(key: str, r: dict) -> None:
        grow = r["rss_after"] - r["rss_before"]
        res.put(key, f"{grow:+.1f} MB ({grow * MIB / r['sent']:+.0f} B per dest; RSS "
                f"{mb(r['rss_after'])})", grow)

    warm = round_("10.96", 2000)
    spec = [round_("10.97", NBMA_ROUND), round_("10.98", NBMA_ROUND)]
    put("nbma.round1", spec[0])
    put("nbma.round2", spec[1])
    sent, tx = sum(r["sent"] for r in spec), sum(r["tx"] for r in spec)
    rx, kd = sum(r["b_rx"] for r in spec), sum(r["kernel_dropped"] for r in spec)
    res.put("nbma.loop", f"{tx / sent:.1f} outer packets per datagram ({tx:,} for {sent:,}); "
            f"{rx:,} packets reached b; {kd:,} dropped at tunl0's queue", tx / sent)
    if tx > 1.5 * sent:
        res.note("nbma", f"tunld sent {tx / sent:.1f} outer packets per datagram and b got "
                 f"{rx:,} packets: the outer packets go back into tunl0 (nested ipip), because "
                 f"the kernel routes tunld's raw sends without their source address, so the "
                 f"rule 'from {A_UL} lookup 100' never applies to them, while tunld's own path "
                 "check looks up from the local address, sees eth0 and counts no DeadLoop")
    # The kernel routes tunld's raw (IPPROTO_RAW) sends without their source address, so
    # the rule "from local" does not catch them; a rule on the protocol the kernel sees for
    # them (255) does. With it, the same measurement without a loop.
    lab.run(a, "ip rule add ipproto 255 lookup 100")
    fixed = [round_("10.99", NBMA_ROUND), round_("10.100", NBMA_ROUND)]
    put("nbma.u.round1", fixed[0])
    put("nbma.u.round2", fixed[1])
    sent, tx = sum(r["sent"] for r in fixed), sum(r["tx"] for r in fixed)
    rx, cpu = sum(r["b_rx"] for r in fixed), sum(r["cpu"] for r in fixed)
    res.put("nbma.cost", f"{cpu / sent * 1e6:.0f} µs ({cpu:.1f} s for {sent:,} datagrams; "
            f"{tx / sent:.1f} outer packets per datagram, {rx:,} packets reached b; sent at "
            "≤5,000/s)", cpu / sent)
    res.values["nbma.detail"] = {"warmup": warm, "as_specified": spec, "ipproto_rule": fixed}
    if lab.status(a)["pid"] != pid:
        res.fail("nbma", "the data plane was restarted")


# -- the table ------------------------------------------------------------------------------

WIDTHS = (44, 30, 44, 20)


def table(rows: list[dict], res: Results, mach: dict, args, took: float) -> str:
    head = ("metric", "before", "now", "goal")
    sep = "-+-".join("-" * w for w in WIDTHS)
    lines = [f"tunld stress: --routes {args.routes:,}, --tunnels {args.tunnels:,}; scenarios "
             f"{', '.join(args.only)}",
             " | ".join(h.ljust(w) for h, w in zip(head, WIDTHS)), sep]
    scen = None
    for r in rows:
        if r["scenario"] != scen:
            if scen is not None:
                lines.append(sep)
            scen = r["scenario"]
        cells = [textwrap.wrap(str(r[k]), w) or [""] for k, w in zip(head, WIDTHS)]
        for i in range(max(map(len, cells))):
            lines.append(" | ".join((c[i] if i < len(c) else "").ljust(w)
                                    for c, w in zip(cells, WIDTHS)).rstrip())
    lines.append(sep)
    lines.append("before: recorded on this machine (2-core AMD EPYC VM) with tunl 0cb24e0, the "
                 "commit before tunld's supervisor, rtnl mirror and one egress thread")
    for scen_, what in res.notes:
        lines += textwrap.wrap(f"{scen_}: {what}", sum(WIDTHS) + 9, subsequent_indent="    ")
    for scen_, what in res.failures:
        lines.append(f"FAILED {scen_}: {what}")
    lines.append(f"machine: {mach['cpu']}, nproc {mach['nproc']}, kernel {mach['kernel']}, "
                 f"Python {mach['python']}, load {mach['loadavg']:.2f}, tunl {mach['tunl']}, "
                 f"{mach['date']}, run took {took:.0f} s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SCENARIOS), metavar="NAME[,NAME]",
                    help=f"scenarios to run, of {','.join(SCENARIOS)} (all)")
    ap.add_argument("--tunnels", type=int, default=200, metavar="N",
                    help="GRE tunnels in scale (200)")
    ap.add_argument("--routes", type=int, default=10000, metavar="N",
                    help="routes per burst (10000)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in SCENARIOS]
    if bad or not only:
        ap.error(f"--only: unknown scenario {', '.join(bad) or '(none)'}; "
                 f"choose from {', '.join(SCENARIOS)}")
    args.only = [w for w in SCENARIOS if w in only]
    if args.tunnels < 10 or args.routes < 1 or args.routes > 1 << 20:
        ap.error("--tunnels must be at least 10, --routes 1 to 1,048,576")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, TUN devices)")

    interrupt_on_signals()
    lab, mach, res = Lab(), machine(), Results(args)     # the load before the run adds its own
    t_start = time.monotonic()
    interrupted = False
    try:
        for name in args.only:
            print(f"[{time.monotonic() - t_start:5.0f} s] {name} ...", file=sys.stderr)
            try:
                globals()[name](lab, args, res)
            except (RuntimeError, OSError, ValueError, KeyError, StopIteration,
                    subprocess.SubprocessError) as e:
                res.fail(name, f"{type(e).__name__}: {e}")
            finally:
                lab.reap()
                for ns in [n for n in lab.made if n.startswith(f"tl-bench-{lab.tag}-{name}-")]:
                    lab.drop(ns)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        interrupted = res.interrupted = True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)        # a second Ctrl-C must not halve cleanup
        lab.close()
    took = time.monotonic() - t_start
    rows = res.rows()
    print(table(rows, res, mach, args, took))
    if args.json:
        print(json.dumps({"routes": args.routes, "tunnels": args.tunnels, "only": args.only,
                          "machine": mach, "seconds": took, "metrics": rows,
                          "notes": [{"scenario": a, "note": b} for a, b in res.notes],
                          "failures": [{"scenario": a, "what": b} for a, b in res.failures],
                          "detail": {k: v for k, v in res.values.items()
                                     if k not in BASELINE}}, indent=2, default=str))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
