"""The agent above a fake host and a real registry (SQLite in memory, a fake clock): leases,
routes, and every fault a mesh must ride out that needs no kernel."""
import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from tunl.mesh import network as nw
from tunl.mesh.agent import Agent, AgentConfig
from tunl.mesh.fake import DownStore, FakeClock, FakeHost
from tunl.mesh.network import NetworkConfig
from tunl.mesh.plan import Route
from tunl.mesh.registry import Registry
from tunl.mesh.sqlite import SqliteStore

TTL = 8


@pytest.fixture
def world():
    clock = FakeClock()
    store = DownStore(SqliteStore(":memory:", clock))
    reg = Registry(store)
    reg.init(NetworkConfig.parse("10.42.0.0/16"))
    return clock, store, reg


def node(world, n, host=None, **kw):
    clock, store, reg = world
    cfg = AgentConfig(IPv4Address(f"172.16.0.{n}"), f"n{n}", ttl=TTL, resync=30, block=0.01, **kw)
    a = Agent(reg, host or FakeHost(), cfg, clock=clock, wait=lambda s: None)
    a.start()
    return a


def settle(*agents, rounds=3):
    for _ in range(rounds):
        for a in agents:
            a.step()


def routes_to(a):
    return {r.dst: r.via for r in a.host.table}


def test_two_nodes_lease_distinct_subnets_and_route_to_each_other(world):
    a, b = node(world, 1), node(world, 2)
    settle(a, b)
    sa, sb = a.status.lease.subnet, b.status.lease.subnet
    assert sa != sb
    assert routes_to(a) == {sb: IPv4Address("172.16.0.2")}
    assert routes_to(b) == {sa: IPv4Address("172.16.0.1")}
    assert all(r.dev == "tunl0" and r.onlink for r in a.host.table)
    assert a.host.local == [a.status.lease]


def test_restarted_agent_keeps_its_subnet_and_others_see_no_change(world):
    a, b = node(world, 1), node(world, 2)
    settle(a, b)
    subnet = a.status.lease.subnet
    ops_before = list(b.host.ops)
    a.stop()
    again = node(world, 1)                       # same public IP, a new process: no state file
    settle(again, b)
    assert again.status.lease.subnet == subnet
    assert b.host.ops == ops_before              # b never withdrew or re-added a's route


def test_dead_node_is_withdrawn_within_two_ttl(world):
    clock = world[0]
    a, b = node(world, 1), node(world, 2)
    settle(a, b)
    # a dies: it renews no more. b keeps renewing every TTL/4.
    for _ in range(8):
        clock.advance(TTL / 4)
        settle(b, rounds=1)
    assert routes_to(b) == {}
    assert [op.verb for op in b.host.ops][-1] == "delete"


def test_registry_down_keeps_routes_then_reconverges(world):
    clock, store, reg = world
    a, b = node(world, 1), node(world, 2)
    settle(a, b)
    table = set(b.host.table)
    store.down = True
    for _ in range(3):             # less than a TTL: etcd's leases do not run out while it is down
        clock.advance(TTL / 4)
        b.step()
    assert b.host.table == table and not b.status.registry_up
    assert b.status.registry_errors > 0
    store.down = False
    c = node(world, 3)                           # joined while b could not see the registry
    settle(b)
    assert b.status.registry_up
    assert routes_to(b) == {a.status.lease.subnet: IPv4Address("172.16.0.1"),
                            c.status.lease.subnet: IPv4Address("172.16.0.3")}


def test_garbage_and_foreign_leases_are_refused_never_programmed(world):
    clock, store, reg = world
    b = node(world, 2)
    store.put(reg.subnets_prefix + "10.42.9.0-24", b"\x00garbage")
    store.put(reg.subnets_prefix + "10.99.1.0-24",
              json.dumps({"PublicIP": "172.16.0.7", "BackendType": "ipip"}).encode())
    store.put(reg.subnets_prefix + "10.42.10.0-24",
              json.dumps({"PublicIP": "172.16.0.8", "BackendType": "ipip"}).encode())
    settle(b)
    assert routes_to(b) == {IPv4Network("10.42.10.0/24"): IPv4Address("172.16.0.8")}
    assert set(b.status.refused) == {reg.subnets_prefix + "10.42.9.0-24",
                                     reg.subnets_prefix + "10.99.1.0-24"}
    assert "is not a /24 of 10.42.0.0/16" in b.status.refused[reg.subnets_prefix + "10.99.1.0-24"]
    # the same after a full resync (listing, not events)
    b._relist()
    assert len(b.status.refused) == 2


def test_stale_tagged_routes_are_removed_at_start(world):
    stale = Route(IPv4Network("10.42.77.0/24"), IPv4Address("172.16.0.77"), "tunl0")
    b = node(world, 2, host=FakeHost({stale}))
    assert stale not in b.host.table


def test_lease_deleted_under_the_agent_is_claimed_again(world):
    clock, store, reg = world
    a, b = node(world, 1), node(world, 2)
    settle(a, b)
    subnet = a.status.lease.subnet
    store.delete(reg.key(subnet))
    settle(a, b)
    assert a.status.lease.subnet == subnet
    assert reg.holds(a.status.lease, a.status.lease_id)
    assert subnet in routes_to(b)


def test_compacted_watch_lists_again(world):
    clock, store, reg = world
    a, b = node(world, 1), node(world, 2)
    settle(a, b)
    b.watch.close()
    _, rev = store.list("/")
    c = node(world, 3)
    store.compact(store.list("/")[1])
    b.watch = store.watch(reg.subnets_prefix, rev)     # from before the compaction
    settle(b)
    assert c.status.lease.subnet in routes_to(b)


