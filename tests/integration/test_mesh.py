"""The mesh agent on real hosts: network namespaces on one underlay bridge, agents as real
processes (`tunl mesh agent`), the kernel's routes, ping, and a real registry: a SQLite file,
and a real 3-member etcd cluster. The faults a mesh must ride out, each measured against 2 × TTL or the
2 s of reconvergence."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from ipaddress import IPv4Network

import pytest

import nsutil
from nsutil import TUNL, Host, Net, alive, sh

pytestmark = [pytest.mark.root]

TTL = 3


class Underlay:
    """A bridge in the root namespace, so that a registry listening on its address (etcd here)
    is reachable from every node; nodes are namespaces with an eth0 on it."""

    def __init__(self, net: Net, third: int):
        self.net = net
        self.br = "tlm" + uuid.uuid4().hex[:6]
        self.base = f"172.30.{third}"
        self.gw = f"{self.base}.254"
        sh(f"ip link add {self.br} type bridge && ip addr add {self.gw}/24 dev {self.br} && "
           f"ip link set {self.br} up")

    def node(self, n: int) -> Host:
        h = self.net.host(f"n{n}")
        port = f"{self.br}-{n}"
        sh(f"ip link add {port} type veth peer name eth0 netns {h.ns} && "
           f"ip link set {port} master {self.br} up")
        h.run(f"ip addr add {self.base}.{n}/24 dev eth0 && ip link set eth0 up")
        h.n, h.ip, h.port = n, f"{self.base}.{n}", port
        return h

    def close(self) -> None:
        sh(f"ip link del {self.br}", check=False)


class Agents:
    def __init__(self, url: str, tmp):
        self.url, self.tmp = url, tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, h: Host, extra: str = "") -> subprocess.Popen:
        log = open(os.path.join(self.tmp, f"agent-{h.ns}.log"), "a")
        p = h.popen(f"{TUNL} mesh agent --registry {self.url} --iface eth0 --node n{h.n} "
                    f"--ttl {TTL} --subnet-file {self.tmp}/{h.ns}.env {extra}",
                    stdout=log, stderr=subprocess.STDOUT)
        self.procs[h.ns] = p
        return p

    def log(self, h: Host) -> str:
        with open(os.path.join(self.tmp, f"agent-{h.ns}.log")) as f:
            return f.read()

    def stop(self, h: Host, sig=signal.SIGTERM) -> None:
        p = self.procs.pop(h.ns)
        p.send_signal(sig)
        p.wait(10)

    def close(self) -> None:
        for ns in list(self.procs):
            p = self.procs.pop(ns)
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def mesh_routes(h: Host) -> dict[IPv4Network, str]:
    """The agent's routes on h: subnet -> "via X dev D onlink"."""
    out = {}
    for line in h.run("ip -4 route show proto 116").stdout.splitlines():
        dst, _, rest = line.partition(" ")
        out[IPv4Network(dst)] = rest.replace(" proto 116", "").strip()
    return out


def subnet_of(h: Host) -> IPv4Network:
    addr = h.run("ip -4 -o addr show dev tunl0").stdout.split()[3]
    return IPv4Network(addr.split("/")[0] + "/24")


