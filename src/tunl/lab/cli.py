"""`tunl lab`: emulated hosts in network namespaces.

USAGE below is what `tunl lab help` prints: every verb with every word it takes, in the
iproute2 style (the grammar, then what each value is). Each verb's own `-h` is argparse's.

The tunl CLI hands its arguments after `lab` to main(); main returns the exit code.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading

from ..errors import TunlError
from . import control, demo, topology
from .topology import ns_prefix

PROG = "tunl lab"

# each verb: its words (iproute2's BNF) and what it does
VERBS = {
    "up":   ("[ -v ] FILE",
             "build the lab: namespaces tl-NAME-*, the underlay bridge br0 (with segments: one"
             " bridge per segment, routed by the underlay namespace), veths; then run"
             " each host's commands; with a [mesh], start its registry and an agent per member"
             " and wait until every member routes to every other"),
    "down": ("[ -v ] { FILE | --lab NAME }",
             "end the lab's processes (a mesh's agents and etcd too) and delete its"
             " namespaces and its run dir"),
    "exec": ("[ --lab NAME ] NODE -- CMD [ ARG... ]",
             "run CMD in NODE's namespace, with `tunl` on PATH; exit with CMD's exit code"),
    "demo": ("[ -v ] [ --pcap PATH ] [ --show N ] FILE",
             "up, ping every target of every other host, show the captured underlay packets"
             " decoded and the tunnels' counters, down; with a [mesh]: up (the members join),"
             " ping every pair, kill one member and take it off the underlay, time its routes'"
             " going, bring it back, ping every pair again, down; with a [mesh] on segments"
             " or cross_subnet: up, ping every pair while capturing on every segment bridge and"
             " say which went direct and which encapsulated, move one member to another"
             " segment, the same again, down"),
    "list": ("", "the labs that are up, with their nodes"),
}


def verb_usage(verb: str) -> str:
    return f"{PROG} {verb} {VERBS[verb][0]}".rstrip()


def _usage() -> str:
    lines = [("Usage: " if i == 0 else "       ") + verb_usage(v) for i, v in enumerate(VERBS)]
    lines += [f"       {PROG} help",
              f"       {PROG} {{ {' | '.join(VERBS)} }} {{ -h | help }}", ""]
    for v, (_, what) in VERBS.items():
        lines += textwrap.wrap(what, 90, initial_indent=f"  {v:<5} ",
                               subsequent_indent=" " * 8)
    return "\n".join(lines) + f"""

Where: FILE := a topology file (TOML), as in examples/
       NAME := the name of a lab, as its FILE and `{PROG} list` say it
       NODE := {{ HOST | HOST-CONTAINER | ul }}   (ul: the underlay, with its bridges;
               with segments, the router between them)
       CMD  := a command, run with its ARGs in NODE's namespace (`ip netns exec`)
       PATH := where to keep the demo's underlay capture (pcap; with segments, one per
               bridge: PATH for br0, PATH with "-br1" before its extension for br1, ...);
               default: not kept
       N    := how many captured packets to decode; default: the first of each
               direction of each ping
       -v, --verbose := show each step and its output
"""


USAGE = _usage()      # `tunl lab help`


def _count(text: str) -> int:
    """--show N: a count, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f'"{text}" is not a count (0, 1, 2, ...)')
    return n


def _parser(exec_cmd: bool = True) -> argparse.ArgumentParser:
    """The verbs and their words; `exec_cmd=False` when CMD came after "--" and was split off
    (see _split_exec), so that every word before "--" is parsed as NODE or an option."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False,
                                usage=f"{PROG} {{ {' | '.join(VERBS)} | help }} ...")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str) -> argparse.ArgumentParser:
        what = VERBS[name][1]
        return sub.add_parser(name, help=what, description=what, usage=verb_usage(name))

    s = verb("up")
    s.add_argument("file", metavar="FILE", help="topology file (TOML)")
    s.add_argument("-v", "--verbose", action="store_true", help="show each step and its output")

    s = verb("down")
    s.add_argument("file", metavar="FILE", nargs="?", help="topology file (TOML)")
    s.add_argument("--lab", metavar="NAME", help="the lab's name, instead of FILE")
    s.add_argument("-v", "--verbose", action="store_true", help="show each step")

    s = verb("exec")
    s.add_argument("--lab", metavar="NAME", help="the lab, when several are up")
    s.add_argument("node", metavar="NODE", help="a host, HOST-CONTAINER, or ul (the underlay)")
    if exec_cmd:
        s.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER,
                       help="command and arguments, after --")

    s = verb("demo")
    s.add_argument("file", metavar="FILE", help="topology file (TOML)")
    s.add_argument("--pcap", metavar="PATH", help="keep the underlay capture in PATH")
    s.add_argument("--show", metavar="N", type=_count, default=demo.SHOW,
                   help="captured packets to decode (default: the first of each direction of"
                        " each ping)")
    s.add_argument("-v", "--verbose", action="store_true", help="show each step and its output")

    verb("list")
    p.verbs = sub.choices               # {verb: its parser}, for `tunl lab VERB help`
    return p


def _split_exec(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`exec ... NODE -- CMD...`: argparse's REMAINDER mishandles "--", so split it here."""
    if argv and argv[0] == "exec" and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _log(verbose: bool):
    if not verbose:
        return control._quiet
    return lambda line: print(line, flush=True)


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _help(argv: list[str]) -> str | None:
    """What `help` asks for, as iproute2 takes it: `tunl lab help` (or -h, --help) is the whole
    usage; `tunl lab VERB help` is the verb's own, as `tunl lab VERB -h`."""
    if argv[0] in ("help", "-h", "--help"):
        return USAGE
    if len(argv) == 2 and argv[0] in VERBS and argv[1] == "help":
        return _parser().verbs[argv[0]].format_help()
    return None


