"""Value types of IPsec for vti tunnels: security associations (XfrmState) and security
policies (XfrmPolicy), in the words of `ip xfrm state` and `ip xfrm policy`.

A `mode vti` tunnel is route-based IPsec: the tunnel device carries the packets whose
routes point at it, and the kernel's xfrm layer encrypts them with the state whose mark is
the tunnel's okey (and decrypts with the one whose mark is its ikey). tunl carries what such
a tunnel needs and no more: ESP in tunnel mode over IPv4, with AES-GCM (RFC 4106) or AES-CBC
(RFC 3602) with HMAC-SHA-256 (RFC 4868). Anything else is refused on construction with a
one-line ConfigError that names the word and the rule.

What is read from a data plane is shown as it is: `XfrmState.unchecked()` and
`XfrmPolicy.unchecked()` build values without tunl's rules, for a state or policy someone
else made (ah, transport mode, other algorithms), so that show prints what is there.

The store of states and policies is a small interface, XfrmStore: the kernel's xfrm
(kernel.xfrm.KernelXfrm, over NETLINK_XFRM) is one, tunld's userspace plane can be another.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from .errors import ConfigError

U32 = 0xFFFFFFFF

# the algorithms of a vti: name -> allowed key lengths in bytes, allowed ICV/truncation bits
AEAD_GCM = "rfc4106(gcm(aes))"
ENC_CBC = "cbc(aes)"
AUTH_SHA256 = "hmac(sha256)"
# RFC 4106 §8.1: an AES key of 16, 24 or 32 bytes and a 4-byte salt; §3: an ICV of 8, 12 or 16
GCM_KEY_BYTES = (20, 28, 36)
GCM_ICV_BITS = (64, 96, 128)
CBC_KEY_BYTES = (16, 24, 32)                 # RFC 3602 §2.1: AES-128, -192, -256
SHA256_KEY_BYTES = 32                        # RFC 4868 §2.1.1: the key is as long as the hash
SHA256_TRUNC_BITS = range(96, 257, 8)        # the kernel takes 96..256; RFC 4868 §2.1 says 128
# the kernel's truncation for "auth hmac(sha256)" without a length (aalg_list of xfrm_algo.c:
# icv_truncbits 96, the draft value; auth-trunc ... 128 is RFC 4868's)
SHA256_DEFAULT_TRUNC = 96
MAX_REPLAY_WINDOW = 32                       # the classic window (a 32-bit bitmap; no ESN)

PROTOS = {"esp": 50, "ah": 51, "comp": 108, "route2": 43, "hao": 60, "ipsec-any": 255}
MODES = ("transport", "tunnel", "ro", "in_trigger", "beet")     # XFRM_MODE_* 0..4
DIRS = ("in", "out", "fwd")                                     # XFRM_POLICY_IN/OUT/FWD
ACTIONS = ("allow", "block")                                    # XFRM_POLICY_ALLOW/BLOCK
ANY = IPv4Network("0.0.0.0/0")


def _u32(word: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32:
        raise ConfigError(f"{word} {value}: a number of 0..4294967295")
    return value


@dataclass(frozen=True)
class Algo:
    """One algorithm of a state: its kernel name, its key, and `bits`: the ICV length of an
    aead, the truncation of an auth-trunc, 0 for enc."""

    name: str
    key: bytes
    bits: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "key": "0x" + self.key.hex(), "bits": self.bits}

    @classmethod
    def from_dict(cls, d: dict) -> "Algo":
        k = d["key"]
        return cls(d["name"], bytes.fromhex(k[2:] if k[:2] in ("0x", "0X") else k),
                   int(d.get("bits", 0)))


def check_aead(a: Algo) -> None:
    if a.name != AEAD_GCM:
        raise ConfigError(f'aead "{a.name}": tunl carries aead {AEAD_GCM} or enc {ENC_CBC} '
                          f"with auth-trunc {AUTH_SHA256}")
    if len(a.key) not in GCM_KEY_BYTES:
        raise ConfigError(f"aead {a.name} key of {len(a.key)} bytes: an AES key of 16, 24 or 32 "
                          "bytes and a 4-byte salt, so 20, 28 or 36 bytes (RFC 4106 §8.1)")
    if a.bits not in GCM_ICV_BITS:
        raise ConfigError(f"aead {a.name} ICV length {a.bits}: 64, 96 or 128 bits (RFC 4106 §3)")


def check_enc(a: Algo) -> None:
    if a.name != ENC_CBC:
        raise ConfigError(f'enc "{a.name}": tunl carries {ENC_CBC} or aead {AEAD_GCM}')
    if len(a.key) not in CBC_KEY_BYTES:
        raise ConfigError(f"enc {a.name} key of {len(a.key)} bytes: AES takes 16, 24 or 32 "
                          "bytes (RFC 3602 §2.1)")
    if a.bits:
        raise ConfigError(f"enc {a.name} bits {a.bits}: enc has no ICV (0)")


def check_auth(a: Algo) -> None:
    if a.name != AUTH_SHA256:
        raise ConfigError(f'auth-trunc "{a.name}": tunl carries {AUTH_SHA256} (with enc '
                          f"{ENC_CBC})")
    if len(a.key) != SHA256_KEY_BYTES:
        raise ConfigError(f"auth-trunc {a.name} key of {len(a.key)} bytes: the key of "
                          f"HMAC-SHA-256 has 32 bytes (RFC 4868 §2.1.1)")
    if a.bits not in SHA256_TRUNC_BITS:
        raise ConfigError(f"auth-trunc {a.name} length {a.bits}: 96..256 bits, a multiple of 8 "
                          "(RFC 4868 says 128)")


def _addr(word: str, v) -> IPv4Address:
    if not isinstance(v, IPv4Address):
        raise ConfigError(f"{word} {v}: tunl's states and policies are IPv4 (the vti's ends)")
    return v


def _check_mark(mark, mask) -> None:
    if mark is None and mask != U32:
        raise ConfigError(f"mask {mask:#x} without mark: a mask goes with a mark")
    if mark is not None:
        _u32("mark", mark)
        _u32("mask", mask)
        if mask == 0:
            raise ConfigError(f"mark {mark:#x} mask 0: a mask of 0 matches every packet; leave "
                              "the mark out instead")


def _unchecked(cls, values: dict):
    obj = object.__new__(cls)
    for f in fields(cls):
        object.__setattr__(obj, f.name, values.get(f.name, f.default))
    return obj


@dataclass(frozen=True)
class StateId:
    """What picks one state, as the kernel looks it up (xfrm_state_lookup()): dst, spi and
    proto, and the mark; src goes along as ip sends it."""

    dst: IPv4Address
    spi: int
    proto: str = "esp"
    src: IPv4Address | None = None
    mark: int | None = None
    mark_mask: int = U32


@dataclass(frozen=True)
class XfrmState:
    """One security association, as `ip xfrm state add` describes it."""

    src: IPv4Address
    dst: IPv4Address
    spi: int
    proto: str = "esp"
    mode: str = "tunnel"
    reqid: int = 0
    mark: int | None = None
    mark_mask: int = U32
    aead: Algo | None = None
    enc: Algo | None = None
    auth: Algo | None = None          # auth-trunc
    replay_window: int = 0

    def __post_init__(self) -> None:
        _addr("src", self.src)
        _addr("dst", self.dst)
        if self.proto != "esp":
            raise ConfigError(f'proto "{self.proto}": tunl carries esp (a vti encrypts)')
        if self.mode != "tunnel":
            raise ConfigError(f'mode "{self.mode}": a vti takes mode tunnel')
        _u32("spi", self.spi)
        if self.spi < 256:
            raise ConfigError(f"spi {self.spi:#x}: 0 is no SPI and 1..255 are reserved "
                              "(RFC 4303 §2.1); take 0x100 or more")
        _u32("reqid", self.reqid)
        _check_mark(self.mark, self.mark_mask)
        if not isinstance(self.replay_window, int) or \
                not 0 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise ConfigError(f"replay-window {self.replay_window}: 0..{MAX_REPLAY_WINDOW} "
                              "(tunl keeps the classic window, without esn)")
        if self.aead is not None:
            check_aead(self.aead)
            if self.enc is not None or self.auth is not None:
                word = "enc" if self.enc is not None else "auth-trunc"
                raise ConfigError(f"{word} with aead: aead {AEAD_GCM} encrypts and "
                                  "authenticates alone")
        elif self.enc is not None:
            check_enc(self.enc)
            if self.auth is None:
                raise ConfigError(f"enc {self.enc.name} without auth-trunc: tunl sends no "
                                  f"unauthenticated ESP; add auth-trunc {AUTH_SHA256} KEY 128")
            check_auth(self.auth)
        elif self.auth is not None:
            raise ConfigError(f"auth-trunc without enc: ESP needs enc {ENC_CBC} (or aead "
                              f"{AEAD_GCM} alone)")
        else:
            raise ConfigError(f"proto esp: say aead {AEAD_GCM} KEY 128, or enc {ENC_CBC} KEY "
                              f"with auth-trunc {AUTH_SHA256} KEY 128")

    @classmethod
    def unchecked(cls, **values) -> "XfrmState":
        """A state as a data plane holds it, without tunl's rules (for show)."""
        return _unchecked(cls, values)

    @property
    def key(self) -> tuple:
        """The identity of a state in a store, the kernel's: (dst, spi, proto)."""
        return (self.dst, self.spi, self.proto)

    @property
    def id(self) -> StateId:
        return StateId(self.dst, self.spi, self.proto, self.src, self.mark, self.mark_mask)

    def to_dict(self) -> dict:
        """JSON-safe: addresses as text, keys as 0x-hex, None where a word is left out."""
        return {"src": str(self.src), "dst": str(self.dst), "spi": self.spi,
                "proto": self.proto, "mode": self.mode, "reqid": self.reqid,
                "mark": self.mark, "mark_mask": self.mark_mask,
                "aead": self.aead and self.aead.to_dict(),
                "enc": self.enc and self.enc.to_dict(),
                "auth": self.auth and self.auth.to_dict(),
                "replay_window": self.replay_window}

    @classmethod
    def from_dict(cls, d: dict) -> "XfrmState":
        def algo(k):
            return Algo.from_dict(d[k]) if d.get(k) else None
        return cls(IPv4Address(d["src"]), IPv4Address(d["dst"]), int(d["spi"]),
                   d.get("proto", "esp"), d.get("mode", "tunnel"), int(d.get("reqid", 0)),
                   d.get("mark"), int(d.get("mark_mask", U32)), algo("aead"), algo("enc"),
                   algo("auth"), int(d.get("replay_window", 0)))


