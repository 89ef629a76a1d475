"""Topology files: parsing, validation errors that name the field, namespace names. No root."""
from __future__ import annotations

import copy
import re
from ipaddress import (IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network,
                       ip_address)
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
    assert a.ping_targets == (IPv4Address("10.42.1.1"),)
    assert a.commands == ("ip link add name mybr0 type bridge",)
    assert a.containers == (t.Container("c1", IPv4Interface("10.42.1.2/24"),
                                        IPv4Address("10.42.1.1"), "mybr0"),)
    # defaults: no commands, ping the underlay address
    assert b.commands == () and b.containers == ()
    assert b.ping_targets == (IPv4Address("172.16.232.194"),)


def test_ping_target_list_ipv4_and_ipv6():
    data = copy.deepcopy(GOOD)
    data["host"][1]["ping_target"] = ["10.50.1.2", "fd00:50:1::2", "2001:db8:5::5efe:172.16.1.2",
                                      "fe80::1%gre1"]
    b = t.parse(data).hosts[1]
    assert b.ping_targets == (IPv4Address("10.50.1.2"), IPv6Address("fd00:50:1::2"),
                              IPv6Address("2001:db8:5::5efe:ac10:102"),
                              IPv6Address("fe80::1%gre1"))
    data["host"][1]["ping_target"] = "fd00::2"          # one IPv6 address, not in a list
    assert t.parse(data).hosts[1].ping_targets == (IPv6Address("fd00::2"),)


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
    assert (a.ping_targets, b.ping_targets) == ((IPv4Address("10.42.1.1"),),
                                                (IPv4Address("10.42.2.1"),))
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
        assert h.ping_targets == (IPv4Address(f"10.42.{i}.1"),)
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
     'host "B": ping_target "10.42.2.1/24" is not an IPv4 or IPv6 address'),
    (lambda d: d["host"][1].update(ping_target="fd00::/64"),
     'host "B": ping_target "fd00::/64" is not an IPv4 or IPv6 address'),
    (lambda d: d["host"][1].update(ping_target=["10.42.2.1", "nope"]),
     'host "B": ping_target[1] "nope" is not an IPv4 or IPv6 address'),
    (lambda d: d["host"][1].update(ping_target=["10.42.2.1", 7]),
     'host "B": ping_target[1] 7 is not an IPv4 or IPv6 address'),
    (lambda d: d["host"][1].update(ping_target=[]),
     'host "B": ping_target: the list is empty (leave ping_target out to ping the host\'s'
     ' underlay address)'),
    (lambda d: d["host"][1].update(ping_target=7),
     'host "B": ping_target 7 is not an address or a list of addresses'),
    (lambda d: d["host"][1].update(ping_target={"a": "10.1.1.1"}),
     'host "B": ping_target dict is not an address or a list of addresses'),
    (lambda d: d["host"][1].update(ping_target=["fd00::2", "fd00:0::2"]),
     'host "B": ping_target[1] "fd00:0::2" is in the list twice'),
    (lambda d: d["host"][1].update(ping_target="::"),
     'host "B": ping_target "::" is the unspecified address: a ping target is one host'),
    (lambda d: d["host"][1].update(ping_target="0.0.0.0"),
     'host "B": ping_target "0.0.0.0" is the unspecified address'),
    (lambda d: d["host"][1].update(ping_target=["ff02::1"]),
     'host "B": ping_target[0] "ff02::1" is a multicast address: a ping target is one host'),
    (lambda d: d["host"][1].update(ping_target="224.0.0.1"),
     'host "B": ping_target "224.0.0.1" is a multicast address'),
    (lambda d: d["host"][1].update(ping_target="255.255.255.255"),
     'host "B": ping_target "255.255.255.255" is the broadcast address'),
    (lambda d: d["host"][1].update(ping_target="fe80::5efe:172.16.1.1"),
     'host "B": ping_target "fe80::5efe:172.16.1.1" is link-local: name its interface too,'
     ' as in "fe80::5efe:172.16.1.1%eth0"'),
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


