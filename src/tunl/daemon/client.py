"""Talk to the namespace's tunld, starting it on demand."""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import time

from ..errors import BY_NAME, ConfigError, DaemonError, NoDaemonError, TunlError
from . import CONTROL_ADDRESS
from .logs import log_path

START_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 5.0     # s a call waits for tunld; TUNL_TIMEOUT overrides it
NOT_RUNNING = "tunld is not running in this network namespace"
ONLY_ROOT_STARTS = (NOT_RUNNING + ", and only root can start it (any tunl command run as "
                    "root does, or: sudo tunl daemon start)")


def timeout() -> float:
    """Seconds a call waits for tunld: TUNL_TIMEOUT, or DEFAULT_TIMEOUT."""
    word = os.environ.get("TUNL_TIMEOUT", "").strip()
    if not word:
        return DEFAULT_TIMEOUT
    try:
        t = float(word)
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise ConfigError(f'TUNL_TIMEOUT="{word}": must be a number of seconds above 0 '
                          f"(default {DEFAULT_TIMEOUT:g})")
    return t


def _connect(wait: float | None = None) -> socket.socket | None:
    """A connected socket, or None when no tunld listens. A tunld whose backlog is full (it is
    stopped, or swamped) makes connect() wait; `wait` (default: timeout()) bounds that."""
    if wait is None:
        wait = timeout()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # A blocking AF_UNIX connect() sleeps for room in the listener's backlog at most
    # SO_SNDTIMEO, then fails with EAGAIN (unix_stream_connect()).
    sec = max(wait, 0.001)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                 struct.pack("ll", int(sec), int(sec % 1 * 1_000_000)))
    try:
        s.connect(CONTROL_ADDRESS)
        return s
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        return None
    except BlockingIOError:
        s.close()
        raise DaemonError(f"tunld did not take the connection within {wait:g} s; it may be "
                          f"stopped or overloaded (see its log {log_path()}; "
                          "TUNL_TIMEOUT=seconds waits longer)") from None


def wait_gone(wait: float = START_TIMEOUT) -> bool:
    """After a stop: wait until no tunld listens here (its processes have ended, their TUN
    queues closed). False if one still does after `wait` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            s = _connect(0.2)
        except DaemonError:
            s = None
            continue
        if s is None:
            return True
        s.close()
        time.sleep(0.02)
    return False


def running() -> bool:
    """Whether a tunld listens in this network namespace (one that is stuck counts)."""
    try:
        s = _connect(0.2)
    except DaemonError:
        return True
    if s is None:
        return False
    s.close()
    return True


def start_daemon() -> None:
    """Start tunld (its supervisor, which starts the data plane) in this namespace, detached,
    and wait until its control socket is there. Root only: tunld is root's."""
    if os.geteuid() != 0:
        raise NoDaemonError(ONLY_ROOT_STARTS)
    path = log_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    # what tunld says before its logging is set up (an import that fails) lands in its log
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tunl.daemon.supervisor"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        s = _connect()
        if s is not None:
            s.close()
            return
        if proc.poll() not in (None, 0):
            break
        time.sleep(0.02)
    raise DaemonError(f"tunld did not start; its log is {path}")


def _peer_pid(s: socket.socket) -> int:
    """The pid of the tunld that listens (SO_PEERCRED of a connected socket: the listener's
    credentials at listen() time); 0 if it cannot be seen from here."""
    try:
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    except OSError:
        return 0


def call(op: str, autostart: bool = True, **args) -> object:
    """One request, one answer, within timeout() seconds (TUNL_TIMEOUT). Raises the TunlError
    subclass tunld raised, or DaemonError when tunld cannot be reached or does not answer."""
    wait = timeout()
    deadline = time.monotonic() + wait      # for connect, send and the whole reply
    s = _connect(wait)
    if s is None:
        if not autostart:
            raise NoDaemonError(NOT_RUNNING)
        start_daemon()          # waits START_TIMEOUT on its own; NoDaemonError if not root
        deadline = time.monotonic() + wait
        s = _connect(wait)
        if s is None:
            raise DaemonError("tunld started but does not answer")
    with s:
        pid = _peer_pid(s)
        who = f"tunld (pid {pid})" if pid > 0 else "tunld"
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        data = bytearray()
        try:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                s.sendall(request)      # the timeout bounds the whole sendall (Python >= 3.5)
            except (BrokenPipeError, ConnectionResetError):
                pass                    # tunld answered before reading it (a refusal): read on
            while True:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:    # it closed with our request unread
                    break
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            where = f"ps -o stat= -p {pid}; " if pid > 0 else ""
            raise DaemonError(f"{who} did not answer within {wait:g} s; it may be stopped or "
                              f"overloaded (see: {where}its log {log_path()}; "
                              "TUNL_TIMEOUT=seconds waits longer)") from None
    if not data:
        raise DaemonError(f"{who} closed the connection without an answer; see its log "
                          + log_path())
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise DaemonError(f"{who} answered something that is not a JSON object "
                          f"({len(data)} bytes); see its log {log_path()}")
    if reply.get("ok"):
        return reply.get("result")
    raise BY_NAME.get(reply.get("error"), TunlError)(reply.get("message", "unknown error"))
