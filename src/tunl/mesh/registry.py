"""The overlay's registry: its network config and its nodes' subnet leases, over any Store
(store.py). Every lease read is checked (network.parse_lease) and a refused one is returned with
its reason, so that callers log it and never program it."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ..errors import ConfigError, ExistsError
from . import network as nw
from .network import BadLeaseError, Lease, NetworkConfig
from .store import Entry, RegistryError, Store

log = logging.getLogger("tunl.mesh")
CLAIM_TRIES = 16


@dataclass(frozen=True)
class Listing:
    leases: dict[IPv4Network, Lease]
    refused: dict[str, str]          # key -> why it is not a lease of this network
    revision: int
    entries: dict[str, Entry]        # the raw entries, by key (lease ids and mod revisions)


class Registry:
    def __init__(self, store: Store, prefix: str = nw.PREFIX):
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.subnets_prefix = self.prefix + "/subnets/"

    @property
    def url(self) -> str:
        return self.store.url

    def config(self) -> NetworkConfig:
        e = self.store.get(self.prefix + "/config")
        if e is None:
            raise ConfigError(f"registry {self.url} has no network at {self.prefix}: "
                              "create one with `tunl mesh init --network CIDR`")
        try:
            return NetworkConfig.from_json(e.value)
        except BadLeaseError as err:
            raise RegistryError(f"registry {self.url}: {self.prefix}/config is not a network "
                                f"config; refusing it ({err})") from None

    def init(self, config: NetworkConfig) -> str:
        """Store the network config: "created", or "unchanged" when the same one is there,
        or "updated" when only --cross-subnet differs (agents take it at their next listing);
        a different network is an error (leases already handed out would fall outside it)."""
        if self.store.create(self.prefix + "/config", config.to_json()):
            return "created"
        try:
            there = self.config()
        except RegistryError:
            there = None
        if there == config:
            return "unchanged"
        if there is not None and (there.network, there.subnet_len, there.mode) == \
                (config.network, config.subnet_len, config.mode):
            self.store.put(self.prefix + "/config", config.to_json())
            return "updated"
        raise ExistsError(f"registry {self.url} already holds network "
                          f"{there.network if there else '(unreadable config)'} at "
                          f"{self.prefix}; tunl does not change a network nodes lease from")

    def listing(self, config: NetworkConfig, entries: list[Entry] | None = None,
                revision: int = 0) -> Listing:
        if entries is None:
            entries, revision = self.store.list(self.subnets_prefix)
        leases, refused = {}, {}
        for e in entries:
            try:
                lease = nw.parse_lease(config, e.key, e.value, e.ttl)
            except BadLeaseError as err:
                refused[e.key] = str(err)
                continue
            leases[lease.subnet] = lease
        return Listing(leases, refused, revision, {e.key: e for e in entries})

    def key(self, subnet: IPv4Network) -> str:
        return self.subnets_prefix + nw.subnet_key(subnet)

    def acquire(self, config: NetworkConfig, public_ip: IPv4Address, node: str, lease_id: int,
                prefer: IPv4Network | None = None, rng: random.Random | None = None) -> Lease:
        """Claim a subnet under `lease_id`: the one already leased to this public IP (a node
        that restarts gets its subnet back, as flannel's), else `prefer` when free, else a free
        one. Two nodes racing for one subnet: the registry's compare-and-put lets one win, the
        other lists again and takes another."""
        for _ in range(CLAIM_TRIES):
            listing = self.listing(config)
            mine = [s for s, lease in listing.leases.items() if lease.public_ip == public_ip]
            if prefer in mine:
                mine = [prefer]
            taken = set(listing.leases)
            for key in listing.refused:
                try:
                    taken.add(nw.key_subnet(key))
                except BadLeaseError:
                    pass
            if mine:
                subnet = mine[0]
                mod_rev = listing.entries[self.key(subnet)].mod_rev
            else:
                subnet = nw.choose(config, taken, prefer, rng)
                mod_rev = 0
            lease = Lease(subnet, public_ip, config.mode, node)
            if self.store.claim(self.key(subnet), lease.to_json(), lease_id, mod_rev):
                return lease
            log.info("subnet %s was taken meanwhile; choosing again", subnet)
        raise RegistryError(f"registry {self.url}: no subnet claimed after {CLAIM_TRIES} tries")

    def move(self, lease: Lease, lease_id: int) -> bool:
        """Rewrite this node's lease in place (its public IP changed): only while the key is
        still under `lease_id`, by compare-and-put; whether it was."""
        e = self.store.get(self.key(lease.subnet))
        if e is None or e.lease != lease_id:
            return False
        return self.store.claim(self.key(lease.subnet), lease.to_json(), lease_id, e.mod_rev)

    def holds(self, lease: Lease, lease_id: int) -> bool:
        """Whether the registry still has `lease` under `lease_id`."""
        e = self.store.get(self.key(lease.subnet))
        return e is not None and e.lease == lease_id and \
            e.value == lease.to_json()

    def release(self, subnet: IPv4Network, lease_id: int | None) -> None:
        if lease_id:
            self.store.revoke(lease_id)
        self.store.delete(self.key(subnet))
