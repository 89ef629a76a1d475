"""The grammar of `ip tunnel` (iproute2 ip/iptunnel.c parse_args()), into TunnelSpec.

    tunl tunnel { add | change | del | show | prl | 6rd | help } [ NAME ]
          [ mode { ipip | gre | sit | isatap | vti } ] [ remote ADDR ] [ local ADDR ]
          [ [i|o]seq ] [ [i|o]key KEY ] [ [i|o]csum ]
          [ prl-default ADDR ] [ prl-nodefault ADDR ] [ prl-delete ADDR ]
          [ 6rd-prefix ADDR ] [ 6rd-relay_prefix ADDR ] [ 6rd-reset ]
          [ ttl TTL ] [ tos TOS ] [ [no]pmtudisc ] [ dev PHYS_DEV ]
          [ --dataplane { auto | kernel | ebpf | userspace } ]
    tunl tunnel capture NAME [ TCPDUMP-OPTIONS ]

    Where: NAME := STRING
           ADDR := { IP_ADDRESS | any }
           TOS  := { STRING | 00..ff | inherit | inherit/STRING | inherit/00..ff }
           TTL  := { 1..255 | inherit }
           KEY  := { DOTTED_QUAD | NUMBER }

    Also:  list, lst = show; delete = del; hoplimit, hlim = ttl; tclass, dsfield = tos;
           name NAME = NAME; mode ip/ip = ipip, gre/ip = gre, ipv6/ip = sit.
           A verb may be cut short as ip takes it: a = add, c = change, d = del, s = show,
           l = list, p = prl, 6 = 6rd, h = help, ca = capture.
           A TOS STRING is a name of /etc/iproute2/rt_dsfield (EF, AF11 .. AF43, CS1 .. CS7).
           show lists the tunnels whose name, mode, remote, local, dev and key (ikey) are
           those given; left out (or any, or 0) is any.
"""
from __future__ import annotations

import functools
import ipaddress
import re
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
# rt_names.c reads /etc/iproute2/rt_dsfield; iproute2 after 6.1 reads /usr/share/iproute2's
# copy when /etc has none (rtnl_rtdsfield_initialize())
DSFIELD_FILES = ("/etc/iproute2/rt_dsfield", "/usr/share/iproute2/rt_dsfield")
# do_iptunnel(): the verb is the first of these the word is a prefix of (matches()); list and
# lst are show; capture is tunl's own and comes last, so that "c" stays change
VERBS = (("add", "add"), ("change", "change"), ("delete", "del"), ("show", "show"),
         ("lst", "show"), ("list", "show"), ("prl", "prl"), ("6rd", "6rd"), ("help", "help"),
         ("capture", "capture"))


class UsageWanted(Exception):
    """A word of the arguments asked for the usage: parse_args() calls usage() for a word
    that matches("help") where a NAME could stand."""


def matches(word: str, keyword: str) -> bool:
    """iproute2's matches(): word is a non-empty prefix of keyword."""
    return bool(word) and keyword.startswith(word)


def tunnel_verb(word: str) -> str | None:
    """The verb of `tunl tunnel WORD ...` (add, change, del, show, prl, 6rd, help, capture),
    None for a word that is none, as do_iptunnel() dispatches: `p` is prl, `6` is 6rd."""
    return next((verb for keyword, verb in VERBS if matches(word, keyword)), None)


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


_C_SPACE = " \t\n\v\f\r"          # isspace() of the C locale
_S = f"[{re.escape(_C_SPACE)}]"
_NAME = f"([^{re.escape(_C_SPACE)}]+)"
# fread_id_name(): sscanf(p, "0x%x %s") and then sscanf(p, "%d %s"); %x takes a sign and a
# 0x of its own, %s the next run of non-space (so "0x10foo" is 0x10f, "oo": as sscanf reads it)
_HEX_ID_NAME = re.compile(f"0x{_S}*+([+-]?+(?:0[xX](?=[0-9a-fA-F]))?+[0-9a-fA-F]++){_S}*+{_NAME}")
_DEC_ID_NAME = re.compile(f"{_S}*+([+-]?+[0-9]++){_S}*+{_NAME}")
# strtoul(arg, &end, 16) with nothing left after the number
_STRTOUL16 = re.compile(f"{_S}*+([+-]?+)(?:0[xX](?=[0-9a-fA-F]))?+([0-9a-fA-F]++)")
ULONG_MAX = 2**64 - 1


