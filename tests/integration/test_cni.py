"""tunl-cni as a container runtime runs it: two mesh nodes in network namespaces, each with a
real `tunl mesh agent --subnet-file` on SQLite; `tunl-cni` run in a node's namespace with the
CNI_* environment and the configuration on stdin, the reference plugins (bridge, host-local)
from /usr/lib/cni as its delegates, containers as namespaces of their own. ADD, a ping from a
container on one node to one on the other through the overlay, CHECK, DEL that leaves
nothing behind, GC of a stale attachment, STATUS, and bad input as CNI error results."""
from __future__ import annotations

import json
import os
import shlex
import uuid
from ipaddress import IPv4Interface, IPv4Network

import pytest

import nsutil
from nsutil import TUNL, Host, Net, sh
from test_mesh import Agents, Underlay, converged, subnet_of, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]

BIN = os.path.dirname(TUNL)
CNI = os.path.join(BIN, "tunl-cni")
CNI_PATH = f"/usr/lib/cni:{BIN}"
NETWORK = "tunl"


class Node:
    """A mesh node, the files of its agent and of its CNI plugin, and the calls a runtime
    makes."""

    def __init__(self, h: Host, tmp: str):
        self.h, self.n, self.ip = h, h.n, h.ip
        self.dir = os.path.join(tmp, f"n{h.n}")
        os.makedirs(self.dir, exist_ok=True)
        self.subnet_file = os.path.join(self.dir, "subnet.env")
        self.data_dir = os.path.join(self.dir, "cni")
        self.ipam_dir = os.path.join(self.dir, "ipam")

    def config(self, version: str = "1.0.0", **kw) -> dict:
        return {"cniVersion": version, "name": NETWORK, "type": "tunl-cni",
                "subnetFile": self.subnet_file, "dataDir": self.data_dir,
                "ipam": {"dataDir": self.ipam_dir}, **kw}

    def cni(self, command: str, config: dict | bytes, cid: str | None = None,
            ctr: Host | None = None, ifname: str | None = "eth0"):
        """Run tunl-cni in this node's namespace: (exit status, stdout as JSON or None,
        stderr)."""
        raw = config if isinstance(config, bytes) else json.dumps(config).encode()
        f = os.path.join(self.dir, f"stdin-{uuid.uuid4().hex[:8]}.json")
        with open(f, "wb") as out:
            out.write(raw)
        env = [f"CNI_COMMAND={command}", f"CNI_PATH={CNI_PATH}"]
        if cid:
            env.append(f"CNI_CONTAINERID={cid}")
        if ctr:
            env.append(f"CNI_NETNS=/run/netns/{ctr.ns}")
        if cid and ifname:
            env.append(f"CNI_IFNAME={ifname}")
        try:
            p = self.h.run(f"env {' '.join(env)} {CNI} < {shlex.quote(f)}", check=False)
        finally:
            os.unlink(f)
        assert "Traceback" not in p.stderr, p.stderr
        return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None), p.stderr

    def env(self) -> dict[str, str]:
        with open(self.subnet_file) as f:
            return dict(line.split("=", 1) for line in f.read().split())

    def saved(self, cid: str, ifname: str = "eth0") -> str:
        return os.path.join(self.data_dir, f"{cid}-{ifname}")

    def reservation(self, ip: str) -> str:
        return os.path.join(self.ipam_dir, NETWORK, ip)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dataplane):
    tmp = str(tmp_path_factory.mktemp("cni"))
    net = Net()
    net.prefix = f"tlcni-{uuid.uuid4().hex[:4]}-"
    ul = Underlay(net, 47)
    url = f"sqlite://{tmp}/mesh.db"
    agents = Agents(url, tmp)
    try:
        sh(f"{TUNL} mesh init --registry {url} --network 10.42.0.0/16")
        hosts = [ul.node(n) for n in (1, 2)]
        nodes = [Node(h, tmp) for h in hosts]
        for node in nodes:
            agents.start(node.h, f"--subnet-file {node.subnet_file}")
        assert wait_for(lambda: converged(hosts) and all(os.path.exists(n.subnet_file)
                                                          for n in nodes), 20), \
            [agents.log(h) for h in hosts]
        yield net, nodes
    finally:
        agents.close()
        net.close()
        ul.close()


def container(net: Net, name: str) -> Host:
    return net.host(name)


