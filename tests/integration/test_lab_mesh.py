"""`tunl lab` with a [mesh]: the agents join, route, lose a member and get it back, for real.

Each test runs an example under a lab name of its own (t<random>), on the data plane of the
`dataplane` fixture (TUNL_DATAPLANE reaches the agents through the lab's environment), and
checks the mesh from outside, with `ip -n NS -j`, not by what the lab says of it. Whatever a
test leaves is torn down by the fixture; each test then checks that no namespace, agent, tunld
or etcd process and no run dir of its lab is left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root: the lab creates network namespaces", allow_module_level=True)
if shutil.which("ip") is None or shutil.which("ping") is None:
    pytest.skip("needs iproute2 (ip) and ping", allow_module_level=True)

import nsutil  # noqa: E402
from nsutil import alive, namespaces  # noqa: E402
from tunl.lab import control  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TTL = 4                                     # both examples' ttl


def lab_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`tunl lab ARGS`, with TUNL_DATAPLANE of the fixture in its environment."""
    return subprocess.run([sys.executable, "-m", "tunl.lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=nsutil.ENV)


@pytest.fixture
def example(tmp_path):
    """examples/FILE under a fresh lab name: (path, topology); torn down afterwards."""
    labs = nsutil.ExampleLabs(tmp_path)
    yield labs.write
    labs.down()


def state(ns: str) -> tuple[IPv4Network | None, dict[IPv4Network, tuple[str, str, bool]]]:
    """A member's subnet (from mybr0) and its routes of proto 116: dst -> (via, dev, onlink)."""
    r = nsutil.sh(f"ip -n {ns} -j -4 addr show dev mybr0", check=False)
    subnet = None
    for link in json.loads(r.stdout or "[]") if r.returncode == 0 else []:
        for a in link["addr_info"]:
            subnet = IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
    r = nsutil.sh(f"ip -n {ns} -j -4 route show proto 116", check=False)
    routes = {IPv4Network(x["dst"]):
              (x.get("gateway"), x.get("dev"), "onlink" in x.get("flags", []))
              for x in json.loads(r.stdout or "[]")}
    return subnet, routes


def whole(topo) -> dict[str, IPv4Network] | None:
    """{member: subnet} when every member has exactly one on-link route of proto 116 to every
    other member's subnet, via that member's underlay address, on tunl0; else None."""
    states = {h.name: state(topo.ns_host(h)) for h in topo.members}
    subnets = {n: s for n, (s, _) in states.items()}
    if None in subnets.values() or len(set(subnets.values())) != len(subnets):
        return None
    for h in topo.members:
        want = {subnets[g.name]: (str(g.address.ip), "tunl0", True)
                for g in topo.members if g is not h}
        if states[h.name][1] != want:
            return None
    assert all(s.subnet_of(topo.mesh.network) and s.prefixlen == topo.mesh.subnet_len
               for s in subnets.values())
    return subnets


def wait_whole(topo, within: float) -> dict[str, IPv4Network]:
    deadline = time.monotonic() + within
    while (subnets := whole(topo)) is None:
        assert time.monotonic() < deadline, \
            {h.name: state(topo.ns_host(h)) for h in topo.members}
        time.sleep(0.05)
    return subnets


def ping_all(topo, subnets) -> dict[tuple[str, str], int]:
    """Every member pings every other member's gateway: {(from, to): ping's exit code}."""
    def one(a, b):
        gw = subnets[b.name].network_address + 1
        return nsutil.sh(f"ip netns exec {topo.ns_host(a)} ping -n -c 2 -i 0.2 -W 2 {gw}",
                         check=False).returncode
    pairs = [(a, b) for a in topo.members for b in topo.members if a is not b]
    with ThreadPoolExecutor(len(pairs)) as pool:
        codes = list(pool.map(lambda p: one(*p), pairs))
    return {(a.name, b.name): c for (a, b), c in zip(pairs, codes)}


def processes(ns: str, word: str) -> dict[int, list[str]]:
    """{pid: argv} of the processes in ns whose command line has `word`."""
    out = {}
    for pid in nsutil.sh(f"ip netns pids {ns}", check=False).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if any(word in a for a in argv):
            out[int(pid)] = argv
    return out


def plane(ns: str) -> str:
    r = nsutil.sh(f"ip netns exec {ns} {nsutil.TUNL} -j tunnel show", check=False)
    return next(t["dataplane"] for t in json.loads(r.stdout) if t["ifname"] == "tunl0")


def test_mesh_joins_loses_a_member_and_gets_it_back(example, dataplane, tmp_path):
    path, topo = example("mesh.toml")
    r = lab_cli("up", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mesh 10.42.0.0/16: 5 agents, every member routes to every other" in r.stdout
    assert os.path.exists(os.path.join(topo.run_dir, "mesh.db"))
    # every member: an on-link route of proto 116 to every other member's subnet, via its
    # underlay address; the lab waited for that, so it holds at once
    subnets = whole(topo)
    assert subnets is not None
    assert {plane(topo.ns_host(h)) for h in topo.members} == {dataplane}
    codes = ping_all(topo, subnets)
    assert len(codes) == 20 and codes == {k: 0 for k in codes}
    agents = {h.name: processes(topo.ns_host(h), "agent") for h in topo.members}
    assert all(len(a) == 1 for a in agents.values()), agents
    tunlds = [p for h in topo.members for p in processes(topo.ns_host(h), "tunld")]
    assert all(alive(p) for a in agents.values() for p in a) and all(alive(p) for p in tunlds)

    # C's agent dies as on a power loss, and C leaves the underlay
    c = topo.host("C")
    (pid, argv), = agents["C"].items()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    nsutil.sh(f"ip -n {topo.ns_host(c)} link set eth0 down")
    others = [h for h in topo.members if h is not c]
    gone: dict[str, float] = {}
    while len(gone) < len(others) and time.monotonic() - t0 < 2 * TTL + 3:
        for h in others:
            if h.name not in gone and subnets["C"] not in state(topo.ns_host(h))[1]:
                gone[h.name] = time.monotonic() - t0
        time.sleep(0.05)
    assert set(gone) == {h.name for h in others}, f"still routed after {2 * TTL + 3} s: {gone}"
    assert max(gone.values()) <= 2 * TTL, gone
    assert not alive(pid)

    # C comes back: link up, its agent started again as the lab started it; same subnet
    nsutil.sh(f"ip -n {topo.ns_host(c)} link set eth0 up")
    with open(tmp_path / "agent-C.log", "wb") as log:
        again = subprocess.Popen(["ip", "netns", "exec", topo.ns_host(c), *argv],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=nsutil.ENV, start_new_session=True)
    try:
        back = wait_whole(topo, 30)
        assert back == subnets, (tmp_path / "agent-C.log").read_text()
        codes = ping_all(topo, back)
        assert codes == {k: 0 for k in codes}
        r = lab_cli("down", path)
        assert r.returncode == 0, r.stderr
        assert "deleted 6 namespaces" in r.stdout
    finally:
        if again.poll() is None and namespaces(topo.name):
            control.down(topo.name)
        again.wait(10)
    assert namespaces(topo.name) == []
    assert not os.path.exists(topo.run_dir)
    left = [p for a in agents.values() for p in a] + tunlds + [again.pid]
    assert not [p for p in left if alive(p)]


def test_mesh_demo(example):
    path, topo = example("mesh.toml")
    t0 = time.monotonic()
    r = lab_cli("demo", path)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "joined: every member routes to every other" in out
    assert out.count("all 20 pairs answered") == 2
    assert "C: kill -9 its agent" in out and "(limit 2 x ttl = 8 s)" in out
    assert "the same subnet" in out
    assert "mesh demo: every check held" in out
    assert out.rstrip().endswith(f"lab {topo.name}: down")
    assert took < 60, out
    assert namespaces(topo.name) == [] and not os.path.exists(topo.run_dir)


@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (etcd-server)")
def test_mesh_over_etcd(example):
    path, topo = example("mesh-etcd.toml")
    r = lab_cli("up", path)
    assert r.returncode == 0, r.stdout + r.stderr
    url = "etcd://172.16.255.254:2379,172.16.255.254:2380,172.16.255.254:2381"
    assert f"registry {url}" in r.stdout
    # three members, in the underlay namespace, on its br0 address
    etcds = processes(topo.ns_underlay, "--listen-client-urls")
    assert sorted(a[a.index("--name") + 1] for a in etcds.values()) == ["m0", "m1", "m2"]
    assert all("http://172.16.255.254:" in " ".join(a) for a in etcds.values())
    subnets = whole(topo)
    assert subnets is not None and len(subnets) == 3
    codes = ping_all(topo, subnets)
    assert codes == {k: 0 for k in codes}
    # the registry answers from a member, as `tunl mesh show` reads it
    r = nsutil.sh(f"ip netns exec {topo.ns_host(topo.hosts[0])} {nsutil.TUNL} -j mesh show"
                  f" --registry {url}")
    shown = {n["node"]: IPv4Network(n["subnet"]) for n in json.loads(r.stdout)["nodes"]}
    assert shown == subnets
    agents = [p for h in topo.members for p in processes(topo.ns_host(h), "agent")]
    assert len(agents) == 3
    r = lab_cli("down", path)
    assert r.returncode == 0, r.stderr
    assert namespaces(topo.name) == [] and not os.path.exists(topo.run_dir)
    assert not [p for p in [*etcds, *agents] if alive(p)]
