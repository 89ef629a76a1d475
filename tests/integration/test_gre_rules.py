"""GRE's receive rules on the real stack: packets crafted with scapy (an independent encoder)
and sent from the peer's kernel; each rule shows as the drop and the counter ip_tunnel_rcv()
would raise, and keys keep two tunnels between the same hosts apart."""
from __future__ import annotations

import json
import os
import time

import pytest

from nsutil import Net

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

from scapy.layers.inet import ICMP, IP  # noqa: E402
from scapy.layers.l2 import GRE  # noqa: E402

A_UL, B_UL = "172.16.232.172", "172.16.232.194"


@pytest.fixture(scope="module")
def pair(dataplane):
    net = Net()
    try:
        a, b = net.host("A"), net.host("B")
        net.underlay({a: f"{A_UL}/16", b: f"{B_UL}/16"})
        a.tunl(f"tunnel add gre1 mode gre remote {B_UL} local {A_UL} key 7 iseq icsum")
        a.tunl(f"tunnel add gre2 mode gre remote {B_UL} local {A_UL} key 8")
        a.run("ip addr add 10.50.1.1/30 dev gre1 && ip link set gre1 up && "
              "ip addr add 10.50.2.1/30 dev gre2 && ip link set gre2 up")
        yield a, b
    finally:
        net.close()


def gre(key=None, seq=None, csum=False, bad_csum=False, routing=False, dst="10.50.1.1"):
    """A GRE header and inner ICMP echo, as the payload of B's outer packet."""
    g = GRE(key_present=key is not None, key=key or 0, seqnum_present=seq is not None,
            sequence_number=seq or 0, chksum_present=csum, routing_present=routing, proto=0x0800)
    pkt = bytearray(bytes(g / IP(src="10.50.1.2", dst=dst) / ICMP(id=1, seq=1)))
    if bad_csum:
        pkt[4] ^= 0xFF
    return bytes(pkt)


def counters(a, name):
    return next(t["stats"] for t in a.tunnels() if t["ifname"] == name)


def unmatched(a):
    return json.loads(a.tunl("-j daemon status").stdout)["engine"]["unmatched"]


def send(a, b, payloads):
    b.send_raw(47, A_UL, payloads)
    time.sleep(0.3)


def delta(before, after, *keys):
    return {k: after[k] - before[k] for k in keys}


def test_a_good_packet_is_delivered_and_an_older_sequence_number_is_dropped(pair):
    a, b = pair
    before = counters(a, "gre1")
    send(a, b, [gre(key=7, seq=100, csum=True), gre(key=7, seq=50, csum=True),
                gre(key=7, csum=True)])
    after = counters(a, "gre1")
    assert delta(before, after, "rx_packets", "rx_fifo_errors", "rx_errors") == \
        {"rx_packets": 1, "rx_fifo_errors": 2, "rx_errors": 2}
    assert after["rx_drop"]["out_of_sequence"] - before["rx_drop"].get("out_of_sequence", 0) == 2


def test_checksum_absent_or_bad_is_a_crc_error(pair):
    a, b = pair
    before = counters(a, "gre1")
    send(a, b, [gre(key=7, seq=1000), gre(key=7, seq=1001, csum=True, bad_csum=True)])
    after = counters(a, "gre1")
    assert delta(before, after, "rx_crc_errors", "rx_errors", "rx_packets") == \
        {"rx_crc_errors": 2, "rx_errors": 2, "rx_packets": 0}


def test_a_checksum_the_tunnel_did_not_ask_for_is_a_crc_error(pair):
    a, b = pair
    before = counters(a, "gre2")
    send(a, b, [gre(key=8, csum=True, dst="10.50.2.1"), gre(key=8, dst="10.50.2.1")])
    after = counters(a, "gre2")
    assert delta(before, after, "rx_crc_errors", "rx_packets") == \
        {"rx_crc_errors": 1, "rx_packets": 1}


def test_keys_pick_the_tunnel_and_an_unknown_key_finds_none(pair):
    a, b = pair
    g1, g2, miss = counters(a, "gre1"), counters(a, "gre2"), unmatched(a)
    send(a, b, [gre(key=8, dst="10.50.2.1"), gre(key=9), gre()])
    assert counters(a, "gre2")["rx_packets"] - g2["rx_packets"] == 1
    assert counters(a, "gre1")["rx_packets"] == g1["rx_packets"]
    assert unmatched(a).get("key_mismatch", 0) - miss.get("key_mismatch", 0) == 2


def test_version_or_routing_bits_are_dropped_before_any_tunnel(pair):
    a, b = pair
    miss = unmatched(a)
    bad_version = bytearray(gre(key=7, seq=5000, csum=True))
    bad_version[1] |= 0x01
    send(a, b, [gre(key=7, seq=5001, csum=True, routing=True), bytes(bad_version)])
    assert unmatched(a).get("gre_flags", 0) - miss.get("gre_flags", 0) == 2
