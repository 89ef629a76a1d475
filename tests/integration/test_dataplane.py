"""The userspace IPIP data plane against the real kernel stack, in network namespaces.

Two hosts on an underlay bridge run the walkthrough's one-to-one tunnel; host A also routes
for a container on its bridge mybr0. Every assertion is about what the kernel, ping, tcpdump
and TCP observe, not about tunl's own view.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import signal
import time

import pytest

from nsutil import A_UL, B_UL, TUNL, Net, one_to_one, transfer

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)



@pytest.fixture(scope="module")
def o2o(dataplane):
    net = Net()
    try:
        a, b = one_to_one(net)
        # a container behind A, on a bridge that is not the tunnel's subnet
        # (a jumbo link, so that what is too big is too big for the tunnel, not for the container)
        a.run("ip link add mybr0 type bridge && ip addr add 10.42.11.1/24 dev mybr0 && "
              "ip link set mybr0 up")
        c = net.container(a, "c1", "10.42.11.2/24", "10.42.11.1")
        c.run("ip link set eth0 mtu 9000")
        a.run("ip link set c-c1 mtu 9000 && ip link set mybr0 mtu 9000")
        b.run("ip route add 10.42.11.0/24 dev tunl0")
        yield net, a, b, c
    finally:
        net.close()


def test_one_to_one_pings_both_ways(o2o):
    _, a, b, _ = o2o
    for src, dst in ((a, "10.42.2.1"), (b, "10.42.1.1")):
        p = src.ping(dst, count=3)
        assert p.returncode == 0 and " 0% packet loss" in p.stdout, p.stdout


def test_show_prints_what_ip_tunnel_show_prints(o2o):
    _, a, _, _ = o2o
    assert a.tunl("tunnel show").stdout == \
        f"tunl0: ip/ip remote {B_UL} local {A_UL} ttl inherit\n"
    assert a.tunl("tunnel show tunl0").stdout.startswith("tunl0: ip/ip")


def test_tcpdump_sees_inner_icmp_on_tunl0_and_protocol_4_on_the_underlay(o2o):
    """`tunl tunnel capture` is tcpdump on the device; on the eBPF plane it also shows what
    the egress program would have sent past the device's queue."""
    _, a, b, _ = o2o
    inner = a.popen(f"{TUNL} tunnel capture tunl0 -n -l -c 2 icmp", stdout=-1, stderr=-1)
    outer = b.popen("tcpdump -n -l -c 2 -i eth0 ip proto 4", stdout=-1, stderr=-1)
    time.sleep(1.0)      # let both captures attach
    assert a.ping("10.42.2.1").returncode == 0
    inner_out, _ = inner.communicate(timeout=10)
    outer_out, _ = outer.communicate(timeout=10)
    assert re.search(r"IP 10\.42\.1\.1 > 10\.42\.2\.1: ICMP echo request", inner_out), inner_out
    assert re.search(r"IP 10\.42\.2\.1 > 10\.42\.1\.1: ICMP echo reply", inner_out), inner_out
    assert f"IP {A_UL} > {B_UL}: IP 10.42.1.1 > 10.42.2.1: ICMP echo request" in outer_out, outer_out
    assert f"IP {B_UL} > {A_UL}: IP 10.42.2.1 > 10.42.1.1: ICMP echo reply" in outer_out, outer_out


def test_tunnel_mtu_is_underlay_minus_20_and_too_big_gets_frag_needed(o2o):
    _, a, _, c = o2o
    assert "mtu 1480 " in a.run("ip link show tunl0").stdout
    fits = c.ping("10.42.2.1", extra="-M do -s 1452")          # 1452 + 28 = 1480
    assert fits.returncode == 0, fits.stdout
    big = c.ping("10.42.2.1", extra="-M do -s 1473")
    assert "Frag needed and DF set (mtu = 1480)" in big.stdout, big.stdout
    # the container's kernel learned the path MTU from that answer
    again = c.ping("10.42.2.1", extra="-M do -s 1453")
    assert "message too long, mtu=1480" in again.stderr, again.stderr


