"""tunl.kernel.rtnl against the real kernel: dumps compared with `ip -j`, events of routes,
links and addresses, an overflowed event socket, `route get` answers; and the figures of a
10,000-route dump and of 50,000 `route get` calls (printed, not asserted).

The test process enters each namespace with setns(2) only to open the sockets (a socket stays
in the namespace it was created in), and changes the namespace with `ip -n`."""
from __future__ import annotations

import ctypes
import errno
import gc
import ipaddress
import json
import os
import select
import shutil
import socket
import struct
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest

from nsutil import Net, sh

from tunl.kernel import rtnl
from tunl.kernel.rtnl import AddrMsg, Events, LinkMsg, RouteGet, RouteMsg, Rtnl

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)
if shutil.which("ip") is None:
    pytest.skip("needs iproute2 (ip)", allow_module_level=True)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

TYPES = {"unicast": 1, "local": 2, "broadcast": 3, "anycast": 4, "multicast": 5,
         "blackhole": 6, "unreachable": 7, "prohibit": 8, "throw": 9}
TABLES = {"main": 254, "local": 255, "default": 253}


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextmanager
def inside(ns: str):
    """Run the body (this thread) in network namespace ns, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)


class Lab:
    def __init__(self, net: Net, name: str):
        self.host = net.host(name)
        self.ns = self.host.ns

    def ip(self, args: str, check: bool = True):
        p = sh(f"ip -n {self.ns} {args}", check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"ip -n {self.ns} {args} -> {p.returncode}: {p.stderr}")
        return p

    def ipj(self, args: str):
        return json.loads(self.ip(f"-j {args}").stdout or "[]")

    def batch(self, lines: list[str]) -> None:
        path = f"/tmp/{self.ns}.batch"
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            self.ip(f"-batch {path}")
        finally:
            os.unlink(path)

    def index(self, name: str) -> int:
        return self.ipj(f"link show {name}")[0]["ifindex"]

    def rtnl(self) -> Rtnl:
        with inside(self.ns):
            return Rtnl()

    def events(self, **kw) -> Events:
        with inside(self.ns):
            return Events(**kw)

    def dummy(self, name: str) -> str:
        """A dummy device, or where the kernel has no dummy driver a veth (peer name+'p') up at
        both ends; returns the kind made."""
        if self.ip(f"link add {name} type dummy", check=False).returncode == 0:
            self.ip(f"link set {name} up")
            return "dummy"
        self.ip(f"link add {name} type veth peer name {name}p")
        self.ip(f"link set {name}p up")
        self.ip(f"link set {name} up")
        return "veth"


ROUTES = [
    "route add 10.1.0.0/16 via 192.0.2.254 dev d0",
    "route add 10.2.0.0/16 via 203.0.113.9 dev d0 onlink",
    "route add 10.3.0.0/24 dev d0 table 100 metric 5",
    "route add default via 192.0.2.254 dev d0 table 100",
    "route add 10.4.0.0/16 nexthop via 192.0.2.10 dev d0 nexthop via 198.51.100.2 dev v0",
    "route add 10.5.0.0/16 dev v0 mtu 1400",
    "route add 10.6.0.0/16 via inet6 fe80::1 dev d0",
    "route add blackhole 10.7.0.0/16",
    "route add 10.8.0.0/16 dev v0 tos 0x10",
    "route add 10.10.0.0/16 dev d0 table 1000",
    "-6 route add 2001:db8:10::/48 via 2001:db8:1::fe dev d0",
    "-6 route add 2001:db8:11::/48 dev d0 table 100 metric 77",
    "-6 route add 2001:db8:12::/48 nexthop via 2001:db8:1::fe dev d0"
    " nexthop via 2001:db8:2::fe dev v0",
    "-6 route add 2001:db8:15::/48 dev v0 mtu 1300",
    "-6 route add 2001:db8:16::/48 dev v0 table 70000",
]


@pytest.fixture(scope="module")
def lab():
    net = Net()
    try:
        lab = Lab(net, "rtnl")
        lab.kind = lab.dummy("d0")
        lab.ip("link add v0 type veth peer name v1")
        lab.ip("link set v0 up")
        lab.ip("link set v1 up")
        lab.ip("addr add 192.0.2.1/24 dev d0")
        lab.ip("addr add 2001:db8:1::1/64 dev d0 nodad")
        lab.ip("addr add 198.51.100.1/24 dev v0")
        lab.ip("addr add 2001:db8:2::1/64 dev v0 nodad")
        lab.ip("addr add 198.51.100.2/24 dev v1")
        for r in ROUTES:
            lab.ip(r)
        lab.d0, lab.v0, lab.v1 = lab.index("d0"), lab.index("v0"), lab.index("v1")
        yield lab
    finally:
        net.close()


# -- what `ip -j` says, in RouteMsg's terms ---------------------------------------------------

def _ip_route_key(r: dict, family: int, index: dict[str, int]) -> tuple:
    dst = r["dst"]
    if dst == "default":
        dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
    table = r.get("table", "main")
    gw = r.get("gateway") or (r.get("via") or {}).get("host")
    hops = tuple((index[h["dev"]], ipaddress.ip_address(h["gateway"]) if "gateway" in h else
                  ipaddress.ip_address(h["via"]["host"]) if "via" in h else None)
                 for h in r.get("nexthops", ()))
    return (family, ipaddress.ip_network(dst, strict=False),
            ipaddress.ip_address(gw) if gw and not hops else None,
            index[r["dev"]] if "dev" in r and not hops else None,
            TABLES.get(table) or int(table), r.get("metric", 0),
            int(r.get("tos", "0"), 16) if isinstance(r.get("tos"), str) else r.get("tos", 0),
            TYPES[r.get("type", "unicast")], hops)


def _msg_key(m: RouteMsg) -> tuple:
    return (m.family, m.dst, m.gateway, m.oif, m.table, m.priority, m.tos, m.type,
            m.multipath_oifs)


def _on(m: RouteMsg, oifs) -> bool:
    return m.oif in oifs or any(i in oifs for i, _ in m.multipath_oifs)


def _ip_routes(lab: Lab, oifs: set[int]) -> list[tuple]:
    index = {link["ifname"]: link["ifindex"] for link in lab.ipj("link show")}
    keys = []
    for family, opt in ((socket.AF_INET, "-4"), (socket.AF_INET6, "-6")):
        for r in lab.ipj(f"{opt} route show table all"):
            k = _ip_route_key(r, family, index)
            if k[3] in oifs or any(i in oifs for i, _ in k[8]):
                keys.append(k)
    return sorted(keys, key=repr)


def test_dump_routes_matches_ip_route_show_table_all(lab):
    with lab.rtnl() as nl:
        msgs = nl.dump_routes()
    assert all(m.new for m in msgs)
    oifs = {lab.d0, lab.v0}
    ours = sorted((_msg_key(m) for m in msgs if _on(m, oifs)), key=repr)
    assert ours == _ip_routes(lab, oifs)
    keys = set(ours)
    v4, v6 = socket.AF_INET, socket.AF_INET6
    n, a = ipaddress.ip_network, ipaddress.ip_address
    # the routes of the fixture are there, so the comparison above compared something
    assert (v4, n("10.2.0.0/16"), a("203.0.113.9"), lab.d0, 254, 0, 0, 1, ()) in keys
    assert (v4, n("10.3.0.0/24"), None, lab.d0, 100, 5, 0, 1, ()) in keys
    assert (v4, n("0.0.0.0/0"), a("192.0.2.254"), lab.d0, 100, 0, 0, 1, ()) in keys
    assert (v4, n("10.4.0.0/16"), None, None, 254, 0, 0, 1,
            ((lab.d0, a("192.0.2.10")), (lab.v0, a("198.51.100.2")))) in keys
    assert (v4, n("10.6.0.0/16"), a("fe80::1"), lab.d0, 254, 0, 0, 1, ()) in keys
    assert (v4, n("10.8.0.0/16"), None, lab.v0, 254, 0, 0x10, 1, ()) in keys
    assert (v4, n("192.0.2.1/32"), None, lab.d0, 255, 0, 0, 2, ()) in keys
    assert (v4, n("10.10.0.0/16"), None, lab.d0, 1000, 0, 0, 1, ()) in keys  # rtm_table 252
    assert (v6, n("2001:db8:11::/48"), None, lab.d0, 100, 77, 0, 1, ()) in keys
    assert (v6, n("2001:db8:16::/48"), None, lab.v0, 70000, 1024, 0, 1, ()) in keys
    assert (v6, n("2001:db8:12::/48"), None, None, 254, 1024, 0, 1,
            ((lab.d0, a("2001:db8:1::fe")), (lab.v0, a("2001:db8:2::fe")))) in keys
    # a route without a device
    assert RouteMsg(True, v4, n("10.7.0.0/16"), None, None, 254, 0, 0, 6, ()) in msgs


def test_dump_routes_filtered_by_oif_keeps_exactly_the_routes_through_them(lab):
    with lab.rtnl() as nl:
        every = nl.dump_routes()
        only_d0 = nl.dump_routes(want_oifs={lab.d0})
        only_v1 = nl.dump_routes(want_oifs=frozenset([lab.v1]))
        none = nl.dump_routes(want_oifs=())
    assert only_d0 == [m for m in every if _on(m, {lab.d0})]
    assert any(m.multipath_oifs for m in only_d0)         # kept for one hop through d0
    assert only_v1 == [m for m in every if _on(m, {lab.v1})] and only_v1
    assert none == []


def test_dump_links_and_addrs_match_ip(lab):
    with lab.rtnl() as nl:
        links = nl.dump_links()
        addrs = nl.dump_addrs()
        addrs6 = nl.dump_addrs(socket.AF_INET6)
    expect = [LinkMsg(True, x["ifindex"], x["ifname"], x["mtu"], "UP" in x["flags"],
                      x.get("linkinfo", {}).get("info_kind"))
              for x in lab.ipj("-d link show")]
    assert sorted(links, key=lambda m: m.index) == sorted(expect, key=lambda m: m.index)
    assert LinkMsg(True, lab.d0, "d0", 1500, True, lab.kind) in links
    assert LinkMsg(True, lab.v0, "v0", 1500, True, "veth") in links

    fam = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
    expect_a = sorted((fam[i["family"]], x["ifindex"], ipaddress.ip_address(i["local"]),
                       i["prefixlen"])
                      for x in lab.ipj("addr show") for i in x["addr_info"])
    assert sorted((m.family, m.index, m.address, m.prefixlen) for m in addrs) == expect_a
    assert AddrMsg(True, socket.AF_INET, lab.d0, ipaddress.ip_address("192.0.2.1"), 24) in addrs
    assert addrs6 == [m for m in addrs if m.family == socket.AF_INET6] and addrs6


def test_answers_to_other_requests_are_skipped(lab):
    with lab.rtnl() as nl:
        expect = nl.dump_links()
        # requests of someone else on the same socket (sequence numbers 4242, 4243), unread
        os.write(nl.fileno(), struct.pack("=IHHII", 32, rtnl.RTM_GETLINK,
                                          rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP, 4242, 0)
                 + bytes(16))
        dst = socket.inet_aton("10.1.2.3")
        os.write(nl.fileno(), struct.pack("=IHHII", 36, rtnl.RTM_GETROUTE, rtnl.NLM_F_REQUEST,
                                          4243, 0) + bytes([2, 32]) + bytes(10)
                 + struct.pack("=HH", 8, rtnl.RTA_DST) + dst)
        assert nl.route_get("8.8.8.8") == errno.ENETUNREACH
        assert nl.dump_links() == expect
        assert nl.route_get("10.2.3.4").gateway == ipaddress.ip_address("203.0.113.9")


# -- events ------------------------------------------------------------------------------------

def collect(ev: Events, until, want_oifs=None, timeout: float = 3.0) -> list:
    """Read ev until until(msgs) holds; fails after timeout."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {got}"
        select.select([ev], [], [], min(left, 0.2))
        msgs = ev.read(want_oifs)
        assert msgs is not None, "events lost (ENOBUFS) with the default buffer"
        got += msgs
    return got


