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


class TunldXfrm:
    """The IPsec states and policies tunld keeps for the vti tunnels of the userspace data
    plane (tunl.xfrm.XfrmStore): the same verbs as the kernel's xfrm."""

    def _call(self, name: str, item: dict | None = None, update: bool = False):
        return call("xfrm", call=name, item=item, update=update)

    def add_state(self, state, update: bool = False) -> None:
        self._call("add_state", state.to_dict(), update)

    def del_state(self, sid) -> None:
        self._call("del_state", {"dst": str(sid.dst), "spi": sid.spi})

    def get_state(self, sid):
        for e in self.states():
            s = e.state
            if s.dst == sid.dst and s.spi == sid.spi and s.proto == sid.proto:
                return e
        raise NotFoundError(f"xfrm state dst {sid.dst} spi {sid.spi:#010x}: No such process")

    def states(self) -> list:
        from ..xfrm import StateEntry, XfrmState
        return [StateEntry(XfrmState.from_dict(d), d["replay"]["seq"], d["replay"]["oseq"],
                           d["replay"]["bitmap"], d.get("lastused", 0))
                for d in self._call("states")]

    def state_count(self) -> int:
        return len(self._call("states"))

    def flush_states(self) -> None:
        self._call("flush_states")

    def add_policy(self, policy, update: bool = False) -> None:
        self._call("add_policy", policy.to_dict(), update)

    def del_policy(self, pid) -> None:
        self._call("del_policy", {"dir": pid.dir, "src": str(pid.src), "dst": str(pid.dst),
                                  "proto": pid.proto, "mark": pid.mark,
                                  "mark_mask": pid.mark_mask})

    def get_policy(self, pid):
        for e in self.policies():
            p = e.policy
            if p.id == pid:
                return e
        raise NotFoundError(f"xfrm policy dir {pid.dir} src {pid.src} dst {pid.dst}: "
                            "No such file or directory")

    def policies(self) -> list:
        from ..xfrm import PolicyEntry, XfrmPolicy
        return [PolicyEntry(XfrmPolicy.from_dict(d), d.get("index", 0), d.get("ptype"))
                for d in self._call("policies")]

    def flush_policies(self) -> None:
        self._call("flush_policies")

