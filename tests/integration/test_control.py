"""tunld's control socket (tunl.daemon.control) and its client (tunl.daemon.client.call) against
slow, hostile, non-root and broken peers.

Each test binds its own abstract address ("\\0tunl-test/<uuid>"), so the tests may run in the
host's network namespace next to a real tunld, and serves it from a thread it stops at the end.
"""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
import uuid

import pytest

from tunl.daemon import client
from tunl.daemon.control import INTERNAL_ERROR, ROOT_ONLY, ControlServer, check_request
from tunl.errors import ConfigError, DaemonError, NotFoundError, TunlError

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root: SO_PEERCRED checks and setuid() of a child", allow_module_level=True)

MiB = 1 << 20

OPS = {
    "echo": {"text": (str, False), "n": (int, False), "flag": (bool, False), "obj": (dict, False),
             "ratio": (float, False), "name": ((str, type(None)), False)},
    "need": {"spec": (dict, True)},
    "big": {"size": (int, True)},
    "fail": {},
    "boom": {},
    "weird": {},
}


def handle(req: dict, uid: int) -> object:
    op, args = check_request(req, OPS)
    if op == "boom":
        raise ValueError("a bug in a handler")
    if op == "weird":
        return {"not json": object()}
    if op == "fail":
        raise NotFoundError('get tunnel "x" failed: No such device')
    if op == "big":
        return "x" * args["size"]
    return {"op": op, "args": args, "uid": uid}


def new_address() -> str:
    return "\0tunl-test/" + uuid.uuid4().hex


class Served:
    """A ControlServer on a fresh abstract address, served by a thread until close()."""

    def __init__(self, **kw):
        self.address = new_address()
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        lst.bind(self.address)
        lst.listen(16)
        self.server = ControlServer(lst, kw.pop("handle", handle), **kw)
        self.stats = self.server.stats
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="control-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.server.serve(0.05)
        except BaseException as e:      # reported by close(): a crash must fail the test
            self.error = e

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the server thread did not stop"
        self.server.close()
        assert self.error is None, f"the server loop crashed: {self.error!r}"


@pytest.fixture
def served():
    made: list[Served] = []

    def start(**kw) -> Served:
        s = Served(**kw)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def connect(address: str, timeout: float = 5) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    s.connect(address)
    return s


