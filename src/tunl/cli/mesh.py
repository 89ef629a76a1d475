"""`tunl mesh`: the overlay's control plane.

    tunl mesh init  [ --registry URL ] --network CIDR [ --subnet-len N ] [ --mode MODE ]
                    [ --cross-subnet ]
    tunl mesh agent [ --registry URL ] [ --public-ip IP | --iface DEV ] [ --node NAME ]
                    [ --dev NAME ] [ --bridge NAME ] [ --ttl SECONDS ] [ --metrics [ADDR:]PORT ]
                    [ --subnet-file PATH ] [ --ip-masq ]
    tunl mesh show  [ --registry URL ]
    tunl mesh leave [ --registry URL ]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from ipaddress import IPv4Interface, IPv4Network

from ..errors import ConfigError, TunlError
from ..mesh import network as nw
from ..mesh import subnetenv
from ..mesh.agent import DEFAULT_TTL, RESYNC, Agent, AgentConfig, KernelHost, node_name, public_ip
from ..mesh.plan import RTPROT_TUNL
from ..mesh.registry import Registry
from ..mesh.store import DEFAULT_URL, RegistryError, open_store

PROG = "tunl mesh"
STATE = "mesh.json"
USAGE = __doc__.split("\n\n", 1)[1].rstrip() + f"""

