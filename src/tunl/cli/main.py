"""tunl [ OPTIONS ] OBJECT { COMMAND | help }

OBJECT := { tunnel | xfrm | mesh | lab | daemon | doctor }
OPTIONS := { -s[tatistics] | -d[etails] | -j[son] [ -p[retty] ] | -V[ersion] | -h[elp] |
             --dataplane { auto | kernel | ebpf | userspace } }
"""
from __future__ import annotations

import json
import os
import sys

from ..errors import ConfigError, DaemonError, NoDaemonError, NotFoundError, TunlError
from ..model import TunnelSpec
from .. import planes
from . import grammar, show

DATAPLANES = planes.NAMES


def _need_root(what: str) -> None:
    """Refuse `what` to a user other than root, unless it only reads: `tunnel show` (with -s,
    -d, -j) and `daemon status` work for any user, as `ip tunnel show` does (the kernel's
    tunnels over netlink, tunld's over its socket, which answers reads to every user). tunld
    is never started for them: a user whose `tunnel show` misses tunld's tunnels because
    none runs is told so, on stderr."""
    if os.geteuid() == 0:
        return
    if what == "daemon status":
        return
    if what == "tunnel show":
        from ..daemon import client
        from ..planes.tunld import tunld_devices
        if tunld_devices() and not client.running():
            print(f"tunl: {client.ONLY_ROOT_STARTS}; its eBPF and userspace tunnels are not "
                  "shown", file=sys.stderr)
        return
    raise TunlError(f"{what}: needs root (only root changes tunnels and runs tunld; "
                    "tunnel show and daemon status do not need it)")


def _call(op: str, **args):
    from ..planes.tunld import call
    return call(op, **args)


def do_tunnel(argv: list[str], opts: dict) -> int:
    """`tunl tunnel VERB WORDS`, the verb taken as do_iptunnel() takes it (a prefix: the
    first of add, change, del, show, list, lst, prl, 6rd, help; then tunl's capture)."""
    if not argv:
        argv = ["show"]
    verb, words = grammar.tunnel_verb(argv[0]), argv[1:]
    try:
        return _tunnel_verb(verb, argv[0], words, opts)
    except grammar.UsageWanted:
        sys.stdout.write(tunnel_usage())
        return 0


def tunnel_usage() -> str:
    return "Usage:\n" + grammar.USAGE


def _tunnel_verb(verb: str | None, word: str, words: list[str], opts: dict) -> int:
    if verb == "add":
        spec = grammar.spec_for_add(words)
        _need_root("tunnel add")
        planes.for_new(spec.mode, opts["dataplane"]).add(spec)
        return 0
    if verb == "change":
        name = grammar.name_only(words, "change")
        _need_root("tunnel change")
        plane, current = planes.find(name, "change")
        plane.change(grammar.spec_for_change(words, current))
        return 0
    if verb == "del":
        name = grammar.name_only(words, "del")
        _need_root("tunnel del")
        planes.find(name, "delete")[0].delete(name)
        return 0
    if verb == "show":
        return show_tunnels(grammar.parse_show(words), opts)
    if verb == "prl":
        dev, action, addr, default = grammar.parse_prl(words)
        _need_root("tunnel prl")
        planes.find(dev, "prl")[0].prl(dev, action, addr, default)
        return 0
    if verb == "6rd":
        dev, prefix, relay, reset = grammar.parse_6rd(words)
        _need_root("tunnel 6rd")
        planes.find(dev, "6rd")[0].sixrd(dev, prefix, relay)
        return 0
    if verb == "help":
        raise grammar.UsageWanted(word)
    if verb == "capture":
        return capture(words)
    raise ConfigError(f'"{word}": unknown command; try "tunl tunnel help"')


