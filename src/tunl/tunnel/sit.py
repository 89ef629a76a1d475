"""IPv6 in IPv4 (RFC 4213, IP protocol 41) with ISATAP (RFC 5214) and 6rd (RFC 5969), with the
semantics of the kernel's net/ipv6/sit.c.

Egress, like ipip6_tunnel_xmit(): only IPv6 is carried (anything else is a tx error); the
outer destination is the remote, or for a tunnel without one (NBMA) what outer_dst() picks
from the inner destination and the next hop of the route (ISATAP, then 6rd, then an
IPv4-compatible next hop); the outer header is outer.Outer's, except that only a tos of
exactly 1 means inherit (`if (tos == 1)`), and DF is cleared when the path MTU leaves less
than 1280 bytes for the inner packet (RFC 4213 §3.2.2).
Ingress, like ipip6_rcv(): the inner packet must hold an IPv6 header (tunnel64_rcv()), pass
the spoofing checks of packet_is_spoofed() (isatap_chksrc() on an ISATAP tunnel,
is_spoofed_6rd() on a tunnel without remote), then outer.check_inner() (ipv6_rcv() and ECN).
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Interface, IPv6Network

from ..model import TunnelMode, TunnelSpec
from ..wire import icmpv6, ipv4
from ..wire.drop import Drop
from ..wire.ipv4 import DF, IPV4_HLEN, OFF_FRAG, PROTO_IPV6
from ..wire.ipv6 import IPV6_HLEN, MIN_MTU, NH_ICMPV6
from .outer import HEADROOM, Outer, check_inner, keyless_demux

__all__ = ["CODEC", "HEADROOM", "OVERHEAD", "PROTO", "SitCodec", "decap", "demux",
           "is_isatap", "isatap_address", "isatap_iid", "packet_too_big", "too_big"]

OVERHEAD = IPV4_HLEN
PROTO = PROTO_IPV6
IPV4_MIN_MTU = 68                      # include/net/ip.h
_ZERO12 = bytes(12)


# ---- ISATAP interface identifiers (RFC 5214 §6.1) --------------------------------------------

# __ipv6_isatap_ifid(): these IPv4 networks make a "local" identifier (u bit 0); the kernel's
# ipv4_is_zeronet() is only 0.0.0.0 now, which has no identifier at all
_ISATAP_LOCAL = (
    (0x0A000000, 8),    # ipv4_is_private_10()
    (0x7F000000, 8),    # ipv4_is_loopback()
    (0xA9FE0000, 16),   # ipv4_is_linklocal_169()
    (0xAC100000, 12),   # ipv4_is_private_172()
    (0xC0000200, 24),   # ipv4_is_test_192()
    (0xC0586300, 24),   # ipv4_is_anycast_6to4()
    (0xC0A80000, 16),   # ipv4_is_private_192()
    (0xC6120000, 15),   # ipv4_is_test_198()
    (0xE0000000, 4),    # ipv4_is_multicast()
    (0xFFFFFFFF, 32),   # ipv4_is_lbcast()
)


def isatap_iid(v4) -> bytes | None:
    """The 8-byte ISATAP interface identifier of an IPv4 address, as __ipv6_isatap_ifid()
    makes it: 0200:5efe:a.b.c.d, or 0000:5efe:a.b.c.d (u bit clear, RFC 5214 §6.1) for the
    private and special-use addresses the kernel lists; None for 0.0.0.0."""
    a = int(IPv4Address(v4))
    if a == 0:
        return None
    local = any(a >> (32 - plen) == net >> (32 - plen) for net, plen in _ISATAP_LOCAL)
    return bytes((0x00 if local else 0x02, 0x00, 0x5E, 0xFE)) + a.to_bytes(4, "big")


def isatap_address(prefix, v4) -> IPv6Address:
    """The ISATAP address of v4 in a /64 prefix (fe80::/64 for the link-local one)."""
    net = IPv6Network(prefix)
    iid = isatap_iid(v4)
    if net.prefixlen > 64 or iid is None:
        raise ValueError(f"no ISATAP address of {v4} in {prefix}")
    return IPv6Address(net.network_address.packed[:8] + iid)


def is_isatap(addr) -> bool:
    """ipv6_addr_is_isatap(): the interface identifier is 0000:5efe:* or 0200:5efe:*."""
    a = addr.packed if isinstance(addr, IPv6Address) else addr
    return (a[8] | 0x02) == 0x02 and a[9] == 0 and a[10] == 0x5E and a[11] == 0xFE


# ---- path MTU (ipip6_tunnel_xmit(), with DF) -------------------------------------------------

def too_big(n: int, path_mtu: int) -> int | None:
    """The MTU to report in an ICMPv6 Packet Too Big for an n-byte inner packet over an IPv4
    path of path_mtu, or None when it fits. Like ipip6_tunnel_xmit(): mtu = path MTU - 20,
    never below 1280 (below it the packet goes out without DF, RFC 4213 §3.2.2)."""
    mtu = path_mtu - OVERHEAD
    if mtu < MIN_MTU:
        mtu = MIN_MTU
    return mtu if n > mtu else None


def _icmp6_ineligible(v) -> bool:
    """is_ineligible() of icmp6_send(): never answer an ICMPv6 error (nor a packet with no
    room for its header). Extension headers are skipped as ipv6_skip_exthdr() does."""
    n = len(v)
    nh, ptr, frag_off = v[6], IPV6_HLEN, 0
    while nh in (0, 43, 44, 51, 59, 60):           # ipv6_ext_hdr()
        if nh == 59 or ptr + 2 > n:                # NEXTHDR_NONE, or truncated: eligible
            return False
        if nh == 44:                               # fragment header
            if ptr + 4 > n:
                return False
            frag_off = (v[ptr + 2] << 8) | v[ptr + 3]
            if frag_off & ~0x7:
                return False                       # not the first fragment
            hdrlen = 8
        elif nh == 51:
            hdrlen = (v[ptr + 1] + 2) << 2         # ipv6_authlen()
        else:
            hdrlen = (v[ptr + 1] + 1) << 3         # ipv6_optlen()
        nh = v[ptr]
        ptr += hdrlen
    if nh != NH_ICMPV6:
        return False
    if ptr >= n:
        return frag_off == 0
    return v[ptr] < 128                            # !(type & ICMPV6_INFOMSG_MASK)


def packet_too_big(buf, off: int, n: int, mtu: int, src=None) -> bytes | None:
    """The ICMPv6 Packet Too Big (RFC 4443 §3.2) that answers the inner packet buf[off:off+n],
    or None where icmp6_send() sends nothing: a source that is unspecified or multicast, or an
    ICMPv6 error. Its source is the inner destination (the far side answers, so the kernel
    accepts it from the tunnel device) unless `src` is given; a multicast inner destination
    is no source, so without `src` there is no answer."""
    v = memoryview(buf)[off:off + n]
    if n < IPV6_HLEN:
        return None
    if not any(v[8:24]) or v[8] == 0xFF or _icmp6_ineligible(v):
        return None
    if src is None:
        if v[24] == 0xFF:
            return None
        src = bytes(v[24:40])
    return icmpv6.error_packet(src, v, icmpv6.packet_too_big(v, mtu))


# ---- the codec ---------------------------------------------------------------------------------

def _int(b) -> int:
    return int.from_bytes(b, "big")


class SitCodec:
    proto = PROTO_IPV6
    versions = (6,)

    __slots__ = ("outer", "isatap", "remote", "prl", "sixrd", "_prefixes")

    def __init__(self, spec: TunnelSpec):
        self.outer = Outer(spec)
        # ipip6_tunnel_xmit(): `if (tos == 1) tos = ipv6_get_dsfield(iph6)`; any other odd
        # tos is a fixed one (its ECN bits are overwritten by INET_ECN_encapsulate())
        self.outer.tos_inherit = spec.tos == 1
        self.isatap = spec.mode is TunnelMode.ISATAP            # IFF_ISATAP
        self.remote = _int(spec.remote.packed) if spec.remote else 0
        self.prl = frozenset(a.packed for a, _default in spec.prl)
        prefix, relay = spec.sixrd
        plen, rlen = prefix.prefixlen, relay.prefixlen
        # (shift to the prefix, prefix, shift to the IPv4 bits, mask of them, relay prefix,
        #  bits only_dnatted() compares)
        self.sixrd = (128 - plen, _int(prefix.network_address.packed) >> (128 - plen),
                      128 - plen - (32 - rlen), (1 << (32 - rlen)) - 1,
                      _int(relay.network_address.packed), plen + 32 - rlen)
        self._prefixes: tuple[tuple[int, int], ...] = ()

    @property
    def overhead(self) -> int:
        return OVERHEAD

    def set_prefixes(self, prefixes) -> None:
        """The IPv6 addresses on the device, as IPv6Interface (address and prefix length, as
        the kernel keeps an inet6_ifaddr) or IPv6Network (a /64 on the device). The data plane
        updates them; isatap_chksrc() and only_dnatted() read them."""
        out = []
        for p in prefixes:
            if isinstance(p, str):
                p = IPv6Interface(p)
            if isinstance(p, IPv6Interface):
                out.append((_int(p.ip.packed), p.network.prefixlen))
            else:
                p = IPv6Network(p)
                out.append((_int(p.network_address.packed), p.prefixlen))
        self._prefixes = tuple(out)

    # -- 6rd ------------------------------------------------------------------------------------

    def check_6rd(self, v6) -> int | None:
        """check_6rd(): the IPv4 address (as an int) a 6rd/6to4 address embeds: the relay
        prefix OR the (32 - relay prefix length) bits after the 6rd prefix; None outside it."""
        shift, prefix, at, mask, relay, _ = self.sixrd
        a = _int(v6)
        if a >> shift != prefix:
            return None
        return relay | ((a >> at) & mask)

    def _on_device(self, a: int, plen: int | None) -> bool:
        """ipv6_chk_prefix() (plen None: each address's own prefix length) or
        ipv6_chk_custom_prefix() (plen bits)."""
        for addr, own in self._prefixes:
            bits = own if plen is None else plen
            if (a ^ addr) >> (128 - bits) == 0:
                return True
        return False

    # -- egress ---------------------------------------------------------------------------------

    def outer_dst(self, inner_dst, nexthop=None) -> bytes | None:
        """The outer IPv4 destination for an IPv6 packet to inner_dst, as ipip6_tunnel_xmit()
        picks it; nexthop is the gateway of the IPv6 route that matched (None without one:
        then the inner destination is the neighbour key, as in rt6_nexthop()). None is a tx
        error. A tunnel with a remote uses it, except that ISATAP always asks the next hop."""
        dst = self.remote
        key = inner_dst if nexthop is None else nexthop
        if self.isatap:
            # ISATAP (RFC 5214) - must come before 6to4: ipip6_tunnel_dst_find(.., true)
            # wants a unicast (not ff00::/8) ISATAP neighbour and takes its embedded IPv4
            if key[0] == 0xFF or not is_isatap(key):
                return None
            dst = _int(key[12:16])
        if not dst:
            dst = self.check_6rd(inner_dst) or 0                   # try_6rd()
        if not dst:
            # ipip6_tunnel_dst_find(.., false): an IPv4-compatible neighbour (::a.b.c.d,
            # IPV6_ADDR_COMPATv4: not :: and not ::1); a neighbour of :: means the inner
            # destination
            if not any(key):
                key = inner_dst
            if key[:12] != _ZERO12:
                return None
            dst = _int(key[12:16])
            if dst <= 1:
                return None
        return dst.to_bytes(4, "big")

    def too_big(self, n: int, path_mtu: int) -> int | None:
        """too_big() for this tunnel: with nopmtudisc the outer packet has no DF, so an
        inner packet is never refused (the IPv4 layer fragments it)."""
        return too_big(n, path_mtu) if self.outer.pmtudisc else None

    def encap(self, buf, off: int, n: int, dst: bytes, ident: int,
              path_mtu: int | None = None) -> int | Drop:
        """Put the outer header in front of the IPv6 packet buf[off:off+n]; returns where the
        packet starts. With path_mtu (the IPv4 path MTU toward dst) the DF rules of
        ipip6_tunnel_xmit() apply: a packet larger than too_big() allows is refused with
        Drop.PACKET_TOO_BIG (the caller answers it with packet_too_big()), and DF is cleared
        when the path leaves less than 1280 bytes (RFC 4213 §3.2.2)."""
        if n < IPV6_HLEN or buf[off] >> 4 != 6:
            return Drop.NOT_IPV6           # sit_tunnel_xmit(): not IPv6, a tx error
        clear_df = False
        if path_mtu is not None and self.outer.pmtudisc:
            mtu = path_mtu - OVERHEAD
            if mtu < IPV4_MIN_MTU:
                return Drop.TOO_BIG        # the kernel counts a collision and drops
            if mtu < MIN_MTU:
                mtu, clear_df = MIN_MTU, True
            if n > mtu:
                return Drop.PACKET_TOO_BIG
        start = off - IPV4_HLEN
        self.outer.write(buf, start, off, n + IPV4_HLEN, PROTO_IPV6, dst, ident)
        if clear_df:
            buf[start + OFF_FRAG] &= ~(DF >> 8) & 0xFF
            ipv4.fix_checksum(buf, start)
        return start

    # -- ingress --------------------------------------------------------------------------------

    def _isatap_chksrc(self, buf, ihl: int) -> bool:
        """isatap_chksrc(): the outer source is a potential router, or the inner source is
        the ISATAP address of the outer source in a prefix on the device."""
        if bytes(buf[12:16]) in self.prl:
            return True
        src6 = buf[ihl + 8:ihl + 24]
        return (is_isatap(src6) and src6[12:16] == buf[12:16]
                and self._on_device(_int(src6), None))

    def _spoofed_6rd(self, buf, ihl: int) -> bool:
        """packet_is_spoofed() on a tunnel that is not point-to-point: is_spoofed_6rd() on
        the source, then on the destination unless only_dnatted() lets it pass."""
        embed = self.check_6rd(buf[ihl + 8:ihl + 24])
        if embed is not None and embed != _int(buf[12:16]):
            return True
        dst6 = buf[ihl + 24:ihl + 40]
        embed = self.check_6rd(dst6)
        if embed is None or embed == _int(buf[16:20]):
            return False
        return not self._on_device(_int(dst6), self.sixrd[5])

    def decap_at(self, buf, ihl: int, end: int, ctx=None) -> tuple[int, int] | Drop:
        """The inner packet of a checked outer packet whose tunnel has been found."""
        if end - ihl < IPV6_HLEN:
            return Drop.MALFORMED          # tunnel64_rcv(): pskb_may_pull(ipv6hdr)
        if self.isatap:
            if not self._isatap_chksrc(buf, ihl):
                return Drop.ISATAP_SOURCE
        elif not self.remote and self._spoofed_6rd(buf, ihl):   # !IFF_POINTOPOINT
            return Drop.SIXRD_SOURCE
        return check_inner(buf, ihl, end, 6, buf[1])


CODEC = SitCodec


def demux(buf, n: int):
    """(header length, end, key, context) of a received packet for the tunnel lookup."""
    return keyless_demux(buf, n, PROTO_IPV6)


def decap(buf, n: int, codec: SitCodec) -> tuple[int, int] | Drop:
    """demux() then codec.decap_at(): the inner IPv6 packet of buf[:n] as (offset, length).

    buf must be writable: an outer CE is copied into the inner header (RFC 6040).
    """
    r = demux(buf, n)
    if r.__class__ is Drop:
        return r
    return codec.decap_at(buf, r[0], r[1], r[3])
