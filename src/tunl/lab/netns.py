"""Network namespaces for the lab, with the `ip` command (iproute2).

pyroute2 is kept for tunl.kernel; the lab drives `ip` exactly as a person at a shell would,
so that what it does can be read and repeated by hand.

Ending the processes of a namespace: `ip netns pids NS` names them; each one is pinned with a
pidfd and checked to be still in NS (a PID can be reused between the listing and the signal),
sent SIGTERM, given `grace` seconds to exit, then SIGKILL. Only those PIDs, never a name match.
pidfds need Linux 5.3 or later.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import TunlError

NETNS_RUN_DIR = "/run/netns"      # where `ip netns add` mounts the namespaces (iproute2's default)
GRACE = 2.0                       # seconds between SIGTERM and SIGKILL


class LabError(TunlError):
    """A lab step failed; the message is one line that names the host and the command."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_error_line(self) -> str:
        """What to quote of a failed command: its last line of stderr (or of stdout)."""
        for text in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return ""


def tool_env() -> dict[str, str]:
    """The environment for commands in a lab: `tunl` resolves to this interpreter's CLI.

    sys.executable is not resolved: in a venv, its directory is the venv's bin/.
    """
    env = dict(os.environ)
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["PATH"] = bindir + os.pathsep + path
    return env


def run(argv: Sequence[str], *, timeout: float | None = None, env=None) -> Result:
    """Run a command to its end; output goes to files, not pipes.

    A command may leave a daemon behind that keeps its stdout open (`tunl tunnel add` starts
    tunld): with pipes we would wait for that daemon's end, with files only for the command's.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            p = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               timeout=timeout, env=env)
            code = p.returncode
        except FileNotFoundError as e:
            raise LabError(f"{argv[0]}: not found (install iproute2)") from e
        except subprocess.TimeoutExpired:
            code = -1
            err.write(f"timed out after {timeout:g} s")
        out.seek(0)
        err.seek(0)
        return Result(tuple(argv), code, out.read(), err.read())


def ip(*args: str, ns: str | None = None) -> Result:
    """`ip [-n NS] ARGS`; raises LabError with ip's own complaint if it fails."""
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = run(argv, timeout=30)
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {r.last_error_line or f'exit {r.returncode}'}")
    return r


def list_ns() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    r = run(["ip", "netns", "list"], timeout=30)
    if r.returncode != 0:
        raise LabError(f"ip netns list: {r.last_error_line}")
    # lines look like "name (id: 3)" or "name"
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def add(ns: str) -> None:
    ip("netns", "add", ns)


def delete(ns: str) -> bool:
    """Delete a namespace; False if it was not there."""
    if ns not in list_ns():
        return False
    ip("netns", "delete", ns)
    return True


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def sh(ns: str, command: str, *, timeout: float | None = None) -> Result:
    """`ip netns exec NS sh -c COMMAND`, with the lab's PATH."""
    return run(exec_argv(ns, ["sh", "-c", command]), timeout=timeout, env=tool_env())


def set_sysctl(ns: str, key: str, value: str) -> None:
    """Write a sysctl of the namespace (/proc/sys/net is per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")
    r = run(exec_argv(ns, ["sh", "-c", f"echo {value} > {path}"]), timeout=30)
    if r.returncode != 0:
        raise LabError(f"{ns}: sysctl {key}={value}: {r.last_error_line}")


# -- ending processes -----------------------------------------------------------------------

def pids(ns: str) -> list[int]:
    """PIDs of the processes in namespace `ns` (`ip netns pids NS`)."""
    r = run(["ip", "netns", "pids", ns], timeout=30)
    if r.returncode != 0:
        return []
    return [int(w) for w in r.stdout.split() if w.isdigit()]


def _ancestors() -> set[int]:
    """This process and its ancestors: never signalled, even when they sit in a lab namespace."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat.rpartition(")")[2].split()[1])   # field 4, after "(comm)"
        except (OSError, ValueError, IndexError):
            break
    return out


def _ns_inode(ns: str) -> int | None:
    try:
        return os.stat(os.path.join(NETNS_RUN_DIR, ns)).st_ino
    except OSError:
        return None


def _in_ns(pid: int, inode: int | None) -> bool:
    if inode is None:
        return True                  # cannot tell: `ip netns pids` has just said so
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == inode
    except OSError:
        return False


def _pin(pid: int, inode: int | None) -> int | None:
    """A pidfd for `pid` if it is still a process in the namespace, else None."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None                  # gone already (or a zombie's PID slot)
    # checked after pinning: the PID now cannot be reused under us
    if not _in_ns(pid, inode):
        os.close(fd)
        return None
    return fd


def _wait_exit(fds: dict[int, int], timeout: float, clock: Callable[[], float]) -> None:
    """Wait until each pidfd is readable (its process exited) or `timeout` has passed."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending = set(fds)
    deadline = clock() + timeout
    while pending:
        left = deadline - clock()
        if left <= 0:
            return
        for fd, _ in poller.poll(left * 1000):
            pending.discard(fd)
            poller.unregister(fd)


def _alive(fd: int) -> bool:
    return not select.select([fd], [], [], 0)[0]


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


def end_processes(ns: str, grace: float = GRACE,
                  clock: Callable[[], float] = time.monotonic) -> int:
    """End every process in namespace `ns`; returns how many there were.

    SIGTERM, up to `grace` seconds to exit, then SIGKILL to those still there. Runs a few
    rounds, in case a process started another while it was being ended.
    """
    spare = _ancestors()
    inode = _ns_inode(ns)
    ended: set[int] = set()
    for _ in range(3):
        fds: dict[int, int] = {}
        for pid in pids(ns):
            if pid in spare:
                continue
            fd = _pin(pid, inode)
            if fd is not None:
                fds[fd] = pid
        if not fds:
            break
        try:
            for fd, pid in fds.items():
                _signal(fd, signal.SIGTERM)
            _wait_exit(fds, grace, clock)
            for fd, pid in fds.items():
                if _alive(fd):
                    _signal(fd, signal.SIGKILL)
            _wait_exit(fds, grace, clock)
        finally:
            for fd in fds:
                os.close(fd)
        ended.update(fds.values())
    return len(ended)


def mirror_rows(routes: list[dict], family: int) -> list[list]:
    """`ip -j route show table all dev DEV` (of one family) as tunld's mirror of a tunnel
    lists it (`routes` request): [destination, gateway, table] of each unicast route outside
    the local table."""
    out = []
    for r in routes:
        if r.get("type", "unicast") != "unicast" or r.get("table") == "local":
            continue
        dst = r["dst"]
        if dst == "default":
            dst = "0.0.0.0/0" if family == 4 else "::/0"
        elif "/" not in dst:
            dst += "/32" if family == 4 else "/128"
        table = {"main": 254, None: 254}.get(r.get("table"), r.get("table"))
        out.append([dst, r.get("gateway"), int(table)])
    return out
