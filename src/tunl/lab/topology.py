"""Lab topologies: the TOML file, its validation, and the names it gives to namespaces.

Pure: no namespace is touched here. `parse()` takes the decoded TOML (a dict) and returns a
frozen `Topology`, or raises ConfigError with one line that names the field and the rule:

    host "B": address "300.1.2.3" is not an IPv4 address/prefix

A file looks like this (see examples/):

    name = "one2one"
    [underlay]
    cidr = "172.16.0.0/16"
    mtu = 1500                      # optional
    [[underlay.segment]]            # optional: the underlay as subnets joined by a router
    cidr = "172.16.1.0/24"          # inside the underlay cidr; segments do not overlap
    router = "172.16.1.254"         # optional: the router's address on it (default: the
                                    # segment's last address)
    [[underlay.segment]]
    cidr = "172.16.2.0/24"
    [[host]]
    name = "A"
    address = "172.16.232.172/16"
    ping_target = "10.42.1.1"       # optional: what `lab demo` pings on this host: one
                                    # address or a list, IPv4 or IPv6 ("fd00::1", or
                                    # "fe80::1%gre1" with the zone a link-local needs);
                                    # the host's underlay address if left out
    commands = ["ip link add name mybr0 type bridge", ...]
    [[host.container]]              # optional
    name = "c1"
    address = "10.42.1.2/24"
    gateway = "10.42.1.1"
    bridge = "mybr0"

An overlay that builds itself (`tunl mesh`), instead of commands that build it by hand:

    [mesh]                          # optional
    network = "10.42.0.0/16"        # the overlay's network; each member leases a subnet of it
    subnet_len = 24                 # optional: the length of a member's subnet
    mode = "ipip"                   # optional: ipip or gre
    registry = "sqlite"             # optional: sqlite (a file under the lab's run dir), or etcd
                                    # (a 3-member cluster the lab runs in its underlay
                                    # namespace, on etcd_address)
    ttl = 4                         # optional: seconds of a lease; a dead member's routes are
                                    # gone within twice that
    etcd_address = "172.16.255.254" # optional, etcd only: where its members listen (default:
                                    # the underlay's last address; with segments, the first
                                    # segment's router address), on br0 of the underlay
    cross_subnet = true             # optional: `tunl mesh init --cross-subnet` (flannel's
                                    # DirectRouting): members route straight to the members of
                                    # their own underlay subnet, through the tunnel to the others

Every host is a member (runs `tunl mesh agent`) unless it says `mesh = false`. A member's
subnet is leased at `lab up`, so the file gives it no ping_target (the demo pings each
member's bridge gateway) and no container on the mesh's bridge mybr0.

Without segments the underlay is one bridge, br0, and every host's address is on-link to every
other's. With segments it is one bridge per segment (br0, br1, ... in the file's order), each
carrying its router address, and the underlay namespace forwards between them: it is the router.
A host's address is then in exactly one segment, with the segment's prefix (it is on-link to the
hosts of its segment only), and the host's default route is via its segment's router.

Namespaces are `tl-<lab>-ul` (the underlay, with its bridges), `tl-<lab>-<host>` and
`tl-<lab>-<host>-<container>`. Lab, host and container names have no "-", so a namespace name
says which lab it belongs to: every namespace that starts with `tl-<lab>-` is that lab's.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, ip_address

from ..errors import ConfigError
from ..model import check_ifname

PREFIX = "tl-"
UNDERLAY = "ul"              # the underlay's namespace suffix: no host may have this name
BRIDGE = "br0"               # the underlay bridge, in tl-<lab>-ul (the first, with segments)
BRIDGE_PREFIX = "br"         # segment i's bridge is br<i>
PORT_PREFIX = "ve-"          # host side: ve-<container>; underlay side: ve-<host>
MAX_LAB_NAME = 24
MAX_NODE_NAME = 12           # so that ve-<name> fits in IFNAMSIZ - 1 = 15 characters
DEFAULT_MTU = 1500
RUN_DIR = "/run/tunl/lab"    # a lab's run dir is RUN_DIR/<lab>: registry, logs of its agents

# the mesh: what `tunl mesh agent` makes, and the lab's defaults (tunl.mesh is a layer above
# the lab, so its constants are repeated here, not imported)
# tunl.mesh.network.MODES without sit: a sit device carries IPv6 (proto 41) and drops the
# IPv4 packets of the overlay's subnets (not_ipv6), so a sit mesh routes but never delivers
MESH_MODES = ("ipip", "gre")
MESH_REGISTRIES = ("sqlite", "etcd")
MESH_DEV = "tunl0"                           # the agent's --dev
MESH_BRIDGE = "mybr0"                        # the agent's --bridge
MESH_SUBNET_LEN = 24
MESH_TTL = 20                                # the agent's default --ttl
MESH_MIN_TTL = 2                             # the agent renews every TTL/4
MAX_SUBNET_LEN = 30                          # a subnet needs its .0 (tunnel) and .1 (bridge)
ETCD_MEMBERS = 3

_NAME = re.compile(r"[A-Za-z0-9_]+\Z")


def ns_underlay(lab: str) -> str:
    return f"{PREFIX}{lab}-{UNDERLAY}"


def ns_host(lab: str, host: str) -> str:
    return f"{PREFIX}{lab}-{host}"


def ns_container(lab: str, host: str, container: str) -> str:
    return f"{PREFIX}{lab}-{host}-{container}"


def run_dir(lab: str) -> str:
    """Where a lab keeps what lives as long as it does: its mesh registry, its agents' logs."""
    return f"{RUN_DIR}/{lab}"


