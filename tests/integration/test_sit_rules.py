"""sit, isatap and 6rd on the real stack: IPv6 pings across, the receive checks of sit.c with
their counters (packets crafted by scapy and sent by the peer's kernel), and ICMPv6 Packet Too
Big for a path MTU learned from the underlay."""
from __future__ import annotations

import os
import time

import pytest

from nsutil import Net

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6  # noqa: E402

A_UL, B_UL, C_UL = "172.16.165.33", "172.16.165.244", "172.16.168.113"


@pytest.fixture(scope="module")
def hosts(dataplane):
    net = Net()
    try:
        a, b, c = net.host("A"), net.host("B"), net.host("C")
        net.underlay({a: f"{A_UL}/16", b: f"{B_UL}/16", c: f"{C_UL}/16"})
        # point to point, A <-> B
        for h, me, peer, i in ((a, A_UL, B_UL, 1), (b, B_UL, A_UL, 2)):
            h.tunl(f"tunnel add sit1 mode sit remote {peer} local {me}")
            h.run(f"ip link set sit1 up && ip -6 addr add 2001:db8:1::{i}/64 dev sit1")
        # 6rd on A and C: prefix 2001:db8::/32, relay 172.16.0.0/16, 16 bits embedded
        for h, me, sub in ((a, A_UL, "a521"), (c, C_UL, "a871")):
            h.tunl(f"tunnel add sit6rd mode sit local {me}")
            h.tunl("tunnel 6rd dev sit6rd 6rd-prefix 2001:db8::/32 6rd-relay_prefix 172.16.0.0/16")
            h.run(f"ip link set sit6rd up && ip -6 addr add 2001:db8:{sub}::1/32 dev sit6rd")
        # isatap on B, router list empty for now (not on A: sit6rd already has A's local
        # address and no remote, and the kernel allows one such sit tunnel)
        b.tunl(f"tunnel add isatap0 mode isatap local {B_UL}")
        b.run(f"ip link set isatap0 up && ip -6 addr add 2001:db8:5::5efe:{B_UL}/64 dev isatap0")
        yield a, b, c
    finally:
        net.close()


def stats(h, name):
    return next(t["stats"] for t in h.tunnels() if t["ifname"] == name)


def echo(src: str, dst: str) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=7, seq=1))


def test_sit_point_to_point_pings_both_ways(hosts):
    a, b, _ = hosts
    assert a.ping("2001:db8:1::2", count=2).returncode == 0
    assert b.ping("2001:db8:1::1", count=2).returncode == 0


def test_6rd_finds_the_ipv4_destination_in_the_ipv6_one(hosts):
    a, _, c = hosts
    cap = c.popen("tcpdump -n -l -c 1 -i eth0 ip proto 41", stdout=-1, stderr=-1)
    time.sleep(1.0)
    assert a.ping("2001:db8:a871::1", count=2).returncode == 0
    out, _ = cap.communicate(timeout=10)
    assert f"IP {A_UL} > {C_UL}: IP6 2001:db8:a521::1 > 2001:db8:a871::1" in out, out
    assert "6rd-prefix 2001:db8::/32 6rd-relay_prefix 172.16.0.0/16" in \
        a.tunl("tunnel show sit6rd").stdout


def test_6rd_drops_an_inner_source_that_does_not_embed_the_outer_one(hosts):
    a, b, c = hosts
    before = stats(c, "sit6rd")
    # from B (172.16.165.244), claiming A's 6rd address (which embeds .165.33): spoofed
    b.send_raw(41, C_UL, [echo("2001:db8:a521::1", "2001:db8:a871::1"),
                          echo("2001:db8:a5f4::1", "2001:db8:a871::1")])
    time.sleep(0.3)
    after = stats(c, "sit6rd")
    assert after["rx_errors"] - before["rx_errors"] == 1
    assert after["rx_drop"].get("6rd_source", 0) - before["rx_drop"].get("6rd_source", 0) == 1
    assert after["rx_packets"] - before["rx_packets"] == 1


def test_a_second_sit_tunnel_with_the_same_addresses_is_refused(hosts):
    a, _, _ = hosts
    p = a.tunl(f"tunnel add isatap1 mode isatap local {A_UL}", check=False)
    assert p.returncode == 1
    assert 'add tunnel "isatap1" failed: sit6rd has the same protocol' in p.stderr


def test_isatap_accepts_routers_in_the_list_and_isatap_sources_only(hosts):
    _, b, c = hosts
    plain = echo("2001:db8:77::1", f"2001:db8:5::5efe:{B_UL}")
    isatap_form = echo(f"2001:db8:5::5efe:{C_UL}", f"2001:db8:5::5efe:{B_UL}")
    before = stats(b, "isatap0")
    c.send_raw(41, B_UL, [plain, isatap_form])
    time.sleep(0.3)
    mid = stats(b, "isatap0")
    assert mid["rx_drop"].get("isatap_source", 0) - before["rx_drop"].get("isatap_source", 0) == 1
    assert mid["rx_packets"] - before["rx_packets"] == 1
    b.tunl(f"tunnel prl prl-default {C_UL} dev isatap0")
    try:
        assert f"pdr {C_UL}" in b.tunl("tunnel show isatap0").stdout
        c.send_raw(41, B_UL, [plain])
        time.sleep(0.3)
        assert stats(b, "isatap0")["rx_packets"] - mid["rx_packets"] == 1
    finally:
        b.tunl(f"tunnel prl prl-delete {C_UL} dev isatap0")
    assert f"pdr {C_UL}" not in b.tunl("tunnel show isatap0").stdout


def test_prl_is_refused_on_a_sit_tunnel(hosts):
    a, _, _ = hosts
    p = a.tunl(f"tunnel prl prl-default {B_UL} dev sit1", check=False)
    assert p.returncode == 1 and "only isatap tunnels have a potential router list" in p.stderr


def test_packet_too_big_for_a_learned_path_mtu(hosts):
    a, b, _ = hosts
    b.forge_frag_needed(A_UL, B_UL, 1000, proto=41)
    time.sleep(0.3)
    p = a.ping("2001:db8:1::2", extra="-M do -s 1300")
    assert "Packet too big: mtu=1280" in p.stdout + p.stderr, p.stdout + p.stderr
    assert a.ping("2001:db8:1::2", extra="-s 1200").returncode == 0