def test_events_route_add_and_del(lab):
    a, n = ipaddress.ip_address, ipaddress.ip_network
    added = RouteMsg(True, socket.AF_INET, n("10.77.0.0/16"), a("192.0.2.9"), lab.d0, 100, 7, 0,
                     1, ())
    added6 = RouteMsg(True, socket.AF_INET6, n("2001:db8:77::/48"), None, None, 254, 1024, 0, 1,
                      ((lab.d0, a("2001:db8:1::fe")), (lab.v0, a("2001:db8:2::fe"))))
    with lab.events() as ev:
        lab.ip("route add 10.77.0.0/16 via 192.0.2.9 dev d0 table 100 metric 7")
        lab.ip("route add 10.78.0.0/16 dev v1")                    # not wanted
        lab.ip("-6 route add 2001:db8:77::/48 nexthop via 2001:db8:1::fe dev d0"
               " nexthop via 2001:db8:2::fe dev v0")
        lab.ip("link set v1 mtu 1450")                             # links always come
        got = collect(ev, lambda g: added6 in g and any(isinstance(m, LinkMsg) for m in g),
                      want_oifs={lab.d0})
        assert added in got
        assert not [m for m in got if isinstance(m, RouteMsg) and not _on(m, {lab.d0})], got
        assert LinkMsg(True, lab.v1, "v1", 1450, True, "veth") in got

        lab.ip("route del 10.77.0.0/16 table 100")
        lab.ip("-6 route del 2001:db8:77::/48")
        lab.ip("route del 10.78.0.0/16 dev v1")
        removed = [replace(added, new=False), replace(added6, new=False)]
        got = collect(ev, lambda g: all(r in g for r in removed), want_oifs={lab.d0})
        assert not any(m.new for m in got if isinstance(m, RouteMsg)), got
    lab.ip("link set v1 mtu 1500")


