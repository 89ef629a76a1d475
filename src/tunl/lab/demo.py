"""`tunl lab demo`: up, ping every target of every other host, show what crossed the underlay,
down.

While the hosts ping, tcpdump captures on the underlay bridge br0; afterwards the first packet
of each direction of each ping is decoded with tunl's own codecs (tunl.wire, see dissect), outer
header and inner, so the demo shows the encapsulation as it is on the wire:

    172.16.232.172 > 172.16.232.194 proto 4 (ipip): 10.42.1.1 > 10.42.2.1 ICMP echo request, ...
    172.16.232.172 > 172.16.232.194 proto 47 (gre, key 1): fd00:50:1::1 > fd00:50:1::2 ICMPv6 ...
    172.16.165.33 > 172.16.165.244 proto 41 (sit): 2001:db8:1::1 > 2001:db8:1::2 ICMPv6 ...

Then each host's `tunl -d -s tunnel show`, and under a tunnel that counted NoRoute, one line on
why, from the kernel's own counters of the device: a tunnel without remote (sit NBMA, isatap,
6rd) has no IPv4 destination for the multicast the kernel sends into it, such as the MLD
reports of a host that forwards (it joins ff02::2):

    NoRoute 2 on sit2: IPv6 multicast the kernel sent into sit2, 2 MLDv2 reports to ff02::16
    (for group ff02::2): a tunnel without remote has no IPv4 destination for it

With segments, tcpdump captures on each segment's bridge (br0, br1, ...) and each capture is
decoded on its own.

A mesh: run_mesh (join, every pair pings, a member killed and brought back). A mesh on segments,
or a cross-subnet one: run_routed_mesh. Every member pings every other member's gateway from
its own while tcpdump captures on each bridge, and each pair's echo requests, found on the wire
(dissect.carried), say how they crossed, against how the mesh should carry them:

    A → B  same subnet   direct (ICMP 10.42.21.1 → 10.42.16.1 on the wire)  ok
    A → C  other subnet  encapsulated (IPIP 172.16.1.2 → 172.16.2.2)        ok

then the last member moves into another segment (MeshLab.move) and the pairs are classified
again. Any pair carried the wrong way, or unanswered, fails the demo.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from . import control, netns, pcap
from .mesh import RTPROT_TUNL, MeshLab, log_tail
from .dissect import TUNNEL_PROTOS, Carried, carried, dissect, show_address
from .netns import LabError
from ..wire.icmp import ECHO_REQUEST as ICMP_ECHO_REQUEST
from .topology import BRIDGE, Host, Topology

PING_COUNT = 3
PING_INTERVAL = "0.2"
PING_WAIT = "2"               # seconds to wait for each reply (ping -W)
CAPTURE_START = 5.0           # seconds for tcpdump to say it is listening
CAPTURE_DRAIN = 1.0           # seconds for the last packets to reach tcpdump
SHOW = None                   # captured packets printed: None for one per flow and direction
CONVERGE_AGAIN = 30.0         # seconds for a mesh member that comes back to be routed again

_IHL = "(ip[0] & 0xf) * 4"                                    # the outer header's length
# the GRE header's length: 4, and 4 more for each of the C, K and S bits (RFC 2890 §2)
_GRE_HLEN = (f"4 + ((ip[{_IHL}] & 0x80) >> 5) + ((ip[{_IHL}] & 0x20) >> 3)"
             f" + ((ip[{_IHL}] & 0x10) >> 2)")
# Unicast IPv4 only, and of the tunnelled packets only those whose inner destination is
# unicast too: IGMP reports, and the MLD reports and router solicitations that the kernel
# sends on every IPv6 interface (a point-to-point tunnel carries them to its remote), would use
# up tcpdump's count (-c) and hide the pings.
CAPTURE_FILTER = (
    "ip and not ip multicast and not ip broadcast"
    f" and not (ip[9] = 4 and ip[{_IHL} + 16] >= 224)"
    f" and not (ip[9] = 41 and ip[{_IHL} + 24] = 0xff)"
    f" and not (ip[9] = 47 and ip[{_IHL} + 2:2] = 0x0800 and ip[{_IHL} + {_GRE_HLEN} + 16] >= 224)"
    f" and not (ip[9] = 47 and ip[{_IHL} + 2:2] = 0x86dd and ip[{_IHL} + {_GRE_HLEN} + 24] = 0xff)"
)


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


def plan(topo: Topology) -> list[tuple[Host, Host, str]]:
    """(from, to, target): every ping target of every other host, in the file's order."""
    return [(a, b, show_address(t)) for a in topo.hosts for b in topo.hosts if a is not b
            for t in b.ping_targets]


