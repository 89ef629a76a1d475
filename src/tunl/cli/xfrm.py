"""The grammar of `ip xfrm state` and `ip xfrm policy` (iproute2 ip/xfrm_state.c,
ip/xfrm_policy.c, ip/ipxfrm.c), into XfrmState and XfrmPolicy, and their output as ip prints it.

    tunl xfrm state { add | update } ID ALGO-LIST mode tunnel [ mark MARK [ mask MASK ] ]
          [ reqid REQID ] [ replay-window SIZE ]
    tunl xfrm state { delete | get } ID [ mark MARK [ mask MASK ] ]
    tunl xfrm state { show | list } [ nokeys ] [ ID ] [ mode MODE ] [ reqid REQID ]
    tunl xfrm state flush [ proto XFRM-PROTO ]
    tunl xfrm state count
    tunl xfrm policy { add | update } [ SELECTOR ] dir DIR [ mark MARK [ mask MASK ] ]
          [ action ACTION ] [ priority PRIORITY ] [ ptype main ] [ tmpl TMPL ]
    tunl xfrm policy { delete | get } [ SELECTOR ] dir DIR [ mark MARK [ mask MASK ] ]
          [ ptype main ]
    tunl xfrm policy { show | list } [ nosock ] [ SELECTOR ] [ dir DIR ] [ action ACTION ]
          [ priority PRIORITY ] [ ptype main ]
    tunl xfrm policy flush [ ptype main ]
          [ --dataplane { auto | kernel | userspace } ]

    Where: ID        := src ADDR dst ADDR proto esp spi SPI
           ALGO-LIST := aead rfc4106(gcm(aes)) KEY ICV-LEN |
                        enc cbc(aes) KEY { auth-trunc hmac(sha256) KEY TRUNC-LEN |
                                           auth hmac(sha256) KEY }
           KEY       := { 0xHEX | STRING }   (20, 28 or 36 bytes for gcm: AES key and salt;
                        16, 24 or 32 for cbc(aes); 32 for hmac(sha256))
           ICV-LEN   := { 64 | 96 | 128 }        TRUNC-LEN := 96..256 (128: RFC 4868)
           SELECTOR  := [ src ADDR[/PLEN] ] [ dst ADDR[/PLEN] ] [ proto PROTO ]
           TMPL      := src ADDR dst ADDR proto esp mode tunnel [ reqid REQID ]
                        [ level required ]
           DIR       := { in | out | fwd }        ACTION := { allow | block }
           MARK, MASK, SPI, REQID, SIZE, PRIORITY := a number: decimal, 0x hex or 0 octal
           mark M/MASK is mark M mask MASK; a mark without mask has mask 0xffffffff.

    Also:  sa = state; list, lst = show; delete = del. A verb may be cut short as ip takes it:
           a = add, u = update, d = delete, l = list, s = show, g = get, f = flush, c = count.
           tunl carries what a vti needs: ESP in tunnel mode over IPv4 (see "mode vti");
           mode tunnel is said, as ip's default is transport.
           -j prints JSON (keys as 0x-hex); show prints what `ip xfrm state` prints.
"""
from __future__ import annotations

import functools
import json
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NoReturn, TextIO

from ..errors import ConfigError, UnsupportedError
from ..xfrm import (AUTH_SHA256, PROTOS, SHA256_DEFAULT_TRUNC, U32, Algo, PolicyEntry,
                    PolicyId, StateEntry, StateId, XfrmPolicy, XfrmState, XfrmStore)
from .grammar import UsageWanted, matches, next_word

USAGE = __doc__.split("\n\n", 1)[1].rstrip() + "\n"

# do_xfrm_state() and do_xfrm_policy(): the verb is the first of these the word is a prefix
# of; None: a verb of ip that tunl does not have
STATE_VERBS = (("add", "add"), ("update", "update"), ("allocspi", None), ("delete", "del"),
               ("deleteall", None), ("delall", None), ("list", "show"), ("show", "show"),
               ("lst", "show"), ("get", "get"), ("flush", "flush"), ("count", "count"),
               ("help", "help"))
