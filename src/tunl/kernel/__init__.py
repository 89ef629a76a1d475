"""The kernel facade: the only package that imports pyroute2.

Everything above talks to `Kernel` (links, kernel tunnels over pyroute2) and `rtnl` (route
events and lookups, read by hand) and never sees a netlink attribute name.
"""
from .netlink import Kernel, LinkInfo

__all__ = ["Kernel", "LinkInfo"]