def test_events_link_mtu_and_bridge_port_messages(lab):
    with lab.events() as ev:
        lab.ip("link set v0 mtu 1400")
        got = collect(ev, lambda g: any(isinstance(m, LinkMsg) and m.mtu == 1400 for m in g))
        assert LinkMsg(True, lab.v0, "v0", 1400, True, "veth") in got
        lab.ip("link set v0 mtu 1500")
        # a port leaving a bridge: the bridge's own RTM_DELLINK (AF_BRIDGE) is no deletion
        lab.ip("link add br9 type bridge")
        lab.ip("link set v1 master br9")
        lab.ip("link set v1 nomaster")
        lab.ip("link del br9")
        got = collect(ev, lambda g: any(isinstance(m, LinkMsg) and not m.new for m in g))
        assert [m for m in got if isinstance(m, LinkMsg) and not m.new] == \
            [m for m in got if isinstance(m, LinkMsg) and m.name == "br9" and not m.new]
        assert all(m.kind == "veth" for m in got if isinstance(m, LinkMsg) and m.index == lab.v1)


def test_events_address_add_and_del(lab):
    a = ipaddress.ip_address
    v4 = AddrMsg(True, socket.AF_INET, lab.d0, a("192.0.2.50"), 24)
    v6 = AddrMsg(True, socket.AF_INET6, lab.v0, a("2001:db8:2::50"), 64)
    with lab.events() as ev:
        lab.ip("addr add 192.0.2.50/24 dev d0")
        lab.ip("addr add 2001:db8:2::50/64 dev v0 nodad")
        got = collect(ev, lambda g: v4 in g and v6 in g, want_oifs=())
        # the local route of the new address is a route of d0, filtered out
        assert not [m for m in got if isinstance(m, RouteMsg)]
        lab.ip("addr del 192.0.2.50/24 dev d0")
        lab.ip("addr del 2001:db8:2::50/64 dev v0")
        gone = [replace(v4, new=False), replace(v6, new=False)]
        collect(ev, lambda g: all(m in g for m in gone), want_oifs=())