# -- the examples --------------------------------------------------------------------------------

EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
_ADDR_ADD = re.compile(r"ip (?:-6 )?addr(?:ess)? add (\S+)/\d+ dev (\S+)")


def _configured(host: t.Host) -> dict:
    """{address: device} of the `ip addr add` commands of a host."""
    return {ip_address(m.group(1)): m.group(2)
            for c in host.commands if (m := _ADDR_ADD.search(c))}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_targets_are_the_hosts_own(path):
    """Each ping target is an address its host puts on a device (or its underlay address), and
    tunnels are made with `tunl tunnel`, never `ip tunnel` or a module."""
    topo = t.load(path)
    for h in topo.hosts:
        own = _configured(h)
        for target in h.ping_targets:
            assert target == h.address.ip or target in own, (h.name, target)
        assert not any("modprobe" in c or c.startswith("ip tunnel") for c in h.commands)


def test_example_lab_names_are_unique():
    names = [t.load(p).name for p in EXAMPLES]
    assert len(set(names)) == len(names)


def test_gre_keys_example():
    topo = t.load(ROOT / "examples" / "gre-keys.toml")
    a, b = topo.hosts
    assert (str(a.address), str(b.address)) == ("172.16.232.172/16", "172.16.232.194/16")
    assert a.commands == (
        "tunl tunnel add gre1 mode gre remote 172.16.232.194 local 172.16.232.172 key 1 ttl 64",
        "ip addr add 10.50.1.1/30 dev gre1",
        "ip -6 addr add fd00:50:1::1/64 dev gre1",
        "ip link set gre1 up",
        "tunl tunnel add gre2 mode gre remote 172.16.232.194 local 172.16.232.172 key 2 seq csum",
        "ip addr add 10.50.2.1/30 dev gre2",
        "ip link set gre2 up",
    )
    # B: the mirror image
    mirror = tuple(c.replace("172.16.232.194", "@").replace("172.16.232.172", "172.16.232.194")
                   .replace("@", "172.16.232.172").replace(".1/30", ".2/30")
                   .replace("::1/64", "::2/64") for c in a.commands)
    assert b.commands == mirror
    assert [str(x) for x in b.ping_targets] == ["10.50.1.2", "10.50.2.2", "fd00:50:1::2"]
    assert [str(x) for x in a.ping_targets] == ["10.50.1.1", "10.50.2.1", "fd00:50:1::1"]


def test_sit_example():
    topo = t.load(ROOT / "examples" / "sit.toml")
    ul = {h.name: h.address.ip for h in topo.hosts}
    assert {k: str(v) for k, v in ul.items()} == {
        "A": "172.16.165.33", "B": "172.16.165.244", "C": "172.16.168.113"}
    a, b, c = topo.hosts
    assert "tunl tunnel add sit1 mode sit remote 172.16.165.244 local 172.16.165.33 ttl 64" \
        in a.commands
    assert "tunl tunnel add sit1 mode sit remote 172.16.165.33 local 172.16.165.244 ttl 64" \
        in b.commands
    for h in (a, c):
        assert f"tunl tunnel add sit2 mode sit local {h.address.ip} ttl 64" in h.commands
        assert _configured(h)[IPv6Address(f"2001:db8:{2 if h is a else 3}::1")] == "sit2"
    # NBMA routes: the next hop is IPv4-compatible, its last 32 bits another host's address
    route = re.compile(r"ip -6 route add (\S+) via (\S+) dev sit2 onlink\Z")
    hops = [(h.name, route.match(cmd)) for h in (a, c) for cmd in h.commands]
    hops = [(n, m) for n, m in hops if m]
    assert {n for n, _ in hops} == {"A", "C"}
    for name, m in hops:
        gw = IPv6Address(m.group(2))
        assert gw.packed[:12] == bytes(12)
        assert IPv4Address(gw.packed[12:]) in {v for k, v in ul.items() if k != name}
    assert "ip -6 route add 2001:db8:3::/64 via ::172.16.168.113 dev sit2 onlink" in a.commands
    assert "ip -6 route add 2001:db8:2::/64 via ::172.16.165.33 dev sit2 onlink" in c.commands


