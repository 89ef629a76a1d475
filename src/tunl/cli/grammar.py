"""The grammar of `ip tunnel` (iproute2 ip/iptunnel.c parse_args()), into TunnelSpec.

    tunl tunnel { add | change | del | show | prl | 6rd } [ NAME ]
          [ mode { ipip | gre | sit | isatap | vti } ] [ remote ADDR ] [ local ADDR ]
          [ [i|o]seq ] [ [i|o]key KEY ] [ [i|o]csum ]
          [ prl-default ADDR ] [ prl-nodefault ADDR ] [ prl-delete ADDR ]
          [ 6rd-prefix ADDR ] [ 6rd-relay_prefix ADDR ] [ 6rd-reset ]
          [ ttl TTL ] [ tos TOS ] [ [no]pmtudisc ] [ dev PHYS_DEV ]

    Where: NAME := STRING
           ADDR := { IP_ADDRESS | any }
           TOS  := { STRING | 00..ff | inherit | inherit/STRING | inherit/00..ff }
           TTL  := { 1..255 | inherit }
           KEY  := { DOTTED_QUAD | NUMBER }
"""
from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from ..errors import ConfigError
from ..model import TunnelMode, TunnelSpec, check_ifname, parse_ipv4

USAGE = __doc__.split("\n\n", 1)[1].rstrip() + "\n"

MODE_WORDS = {"ipip": TunnelMode.IPIP, "ip/ip": TunnelMode.IPIP,
              "gre": TunnelMode.GRE, "gre/ip": TunnelMode.GRE,
              "sit": TunnelMode.SIT, "ipv6/ip": TunnelMode.SIT,
              "isatap": TunnelMode.ISATAP, "vti": TunnelMode.VTI}
# a tunnel without "mode" takes it from its name, as tnl_defname() and parse_args() do
NAME_PREFIXES = (("gre", TunnelMode.GRE), ("ipip", TunnelMode.IPIP), ("sit", TunnelMode.SIT),
                 ("isatap", TunnelMode.ISATAP), ("vti", TunnelMode.VTI))
FLAG_WORDS = {"seq": ("iseq", "oseq"), "iseq": ("iseq",), "oseq": ("oseq",),
              "csum": ("icsum", "ocsum"), "icsum": ("icsum",), "ocsum": ("ocsum",)}
DSFIELD_FILES = ("/etc/iproute2/rt_dsfield", "/usr/share/iproute2/rt_dsfield")


def matches(word: str, keyword: str) -> bool:
    """iproute2's matches(): word is a non-empty prefix of keyword."""
    return bool(word) and keyword.startswith(word)


def parse_key(word: str, text: str) -> int:
    """tnl_parse_key(): a dotted quad or a number."""
    if "." in text:
        try:
            return int(ipaddress.IPv4Address(text))
        except ValueError:
            pass
    else:
        try:
            v = int(text, 0)
            if 0 <= v <= 0xFFFFFFFF:
                return v
        except ValueError:
            pass
    raise ConfigError(f'{word} "{text}": a key is a number (0..4294967295) or a dotted quad')


def _dsfield_names() -> dict[str, int]:
    names = {}
    for path in DSFIELD_FILES:
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split("#", 1)[0].split()
                    if len(parts) >= 2:
                        names.setdefault(parts[1], int(parts[0], 0))
        except (OSError, ValueError):
            continue
    return names


def parse_tos(word: str, text: str) -> int:
    """TOS := { STRING | 00..ff | inherit | inherit/STRING | inherit/00..ff }; bit 0 = inherit."""
    head, _, tail = text.partition("/")
    inherit = head == "inherit"
    field = tail if inherit else text
    if inherit and not tail:
        return 1
    value = None
    try:
        value = int(field, 16)
    except ValueError:
        value = _dsfield_names().get(field)
    if value is None or not 0 <= value <= 0xFF or (inherit and not tail and field):
        raise ConfigError(f'{word} "{text}": TOS is 00..ff (hex), a name from rt_dsfield, '
                          'inherit or inherit/00..ff')
    return (value & ~1) | (1 if inherit else 0)


def parse_ttl(word: str, text: str) -> int:
    if text == "inherit":
        return 0
    try:
        v = int(text, 0)
    except ValueError:
        v = -1
    if not 0 <= v <= 255:
        raise ConfigError(f'{word} "{text}": TTL is 1..255 or inherit')
    return v


def next_word(words: list[str], i: int) -> str:
    if i + 1 >= len(words):
        raise ConfigError(f'{words[i]}: a value must follow this word')
    return words[i + 1]