Where: URL  := sqlite:///PATH | etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
               default {DEFAULT_URL}, or $TUNL_REGISTRY
       CIDR := the overlay's network, e.g. 10.42.0.0/16; every node leases one subnet of it
       N    := the length of a node's subnet (default 24); MODE := ipip | gre
       IP   := this node's address on the underlay (default: from --iface, else the source
               address of the default route)
       NAME := --dev: the tunnel device (default tunl0); --bridge: the containers' gateway
               bridge (default mybr0); --node: this node's name (default the host name)
       SECONDS := the lease's TTL (default {DEFAULT_TTL}): a node that stops renewing is gone
               from every other node within twice that
       --cross-subnet: nodes on one underlay subnet route to each other directly over it,
               without encapsulation (flannel's DirectRouting); the others through the tunnel
       PATH := where the agent writes this node's lease for the CNI plugin (default
               {subnetenv.DEFAULT_PATH})
       --ip-masq: masquerade traffic from the overlay to the outside (nftables)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False)
    sub = p.add_subparsers(dest="verb", required=True, metavar="{ init | agent | show | leave }",
                           parser_class=_Parser)
    reg = dict(metavar="URL", default=os.environ.get("TUNL_REGISTRY") or DEFAULT_URL)
    s = sub.add_parser("init", help="store the overlay's network in the registry")
    s.add_argument("--registry", **reg)
    s.add_argument("--network", metavar="CIDR", required=True)
    s.add_argument("--subnet-len", metavar="N", type=int, default=nw.DEFAULT_SUBNET_LEN)
    s.add_argument("--mode", metavar="MODE", default="ipip")
    s.add_argument("--cross-subnet", action="store_true")
    s = sub.add_parser("agent", help="lease this node's subnet and keep its routes in step")
    s.add_argument("--registry", **reg)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--public-ip", metavar="IP")
    g.add_argument("--iface", metavar="DEV")
    s.add_argument("--node", metavar="NAME")
    s.add_argument("--dev", metavar="NAME", default="tunl0")
    s.add_argument("--bridge", metavar="NAME", default="mybr0")
    s.add_argument("--ttl", metavar="SECONDS", type=int, default=DEFAULT_TTL)
    s.add_argument("--resync", metavar="SECONDS", type=float, default=RESYNC)
    s.add_argument("--metrics", metavar="[ADDR:]PORT")
    s.add_argument("--subnet-file", metavar="PATH", default=subnetenv.DEFAULT_PATH)
    s.add_argument("--ip-masq", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true")
    for verb, what in (("show", "the nodes, their subnets and leases, and the routes here"),
                       ("leave", "release this node's lease and remove what its agent made")):
        s = sub.add_parser(verb, help=what)
        s.add_argument("--registry", **reg)
    return p


def _state_path() -> str:
    from ..daemon.state import state_dir
    return os.path.join(state_dir(), STATE)


def _read_state() -> dict | None:
    try:
        with open(_state_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_state(d: dict) -> None:
    path = _state_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(d, f)          # root only, as tunld's records
    os.replace(tmp, path)


def _registry(url: str) -> Registry:
    store, prefix = open_store(url, time.time)
    return Registry(store, prefix)


def main(argv: list[str], opts: dict) -> int:
    if not argv or argv[0] == "help" or argv[0] in ("-h", "--help"):
        sys.stdout.write(f"Usage: {USAGE}\n")
        return 0
    a = _parser().parse_args(argv)
    if a.verb != "show" and os.geteuid() != 0:
        raise TunlError(f"mesh {a.verb}: needs root (mesh show does not)")
    return {"init": init, "agent": agent, "show": show, "leave": leave}[a.verb](a, opts)


def init(a, opts) -> int:
    config = nw.NetworkConfig.parse(a.network, a.subnet_len, a.mode, a.cross_subnet)
    reg = _registry(a.registry)
    how = reg.init(config)
    print(f"network {config.network} subnet-len {config.subnet_len} mode {config.mode}"
          f"{' cross-subnet' if config.direct_routing else ''}: {how} in {reg.url}")
    return 0


def agent(a, opts) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="tunl mesh agent: %(message)s")
    if a.ttl < 2:
        raise ConfigError(f"--ttl {a.ttl}: at least 2 seconds (renewed every TTL/4)")
    ip = public_ip(a.public_ip, a.iface)
    reg = _registry(a.registry)
    previous = _read_state() or {}
    prefer = None
    if previous.get("registry") == reg.url and previous.get("subnet"):
        prefer = IPv4Network(previous["subnet"])
    try:
        config = reg.config()
    except RegistryError:
        config = None           # the agent waits for the registry; the mode comes with it
    mode = config.mode if config else previous.get("mode", "ipip")
    host = KernelHost(a.dev, a.bridge, mode, opts.get("dataplane", "auto"))
    cfg = AgentConfig(public_ip=ip, node=a.node or node_name(), dev=a.dev, bridge=a.bridge,
                      ttl=a.ttl, resync=a.resync, prefer=prefer, ipmasq=a.ip_masq)
    made = {k: v for k, v in (previous.get("made") or {}).items()}

    def on_lease(ag: Agent) -> None:
        made.update(host.made)
        _write_state({"registry": reg.url, "prefix": reg.prefix, "subnet":
                      str(ag.status.lease.subnet), "lease": ag.status.lease_id,
                      "mode": ag.config.mode, "dev": a.dev, "bridge": a.bridge,
                      "public_ip": str(ag.cfg.public_ip), "pid": os.getpid(), "made": made,
                      "subnet_file": a.subnet_file, "ip_masq": a.ip_masq})
        lease = ag.status.lease
        env = subnetenv.SubnetEnv(ag.config.network, IPv4Interface(
            f"{lease.gateway}/{lease.subnet.prefixlen}"), _mtu(a.dev), a.ip_masq, a.bridge)
        if subnetenv.write(env, a.subnet_file):
            logging.getLogger("tunl.mesh").info("wrote %s", a.subnet_file)

    # an address found (not given) is looked up again at every resync: a node that moves is
    # re-routed everywhere
    address = None if a.public_ip else (lambda: public_ip(None, a.iface))
    ag = Agent(reg, host, cfg, clock=time.monotonic, on_lease=on_lease, address=address)
    if a.metrics:
        from .. import planes
        from ..daemon import metrics
        from ..mesh.metrics import serve

        hist = serve(ag, metrics.check_listen(a.metrics), lambda: planes.show(a.dev))
        ag.on_reconcile = hist.observe
    signal.signal(signal.SIGTERM, lambda *_: ag.stop())
    signal.signal(signal.SIGINT, lambda *_: ag.stop())
    logging.getLogger("tunl.mesh").info("node %s, public IP %s, registry %s", cfg.node, ip,
                                        reg.url)
    ag.run()
    return 0


def _mtu(dev: str) -> int:
    """The tunnel's MTU (the kernel's, or tunld's TUN device's): every container interface
    on the overlay takes it."""
    with open(f"/sys/class/net/{dev}/mtu") as f:
        return int(f.read())


def _expiry(ttl: float | None) -> str:
    return "-" if ttl is None else f"{ttl:.0f}s"


def show(a, opts) -> int:
    reg = _registry(a.registry)
    config = reg.config()
    listing = reg.listing(config)
    here = {}
    try:
        from ..kernel.routes import HostNet
        with HostNet() as net:
            here = {dst: (via, dev) for dst, via, dev, onlink in net.routes(RTPROT_TUNL)}
    except Exception:
        pass
    state = _read_state() or {}
    own = state.get("subnet") if state.get("registry") == reg.url else None
    rows = []
    for subnet, lease in sorted(listing.leases.items()):
        e = listing.entries[reg.key(subnet)]
        ttl = e.ttl if e.ttl is not None else (reg.store.ttl(e.lease) if e.lease else None)
        if str(subnet) == own:
            routed = "self"
        elif subnet in here:
            via, dev = here[subnet]
            if via != lease.public_ip:
                routed = f"via {via}"
            else:
                routed = "yes" if dev == state.get("dev", "tunl0") else f"direct {dev}"
        else:
            routed = "no"
        rows.append({"node": lease.node, "subnet": str(subnet), "public_ip": str(lease.public_ip),
                     "backend": lease.backend, "expires": ttl, "route": routed})
    if opts.get("json"):
        out = {"network": str(config.network), "subnet_len": config.subnet_len,
               "mode": config.mode, "cross_subnet": config.direct_routing, "registry": reg.url, "nodes": rows,
               "refused": listing.refused}
        print(json.dumps(out, indent=2 if opts.get("pretty") else None))
        return 0
    print(f"network {config.network} subnet-len {config.subnet_len} mode {config.mode}"
          f"{' cross-subnet' if config.direct_routing else ''} registry {reg.url}")
    fmt = "{:<16} {:<18} {:<16} {:<8} {}"
    print(fmt.format("NODE", "SUBNET", "PUBLIC-IP", "EXPIRES", "ROUTE"))
    for r in rows:
        print(fmt.format(r["node"] or "-", r["subnet"], r["public_ip"], _expiry(r["expires"]),
                         r["route"]))
    for key, why in listing.refused.items():
        print(f"refused {why}")
    return 0


def leave(a, opts) -> int:
    from ..kernel import nft
    from ..kernel.routes import HostNet
    state = _read_state()
    if not state:
        raise TunlError("mesh leave: no agent has run in this network namespace "
                        f"(no {_state_path()})")
    pid = state.get("pid")
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
    subnet = IPv4Network(state["subnet"])
    reg = _registry(state.get("registry") or a.registry)
    try:
        e = reg.store.get(reg.key(subnet))
        if e is not None and json.loads(e.value).get("PublicIP") == state.get("public_ip"):
            reg.release(subnet, e.lease)
            print(f"released {subnet}")
    except (RegistryError, ValueError) as err:
        print(f"tunl: the lease of {subnet} stays until its TTL runs out: {err}",
              file=sys.stderr)
    dev, bridge, made = state["dev"], state["bridge"], state.get("made") or {}
    with HostNet() as net:
        for dst, via, d, onlink in net.routes(RTPROT_TUNL):
            net.route("delete", dst, via, d, onlink, RTPROT_TUNL)
        if f"tunnel {dev}" in made:
            from .. import planes
            try:
                planes.find(dev, "delete")[0].delete(dev)
            except TunlError:
                pass
        else:
            net.remove_address(dev, IPv4Interface(f"{subnet.network_address}/32"))
            from .. import planes
            try:                      # a tunnel the agent did not make takes anyone again
                planes.find(dev)[0].members(dev, None)
            except TunlError:
                pass
        if f"bridge {bridge}" in made:
            net.delete_link(bridge)
        else:
            net.remove_address(bridge, IPv4Interface(
                f"{subnet.network_address + 1}/{subnet.prefixlen}"))
    for table in (nft.MEMBERS, nft.MASQ):
        nft.remove(table)
    try:
        os.unlink(state.get("subnet_file") or subnetenv.DEFAULT_PATH)
    except FileNotFoundError:
        pass
    os.unlink(_state_path())
    print(f"left: routes, {dev} and {bridge} removed")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
