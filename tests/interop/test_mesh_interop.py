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
