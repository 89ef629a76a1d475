"""Links, and the route to an address, over rtnetlink (pyroute2); route events and the data
plane's lookups go through rtnl.py."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import LinkError, NotFoundError

log = logging.getLogger("tunl.kernel")

IFF_UP = 0x1


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None      # IFLA_INFO_KIND: "tun", "veth", "ipip", … or None
    mtu: int
    up: bool
    alias: str | None


def _link_info(msg) -> LinkInfo:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    return LinkInfo(msg["index"], msg.get_attr("IFLA_IFNAME"), kind, msg.get_attr("IFLA_MTU"),
                    bool(msg["flags"] & IFF_UP), msg.get_attr("IFLA_IFALIAS"))


class Kernel:
    """One rtnetlink socket; use one instance per thread."""

    def __init__(self):
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def links(self) -> list[LinkInfo]:
        return [_link_info(m) for m in self._ipr.get_links()]

    def link(self, name: str) -> LinkInfo | None:
        try:
            msgs = self._ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code == 19:  # ENODEV
                return None
            raise LinkError("get link", name, e.code) from e
        return _link_info(msgs[0])

    def set_link(self, name: str, *, mtu: int | None = None, alias: str | None = None,
                 index: int | None = None) -> None:
        """Change a link, named by `name`, or by `index` when given (a name may change)."""
        kw = {}
        if mtu is not None:
            kw["mtu"] = mtu
        if alias is not None:
            kw["ifalias"] = alias
        try:
            if index is not None:
                self._ipr.link("set", index=index, **kw)
            else:
                self._ipr.link("set", ifname=name, **kw)
        except NetlinkError as e:
            raise LinkError("set link", name, e.code) from e

    def route_get(self, dst: str) -> tuple[str | None, int]:
        """The device the kernel would send to dst through, and that device's MTU."""
        try:
            m = self._ipr.route("get", dst=dst)[0]
        except NetlinkError as e:
            raise NotFoundError(f"no route to {dst}: {os.strerror(e.code)}") from e
        oif = m.get_attr("RTA_OIF")
        link = self._ipr.link("get", index=oif)[0]
        return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")


def _ipv6_conf(name: str, key: str, value: str) -> None:
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/{key}", "w") as f:
            f.write(value)
    except OSError:
        pass  # no IPv6 in this kernel or namespace: nothing to set


def disable_ipv6(name: str) -> None:
    """An ipip device carries no IPv6; keep the TUN device from sending router solicitations."""
    _ipv6_conf(name, "disable_ipv6", "1")


def no_link_local(name: str) -> None:
    """No automatic link-local address (addrgenmode none) on a device that carries IPv6: a TUN
    device would otherwise make up one and send router solicitations through the tunnel."""
    _ipv6_conf(name, "addr_gen_mode", "1")