def parse_words(words: list[str]) -> dict:
    """The fields the words set, by TunnelSpec field name (only those given)."""
    f: dict = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "mode":
            v = next_word(words, i)
            mode = MODE_WORDS.get(v)
            if mode is None:
                raise ConfigError(f'mode "{v}": unknown tunnel mode; the modes are ipip, gre, '
                                  'sit, isatap and vti')
            if "mode" in f and f["mode"].proto != mode.proto:
                raise ConfigError(f'mode "{v}": you managed to ask for more than one tunnel mode')
            f["mode"] = mode
            i += 1
        elif w in ("key", "ikey", "okey"):
            v = parse_key(w, next_word(words, i))
            for k in (("ikey", "okey") if w == "key" else (w,)):
                f[k] = v
            i += 1
        elif w in FLAG_WORDS:
            for k in FLAG_WORDS[w]:
                f[k] = True
        elif w in ("pmtudisc", "nopmtudisc"):
            f["pmtudisc"] = w == "pmtudisc"
        elif w in ("remote", "local"):
            f[w] = parse_ipv4(next_word(words, i), w)
            i += 1
        elif w == "dev":
            f["dev"] = check_ifname(next_word(words, i), "dev")
            i += 1
        elif w in ("ttl", "hoplimit", "hlim"):
            f["ttl"] = parse_ttl(w, next_word(words, i))
            i += 1
        elif w in ("tos", "tclass") or matches(w, "dsfield"):
            f["tos"] = parse_tos(w, next_word(words, i))
            i += 1
        else:
            if w == "name":
                w = next_word(words, i)
                i += 1
            if "name" in f:
                raise ConfigError(f'"{w}": not a word of tunl tunnel, and the name is already '
                                  f'"{f["name"]}" (see tunl tunnel help)')
            f["name"] = check_ifname(w)
        i += 1
    return f


def mode_from_name(name: str) -> TunnelMode | None:
    for prefix, mode in NAME_PREFIXES:
        if name.startswith(prefix):
            return mode
    return None


def spec_for_add(words: list[str]) -> TunnelSpec:
    f = parse_words(words)
    if "name" not in f:
        raise ConfigError("add: a tunnel needs a name (tunl tunnel add NAME mode ipip ...)")
    if "mode" not in f:
        mode = mode_from_name(f["name"])
        if mode is None:
            raise ConfigError(f'{f["name"]}: cannot determine tunnel mode (ipip, gre, vti or sit);'
                              ' say "mode ipip"')
        f["mode"] = mode
    return TunnelSpec(**f)


def spec_for_change(words: list[str], current: TunnelSpec) -> TunnelSpec:
    """`change` starts from the tunnel as it is and applies the words (like SIOCCHGTUNNEL)."""
    f = parse_words(words)
    f.pop("name", None)
    return current.with_(**f)


def name_only(words: list[str], verb: str) -> str:
    """The tunnel a change or del is about."""
    name = parse_words(words).get("name")
    if name is None:
        raise ConfigError(f"{verb}: name the tunnel (tunl tunnel {verb} NAME ...)")
    return name


def parse_prl(words: list[str]) -> tuple[str, str, IPv4Address, bool]:
    """do_prl(): (device, "add" | "del", router, default?); one entry at a time."""
    dev = action = addr = None
    default = False
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("prl-default", "prl-nodefault", "prl-delete"):
            if addr is not None:
                raise ConfigError(f"{w}: one PRL entry at a time")
            addr = parse_ipv4(next_word(words, i), w)
            if addr is None:
                raise ConfigError(f'{w} "any": a router of the PRL is a unicast IPv4 address')
            action = "del" if w == "prl-delete" else "add"
            default = w == "prl-default"
            i += 1
        elif w == "dev":
            dev = check_ifname(next_word(words, i), "dev")
            i += 1
        else:
            raise ConfigError(f'"{w}": invalid PRL parameter; tunl tunnel prl '
                              '{ prl-default | prl-nodefault | prl-delete } ADDR dev NAME')
        i += 1
    if dev is None:
        raise ConfigError("prl: must specify device (dev NAME)")
    if addr is None:
        raise ConfigError("prl: say prl-default, prl-nodefault or prl-delete with an address")
    return dev, action, addr, default


def _prefix(word: str, text: str, cls, family: str, example: str):
    try:
        return cls(text)
    except ValueError:
        raise ConfigError(f'{word} "{text}": {family} prefix with no host bits, like '
                          f'{example}') from None


def parse_6rd(words: list[str]) -> tuple[str, IPv6Network | None, IPv4Network | None, bool]:
    """do_6rd(): (device, prefix, relay prefix, reset?). Like SIOCADD6RD, a word left out
    sets its prefix to zero."""
    dev = prefix = relay = None
    reset = False
    i = 0
    while i < len(words):
        w = words[i]
        if w == "6rd-prefix":
            prefix = _prefix(w, next_word(words, i), IPv6Network, "an IPv6", "2001:db8::/32")
            i += 1
        elif w == "6rd-relay_prefix":
            relay = _prefix(w, next_word(words, i), IPv4Network, "an IPv4", "10.0.0.0/8")
            i += 1
        elif w == "6rd-reset":
            reset = True
        elif w == "dev":
            dev = check_ifname(next_word(words, i), "dev")
            i += 1
        else:
            raise ConfigError(f'"{w}": invalid 6RD parameter; tunl tunnel 6rd dev NAME '
                              '{ 6rd-prefix P [ 6rd-relay_prefix R ] | 6rd-reset }')
        i += 1
    if dev is None:
        raise ConfigError("6rd: must specify device (dev NAME)")
    if not reset and prefix is None and relay is None:
        raise ConfigError("6rd: say 6rd-prefix, 6rd-relay_prefix or 6rd-reset")
    if reset:
        return dev, None, None, True
    return dev, prefix or IPv6Network("::/0"), relay or IPv4Network("0.0.0.0/0"), False

