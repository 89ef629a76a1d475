"""Each mode between tunl's userspace data plane (host side) and the Linux kernel (guest),
built on both sides with the same `ip tunnel` words: pings both ways, a TCP stream whose
SHA-256 is compared, and the same answer to a packet too big for the tunnel."""
from __future__ import annotations

import hashlib
import random
import shlex
import time

import pytest

from conftest import GUEST

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
    rig.guest(f"rm -f /tmp/sink.out; python3 -c {shlex.quote(SINK)} {guest_in} "
              "> /tmp/sink.out 2>&1 &")
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
        digest = rig.guest("cat /tmp/sink.out", check=False).strip()
        if digest:
            break
        time.sleep(0.1)
    ok = digest == hashlib.sha256(PAYLOAD).hexdigest()
    record(case, f"tunl -> kernel: TCP 2 MB {dst}", ok, "" if ok else f"got {digest[:16]!r}")
    assert ok


def too_big(rig, record, case, host, dev, guest_in, host_in):
    """ping -M do one byte over the tunnel MTU from each side: the same local answer."""
    mtu_g = int(rig.guest(f"cat /sys/class/net/{dev}/mtu").strip())
    mtu_h = int(host.run(f"cat /sys/class/net/{dev}/mtu").stdout.strip())
    hdr = 48 if ":" in guest_in else 28
    size = mtu_g - hdr + 1
    out_g = rig.guest(f"ping -n -c 1 -W 1 -M do -s {size} {host_in}", check=False)
    p = host.ping(guest_in, extra=f"-M do -s {size}")
    out_h = p.stdout + p.stderr
    ok = mtu_g == mtu_h and f"mtu={mtu_g}" in out_g and f"mtu={mtu_h}" in out_h
    record(case, f"too big (mtu {mtu_g} / {mtu_h})", ok)
    assert mtu_g == mtu_h, f"kernel {dev} mtu {mtu_g}, tunl {mtu_h}"
    assert f"mtu={mtu_g}" in out_g, out_g
    assert f"mtu={mtu_h}" in out_h, out_h


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
    too_big(rig, record, "ipip", host, "ipip1", "10.60.1.2", "10.60.1.1")