def capture(words: list[str]) -> int:
    """tunl tunnel capture NAME [ TCPDUMP-OPTIONS ]: tcpdump on the tunnel device, both
    directions. On the eBPF plane transmitted packets skip the device's queue, where tcpdump
    looks; while the capture runs, the tunnel sends through the queue (the slow path)."""
    if not words:
        raise ConfigError("capture: say which tunnel: tunl tunnel capture NAME [ tcpdump "
                          "options ]")
    name, rest = words[0], words[1:]
    _need_root("tunnel capture")
    plane, _spec = planes.find(name, "capture")
    ebpf = any(t["dataplane"] == "ebpf" for t in plane.show(name))
    import subprocess
    if ebpf:
        _call("capture", name=name, pid=os.getpid())
    try:
        return subprocess.call(["tcpdump", "-i", name] + rest)
    except FileNotFoundError:
        raise TunlError("capture: tcpdump is not installed (apt install tcpdump)") from None
    except KeyboardInterrupt:
        return 0
    finally:
        if ebpf:
            _call("capture", name=name, pid=None)


def show_tunnels(f: dict, opts: dict) -> int:
    """Kernel tunnel devices (tunl's and any other, like `ip tunnel show`), then tunld's;
    those the words select (show.selected())."""
    _need_root("tunnel show")
    if f.get("dev"):
        _need_device(f["dev"])
    found = [t for t in planes.show(f.get("name")) if show.selected(t["spec"], f)]
    out = sys.stdout
    if opts["json"]:
        json.dump([show.to_json(t) for t in found], out, indent=2 if opts["pretty"] else None)
        out.write("\n")
        return 0
    for t in found:
        out.write(show.tunnel_line(TunnelSpec.from_dict(t["spec"])) + "\n")
        if opts["details"]:
            out.write(show.details_line(t) + "\n")
        if opts["stats"]:
            out.write(show.stats_lines(t["counters"], t.get("xfrm")) + "\n")
    return 0


def _need_device(dev: str) -> None:
    """parse_args(): a `dev` that is no device here is an error (nodev()), not a filter that
    selects nothing."""
    import socket
    try:
        socket.if_nametoindex(dev)
    except OSError:
        raise NotFoundError(f'dev "{dev}": Cannot find device "{dev}"') from None


DAEMON_USAGE = """Usage: tunl daemon { status | start | stop | help }

  status   tunld's pid, its tunnels and where its log is (-j: JSON); any user
  start    start tunld in this network namespace if it is not running (root)
  stop     stop tunld; eBPF tunnels keep their fast path, userspace tunnels carry no
           traffic until tunld runs again (root)
"""


def do_daemon(argv: list[str], opts: dict) -> int:
    """tunl daemon { status | start | stop }: status for any user (it starts tunld only for
    root); start and stop for root."""
    verb = argv[0] if argv else "status"
    if grammar.matches(verb, "help") or verb in ("-h", "--help"):
        sys.stdout.write(DAEMON_USAGE)
        return 0
    if grammar.matches(verb, "status") or grammar.matches(verb, "start"):
        _need_root("daemon status" if grammar.matches(verb, "status") else "daemon start")
        st = _call("status")        # starts tunld if it is not running (root only)
        if opts["json"]:
            print(json.dumps(st))
        else:
            print(f"tunld {st['pid']}: {len(st['tunnels'])} tunnel(s) {' '.join(st['tunnels'])}")
            log = st.get("log")
            if log == "stderr":
                print("log: stderr (under systemd the journal: journalctl -u tunld, or "
                      "tunld@NAME for a named network namespace)")
            elif log:
                print(f"log: {log}")
        return 0
    if grammar.matches(verb, "stop"):
        _need_root("daemon stop")
        from ..daemon import client
        try:
            st = client.call("shutdown", autostart=False)
        except TunlError as e:
            print(str(e))
            return 0
        if not client.wait_gone():
            raise DaemonError(f"tunld {st['pid']} was asked to stop and is still running")
        print(f"tunld {st['pid']} stopped; its userspace tunnels stay but carry no traffic "
              "until tunld runs again (any tunl command starts it)")
        return 0
    raise ConfigError(f'"{verb}": unknown command; tunl daemon {{ status | start | stop }}')


