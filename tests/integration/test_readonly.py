"""What a user other than root may do: read. `tunl tunnel show` (-s, -d, -j) and `tunl daemon
status` work for anyone, as `ip tunnel show` does; everything that changes something says in
one line that it needs root; tunld answers its read-only ops to every user of its namespace
under the same limits as root's, keeps slots for root, and is never started by anyone else.
The user is uid 65534 (setpriv), in a fresh namespace whose tunnels are on the userspace data
plane.
"""
from __future__ import annotations

import json
import os
import select
import shlex
import socket
import time

import pytest

from nsutil import TUNL, Host, Net, alive, sh, tunld_pids

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces, TUN devices and setuid()",
                allow_module_level=True)

NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"
CONTROL = "\0tunl/tunld"


@pytest.fixture(scope="module")
def host():
    net = Net()
    try:
        h = net.host("ro")
        h.run("ip link add eth0 type veth peer name eth1 && ip link set eth1 up && "
              "ip addr add 172.16.1.1/24 dev eth0 && ip link set eth0 up")
        h.tunl("tunnel add tunl0 mode ipip remote 172.16.1.2 local 172.16.1.1 "
               "--dataplane userspace")
        h.tunl("tunnel add gre1 mode gre key 7 remote 172.16.1.3 local 172.16.1.1 "
               "--dataplane userspace")
        h.run("ip link set tunl0 up")
        yield h
    finally:
        net.close()


def as_nobody(h: Host, args: str, env: str = ""):
    return h.run(f"{env} {NOBODY} {TUNL} {args}", check=False)


def one_line(p) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr.strip()




# -- the CLI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", ["", "-s", "-d", "-j", "-j -p", "-s -j"])
def test_show_works_for_any_user_and_says_what_root_sees(host, opts):
    root = host.tunl(f"{opts} tunnel show")
    user = as_nobody(host, f"{opts} tunnel show")
    assert user.returncode == 0 and user.stderr == "", user.stderr
    if "-s" in opts:          # counters move between the two calls: compare their shape
        assert len(user.stdout.splitlines()) == len(root.stdout.splitlines())
    else:
        assert user.stdout == root.stdout
    assert "tunl0" in user.stdout and "gre1" in user.stdout


def test_show_of_one_tunnel_for_any_user(host):
    p = as_nobody(host, "tunnel show gre1")
    assert p.returncode == 0
    assert p.stdout.startswith("gre1: gre/ip remote 172.16.1.3 local 172.16.1.1"), p.stdout
    assert one_line(as_nobody(host, "tunnel show nosuch0")) == \
        'tunl: get tunnel "nosuch0" failed: No such device'


def test_daemon_status_works_for_any_user_and_names_the_log(host):
    st = json.loads(as_nobody(host, "-j daemon status").stdout)
    assert st["tunnels"] == ["gre1", "tunl0"]
    root = json.loads(host.tunl("-j daemon status").stdout)
    assert (st["pid"], st["log"]) == (root["pid"], root["log"])
    text = as_nobody(host, "daemon status").stdout.splitlines()
    assert text == [f"tunld {st['pid']}: 2 tunnel(s) gre1 tunl0", f"log: {st['log']}"]


@pytest.mark.parametrize("words", [
    "tunnel add t9 mode ipip remote 172.16.1.9",
    "tunnel change tunl0 mode ipip remote 172.16.1.9 local 172.16.1.1",
    "tunnel del tunl0",
    "tunnel prl prl-default 172.16.1.9 dev tunl0",
    "tunnel 6rd dev tunl0 6rd-reset",
    "tunnel capture tunl0 -c 1",
    "daemon stop",
    "daemon start",
])
def test_what_changes_something_needs_root_in_one_line(host, words):
    before = host.tunl("-j tunnel show").stdout
    pids = tunld_pids(host)
    line = one_line(as_nobody(host, words))
    verb = " ".join(words.split()[:2])
    assert line.startswith(f"tunl: {verb}: needs root"), line
    assert host.tunl("-j tunnel show").stdout == before
    assert tunld_pids(host) == pids


def test_doctor_runs_for_any_user(host):
    p = as_nobody(host, "doctor")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert any(line.startswith("FAIL  not root (uid 65534)") for line in p.stdout.splitlines())


def test_no_user_but_root_starts_tunld():
    """With tunld stopped, a user's show lists what the kernel shows (nothing here) and says
    why tunld's tunnels are missing; status says tunld is not running; neither starts it."""
    net = Net()
    try:
        h = net.host("ro2")
        h.tunl("tunnel add tunl0 mode ipip remote 172.16.1.2 --dataplane userspace")
        h.tunl("daemon stop")
        assert tunld_pids(h) == []
        p = as_nobody(h, "tunnel show")
        assert p.returncode == 0 and p.stdout == ""
        assert p.stderr.strip() == (
            "tunl: tunld is not running in this network namespace, and only root can start "
            "it (any tunl command run as root does, or: sudo tunl daemon start); its eBPF "
            "and userspace tunnels are not shown")
        assert json.loads(as_nobody(h, "-j tunnel show").stdout) == []
        assert one_line(as_nobody(h, "daemon status")) == (
            "tunl: tunld is not running in this network namespace, and only root can start "
            "it (any tunl command run as root does, or: sudo tunl daemon start)")
        time.sleep(0.5)
        assert tunld_pids(h) == [], "a user's command started tunld"
        # root's next command starts it, and then the user sees everything
        assert h.tunl("tunnel show").stdout.startswith("tunl0: ip/ip remote 172.16.1.2")
        p = as_nobody(h, "tunnel show")
        assert p.stdout.startswith("tunl0: ip/ip remote 172.16.1.2") and p.stderr == ""
    finally:
        net.close()


