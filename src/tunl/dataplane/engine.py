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

from ..model import Route, TunnelSpec
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
        self.fib4 = Fib()
        self.fib6 = Fib(bits=128)
        self.up = False
        self.sock = rawsock.sender(spec.dev)
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self.thread: threading.Thread | None = None
        self.configure(spec)

    def configure(self, spec: TunnelSpec) -> None:
        self.spec = spec
        self.codec = modes.codec_for(spec)
        self.proto = self.codec.proto
        self.remote = spec.remote.packed if spec.remote else None
        # sit decides with the next hop itself (isatap asks it even with a remote)
        self.fixed_dst = self.remote is not None and not hasattr(self.codec, "outer_dst")
        self.local_any = (spec.local.packed if spec.local else ANY,
                          spec.remote.packed if spec.remote else ANY)

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
    def __init__(self, clock: Callable[[], float]):
        self.tunnels: dict[str, TunnelPlane] = {}
        self.pmtu = PmtuCache(clock)
        self.unmatched: Counter = Counter()     # received packets no tunnel took, by reason
        self.icmp_frag_needed = 0
        # proto -> GRE key (None: no key) -> ((local, remote, plane), ...) of the up tunnels
        self._tables: dict[int, dict] = {p: {} for p in TUNNEL_PROTOS}
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
        if v4 != t.fib4.routes:
            t.fib4 = Fib(v4)
        if v6 != t.fib6.routes:
            t.fib6 = Fib(v6, bits=128)
        if hasattr(t.codec, "set_prefixes"):
            t.codec.set_prefixes(prefixes)
        t.mtu = mtu
        if up != t.up:
            t.up = up
            self._reindex()

    def _reindex(self) -> None:
        # the hot path reads these tuples; replacing them whole needs no lock
        tables: dict[int, dict] = {p: {} for p in TUNNEL_PROTOS}
        for t in self.tunnels.values():
            if t.up:
                key = t.spec.ikey if t.proto == PROTO_GRE else None
                by_key = tables[t.proto]
                by_key[key] = by_key.get(key, ()) + ((t.local_any[0], t.local_any[1], t),)
        self._tables = tables

    # -- egress -----------------------------------------------------------------------------

    def _egress(self, t: TunnelPlane) -> None:
        buf = bytearray(HEADROOM + MAX_PACKET)
        view = memoryview(buf)
        into = [view[HEADROOM:]]
        fd, c, H = t.fd, t.counters, HEADROOM
        readv, ntoa, pmtu = os.readv, socket.inet_ntoa, self.pmtu
        ident = 0
        while not t.stopping:
            try:
                n = readv(fd, into)
            except BlockingIOError:
                select.select([fd, t._wake_r], [], [])
                continue
            except OSError as e:
                if not t.stopping:
                    log.error("%s: reading the device failed: %s", t.spec.name, e)
                return
            codec = t.codec
            ver = buf[H] >> 4 if n else 0
            if ver not in codec.versions or n < MIN_LEN[ver]:
                t.count_tx_drop(Drop.NOT_IPV4 if 4 in codec.versions else Drop.NOT_IPV6)
                continue
            dst = t.remote if t.fixed_dst else self._nbma_dst(t, buf, ver)
            if dst is None or dst == ANY:
                t.count_tx_drop(Drop.NO_ROUTE, "tx_carrier_errors")       # NoRoute
                continue
            if t.fib4.routes and t.fib4.lookup(int.from_bytes(dst, "big"))[0]:
                # the outer packet would be routed into this tunnel again: DeadLoop
                t.count_tx_drop(Drop.DEAD_LOOP, "collisions")
                continue
            if len(pmtu) and self._too_big(t, view, n, ver, dst):
                continue
            ident = (ident + 1) & 0xFFFF or 1
            start = codec.encap(buf, H, n, dst, ident)
            if start.__class__ is Drop:
                t.count_tx_drop(start)
                continue
            try:
                t.sock.sendto(view[start:H + n], (ntoa(dst), 0))
            except OSError:
                t.count_tx_drop(Drop.SEND_FAILED)
                continue
            c.tx_packets += 1
            c.tx_bytes += n

    @staticmethod
    def _nbma_dst(t: TunnelPlane, buf, ver: int) -> bytes | None:
        """The outer destination of a tunnel without remote: the next hop of the route."""
        H = HEADROOM
        if ver == 4:
            inner_dst = bytes(buf[H + 16:H + 20])
            _found, gw = t.fib4.lookup(int.from_bytes(inner_dst, "big"))
            return gw if gw is not None else inner_dst       # rt_nexthop()
        inner_dst = bytes(buf[H + 24:H + 40])
        _found, gw = t.fib6.lookup(int.from_bytes(inner_dst, "big"))
        outer_dst = getattr(t.codec, "outer_dst", None)
        if outer_dst is not None:                             # sit, isatap, 6rd
            return outer_dst(inner_dst, gw)
        return v4_compatible(gw if gw is not None else inner_dst)

    def _too_big(self, t: TunnelPlane, view, n: int, ver: int, dst: bytes) -> bool:
        """tnl_update_pmtu(): answer a packet the learned path MTU cannot carry."""
        H = HEADROOM
        mtu = self.pmtu.get(dst, MAX_PACKET) - t.codec.overhead
        if n <= mtu:
            return False
        inner = view[H:H + n]
        if ver == 4:
            if not inner[6] & 0x40:
                return False        # no DF: the outer packet may be fragmented
            pkt = icmp.error_packet(bytes(inner[16:20]), inner,
                                    icmp.dest_unreach(icmp.FRAG_NEEDED, inner, mtu))
            why = Drop.TOO_BIG
        else:
            mtu = max(mtu, IPV6_MIN_MTU)        # RFC 4213 §3.2.2
            if n <= mtu:
                return False
            pkt = icmpv6.error_packet(bytes(inner[24:40]), inner,
                                      icmpv6.packet_too_big(inner, mtu))
            why = Drop.PACKET_TOO_BIG
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
        recv_into, write = sock.recv_into, os.write
        fd = sock.fileno()
        while not self._stopping:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                select.select([fd, self._wake_r], [], [])
                continue
            r = demux(buf, n)
            if r.__class__ is Drop:
                self.unmatched[r] += 1
                continue
            ihl, end, key, ctx = r
            by_key = self._tables[proto]
            t = lookup(by_key.get(key, ()), buf[12:16], buf[16:20])
            if t is None:
                self.unmatched[Drop.KEY_MISMATCH if by_key and key not in by_key
                               else Drop.NO_TUNNEL] += 1
                continue
            r = t.codec.decap_at(buf, ihl, end, ctx)
            if r.__class__ is Drop:
                t.count_rx_drop(r)
                continue
            off, ln = r
            try:
                write(t.fd, view[off:off + ln])
            except OSError:
                t.counters.rx_dropped += 1
                t.counters.rx_drop[Drop.TUNNEL_DOWN] += 1
                continue
            t.counters.rx_packets += 1
            t.counters.rx_bytes += ln

    # -- path MTU ---------------------------------------------------------------------------

    def _icmp_loop(self) -> None:
        """Learn a peer's path MTU from ICMP fragmentation needed about our outer packets."""
        fd = self._icmp.fileno()
        while not self._stopping:
            try:
                data = self._icmp.recv(2048)
            except BlockingIOError:
                select.select([fd, self._wake_r], [], [])
                continue
            if len(data) < IPV4_HLEN:
                continue
            got = icmp.parse_error(data[(data[0] & 0x0F) * 4:])
            if got.__class__ is Drop:
                continue
            msg, quoted = got
            if (msg.type, msg.code) != (icmp.DEST_UNREACH, icmp.FRAG_NEEDED):
                continue
            if quoted[9] not in TUNNEL_PROTOS or not msg.mtu:
                continue
            self.icmp_frag_needed += 1
            learned = self.pmtu.learn(bytes(quoted[16:20]), msg.mtu)
            log.info("path MTU to %s is now %d", socket.inet_ntoa(quoted[16:20]), learned)

    def stats(self) -> dict:
        return {"unmatched": {k.value: v for k, v in self.unmatched.items()},
                "icmp_frag_needed": self.icmp_frag_needed}
