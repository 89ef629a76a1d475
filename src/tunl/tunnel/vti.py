"""vti: route-based IPsec with the semantics of the kernel's ip_vti.c and xfrm (pure).

Egress (vti_xmit()): the packet routed into the tunnel is marked with the tunnel's okey; the
out policy whose mark and selector match it names a template (tunnel-mode ESP from A to B),
the state that fits the template (and the mark) encrypts it (RFC 4303 tunnel mode), and the
outer IPv4 header is the one xfrm4_mode_tunnel_output() writes: TTL 64, the inner TOS with
ECN encapsulated, the inner DF.

Ingress (vti_input_proto(), xfrm_input(), vti_rcv_cb()): the tunnel is found by its outer
addresses as ip_tunnel_lookup() finds it, the packet is marked with the tunnel's ikey, the
state is looked up by (destination, SPI, ESP) and the mark, the ESP packet is checked and
decrypted, and an in policy with that mark must allow the inner packet and name a template
the state fits (xfrm_policy_check(): no policy, XfrmInNoPols; no template, XfrmInTmplMismatch).

`Xfrm` is a namespace's states and policies, as the kernel keeps them per netns; it counts the
xfrm MIB as /proc/net/xfrm_stat does. Nothing here does I/O.
"""
from __future__ import annotations

import struct
from collections import Counter
from ipaddress import IPv4Address

from ..model import TunnelSpec
from ..wire import ipv4
from ..wire.drop import Drop
from ..wire.ipv4 import DF, IPV4_HLEN
from . import ecn
from .outer import check_inner, keyless_demux

PROTO_ESP = 50
TTL = 64               # ip4_dst_hoplimit() of the route: the sysctl's default
# the most ESP adds to a packet: header 8, IV 16 (cbc), pad 15, trailer 2, ICV 32
ESP_MAX = 8 + 16 + 15 + 2 + 32
OVERHEAD = IPV4_HLEN + ESP_MAX
_U32 = struct.Struct("!I")



def mib_name(why: Drop, default: str) -> str:
    """The kernel's xfrm MIB counter (/proc/net/xfrm_stat) for an ESP codec's drop."""
    from .esp import XFRM_MIB          # the crypto library only once a vti is there
    return XFRM_MIB.get(why, default)


def _marked(mark: int, want: int | None, mask: int) -> bool:
    """xfrm_mark_match(): (skb mark & m) == v; no mark given matches every mark (m = 0)."""
    return want is None or (mark & mask) == want


class Sa:
    """A state and the codec that carries it."""

    __slots__ = ("state", "esp", "src", "dst")

    def __init__(self, state):
        from .esp import EspSA
        self.state = state
        a = state.aead
        self.esp = EspSA(state.spi,
                         aead=(a.name, a.key, a.bits) if a else None,
                         enc=(state.enc.name, state.enc.key) if state.enc else None,
                         auth=(state.auth.name, state.auth.key, state.auth.bits)
                         if state.auth else None,
                         replay_window=state.replay_window)
        self.src, self.dst = state.src.packed, state.dst.packed


