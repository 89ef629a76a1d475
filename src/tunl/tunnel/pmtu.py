"""Path MTU toward each tunnel peer, learned from ICMP fragmentation needed (RFC 1191)."""
from __future__ import annotations

from typing import Callable

MIN_PMTU = 552              # ip_rt_min_pmtu: 512 + 20 + 20
EXPIRES = 600.0             # ip_rt_mtu_expires: 10 minutes
MAX_ENTRIES = 4096


class PmtuCache:
    """peer (4 bytes) -> learned MTU, expiring like the kernel's route exceptions."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._mtu: dict[bytes, tuple[int, float]] = {}

    def learn(self, peer: bytes, mtu: int) -> int:
        """Record a next-hop MTU; values under MIN_PMTU are raised to it, like __ip_rt_update_pmtu().

        A larger MTU than the one in force is ignored: RFC 1191 §3, a host MUST NOT increase its
        estimate in response to a Datagram Too Big (the kernel's `old_mtu < mtu: return`).
        Returns the MTU in force afterwards.
        """
        mtu = max(mtu, MIN_PMTU)
        now = self._clock()
        if len(self._mtu) >= MAX_ENTRIES:       # forget what has expired before growing
            for p, (_m, until) in list(self._mtu.items()):
                if now >= until:
                    self._mtu.pop(p, None)
        entry = self._mtu.get(peer)
        if entry is not None and now < entry[1] and entry[0] < mtu:
            return entry[0]
        self._mtu[peer] = (mtu, now + EXPIRES)
        return mtu

    def get(self, peer: bytes, default: int) -> int:
        entry = self._mtu.get(peer)
        if entry is None:
            return default
        mtu, until = entry
        if self._clock() >= until:
            self._mtu.pop(peer, None)       # another thread may have dropped it already
            return default
        return min(mtu, default)

    def __len__(self) -> int:
        return len(self._mtu)