def read_reply(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:      # the server closed with our bytes unread
            break
        if not chunk:
            break
        data += chunk
    return data


def ask(address: str, payload: bytes, timeout: float = 5) -> dict:
    """Send payload (half-close if it has no "\\n"), read the whole reply."""
    with connect(address, timeout) as s:
        try:
            s.sendall(payload)
            if not payload.endswith(b"\n"):
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                          # cut off: the reply is already in our queue
        data = read_reply(s)
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data[:200]
    return json.loads(data)


def request(op: str, **args) -> bytes:
    return json.dumps({"op": op, **args}).encode() + b"\n"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- the happy path -----------------------------------------------------------------------------

def test_request_and_reply(served):
    srv = served()
    assert ask(srv.address, request("echo", text="hi", n=3, flag=True, ratio=1, name=None)) == {
        "ok": True, "result": {"op": "echo", "uid": 0, "args": {
            "text": "hi", "n": 3, "flag": True, "ratio": 1, "name": None}}}
    assert ask(srv.address, request("fail")) == {
        "ok": False, "error": "NotFoundError", "message": 'get tunnel "x" failed: No such device'}
    # a reply far larger than any socket buffer goes out in pieces, without blocking the loop
    big = ask(srv.address, request("big", size=4 * MiB))
    assert big["ok"] and len(big["result"]) == 4 * MiB
    assert srv.stats["served"] == 2 and srv.stats["errors"] == 1


# -- slow clients -------------------------------------------------------------------------------

def test_slow_clients_do_not_delay_others(served):
    srv = served(deadline=2.0)
    payload = request("echo", text="dribbled one byte at a time")
    slow: list[dict] = []

    def dribble() -> None:
        s = connect(srv.address)
        t0 = time.monotonic()
        sent = 0
        try:
            while sent < len(payload) - 1:        # never the "\n"
                try:
                    s.send(payload[sent:sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                if select.select([s], [], [], 0.3)[0]:
                    break                         # the server has answered
            reply = read_reply(s)
            slow.append({"after": time.monotonic() - t0, "at": time.monotonic(), "sent": sent,
                         "reply": json.loads(reply)})
        finally:
            s.close()

    dribblers = [threading.Thread(target=dribble) for _ in range(3)]
    for t in dribblers:
        t.start()
    try:
        time.sleep(0.5)                          # the slow ones are mid-request
        fast_done = []
        for i in range(5):
            t0 = time.monotonic()
            r = ask(srv.address, request("echo", n=i))
            took = time.monotonic() - t0
            assert r["ok"] and r["result"]["args"] == {"n": i}
            assert took < 0.5, f"a fast request waited {took:.2f} s behind a slow client"
            fast_done.append(time.monotonic())
            time.sleep(0.1)
    finally:
        for t in dribblers:
            t.join(10)
    assert len(slow) == 3
    for r in slow:
        assert r["reply"] == {"ok": False, "error": "ConfigError",
                              "message": "request not complete within 2 s"}
        assert 1.9 <= r["after"] <= 2.8, r
        assert r["sent"] < len(payload) - 1
        assert max(fast_done) < r["at"]          # every fast one answered while it dribbled
    assert srv.stats["too_slow"] == 3
    assert not srv.server.conns


def test_client_that_does_not_read_its_reply_is_dropped(served):
    srv = served(deadline=0.5)
    with connect(srv.address) as hog:
        hog.sendall(request("big", size=16 * MiB))     # and never reads
        time.sleep(0.1)
        t0 = time.monotonic()
        assert ask(srv.address, request("echo"))["ok"]
        assert time.monotonic() - t0 < 0.3
        deadline = time.monotonic() + 3
        while srv.server.conns and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv.server.conns and srv.stats["not_read"] == 1


def test_too_many_clients_are_refused_not_queued(served):
    srv = served(max_clients=4, deadline=1.0)
    idle = [connect(srv.address) for _ in range(4)]
    try:
        deadline = time.monotonic() + 2
        while len(srv.server.conns) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = ask(srv.address, request("echo"))
        assert r["ok"] is False and r["message"].startswith("tunld is busy: 4 requests open")
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 2
    while srv.server.conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ask(srv.address, request("echo"))["ok"]


# -- who may ask --------------------------------------------------------------------------------

def _as_nobody(address: str) -> dict:
    """In a child that setuid()s to 65534: connect and wait for the answer without sending; then
    send a huge request; then a second connection sends first; then client.call()."""
    out = {}
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(address)
    ready = select.select([s], [], [], 3)[0]
    out["refusal_before_sending"] = bool(ready)
    out["first"] = read_reply(s).decode() if ready else ""
    try:
        s.sendall(b"x" * (8 * MiB))
        out["send"] = "sent"
    except (BrokenPipeError, ConnectionResetError) as e:
        out["send"] = type(e).__name__
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(address)
    try:
        s.sendall(b'{"op": "echo", "text": "' + b"y" * (2 * MiB))
    except (BrokenPipeError, ConnectionResetError):
        pass
    out["second"] = read_reply(s).decode()
    s.close()
    client.CONTROL_ADDRESS = address          # this child's copy of the module only
    try:
        client.call("echo", autostart=False, text="hi")
        out["call"] = "answered"
    except TunlError as e:
        out["call"] = f"{type(e).__name__}: {e}"
    return out


def test_non_root_is_refused_before_anything_is_read(served):
    srv = served()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.write(w, json.dumps(_as_nobody(srv.address)).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"child failed": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    refusal = {"ok": False, "error": "TunlError", "message": ROOT_ONLY}
    assert out["refusal_before_sending"] is True
    assert json.loads(out["first"]) == refusal
    assert out["send"] in ("BrokenPipeError", "ConnectionResetError")
    assert json.loads(out["second"]) == refusal
    assert out["call"] == f"TunlError: {ROOT_ONLY}"
    assert srv.stats["refused"] == 3
    assert srv.stats["bytes_read"] == 0 and srv.stats["max_buffered"] == 0
    assert not srv.server.conns


# -- big requests -------------------------------------------------------------------------------

def test_100_mib_request_is_cut_at_64_kib(served):
    srv = served()
    rss_before = rss_kib()
    chunk = b'{"op": "echo", "text": "' + b"x" * (MiB - 24)
    sent = 0
    t0 = time.monotonic()
    with connect(srv.address) as s:
        try:
            while sent < 100 * MiB:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = json.loads(read_reply(s))
    took = time.monotonic() - t0
    assert reply == {"ok": False, "error": "ConfigError",
                     "message": "request larger than 65536 bytes"}
    assert took < 1.0
    assert sent < 16 * MiB, "the server kept reading after the limit"
    assert srv.stats["too_large"] == 1
    assert srv.stats["bytes_read"] <= 65537 and srv.stats["max_buffered"] <= 65537
    assert rss_kib() - rss_before < 30 * 1024
    assert ask(srv.address, request("echo"))["ok"]


def test_request_of_exactly_the_limit_is_read(served):
    srv = served(max_request=1000)
    head = b'{"op": "echo", "text": "'
    exact = head + b"z" * (1000 - len(head) - 2) + b'"}'
    assert len(exact) == 1000
    assert ask(srv.address, exact + b"\n")["ok"]
    over = head + b"z" * (1000 - len(head) - 1) + b'"}'
    assert ask(srv.address, over + b"\n")["message"] == "request larger than 1000 bytes"


# -- malformed requests -------------------------------------------------------------------------

MALFORMED = [
    (b"hello\n", "request is not JSON"),
    (b"\n", "request is not JSON"),
    (b'{"op": "echo"' + b" " * 10 + b"\n", "request is not JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b"42\n", "must be a JSON object"),
    (b'"echo"\n', "must be a JSON object"),
    (b"null\n", "must be a JSON object"),
    (b"{}\n", 'request has no "op"'),
    (b'{"op": 7}\n', '"op" must be a string (got an integer)'),
    (b'{"op": null}\n', '"op" must be a string (got null)'),
    (b'{"op": ["echo"]}\n', '"op" must be a string (got an array)'),
    (b'{"op": "nope"}\n', 'op "nope": tunld does not know it'),
    (b'{"op": "a\\nb"}\n', 'op "a\\nb": tunld does not know it'),
    (b'{"op": "\\ud800"}\n', 'op "\\ud800": tunld does not know it'),
    (b'{"op": "echo\\u0000"}\n', 'op "echo\\u0000": tunld does not know it'),
    (b'{"op": "' + b"o" * 5000 + b'"}\n', "...: tunld does not know it"),
    (b'{"op": "echo", "colour": "red"}\n', 'tunld knows no argument "colour"'),
    (b'{"op": "echo", "n": true}\n', 'op "echo": argument "n" must be an integer (got true)'),
    (b'{"op": "echo", "flag": 1}\n', 'argument "flag" must be true or false (got an integer)'),
    (b'{"op": "echo", "n": 1.5}\n', 'argument "n" must be an integer (got a number)'),
    (b'{"op": "echo", "ratio": false}\n', 'argument "ratio" must be a number (got false)'),
    (b'{"op": "echo", "text": 5}\n', 'argument "text" must be a string (got an integer)'),
    (b'{"op": "echo", "name": 5}\n', 'argument "name" must be a string or null'),
    (b'{"op": "echo", "obj": []}\n', 'argument "obj" must be an object (got an array)'),
    (b'{"op": "need"}\n', 'op "need": argument "spec" is required'),
    (b'{"op": "need", "spec": null}\n', 'argument "spec" must be an object (got null)'),
    (b'\xff\xfe{"op": "echo"}\n', "request is not UTF-8: byte 0xff at offset 0"),
    (b'{"op": "echo", "text": "\xc3"}\n', "request is not UTF-8"),
    (b'{"op": "ec\x00ho"}\n', "request is not JSON: Invalid control character"),
    (b"\x00\x00\x00{}\n", "request is not JSON"),
    (b"[" * 30000 + b"]" * 30000 + b"\n", "nested too deeply"),
    (b'{"op": "echo", "obj": ' + b'{"a":' * 9000 + b"1" + b"}" * 9001 + b"\n",
     "nested too deeply"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", "request larger than 65536 bytes"),
    (b'{"op": "echo", "n": ' + b"9" * 5000 + b"}\n", "a number with too many digits"),
    (b'{"op": "echo", "n": 1e999}\n', 'argument "n" must be an integer (got a number)'),
    (b'{"op": "echo", "n": NaN}\n', "NaN is not a JSON number"),
    (b'{"op": "echo", "n": -Infinity}\n', "-Infinity is not a JSON number"),
    (b'{"op": "echo", "op": "boom"}\n', 'key "op" appears twice'),
    (b'{"op": "echo"}', "request ended without a newline"),
]


@pytest.mark.parametrize("payload,expect", MALFORMED,
                         ids=[f"{i:02d}-{p[:24]!r}" for i, (p, _) in enumerate(MALFORMED)])
def test_malformed_request_gets_a_clean_error(served, payload, expect):
    srv = served()
    reply = ask(srv.address, payload)
    assert reply["ok"] is False and reply["error"] == "ConfigError", reply
    message = reply["message"]
    assert expect in message
    assert "\n" not in message and len(message) < 200, message
    assert "internal error" not in message and "Traceback" not in message
    assert srv.stats["internal_errors"] == 0
    assert ask(srv.address, request("echo"))["ok"]          # and it keeps serving


def test_check_request_alone():
    assert check_request({"op": "echo", "n": 0}, OPS) == ("echo", {"n": 0})
    with pytest.raises(ConfigError, match=r'^op "big": argument "size" must be an integer '
                                          r"\(got false\)$"):
        check_request({"op": "big", "size": False}, OPS)
    with pytest.raises(ConfigError, match=r'^op "fail": tunld knows no argument "x" '
                                          r"\(it takes: no arguments\)$"):
        check_request({"op": "fail", "x": 1}, OPS)


# -- bugs in handlers ---------------------------------------------------------------------------

def test_handler_bug_is_logged_and_answered_as_internal_error(served, caplog):
    srv = served()
    internal = {"ok": False, "error": "TunlError", "message": INTERNAL_ERROR}
    with caplog.at_level("ERROR", logger="tunl.daemon.control"):
        assert ask(srv.address, request("boom")) == internal
        assert ask(srv.address, request("weird")) == internal     # a result json cannot encode
    assert ask(srv.address, request("echo", text="next"))["result"]["args"] == {"text": "next"}
    assert srv.stats["internal_errors"] == 2
    bugs = [r for r in caplog.records if r.exc_info]
    assert len(bugs) == 2
    assert bugs[0].exc_info[0] is ValueError and '"boom"' in bugs[0].getMessage()
    assert bugs[1].exc_info[0] is TypeError


# -- the client ---------------------------------------------------------------------------------

@pytest.fixture
def address(monkeypatch):
    a = new_address()
    monkeypatch.setattr(client, "CONTROL_ADDRESS", a)
    monkeypatch.setenv("TUNL_TIMEOUT", "1")
    return a


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_client_times_out_on_a_daemon_that_never_accepts(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(address)
        lst.listen(16)
        t0 = time.monotonic()
        with pytest.raises(DaemonError) as e:
            client.call("status", autostart=False)
        took = time.monotonic() - t0
    assert 0.9 <= took < 1.5
    msg = _one_line(e)
    assert msg.startswith(f"tunld (pid {os.getpid()}) did not answer within 1 s; "
                          "it may be stopped or overloaded (see: ")
    assert "TUNL_TIMEOUT" in msg


def test_client_times_out_on_a_daemon_that_accepts_and_never_answers(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(address)
        lst.listen(16)
        held: list[socket.socket] = []
        t = threading.Thread(target=lambda: held.append(lst.accept()[0]))
        t.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(DaemonError) as e:
                client.call("status", autostart=False)
            took = time.monotonic() - t0
        finally:
            t.join(5)
            for s in held:
                s.close()
    assert 0.9 <= took < 1.5
    assert _one_line(e).startswith(f"tunld (pid {os.getpid()}) did not answer within 1 s")


def test_client_times_out_on_a_full_backlog(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(address)
        lst.listen(0)
        with connect(address):                    # takes the one place in the backlog
            t0 = time.monotonic()
            with pytest.raises(DaemonError) as e:
                client.call("status", autostart=False)
            took = time.monotonic() - t0
    assert 0.9 <= took < 1.5
    assert _one_line(e).startswith("tunld did not take the connection within 1 s")


def test_client_rejects_a_reply_that_is_not_json(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(address)
        lst.listen(16)

        def answer() -> None:
            conn, _ = lst.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"Traceback (most recent call last):\n  oops\n")

        t = threading.Thread(target=answer)
        t.start()
        try:
            with pytest.raises(DaemonError) as e:
                client.call("status", autostart=False)
        finally:
            t.join(5)
    assert _one_line(e).startswith(f"tunld (pid {os.getpid()}) answered something that is not "
                                   "a JSON object (42 bytes)")


def test_client_against_the_control_server(served, monkeypatch):
    srv = served()
    monkeypatch.setattr(client, "CONTROL_ADDRESS", srv.address)
    assert client.call("echo", autostart=False, text="hi")["args"] == {"text": "hi"}
    with pytest.raises(NotFoundError, match="No such device"):
        client.call("fail", autostart=False)
    with pytest.raises(ConfigError, match='tunld knows no argument "bogus"'):
        client.call("echo", autostart=False, bogus=1)


def test_client_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("TUNL_TIMEOUT", raising=False)
    assert client.timeout() == 5.0
    monkeypatch.setenv("TUNL_TIMEOUT", "0.25")
    assert client.timeout() == 0.25
    for bad in ("soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("TUNL_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="TUNL_TIMEOUT"):
            client.timeout()
