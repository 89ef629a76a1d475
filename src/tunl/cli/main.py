"""tunl [ OPTIONS ] OBJECT { COMMAND | help }

OBJECT := { tunnel | lab | daemon | doctor }
OPTIONS := { -s[tatistics] | -d[etails] | -j[son] | -p[retty] | -V[ersion] |
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
    if os.geteuid() != 0:
        raise TunlError(f"{what}: needs root (tunld owns the namespace's tunnels)")


def _call(op: str, **args):
    from ..planes.tunld import call
    return call(op, **args)


def do_tunnel(argv: list[str], opts: dict) -> int:
    if not argv:
        argv = ["show"]
    verb, words = argv[0], argv[1:]
    if grammar.matches(verb, "help"):
        sys.stdout.write("Usage: tunl tunnel { add | change | del | show | prl | 6rd | capture } "
                         "[ NAME ]\n"
                         + grammar.USAGE.split("\n", 1)[1])
        return 0
    if grammar.matches(verb, "add"):
        spec = grammar.spec_for_add(words)
        _need_root("tunnel add")
        planes.for_new(spec.mode, opts["dataplane"]).add(spec)
        return 0
    if grammar.matches(verb, "change"):
        name = grammar.name_only(words, "change")
        _need_root("tunnel change")
        plane, current = planes.find(name, "change")
        plane.change(grammar.spec_for_change(words, current))
        return 0
    if grammar.matches(verb, "delete"):
        name = grammar.name_only(words, "del")
        _need_root("tunnel del")
        planes.find(name, "delete")[0].delete(name)
        return 0
    if grammar.matches(verb, "show") or grammar.matches(verb, "lst") or grammar.matches(verb, "list"):
        return show_tunnels(grammar.parse_words(words), opts)
    if grammar.matches(verb, "capture"):
        return capture(words)
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
    raise ConfigError(f'"{verb}": unknown command; try "tunl tunnel help"')


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
    """Kernel tunnel devices (tunl's and any other, like `ip tunnel show`), then tunld's."""
    _need_root("tunnel show")
    found = planes.show(f.get("name"))
    found = [t for t in found if all(
        str(t["spec"][k_]) == str(v) for k_, v in f.items() if k_ in ("remote", "local"))
        and ("mode" not in f or f["mode"].value == t["spec"]["mode"])]
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
            out.write(show.stats_lines(t["counters"]) + "\n")
    return 0


def do_daemon(argv: list[str], opts: dict) -> int:
    verb = argv[0] if argv else "status"
    _need_root("daemon")
    if grammar.matches(verb, "status") or grammar.matches(verb, "start"):
        st = _call("status")
        if opts["json"]:
            print(json.dumps(st))
        else:
            print(f"tunld {st['pid']}: {len(st['tunnels'])} tunnel(s) {' '.join(st['tunnels'])}")
        return 0
    if grammar.matches(verb, "stop"):
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
            "  tunl tunnel { add | change | del | show } [ NAME ] ...   like `ip tunnel`\n"
            "  tunl tunnel capture NAME [ TCPDUMP-OPTIONS ]   tcpdump on a tunnel, both ways\n"
            "  tunl lab { up FILE | down FILE | exec NODE -- CMD | demo FILE }\n"
            "  tunl daemon { status | stop }\n"
            "  tunl doctor        which data plane this host gets, and what breaks tunnels here\n")


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
