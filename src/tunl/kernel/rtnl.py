"""A small, fast rtnetlink reader: routes, links and addresses, dumped, looked up and followed,
with the socket module and named offsets alone (no pyroute2).

pyroute2 turns every netlink message into a tree of objects (about 100 µs each) and keeps some
of each `route get`; tunld mirrors the kernel's routes on its few devices while the namespace
around it may hold hundreds of thousands of routes. So this module reads the bytes where they
lie and builds an object only for a message the caller wants:

* `parse(data, want_oifs)` walks the attributes of each route message just far enough to learn
  its output devices (RTA_OIF and the ifindex of every RTA_MULTIPATH hop) and drops the route
  unless one of them is in `want_oifs`. Link and address messages are always returned.
* `Events` follows the multicast groups of links, addresses and routes; `read()` answers None
  when the kernel dropped events (ENOBUFS): the caller resyncs with a dump.
* `Rtnl` asks: dumps of routes, links and addresses, and `route get`.

No logging, no threads, no policy. An OSError of the socket propagates, except the EAGAIN of a
drained socket and the ENOBUFS that `Events.read()` reports as None.

Layouts (all in host byte order; addresses in network byte order), from
include/uapi/linux/netlink.h, include/uapi/linux/rtnetlink.h, include/uapi/linux/if_link.h,
include/uapi/linux/if_addr.h:

    nlmsghdr   16  len u32 @0, type u16 @4, flags u16 @6, seq u32 @8, pid u32 @12
    rtmsg      12  family u8 @0, dst_len @1, src_len @2, tos @3, table @4, protocol @5,
                   scope @6, type @7, flags u32 @8
    ifinfomsg  16  family u8 @0, pad @1, type u16 @2, index i32 @4, flags u32 @8, change u32 @12
    ifaddrmsg   8  family u8 @0, prefixlen @1, flags @2, scope @3, index u32 @4
    rtattr      4  len u16 @0, type u16 @2, payload @4, next at RTA_ALIGN(len) (4 bytes)
    rtnexthop   8  len u16 @0, flags u8 @2, hops u8 @3, ifindex i32 @4, then rtattrs
    rtvia       2+ family u16 @0, address @2
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Container, Union

__all__ = [
    "RouteMsg", "LinkMsg", "AddrMsg", "RouteGet", "Msg", "parse", "Events", "Rtnl",
    "RTMGRP_LINK", "RTMGRP_IPV4_IFADDR", "RTMGRP_IPV4_ROUTE", "RTMGRP_IPV6_IFADDR",
    "RTMGRP_IPV6_ROUTE", "EVENT_GROUPS",
]

# include/uapi/linux/netlink.h
NETLINK_ROUTE = 0
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_REPLACE = 0x100      # the same bit, in a new-route message
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLA_TYPE_MASK = 0x3FFF      # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10        # errors do not echo the request back
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # include/uapi/asm-generic/socket.h

NLMSG_HDRLEN = 16
RTMSG_LEN = 12
IFINFOMSG_LEN = 16
IFADDRMSG_LEN = 8
RTNEXTHOP_LEN = 8

# include/uapi/linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
EVENT_GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
                | RTMGRP_IPV6_ROUTE)

RTA_DST = 1
RTA_SRC = 2
RTA_IIF = 3
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_METRICS = 8
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18

RTAX_MTU = 2                # enum in rtnetlink.h, nested in RTA_METRICS

RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
RTN_MULTICAST = 5
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
RTN_THROW = 9

# include/uapi/linux/if_link.h
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1

# include/uapi/linux/if_addr.h
IFA_ADDRESS = 1
IFA_LOCAL = 2

# include/uapi/linux/if.h
IFF_UP = 0x1

AF_UNSPEC = socket.AF_UNSPEC
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_U32_ATTR = struct.Struct("=HHI")
_I32 = struct.Struct("=i")
_FAMILIES = (AF_INET, AF_INET6)

RECV_BUFSIZE = 1 << 16      # a dump datagram is at most 32 KiB (netlink_dump())
DEFAULT_EVENT_RCVBUF = 16 << 20

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class RouteMsg:
    new: bool                   # RTM_NEWROUTE (True) or RTM_DELROUTE
    family: int                 # AF_INET or AF_INET6
    dst: Network                # RTA_DST/rtm_dst_len; 0.0.0.0/0 or ::/0 for a default route
    gateway: Address | None     # RTA_GATEWAY, or the address of RTA_VIA
    oif: int | None             # RTA_OIF; None for a multipath or a blackhole route
    table: int                  # RTA_TABLE, else rtm_table
    priority: int               # RTA_PRIORITY, else 0
    tos: int                    # rtm_tos
    type: int                   # rtm_type: RTN_UNICAST, RTN_LOCAL, RTN_BLACKHOLE …
    multipath_oifs: tuple[tuple[int, Address | None], ...] = ()  # (ifindex, gateway) per hop
    replace: bool = False       # NLM_F_REPLACE: it took the place of a route with its key,
                                # which may have left through another device


@dataclass(frozen=True, slots=True)
class LinkMsg:
    new: bool                   # RTM_NEWLINK (True) or RTM_DELLINK
    index: int
    name: str | None            # IFLA_IFNAME
    mtu: int | None             # IFLA_MTU
    up: bool                    # IFF_UP in ifi_flags
    kind: str | None            # IFLA_LINKINFO/IFLA_INFO_KIND: "veth", "ipip" … or None


@dataclass(frozen=True, slots=True)
class AddrMsg:
    new: bool                   # RTM_NEWADDR (True) or RTM_DELADDR
    family: int
    index: int
    address: Address | None     # IFA_ADDRESS, else IFA_LOCAL
    prefixlen: int


@dataclass(frozen=True, slots=True)
class RouteGet:
    """The kernel's answer to `ip route get`."""
    oif: int | None
    gateway: Address | None
    prefsrc: Address | None
    mtu: int                    # RTAX_MTU in RTA_METRICS, 0 when absent


