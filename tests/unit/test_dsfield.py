"""tos | tclass | dsfield: rt_dsfield names in and out, as iproute2 6.1 parses and prints them.

The facts below are iproute2's: ip/iptunnel.c parse_args() and print_tunnel(), and
lib/rt_names.c rtnl_dsfield_a2n(), rtnl_dsfield_n2a() and fread_id_name(). Each value and
each line of TOS_FACTS was also checked against the `ip` 6.1 binary (under gdb: the tos byte
`ip tunnel add` hands the kernel, and what `ip tunnel show` prints for a tos the kernel hands
back), with iproute2's own rt_dsfield, which RT_DSFIELD copies.
"""
import pytest

from tunl.cli import grammar
from tunl.cli.show import to_json, tos_word, tunnel_line
from tunl.errors import ConfigError
from tunl.model import TunnelSpec

from test_cli_grammar import RT_DSFIELD


@pytest.fixture(autouse=True)
def rt_dsfield(tmp_path, monkeypatch):
    """iproute2's table in /etc's place, no /usr/share copy."""
    path = tmp_path / "etc-rt_dsfield"
    path.write_text(RT_DSFIELD)
    monkeypatch.setattr(grammar, "DSFIELD_FILES", (str(path), str(tmp_path / "usr-rt_dsfield")))
    return path


def table_files(tmp_path, monkeypatch, etc: str | None, usr: str | None) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("etc", etc), ("usr", usr)):
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        paths.append(str(p))
    monkeypatch.setattr(grammar, "DSFIELD_FILES", tuple(paths))


# word -> (the tos byte ip 6.1 sends, what ip 6.1 prints for that byte)
TOS_FACTS = [
    ("EF", 0xB8, "tos EF"),
    ("AF11", 0x28, "tos AF11"),
    ("CS7", 0xE0, "tos CS7"),
    ("inherit", 0x01, "tos inherit"),
    ("inherit/AF41", 0x89, "tos inherit/AF41"),
    ("inherit/EF", 0xB9, "tos inherit/EF"),
    ("0x11", 0x11, "tos inherit/0x10"),      # bit 0 is kept: it is the inherit bit
    ("11", 0x11, "tos inherit/0x10"),        # hex without 0x: strtoul(, 16)
    ("10", 0x10, "tos 0x10"),
    ("0xef", 0xEF, "tos inherit/0xee"),
    ("c0", 0xC0, "tos CS6"),
    ("4", 0x04, "tos 0x04"),                 # 0x%02x
    ("+10", 0x10, "tos 0x10"),               # strtoul() takes a sign...
    (" 10", 0x10, "tos 0x10"),               # ...and leading space
    ("-0", 0x00, None),
    ("-FFFFFFFFFFFFFFFF", 0x01, "tos inherit"),   # negated in unsigned long
    ("default", 0x00, None),
    ("0", 0x00, None),
    ("10/20", 0x10, "tos 0x10"),             # strsep() cuts the word at "/": "/20" is unread
]


@pytest.mark.parametrize("word, tos, shown", TOS_FACTS)
def test_tos_words_as_iproute2_parses_and_prints_them(word, tos, shown):
    s = grammar.spec_for_add(["t1", "mode", "ipip", "tos", word])
    assert s.tos == tos
    line = tunnel_line(s)
    if shown is None:
        assert " tos " not in line
    else:
        assert line == f"t1: ip/ip remote any local any ttl inherit {shown}"


@pytest.mark.parametrize("word", ["tos", "tclass", "dsfield", "dsf", "ds", "d"])
def test_tclass_and_prefixes_of_dsfield_are_tos(word):
    # parse_args(): strcmp "tos", strcmp "tclass", matches(*argv, "dsfield")
    assert grammar.spec_for_add(["t1", "mode", "ipip", word, "AF11"]).tos == 0x28


def test_dev_is_not_dsfield():
    assert grammar.spec_for_add("t1 mode ipip dev eth0".split()).dev == "eth0"


@pytest.mark.parametrize("word", ["0x100", "100", "zz", "-1", "inherit/", "inherit/zz",
                                  "inherit/100", "EF ", "0x", "", "/10", "inherit/inherit",
                                  "1_0"])
def test_bad_tos_values_are_refused_in_one_line(word):
    # iproute2: Error: argument "..." is wrong: bad TOS value
    with pytest.raises(ConfigError) as e:
        grammar.spec_for_add(["t1", "mode", "ipip", "tos", word])
    assert str(e.value).startswith(f'tos "{word}": bad TOS value; TOS is 00..ff (hex)')
    assert "\n" not in str(e.value)


def test_the_word_is_named_as_typed():
    with pytest.raises(ConfigError, match='^tclass "EFF": bad TOS value'):
        grammar.spec_for_add("t1 mode ipip tclass EFF".split())


