"""Value types shared by every layer: tunnel modes, tunnel specs, routes.

A TunnelSpec is validated when it is built; the error names the field and the rule, the way
iproute2 words it where iproute2 has a rule.
"""
from __future__ import annotations

import enum
import ipaddress
import json
from dataclasses import asdict, dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .errors import ConfigError, ExistsError, NotFoundError

IFNAMSIZ = 16  # include/uapi/linux/if.h: 15 characters and the NUL


class TunnelMode(enum.Enum):
    """`ip tunnel` modes: value is the word, `proto` the outer IP protocol number."""

    IPIP = "ipip"
    GRE = "gre"
    SIT = "sit"
    ISATAP = "isatap"
    VTI = "vti"

    @property
    def proto(self) -> int:
        return {"ipip": 4, "gre": 47, "sit": 41, "isatap": 41, "vti": 4}[self.value]

    @property
    def a_tunnel(self) -> str:
        """"an ipip tunnel", "a gre tunnel": for messages."""
        return f"{'an' if self.value[0] in 'aeiou' else 'a'} {self.value} tunnel"

    @property
    def show_name(self) -> str:
        """What `ip tunnel show` prints before "/ip" (tnl_strproto())."""
        return {4: "ip", 47: "gre", 41: "ipv6"}[self.proto]

    @property
    def overhead(self) -> int:
        """Bytes of outer headers in front of the inner packet (without GRE options)."""
        return 20 + (4 if self is TunnelMode.GRE else 0)


def check_ifname(name: str, word: str = "name") -> str:
    """The rules of iproute2's check_ifname() (and the kernel's dev_valid_name())."""
    if not name:
        raise ConfigError(f'{word} "": a device name must not be empty')
    if len(name.encode()) >= IFNAMSIZ:
        raise ConfigError(f'{word} "{name}": a device name has at most {IFNAMSIZ - 1} bytes')
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ConfigError(f'{word} "{name}": a device name has no "/", ":" or white space')
    return name


def parse_ipv4(text: str, word: str) -> IPv4Address | None:
    """An ADDR of iproute2: a dotted quad, or "any" for none."""
    if text == "any":
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(f'{word} "{text}": an IPv4 address is a dotted quad or "any"') from None


SIXTOFOUR = IPv6Network("2002::/16")      # ipip6_tunnel_clone_6rd(): the default 6rd prefix
NO_RELAY = IPv4Network("0.0.0.0/0")


def check_6rd(prefix: IPv6Network | None, relay: IPv4Network | None) -> None:
    """The rules of ipip6_tunnel_update_6rd(): the IPv4 bits a 6rd address embeds (32 minus
    the relay prefix length) must fit after the 6rd prefix within 64 bits."""
    p, r = prefix or SIXTOFOUR, relay or NO_RELAY
    if p.prefixlen + (32 - r.prefixlen) > 64:
        raise ConfigError(f"6rd-prefix {p}: its length {p.prefixlen} plus the {32 - r.prefixlen} "
                          f"IPv4 bits after 6rd-relay_prefix {r} must not pass 64")


