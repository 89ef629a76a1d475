"""`tunl lab` on the command line: help, usage, and the words each verb takes. No root: the
steps that need it (control.down, find_node, exec_in) are replaced."""
from __future__ import annotations

import re

import pytest

from tunl.lab import cli, control, demo

TOPO = ('name = "{name}"\n[underlay]\ncidr = "172.16.0.0/16"\n'
        '[[host]]\nname = "A"\naddress = "172.16.0.1/16"\n')
TWO_HOSTS = TOPO + '[[host]]\nname = "B"\naddress = "172.16.0.2/16"\n'


def write(tmp_path, text: str, name: str = "x") -> str:
    f = tmp_path / f"{name}.toml"
    f.write_text(text.format(name=name))
    return str(f)


@pytest.fixture
def as_root(monkeypatch):
    monkeypatch.setattr(cli, "_need_root", lambda: None)


# -- help ------------------------------------------------------------------------------------

@pytest.mark.parametrize("word", ["help", "-h", "--help"])
def test_help_prints_the_usage_and_exits_0(word, capsys):
    assert cli.main([word]) == 0
    out, err = capsys.readouterr()
    assert out == cli.USAGE and err == ""
    assert out.startswith("Usage: tunl lab up [ -v ] FILE\n")


def test_usage_lists_every_verb_and_every_word_of_each():
    verbs = cli._parser().verbs
    where = cli.USAGE.split("\nWhere: ")[1]
    assert set(verbs) == set(cli.VERBS) == {"up", "down", "exec", "demo", "list"}
    for name, p in verbs.items():
        line = cli.verb_usage(name)
        assert f"       {line}\n" in cli.USAGE or f"Usage: {line}\n" in cli.USAGE
        for action in p._actions:
            if action.dest == "help":
                continue
            if action.option_strings:       # every option, in the verb's usage line
                assert any(o in line.split() for o in action.option_strings), (name, action)
            if action.metavar:              # every value it takes, in the line and in Where:
                assert action.metavar in line.split(), (name, action.metavar)
                assert re.search(rf"^ *{action.metavar} +:= ", where, re.M), action.metavar
    assert re.search(r"^ *-v, --verbose := ", where, re.M)
    assert "tunl lab help" in cli.USAGE


@pytest.mark.parametrize("verb", ["up", "down", "exec", "demo", "list"])
@pytest.mark.parametrize("word", ["help", "-h"])
def test_each_verb_has_its_own_help(verb, word, capsys):
    assert cli.main([verb, word]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {cli.verb_usage(verb)}\n")
    assert cli.VERBS[verb][1][:30] in out.replace("\n", " ")


def test_no_verb_is_a_usage_error_with_the_whole_usage(capsys):
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == cli.USAGE


def test_unknown_verb_names_the_verbs(capsys):
    assert cli.main(["frob"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tunl lab { up | down | exec | demo | list | help } ...\n")
    assert "invalid choice: 'frob'" in err


# -- down ------------------------------------------------------------------------------------

def test_down_of_a_lab_that_is_not_up_is_one_line_and_fails(monkeypatch, as_root, capsys):
    asked = []
    monkeypatch.setattr(control, "down",
                        lambda name, log=None: asked.append(name) or control.DownReport((), 0))
    assert cli.main(["down", "--lab", "nosuch"]) == 1
    out, err = capsys.readouterr()
    assert asked == ["nosuch"] and out == ""
    assert err == ('tunl lab: down: lab "nosuch" is not up: no namespace tl-nosuch-* exists'
                   " (`tunl lab list` shows the labs that are up)\n")


def test_down_of_a_file_whose_lab_is_not_up(monkeypatch, as_root, tmp_path, capsys):
    monkeypatch.setattr(control, "down", lambda name, log=None: control.DownReport((), 0))
    assert cli.main(["down", write(tmp_path, TOPO, "gone")]) == 1
    assert 'lab "gone" is not up' in capsys.readouterr().err


def test_down_of_a_lab_that_is_up_says_what_it_removed(monkeypatch, as_root, capsys):
    monkeypatch.setattr(control, "down", lambda name, log=None: control.DownReport(
        (f"tl-{name}-A", f"tl-{name}-ul"), 1))
    assert cli.main(["down", "--lab", "x"]) == 0
    assert capsys.readouterr().out == "lab x is down: deleted 2 namespaces, ended 1 process\n"


def test_down_takes_file_or_lab_not_both(tmp_path, capsys):
    assert cli.main(["down", write(tmp_path, TOPO), "--lab", "y"]) == 1
    assert capsys.readouterr().err == "tunl lab: down: give FILE or --lab NAME, not both\n"
    assert cli.main(["down"]) == 1
    assert "down: give FILE or --lab NAME (usage: tunl lab down [ -v ] { FILE | --lab NAME })" \
        in capsys.readouterr().err


# -- exec ------------------------------------------------------------------------------------

@pytest.fixture
def fake_exec(monkeypatch, as_root):
    calls = []
    monkeypatch.setattr(control, "find_node",
                        lambda node, lab=None: calls.append((node, lab)) or f"tl-{lab}-{node}")
    monkeypatch.setattr(control, "exec_in",
                        lambda ns, argv: calls.append((ns, list(argv))) or 0)
    return calls


@pytest.mark.parametrize("argv", [
    ["exec", "--lab", "L", "A", "--", "ping", "-c", "1", "x"],
    ["exec", "A", "--lab", "L", "--", "ping", "-c", "1", "x"],     # --lab after NODE counts too
])
def test_exec_takes_lab_before_or_after_node(argv, fake_exec):
    assert cli.main(argv) == 0
    assert fake_exec == [("A", "L"), ("tl-L-A", ["ping", "-c", "1", "x"])]


def test_exec_words_between_node_and_dashes_are_not_dropped(fake_exec, capsys):
    # they were taken as the command and then replaced by the one after "--"
    assert cli.main(["exec", "A", "-v", "--", "true"]) == 2
    assert "unrecognized arguments: -v" in capsys.readouterr().err
    assert cli.main(["exec", "A", "extra", "--", "true"]) == 2
    assert fake_exec == []


def test_exec_without_dashes_still_runs_the_rest(fake_exec):
    assert cli.main(["exec", "A", "ping", "-c", "1", "x"]) == 0
    assert fake_exec[-1] == ("tl-None-A", ["ping", "-c", "1", "x"])


# -- demo ------------------------------------------------------------------------------------

def test_demo_show_is_a_count(tmp_path, capsys):
    assert cli.main(["demo", "--show", "-1", write(tmp_path, TWO_HOSTS)]) == 2
    assert '"-1" is not a count' in capsys.readouterr().err


def test_demo_with_nothing_to_ping_fails_before_up(tmp_path, capsys):
    assert cli.main(["demo", write(tmp_path, TOPO, "one")]) == 1
    assert capsys.readouterr().err == (
        'tunl lab: demo: lab "one" has one host, so nothing to ping (the demo pings the'
        " targets of every other host)\n")


def test_demo_pcap_in_a_missing_directory_fails_before_up(tmp_path, capsys):
    missing = tmp_path / "no" / "x.pcap"
    assert cli.main(["demo", "--pcap", str(missing), write(tmp_path, TWO_HOSTS)]) == 1
    assert capsys.readouterr().err == (
        f"tunl lab: demo: --pcap {missing}: directory {missing.parent} does not exist\n")


def test_demo_check_passes_a_lab_with_two_hosts(tmp_path):
    from tunl.lab import topology
    demo.check(topology.load(write(tmp_path, TWO_HOSTS)), str(tmp_path / "x.pcap"))
