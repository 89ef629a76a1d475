"""Which data plane a command goes to: the kernel's own tunnel devices over netlink, or tunld's
userspace tunnels. `auto` takes the kernel where it has (or can load) the mode's module."""
from __future__ import annotations

import os

from ..errors import UnsupportedError
from ..model import ALIAS_PREFIX, TunnelMode, TunnelSpec


def kernel_tunnels():
    from ..kernel.tunnels import KernelTunnels      # pyroute2 only when it is needed
    return KernelTunnels()


def choose(mode: TunnelMode, asked: str) -> str:
    """"kernel" or "userspace" for a new tunnel."""
    if asked == "userspace":
        return asked
    from ..kernel.tunnels import MODULE, KIND, module_state
    state = module_state(mode)
    if asked == "kernel" and state == "missing":
        mod = MODULE[KIND[mode]]
        raise UnsupportedError(f"--dataplane kernel: this kernel has no {mod} module for mode "
                               f"{mode.value}; use --dataplane userspace (or auto)")
    return "kernel" if state != "missing" else "userspace"


def call(op: str, autostart: bool = True, **args):
    from ..daemon import client      # imported late: `tunl help` must not need a daemon
    return client.call(op, autostart=autostart, **args)


def userspace_devices() -> bool:
    """Whether this namespace has userspace tunnels for tunld to take back: its record says
    so, or, with no record, a TUN device carries a tunl alias. Then a `show` starts tunld;
    otherwise it need not start one."""
    from ..daemon.state import State
    recorded = State().has_tunnels()
    if recorded is not None:
        return recorded
    import glob
    for path in glob.glob("/sys/class/net/*/ifalias"):
        try:
            with open(path) as f:
                if f.read().startswith(ALIAS_PREFIX) and os.path.exists(
                        os.path.join(os.path.dirname(path), "tun_flags")):
                    return True
        except OSError:
            continue
    return False


def kernel_owner(name: str) -> TunnelSpec | None:
    """The spec of a kernel tunnel tunl made (ForeignDeviceError for one it did not), or None
    when `name` is not a kernel tunnel: then it is tunld's business."""
    with kernel_tunnels() as k:
        return k.owned(name)


def status(spec: TunnelSpec) -> dict:
    """A kernel tunnel in the shape tunld reports its own."""
    from ..dataplane.counters import Counters
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
