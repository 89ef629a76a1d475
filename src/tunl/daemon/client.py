"""Talk to the namespace's tunld, starting it on demand."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from ..errors import BY_NAME, DaemonError, TunlError
from . import CONTROL_ADDRESS

START_TIMEOUT = 10.0


def log_path() -> str:
    ino = os.stat("/proc/self/ns/net").st_ino
    return f"/run/tunl/tunld.net-{ino}.log"


def _connect() -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(CONTROL_ADDRESS)
        return s
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        return None


def start_daemon() -> None:
    """Start tunld in this namespace, detached, and wait until it answers."""
    path = log_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tunl.daemon.server"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
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


def call(op: str, autostart: bool = True, **args) -> object:
    """One request, one answer. Raises the TunlError subclass tunld raised."""
    s = _connect()
    if s is None:
        if not autostart:
            raise DaemonError("tunld is not running in this network namespace")
        start_daemon()
        s = _connect()
        if s is None:
            raise DaemonError("tunld started but does not answer")
    with s:
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        raise DaemonError("tunld closed the connection without an answer; see " + log_path())
    reply = json.loads(data)
    if reply.get("ok"):
        return reply.get("result")
    raise BY_NAME.get(reply.get("error"), TunlError)(reply.get("message", "unknown error"))
