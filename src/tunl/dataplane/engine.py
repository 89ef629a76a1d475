"""The userspace forwarding engine of one network namespace.

Egress, one thread for every tunnel (epoll over their TUN queues): TUN read → outer destination
(the remote, or for NBMA the next hop of the mirrored kernel route) → the path to it, as the
kernel's route lookup gives it (device, MTU; the `local` address must still be this host's)
→ path MTU check (tnl_update_pmtu()) → the mode's codec writes its headers in the headroom →
raw socket send.
Ingress, one thread per outer protocol (4, 47, 41): raw receive → the codec module's demux
(outer checks, GRE key) → tunnel lookup (ip_tunnel_lookup()) → the outer source must be in the
tunnel's member set, if it has one → the tunnel's codec checks and decapsulates → TUN write.
One more thread learns path MTUs from ICMP.

Threads block in system calls (releasing the GIL) and never raise on a bad packet: they drop
and count. The number of threads does not grow with the number of tunnels. Tables the hot
path reads (routes, the lookup lists, paths) are snapshots that the control thread replaces
whole.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from typing import Callable

from ..model import Route, TunnelMode, TunnelSpec
from ..tunnel import modes
from ..tunnel.lookup import lookup
from ..tunnel.outer import ANY, HEADROOM, v4_compatible
from ..tunnel.pmtu import PmtuCache
from ..tunnel.vti import PROTO_ESP, Xfrm
from ..wire import icmp, icmpv6, ipv4
from ..wire.drop import Drop
from ..wire.ipv4 import IPV4_HLEN, PROTO_GRE, PROTO_ICMP, PROTO_IPIP, PROTO_IPV6
from ..wire.ipv6 import IPV6_HLEN, MIN_MTU as IPV6_MIN_MTU
from . import rawsock
from .counters import Counters
from .fib import Fib
from .ratelimit import RateLimitedLog

LOG = RateLimitedLog(logging.getLogger("tunl.dataplane"))

MAX_PACKET = 65535
BATCH = 64          # packets read from one queue before the next queue's turn
MAX_PATHS = 4096    # remembered outer destinations per tunnel (NBMA: one per next hop)
TUNNEL_PROTOS = (PROTO_IPIP, PROTO_GRE, PROTO_IPV6, PROTO_ESP)
MIN_LEN = {4: IPV4_HLEN, 6: IPV6_HLEN}

# how ip_tunnel_rcv() counts a dropped packet, beyond rx_errors
RX_COUNTER = {Drop.CSUM_MISMATCH: "rx_crc_errors", Drop.BAD_CSUM: "rx_crc_errors",
              Drop.OUT_OF_SEQ: "rx_fifo_errors", Drop.ECN: "rx_frame_errors"}


class TunnelPlane:
    """The runtime of one tunnel: its device queue, codec, routes, paths and counters."""

    def __init__(self, spec: TunnelSpec, fd: int, ifindex: int, mtu: int, sender,
                 members: frozenset[bytes] | None = None, xfrm=None):
        self.fd = fd
        self.xfrm = xfrm                  # the namespace's IPsec states and policies (vti)
        self.ifindex = ifindex
        self.mtu = mtu
        # the outer sources (4 bytes each) this tunnel takes packets from; None: anyone
        self.members = members
        self.counters = Counters()
        self.ident = 0
        self.fib4 = Fib()
        self.fib6 = Fib(bits=128)
        # outer destination -> (Drop or None, path MTU): the kernel's route lookup, remembered
        # until routes, links or addresses change (or a second passes, for learned MTUs)
        self.paths: dict[bytes, tuple] = {}
        self.asked: dict[bytes, bytes] = {}  # inner destination -> next hop the kernel gave
        self.up = False
        self.stopping = False
        self.configure(spec, sender)

    def configure(self, spec: TunnelSpec, sender) -> None:
        self.sock = sender
        old = getattr(self, "codec", None)
        self.spec = spec
        self.codec = modes.codec_for(spec, self.xfrm)
        for seq in ("o_seqno", "i_seqno"):     # ip_tunnel_update() keeps them
            if hasattr(old, seq) and hasattr(self.codec, seq):
                setattr(self.codec, seq, getattr(old, seq))
        self.proto = self.codec.proto
        self.remote = spec.remote.packed if spec.remote else None
        self.local = str(spec.local) if spec.local else None
        # isatap asks the next hop even with a remote (ipip6_tunnel_xmit())
        self.fixed_dst = self.remote is not None and spec.mode is not TunnelMode.ISATAP
        self.addr = (str(spec.remote), 0) if spec.remote else None
        self.endpoints = (spec.local.packed if spec.local else ANY,
                          spec.remote.packed if spec.remote else ANY)
        self.paths = {}

    def count_rx_drop(self, why: Drop) -> None:
        c = self.counters
        c.rx_errors += 1
        field = RX_COUNTER.get(why)
        if field:
            setattr(c, field, getattr(c, field) + 1)
        c.rx_drop[why] += 1

    def count_tx_drop(self, why: Drop, field: str | None = None) -> None:
        c = self.counters
        c.tx_errors += 1
        if field:
            setattr(c, field, getattr(c, field) + 1)
        c.tx_drop[why] += 1


class Engine:
    """route_via(dst, src=None, dev=None) -> (ifindex, gateway, mtu) of the kernel's route to
    an IPv4 address (from `src`, which must be an address of this host, out of device `dev`),
    None when the kernel cannot route it; mtu is the path MTU the route gives (its mtu metric,
    else its device's). The daemon gives it, since only kernel/ talks netlink."""

    def __init__(self, clock: Callable[[], float],
                 route_via: Callable[..., tuple | None] = lambda dst, src=None, dev=None: None):
        self.route_via = route_via
        self.xfrm = Xfrm()              # IPsec states and policies of the namespace (vti)
        self.tunnels: dict[str, TunnelPlane] = {}
        self.pmtu = PmtuCache(clock)
        self.on_pmtu: Callable[[bytes, int], None] | None = None   # a path MTU was learned
        self._unmatched: list[Counter] = []    # received packets no tunnel took, by reason
        self._ingress_busy: list[list[int]] = []
        self.icmp_frag_needed = 0
        # proto -> GRE key (None: no key) -> ((local, remote, plane), ...) of the up tunnels
        self._tables: dict[int, dict] = {p: {} for p in TUNNEL_PROTOS}
        self._peers: frozenset = frozenset()
        self._receivers: dict[int, socket.socket] = {}
        self._senders: dict[tuple, list] = {}     # (dev, local) -> [socket, users]
        self._stopping = False
        self._icmp = rawsock.receiver(PROTO_ICMP)
        self._wake_r, self._wake_w = os.pipe()
        # egress: one epoll over every tunnel's queue; fd -> plane, replaced whole on change
        self._kick_r, self._kick_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # egress only
        self._epoll = select.epoll()
        self._epoll.register(self._kick_r, select.EPOLLIN)
        self._by_fd: dict[int, TunnelPlane] = {}
        self._epoch = 0               # bumped each time the egress thread comes back from epoll
        self._threads = [threading.Thread(target=self._icmp_loop, name="icmp", daemon=True),
                         threading.Thread(target=self._egress, name="egress", daemon=True)]
        self._started = False

    # -- control (called from the daemon's thread) ------------------------------------------

    def start(self) -> None:
        for t in self._threads[:2]:
            t.start()
        self._started = True

    def stop(self) -> None:
        for name in list(self.tunnels):
            os.close(self.remove(name))
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._kick()
        for t in self._threads:
            if t.is_alive():
                t.join(2)
        for sock in (self._icmp, *self._receivers.values()):
            sock.close()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w, self._kick_r, self._kick_w):
            os.close(fd)

    def _kick(self) -> None:
        try:
            os.write(self._kick_w, b"x")
        except BlockingIOError:
            pass                 # already full of kicks: the thread wakes all the same

    @staticmethod
    def _sender_key(spec: TunnelSpec) -> tuple:
        return spec.dev, str(spec.local) if spec.local else None

    def _sender(self, spec: TunnelSpec):
        """One raw sending socket per underlay device and local address, shared by the
        tunnels that have both alike."""
        key = self._sender_key(spec)
        entry = self._senders.get(key)
        if entry is None:
            entry = self._senders[key] = [rawsock.sender(*key), 0]
        entry[1] += 1
        return entry[0]

    def _release(self, spec: TunnelSpec) -> None:
        key = self._sender_key(spec)
        entry = self._senders[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._senders[key]
            entry[0].close()

    def add(self, spec: TunnelSpec, fd: int, ifindex: int, mtu: int,
            members: frozenset[bytes] | None = None) -> TunnelPlane:
        """members: the outer sources the tunnel takes packets from (None: anyone), in force
        before its first packet."""
        t = TunnelPlane(spec, fd, ifindex, mtu, self._sender(spec), members, self.xfrm)
        self._receive(t.proto)
        self.tunnels[spec.name] = t
        self._by_fd = {**self._by_fd, fd: t}
        self._epoll.register(fd, select.EPOLLIN)
        self._reindex()
        return t

    def _receive(self, proto: int) -> None:
        """The first tunnel of a protocol opens its raw socket and ingress thread."""
        if proto in self._receivers:
            return
        sock = self._receivers[proto] = rawsock.receiver(proto)
        th = threading.Thread(target=self._ingress, args=(proto, sock), daemon=True,
                              name=f"ingress-{proto}")
        self._threads.append(th)
        th.start()

    def reconfigure(self, spec: TunnelSpec) -> None:
        t = self.tunnels[spec.name]
        old = t.spec
        t.configure(spec, self._sender(spec))
        self._release(old)
        self._reindex()

    def set_members(self, name: str, members: frozenset[bytes] | None) -> None:
        """The outer sources the tunnel takes packets from from now on (None: anyone). One
        reference replaced: the ingress threads see the old set or the new one whole."""
        self.tunnels[name].members = members

    def rename(self, names: dict[str, str]) -> None:
        """Old name -> new name, all at once (one may take a name another gives up)."""
        planes = [(self.tunnels.pop(old), new) for old, new in names.items()]
        for t, new in planes:
            t.spec = t.spec.with_(name=new)
            self.tunnels[new] = t

    def remove(self, name: str) -> int:
        """Take a tunnel out of the data plane; returns its TUN fd for the caller to close or
        destroy, once the egress thread can no longer be reading it."""
        t = self.tunnels.pop(name)
        self._reindex()
        t.stopping = True
        by_fd = dict(self._by_fd)
        by_fd.pop(t.fd, None)
        self._by_fd = by_fd
        try:
            self._epoll.unregister(t.fd)
        except OSError:
            pass
        deadline = time.monotonic() + 2
        if self._started and self._threads[1].is_alive():
            # wait until the egress thread is back from epoll: then it holds no stale event
            epoch = self._epoch
            self._kick()
            while self._epoch == epoch and time.monotonic() < deadline:
                time.sleep(0.001)
        # and until no ingress thread is between its lookup and its write to the queue
        deadline = time.monotonic() + 2
        for busy in list(self._ingress_busy):
            seen = busy[0]
            while seen & 1 and busy[0] == seen and time.monotonic() < deadline:
                time.sleep(0.001)
        self._release(t.spec)
        return t.fd

    def set_state(self, name: str, routes: list[Route] | None, up: bool, mtu: int,
                  prefixes: tuple | None = None) -> None:
        """The kernel's view of a tunnel device: its routes (None: unchanged), whether it is
        up, its MTU and its IPv6 prefixes (None: unchanged)."""
        t = self.tunnels[name]
        reindex = up != t.up
        if routes is not None:
            v4 = tuple(r for r in routes if r.dst.version == 4)
            v6 = tuple(r for r in routes if r.dst.version == 6)
            if v4 != t.fib4.routes:
                t.fib4 = Fib(v4)
                reindex = True
            if v6 != t.fib6.routes:
                t.fib6 = Fib(v6, bits=128)
            t.asked = {}                       # routes changed: ask the kernel again
        if prefixes is not None and hasattr(t.codec, "set_prefixes"):
            t.codec.set_prefixes(prefixes)
        t.mtu = mtu
        t.up = up
        if reindex:
            self._reindex()

    def paths_changed(self) -> None:
        """Routes, links or addresses of the namespace changed: the path to every outer
        destination is looked up again (the hot path finds an empty table and asks)."""
        for t in list(self.tunnels.values()):
            t.paths = {}
            t.asked = {}

    def _reindex(self) -> None:
        # the hot path reads these tuples; replacing them whole needs no lock
        tables: dict[int, dict] = {p: {} for p in TUNNEL_PROTOS}
        for t in self.tunnels.values():
            if t.up:
                key = t.spec.ikey if t.proto == PROTO_GRE else None
                by_key = tables[t.proto]
                by_key[key] = by_key.get(key, ()) + ((*t.endpoints, t),)
        self._tables = tables
        # the peers whose path MTU ICMP may teach: remotes and the gateways of NBMA routes
        self._peers = frozenset(
            [t.remote for t in self.tunnels.values() if t.remote] +
            [r.gateway.packed for t in self.tunnels.values() for r in t.fib4.routes
             if r.gateway is not None])

    # -- egress -----------------------------------------------------------------------------

    def _egress(self) -> None:
        buf = bytearray(HEADROOM + MAX_PACKET)
        view = memoryview(buf)
        into = [view[HEADROOM:]]
        readv = os.readv
        wake = self._kick_r
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except OSError:
                return                           # closed by stop()
            self._epoch += 1
            by_fd = self._by_fd
            for fd, _ev in events:
                if fd == wake:
                    try:
                        os.read(wake, 4096)
                    except OSError:
                        pass
                    continue
                t = by_fd.get(fd)
                if t is None:
                    continue
                for _ in range(BATCH):           # a fair share, then the next tunnel
                    if t.stopping:
                        break
                    try:
                        n = readv(fd, into)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if not t.stopping:
                            # the device is gone (EBADFD): stop polling its queue, which
                            # would report the error forever; the kernel's event removes it
                            LOG.error("%s: reading the device failed: %s", t.spec.name, e,
                                      key="read")
                            try:
                                self._epoll.unregister(fd)
                            except OSError:
                                pass
                        break
                    try:
                        self._send(t, buf, view, n)
                    except Exception:     # a bug must not stop the tunnel: count it and go on
                        LOG.exception("%s: egress", t.spec.name, key="egress")
                        t.count_tx_drop(Drop.INTERNAL)

    def _path(self, t: TunnelPlane, dst: bytes) -> tuple:
        """(Drop or None, path MTU) to an outer destination, as ip_tunnel_xmit()'s route lookup
        finds it: no route, or the `local` address gone from this host, is NoRoute; a route
        back into this very device is DeadLoop."""
        if len(t.paths) > MAX_PATHS:
            t.paths = {}
        via = self.route_via(socket.inet_ntoa(dst), t.local, t.spec.dev)
        if via is None:
            path = (Drop.NO_ROUTE, 0)
        elif via[0] == t.ifindex:
            path = (Drop.DEAD_LOOP, 0)
        else:
            path = (None, min(via[2] or MAX_PACKET, MAX_PACKET))
        t.paths[dst] = path
        return path

    def _send(self, t: TunnelPlane, buf, view, n: int) -> None:
        H = HEADROOM
        codec = t.codec
        ver = buf[H] >> 4 if n else 0
        if ver not in codec.versions or n < MIN_LEN[ver]:
            t.count_tx_drop(Drop.NOT_IPV4 if 4 in codec.versions else Drop.NOT_IPV6)
            return
        if t.fixed_dst:
            dst, addr = t.remote, t.addr
        else:
            dst = self._nbma_dst(t, buf, ver)
            if dst is None or dst == ANY:
                t.count_tx_drop(Drop.NO_ROUTE, "tx_carrier_errors")       # NoRoute
                return
            addr = (socket.inet_ntoa(dst), 0)
        path = t.paths.get(dst) or self._path(t, dst)
        why, mtu = path
        if why is not None:
            t.count_tx_drop(why, "collisions" if why is Drop.DEAD_LOOP else "tx_carrier_errors")
            return
        if len(self.pmtu):
            mtu = self.pmtu.get(dst, mtu)
        if n + codec.overhead > mtu:
            self._too_big(t, buf, view, n, ver, dst, addr, mtu)
            return
        if not self._encap_send(t, buf, view, H, n, dst, addr):
            # EMSGSIZE: the path shrank before the event reached us; the inner packet is
            # still intact behind the headroom, so answer it as the new path MTU says
            why, mtu = self._path(t, dst)
            if why is None and n + codec.overhead > mtu:
                self._too_big(t, buf, view, n, ver, dst, addr, mtu)
            else:
                t.count_tx_drop(Drop.SEND_FAILED)

    def _encap_send(self, t: TunnelPlane, buf, view, off: int, n: int, dst: bytes,
                    addr) -> bool:
        """Encapsulate and send; False only when the underlay said the packet is too big
        (EMSGSIZE), for the caller to answer it. Every other failure is counted here."""
        t.ident = (t.ident + 1) & 0xFFFF or 1
        start = t.codec.encap(buf, off, n, dst, t.ident)
        if start.__class__ is int:
            end = off + n
        elif start.__class__ is tuple:           # ESP: the packet grew at its end too
            start, end = start
        else:
            t.count_tx_drop(start)
            return True
        try:
            t.sock.sendto(view[start:end], addr)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                return False
            t.count_tx_drop(Drop.SEND_FAILED)
            return True
        c = t.counters
        c.tx_packets += 1
        c.tx_bytes += n
        return True

    def _asked_dst(self, t: TunnelPlane, inner_dst: bytes) -> bytes | None:
        """The kernel routed this packet here before the mirror of its routes caught up (a
        route just added): ask the kernel for the next hop, and remember the answer until the
        routes change again."""
        hop = t.asked.get(inner_dst)
        if hop is None:
            via = self.route_via(socket.inet_ntoa(inner_dst))
            hop = (via[1] or inner_dst) if via is not None and via[0] == t.ifindex else inner_dst
            if len(t.asked) > 4096:
                t.asked = {}
            t.asked[inner_dst] = hop
        return hop

    def _nbma_dst(self, t: TunnelPlane, buf, ver: int) -> bytes | None:
        """The outer destination of a tunnel without remote: the next hop of the route."""
        H = HEADROOM
        if ver == 4:
            inner_dst = bytes(buf[H + 16:H + 20])
            found, gw = t.fib4.lookup(int.from_bytes(inner_dst, "big"))
            if not found:
                return self._asked_dst(t, inner_dst)
            return gw if gw is not None else inner_dst       # rt_nexthop()
        inner_dst = bytes(buf[H + 24:H + 40])
        _found, gw = t.fib6.lookup(int.from_bytes(inner_dst, "big"))
        outer_dst = getattr(t.codec, "outer_dst", None)
        if outer_dst is not None:                             # sit, isatap, 6rd
            return outer_dst(inner_dst, gw)
        return v4_compatible(gw if gw is not None else inner_dst)

    def _too_big(self, t: TunnelPlane, buf, view, n: int, ver: int, dst: bytes, addr,
                 mtu: int) -> None:
        """A packet whose outer packet would not fit the path MTU (tnl_update_pmtu(),
        ipip6_tunnel_xmit() for sit). Without pmtudisc the outer packet has no DF (unless the
        inner IPv4 has it) and goes out in fragments, as the kernel sends it. Otherwise IPv4
        with DF and IPv6 get ICMP fragmentation needed or Packet Too Big with the MTU inside
        the tunnel, never a silent drop; IPv4 without DF is fragmented before it is
        encapsulated; IPv6 on a path under 1280 + the headers goes out in outer fragments
        (sit clears DF there; gre would drop it silently, tunl sends it the same way)."""
        H = HEADROOM
        inner_mtu = mtu - t.codec.overhead
        inner = view[H:H + n]
        if not t.spec.pmtudisc and (ver == 6 or not inner[6] & 0x40):
            # no DF outside: the kernel fragments the outer packet (ip_do_fragment())
            self._send_outer_fragments(t, buf, view, n, dst, addr, mtu)
            return
        if ver == 4:
            if not inner[6] & 0x40:
                pieces = ipv4.fragment(inner, inner_mtu)
                if pieces.__class__ is Drop:
                    t.count_tx_drop(pieces, "tx_dropped")
                    return
                for p in pieces:
                    ln = len(p)
                    buf[H:H + ln] = p
                    if not self._encap_send(t, buf, view, H, ln, dst, addr):
                        t.count_tx_drop(Drop.SEND_FAILED)
                return
            why = Drop.TOO_BIG
            pkt = icmp.error_packet(bytes(inner[16:20]), inner,
                                    icmp.dest_unreach(icmp.FRAG_NEEDED, inner, inner_mtu))
        else:
            if inner_mtu < IPV6_MIN_MTU and n <= IPV6_MIN_MTU:
                self._send_outer_fragments(t, buf, view, n, dst, addr, mtu)
                return
            why = Drop.PACKET_TOO_BIG
            pkt = icmpv6.error_packet(bytes(inner[24:40]), inner,
                                      icmpv6.packet_too_big(inner, max(inner_mtu, IPV6_MIN_MTU)))
        try:
            os.write(t.fd, pkt)   # as if from the far side: the inner destination answers
        except OSError:
            pass
        t.count_tx_drop(why)

    def _send_outer_fragments(self, t: TunnelPlane, buf, view, n: int, dst: bytes, addr,
                              mtu: int) -> None:
        """An outer packet without DF that does not fit the path (nopmtudisc, or sit under
        IPV6_MIN_MTU, where ipip6_tunnel_xmit() clears DF): the kernel fragments it
        (ip_do_fragment()); a raw socket does not, so tunl does."""
        H = HEADROOM
        t.ident = (t.ident + 1) & 0xFFFF or 1
        start, end = t.codec.encap(buf, H, n, dst, t.ident), H + n
        if start.__class__ is tuple:             # ESP: the packet grew at its end too
            start, end = start
        elif start.__class__ is Drop:
            t.count_tx_drop(start)
            return
        buf[start + 6] &= ~0x40 & 0xFF
        ipv4.fix_checksum(buf, start)
        pieces = ipv4.fragment(view[start:end], mtu)
        if pieces.__class__ is Drop:
            t.count_tx_drop(pieces, "tx_dropped")
            return
        try:
            for p in pieces:
                t.sock.sendto(p, addr)
        except OSError:
            t.count_tx_drop(Drop.SEND_FAILED)
            return
        t.counters.tx_packets += 1
        t.counters.tx_bytes += n

    # -- ingress ----------------------------------------------------------------------------

    def _ingress(self, proto: int, sock: socket.socket) -> None:
        buf = bytearray(MAX_PACKET + 1)
        view = memoryview(buf)
        demux = modes.module_for_proto(proto).demux
        recv_into = sock.recv_into
        waiter = select.poll()
        waiter.register(sock.fileno(), select.POLLIN)
        waiter.register(self._wake_r, select.POLLIN)
        unmatched: Counter = Counter()      # this thread's own: no lost increments
        self._unmatched.append(unmatched)
        # odd while a packet is being handed to a tunnel: remove() waits for it to move on
        busy = [0]
        self._ingress_busy.append(busy)
        while not self._stopping:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                waiter.poll()
                continue
            except OSError:
                if self._stopping:
                    return
                continue
            busy[0] += 1
            try:
                self._receive_one(proto, demux, buf, view, n, unmatched)
            except Exception:          # a bug must not stop the protocol: count it, go on
                LOG.exception("ingress %d", proto, key="ingress")
                unmatched[Drop.INTERNAL] += 1
            busy[0] += 1

    def _receive_one(self, proto, demux, buf, view, n: int, unmatched: Counter) -> None:
        r = demux(buf, n)
        if r.__class__ is Drop:
            unmatched[r] += 1
            return
        ihl, end, key, ctx = r
        by_key = self._tables[proto]
        t = lookup(by_key.get(key, ()), buf[12:16], buf[16:20])
        if t is None:
            unmatched[Drop.KEY_MISMATCH if by_key and key not in by_key else Drop.NO_TUNNEL] += 1
            return
        members = t.members
        if members is not None and bytes(buf[12:16]) not in members:
            t.count_rx_drop(Drop.NOT_MEMBER)       # only nodes of the overlay send into it
            return
        r = t.codec.decap_at(buf, ihl, end, ctx)
        if r.__class__ is Drop:
            t.count_rx_drop(r)
            return
        off, ln = r
        c = t.counters
        if t.stopping:                 # removed since the lookup: its fd may be closing
            return
        try:
            os.write(t.fd, view[off:off + ln])
        except OSError:
            c.rx_dropped += 1
            c.rx_drop[Drop.TUNNEL_DOWN] += 1
            return
        c.rx_packets += 1
        c.rx_bytes += ln

    # -- path MTU ---------------------------------------------------------------------------

    def _icmp_loop(self) -> None:
        """Learn a tunnel peer's path MTU from ICMP fragmentation needed about our outer
        packets (what ipip_err() and gre_err() hand to ipv4_update_pmtu())."""
        waiter = select.poll()
        waiter.register(self._icmp.fileno(), select.POLLIN)
        waiter.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            try:
                data = self._icmp.recv(2048)
            except BlockingIOError:
                waiter.poll()
                continue
            except OSError:
                continue
            if len(data) < IPV4_HLEN:
                continue
            ihl = (data[0] & 0x0F) * 4
            if data[ihl:ihl + 2] != bytes((icmp.DEST_UNREACH, icmp.FRAG_NEEDED)):
                continue             # cheap test first: most ICMP is something else
            got = icmp.parse_error(data[ihl:])
            if got.__class__ is Drop:
                continue
            msg, quoted = got
            peer = bytes(quoted[16:20])
            if quoted[9] not in TUNNEL_PROTOS or not msg.mtu or peer not in self._peers:
                continue             # not about a packet of one of our tunnels
            self.icmp_frag_needed += 1
            learned = self.pmtu.learn(peer, msg.mtu)
            LOG.info("path MTU to %s is now %d", socket.inet_ntoa(peer), learned, key="pmtu")
            if self.on_pmtu is not None:
                self.on_pmtu(peer, learned)

    def stats(self) -> dict:
        unmatched: Counter = Counter()
        for c in list(self._unmatched):
            unmatched.update(dict(c))
        return {"unmatched": {k.value: v for k, v in unmatched.items()},
                "icmp_frag_needed": self.icmp_frag_needed}