def routed(topo: Topology) -> bool:
    """Whether the demo of a mesh is the one of how its pairs cross the underlay
    (run_routed_mesh): a cross-subnet mesh, or a mesh on an underlay of segments."""
    return topo.mesh is not None and (topo.mesh.cross_subnet or bool(topo.underlay.segments))


def capture_paths(path: str, bridges: tuple[str, ...]) -> dict[str, str]:
    """{bridge: pcap file}: the first bridge's is `path`, another's has "-<bridge>" before the
    extension (x.pcap, x-br1.pcap)."""
    root, ext = os.path.splitext(path)
    return {b: path if i == 0 else f"{root}-{b}{ext}" for i, b in enumerate(bridges)}


def check(topo: Topology, pcap_path: str | None = None) -> None:
    """What would make the demo fail after bringing the lab up, said before it does."""
    if topo.mesh is not None:
        if len(topo.members) < 2:
            raise LabError(f'demo: the mesh of lab "{topo.name}" has one member, so nothing to'
                           " ping (the demo pings every member from every other)")
        if pcap_path is not None and routed(topo):
            raise LabError(f"demo: --pcap {pcap_path}: the demo of a mesh on segments keeps no"
                           " capture (it decodes each segment bridge's into its table of pairs)")
        if pcap_path is not None:
            raise LabError(f"demo: --pcap {pcap_path}: the demo of a mesh captures nothing")
        return
    if not plan(topo):
        raise LabError(f'demo: lab "{topo.name}" has one host, so nothing to ping (the demo'
                       " pings the targets of every other host)")
    if pcap_path is not None:
        where = os.path.dirname(os.path.abspath(pcap_path))
        if not os.path.isdir(where):
            raise LabError(f"demo: --pcap {pcap_path}: directory {where} does not exist")


def ping(ns: str, target: str, source: str | None = None) -> PingResult:
    """iputils ping takes an IPv4 or an IPv6 address (with %zone for a link-local) alike;
    `source`: the address it sends from (-I)."""
    src = ["-I", source] if source else []
    r = netns.run(netns.exec_argv(ns, ["ping", "-n", "-c", str(PING_COUNT), "-i", PING_INTERVAL,
                                       "-W", PING_WAIT, *src, target]), timeout=30)
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

def describe(packet) -> str:
    """One line for an IPv4 packet: outer header, and for a tunnelled one the inner packet too."""
    return dissect(packet).line


def flow_key(packet) -> tuple:
    """What tells one direction of one ping from another: outer and inner addresses, the GRE
    key, the ICMP or ICMPv6 type."""
    return dissect(packet).flow


def tunnelled_summary(counts: dict[str, int]) -> str:
    """"36 of them tunnelled (gre 24, sit 12)": the protocols in the order ipip, gre, sit."""
    total = sum(counts.values())
    parts = [f"{name} {counts[name]}" for name in TUNNEL_PROTOS.values() if counts.get(name)]
    return f"{total} of them tunnelled" + (f" ({', '.join(parts)})" if parts else "")


def decode_capture(path: str, show: int | None = SHOW, iface: str = BRIDGE) -> list[str]:
    """Lines describing a capture: the first packet of each flow, up to `show` of them (None:
    all of them)."""
    try:
        linktype, records = pcap.read(path)
    except (OSError, ValueError) as e:
        return [f"cannot read the capture: {e}"]
    packets = [(r.ts, dissect(p)) for r in records
               if (p := pcap.ip_packet(linktype, r.data)) is not None and len(p) >= 20]
    counts: dict[str, int] = {}
    for _, d in packets:
        if d.tunnel:
            counts[d.tunnel] = counts.get(d.tunnel, 0) + 1
    lines = [f"captured {len(packets)} IPv4 packets on {iface}, {tunnelled_summary(counts)}"]
    if not packets:
        return lines
    lines[0] += "; the first of each direction of each ping, decoded with tunl.wire:"
    t0 = packets[0][0]
    seen: set[tuple] = set()
    for ts, d in packets:
        if d.flow in seen:
            continue
        if show is not None and len(seen) == show:
            lines.append("  ...")
            break
        seen.add(d.flow)
        lines.append(f"  {ts - t0:8.4f}  {d.line}")
    return lines


# -- why NoRoute ----------------------------------------------------------------------------

MAF_NOREPORT = 0x08     # /proc/net/igmp6 flags: a group the kernel never reports (ff02::1, ...)