@dataclass(frozen=True)
class TunnelSpec:
    """One tunnel as `ip tunnel add` describes it.

    ttl 0 means inherit; tos bit 0 means inherit (the rest is a fixed DS field), as in
    struct ip_tunnel_parm.
    """

    name: str
    mode: TunnelMode = TunnelMode.IPIP
    remote: IPv4Address | None = None
    local: IPv4Address | None = None
    ttl: int = 0
    tos: int = 0
    pmtudisc: bool = True
    dev: str | None = None
    ikey: int | None = None
    okey: int | None = None
    iseq: bool = False
    oseq: bool = False
    icsum: bool = False
    ocsum: bool = False
    # isatap: the potential router list, (router, default?) pairs (RFC 5214 §8.3.2)
    prl: tuple[tuple[IPv4Address, bool], ...] = ()
    # sit: 6rd (RFC 5969); None is the kernel's default, 6to4's 2002::/16 with no relay prefix
    ip6rd_prefix: IPv6Network | None = None
    ip6rd_relay_prefix: IPv4Network | None = None

    def __post_init__(self) -> None:
        check_ifname(self.name)
        if self.dev is not None:
            check_ifname(self.dev, "dev")
        if not 0 <= self.ttl <= 255:
            raise ConfigError(f"ttl {self.ttl}: TTL is 1..255 or inherit")
        if not 0 <= self.tos <= 255:
            raise ConfigError(f"tos {self.tos:#x}: TOS is 00..ff, inherit or inherit/00..ff")
        if self.ttl and not self.pmtudisc:
            # iproute2 do_add(): "ttl != 0 and nopmtudisc are incompatible"
            raise ConfigError(f"ttl {self.ttl} with nopmtudisc: a fixed ttl needs pmtudisc")
        gre_only = self.ikey is not None or self.okey is not None
        if gre_only and self.mode not in (TunnelMode.GRE, TunnelMode.VTI):
            raise ConfigError(f"key with mode {self.mode.value}: keys are only for gre and vti tunnels")
        for k in ("ikey", "okey"):
            v = getattr(self, k)
            if v is not None and not 0 <= v <= 0xFFFFFFFF:
                raise ConfigError(f"{k} {v}: a key is a 32-bit number or a dotted quad")
        if (self.iseq or self.oseq or self.icsum or self.ocsum) and self.mode is not TunnelMode.GRE:
            raise ConfigError(f"seq/csum with mode {self.mode.value}: only gre tunnels have them")
        if self.prl and self.mode is not TunnelMode.ISATAP:
            raise ConfigError(f"prl with mode {self.mode.value}: only isatap tunnels have a "
                              "potential router list")
        if (self.ip6rd_prefix or self.ip6rd_relay_prefix) and self.mode not in (
                TunnelMode.SIT, TunnelMode.ISATAP):
            raise ConfigError(f"6rd-prefix with mode {self.mode.value}: 6rd is for sit tunnels")
        check_6rd(self.ip6rd_prefix, self.ip6rd_relay_prefix)
        if self.remote is not None and self.remote.is_multicast and self.local is None:
            raise ConfigError(f"remote {self.remote}: a broadcast tunnel requires a local address")

    @property
    def nbma(self) -> bool:
        """No remote: the outer destination comes from the route (the kernel's NBMA mode)."""
        return self.remote is None

    def with_(self, **changes) -> "TunnelSpec":
        return replace(self, **changes)

    @property
    def sixrd(self) -> tuple[IPv6Network, IPv4Network]:
        """The 6rd prefix and relay prefix in force (6to4's when none is set)."""
        return (self.ip6rd_prefix or SIXTOFOUR, self.ip6rd_relay_prefix or NO_RELAY)

    def prl_changed(self, action: str, router: IPv4Address, default: bool) -> "TunnelSpec":
        """The spec after one prl word: "add" (prl-default, prl-nodefault) or "del"
        (prl-delete), with the errors of ipip6_tunnel_add_prl() and ipip6_tunnel_del_prl()."""
        if action not in ("add", "del"):
            raise ConfigError(f'prl action "{action}": it is "add" or "del"')
        if self.mode is not TunnelMode.ISATAP:
            raise ConfigError(f"prl on {self.name}: {self.name} is {self.mode.a_tunnel}; "
                              "only isatap tunnels have a potential router list")
        rest = tuple(e for e in self.prl if e[0] != router)
        if action == "add":
            if len(rest) != len(self.prl):
                raise ExistsError(f"prl {router} on {self.name}: File exists (prl-delete it first)")
            return self.with_(prl=self.prl + ((router, default),))
        if len(rest) == len(self.prl):
            raise NotFoundError(f"prl-delete {router} on {self.name}: no such router in the list")
        return self.with_(prl=rest)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mode"] = self.mode.value
        d["remote"] = str(self.remote) if self.remote else None
        d["local"] = str(self.local) if self.local else None
        d["prl"] = [[str(a), bool(default)] for a, default in self.prl]
        for k in ("ip6rd_prefix", "ip6rd_relay_prefix"):
            d[k] = str(d[k]) if d[k] else None
        return d

    def to_compact(self) -> dict:
        """Only the fields that differ from the defaults (for small records)."""
        default = TunnelSpec(name=self.name).to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "name" or v != default[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "TunnelSpec":
        """A spec from its JSON form (to_dict()), checked field by field: tunld takes these
        from its control socket and its record, and neither may smuggle a wrong type in."""
        if not isinstance(d, dict):
            raise ConfigError("spec: must be an object")
        for k, v in d.items():
            kinds = SPEC_JSON.get(k)
            if kinds is None:
                raise ConfigError(f'spec field "{k}": a tunnel spec has no such field')
            if not any(type(v) is t for t in kinds):      # exact: True is no int, 1 no bool
                names = " or ".join("null" if t is type(None) else JSON_NAME[t] for t in kinds)
                raise ConfigError(f'spec field "{k}": must be {names}')
        if "name" not in d:
            raise ConfigError('spec: the field "name" is required')
        d = dict(d)
        try:
            d["mode"] = TunnelMode(d.get("mode", "ipip"))
        except ValueError:
            raise ConfigError(f'mode "{d["mode"]}": not a tunnel mode') from None
        prl = d.get("prl", ())
        if not all(isinstance(e, list) and len(e) == 2 and type(e[0]) is str and
                   type(e[1]) is bool for e in prl):
            raise ConfigError('spec field "prl": must be a list of [address, default] pairs')
        try:
            return cls._from_checked(d)
        except ValueError as e:                       # an address or prefix that is none
            raise ConfigError(f"spec: {e}") from None

    @classmethod
    def _from_checked(cls, d: dict) -> "TunnelSpec":
        for k in ("remote", "local"):
            if d.get(k):
                d[k] = IPv4Address(d[k])
        d["prl"] = tuple((IPv4Address(a), bool(default)) for a, default in d.get("prl", ()))
        if d.get("ip6rd_prefix"):
            d["ip6rd_prefix"] = IPv6Network(d["ip6rd_prefix"])
        if d.get("ip6rd_relay_prefix"):
            d["ip6rd_relay_prefix"] = IPv4Network(d["ip6rd_relay_prefix"])
        return cls(**d)


# the JSON types of each field of TunnelSpec.to_dict()
SPEC_JSON = {"name": (str,), "mode": (str,), "remote": (str, type(None)),
             "local": (str, type(None)), "ttl": (int,), "tos": (int,), "pmtudisc": (bool,),
             "dev": (str, type(None)), "ikey": (int, type(None)), "okey": (int, type(None)),
             "iseq": (bool,), "oseq": (bool,), "icsum": (bool,), "ocsum": (bool,),
             "prl": (list,), "ip6rd_prefix": (str, type(None)),
             "ip6rd_relay_prefix": (str, type(None))}
JSON_NAME = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


@dataclass(frozen=True)
class Route:
    """A kernel route through a tunnel device: destination prefix and gateway (next hop)."""

    dst: IPv4Network | IPv6Network
    gateway: IPv4Address | IPv6Address | None = None
    table: int = 254


def network(text: str, word: str) -> IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise ConfigError(f'{word} "{text}": an IPv4 prefix is a.b.c.d/len') from None


# Every device tunl makes carries its spec in its alias (IFLA_IFALIAS), "tunl:" and compact
# JSON: the record a restarted tunld takes its tunnels back from, and the mark of a device tunl
# may change. `ip link show` prints it.
ALIAS_PREFIX = "tunl:"
IFALIASZ = 256


def alias_record(alias: str | None) -> dict | None:
    """The JSON record of a tunl alias, None for any other alias."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    try:
        record = json.loads(alias[len(ALIAS_PREFIX):])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def spec_to_alias(spec: TunnelSpec, **extra) -> str:
    alias = ALIAS_PREFIX + json.dumps({**spec.to_compact(), **extra}, separators=(",", ":"))
    if len(alias.encode()) >= IFALIASZ:
        raise ConfigError(f"{spec.name}: its settings do not fit the {IFALIASZ - 1} bytes of "
                          "the device alias where tunl keeps them (a shorter PRL will)")
    return alias


def spec_from_alias(alias: str | None) -> TunnelSpec | None:
    """The spec a tunl alias records; None for another alias or one that no longer parses."""
    record = alias_record(alias)
    if record is None:
        return None
    record.pop("dataplane", None)
    try:
        return TunnelSpec.from_dict(record)
    except (ValueError, TypeError, ConfigError):
        return None
