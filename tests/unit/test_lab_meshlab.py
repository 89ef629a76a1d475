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
        "--iface", "eth0", "--node", "B", "--ttl", "4", "--resync", "1",
        "--subnet-file", "/run/tunl/lab/m/B.subnet.env"]
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


# -- a mesh on segments, cross-subnet -------------------------------------------------------------

XSUB = """
name = "x"
[underlay]
cidr = "172.16.0.0/16"
[[underlay.segment]]
cidr = "172.16.1.0/24"
[[underlay.segment]]
cidr = "172.16.2.0/24"
[mesh]
network = "10.42.0.0/16"
cross_subnet = {cross}
[[host]]
name = "A"
address = "172.16.1.2/24"
[[host]]
name = "B"
address = "172.16.1.3/24"
[[host]]
name = "C"
address = "172.16.2.2/24"
"""


def xsub(cross: bool = True) -> topology.Topology:
    return topology.loads(XSUB.format(cross="true" if cross else "false"))


def test_init_argv_cross_subnet():
    assert mesh.init_argv(xsub())[-1] == "--cross-subnet"
    assert "--cross-subnet" not in mesh.init_argv(xsub(False))
    assert "--cross-subnet" not in mesh.init_argv(topo())


def test_missing_of_a_cross_subnet_mesh():
    a, b, c = xsub().members
    n = {h.name: IPv4Network(f"10.42.{i}.0/24") for i, h in enumerate((a, b, c), 1)}

    def routes(h, dev_of):
        return {n[g.name]: (str(g.address.ip), dev_of(h, g)) for g in (a, b, c) if g is not h}

    def direct(h, g):
        return "eth0" if h.same_subnet(g) else "tunl0"
    cross = {h.name: mesh.NodeState(n[h.name], routes(h, direct)) for h in (a, b, c)}
    assert mesh.missing([a, b, c], cross, cross_subnet=True) == []
    # a cross-subnet mesh routes A and B to each other directly, and to C through the tunnel
    assert cross["A"].routes[n["B"]] == ("172.16.1.3", "eth0")
    assert cross["A"].routes[n["C"]] == ("172.16.2.2", "tunl0")
    tunnelled = {h.name: mesh.NodeState(n[h.name], routes(h, lambda h, g: "tunl0"))
                 for h in (a, b, c)}
    assert mesh.missing([a, b, c], tunnelled) == []
    assert mesh.missing([a, b, c], tunnelled, cross_subnet=True) == [
        "A: 10.42.2.0/24 via 172.16.1.3 dev tunl0, not via 172.16.1.3 dev eth0",
        "B: 10.42.1.0/24 via 172.16.1.2 dev tunl0, not via 172.16.1.2 dev eth0"]
    assert mesh.missing([a, b, c], cross)[0] == \
        "A: 10.42.2.0/24 via 172.16.1.3 dev eth0, not via 172.16.1.3 dev tunl0"


def _carried(tunnel, osrc, odst, src, dst, t=8):
    from ipaddress import IPv4Address as I
    return demo.Carried(tunnel, I(osrc), I(odst), I(src), I(dst), t)


def test_classify_pairs():
    a, b, c = xsub().members
    ok = demo.PingResult(0, 3, 3, (0.1, 0.1, 0.1))
    direct = _carried(None, "10.42.1.1", "10.42.2.1", "10.42.1.1", "10.42.2.1")
    ipip = _carried("ipip", "172.16.1.2", "172.16.2.2", "10.42.1.1", "10.42.3.1")
    reply = _carried("ipip", "172.16.2.2", "172.16.1.2", "10.42.3.1", "10.42.1.1", 0)
    packets = [direct, ipip, ipip, reply]             # seen on both bridges: once each
    ab = demo.classify(a, b, "10.42.1.1", "10.42.2.1", packets, True, ok)
    ac = demo.classify(a, c, "10.42.1.1", "10.42.3.1", packets, True, ok)
    assert (ab.seen, ab.want, ab.ok) == ("direct", "direct", True)
    assert (ac.seen, ac.want, ac.outer, ac.ok) == (
        "encapsulated", "encapsulated", (("ipip", "172.16.1.2", "172.16.2.2"),), True)
    # C's reply to A is not A's request to C
    ca = demo.classify(c, a, "10.42.3.1", "10.42.1.1", packets, True, ok)
    assert ca.seen == "not seen" and not ca.ok
    lines = demo.pair_lines([ab, ac, ca])
    assert lines[0] == ("A → B  same subnet   direct (ICMP 10.42.1.1 → 10.42.2.1 on the wire)"
                        "  ok")
    assert lines[1].startswith("A → C  other subnet  encapsulated"
                               " (IPIP 172.16.1.2 → 172.16.2.2)")
    assert lines[2].startswith("C → A  other subnet  not seen on the underlay  ")
    assert lines[2].endswith("  WRONG: other subnet, so encapsulated")
    assert lines[3] == "1 of 3 pairs not as they should be: C→A"
    # encapsulated where the mesh is cross-subnet and the pair shares a subnet: wrong
    tun = _carried("ipip", "172.16.1.2", "172.16.1.3", "10.42.1.1", "10.42.2.1")
    wrong = demo.classify(a, b, "10.42.1.1", "10.42.2.1", [tun], True, ok)
    assert wrong.wrong == "WRONG: same subnet and cross-subnet, so direct"
    # ... and right where it is not cross-subnet
    assert demo.classify(a, b, "10.42.1.1", "10.42.2.1", [tun], False, ok).ok
    # direct to another subnet is wrong; so is a tunnel to another member's address, or both
    assert demo.classify(a, c, "10.42.1.1", "10.42.3.1",
                         [_carried(None, "10.42.1.1", "10.42.3.1", "10.42.1.1", "10.42.3.1")],
                         True, ok).wrong == "WRONG: other subnet, so encapsulated"
    astray = _carried("ipip", "172.16.1.2", "172.16.1.3", "10.42.1.1", "10.42.3.1")
    assert demo.classify(a, c, "10.42.1.1", "10.42.3.1", [astray], True, ok).wrong == \
        "WRONG: the outer header should be 172.16.1.2 → 172.16.2.2"
    mixed = demo.classify(a, b, "10.42.1.1", "10.42.2.1", [direct, tun], True, ok)
    assert mixed.seen == "mixed" and not mixed.ok
    # the right way, but no reply
    lost = demo.classify(a, b, "10.42.1.1", "10.42.2.1", [direct], True,
                         demo.PingResult(1, 3, 0, None, "no reply"))
    assert not lost.ok and demo.pair_lines([lost])[0].endswith("  no reply (no reply)")
    assert demo.pair_lines([ab, ac])[-1] == \
        "all 2 pairs answered, each as it should cross: 1 direct, 1 encapsulated"


def test_routed_demo_and_mover():
    t = xsub()
    assert demo.routed(t) and demo.routed(xsub(False)) and not demo.routed(topo())
    h, address = demo.pick_mover(t, list(t.members))
    assert h.name == "C" and str(address) == "172.16.1.4/24"
    assert demo.pick_mover(topo(), list(topo().members)) is None
    with pytest.raises(demo.LabError, match="keeps no capture"):
        demo.check(t, "/tmp/x.pcap")
    assert demo.capture_paths("/d/x.pcap", ("br0", "br1")) == {"br0": "/d/x.pcap",
                                                                "br1": "/d/x-br1.pcap"}
