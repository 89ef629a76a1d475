"""The data-plane seam: one small interface per tunnel (add, change, delete, prl, 6rd, show),
three implementations behind it, and the choice among them.

  kernel     the kernel's own tunnel devices over netlink (planes/kernel.py)
  ebpf       a TUN device with tc BPF programs that encapsulate in the kernel, kept by tunld
  userspace  a TUN device whose packets tunld moves itself

The CLI (and any agent above it) asks `for_new()` for the plane of a new tunnel and `find()`
for the plane that holds an existing one, then talks to the DataPlane it got; it never
branches on a plane's name. `auto` takes, per mode, the kernel where the module is there or
loadable, else eBPF where tunld can load and attach the programs, else userspace (tunld
decides between those two, since it is tunld that loads the programs).
"""
from __future__ import annotations

from ipaddress import IPv4Address
from typing import Protocol

from ..errors import NoDaemonError, NotFoundError, UnsupportedError
from ..model import TunnelMode, TunnelSpec

NAMES = ("auto", "kernel", "ebpf", "userspace")


class DataPlane(Protocol):
    name: str

    def add(self, spec: TunnelSpec) -> None: ...

    def change(self, spec: TunnelSpec) -> None: ...

    def delete(self, name: str) -> None: ...

    def prl(self, name: str, action: str, addr, default: bool) -> None: ...

    def sixrd(self, name: str, prefix, relay) -> None: ...

    def members(self, name: str, addrs: frozenset[IPv4Address] | None) -> None:
        """Only packets whose outer source is in addrs are taken from the underlay; the rest
        are dropped and counted (not_member). None: from anyone (the default); an empty set:
        from no one. Kept across restarts of the plane; deleting the tunnel forgets it."""

    def spec(self, name: str) -> TunnelSpec | None:
        """The tunnel's spec, or None when this plane does not hold it."""

    def show(self, name: str | None = None) -> list[dict]:
        """Status of its tunnels: {"spec", "dataplane", "mtu", "up", "counters", "members",
        ...}; "members" is the size of the member set, None when anyone may send."""


def for_new(mode: TunnelMode, asked: str) -> DataPlane:
    """The plane a new tunnel of this mode goes to, for --dataplane `asked`."""
    from .kernel import KernelPlane, module_state, missing_module
    from .tunld import TunldPlane
    if asked not in NAMES:
        from ..errors import ConfigError
        raise ConfigError(f'--dataplane "{asked}": the data planes are {", ".join(NAMES)}')
    if asked in ("ebpf", "userspace"):
        return TunldPlane(asked)
    state = module_state(mode)
    if asked == "kernel":
        if state == "missing":
            raise UnsupportedError(f"--dataplane kernel: this kernel has no {missing_module(mode)} "
                                   f"module for mode {mode.value}; use --dataplane ebpf or "
                                   "userspace (or auto)")
        return KernelPlane()
    return KernelPlane() if state != "missing" else TunldPlane("auto")


def find(name: str, verb: str = "get") -> tuple[DataPlane, TunnelSpec]:
    """The plane that holds tunnel `name`, and its spec (ForeignDeviceError for a kernel
    device tunl did not make; NotFoundError, in the words of `ip tunnel VERB`, when there is
    none)."""
    from .kernel import KernelPlane
    from .tunld import TunldPlane
    for plane in (KernelPlane(), TunldPlane("auto")):
        spec = plane.spec(name)
        if spec is not None:
            return plane, spec
    raise NotFoundError(f'{verb} tunnel "{name}" failed: No such device')


def show(name: str | None = None) -> list[dict]:
    """Every tunnel of every plane (kernel devices first, as `ip tunnel show` lists them)."""
    from .kernel import KernelPlane
    from .tunld import TunldPlane
    found = KernelPlane().show(name)
    if name and found:
        return found
    try:
        found += TunldPlane("auto").show(name)
    except NotFoundError:
        if not found and name:
            raise
    except NoDaemonError:
        if name and not found:
            raise NotFoundError(f'get tunnel "{name}" failed: No such device') from None
    return found
