"""The eBPF and userspace data planes, both held by tunld (one per network namespace): the
tunnel is a TUN device whose queue tunld reads; on the eBPF plane tc programs move most
packets inside the kernel and tunld moves the rest."""
from __future__ import annotations

import glob
import os
from ipaddress import IPv4Address

from ..errors import NotFoundError
from ..model import ALIAS_PREFIX, TunnelSpec


def call(op: str, autostart: bool = True, **args):
    from ..daemon import client      # imported late: `tunl help` must not need a daemon
    return client.call(op, autostart=autostart, **args)


class TunldPlane:
    """asked: "ebpf", "userspace" or "auto" (tunld takes eBPF where it can load it)."""

    def __init__(self, asked: str = "auto"):
        self.name = asked

    def add(self, spec: TunnelSpec) -> None:
        call("add", spec=spec.to_dict(), dataplane=self.name)

    def change(self, spec: TunnelSpec) -> None:
        call("change", spec=spec.to_dict(), dataplane=self.name)

    def delete(self, name: str) -> None:
        call("del", name=name)

    def prl(self, name: str, action: str, addr, default: bool) -> None:
        call("prl", name=name, action=action, addr=str(addr), default=default)

    def sixrd(self, name: str, prefix, relay) -> None:
        call("sixrd", name=name, prefix=str(prefix) if prefix else None,
             relay=str(relay) if relay else None)

    def members(self, name: str, addrs: frozenset[IPv4Address] | None) -> None:
        call("members", name=name,
             addrs=None if addrs is None else sorted(str(a) for a in addrs))

    def spec(self, name: str) -> TunnelSpec | None:
        try:
            return TunnelSpec.from_dict(call("show", name=name)[0]["spec"])
        except NotFoundError:
            return None

    def show(self, name: str | None = None) -> list[dict]:
        return call("show", autostart=tunld_devices(), name=name)


def tunld_devices() -> bool:
    """Whether this namespace has tunnels for tunld to take back: its record says so, or,
    with no record, a TUN device carries a tunl alias. Then a `show` starts tunld;
    otherwise it need not start one."""
    from ..daemon.state import State
    recorded = State().has_tunnels()
    if recorded is not None:
        return recorded
    for path in glob.glob("/sys/class/net/*/ifalias"):
        try:
            with open(path) as f:
                if f.read().startswith(ALIAS_PREFIX) and os.path.exists(
                        os.path.join(os.path.dirname(path), "tun_flags")):
                    return True
        except OSError:
            continue
    return False