# -- tunld's control socket -------------------------------------------------------------------

ASK = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect("\\0tunl/tunld")
try:
    s.sendall(sys.argv[1].encode() + b"\\n")
except (BrokenPipeError, ConnectionResetError):
    pass                  # cut off: the answer is already in the socket's queue
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:       # tunld closed with our bytes unread
        break
    if not chunk:
        break
    data += chunk
print(data.decode(), end="")
"""


def ask_as_nobody(h: Host, request: dict | str) -> dict:
    text = request if isinstance(request, str) else json.dumps(request)
    p = h.run(f"{NOBODY} python3 -c {shlex.quote(ASK)} {shlex.quote(text)}")
    return json.loads(p.stdout)


@pytest.mark.parametrize("request_", [{"op": "show"}, {"op": "show", "name": "tunl0"},
                                      {"op": "status"}, {"op": "routes", "name": "tunl0"}])
def test_tunld_answers_reads_to_any_user(host, request_):
    r = ask_as_nobody(host, request_)
    assert r["ok"] is True, r


@pytest.mark.parametrize("request_", [
    {"op": "del", "name": "tunl0"},
    {"op": "shutdown"},
    {"op": "capture", "name": "tunl0", "pid": 1},
    {"op": "add", "spec": {"name": "t8", "mode": "ipip"}},
    {"op": "change", "spec": {"name": "tunl0", "mode": "ipip"}},
    {"op": "prl", "name": "tunl0", "action": "add", "addr": "10.0.0.1", "default": True},
    {"op": "sixrd", "name": "tunl0", "prefix": None, "relay": None},
])
def test_tunld_refuses_the_rest_to_other_users_naming_the_op(host, request_):
    before = host.tunl("-j daemon status").stdout
    r = ask_as_nobody(host, request_)
    assert r == {"ok": False, "error": "TunlError", "message":
                 f'op "{request_["op"]}": needs root (Operation not permitted); any user may '
                 "ask routes, show, status"}
    assert json.loads(host.tunl("-j daemon status").stdout)["pid"] == json.loads(before)["pid"]
    assert [t["ifname"] for t in host.tunnels()] == ["gre1", "tunl0"]


def test_other_users_get_the_same_size_and_time_limits(host):
    big = json.dumps({"op": "show", "name": "x" * (70 * 1024)})
    assert ask_as_nobody(host, big)["message"] == "request larger than 65536 bytes"
    slow = ("import socket, time\ns = socket.socket(socket.AF_UNIX)\n"
            "s.connect('\\0tunl/tunld')\ns.sendall(b'{\"op\": ')\nt = time.monotonic()\n"
            "print(s.recv(4096).decode().strip(), round(time.monotonic() - t))\n")
    p = host.run(f"{NOBODY} python3 -c {shlex.quote(slow)}")
    assert p.stdout.startswith('{"ok": false, "error": "ConfigError", "message": "request not '
                               'complete within 2 s"}'), p.stdout
    assert p.stdout.split()[-1] in ("2", "3")


def test_users_cannot_take_the_slots_root_needs(host):
    """Connections of users hold at most half of tunld's 64 slots: a user who opens many and
    sends nothing is told tunld is busy, and root's commands go on meanwhile."""
    hog = ("import socket, time, sys\nsocks = []\n"
           "for _ in range(64):\n"
           "    s = socket.socket(socket.AF_UNIX); s.connect('\\0tunl/tunld'); socks.append(s)\n"
           "time.sleep(0.5)\nbusy = 0\n"
           "for s in socks:\n"
           "    s.setblocking(False)\n"
           "    try:\n"
           "        busy += b'tunld is busy' in s.recv(4096)\n"
           "    except BlockingIOError:\n"
           "        pass\n"
           "print(busy, flush=True)\nsys.stdin.read()\n")
    p = host.popen(f"{NOBODY} python3 -c {shlex.quote(hog)}", stdin=-1, stdout=-1)
    try:
        ready = select.select([p.stdout], [], [], 10)[0]
        assert ready, "the hog did not report"
        assert int(p.stdout.readline()) == 32
        t0 = time.monotonic()
        assert [t["ifname"] for t in host.tunnels()] == ["gre1", "tunl0"]      # root
        assert time.monotonic() - t0 < 1.5
    finally:
        p.stdin.close()
        p.wait(10)