def parse_snmp6(text: str) -> dict[str, int]:
    """/proc/net/dev_snmp6/DEV: "Icmp6OutMLDv2Reports   3" lines."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit():
            out[words[0]] = int(words[1])
    return out


def reported_groups(text: str, dev: str) -> list[str]:
    """The IPv6 multicast groups of `dev` that the kernel reports with MLD, from
    /proc/net/igmp6 ("4 sit2 ff020000000000000000000000000002 1 00000004 0")."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 5 or words[1] != dev:
            continue
        try:
            group = ipaddress.IPv6Address(bytes.fromhex(words[2]))
            flags = int(words[4], 16)
        except ValueError:
            continue
        if not flags & MAF_NOREPORT:
            out.append(str(group))
    return out


def _n(k: int, what: str, plural: str | None = None) -> str:
    return f"{k} {what if k == 1 else plural or what + 's'}"


def explain_noroute(tunnel: dict, snmp6: dict[str, int], groups: list[str]) -> str | None:
    """One line on a tunnel's NoRoute count (tx_carrier_errors), or None when it is 0.

    A tunnel without remote finds each packet's IPv4 destination in the packet's next hop
    (::a.b.c.d, ISATAP, 6rd); a multicast packet has none, and is dropped and counted, as
    ipip6_tunnel_xmit() drops it. The kernel sends IPv6 multicast into an IPv6 interface that
    is up: MLD reports for the groups it joined that it reports (ff02::2, all routers, once it
    forwards; never ff02::1), and router solicitations where it has a link-local address. Its
    counters of the device (`snmp6`, /proc/net/dev_snmp6/DEV) say how many it sent.
    """
    name = tunnel.get("ifname", "?")
    n = tunnel.get("stats", {}).get("tx_carrier_errors", 0)
    if not n:
        return None
    remote = tunnel.get("remote")
    head = f"NoRoute {n} on {name}: "
    if remote not in (None, "any", "0.0.0.0"):
        return head + f"no route to {remote} when they were sent"
    mcast = snmp6.get("Ip6OutMcastPkts", 0)
    if not mcast:
        return head + ("packets with no IPv4 destination (their next hop is no ::a.b.c.d,"
                       " ISATAP or 6rd address) or no route to it")
    parts, known = [], 0
    for key, what, plural in (
            ("Icmp6OutMLDv2Reports", "MLDv2 report to ff02::16", "MLDv2 reports to ff02::16"),
            ("Icmp6OutGroupMembResponses", "MLDv1 report", None),
            ("Icmp6OutRouterSolicits", "router solicitation to ff02::2",
             "router solicitations to ff02::2")):
        k = snmp6.get(key, 0)
        if k:
            part = _n(k, what, plural)
            if key != "Icmp6OutRouterSolicits" and groups:
                part += f" (for {'group' if len(groups) == 1 else 'groups'} {', '.join(groups)})"
            parts.append(part)
            known += k
    if mcast > known:
        parts.append(_n(mcast - known, "other multicast packet"))
    line = (head + f"IPv6 multicast the kernel sent into {name}, {'; '.join(parts)}:"
            " a tunnel without remote has no IPv4 destination for it")
    if n > mcast:
        line += f"; the other {n - mcast} had no IPv4 destination or no route to it"
    return line


def noroute_lines(ns: str) -> list[str]:
    """explain_noroute() of each tunnel of a host's namespace that has a NoRoute count."""
    r = netns.sh(ns, "tunl -j -s tunnel show", timeout=30)
    try:
        tunnels = json.loads(r.stdout) if r.returncode == 0 else []
    except ValueError:
        return []
    lines = []
    for t in tunnels:
        if not isinstance(t, dict) or not t.get("stats", {}).get("tx_carrier_errors"):
            continue
        dev = t.get("ifname", "")
        snmp6 = groups = ""
        if re.fullmatch(r"[\w.-]+", dev):
            snmp6 = netns.run(netns.exec_argv(ns, ["cat", f"/proc/net/dev_snmp6/{dev}"]),
                              timeout=30).stdout
            groups = netns.run(netns.exec_argv(ns, ["cat", "/proc/net/igmp6"]),
                               timeout=30).stdout
        line = explain_noroute(t, parse_snmp6(snmp6), reported_groups(groups, dev))
        if line:
            lines.append(line)
    return lines


# -- capture ---------------------------------------------------------------------------------

