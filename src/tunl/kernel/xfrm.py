"""The kernel's IPsec states and policies over NETLINK_XFRM (the xfrm_user family), with the
socket module and struct alone: pyroute2 does not speak xfrm.

KernelXfrm is tunl's XfrmStore on the kernel: add (XFRM_MSG_NEWSA, or UPDSA for update),
del, get and dump states; the same for policies (XFRM_MSG_NEWPOLICY/UPDPOLICY/DELPOLICY/
GETPOLICY); flush; the count of states (XFRM_MSG_GETSADINFO). Requests are built the way
iproute2's ip/xfrm_state.c and ip/xfrm_policy.c build them, so that a state tunl adds is the
one `ip xfrm state add` adds with the same words. The kernel's errno (and its extended ack,
"Requested AEAD algorithm not found") becomes a tunl error here.

Layouts (x86-64 and every 64-bit ABI; include/uapi/linux/xfrm.h; addresses and the SPI in
network byte order, the rest in host byte order):

    xfrm_address_t        16  a4 @0 (IPv4), or a6
    xfrm_selector         56  daddr @0, saddr @16, dport @32, dport_mask @34, sport @36,
                              sport_mask @38, family u16 @40, prefixlen_d @42, prefixlen_s @43,
                              proto @44, ifindex i32 @48, user u32 @52
    xfrm_id               24  daddr @0, spi @16, proto @20
    xfrm_lifetime_cfg     64  soft/hard byte, soft/hard packet limits, soft/hard add and use
                              expiry: eight u64
    xfrm_lifetime_cur     32  bytes, packets, add_time, use_time: four u64
    xfrm_usersa_info     224  sel @0, id @56, saddr @80, lft @96, curlft @160, stats @192 (12),
                              seq @204, reqid @208, family u16 @212, mode @214,
                              replay_window @215, flags @216
    xfrm_usersa_id        24  daddr @0, spi @16, family u16 @20, proto @22
    xfrm_userpolicy_info 168  sel @0, lft @56, curlft @120, priority @152, index @156, dir @160,
                              action @161, flags @162, share @163
    xfrm_userpolicy_id    64  sel @0, index @56, dir @60
    xfrm_user_tmpl        64  id @0, family u16 @24, saddr @28, reqid @44, mode @48, share @49,
                              optional @50, aalgos @52, ealgos @56, calgos @60
    xfrm_algo             68  alg_name[64], alg_key_len u32 (bits), key
    xfrm_algo_aead        72  alg_name[64], alg_key_len, alg_icv_len, key
    xfrm_algo_auth        72  alg_name[64], alg_key_len, alg_trunc_len, key
    xfrm_mark              8  v, m
    xfrm_replay_state     12  oseq, seq, bitmap
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

from ..errors import ExistsError, LinkError, NotFoundError, TunlError, UnsupportedError
from ..xfrm import (DIRS, MODES, PROTOS, U32, Algo, PolicyEntry, PolicyId, StateEntry,
                    StateId, XfrmPolicy, XfrmState)

NETLINK_XFRM = 6

# include/uapi/linux/netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_ACK_TLVS = 0x200          # in an NLMSG_ERROR: extended ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10

# include/uapi/linux/xfrm.h
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWSADINFO = 0x22
XFRM_MSG_GETSADINFO = 0x23

XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_TMPL = 5
XFRMA_SRCADDR = 13
XFRMA_LASTUSED = 15
XFRMA_POLICY_TYPE = 16
XFRMA_REPLAY_VAL = 10
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_SAD_CNT = 1               # in XFRM_MSG_NEWSADINFO

XFRM_POLICY_TYPE_MAIN = 0
XFRM_POLICY_MAX = 3             # dir ≥ 3: a socket's policy
XFRM_INF = 0xFFFFFFFFFFFFFFFF
AF_INET = socket.AF_INET

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_MARK = struct.Struct("=II")
_REPLAY = struct.Struct("=III")                      # oseq, seq, bitmap
_SELECTOR = struct.Struct("=16s16sHHHHHBBB3xiI")     # 56
_LFT = struct.Struct("=8Q")                          # 64
_USERSA_INFO = struct.Struct("=56s16sIB3x16s64s32s12sIIHBBB7x")      # 224
_USERSA_ID = struct.Struct("=16sIHBx")               # 24
_USERPOLICY_INFO = struct.Struct("=56s64s32sIIBBBB4x")               # 168
_USERPOLICY_ID = struct.Struct("=56sIB3x")           # 64
_USER_TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")  # 64
_ALGO = struct.Struct("=64sI")                       # 68
_ALGO_LEN = struct.Struct("=64sII")                  # 72: aead (icv) and auth (trunc)
_USERPOLICY_TYPE = struct.Struct("=B3x")

assert _SELECTOR.size == 56 and _USERSA_INFO.size == 224 and _USERSA_ID.size == 24
assert _USERPOLICY_INFO.size == 168 and _USERPOLICY_ID.size == 64 and _USER_TMPL.size == 64

# ip sets the byte and packet limits to "infinite" and the expiries to none (xfrm_state.c)
LFT_DEFAULT = _LFT.pack(XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)
RECV_BUFSIZE = 1 << 16
PROTO_NAMES = {v: k for k, v in PROTOS.items()}


def _a4(addr: IPv4Address | None) -> bytes:
    return (addr.packed if addr is not None else bytes(4)) + bytes(12)


def _attr(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _RTATTR.pack(n, t) + payload + bytes((-n) & 3)


def _selector(src=None, dst=None, proto: int | None = None) -> bytes:
    src = src or IPv4Network("0.0.0.0/0")
    dst = dst or IPv4Network("0.0.0.0/0")
    return _SELECTOR.pack(_a4(dst.network_address), _a4(src.network_address), 0, 0, 0, 0,
                          AF_INET, dst.prefixlen, src.prefixlen, proto or 0, 0, 0)


def _algo(t: int, a: Algo) -> bytes:
    name = a.name.encode()
    if t == XFRMA_ALG_CRYPT:
        head = _ALGO.pack(name, len(a.key) * 8)
    else:
        head = _ALGO_LEN.pack(name, len(a.key) * 8, a.bits)
    return _attr(t, head + a.key)


def _mark(mark: int | None, mask: int) -> bytes:
    return _attr(XFRMA_MARK, _MARK.pack(mark, mask)) if mark is not None else b""


def state_request(s: XfrmState) -> bytes:
    """The body of XFRM_MSG_NEWSA/UPDSA for s, as xfrm_state_modify() builds it."""
    info = _USERSA_INFO.pack(bytes(56), _a4(s.dst), socket.htonl(s.spi), PROTOS[s.proto],
                             _a4(s.src), LFT_DEFAULT, bytes(32), bytes(12), 0, s.reqid,
                             AF_INET, MODES.index(s.mode), s.replay_window, 0)
    attrs = []
    if s.aead is not None:
        attrs.append(_algo(XFRMA_ALG_AEAD, s.aead))
    if s.enc is not None:
        attrs.append(_algo(XFRMA_ALG_CRYPT, s.enc))
    if s.auth is not None:
        attrs.append(_algo(XFRMA_ALG_AUTH_TRUNC, s.auth))
    attrs.append(_mark(s.mark, s.mark_mask))
    return info + b"".join(attrs)


def state_id_request(sid: StateId) -> bytes:
    """The body of XFRM_MSG_DELSA/GETSA, as xfrm_state_get_or_delete() builds it."""
    return (_USERSA_ID.pack(_a4(sid.dst), socket.htonl(sid.spi), AF_INET, PROTOS[sid.proto])
            + _attr(XFRMA_SRCADDR, _a4(sid.src)) + _mark(sid.mark, sid.mark_mask))


def policy_request(p: XfrmPolicy) -> bytes:
    """The body of XFRM_MSG_NEWPOLICY/UPDPOLICY, as xfrm_policy_modify() builds it."""
    info = _USERPOLICY_INFO.pack(_selector(p.src, p.dst, p.proto), LFT_DEFAULT, bytes(32),
                                 p.priority, 0, DIRS.index(p.dir), ("allow", "block").index(
                                     p.action), 0, 0)
    attrs = []
    if p.has_tmpl:
        # ip: family from the addresses, all algorithms allowed, level required
        attrs.append(_attr(XFRMA_TMPL, _USER_TMPL.pack(
            _a4(p.tmpl_dst), 0, PROTOS[p.tmpl_proto], AF_INET, _a4(p.tmpl_src), p.tmpl_reqid,
            MODES.index(p.tmpl_mode), 0, 0, U32, U32, U32)))
    attrs.append(_mark(p.mark, p.mark_mask))
    return info + b"".join(attrs)


def policy_id_request(pid: PolicyId) -> bytes:
    return (_USERPOLICY_ID.pack(_selector(pid.src, pid.dst, pid.proto), 0, DIRS.index(pid.dir))
            + _mark(pid.mark, pid.mark_mask))


def _attrs(buf: bytes, a: int, end: int) -> dict[int, bytes]:
    out = {}
    while a + 4 <= end:
        alen, t = _RTATTR.unpack_from(buf, a)
        if alen < 4 or a + alen > end:
            break
        out[t & 0x3FFF] = buf[a + 4:a + alen]
        a += (alen + 3) & ~3
    return out


def _v4(raw: bytes) -> IPv4Address:
    return IPv4Address(raw[:4])


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _read_algo(raw: bytes, with_len: bool) -> Algo:
    if with_len:
        name, keybits, bits = _ALGO_LEN.unpack_from(raw)
        key = raw[_ALGO_LEN.size:_ALGO_LEN.size + keybits // 8]
    else:
        name, keybits = _ALGO.unpack_from(raw)
        bits, key = 0, raw[_ALGO.size:_ALGO.size + keybits // 8]
    return Algo(_name(name), bytes(key), bits)


def _word(table, i: int) -> str:
    return table[i] if 0 <= i < len(table) else str(i)


def parse_state(body: bytes) -> StateEntry:
    """The StateEntry of an XFRM_MSG_NEWSA body (xfrm_usersa_info and its attributes)."""
    (_sel, daddr, spi, proto, saddr, _lft, _cur, _stats, _seq, reqid, family, mode, window,
     _flags) = _USERSA_INFO.unpack_from(body)
    a = _attrs(body, _USERSA_INFO.size, len(body))
    mark = mask = None
    if XFRMA_MARK in a and len(a[XFRMA_MARK]) >= 8:
        mark, mask = _MARK.unpack_from(a[XFRMA_MARK])
    auth = None
    if XFRMA_ALG_AUTH_TRUNC in a:
        auth = _read_algo(a[XFRMA_ALG_AUTH_TRUNC], True)
    elif XFRMA_ALG_AUTH in a:
        auth = _read_algo(a[XFRMA_ALG_AUTH], False)
    state = XfrmState.unchecked(
        src=_v4(saddr), dst=_v4(daddr), spi=socket.ntohl(spi),
        proto=PROTO_NAMES.get(proto, str(proto)), mode=_word(MODES, mode), reqid=reqid,
        mark=mark, mark_mask=U32 if mask is None else mask,
        aead=_read_algo(a[XFRMA_ALG_AEAD], True) if XFRMA_ALG_AEAD in a else None,
        enc=_read_algo(a[XFRMA_ALG_CRYPT], False) if XFRMA_ALG_CRYPT in a else None,
        auth=auth, replay_window=window)
    seq = oseq = bitmap = lastused = 0
    if XFRMA_REPLAY_VAL in a and len(a[XFRMA_REPLAY_VAL]) >= 12:
        oseq, seq, bitmap = _REPLAY.unpack_from(a[XFRMA_REPLAY_VAL])
    if XFRMA_LASTUSED in a and len(a[XFRMA_LASTUSED]) >= 8:
        lastused = _U64.unpack_from(a[XFRMA_LASTUSED])[0]
    return StateEntry(state, seq, oseq, bitmap, lastused)


def parse_policy(body: bytes) -> PolicyEntry | None:
    """The PolicyEntry of an XFRM_MSG_NEWPOLICY body; None for a socket's policy."""
    sel, _lft, _cur, priority, index, d, action, _flags, _share = \
        _USERPOLICY_INFO.unpack_from(body)
    if d >= XFRM_POLICY_MAX:
        return None
    daddr, saddr, _dp, _dpm, _sp, _spm, _fam, plen_d, plen_s, proto, _ifi, _user = \
        _SELECTOR.unpack(sel)
    a = _attrs(body, _USERPOLICY_INFO.size, len(body))
    mark, mask = None, U32
    if XFRMA_MARK in a and len(a[XFRMA_MARK]) >= 8:
        mark, mask = _MARK.unpack_from(a[XFRMA_MARK])
    tmpl = {}
    if XFRMA_TMPL in a and len(a[XFRMA_TMPL]) >= _USER_TMPL.size:
        (tdaddr, _spi, tproto, _tfam, tsaddr, treqid, tmode, _share, _opt, _a, _e,
         _c) = _USER_TMPL.unpack_from(a[XFRMA_TMPL])
        tmpl = dict(tmpl_src=_v4(tsaddr), tmpl_dst=_v4(tdaddr),
                    tmpl_proto=PROTO_NAMES.get(tproto, str(tproto)),
                    tmpl_mode=_word(MODES, tmode), tmpl_reqid=treqid)
    ptype = None
    if XFRMA_POLICY_TYPE in a:
        ptype = {0: "main", 1: "sub"}.get(a[XFRMA_POLICY_TYPE][0], str(a[XFRMA_POLICY_TYPE][0]))
    policy = XfrmPolicy.unchecked(
        dir=_word(DIRS, d),
        src=IPv4Network((_v4(saddr), plen_s), strict=False),
        dst=IPv4Network((_v4(daddr), plen_d), strict=False),
        proto=proto or None, mark=mark, mark_mask=mask, priority=priority,
        action=_word(("allow", "block"), action), **tmpl)
    return PolicyEntry(policy, index, ptype)


