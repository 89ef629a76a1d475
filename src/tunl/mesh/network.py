"""The overlay's words, in flannel's etcd layout so that operators' tooling reads them (pure):

    <prefix>/config                 {"Network": "10.42.0.0/16", "SubnetLen": 24,
                                     "Backend": {"Type": "ipip", "DirectRouting": false}}
    <prefix>/subnets/10.42.1.0-24   {"PublicIP": "172.16.0.1", "BackendType": "ipip",
                                     "BackendData": {"Node": "a"}}

and the choice of a node's subnet (IPAM). Every value read from a registry is checked here
before anything above it may act on it: a lease that does not parse, or names a subnet outside
the network, is refused with a reason, never programmed.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ..errors import ConfigError, TunlError

PREFIX = "/coreos.com/network"   # flannel's default --etcd-prefix
MODES = ("ipip", "gre")         # the overlay carries IPv4: sit carries IPv6 only
DEFAULT_SUBNET_LEN = 24


class NetworkFullError(TunlError):
    """Every subnet of the network is leased."""


class BadLeaseError(TunlError):
    """A registry entry that is not a lease of this network (garbage, or outside it)."""


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int = DEFAULT_SUBNET_LEN
    mode: str = "ipip"
    direct_routing: bool = False     # --cross-subnet: flannel's DirectRouting

    def __post_init__(self):
        if self.mode not in MODES:
            why = " (sit carries IPv6; the overlay's subnets are IPv4)" if self.mode == "sit" else ""
            raise ConfigError(f'--mode "{self.mode}": the overlay modes are '
                              f'{", ".join(MODES)}{why}')
        if not self.network.prefixlen < self.subnet_len <= 30:
            raise ConfigError(f"--subnet-len {self.subnet_len}: must be longer than the "
                              f"network's /{self.network.prefixlen} and at most 30")

    @classmethod
    def parse(cls, network: str, subnet_len: int = DEFAULT_SUBNET_LEN,
              mode: str = "ipip", direct_routing: bool = False) -> "NetworkConfig":
        try:
            net = IPv4Network(network)
        except ValueError as e:
            raise ConfigError(f'--network "{network}": {e}') from None
        return cls(net, subnet_len, mode, direct_routing)

    def to_json(self) -> bytes:
        backend: dict[str, object] = {"Type": self.mode}
        if self.direct_routing:
            backend["DirectRouting"] = True
        return json.dumps({"Network": str(self.network), "SubnetLen": self.subnet_len,
                           "Backend": backend}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "NetworkConfig":
        try:
            d = json.loads(raw)
            backend = d.get("Backend") or {"Type": "ipip"}
            direct = backend.get("DirectRouting", False)
            if not isinstance(direct, bool):
                raise ValueError(f"DirectRouting {direct!r} is not true or false")
            return cls(IPv4Network(d["Network"]), int(d.get("SubnetLen", DEFAULT_SUBNET_LEN)),
                       str(backend.get("Type", "ipip")), direct)
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
            raise BadLeaseError(f"config: not a network config ({e})") from None

    def subnets(self):
        """The subnets a node may lease: all but the first, as flannel's SubnetMin."""
        it = self.network.subnets(new_prefix=self.subnet_len)
        next(it)
        return it

    @property
    def size(self) -> int:
        return (1 << (self.subnet_len - self.network.prefixlen)) - 1


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    public_ip: IPv4Address
    backend: str = "ipip"
    node: str = ""
    expires: float | None = field(default=None, compare=False)   # registry clock, seconds

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's address: the subnet's first host (10.42.1.1)."""
        return self.subnet.network_address + 1

    def to_json(self) -> bytes:
        return json.dumps({"PublicIP": str(self.public_ip), "BackendType": self.backend,
                           "BackendData": {"Node": self.node}}).encode()


def subnet_key(subnet: IPv4Network) -> str:
    """10.42.1.0/24 -> "10.42.1.0-24", flannel's key."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def key_subnet(key: str) -> IPv4Network:
    name = key.rsplit("/", 1)[-1]
    addr, sep, plen = name.partition("-")
    if not sep:
        raise BadLeaseError(f'{key}: not a subnet key (want "10.42.1.0-24")')
    try:
        return IPv4Network(f"{addr}/{plen}")
    except ValueError as e:
        raise BadLeaseError(f"{key}: {e}") from None


def parse_lease(config: NetworkConfig, key: str, raw: bytes,
                expires: float | None = None) -> Lease:
    """The lease stored at `key`, or BadLeaseError saying why it is refused."""
    subnet = key_subnet(key)
    if subnet.prefixlen != config.subnet_len or not subnet.subnet_of(config.network):
        raise BadLeaseError(f"{key}: {subnet} is not a /{config.subnet_len} of "
                            f"{config.network}")
    if subnet == next(config.network.subnets(new_prefix=config.subnet_len)):
        raise BadLeaseError(f"{key}: {subnet} is the network's first subnet, never leased")
    try:
        d = json.loads(raw)
        ip = IPv4Address(d["PublicIP"])
        backend = str(d.get("BackendType", ""))
        data = d.get("BackendData") or {}
        node = str(data.get("Node", "")) if isinstance(data, dict) else ""
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadLeaseError(f"{key}: not a lease ({type(e).__name__}: {e})") from None
    if backend != config.mode:
        raise BadLeaseError(f'{key}: BackendType "{backend}", the network is {config.mode}')
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip in config.network:
        raise BadLeaseError(f"{key}: PublicIP {ip} cannot carry the overlay")
    return Lease(subnet, ip, backend, node, expires)


def choose(config: NetworkConfig, taken: set[IPv4Network],
           prefer: IPv4Network | None = None, rng: random.Random | None = None) -> IPv4Network:
    """A free subnet: `prefer` when it is free, else one at random among the first free ones
    (as flannel does, so that racing nodes rarely pick the same one)."""
    if prefer is not None and prefer not in taken and prefer.prefixlen == config.subnet_len \
            and prefer.subnet_of(config.network):
        return prefer
    free = []
    for s in config.subnets():
        if s not in taken:
            free.append(s)
            if len(free) == 100:
                break
    if not free:
        raise NetworkFullError(f"network {config.network} is full: all {config.size} "
                               f"/{config.subnet_len} subnets are leased")
    return (rng or random).choice(free)