def add(node: Node, net: Net, name: str, version: str = "1.0.0") -> tuple[Host, str, dict]:
    ctr = container(net, name)
    cid = f"{name}-{uuid.uuid4().hex[:8]}"
    status, result, err = node.cni("ADD", node.config(version), cid, ctr)
    assert status == 0, (result, err)
    return ctr, cid, result


def host_veth(result: dict) -> str:
    return next(i["name"] for i in result["interfaces"]
                if not i.get("sandbox") and i["name"].startswith("veth"))


def test_add_addresses_containers_from_the_lease_and_they_ping_across_nodes(cluster):
    net, nodes = cluster
    ctrs = []
    for node in nodes:
        ctr, cid, result = add(node, net, f"c{node.n}")
        env = node.env()
        lease = IPv4Interface(env["TUNL_SUBNET"])
        assert lease.network == subnet_of(node.h)
        assert result["cniVersion"] == "1.0.0"
        (ip,) = result["ips"]
        addr = IPv4Interface(ip["address"])
        assert addr.network == lease.network and addr.ip != lease.ip
        assert ip["gateway"] == str(lease.ip)
        eth0 = result["interfaces"][ip["interface"]]
        assert eth0["name"] == "eth0" and eth0["sandbox"] == f"/run/netns/{ctr.ns}"
        mtu = int(ctr.run("cat /sys/class/net/eth0/mtu").stdout)
        assert mtu == int(env["TUNL_MTU"]) == int(node.h.run(
            "cat /sys/class/net/tunl0/mtu").stdout)
        assert f"master {env['TUNL_BRIDGE']}" in node.h.run(
            f"ip -o link show {host_veth(result)}").stdout
        routes = ctr.run("ip -4 route show").stdout
        assert f"default via {lease.ip} dev eth0" in routes
        assert f"{env['TUNL_NETWORK']} via {lease.ip} dev eth0" in routes
        assert os.stat(node.saved(cid)).st_mode & 0o777 == 0o600
        assert os.path.exists(node.reservation(str(addr.ip)))
        ctrs.append((node, ctr, cid, result, addr))
    (n1, c1, cid1, r1, a1), (n2, c2, cid2, r2, a2) = ctrs
    p = c1.ping(str(a2.ip), count=3)
    assert p.returncode == 0, p.stdout + p.stderr
    p = c2.ping(str(a1.ip), count=3)
    assert p.returncode == 0, p.stdout + p.stderr
    # CHECK with the ADD's result, as a runtime does
    for node, ctr, cid, result, _ in ctrs:
        status, out, err = node.cni("CHECK", node.config(prevResult=result), cid, ctr)
        assert (status, out) == (0, None), (out, err)
    # and after the eth0 is gone, CHECK says so (the bridge plugin's own check)
    c1.run("ip link del eth0")
    status, out, _ = n1.cni("CHECK", n1.config(prevResult=r1), cid1, c1)
    assert status != 0 and out["code"] and out["msg"], out


def test_del_leaves_nothing_behind_and_is_idempotent(cluster):
    net, nodes = cluster
    node = nodes[0]
    ctr, cid, result = add(node, net, "cdel")
    veth = host_veth(result)
    ip = result["ips"][0]["address"].split("/")[0]
    assert os.path.exists(node.saved(cid)) and os.path.exists(node.reservation(ip))
    # DEL works from the saved configuration: subnet.env is not read
    status, out, err = node.cni("DEL", node.config(subnetFile="/nonexistent/subnet.env"),
                                cid, ctr)
    assert (status, out) == (0, None), (out, err)
    assert node.h.run(f"ip link show {veth}", check=False).returncode != 0
    assert veth not in node.h.run("ip -o link show type veth").stdout
    assert ctr.run("ip link show eth0", check=False).returncode != 0
    assert not os.path.exists(node.reservation(ip))
    assert not os.path.exists(node.saved(cid))
    assert node.cni("DEL", node.config(), cid, ctr)[:2] == (0, None)
    assert node.cni("DEL", node.config(), cid)[:2] == (0, None)        # without a netns too
    # and the address is handed out again
    status, again, err = node.cni("ADD", node.config(), cid, ctr)
    assert status == 0, (again, err)
    assert node.cni("DEL", node.config(), cid, ctr)[:2] == (0, None)


