"""What the mesh agent sets on its host over rtnetlink: the bridge and the addresses of the
walkthrough's one-to-many setup, and the on-link routes it tags with its own route protocol
number (the only routes it reads back, changes or deletes)."""
from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import LinkError, NotFoundError

RTNH_F_ONLINK = 4
RT_TABLE_MAIN = 254
CREATED, UPDATED, UNCHANGED = "created", "updated", "unchanged"


class HostNet:
    """One rtnetlink socket; use one instance per thread."""

    def __init__(self):
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> "HostNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def index(self, dev: str) -> int | None:
        found = self._ipr.link_lookup(ifname=dev)
        return found[0] if found else None

    def _names(self) -> dict[int, str]:
        return {m["index"]: m.get_attr("IFLA_IFNAME") for m in self._ipr.get_links()}

    def kind(self, dev: str) -> str | None:
        idx = self.index(dev)
        if idx is None:
            return None
        info = self._ipr.link("get", index=idx)[0].get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else None

    def ensure_bridge(self, name: str) -> str:
        """A bridge named `name`, up: CREATED, or UNCHANGED when one is there (another kind of
        device with that name is an error, never replaced)."""
        kind = self.kind(name)
        if kind is not None and kind != "bridge":
            raise LinkError("ensure bridge", name, errno.EEXIST,
                            f"exists as a {kind} device, not a bridge; tunl leaves it alone")
        made = CREATED if kind is None else UNCHANGED
        try:
            if kind is None:
                self._ipr.link("add", ifname=name, kind="bridge")
            self._ipr.link("set", index=self.index(name), state="up")
        except NetlinkError as e:
            raise LinkError("ensure bridge", name, e.code) from e
        return made

    def set_up(self, dev: str) -> None:
        try:
            self._ipr.link("set", index=self._must(dev), state="up")
        except NetlinkError as e:
            raise LinkError("set up", dev, e.code) from e

    def _must(self, dev: str) -> int:
        idx = self.index(dev)
        if idx is None:
            raise NotFoundError(f'device "{dev}" does not exist')
        return idx

    def addresses(self, dev: str) -> list[IPv4Interface]:
        idx = self.index(dev)
        if idx is None:
            return []
        return [IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
                for m in self._ipr.get_addr(family=socket.AF_INET, index=idx)]

    def ensure_address(self, dev: str, addr: IPv4Interface) -> str:
        if addr in self.addresses(dev):
            return UNCHANGED
        try:
            self._ipr.addr("add", index=self._must(dev), address=str(addr.ip),
                           prefixlen=addr.network.prefixlen)
        except NetlinkError as e:
            raise LinkError("add address", f"{addr} dev {dev}", e.code) from e
        return CREATED

    def remove_address(self, dev: str, addr: IPv4Interface) -> bool:
        if addr not in self.addresses(dev):
            return False
        try:
            self._ipr.addr("del", index=self._must(dev), address=str(addr.ip),
                           prefixlen=addr.network.prefixlen)
        except NetlinkError as e:
            raise LinkError("delete address", f"{addr} dev {dev}", e.code) from e
        return True

    def delete_link(self, dev: str) -> bool:
        idx = self.index(dev)
        if idx is None:
            return False
        try:
            self._ipr.link("del", index=idx)
        except NetlinkError as e:
            raise LinkError("delete link", dev, e.code) from e
        return True

    def routes(self, proto: int) -> list[tuple[IPv4Network, IPv4Address | None, str, bool]]:
        """(dst, via, dev, onlink) of every IPv4 route of the main table with this protocol."""
        names = self._names()
        out = []
        for m in self._ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN, proto=proto):
            if m["proto"] != proto or m.get_attr("RTA_TABLE", m["table"]) != RT_TABLE_MAIN:
                continue
            dst = IPv4Network(f"{m.get_attr('RTA_DST') or '0.0.0.0'}/{m['dst_len']}")
            gw = m.get_attr("RTA_GATEWAY")
            out.append((dst, IPv4Address(gw) if gw else None,
                        names.get(m.get_attr("RTA_OIF"), "?"), bool(m["flags"] & RTNH_F_ONLINK)))
        return out

    def route(self, verb: str, dst: IPv4Network, via: IPv4Address | None, dev: str,
              onlink: bool, proto: int) -> None:
        """`ip route add|replace|del DST [via VIA] dev DEV [onlink] proto PROTO`."""
        kw = dict(dst=str(dst), oif=self._must(dev), proto=proto, table=RT_TABLE_MAIN)
        if via is not None:
            kw["gateway"] = str(via)
        if onlink:
            kw["flags"] = RTNH_F_ONLINK
        try:
            self._ipr.route({"delete": "del"}.get(verb, verb), **kw)
        except NetlinkError as e:
            if verb == "delete" and e.code == errno.ESRCH:
                return      # already gone
            raise LinkError(f"route {verb}", f"{dst} via {via} dev {dev}", e.code) from e

    def source_for(self, dst: str) -> IPv4Address | None:
        """The preferred source of the route to dst (`ip route get`), None without a route."""
        try:
            m = self._ipr.route("get", dst=dst)[0]
        except NetlinkError:
            return None
        src = m.get_attr("RTA_PREFSRC")
        return IPv4Address(src) if src else None


def enable_forwarding() -> str:
    """net.ipv4.ip_forward = 1: the node forwards between its bridge and its tunnel."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == "1":
            return UNCHANGED
    with open(path, "w") as f:
        f.write("1")
    return UPDATED
