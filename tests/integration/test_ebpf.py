"""What only the eBPF data plane has: programs and maps in the kernel, a fast path that needs
no tunld, a slow path for the rest, and nothing left behind. (Everything the planes share is
tested on both by the other modules.)"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import time

import pytest

from nsutil import A_UL, B_UL, Net, alive, ebpf_unavailable, one_to_one, transfer

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)


@pytest.fixture(autouse=True)
def ebpf_only():
    why = ebpf_unavailable()
    if why:
        pytest.skip(f"no eBPF data plane here: {why}")


@pytest.fixture
def o2o(monkeypatch):
    import nsutil
    monkeypatch.setitem(nsutil.ENV, "TUNL_DATAPLANE", "ebpf")
    net = Net()
    try:
        a, b = one_to_one(net)
        yield net, a, b
    finally:
        net.close()


def status(h, name="tunl0") -> dict:
    return next(t for t in h.tunnels() if t["ifname"] == name)


def programs(h) -> dict:
    """{(device, direction): program id} of tunl's tc filters in h."""
    out = {}
    for dev in h.run("ls /sys/class/net").stdout.split():
        for d in ("ingress", "egress"):
            for f in json.loads(h.run(f"tc -j filter show dev {dev} {d}").stdout or "[]"):
                prog = (f.get("options") or {}).get("prog") or {}
                if prog.get("name", "").startswith("tunl_"):
                    out[(dev, d)] = prog["id"]
    return out


def maps_of(prog_ids) -> set[int]:
    """The ids of the maps these programs use (bpftool's view, not tunl's)."""
    ids = set()
    for pid in prog_ids:
        got = json.loads(os.popen(f"bpftool -j prog show id {pid}").read() or "{}")
        ids.update(got.get("map_ids", []))
    return ids


def existing_maps() -> set[int]:
    return {m["id"] for m in json.loads(os.popen("bpftool -j map show").read() or "[]")}


def existing_progs() -> set[int]:
    return {p["id"] for p in json.loads(os.popen("bpftool -j prog show").read() or "[]")}


def wait_gone(ids: set[int], existing) -> set[int]:
    deadline = time.monotonic() + 5
    while ids & existing() and time.monotonic() < deadline:
        time.sleep(0.1)
    return ids & existing()


def test_tunnels_get_the_ebpf_plane_and_the_kernel_moves_their_packets(o2o):
    _, a, b = o2o
    assert status(a)["dataplane"] == "ebpf"
    attached = programs(a)
    assert ("tunl0", "egress") in attached and ("eth0", "ingress") in attached
    assert a.ping("10.42.2.1", count=5).returncode == 0
    e = status(a)["ebpf"]
    assert e["fast_tx"] >= 5 and e["fast_rx"] >= 5
    assert e["slow_tx"] == 0 and e["slow_rx"] == 0
    assert status(a)["stats"]["tx_packets"] >= 5        # the same counters as other planes
    assert "dataplane ebpf" in a.tunl("-d tunnel show").stdout


