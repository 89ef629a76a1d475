"""`tunl lab` with an underlay of two segments joined by a router, and a cross-subnet mesh.

examples/cross-subnet.toml runs under a lab name of its own (xsub<random>), on the data plane
of the `dataplane` fixture (TUNL_DATAPLANE reaches the agents through the lab's environment).
The routes are checked from outside, with `ip -n NS -j`: to a member of its own segment a member
routes directly (`via <its address> dev eth0`, no onlink), to the others through the tunnel
(`via <its address> dev tunl0 onlink`). The demo checks the same on the wire. Whatever a test
leaves is torn down by the fixture, which then checks that nothing of the lab is left.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root: the lab creates network namespaces", allow_module_level=True)
_missing = [t for t in ("ip", "ping", "tcpdump") if shutil.which(t) is None]
if _missing:
    pytest.skip(f"needs {', '.join(_missing)}", allow_module_level=True)

import nsutil  # noqa: E402
from nsutil import alive, namespaces  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cross-subnet.toml"


def lab_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`tunl lab ARGS`, with TUNL_DATAPLANE of the fixture in its environment."""
    return subprocess.run([sys.executable, "-m", "tunl.lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=nsutil.ENV)


@pytest.fixture
def example(tmp_path):
    """examples/cross-subnet.toml under a fresh lab name, edited by `edit` (old, new)
    replacements: (path, topology); torn down afterwards."""
    labs = nsutil.ExampleLabs(tmp_path, "xsub")
    yield lambda *edits: labs.write(EXAMPLE.name, *edits)
    labs.down()


def routes(ns: str) -> dict[IPv4Network, tuple[str, str, bool]]:
    """A member's routes of proto 116: dst -> (via, dev, onlink)."""
    r = nsutil.sh(f"ip -n {ns} -j -4 route show proto 116", check=False)
    return {IPv4Network(x["dst"]): (x.get("gateway"), x.get("dev"), "onlink" in x.get("flags", []))
            for x in json.loads(r.stdout or "[]")}


def subnet(ns: str) -> IPv4Network | None:
    r = nsutil.sh(f"ip -n {ns} -j -4 addr show dev mybr0", check=False)
    for link in json.loads(r.stdout or "[]") if r.returncode == 0 else []:
        for a in link["addr_info"]:
            return IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
    return None


def expected(topo, subnets) -> dict[str, dict[IPv4Network, tuple[str, str, bool]]]:
    """Each member's routes as a cross-subnet mesh has them."""
    out = {}
    for h in topo.members:
        out[h.name] = {}
        for g in topo.members:
            if g is h:
                continue
            same = g.address.ip in h.address.network
            out[h.name][subnets[g.name]] = (str(g.address.ip), "eth0" if same else "tunl0",
                                            not same)
    return out


def processes(ns: str, word: str) -> list[int]:
    out = []
    for pid in nsutil.sh(f"ip netns pids {ns}", check=False).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if word.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def test_up_builds_two_segments_and_routes_across_them(example, dataplane):
    path, topo = example()
    r = lab_cli("up", path)
    assert r.returncode == 0, r.stdout + r.stderr
    ul = topo.ns_underlay
    # the underlay namespace: one bridge per segment with its router address, forwarding
    addrs = {x["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in x["addr_info"]]
             for x in json.loads(nsutil.sh(f"ip -n {ul} -j -4 addr").stdout)}
    assert addrs["br0"] == ["172.16.1.254/24"] and addrs["br1"] == ["172.16.2.254/24"]
    assert nsutil.sh(f"ip netns exec {ul} cat /proc/sys/net/ipv4/ip_forward").stdout.strip() \
        == "1"
    masters = {x["ifname"]: x.get("master")
               for x in json.loads(nsutil.sh(f"ip -n {ul} -j link show type veth").stdout)}
    assert masters == {"ve-A": "br0", "ve-B": "br0", "ve-C": "br1", "ve-D": "br1"}
    for h in topo.hosts:
        default = json.loads(nsutil.sh(f"ip -n {topo.ns_host(h)} -j route show default").stdout)
        assert [d["gateway"] for d in default] == [str(topo.segment_of(h).router)]
    # hosts in different segments reach each other through the router
    a, c = topo.host("A"), topo.host("C")
    assert nsutil.sh(f"ip netns exec {topo.ns_host(a)} ping -n -c 1 -W 2 {c.address.ip}",
                     check=False).returncode == 0

    # the mesh: direct to the own segment, through tunl0 to the other
    subnets = {h.name: subnet(topo.ns_host(h)) for h in topo.members}
    assert None not in subnets.values()
    want = expected(topo, subnets)
    got = {h.name: routes(topo.ns_host(h)) for h in topo.members}
    assert got == want
    assert got["A"][subnets["B"]] == ("172.16.1.3", "eth0", False)
    assert got["A"][subnets["C"]] == ("172.16.2.2", "tunl0", True)
    text = nsutil.sh(f"ip -n {topo.ns_host(a)} route show proto 116").stdout
    assert f"{subnets['B']} via 172.16.1.3 dev eth0" in text
    assert f"{subnets['C']} via 172.16.2.2 dev tunl0 onlink" in text
    r = nsutil.sh(f"ip netns exec {topo.ns_host(a)} {nsutil.TUNL} -j tunnel show")
    assert next(t["dataplane"] for t in json.loads(r.stdout) if t["ifname"] == "tunl0") \
        == dataplane
    # every pair pings, gateway to gateway
    for h in topo.members:
        for g in topo.members:
            if g is not h:
                src, dst = (subnets[x.name].network_address + 1 for x in (h, g))
                r = nsutil.sh(f"ip netns exec {topo.ns_host(h)} ping -n -c 1 -W 2 -I {src}"
                              f" {dst}", check=False)
                assert r.returncode == 0, f"{h.name} -> {g.name}: {r.stdout}"

    pids = [p for ns in namespaces(topo.name) for p in processes(ns, "tunl")]
    assert pids
    r = lab_cli("down", path)
    assert r.returncode == 0, r.stderr
    assert "deleted 5 namespaces" in r.stdout
    assert namespaces(topo.name) == [] and not os.path.exists(topo.run_dir)
    assert not [p for p in pids if alive(p)]


def test_cross_subnet_demo(example):
    path, topo = example()
    t0 = time.monotonic()
    r = lab_cli("demo", path)
    took = time.monotonic() - t0
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "172.16.1.0/24 on br0 (router 172.16.1.254), 172.16.2.0/24 on br1" in out
    assert "all 12 pairs answered, each as it should cross: 4 direct, 8 encapsulated" in out
    assert "A → B  same subnet   direct (ICMP 10.42." in out
    assert "A → C  other subnet  encapsulated (IPIP 172.16.1.2 → 172.16.2.2)" in out
    assert "D moves to segment 172.16.1.0/24" in out and "172.16.2.3/24 -> 172.16.1.4/24" in out
    # after the move D shares A and B's subnet, and no longer C's
    assert "all 12 pairs answered, each as it should cross: 6 direct, 6 encapsulated" in out
    assert "C → D  other subnet  encapsulated (IPIP 172.16.2.2 → 172.16.1.4)" in out
    assert "cross-subnet demo: every check held" in out
    assert out.rstrip().endswith(f"lab {topo.name}: down")
    assert took < 60, out
    assert namespaces(topo.name) == [] and not os.path.exists(topo.run_dir)


def test_segments_without_cross_subnet_encapsulate_every_pair(example):
    path, topo = example(("cross_subnet = true", "cross_subnet = false"))
    r = lab_cli("demo", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("each as it should cross: 0 direct, 12 encapsulated") == 2
    assert "mesh demo: every check held" in r.stdout


@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (etcd-server)")
def test_etcd_on_br0_is_reached_from_both_segments(example):
    path, topo = example(('registry = "sqlite"', 'registry = "etcd"'))
    assert str(topo.mesh.etcd_address) == "172.16.1.254"
    r = lab_cli("up", path)
    assert r.returncode == 0, r.stdout + r.stderr
    url = "etcd://172.16.1.254:2379,172.16.1.254:2380,172.16.1.254:2381"
    assert f"registry {url}" in r.stdout
    subnets = {h.name: subnet(topo.ns_host(h)) for h in topo.members}
    assert {h.name: routes(topo.ns_host(h)) for h in topo.members} == expected(topo, subnets)
    # C, behind the router, reads the registry as A does
    for h in (topo.host("A"), topo.host("C")):
        r = nsutil.sh(f"ip netns exec {topo.ns_host(h)} {nsutil.TUNL} -j mesh show"
                      f" --registry {url}")
        assert {n["node"]: IPv4Network(n["subnet"]) for n in json.loads(r.stdout)["nodes"]} \
            == subnets
    etcds = processes(topo.ns_underlay, "--listen-client-urls")
    assert len(etcds) == 3
    r = lab_cli("down", path)
    assert r.returncode == 0, r.stderr
    assert not [p for p in etcds if alive(p)]