@dataclass(frozen=True)
class PolicyId:
    """What picks one policy, as the kernel looks it up (xfrm_policy_bysel_ctx()): direction,
    selector and mark."""

    dir: str
    src: IPv4Network = ANY
    dst: IPv4Network = ANY
    proto: int | None = None
    mark: int | None = None
    mark_mask: int = U32


@dataclass(frozen=True)
class XfrmPolicy:
    """One security policy, as `ip xfrm policy add` describes it: a selector (src, dst and an
    upper protocol), a direction, and at most one template (the state to use: tmpl_*)."""

    dir: str
    src: IPv4Network = ANY
    dst: IPv4Network = ANY
    proto: int | None = None          # the selector's upper protocol (6 for tcp), None: any
    tmpl_src: IPv4Address | None = None
    tmpl_dst: IPv4Address | None = None
    tmpl_proto: str = "esp"
    tmpl_mode: str = "tunnel"
    tmpl_reqid: int = 0
    mark: int | None = None
    mark_mask: int = U32
    priority: int = 0
    action: str = "allow"

    def __post_init__(self) -> None:
        if self.dir not in DIRS:
            raise ConfigError(f'dir "{self.dir}": a policy is for in, out or fwd')
        for word in ("src", "dst"):
            if not isinstance(getattr(self, word), IPv4Network):
                raise ConfigError(f"{word} {getattr(self, word)}: tunl's selectors are IPv4 "
                                  "prefixes")
        if self.proto is not None and not (isinstance(self.proto, int) and
                                           0 < self.proto <= 255):
            raise ConfigError(f"proto {self.proto}: an IP protocol of 1..255 (or any)")
        if (self.tmpl_src is None) != (self.tmpl_dst is None):
            raise ConfigError("tmpl: a tunnel-mode template names both ends, src and dst")
        if self.tmpl_src is not None:
            _addr("tmpl src", self.tmpl_src)
            _addr("tmpl dst", self.tmpl_dst)
        if self.tmpl_proto != "esp":
            raise ConfigError(f'tmpl proto "{self.tmpl_proto}": tunl carries esp')
        if self.tmpl_mode != "tunnel":
            raise ConfigError(f'tmpl mode "{self.tmpl_mode}": a vti takes mode tunnel')
        _u32("tmpl reqid", self.tmpl_reqid)
        if self.tmpl_src is None and self.tmpl_reqid:
            raise ConfigError(f"tmpl reqid {self.tmpl_reqid} without a template: say tmpl src "
                              "ADDR dst ADDR proto esp mode tunnel reqid N")
        _check_mark(self.mark, self.mark_mask)
        _u32("priority", self.priority)
        if self.action not in ACTIONS:
            raise ConfigError(f'action "{self.action}": allow or block')

    @classmethod
    def unchecked(cls, **values) -> "XfrmPolicy":
        """A policy as a data plane holds it, without tunl's rules (for show)."""
        return _unchecked(cls, values)

    @property
    def has_tmpl(self) -> bool:
        return self.tmpl_dst is not None

    @property
    def key(self) -> tuple:
        """The identity of a policy in a store: (dir, selector, mark)."""
        return (self.dir, (self.src, self.dst, self.proto), (self.mark, self.mark_mask))

    @property
    def id(self) -> PolicyId:
        return PolicyId(self.dir, self.src, self.dst, self.proto, self.mark, self.mark_mask)

    def to_dict(self) -> dict:
        return {"dir": self.dir, "src": str(self.src), "dst": str(self.dst),
                "proto": self.proto,
                "tmpl_src": None if self.tmpl_src is None else str(self.tmpl_src),
                "tmpl_dst": None if self.tmpl_dst is None else str(self.tmpl_dst),
                "tmpl_proto": self.tmpl_proto, "tmpl_mode": self.tmpl_mode,
                "tmpl_reqid": self.tmpl_reqid, "mark": self.mark, "mark_mask": self.mark_mask,
                "priority": self.priority, "action": self.action}

    @classmethod
    def from_dict(cls, d: dict) -> "XfrmPolicy":
        def addr(k):
            return IPv4Address(d[k]) if d.get(k) is not None else None
        return cls(d["dir"], IPv4Network(d.get("src", "0.0.0.0/0")),
                   IPv4Network(d.get("dst", "0.0.0.0/0")), d.get("proto"), addr("tmpl_src"),
                   addr("tmpl_dst"), d.get("tmpl_proto", "esp"), d.get("tmpl_mode", "tunnel"),
                   int(d.get("tmpl_reqid", 0)), d.get("mark"), int(d.get("mark_mask", U32)),
                   int(d.get("priority", 0)), d.get("action", "allow"))