def test_path_mtu_learned_from_underlay_icmp_lowers_the_frag_needed_mtu(o2o):
    _, a, b, c = o2o
    b.forge_frag_needed(A_UL, B_UL, 1400)
    time.sleep(0.3)
    big = c.ping("10.42.2.1", extra="-M do -s 1400")
    assert "Frag needed and DF set (mtu = 1380)" in big.stdout, big.stdout
    assert c.ping("10.42.2.1", extra="-M do -s 1352").returncode == 0   # 1352 + 28 = 1380
    assert a.counters()["tx_drop"].get("too_big", 0) >= 1


def test_50_mb_tcp_transfer_arrives_intact(o2o, tmp_path):
    _, a, b, _ = o2o
    data = random.Random(7).randbytes(50 * 1000 * 1000)
    assert transfer(a, b, "10.42.2.1", 5555, data, tmp_path) == hashlib.sha256(data).hexdigest()


def test_kill_9_of_tunld_loses_nothing_and_traffic_comes_back_by_itself(o2o):
    _, a, _, _ = o2o
    pid = a.tunld_pid()
    os.kill(pid, signal.SIGKILL)
    assert "10.42.1.1/24" in a.run("ip addr show tunl0").stdout
    assert "10.42.2.0/24 dev tunl0" in a.run("ip route").stdout
    # nothing typed: the supervisor starts a new data plane, which takes the tunnel back
    deadline = time.monotonic() + 5
    while a.ping("10.42.2.1", extra="-W 0.1").returncode != 0:
        assert time.monotonic() < deadline, "traffic did not come back by itself"
    assert a.tunld_pid() != pid
    assert a.tunl("tunnel show").stdout.startswith("tunl0: ip/ip remote")


def test_change_sets_a_fixed_ttl_seen_on_the_wire(o2o):
    _, a, b, _ = o2o
    a.tunl("tunnel change tunl0 ttl 33")
    try:
        assert "ttl 33" in a.tunl("tunnel show tunl0").stdout
        cap = b.popen("tcpdump -n -v -l -c 1 -i eth0 ip proto 4 and src " + A_UL, stdout=-1,
                      stderr=-1)
        time.sleep(1.0)
        a.ping("10.42.2.1")
        out, _ = cap.communicate(timeout=10)
        assert "ttl 33," in out, out
    finally:
        a.tunl("tunnel change tunl0 ttl inherit")


def send_ipv4(h, packet: bytes) -> None:
    """Send a whole IPv4 packet (outer header included, as built) from host h."""
    h.run("python3 -c 'import socket\n"
          "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n"
          f"s.sendto(bytes.fromhex(\"{packet.hex()}\"),(\"{A_UL}\",0))'")


def test_ecn_on_encapsulation_and_decapsulation_follows_rfc_6040(o2o):
    from scapy.layers.inet import ICMP, IP
    _, a, b, _ = o2o
    # out: the inner ECN field is copied, CE as ECT(0) (INET_ECN_encapsulate())
    cap = b.popen("tcpdump -n -v -l -c 2 -i eth0 ip proto 4 and src " + A_UL, stdout=-1,
                  stderr=-1)
    time.sleep(1.0)
    a.ping("10.42.2.1", extra="-Q 0x03")
    a.ping("10.42.2.1", extra="-Q 0x01")
    out, _ = cap.communicate(timeout=10)
    tos = re.findall(r"^\S+ IP \(tos (0x[0-9a-f]+)", out, re.M)
    assert tos == ["0x2", "0x1"], out
    # in: an outer CE over a not-ECT packet is dropped and counted; over an ECT(0) packet it
    # marks the inner packet CE
    before = a.counters()["rx_drop"].get("ecn", 0)

    def outer(inner_tos: int, seq: int) -> bytes:
        inner = IP(src="10.42.2.1", dst="10.42.1.1", tos=inner_tos) / ICMP(id=77, seq=seq)
        return bytes(IP(src=B_UL, dst=A_UL, tos=0x03, proto=4) / inner)
    inner_cap = a.popen(f"{TUNL} tunnel capture tunl0 -n -v -l -c 1 icmp and src 10.42.2.1",
                        stdout=-1, stderr=-1)
    time.sleep(1.0)
    send_ipv4(b, outer(0x00, 1))
    send_ipv4(b, outer(0x02, 2))
    got, _ = inner_cap.communicate(timeout=10)
    assert re.search(r"IP \(tos 0x3,CE.*\n.*10\.42\.2\.1 > 10\.42\.1\.1: ICMP echo request, "
                     r"id 77, seq 2", got), got
    assert a.counters()["rx_drop"].get("ecn", 0) == before + 1


