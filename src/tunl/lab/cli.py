"""`tunl lab`: emulated hosts in network namespaces.

    tunl lab up FILE              namespaces, underlay bridge, veths; run the hosts' commands
    tunl lab down FILE            end the lab's processes, delete its namespaces (idempotent)
    tunl lab exec [--lab NAME] NODE -- CMD...
                                  run CMD in NODE's namespace (a host, HOST-CONTAINER, or ul)
    tunl lab demo FILE            up, ping every target of every other host, show the captured
                                  packets (ipip, gre, sit), down
    tunl lab list                 the labs that are up and their nodes

The tunl CLI hands its arguments after `lab` to main(); main returns the exit code.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..errors import TunlError
from . import control, demo, topology

PROG = "tunl lab"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Emulated hosts in network namespaces.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("up", help="create the lab's namespaces and run the hosts' commands")
    s.add_argument("file", metavar="FILE", help="topology file (TOML)")
    s.add_argument("-v", "--verbose", action="store_true", help="show each step and its output")

    s = sub.add_parser("down", help="end the lab's processes and delete its namespaces")
    s.add_argument("file", metavar="FILE", nargs="?", help="topology file (TOML)")
    s.add_argument("--lab", metavar="NAME", help="the lab's name, instead of FILE")
    s.add_argument("-v", "--verbose", action="store_true", help="show each step")

    s = sub.add_parser("exec", help="run a command in a node's namespace",
                       usage=f"{PROG} exec [--lab NAME] NODE -- CMD...")
    s.add_argument("--lab", metavar="NAME", help="the lab, when several are up")
    s.add_argument("node", metavar="NODE", help="a host, HOST-CONTAINER, or ul (the underlay)")
    s.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER, help="command and arguments")

    s = sub.add_parser("demo", help="up, ping every host's targets, show captured packets and"
                                    " counters, down")
    s.add_argument("file", metavar="FILE", help="topology file (TOML)")
    s.add_argument("--pcap", metavar="PATH", help="keep the underlay capture in PATH")
    s.add_argument("--show", metavar="N", type=int, default=demo.SHOW,
                   help="captured packets to decode (default: the first of each direction of"
                        " each ping)")
    s.add_argument("-v", "--verbose", action="store_true", help="show each step and its output")

    sub.add_parser("list", help="the labs that are up, with their nodes")
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


def main(argv: list[str]) -> int:
    argv, cmd = _split_exec(list(argv))
    parser = _parser()
    if not argv:
        parser.print_usage(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:            # --help, or a usage error (already printed)
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
        control.up(topo, log=_log(args.verbose))
        nss = topo.namespaces()
        print(f"lab {topo.name} is up: {', '.join(nss)}")
        first = topo.hosts[0]
        print(f"  e.g. tunl lab exec {first.name} -- ip addr;"
              f"  tunl lab down {args.file}")
        return 0
    if args.command == "down":
        if args.lab:
            name = topology.check_lab_name(args.lab)
        elif args.file:
            name = topology.load_name(args.file)
        else:
            raise TunlError("down: give FILE or --lab NAME")
        _need_root()
        report = control.down(name, log=_log(args.verbose))
        if report.namespaces:
            n, k = len(report.namespaces), report.processes
            print(f"lab {name} is down: deleted {n} namespace{'s' * (n != 1)},"
                  f" ended {k} process{'es' * (k != 1)}")
        return 0
    if args.command == "exec":
        if not args.cmd:
            raise TunlError(f"exec: no command (usage: {PROG} exec NODE -- CMD...)")
        _need_root()
        ns = control.find_node(args.node, args.lab)
        return control.exec_in(ns, args.cmd)
    if args.command == "demo":
        topo = topology.load(args.file)
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