def ns_prefix(lab: str) -> str:
    """Every namespace of lab `lab`, and only those, starts with this."""
    return f"{PREFIX}{lab}-"


def split_ns(ns: str) -> tuple[str, str] | None:
    """`tl-<lab>-<node>` -> (lab, node), where node is `ul`, `host` or `host-container`."""
    if not ns.startswith(PREFIX):
        return None
    lab, sep, node = ns[len(PREFIX):].partition("-")
    if not sep or not lab or not node:
        return None
    return lab, node


@dataclass(frozen=True)
class Segment:
    """One subnet of a routed underlay: its bridge in tl-<lab>-ul carries `router`."""
    cidr: IPv4Network
    router: IPv4Address
    bridge: str                              # br0, br1, ... in the file's order

    @property
    def router_interface(self) -> IPv4Interface:
        return IPv4Interface((self.router, self.cidr.prefixlen))


@dataclass(frozen=True)
class Underlay:
    cidr: IPv4Network
    mtu: int = DEFAULT_MTU
    segments: tuple[Segment, ...] = ()       # none: one bridge br0, no router

    @property
    def bridges(self) -> tuple[str, ...]:
        """The bridges of the underlay namespace, in the order `up` makes them."""
        return tuple(s.bridge for s in self.segments) or (BRIDGE,)

    def segment(self, address: IPv4Address | IPv4Interface) -> Segment | None:
        """The segment an address is in (None without segments, or outside them all)."""
        ip = address.ip if isinstance(address, IPv4Interface) else address
        for s in self.segments:
            if ip in s.cidr:
                return s
        return None

    def bridge(self, address: IPv4Address | IPv4Interface) -> str:
        """The bridge a host with this address is attached to."""
        seg = self.segment(address)
        return seg.bridge if seg is not None else BRIDGE


@dataclass(frozen=True)
class Container:
    name: str
    address: IPv4Interface
    gateway: IPv4Address
    bridge: str

    @property
    def port(self) -> str:
        """The veth end in the host's namespace, attached to `bridge`."""
        return PORT_PREFIX + self.name


PingTarget = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Host:
    name: str
    address: IPv4Interface
    ping_targets: tuple[PingTarget, ...]     # at least one; `ping_target` in the file
    commands: tuple[str, ...] = ()
    containers: tuple[Container, ...] = ()
    mesh: bool = False                       # runs a mesh agent

    @property
    def port(self) -> str:
        """The veth end in the underlay namespace, attached to its segment's bridge (br0 when
        the underlay has no segments)."""
        return PORT_PREFIX + self.name

    def same_subnet(self, other: "Host") -> bool:
        """Whether `other`'s underlay address is on-link to this host's (a cross-subnet mesh
        routes to it directly, not through the tunnel)."""
        return other.address.ip in self.address.network


