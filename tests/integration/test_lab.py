"""`tunl lab` for real: namespaces, veths, processes, teardown.

Each test brings up its own lab named t<random> (namespaces tl-t<random>-*), so that it never
meets a demo or another run, and tears it down even when it fails. The labs' commands are plain
`ip` commands, except in the last test, which runs examples/one-to-one.toml through tunl.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root: the lab creates network namespaces", allow_module_level=True)
if shutil.which("ip") is None:
    pytest.skip("needs iproute2 (ip)", allow_module_level=True)

from tunl.lab import control  # noqa: E402

from nsutil import alive, lab_cli, namespaces  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def topology(lab: str, a_commands=(), b_commands=(), container: str = "c1") -> str:
    def cmds(lst):
        return "[" + ", ".join(f"'{c}'" for c in lst) + "]"
    return f"""
name = "{lab}"
[underlay]
cidr = "172.16.0.0/16"
mtu = 1400
[[host]]
name = "A"
address = "172.16.165.33/16"
ping_target = "10.42.1.1"
commands = {cmds(["ip link add name mybr0 type bridge", "ip addr add 10.42.1.1/24 dev mybr0",
                  "ip link set dev mybr0 up", "ip route add 10.42.2.0/24 via 172.16.165.244",
                  *a_commands])}
[[host.container]]
name = "{container}"
address = "10.42.1.2/24"
gateway = "10.42.1.1"
bridge = "mybr0"
[[host]]
name = "B"
address = "172.16.165.244/16"
ping_target = "10.42.2.1"
commands = {cmds(["ip link add name mybr0 type bridge", "ip addr add 10.42.2.1/24 dev mybr0",
                  "ip link set dev mybr0 up", "ip route add 10.42.1.0/24 via 172.16.165.33",
                  *b_commands])}
