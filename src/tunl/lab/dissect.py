"""One line per captured underlay packet, decoded with tunl's own codecs (tunl.wire).

The outer packet is IPv4; a tunnelled one carries, by its protocol number,

     4  ipip   an IPv4 packet (RFC 2003)
    47  gre    a GRE header (RFC 2784, key and sequence number of RFC 2890), then an IPv4 or
               IPv6 packet as its protocol type says (0x0800, 0x86DD)
    41  sit    an IPv6 packet (RFC 4213: 6in4, and ISATAP and 6rd, which differ only in how
               they choose the outer addresses)

and the inner packet is shown down to its ICMP or ICMPv6 message:

    172.16.232.172 > 172.16.232.194 proto 47 (gre, key 2, seq 0, csum ok): 10.50.2.1 >
        10.50.2.2 ICMP echo request, id 7, seq 1                            (one line)

`flow` tells the packets of one direction of one ping from those of another (and of another
tunnel: the GRE key is part of it), so that a capture can be shown one packet per flow.

`carried` says how an IPv4 ICMP message crossed the wire: plain (routed directly), or inside
an ipip or gre packet between two underlay addresses, which a cross-subnet mesh's demo checks
pair by pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ..wire import gre
from ..wire.checksum import inet_checksum
from ..wire.drop import Drop
from ..wire.icmp import DEST_UNREACH, ECHO_REPLY, ECHO_REQUEST, TIME_EXCEEDED, IcmpMessage
from ..wire.icmpv6 import Icmpv6Message
from ..wire.ipv4 import MF, OFFSET_MASK, PROTO_GRE, PROTO_ICMP, PROTO_IPIP, PROTO_IPV6, \
    IPv4Header
from ..wire.ipv6 import IPV6_HLEN, NH_ICMPV6, IPv6Header

TUNNEL_PROTOS = {PROTO_IPIP: "ipip", PROTO_GRE: "gre", PROTO_IPV6: "sit"}

PROTO_NAMES = {PROTO_IPIP: "ipip", PROTO_GRE: "gre", PROTO_IPV6: "ipv6 (sit)",
               PROTO_ICMP: "icmp", 2: "igmp", 6: "tcp", 17: "udp", NH_ICMPV6: "icmpv6"}
ICMP_NAMES = {ECHO_REQUEST: "echo request", ECHO_REPLY: "echo reply",
              DEST_UNREACH: "destination unreachable", TIME_EXCEEDED: "time exceeded"}
# RFC 4443 §2.1, RFC 4861 §4, RFC 3810 §5.2
ICMPV6_NAMES = {128: "echo request", 129: "echo reply", 1: "destination unreachable",
                2: "packet too big", 3: "time exceeded", 4: "parameter problem",
                133: "router solicitation", 134: "router advertisement",
                135: "neighbor solicitation", 136: "neighbor advertisement",
                143: "multicast listener report v2"}
_ECHO6 = (128, 129)


def show_address(addr) -> str:
    """An address as text; an IPv6 address with an ISATAP interface identifier (0:5efe:a.b.c.d
    or 200:5efe:a.b.c.d, RFC 5214 §6.1) ends in its IPv4 address, dotted, as people write it:
    2001:db8:5::5efe:172.16.1.2 rather than 2001:db8:5::5efe:ac10:102."""
    if not isinstance(addr, IPv6Address):
        return str(addr)
    b = addr.packed
    if not ((b[8] | 0x02) == 0x02 and b[9] == 0 and b[10] == 0x5E and b[11] == 0xFE):
        return str(addr)
    groups = [(b[i] << 8) | b[i + 1] for i in range(0, 12, 2)]
    # RFC 5952 §4.2: the longest run of two or more zero groups is "::", the first if tied
    start, length, i = -1, 0, 0
    while i < len(groups):
        j = i
        while j < len(groups) and groups[j] == 0:
            j += 1
        if j - i > length:
            start, length = i, j - i
        i = j + 1
    words = [f"{g:x}" for g in groups]
    if length >= 2:
        head = ":".join(words[:start]) + "::" + ":".join(words[start + length:])
    else:
        head = ":".join(words)
    text = head + ("" if head.endswith("::") else ":") + str(IPv4Address(b[12:]))
    return text + (f"%{addr.scope_id}" if addr.scope_id else "")


@dataclass(frozen=True)
class Dissected:
    line: str                 # one line for people
    flow: tuple               # hashable: outer and inner addresses, GRE key, message type
    tunnel: str | None        # "ipip", "gre" or "sit"; None for a packet not tunnelled


def dissect(packet) -> Dissected:
    """Decode an outer IPv4 packet; never raises on a malformed one, it says what is wrong."""
    v = memoryview(bytes(packet))
    try:
        outer = IPv4Header.parse(v)
    except ValueError as e:
        return Dissected(f"({e})", ("?", bytes(v[:20])), None)
    payload = v[outer.ihl * 4:outer.total_len]
    head = f"{outer.src} > {outer.dst} proto {outer.proto}"
    flow: tuple = (outer.proto, outer.src, outer.dst)
    tunnel = TUNNEL_PROTOS.get(outer.proto)
    if outer.flags_frag & (MF | OFFSET_MASK):
        return Dissected(f"{head} fragment, offset {(outer.flags_frag & OFFSET_MASK) * 8}",
                         flow + ("fragment",), tunnel)
    if outer.proto == PROTO_IPIP:
        line, inner_flow = _inner(4, payload)
        return Dissected(f"{head} (ipip): {line}", flow + inner_flow, tunnel)
    if outer.proto == PROTO_IPV6:
        line, inner_flow = _inner(6, payload)
        return Dissected(f"{head} (sit): {line}", flow + inner_flow, tunnel)
    if outer.proto == PROTO_GRE:
        return _gre(head, flow, payload)
    if outer.proto == PROTO_ICMP:
        text, kind = _icmp(payload)
        return Dissected(f"{head}: {text}", flow + (kind,), None)
    return Dissected(f"{head} ({PROTO_NAMES.get(outer.proto, '?')}), {len(payload)} bytes",
                     flow, None)


def _gre(head: str, flow: tuple, payload) -> Dissected:
    parsed = gre.parse(payload, 0, len(payload))
    if isinstance(parsed, Drop):
        return Dissected(f"{head} (gre): bad header ({parsed.value})", flow + ("bad",), "gre")
    flags, proto, key, seq, hlen = parsed
    what = ["gre"]
    if key is not None:
        what.append(f"key {key}")
    if seq is not None:
        what.append(f"seq {seq}")
    if flags & gre.CSUM:
        # RFC 2784 §2.5: over the GRE header and the payload, checksum field included
        what.append("csum ok" if inet_checksum(payload) == 0 else "csum BAD")
    head = f"{head} ({', '.join(what)})"
    flow = flow + (key,)
    inner = payload[hlen:]
    if proto == gre.ETH_P_IP:
        line, inner_flow = _inner(4, inner)
    elif proto == gre.ETH_P_IPV6:
        line, inner_flow = _inner(6, inner)
    else:
        return Dissected(f"{head}: protocol type {proto:#06x}, {len(inner)} bytes",
                         flow + (proto,), "gre")
    return Dissected(f"{head}: {line}", flow + inner_flow, "gre")


def _inner(version: int, data) -> tuple[str, tuple]:
    """(line, flow) of the inner packet of a tunnel, IPv4 or IPv6."""
    if version == 4:
        try:
            ip = IPv4Header.parse(data)
        except ValueError as e:
            return f"inner ({e})", ("bad",)
        body = data[ip.ihl * 4:ip.total_len]
        if ip.flags_frag & (MF | OFFSET_MASK):
            return (f"{ip.src} > {ip.dst} fragment, offset {(ip.flags_frag & OFFSET_MASK) * 8}",
                    (ip.src, ip.dst, "fragment"))
        if ip.proto == PROTO_ICMP:
            text, kind = _icmp(body)
        else:
            text, kind = f"proto {ip.proto} ({PROTO_NAMES.get(ip.proto, '?')}), " \
                         f"{len(body)} bytes", ip.proto
        return f"{ip.src} > {ip.dst} {text}", (ip.src, ip.dst, kind)
    try:
        ip6 = IPv6Header.parse(data)
    except ValueError as e:
        return f"inner ({e})", ("bad",)
    body = data[IPV6_HLEN:IPV6_HLEN + ip6.plen]
    if ip6.nh == NH_ICMPV6:
        text, kind = _icmpv6(body, ip6.src.packed, ip6.dst.packed)
    else:
        text, kind = f"next header {ip6.nh} ({PROTO_NAMES.get(ip6.nh, '?')}), " \
                     f"{len(body)} bytes", ip6.nh
    return (f"{show_address(ip6.src)} > {show_address(ip6.dst)} {text}",
            (ip6.src, ip6.dst, kind))


def _icmp(data) -> tuple[str, object]:
    try:
        m = IcmpMessage.parse(data)
    except ValueError as e:
        return f"ICMP ({e})", "bad"
    name = ICMP_NAMES.get(m.type, f"type {m.type} code {m.code}")
    if m.type in (ECHO_REQUEST, ECHO_REPLY):
        return f"ICMP {name}, id {m.ident}, seq {m.seq}", m.type
    return f"ICMP {name}", m.type


def _icmpv6(data, src: bytes, dst: bytes) -> tuple[str, object]:
    try:
        m = Icmpv6Message.parse(data, src, dst)
    except ValueError as e:
        return f"ICMPv6 ({e})", "bad"
    name = ICMPV6_NAMES.get(m.type, f"type {m.type} code {m.code}")
    if m.type in _ECHO6:
        return f"ICMPv6 {name}, id {m.rest >> 16}, seq {m.rest & 0xFFFF}", 256 + m.type
    if m.type == 2:
        return f"ICMPv6 {name}, mtu {m.rest}", 256 + m.type
    return f"ICMPv6 {name}", 256 + m.type


@dataclass(frozen=True)
class Carried:
    """An IPv4 ICMP message as it crossed the wire: `tunnel` None when it was sent as it is
    (outer = inner), else "ipip" or "gre" with the outer addresses of the tunnel's packet."""
    tunnel: str | None
    outer_src: IPv4Address
    outer_dst: IPv4Address
    src: IPv4Address
    dst: IPv4Address
    icmp_type: int