@dataclass(frozen=True)
class Mesh:
    network: IPv4Network
    subnet_len: int = MESH_SUBNET_LEN
    mode: str = "ipip"
    registry: str = "sqlite"
    ttl: int = MESH_TTL
    etcd_address: IPv4Address | None = None   # registry "etcd": where its members listen
    cross_subnet: bool = False                 # `tunl mesh init --cross-subnet`

    @property
    def subnets(self) -> int:
        """How many subnets members may lease: all but the first (tunl mesh's IPAM)."""
        return (1 << (self.subnet_len - self.network.prefixlen)) - 1


@dataclass(frozen=True)
class Topology:
    name: str
    underlay: Underlay
    hosts: tuple[Host, ...] = field(default=())
    mesh: Mesh | None = None

    @property
    def members(self) -> tuple[Host, ...]:
        """The hosts that run a mesh agent, in the file's order."""
        return tuple(h for h in self.hosts if h.mesh)

    @property
    def run_dir(self) -> str:
        return run_dir(self.name)

    @property
    def ns_underlay(self) -> str:
        return ns_underlay(self.name)

    def ns_host(self, host: Host | str) -> str:
        return ns_host(self.name, host if isinstance(host, str) else host.name)

    def ns_container(self, host: Host, container: Container) -> str:
        return ns_container(self.name, host.name, container.name)

    def namespaces(self) -> list[str]:
        """All namespaces of the lab, in the order `up` creates them."""
        out = [self.ns_underlay]
        out += [self.ns_host(h) for h in self.hosts]
        out += [self.ns_container(h, c) for h in self.hosts for c in h.containers]
        return out

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def segment_of(self, host: Host) -> Segment | None:
        return self.underlay.segment(host.address)

    def bridge_of(self, host: Host) -> str:
        return self.underlay.bridge(host.address)

    def free_address(self, segment: Segment) -> IPv4Interface | None:
        """An address of `segment` that no host, router or etcd has, with the segment's prefix:
        where `lab demo` moves a host into that segment. The first after the segment's hosts'
        (172.16.1.4 after .2 and .3), else the first free one."""
        used = {h.address.ip for h in self.hosts} | {s.router for s in self.underlay.segments}
        if self.mesh is not None and self.mesh.etcd_address is not None:
            used.add(self.mesh.etcd_address)
        last = max((h.address.ip for h in self.hosts if h.address.ip in segment.cidr),
                   default=None)
        free = (ip for ip in segment.cidr.hosts() if ip not in used)
        after = (ip for ip in free if last is None or ip > last)
        pick = next(after, None) or next((ip for ip in segment.cidr.hosts() if ip not in used),
                                         None)
        return IPv4Interface((pick, segment.cidr.prefixlen)) if pick is not None else None


# -- parsing -------------------------------------------------------------------------------

def _read(path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load(path) -> Topology:
    """Read and validate a topology file."""
    return parse(_read(path))


def loads(text: str) -> Topology:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from e
    return parse(data)


def load_name(path) -> str:
    """Only the lab's name: enough for `down`, even when the rest of the file no longer parses."""
    data = _read(path)
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError('name: missing (the lab\'s name, e.g. name = "one2one")')
    return check_lab_name(data["name"])


def check_lab_name(name) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"name {_show(name)} is not a string")
    if not _NAME.match(name):
        raise ConfigError(f'name "{name}": a lab name has only letters, digits and "_"'
                          ' (no "-": it separates the parts of a namespace name)')
    if len(name) > MAX_LAB_NAME:
        raise ConfigError(f'name "{name}": a lab name has at most {MAX_LAB_NAME} characters')
    return name


