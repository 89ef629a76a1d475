"""Topology files: parsing, validation errors that name the field, namespace names. No root."""
from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from tunl.errors import ConfigError
from tunl.lab import topology as t

ROOT = Path(__file__).resolve().parents[2]

GOOD = {
    "name": "lab1",
    "underlay": {"cidr": "172.16.0.0/16"},
    "host": [
        {"name": "A", "address": "172.16.232.172/16", "ping_target": "10.42.1.1",
         "commands": ["ip link add name mybr0 type bridge"],
         "container": [{"name": "c1", "address": "10.42.1.2/24", "gateway": "10.42.1.1",
                        "bridge": "mybr0"}]},
        {"name": "B", "address": "172.16.232.194/16"},
    ],
}


def bad(mutate) -> str:
    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        t.parse(data)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_parse_good():
    topo = t.parse(copy.deepcopy(GOOD))
    assert topo.name == "lab1"
    assert topo.underlay == t.Underlay(IPv4Network("172.16.0.0/16"), 1500)
    a, b = topo.hosts
    assert a.address == IPv4Interface("172.16.232.172/16")
    assert a.ping_target == IPv4Address("10.42.1.1")
    assert a.commands == ("ip link add name mybr0 type bridge",)
    assert a.containers == (t.Container("c1", IPv4Interface("10.42.1.2/24"),
                                        IPv4Address("10.42.1.1"), "mybr0"),)
    # defaults: no commands, ping the underlay address
    assert b.commands == () and b.containers == ()
    assert b.ping_target == IPv4Address("172.16.232.194")


def test_namespace_names():
    topo = t.parse(copy.deepcopy(GOOD))
    assert topo.namespaces() == ["tl-lab1-ul", "tl-lab1-A", "tl-lab1-B", "tl-lab1-A-c1"]
    assert all(ns.startswith(t.ns_prefix("lab1")) for ns in topo.namespaces())
    assert t.split_ns("tl-lab1-A-c1") == ("lab1", "A-c1")
    assert t.split_ns("tl-lab1-ul") == ("lab1", "ul")
    assert t.split_ns("tl-lab1") is None
    assert t.split_ns("other") is None
    assert topo.hosts[0].port == "ve-A"
    assert topo.hosts[0].containers[0].port == "ve-c1"


def test_prefix_of_one_lab_is_not_the_prefix_of_another():
    # names have no "-", so "tl-a-" never starts a namespace of lab "a_b" or "ab"
    for other in ("ab", "a_b"):
        assert not t.ns_host(other, "A").startswith(t.ns_prefix("a"))


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml"))
                         + sorted((ROOT / "tests" / "integration").glob("lab*.toml")),
                         ids=lambda p: p.name)
def test_shipped_files_load(path):
    topo = t.load(path)
    assert topo.hosts


def test_one_to_one_follows_the_walkthrough():
    topo = t.load(ROOT / "examples" / "one-to-one.toml")
    assert topo.name == "one2one"
    a, b = topo.hosts
    assert (str(a.address), str(b.address)) == ("172.16.232.172/16", "172.16.232.194/16")
    assert (str(a.ping_target), str(b.ping_target)) == ("10.42.1.1", "10.42.2.1")
    assert a.commands == (
        "tunl tunnel add tunl0 mode ipip remote 172.16.232.194 local 172.16.232.172",
        "ip addr add 10.42.1.1/24 dev tunl0",
        "ip link set tunl0 up",
        "ip route add 10.42.2.0/24 dev tunl0",
    )
    assert b.commands[0] == \
        "tunl tunnel add tunl0 mode ipip remote 172.16.232.172 local 172.16.232.194"
    assert b.commands[-1] == "ip route add 10.42.1.0/24 dev tunl0"


def test_one_to_many_follows_the_walkthrough():
    topo = t.load(ROOT / "examples" / "one-to-many.toml")
    ul = {h.name: str(h.address.ip) for h in topo.hosts}
    assert ul == {"A": "172.16.165.33", "B": "172.16.165.244", "C": "172.16.168.113"}
    for i, h in enumerate(topo.hosts, start=1):
        assert h.commands[:6] == (
            "ip link add name mybr0 type bridge",
            f"ip addr add 10.42.{i}.1/24 dev mybr0",
            "ip link set dev mybr0 up",
            "tunl tunnel add tunl0 mode ipip",
            "ip link set tunl0 up",
            f"ip addr add 10.42.{i}.0/32 dev tunl0",
        )
        others = [(j, g) for j, g in enumerate(topo.hosts, start=1) if g is not h]
        assert h.commands[6:] == tuple(
            f"ip route add 10.42.{j}.0/24 via {g.address.ip} dev tunl0 onlink" for j, g in others)
        assert str(h.ping_target) == f"10.42.{i}.1"
    assert [c.name for c in topo.hosts[0].containers] == ["c1"]
    assert topo.hosts[1].containers == topo.hosts[2].containers == ()
    assert not any("modprobe" in c or "ip tunnel" in c for h in topo.hosts for c in h.commands)


