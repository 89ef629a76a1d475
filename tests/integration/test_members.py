"""Only members of the overlay send into it. A member host (tunl0 without remote, a /32 on it,
its overlay subnet on a bridge), a second member, and a third host on the same underlay
that is no node of the overlay: with the member set {member2}, member2 gets through, and what
the outsider forges (IPIP, GRE, sit) at the member's overlay address is not delivered, and is
counted as not_member; a wider set lets it in, None lets anyone in; a tunld killed and
restarted goes on dropping from its first packet. On both data planes.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
import uuid

import pytest

from nsutil import Host, Net, alive

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

TUNLD = os.path.join(os.path.dirname(sys.executable), "tunld")
M1, M2, OUT = "172.16.77.1", "172.16.77.2", "172.16.77.3"
PORT, METRICS = 5555, 9466
LISTEN = """import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", %d))
f = open(sys.argv[1], "ab", 0)
while True:
    f.write(s.recv(2048) + b"\\n")
""" % PORT


class MembersNet(Net):
    def __init__(self):
        super().__init__()
        self.prefix = f"tlmo-{uuid.uuid4().hex[:6]}-"


class Overlay:
    """m1 and m2 are nodes of the overlay (subnets 10.4x.1.0/24 and 10.4x.2.0/24), out is
    not; `got` is the file where m1's listener writes what reached its overlay address."""

    def __init__(self, net: MembersNet, mode: str, tmp, metrics: bool = False):
        self.net, self.mode = net, mode
        self.dev = "tunl0" if mode == "ipip" else "gre1"
        self.o = "42" if mode == "ipip" else "43"
        self.m1, self.m2, self.out = net.host("m1"), net.host("m2"), net.host("out")
        net.underlay({self.m1: f"{M1}/16", self.m2: f"{M2}/16", self.out: f"{OUT}/16"})
        if metrics:
            self.m1.popen(f"{TUNLD} --metrics 127.0.0.1:{METRICS}")
            time.sleep(0.5)
        for h, mine, theirs, peer in ((self.m1, 1, 2, M2), (self.m2, 2, 1, M1)):
            h.tunl(f"tunnel add {self.dev} mode {mode}")
            h.run(f"ip link set {self.dev} up && ip addr add 10.{self.o}.{mine}.0/32 dev "
                  f"{self.dev} && ip link add ov0 type bridge && ip link set ov0 up && "
                  f"ip addr add 10.{self.o}.{mine}.1/24 dev ov0 && "
                  f"ip addr add fd{self.o}:{mine}::1/64 dev ov0 nodad && "
                  f"ip route add 10.{self.o}.{theirs}.0/24 via {peer} dev {self.dev} onlink")
        self.got = tmp / f"got-{mode}"
        self.got.write_bytes(b"")
        self.m1.popen(f"{sys.executable} -c {shlex.quote(LISTEN)} {self.got}")
        time.sleep(0.3)
        self.n = 0

    def members(self, addrs) -> None:
        """The member set of m1's tunnel, through the data-plane interface."""
        arg = "None" if addrs is None else f"frozenset(map(IPv4Address, {sorted(addrs)!r}))"
        code = ("from ipaddress import IPv4Address\n"
                "from tunl.planes.tunld import TunldPlane\n"
                f"TunldPlane().members({self.dev!r}, {arg})\n")
        self.m1.run(f"{sys.executable} -c {shlex.quote(code)}")

    def forge(self, kind: str) -> bytes:
        """The outsider sends m1 an outer packet of `kind` (ipip, gre, sit) whose inner packet
        is a UDP datagram from member2's overlay subnet to m1's listener; its marker."""
        from scapy.layers.inet import IP, UDP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import GRE
        self.n += 1
        marker = f"{kind}-{self.n}-{uuid.uuid4().hex[:6]}".encode()
        udp = UDP(sport=4444, dport=PORT) / marker
        inner4 = IP(src=f"10.{self.o}.2.77", dst=f"10.{self.o}.1.1") / udp
        if kind == "ipip":
            self.out.send_raw(4, M1, [bytes(inner4)])
        elif kind == "gre":
            self.out.send_raw(47, M1, [bytes(GRE(proto=0x0800) / inner4)])
        else:
            self.out.send_raw(41, M1, [bytes(IPv6(src=f"fd{self.o}:2::77",
                                                   dst=f"fd{self.o}:1::1") / udp)])
        return marker

    def delivered(self, marker: bytes, wait: float = 1.0) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if marker in self.got.read_bytes():
                return True
            time.sleep(0.05)
        return marker in self.got.read_bytes()

    def not_member(self) -> int:
        return self.m1.counters(self.dev)["rx_drop"].get("not_member", 0)

    def ping_from_m2(self, count: int = 2):
        return self.m2.ping(f"10.{self.o}.1.1", count=count)


