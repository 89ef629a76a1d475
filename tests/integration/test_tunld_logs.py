"""tunld's log, as people find it: one per network namespace, beside its record and named by
the namespace's cookie, root only; `tunl daemon status` says where; an ordinary stop leaves
no traceback; -v says what tunld does without a netlink message in sight; under a service
manager the lines go to stderr, and the namespace's directory gets no log. Each test has a
fresh namespace whose tunnels are on the userspace data plane.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time

import pytest

from nsutil import ENV, TUNL, Host, Net, alive, sh, tunld_pids

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

TUNLD = os.path.join(os.path.dirname(TUNL), "tunld")


@pytest.fixture
def net():
    n = Net()
    try:
        yield n
    finally:
        n.close()


def state_dir(h: Host) -> str:
    return h.run(f"{os.path.dirname(TUNL)}/python -c 'from tunl.daemon.state import state_dir; "
                 "print(state_dir())'").stdout.strip()


def listening(h: Host) -> bool:
    """Whether a tunld answers here (asked without starting one, as a command would)."""
    return h.run(f"{os.path.dirname(TUNL)}/python -c 'from tunl.daemon import client; "
                 "client.call(\"status\", autostart=False)'", check=False).returncode == 0


def status(h: Host) -> dict:
    return json.loads(h.tunl("-j daemon status").stdout)


def wait_for(cond, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := cond()):
            return got
        time.sleep(step)
    return cond()




def data_plane_of(pid: int) -> int | None:
    """The data-plane process supervisor `pid` started, once it runs Python (exec'd)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
        for kid in kids:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"tunl.daemon.server" in f.read():
                    return kid
    except OSError:
        pass
    return None


def add_tunnel(h: Host, name: str = "tunl0") -> None:
    h.tunl(f"tunnel add {name} mode ipip remote 172.16.1.2 local 172.16.1.1 "
           "--dataplane userspace")


def test_one_log_per_namespace_beside_its_record_root_only(net):
    a, b = net.host("la"), net.host("lb")
    inode = os.stat(f"/run/netns/{a.ns}").st_ino
    old = f"/run/tunl/tunld.net-{inode}.log"
    old_size = os.path.getsize(old) if os.path.exists(old) else None
    for h in (a, b):
        add_tunnel(h)
    logs = {h: status(h)["log"] for h in (a, b)}
    for h, path in logs.items():
        assert path == os.path.join(state_dir(h), "tunld.log")
        assert re.fullmatch(r"/run/tunl/netns-\d+/tunld\.log", path), path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert os.path.exists(os.path.join(os.path.dirname(path), "tunnels.json"))
        text = open(path).read()
        assert "INFO added tunl0: ipip remote 172.16.1.2 local 172.16.1.1, userspace data " \
               "plane" in text, text
    assert logs[a] != logs[b]
    # the path named by the namespace's inode is not written any more
    assert (os.path.getsize(old) if os.path.exists(old) else None) == old_size
    # the text status says where it is too
    lines = a.tunl("daemon status").stdout.splitlines()
    assert lines[1] == f"log: {logs[a]}"


def test_the_log_goes_with_its_namespace(net):
    h = net.host("lgone")
    add_tunnel(h)
    st = status(h)
    d = os.path.dirname(st["log"])
    assert os.path.isdir(d)
    sh(f"ip netns del {h.ns}")
    net.names.remove(h.ns)
    assert wait_for(lambda: not alive(st["pid"]) and not alive(st["supervisor"]), 10)
    assert wait_for(lambda: not os.path.exists(d), 5), os.listdir(d)


@pytest.mark.parametrize("how", ["daemon stop", "SIGTERM", "SIGINT to the group"])
def test_an_ordinary_stop_leaves_no_traceback(net, how):
    h = net.host("lstop")
    if how == "SIGINT to the group":     # Ctrl-C on a tunld run by hand, while it starts
        add_tunnel(h)
        h.tunl("daemon stop")
        p = h.popen(f"{TUNLD}", start_new_session=True, stderr=subprocess.DEVNULL)
        # as soon as the data plane is started, while it imports (pyroute2 takes a good
        # 0.2 s): Ctrl-C reaches the foreground process group, which the data plane is not
        # in (its supervisor stops it in order)
        worker = wait_for(lambda: data_plane_of(p.pid), 10, step=0.002)
        assert worker, "no data plane"
        assert os.getpgid(worker) != os.getpgid(p.pid)
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(10) == 0
        time.sleep(0.5)
        path = os.path.join(state_dir(h), "tunld.log")
    else:
        add_tunnel(h)
        st = status(h)
        path = st["log"]
        if how == "daemon stop":
            assert "stopped" in h.tunl("daemon stop").stdout
        else:
            os.kill(st["supervisor"], signal.SIGTERM)
        assert wait_for(lambda: not alive(st["pid"]) and not alive(st["supervisor"]), 10)
    text = open(path).read()
    assert "Traceback" not in text and "Error" not in text and " ERROR " not in text, text
    assert re.search(r"INFO (the data plane stopped in order; )?stopping", text), text


def test_verbose_tells_what_tunld_does_and_dumps_no_netlink_message(net):
    h = net.host("lv")
    h.run("ip link add eth0 type veth peer name eth1 && ip link set eth1 up && "
          "ip addr add 172.16.1.1/24 dev eth0 && ip link set eth0 up")
    p = h.popen(f"{TUNLD} -v", stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: listening(h), 10)
        add_tunnel(h)
        h.run("ip link set tunl0 up && ip addr add 10.9.0.1/24 dev tunl0 && "
              "ip route add 10.8.0.0/24 dev tunl0")
        h.ping("10.8.0.5")                   # a path to the remote is looked up
        h.run("setpriv --reuid=65534 --regid=65534 --clear-groups "
              f"{TUNL} tunnel show")
        h.tunl("tunnel change tunl0 mode ipip remote 172.16.1.2 local 172.16.1.1 ttl 64")
        h.tunl("tunnel del tunl0")
        path = status(h)["log"]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    text = open(path).read()
    for want in (r"DEBUG request from pid \d+ \(uid 0\): \"add\" \"tunl0\": ok",
                 r"DEBUG request from pid \d+ \(uid 65534\): \"show\": ok",
                 r"INFO added tunl0: ipip remote 172\.16\.1\.2 local 172\.16\.1\.1",
                 r"DEBUG tunl0: device up, mtu 1480",
                 r"DEBUG path to 172\.16\.1\.2 from 172\.16\.1\.1: MTU 1500",
                 r"INFO changed tunl0: ipip remote 172\.16\.1\.2 local 172\.16\.1\.1 ttl 64",
                 r"INFO deleted tunl0"):
        assert re.search(want, text), (want, text)
    assert "IFLA_" not in text and "'attrs'" not in text and "selector" not in text, text
    assert len(text.splitlines()) < 60, text


def test_under_a_service_manager_the_lines_go_to_stderr(net):
    h = net.host("lsvc")
    out = f"/tmp/{h.ns}.stderr"
    with open(out, "w") as f:
        p = subprocess.Popen(["ip", "netns", "exec", h.ns, TUNLD, "--service"], env=ENV,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f)
    try:
        assert wait_for(lambda: listening(h), 10)
        add_tunnel(h)
        st = status(h)
        assert st["log"] == "stderr"
        assert h.tunl("daemon status").stdout.splitlines()[1].startswith(
            "log: stderr (under systemd the journal")
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    try:
        text = open(out).read()
    finally:
        os.unlink(out)
    assert re.search(r"^tunld\[\d+\] INFO added tunl0: ipip", text, re.M), text
    assert re.search(rf"^tunld\[{st['supervisor']}\] INFO stopping", text, re.M), text
    assert "Traceback" not in text
    assert not os.path.exists(os.path.join(state_dir(h), "tunld.log"))