def wait_for(cond, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(step)


def converged(nodes: list[Host]) -> bool:
    try:
        subnets = {h: subnet_of(h) for h in nodes}
    except (AssertionError, IndexError):
        return False
    for h in nodes:
        want = {subnets[o]: f"via {o.ip} dev tunl0 onlink" for o in nodes if o is not h}
        if mesh_routes(h) != want:
            return False
    return True


@pytest.fixture(scope="module")
def sqlite_mesh(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("mesh"))
    net = Net()
    ul = Underlay(net, 41)
    url = f"sqlite://{tmp}/mesh.db"
    agents = Agents(url, tmp)
    try:
        sh(f"{TUNL} mesh init --registry {url} --network 10.42.0.0/16")
        nodes = [ul.node(n) for n in (1, 2, 3)]
        for h in nodes:
            agents.start(h)
        assert wait_for(lambda: converged(nodes), 20), [mesh_routes(h) for h in nodes]
        yield ul, nodes, agents, url
    finally:
        agents.close()
        net.close()
        ul.close()


def test_every_node_has_the_walkthrough_setup_and_every_pair_pings(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    subnets = [subnet_of(h) for h in nodes]
    assert len(set(subnets)) == 3
    for h, s in zip(nodes, subnets):
        assert f"inet {s.network_address}/32" in h.run("ip -4 addr show dev tunl0").stdout
        assert f"inet {s.network_address + 1}/24" in h.run("ip -4 addr show dev mybr0").stdout
        for o, so in zip(nodes, subnets):
            if o is not h:
                assert mesh_routes(h)[so] == f"via {o.ip} dev tunl0 onlink"
                p = h.ping(str(so.network_address + 1), count=2)
                assert p.returncode == 0, p.stdout


def test_show_lists_nodes_leases_and_routes(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    out = json.loads(nodes[0].tunl(f"-j mesh show --registry {url}").stdout)
    rows = {r["node"]: r for r in out["nodes"]}
    assert set(rows) == {"n1", "n2", "n3"}
    assert rows["n1"]["route"] == "self" and rows["n2"]["route"] == rows["n3"]["route"] == "yes"
    assert rows["n2"]["public_ip"] == nodes[1].ip
    assert 0 < rows["n2"]["expires"] <= TTL
    text = nodes[0].tunl(f"mesh show --registry {url}").stdout
    assert re.search(rf"n3\s+{re.escape(str(subnet_of(nodes[2])))}\s+{nodes[2].ip}\s+\d+s\s+yes",
                     text), text


def test_restarted_agent_keeps_its_subnet_and_others_lose_nothing(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    a, b = nodes[0], nodes[1]
    subnet = subnet_of(a)
    # a route the agent did not make, on its own tunnel device, and a stale one it did make
    a.run(f"ip route add 10.99.0.0/24 via {b.ip} dev tunl0 onlink")
    a.run(f"ip route add 10.42.250.0/24 via 172.30.41.250 dev tunl0 onlink proto 116")
    ping = b.popen(f"ping -n -q -i 0.02 -c 200 {subnet.network_address + 1}",
                   stdout=subprocess.PIPE)
    agents.stop(a)
    agents.start(a)
    out, _ = ping.communicate(timeout=30)
    assert " 0% packet loss" in out, out
    assert wait_for(lambda: IPv4Network("10.42.250.0/24") not in mesh_routes(a), 10)
    assert subnet_of(a) == subnet
    assert "10.99.0.0/24 via" in a.run("ip route show 10.99.0.0/24").stdout
    assert wait_for(lambda: converged(nodes), 10)
    a.run("ip route del 10.99.0.0/24")


def test_garbage_in_the_registry_is_refused_and_logged(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    from tunl.mesh.network import PREFIX
    from tunl.mesh.sqlite import SqliteStore
    store = SqliteStore(url[len("sqlite://"):])
    store.put(PREFIX + "/subnets/10.42.200.0-24", b"{not json")
    store.put(PREFIX + "/subnets/10.77.1.0-24",
              json.dumps({"PublicIP": "172.30.41.77", "BackendType": "ipip"}).encode())
    try:
        assert wait_for(lambda: all("refused" in agents.log(h) and "10.77.1.0" in agents.log(h)
                                    for h in nodes), 5)
        for h in nodes:
            routes = mesh_routes(h)
            assert IPv4Network("10.42.200.0/24") not in routes
            assert IPv4Network("10.77.1.0/24") not in routes
            assert "10.77.1.0/24 is not a /24 of 10.42.0.0/16" in agents.log(h)
        show = nodes[0].tunl(f"mesh show --registry {url}").stdout
        assert "refused" in show and "10.42.200.0-24: not a lease" in show
    finally:
        store.delete(PREFIX + "/subnets/10.42.200.0-24")
        store.delete(PREFIX + "/subnets/10.77.1.0-24")
        store.close()


def test_metrics(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    a = nodes[0]
    agents.stop(a)
    agents.start(a, "--metrics 127.0.0.1:9464")
    assert wait_for(lambda: converged(nodes), 10)

    def scrape():
        p = a.run("python3 -c 'import urllib.request;print(urllib.request.urlopen("
                  "\"http://127.0.0.1:9464/metrics\").read().decode())'", check=False)
        return p.stdout if p.returncode == 0 else ""
    text = wait_for(lambda: "tunl_mesh_peers 2.0" in scrape() and scrape(), 10)
    assert "tunl_mesh_routes_programmed 2.0" in text
    assert "tunl_mesh_registry_up 1.0" in text
    assert "tunl_mesh_members 3.0" in text            # the three nodes, handed to tunld
    assert "tunl_mesh_direct_routes 0.0" in text      # no --cross-subnet
    assert re.search(r"tunl_mesh_reconcile_seconds_count [1-9]", text)
    assert 'tunl_mesh_lease_info{node="n1"' in text
    assert re.search(r'tunl_tunnel_rx_packets_total\{dev="tunl0"\} [1-9]', text), text


def test_dead_node_is_withdrawn_everywhere_within_two_ttl(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    c = nodes[2]
    gone = subnet_of(c)
    agents.stop(c, signal.SIGKILL)
    sh(f"ip link set {c.port} down")          # its host is gone from the underlay
    t0 = time.monotonic()
    ok = wait_for(lambda: all(gone not in mesh_routes(h) for h in nodes[:2]), 2 * TTL + 2)
    took = time.monotonic() - t0
    assert ok and took <= 2 * TTL, f"withdrawn after {took:.1f} s"
    # it comes back, with its subnet
    sh(f"ip link set {c.port} up")
    agents.start(c)
    assert wait_for(lambda: converged(nodes), 10)
    assert subnet_of(c) == gone


def test_leave_releases_and_removes_what_the_agent_made(sqlite_mesh):
    ul, nodes, agents, url = sqlite_mesh
    c = nodes[2]
    subnet = subnet_of(c)
    pid = agents.procs[c.ns].pid
    out = c.tunl("mesh leave").stdout
    agents.procs.pop(c.ns).wait(10)
    assert not alive(pid)
    assert f"released {subnet}" in out
    assert c.run("ip -4 route show proto 116").stdout == ""
    assert c.run("ip link show tunl0", check=False).returncode != 0
    assert c.run("ip link show mybr0", check=False).returncode != 0
    assert wait_for(lambda: all(subnet not in mesh_routes(h) for h in nodes[:2]), 5)
    rows = json.loads(nodes[0].tunl(f"-j mesh show --registry {url}").stdout)["nodes"]
    assert str(subnet) not in {r["subnet"] for r in rows}


# -- etcd ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def etcd_mesh(tmp_path_factory):
    from tunl.lab.etcd import EtcdCluster
    tmp = str(tmp_path_factory.mktemp("etcdmesh"))
    net = Net()
    ul = Underlay(net, 42)
    cluster = EtcdCluster(3, os.path.join(tmp, "etcd"), host=ul.gw)
    agents = None
    try:
        cluster.start()
        agents = Agents(cluster.url, tmp)
        sh(f"{TUNL} mesh init --registry {cluster.url} --network 10.42.0.0/16")
        nodes = [ul.node(n) for n in (1, 2)]
        for h in nodes:
            agents.start(h)
        assert wait_for(lambda: converged(nodes), 20)
        yield cluster, nodes, agents
    finally:
        if agents:
            agents.close()
        cluster.stop()
        net.close()
        ul.close()


def _register(cluster, n: int, ttl: int = 60):
    """A node's lease written straight into etcd (a node with no agent here)."""
    from tunl.mesh.network import Lease
    from tunl.mesh.registry import Registry
    from tunl.mesh.store import open_store
    store, prefix = open_store(cluster.url, time.time)
    reg = Registry(store, prefix)
    subnet = IPv4Network(f"10.42.{n}.0/24")
    lease_id = store.grant(ttl)
    assert store.claim(reg.key(subnet), Lease(subnet, __import__("ipaddress").IPv4Address(
        f"172.30.42.{n}"), "ipip", f"r{n}").to_json(), lease_id, 0)
    return store, lease_id, subnet


def test_etcd_layout_is_flannels(etcd_mesh):
    cluster, nodes, agents = etcd_mesh
    out = sh(f"ETCDCTL_API=3 etcdctl --endpoints {','.join(cluster.client_urls)} "
             "get --prefix /coreos.com/network").stdout.splitlines()
    kv = dict(zip(out[::2], out[1::2]))
    assert json.loads(kv["/coreos.com/network/config"])["Network"] == "10.42.0.0/16"
    s = subnet_of(nodes[0])
    v = json.loads(kv[f"/coreos.com/network/subnets/{s.network_address}-24"])
    assert v["PublicIP"] == nodes[0].ip and v["BackendType"] == "ipip"


def test_etcd_member_killed_changes_nothing(etcd_mesh):
    cluster, nodes, agents = etcd_mesh
    cluster.kill_member(0)
    try:
        store, lease, subnet = _register(cluster, 201)
        assert wait_for(lambda: all(subnet in mesh_routes(h) for h in nodes), 2), \
            "a join did not reach every agent within 2 s with one member dead"
        store.revoke(lease)
        assert wait_for(lambda: all(subnet not in mesh_routes(h) for h in nodes), 2)
        assert nodes[0].ping(str(subnet_of(nodes[1]).network_address + 1)).returncode == 0
    finally:
        cluster.start_member(0)


def test_etcd_down_keeps_forwarding_and_reconverges_within_2s(etcd_mesh):
    cluster, nodes, agents = etcd_mesh
    a, b = nodes
    target = subnet_of(b).network_address + 1
    before = [mesh_routes(h) for h in nodes]
    ping = a.popen(f"ping -n -q -i 0.05 -c 80 {target}", stdout=subprocess.PIPE)
    for i in range(3):
        cluster.stop_member(i)
    time.sleep(TTL + 1)                       # longer than a lease: nothing may be withdrawn
    assert [mesh_routes(h) for h in nodes] == before
    for i in range(3):
        cluster.start_member(i, wait=False)
    cluster.wait_healthy()
    back = time.monotonic()
    store, lease, subnet = _register(cluster, 202)
    ok = wait_for(lambda: all(subnet in mesh_routes(h) for h in nodes), 5)
    took = time.monotonic() - back
    out, _ = ping.communicate(timeout=30)
    assert " 0% packet loss" in out, out
    assert ok and took <= 2.0, f"reconverged {took:.2f} s after etcd's return"
    for h in nodes:
        assert "registry down, keeping every route" in agents.log(h)
    store.revoke(lease)
