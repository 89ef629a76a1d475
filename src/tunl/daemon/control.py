"""tunld's control socket: many clients, one thread, no client can hold up another.

The protocol is one request and one reply per connection: the client sends a JSON object and
"\\n", tunld answers `{"ok": true, "result": ...}` or `{"ok": false, "error": "ConfigError",
"message": "..."}` and "\\n", then closes.

`ControlServer` serves a listening AF_UNIX stream socket with `selectors`: accept, reads and
writes are all non-blocking, so a client that dribbles its request one byte at a time, or never
reads its reply, costs one slot and one small buffer until its deadline, and nothing else. The
peer's uid (SO_PEERCRED) is checked right after accept, before a single byte is read; a request
is bounded (`max_request`) and must arrive within `deadline` seconds of accept; a reply must be
taken within `deadline` seconds of being ready. Whatever the client sends, it gets a one-line
answer that says what was wrong with it; only a bug in `handle` answers "internal error", and
its traceback goes to the daemon's log.

Who may ask what: a peer whose uid `allow` takes (root) may ask any op. Any other peer is
refused before a byte is read, unless the server has `open_ops` (the ops that only read,
which tunld answers to every user of its namespace, as iproute2 lets anyone read tunnels,
links and counters): then its request is read, under the same size and time limits, and
anything but an open op gets a one-line refusal naming the op. Such peers hold at most
`max_open` of the `max_clients` slots together, so that however many connections users
open, root's requests always find a slot.

The server calls `handle(request, uid)` in its own thread, one request at a time: the daemon's
operations are short and take the daemon's lock anyway. What it must not do is wait on a client.
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, TunlError

log = logging.getLogger("tunl.daemon.control")

_CRED = struct.Struct("3i")           # struct ucred: pid, uid, gid
_ACCEPT_BURST = 64                    # connections taken per wake-up, so reads get their turn
_ACCEPT_PAUSE = 0.1                   # s without accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM

INTERNAL_ERROR = "tunld: internal error (see its log)"
ROOT_ONLY = "tunld answers root only (Operation not permitted)"


def needs_root(op: str, open_ops) -> TunlError:
    """The refusal of an op a non-root peer may not ask."""
    return TunlError(f"op {_quote(op)}: needs root (Operation not permitted); any user may "
                     f"ask {', '.join(sorted(open_ops))}")

Rules = dict[str, dict[str, tuple[type | tuple[type, ...], bool]]]


# -- request validation -----------------------------------------------------------------------

_JSON_NAME = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              dict: "an object", list: "an array", type(None): "null"}


def _quote(s: str, limit: int = 64) -> str:
    """A name from the wire, quoted for a one-line message: escapes controls, newlines and lone
    surrogates, and cuts a long one short."""
    cut = s[:limit]
    return json.dumps(cut) + ("..." if len(s) > limit else "")


def _json_type(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return _JSON_NAME.get(type(v), type(v).__name__)


def _is(v: object, t: type) -> bool:
    """v is a JSON value of type t. bool and int are told apart (bool is an int in Python, not in
    JSON); a float argument takes an integer too (JSON has one number type)."""
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is type(None) or t is None:
        return v is None
    return isinstance(v, t)


def check_request(req: dict, ops: Rules) -> tuple[str, dict]:
    """Validate a request against `ops` (op name -> {argument: (JSON types, required)}) and
    return (op, arguments without "op"). Raises ConfigError naming the op, the argument and the
    rule: `op "add": argument "spec" must be an object (got an array)`."""
    if not isinstance(req, dict):
        raise ConfigError(f"request must be a JSON object (got {_json_type(req)})")
    op = req.get("op")
    if not isinstance(op, str):
        if "op" not in req:
            raise ConfigError('request has no "op": tunld needs {"op": "<name>", ...}')
        raise ConfigError(f'request "op" must be a string (got {_json_type(op)})')
    rules = ops.get(op)
    if rules is None:
        raise ConfigError(f"op {_quote(op)}: tunld does not know it")
    args = {k: v for k, v in req.items() if k != "op"}
    for name in args:
        if name not in rules:
            takes = ", ".join(rules) or "no arguments"
            raise ConfigError(f"op {_quote(op)}: tunld knows no argument {_quote(name)} "
                              f"(it takes: {takes})")
    for name, (types, required) in rules.items():
        if name not in args:
            if required:
                raise ConfigError(f'op {_quote(op)}: argument "{name}" is required')
            continue
        accepted = types if isinstance(types, tuple) else (types,)
        value = args[name]
        if not any(_is(value, t) for t in accepted):
            want = " or ".join(_JSON_NAME.get(t, getattr(t, "__name__", str(t)))
                               for t in accepted)
            raise ConfigError(f'op {_quote(op)}: argument "{name}" must be {want} '
                              f"(got {_json_type(value)})")
    return op, args


def _no_constant(word: str) -> object:
    raise ConfigError(f"request is not JSON: {word} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ConfigError(f"request is ambiguous: key {_quote(k)} appears twice")
            seen.add(k)
    return d


def parse_request(data: bytes) -> dict:
    """The bytes before "\\n" -> a JSON object with a string "op", or a one-line ConfigError."""
    try:
        text = data.decode("utf-8")         # strict: not json's guess of UTF-16/32
    except UnicodeDecodeError as e:
        raise ConfigError(f"request is not UTF-8: byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}") from None
    try:
        req = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"request is not JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise ConfigError("request is nested too deeply for tunld") from None
    except ValueError as e:           # int() refuses more than sys.get_int_max_str_digits()
        if "digits" in str(e):
            raise ConfigError("request has a number with too many digits") from None
        raise ConfigError("request is not JSON: " + str(e).splitlines()[0]) from None
    if not isinstance(req, dict):
        raise ConfigError(f'request must be a JSON object {{"op": ...}} (got {_json_type(req)})')
    if "op" not in req:
        raise ConfigError('request has no "op": tunld needs {"op": "<name>", ...}')
    if not isinstance(req["op"], str):
        raise ConfigError(f'request "op" must be a string (got {_json_type(req["op"])})')
    return req


def _about(req: dict) -> str:
    """What a request is about, for a log line: the tunnel it names (never the whole
    request)."""
    name = req.get("name")
    spec = req.get("spec")
    if name is None and isinstance(spec, dict):
        name = spec.get("name")
    return f" {_quote(name, 32)}" if isinstance(name, str) else ""


def _error(e: TunlError) -> dict:
    return {"ok": False, "error": type(e).__name__, "message": str(e)}


def _encode(reply: dict) -> bytes:
    return json.dumps(reply).encode() + b"\n"


# -- the server -------------------------------------------------------------------------------

class _Conn:
    __slots__ = ("sock", "pid", "uid", "allowed", "since", "deadline", "inbuf", "out", "sent",
                 "op")

    def __init__(self, sock: socket.socket, pid: int, uid: int, allowed: bool, now: float,
                 deadline: float):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.allowed = allowed              # may ask any op; else only the open ones
        self.since = now
        self.deadline = now + deadline      # of the request; then of the reply
        self.inbuf = bytearray()
        self.out: bytes | None = None       # the reply, once there is one
        self.sent = 0
        self.op = "?"


class ControlServer:
    """Serves `listener` from the thread that calls `serve()`; see the module docstring.

    `handle(request, uid)` returns the result (anything json.dumps takes) or raises a TunlError,
    whose class name and message become the reply. `stats` counts what happened, for `status`
    and for tests: `bytes_read` is every byte read from any client, `max_buffered` the largest
    request buffer ever held (never more than max_request + 1).
    """

    def __init__(self, listener: socket.socket, handle: Callable[[dict, int], Any], *,
                 allow: Callable[[int], bool] = lambda uid: uid == 0,
                 open_ops: frozenset[str] = frozenset(), max_open: int | None = None,
                 max_request: int = 64 * 1024, deadline: float = 2.0, max_clients: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        self.listener = listener
        self.handle = handle
        self.allow = allow
        self.open_ops = frozenset(open_ops)
        # the slots peers that `allow` does not take may hold together: half, by default
        self.max_open = max_clients // 2 if max_open is None else min(max_open, max_clients)
        self.open_conns = 0
        self.max_request = max_request
        self.deadline = deadline
        self.max_clients = max_clients
        self.clock = clock
        listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self._accept_paused_until: float | None = None
        self.conns: dict[int, _Conn] = {}     # fd -> connection, oldest first
        self.stats = {"accepted": 0, "refused": 0, "busy": 0, "served": 0, "errors": 0,
                      "bad_requests": 0, "too_large": 0, "too_slow": 0, "not_read": 0,
                      "internal_errors": 0, "bytes_read": 0, "max_buffered": 0}
        self.closed = False

    # -- the loop -------------------------------------------------------------------------------

    def serve(self, timeout: float) -> None:
        """Run the loop for at most `timeout` seconds (at least one pass)."""
        end = self.clock() + timeout
        while True:
            now = self.clock()
            self._expire(now)
            self._resume_accept(now)
            wait = end - now
            nearest = min((c.deadline for c in self.conns.values()), default=None)
            if nearest is not None:
                wait = min(wait, nearest - now)
            if self._accept_paused_until is not None:
                wait = min(wait, self._accept_paused_until - now)
            for key, mask in self.sel.select(max(wait, 0.0)):
                if key.data is None:
                    self._accept()
                else:
                    conn = key.data
                    if conn.sock.fileno() != key.fd:      # closed earlier in this batch
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(conn)
                    elif mask & selectors.EVENT_WRITE:
                        self._write(conn)
            if self.clock() >= end:
                return

    def close(self) -> None:
        """Close every connection (a reply already made gets one last try) and the listener."""
        if self.closed:
            return
        self.closed = True
        for conn in list(self.conns.values()):
            if conn.out is not None and conn.sent < len(conn.out):
                try:
                    conn.sock.send(memoryview(conn.out)[conn.sent:])
                except OSError:
                    pass
            self._drop(conn)
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self.sel.close()
        self.listener.close()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accept ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:             # out of fds or memory: stop accepting a moment
                log.warning("control socket: cannot accept: %s; pausing %g s", e, _ACCEPT_PAUSE)
                self._pause_accept()
                return
            self._admit(sock)

    def _pause_accept(self) -> None:
        if self._accept_paused_until is None:
            self.sel.unregister(self.listener)
        self._accept_paused_until = self.clock() + _ACCEPT_PAUSE

    def _resume_accept(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, None)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          _CRED.size))
        except OSError:
            sock.close()
            return
        self.stats["accepted"] += 1
        # The uid first, before a single byte is read: a refused peer costs one small write.
        allowed = self.allow(uid)
        if not allowed and not self.open_ops:
            self.stats["refused"] += 1
            log.debug("control socket: refused uid %d (pid %d)", uid, pid)
            self._say_and_close(sock, _error(TunlError(ROOT_ONLY)))
            return
        if not allowed and self.open_conns >= self.max_open:
            self.stats["busy"] += 1
            log.warning("control socket: %d requests of other users than root open; refused "
                        "pid %d (uid %d)", self.open_conns, pid, uid)
            self._say_and_close(sock, _error(TunlError(
                f"tunld is busy: {self.open_conns} requests of users open; try again")))
            return
        # At max_clients, the newcomer is refused, not the oldest evicted: the oldest is a
        # request in progress, and evicting it would let a burst of connections cancel every
        # request in flight. A refused newcomer gets an immediate answer it can retry, and
        # every slot frees within 2 deadlines (request, then reply). Peers `allow` does not
        # take hold at most max_open slots (above), so only allowed uids can fill the table.
        if len(self.conns) >= self.max_clients:
            self.stats["busy"] += 1
            log.warning("control socket: %d requests open; refused pid %d",
                        len(self.conns), pid)
            self._say_and_close(sock, _error(TunlError(
                f"tunld is busy: {len(self.conns)} requests open; try again")))
            return
        conn = _Conn(sock, pid, uid, allowed, self.clock(), self.deadline)
        self.conns[sock.fileno()] = conn
        if not allowed:
            self.open_conns += 1
        self.sel.register(sock, selectors.EVENT_READ, conn)

    @staticmethod
    def _say_and_close(sock: socket.socket, reply: dict) -> None:
        """One non-blocking write to a fresh socket (its buffer is empty: a short reply fits),
        then close, without reading."""
        try:
            sock.send(_encode(reply))
        except OSError:
            pass
        sock.close()

    # -- read -----------------------------------------------------------------------------------

    def _read(self, conn: _Conn) -> None:
        # Never hold more than max_request + 1 bytes: enough to see a "\n" right after a
        # request of exactly max_request bytes, or to know there is none.
        want = self.max_request + 1 - len(conn.inbuf)
        try:
            chunk = conn.sock.recv(min(want, 65536))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            if conn.inbuf:       # half-closed before "\n": say so, it may still read
                self._fail(conn, ConfigError("request ended without a newline"), "bad_requests")
            else:                # connect and close: a liveness probe (start_daemon())
                self._drop(conn)
            return
        self.stats["bytes_read"] += len(chunk)
        start = len(conn.inbuf)
        conn.inbuf += chunk
        self.stats["max_buffered"] = max(self.stats["max_buffered"], len(conn.inbuf))
        nl = conn.inbuf.find(b"\n", start)
        if nl > self.max_request or (nl < 0 and len(conn.inbuf) > self.max_request):
            self._fail(conn, ConfigError(f"request larger than {self.max_request} bytes"),
                       "too_large")
            return
        if nl < 0:
            return
        data = bytes(conn.inbuf[:nl])      # anything after the "\n" is ignored
        conn.inbuf = bytearray()
        self._answer(conn, data)

    def _answer(self, conn: _Conn, data: bytes) -> None:
        try:
            req = parse_request(data)
        except ConfigError as e:
            self._fail(conn, e, "bad_requests")
            return
        conn.op = req["op"]
        if not conn.allowed and conn.op not in self.open_ops:
            self.stats["refused"] += 1
            log.debug("control socket: pid %d (uid %d): op %s refused: not root", conn.pid,
                      conn.uid, _quote(conn.op))
            self._reply(conn, _encode(_error(needs_root(conn.op, self.open_ops))))
            return
        t0 = self.clock()
        outcome = "ok"
        try:
            reply = _encode({"ok": True, "result": self.handle(req, conn.uid)})
            self.stats["served"] += 1
        except TunlError as e:
            reply = _encode(_error(e))
            self.stats["errors"] += 1
            outcome = f"{type(e).__name__}: {e}"
        except Exception:     # a bug, in handle() or a result json cannot encode: keep serving
            log.exception("control socket: op %s from pid %d failed", _quote(conn.op), conn.pid)
            reply = _encode({"ok": False, "error": "TunlError", "message": INTERNAL_ERROR})
            self.stats["internal_errors"] += 1
            outcome = "internal error"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request from pid %d (uid %d): %s%s: %s (%.1f ms)", conn.pid, conn.uid,
                      _quote(conn.op), _about(req), outcome, (self.clock() - t0) * 1000)
        self._reply(conn, reply)

    def _fail(self, conn: _Conn, e: TunlError, stat: str) -> None:
        self.stats[stat] += 1
        log.debug("control socket: pid %d: %s", conn.pid, e)
        self._reply(conn, _encode(_error(e)))

    # -- write ----------------------------------------------------------------------------------

    def _reply(self, conn: _Conn, reply: bytes) -> None:
        """Stop reading; send the reply as far as the socket takes it now, the rest when it
        can, until a fresh deadline."""
        conn.inbuf = bytearray()
        conn.out, conn.sent = reply, 0
        conn.deadline = self.clock() + self.deadline
        self._write(conn)
        if conn.sock.fileno() >= 0:
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            conn.sent += conn.sock.send(memoryview(conn.out)[conn.sent:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:             # the client is gone (EPIPE, ECONNRESET): nothing to tell
            self._drop(conn)
            return
        if conn.sent >= len(conn.out):
            self._drop(conn)

    # -- deadlines ------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.out is None:
                self._fail(conn, ConfigError(f"request not complete within {self.deadline:g} s"),
                           "too_slow")
                if conn.sock.fileno() >= 0:     # it had its chance: no second deadline
                    self._drop(conn)
            else:
                self.stats["not_read"] += 1
                log.debug("control socket: pid %d did not read its reply of op %s within %g s",
                          conn.pid, _quote(conn.op), self.deadline)
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if self.conns.pop(fd, None) is not None and not conn.allowed:
            self.open_conns -= 1
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