def _describe_state(s) -> str:
    return f"spi {s.spi:#010x} dst {s.dst}"


def _describe_policy(p) -> str:
    return f"dir {p.dir} src {p.src} dst {p.dst}" + (f" mark {p.mark:#x}" if p.mark is not None
                                                      else "")


class KernelXfrm:
    """tunl's XfrmStore on the kernel's xfrm: one NETLINK_XFRM socket; one per thread."""

    def __init__(self):
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                       NETLINK_XFRM)
        except OSError as e:
            if e.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                raise UnsupportedError("xfrm: this kernel has no xfrm_user netlink family "
                                       "(CONFIG_XFRM_USER; modprobe xfrm_user)") from e
            raise
        try:
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass        # older kernels: errors echo the request, without a message
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0
        self._buf = bytearray(RECV_BUFSIZE)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "KernelXfrm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- netlink

    def _send(self, mtype: int, flags: int, body: bytes) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self._sock.send(_NLMSGHDR.pack(16 + len(body), mtype, flags | NLM_F_REQUEST,
                                       self._seq, 0) + body)
        return self._seq

    def _talk(self, mtype: int, flags: int, body: bytes, op: str, what: str) -> list:
        """Send one request; the messages of its answer as (type, body). An error becomes
        a tunl error naming op and what."""
        seq = self._send(mtype, flags, body)
        out = []
        while True:
            n = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
            if n > len(self._buf):
                raise LinkError(op, what, errno.EMSGSIZE)
            buf = bytes(self._buf[:n])
            off = 0
            while off + 16 <= n:
                mlen, t, mflags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
                if mlen < 16 or off + mlen > n:
                    break
                if mseq == seq:
                    if t == NLMSG_ERROR:
                        err = _I32.unpack_from(buf, off + 16)[0] if mlen >= 20 else 0
                        if err < 0:
                            raise _error(op, what, -err, _ext_ack(buf, off, mlen, mflags))
                        return out
                    if t == NLMSG_DONE:
                        err = _I32.unpack_from(buf, off + 16)[0] if mlen >= 20 else 0
                        if err < 0:
                            raise _error(op, what, -err, _ext_ack(buf, off, mlen, mflags))
                        return out
                    out.append((t, buf[off + 16:off + mlen]))
                    if not mflags & NLM_F_MULTI:
                        return out
                off += (mlen + 3) & ~3

    def _change(self, mtype: int, body: bytes, op: str, what: str) -> None:
        self._talk(mtype, NLM_F_ACK, body, op, what)

    def _dump(self, mtype: int, op: str) -> list:
        return self._talk(mtype, NLM_F_DUMP, b"", op, "dump")

    # -- states

    def add_state(self, state: XfrmState, update: bool = False) -> None:
        self._change(XFRM_MSG_UPDSA if update else XFRM_MSG_NEWSA, state_request(state),
                     "xfrm state update" if update else "xfrm state add",
                     _describe_state(state))

    def del_state(self, sid: StateId) -> None:
        self._change(XFRM_MSG_DELSA, state_id_request(sid), "xfrm state del",
                     _describe_state(sid))

    def get_state(self, sid: StateId) -> StateEntry:
        msgs = self._talk(XFRM_MSG_GETSA, 0, state_id_request(sid), "xfrm state get",
                          _describe_state(sid))
        for t, body in msgs:
            if t == XFRM_MSG_NEWSA:
                return parse_state(body)
        raise NotFoundError(f"xfrm state get {_describe_state(sid)}: no such state")

    def states(self) -> list[StateEntry]:
        return [parse_state(b) for t, b in self._dump(XFRM_MSG_GETSA, "xfrm state show")
                if t == XFRM_MSG_NEWSA and len(b) >= _USERSA_INFO.size]

    def state_count(self) -> int:
        for t, b in self._talk(XFRM_MSG_GETSADINFO, 0, _U32.pack(U32), "xfrm state count",
                               "SAD"):
            if t == XFRM_MSG_NEWSADINFO:
                a = _attrs(b, 4, len(b))
                if XFRMA_SAD_CNT in a:
                    return _U32.unpack_from(a[XFRMA_SAD_CNT])[0]
        raise TunlError("xfrm state count: the kernel sent no count")

    def flush_states(self) -> None:
        # struct xfrm_usersa_flush { __u8 proto; }: 0 flushes every state, as ip sends it
        # (xfrm_id_proto_match())
        self._change(XFRM_MSG_FLUSHSA, bytes(4), "xfrm state flush", "all")

    # -- policies

    def add_policy(self, policy: XfrmPolicy, update: bool = False) -> None:
        self._change(XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY,
                     policy_request(policy),
                     "xfrm policy update" if update else "xfrm policy add",
                     _describe_policy(policy))

    def del_policy(self, pid: PolicyId) -> None:
        self._change(XFRM_MSG_DELPOLICY, policy_id_request(pid), "xfrm policy del",
                     _describe_policy(pid))

    def get_policy(self, pid: PolicyId) -> PolicyEntry:
        for t, body in self._talk(XFRM_MSG_GETPOLICY, 0, policy_id_request(pid),
                                  "xfrm policy get", _describe_policy(pid)):
            if t == XFRM_MSG_NEWPOLICY:
                e = parse_policy(body)
                if e is not None:
                    return e
        raise NotFoundError(f"xfrm policy get {_describe_policy(pid)}: no such policy")

    def policies(self) -> list[PolicyEntry]:
        out = []
        for t, b in self._dump(XFRM_MSG_GETPOLICY, "xfrm policy show"):
            if t == XFRM_MSG_NEWPOLICY and len(b) >= _USERPOLICY_INFO.size:
                e = parse_policy(b)
                if e is not None:
                    out.append(e)
        return out

    def flush_policies(self) -> None:
        # ip xfrm policy flush sends the main type (XFRMA_POLICY_TYPE only for ptype)
        self._change(XFRM_MSG_FLUSHPOLICY, b"", "xfrm policy flush", "all")


