"""The kernel facade: the only package that imports pyroute2.

Everything above talks to `Kernel` (or to `FakeKernel` in tests) and never sees a netlink
attribute name.
"""
from .netlink import Kernel, LinkInfo, RouteWatcher

__all__ = ["Kernel", "LinkInfo", "RouteWatcher"]