def carried(packet) -> Carried | None:
    """How a captured IPv4 packet carried an IPv4 ICMP message (plain, ipip, or gre with
    protocol type 0x0800); None for anything else, a fragment or a malformed packet."""
    v = memoryview(bytes(packet))
    try:
        outer = IPv4Header.parse(v)
    except ValueError:
        return None
    if outer.flags_frag & (MF | OFFSET_MASK):
        return None
    payload = v[outer.ihl * 4:outer.total_len]
    tunnel = None
    if outer.proto == PROTO_ICMP:
        inner, body = outer, payload
    else:
        if outer.proto == PROTO_IPIP:
            data = payload
        elif outer.proto == PROTO_GRE:
            parsed = gre.parse(payload, 0, len(payload))
            if isinstance(parsed, Drop) or parsed[1] != gre.ETH_P_IP:
                return None
            data = payload[parsed[4]:]
        else:
            return None
        tunnel = TUNNEL_PROTOS[outer.proto]
        try:
            inner = IPv4Header.parse(data)
        except ValueError:
            return None
        if inner.proto != PROTO_ICMP or inner.flags_frag & (MF | OFFSET_MASK):
            return None
        body = data[inner.ihl * 4:inner.total_len]
    if len(body) < 1:
        return None
    return Carried(tunnel, outer.src, outer.dst, inner.src, inner.dst, body[0])