def test_overflow_reads_none_then_the_socket_goes_on(lab):
    a, n = ipaddress.ip_address, ipaddress.ip_network
    with lab.events(rcvbuf=1024) as ev:
        assert ev.rcvbuf < 16384
        lab.batch([f"route add 10.200.{i // 256}.{i % 256}/32 dev v0 table 200"
                   for i in range(2000)])
        assert ev.read() is None
        lab.ip("route flush table 200")
        ev.read()                                   # None or not: the flush may overflow too
        lab.ip("route add 10.79.0.0/16 via 192.0.2.7 dev d0")
        got = collect(ev, lambda g: any(isinstance(m, RouteMsg) for m in g),
                      want_oifs={lab.d0})
        assert got == [RouteMsg(True, socket.AF_INET, n("10.79.0.0/16"), a("192.0.2.7"), lab.d0,
                                254, 0, 0, 1, ())]
    lab.ip("route del 10.79.0.0/16")


def test_a_burst_fits_the_default_buffer(lab, capsys):
    with lab.events() as ev:
        assert ev.rcvbuf >= 16 << 20        # SO_RCVBUFFORCE as root
        lab.batch([f"route add 10.201.{i // 256}.{i % 256}/32 dev v1 table 201"
                   for i in range(5000)] + ["route add 10.80.0.0/16 dev d0"])
        t = time.perf_counter()
        got = ev.read({lab.d0})
        dt = time.perf_counter() - t
        lab.ip("route flush table 201")
        lab.ip("route del 10.80.0.0/16")
    assert got is not None
    assert [m.dst for m in got if isinstance(m, RouteMsg)] == [ipaddress.ip_network("10.80.0.0/16")]
    with capsys.disabled():
        print(f"\n[rtnl] Events.read() of a 5,001-route burst, 1 wanted: {dt * 1e3:.1f} ms")