Msg = Union[RouteMsg, LinkMsg, AddrMsg]


def _address(family: int, raw: bytes) -> Address | None:
    if family == AF_INET and len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if family == AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    return None


def _gateway(buf, h, family: int, t: int, a: int, alen: int) -> Address | None:
    """The next hop of an RTA_GATEWAY or RTA_VIA attribute."""
    if t == RTA_VIA:
        return _via(buf, h, a, alen)
    return _address(family, bytes(buf[a + 4:a + alen]))


def _via(buf, h, a: int, alen: int) -> Address | None:
    """The address of the struct rtvia attribute at a (family u16, then the address)."""
    if alen < 6:
        return None
    return _address(h[(a >> 1) + 2], bytes(buf[a + 6:a + alen]))


def _attrs(h, a: int, end: int):
    """(type, offset, length) of each rtattr in [a, end): the walk of every slow path (the
    filter of wanted routes keeps its own inline loop)."""
    while a + 4 <= end:
        alen = h[a >> 1]
        if alen < 4 or a + alen > end:
            return
        yield h[(a >> 1) + 1] & NLA_TYPE_MASK, a, alen
        a += (alen + 3) & ~3


def _route(buf, h, w, off: int, mlen: int, mtype: int) -> RouteMsg:
    """Build the RouteMsg of the route message at off (the slow path: wanted routes only)."""
    family, dst_len, _src_len, tos, table, _proto, _scope, rtype = buf[off + 16:off + 24]
    dst = gateway = oif = None
    priority = 0
    hops: tuple = ()
    for t, a, alen in _attrs(h, off + NLMSG_HDRLEN + RTMSG_LEN, off + mlen):
        if t == RTA_DST:
            dst = bytes(buf[a + 4:a + alen])
        elif t == RTA_OIF:
            oif = w[(a >> 2) + 1]
        elif t in (RTA_GATEWAY, RTA_VIA):
            gateway = _gateway(buf, h, family, t, a, alen)
        elif t == RTA_PRIORITY:
            priority = w[(a >> 2) + 1]
        elif t == RTA_TABLE:
            table = w[(a >> 2) + 1]
        elif t == RTA_MULTIPATH:
            hops = _multipath(buf, h, w, family, a + 4, a + alen)
    if family == AF_INET:
        net = ipaddress.IPv4Network((dst if dst and len(dst) == 4 else 0, dst_len), strict=False)
    else:
        net = ipaddress.IPv6Network((dst if dst and len(dst) == 16 else 0, dst_len), strict=False)
    return RouteMsg(mtype == RTM_NEWROUTE, family, net, gateway, oif, table, priority, tos,
                    rtype, hops, bool(h[(off >> 1) + 3] & NLM_F_REPLACE))