def test_refused_route_is_counted_and_the_rest_programmed(world):
    a = node(world, 1)
    host = FakeHost()
    host.fail = {a.status.lease.subnet}
    c = node(world, 3)
    b = node(world, 2, host=host)
    settle(b)
    assert b.status.route_errors >= 1
    assert c.status.lease.subnet in routes_to(b)


def test_racing_nodes_never_share_a_subnet(world):
    """Many agents on a small network, every one starting at once: distinct subnets, and the
    one that finds the network full says so."""
    clock, store, reg = world
    store._store.delete(reg.prefix + "/config")
    small = Registry(store)
    small.init(NetworkConfig.parse("10.8.0.0/28", 30))      # 3 subnets
    agents = [node(world, n) for n in range(1, 4)]
    assert len({a.status.lease.subnet for a in agents}) == 3
    with pytest.raises(nw.NetworkFullError, match="is full"):
        node(world, 9)


# -- cross-subnet, members, moves -------------------------------------------------------------

def cross_world():
    clock = FakeClock()
    store = SqliteStore(":memory:", clock)
    reg = Registry(store)
    reg.init(NetworkConfig.parse("10.42.0.0/16", direct_routing=True))
    return clock, store, reg


def underlay(prefix):
    h = FakeHost()
    h.underlay = [(IPv4Network(prefix), "eth0"), (IPv4Network("10.42.7.0/24"), "mybr0"),
                  (IPv4Network("10.99.0.0/16"), "tunl0")]
    return h


def at(world, ip, host, **kw):
    clock, store, reg = world
    cfg = AgentConfig(IPv4Address(ip), ip, ttl=TTL, resync=30, block=0.01, **kw)
    a = Agent(reg, host, cfg, clock=clock, wait=lambda s: None)
    a.start()
    return a


def test_cross_subnet_routes_same_subnet_peers_directly_and_the_others_through_the_tunnel():
    w = cross_world()
    a = at(w, "172.16.1.2", underlay("172.16.1.0/24"))
    b = at(w, "172.16.1.3", underlay("172.16.1.0/24"))
    c = at(w, "172.16.2.2", underlay("172.16.2.0/24"))
    settle(a, b, c)
    for ag in (a, b, c):
        ag.reconcile(read=True)
    by = {r.via: r for r in a.host.table}
    assert by[IPv4Address("172.16.1.3")] == Route(b.status.lease.subnet,
                                                  IPv4Address("172.16.1.3"), "eth0", False)
    assert by[IPv4Address("172.16.2.2")] == Route(c.status.lease.subnet,
                                                  IPv4Address("172.16.2.2"), "tunl0", True)
    assert a.status.direct == 1
    assert {r.dev for r in c.host.table} == {"tunl0"}


def test_without_cross_subnet_every_peer_goes_through_the_tunnel(world):
    a = node(world, 1, host=underlay("172.16.0.0/24"))
    b = node(world, 2, host=underlay("172.16.0.0/24"))
    settle(a, b)
    a.reconcile(read=True)
    assert {(r.dev, r.onlink) for r in a.host.table} == {("tunl0", True)}


def test_a_peer_that_moves_to_another_subnet_is_rerouted_and_keeps_its_subnet():
    w = cross_world()
    a = at(w, "172.16.1.2", underlay("172.16.1.0/24"))
    where = {"ip": IPv4Address("172.16.1.3")}
    b = at(w, "172.16.1.3", underlay("172.16.1.0/24"))
    b.address = lambda: where["ip"]
    settle(a, b)
    a.reconcile(read=True)
    subnet = b.status.lease.subnet
    assert [r.dev for r in a.host.table] == ["eth0"]
    where["ip"] = IPv4Address("172.16.2.9")
    w[0].advance(31)                   # b's resync looks at its address again
    settle(b, a)
    assert b.status.lease.subnet == subnet and b.status.lease.public_ip == where["ip"]
    assert a.host.table == {Route(subnet, where["ip"], "tunl0", True)}


def test_cross_subnet_turned_on_later_reaches_running_agents_at_their_next_listing(world):
    a = node(world, 1, host=underlay("172.16.0.0/24"))
    b = node(world, 2, host=underlay("172.16.0.0/24"))
    settle(a, b)
    assert world[2].init(NetworkConfig.parse("10.42.0.0/16", direct_routing=True)) == "updated"
    a.watch = None                     # as after a relist deadline: list (and read config) again
    a.step()
    assert a.config.direct_routing
    assert {r.dev for r in a.host.table} == {"eth0"}


def test_the_tunnel_is_handed_every_node_once_per_change(world):
    a = node(world, 1)
    b = node(world, 2)
    settle(a, b)
    ips = {IPv4Address("172.16.0.1"), IPv4Address("172.16.0.2")}
    assert a.host.member_sets[-1] == ips
    n = len(a.host.member_sets)
    a.reconcile(read=True)
    assert len(a.host.member_sets) == n          # nothing changed: not handed again
    c = node(world, 3)
    settle(a, c)
    assert a.host.member_sets[-1] == ips | {IPv4Address("172.16.0.3")}
    assert a.status.members == 3


def test_ip_masq_asks_the_host_to_masquerade_the_network(world):
    a = node(world, 1, ipmasq=True)
    assert a.host.masq == (IPv4Network("10.42.0.0/16"), a.status.lease.subnet)
    b = node(world, 2)
    assert not hasattr(b.host, "masq")