POLICY_VERBS = (("add", "add"), ("update", "update"), ("delete", "del"), ("deleteall", None),
                ("delall", None), ("list", "show"), ("show", "show"), ("lst", "show"),
                ("get", "get"), ("flush", "flush"), ("count", None), ("set", None),
                ("setdefault", None), ("getdefault", None), ("help", "help"))
MODE_WORDS = ("transport", "tunnel", "ro", "in_trigger", "beet")     # xfrm_mode_parse() order
# words of ip xfrm state add that a vti does not need
STATE_NOT_CARRIED = ("seq", "replay-seq", "replay-oseq", "replay-seq-hi", "replay-oseq-hi",
                     "flag", "extra-flag", "sel", "limit", "encap", "coa", "ctx", "offload",
                     "output-mark", "if_id", "tfcpad", "comp")
POLICY_NOT_CARRIED = ("ctx", "index", "flag", "limit", "if_id", "dev", "sport", "dport",
                      "type", "code", "key")
ALGO_WORDS = ("aead", "enc", "auth", "auth-trunc")
KEY_BUF = 512           # XFRM_ALGO_KEY_BUF_SIZE of xfrm_state.c


# -- words

_U32_WORD = re.compile(r"[ \t\n\v\f\r]*\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def parse_u32(word: str, text: str, what: str | None = None) -> int:
    """get_u32(…, 0): strtoul() with base 0 (0x hex, 0 octal, else decimal), all of the
    word, at most 0xffffffff."""
    m = _U32_WORD.fullmatch(text)
    if m:
        d = m[1]
        v = int(d, 16) if d[:2] in ("0x", "0X") else int(d, 8) if d[0] == "0" else int(d)
    if not m or v > U32:
        raise ConfigError(f'{word} "{text}": {what or word} is a number of 0..4294967295 '
                          "(decimal, 0x hex or 0 octal)")
    return v


def parse_key(word: str, text: str) -> bytes:
    """xfrm_algo_parse(): "0x" and hex digits (an odd count gets a 0 in front), else the
    word's own bytes."""
    if len(text) > 2 and text.startswith("0x"):
        digits = text[2:]
        if len(digits) % 2:
            digits = "0" + digits
        try:
            key = bytes.fromhex(digits)
            if not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError
        except ValueError:
            raise ConfigError(f'{word} key "{text}": ALGO-KEYMAT is 0x and hex digits, or a '
                              "string") from None
    else:
        key = text.encode()
    if len(key) > KEY_BUF:
        raise ConfigError(f"{word} key of {len(key)} bytes: more than {KEY_BUF}")
    return key


def parse_addr(word: str, text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        pass
    if ":" in text:
        raise ConfigError(f'{word} "{text}": tunl carries IPv4 states and policies (the ends '
                          "of a vti)")
    raise ConfigError(f'{word} "{text}": an IPv4 address is a dotted quad')


def parse_prefix(word: str, text: str) -> IPv4Network:
    """get_prefix(): ADDR[/PLEN], or any, all, default for 0.0.0.0/0."""
    if text in ("any", "all", "default"):
        return IPv4Network("0.0.0.0/0")
    if ":" in text:
        raise ConfigError(f'{word} "{text}": tunl carries IPv4 selectors')
    try:
        return IPv4Network(text)
    except ValueError:
        raise ConfigError(f'{word} "{text}": an IPv4 prefix without host bits, like '
                          "10.0.0.0/8 or 0.0.0.0/0") from None


def parse_xfrm_proto(word: str, text: str) -> str:
    if text not in PROTOS:
        raise ConfigError(f'{word} "{text}": XFRM-PROTO is esp, ah, comp, route2 or hao')
    return text


def parse_mode(text: str) -> str:
    """xfrm_mode_parse(): the first mode the word is a prefix of."""
    for m in MODE_WORDS:
        if matches(text, m):
            return m
    raise ConfigError(f'mode "{text}": MODE is transport, tunnel, beet, ro or in_trigger '
                      "(a vti takes tunnel)")


@functools.lru_cache(maxsize=1)
def _protocols() -> dict[int, str]:
    """Number -> name of /etc/protocols, the first line for each (getprotobynumber())."""
    names: dict[int, str] = {}
    try:
        with open("/etc/protocols", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 2 and parts[1].isdigit():
                    names.setdefault(int(parts[1]), parts[0])
    except OSError:
        pass
    return names


def proto_name(n: int) -> str:
    """strxf_proto(): the name of /etc/protocols, else the number."""
    return _protocols().get(n, str(n))


def parse_upper_proto(text: str) -> int | None:
    """The selector's UPSPEC proto: any, a name of /etc/protocols, or a number 0..255."""
    if text == "any":
        return None
    try:
        return socket.getprotobyname(text) or None
    except OSError:
        pass
    try:
        v = parse_u32("proto", text)
    except ConfigError:
        v = 256
    if v > 255:
        raise ConfigError(f'proto "{text}": PROTO is a name of /etc/protocols (tcp, udp, gre, '
                          "...), a number of 0..255 or any")
    return v or None


def parse_mark(words: list[str], i: int) -> tuple[int, int, int]:
    """xfrm_parse_mark(): `mark M [ mask M ]`, and tunl's `mark M/MASK`: (mark, mask, index of
    the last word read)."""
    text = next_word(words, i)
    i += 1
    if "/" in text:
        m, _, k = text.partition("/")
        return parse_u32("mark", m, "MARK"), parse_u32("mark", k, "MASK"), i
    mark = parse_u32("mark", text, "MARK")
    if i + 1 < len(words) and words[i + 1] == "mask":
        return mark, parse_u32("mask", next_word(words, i + 1), "MASK"), i + 2
    return mark, U32, i


def _not_carried(obj: str, w: str) -> ConfigError:
    return ConfigError(f'"{w}": tunl xfrm {obj} takes what a vti needs, and ip\'s {w} is not '
                       f"among it (see tunl xfrm {obj} help)")


def _unknown(obj: str, verb: str, w: str) -> ConfigError:
    return ConfigError(f'"{w}": not a word of tunl xfrm {obj} {verb} (see tunl xfrm {obj} '
                       "help)")


def _refuse(obj: str, verb: str, w: str, not_carried: tuple) -> NoReturn:
    """A word the verb does not take: one of ip's that tunl does not carry, help, or none."""
    if w in not_carried:
        raise _not_carried(obj, w)
    if matches(w, "help"):
        raise UsageWanted(w)
    raise _unknown(obj, verb, w)


def _id_word(f: dict, words: list[str], i: int, loose: bool = False) -> int | None:
    """xfrm_id_parse(): src, dst, proto, spi. The index of the last word read, or None when
    words[i] is none of them. With loose (show), src and dst are prefixes."""
    w = words[i]
    if w in ("src", "dst"):
        v = next_word(words, i)
        f[w] = parse_prefix(w, v) if loose else parse_addr(w, v)
    elif w == "proto":
        f["proto"] = parse_xfrm_proto(w, next_word(words, i))
    elif w == "spi":
        f["spi"] = parse_u32("spi", next_word(words, i), "SPI")
    else:
        return None
    return i + 1


def _algo_word(f: dict, words: list[str], i: int) -> int:
    """ALGO: enc NAME KEY | auth NAME KEY | auth-trunc NAME KEY TRUNC | aead NAME KEY ICV."""
    w = words[i]
    field = {"aead": "aead", "enc": "enc", "auth": "auth", "auth-trunc": "auth"}[w]
    if field in f:
        raise ConfigError(f'{w}: one {"auth or auth-trunc" if field == "auth" else w} '
                          "algorithm per state")
    name = next_word(words, i)
    if i + 2 >= len(words):
        raise ConfigError(f"{w} {name}: ALGO-KEYMAT must follow the algorithm's name")
    key = parse_key(w, words[i + 2])
    i += 2
    bits = 0
    if w in ("aead", "auth-trunc"):
        if i + 1 >= len(words):
            raise ConfigError(f"{w} {name}: {'ALGO-ICV-LEN' if w == 'aead' else 'ALGO-TRUNC-LEN'}"
                              " must follow the key")
        bits = parse_u32(w, words[i + 1], "ALGO-ICV-LEN" if w == "aead" else "ALGO-TRUNC-LEN")
        i += 1
    elif w == "auth":
        # the kernel truncates auth hmac(sha256) to its default, 96 bits (attach_auth())
        bits = SHA256_DEFAULT_TRUNC if name == AUTH_SHA256 else 0
    f[field] = Algo(name, key, bits)
    return i


# -- states

def _value_word(field: str, parse: Callable[[str], Any]) -> Callable[[dict, list[str], int], int]:
    """WORD VALUE, read into f[field] by parse(VALUE)."""
    def word(f: dict, words: list[str], i: int) -> int:
        f[field] = parse(next_word(words, i))
        return i + 1
    return word


def _mark_word(keep: Callable[[int, int], int]) -> Callable[[dict, list[str], int], int]:
    """mark M [ mask M ], kept in f where keep(mark, mask) is true."""
    def word(f: dict, words: list[str], i: int) -> int:
        mark, mask, i = parse_mark(words, i)
        if keep(mark, mask):
            f["mark"], f["mark_mask"] = mark, mask
        return i
    return word


def _nokeys_word(f: dict, words: list[str], i: int) -> int:
    f["nokeys"] = True
    return i


# The words of each state verb besides ID (xfrm_state_modify(), xfrm_state_get_or_delete(),
# xfrm_state_list_or_deleteall()): each reads into f and gives the index of its last word
_MODE = _value_word("mode", parse_mode)
_REQID = _value_word("reqid", functools.partial(parse_u32, "reqid", what="REQID"))
_STATE_ADD = {"mode": _MODE, "reqid": _REQID,
              "mark": _mark_word(lambda mark, mask: mask),    # ip sends no mark with mask 0
              "replay-window": _value_word("replay_window", functools.partial(
                  parse_u32, "replay-window", what="SIZE")),
              **dict.fromkeys(ALGO_WORDS, _algo_word)}
_STATE_ID = {"mark": _mark_word(lambda mark, mask: mark & mask)}  # only then, as ip
_STATE_SHOW = {"nokeys": _nokeys_word, "mode": _MODE, "reqid": _REQID}


def _state_words(words: list[str], verb: str, table: dict, not_carried: tuple = (),
                 loose: bool = False) -> dict:
    """ID (src and dst as prefixes with loose) and the words of table, by field name; a word
    of not_carried is ip's but not tunl's."""
    f: dict = {}
    i = 0
    while i < len(words):
        w = words[i]
        j = _id_word(f, words, i, loose)
        if j is not None:
            i = j
        elif w in table:
            i = table[w](f, words, i)
        else:
            _refuse("state", verb, w, not_carried)
        i += 1
    return f


def parse_state(words: list[str]) -> XfrmState:
    """The words of `state add` and `state update`."""
    f = _state_words(words, "add", _STATE_ADD, STATE_NOT_CARRIED)
    for word in ("src", "dst"):
        if word not in f:
            raise ConfigError(f"add: say {word} ADDR (a vti's state names both ends: src "
                              "ADDR dst ADDR)")
    if "proto" not in f:
        raise ConfigError("add: say proto esp (XFRM-PROTO is required)")
    if "spi" not in f:
        raise ConfigError("add: say spi SPI (the number the peer knows the state by)")
    if "mode" not in f:
        # ip's default is transport; the same words must make the same state
        raise ConfigError("add: say mode tunnel (ip's default is transport; a vti takes "
                          "tunnel)")
    return XfrmState(**f)


def parse_state_id(words: list[str], verb: str) -> StateId:
    """The words of `state delete` and `state get`: ID and mark."""
    f = _state_words(words, verb, _STATE_ID)
    if "proto" not in f:
        raise ConfigError(f"{verb}: say proto esp (XFRM-PROTO is required)")
    if "dst" not in f or "spi" not in f:
        raise ConfigError(f"{verb}: say dst ADDR and spi SPI (a state is known by dst, spi "
                          "and proto)")
    return StateId(f["dst"], f["spi"], f["proto"], f.get("src"), f.get("mark"),
                   f.get("mark_mask", U32))


def parse_state_filter(words: list[str]) -> dict:
    """The words of `state show`: nokeys, ID (src and dst as prefixes), mode, reqid."""
    return _state_words(words, "show", _STATE_SHOW, ("flag",), loose=True)


def state_selected(s: XfrmState, f: dict) -> bool:
    """xfrm_state_filter_match()."""
    if "src" in f and s.src not in f["src"]:
        return False
    if "dst" in f and s.dst not in f["dst"]:
        return False
    return all(getattr(s, k) == f[k] for k in ("proto", "spi", "mode", "reqid") if k in f)


def _cx(v: int) -> str:
    """printf's %#x: 0 is "0", not "0x0"."""
    return f"{v:#x}" if v else "0"


def _algo_line(kind: str, a: Algo, nokeys: bool, bits: bool) -> str:
    """__xfrm_algo_print(): "\\tTYPE NAME 0xKEY" (and the ICV or truncation length)."""
    key = "<<Keys hidden>>" if nokeys else ("0x" + a.key.hex() if a.key else "")
    return f"\t{kind} {a.name} {key}" + (f" {a.bits}" if bits else "") + "\n"


def _strxf_time(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def state_text(e: StateEntry, nokeys: bool = False) -> str:
    """What `ip xfrm state show` prints of one state (xfrm_state_info_print())."""
    s = e.state
    out = [f"src {s.src} dst {s.dst}\n", f"\tproto {s.proto} "]
    if s.proto in ("esp", "ah", "comp") or s.spi:
        out.append(f"spi 0x{s.spi:08x} ")
    out.append(f"reqid {s.reqid} mode {s.mode}\n")
    out.append(f"\treplay-window {s.replay_window} \n")
    if s.mark is not None:
        out.append(f"\tmark {_cx(s.mark)}/{_cx(s.mark_mask)} \n")
    if s.auth is not None:
        out.append(_algo_line("auth-trunc", s.auth, nokeys, True))
    if s.aead is not None:
        out.append(_algo_line("aead", s.aead, nokeys, True))
    if s.enc is not None:
        out.append(_algo_line("enc", s.enc, nokeys, False))
    if e.lastused:
        out.append(f"\tlastused {_strxf_time(e.lastused)}\n")
    out.append(f"\tanti-replay context: seq 0x{e.seq:x}, oseq 0x{e.oseq:x}, "
               f"bitmap 0x{e.bitmap:08x}\n")
    out.append("\tsel src 0.0.0.0/0 dst 0.0.0.0/0 \n")
    return "".join(out)


def _state_json(e: StateEntry, nokeys: bool) -> dict:
    d = e.to_dict()
    if nokeys:
        for k in ("aead", "enc", "auth"):
            if d[k]:
                d[k]["key"] = None
    return d


# -- policies

def _tmpl_word(t: dict, words: list[str], i: int) -> int | None:
    """xfrm_tmpl_parse(): ID, mode, reqid, level; None when words[i] is none of them."""
    w = words[i]
    if w in ("src", "dst"):
        t[w] = parse_addr(f"tmpl {w}", next_word(words, i))
    elif w == "proto":
        t["proto"] = parse_xfrm_proto("tmpl proto", next_word(words, i))
    elif w == "spi":
        if parse_u32("spi", next_word(words, i), "SPI"):
            raise ConfigError("tmpl spi: a vti's template takes any SPI (the state's reqid "
                              "and mark pick it)")
    elif w == "mode":
        t["mode"] = parse_mode(next_word(words, i))
    elif w == "reqid":
        t["reqid"] = parse_u32("reqid", next_word(words, i), "REQID")
    elif w == "level":
        v = next_word(words, i)
        if v == "use":
            raise ConfigError("level use: a vti's template is required (level required)")
        if v != "required":
            raise ConfigError(f'level "{v}": LEVEL is required or use')
    else:
        return None
    return i + 1


def _selector_word(f: dict, words: list[str], i: int) -> int | None:
    w = words[i]
    if w in ("src", "dst"):
        f[w] = parse_prefix(w, next_word(words, i))
    elif w == "proto":
        f["proto"] = parse_upper_proto(next_word(words, i))
    else:
        return None
    return i + 1


def _dir(text: str) -> str:
    if text not in ("in", "out", "fwd"):
        raise ConfigError(f'dir "{text}": DIR is in, out or fwd')
    return text


def _ptype(text: str) -> None:
    if text == "sub":
        raise ConfigError("ptype sub: tunl's policies are of the main type")
    if text != "main":
        raise ConfigError(f'ptype "{text}": PTYPE is main or sub')


def _policy_words(words: list[str], verb: str, with_tmpl: bool, with_filter: bool) -> dict:
    f: dict = {}
    tmpl: dict | None = None
    in_tmpl = False
    i = 0
    while i < len(words):
        w = words[i]
        if in_tmpl:
            j = _tmpl_word(tmpl, words, i)
            if j is not None:
                i = j + 1
                continue
            in_tmpl = False
        j = _selector_word(f, words, i)
        if j is not None:
            i = j
        elif w == "dir":
            if "dir" in f and not with_filter:
                raise ConfigError('dir: given twice ("dir" is one of in, out, fwd)')
            f["dir"] = _dir(next_word(words, i))
            i += 1
        elif w == "mark" and not with_filter:
            mark, mask, i = parse_mark(words, i)
            f["mark"], f["mark_mask"] = mark, mask
        elif w == "ptype":
            _ptype(next_word(words, i))
            i += 1
        elif w == "action" and (with_tmpl or with_filter):
            v = next_word(words, i)
            if v not in ("allow", "block"):
                raise ConfigError(f'action "{v}": ACTION is allow or block')
            f["action"] = v
            i += 1
        elif w == "priority" and (with_tmpl or with_filter):
            f["priority"] = parse_u32(w, next_word(words, i), "PRIORITY")
            i += 1
        elif w == "tmpl" and with_tmpl:
            if tmpl is not None:
                raise ConfigError("tmpl: a vti's policy has one template")
            tmpl = {}
            in_tmpl = True
            if i + 1 >= len(words):
                raise ConfigError("tmpl: say the template: tmpl src ADDR dst ADDR proto esp "
                                  "mode tunnel")
        elif w == "nosock" and with_filter:
            pass                           # tunl shows no socket policies anyway
        else:
            _refuse("policy", verb, w, POLICY_NOT_CARRIED)
        i += 1
    if tmpl is not None:
        if "proto" not in tmpl:
            raise ConfigError("tmpl: say proto esp (XFRM-PROTO is required)")
        if "mode" not in tmpl:
            raise ConfigError("tmpl: say mode tunnel (ip's default is transport; a vti takes "
                              "tunnel)")
        for k in ("src", "dst"):
            if k not in tmpl:
                raise ConfigError(f"tmpl: say {k} ADDR (a tunnel-mode template names both "
                                  "ends)")
        f.update({f"tmpl_{k}": v for k, v in tmpl.items()})
    return f


def parse_policy(words: list[str], verb: str = "add") -> XfrmPolicy:
    """The words of `policy add` and `policy update`."""
    f = _policy_words(words, verb, with_tmpl=True, with_filter=False)
    if "dir" not in f:
        raise ConfigError(f"{verb}: say dir in, out or fwd (DIR is required)")
    return XfrmPolicy(**f)


def parse_policy_id(words: list[str], verb: str) -> PolicyId:
    """The words of `policy delete` and `policy get`: SELECTOR, dir and mark."""
    f = _policy_words(words, verb, with_tmpl=False, with_filter=False)
    if "dir" not in f:
        raise ConfigError(f"{verb}: say dir in, out or fwd (DIR is required)")
    if not any(k in f for k in ("src", "dst", "proto")):
        raise ConfigError(f"{verb}: say the SELECTOR (src PREFIX dst PREFIX; "
                          "src 0.0.0.0/0 dst 0.0.0.0/0 for all)")
    return PolicyId(**f)


def parse_policy_filter(words: list[str]) -> dict:
    return _policy_words(words, "show", with_tmpl=False, with_filter=True)


def policy_selected(p: XfrmPolicy, f: dict) -> bool:
    """xfrm_policy_filter_match(): src and dst match the first PLEN bits of the filter's."""
    for k in ("src", "dst"):
        if k in f and f[k].prefixlen and getattr(p, k).network_address not in f[k]:
            return False
    return all(getattr(p, k) == f[k] for k in ("dir", "proto", "action", "priority")
               if k in f)


def policy_text(e: PolicyEntry) -> str:
    """What `ip xfrm policy show` prints of one policy (xfrm_policy_info_print())."""
    p = e.policy
    out = [f"src {p.src} dst {p.dst} "]
    if p.proto:
        out.append(f"proto {proto_name(p.proto)} ")
    out.append(f"\n\tdir {p.dir} ")
    if p.action != "allow":
        out.append(f"action {p.action} ")
    out.append(f"priority {p.priority} ")
    if e.ptype is not None:
        out.append(f"ptype {e.ptype} ")
    out.append("\n")
    if p.mark is not None:
        out.append(f"\tmark {_cx(p.mark)}/{_cx(p.mark_mask)} \n")
    if p.has_tmpl:
        out.append(f"\ttmpl src {p.tmpl_src} dst {p.tmpl_dst}\n"
                   f"\t\tproto {p.tmpl_proto} reqid {p.tmpl_reqid} mode {p.tmpl_mode}\n")
    return "".join(out)


# -- the store, and the verbs

def store_for(dataplane: str) -> XfrmStore:
    """Where `tunl xfrm` puts states and policies: where the vti tunnels that use them are.
    The kernel's xfrm where the kernel has ip_vti (or --dataplane kernel); tunld's, for the
    userspace plane's vti, where it has not (or --dataplane userspace)."""
    if dataplane == "ebpf":
        raise UnsupportedError("xfrm --dataplane ebpf: a vti's ESP is tunld's own work on the "
                               "userspace plane; use --dataplane userspace (or auto)")
    if dataplane == "auto":
        from ..model import TunnelMode
        from ..planes.kernel import module_state
        dataplane = "kernel" if module_state(TunnelMode.VTI) != "missing" else "userspace"
    if dataplane == "userspace":
        from ..planes.tunld import TunldXfrm
        return TunldXfrm()
    from ..kernel.xfrm import KernelXfrm
    return KernelXfrm()


def _verb(table, word: str, obj: str) -> str:
    for keyword, verb in table:
        if matches(word, keyword):
            if verb is None:
                raise ConfigError(f'"{word}": ip xfrm {obj} {keyword} is not in tunl; its '
                                  f"verbs are {', '.join(sorted({v for _, v in table if v}))}")
            return verb
    raise ConfigError(f'"{word}": unknown command; try "tunl xfrm {obj} help"')


def main(argv: list[str], opts: dict) -> int:
    """tunl xfrm { state | policy } VERB WORDS (do_xfrm())."""
    if not argv or matches(argv[0], "help") or argv[0] in ("-h", "--help"):
        sys.stdout.write("Usage:\n" + USAGE)
        return 0
    obj, rest = argv[0], argv[1:]
    try:
        if matches(obj, "state") or matches(obj, "sa"):
            return do_state(rest, opts)
        if matches(obj, "policy"):
            return do_policy(rest, opts)
    except UsageWanted:
        sys.stdout.write("Usage:\n" + USAGE)
        return 0
    if matches(obj, "monitor"):
        raise ConfigError('"monitor": ip xfrm monitor is not in tunl; tunl xfrm has state and '
                          "policy")
    raise ConfigError(f'xfrm object "{obj}": unknown; tunl xfrm {{ state | policy }}')


def _check_opts(opts: dict) -> None:
    if opts.get("stats"):
        raise ConfigError("-s: tunl xfrm prints what ip xfrm prints without -s (no lifetimes "
                          "and counters yet)")


@dataclass(frozen=True)
class _Object:
    """What tunl xfrm does alike with states and policies (do_xfrm_state() and
    do_xfrm_policy() of ip): the verbs, how each reads its words, the XfrmStore methods it
    calls (by name) and what get and show print."""
    name: str                                           # state, policy
    verbs: tuple                                        # (keyword, verb), as _verb() reads it
    parse: Callable[[list[str], str], Any]              # add, update: (words, verb) -> value
    parse_id: Callable[[list[str], str], Any]           # delete, get: (words, verb) -> its id
    parse_filter: Callable[[list[str]], tuple[dict, bool]]   # show: the filter and nokeys
    selected: Callable[[Any, dict], bool]               # (entry, filter)
    text: Callable[[Any, bool], str]                    # (entry, nokeys): what ip prints
    to_json: Callable[[Any, bool], dict]                # (entry, nokeys)
    add: str                                            # the XfrmStore methods
    delete: str
    get: str
    entries: str
    more: Callable[[str, list[str], dict, TextIO], int]     # the verbs of this object alone


def _do(obj: _Object, argv: list[str], opts: dict) -> int:
    _check_opts(opts)
    verb = _verb(obj.verbs, argv[0], obj.name) if argv else "show"
    words = argv[1:]
    out = sys.stdout
    if verb == "help":
        raise UsageWanted(argv[0])
    if verb in ("add", "update"):
        value = obj.parse(words, verb)
        with _open(opts) as store:
            getattr(store, obj.add)(value, update=verb == "update")
        return 0
    if verb in ("del", "get"):
        vid = obj.parse_id(words, "delete" if verb == "del" else "get")
        with _open(opts) as store:
            if verb == "del":
                getattr(store, obj.delete)(vid)
                return 0
            e = getattr(store, obj.get)(vid)
        out.write(json.dumps(obj.to_json(e, False)) + "\n" if opts.get("json")
                  else obj.text(e, False))
        return 0
    if verb == "show":
        f, nokeys = obj.parse_filter(words)
        with _open(opts) as store:
            found = [e for e in getattr(store, obj.entries)() if obj.selected(e, f)]
        if opts.get("json"):
            json.dump([obj.to_json(e, nokeys) for e in found], out,
                      indent=2 if opts.get("pretty") else None)
            out.write("\n")
        else:
            out.write("".join(obj.text(e, nokeys) for e in found))
        return 0
    return obj.more(verb, words, opts, out)


def _state_filter(words: list[str]) -> tuple[dict, bool]:
    f = parse_state_filter(words)
    nokeys = f.pop("nokeys", False)
    return f, nokeys


def _state_more(verb: str, words: list[str], opts: dict, out: TextIO) -> int:
    """state flush [ proto XFRM-PROTO ], state count."""
    if verb == "flush":
        proto = None
        i = 0
        while i < len(words):
            if words[i] != "proto":
                raise _unknown("state", "flush", words[i])
            proto = parse_xfrm_proto("proto", next_word(words, i))
            i += 2
        with _open(opts) as store:
            if proto is None:
                store.flush_states()
            else:
                for e in store.states():
                    if e.state.proto == proto:
                        store.del_state(e.state.id)
        return 0
    if verb == "count":
        if words:
            raise _unknown("state", "count", words[0])
        with _open(opts) as store:
            n = store.state_count()
        out.write(json.dumps({"count": n}) + "\n" if opts.get("json")
                  else f"\t SAD count {n}\n")
        return 0
    raise AssertionError(verb)


def _policy_more(verb: str, words: list[str], opts: dict, out: TextIO) -> int:
    """policy flush [ ptype main ]."""
    if verb == "flush":
        i = 0
        while i < len(words):
            if words[i] != "ptype":
                raise _unknown("policy", "flush", words[i])
            _ptype(next_word(words, i))
            i += 2
        with _open(opts) as store:
            store.flush_policies()
        return 0
    raise AssertionError(verb)


_STATES = _Object("state", STATE_VERBS, parse=lambda words, verb: parse_state(words),
                  parse_id=parse_state_id, parse_filter=_state_filter,
                  selected=lambda e, f: state_selected(e.state, f), text=state_text,
                  to_json=_state_json, add="add_state", delete="del_state", get="get_state",
                  entries="states", more=_state_more)
_POLICIES = _Object("policy", POLICY_VERBS, parse=parse_policy, parse_id=parse_policy_id,
                    parse_filter=lambda words: (parse_policy_filter(words), False),
                    selected=lambda e, f: policy_selected(e.policy, f),
                    text=lambda e, nokeys: policy_text(e),
                    to_json=lambda e, nokeys: e.to_dict(), add="add_policy",
                    delete="del_policy", get="get_policy", entries="policies",
                    more=_policy_more)


def do_state(argv: list[str], opts: dict) -> int:
    return _do(_STATES, argv, opts)


def do_policy(argv: list[str], opts: dict) -> int:
    return _do(_POLICIES, argv, opts)


class _open:
    """The store of opts["dataplane"], closed after use."""

    def __init__(self, opts: dict):
        self.store = store_for(opts.get("dataplane", "auto"))

    def __enter__(self) -> XfrmStore:
        return self.store

    def __exit__(self, *exc) -> None:
        close = getattr(self.store, "close", None)
        if close:
            close()