def _multipath(buf, h, w, family: int, p: int, end: int) -> tuple:
    hops = []
    while p + RTNEXTHOP_LEN <= end:
        nlen = h[p >> 1]
        if nlen < RTNEXTHOP_LEN or p + nlen > end:
            break
        gw = None
        for t, a, alen in _attrs(h, p + RTNEXTHOP_LEN, p + nlen):
            if t in (RTA_GATEWAY, RTA_VIA):
                gw = _gateway(buf, h, family, t, a, alen)
        hops.append((w[(p >> 2) + 1], gw))
        p += (nlen + 3) & ~3
    return tuple(hops)


def _hop_wanted(h, w, p: int, end: int, want: Container[int]) -> bool:
    """Whether one of the rtnexthops in [p, end) leaves through a device in want."""
    while p + RTNEXTHOP_LEN <= end:
        if w[(p >> 2) + 1] in want:
            return True
        nlen = h[p >> 1]
        if nlen < RTNEXTHOP_LEN:
            break
        p += (nlen + 3) & ~3
    return False


def _link(buf, h, w, off: int, mlen: int, mtype: int) -> LinkMsg:
    _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(buf, off + NLMSG_HDRLEN)
    name = mtu = kind = None
    for t, a, alen in _attrs(h, off + NLMSG_HDRLEN + IFINFOMSG_LEN, off + mlen):
        if t == IFLA_IFNAME:
            name = _string(buf, a + 4, a + alen)
        elif t == IFLA_MTU:
            mtu = w[(a >> 2) + 1]
        elif t == IFLA_LINKINFO:
            for nt, n, nlen in _attrs(h, a + 4, a + alen):
                if nt == IFLA_INFO_KIND:
                    kind = _string(buf, n + 4, n + nlen)
                    break
    return LinkMsg(mtype == RTM_NEWLINK, index, name, mtu, bool(flags & IFF_UP), kind)


def _string(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).split(b"\0", 1)[0].decode("utf-8", "replace")


def _addr(buf, h, w, off: int, mlen: int, mtype: int) -> AddrMsg:
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(buf, off + NLMSG_HDRLEN)
    address = local = None
    for t, a, alen in _attrs(h, off + NLMSG_HDRLEN + IFADDRMSG_LEN, off + mlen):
        if t == IFA_ADDRESS:
            address = _address(family, bytes(buf[a + 4:a + alen]))
        elif t == IFA_LOCAL:
            local = _address(family, bytes(buf[a + 4:a + alen]))
    return AddrMsg(mtype == RTM_NEWADDR, family, index, address if address is not None else local,
                   prefixlen)


class _Status:
    """What _parse_into met besides the messages: the end of a dump, an error, an interrupted
    dump. Reused by a request; nothing of it outlives the call."""
    __slots__ = ("done", "error", "intr")

    def __init__(self):
        self.done = False
        self.error: int | None = None
        self.intr = False