def test_add_in_1_1_0_over_plugins_that_speak_1_0_0(cluster):
    net, nodes = cluster
    node = nodes[1]
    ctr, cid, result = add(node, net, "cnew", version="1.1.0")
    assert result["cniVersion"] == "1.1.0"
    with open(node.saved(cid)) as f:
        assert json.load(f)["delegate"]["cniVersion"] == "1.0.0"
    status, out, err = node.cni("CHECK", node.config("1.1.0", prevResult=result), cid, ctr)
    assert (status, out) == (0, None), (out, err)
    assert node.cni("DEL", node.config("1.1.0"), cid, ctr)[:2] == (0, None)


def test_gc_removes_a_stale_attachment(cluster):
    net, nodes = cluster
    node = nodes[0]
    gone, cid_gone, r_gone = add(node, net, "cgone", version="1.1.0")
    kept, cid_kept, r_kept = add(node, net, "ckept", version="1.1.0")
    ip_gone = r_gone["ips"][0]["address"].split("/")[0]
    ip_kept = r_kept["ips"][0]["address"].split("/")[0]
    net.remove(gone)                     # the runtime lost the container without a DEL
    valid = [{"containerID": cid_kept, "ifname": "eth0"}]
    status, out, err = node.cni("GC", node.config("1.1.0", **{
        "cni.dev/valid-attachments": valid}))
    assert (status, out) == (0, None), (out, err)
    assert not os.path.exists(node.saved(cid_gone))
    assert not os.path.exists(node.reservation(ip_gone))
    assert os.path.exists(node.saved(cid_kept)) and os.path.exists(node.reservation(ip_kept))
    assert host_veth(r_kept) in node.h.run("ip -o link show type veth").stdout
    # a GC with nothing stale changes nothing; the kept one is DELeted as usual
    assert node.cni("GC", node.config("1.1.0", **{"cni.dev/valid-attachments": valid}))[:2] \
        == (0, None)
    assert os.path.exists(node.saved(cid_kept))
    assert node.cni("DEL", node.config("1.1.0"), cid_kept, kept)[:2] == (0, None)
    assert not os.path.exists(node.reservation(ip_kept))


def test_status_follows_the_subnet_file(cluster):
    net, nodes = cluster
    node = nodes[0]
    assert node.cni("STATUS", node.config("1.1.0"))[:2] == (0, None)
    status, out, _ = node.cni("STATUS", node.config("1.1.0", subnetFile="/nonexistent/x.env"))
    assert status == 1 and out["code"] == 50
    assert out["msg"].startswith('not available: "subnetFile": /nonexistent/x.env: no such file')


def test_version_answers_what_tunl_cni_speaks(cluster):
    net, nodes = cluster
    status, out, _ = nodes[0].cni("VERSION", b'{"cniVersion": "1.0.0"}')
    assert status == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": [
        "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("case,code,msg", [
    ("not-json", 6, "network configuration: not JSON"),
    ("version", 1, '"cniVersion": "0.2.0" is not one tunl-cni speaks'),
    ("no-subnet-file", 11, '"subnetFile": /nonexistent/subnet.env: no such file: is '
                           "`tunl mesh agent --subnet-file` running on this node?"),
    ("delegate", 7, '"delegate": must be a JSON object, not a list'),
    ("no-ifname", 4, "CNI_IFNAME: required for ADD, not set"),
])
def test_bad_input_is_a_cni_error_and_status_1(cluster, case, code, msg):
    net, nodes = cluster
    node = nodes[0]
    ctr = container(net, f"cb-{case}")
    config = {"not-json": b"{cniVersion: 1.0.0",
              "version": node.config("0.2.0"),
              "no-subnet-file": node.config(subnetFile="/nonexistent/subnet.env"),
              "delegate": node.config(delegate=["bridge"]),
              "no-ifname": node.config()}[case]
    cid = f"bad-{case}"
    status, out, err = node.cni("ADD", config, cid, ctr,
                                ifname=None if case == "no-ifname" else "eth0")
    assert status == 1, (out, err)
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert out["code"] == code and out["msg"].startswith(msg), out
    assert not os.path.exists(node.saved(cid))
    assert ctr.run("ip link show eth0", check=False).returncode != 0
    net.remove(ctr)


def test_namespaces_are_prefixed(cluster):
    net, nodes = cluster
    assert all(ns.startswith("tlcni-") for ns in net.names)
    assert all(n.h.ns.startswith("tlcni-") for n in nodes)
    assert IPv4Network(nodes[0].env()["TUNL_NETWORK"]) == IPv4Network("10.42.0.0/16")
    assert nsutil.ENV.get("TUNL_DATAPLANE") in ("ebpf", "userspace")