def main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv:
        sys.stderr.write(USAGE)
        return 2
    text = _help(argv)
    if text is not None:
        sys.stdout.write(text)
        return 0
    argv, cmd = _split_exec(argv)
    parser = _parser(exec_cmd=cmd is None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:            # a verb's -h, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    if cmd is not None:
        args.cmd = cmd
    # SIGTERM tears a lab down the way Ctrl-C does
    catch = (args.command in ("up", "demo")
             and threading.current_thread() is threading.main_thread())
    old = signal.signal(signal.SIGTERM, _on_sigterm) if catch else None
    try:
        return _dispatch(args)
    except TunlError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted; the lab was torn down" if args.command in ("up", "demo")
             else "interrupted")
        return 130
    except _Terminated:
        _err("terminated; the lab was torn down" if args.command in ("up", "demo")
             else "terminated")
        return 143
    finally:
        if catch:
            signal.signal(signal.SIGTERM, old)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise TunlError("network namespaces need root: run as root (e.g. with sudo)")


def _dispatch(args) -> int:
    if args.command == "up":
        topo = topology.load(args.file)
        _need_root()
        running = control.up(topo, log=_log(args.verbose))
        nss = topo.namespaces()
        print(f"lab {topo.name} is up: {', '.join(nss)}")
        first = topo.hosts[0]
        if running is not None:
            n = len(running.members)
            print(f"  mesh {topo.mesh.network}: {n} agent{'s' * (n != 1)}, every member routes"
                  f" to every other {running.joined_in:.1f} s after they started; registry"
                  f" {running.url}; logs {running.dir}/agent-*.log")
            first = running.members[0]
            print(f"  e.g. tunl lab exec {first.name} -- tunl mesh show --registry"
                  f" {running.url}")
        print(f"  e.g. tunl lab exec {first.name} -- ip addr;"
              f"  tunl lab down {args.file}")
        return 0
    if args.command == "down":
        if args.lab and args.file:
            raise TunlError("down: give FILE or --lab NAME, not both")
        if args.lab:
            name = topology.check_lab_name(args.lab)
        elif args.file:
            name = topology.load_name(args.file)
        else:
            raise TunlError(f"down: give FILE or --lab NAME (usage: {verb_usage('down')})")
        _need_root()
        report = control.down(name, log=_log(args.verbose))
        if not report.namespaces:
            # like `ip netns del NAME` of a namespace that is not there: say so, exit non-zero
            raise TunlError(f'down: lab "{name}" is not up: no namespace {ns_prefix(name)}*'
                            f" exists (`{PROG} list` shows the labs that are up)")
        n, k = len(report.namespaces), report.processes
        print(f"lab {name} is down: deleted {n} namespace{'s' * (n != 1)},"
              f" ended {k} process{'es' * (k != 1)}")
        return 0
    if args.command == "exec":
        if not args.cmd:
            raise TunlError(f"exec: no command (usage: {verb_usage('exec')})")
        _need_root()
        ns = control.find_node(args.node, args.lab)
        return control.exec_in(ns, args.cmd)
    if args.command == "demo":
        topo = topology.load(args.file)
        demo.check(topo, args.pcap)
        _need_root()
        return demo.run(topo, sys.stdout, pcap_path=args.pcap, show=args.show,
                        log=_log(args.verbose))
    if args.command == "list":
        labs = control.running_labs()
        for name in sorted(labs):
            print(f"{name}: {' '.join(sorted(labs[name]))}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
