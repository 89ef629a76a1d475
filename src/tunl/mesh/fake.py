"""Test doubles for the layers above the mesh: a host that keeps its routes in a set, a clock
that moves only when told, and a store that can be taken down or made to answer garbage."""
from __future__ import annotations

from .network import Lease
from .plan import Op, Route, apply
from .store import RegistryError


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeHost:
    def __init__(self, routes: set[Route] | None = None):
        self.table: set[Route] = set(routes or ())
        self.ops: list[Op] = []
        self.local: list[Lease] = []
        self.fail: set = set()           # destinations whose route changes the kernel refuses
        self.underlay: list = []         # (prefix, device) of links(): --cross-subnet
        self.member_sets: list = []      # every member set handed to the tunnel

    def ensure_local(self, lease: Lease, previous: Lease | None) -> dict[str, str]:
        self.local.append(lease)
        return {"tunnel": "created"}

    def routes(self) -> set[Route]:
        return set(self.table)

    def links(self):
        return list(self.underlay)

    def masquerade(self, network, subnet) -> str:
        self.masq = (network, subnet)
        return "fake"

    def members(self, addrs) -> str:
        self.member_sets.append(frozenset(addrs))
        return "fake"

    def apply(self, ops: list[Op]) -> list[tuple[Op, str]]:
        failed = []
        for op in ops:
            if op.route.dst in self.fail:
                failed.append((op, "Invalid argument"))
                continue
            self.ops.append(op)
            self.table = apply([op], self.table)
        return failed


class DownStore:
    """Wraps a store; while `down` is set every verb raises RegistryError, as an unreachable
    etcd does."""

    def __init__(self, store):
        self._store = store
        self.down = False
        self.url = store.url

    def __getattr__(self, name):
        verb = getattr(self._store, name)
        if not callable(verb):
            return verb

        def call(*a, **kw):
            if self.down:
                raise RegistryError(f"registry {self.url}: down (fake)")
            result = verb(*a, **kw)
            if name == "watch":
                return _DownWatch(self, result)
            return result
        return call


class _DownWatch:
    def __init__(self, owner: DownStore, watch):
        self._owner, self._watch = owner, watch

    def get(self, timeout: float):
        if self._owner.down:
            raise RegistryError("watch: down (fake)")
        return self._watch.get(timeout)

    def close(self) -> None:
        self._watch.close()
