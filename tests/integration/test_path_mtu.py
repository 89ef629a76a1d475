"""Path MTU as the kernel's tnl_update_pmtu() does it: a packet that no longer fits the path
(the underlay MTU lowered under the tunnel, a tunnel MTU set too high) gets ICMP fragmentation
needed or Packet Too Big with the MTU inside the tunnel, an IPv4 packet without DF is
fragmented, and a TCP stream survives the underlay MTU dropping under it. What is asserted is
what ping and TCP see, and tunl's counters.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import time

import pytest

from nsutil import A_UL, B_UL, Host, Net, one_to_one

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)


@pytest.fixture
def link():
    """The one-to-one tunnel, plus sit between the same hosts; set_mtu() changes the underlay
    MTU along the whole path (both hosts' eth0 and the bridge ports)."""
    net = Net()
    try:
        a, b = one_to_one(net)
        ul = Host(next(n for n in net.names if n.endswith("-ul")))
        for h, me, peer, mine, theirs in ((a, A_UL, B_UL, "1", "2"), (b, B_UL, A_UL, "2", "1")):
            h.tunl(f"tunnel add sit1 mode sit remote {peer} local {me}")
            h.run(f"ip link set sit1 up && ip addr add 2001:db8:{mine}::1/64 dev sit1 nodad && "
                  f"ip route add 2001:db8:{theirs}::/64 dev sit1")

        def set_mtu(mtu: int) -> None:
            for h in (a, b):
                h.run(f"ip link set eth0 mtu {mtu}")
            for port in ul.run("ip -o link show master br0").stdout.splitlines():
                name = port.split(":")[1].strip().split("@")[0]
                ul.run(f"ip link set {name} mtu {mtu}")
        assert_answers(a, "10.42.2.1")
        yield a, b, set_mtu
    finally:
        net.close()


def assert_answers(h, dst: str, extra: str = "") -> None:
    deadline = time.monotonic() + 5
    while h.ping(dst, extra=extra).returncode != 0:
        assert time.monotonic() < deadline, f"no answer from {dst} {extra}"


def told_mtu(h, dst: str, size: int, ping: str = "ping") -> int | None:
    """The MTU ping reports for a DF packet of `size` bytes of payload (from the ICMP answer
    or, once the kernel has learned it, from its own route cache)."""
    r = h.run(f"{ping} -n -c 2 -i 0.3 -W 1 -M do -s {size} {dst}", check=False)
    m = re.search(r"mtu ?[=:] ?(\d+)", r.stdout + r.stderr)
    return int(m.group(1)) if m else None


def drops(h, name: str) -> dict:
    return h.counters(name)["tx_drop"]


def test_a_lowered_underlay_mtu_is_answered_with_fragmentation_needed(link):
    a, _, set_mtu = link
    set_mtu(1400)
    assert told_mtu(a, "10.42.2.1", 1400) == 1380
    d = drops(a, "tunl0")
    assert d.get("too_big", 0) >= 1 and d.get("send_failed", 0) == 0, d
    # what fits the new path still goes through
    assert_answers(a, "10.42.2.1", "-M do -s 1352")


def test_a_lowered_underlay_mtu_is_answered_with_packet_too_big_for_ipv6(link):
    a, _, set_mtu = link
    set_mtu(1400)
    assert told_mtu(a, "2001:db8:2::1", 1400, ping="ping -6") == 1380
    d = drops(a, "sit1")
    assert d.get("packet_too_big", 0) >= 1 and d.get("send_failed", 0) == 0, d


def test_a_tunnel_mtu_set_above_the_path_is_answered_with_the_path_mtu(link):
    a, _, _ = link
    a.run("ip link set tunl0 mtu 9000")
    assert told_mtu(a, "10.42.2.1", 2000) == 1480
    assert drops(a, "tunl0").get("send_failed", 0) == 0


def test_ipv4_without_df_is_fragmented_to_fit_the_path(link):
    a, b, set_mtu = link
    set_mtu(1400)
    assert_answers(a, "10.42.2.1", "-M dont -s 3000")
    a.run("ip link set tunl0 mtu 9000")
    assert_answers(a, "10.42.2.1", "-M dont -s 8000")
    assert drops(a, "tunl0").get("send_failed", 0) == 0


def test_the_largest_inner_packets_are_answered_not_a_traceback(link):
    """Inner packets of 65516–65535 bytes do not fit behind a 20-byte outer header."""
    a, _, _ = link
    pid = a.tunld_pid()
    a.run("ip link set tunl0 mtu 65535")
    assert told_mtu(a, "10.42.2.1", 65507) == 1480
    assert_answers(a, "10.42.2.1", "-M dont -s 65507")
    assert "internal_error" not in drops(a, "tunl0")
    assert a.tunld_pid() == pid


def test_a_tcp_stream_completes_when_the_underlay_mtu_drops_under_it(link):
    a, b, set_mtu = link
    data = random.Random(11).randbytes(30 * 1000 * 1000)
    src = f"/tmp/{a.ns}-payload"
    with open(src, "wb") as f:
        f.write(data)
    try:
        sink = b.popen("python3 -c 'import socket,hashlib\n"
                       "s=socket.create_server((\"10.42.2.1\",5556));c,_=s.accept();"
                       "h=hashlib.sha256()\n"
                       "while (d:=c.recv(1<<16)): h.update(d)\n"
                       "print(h.hexdigest())'", stdout=-1)
        time.sleep(0.5)
        # a paced sender (about 15 MB/s), so that the MTU drops in the middle of the stream
        sender = a.popen(f"python3 -c 'import socket,time\n"
                         f"s=socket.create_connection((\"10.42.2.1\",5556));f=open(\"{src}\",\"rb\")\n"
                         "while (d:=f.read(1<<15)): s.sendall(d); time.sleep(0.002)\n"
                         "s.close()'")
        time.sleep(0.7)
        assert sender.poll() is None, "the stream ended before the MTU dropped"
        set_mtu(1400)
        assert sender.wait(timeout=120) == 0
        got, _ = sink.communicate(timeout=60)
        assert got.strip() == hashlib.sha256(data).hexdigest()
        assert drops(a, "tunl0").get("too_big", 0) >= 1
    finally:
        os.unlink(src)


def test_without_pmtudisc_the_outer_packet_is_fragmented_as_the_kernel_sends_it(link):
    """nopmtudisc: no DF outside (for inner packets without DF), so a packet that does not
    fit the path leaves in outer fragments (ip_do_fragment()), the inner packet whole."""
    a, b, set_mtu = link
    for h in (a, b):
        h.tunl("tunnel change tunl0 nopmtudisc")
    set_mtu(1400)
    cap = b.popen("tcpdump -n -v -l -c 2 -i eth0 ip proto 4 and src " + A_UL, stdout=-1,
                  stderr=-1)
    time.sleep(1)
    assert_answers(a, "10.42.2.1", "-M dont -s 1450")
    out, _ = cap.communicate(timeout=10)
    # the first outer fragment carries the inner header; both have the outer's id, no DF
    assert "flags [+]" in out and "proto IPIP (4), length 1396" in out, out
    assert "[DF]" not in out, out
    assert drops(a, "tunl0").get("send_failed", 0) == 0
