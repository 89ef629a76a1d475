"""Links, routes and their changes over rtnetlink (pyroute2)."""
from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE,
                                   RTMGRP_LINK)

from ..errors import LinkError, NotFoundError
from ..model import Route

log = logging.getLogger("tunl.kernel")

IFF_UP = 0x1
RTN_UNICAST = 1
RT_TABLE_LOCAL = 255


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

    def routes(self, ifindex: int) -> list[Route]:
        """Unicast IPv4 and IPv6 routes out of a device, in every table but the local one."""
        out = []
        for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for m in self._ipr.get_routes(family=family, oif=ifindex):
                if m["type"] != RTN_UNICAST or m["table"] == RT_TABLE_LOCAL:
                    continue
                dst = m.get_attr("RTA_DST") or any_addr
                gw = m.get_attr("RTA_GATEWAY")
                table = m.get_attr("RTA_TABLE") or m["table"]
                out.append(Route(ipaddress.ip_network(f"{dst}/{m['dst_len']}"),
                                 ipaddress.ip_address(gw) if gw else None, table))
        return out

    def prefixes6(self, ifindex: int) -> tuple:
        """The IPv6 prefixes of the addresses on a device (ipv6_chk_prefix())."""
        return tuple(ipaddress.IPv6Network(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}",
                                           strict=False)
                     for m in self._ipr.get_addr(family=socket.AF_INET6, index=ifindex))

    def route_via(self, dst: str) -> tuple[int, bytes | None] | None:
        """(ifindex, gateway) the kernel routes an IPv4 address through; None when it cannot
        route it."""
        try:
            m = self._ipr.route("get", dst=dst)[0]
        except NetlinkError:
            return None
        gw = m.get_attr("RTA_GATEWAY")
        return m.get_attr("RTA_OIF"), socket.inet_aton(gw) if gw else None

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


class RouteWatcher:
    """Calls `changed(kernel)` after every batch of route, IPv6 address or link events, from
    its own thread, with a Kernel that belongs to that thread (pyroute2 sockets are per thread)."""

    def __init__(self, changed: Callable[["Kernel"], None]):
        self._changed = changed
        self._stop_r, self._stop_w = os.pipe()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="route-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        ipr = IPRoute()
        ipr.bind(groups=RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_LINK)
        kernel = Kernel()
        self._ready.set()
        fd = ipr.fileno()
        try:
            while True:
                self._sync(kernel)
                r, _, _ = select.select([fd, self._stop_r], [], [])
                if self._stop_r in r:
                    return
                try:
                    ipr.get()
                except Exception:  # an overrun: a fresh dump resyncs all the same
                    log.exception("route events")
        finally:
            ipr.close()
            kernel.close()

    def _sync(self, kernel: "Kernel") -> None:
        try:
            self._changed(kernel)
        except Exception:
            log.exception("route resync")

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(2)