def test_isatap_example():
    topo = t.load(ROOT / "examples" / "isatap.toml")
    r, *hosts = topo.hosts
    assert (r.name, str(r.address)) == ("R", "172.16.1.1/16")
    assert hosts[0].name == "H" and str(hosts[0].address) == "172.16.1.2/16"

    def isatap(prefix: str, v4) -> IPv6Address:
        # RFC 5214 §6.1: a private IPv4 address gives the identifier 0000:5efe:a.b.c.d
        return IPv6Address(IPv6Network(prefix).network_address.packed[:8]
                           + bytes((0, 0, 0x5E, 0xFE)) + IPv4Address(v4).packed)

    for h in (r, *hosts):
        assert f"tunl tunnel add isatap0 mode isatap local {h.address.ip}" in h.commands
        assert _configured(h)[isatap("2001:db8:5::/64", h.address.ip)] == "isatap0"
        assert isatap("2001:db8:5::/64", h.address.ip) in h.ping_targets
    for h in hosts:
        assert h.commands[:4] == (
            f"tunl tunnel add isatap0 mode isatap local {h.address.ip}",
            f"tunl tunnel prl prl-default {r.address.ip} dev isatap0",
            "ip link set isatap0 up",
            f"ip -6 addr add 2001:db8:5::5efe:{h.address.ip}/64 dev isatap0",
        )
        # the default route: via the router's link-local ISATAP address
        (m,) = [m for c in h.commands
                if (m := re.match(r"ip -6 route add default via (\S+) dev isatap0\Z", c))]
        assert IPv6Address(m.group(1)) == isatap("fe80::/64", r.address.ip)
    assert "sysctl -w net.ipv6.conf.all.forwarding=1" in r.commands
    assert _configured(r)[IPv6Address("2001:db8:99::1")] == "mybr0"
    assert r.ping_targets == (isatap("2001:db8:5::/64", "172.16.1.1"),
                              IPv6Address("2001:db8:99::1"))


def test_6rd_example():
    """Each CE's address is in its delegated prefix, worked out as RFC 5969 §4 says."""
    topo = t.load(ROOT / "examples" / "6rd.toml")
    sixrd = re.compile(r"tunl tunnel 6rd dev sit6rd 6rd-prefix (\S+) 6rd-relay_prefix (\S+)\Z")
    delegated = {}
    for h in topo.hosts:
        (m,) = [m for c in h.commands if (m := sixrd.match(c))]
        prefix, relay = IPv6Network(m.group(1)), IPv4Network(m.group(2))
        assert (str(prefix), str(relay)) == ("2001:db8::/32", "172.16.0.0/16")
        assert h.address.ip in relay
        # the 6rd prefix, then the IPv4 address without the relay prefix's bits
        o = 32 - relay.prefixlen
        v4_bits = int(h.address.ip) & ((1 << o) - 1)
        plen = prefix.prefixlen + o
        net = IPv6Network((int(prefix.network_address) | (v4_bits << (128 - plen)), plen))
        delegated[h.name] = net
        (addr,) = [a for a, dev in _configured(h).items() if dev == "sit6rd"]
        assert addr in net and h.ping_targets == (addr,)
        assert f"ip -6 addr add {addr}/32 dev sit6rd" in h.commands
        assert f"tunl tunnel add sit6rd mode sit local {h.address.ip} ttl 64" in h.commands
    assert {k: str(v) for k, v in delegated.items()} == {
        "A": "2001:db8:a521::/48", "B": "2001:db8:a5f4::/48"}


# -- the mesh ------------------------------------------------------------------------------------