@pytest.fixture
def net():
    n = MembersNet()
    try:
        yield n
    finally:
        n.close()


def scrape(h: Host) -> str:
    p = h.run("python3 -c 'import urllib.request;print(urllib.request.urlopen("
              f"\"http://127.0.0.1:{METRICS}/metrics\").read().decode())'", check=False)
    return p.stdout if p.returncode == 0 else ""


def test_only_members_send_into_the_overlay(net, tmp_path, dataplane):
    ov = Overlay(net, "ipip", tmp_path, metrics=True)
    assert ov.ping_from_m2().returncode == 0                 # anyone, before a set is given
    assert ov.delivered(ov.forge("ipip")), "the outsider's packet should pass without a set"
    assert ov.m1.tunnels()[0]["members"] is None
    assert "members" not in ov.m1.tunl("-d tunnel show").stdout

    ov.members({M2})
    assert ov.ping_from_m2().returncode == 0, "a member must get through"
    before, slow = ov.not_member(), (ov.m1.tunnels()[0].get("ebpf") or {}).get("slow_rx")
    forged = [ov.forge("ipip") for _ in range(3)]
    assert not any(ov.delivered(m, wait=0.5) for m in forged)
    after = ov.not_member()
    if dataplane == "ebpf":                                   # dropped by the program itself
        assert ov.m1.tunnels()[0]["ebpf"]["slow_rx"] == slow
    print(f"\n{dataplane}: {after - before} forged IPIP packets counted as not_member")
    assert after - before == 3
    for kind in ("gre", "sit"):                               # other outer protocols: no way in
        assert not ov.delivered(ov.forge(kind), wait=0.5), kind
    st = ov.m1.tunnels()[0]
    assert st["members"] == 1 and st["dataplane"] == dataplane
    assert re.search(r"^  dataplane \S+ members 1\b", ov.m1.tunl("-d tunnel show").stdout, re.M)
    assert f"not_member={after}" in ov.m1.tunl("-s tunnel show").stdout
    # iproute2's line is unchanged without -d
    assert ov.m1.tunl("tunnel show").stdout.strip() == \
        "tunl0: ip/ip remote any local any ttl inherit"
    text = scrape(ov.m1)
    assert f'tunl_tunnel_drops_total{{dev="tunl0",dir="rx",reason="not_member"}} {after}.0' \
        in text, text
    assert 'tunl_tunnel_members{dev="tunl0"} 1.0' in text

    ov.members({M2, OUT})                                     # the outsider joins
    assert ov.delivered(ov.forge("ipip")), "a member's packet must be delivered"
    assert ov.ping_from_m2().returncode == 0
    ov.members(set())                                         # no one
    assert ov.ping_from_m2().returncode != 0
    assert not ov.delivered(ov.forge("ipip"), wait=0.5)
    ov.members(None)                                          # anyone again
    assert ov.delivered(ov.forge("ipip"))
    assert ov.ping_from_m2().returncode == 0
    assert ov.m1.tunnels()[0]["members"] is None
    assert ov.not_member() == after + 3              # two pings and one forged packet


