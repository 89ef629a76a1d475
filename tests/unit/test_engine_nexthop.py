"""The NBMA next hop when the route mirror lags the kernel: the engine asks the kernel (through
an injected route_via, here a fake) and remembers the answer until the routes change."""
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace

from tunl.dataplane.engine import HEADROOM, Engine
from tunl.dataplane.fib import Fib
from tunl.model import Route
from tunl.wire import ipv4

GW = IPv4Address("172.16.165.244").packed


def plane(routes=()):
    return SimpleNamespace(fib4=Fib(routes), asked={}, ifindex=7, codec=None)


def engine(answer):
    e = Engine.__new__(Engine)          # no sockets: only the next-hop logic is exercised
    e.asked_for = []

    def route_via(dst, src=None, dev=None):
        e.asked_for.append(dst)
        return answer
    e.route_via = route_via
    return e


def packet(dst="10.42.2.1"):
    return bytearray(HEADROOM) + ipv4.build("10.42.1.0", dst, 1, b"x" * 8)


def test_a_route_the_mirror_has_is_used_without_asking():
    e = engine((7, b"\0\0\0\0", 1500))
    t = plane([Route(IPv4Network("10.42.2.0/24"), IPv4Address("172.16.165.244"))])
    assert e._nbma_dst(t, packet(), 4) == GW
    assert e.asked_for == []


def test_a_route_the_mirror_lacks_is_asked_once_and_remembered():
    e = engine((7, GW, 1500))
    t = plane()
    assert e._nbma_dst(t, packet(), 4) == GW
    assert e._nbma_dst(t, packet(), 4) == GW
    assert e.asked_for == ["10.42.2.1"]


def test_a_route_through_another_device_gives_the_inner_destination():
    e = engine((3, GW, 1500))                 # the kernel would not route it into this tunnel
    assert e._nbma_dst(plane(), packet(), 4) == IPv4Address("10.42.2.1").packed


def test_an_on_link_route_without_gateway_gives_the_inner_destination():
    e = engine((7, None, 1500))               # rt_nexthop(): no gateway, the destination itself
    assert e._nbma_dst(plane(), packet(), 4) == IPv4Address("10.42.2.1").packed