MESH = {
    "name": "m",
    "underlay": {"cidr": "172.16.0.0/16"},
    "mesh": {"network": "10.42.0.0/16"},
    "host": [{"name": "A", "address": "172.16.0.1/16"},
             {"name": "B", "address": "172.16.0.2/16"},
             {"name": "C", "address": "172.16.0.3/16"}],
}


def bad_mesh(mutate) -> str:
    data = copy.deepcopy(MESH)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        t.parse(data)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_mesh_defaults_and_members():
    topo = t.parse(copy.deepcopy(MESH))
    assert topo.mesh == t.Mesh(IPv4Network("10.42.0.0/16"), 24, "ipip", "sqlite", 20, None)
    assert [h.name for h in topo.members] == ["A", "B", "C"]       # every host, by default
    assert topo.run_dir == "/run/tunl/lab/m"
    # no [mesh]: no members, and no mesh
    plain = t.parse(copy.deepcopy(GOOD))
    assert plain.mesh is None and plain.members == ()


def test_mesh_keys_and_opt_out():
    data = copy.deepcopy(MESH)
    data["mesh"].update(subnet_len=26, mode="gre", registry="etcd", ttl=4)
    data["host"][1]["mesh"] = False
    data["host"][1]["ping_target"] = "172.16.0.2"       # a host outside the mesh may have one
    topo = t.parse(data)
    assert topo.mesh == t.Mesh(IPv4Network("10.42.0.0/16"), 26, "gre", "etcd", 4,
                               IPv4Address("172.16.255.254"))     # the underlay's last address
    assert [h.name for h in topo.members] == ["A", "C"]
    data["mesh"]["etcd_address"] = "172.16.9.9"
    assert t.parse(data).mesh.etcd_address == IPv4Address("172.16.9.9")
    assert t.parse(data).mesh.subnets == (1 << 10) - 1