def read_dsfield_lines(lines, table: list) -> None:
    """rtnl_tab_initialize() over the lines of one rt_dsfield file: "0xNN NAME" or "NN NAME"
    (decimal), "#" comments and blank lines skipped; a later line for a value replaces the
    name of an earlier one; the first line neither form reads ends the file (iproute2 says
    "Database ... is corrupted" and keeps what it read before)."""
    for line in lines:
        p = line.lstrip(" \t")
        if not p or p[0] in "#\n":
            continue
        m = _HEX_ID_NAME.match(p)
        if m:
            value = int(m[1], 16)
        else:
            m = _DEC_ID_NAME.match(p)
            if not m:
                return
            value = int(m[1])
        if 0 <= value <= 255:
            table[value] = m[2]


@functools.lru_cache(maxsize=4)
def _dsfield_table(paths: tuple[str, ...]) -> tuple[str | None, ...]:
    table: list[str | None] = [None] * 256
    table[0] = "0"                   # rt_names.c: rtnl_rtdsfield_tab[256] = { "0", }
    for path in paths:               # the first file there is the table
        try:
            with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
                read_dsfield_lines(f, table)
        except FileNotFoundError:
            continue
        except OSError:
            pass
        break
    return tuple(table)


def dsfield_table() -> tuple[str | None, ...]:
    """Name of each DS field value 0..255 (None: no name), from the rt_dsfield file, read
    once per process as iproute2 reads it."""
    return _dsfield_table(tuple(DSFIELD_FILES))


def dsfield_a2n(text: str) -> int | None:
    """rtnl_dsfield_a2n(): a name of the table (the lowest value with that name), else a hex
    number with or without 0x ("10" is 0x10) up to ff; None when it is neither."""
    table = dsfield_table()
    if text in table:
        return table.index(text)
    m = _STRTOUL16.fullmatch(text)
    if not m:
        return None
    value = int(m[2], 16)
    if value > ULONG_MAX:                      # strtoul() gives ULONG_MAX (ERANGE)
        return None
    if m[1] == "-":                            # strtoul() negates in unsigned long
        value = -value % (ULONG_MAX + 1)
    return value if value <= 255 else None


def dsfield_n2a(value: int) -> str:
    """rtnl_dsfield_n2a(): the table's name of value, else 0x%02x."""
    if not 0 <= value <= 255:
        return str(value)
    name = dsfield_table()[value]
    return name if name is not None else f"0x{value:02x}"


def parse_tos(word: str, text: str) -> int:
    """tos | tclass | dsfield TOS, as parse_args() reads it: "inherit" is 1, "inherit/T" is 1
    ORed with T, anything else T alone (and of a word with a "/", iproute2 reads T only up to
    the "/": strsep() cuts the word there). T is a name of rt_dsfield or a hex number up to
    ff (rtnl_dsfield_a2n()). The byte is kept whole: bit 0 is inherit in struct
    ip_tunnel_parm, so tos 0x11 is inherit with 0x10."""
    head, slash, tail = text.partition("/")
    if head == "inherit":
        tos, field = 1, (tail if slash else None)
    else:
        tos, field = 0, head
    if field is not None:
        value = dsfield_a2n(field)
        if value is None:
            raise ConfigError(f'{word} "{text}": bad TOS value; TOS is 00..ff (hex), a name of '
                              'rt_dsfield (EF, AF11, ...), inherit or inherit/TOS')
        tos |= value
    return tos


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
            elif matches(w, "help"):
                raise UsageWanted(w)
            if "name" in f:
                raise ConfigError(f'"{w}": not a word of tunl tunnel, and the name is already '
                                  f'"{f["name"]}" (see tunl tunnel help)')
            f["name"] = check_ifname(w)
        i += 1
    return f


def parse_show(words: list[str]) -> dict:
    """The words of `show`: the fields the tunnels shown must have (see selected() in
    show.py). Like parse_args(), a key with a mode that has none (given, or taken from the
    name) is refused; parse_args() refuses one with no mode at all too, which leaves
    `ip tunnel show key N` nothing to select: tunl takes it there."""
    f = parse_words(words)
    mode = f.get("mode") or mode_from_name(f.get("name", ""))
    if ("ikey" in f or "okey" in f) and mode not in (None, TunnelMode.GRE, TunnelMode.VTI):
        raise ConfigError(f"key with mode {mode.value}: keys are only for gre and vti tunnels")
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