def test_malformed_and_foreign_packets_are_dropped_and_counted(o2o):
    """Thousands of mutated and random protocol-4 payloads from the peer: each one is
    delivered or dropped and counted, and the daemon lives on."""
    _, a, b, _ = o2o
    pid, before = a.tunld_pid(), a.counters()
    rng = random.Random(4)
    valid = bytes.fromhex("4500001c0001000040017cd10a2a02010a2a010108004d5200010001")
    payloads = []
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            payloads.append(rng.randbytes(rng.randrange(0, 80)))
        elif kind == 1:
            payloads.append(valid[:rng.randrange(0, len(valid))])
        else:
            p = bytearray(valid + rng.randbytes(rng.randrange(0, 40)))
            for _ in range(rng.randrange(1, 4)):
                p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
            payloads.append(bytes(p))
    b.send_raw(4, A_UL, payloads)
    time.sleep(0.5)
    after = a.counters()
    assert a.tunld_pid() == pid
    handled = sum(after[k] - before[k] for k in ("rx_packets", "rx_errors", "rx_dropped"))
    assert handled == len(payloads)
    assert after["rx_errors"] - before["rx_errors"] > 1000
    assert sum(after["rx_drop"].values()) - sum(before["rx_drop"].values()) == \
        after["rx_errors"] - before["rx_errors"] + after["rx_dropped"] - before["rx_dropped"]
    assert a.ping("10.42.2.1").returncode == 0


@pytest.mark.parametrize("words, message", [
    ("tunnel add tunl0 mode ipip", 'add tunnel "tunl0" failed: File exists'),
    ("tunnel del eth0", "eth0 exists but tunl did not create it"),
    ("tunnel del nosuch0", 'delete tunnel "nosuch0" failed: No such device'),
    ("tunnel add t1 mode ipip remote 172.16.232.194 local 172.16.232.172",
     "tunl0 has the same protocol, local and remote addresses and key"),
    ("tunnel add t2 mode ipip ttl 0x100", 'ttl "0x100": TTL is 1..255 or inherit'),
    ("tunnel add t3 mode vti --dataplane ebpf",
     "a vti's packets are encrypted and decrypted by tunld itself (ESP)"),
])
def test_bad_requests_get_one_line_and_change_nothing(o2o, words, message):
    _, a, _, _ = o2o
    p = a.tunl(words, check=False)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert [t["ifname"] for t in a.tunnels()] == ["tunl0"]
    assert a.ping("10.42.2.1").returncode == 0


def test_the_control_socket_answers_reads_to_anyone_and_writes_to_root_only(o2o):
    _, a, _, _ = o2o
    a.tunld_pid()     # running
    probe = ("import socket,sys\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0tunl/tunld')\n"
             "s.sendall(sys.argv[1].encode() + b'\\n')\nprint(s.recv(65536).decode())\n")
    nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c " + shlex.quote(probe)
    shown = json.loads(a.run(f"{nobody} " + shlex.quote('{"op": "show"}')).stdout)
    assert shown["ok"] is True and "tunl0" in json.dumps(shown)
    refused = json.loads(a.run(f"{nobody} " + shlex.quote('{"op": "del", "name": "tunl0"}')).stdout)
    assert refused["ok"] is False and refused["message"].startswith('op "del": needs root')
    assert [t["ifname"] for t in a.tunnels()] == ["tunl0"]


def test_a_default_route_through_the_tunnel_is_no_dead_loop(o2o):
    """With `default dev tunl0`, the remote is still routed out of eth0 (its connected /16):
    the outer packets do not come back into the tunnel, so nothing is a DeadLoop."""
    _, a, _, _ = o2o
    before = a.counters()["collisions"]
    a.run("ip route add default dev tunl0")
    try:
        assert a.ping("10.42.2.1", count=2).returncode == 0
        assert a.counters()["collisions"] == before
    finally:
        a.run("ip route del default dev tunl0")
