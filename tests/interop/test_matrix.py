"""Each mode between tunl's userspace data plane (host side) and the Linux kernel (guest),
built on both sides with the same `ip tunnel` words: pings both ways, a TCP stream whose
SHA-256 is compared, and the same answer to a packet too big for the tunnel."""
from __future__ import annotations

import hashlib
import random
import re
import shlex
import time

import pytest

from conftest import GUEST, PLANE

HOST = "172.16.165.33"
PAYLOAD = random.Random(11).randbytes(2 * 1000 * 1000)
SINK = ("import socket,hashlib,sys\n"
        "s=socket.create_server((sys.argv[1],5555),family=socket.AF_INET6 if ':' in sys.argv[1]"
        " else socket.AF_INET);c,_=s.accept();h=hashlib.sha256()\n"
        "while (d:=c.recv(1<<16)): h.update(d)\n"
        "print(h.hexdigest())")


def pings(rig, record, case, host, host_in, guest_in, v6=False):
    out = rig.guest(f"ping -n -c 3 -i 0.2 -W 2 {host_in}", check=False)
    ok_g = " 0% packet loss" in out
    record(case, "kernel -> tunl: ping", ok_g)
    p = host.ping(guest_in, count=3)
    ok_h = p.returncode == 0
    record(case, "tunl -> kernel: ping", ok_h)
    assert ok_g, out
    assert ok_h, p.stdout + p.stderr


def tcp(rig, record, case, host, guest_in):
    """2 MB from the host side to a sink in the guest; the digests must agree."""
    rig.guest(f"rm -f /run/sink.out; python3 -c {shlex.quote(SINK)} {guest_in} "
              "> /run/sink.out 2>&1 &")
    for _ in range(100):        # the guest's Python takes a moment to listen
        if "5555" in rig.guest("ss -Hltn 'sport = :5555'", check=False):
            break
        time.sleep(0.1)
    blob = f"/tmp/{host.ns}.payload"
    with open(blob, "wb") as f:
        f.write(PAYLOAD)
    dst = f"[{guest_in}]" if ":" in guest_in else guest_in
    host.run(f"python3 -c 'import socket;s=socket.create_connection((\"{guest_in}\",5555));"
             f"s.sendfile(open(\"{blob}\",\"rb\"));s.close()'", timeout=120)
    digest = ""
    for _ in range(100):
        digest = rig.guest("cat /run/sink.out", check=False).strip()
        if digest:
            break
        time.sleep(0.1)
    ok = digest == hashlib.sha256(PAYLOAD).hexdigest()
    record(case, f"tunl -> kernel: TCP 2 MB {dst}", ok, "" if ok else f"got {digest[:16]!r}")
    assert ok


def fast_path(record, case, host, dev, tx=True, rx=True):
    """On the eBPF plane: the packets of the case took the kernel's fast path where the
    programs handle them (tx, rx), and the slow path where they leave them to tunld."""
    if PLANE[0] != "ebpf":
        return
    import json
    t = next(t for t in json.loads(host.tunl("-j tunnel show").stdout) if t["ifname"] == dev)
    assert t["dataplane"] == "ebpf", t["dataplane"]
    e = t["ebpf"]
    ok = (e["fast_tx"] > 0) is tx and (e["slow_tx"] > 0) is not tx and \
         (e["fast_rx"] > 0) is rx and (e["slow_rx"] > 0) is not rx
    record(case, f"{'fast' if tx else 'slow'} tx {'fast' if rx else 'slow'} rx", ok,
           f"fast tx {e['fast_tx']} rx {e['fast_rx']}, slow tx {e['slow_tx']} rx {e['slow_rx']}")
    assert ok, e