def parse(data: dict) -> Topology:
    """Validate decoded TOML; the first broken rule raises ConfigError naming the field."""
    _keys(data, "", required={"name", "underlay", "host"}, optional={"mesh"})
    name = check_lab_name(data["name"])
    underlay = _parse_underlay(data["underlay"])
    hosts_raw = data["host"]
    if not isinstance(hosts_raw, list) or not all(isinstance(h, dict) for h in hosts_raw):
        raise ConfigError("host: is a list of tables ([[host]])")
    if not hosts_raw:
        raise ConfigError("host: a lab has at least one host")
    mesh = _parse_mesh(data["mesh"], underlay) if "mesh" in data else None
    hosts: list[Host] = []
    for i, raw in enumerate(hosts_raw):
        hosts.append(_parse_host(raw, i, underlay, mesh is not None))
    _check_unique(hosts)
    if mesh is not None:
        mesh = _check_mesh(mesh, underlay, hosts)
    return Topology(name, underlay, tuple(hosts), mesh)


def _network(value, word: str) -> IPv4Network:
    try:
        if not isinstance(value, str):
            raise ValueError
        return IPv4Network(value, strict=True)
    except ValueError:
        raise ConfigError(f"{word} {_show(value)} is not an IPv4 network"
                          " (address/prefix with no host bits set)") from None


def _parse_underlay(raw) -> Underlay:
    if not isinstance(raw, dict):
        raise ConfigError("underlay: is a table ([underlay]) with cidr and mtu")
    _keys(raw, "underlay: ", required={"cidr"}, optional={"mtu", "segment"})
    net = _network(raw["cidr"], "underlay: cidr")
    mtu = raw.get("mtu", DEFAULT_MTU)
    # 68: the least MTU of IPv4 (RFC 791); 65535: the largest an IPv4 total length can say
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
        raise ConfigError(f"underlay: mtu {_show(mtu)} is not a number from 68 to 65535")
    segments: list[Segment] = []
    if "segment" in raw:
        seg_raw = raw["segment"]
        if not isinstance(seg_raw, list) or not all(isinstance(x, dict) for x in seg_raw):
            raise ConfigError("underlay: segment: is a list of tables ([[underlay.segment]])")
        if not seg_raw:
            raise ConfigError("underlay: segment: the list is empty (leave it out for one"
                              " bridge)")
        for i, x in enumerate(seg_raw):
            segments.append(_parse_segment(x, i, net, segments))
    return Underlay(net, mtu, tuple(segments))


def _parse_segment(raw: dict, index: int, underlay: IPv4Network,
                   before: list[Segment]) -> Segment:
    where = f"underlay: segment #{index + 1}: "
    _keys(raw, where, required={"cidr"}, optional={"router"})
    cidr = _network(raw["cidr"], where + "cidr")
    if not cidr.subnet_of(underlay):
        raise ConfigError(f"{where}cidr {cidr} is not inside the underlay cidr {underlay}")
    if cidr.prefixlen > 30:
        raise ConfigError(f"{where}cidr {cidr} has no room for a router and a host (a segment"
                          " is at most a /30)")
    for j, other in enumerate(before):
        if cidr.overlaps(other.cidr):
            raise ConfigError(f"{where}cidr {cidr} overlaps segment #{j + 1}'s {other.cidr}"
                              " (a host's address is in exactly one segment)")
    if "router" in raw:
        router = _address(raw["router"], where + "router")
        if router not in cidr:
            raise ConfigError(f'{where}router "{router}" is not in the segment\'s cidr {cidr}')
        _usable(IPv4Interface((router, cidr.prefixlen)), where + "router")
    else:
        router = cidr.broadcast_address - 1         # the segment's last address
    return Segment(cidr, router, f"{BRIDGE_PREFIX}{index}")


