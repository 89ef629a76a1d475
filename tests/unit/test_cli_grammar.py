"""The words of `ip tunnel` into specs, and specs back into what `ip tunnel show` prints.

Expected lines are the ones iproute2 prints (ip/iptunnel.c print_tunnel()) and the
walkthrough shows, written here by hand.
"""
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunl.cli import grammar, main as cli
from tunl.cli.show import selected, stats_lines, tunnel_line
from tunl.errors import ConfigError
from tunl.model import TunnelMode, TunnelSpec

# iproute2 6.1's etc/iproute2/rt_dsfield, so that what tos prints does not hang on this host
RT_DSFIELD = """# Differentiated field values
# These include the DSCP and unused bits
0x0\tdefault
# Newer RFC2597 values
0x28\tAF11
0x30\tAF12
0x38\tAF13
0x48\tAF21
0x50\tAF22
0x58\tAF23
0x68\tAF31
0x70\tAF32
0x78\tAF33
0x88\tAF41
0x90\tAF42
0x98\tAF43
# Older values RFC2474
0x20\tCS1
0x40\tCS2
0x60\tCS3
0x80\tCS4
0xA0\tCS5
0xC0\tCS6
0xE0\tCS7
# RFC 2598
0xB8\tEF
"""


@pytest.fixture(autouse=True, scope="module")
def rt_dsfield(tmp_path_factory):
    path = tmp_path_factory.mktemp("iproute2") / "rt_dsfield"
    path.write_text(RT_DSFIELD)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grammar, "DSFIELD_FILES", (str(path),))
        yield path


def test_one_to_one_words():
    s = grammar.spec_for_add("tunl0 mode ipip remote 172.16.232.194 local 172.16.232.172".split())
    assert s == TunnelSpec("tunl0", TunnelMode.IPIP, IPv4Address("172.16.232.194"),
                           IPv4Address("172.16.232.172"))
    assert tunnel_line(s) == "tunl0: ip/ip remote 172.16.232.194 local 172.16.232.172 ttl inherit"


def test_one_to_many_words():
    s = grammar.spec_for_add("tunl0 mode ipip".split())
    assert s.nbma
    assert tunnel_line(s) == "tunl0: ip/ip remote any local any ttl inherit"


@pytest.mark.parametrize("words, line", [
    ("t1 mode ipip remote 1.2.3.4 ttl 64 tos 10", "t1: ip/ip remote 1.2.3.4 local any ttl 64 tos 0x10"),
    ("t1 mode ipip tos inherit", "t1: ip/ip remote any local any ttl inherit tos inherit"),
    ("t1 mode ipip tos inherit/28", "t1: ip/ip remote any local any ttl inherit tos inherit/AF11"),
    ("t1 mode ipip tos inherit/30", "t1: ip/ip remote any local any ttl inherit tos inherit/AF12"),
    ("t1 mode ipip tos 4", "t1: ip/ip remote any local any ttl inherit tos 0x04"),
    ("t1 mode ipip nopmtudisc", "t1: ip/ip remote any local any ttl inherit nopmtudisc"),
    ("t1 mode ipip dev eth0 hoplimit 9", "t1: ip/ip remote any local any dev eth0 ttl 9"),
    ("ipip7 remote any local 10.0.0.1", "ipip7: ip/ip remote any local 10.0.0.1 ttl inherit"),
    ("name t1 mode ip/ip ttl inherit", "t1: ip/ip remote any local any ttl inherit"),
    ("gre1 key 42", "gre1: gre/ip remote any local any ttl inherit key 42"),
    ("gre1 ikey 1.0.0.0 okey 7", "gre1: gre/ip remote any local any ttl inherit ikey 16777216 okey 7"),
])
def test_words_print_like_iproute2(words, line):
    assert tunnel_line(grammar.spec_for_add(words.split())) == line


def test_gre_flags_print_on_lines_of_their_own():
    s = grammar.spec_for_add("gre1 mode gre seq icsum".split())
    assert tunnel_line(s).split("\n")[1:] == [
        "  Drop packets out of sequence.", "  Checksum in received packet is required.",
        "  Sequence packets on output."]