class Capture:
    """`tcpdump -i br0 -w FILE [-c N]` in the underlay namespace, started and stopped by us.

    Without a count it runs until stop(), so it is in immediate mode: libpcap (TPACKET_V3)
    otherwise hands packets over a ring block at a time, after up to a second, and those of a
    block not yet handed over when tcpdump is interrupted are lost.
    """

    def __init__(self, ns: str, path: str, count: int | None, iface: str = BRIDGE):
        self.path, self.iface = path, iface
        until = ["-c", str(count)] if count is not None else ["--immediate-mode"]
        argv = netns.exec_argv(ns, ["tcpdump", "-i", iface, "-w", path, *until,
                                    "-n", "-U", "-Z", "root", CAPTURE_FILTER])
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
                raise LabError(f"tcpdump did not start listening on {self.iface}"
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

def run(topo: Topology, out: TextIO, *, pcap_path: str | None = None, show: int | None = SHOW,
        log: control.Log = control._quiet) -> int:
    """The demo; returns 0 if every ping had replies, else 1. Always tears the lab down."""
    check(topo, pcap_path)
    if shutil.which("ping") is None:
        raise LabError("ping: not found (install iputils-ping)")
    if topo.mesh is not None and not routed(topo):
        if show is not None:
            raise LabError(f"demo: --show {show}: the demo of a mesh captures nothing")
        return run_mesh(topo, out, log=log)
    if shutil.which("tcpdump") is None:
        raise LabError("tcpdump: not found (install tcpdump)")
    if topo.mesh is not None:
        if show is not None:
            raise LabError(f"demo: --show {show}: the demo of a mesh on segments shows how"
                           " each pair's packets crossed, not the packets")
        return run_routed_mesh(topo, out, log=log)
    control.check_not_up(topo)        # before the try: a lab of that name that is up is not ours
    tmpdir = None
    if pcap_path is None:
        tmpdir = tempfile.mkdtemp(prefix="tunl-lab-")
        pcap_path = os.path.join(tmpdir, f"{topo.name}.pcap")
    paths = capture_paths(os.path.abspath(pcap_path), topo.underlay.bridges)
    captures: list[Capture] = []
    try:
        print(f"lab {topo.name}: up ({_n(len(topo.hosts), 'host')})", file=out, flush=True)
        control.up(topo, log=log)
        pings = plan(topo)
        # every ping: a request and a reply, each crossing a bridge once (or, from one segment
        # to another, each of their bridges once)
        for bridge, path in paths.items():
            captures.append(Capture(topo.ns_underlay, path, 2 * PING_COUNT * len(pings),
                                    bridge))
        print(f"\nping -c {PING_COUNT} -i {PING_INTERVAL}, every target of every other host"
              f" (capturing on {' and '.join(paths)} of {topo.ns_underlay}):", file=out,
              flush=True)
        rows = []
        for a, b, target in pings:
            r = ping(topo.ns_host(a), target)
            rows.append((a.name, b.name, target, r))
        for line in ping_table(rows):
            print("  " + line, file=out)
        for c in captures:
            c.stop(CAPTURE_DRAIN)
        captures = []
        for bridge, path in paths.items():
            print(file=out)
            for line in decode_capture(path, show, bridge):
                print(line, file=out)
            if not tmpdir:
                print(f"  (capture kept in {path})", file=out)
        print(file=out)
        for h in topo.hosts:
            print(f"{h.name}: tunl -d -s tunnel show", file=out)
            r = netns.sh(topo.ns_host(h), "tunl -d -s tunnel show", timeout=30)
            text = (r.stdout + r.stderr).rstrip()
            for line in text.splitlines() or ["(nothing)"]:
                print("  " + line, file=out)
            if r.returncode != 0:
                print(f"  (exit {r.returncode})", file=out)
            for line in noroute_lines(topo.ns_host(h)):
                print("  " + line, file=out)
        failed = [row for row in rows if not row[3].ok]
        print(file=out)
        if failed:
            print(f"{len(failed)} of {len(rows)} pings failed: "
                  + ", ".join(f"{s}->{d} ({t})" for s, d, t, _ in failed), file=out)
        else:
            print(f"all {len(rows)} pings answered", file=out)
        return 1 if failed else 0
    finally:
        with control.uninterrupted():
            for c in captures:
                c.stop()
            report = control.down(topo.name, log=log)
            if report.namespaces:
                print(f"lab {topo.name}: down", file=out, flush=True)
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)


# -- the demo of a mesh ------------------------------------------------------------------------