def _parse_host(raw: dict, index: int, underlay: Underlay, meshed: bool = False) -> Host:
    if "name" not in raw:
        raise ConfigError(f"host #{index + 1}: name: missing")
    name = _node_name(raw["name"], f"host #{index + 1}: name")
    if name == UNDERLAY:
        raise ConfigError(f'host "{name}": the name "{UNDERLAY}" is the underlay\'s')
    where = f'host "{name}": '
    _keys(raw, where, required={"name", "address"},
          optional={"ping_target", "commands", "container", "mesh"})
    member = raw.get("mesh", meshed)
    if not isinstance(member, bool):
        raise ConfigError(f"{where}mesh {_show(member)} is not true or false")
    if member and not meshed:
        raise ConfigError(f"{where}mesh = true, but the file has no [mesh] table")
    if member and "ping_target" in raw:
        raise ConfigError(f"{where}ping_target: a mesh member is pinged at its subnet's gateway,"
                          " which it leases at `lab up`; leave ping_target out (or say"
                          " mesh = false)")
    address = _interface(raw["address"], where + "address")
    if address.ip not in underlay.cidr:
        raise ConfigError(f'{where}address "{address}" is not in the underlay cidr'
                          f' {underlay.cidr}')
    _usable(address, where + "address")
    if underlay.segments:
        _check_segment(address, underlay, where)
    targets = _ping_targets(raw.get("ping_target", str(address.ip)), where + "ping_target")
    commands = raw.get("commands", [])
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise ConfigError(f"{where}commands: is a list of strings")
    for j, c in enumerate(commands):
        if not c.strip():
            raise ConfigError(f"{where}commands[{j}]: is empty")
    containers_raw = raw.get("container", [])
    if not isinstance(containers_raw, list) or not all(isinstance(c, dict)
                                                       for c in containers_raw):
        raise ConfigError(f"{where}container: is a list of tables ([[host.container]])")
    containers = tuple(_parse_container(c, j, where) for j, c in enumerate(containers_raw))
    seen: set[str] = set()
    for c in containers:
        if c.name in seen:
            raise ConfigError(f'{where}container "{c.name}": the name is used twice')
        seen.add(c.name)
        if member and c.bridge == MESH_BRIDGE:
            raise ConfigError(f'{where}container "{c.name}": bridge "{c.bridge}" is the mesh\'s,'
                              " whose subnet the host leases at `lab up`: no address in the"
                              " file can be known to be in it")
    return Host(name, address, targets, tuple(commands), containers, member)


def _check_segment(address: IPv4Interface, underlay: Underlay, where: str) -> None:
    """With segments: the address is in exactly one (they do not overlap), with its prefix, and
    is not its router's."""
    seg = underlay.segment(address)
    if seg is None:
        cidrs = ", ".join(str(s.cidr) for s in underlay.segments)
        raise ConfigError(f'{where}address "{address}" is in no segment of the underlay'
                          f" ({cidrs}): with segments, every host's address is in one")
    if address.network != seg.cidr:
        raise ConfigError(f'{where}address "{address}" is in segment {seg.cidr} but has prefix'
                          f" /{address.network.prefixlen}: a host's address takes its segment's"
                          f" prefix, /{seg.cidr.prefixlen}")
    if address.ip == seg.router:
        raise ConfigError(f'{where}address "{address}" is the router address of segment'
                          f" {seg.cidr} (on {seg.bridge} of the underlay)")


def _parse_container(raw: dict, index: int, where: str) -> Container:
    if "name" not in raw:
        raise ConfigError(f"{where}container #{index + 1}: name: missing")
    name = _node_name(raw["name"], f"{where}container #{index + 1}: name")
    where = f'{where}container "{name}": '
    _keys(raw, where, required={"name", "address", "gateway", "bridge"}, optional=set())
    address = _interface(raw["address"], where + "address")
    _usable(address, where + "address")
    gateway = _address(raw["gateway"], where + "gateway")
    if gateway not in address.network:
        raise ConfigError(f'{where}gateway "{gateway}" is not in {address.network}'
                          f" (the network of address {address})")
    if gateway == address.ip:
        raise ConfigError(f'{where}gateway "{gateway}" is the container\'s own address')
    bridge = raw["bridge"]
    if not isinstance(bridge, str):
        raise ConfigError(f"{where}bridge: {_show(bridge)} is not a string")
    check_ifname(bridge, f"{where}bridge")
    return Container(name, address, gateway, bridge)


