"""The pure parts of tunld: the rate limit of data-path log lines, the route mirror fed by
netlink messages (here built by hand, as kernel/rtnl parses them), and the record of tunnels."""
from __future__ import annotations

import json
import logging
import os
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from tunl.daemon.mirror import Mirror
from tunl.daemon.state import State
from tunl.dataplane.ratelimit import RateLimitedLog
from tunl.kernel.rtnl import AddrMsg, LinkMsg, RouteMsg
from tunl.model import Route, TunnelMode, TunnelSpec

AF_INET, AF_INET6 = 2, 10
TUN = 7


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="t")
    return caplog


def test_a_flood_of_one_line_is_cut_to_the_burst_and_the_rest_counted(records):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("t"), interval=5, burst=10, clock=clock)
    for i in range(100_000):
        log.info("path MTU to %s is now %d", "192.0.2.1", i, key="pmtu")
    assert len(records.records) == 10
    clock.now += 5
    log.info("path MTU to %s is now %d", "192.0.2.1", 1, key="pmtu")
    assert len(records.records) == 11
    assert records.records[-1].getMessage().endswith("(99990 similar messages suppressed)")


def test_each_kind_of_line_has_its_own_budget(records):
    log = RateLimitedLog(logging.getLogger("t"), interval=5, burst=2, clock=Clock())
    for _ in range(5):
        log.error("a", key="a")
        log.error("b", key="b")
    assert [r.getMessage() for r in records.records] == ["a", "b", "a", "b"]


def route(dst, gw=None, oif=TUN, new=True, table=254, prio=0, rtype=1):
    net = IPv4Network(dst) if ":" not in dst else IPv6Network(dst)
    gw = (IPv4Address(gw) if ":" not in gw else IPv6Address(gw)) if gw else None
    return RouteMsg(new, AF_INET if net.version == 4 else AF_INET6, net, gw, oif, table, prio,
                    0, rtype)


def mirrored():
    m = Mirror()
    m.load({TUN}, [route("10.42.2.0/24", "172.16.0.2")],
           [LinkMsg(True, TUN, "tunl0", 1480, True, "tun"),
            LinkMsg(True, 2, "eth0", 1500, True, "veth")], [])
    return m


def test_routes_of_other_devices_change_nothing_but_the_paths():
    m = mirrored()
    ch = m.apply([route(f"10.{i // 250}.{i % 250}.0/24", oif=2) for i in range(1000)])
    assert ch.routes == set() and ch.any
    assert m.tunnel_routes(TUN) == [Route(IPv4Network("10.42.2.0/24"),
                                          IPv4Address("172.16.0.2"))]


def test_add_replace_and_delete_follow_the_kernels_route_identity():
    m = mirrored()
    assert m.apply([route("10.42.3.0/24", "172.16.0.3")]).routes == {TUN}
    # the same destination, table, metric and tos: a replace, not a second route
    assert m.apply([route("10.42.3.0/24", "172.16.0.9")]).routes == {TUN}
    # the same destination in another table is another route
    m.apply([route("10.42.3.0/24", "172.16.0.4", table=100)])
    assert sorted((str(r.dst), str(r.gateway), r.table) for r in m.tunnel_routes(TUN)) == [
        ("10.42.2.0/24", "172.16.0.2", 254), ("10.42.3.0/24", "172.16.0.4", 100),
        ("10.42.3.0/24", "172.16.0.9", 254)]
    assert m.apply([route("10.42.3.0/24", new=False)]).routes == {TUN}
    assert m.apply([route("10.42.3.0/24", new=False)]).routes == set()     # already gone
    # local-table and non-unicast routes are not next hops
    assert m.apply([route("10.42.1.0/32", table=255), route("10.9.0.0/16", rtype=6)]).routes \
        == set()


def test_an_identical_route_again_is_no_change():
    m = mirrored()
    assert m.apply([route("10.42.2.0/24", "172.16.0.2")]).routes == set()


