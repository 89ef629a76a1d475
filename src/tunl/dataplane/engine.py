"""The userspace forwarding engine of one network namespace.

Egress, one thread per tunnel: TUN read → outer destination (the remote, or for NBMA the
next hop of the mirrored kernel route) → path MTU check → the mode's codec writes its headers
in the headroom → raw socket send.
Ingress, one thread per outer protocol (4, 47, 41): raw receive → the codec module's demux
(outer checks, GRE key) → tunnel lookup (ip_tunnel_lookup()) → the tunnel's codec checks and
decapsulates → TUN write. One more thread learns path MTUs from ICMP.

Threads block in system calls (releasing the GIL) and never raise on a bad packet: they drop
and count. Tables the hot path reads (routes, the lookup lists) are immutable snapshots that
the control thread replaces whole.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections import Counter
from typing import Callable

from ..model import Route, TunnelMode, TunnelSpec
from ..tunnel import modes
from ..tunnel.lookup import lookup
from ..tunnel.outer import ANY, HEADROOM, v4_compatible
from ..tunnel.pmtu import PmtuCache
from ..wire import icmp, icmpv6
from ..wire.drop import Drop
from ..wire.ipv4 import IPV4_HLEN, PROTO_GRE, PROTO_ICMP, PROTO_IPIP, PROTO_IPV6
from ..wire.ipv6 import IPV6_HLEN, MIN_MTU as IPV6_MIN_MTU
from . import rawsock
from .counters import Counters
from .fib import Fib

log = logging.getLogger("tunl.dataplane")

MAX_PACKET = 65535
TUNNEL_PROTOS = (PROTO_IPIP, PROTO_GRE, PROTO_IPV6)
MIN_LEN = {4: IPV4_HLEN, 6: IPV6_HLEN}

# how ip_tunnel_rcv() counts a dropped packet, beyond rx_errors
RX_COUNTER = {Drop.CSUM_MISMATCH: "rx_crc_errors", Drop.BAD_CSUM: "rx_crc_errors",
              Drop.OUT_OF_SEQ: "rx_fifo_errors", Drop.ECN: "rx_frame_errors"}


class TunnelPlane:
    """The runtime of one tunnel: its device queue, socket, codec, routes and counters."""

    def __init__(self, spec: TunnelSpec, fd: int, ifindex: int, mtu: int):
        self.fd = fd
        self.ifindex = ifindex
        self.mtu = mtu
        self.counters = Counters()
        self.ident = 0
        self.fib4 = Fib()
        self.fib6 = Fib(bits=128)
        self.loops: dict[bytes, bool] = {}   # outer destination -> routed into this device?
        self.asked: dict[bytes, bytes] = {}  # inner destination -> next hop the kernel gave
        self.up = False
        self.sock = None
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self.thread: threading.Thread | None = None
        self.configure(spec)

    def configure(self, spec: TunnelSpec) -> None:
        if self.sock is None or spec.dev != self.spec.dev:
            old, self.sock = self.sock, rawsock.sender(spec.dev)
            if old is not None:
                old.close()
        old = getattr(self, "codec", None)
        self.spec = spec
        self.codec = modes.codec_for(spec)
        for seq in ("o_seqno", "i_seqno"):     # ip_tunnel_update() keeps them
            if hasattr(old, seq) and hasattr(self.codec, seq):
                setattr(self.codec, seq, getattr(old, seq))
        self.proto = self.codec.proto
        self.remote = spec.remote.packed if spec.remote else None
        # isatap asks the next hop even with a remote (ipip6_tunnel_xmit())
        self.fixed_dst = self.remote is not None and spec.mode is not TunnelMode.ISATAP
        self.addr = (str(spec.remote), 0) if spec.remote else None
        self.endpoints = (spec.local.packed if spec.local else ANY,
                          spec.remote.packed if spec.remote else ANY)
        self.loops = {}

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

    def wake(self) -> None:
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class Engine:
    """route_via(dst) -> (ifindex, gateway) the kernel routes an IPv4 address through (None
    when unroutable); the daemon gives it, since only kernel/ talks netlink."""

    def __init__(self, clock: Callable[[], float],
                 route_via: Callable[[str], tuple | None] = lambda dst: None):
        self.route_via = route_via
        self.tunnels: dict[str, TunnelPlane] = {}
        self.pmtu = PmtuCache(clock)
        self._unmatched: list[Counter] = []    # received packets no tunnel took, by reason
        self.icmp_frag_needed = 0
        # proto -> GRE key (None: no key) -> ((local, remote, plane), ...) of the up tunnels
        self._tables: dict[int, dict] = {p: {} for p in TUNNEL_PROTOS}
        self._peers: frozenset = frozenset()
        self._receivers: dict[int, socket.socket] = {}
        self._stopping = False
        self._icmp = rawsock.receiver(PROTO_ICMP)
        self._wake_r, self._wake_w = os.pipe()
        self._threads = [threading.Thread(target=self._icmp_loop, name="icmp", daemon=True)]

    # -- control (called from the daemon's thread) ------------------------------------------

    def start(self) -> None:
        self._threads[0].start()

    def stop(self) -> None:
        for name in list(self.tunnels):
            os.close(self.remove(name))
        self._stopping = True
        os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(2)
        for sock in (self._icmp, *self._receivers.values()):
            sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def add(self, spec: TunnelSpec, fd: int, ifindex: int, mtu: int) -> TunnelPlane:
        t = TunnelPlane(spec, fd, ifindex, mtu)
        self._receive(t.proto)
        self.tunnels[spec.name] = t
        t.thread = threading.Thread(target=self._egress, args=(t,), name=f"egress-{spec.name}",
                                    daemon=True)
        t.thread.start()
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
        self.tunnels[spec.name].configure(spec)
        self._reindex()

    def remove(self, name: str) -> int:
        """Stop a tunnel's thread; returns its TUN fd for the caller to close or destroy."""
        t = self.tunnels.pop(name)
        self._reindex()
        t.stopping = True
        t.wake()
        if t.thread:
            t.thread.join(2)
        t.close()
        return t.fd

    def set_state(self, name: str, routes: list[Route], up: bool, mtu: int,
                  prefixes: tuple = ()) -> None:
        t = self.tunnels[name]
        v4 = tuple(r for r in routes if r.dst.version == 4)
        v6 = tuple(r for r in routes if r.dst.version == 6)
        reindex = up != t.up
        if v4 != t.fib4.routes:
            t.fib4 = Fib(v4)
            reindex = True
        if v6 != t.fib6.routes:
            t.fib6 = Fib(v6, bits=128)
        t.loops, t.asked = {}, {}          # routes changed: ask the kernel again
        if hasattr(t.codec, "set_prefixes"):
            t.codec.set_prefixes(prefixes)
        t.mtu = mtu
        t.up = up
        if reindex:
            self._reindex()

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

    def _egress(self, t: TunnelPlane) -> None:
        buf = bytearray(HEADROOM + MAX_PACKET)
        view = memoryview(buf)
        into = [view[HEADROOM:]]
        fd = t.fd
        readv = os.readv
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        waiter.register(t._wake_r, select.POLLIN)
        while not t.stopping:
            try:
                n = readv(fd, into)
            except BlockingIOError:
                waiter.poll()
                continue
            except OSError as e:
                if not t.stopping:
                    log.error("%s: reading the device failed: %s", t.spec.name, e)
                return
            try:
                self._send(t, buf, view, n)
            except Exception:          # a bug must not stop the tunnel: count it and go on
                log.exception("%s: egress", t.spec.name)
                t.count_tx_drop(Drop.INTERNAL)

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
        loops = t.loops.get(dst)
        if loops is None:
            # ip_tunnel_xmit(): an outer packet the kernel would route into this very device
            if len(t.loops) > 4096:
                t.loops = {}
            via = self.route_via(addr[0])
            loops = t.loops[dst] = via is not None and via[0] == t.ifindex
        if loops:
            t.count_tx_drop(Drop.DEAD_LOOP, "collisions")                 # DeadLoop
            return
        if len(self.pmtu) and self._too_big(t, view, n, ver, dst):
            return
        t.ident = (t.ident + 1) & 0xFFFF or 1
        start = codec.encap(buf, H, n, dst, t.ident)
        if start.__class__ is Drop:
            t.count_tx_drop(start)
            return
        try:
            t.sock.sendto(view[start:H + n], addr)
        except OSError:
            t.count_tx_drop(Drop.SEND_FAILED)
            return
        c = t.counters
        c.tx_packets += 1
        c.tx_bytes += n

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

    def _too_big(self, t: TunnelPlane, view, n: int, ver: int, dst: bytes) -> bool:
        """tnl_update_pmtu() (ipip6_tunnel_xmit() for sit): answer a packet the learned path
        MTU cannot carry, when the tunnel does path MTU discovery."""
        H = HEADROOM
        mtu = self.pmtu.get(dst, MAX_PACKET) - t.codec.overhead
        if n <= mtu or not t.spec.pmtudisc:
            return False
        inner = view[H:H + n]
        if ver == 4:
            if not inner[6] & 0x40:
                return False        # no DF: the outer packet may be fragmented
            why = Drop.TOO_BIG
            pkt = icmp.error_packet(bytes(inner[16:20]), inner,
                                    icmp.dest_unreach(icmp.FRAG_NEEDED, inner, mtu))
        else:
            if t.proto == PROTO_IPV6:
                mtu = max(mtu, IPV6_MIN_MTU)    # sit: never below 1280 (RFC 4213 §3.2.2)
            if n <= mtu or mtu < IPV6_MIN_MTU:
                return False        # ip_tunnel: no Packet Too Big under the IPv6 minimum
            why = Drop.PACKET_TOO_BIG
            pkt = icmpv6.error_packet(bytes(inner[24:40]), inner,
                                      icmpv6.packet_too_big(inner, mtu))
        try:
            os.write(t.fd, pkt)   # as if from the far side: the inner destination answers
        except OSError:
            pass
        t.count_tx_drop(why)
        return True

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
            try:
                self._receive_one(proto, demux, buf, view, n, unmatched)
            except Exception:          # a bug must not stop the protocol: count it, go on
                log.exception("ingress %d", proto)
                unmatched[Drop.INTERNAL] += 1

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
            log.info("path MTU to %s is now %d", socket.inet_ntoa(peer), learned)

    def stats(self) -> dict:
        unmatched: Counter = Counter()
        for c in list(self._unmatched):
            unmatched.update(dict(c))
        return {"unmatched": {k.value: v for k, v in unmatched.items()},
                "icmp_frag_needed": self.icmp_frag_needed}