def test_mesh_member_may_have_containers_on_another_bridge():
    data = copy.deepcopy(MESH)
    data["host"][0]["container"] = [{"name": "c1", "address": "192.168.7.2/24",
                                     "gateway": "192.168.7.1", "bridge": "br7"}]
    assert t.parse(data).hosts[0].containers[0].bridge == "br7"


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(mesh="10.42.0.0/16"),
     "mesh: is a table ([mesh]) with network, subnet_len, mode, registry and ttl"),
    (lambda d: d["mesh"].pop("network"), "mesh: network: missing"),
    (lambda d: d["mesh"].update(netwrk="x"),
     'mesh: unknown key "netwrk" (known: cross_subnet, etcd_address, mode, network, registry,'
     ' subnet_len, ttl)'),
    (lambda d: d["mesh"].update(network="10.42.0.1/16"),
     'mesh: network "10.42.0.1/16" is not an IPv4 network (address/prefix with no host bits'
     ' set)'),
    (lambda d: d["mesh"].update(network="fd00:42::/48"),
     'mesh: network "fd00:42::/48" is not an IPv4 network'),
    (lambda d: d["mesh"].update(network=42), "mesh: network 42 is not an IPv4 network"),
    (lambda d: d["mesh"].update(network="172.16.128.0/17"),
     "mesh: network 172.16.128.0/17 overlaps the underlay cidr 172.16.0.0/16 (the overlay's"
     " routes would take the underlay's addresses)"),
    (lambda d: d["mesh"].update(network="172.0.0.0/8"),
     "mesh: network 172.0.0.0/8 overlaps the underlay cidr 172.16.0.0/16"),
    (lambda d: d["mesh"].update(subnet_len=16),
     "mesh: subnet_len 16 is not a number from 17 to 30 (longer than the network's /16; a"
     " subnet needs its .0 and .1)"),
    (lambda d: d["mesh"].update(subnet_len=31), "mesh: subnet_len 31 is not a number from 17"),
    (lambda d: d["mesh"].update(subnet_len="24"), 'mesh: subnet_len "24" is not a number'),
    (lambda d: d["mesh"].update(subnet_len=True), "mesh: subnet_len true is not a number"),
    (lambda d: d["mesh"].update(network="10.42.0.0/29", subnet_len=30),
     "mesh: subnet_len 30 gives 10.42.0.0/29 1 subnet to lease (the first is never leased),"
     " fewer than its 3 members"),
    (lambda d: d["mesh"].update(mode="vti"),
     'mesh: mode "vti" is not an overlay mode (ipip, gre)'),
    (lambda d: d["mesh"].update(mode="sit"),
     'mesh: mode "sit" carries IPv6, and the overlay\'s subnets are IPv4: a sit mesh would drop'
     " every packet (ipip, gre carry IPv4)"),
    (lambda d: d["mesh"].update(mode=4), "mesh: mode 4 is not an overlay mode"),
    (lambda d: d["mesh"].update(registry="consul"),
     'mesh: registry "consul" is not a registry the lab runs (sqlite, etcd)'),
    (lambda d: d["mesh"].update(ttl=1),
     "mesh: ttl 1 is not a number of seconds of at least 2 (a lease is renewed every ttl/4)"),
    (lambda d: d["mesh"].update(ttl=2.5), "mesh: ttl 2.5 is not a number of seconds"),
    (lambda d: d["mesh"].update(ttl=False), "mesh: ttl false is not a number of seconds"),
    (lambda d: d["mesh"].update(etcd_address="172.16.9.9"),
     'mesh: etcd_address: only for registry "etcd" (this mesh\'s registry is "sqlite")'),
    (lambda d: d["mesh"].update(registry="etcd", etcd_address="10.1.1.1"),
     'mesh: etcd_address "10.1.1.1" is not in the underlay cidr 172.16.0.0/16 (the hosts reach'
     ' etcd over the underlay)'),
    (lambda d: d["mesh"].update(registry="etcd", etcd_address="172.16.9.9/16"),
     'mesh: etcd_address "172.16.9.9/16" is not an IPv4 address'),
    (lambda d: d["mesh"].update(registry="etcd", etcd_address="172.16.255.255"),
     'mesh: etcd_address "172.16.255.255/16" is the broadcast address of 172.16.0.0/16'),
    (lambda d: d["mesh"].update(registry="etcd", etcd_address="172.16.0.2"),
     'mesh: etcd_address "172.16.0.2" is host "B"\'s address'),
    (lambda d: (d["mesh"].update(registry="etcd"),
                d["host"][2].update(address="172.16.255.254/16")),
     "mesh: etcd listens on 172.16.255.254 (the underlay's last address) by default, which is"
     ' host "C"\'s: choose another with etcd_address'),
    (lambda d: [h.update(mesh=False) for h in d["host"]],
     "mesh: no host is a member (every host says mesh = false)"),
    (lambda d: d["host"][0].update(mesh="yes"), 'host "A": mesh "yes" is not true or false'),
    (lambda d: (d.pop("mesh"), d["host"][0].update(mesh=True)),
     'host "A": mesh = true, but the file has no [mesh] table'),
    (lambda d: d["host"][1].update(ping_target="10.42.1.1"),
     'host "B": ping_target: a mesh member is pinged at its subnet\'s gateway, which it leases'
     " at `lab up`; leave ping_target out (or say mesh = false)"),
    (lambda d: d["host"][0].update(container=[{"name": "c1", "address": "10.42.1.2/24",
                                               "gateway": "10.42.1.1", "bridge": "mybr0"}]),
     'host "A": container "c1": bridge "mybr0" is the mesh\'s, whose subnet the host leases at'
     " `lab up`: no address in the file can be known to be in it"),
])
def test_mesh_errors_name_the_key(mutate, expected):
    assert expected in bad_mesh(mutate)