def test_links_and_prefixes_of_the_tunnel():
    m = mirrored()
    ch = m.apply([LinkMsg(True, TUN, "tunl0", 1400, False, "tun"),
                  AddrMsg(True, AF_INET6, TUN, IPv6Address("2001:db8:1::1"), 64),
                  AddrMsg(True, AF_INET6, 2, IPv6Address("2001:db8:9::1"), 64)])
    assert ch.links == {TUN} and ch.prefixes == {TUN}
    assert m.mtu(TUN) == 1400 and not m.links[TUN].up
    assert m.tunnel_prefixes(TUN) == (IPv6Network("2001:db8:1::/64"),)
    assert m.apply([LinkMsg(False, TUN, "tunl0", 1400, False, "tun")]).gone == {TUN}


def test_the_record_round_trips_and_is_root_only(tmp_path):
    st = State(str(tmp_path / "ns"))
    spec = TunnelSpec(name="gre1", mode=TunnelMode.GRE, ikey=42, okey=42,
                      remote=IPv4Address("192.0.2.2"))
    st.save({"gre1": (12, spec)})
    assert st.load() == {"gre1": (12, spec)}
    assert os.stat(st.path).st_mode & 0o777 == 0o600
    assert os.stat(st.dir).st_mode & 0o777 == 0o700


def test_a_damaged_record_takes_back_nothing_it_cannot_read(tmp_path):
    st = State(str(tmp_path / "ns"))
    os.makedirs(st.dir)
    with open(st.path, "w") as f:
        json.dump({"tunnels": {"a": {"ifindex": 3, "spec": {"name": "a", "mode": "nosuch"}},
                               "b": {"ifindex": 4, "spec": {"name": "b", "mode": "ipip"}},
                               "c": {"spec": {"name": "c"}}}}, f)
    assert list(st.load()) == ["b"]
    with open(st.path, "w") as f:
        f.write("{not json")
    assert st.load(move_bad=False) is None and os.path.exists(st.path)
    assert st.load() is None                       # none: tunld falls back to the aliases
    assert not os.path.exists(st.path) and os.path.exists(st.path + ".bad")


def test_no_record_is_none_and_an_empty_one_is_empty(tmp_path):
    st = State(str(tmp_path / "ns"))
    assert st.load() is None and st.has_tunnels() is None
    st.save({})
    assert st.load() == {} and st.has_tunnels() is False


def test_a_replace_that_may_have_moved_a_route_off_the_tunnel_asks_for_a_dump():
    m = mirrored()
    moved = RouteMsg(True, AF_INET, IPv4Network("10.42.2.0/24"), IPv4Address("172.16.0.9"), 2,
                     254, 0, 0, 1, (), True)
    assert m.apply([moved]).redump == {TUN}
    other = RouteMsg(True, AF_INET, IPv4Network("10.42.7.0/24"), None, 2, 254, 0, 0, 1, (),
                     True)
    assert m.apply([other]).redump == set()


def test_the_kernels_silent_flushes_ask_for_a_dump():
    m = mirrored()
    # fib_sync_down_dev(): a device going down loses its IPv4 routes without RTM_DELROUTE
    assert m.apply([LinkMsg(True, TUN, "tunl0", 1480, False, "tun")]).redump == {TUN}
    assert m.apply([LinkMsg(True, TUN, "tunl0", 1480, False, "tun")]).redump == set()
    # fib_sync_down_addr(): an IPv4 address going anywhere may take routes with it
    gone = AddrMsg(False, AF_INET, 2, IPv4Address("172.16.0.1"), 24)
    assert m.apply([gone]).redump == {TUN}
    m.reload({TUN}, [route("10.42.5.0/24", "172.16.0.5"), route("10.9.0.0/16", oif=2)])
    assert [str(r.dst) for r in m.tunnel_routes(TUN)] == ["10.42.5.0/24"]


def test_a_full_load_refreshes_every_tunnel_and_finds_the_ones_gone():
    m = Mirror()
    ch = m.load({TUN, 9}, [route("10.42.2.0/24", "172.16.0.2")],
                [LinkMsg(True, TUN, "tunl0", 1480, True, "tun")], [])
    assert ch.routes == ch.links == ch.prefixes == {TUN, 9}
    assert ch.gone == {9} and ch.redump == set() and ch.any