def test_a_restarted_tunld_goes_on_dropping_from_its_first_packet(net, tmp_path):
    ov = Overlay(net, "ipip", tmp_path)
    ov.members({M2})
    assert ov.ping_from_m2().returncode == 0
    pid = ov.m1.tunld_pid()
    os.kill(pid, signal.SIGKILL)
    # while the supervisor starts the next one, and right after
    forged = []
    deadline = time.monotonic() + 10
    new = None
    while time.monotonic() < deadline:
        forged.append(ov.forge("ipip"))
        p = ov.m1.tunl("-j daemon status", check=False)
        if p.returncode == 0 and json.loads(p.stdout)["pid"] != pid:
            new = json.loads(p.stdout)["pid"]
            break
    assert new and new != pid and not alive(pid)
    before = ov.not_member()
    forged += [ov.forge("ipip") for _ in range(3)]
    assert not any(ov.delivered(m, wait=0.3) for m in forged), "a restart opened the door"
    assert ov.not_member() - before == 3
    assert ov.m1.tunnels()[0]["members"] == 1
    deadline = time.monotonic() + 5
    while ov.ping_from_m2(1).returncode != 0 and time.monotonic() < deadline:
        pass
    assert ov.ping_from_m2().returncode == 0, "the member must get through after the restart"
    # deleting the tunnel forgets its set: a new one takes packets from anyone
    ov.m1.tunl("tunnel del tunl0")
    ov.m1.tunl("tunnel add tunl0 mode ipip")
    ov.m1.run(f"ip link set tunl0 up && ip addr add 10.42.1.0/32 dev tunl0 && "
              f"ip route add 10.42.2.0/24 via {M2} dev tunl0 onlink")
    assert ov.m1.tunnels()[0]["members"] is None
    assert ov.delivered(ov.forge("ipip"), wait=2)


def test_a_gre_tunnel_takes_only_its_members(net, tmp_path, dataplane):
    ov = Overlay(net, "gre", tmp_path)
    ov.members({M2})
    assert ov.ping_from_m2().returncode == 0
    before = ov.not_member()
    forged = [ov.forge("gre") for _ in range(2)]
    assert not any(ov.delivered(m, wait=0.5) for m in forged)
    print(f"\n{dataplane}: {ov.not_member() - before} forged GRE packets counted as not_member")
    assert ov.not_member() - before == 2
    assert not ov.delivered(ov.forge("ipip"), wait=0.5)      # no ipip tunnel here at all
    ov.members(None)
    assert ov.delivered(ov.forge("gre"))


def test_the_op_refuses_a_bad_address_with_one_line(net, tmp_path):
    ov = Overlay(net, "ipip", tmp_path)
    code = ("from tunl.daemon import client\n"
            "client.call('members', name='tunl0', addrs=['172.16.77.2', '172.16.77.300'])\n")
    p = ov.m1.run(f"{sys.executable} -c {shlex.quote(code)}", check=False)
    assert p.returncode != 0
    assert 'members "172.16.77.300": not an IPv4 address' in p.stderr
    code = "from tunl.daemon import client\nclient.call('members', name='nosuch', addrs=None)\n"
    p = ov.m1.run(f"{sys.executable} -c {shlex.quote(code)}", check=False)
    assert 'members tunnel "nosuch" failed: No such device' in p.stderr
    p = ov.m1.run(f"setpriv --reuid=65534 --regid=65534 --clear-groups {sys.executable} -c "
                  + shlex.quote("from tunl.daemon import client\n"
                                "client.call('members', name='tunl0', addrs=None)\n"),
                  check=False)
    assert p.returncode != 0 and "needs root" in p.stderr + p.stdout, p.stderr
    assert ov.m1.tunnels()[0]["members"] is None