@pytest.mark.parametrize("words, message", [
    ("t1 mode ipip ttl 256", 'ttl "256": TTL is 1..255 or inherit'),
    ("t1 mode ipip ttl -1", 'ttl "-1": TTL is 1..255 or inherit'),
    ("t1 mode ipip ttl 64 nopmtudisc", "ttl 64 with nopmtudisc: a fixed ttl needs pmtudisc"),
    ("t1 mode bogus", 'mode "bogus": unknown tunnel mode'),
    ("t1 mode ipip mode gre", "more than one tunnel mode"),
    ("t1 mode ipip remote 1.2.3.400", 'remote "1.2.3.400": an IPv4 address is a dotted quad'),
    ("t1 mode ipip local", "local: a value must follow this word"),
    ("t1 mode ipip key 5", "key with mode ipip: keys are only for gre and vti tunnels"),
    ("t1 mode ipip tos zz", 'tos "zz": bad TOS value; TOS is 00..ff (hex), a name of '
                            'rt_dsfield (EF, AF11, ...), inherit or inherit/TOS'),
    ("t1 mode ipip remtoe 1.2.3.4", '"remtoe": not a word of tunl tunnel'),
    ("abcdefghijklmnop mode ipip", "a device name has at most 15 bytes"),
    ("tunl0", "tunl0: cannot determine tunnel mode"),
    ("mode ipip", "a tunnel needs a name"),
    ("gre1 key 4294967296", 'key "4294967296": a key is a number'),
])
def test_bad_words_name_the_word_and_the_rule(words, message):
    with pytest.raises(ConfigError) as e:
        grammar.spec_for_add(words.split())
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_change_keeps_what_it_does_not_mention():
    cur = grammar.spec_for_add("tunl0 mode ipip remote 1.2.3.4 local 5.6.7.8".split())
    new = grammar.spec_for_change("tunl0 ttl 17".split(), cur)
    assert new == cur.with_(ttl=17)


def test_the_ttl_rule_also_holds_for_change():
    cur = grammar.spec_for_add("tunl0 mode ipip ttl 64".split())
    with pytest.raises(ConfigError, match="a fixed ttl needs pmtudisc"):
        grammar.spec_for_change("tunl0 nopmtudisc".split(), cur)


@given(st.integers(0, 255), st.integers(0, 255))
def test_ttl_and_tos_words_round_trip_through_show(ttl, tos):
    ttl_word = str(ttl) if ttl else "inherit"
    tos_word = ("inherit/" if tos & 1 else "") + f"{tos & ~1:02x}" if tos & ~1 else \
        ("inherit" if tos & 1 else "00")
    s = grammar.spec_for_add(["t1", "mode", "ipip", "ttl", ttl_word, "tos", tos_word])
    assert (s.ttl, s.tos) == (ttl, tos)
    again = grammar.spec_for_add(["t1", "mode", "ipip"] + tunnel_line(s).split()[6:])
    assert again == s


def test_verbs_take_prefixes_like_ip():
    assert grammar.matches("a", "add") and grammar.matches("sh", "show")
    assert not grammar.matches("", "add") and not grammar.matches("adds", "add")


def test_stats_lines_have_iproute2_columns():
    c = {k: 0 for k in ("rx_packets", "rx_bytes", "rx_errors", "rx_crc_errors", "rx_fifo_errors",
                        "tx_packets", "tx_bytes", "tx_errors", "collisions", "tx_carrier_errors",
                        "tx_dropped")}
    c.update(rx_packets=3, tx_bytes=252, rx_drop={"ecn": 2}, tx_drop={})
    lines = stats_lines(c).split("\n")
    assert lines[0] == "RX: Packets    Bytes        Errors CsumErrs OutOfSeq Mcasts"
    assert lines[1].split() == ["3", "0", "0", "0", "0", "0"]
    assert lines[2] == "TX: Packets    Bytes        Errors DeadLoop NoRoute  NoBufs"
    assert lines[3].split() == ["0", "252", "0", "0", "0", "0"]
    assert lines[4] == "Drops: ecn=2"


def test_cli_bad_input_is_one_line_and_exit_1(capsys):
    assert cli.main(["tunnel", "add", "t1", "mode", "ipip", "ttl", "999"]) == 1
    err = capsys.readouterr().err
    assert err == 'tunl: ttl "999": TTL is 1..255 or inherit\n'