def test_a2n_and_n2a():
    assert grammar.dsfield_a2n("EF") == 0xB8
    assert grammar.dsfield_a2n("default") == 0
    assert grammar.dsfield_a2n("0xff") == 0xFF
    assert grammar.dsfield_a2n("ff") == 0xFF
    assert grammar.dsfield_a2n("0X1f") == 0x1F
    assert grammar.dsfield_a2n("256") is None
    assert grammar.dsfield_n2a(0xB8) == "EF"
    assert grammar.dsfield_n2a(0x00) == "default"
    assert grammar.dsfield_n2a(0x10) == "0x10"
    assert grammar.dsfield_n2a(0x02) == "0x02"
    assert [tos_word(t) for t in (1, 0x89, 0x88, 0x11, 0xFF)] == \
        ["inherit", "inherit/AF41", "AF41", "inherit/0x10", "inherit/0xfe"]


def test_json_tos_is_the_name_of_the_whole_byte_as_print_tunnel_writes_it():
    def js(tos):
        spec = TunnelSpec("t1", tos=tos).to_dict()
        return to_json({"spec": spec, "dataplane": "userspace", "mtu": 1480, "up": True,
                        "counters": {}})
    assert js(0xB8)["tos"] == "EF"
    assert js(0xB9)["tos"] == "0xb9"      # in JSON iproute2 names the byte, inherit bit and all
    assert js(0x11)["tos"] == "0x11"
    assert js(1)["tos"] == "inherit"      # iproute2 writes no "tos" here; tunl says inherit
    assert "tos" not in js(0)
    assert list(js(0xB8)).index("tos") == list(js(0xB8)).index("ttl") + 1


def test_every_tos_round_trips_through_show():
    for tos in range(256):
        s = TunnelSpec("t1", tos=tos)
        words = tunnel_line(s).split()
        again = grammar.spec_for_add(["t1", "mode", "ipip"] + words[6:])
        assert again.tos == tos, (tos, words)


# -- the table: which file, which lines ------------------------------------------------------

def test_without_a_table_names_are_hex(tmp_path, monkeypatch):
    """No rt_dsfield at all: "EF" is the hex number 0xef, as in iproute2."""
    table_files(tmp_path, monkeypatch, None, None)
    assert grammar.parse_tos("tos", "EF") == 0xEF
    assert grammar.dsfield_n2a(0xB8) == "0xb8"
    assert grammar.dsfield_a2n("0") == 0 and grammar.dsfield_n2a(0) == "0"   # tab[0] = "0"
    with pytest.raises(ConfigError):
        grammar.parse_tos("tos", "AF11")


def test_etc_is_the_table_and_usr_share_only_stands_in_for_it(tmp_path, monkeypatch):
    table_files(tmp_path, monkeypatch, "0x28 mine\n", "0x28 theirs\n0x30 other\n")
    assert grammar.dsfield_n2a(0x28) == "mine"
    assert grammar.dsfield_a2n("other") is None
    table_files(tmp_path / "b", monkeypatch, None, "0x28 theirs\n")
    assert grammar.dsfield_n2a(0x28) == "theirs"


def test_lines_as_fread_id_name_reads_them(tmp_path, monkeypatch):
    table_files(tmp_path, monkeypatch, "\n".join([
        "  # a comment",
        "\t0x10\tlow   # a trailing comment",
        "0x10 lower",            # a later line for 0x10 names it again
        "0x18 twin",
        "0x20 twin",             # the same name twice: a2n finds the lowest value
        "64 decimal",            # "%d %s"
        "0x1ff toobig",
        "-5 negative",
        "",
        "0x48 last-read",
        "garbage here",          # "corrupted": the rest of the file is not read
        "0x50 unread",
    ]) + "\n", None)
    assert grammar.dsfield_n2a(0x10) == "lower"
    assert grammar.dsfield_a2n("low") is None
    assert grammar.dsfield_a2n("twin") == 0x18
    assert grammar.dsfield_a2n("decimal") == 64
    assert grammar.dsfield_a2n("toobig") is None and grammar.dsfield_a2n("negative") is None
    assert grammar.dsfield_a2n("last-read") == 0x48
    assert grammar.dsfield_a2n("unread") is None
    assert grammar.dsfield_n2a(0x50) == "0x50"


def test_names_are_case_sensitive_and_come_before_numbers(tmp_path, monkeypatch):
    table_files(tmp_path, monkeypatch, "0x40 10\n0xb8 EF\n", None)
    assert grammar.dsfield_a2n("10") == 0x40        # a name first, then a number
    assert grammar.dsfield_a2n("ef") == 0xEF        # not the name EF: hex ef