def _parse_into(buf, n: int, want: Container[int] | None, out: list,
                seq: int = 0, status: _Status | None = None) -> None:
    """Append the messages of buf[:n] to out. With a status (a request's answer), skip the
    messages of other sequence numbers and note NLMSG_DONE, NLMSG_ERROR and NLM_F_DUMP_INTR."""
    if n & 3:                       # messages are NLMSG_ALIGNed; be safe with a stray tail
        buf = bytes(buf[:n]) + bytes(4 - (n & 3))
        n += 4 - (n & 3)
    mv = memoryview(buf)[:n]
    h = mv.cast("H")
    w = mv.cast("I")
    off = 0
    append = out.append
    while off + NLMSG_HDRLEN <= n:
        mlen = w[off >> 2]
        if mlen < NLMSG_HDRLEN or off + mlen > n:
            break
        mtype = h[(off >> 1) + 2]
        if status is not None:
            if w[(off >> 2) + 2] != seq:        # an answer to an earlier request
                off += (mlen + 3) & ~3
                continue
            if h[(off >> 1) + 3] & NLM_F_DUMP_INTR:
                status.intr = True
        if mtype == RTM_NEWROUTE or mtype == RTM_DELROUTE:
            if mlen < NLMSG_HDRLEN + RTMSG_LEN or buf[off + 16] not in _FAMILIES:
                pass
            elif want is None or h[(off >> 1) + 3] & NLM_F_REPLACE:
                # a replace is kept whatever its device: the route it replaced may have left
                # through a wanted one (fib_table_insert() sends no RTM_DELROUTE for it)
                append(_route(buf, h, w, off, mlen, mtype))
            else:
                # the fast path: read attribute headers until RTA_OIF or RTA_MULTIPATH
                a = off + NLMSG_HDRLEN + RTMSG_LEN
                end = off + mlen
                while a + 4 <= end:
                    alen = h[a >> 1]
                    t = h[(a >> 1) + 1] & NLA_TYPE_MASK
                    if t == RTA_OIF:
                        if w[(a >> 2) + 1] in want:
                            append(_route(buf, h, w, off, mlen, mtype))
                        break
                    if t == RTA_MULTIPATH:
                        if _hop_wanted(h, w, a + 4, a + alen, want):
                            append(_route(buf, h, w, off, mlen, mtype))
                        break
                    if alen < 4:
                        break
                    a += (alen + 3) & ~3
        elif mtype == RTM_NEWLINK or mtype == RTM_DELLINK:
            # Only the device itself (ifi_family AF_UNSPEC). The bridge also sends RTM_NEWLINK
            # and RTM_DELLINK of family AF_BRIDGE to RTMGRP_LINK about its ports
            # (br_ifinfo_notify()): an RTM_DELLINK when a port leaves the bridge, not the system.
            if mlen >= NLMSG_HDRLEN + IFINFOMSG_LEN and buf[off + 16] == AF_UNSPEC:
                append(_link(buf, h, w, off, mlen, mtype))
        elif mtype == RTM_NEWADDR or mtype == RTM_DELADDR:
            if mlen >= NLMSG_HDRLEN + IFADDRMSG_LEN:
                append(_addr(buf, h, w, off, mlen, mtype))
        elif status is not None and (mtype == NLMSG_DONE or mtype == NLMSG_ERROR):
            status.done = True
            # NLMSG_ERROR carries -errno (0: an ack); NLMSG_DONE the dump's error, ≤ 0
            err = _I32.unpack_from(buf, off + NLMSG_HDRLEN)[0] \
                if mlen >= NLMSG_HDRLEN + 4 else 0
            if err < 0:
                status.error = -err
        off += (mlen + 3) & ~3


def parse(data: bytes, want_oifs: Container[int] | None = None) -> list[Msg]:
    """The route, link and address messages in data (one or more netlink messages). With
    want_oifs, a route is kept only if its RTA_OIF or one of its multipath hops is in it; the
    others cost a walk over their attribute headers and build nothing. (A route through a
    nexthop object carries its devices only while net.ipv4.nexthop_compat_mode is 1, the
    default; otherwise it has nothing but RTA_NH_ID, and is dropped.) Other families than
    AF_INET and AF_INET6 (ipmr, mpls) are dropped, and so are link messages of a family other
    than AF_UNSPEC."""
    out: list = []
    _parse_into(data, len(data), want_oifs, out)
    return out


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


