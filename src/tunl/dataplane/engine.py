"""The userspace forwarding engine of one network namespace.

Egress, one thread per tunnel: TUN read → outer destination (remote, or the gateway of the
mirrored route: NBMA) → path MTU check → encapsulate in the headroom → raw socket send.
Ingress, one thread per outer protocol: raw receive → tunnel lookup (ip_tunnel_lookup()) →
check and decapsulate → TUN write. A third thread learns path MTUs from ICMP.

Threads block in system calls (releasing the GIL) and never raise on a bad packet: they drop
and count. Tables the hot path reads (routes, the lookup list) are immutable snapshots that
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
from ..tunnel import ipip
from ..tunnel.lookup import ANY, lookup
from ..tunnel.pmtu import PmtuCache
from ..wire import icmp
from ..wire.drop import Drop
from ..wire.ipv4 import IPV4_HLEN, PROTO_ICMP, PROTO_IPIP
from . import rawsock
from .counters import Counters
from .fib import Fib

log = logging.getLogger("tunl.dataplane")

HEADROOM = ipip.HEADROOM
MAX_PACKET = 65535


class TunnelPlane:
    """The runtime of one tunnel: its device queue, socket, encapsulation and counters."""

    def __init__(self, spec: TunnelSpec, fd: int, ifindex: int, mtu: int):
        self.fd = fd
        self.ifindex = ifindex
        self.mtu = mtu
        self.counters = Counters()
        self.fib = Fib()
        self.up = False
        self.sock = rawsock.sender(spec.dev)
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self.thread: threading.Thread | None = None
        self.configure(spec)

    def configure(self, spec: TunnelSpec) -> None:
        self.spec = spec
        self.encap = ipip.IpipEncap(spec)
        self.remote = spec.remote.packed if spec.remote else None
        self.key = (spec.local.packed if spec.local else ANY,
                    spec.remote.packed if spec.remote else ANY)

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
        self._by_addr: tuple = ()
        self._stopping = False
        self._rx = rawsock.receiver(PROTO_IPIP)
        self._icmp = rawsock.receiver(PROTO_ICMP)
        self._wake_r, self._wake_w = os.pipe()
        self._threads = [threading.Thread(target=self._ingress, name="ingress-ipip", daemon=True),
                         threading.Thread(target=self._icmp_loop, name="icmp", daemon=True)]

    # -- control (called from the daemon's thread) ------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for name in list(self.tunnels):
            os.close(self.remove(name))
        self._stopping = True
        os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(2)

    def add(self, spec: TunnelSpec, fd: int, ifindex: int, mtu: int) -> TunnelPlane:
        t = TunnelPlane(spec, fd, ifindex, mtu)
        self.tunnels[spec.name] = t
        t.thread = threading.Thread(target=self._egress, args=(t,), name=f"egress-{spec.name}",
                                    daemon=True)
        t.thread.start()
        self._reindex()
        return t

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

    def set_state(self, name: str, routes: list[Route], up: bool, mtu: int) -> None:
        t = self.tunnels[name]
        if tuple(routes) != t.fib.routes:
            t.fib = Fib(routes)
        t.mtu = mtu
        if up != t.up:
            t.up = up
            self._reindex()

    def _reindex(self) -> None:
        # the hot path reads this tuple; replacing it whole needs no lock
        self._by_addr = tuple((t.key[0], t.key[1], t) for t in self.tunnels.values() if t.up)

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
            if n < IPV4_HLEN or buf[H] >> 4 != 4:
                c.tx_errors += 1
                c.tx_drop[Drop.NOT_IPV4] += 1
                continue
            if t.remote is not None:
                dst = t.remote
            else:
                found, gw = t.fib.lookup(int.from_bytes(buf[H + 16:H + 20], "big"))
                # rt_nexthop(): the route's gateway, else the inner destination itself
                dst = gw if gw is not None else bytes(buf[H + 16:H + 20])
            if dst == ANY:
                c.tx_errors += 1
                c.tx_carrier_errors += 1          # NoRoute
                c.tx_drop[Drop.NO_ROUTE] += 1
                continue
            if t.fib.routes and t.fib.lookup(int.from_bytes(dst, "big"))[0]:
                c.tx_errors += 1                  # the outer packet would come back into
                c.collisions += 1                 # this tunnel: DeadLoop, like the kernel
                c.tx_drop[Drop.DEAD_LOOP] += 1
                continue
            if len(pmtu) and buf[H + 6] & 0x40:
                mtu = pmtu.get(dst, MAX_PACKET) - IPV4_HLEN
                if n > mtu:                     # tnl_update_pmtu()
                    self._frag_needed(t, view[H:H + n], mtu)
                    c.tx_errors += 1
                    c.tx_drop[Drop.TOO_BIG] += 1
                    continue
            ident = (ident + 1) & 0xFFFF or 1
            start = t.encap.encap(buf, H, n, dst, ident)
            try:
                t.sock.sendto(view[start:H + n], (ntoa(dst), 0))
            except OSError:
                c.tx_errors += 1
                c.tx_drop[Drop.SEND_FAILED] += 1
                continue
            c.tx_packets += 1
            c.tx_bytes += n

    def _frag_needed(self, t: TunnelPlane, inner, mtu: int) -> None:
        """ICMP fragmentation needed back to the inner source, as if from the far side
        (its source is the inner destination, so the kernel's rp_filter accepts it)."""
        pkt = icmp.error_packet(bytes(inner[16:20]), inner,
                                icmp.dest_unreach(icmp.FRAG_NEEDED, inner, mtu))
        try:
            os.write(t.fd, pkt)
        except OSError:
            pass

    # -- ingress ----------------------------------------------------------------------------

    def _ingress(self) -> None:
        buf = bytearray(MAX_PACKET + 1)
        view = memoryview(buf)
        recv_into, write, decap = self._rx.recv_into, os.write, ipip.decap
        fd = self._rx.fileno()
        while not self._stopping:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                select.select([fd, self._wake_r], [], [])
                continue
            t = lookup(self._by_addr, buf[12:16], buf[16:20]) if n >= IPV4_HLEN else None
            r = decap(buf, n)
            if r.__class__ is Drop:
                if t is None:
                    self.unmatched[r] += 1
                else:
                    c = t.counters
                    c.rx_errors += 1
                    if r is Drop.ECN:
                        c.rx_frame_errors += 1
                    c.rx_drop[r] += 1
                continue
            if t is None:
                self.unmatched[Drop.NO_TUNNEL] += 1
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
            if quoted[9] != PROTO_IPIP or not msg.mtu:
                continue
            self.icmp_frag_needed += 1
            learned = self.pmtu.learn(bytes(quoted[16:20]), msg.mtu)
            log.info("path MTU to %s is now %d", socket.inet_ntoa(quoted[16:20]), learned)

    def stats(self) -> dict:
        return {"unmatched": {k.value: v for k, v in self.unmatched.items()},
                "icmp_frag_needed": self.icmp_frag_needed}