class Xfrm:
    """States by (destination, SPI) and policies in priority order, of one namespace."""

    def __init__(self):
        self.states: dict[tuple[bytes, int], Sa] = {}
        self.policies: list = []
        self.mib: Counter = Counter()        # /proc/net/xfrm_stat names -> count
        # the policies as the data path matches them, derived from `policies` once per list
        self._match: tuple[list, list] = ([], [])

    # -- configuration (the daemon's thread; the data path sees whole objects replaced) -----

    def add_state(self, state, update: bool = False) -> None:
        from ..errors import ExistsError, NotFoundError
        key = (state.dst.packed, state.spi)
        if key in self.states and not update:
            raise ExistsError(f"xfrm state dst {state.dst} spi {state.spi:#010x}: File exists")
        if update and key not in self.states:
            raise NotFoundError(f"xfrm state dst {state.dst} spi {state.spi:#010x}: "
                                "No such process")
        self.states = {**self.states, key: Sa(state)}

    def del_state(self, dst: IPv4Address, spi: int) -> None:
        from ..errors import NotFoundError
        key = (dst.packed, spi)
        if key not in self.states:
            raise NotFoundError(f"xfrm state dst {dst} spi {spi:#010x}: No such process")
        self.states = {k: v for k, v in self.states.items() if k != key}

    def add_policy(self, policy, update: bool = False) -> None:
        from ..errors import ExistsError, NotFoundError
        same = [p for p in self.policies if p.key == policy.key]
        if same and not update:
            raise ExistsError(f"xfrm policy dir {policy.dir} src {policy.src} dst "
                              f"{policy.dst}: File exists")
        if update and not same:
            raise NotFoundError(f"xfrm policy dir {policy.dir} src {policy.src} dst "
                                f"{policy.dst}: No such file or directory")
        rest = [p for p in self.policies if p.key != policy.key]
        self.policies = sorted(rest + [policy], key=lambda p: p.priority)

    def del_policy(self, policy_key) -> None:
        from ..errors import NotFoundError
        if not any(p.key == policy_key for p in self.policies):
            raise NotFoundError("xfrm policy: No such file or directory")
        self.policies = [p for p in self.policies if p.key != policy_key]

    def counters(self) -> dict[str, int]:
        """The MIB, as `tunl -s` shows it."""
        return dict(self.mib)

    # -- the data path ----------------------------------------------------------------------

    def _policy(self, direction: str, mark: int, src: bytes, dst: bytes):
        """The first policy by priority whose mark and selector take the packet (a selector
        with an upper protocol is not a vti's: it takes none here); a block policy too."""
        policies, table = self._match
        if policies is not self.policies:       # replaced by the daemon's thread: derive again
            policies = self.policies
            table = [(p, int(p.src.network_address), int(p.src.netmask),
                      int(p.dst.network_address), int(p.dst.netmask))
                     for p in policies if p.proto is None]
            self._match = (policies, table)
        s, d = int.from_bytes(src, "big"), int.from_bytes(dst, "big")
        for p, snet, smask, dnet, dmask in table:
            if p.dir == direction and s & smask == snet and d & dmask == dnet and \
                    _marked(mark, p.mark, p.mark_mask):
                return p
        return None

    def out_sa(self, mark: int, inner_src: bytes, inner_dst: bytes) -> Sa | Drop:
        """xfrm_lookup() for a packet the vti sends with skb->mark = okey."""
        p = self._policy("out", mark, inner_src, inner_dst)
        if p is None or p.action == "block":
            self.mib["XfrmOutPolBlock"] += 1     # a vti's packet with no policy is not sent
            return Drop.XFRM_OUT_NO_POLICY
        for sa in self.states.values():
            st = sa.state
            if p.has_tmpl and st.src == p.tmpl_src and st.dst == p.tmpl_dst and \
                    (not p.tmpl_reqid or st.reqid == p.tmpl_reqid) and \
                    _marked(mark, st.mark, st.mark_mask):
                return sa
        self.mib["XfrmOutNoStates"] += 1
        return Drop.XFRM_OUT_NO_STATE

    def in_sa(self, dst: bytes, spi: int, mark: int) -> Sa | Drop:
        """xfrm_state_lookup(mark, daddr, spi, IPPROTO_ESP)."""
        sa = self.states.get((dst, spi))
        if sa is None or not _marked(mark, sa.state.mark, sa.state.mark_mask):
            self.mib["XfrmInNoStates"] += 1
            return Drop.XFRM_NO_STATE
        return sa

    def in_allowed(self, mark: int, sa: Sa, inner_src: bytes, inner_dst: bytes) -> Drop | None:
        """__xfrm_policy_check() of a decrypted tunnel-mode packet."""
        p = self._policy("in", mark, inner_src, inner_dst)
        if p is None:
            self.mib["XfrmInNoPols"] += 1
            return Drop.XFRM_NO_POLICY
        if p.action == "block":
            self.mib["XfrmInPolBlock"] += 1      # __xfrm_policy_check(): not XFRM_POLICY_ALLOW
            return Drop.XFRM_NO_POLICY
        st = sa.state
        if st.src != p.tmpl_src or st.dst != p.tmpl_dst or \
                (p.tmpl_reqid and st.reqid != p.tmpl_reqid):
            self.mib["XfrmInTmplMismatch"] += 1
            return Drop.XFRM_TMPL_MISMATCH
        return None