"""


@pytest.fixture
def lab(tmp_path):
    """A fresh lab name and a file for it; whatever a test leaves is torn down afterwards."""
    name = "t" + uuid.uuid4().hex[:8]
    made: list[str] = []

    def write(text: str, lab_name: str = name) -> str:
        path = tmp_path / f"{lab_name}.toml"
        path.write_text(text)
        made.append(lab_name)
        return str(path)

    write.name = name
    yield write
    for n in set(made):
        control.down(n)
        assert namespaces(n) == []


def test_up_creates_namespaces_and_hosts_ping(lab):
    path = lab(topology(lab.name))
    r = lab_cli("up", path)
    assert r.returncode == 0, r.stderr
    L = lab.name
    assert namespaces(L) == sorted([f"tl-{L}-ul", f"tl-{L}-A", f"tl-{L}-B", f"tl-{L}-A-c1"])
    # each host reaches the other's underlay address over br0
    for src, dst in (("A", "172.16.165.244"), ("B", "172.16.165.33")):
        r = lab_cli("exec", "--lab", L, src, "--", "ping", "-n", "-c", "1", "-W", "2", dst)
        assert r.returncode == 0, r.stdout + r.stderr
    # eth0 has the address, the underlay's mtu, and is up; ip_forward is on
    r = lab_cli("exec", "--lab", L, "A", "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert "172.16.165.33/16" in r.stdout
    r = lab_cli("exec", "--lab", L, "A", "--", "cat", "/sys/class/net/eth0/mtu",
                "/proc/sys/net/ipv4/ip_forward")
    assert r.stdout.split() == ["1400", "1"]
    r = lab_cli("exec", "--lab", L, "ul", "--", "ip", "-o", "link", "show", "master", "br0")
    assert "ve-A" in r.stdout and "ve-B" in r.stdout
    # the container: default route via mybr0, and through A to B's bridge
    r = lab_cli("exec", "--lab", L, "A-c1", "--", "ping", "-n", "-c", "1", "-W", "2", "10.42.2.1")
    assert r.returncode == 0, r.stdout + r.stderr
    # `tunl` resolves to this venv's CLI inside the lab
    r = lab_cli("exec", "--lab", L, "B", "--", "sh", "-c", "command -v tunl")
    assert r.stdout.strip() == os.path.join(os.path.dirname(sys.executable), "tunl")
    # up of a lab that is up refuses, and leaves it as it was
    r = lab_cli("up", path)
    assert r.returncode == 1 and "already up" in r.stderr
    assert len(namespaces(L)) == 4


def test_exec_returns_the_exit_code(lab):
    container = "c" + lab.name[1:7]
    assert lab_cli("up", lab(topology(lab.name, container=container))).returncode == 0
    r = lab_cli("exec", "--lab", lab.name, "B", "--", "sh", "-c", "echo hi; exit 7")
    assert (r.returncode, r.stdout) == (7, "hi\n")
    assert lab_cli("exec", "--lab", lab.name, "A", "--", "true").returncode == 0
    # without --lab: the one running lab that has the node
    r = lab_cli("exec", f"A-{container}", "--", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stderr
    r = lab_cli("exec", "--lab", lab.name, "A", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM
    r = lab_cli("exec", "--lab", lab.name, "nosuch", "--", "true")
    assert r.returncode == 1 and f'lab "{lab.name}" has no node "nosuch"' in r.stderr
    r = lab_cli("exec", "node" + lab.name, "--", "true")
    assert r.returncode == 1 and "no running lab has a node" in r.stderr


def test_exec_ambiguous_node_needs_lab(lab):
    other = "t" + uuid.uuid4().hex[:8]
    assert lab_cli("up", lab(topology(lab.name))).returncode == 0
    assert lab_cli("up", lab(topology(other), other)).returncode == 0
    r = lab_cli("exec", "A", "--", "true")
    assert r.returncode == 1 and "several running labs" in r.stderr and "--lab" in r.stderr
    assert lab_cli("exec", "--lab", other, "A", "--", "true").returncode == 0


def test_down_removes_every_namespace_and_process(lab):
    path = lab(topology(lab.name))
    assert lab_cli("up", path).returncode == 0
    pids = []
    for node in ("A", "B", "A-c1"):
        # a daemon of sorts: its own session, ignoring SIGTERM in B (so it needs SIGKILL)
        trap = "trap '' TERM; " if node == "B" else ""
        r = lab_cli("exec", "--lab", lab.name, node, "--", "sh", "-c",
                    f"setsid sh -c \"{trap}exec sleep 300\" </dev/null >/dev/null 2>&1 & echo $!")
        pids.append(int(r.stdout))
    assert all(alive(p) for p in pids)
    r = lab_cli("down", path)
    assert r.returncode == 0, r.stderr
    assert "deleted 4 namespaces, ended 3 processes" in r.stdout
    assert namespaces(lab.name) == []
    assert not any(alive(p) for p in pids)
    # no veth of the lab has landed in the root namespace
    assert "ve-A" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                        text=True).stdout
    # a second down changes nothing, and says that the lab is not up (exit 1, as `ip netns
    # del` of a namespace that is not there)
    r = lab_cli("down", path)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f'tunl lab: down: lab "{lab.name}" is not up: no namespace'
                        f" tl-{lab.name}-* exists (`tunl lab list` shows the labs that are up)\n")


def test_down_of_a_lab_that_is_not_up_says_so_and_touches_nothing(lab):
    path = lab(topology(lab.name))
    assert lab_cli("up", path).returncode == 0
    before = namespaces(lab.name)
    nosuch = "t" + uuid.uuid4().hex[:8]
    for args in (["--lab", nosuch], [lab(topology(nosuch), nosuch)], ["-v", "--lab", nosuch]):
        r = lab_cli("down", *args)
        assert (r.returncode, r.stdout) == (1, ""), args
        assert r.stderr == (f'tunl lab: down: lab "{nosuch}" is not up: no namespace'
                            f" tl-{nosuch}-* exists (`tunl lab list` shows the labs that are"
                            " up)\n"), args
    # FILE and --lab together: refused, nothing removed
    r = lab_cli("down", path, "--lab", lab.name)
    assert (r.returncode, r.stderr) == (1, "tunl lab: down: give FILE or --lab NAME, not both\n")
    assert namespaces(lab.name) == before
    # and the lab that is up still goes down by its name
    r = lab_cli("down", "--lab", lab.name)
    assert r.returncode == 0 and "deleted 4 namespaces" in r.stdout, r.stderr
    assert namespaces(lab.name) == []


def test_exec_lab_after_node_is_not_dropped(lab):
    """`exec NODE --lab NAME -- CMD`: --lab counts there too (it was taken as part of CMD,
    then replaced by the words after "--", so the command ran in whichever lab had NODE)."""
    assert lab_cli("up", lab(topology(lab.name))).returncode == 0
    r = lab_cli("exec", "A", "--lab", lab.name, "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert r.returncode == 0 and "172.16.165.33/16" in r.stdout, r.stderr
    nosuch = "t" + uuid.uuid4().hex[:8]
    r = lab_cli("exec", "A", "--lab", nosuch, "--", "true")
    assert (r.returncode, r.stderr) == (1, f'tunl lab: lab "{nosuch}" is not up\n')


def test_failing_command_halfway_leaves_nothing(lab, tmp_path):
    marker = tmp_path / "pid"
    daemon = f"setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {marker}"
    path = lab(topology(lab.name, a_commands=[daemon],
                        b_commands=["ip route add 10.9.0.0/16 via 192.0.2.1", "echo never"]))
    r = lab_cli("up", path)
    assert r.returncode == 1
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith('tunl lab: host "B": command "ip route add 10.9.0.0/16 via 192.0.2.1"'
                           ' failed (exit 2)')
    assert namespaces(lab.name) == []
    assert not alive(int(marker.read_text()))


def test_ctrl_c_during_up_leaves_nothing(lab, tmp_path):
    marker = tmp_path / "pid"
    daemon = f"setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {marker}"
    path = lab(topology(lab.name, b_commands=[daemon, "sleep 30"]))
    # SIGINT as at a terminal, even where this test runs with it ignored (a background job)
    p = subprocess.Popen([sys.executable, "-m", "tunl.lab.cli", "up", path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 20
        while not marker.exists() or not marker.read_text().strip():
            assert time.monotonic() < deadline, "up did not reach host B's commands"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted; the lab was torn down" in err
    assert namespaces(lab.name) == []
    assert not alive(int(marker.read_text()))


def test_bad_file_is_one_line(lab):
    path = lab(topology(lab.name).replace("172.16.165.244/16", "300.1.2.3"))
    r = lab_cli("up", path)
    assert r.returncode == 1
    assert r.stderr == 'tunl lab: host "B": address "300.1.2.3" is not an IPv4 address/prefix\n'
    assert namespaces(lab.name) == []


@pytest.mark.skipif(shutil.which("ping") is None or shutil.which("tcpdump") is None,
                    reason="needs ping and tcpdump")
def test_demo_plain_routes(lab, tmp_path):
    pcap_path = tmp_path / "demo.pcap"
    r = lab_cli("demo", lab(topology(lab.name)), "--pcap", str(pcap_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 2 pings answered" in r.stdout
    assert "captured 12 IPv4 packets on br0, 0 of them tunnelled" in r.stdout
    assert "172.16.165.33 > 10.42.2.1 proto 1: ICMP echo request" in r.stdout
    assert pcap_path.stat().st_size > 24
    assert namespaces(lab.name) == []


@pytest.mark.skipif(shutil.which("ping") is None or shutil.which("tcpdump") is None,
                    reason="needs ping and tcpdump")
def test_demo_pings_a_list_of_ipv4_and_ipv6_targets(lab):
    text = topology(lab.name, b_commands=["ip -6 addr add fd00:42:2::1/64 dev mybr0 nodad",
                                          "ip -6 addr add fd00:16::2/64 dev eth0 nodad"],
                    a_commands=["ip -6 addr add fd00:16::1/64 dev eth0 nodad",
                                "ip -6 route add fd00:42:2::/64 via fd00:16::2"])
    text = text.replace('ping_target = "10.42.2.1"',
                        'ping_target = ["10.42.2.1", "fd00:42:2::1", "fd00:16::2"]')
    r = lab_cli("demo", lab(text))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 4 pings answered" in r.stdout
    rows = [line.split()[:4] for line in r.stdout.splitlines() if line.startswith("  A ")]
    assert rows == [["A", "B", "10.42.2.1", "3/3"], ["A", "B", "fd00:42:2::1", "3/3"],
                    ["A", "B", "fd00:16::2", "3/3"]]
    # the IPv6 pings are not tunnelled and not IPv4: only the IPv4 pair's 12 are captured
    assert "captured 12 IPv4 packets on br0, 0 of them tunnelled" in r.stdout
    assert namespaces(lab.name) == []


@pytest.mark.skipif(shutil.which("ping") is None or shutil.which("tcpdump") is None,
                    reason="needs ping and tcpdump")
def test_demo_failed_ping_exits_non_zero(lab):
    text = topology(lab.name).replace('ping_target = "10.42.2.1"', 'ping_target = "10.42.2.9"')
    r = lab_cli("demo", lab(text))
    assert r.returncode == 1
    assert "1 of 2 pings failed: A->B (10.42.2.9)" in r.stdout
    assert namespaces(lab.name) == []


def _has_tunl_cli() -> bool:
    import importlib.util
    try:
        found = importlib.util.find_spec("tunl.cli.main") is not None
    except ImportError:
        found = False
    return found and shutil.which("ping") is not None and shutil.which("tcpdump") is not None


@pytest.mark.skipif(not _has_tunl_cli(), reason="needs the tunl CLI, ping and tcpdump")
def test_demo_one_to_one_example(lab):
    text = (ROOT / "examples" / "one-to-one.toml").read_text()
    assert 'name = "one2one"' in text
    r = lab_cli("demo", lab(text.replace('name = "one2one"', f'name = "{lab.name}"')))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 2 pings answered" in r.stdout
    assert ("172.16.232.172 > 172.16.232.194 proto 4 (ipip): 10.42.1.1 > 10.42.2.1"
            " ICMP echo request") in r.stdout
    assert "12 of them tunnelled (ipip 12)" in r.stdout
    assert namespaces(lab.name) == []