# -- route get ---------------------------------------------------------------------------------

def _ip_get_error(lab: Lab, args: str) -> str:
    p = lab.ip(f"route get {args}", check=False)
    assert p.returncode != 0, p.stdout
    return p.stderr


def test_route_get(lab):
    a = ipaddress.ip_address
    with lab.rtnl() as nl:
        assert nl.route_get("10.2.3.4") == RouteGet(lab.d0, a("203.0.113.9"), a("192.0.2.1"), 0)
        assert nl.route_get("10.1.2.3") == RouteGet(lab.d0, a("192.0.2.254"), a("192.0.2.1"), 0)
        assert nl.route_get("10.5.0.1") == RouteGet(lab.v0, None, a("198.51.100.1"), 1400)
        assert nl.route_get("10.6.0.1") == RouteGet(lab.d0, a("fe80::1"), a("192.0.2.1"), 0)
        # oif: with no route through v0, the kernel assumes the destination is on link there
        assert nl.route_get("10.99.0.1", oif=lab.v0) == RouteGet(lab.v0, None,
                                                                 a("198.51.100.1"), 0)
        assert nl.route_get("192.0.2.5", src="192.0.2.1").oif == lab.d0

        # no default route in the main table (table 100 has one, but no rule reads it)
        assert nl.route_get("8.8.8.8") == errno.ENETUNREACH
        assert "Network is unreachable" in _ip_get_error(lab, "8.8.8.8")
        # a source that is not an address of this host: ENETUNREACH, not EINVAL
        # (ip_route_output_key_hash_rcu(): EINVAL only for a multicast, broadcast or 0/8 source)
        assert nl.route_get("192.0.2.5", src="203.0.113.77") == errno.ENETUNREACH
        assert "Network is unreachable" in _ip_get_error(lab, "192.0.2.5 from 203.0.113.77")
        assert nl.route_get("192.0.2.5", src="224.1.1.1") == errno.EINVAL
        assert "Invalid argument" in _ip_get_error(lab, "192.0.2.5 from 224.1.1.1")

        assert nl.route_get("2001:db8:10::1") == RouteGet(lab.d0, a("2001:db8:1::fe"),
                                                          a("2001:db8:1::1"), 0)
        assert nl.route_get("2001:db8:15::1") == RouteGet(lab.v0, None, a("2001:db8:2::1"), 1300)
        assert nl.route_get("2001:db8:99::1") == errno.ENETUNREACH
        # IPv6 does not check the source: a foreign one is answered like ip does
        assert nl.route_get("2001:db8:1::5", src="2001:db8:99::1").oif == lab.d0
        lab.ip("-6 route get 2001:db8:1::5 from 2001:db8:99::1")


