"""`tunl lab demo`: up, ping every ordered pair of hosts, show what crossed the underlay, down.

While the hosts ping, tcpdump captures on the underlay bridge br0; afterwards the first few
captured packets are decoded with tunl's own codecs (tunl.wire), outer header and inner, so
the demo shows the encapsulation as it is on the wire:

    172.16.232.172 > 172.16.232.194 proto 4 (ipip): 10.42.1.1 > 10.42.2.1 ICMP echo request, ...
"""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

from ..wire.icmp import (DEST_UNREACH, ECHO_REPLY, ECHO_REQUEST, TIME_EXCEEDED,
                         IcmpMessage)
from ..wire.ipv4 import OFFSET_MASK, MF, PROTO_GRE, PROTO_ICMP, PROTO_IPIP, PROTO_IPV6, \
    IPv4Header
from . import control, netns, pcap
from .netns import LabError
from .topology import BRIDGE, Topology

PING_COUNT = 3
PING_INTERVAL = "0.2"
PING_WAIT = "2"               # seconds to wait for each reply (ping -W)
CAPTURE_START = 5.0           # seconds for tcpdump to say it is listening
CAPTURE_DRAIN = 1.0           # seconds for the last packets to reach tcpdump
SHOW = 12                     # captured packets printed (one per flow and direction)
# unicast IPv4 only: IGMP reports and the like would use up tcpdump's count (-c)
CAPTURE_FILTER = ("ip", "and", "not", "ip", "multicast", "and", "not", "ip", "broadcast")

_PROTO_NAMES = {PROTO_IPIP: "ipip", PROTO_GRE: "gre", PROTO_IPV6: "ipv6 (sit)",
                PROTO_ICMP: "icmp", 2: "igmp", 6: "tcp", 17: "udp"}
_ICMP_NAMES = {ECHO_REQUEST: "echo request", ECHO_REPLY: "echo reply",
               DEST_UNREACH: "destination unreachable", TIME_EXCEEDED: "time exceeded"}


# -- ping ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PingResult:
    returncode: int
    sent: int = 0
    received: int = 0
    rtt: tuple[float, float, float] | None = None     # min, avg, max in ms
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


_SENT = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"(?:rtt|round-trip) min/avg/max(?:/\S+)? = ([\d.]+)/([\d.]+)/([\d.]+)")


def parse_ping(text: str, returncode: int, stderr: str = "") -> PingResult:
    """The summary of iputils (or busybox) ping's output."""
    sent = received = 0
    rtt = None
    if m := _SENT.search(text):
        sent, received = int(m.group(1)), int(m.group(2))
    if m := _RTT.search(text):
        rtt = (float(m.group(1)), float(m.group(2)), float(m.group(3)))
    err = ""
    if returncode != 0:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        err = lines[-1] if lines else ("no reply" if sent else f"exit {returncode}")
    return PingResult(returncode, sent, received, rtt, err)


def ping(ns: str, target: str) -> PingResult:
    r = netns.run(netns.exec_argv(ns, ["ping", "-n", "-c", str(PING_COUNT), "-i", PING_INTERVAL,
                                       "-W", PING_WAIT, target]), timeout=30)
    return parse_ping(r.stdout, r.returncode, r.stderr)


