"""NBMA (one-to-many): a tunnel with no remote whose outer destination is the gateway of the
kernel route that matched, followed live as routes are added, changed and deleted."""
from __future__ import annotations

import os
import time

import pytest

from nsutil import Net

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

UL = {"A": "172.16.165.33", "B": "172.16.165.244", "C": "172.16.168.113"}
SUBNET = {"A": 1, "B": 2, "C": 3}


@pytest.fixture(scope="module")
def o2m(dataplane):
    net = Net()
    try:
        hosts = {n: net.host(n) for n in UL}
        net.underlay({hosts[n]: f"{UL[n]}/16" for n in UL})
        for n, h in hosts.items():
            i = SUBNET[n]
            h.run(f"ip link add name mybr0 type bridge && ip addr add 10.42.{i}.1/24 dev mybr0 && "
                  "ip link set dev mybr0 up")
            h.tunl("tunnel add tunl0 mode ipip")
            h.run(f"ip link set tunl0 up && ip addr add 10.42.{i}.0/32 dev tunl0")
            for m in UL:
                if m != n:
                    h.run(f"ip route add 10.42.{SUBNET[m]}.0/24 via {UL[m]} dev tunl0 onlink")
        yield hosts
    finally:
        net.close()


def test_every_pair_pings_both_ways(o2m):
    for n, h in o2m.items():
        for m in o2m:
            if m != n:
                p = h.ping(f"10.42.{SUBNET[m]}.1")
                assert p.returncode == 0, f"{n} -> {m}: {p.stdout}"


def test_show_prints_a_tunnel_without_remote(o2m):
    assert o2m["A"].tunl("tunnel show").stdout == "tunl0: ip/ip remote any local any ttl inherit\n"


def test_inner_source_is_the_tunnel_address_and_outer_destination_the_gateway(o2m):
    a, c = o2m["A"], o2m["C"]
    cap = c.popen("tcpdump -n -l -c 1 -i eth0 ip proto 4", stdout=-1, stderr=-1)
    time.sleep(1.0)
    a.ping("10.42.3.1")
    out, _ = cap.communicate(timeout=10)
    assert f"IP {UL['A']} > {UL['C']}: IP 10.42.1.0 > 10.42.3.1: ICMP echo request" in out, out


def test_a_route_added_takes_effect_for_the_very_next_packet(o2m):
    """The ping leaves a few milliseconds after the route is in the kernel, maybe before
    tunld's mirror of the routes has it: the data plane then asks the kernel itself."""
    a = o2m["A"]
    a.run("ip route del 10.42.2.0/24")
    try:
        assert a.ping("10.42.2.1").returncode != 0
    finally:
        p = a.run(f"ip route add 10.42.2.0/24 via {UL['B']} dev tunl0 onlink && "
                  "ping -n -c 1 -W 2 10.42.2.1", check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_route_change_moves_the_outer_destination(o2m):
    a, b = o2m["A"], o2m["B"]
    a.run(f"ip route change 10.42.3.0/24 via {UL['B']} dev tunl0 onlink")
    try:
        cap = b.popen("tcpdump -n -l -c 1 -i eth0 ip proto 4 and dst " + UL["B"], stdout=-1,
                      stderr=-1)
        time.sleep(1.0)
        a.ping("10.42.3.1")
        out, _ = cap.communicate(timeout=10)
        assert f"IP {UL['A']} > {UL['B']}: IP 10.42.1.0 > 10.42.3.1" in out, out
    finally:
        a.run(f"ip route change 10.42.3.0/24 via {UL['C']} dev tunl0 onlink")
        time.sleep(0.1)
    assert a.ping("10.42.3.1").returncode == 0


def test_a_deleted_gateway_is_forgotten(o2m):
    """After the on-link route is replaced by one without a gateway, the outer destination
    would be the inner one, which routes back into the tunnel: dropped as DeadLoop."""
    a = o2m["A"]
    before = a.counters()["collisions"]
    a.run("ip route del 10.42.3.0/24 && ip route add 10.42.3.0/24 dev tunl0")
    time.sleep(0.1)          # routes take effect within 100 ms
    try:
        assert a.ping("10.42.3.1").returncode != 0
        assert a.counters()["collisions"] > before
    finally:
        a.run(f"ip route replace 10.42.3.0/24 via {UL['C']} dev tunl0 onlink")
        time.sleep(0.1)
    assert a.ping("10.42.3.1").returncode == 0