@dataclass(frozen=True)
class StateEntry:
    """A state as a store shows it: the state, and what the data plane keeps beside it (the
    anti-replay context, and when a packet last used it: seconds since the epoch, 0 never)."""

    state: XfrmState
    seq: int = 0
    oseq: int = 0
    bitmap: int = 0
    lastused: int = 0

    def to_dict(self) -> dict:
        return {**self.state.to_dict(), "replay": {"seq": self.seq, "oseq": self.oseq,
                                                   "bitmap": self.bitmap},
                "lastused": self.lastused}


@dataclass(frozen=True)
class PolicyEntry:
    """A policy as a store shows it: the policy, the index the data plane gave it, and its
    type (main; None where the kernel has no sub policies and sends no type)."""

    policy: XfrmPolicy
    index: int = 0
    ptype: str | None = "main"

    def to_dict(self) -> dict:
        return {**self.policy.to_dict(), "index": self.index, "ptype": self.ptype}


class XfrmStore(Protocol):
    """Where states and policies live: the kernel's xfrm, or tunld's. Errors are tunl's:
    ExistsError for an add of what is there, NotFoundError for what is not, UnsupportedError
    for what the plane cannot carry (an algorithm the kernel lacks)."""

    def add_state(self, state: XfrmState, update: bool = False) -> None: ...
    def del_state(self, sid: StateId) -> None: ...
    def get_state(self, sid: StateId) -> StateEntry: ...
    def states(self) -> list[StateEntry]: ...
    def state_count(self) -> int: ...
    def flush_states(self) -> None: ...
    def add_policy(self, policy: XfrmPolicy, update: bool = False) -> None: ...
    def del_policy(self, pid: PolicyId) -> None: ...
    def get_policy(self, pid: PolicyId) -> PolicyEntry: ...
    def policies(self) -> list[PolicyEntry]: ...
    def flush_policies(self) -> None: ...
