"""The two processes of tunld and what they share: names, spawning each other, and knowing
when their network namespace has been deleted.

tunld is a pair: a small supervisor and the data-plane process it starts. Each holds one end
of a socketpair to the other, so each learns at once (end of file) that the other has died,
however it died. The supervisor starts a new data-plane process; the data-plane process,
which keeps moving packets, starts a new supervisor and hands it the control socket. Only an
orderly stop ("stop" over the socketpair: `tunl daemon stop`, SIGTERM to the supervisor) ends
both.
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys

PR_SET_NAME = 15
STOP = b"stop\n"


def name_process(role: str) -> None:
    """`ps` and `pgrep tunld` see "tunld" (comm), `ps -f` sees "tunld: <role>" (cmdline)."""
    try:
        import setproctitle
        setproctitle.setproctitle(f"tunld: {role}")
    except ImportError:          # the name in `ps -f` is a nicety: go on without it
        pass
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"tunld", 0, 0, 0)
    except (OSError, AttributeError):
        pass


def spawn(module: str, args: list[str], listener: socket.socket) -> tuple[subprocess.Popen,
                                                                         socket.socket]:
    """Start the other process of the pair (`python -m module args`), handing it the listening
    control socket and one end of a new socketpair; returns it and our end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # A session of its own for the child, so that Ctrl-C (SIGINT) and a closed terminal
    # (SIGHUP) on a tunld run by hand reach the supervisor alone, which stops the data plane
    # in order. A data plane they reached too would die of them: with a traceback in the log
    # if it was still importing, or counted as a crash and started again.
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--listen-fd", str(listener.fileno()),
             "--partner-fd", str(theirs.fileno())],
            pass_fds=(listener.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL,
            close_fds=True, start_new_session=True)
    finally:
        theirs.close()
    return proc, ours


def _netns_inode(pid: str = "self") -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_abandoned(own: set[int]) -> bool:
    """Whether nothing but tunld holds this network namespace: no bind mount of it (what
    `ip netns add` makes and `ip netns del` removes, and what CNI and container runtimes
    make) and no process other than tunld's in it. Then it is gone for everybody else, and
    tunld ends with it. The host's initial namespace is never abandoned."""
    ino = _netns_inode()
    if ino is None or ino == _netns_inode("1"):
        return False
    tag = f"net:[{ino}]"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if tag in line:
                    return False
    except OSError:
        return False
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in own:
            continue
        if _netns_inode(pid) != ino:
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "tunld":
                    continue
        except OSError:
            continue
        return False
    return True


def recv_partner(sock: socket.socket) -> bytes | None:
    """What the partner said (b"" when it is gone), or None when it said nothing yet."""
    try:
        return sock.recv(64)
    except BlockingIOError:
        return None
    except OSError:
        return b""
