"""The lab's mesh, its pure parts: the agents' command lines, reading `ip -j` output, what keeps
a mesh from being whole, the ping matrix of the demo. No root."""
from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tunl.errors import ConfigError
from tunl.lab import demo, mesh, topology

ROOT = Path(__file__).resolve().parents[2]
TOPO = """
name = "m"
[underlay]
cidr = "172.16.0.0/16"
[mesh]
network = "10.42.0.0/16"
ttl = 4
{extra}
[[host]]
name = "A"
address = "172.16.0.1/16"
[[host]]
name = "B"
address = "172.16.0.2/16"
[[host]]
name = "C"
address = "172.16.0.3/16"
mesh = false
"""


def topo(extra: str = "") -> topology.Topology:
    return topology.loads(TOPO.format(extra=extra))


def test_registry_urls_and_commands():
    t = topo()
    assert mesh.registry_url(t) == "sqlite:///run/tunl/lab/m/mesh.db"
    assert mesh.init_argv(t) == ["tunl", "mesh", "init", "--registry",
                                 "sqlite:///run/tunl/lab/m/mesh.db", "--network", "10.42.0.0/16",
                                 "--subnet-len", "24", "--mode", "ipip"]
    assert mesh.agent_argv(t, t.hosts[1]) == [
        "tunl", "mesh", "agent", "--registry", "sqlite:///run/tunl/lab/m/mesh.db",
        "--iface", "eth0", "--node", "B", "--ttl", "4"]
    e = topo('registry = "etcd"\netcd_address = "172.16.7.7"')
    assert mesh.registry_url(e) == \
        "etcd://172.16.7.7:2379,172.16.7.7:2380,172.16.7.7:2381"
    assert [h.name for h in e.members] == ["A", "B"]


def test_the_registry_urls_parse_as_tunl_mesh_takes_them():
    from tunl.mesh.store import open_store
    with pytest.raises(ConfigError):
        open_store("etcd://", lambda: 0.0)
    store, _ = open_store(mesh.registry_url(topo('registry = "etcd"')), lambda: 0.0)
    assert store.endpoints == [("172.16.255.254", 2379), ("172.16.255.254", 2380),
                               ("172.16.255.254", 2381)]


def test_parse_ip_json():
    routes = [{"dst": "10.42.2.0/24", "gateway": "172.16.0.2", "dev": "tunl0",
               "flags": ["onlink"]},
              {"dst": "10.42.9.9", "gateway": "172.16.0.9", "dev": "tunl0"}]
    assert mesh.parse_routes(json.dumps(routes)) == {
        IPv4Network("10.42.2.0/24"): ("172.16.0.2", "tunl0"),
        IPv4Network("10.42.9.9/32"): ("172.16.0.9", "tunl0")}
    assert mesh.parse_routes("") == {}
    addr = [{"ifname": "mybr0", "addr_info": [{"family": "inet", "local": "10.42.7.1",
                                               "prefixlen": 24}]}]
    assert mesh.parse_subnet(json.dumps(addr)) == IPv4Network("10.42.7.0/24")
    assert mesh.parse_subnet("[]") is None


def test_missing():
    t = topo()
    a, b = t.members
    whole = {"A": mesh.NodeState(IPv4Network("10.42.1.0/24"),
                                 {IPv4Network("10.42.2.0/24"): ("172.16.0.2", "tunl0")}),
             "B": mesh.NodeState(IPv4Network("10.42.2.0/24"),
                                 {IPv4Network("10.42.1.0/24"): ("172.16.0.1", "tunl0")})}
    assert mesh.missing([a, b], whole) == []
    half = dict(whole, B=mesh.NodeState(IPv4Network("10.42.2.0/24"), {}))
    assert mesh.missing([a, b], half) == ["B: no route to A's 10.42.1.0/24"]
    wrong = dict(whole, B=mesh.NodeState(IPv4Network("10.42.2.0/24"), {
        IPv4Network("10.42.1.0/24"): ("172.16.0.9", "tunl0"),
        IPv4Network("10.42.5.0/24"): ("172.16.0.5", "tunl0")}))
    assert mesh.missing([a, b], wrong) == [
        "B: 10.42.1.0/24 via 172.16.0.9 dev tunl0, not via 172.16.0.1 dev tunl0",
        "B: a route to 10.42.5.0/24 via 172.16.0.5 dev tunl0, no member's subnet"]
    young = dict(whole, A=mesh.NodeState(None, {}))
    assert mesh.missing([a, b], young) == ["A: no subnet yet (mybr0 has no address)",
                                           "A: no route to B's 10.42.2.0/24",
                                           "B: a route to 10.42.1.0/24 via 172.16.0.1 dev tunl0,"
                                           " no member's subnet"]


def test_demo_matrix_and_victim():
    r = demo.PingResult(0, 3, 3, (0.1, 0.123, 0.2))
    lost = demo.PingResult(1, 3, 0, None, "no reply")
    lines = demo.ping_matrix(["A", "B"], {("A", "B"): r, ("B", "A"): lost})
    assert lines == ["from \\ to         A         B",
                     "A                 -     0.123",
                     "B          no reply         -"]
    t = topology.load(ROOT / "examples" / "mesh.toml")
    assert demo.pick_victim(list(t.members)).name == "C"
    assert demo.pick_victim(list(topo().members)).name == "B"


def test_demo_check_of_a_mesh(tmp_path):
    one = topology.loads(TOPO.format(extra="").replace('name = "B"', 'name = "B"\nmesh = false'))
    with pytest.raises(demo.LabError, match='the mesh of lab "m" has one member'):
        demo.check(one)
    with pytest.raises(demo.LabError, match="the demo of a mesh captures nothing"):
        demo.check(topo(), str(tmp_path / "x.pcap"))
    demo.check(topo())