def _parse_mesh(raw, underlay: Underlay) -> Mesh:
    """The [mesh] table, each key on its own; _check_mesh then checks it against the hosts."""
    if not isinstance(raw, dict):
        raise ConfigError("mesh: is a table ([mesh]) with network, subnet_len, mode, registry"
                          " and ttl")
    where = "mesh: "
    _keys(raw, where, required={"network"},
          optional={"subnet_len", "mode", "registry", "ttl", "etcd_address", "cross_subnet"})
    network = _network(raw["network"], f"{where}network")
    if network.overlaps(underlay.cidr):
        raise ConfigError(f"{where}network {network} overlaps the underlay cidr {underlay.cidr}"
                          " (the overlay's routes would take the underlay's addresses)")
    subnet_len = raw.get("subnet_len", MESH_SUBNET_LEN)
    if (not isinstance(subnet_len, int) or isinstance(subnet_len, bool)
            or not network.prefixlen < subnet_len <= MAX_SUBNET_LEN):
        raise ConfigError(f"{where}subnet_len {_show(subnet_len)} is not a number from"
                          f" {network.prefixlen + 1} to {MAX_SUBNET_LEN} (longer than the"
                          f" network's /{network.prefixlen}; a subnet needs its .0 and .1)")
    mode = raw.get("mode", "ipip")
    if mode == "sit":
        raise ConfigError(f'{where}mode "sit" carries IPv6, and the overlay\'s subnets are IPv4:'
                          f" a sit mesh would drop every packet ({', '.join(MESH_MODES)} carry"
                          " IPv4)")
    if mode not in MESH_MODES:
        raise ConfigError(f"{where}mode {_show(mode)} is not an overlay mode"
                          f" ({', '.join(MESH_MODES)})")
    registry = raw.get("registry", "sqlite")
    if registry not in MESH_REGISTRIES:
        raise ConfigError(f"{where}registry {_show(registry)} is not a registry the lab runs"
                          f" ({', '.join(MESH_REGISTRIES)})")
    ttl = raw.get("ttl", MESH_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < MESH_MIN_TTL:
        raise ConfigError(f"{where}ttl {_show(ttl)} is not a number of seconds of at least"
                          f" {MESH_MIN_TTL} (a lease is renewed every ttl/4)")
    cross_subnet = raw.get("cross_subnet", False)
    if not isinstance(cross_subnet, bool):
        raise ConfigError(f"{where}cross_subnet {_show(cross_subnet)} is not true or false")
    etcd_address = None
    if "etcd_address" in raw:
        if registry != "etcd":
            raise ConfigError(f'{where}etcd_address: only for registry "etcd" (this mesh\'s'
                              f' registry is "{registry}")')
        etcd_address = _address(raw["etcd_address"], where + "etcd_address")
        if etcd_address not in underlay.cidr:
            raise ConfigError(f'{where}etcd_address "{etcd_address}" is not in the underlay'
                              f" cidr {underlay.cidr} (the hosts reach etcd over the underlay)")
        seg = underlay.segment(etcd_address)
        _usable(IPv4Interface((etcd_address, (seg.cidr if seg else underlay.cidr).prefixlen)),
                where + "etcd_address")
    return Mesh(network, subnet_len, mode, registry, ttl, etcd_address, cross_subnet)


def _check_mesh(mesh: Mesh, underlay: Underlay, hosts: list[Host]) -> Mesh:
    members = [h for h in hosts if h.mesh]
    if not members:
        raise ConfigError("mesh: no host is a member (every host says mesh = false)")
    if mesh.subnets < len(members):
        raise ConfigError(f"mesh: subnet_len {mesh.subnet_len} gives {mesh.network}"
                          f" {mesh.subnets} subnet{'s' * (mesh.subnets != 1)} to lease (the"
                          f" first is never leased), fewer than its {len(members)} members")
    if mesh.registry != "etcd":
        return mesh
    address, given = mesh.etcd_address, mesh.etcd_address is not None
    if address is None and underlay.segments:
        # br0 already carries the first segment's router address, reached from every segment
        return replace(mesh, etcd_address=underlay.segments[0].router)
    if address is None:
        net = underlay.cidr
        if net.prefixlen > 30:
            raise ConfigError(f"mesh: the underlay cidr {net} has no room for etcd: give"
                              " etcd_address")
        address = net.broadcast_address - 1
    for h in hosts:
        if h.address.ip == address:
            if given:
                raise ConfigError(f'mesh: etcd_address "{address}" is host "{h.name}"\'s'
                                  " address")
            raise ConfigError(f"mesh: etcd listens on {address} (the underlay's last address)"
                              f' by default, which is host "{h.name}"\'s: choose another with'
                              " etcd_address")
    return replace(mesh, etcd_address=address)


def _check_unique(hosts: list[Host]) -> None:
    names: set[str] = set()
    addrs: dict[IPv4Address, str] = {}
    for h in hosts:
        if h.name in names:
            raise ConfigError(f'host "{h.name}": the name is used twice')
        names.add(h.name)
        if h.address.ip in addrs:
            raise ConfigError(f'host "{h.name}": address {h.address.ip} is also host'
                              f' "{addrs[h.address.ip]}"\'s')
        addrs[h.address.ip] = h.name


# -- helpers ---------------------------------------------------------------------------------

def _keys(raw: dict, where: str, *, required: set[str], optional: set[str]) -> None:
    for k in sorted(required):
        if k not in raw:
            raise ConfigError(f"{where}{k}: missing")
    for k in raw:
        if k not in required and k not in optional:
            known = ", ".join(sorted(required | optional))
            raise ConfigError(f'{where}unknown key "{k}" (known: {known})')


def _node_name(name, where: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{where} {_show(name)} is not a string")
    if not _NAME.match(name):
        raise ConfigError(f'{where} "{name}": a name has only letters, digits and "_"')
    if len(name) > MAX_NODE_NAME:
        raise ConfigError(f'{where} "{name}": a name has at most {MAX_NODE_NAME} characters')
    return name


def _interface(text, where: str) -> IPv4Interface:
    try:
        if not isinstance(text, str) or "/" not in text:
            raise ValueError
        return IPv4Interface(text)
    except ValueError:
        raise ConfigError(f"{where} {_show(text)} is not an IPv4 address/prefix") from None


def _address(text, where: str) -> IPv4Address:
    try:
        if not isinstance(text, str):
            raise ValueError
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{where} {_show(text)} is not an IPv4 address") from None


def _ping_targets(value, where: str) -> tuple[PingTarget, ...]:
    """`ping_target`: one address or a list of them, IPv4 or IPv6, each one host."""
    if isinstance(value, str):
        return (_ping_target(value, where),)
    if not isinstance(value, list):
        raise ConfigError(f"{where} {_show(value)} is not an address or a list of addresses")
    if not value:
        raise ConfigError(f"{where}: the list is empty (leave ping_target out to ping the"
                          " host's underlay address)")
    out: list[PingTarget] = []
    for i, text in enumerate(value):
        target = _ping_target(text, f"{where}[{i}]")
        if target in out:
            raise ConfigError(f'{where}[{i}] "{text}" is in the list twice')
        out.append(target)
    return tuple(out)


def _ping_target(text, where: str) -> PingTarget:
    try:
        if not isinstance(text, str):
            raise ValueError
        addr = ip_address(text)
    except ValueError:
        raise ConfigError(f"{where} {_show(text)} is not an IPv4 or IPv6 address") from None
    if addr.is_unspecified:
        raise ConfigError(f'{where} "{text}" is the unspecified address: a ping target is'
                          " one host")
    if addr.is_multicast:
        raise ConfigError(f'{where} "{text}" is a multicast address: a ping target is one'
                          " host")
    if isinstance(addr, IPv4Address) and addr == IPv4Address("255.255.255.255"):
        raise ConfigError(f'{where} "{text}" is the broadcast address: a ping target is one'
                          " host")
    if isinstance(addr, IPv6Address) and addr.is_link_local and not addr.scope_id:
        raise ConfigError(f'{where} "{text}" is link-local: name its interface too, as in'
                          f' "{text}%eth0"')
    return addr


def _usable(iface: IPv4Interface, where: str) -> None:
    """A host address, not the network or broadcast address of its prefix (RFC 3021 aside)."""
    net = iface.network
    if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
        what = "network" if iface.ip == net.network_address else "broadcast"
        raise ConfigError(f'{where} "{iface}" is the {what} address of {net}')


def _show(value) -> str:
    """A value as the file wrote it, for error messages."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return type(value).__name__