def test_cli_unknown_object_and_option(capsys):
    assert cli.main(["bogus"]) == 1
    assert cli.main(["-x", "tunnel"]) == 1
    assert cli.main(["--dataplane", "fpga", "tunnel", "show"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ['tunl: object "bogus": unknown; try "tunl help"',
                   'tunl: option "-x": unknown; the options are -s, -d, -j, -p, -V and --dataplane',
                   'tunl: --dataplane "fpga": the data planes are auto, kernel, ebpf and userspace']


def test_sit_shows_the_default_6rd_prefix_like_iproute2():
    s = grammar.spec_for_add("sit1 mode sit remote 192.0.2.1 local 192.0.2.2".split())
    assert tunnel_line(s) == \
        "sit1: ipv6/ip remote 192.0.2.1 local 192.0.2.2 ttl inherit 6rd-prefix 2002::/16"


def test_6rd_relay_prefix_is_shown_when_set():
    from ipaddress import IPv4Network, IPv6Network
    s = grammar.spec_for_add("sit1 mode sit".split()).with_(
        ip6rd_prefix=IPv6Network("2001:db8::/32"), ip6rd_relay_prefix=IPv4Network("10.0.0.0/8"))
    assert tunnel_line(s) == ("sit1: ipv6/ip remote any local any ttl inherit "
                              "6rd-prefix 2001:db8::/32 6rd-relay_prefix 10.0.0.0/8")


def test_isatap_prints_its_router_list_as_print_tunnel_does():
    s = grammar.spec_for_add("isatap0 local 10.0.0.1".split()).with_(
        prl=((IPv4Address("10.0.0.9"), True), (IPv4Address("10.0.0.8"), False)))
    # the words `ip tunnel show` of iproute2 6.1 prints (tests/interop compares the two)
    assert tunnel_line(s) == ("isatap0: ipv6/ip remote any local 10.0.0.1 pdr 10.0.0.9 "
                              "pr 10.0.0.8 ttl inherit 6rd-prefix 2002::/16")


@pytest.mark.parametrize("words, want", [
    ("prl-default 10.0.0.9 dev isatap0", ("isatap0", "add", IPv4Address("10.0.0.9"), True)),
    ("dev isatap0 prl-nodefault 10.0.0.8", ("isatap0", "add", IPv4Address("10.0.0.8"), False)),
    ("prl-delete 10.0.0.8 dev isatap0", ("isatap0", "del", IPv4Address("10.0.0.8"), False)),
])
def test_prl_words(words, want):
    assert grammar.parse_prl(words.split()) == want


@pytest.mark.parametrize("words, message", [
    ("prl-default 10.0.0.9", "prl: must specify device"),
    ("prl-default 10.0.0.9 prl-delete 10.0.0.8 dev i0", "one PRL entry at a time"),
    ("prl-bogus 1.2.3.4 dev i0", '"prl-bogus": invalid PRL parameter'),
    ("prl-default any dev i0", "a router of the PRL is a unicast IPv4 address"),
    ("6rd-prefix 2001:db8::/32", "6rd: must specify device"),
    ("dev s1 6rd-prefix 2001:db8::1/32", '"2001:db8::1/32": an IPv6 prefix with no host bits'),
    ("dev s1 6rd-relay_prefix 10.1.2.3/8", '"10.1.2.3/8": an IPv4 prefix with no host bits'),
    ("dev s1", "say 6rd-prefix, 6rd-relay_prefix or 6rd-reset"),
])
def test_bad_prl_and_6rd_words(words, message):
    parse = grammar.parse_prl if words.startswith("prl") else grammar.parse_6rd
    with pytest.raises(ConfigError, match=message):
        parse(words.split())


def test_6rd_words_leave_out_what_is_not_said_as_zero_like_siocadd6rd():
    from ipaddress import IPv4Network, IPv6Network
    assert grammar.parse_6rd("dev s1 6rd-prefix 2001:db8::/32".split()) == \
        ("s1", IPv6Network("2001:db8::/32"), IPv4Network("0.0.0.0/0"), False)
    assert grammar.parse_6rd("dev s1 6rd-reset".split()) == ("s1", None, None, True)


def test_6rd_prefix_rule_of_the_kernel():
    from ipaddress import IPv4Network, IPv6Network
    s = grammar.spec_for_add("sit1 mode sit".split())
    with pytest.raises(ConfigError, match="must not pass 64"):
        s.with_(ip6rd_prefix=IPv6Network("2001:db8::/48"), ip6rd_relay_prefix=IPv4Network("10.0.0.0/8"))


# -- verbs as do_iptunnel() takes them -------------------------------------------------------

@pytest.mark.parametrize("word, verb", [
    ("a", "add"), ("ad", "add"), ("add", "add"),
    ("c", "change"), ("ch", "change"), ("change", "change"),
    ("d", "del"), ("de", "del"), ("del", "del"), ("delete", "del"),
    ("s", "show"), ("sh", "show"), ("show", "show"),
    ("l", "show"), ("ls", "show"), ("lst", "show"), ("li", "show"), ("list", "show"),
    ("p", "prl"), ("pr", "prl"), ("prl", "prl"),
    ("6", "6rd"), ("6r", "6rd"), ("6rd", "6rd"),
    ("h", "help"), ("help", "help"),
    ("ca", "capture"), ("capture", "capture"),     # tunl's own, after iproute2's verbs
    ("x", None), ("adds", None), ("prl-default", None), ("", None), ("lists", None),
])
def test_verbs_are_the_first_keyword_the_word_is_a_prefix_of(word, verb):
    assert grammar.tunnel_verb(word) == verb


def test_cli_dispatches_prl_and_6rd_by_prefix(capsys):
    # the words are checked before anything asks for root or touches the system
    assert cli.main(["tunnel", "p", "prl-default", "10.0.0.9"]) == 1
    assert cli.main(["tunnel", "pr", "prl-bogus", "1.2.3.4", "dev", "i0"]) == 1
    assert cli.main(["tunnel", "6", "dev", "s1"]) == 1
    assert cli.main(["tunnel", "6r", "6rd-prefix", "2001:db8::/32"]) == 1
    assert cli.main(["tunnel", "frob"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "tunl: prl: must specify device (dev NAME)",
        'tunl: "prl-bogus": invalid PRL parameter; tunl tunnel prl '
        '{ prl-default | prl-nodefault | prl-delete } ADDR dev NAME',
        "tunl: 6rd: say 6rd-prefix, 6rd-relay_prefix or 6rd-reset",
        "tunl: 6rd: must specify device (dev NAME)",
        'tunl: "frob": unknown command; try "tunl tunnel help"']


def test_prl_and_6rd_words_are_whole_words_as_in_do_prl_and_do_6rd():
    # iproute2 compares them with strcmp(), not matches()
    with pytest.raises(ConfigError, match='"prl-def": invalid PRL parameter'):
        grammar.parse_prl("prl-def 10.0.0.9 dev i0".split())
    with pytest.raises(ConfigError, match='"6rd-pre": invalid 6RD parameter'):
        grammar.parse_6rd("6rd-pre 2001:db8::/32 dev s1".split())


@pytest.mark.parametrize("argv", [["h"], ["help"], ["add", "help"], ["add", "t1", "he"],
                                  ["show", "h"], ["del", "hel"], ["change", "t1", "help"]])
def test_help_anywhere_a_name_could_stand_prints_the_usage(argv, capsys):
    # parse_args(): else if (matches(*argv, "help") == 0) usage();
    assert cli.main(["tunnel", *argv]) == 0
    out = capsys.readouterr()
    assert out.out == cli.tunnel_usage() and out.err == ""


def test_name_help_is_a_name():
    assert grammar.parse_words("name help mode ipip".split())["name"] == "help"


TUNNEL_WORDS = ["add", "change", "del", "show", "prl", "6rd", "capture", "help", "list",
                "lst", "delete", "mode", "ipip", "gre", "sit", "isatap", "vti", "ip/ip",
                "gre/ip", "ipv6/ip", "remote", "local", "[i|o]seq", "[i|o]key", "[i|o]csum",
                "prl-default", "prl-nodefault", "prl-delete", "6rd-prefix",
                "6rd-relay_prefix", "6rd-reset", "ttl", "hoplimit", "hlim", "tos", "tclass",
                "dsfield", "[no]pmtudisc", "dev", "name", "inherit", "any", "--dataplane",
                "auto", "kernel", "ebpf", "userspace", "TCPDUMP-OPTIONS", "rt_dsfield"]


def test_tunnel_help_lists_every_verb_and_word():
    text = cli.tunnel_usage()
    assert text.startswith("Usage:\n    tunl tunnel { add | change | del | show | prl | 6rd")
    assert [w for w in TUNNEL_WORDS if w not in text] == []
    assert "a ipip" not in text


def test_usage_lists_every_object_verb_and_option(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for w in ("tunnel", "prl", "6rd", "capture", "help", "lab", "daemon", "doctor",
              "-s[tatistics]", "-d[etails]", "-j[son]", "-p[retty]", "-V[ersion]",
              "--dataplane", "-s ", "-d ", "-j ", "-p ", "-V "):
        assert w in text, w
    assert "a ipip" not in text


# -- the tunnels `show` lists: ip_tunnel_parm_match() -----------------------------------------

def _spec(words: str) -> dict:
    return grammar.spec_for_add(words.split()).to_dict()


TUNNELS = [_spec("gre1 mode gre key 5 dev d0 local 192.0.2.1"),
           _spec("gre2 mode gre ikey 7 okey 9 dev d1"),
           _spec("t3 mode ipip dev d0 remote 198.51.100.3"),
           _spec("t4 mode ipip")]


@pytest.mark.parametrize("words, names", [
    ("", ["gre1", "gre2", "t3", "t4"]),
    ("dev d0", ["gre1", "t3"]),
    ("dev d1", ["gre2"]),
    ("key 5", ["gre1"]),
    ("ikey 7", ["gre2"]),
    ("key 7", ["gre2"]),                   # the ikey is compared...
    ("okey 9", ["gre1", "gre2", "t3", "t4"]),   # ...and never the okey
    ("key 0", ["gre1", "gre2", "t3", "t4"]),    # 0 is any
    ("key 0.0.0.5", ["gre1"]),
    ("dev d0 key 5", ["gre1"]),
    ("dev d1 key 5", []),
    ("remote 198.51.100.3", ["t3"]),
    ("remote any", ["gre1", "gre2", "t3", "t4"]),
    ("remote 0.0.0.0", ["gre1", "gre2", "t3", "t4"]),
    ("local 192.0.2.1", ["gre1"]),
    ("local any", ["gre1", "gre2", "t3", "t4"]),
    ("t3", ["t3"]),
    ("name gre2 dev d0", []),
    ("mode gre", ["gre1", "gre2"]),
    ("mode ipip dev d0", ["t3"]),
    ("ttl 9 tos EF nopmtudisc seq", ["gre1", "gre2", "t3", "t4"]),   # parsed, not compared
])
def test_show_selects_as_ip_tunnel_parm_match(words, names):
    f = grammar.parse_show(words.split())
    assert [t["name"] for t in TUNNELS if selected(t, f)] == names


@pytest.mark.parametrize("words", ["mode ipip key 5", "ipip0 key 5", "sit1 ikey 1",
                                   "mode isatap okey 2"])
def test_show_refuses_keys_with_a_mode_that_has_none(words):
    # parse_args(): "Keys are not allowed with ipip and sit tunnels"
    with pytest.raises(ConfigError, match="keys are only for gre and vti tunnels"):
        grammar.parse_show(words.split())


def test_show_takes_keys_with_gre_vti_or_no_mode():
    assert grammar.parse_show("key 5".split())["ikey"] == 5
    assert grammar.parse_show("mode vti ikey 5".split())["ikey"] == 5
    assert grammar.parse_show("gre1 key 5".split())["ikey"] == 5


@pytest.mark.parametrize("argv", [["daemon", "help"], ["daemon", "h"], ["daemon", "-h"]])
def test_daemon_help_lists_every_verb(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: tunl daemon { status | start | stop | help }")
    for verb in ("status", "start", "stop"):
        assert f"\n  {verb} " in out
