"""Which tunnel a received packet belongs to, in the order of ip_tunnel_lookup()."""
from __future__ import annotations

from typing import Sequence, TypeVar

from .outer import ANY

T = TypeVar("T")


def lookup(tunnels: Sequence[tuple[bytes, bytes, T]], src: bytes, dst: bytes) -> T | None:
    """tunnels: (local, remote, value) with ANY for unset; src and dst: the outer addresses.

    Like ip_tunnel_lookup() for keyless tunnels: first local and remote both match, then the
    remote alone (local any), then the local alone (remote any) or, for a packet sent to a
    multicast group, a broadcast tunnel whose remote is that group, then a tunnel with neither.
    Among equals the first one added wins.
    """
    remote_only = local_only = wildcard = None
    for local, remote, value in tunnels:
        if remote == src:
            if local == dst:
                return value
            if local == ANY and remote_only is None:
                remote_only = value
        elif remote == ANY:
            if local == dst and local_only is None:
                local_only = value
            elif local == ANY and wildcard is None:
                wildcard = value
        elif remote == dst and dst[0] >> 4 == 14 and local_only is None:
            local_only = value  # ipv4_is_multicast(local): a broadcast tunnel's group
    for v in (remote_only, local_only, wildcard):
        if v is not None:
            return v
    return None
