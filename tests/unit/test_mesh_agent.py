"""The agent above a fake host and a real registry (SQLite in memory, a fake clock): leases,
routes, and every fault of the issue that needs no kernel."""
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
