"""What the mesh agent sets on its host over rtnetlink: the bridge and the addresses of the
walkthrough's one-to-many setup, and the on-link routes it tags with its own route protocol
number (the only routes it reads back, changes or deletes)."""
from __future__ import annotations

import errno
import socket
import struct
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import LinkError, NotFoundError

RTNH_F_ONLINK = 4
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
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

    def links(self) -> list[tuple[IPv4Network, str]]:
        """(prefix, dev) of every connected IPv4 route of the main table (scope link, no
        gateway): the subnets this host reaches without a router."""
        names = self._names()
        out = []
        for m in self._ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if m["scope"] != RT_SCOPE_LINK or m.get_attr("RTA_GATEWAY") or \
                    m.get_attr("RTA_TABLE", m["table"]) != RT_TABLE_MAIN or m["type"] != 1:
                continue
            out.append((IPv4Network(f"{m.get_attr('RTA_DST') or '0.0.0.0'}/{m['dst_len']}"),
                        names.get(m.get_attr("RTA_OIF"), "?")))
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


# -- the agent's routes in bulk, over plain rtnetlink ----------------------------------------
# pyroute2 decodes every attribute of every route of a dump into objects (0.3 s for 1,000
# routes) and waits for each change's answer before the next; a mesh node with 1,000 peers
# needs neither. These read only the few fields the agent keeps, and send changes in batches.

_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE, RTN_UNICAST = 0, 255, 1
BATCH = 200


def _attr(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _RTA.pack(n, t) + payload + b"\0" * (-n & 3)


class RouteTable:
    """The routes of one protocol number in the main table: dump() and apply() in bulk."""

    def __init__(self, proto: int):
        from .rtnl import _netlink_socket
        self.proto = proto
        self.sock = _netlink_socket()
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.seq = int(time.monotonic()) & 0xFFFF

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def dump(self) -> list[tuple[IPv4Network, IPv4Address | None, int, bool]]:
        """(dst, via, oif, onlink) of every IPv4 route of the main table with the protocol."""
        from . import rtnl
        seq = self._next()
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        self.sock.send(_NLMSG.pack(16 + len(body), rtnl.RTM_GETROUTE,
                                   rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP, seq, 0) + body)
        out = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                mlen, mtype, flags, mseq, _ = _NLMSG.unpack_from(data, off)
                if mlen < 16:
                    break
                if mseq == seq:
                    if mtype == rtnl.NLMSG_DONE:
                        return out
                    if mtype == rtnl.NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        raise LinkError("dump routes", f"proto {self.proto}", code)
                    if mtype == rtnl.RTM_NEWROUTE:
                        r = self._route(data, off, mlen)
                        if r is not None:
                            out.append(r)
                off += (mlen + 3) & ~3

    def _route(self, data: bytes, off: int, mlen: int):
        family, dst_len, _, _, table, proto, _, _, flags = _RTMSG.unpack_from(data, off + 16)
        if proto != self.proto or family != socket.AF_INET:
            return None
        dst, via, oif = b"\0\0\0\0", None, 0
        a, end = off + 16 + _RTMSG.size, off + mlen
        while a + 4 <= end:
            alen, t = _RTA.unpack_from(data, a)
            if alen < 4:
                break
            if t == 1:                                          # RTA_DST
                dst = data[a + 4:a + 8]
            elif t == 5:                                        # RTA_GATEWAY
                via = IPv4Address(data[a + 4:a + 8])
            elif t == 4:                                        # RTA_OIF
                oif = struct.unpack_from("=I", data, a + 4)[0]
            elif t == 15:                                       # RTA_TABLE
                table = struct.unpack_from("=I", data, a + 4)[0]
            a += (alen + 3) & ~3
        if table != RT_TABLE_MAIN:
            return None
        return (IPv4Network((int.from_bytes(dst, "big"), dst_len)), via, oif,
                bool(flags & RTNH_F_ONLINK))

    def apply(self, changes: list[tuple[str, IPv4Network, IPv4Address | None, int, bool]]
              ) -> list[tuple[int, int]]:
        """Carry out (verb, dst, via, oif, onlink) changes, BATCH requests per send; returns
        (position, errno) of each one the kernel refused (a delete of a route already gone
        is no error)."""
        from . import rtnl
        failed = []
        for start in range(0, len(changes), BATCH):
            batch = changes[start:start + BATCH]
            seqs, msgs = {}, []
            for i, (verb, dst, via, oif, onlink) in enumerate(batch, start):
                if verb == "delete":
                    mtype, flags, scope, rtype = rtnl.RTM_DELROUTE, 0, RT_SCOPE_NOWHERE, 0
                else:
                    mtype, rtype, scope = rtnl.RTM_NEWROUTE, RTN_UNICAST, RT_SCOPE_UNIVERSE
                    flags = NLM_F_CREATE | (rtnl.NLM_F_REPLACE if verb == "replace"
                                            else NLM_F_EXCL)
                body = _RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN,
                                   self.proto, scope, rtype, RTNH_F_ONLINK if onlink else 0)
                body += _attr(1, dst.network_address.packed) + _attr(4, struct.pack("=I", oif))
                if via is not None:
                    body += _attr(5, via.packed)
                seq = self._next()
                seqs[seq] = (i, verb)
                msgs.append(_NLMSG.pack(16 + len(body), mtype,
                                        rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK | flags, seq, 0)
                            + body)
            self.sock.send(b"".join(msgs))
            while seqs:
                data = self.sock.recv(1 << 16)
                off = 0
                while off + 16 <= len(data):
                    mlen, mtype, _, mseq, _ = _NLMSG.unpack_from(data, off)
                    if mlen < 16:
                        break
                    if mtype == rtnl.NLMSG_ERROR and mseq in seqs:
                        i, verb = seqs.pop(mseq)
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        if code and not (verb == "delete" and code == errno.ESRCH):
                            failed.append((i, code))
                    off += (mlen + 3) & ~3
        return failed
