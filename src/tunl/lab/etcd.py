"""A real etcd cluster on loopback, for the tests, the lab and the benchmark of the registry.

    with EtcdCluster(3, workdir) as c:        # members m0 m1 m2, each a subprocess of ours
        store_url = c.url                     # etcd://127.0.0.1:p0,127.0.0.1:p1,127.0.0.1:p2
        c.kill_member(c.leader())             # SIGKILL: the member dies as on a power loss
        c.start_member(0)                     # back with the same data dir, rejoining
        c.stop_member(1)                      # SIGTERM, as a person stops it

EtcdCluster(1, workdir) is a single member; stop() then start() brings a cluster back from its
data dirs (a registry that was down).

Every member logs to <workdir>/<name>.log and keeps its data in <workdir>/<name>.etcd. The
raft timing is shortened (heartbeat 50 ms, election 500 ms) so that the cluster elects a new
leader well within 2 s of losing one, and pre-vote keeps a member that comes back from
unseating the leader. Nothing compacts on its own: the tests compact when they mean to.

Ports: a client and a peer port per member, taken at random below Linux's ephemeral range
(where the kernel never picks the source port of an outgoing connection) and checked free by
binding them; when a member still finds one taken, the cluster starts again on other ports.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

from .netns import LabError

ETCD = "etcd"
PORTS = (20000, 32000)          # below the ephemeral range (32768-60999 by default)
HEALTHY_WITHIN = 20.0           # seconds for a member to answer /health with true
STOP_GRACE = 10.0               # seconds between SIGTERM and SIGKILL
TUNING = ["--heartbeat-interval", "50", "--election-timeout", "500", "--pre-vote",
          "--auto-compaction-retention", "0", "--logger", "zap", "--log-outputs", "stderr"]


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_ports(host: str, count: int) -> list[int]:
    for _ in range(100):
        base = random.randrange(PORTS[0], PORTS[1] - count)
        if all(_free(host, base + k) for k in range(count)):
            return list(range(base, base + count))
    raise LabError(f"etcd: no {count} free ports in a row on {host} between "
                   f"{PORTS[0]} and {PORTS[1]}")


class EtcdCluster:
    def __init__(self, size: int = 3, workdir: str | None = None, host: str = "127.0.0.1",
                 base_port: int | None = None, etcd: str = ETCD):
        """`workdir` None: a new directory under /tmp, left there (logs) after stop().
        `base_port`: client ports from it on, then the peer ports; None: free ones at random."""
        if size < 1:
            raise ValueError(f"etcd cluster size {size}: a cluster has at least one member")
        self.workdir = workdir or tempfile.mkdtemp(prefix="tunl-etcd-")
        self.size, self.host, self.etcd = size, host, etcd
        self._fixed = base_port
        self.names = [f"m{i}" for i in range(size)]
        self.token = f"tunl-lab-{uuid.uuid4().hex[:12]}"
        self._procs: list[subprocess.Popen | None] = [None] * size
        self._ports(base_port)

    def _ports(self, base_port: int | None) -> None:
        ports = (list(range(base_port, base_port + 2 * self.size)) if base_port
                 else _pick_ports(self.host, 2 * self.size))
        self.client_ports, self.peer_ports = ports[:self.size], ports[self.size:]

    # -- where it is ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.host, p) for p in self.client_ports]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{self._h}:{p}" for p in self.client_ports)

    @property
    def client_urls(self) -> list[str]:
        return [f"http://{self._h}:{p}" for p in self.client_ports]

    @property
    def _h(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def log_path(self, i: int) -> str:
        return os.path.join(self.workdir, f"{self.names[i]}.log")

    def data_dir(self, i: int) -> str:
        return os.path.join(self.workdir, f"{self.names[i]}.etcd")

    def running(self, i: int) -> bool:
        p = self._procs[i]
        return p is not None and p.poll() is None

    # -- members -------------------------------------------------------------------------------

    def _argv(self, i: int, state: str) -> list[str]:
        peers = ",".join(f"{n}=http://{self._h}:{p}" for n, p in zip(self.names, self.peer_ports))
        client, peer = self.client_urls[i], f"http://{self._h}:{self.peer_ports[i]}"
        return [self.etcd, "--name", self.names[i], "--data-dir", self.data_dir(i),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", peers, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token, *TUNING]

    def _spawn(self, i: int, state: str) -> None:
        if self.running(i):
            raise LabError(f"etcd {self.names[i]}: already running (pid {self._procs[i].pid})")
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.log_path(i), "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting ({state})\n".encode())
            log.flush()
            try:
                self._procs[i] = subprocess.Popen(self._argv(i, state), stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=log)
            except FileNotFoundError as e:
                raise LabError(f"etcd: {self.etcd} not found (install etcd-server)") from e

    def tail(self, i: int, lines: int = 15) -> str:
        try:
            with open(self.log_path(i), "rb") as f:
                text = f.read()[-16384:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def healthy(self, i: int, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(self.client_urls[i] + "/health", timeout=timeout) as r:
                return str(json.load(r).get("health")).lower() == "true"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: list[int] | None = None,
                     within: float = HEALTHY_WITHIN) -> None:
        """Until every member named answers /health with true; LabError with its log's tail
        as soon as one has exited, or when one is not healthy within `within` seconds."""
        deadline = time.monotonic() + within
        waiting = list(range(self.size)) if members is None else list(members)
        while waiting:
            for i in list(waiting):
                p = self._procs[i]
                if p is None or p.poll() is not None:
                    code = "never started" if p is None else f"exit {p.returncode}"
                    raise LabError(f"etcd {self.names[i]} ({self.client_urls[i]}) stopped "
                                   f"({code}); end of {self.log_path(i)}:\n{self.tail(i)}")
                if self.healthy(i):
                    waiting.remove(i)
            if waiting and time.monotonic() > deadline:
                i = waiting[0]
                raise LabError(f"etcd {self.names[i]} ({self.client_urls[i]}) not healthy "
                               f"after {within:g} s; end of {self.log_path(i)}:\n{self.tail(i)}")
            if waiting:
                time.sleep(0.05)

    def start(self) -> "EtcdCluster":
        """Start every member (again, after stop(), from its data dir) and wait until all are
        healthy. A port that turned out taken: once more on other ports (a fresh cluster only)."""
        for attempt in range(3):
            fresh = not any(os.path.exists(self.data_dir(i)) for i in range(self.size))
            for i in range(self.size):
                if not self.running(i):
                    self._spawn(i, "new" if fresh else "existing")
            try:
                self.wait_healthy()
                return self
            except LabError as e:
                for i in range(self.size):      # a failed start: nothing worth a clean stop
                    self.kill_member(i)
                taken = "address already in use" in str(e)
                if not (taken and fresh and self._fixed is None and attempt < 2):
                    raise
                for i in range(self.size):
                    shutil.rmtree(self.data_dir(i), ignore_errors=True)
                self._ports(None)
        return self

    def start_member(self, i: int, wait: bool = True) -> None:
        """Start member i again, with its data dir; it rejoins the cluster."""
        self._spawn(i, "existing")
        if wait:
            self.wait_healthy([i])

    def stop_member(self, i: int) -> None:
        """SIGTERM, and wait for the end (SIGKILL after STOP_GRACE seconds)."""
        p = self._procs[i]
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def kill_member(self, i: int) -> None:
        """SIGKILL, and wait for the end."""
        p = self._procs[i]
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self) -> None:
        """Every member, one after the other: SIGTERM to all at once makes the leader hand
        over to a member that is going too, and wait seconds for it."""
        for i in range(self.size):
            self.stop_member(i)

    def leader(self) -> int | None:
        """Index of the member that leads, as the running members report it; None without."""
        ids, leaders = {}, []
        for i in range(self.size):
            if not self.running(i):
                continue
            req = urllib.request.Request(self.client_urls[i] + "/v3/maintenance/status",
                                         data=b"{}", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=1.0) as r:
                    status = json.load(r)
                ids[status["header"]["member_id"]] = i
                leaders.append(status.get("leader"))
            except (OSError, ValueError, KeyError):
                continue
        return next((ids[lead] for lead in leaders if lead in ids), None)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