def too_big(rig, record, case, host, dev, guest_in, host_in):
    """ping -M do one byte over the tunnel MTU from each side: the same local answer."""
    mtu_g = int(rig.guest(f"cat /sys/class/net/{dev}/mtu").strip())
    mtu_h = int(host.run(f"cat /sys/class/net/{dev}/mtu").stdout.strip())
    hdr = 48 if ":" in guest_in else 28
    size = mtu_g - hdr + 1
    out_g = rig.guest(f"ping -n -c 1 -W 1 -M do -s {size} {host_in}", check=False)
    p = host.ping(guest_in, extra=f"-M do -s {size}")
    out_h = p.stdout + p.stderr
    # ping says "mtu=1480" for IPv4 and "mtu: 1480" for IPv6
    said_g, said_h = re.search(rf"mtu[=:] ?{mtu_g}\b", out_g), re.search(rf"mtu[=:] ?{mtu_h}\b", out_h)
    ok = mtu_g == mtu_h and bool(said_g and said_h)
    record(case, f"too big (mtu {mtu_g} / {mtu_h})", ok)
    assert mtu_g == mtu_h, f"kernel {dev} mtu {mtu_g}, tunl {mtu_h}"
    assert said_g, out_g
    assert said_h, out_h


def forwarded_too_big(rig, record, case, host, dev, v6=False):
    """A container behind each side sends one byte over the tunnel MTU with DF towards the
    other side's container: its router answers, and both routers must answer alike
    (ICMP fragmentation needed, or ICMPv6 packet too big, with the tunnel's MTU)."""
    mtu = int(host.run(f"cat /sys/class/net/{dev}/mtu").stdout)
    if v6:
        nets, fwd, hdr = ("fd99:1::", "fd99:2::"), "net.ipv6.conf.all.forwarding", 48
        plen, want = 64, f"Packet too big: mtu={mtu}"
    else:
        nets, fwd, hdr = ("10.99.1.", "10.99.2."), "net.ipv4.ip_forward", 28
        plen, want = 24, f"Frag needed and DF set (mtu = {mtu})"
    mine, theirs = nets
    c = rig.net.host("hc")
    rig.nodes.append(c)
    host.run(f"ip link add hc0 type veth peer name eth0 netns {c.ns} && "
              f"ip addr add {mine}1/{plen} dev hc0 && ip link set hc0 up && sysctl -qw {fwd}=1 && "
              f"ip route add {theirs}0/{plen} dev {dev}")
    c.run(f"ip addr add {mine}2/{plen} dev eth0 && ip link set eth0 up && "
          f"ip route add default via {mine}1")
    rig.guest("ip netns add gc", undo="ip netns del gc")
    rig.guest(f"ip link add gc0 type veth peer name eth0 netns gc && "
              f"ip addr add {theirs}1/{plen} dev gc0 && ip link set gc0 up && sysctl -qw {fwd}=1 && "
              f"ip route add {mine}0/{plen} dev {dev} && ip -n gc addr add {theirs}2/{plen} dev eth0 && "
              f"ip -n gc link set eth0 up && ip -n gc link set lo up && "
              f"ip -n gc route add default via {theirs}1")
    time.sleep(2 if v6 else 0.2)        # duplicate address detection
    size = mtu - hdr + 1
    p = c.ping(f"{theirs}2", extra=f"-M do -s {size}")
    out_g = rig.guest(f"ip netns exec gc ping -n -c 1 -W 2 -M do -s {size} {mine}2", check=False)
    ok_h, ok_g = want in p.stdout, want in out_g
    record(case, f"forwarded too big: {want}", ok_h and ok_g,
           "" if ok_h and ok_g else f"tunl side {'ok' if ok_h else 'FAIL'}, kernel side "
           f"{'ok' if ok_g else 'FAIL'}")
    assert ok_h, p.stdout + p.stderr
    assert ok_g, out_g


def test_ipip_point_to_point(interop, record):
    rig = interop
    host = rig.node("a", HOST)
    words = "mode ipip remote {r} local {l}"
    rig.guest(f"ip tunnel add ipip1 {words.format(r=HOST, l=GUEST)}", undo="ip link del ipip1")
    rig.guest("ip addr add 10.60.1.2/24 dev ipip1 && ip link set ipip1 up")
    host.tunl(f"tunnel add ipip1 {words.format(r=GUEST, l=HOST)}")
    host.run("ip addr add 10.60.1.1/24 dev ipip1 && ip link set ipip1 up")
    pings(rig, record, "ipip", host, "10.60.1.1", "10.60.1.2")
    tcp(rig, record, "ipip", host, "10.60.1.2")
    fast_path(record, "ipip", host, "ipip1")
    too_big(rig, record, "ipip", host, "ipip1", "10.60.1.2", "10.60.1.1")
    forwarded_too_big(rig, record, "ipip", host, "ipip1")


