"""The kernel data plane: the kernel's own tunnel devices (ipip, ip_gre, sit, ip_vti), made
over netlink by kernel/tunnels.py. The kernel moves the packets; tunl is control plane."""
from __future__ import annotations

from ..dataplane.counters import Counters
from ..model import TunnelSpec


def module_state(mode) -> str:
    from ..kernel.tunnels import module_state as state      # pyroute2 only when needed
    return state(mode)


def missing_module(mode) -> str:
    from ..kernel.tunnels import KIND, MODULE
    return MODULE[KIND[mode]]


class KernelPlane:
    name = "kernel"

    @staticmethod
    def _tunnels():
        from ..kernel.tunnels import KernelTunnels
        return KernelTunnels()

    def add(self, spec: TunnelSpec) -> None:
        with self._tunnels() as k:
            k.add(spec)

    def change(self, spec: TunnelSpec) -> None:
        with self._tunnels() as k:
            k.change(spec)

    def delete(self, name: str) -> None:
        with self._tunnels() as k:
            k.delete(name)

    def prl(self, name: str, action: str, addr, default: bool) -> None:
        self.change(self._owned(name).prl_changed(action, addr, default))

    def sixrd(self, name: str, prefix, relay) -> None:
        self.change(self._owned(name).with_(ip6rd_prefix=prefix, ip6rd_relay_prefix=relay))

    def _owned(self, name: str) -> TunnelSpec:
        spec = self.spec(name)
        assert spec is not None, name       # find() gave this plane for `name`
        return spec

    def spec(self, name: str) -> TunnelSpec | None:
        """ForeignDeviceError for a kernel tunnel tunl did not make."""
        with self._tunnels() as k:
            return k.owned(name)

    def members(self, name: str, addrs) -> None:
        """Only `addrs` may send this tunnel's encapsulation to the host (nftables: the
        kernel's device takes it from anyone); None: anyone may again."""
        from ..kernel import nft
        if addrs is None:
            nft.remove(nft.MEMBERS)
            return
        with self._tunnels() as k:
            spec = k.read(name)
        nft.set_members(spec.mode.value, frozenset(addrs))

    def show(self, name: str | None = None) -> list[dict]:
        with self._tunnels() as k:
            return [status(k.read(n)) for n in k.names() if name in (None, n)]


def status(spec: TunnelSpec) -> dict:
    """A kernel tunnel in the shape tunld reports its own."""
    return {"spec": spec.to_dict(), "dataplane": "kernel", "mtu": _mtu(spec.name),
            "up": _up(spec.name), "counters": _kernel_counters(spec.name, Counters().as_dict())}


def _sys(name: str, what: str) -> str:
    try:
        with open(f"/sys/class/net/{name}/{what}") as f:
            return f.read().strip()
    except OSError:
        return ""


def _mtu(name: str) -> int:
    return int(_sys(name, "mtu") or 0)


def _up(name: str) -> bool:
    return bool(int(_sys(name, "flags") or "0", 16) & 1)


def _kernel_counters(name: str, c: dict) -> dict:
    for k in c:
        if not k.endswith("_drop"):
            v = _sys(name, f"statistics/{k}")
            c[k] = int(v) if v else 0
    return c
