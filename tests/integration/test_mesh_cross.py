"""Cross-subnet and masquerade on real hosts: two underlay subnets joined by a router
namespace, agents as real processes (`tunl mesh agent`) on a network made with
`tunl mesh init --cross-subnet`, captures on the wire (tcpdump) proving which pairs are
encapsulated, a node that moves between the subnets, the lease file the CNI plugin reads, and
--ip-masq towards a host outside the overlay."""
from __future__ import annotations

import subprocess
import time


import pytest

from nsutil import TUNL, Host, Net
from test_mesh import Agents, mesh_routes, subnet_of, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]

SEG = {1: "172.31.1", 2: "172.31.2"}
OUTSIDE = "172.31.2.50"


def attach(r: Host, h: Host, seg: int, last: int) -> None:
    port = "p-" + h.ns.rsplit("-", 1)[-1]
    r.run(f"ip link add {port} type veth peer name eth0 netns {h.ns} && "
          f"ip link set {port} master s{seg} up")
    h.run(f"ip addr add {SEG[seg]}.{last}/24 dev eth0 && ip link set eth0 up && "
          f"ip route add default via {SEG[seg]}.254")
    h.ip, h.port = f"{SEG[seg]}.{last}", port


def move(r: Host, h: Host, seg: int, last: int) -> None:
    """Re-address h into segment `seg`: its port moves to that segment's bridge."""
    r.run(f"ip link set {h.port} master s{seg}")
    h.run(f"ip addr flush dev eth0 && ip addr add {SEG[seg]}.{last}/24 dev eth0 && "
          f"ip route replace default via {SEG[seg]}.254")
    h.ip = f"{SEG[seg]}.{last}"


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cross"))
    net = Net()
    url = f"sqlite://{tmp}/mesh.db"
    agents = Agents(url, tmp)
    try:
        r = net.host("r")
        r.run("sysctl -qw net.ipv4.ip_forward=1")
        for seg, base in SEG.items():
            # a bridge's own MAC is its lowest port's unless set: a port that moves would
            # change it under the hosts' ARP caches
            r.run(f"ip link add s{seg} address 02:00:00:00:00:0{seg} type bridge && "
                  f"ip addr add {base}.254/24 dev s{seg} && ip link set s{seg} up")
        a, b, c, x = (net.host(n) for n in ("a", "b", "c", "x"))
        attach(r, a, 1, 2)
        attach(r, b, 1, 3)
        attach(r, c, 2, 2)
        attach(r, x, 2, 50)
        subprocess.run(f"{TUNL} mesh init --registry {url} --network 10.42.0.0/16 "
                       "--cross-subnet", shell=True, check=True, capture_output=True)
        for n, h in enumerate((a, b, c), 1):
            h.n = n
            agents.start(h, "--resync 1" + (" --ip-masq" if h is a else ""))
        nodes = [a, b, c]
        assert wait_for(lambda: all(len(mesh_routes(h)) == 2 for h in nodes), 20), \
            [agents.log(h) for h in nodes]
        yield r, nodes, x, agents, tmp
    finally:
        agents.close()
        net.close()


def route(h: Host, to: Host) -> str:
    return mesh_routes(h).get(subnet_of(to), "")


def on_wire(capture: Host, filt: str, action) -> int:
    """How many packets matching `filt` cross capture's eth0 while `action` runs."""
    p = capture.popen(f"tcpdump -l -n -i eth0 {filt}", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:      # tcpdump says "listening on" once it is
            line = p.stderr.readline()
            if "listening on" in line:
                break
        action()
        time.sleep(0.3)
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=5)
    return len([ln for ln in out.splitlines() if ln.strip()])


def gw(h: Host) -> str:
    return str(subnet_of(h).network_address + 1)