class VtiCodec:
    """The codec of one vti tunnel over a namespace's Xfrm (ip_vti carries IPv4)."""

    proto = PROTO_ESP
    versions = (4,)
    overhead = OVERHEAD

    __slots__ = ("xfrm", "okey", "ikey")

    def __init__(self, spec: TunnelSpec, xfrm: Xfrm):
        self.xfrm = xfrm
        self.okey = spec.okey or 0
        self.ikey = spec.ikey or 0

    def encap(self, buf, off: int, n: int, dst: bytes, ident: int):
        """Encrypt buf[off:off+n] and put the outer header in front: (start, end) of the
        packet to send, or why not."""
        if n < IPV4_HLEN or buf[off] >> 4 != 4:
            return Drop.NOT_IPV4
        sa = self.xfrm.out_sa(self.okey, bytes(buf[off + 12:off + 16]),
                              bytes(buf[off + 16:off + 20]))
        if sa.__class__ is Drop:
            return sa
        tos, df = buf[off + 1], buf[off + 6] & 0x40
        esp = sa.esp.encrypt(memoryview(buf)[off:off + n])
        if esp.__class__ is Drop:
            self.xfrm.mib[mib_name(esp, "XfrmOutError")] += 1
            return esp
        end = off + len(esp)
        buf[off:end] = esp
        start = off - IPV4_HLEN
        # xfrm4_mode_tunnel_output(): inner TOS with ECN encapsulated, the inner DF
        ipv4.pack_header_into(buf, start, tos=ecn.encapsulate(tos, tos),
                              total_len=end - start, ident=ident, frag=DF if df else 0,
                              ttl=TTL, proto=PROTO_ESP, src=sa.src, dst=sa.dst)
        return start, end

    def decap_at(self, buf, ihl: int, end: int, ctx=None):
        """The inner packet of an ESP packet whose tunnel has been found: (offset, length)."""
        if end - ihl < 8:
            self.xfrm.mib["XfrmInHdrError"] += 1
            return Drop.MALFORMED
        spi = _U32.unpack_from(buf, ihl)[0]
        sa = self.xfrm.in_sa(bytes(buf[16:20]), spi, self.ikey)
        if sa.__class__ is Drop:
            return sa
        outer_tos = buf[1]
        inner = sa.esp.decrypt(memoryview(buf)[ihl:end])
        if inner.__class__ is Drop:
            self.xfrm.mib[mib_name(inner, "XfrmInError")] += 1
            return inner
        ln = len(inner)
        if ln < IPV4_HLEN:
            self.xfrm.mib["XfrmInError"] += 1
            return Drop.MALFORMED
        buf[ihl:ihl + ln] = inner
        why = self.xfrm.in_allowed(self.ikey, sa, bytes(buf[ihl + 12:ihl + 16]),
                                   bytes(buf[ihl + 16:ihl + 20]))
        if why is not None:
            return why
        return check_inner(buf, ihl, ihl + ln, 4, outer_tos)


def demux(buf, n: int):
    """(header length, end, key, context): vti tunnels are found by address alone
    (vti_input_proto() asks ip_tunnel_lookup() with TUNNEL_NO_KEY)."""
    return keyless_demux(buf, n, PROTO_ESP)