def test_mesh_examples():
    topo = t.load(ROOT / "examples" / "mesh.toml")
    assert [h.name for h in topo.members] == ["A", "B", "C", "D", "E"]
    assert topo.mesh == t.Mesh(IPv4Network("10.42.0.0/16"), 24, "ipip", "sqlite", 4, None)
    assert all(h.commands == () and h.containers == () for h in topo.hosts)
    etcd = t.load(ROOT / "examples" / "mesh-etcd.toml")
    assert len(etcd.members) == 3 and etcd.mesh.registry == "etcd" and etcd.mesh.ttl == 4
    assert etcd.mesh.etcd_address == IPv4Address("172.16.255.254")
    assert etcd.mesh.etcd_address not in {h.address.ip for h in etcd.hosts}


# -- an underlay of segments joined by a router ------------------------------------------------

SEGMENTS = {
    "name": "s",
    "underlay": {"cidr": "172.16.0.0/16",
                 "segment": [{"cidr": "172.16.1.0/24", "router": "172.16.1.1"},
                             {"cidr": "172.16.2.0/24"}]},
    "mesh": {"network": "10.42.0.0/16", "cross_subnet": True},
    "host": [{"name": "A", "address": "172.16.1.2/24"},
             {"name": "B", "address": "172.16.1.3/24"},
             {"name": "C", "address": "172.16.2.2/24"}],
}


def bad_segments(mutate) -> str:
    data = copy.deepcopy(SEGMENTS)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        t.parse(data)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_segments():
    topo = t.parse(copy.deepcopy(SEGMENTS))
    s1, s2 = topo.underlay.segments
    assert s1 == t.Segment(IPv4Network("172.16.1.0/24"), IPv4Address("172.16.1.1"), "br0")
    # the router's address defaults to the segment's last
    assert s2 == t.Segment(IPv4Network("172.16.2.0/24"), IPv4Address("172.16.2.254"), "br1")
    assert s2.router_interface == IPv4Interface("172.16.2.254/24")
    assert topo.underlay.bridges == ("br0", "br1")
    a, b, c = topo.hosts
    assert [topo.bridge_of(h) for h in topo.hosts] == ["br0", "br0", "br1"]
    assert topo.segment_of(c) is s2
    assert a.same_subnet(b) and b.same_subnet(a) and not a.same_subnet(c)
    assert topo.mesh.cross_subnet is True
    assert topo.free_address(s1) == IPv4Interface("172.16.1.4/24")
    assert topo.free_address(s2) == IPv4Interface("172.16.2.3/24")
    # no segments: one bridge, br0, as before, and every host on-link to every other
    plain = t.parse(copy.deepcopy(GOOD))
    assert plain.underlay.segments == () and plain.underlay.bridges == ("br0",)
    assert plain.segment_of(plain.hosts[0]) is None and plain.bridge_of(plain.hosts[0]) == "br0"
    assert plain.hosts[0].same_subnet(plain.hosts[1])
    assert t.parse(copy.deepcopy(MESH)).mesh.cross_subnet is False