def test_same_subnet_peers_route_directly_the_others_through_the_tunnel(cross):
    r, (a, b, c), x, agents, tmp = cross
    assert route(a, b) == f"via {b.ip} dev eth0"
    assert route(b, a) == f"via {a.ip} dev eth0"
    assert route(a, c) == f"via {c.ip} dev tunl0 onlink"
    assert route(c, a) == f"via {a.ip} dev tunl0 onlink"
    show = a.tunl(f"mesh show --registry sqlite://{tmp}/mesh.db").stdout
    assert "cross-subnet" in show.splitlines()[0]
    assert "direct eth0" in show and " yes" in show


def test_captures_show_which_pairs_are_encapsulated(cross):
    r, (a, b, c), x, agents, tmp = cross
    ping_b = lambda: a.run(f"ping -n -c 3 -i 0.1 -W 2 -I {gw(a)} {gw(b)}")
    assert on_wire(b, f"icmp and src {gw(a)} and dst {gw(b)}", ping_b) >= 3
    assert on_wire(b, "ip proto 4", ping_b) == 0
    ping_c = lambda: a.run(f"ping -n -c 3 -i 0.1 -W 2 -I {gw(a)} {gw(c)}")
    assert on_wire(c, f"ip proto 4 and src {a.ip} and dst {c.ip}", ping_c) >= 3
    assert on_wire(c, f"icmp and src {gw(a)} and not ip proto 4", ping_c) == 0


def test_a_node_that_moves_subnet_is_rerouted_everywhere(cross):
    r, (a, b, c), x, agents, tmp = cross
    subnet = subnet_of(b)
    move(r, b, 2, 3)
    try:
        assert wait_for(lambda: route(a, b) == f"via {b.ip} dev tunl0 onlink" and
                        route(c, b) == f"via {b.ip} dev eth0" and
                        route(b, c) == f"via {c.ip} dev eth0" and
                        route(b, a) == f"via {a.ip} dev tunl0 onlink", 10), \
            (mesh_routes(a), mesh_routes(b), mesh_routes(c), agents.log(b))
        assert subnet_of(b) == subnet                 # it kept its subnet
        assert a.ping(gw(b), extra=f"-I {gw(a)}").returncode == 0
        assert c.ping(gw(b), extra=f"-I {gw(c)}").returncode == 0
    finally:
        move(r, b, 1, 3)
    assert wait_for(lambda: route(a, b) == f"via {b.ip} dev eth0", 10)


def test_the_lease_file_is_written_for_the_cni_plugin(cross):
    r, (a, b, c), x, agents, tmp = cross
    with open(f"{tmp}/{a.ns}.env") as f:
        env = dict(line.split("=", 1) for line in f.read().split())
    s = subnet_of(a)
    mtu = a.run("cat /sys/class/net/tunl0/mtu").stdout.strip()
    assert env == {"TUNL_NETWORK": "10.42.0.0/16", "TUNL_SUBNET": f"{s.network_address + 1}/24",
                   "TUNL_MTU": mtu, "TUNL_IPMASQ": "true", "TUNL_BRIDGE": "mybr0"}
    assert mtu == "1480"
    with open(f"{tmp}/{b.ns}.env") as f:
        assert "TUNL_IPMASQ=false" in f.read()


def test_ip_masq_lets_the_overlay_reach_a_host_outside_it(cross):
    r, (a, b, c), x, agents, tmp = cross
    # x has no route to 10.42.0.0/16: only a masqueraded packet gets an answer
    assert a.ping(OUTSIDE, extra=f"-I {gw(a)}").returncode == 0
    assert b.ping(OUTSIDE, extra=f"-I {gw(b)}").returncode != 0
    seen = on_wire(x, f"icmp and src {a.ip}",
                   lambda: a.ping(OUTSIDE, count=2, extra=f"-I {gw(a)}"))
    assert seen >= 2
    assert "masquerade" in a.run("nft list table ip tunl_masq").stdout
    assert b.run("nft list table ip tunl_masq", check=False).returncode != 0
    # inside the overlay nothing is rewritten
    assert on_wire(c, f"ip proto 4 and src {a.ip}",
                   lambda: a.ping(gw(c), extra=f"-I {gw(a)}")) >= 1