def pick_victim(members: list[Host]) -> Host:
    """The member the demo kills: the middle one (C of A..E), never the first."""
    return members[len(members) // 2]


def ping_matrix(names: list[str], results: dict[tuple[str, str], PingResult]) -> list[str]:
    """Lines of a from x to matrix of the average rtt in ms ("-" on the diagonal, "no reply"
    where there was none)."""
    def cell(a: str, b: str) -> str:
        if a == b:
            return "-"
        r = results.get((a, b))
        if r is None:
            return ""
        return f"{r.rtt[1]:.3f}" if r.ok and r.rtt else "no reply"
    width = max([len("no reply"), *(len(n) for n in names)])
    head = "from \\ to"
    first = max(len(head), *(len(n) for n in names))
    lines = [head.ljust(first) + "".join(n.rjust(width + 2) for n in names)]
    for a in names:
        lines.append(a.ljust(first) + "".join(cell(a, b).rjust(width + 2) for b in names))
    return lines


def ping_all(topo: Topology, running: MeshLab) -> dict[tuple[str, str], PingResult]:
    """Every member pings every other member's bridge gateway (the subnet's .1), all at once."""
    states = running.states()
    pairs = []
    for a in running.members:
        for b in running.members:
            subnet = states[b.name].subnet
            if a is not b and subnet is not None:
                pairs.append((a, b, str(subnet.network_address + 1)))
    with ThreadPoolExecutor(max_workers=max(1, len(pairs))) as pool:
        futures = {(a.name, b.name): pool.submit(ping, topo.ns_host(a), target)
                   for a, b, target in pairs}
    results = {k: f.result() for k, f in futures.items()}
    for a in running.members:                       # a member without a subnet: no reply
        for b in running.members:
            if a is not b and (a.name, b.name) not in results:
                results[(a.name, b.name)] = PingResult(1, error=f"{b.name} has no subnet")
    return results


def _print_pings(out: TextIO, running: MeshLab, results) -> bool:
    names = [h.name for h in running.members]
    for line in ping_matrix(names, results):
        print("  " + line, file=out)
    failed = [k for k, r in results.items() if not r.ok]
    if failed:
        print(f"  {len(failed)} of {len(results)} pairs had no reply: "
              + ", ".join(f"{a}->{b}" for a, b in failed), file=out)
    else:
        print(f"  all {len(results)} pairs answered", file=out)
    return not failed


def _print_tails(out: TextIO, running: MeshLab, names) -> None:
    for name in names:
        print(f"  end of {running.agent_log(name)}:", file=out)
        for line in log_tail(running.agent_log(name)):
            print(f"    {line}", file=out)


def run_mesh(topo: Topology, out: TextIO, *, log: control.Log = control._quiet) -> int:
    """Up (the members join), every pair pings, one member's agent is killed and the member
    taken off the underlay, its routes go from every other member within 2 x ttl, it comes
    back with the same subnet, every pair pings again; down. 0 when all of that held."""
    mesh = topo.mesh
    assert mesh is not None
    members = list(topo.members)
    t_demo = time.monotonic()
    ok = True
    running = None
    control.check_not_up(topo)        # before the try: a lab of that name that is up is not ours
    try:
        hosts, joining = _n(len(topo.hosts), "host"), _n(len(members), "mesh member")
        print(f"lab {topo.name}: up ({hosts}, {joining}); mesh {mesh.network}, subnet-len"
              f" {mesh.subnet_len}, mode {mesh.mode}, registry {mesh.registry}, ttl {mesh.ttl} s",
              file=out, flush=True)
        running = control.up(topo, log=log)
        assert running is not None
        joined = running.joined_in
        print(f"joined: every member routes to every other {joined:.2f} s after the agents"
              f" started (registry {running.url})", file=out)
        states = running.states()
        rows = [("node", "underlay", "subnet", "gateway")]
        for h in members:
            subnet = states[h.name].subnet
            rows.append((h.name, str(h.address.ip), str(subnet),
                         str(subnet.network_address + 1) if subnet else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3],
                  file=out)
        first = members[0]
        r = netns.run(["ip", "-n", topo.ns_host(first), "route", "show", "proto", RTPROT_TUNL],
                      timeout=10)
        print(f"{first.name}: ip route show proto {RTPROT_TUNL}", file=out)
        for line in r.stdout.splitlines():
            print(f"  {line.rstrip()}", file=out)
        print(f"\nping -c {PING_COUNT} -i {PING_INTERVAL} from every member to every other"
              " member's gateway (avg rtt, ms):", file=out, flush=True)
        ok &= _print_pings(out, running, ping_all(topo, running))

        victim = pick_victim(members)
        others = [h for h in members if h is not victim]
        old = states[victim.name].subnet
        limit = 2 * mesh.ttl
        ns = topo.ns_host(victim)
        t0 = time.monotonic()
        pid = running.kill_agent(victim)
        netns.ip("link", "set", "eth0", "down", ns=ns)
        print(f"\n{victim.name}: kill -9 its agent (pid {pid}), eth0 down", file=out, flush=True)
        gone = running.wait_gone(old, others, t0, limit + 2.0)
        print(f"  {victim.name}'s route to {old} gone from "
              + ", ".join(f"{n} after {t:.2f} s" if t is not None else f"{n}: still there"
                          for n, t in gone.items()), file=out)
        late = [n for n, t in gone.items() if t is None or t > limit]
        worst = max((t for t in gone.values() if t is not None), default=None)
        if late:
            ok = False
            print(f"  not gone within 2 x ttl = {limit} s from {', '.join(late)}", file=out)
            _print_tails(out, running, late)
        else:
            print(f"  gone everywhere {worst:.2f} s after the kill (limit 2 x ttl = {limit} s)",
                  file=out)

        print(f"\n{victim.name}: eth0 up, its agent started again", file=out, flush=True)
        netns.ip("link", "set", "eth0", "up", ns=ns)
        t1 = time.monotonic()
        running.start_agent(victim)
        try:
            rejoined = running.wait_whole(t1, CONVERGE_AGAIN)
        except LabError as e:
            print(f"  {e}", file=out)
            _print_tails(out, running, [victim.name])
            return 1
        new = running.states([victim])[victim.name].subnet
        same = new == old
        ok &= same
        print(f"  {victim.name} leased {new} (before: {old}): "
              + ("the same subnet" if same else "ANOTHER subnet"), file=out)
        print(f"  every member routes to every other again {rejoined:.2f} s after the restart",
              file=out)
        print("\nping again (avg rtt, ms):", file=out, flush=True)
        ok &= _print_pings(out, running, ping_all(topo, running))

        gone_text = f"{worst:.2f} s" if worst is not None and not late else "NOT within limit"
        print(f"\ntimings: join {joined:.2f} s; {victim.name}'s routes gone {gone_text} (limit"
              f" {limit} s); rejoin {rejoined:.2f} s; demo"
              f" {time.monotonic() - t_demo:.1f} s", file=out)
        print("mesh demo: " + ("every check held" if ok else "FAILED"), file=out)
        return 0 if ok else 1
    finally:
        _mesh_down(topo, running, log, out)


# -- the demo of a mesh on segments: which pairs cross the underlay directly ------------------

DIRECT, ENCAPSULATED = "direct", "encapsulated"
MOVE_DRAIN = 0.3              # seconds for the last packets of the pings to reach tcpdump


@dataclass(frozen=True)
class PairPath:
    """How member src's echo requests to member dst's gateway crossed the underlay."""
    src: Host
    dst: Host
    src_gw: ipaddress.IPv4Address
    dst_gw: ipaddress.IPv4Address
    want: str                                   # DIRECT or ENCAPSULATED
    seen: str                                   # DIRECT, ENCAPSULATED, "mixed" or "not seen"
    outer: tuple[tuple[str, str, str], ...]     # (tunnel, outer src, outer dst) of tunnelled ones
    ping: PingResult

    @property
    def same_subnet(self) -> bool:
        return self.src.same_subnet(self.dst)

    @property
    def want_outer(self) -> tuple[str, str]:
        return str(self.src.address.ip), str(self.dst.address.ip)

    @property
    def wrong(self) -> str:
        """Why the pair is not as the mesh should carry it ("" when it is)."""
        if self.seen != self.want:
            why = "same subnet" if self.same_subnet else "other subnet"
            if self.want == DIRECT:
                return f"WRONG: {why} and cross-subnet, so direct"
            return f"WRONG: {why}, so encapsulated"
        if self.want == ENCAPSULATED and {o[1:] for o in self.outer} != {self.want_outer}:
            src, dst = self.want_outer
            return f"WRONG: the outer header should be {src} → {dst}"
        return ""

    @property
    def ok(self) -> bool:
        return self.ping.ok and not self.wrong

    def how(self) -> str:
        icmp = f"ICMP {self.src_gw} → {self.dst_gw} on the wire"
        tunnelled = ", ".join(f"{t.upper()} {s} → {d}" for t, s, d in self.outer)
        if self.seen == DIRECT:
            return f"direct ({icmp})"
        if self.seen == ENCAPSULATED:
            return f"encapsulated ({tunnelled})"
        if self.seen == "mixed":
            return f"mixed: direct ({icmp}) and encapsulated ({tunnelled})"
        return "not seen on the underlay"


def classify(src: Host, dst: Host, src_gw, dst_gw, packets: list[Carried], cross_subnet: bool,
             result: PingResult) -> PairPath:
    """(pure) The pair's echo requests among the captured packets (those from src's gateway to
    dst's): sent as they are, or inside a tunnel. A cross-subnet mesh sends directly to a
    member of its own underlay subnet and encapsulates to the others; any other mesh
    encapsulates to every member."""
    src_gw, dst_gw = ipaddress.IPv4Address(src_gw), ipaddress.IPv4Address(dst_gw)
    mine = [c for c in packets
            if c.src == src_gw and c.dst == dst_gw and c.icmp_type == ICMP_ECHO_REQUEST]
    direct = any(c.tunnel is None for c in mine)
    outer = tuple(sorted({(c.tunnel, str(c.outer_src), str(c.outer_dst))
                          for c in mine if c.tunnel is not None}))
    seen = ("mixed" if direct and outer else DIRECT if direct else ENCAPSULATED if outer
            else "not seen")
    want = DIRECT if cross_subnet and src.same_subnet(dst) else ENCAPSULATED
    return PairPath(src, dst, src_gw, dst_gw, want, seen, outer, result)


def pair_lines(pairs: list[PairPath]) -> list[str]:
    """The table, a line per pair:
    `A → B  same subnet   direct (ICMP 10.42.1.1 → 10.42.2.1 on the wire)  ok` (or what is
    wrong with it), and a summary line."""
    if not pairs:
        return ["no pairs"]
    wn = max(len(p.src.name) for p in pairs), max(len(p.dst.name) for p in pairs)
    hows = [p.how() for p in pairs]
    wh = max(len(h) for h in hows)
    lines = []
    for p, how in zip(pairs, hows):
        where = "same subnet" if p.same_subnet else "other subnet"
        notes = [p.wrong] if p.wrong else []
        if not p.ping.ok:
            notes.append(f"no reply ({p.ping.error})" if p.ping.error else "no reply")
        lines.append(f"{p.src.name:<{wn[0]}} → {p.dst.name:<{wn[1]}}  {where:<12}  {how:<{wh}}"
                     f"  {'; '.join(notes) or 'ok'}".rstrip())
    bad = [p for p in pairs if not p.ok]
    if bad:
        lines.append(f"{len(bad)} of {len(pairs)} pairs not as they should be: "
                     + ", ".join(f"{p.src.name}→{p.dst.name}" for p in bad))
    else:
        n = sum(p.seen == DIRECT for p in pairs)
        lines.append(f"all {len(pairs)} pairs answered, each as it should cross: {n} direct,"
                     f" {len(pairs) - n} encapsulated")
    return lines


def read_carried(paths: list[str]) -> list[Carried]:
    """The ICMP messages of the captures, each as it crossed the wire."""
    out = []
    for path in paths:
        try:
            linktype, records = pcap.read(path)
        except (OSError, ValueError):
            continue
        for r in records:
            p = pcap.ip_packet(linktype, r.data)
            if p is not None and (c := carried(p)) is not None:
                out.append(c)
    return out


def ping_pairs(topo: Topology, running: MeshLab, tmpdir: str, tag: str) -> list[PairPath]:
    """Every member pings every other member's gateway from its own (ping -I), all at once,
    while tcpdump captures on each bridge of the underlay; each pair classified."""
    states = running.states()
    gw = {h.name: states[h.name].subnet.network_address + 1 for h in running.members
          if states[h.name].subnet is not None}
    pairs = [(a, b) for a in running.members for b in running.members
             if a is not b and a.name in gw and b.name in gw]
    captures = []
    try:
        for bridge in topo.underlay.bridges:
            captures.append(Capture(topo.ns_underlay, os.path.join(tmpdir, f"{tag}-{bridge}.pcap"),
                                    None, bridge))
        with ThreadPoolExecutor(max_workers=max(1, len(pairs))) as pool:
            futures = [pool.submit(ping, topo.ns_host(a), str(gw[b.name]), str(gw[a.name]))
                       for a, b in pairs]
        results = [f.result() for f in futures]
    finally:
        for c in captures:
            c.stop(MOVE_DRAIN)
    packets = read_carried([c.path for c in captures])
    cross = topo.mesh is not None and topo.mesh.cross_subnet
    return [classify(a, b, gw[a.name], gw[b.name], packets, cross, r)
            for (a, b), r in zip(pairs, results)]


def pick_mover(topo: Topology, members: list[Host]):
    """(member, address) for the demo's move: the last member, into the first other segment,
    at its first free address; None without two segments."""
    if len(topo.underlay.segments) < 2:
        return None
    h = members[-1]
    own = topo.segment_of(h)
    for seg in topo.underlay.segments:
        if seg is not own and (address := topo.free_address(seg)) is not None:
            return h, address
    return None


def _print_routes(out: TextIO, topo: Topology, h: Host) -> None:
    r = netns.run(["ip", "-n", topo.ns_host(h), "route", "show", "proto", RTPROT_TUNL],
                  timeout=10)
    print(f"{h.name}: ip route show proto {RTPROT_TUNL}", file=out)
    for line in r.stdout.splitlines():
        print(f"  {line.rstrip()}", file=out)


def _print_members(out: TextIO, topo: Topology, running: MeshLab) -> None:
    states = running.states()
    rows = [("node", "underlay", "segment", "subnet", "gateway")]
    for h in running.members:
        subnet = states[h.name].subnet
        seg = topo.underlay.segment(h.address)
        rows.append((h.name, str(h.address.ip), f"{seg.cidr} ({seg.bridge})" if seg else "-",
                     str(subnet), str(subnet.network_address + 1) if subnet else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4], file=out)


def run_routed_mesh(topo: Topology, out: TextIO, *,
                    log: control.Log = control._quiet) -> int:
    """The demo of a mesh on segments (or a cross-subnet one): up (the members join), every
    member pings every other member's gateway while tcpdump captures on each bridge of the
    underlay, and the table says of each pair whether its packets crossed directly or
    encapsulated, and whether that is how the mesh should carry them; then one member moves to
    another segment (mesh.MeshLab.move) and the table again; down. 0 when all of that held."""
    mesh = topo.mesh
    assert mesh is not None
    t_demo = time.monotonic()
    ok = True
    running = None
    control.check_not_up(topo)        # before the try: a lab of that name that is up is not ours
    tmpdir = tempfile.mkdtemp(prefix="tunl-lab-")
    try:
        members = list(topo.members)
        hosts, joining = _n(len(topo.hosts), "host"), _n(len(members), "mesh member")
        print(f"lab {topo.name}: up ({hosts}, {joining}); mesh {mesh.network}, subnet-len"
              f" {mesh.subnet_len}, mode {mesh.mode}"
              + (", cross-subnet" if mesh.cross_subnet else "")
              + f", registry {mesh.registry}, ttl {mesh.ttl} s", file=out)
        segs = topo.underlay.segments
        if segs:
            print(f"underlay {topo.underlay.cidr}: "
                  + ", ".join(f"{s.cidr} on {s.bridge} (router {s.router})" for s in segs)
                  + f"; {topo.ns_underlay} routes between them", file=out, flush=True)
        running = control.up(topo, log=log)
        assert running is not None
        joined = running.joined_in
        print(f"joined: every member routes to every other {joined:.2f} s after the agents"
              f" started (registry {running.url})", file=out)
        _print_members(out, topo, running)
        _print_routes(out, topo, running.members[0])

        bridges = " and ".join(topo.underlay.bridges)
        print(f"\nping -c {PING_COUNT} -i {PING_INTERVAL} -I <its gateway>, every member to"
              f" every other member's gateway (capturing on {bridges} of {topo.ns_underlay}):",
              file=out, flush=True)
        pairs = ping_pairs(topo, running, tmpdir, "joined")
        for line in pair_lines(pairs):
            print("  " + line, file=out)
        ok &= all(p.ok for p in pairs)

        move = pick_mover(topo, running.members)
        moved_in = None
        if move is None:
            print("\n(no move: the underlay has fewer than two segments)", file=out)
        else:
            h, address = move
            old = running.states([h])[h.name].subnet
            seg = topo.underlay.segment(address)
            print(f"\n{h.name} moves to segment {seg.cidr}: eth0 {h.address} -> {address} on "
                  f"{seg.bridge}, default via {seg.router}, its agent running",
                  file=out, flush=True)
            t0 = time.monotonic()
            try:
                moved = running.move(h, address)
                moved_in = running.wait_whole(t0, CONVERGE_AGAIN)
            except LabError as e:
                print(f"  {e}", file=out)
                _print_tails(out, running, [h.name])
                print("cross-subnet demo: FAILED", file=out)
                return 1
            new = running.states([moved])[moved.name].subnet
            kept = "kept" if new == old else f"leased {new} (before: {old})"
            print(f"  {h.name} {kept} its subnet {old} with public IP {address.ip}; every"
                  f" member routes to every other again {moved_in:.2f} s after the move",
                  file=out)
            _print_routes(out, topo, moved)
            print("\nping again:", file=out, flush=True)
            pairs = ping_pairs(topo, running, tmpdir, "moved")
            for line in pair_lines(pairs):
                print("  " + line, file=out)
            ok &= all(p.ok for p in pairs)

        move_text = f"; move {moved_in:.2f} s" if moved_in is not None else ""
        print(f"\ntimings: join {joined:.2f} s{move_text}; demo"
              f" {time.monotonic() - t_demo:.1f} s", file=out)
        what = "cross-subnet demo" if mesh.cross_subnet else "mesh demo"
        print(f"{what}: " + ("every check held" if ok else "FAILED"), file=out)
        return 0 if ok else 1
    finally:
        _mesh_down(topo, running, log, out)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _mesh_down(topo: Topology, running, log, out) -> None:
    """A mesh demo's end, whatever happened: the lab down, its agents reaped."""
    with control.uninterrupted():
        report = control.down(topo.name, log=log)
        if running is not None:
            running.reap()
        if report.namespaces:
            print(f"lab {topo.name}: down", file=out, flush=True)
