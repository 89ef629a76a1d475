"""GRE over IPv4 (RFC 2784, keys and sequence numbers of RFC 2890; IP protocol 47) with the
semantics of the kernel's ip_gre.c.

Egress, like ipgre_xmit() → __gre_xmit() → gre_build_header() → ip_tunnel_xmit(): the inner
packet is IPv4 (protocol type 0x0800) or IPv6 (0x86DD), which is what a TUN device hands a
GRE device (tun_get_user() types a packet by its version nibble); anything else, or a packet
too short for its IP header (pskb_inet_may_pull()), is a tx error. The header carries C, K
and S as the tunnel's ocsum, okey and oseq say; the key is okey; the sequence number is the
tunnel's o_seqno, taken and then incremented (atomic_fetch_inc(): commits ff827beb706e
"ip_gre: Make o_seqno start from 0 in native mode" and 31c417c948d7, 2022, in 6.1 and in
the stable kernels), so the first packet carries 0, as RFC 2890 §2.2 asks; the checksum
(RFC 2784 §2.5) covers the GRE header, key and sequence number written, and the payload.
Then the outer IPv4 header (outer.Outer).

Ingress, in two steps as in gre_rcv():
  demux()     gre_parse_header(): a valid outer IPv4 packet of protocol 47, GRE version 0 and
              no routing bit (else GRE_FLAGS), a header that fits (else MALFORMED). It returns
              the key, None without one: this is what the tunnel lookup matches against a
              tunnel's ikey, as ip_tunnel_key_match() does — a tunnel with an ikey takes only
              packets with that key, a tunnel without one only packets without a key (a key
              of 0 is a key). Matching is the data plane's job, not the codec's.
  decap_at()  on the tunnel the lookup chose, the rules of ip_tunnel_rcv(): checksum,
              sequence number, then the inner packet (outer.check_inner()).

Unlike the kernel, which verifies a GRE checksum in gre_parse_header() before the lookup and
counts a bad one nowhere, the checksum is verified in decap_at() so that the data plane can
count it on the tunnel the packet was meant for.
"""
from __future__ import annotations

from ..model import TunnelSpec
from ..wire import gre
from ..wire.drop import Drop
from ..wire.gre import CSUM, ETH_P_IP, ETH_P_IPV6, KEY, SEQ
from ..wire.ipv4 import IPV4_HLEN, PROTO_GRE
from .outer import HEADROOM, Outer, check_inner, inner_version, validate_outer

__all__ = ["HEADROOM", "PROTO", "GreCodec", "demux", "decap", "overhead"]

PROTO = PROTO_GRE
MAX_TOTAL = 0xFFFF


def overhead(spec: TunnelSpec) -> int:
    """Outer IPv4 header plus the GRE header this tunnel sends: 24, 28, 32 or 36.

    Like ip_tunnel_bind_dev(): the device MTU is the underlay's minus 20 + gre_calc_hlen(
    o_flags), so 1476 over 1500 without options and 4 less for each of ocsum, okey, oseq."""
    return IPV4_HLEN + gre.header_len(_oflags(spec))


def _oflags(spec: TunnelSpec) -> int:
    return ((CSUM if spec.ocsum else 0) | (KEY if spec.okey is not None else 0)
            | (SEQ if spec.oseq else 0))


