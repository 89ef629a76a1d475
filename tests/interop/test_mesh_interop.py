"""The mesh with the Linux kernel as one node: the guest's agent builds the overlay on the
kernel data plane (`auto` finds the ipip module and takes the kernel's fallback tunl0, as
Calico does), the host side's agents on the eBPF or the userspace plane, all leasing from one
etcd. Every pair pings and a TCP stream crosses from tunl to the kernel intact."""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from ipaddress import IPv4Network

import pytest

from conftest import GUEST
from test_matrix import pings, tcp

TUNL = os.path.join(os.path.dirname(sys.executable), "tunl")   # the guest sees the host's files
A, C = "172.16.165.33", "172.16.168.113"
ETCD = f"{A}:23790"


def routes(out: str) -> dict[IPv4Network, str]:
    got = {}
    for line in out.splitlines():
        m = re.match(r"(\S+) via (\S+) dev tunl0 (?:proto 116 )?onlink", line.strip())
        if m:
            got[IPv4Network(m.group(1))] = m.group(2)
    return got


def subnet(out: str) -> IPv4Network:
    m = re.search(r"inet (\S+)/32", out)
    return IPv4Network(m.group(1) + "/24")


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (etcd-server)")
def test_mesh_with_the_kernel_as_one_node(interop, record, tmp_path):
    rig = interop
    a, c = rig.node("a", A), rig.node("c", C)
    a.popen(f"etcd --name m0 --data-dir {tmp_path}/etcd --listen-client-urls http://{ETCD} "
            f"--advertise-client-urls http://{ETCD} --listen-peer-urls http://127.0.0.1:23800 "
            f"--initial-advertise-peer-urls http://127.0.0.1:23800 "
            f"--initial-cluster m0=http://127.0.0.1:23800",
            stdout=open(f"{tmp_path}/etcd.log", "w"), stderr=open(f"{tmp_path}/etcd.err", "w"))
    url = f"etcd://{ETCD}"
    for _ in range(100):
        if a.run(f"{TUNL} mesh init --registry {url} --network 10.42.0.0/16",
                 check=False).returncode == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(open(f"{tmp_path}/etcd.err").read()[-2000:])
    rig.guest(f"{TUNL} mesh agent --registry {url} --public-ip {GUEST} --node B --ttl 4 "
              "> /run/mesh-agent.log 2>&1 & echo $! > /run/mesh-agent.pid",
              undo="kill $(cat /run/mesh-agent.pid); sleep 0.5; ip link del mybr0; "
                   "ip route flush proto 116; ip link set tunl0 down; ip addr flush dev tunl0; "
                   "rm -rf /run/tunl")
    for h, n in ((a, "A"), (c, "C")):
        h.popen(f"{TUNL} mesh agent --registry {url} --iface eth0 --node {n} --ttl 4",
                stdout=open(f"{tmp_path}/agent-{n}.log", "w"), stderr=-2)
    nodes = {"A": (a, A), "C": (c, C)}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            sub = {n: subnet(h.run("ip -4 addr show dev tunl0", check=False).stdout)
                   for n, (h, _) in nodes.items()}
            sub["B"] = subnet(rig.guest("ip -4 addr show dev tunl0", check=False))
        except AttributeError:
            time.sleep(0.3)
            continue
        want = {n: {sub[o]: ip for o, ip in (("A", A), ("B", GUEST), ("C", C)) if o != n}
                for n in ("A", "B", "C")}
        got = {n: routes(h.run("ip route show proto 116").stdout) for n, (h, _) in nodes.items()}
        got["B"] = routes(rig.guest("ip route show proto 116"))
        if got == want:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"not converged: {got} != {want}\n" +
                             rig.guest("cat /run/mesh-agent.log", check=False))
    record("mesh", "routes on every node (kernel B)", True)
    # the guest's tunnel is the kernel's own fallback device, on the kernel data plane
    assert "ipip" in rig.guest("ip -d link show tunl0")
    assert "kernel's fallback device" in rig.guest("cat /run/mesh-agent.log")
    b_gw, a_gw, c_gw = (str(sub[n].network_address + 1) for n in ("B", "A", "C"))
    pings(rig, record, "mesh A<->B", a, a_gw, b_gw)
    pings(rig, record, "mesh C<->B", c, c_gw, b_gw)
    p = a.ping(c_gw, count=2)
    record("mesh A<->C", "tunl -> tunl: ping", p.returncode == 0)
    assert p.returncode == 0
    tcp(rig, record, "mesh A->B", a, b_gw)
    members_only(rig, record, b_gw)


def members_only(rig, record, b_gw: str) -> None:
    """The kernel's tunl0 takes IPIP from anyone; the guest's agent keeps nftables table ip
    tunl_members with the overlay's nodes, so what a host outside the overlay forges is
    dropped and counted before tunl0 sees it (and IPIP from a member still passes)."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    rig.guest("true", undo="nft delete table ip tunl_members 2>/dev/null; true")
    table = rig.guest("nft list table ip tunl_members", check=False)
    assert all(ip in table for ip in (A, GUEST, C)), \
        (table, rig.guest("cat /run/mesh-agent.log", check=False))
    x = rig.node("x", "172.16.170.66")
    before = int(rig.guest("cat /sys/class/net/tunl0/statistics/rx_packets"))
    forged = bytes(IP(src="10.42.250.9", dst=b_gw) / ICMP(id=7, seq=1))
    x.send_raw(4, GUEST, [forged] * 5)
    time.sleep(0.3)
    counted = re.search(r"counter not_member_ipip \{\s*packets (\d+)",
                        rig.guest("nft list table ip tunl_members"))
    after = int(rig.guest("cat /sys/class/net/tunl0/statistics/rx_packets"))
    ok = counted is not None and int(counted.group(1)) >= 5 and after == before
    record("mesh members only", "forged IPIP from a non-member: dropped by nftables", ok)
    assert ok, (counted and counted.group(0), before, after)
    # GRE and sit are not this overlay's: the kernel's gre0 and sit0 are down and take none
    rx = "cat /sys/class/net/gre0/statistics/rx_packets /sys/class/net/sit0/statistics/rx_packets"
    before = rig.guest(rx)
    x.send_raw(47, GUEST, [b"\x00\x00\x08\x00" + forged] * 3)
    x.send_raw(41, GUEST, [bytes(IPv6(src="fd00::9", dst="fd00::1") / ICMPv6EchoRequest())] * 3)
    time.sleep(0.3)
    ok = rig.guest(rx) == before and int(rig.guest(
        "cat /sys/class/net/tunl0/statistics/rx_packets")) == after
    record("mesh members only", "forged GRE and sit from a non-member: not delivered", ok)
    assert ok
    doctor = rig.guest(f"{TUNL} doctor", check=False)
    assert "tunl0 (ipip, no remote) takes encapsulated packets only from the overlay's nodes" \
        in doctor, doctor
