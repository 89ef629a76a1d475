"""A registry that answers garbage: an HTTP server on loopback that says 200 with no JSON, or
JSON of the wrong shape, where etcd's gateway would be. Every verb is refused with
RegistryError (never a crash), and an agent in front of it programs nothing."""
import http.server
import threading
from ipaddress import IPv4Address

import pytest

from tunl.mesh.agent import Agent, AgentConfig
from tunl.mesh.etcd import EtcdStore
from tunl.mesh.fake import FakeClock, FakeHost
from tunl.mesh.registry import Registry
from tunl.mesh.store import RegistryError

ANSWERS = {"text": b"<html>not etcd</html>", "list": b"[1, 2, 3]",
           "shape": b'{"kvs": [{"nokey": 1}], "header": {}}', "number": b"42"}


@pytest.fixture(params=sorted(ANSWERS))
def garbage(request):
    body = ANSWERS[request.param]

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield EtcdStore([("127.0.0.1", srv.server_address[1])])
    srv.shutdown()


def test_every_verb_refuses_garbage(garbage):
    for verb, args in (("get", ("/k",)), ("list", ("/p/",)), ("create", ("/k", b"v")),
                       ("grant", (5,)), ("keepalive", (1,)), ("claim", ("/k", b"v", 1, 0)),
                       ("ttl", (1,))):
        try:
            getattr(garbage, verb)(*args)
        except RegistryError:
            continue
        # an answer that parses as "nothing there" is acceptable only where etcd's own empty
        # answer would mean the same (no key, no lease)
        assert verb in ("get", "keepalive", "create", "claim", "ttl"), verb


def test_watch_of_garbage_is_a_registry_error(garbage):
    w = garbage.watch("/p/", 1)
    with pytest.raises(RegistryError):
        for _ in range(20):
            w.get(0.2)
    w.close()


def test_an_agent_in_front_of_garbage_programs_nothing(garbage):
    host = FakeHost()
    a = Agent(Registry(garbage), host, AgentConfig(IPv4Address("172.16.0.1"), "n1", block=0.01),
              clock=FakeClock(), wait=lambda s: a.stop())
    a.start()                    # gives up at the first wait (stop), never raises
    assert host.table == set() and host.ops == []
    assert not a.status.registry_up and a.status.registry_errors >= 1