class GreCodec:
    """One GRE tunnel's encapsulation and receive rules. Keeps the tunnel's sequence numbers
    (o_seqno for egress, i_seqno for ingress), so there is one per tunnel."""

    proto = PROTO_GRE
    versions = (4, 6)

    __slots__ = ("outer", "oflags", "okey", "hlen", "overhead", "icsum", "iseq",
                 "o_seqno", "i_seqno")

    def __init__(self, spec: TunnelSpec):
        self.outer = Outer(spec)
        self.oflags = _oflags(spec)
        self.okey = spec.okey or 0
        self.hlen = gre.header_len(self.oflags)         # tunnel->tun_hlen
        self.overhead = IPV4_HLEN + self.hlen
        self.icsum = spec.icsum
        self.iseq = spec.iseq
        self.o_seqno = 0        # the next sequence number to send
        self.i_seqno = 0        # the next one expected; 0: accept any (ip_tunnel_rcv())

    def encap(self, buf, off: int, n: int, dst: bytes, ident: int) -> int | Drop:
        """Put the GRE and outer headers in front of buf[off:off+n]; returns where the packet
        starts."""
        version = inner_version(buf, off, n)
        if version == 4:
            ptype = ETH_P_IP
        elif version == 6:
            ptype = ETH_P_IPV6
        else:
            return Drop.NOT_IPV4          # ipgre_xmit(): pskb_inet_may_pull() fails, tx error
        total = n + self.overhead
        if total > MAX_TOTAL:
            return Drop.TOO_BIG           # no IPv4 packet is that long; the MTU prevents it
        g = off - self.hlen
        flags = self.oflags
        seq = 0
        if flags & SEQ:
            seq = self.o_seqno            # htonl(atomic_fetch_inc(&tunnel->o_seqno))
            self.o_seqno = (seq + 1) & 0xFFFFFFFF
        gre.pack_into(buf, g, flags, ptype, self.okey, seq)
        if flags & CSUM:
            gre.fill_checksum(buf, g, off + n)      # gre_build_header(), after key and seq
        start = g - IPV4_HLEN
        self.outer.write(buf, start, off, total, PROTO_GRE, dst, ident)
        return start

    def decap_at(self, buf, ihl: int, end: int, ctx) -> tuple[int, int] | Drop:
        """The inner packet of a GRE packet demux() has parsed and the lookup has given this
        tunnel; ctx is demux()'s (flags, protocol type, seq, GRE header length)."""
        flags, ptype, seq, hlen = ctx
        if flags & CSUM:
            # gre_parse_header(): a checksum that does not verify drops the packet first,
            # whatever the tunnel's icsum (RFC 2784 §2.5)
            if not gre.checksum_ok(buf, ihl, end):
                return Drop.BAD_CSUM
            if not self.icsum:
                return Drop.CSUM_MISMATCH           # ip_tunnel_rcv(): rx_crc_errors
        elif self.icsum:
            return Drop.CSUM_MISMATCH
        if self.iseq:
            # ip_tunnel_rcv(): no sequence number, or one older than expected, is dropped
            # (rx_fifo_errors); RFC 2890 §2.2 in serial number arithmetic
            if seq is None or (self.i_seqno and (seq - self.i_seqno) & 0x80000000):
                return Drop.OUT_OF_SEQ
            self.i_seqno = (seq + 1) & 0xFFFFFFFF
        # after ip_tunnel_rcv() the packet goes up by its protocol type: ip_rcv() or
        # ipv6_rcv(); a TUN device carries nothing else
        if ptype == ETH_P_IP:
            version = 4
        elif ptype == ETH_P_IPV6:
            version = 6
        else:
            return Drop.WRONG_PROTO
        return check_inner(buf, ihl + hlen, end, version, buf[1])




def demux(buf, n: int):
    """(header length, end, key, context) of a received GRE packet buf[:n] for the tunnel
    lookup, or why it is dropped before any lookup. key: the GRE key, None without one."""
    r = validate_outer(buf, n, PROTO_GRE)
    if r.__class__ is Drop:
        return r
    ihl, end = r
    g = gre.parse(buf, ihl, end)
    if g.__class__ is Drop:
        return g
    flags, ptype, key, seq, hlen = g
    if ptype == gre.ETH_P_ERSPAN or ptype == gre.ETH_P_ERSPAN2:
        return Drop.WRONG_PROTO   # gre_rcv() hands ERSPAN to erspan_rcv(), never to ipgre
    return ihl, end, key, (flags, ptype, seq, hlen)


def decap(buf, n: int, codec: GreCodec) -> tuple[int, int] | Drop:
    """demux() then codec.decap_at(), as if the lookup had chosen codec's tunnel whatever the
    key (for tests; the data plane does the lookup in between)."""
    r = demux(buf, n)
    if r.__class__ is Drop:
        return r
    return codec.decap_at(buf, r[0], r[1], r[3])