class Events:
    """rtnetlink notifications of links, addresses and routes (IPv4 and IPv6).

    A non-blocking socket: poll `fileno()`, then `read()`. The receive buffer is made as large
    as allowed (SO_RCVBUFFORCE, which needs CAP_NET_ADMIN, else SO_RCVBUF up to
    net.core.rmem_max); `rcvbuf` is the size asked for (Linux grants twice that, at least
    2304 bytes; a small one is for tests). `groups` is the nl_groups bitmask of RTMGRP_*."""

    def __init__(self, groups: int = EVENT_GROUPS, rcvbuf: int = DEFAULT_EVENT_RCVBUF):
        self._sock = _netlink_socket()
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, groups))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray(RECV_BUFSIZE)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def rcvbuf(self) -> int:
        """The receive buffer the kernel granted (twice what was asked, for its bookkeeping)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def read(self, want_oifs: Container[int] | None = None,
             limit: int = 1 << 16) -> list[Msg] | None:
        """Drain the socket (at most `limit` datagrams; the rest stays readable) and return the
        messages, routes filtered as `parse()` does; [] when nothing was queued. None when the
        kernel dropped events because the buffer was full (ENOBUFS): the caller must resync with
        a dump. The socket goes on delivering after that."""
        out: list = []
        lost = False
        buf, recv_into, size = self._buf, self._sock.recv_into, len(self._buf)
        for _ in range(limit):
            try:
                n = recv_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                lost = True
                continue
            if n > size:            # a datagram larger than the buffer: its tail is lost
                lost = True
            elif not lost:
                _parse_into(buf, n, want_oifs, out)
        return None if lost else out

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Events":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Rtnl:
    """Requests over one rtnetlink socket: dumps and `route get`.

    Not thread-safe: use one instance per thread (the requests of two threads would interleave
    on the socket). Each request has its own sequence number and reads only the answers that
    carry it; a request cut short by an exception (from a want_oifs container, say) leaves the
    rest of its answer queued, and the next request reads it away first: an unfinished dump
    would otherwise make the kernel refuse the next one with EBUSY (netlink_dump_start())."""

    def __init__(self):
        self._sock = _netlink_socket()
        try:
            try:
                self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass                # before Linux 4.3: errors echo the request, which is fine
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0
        self._pending = False       # a request whose answer was not read to its end
        self._buf = bytearray(RECV_BUFSIZE)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, mtype: int, flags: int, body: bytes) -> int:
        if self._pending:
            self._drain()
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self._pending = True
        self._sock.send(_NLMSGHDR.pack(NLMSG_HDRLEN + len(body), mtype, flags | NLM_F_REQUEST,
                                       seq, 0) + body)
        return seq

    def _drain(self) -> None:
        """Read away what an abandoned request left: each recv makes the kernel queue the next
        part of an unfinished dump (netlink_recvmsg()), so this ends with the dump."""
        while True:
            try:
                self._sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        self._pending = False

    def _request(self, mtype: int, flags: int, body: bytes,
                 want: Container[int] | None = None) -> tuple[list, _Status]:
        seq = self._send(mtype, flags, body)
        out: list = []
        status = _Status()
        buf, recv_into, size = self._buf, self._sock.recv_into, len(self._buf)
        while not status.done:
            n = recv_into(buf, 0, socket.MSG_TRUNC)
            if n > size:
                raise OSError(errno.EMSGSIZE, f"rtnetlink answer of {n} bytes (> {size})")
            _parse_into(buf, n, want, out, seq, status)
        self._pending = False
        return out, status

    def _dump(self, mtype: int, body: bytes, want: Container[int] | None = None) -> list:
        for _ in range(10):
            out, status = self._request(mtype, NLM_F_DUMP, body, want)
            if status.error:
                raise OSError(status.error, f"rtnetlink dump: {errno.errorcode.get(status.error)}")
            if not status.intr:
                return out
        raise OSError(errno.EINTR, "rtnetlink dump interrupted by changes, 10 times")

    def dump_routes(self, want_oifs: Container[int] | None = None) -> list[RouteMsg]:
        """The IPv4 and IPv6 routes of every table (the local one too), filtered as `parse()`
        does. A dump the kernel marks inconsistent (NLM_F_DUMP_INTR) is retried."""
        return self._dump(RTM_GETROUTE, _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0),
                          want_oifs)

    def dump_links(self) -> list[LinkMsg]:
        return self._dump(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))

    def dump_addrs(self, family: int = 0) -> list[AddrMsg]:
        """The addresses of every device; family 0 for both AF_INET and AF_INET6."""
        return [m for m in self._dump(RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0))
                if not family or m.family == family]

    def route_get(self, dst: str, src: str | None = None,
                  oif: int | None = None) -> RouteGet | int:
        """`ip route get dst [from src] [oif oif]`: the kernel's route, or the errno it answered
        (ENETUNREACH, EHOSTUNREACH, EINVAL …).

        Linux answers ENETUNREACH, not EINVAL, for an IPv4 src that is not an address of this
        host, and EINVAL for a multicast, limited broadcast or 0.0.0.0/8 one
        (ip_route_output_key_hash_rcu()). IPv6 does not check the source at all."""
        family = AF_INET6 if ":" in dst else AF_INET
        alen = 4 if family == AF_INET else 16
        attrs = [_attr(RTA_DST, socket.inet_pton(family, dst))]
        if src is not None:
            attrs.append(_attr(RTA_SRC, socket.inet_pton(family, src)))
        if oif is not None:
            attrs.append(_U32_ATTR.pack(8, RTA_OIF, oif))
        body = _RTMSG.pack(family, alen * 8, alen * 8 if src is not None else 0,
                           0, 0, 0, 0, 0, 0) + b"".join(attrs)
        seq = self._send(RTM_GETROUTE, 0, body)
        buf, size = self._buf, len(self._buf)
        while True:
            n = self._sock.recv_into(buf, 0, socket.MSG_TRUNC)
            if n > size:
                raise OSError(errno.EMSGSIZE, f"rtnetlink answer of {n} bytes (> {size})")
            answer = _route_get_answer(buf, n, seq)
            if answer is not None:
                self._pending = False
                return answer


def _attr(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _RTATTR.pack(n, t) + payload + bytes((-n) & 3)


def _route_get_answer(buf, n: int, seq: int) -> RouteGet | int | None:
    """The RouteGet or errno for request seq in buf[:n]; None when buf holds neither."""
    n &= ~3
    mv = memoryview(buf)[:n]
    h = mv.cast("H")
    w = mv.cast("I")
    off = 0
    while off + NLMSG_HDRLEN <= n:
        mlen = w[off >> 2]
        if mlen < NLMSG_HDRLEN or off + mlen > n:
            break
        mtype = h[(off >> 1) + 2]
        if w[(off >> 2) + 2] == seq:
            if mtype == NLMSG_ERROR:
                err = _I32.unpack_from(buf, off + NLMSG_HDRLEN)[0] if mlen >= 20 else 0
                return -err if err < 0 else errno.EPROTO    # an ack is no route
            if mtype == RTM_NEWROUTE and mlen >= NLMSG_HDRLEN + RTMSG_LEN:
                return _route_get(buf, h, w, off, mlen)
        off += (mlen + 3) & ~3
    return None


def _route_get(buf, h, w, off: int, mlen: int) -> RouteGet:
    family = buf[off + 16]
    oif = gateway = prefsrc = None
    mtu = 0
    for t, a, alen in _attrs(h, off + NLMSG_HDRLEN + RTMSG_LEN, off + mlen):
        if t == RTA_OIF:
            oif = w[(a >> 2) + 1]
        elif t in (RTA_GATEWAY, RTA_VIA):
            gateway = _gateway(buf, h, family, t, a, alen)
        elif t == RTA_PREFSRC:
            prefsrc = _address(family, bytes(buf[a + 4:a + alen]))
        elif t == RTA_METRICS:
            for xt, m, xlen in _attrs(h, a + 4, a + alen):
                if xt == RTAX_MTU and xlen >= 8:
                    mtu = w[(m >> 2) + 1]
    return RouteGet(oif, gateway, prefsrc, mtu)