def _ext_ack(buf: bytes, off: int, mlen: int, flags: int) -> str:
    """NLMSGERR_ATTR_MSG of an NLMSG_ERROR, when the kernel sent one (NETLINK_EXT_ACK)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # struct nlmsgerr: error, then the request's header (capped: NETLINK_CAP_ACK) or all of it
    inner = _NLMSGHDR.unpack_from(buf, off + 20)[0] if mlen >= 36 else 16
    start = off + 20 + (16 if flags & 0x100 else inner)     # NLM_F_CAPPED = 0x100
    msg = _attrs(buf, start, off + mlen).get(NLMSGERR_ATTR_MSG, b"")
    return _name(msg)


def _error(op: str, what: str, code: int, detail: str) -> TunlError:
    """The tunl error of the kernel's answer code (an errno) to op on what."""
    why = detail.rstrip(".") or os.strerror(code)
    if code == errno.EEXIST:
        return ExistsError(f"{op} {what}: it exists ({why}); update changes it")
    if code in (errno.ESRCH, errno.ENOENT) and not detail:
        return NotFoundError(f"{op} {what}: no such {op.split()[1]} ({why})")
    if code == errno.EPERM:
        return TunlError(f"{op}: needs root (the kernel answers xfrm requests to "
                         "CAP_NET_ADMIN only)")
    if code in (errno.ENOENT, errno.ENOSYS, errno.EPROTONOSUPPORT) and detail:
        # "Requested AEAD algorithm not found", "Requested type not found": a module missing
        return UnsupportedError(f"{op} {what}: this kernel cannot: {why} (the crypto or esp4 "
                                "module is missing)")
    return LinkError(op, what, code, why)