def test_traffic_flows_with_no_tunld_at_all(o2o):
    """kill -9 of both tunld processes: the programs stay attached and keep moving packets."""
    _, a, b = o2o
    st = json.loads(a.tunl("-j daemon status").stdout)
    for pid in (st["supervisor"], st["pid"]):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while alive(st["pid"]) or alive(st["supervisor"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p = a.run("ping -n -c 50 -i 0.01 -W 1 10.42.2.1", check=False)
    assert " 0% packet loss" in p.stdout, p.stdout
    # the next command starts tunld, which adopts the maps: counters went on
    assert status(a)["ebpf"]["fast_tx"] >= 50


def test_del_and_namespace_deletion_leave_no_program_or_map(o2o):
    net, a, b = o2o
    progs_a, progs_b = programs(a), programs(b)
    ids_a, ids_b = set(progs_a.values()), set(progs_b.values())
    maps_a, maps_b = maps_of(ids_a), maps_of(ids_b)
    assert maps_a and maps_b and not maps_a & maps_b      # each namespace its own maps
    a.tunl("tunnel del tunl0")
    assert programs(a) == {}                  # no filter on the underlay either
    assert wait_gone(ids_a, existing_progs) == set()
    assert wait_gone(maps_a, existing_maps) == set()
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("tunl")] \
        if os.path.isdir("/sys/fs/bpf") else True
    net.remove(b)                             # ip netns del, with tunld in it
    assert wait_gone(ids_b, existing_progs) == set()
    assert wait_gone(maps_b, existing_maps) == set()


def test_gre_with_sequence_numbers_sends_through_the_slow_path_and_says_so(o2o):
    _, a, b = o2o
    for h, me, peer in ((a, A_UL, B_UL), (b, B_UL, A_UL)):
        h.tunl(f"tunnel add gre1 mode gre remote {peer} local {me} key 5 oseq iseq")
    a.run("ip addr add 10.43.0.1/30 dev gre1 && ip link set gre1 up")
    b.run("ip addr add 10.43.0.2/30 dev gre1 && ip link set gre1 up")
    assert a.ping("10.43.0.2", count=3).returncode == 0
    e = status(a, "gre1")["ebpf"]
    assert e["fast_tx"] == 0 and e["slow_tx"] >= 3 and e["fast_rx"] == 0
    d = a.tunl("-d tunnel show gre1").stdout
    assert "slow path tx: oseq" in d and "slow path rx: iseq" in d
    # what the slow path sent carries the sequence numbers (RFC 2890), as the kernel's would
    cap = b.popen("tcpdump -n -v -l -c 1 -i eth0 ip proto 47", stdout=-1, stderr=-1)
    time.sleep(0.8)
    a.ping("10.43.0.2")
    out, _ = cap.communicate(timeout=10)
    assert "seq " in out and "key=0x5" in out, out


def test_a_learned_path_mtu_sends_big_packets_to_the_slow_path(o2o):
    _, a, b = o2o
    b.forge_frag_needed(A_UL, B_UL, 1400)
    time.sleep(1.6)                   # tunld puts the learned MTU in the path map within 1 s
    big = a.ping("10.42.2.1", extra="-M do -s 1400")
    # the answer of the slow path: ICMP fragmentation needed with the MTU inside the tunnel
    assert re.search(r"mtu ?= ?1380", big.stderr + big.stdout), big.stdout + big.stderr
    assert a.ping("10.42.2.1", extra="-M do -s 1352").returncode == 0


@pytest.mark.parametrize("offloads", ["on", "off"])
def test_a_container_sends_64k_gso_packets_through_the_tunnel_intact(o2o, offloads, tmp_path):
    """Forwarded, not local: a container behind mybr0 on A sends to B. With offloads on, the
    egress program sees 64 KB GSO packets and must keep them whole and correct."""
    net, a, b = o2o
    a.run("ip link add mybr0 type bridge && ip addr add 10.42.11.1/24 dev mybr0 && "
          "ip link set mybr0 up")
    c = net.container(a, "c1", "10.42.11.2/24", "10.42.11.1")
    b.run("ip route add 10.42.11.0/24 dev tunl0")
    for h, dev in ((c, "eth0"), (a, "c-c1"), (a, "eth0"), (b, "eth0")):
        h.run(f"ethtool -K {dev} tso {offloads} gso {offloads} gro {offloads}")
    data = random.Random(11).randbytes(20 * 1000 * 1000)
    before = status(a)["ebpf"]["fast_tx"]
    assert transfer(c, b, "10.42.2.1", 5556, data, tmp_path) == hashlib.sha256(data).hexdigest()
    sent = status(a)["ebpf"]["fast_tx"] - before
    if offloads == "on":
        assert sent < 20e6 / 1448 / 2, f"{sent} packets: the GSO packets were cut up first"
    else:
        assert sent >= 20e6 / 1480, f"{sent} packets for 20 MB without offloads"