def ping_table(rows: list[tuple[str, str, str, PingResult]]) -> list[str]:
    """Lines of a table: from, to, target, received/sent, rtt min/avg/max."""
    head = ("from", "to", "target", "recv", "rtt min/avg/max ms")
    body = []
    for src, dst, target, r in rows:
        rtt = "/".join(f"{x:.3f}" for x in r.rtt) if r.rtt else f"FAILED: {r.error}"
        body.append((src, dst, target, f"{r.received}/{r.sent}", rtt))
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]
    lines = []
    for row in [head, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    return lines


# -- decoding --------------------------------------------------------------------------------

def _l4(proto: int, data) -> str:
    if proto == PROTO_ICMP:
        try:
            m = IcmpMessage.parse(data)
        except ValueError as e:
            return f"ICMP ({e})"
        name = _ICMP_NAMES.get(m.type, f"type {m.type} code {m.code}")
        if m.type in (ECHO_REQUEST, ECHO_REPLY):
            return f"ICMP {name}, id {m.ident}, seq {m.seq}"
        return f"ICMP {name}"
    return f"proto {proto} ({_PROTO_NAMES.get(proto, '?')}), {len(data)} bytes"


def describe(packet) -> str:
    """One line for an IPv4 packet: outer header, and for IP-in-IP the inner packet too."""
    try:
        outer = IPv4Header.parse(packet)
    except ValueError as e:
        return f"({e})"
    payload = memoryview(packet)[outer.ihl * 4:outer.total_len]
    head = f"{outer.src} > {outer.dst} proto {outer.proto}"
    if outer.flags_frag & (MF | OFFSET_MASK):
        return f"{head} fragment, offset {(outer.flags_frag & OFFSET_MASK) * 8}"
    if outer.proto != PROTO_IPIP:
        if outer.proto == PROTO_ICMP:
            return f"{head}: {_l4(outer.proto, payload)}"
        return f"{head} ({_PROTO_NAMES.get(outer.proto, '?')}), {len(payload)} bytes"
    try:
        inner = IPv4Header.parse(payload)
    except ValueError as e:
        return f"{head} (ipip): inner ({e})"
    inner_payload = payload[inner.ihl * 4:inner.total_len]
    return f"{head} (ipip): {inner.src} > {inner.dst} {_l4(inner.proto, inner_payload)}"


def flow_key(packet) -> bytes:
    """What tells one direction of one ping from another: outer and inner addresses, ICMP type."""
    p = bytes(packet)
    key = p[9:10] + p[12:20]
    hl = (p[0] & 0x0F) * 4
    if p[9] == PROTO_IPIP and len(p) >= hl + 20:
        key += p[hl + 9:hl + 10] + p[hl + 12:hl + 20]
        hl += (p[hl] & 0x0F) * 4
    return key + p[hl:hl + 1]        # ICMP type, or the first byte of whatever is there


def decode_capture(path: str, show: int = SHOW) -> list[str]:
    """Lines describing a capture: the first packet of each flow, up to `show` of them."""
    try:
        linktype, records = pcap.read(path)
    except (OSError, ValueError) as e:
        return [f"cannot read the capture: {e}"]
    packets = [(r.ts, p) for r in records
               if (p := pcap.ip_packet(linktype, r.data)) is not None and len(p) >= 20]
    tunnelled = sum(1 for _, p in packets if p[9] == PROTO_IPIP)
    lines = [f"captured {len(packets)} IPv4 packets on {BRIDGE}, {tunnelled} of them IP-in-IP"]
    if not packets:
        return lines
    lines[0] += "; the first of each direction of each ping, decoded with tunl.wire:"
    t0 = packets[0][0]
    seen: set[bytes] = set()
    for ts, p in packets:
        key = flow_key(p)
        if key in seen:
            continue
        if len(seen) == show:
            lines.append("  ...")
            break
        seen.add(key)
        lines.append(f"  {ts - t0:8.4f}  {describe(p)}")
    return lines


# -- capture ---------------------------------------------------------------------------------

class Capture:
    """`tcpdump -i br0 -w FILE -c N` in the underlay namespace, started and stopped by us."""

    def __init__(self, ns: str, path: str, count: int):
        self.path = path
        argv = netns.exec_argv(ns, ["tcpdump", "-i", BRIDGE, "-w", path, "-c", str(count),
                                    "-n", "-U", "-Z", "root", *CAPTURE_FILTER])
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError as e:
            raise LabError("ip: not found (install iproute2)") from e
        self._wait_listening()

    def _wait_listening(self) -> None:
        """tcpdump says "listening on br0" on stderr once its socket is bound."""
        deadline = time.monotonic() + CAPTURE_START
        seen = b""
        fd = self.proc.stderr.fileno()
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise LabError(f"tcpdump did not start listening on {BRIDGE}"
                               f" within {CAPTURE_START:g} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                code = self.proc.wait()
                msg = seen.decode(errors="replace").strip().splitlines()
                raise LabError(f"tcpdump exited {code}: {msg[-1] if msg else 'no message'}")
            seen += chunk

    def stop(self, drain: float = 0.0) -> None:
        """Let tcpdump end by its count within `drain` s, else interrupt it (it then flushes)."""
        if self.proc.poll() is None:
            try:
                self.proc.wait(drain)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(2)          # SIGINT: tcpdump writes out and exits
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


# -- the demo --------------------------------------------------------------------------------

def run(topo: Topology, out: TextIO, *, pcap_path: str | None = None, show: int = SHOW,
        log: control.Log = control._quiet) -> int:
    """The demo; returns 0 if every ping had replies, else 1. Always tears the lab down."""
    if shutil.which("ping") is None:
        raise LabError("ping: not found (install iputils-ping)")
    if shutil.which("tcpdump") is None:
        raise LabError("tcpdump: not found (install tcpdump)")
    tmpdir = None
    if pcap_path is None:
        tmpdir = tempfile.mkdtemp(prefix="tunl-lab-")
        pcap_path = os.path.join(tmpdir, f"{topo.name}.pcap")
    pcap_path = os.path.abspath(pcap_path)
    capture = None
    try:
        print(f"lab {topo.name}: up ({len(topo.hosts)} hosts)", file=out, flush=True)
        control.up(topo, log=log)
        pairs = [(a, b) for a in topo.hosts for b in topo.hosts if a is not b]
        # every ping: a request and a reply, each crossing br0 once
        capture = Capture(topo.ns_underlay, pcap_path, 2 * PING_COUNT * len(pairs))
        print(f"\nping -c {PING_COUNT} -i {PING_INTERVAL}, every ordered pair of hosts"
              f" (capturing on {BRIDGE} of {topo.ns_underlay}):", file=out, flush=True)
        rows = []
        for a, b in pairs:
            r = ping(topo.ns_host(a), str(b.ping_target))
            rows.append((a.name, b.name, str(b.ping_target), r))
        for line in ping_table(rows):
            print("  " + line, file=out)
        capture.stop(CAPTURE_DRAIN)
        capture = None
        print(file=out)
        for line in decode_capture(pcap_path, show):
            print(line, file=out)
        if not tmpdir:
            print(f"  (capture kept in {pcap_path})", file=out)
        print(file=out)
        for h in topo.hosts:
            print(f"{h.name}: tunl -s tunnel show", file=out)
            r = netns.sh(topo.ns_host(h), "tunl -s tunnel show", timeout=30)
            text = (r.stdout + r.stderr).rstrip()
            for line in text.splitlines() or ["(nothing)"]:
                print("  " + line, file=out)
            if r.returncode != 0:
                print(f"  (exit {r.returncode})", file=out)
        failed = [row for row in rows if not row[3].ok]
        print(file=out)
        if failed:
            print(f"{len(failed)} of {len(rows)} pings failed: "
                  + ", ".join(f"{s}->{d}" for s, d, _, _ in failed), file=out)
        else:
            print(f"all {len(rows)} pings answered", file=out)
        return 1 if failed else 0
    finally:
        with control.uninterrupted():
            if capture is not None:
                capture.stop()
            report = control.down(topo.name, log=log)
            if report.namespaces:
                print(f"lab {topo.name}: down", file=out, flush=True)
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