def test_segments_with_etcd():
    data = copy.deepcopy(SEGMENTS)
    data["mesh"]["registry"] = "etcd"
    # etcd listens on br0's router address by default: every segment reaches it
    assert t.parse(data).mesh.etcd_address == IPv4Address("172.16.1.1")
    data["mesh"]["etcd_address"] = "172.16.200.1"
    assert t.parse(data).mesh.etcd_address == IPv4Address("172.16.200.1")


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["underlay"].update(segment={"cidr": "172.16.1.0/24"}),
     "underlay: segment: is a list of tables ([[underlay.segment]])"),
    (lambda d: d["underlay"].update(segment=[]),
     "underlay: segment: the list is empty (leave it out for one bridge)"),
    (lambda d: d["underlay"]["segment"][1].pop("cidr"), "underlay: segment #2: cidr: missing"),
    (lambda d: d["underlay"]["segment"][1].update(gw="172.16.2.1"),
     'underlay: segment #2: unknown key "gw" (known: cidr, router)'),
    (lambda d: d["underlay"]["segment"][1].update(cidr="172.16.2.1/24"),
     'underlay: segment #2: cidr "172.16.2.1/24" is not an IPv4 network'),
    (lambda d: d["underlay"]["segment"][1].update(cidr="172.17.2.0/24"),
     "underlay: segment #2: cidr 172.17.2.0/24 is not inside the underlay cidr 172.16.0.0/16"),
    (lambda d: d["underlay"]["segment"][1].update(cidr="172.16.0.0/15"),
     "underlay: segment #2: cidr 172.16.0.0/15 is not inside the underlay cidr"),
    (lambda d: d["underlay"]["segment"][1].update(cidr="172.16.1.128/25"),
     "underlay: segment #2: cidr 172.16.1.128/25 overlaps segment #1's 172.16.1.0/24 (a host's"
     " address is in exactly one segment)"),
    (lambda d: d["underlay"]["segment"][1].update(cidr="172.16.2.0/31"),
     "underlay: segment #2: cidr 172.16.2.0/31 has no room for a router and a host"),
    (lambda d: d["underlay"]["segment"][0].update(router="172.16.2.1"),
     'underlay: segment #1: router "172.16.2.1" is not in the segment\'s cidr 172.16.1.0/24'),
    (lambda d: d["underlay"]["segment"][0].update(router="172.16.1.255"),
     'underlay: segment #1: router "172.16.1.255/24" is the broadcast address of 172.16.1.0/24'),
    (lambda d: d["underlay"]["segment"][0].update(router="router"),
     'underlay: segment #1: router "router" is not an IPv4 address'),
    (lambda d: d["host"][2].update(address="172.16.3.2/24"),
     'host "C": address "172.16.3.2/24" is in no segment of the underlay (172.16.1.0/24,'
     " 172.16.2.0/24): with segments, every host's address is in one"),
    (lambda d: d["host"][2].update(address="172.16.2.2/16"),
     'host "C": address "172.16.2.2/16" is in segment 172.16.2.0/24 but has prefix /16: a'
     " host's address takes its segment's prefix, /24"),
    (lambda d: d["host"][0].update(address="172.16.1.1/24"),
     'host "A": address "172.16.1.1/24" is the router address of segment 172.16.1.0/24 (on br0'
     " of the underlay)"),
    (lambda d: d["host"][2].update(address="172.16.2.254/24"),
     'host "C": address "172.16.2.254/24" is the router address of segment 172.16.2.0/24'),
    (lambda d: d["mesh"].update(cross_subnet="yes"),
     'mesh: cross_subnet "yes" is not true or false'),
    (lambda d: d["mesh"].update(cross_subnet=1), "mesh: cross_subnet 1 is not true or false"),
    (lambda d: d["mesh"].update(registry="etcd", etcd_address="172.16.2.255"),
     'mesh: etcd_address "172.16.2.255/24" is the broadcast address of 172.16.2.0/24'),
    (lambda d: d["mesh"].update(registry="etcd", etcd_address="172.16.2.2"),
     'mesh: etcd_address "172.16.2.2" is host "C"\'s address'),
])
def test_segment_errors_name_the_rule(mutate, expected):
    assert expected in bad_segments(mutate)


def test_cross_subnet_example():
    topo = t.load(ROOT / "examples" / "cross-subnet.toml")
    assert [h.name for h in topo.members] == ["A", "B", "C", "D"]
    assert topo.mesh == t.Mesh(IPv4Network("10.42.0.0/16"), 24, "ipip", "sqlite", 4, None, True)
    assert [str(s.cidr) for s in topo.underlay.segments] == ["172.16.1.0/24", "172.16.2.0/24"]
    assert [str(s.router) for s in topo.underlay.segments] == ["172.16.1.254", "172.16.2.254"]
    assert [topo.bridge_of(h) for h in topo.hosts] == ["br0", "br0", "br1", "br1"]