@pytest.mark.parametrize("opts", ["", "key 42", "seq", "csum", "key 42 seq csum"],
                         ids=["plain", "key", "seq", "csum", "key-seq-csum"])
def test_gre(interop, record, opts):
    rig, case = interop, f"gre {opts}".strip()
    host = rig.node("a", HOST)
    words = "mode gre remote {r} local {l} " + opts
    rig.guest(f"ip tunnel add gre1 {words.format(r=HOST, l=GUEST)}", undo="ip link del gre1")
    rig.guest("ip addr add 10.61.1.2/24 dev gre1 && ip -6 addr add fd00:61::2/64 dev gre1 && "
              "ip link set gre1 up")
    host.tunl(f"tunnel add gre1 {words.format(r=GUEST, l=HOST)}")
    host.run("ip addr add 10.61.1.1/24 dev gre1 && ip -6 addr add fd00:61::1/64 dev gre1 && "
             "ip link set gre1 up")
    pings(rig, record, case, host, "10.61.1.1", "10.61.1.2")
    pings(rig, record, case + " (IPv6 inside)", host, "fd00:61::1", "fd00:61::2")
    tcp(rig, record, case, host, "10.61.1.2")
    fast_path(record, case, host, "gre1", tx="seq" not in opts and "csum" not in opts,
              rx="seq" not in opts and "csum" not in opts)
    too_big(rig, record, case, host, "gre1", "10.61.1.2", "10.61.1.1")
    forwarded_too_big(rig, record, case, host, "gre1")


def test_sit_point_to_point(interop, record):
    rig = interop
    host = rig.node("a", HOST)
    words = "mode sit remote {r} local {l}"
    rig.guest(f"ip tunnel add sit1 {words.format(r=HOST, l=GUEST)}", undo="ip link del sit1")
    rig.guest("ip link set sit1 up && ip -6 addr add 2001:db8:62::2/64 dev sit1")
    host.tunl(f"tunnel add sit1 {words.format(r=GUEST, l=HOST)}")
    host.run("ip link set sit1 up && ip -6 addr add 2001:db8:62::1/64 dev sit1")
    time.sleep(2)       # IPv6 duplicate address detection on both sides
    pings(rig, record, "sit", host, "2001:db8:62::1", "2001:db8:62::2")
    tcp(rig, record, "sit", host, "2001:db8:62::2")
    from tunl.bpf.programs import F_DECAP_L3, feature_flags
    fast_path(record, "sit", host, "sit1", rx=bool(feature_flags() & F_DECAP_L3))
    too_big(rig, record, "sit", host, "sit1", "2001:db8:62::2", "2001:db8:62::1")
    forwarded_too_big(rig, record, "sit", host, "sit1", v6=True)


def test_isatap_with_a_router_list(interop, record):
    """The guest is an ISATAP host whose router list names the tunl node."""
    rig = interop
    host = rig.node("a", HOST)
    rig.guest(f"ip tunnel add isatap0 mode isatap local {GUEST}", undo="ip link del isatap0")
    rig.guest(f"ip tunnel prl prl-default {HOST} dev isatap0 && ip link set isatap0 up && "
              f"ip -6 addr add 2001:db8:5::5efe:{GUEST}/64 dev isatap0")
    host.tunl(f"tunnel add isatap0 mode isatap local {HOST}")
    host.run(f"ip link set isatap0 up && ip -6 addr add 2001:db8:5::5efe:{HOST}/64 dev isatap0")
    time.sleep(2)
    assert f"pdr {HOST}" in rig.guest("ip tunnel show isatap0")
    pings(rig, record, "isatap", host, f"2001:db8:5::5efe:{HOST}", f"2001:db8:5::5efe:{GUEST}")
    tcp(rig, record, "isatap", host, f"2001:db8:5::5efe:{GUEST}")
    fast_path(record, "isatap", host, "isatap0", tx=False, rx=False)
    too_big(rig, record, "isatap", host, "isatap0", f"2001:db8:5::5efe:{GUEST}",
            f"2001:db8:5::5efe:{HOST}")


