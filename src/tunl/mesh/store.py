"""The key-value store under a registry: the few etcd v3 verbs the overlay needs, so that the
embedded SQLite file (sqlite.py) and an etcd cluster (etcd.py) are interchangeable, and a
registry URL picks one:

    sqlite:///var/lib/tunl/mesh.db             the default; one machine, the lab, small sites
    etcd://10.0.0.1:2379,10.0.0.2:2379[/prefix] a cluster, failing over across its endpoints

Keys carry leases (a TTL renewed by keepalive; when it runs out, its keys are deleted), every
change gets a revision, and a watch delivers the changes of a prefix from a revision on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import ConfigError, TunlError

DEFAULT_URL = "sqlite:///var/lib/tunl/mesh.db"


class RegistryError(TunlError):
    """The registry cannot be reached or failed a request; what is programmed stays."""


class CompactedError(RegistryError):
    """The watch's revision is gone (compacted): list again, then watch from there."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    mod_rev: int
    lease: int = 0                    # 0: no lease
    ttl: float | None = None          # seconds left on the lease, where the store knows cheaply


@dataclass(frozen=True)
class Event:
    kind: str                         # "put" | "delete"
    key: str
    value: bytes | None
    revision: int


class Watch(Protocol):
    def get(self, timeout: float) -> list[Event]:
        """The next changes (empty after `timeout` seconds without one); RegistryError when the
        registry is gone, CompactedError when the revision watched from was compacted."""

    def close(self) -> None: ...


class Store(Protocol):
    url: str

    def get(self, key: str) -> Entry | None: ...

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        """Every entry under prefix, and the store's revision at that moment."""

    def create(self, key: str, value: bytes) -> bool:
        """Put without a lease, only where the key is absent; False when it was there."""

    def put(self, key: str, value: bytes) -> None: ...

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""

    def keepalive(self, lease: int) -> float | None:
        """Renew the lease; its TTL, or None when it has run out."""

    def ttl(self, lease: int) -> float | None: ...

    def revoke(self, lease: int) -> None:
        """End the lease and delete its keys."""

    def claim(self, key: str, value: bytes, lease: int, mod_rev: int) -> bool:
        """Put under `lease` only if the key's mod revision is still `mod_rev` (0: absent);
        the one atomic step that keeps two nodes from holding one subnet."""

    def delete(self, key: str) -> None: ...

    def watch(self, prefix: str, revision: int) -> Watch:
        """Changes under prefix with a revision of at least `revision`."""

    def close(self) -> None: ...


def open_store(url: str, clock: Callable[[], float]) -> tuple[Store, str]:
    """The store a registry URL names, and the key prefix the overlay lives under."""
    from .network import PREFIX
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep:
        if not rest.startswith("/"):
            raise ConfigError(f'--registry "{url}": a sqlite registry is sqlite:///absolute/path')
        from .sqlite import SqliteStore
        return SqliteStore(rest, clock), PREFIX
    if scheme == "etcd" and sep:
        hosts, slash, path = rest.partition("/")
        endpoints = []
        for hp in filter(None, hosts.split(",")):
            host, colon, port = hp.rpartition(":")
            if not colon or not port.isdigit() or not host:
                raise ConfigError(f'--registry "{url}": endpoint "{hp}" is not host:port')
            endpoints.append((host.strip("[]"), int(port)))
        if not endpoints:
            raise ConfigError(f'--registry "{url}": name at least one etcd endpoint host:port')
        from .etcd import EtcdStore
        prefix = "/" + path.strip("/") if path.strip("/") else PREFIX
        return EtcdStore(endpoints, clock), prefix
    raise ConfigError(f'--registry "{url}": the registries are sqlite:///path and '
                      "etcd://host:port[,host:port...][/prefix]")