def test_loads_and_load_errors(tmp_path):
    assert t.loads('name = "x"\n[underlay]\ncidr = "10.0.0.0/8"\n'
                   '[[host]]\nname = "A"\naddress = "10.0.0.1/8"\n').name == "x"
    with pytest.raises(ConfigError, match="not valid TOML"):
        t.loads("name = ")
    with pytest.raises(ConfigError, match="No such file"):
        t.load(tmp_path / "missing.toml")
    f = tmp_path / "broken.toml"
    f.write_text('name = "x"\n[[host]]\nname = 1\n')
    with pytest.raises(ConfigError):
        t.load(f)
    assert t.load_name(f) == "x"            # enough for `down` of an edited file


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["host"][1].update(address="300.1.2.3"),
     'host "B": address "300.1.2.3" is not an IPv4 address/prefix'),
    (lambda d: d["host"][1].update(address="172.16.232.194"),
     'host "B": address "172.16.232.194" is not an IPv4 address/prefix'),
    (lambda d: d["host"][1].update(address="10.0.0.1/8"),
     'host "B": address "10.0.0.1/8" is not in the underlay cidr 172.16.0.0/16'),
    (lambda d: d["host"][1].update(address="172.16.0.0/16"),
     'host "B": address "172.16.0.0/16" is the network address of 172.16.0.0/16'),
    (lambda d: d["host"][1].update(address="172.16.255.255/16"),
     'host "B": address "172.16.255.255/16" is the broadcast address of 172.16.0.0/16'),
    (lambda d: d["host"][1].update(address="172.16.232.172/16"),
     'host "B": address 172.16.232.172 is also host "A"\'s'),
    (lambda d: d["host"][1].update(name="A"), 'host "A": the name is used twice'),
    (lambda d: d["host"][1].update(name="ul"), 'host "ul": the name "ul" is the underlay\'s'),
    (lambda d: d["host"][1].update(name="b-1"),
     'host #2: name "b-1": a name has only letters, digits and "_"'),
    (lambda d: d["host"][1].update(name="abcdefghijklm"),
     'host #2: name "abcdefghijklm": a name has at most 12 characters'),
    (lambda d: d["host"][1].update(name=7), "host #2: name 7 is not a string"),
    (lambda d: d["host"][1].pop("name"), "host #2: name: missing"),
    (lambda d: d["host"][1].pop("address"), 'host "B": address: missing'),
    (lambda d: d["host"][1].update(adress="x"), 'host "B": unknown key "adress"'),
    (lambda d: d["host"][1].update(ping_target="10.42.2.1/24"),
     'host "B": ping_target "10.42.2.1/24" is not an IPv4 address'),
    (lambda d: d["host"][1].update(commands="ip link"), 'host "B": commands: is a list of strings'),
    (lambda d: d["host"][1].update(commands=["ip link", 3]),
     'host "B": commands: is a list of strings'),
    (lambda d: d["host"][1].update(commands=["ip link", "  "]), 'host "B": commands[1]: is empty'),
    (lambda d: d.update(name="one-to-one"), 'name "one-to-one": a lab name has only letters'),
    (lambda d: d.update(name="x" * 25), "a lab name has at most 24 characters"),
    (lambda d: d.update(name=1), "name 1 is not a string"),
    (lambda d: d.pop("name"), "name: missing"),
    (lambda d: d.update(extra=1), 'unknown key "extra"'),
    (lambda d: d.pop("host"), "host: missing"),
    (lambda d: d.update(host=[]), "host: a lab has at least one host"),
    (lambda d: d.update(host={"name": "A"}), "host: is a list of tables"),
    (lambda d: d.pop("underlay"), "underlay: missing"),
    (lambda d: d.update(underlay="10.0.0.0/8"), "underlay: is a table"),
    (lambda d: d["underlay"].update(cidr="172.16.0.1/16"),
     'underlay: cidr "172.16.0.1/16" is not an IPv4 network'),
    (lambda d: d["underlay"].update(cidr="fd00::/64"), 'underlay: cidr "fd00::/64" is not an IPv4'),
    (lambda d: d["underlay"].update(mtu=67), "underlay: mtu 67 is not a number from 68 to 65535"),
    (lambda d: d["underlay"].update(mtu="1500"), 'underlay: mtu "1500" is not a number'),
    (lambda d: d["underlay"].update(mtu=True), "underlay: mtu true is not a number"),
    (lambda d: d["underlay"].update(vlan=3), 'underlay: unknown key "vlan"'),
    (lambda d: d["host"][0]["container"][0].update(address="10.42.1.2"),
     'host "A": container "c1": address "10.42.1.2" is not an IPv4 address/prefix'),
    (lambda d: d["host"][0]["container"][0].update(gateway="10.42.2.1"),
     'host "A": container "c1": gateway "10.42.2.1" is not in 10.42.1.0/24'),
    (lambda d: d["host"][0]["container"][0].update(gateway="10.42.1.2"),
     'host "A": container "c1": gateway "10.42.1.2" is the container\'s own address'),
    (lambda d: d["host"][0]["container"][0].update(gateway="nope"),
     'host "A": container "c1": gateway "nope" is not an IPv4 address'),
    (lambda d: d["host"][0]["container"][0].update(bridge="a bridge"),
     'host "A": container "c1": bridge "a bridge": a device name has no'),
    (lambda d: d["host"][0]["container"][0].pop("bridge"),
     'host "A": container "c1": bridge: missing'),
    (lambda d: d["host"][0]["container"][0].pop("name"), 'host "A": container #1: name: missing'),
    (lambda d: d["host"][0]["container"].append(dict(d["host"][0]["container"][0])),
     'host "A": container "c1": the name is used twice'),
    (lambda d: d["host"][0].update(container={"name": "c1"}),
     'host "A": container: is a list of tables'),
])
def test_errors_name_the_field(mutate, expected):
    assert expected in bad(mutate)