def test_6rd(interop, record):
    """Two 6rd CEs, prefix 2001:db8::/32 and relay prefix 172.16.0.0/16: 172.16.165.33 owns
    2001:db8:a521::/48, 172.16.165.244 (the guest) 2001:db8:a5f4::/48 (RFC 5969 §4)."""
    rig = interop
    host = rig.node("a", HOST)
    sixrd = "6rd-prefix 2001:db8::/32 6rd-relay_prefix 172.16.0.0/16"
    rig.guest(f"ip tunnel add sit6rd mode sit local {GUEST} ttl 64", undo="ip link del sit6rd")
    rig.guest(f"ip tunnel 6rd dev sit6rd {sixrd} && ip link set sit6rd up && "
              "ip -6 addr add 2001:db8:a5f4::1/32 dev sit6rd")
    host.tunl(f"tunnel add sit6rd mode sit local {HOST} ttl 64")
    host.tunl(f"tunnel 6rd dev sit6rd {sixrd}")
    host.run("ip link set sit6rd up && ip -6 addr add 2001:db8:a521::1/32 dev sit6rd")
    time.sleep(2)
    assert host.tunl("tunnel show sit6rd").stdout.strip() == \
        rig.guest("ip tunnel show sit6rd").strip().replace(f"local {GUEST}", f"local {HOST}")
    pings(rig, record, "6rd", host, "2001:db8:a521::1", "2001:db8:a5f4::1")
    tcp(rig, record, "6rd", host, "2001:db8:a5f4::1")
    fast_path(record, "6rd", host, "sit6rd", tx=False, rx=False)
    too_big(rig, record, "6rd", host, "sit6rd", "2001:db8:a5f4::1", "2001:db8:a521::1")


def test_one_to_many_with_the_kernel_as_one_node(interop, record):
    """The walkthrough's overlay: the guest is B (kernel ipip, its fallback tunl0), A and C
    run tunl; on-link routes on every node, bridges mybr0 as the subnets' gateways."""
    rig = interop
    nodes = {"A": ("172.16.165.33", 1), "B": (GUEST, 2), "C": ("172.16.168.113", 3)}
    hosts = {n: rig.node(n.lower(), addr) for n, (addr, _) in nodes.items() if n != "B"}

    def routes(me):
        return " && ".join(f"ip route add 10.42.{i}.0/24 via {addr} dev tunl0 onlink"
                           for n, (addr, i) in nodes.items() if n != me)
    # the kernel made tunl0 when ipip was loaded: `ip tunnel add tunl0` would say File exists
    rig.guest("ip link add name mybr0 type bridge && ip addr add 10.42.2.1/24 dev mybr0 && "
              "ip link set mybr0 up && ip link set tunl0 up && "
              "ip addr add 10.42.2.0/32 dev tunl0 && " + routes("B"),
              undo="ip link del mybr0; ip link set tunl0 down; ip addr flush dev tunl0; "
                   "ip route flush dev tunl0")
    for n, h in hosts.items():
        i = nodes[n][1]
        h.run(f"ip link add name mybr0 type bridge && ip addr add 10.42.{i}.1/24 dev mybr0 && "
              "ip link set mybr0 up")
        h.tunl("tunnel add tunl0 mode ipip")
        h.run(f"ip link set tunl0 up && ip addr add 10.42.{i}.0/32 dev tunl0 && " + routes(n))
    for n, h in hosts.items():
        i = nodes[n][1]
        pings(rig, record, f"one-to-many {n}<->B", h, f"10.42.{i}.1", "10.42.2.1")
    p = hosts["A"].ping("10.42.3.1", count=2)
    record("one-to-many A<->C", "tunl -> tunl: ping", p.returncode == 0)
    assert p.returncode == 0
    tcp(rig, record, "one-to-many A->B", hosts["A"], "10.42.2.1")
    fast_path(record, "one-to-many A->B", hosts["A"], "tunl0")
    too_big(rig, record, "one-to-many A<->B", hosts["A"], "tunl0", "10.42.2.1", "10.42.1.1")