# -- figures -----------------------------------------------------------------------------------

def _raw_dump() -> list[bytes]:
    """The datagrams of an RTM_GETROUTE dump of this namespace, as the kernel sends them."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    try:
        s.bind((0, 0))
        s.send(struct.pack("=IHHII", 28, rtnl.RTM_GETROUTE, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP,
                           1, 0) + bytes(12))
        out = []
        while True:
            d = s.recv(1 << 16)
            out.append(d)
            off = 0
            while off < len(d):
                length, mtype = struct.unpack_from("=IH", d, off)
                if mtype == rtnl.NLMSG_DONE:
                    return out
                off += (length + 3) & ~3
    finally:
        s.close()


def test_figures_parse_of_10000_routes_and_route_get_rss(capsys):
    net = Net()
    try:
        lab = Lab(net, "perf")
        lab.ip("link add p0 type veth peer name p1")
        lab.ip("link set p0 up")
        lab.ip("link set p1 up")
        lab.ip("addr add 198.51.100.1/24 dev p0")
        lab.ip("addr add 2001:db8:2::1/64 dev p0 nodad")
        lab.ip("addr add 192.0.2.1/24 dev p1")
        lab.batch([f"route add 10.{100 + i // 256}.{i % 256}.0/24 via 198.51.100.2 dev p0"
                   for i in range(5000)]
                  + [f"route add 2001:db8:{0x100 + i:x}::/48 via 2001:db8:2::2 dev p0"
                     for i in range(5000)]
                  + [f"route add 10.9.{i}.0/24 via 192.0.2.2 dev p1" for i in range(5)])
        p1 = lab.index("p1")
        with inside(lab.ns):
            chunks = _raw_dump()
        every = [m for c in chunks for m in rtnl.parse(c)]
        assert len([m for m in every if isinstance(m, RouteMsg)]) > 10000
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            wanted = [m for c in chunks for m in rtnl.parse(c, {p1, 9999})]
            best = min(best, time.perf_counter() - t)
        assert wanted == [m for m in every if _on(m, {p1})]
        assert len([m for m in wanted if m.dst.prefixlen == 24 and m.gateway]) == 5

        with lab.rtnl() as nl:
            t = time.perf_counter()
            dumped = nl.dump_routes({p1})
            dump = time.perf_counter() - t
            assert dumped == wanted

            # a dump abandoned after its first datagram (the container raises), then a new one
            class Raises:
                def __contains__(self, oif):
                    raise LookupError(oif)
            with pytest.raises(LookupError):
                nl.dump_routes(Raises())
            assert nl.dump_routes({p1}) == wanted
            assert nl.dump_routes() == every

            for _ in range(5000):
                nl.route_get("10.9.1.1")
                nl.route_get("8.8.8.8")
            gc.collect()
            before = _rss_kib()
            t = time.perf_counter()
            for _ in range(25000):
                ok = nl.route_get("10.9.1.1")
                bad = nl.route_get("8.8.8.8")
            per_call = (time.perf_counter() - t) / 50000
            gc.collect()
            growth = _rss_kib() - before
        assert ok == RouteGet(p1, ipaddress.ip_address("192.0.2.2"),
                              ipaddress.ip_address("192.0.2.1"), 0)
        assert bad == errno.ENETUNREACH
    finally:
        net.close()
    with capsys.disabled():
        print(f"\n[rtnl] parse of a {sum(map(len, chunks))}-byte dump of "
              f"{len(every)} messages in {len(chunks)} datagrams, filtered to "
              f"{len(wanted)} routes: {best * 1e3:.1f} ms (best of 5)"
              f"\n[rtnl] dump_routes(want_oifs) with its syscalls: {dump * 1e3:.1f} ms"
              f"\n[rtnl] 50,000 route_get (half of them ENETUNREACH): RSS growth {growth} KiB, "
              f"{per_call * 1e6:.1f} µs per call")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")