def usage() -> str:
    return ("Usage: " + __doc__.strip() + "\n\n"
            "  tunl tunnel { add | change | del | show | prl | 6rd } [ NAME ] ...   like "
            "`ip tunnel`\n"
            "  tunl tunnel capture NAME [ TCPDUMP-OPTIONS ]   tcpdump on a tunnel, both ways\n"
            "  tunl tunnel help   every word of tunl tunnel\n"
            "  tunl xfrm { state | policy } { add | update | del | get | show | flush } ...   "
            "like `ip xfrm`: IPsec for vti\n"
            "  tunl mesh { init | agent | show | leave } ...   the overlay: subnet leases "
            "in a registry, an agent per node\n"
            "  tunl lab { up FILE | down FILE | exec NODE -- CMD | demo FILE | list }\n"
            "  tunl daemon { status | start | stop }\n"
            "  tunl doctor [ --json ]   which data plane this host gets, and what breaks "
            "tunnels here\n"
            "\n"
            "  -s   tunnel show adds the counters of `ip -s tunnel show`, and drops by reason\n"
            "  -d   tunnel show adds the data plane of each tunnel (and its fast and slow path)\n"
            "  -j   JSON output; -p pretty-prints it\n"
            "  -V   the version of tunl\n"
            "  --dataplane   the plane of a new tunnel (default auto, or $TUNL_DATAPLANE)\n")


def run(argv: list[str]) -> int:
    # TUNL_DATAPLANE sets the default of --dataplane (for a host, or a test run)
    opts = {"json": False, "stats": False, "pretty": False, "details": False,
            "dataplane": os.environ.get("TUNL_DATAPLANE") or "auto"}
    if opts["dataplane"] not in DATAPLANES:
        raise ConfigError(f'TUNL_DATAPLANE "{opts["dataplane"]}": the data planes are auto, '
                          "kernel, ebpf and userspace")
    rest = []
    i = 0
    while i < len(argv):       # --dataplane may come anywhere, as in `tunl tunnel add ... --dataplane kernel`
        if argv[i] in ("--dataplane", "-dataplane") or argv[i].startswith("--dataplane="):
            if "=" in argv[i]:
                v = argv[i].split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--dataplane: say auto, kernel, ebpf or userspace")
                v = argv[i + 1]
                i += 1
            if v not in DATAPLANES:
                raise ConfigError(f'--dataplane "{v}": the data planes are auto, kernel, ebpf '
                                  'and userspace')
            opts["dataplane"] = v
        else:
            rest.append(argv[i])
        i += 1
    argv = rest
    while argv and argv[0].startswith("-"):
        o = argv.pop(0).lstrip("-")
        if o in ("h", "help"):
            sys.stdout.write(usage())
            return 0
        if o in ("V", "version"):
            from .. import __version__
            print(f"tunl {__version__}")
            return 0
        if o and grammar.matches(o, "json"):
            opts["json"] = True
        elif o and (grammar.matches(o, "statistics") or grammar.matches(o, "stats")):
            opts["stats"] = True
        elif o and grammar.matches(o, "pretty"):
            opts["pretty"] = True
        elif o and grammar.matches(o, "details"):
            opts["details"] = True
        else:
            raise ConfigError(f'option "-{o}": unknown; the options are -s, -d, -j, -p, -V and --dataplane')
    if not argv:
        sys.stdout.write(usage())
        return 2
    obj, args = argv[0], argv[1:]
    if grammar.matches(obj, "tunnel") or grammar.matches(obj, "tunl"):
        return do_tunnel(args, opts)
    if grammar.matches(obj, "xfrm"):
        from .xfrm import main as xfrm_main
        return xfrm_main(args, opts)
    if grammar.matches(obj, "mesh"):
        from .mesh import main as mesh_main
        return mesh_main(args, opts)
    if grammar.matches(obj, "lab"):
        from ..lab.cli import main as lab_main
        return lab_main(args)
    if grammar.matches(obj, "daemon"):
        return do_daemon(args, opts)
    if grammar.matches(obj, "doctor"):
        from .doctor import main as doctor_main
        return doctor_main(args, opts)
    if grammar.matches(obj, "help"):
        sys.stdout.write(usage())
        return 0
    raise ConfigError(f'object "{obj}": unknown; try "tunl help"')


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except TunlError as e:
        print(f"tunl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:     # a bug in tunl: one line, and the trace where it is asked for
        if os.environ.get("TUNL_DEBUG"):
            raise
        print(f"tunl: internal error: {e!r} (run with TUNL_DEBUG=1 for the trace)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
