"""Path MTU toward each tunnel peer, learned from ICMP fragmentation needed (RFC 1191)."""
from __future__ import annotations

from typing import Callable

MIN_PMTU = 552              # ip_rt_min_pmtu: 512 + 20 + 20
EXPIRES = 600.0             # ip_rt_mtu_expires: 10 minutes


class PmtuCache:
    """peer (4 bytes) -> learned MTU, expiring like the kernel's route exceptions."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._mtu: dict[bytes, tuple[int, float]] = {}

    def learn(self, peer: bytes, mtu: int) -> int:
        """Record a next-hop MTU; values under MIN_PMTU are raised to it, like __ip_rt_update_pmtu()."""
        mtu = max(mtu, MIN_PMTU)
        self._mtu[peer] = (mtu, self._clock() + EXPIRES)
        return mtu

    def get(self, peer: bytes, default: int) -> int:
        entry = self._mtu.get(peer)
        if entry is None:
            return default
        mtu, until = entry
        if self._clock() >= until:
            del self._mtu[peer]
            return default
        return min(mtu, default)

    def __len__(self) -> int:
        return len(self._mtu)
