"""The lab's control logic over a fake `ip netns`: finding nodes, the order of teardown,
the CLI's arguments. No root."""
from __future__ import annotations

import pytest

from tunl.lab import cli, control, netns
from tunl.lab.netns import LabError


@pytest.fixture
def fake_ns(monkeypatch):
    """A fake set of named namespaces, with a log of what was done to them."""
    state = {"ns": [], "log": []}
    monkeypatch.setattr(netns, "list_ns", lambda: list(state["ns"]))

    def end(ns, *a, **kw):
        state["log"].append(("end", ns))
        return 1

    def delete(ns):
        state["log"].append(("delete", ns))
        state["ns"].remove(ns)
        return True

    monkeypatch.setattr(netns, "end_processes", end)
    monkeypatch.setattr(netns, "delete", delete)
    return state


LAB_X = ["tl-x-ul", "tl-x-A", "tl-x-B", "tl-x-A-c1"]
LAB_Y = ["tl-y-ul", "tl-y-A", "tl-y-C"]
NOT_A_LAB = ["tl-it1234-A", "tl-bench-55-a", "other"]


def test_running_labs_need_an_underlay(fake_ns):
    fake_ns["ns"] = LAB_X + LAB_Y + NOT_A_LAB
    labs = control.running_labs()
    assert sorted(labs) == ["x", "y"]
    assert sorted(labs["x"]) == ["A", "A-c1", "B", "ul"]


def test_find_node(fake_ns):
    fake_ns["ns"] = LAB_X + LAB_Y + NOT_A_LAB
    assert control.find_node("B") == "tl-x-B"
    assert control.find_node("A-c1") == "tl-x-A-c1"
    assert control.find_node("A", "y") == "tl-y-A"
    with pytest.raises(LabError, match=r'node "A" is in several running labs \(x, y\): '
                                       "choose one with --lab"):
        control.find_node("A")
    with pytest.raises(LabError, match='no running lab has a node "Z" \\(labs up: x, y\\)'):
        control.find_node("Z")
    with pytest.raises(LabError, match='lab "y" has no node "B"'):
        control.find_node("B", "y")
    with pytest.raises(LabError, match='lab "it1234" is not up'):
        control.find_node("A", "it1234")


def test_down_ends_processes_first_then_deletes_inside_out(fake_ns):
    fake_ns["ns"] = LAB_X + LAB_Y
    report = control.down("x")
    assert report.processes == 4
    log = fake_ns["log"]
    assert [op for op, _ in log] == ["end"] * 4 + ["delete"] * 4
    deleted = [ns for op, ns in log if op == "delete"]
    assert deleted[0] == "tl-x-A-c1" and deleted[-1] == "tl-x-ul"
    assert fake_ns["ns"] == LAB_Y            # only lab x's namespaces


def test_down_of_a_lab_that_is_not_up(fake_ns):
    fake_ns["ns"] = LAB_Y
    assert control.down("x") == control.DownReport((), 0)
    assert fake_ns["log"] == []


def test_up_refuses_a_lab_that_is_up(fake_ns):
    from tunl.lab import topology
    fake_ns["ns"] = list(LAB_X)
    topo = topology.loads('name = "x"\n[underlay]\ncidr = "10.0.0.0/8"\n'
                          '[[host]]\nname = "A"\naddress = "10.0.0.1/8"\n')
    with pytest.raises(LabError, match=r'lab "x" is already up \(namespace tl-x-ul exists\)'):
        control.up(topo)
    assert fake_ns["log"] == []              # and touches nothing that is there


def test_cli_split_exec():
    assert cli._split_exec(["exec", "A", "--", "ping", "--", "x"]) == (
        ["exec", "A"], ["ping", "--", "x"])
    assert cli._split_exec(["up", "f.toml"]) == (["up", "f.toml"], None)


def test_cli_usage_errors(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frob"]) == 2
    assert cli.main(["exec", "A", "--"]) == 1
    assert "exec: no command" in capsys.readouterr().err


def test_cli_bad_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('name = "x"\n[underlay]\ncidr = "10.0.0.0/8"\n'
                 '[[host]]\nname = "B"\naddress = "300.1.2.3"\n')
    assert cli.main(["up", str(f)]) == 1
    err = capsys.readouterr().err
    assert err == 'tunl lab: host "B": address "300.1.2.3" is not an IPv4 address/prefix\n'


def test_tool_env_puts_this_interpreter_first():
    import os
    import sys
    env = netns.tool_env()
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))
