"""tunl doctor: which data plane this host gets for each mode, what would break tunnels here
(each finding with its fix), and the tunnels present.

    tunl [ -j [ -p ] ] doctor [ --json ]

Every finding is one line: OK, WARN or FAIL, what was found, and the fix. The exit status is
1 when something FAILs, 0 otherwise. The facts come from kernel.probe; this module judges them.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError, TunlError
from ..kernel import probe
from ..kernel.probe import Facts, FwChain, FwRule, FwTable, Link
from ..model import TunnelMode, TunnelSpec
from ..tunnel import gre

USAGE = "Usage: tunl [ -j [ -p ] ] doctor [ --json ]\n"

MODES = ("ipip", "gre", "sit", "isatap", "vti")
MODULE = {"ipip": "ipip", "gre": "ip_gre", "sit": "sit", "isatap": "sit", "vti": "ip_vti"}
RTNL_KIND = {"ipip": "ipip", "ip_gre": "gre", "sit": "sit", "ip_vti": "vti"}
PROTO = {"ipip": 4, "gre": 47, "sit": 41, "isatap": 41}
PROTO_MODE = {4: "ipip", 47: "gre", 41: "sit"}
PROTO_ESP = 50                 # a vti's, on the userspace plane
# outer headers per kernel tunnel kind without options (ip_tunnel_bind_dev(): MTU = underlay −
# these); GRE options of a kernel tunnel are not in sysfs, so its key/csum/seq are not counted
KIND_OVERHEAD = {"ipip": 20, "sit": 20, "vti": 20, "gre": 24}
ETH_DATA_LEN = 1500
CAP_NAMES = {probe.CAP_NET_ADMIN: "CAP_NET_ADMIN", probe.CAP_NET_RAW: "CAP_NET_RAW"}


@dataclass(frozen=True)
class Finding:
    status: str                    # OK | WARN | FAIL
    what: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status:<5} {self.what}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Plane:
    """The data plane `--dataplane auto` gets for one mode, and why."""

    plane: str                     # kernel | ebpf | userspace | unavailable
    module: str
    module_state: str              # loaded | builtin | loadable | absent
    why: str


def _err(code: int) -> str:
    return os.strerror(code)


def _protos(ps: list[int]) -> str:
    """"IP protocol 4 (ipip)" or "IP protocols 4 (ipip), 47 (gre) and 41 (sit)"."""
    named = [f"{p} ({PROTO_MODE[p]})" for p in ps]
    if len(named) == 1:
        return f"IP protocol {named[0]}"
    return f"IP protocols {', '.join(named[:-1])} and {named[-1]}"


# -- the data plane of each mode -----------------------------------------------------------

def module_state(f: Facts, name: str) -> str:
    """What /sys/module and /lib/modules say, or "loaded" when the module's fallback device
    (tunl0, gre0, sit0, ip_vti0: created in every namespace by its init_net) is here."""
    state = f.modules.state(name)
    fallback = any(probe.FALLBACK.get(l.name) == name and l.kind for l in f.links)
    return "loaded" if fallback and state in ("absent", "loadable") else state


def _no_loading(f: Facts) -> str:
    ld = f.loading
    if not ld.supported:
        return "this kernel loads no modules (no /proc/modules)"
    if ld.disabled:
        return "kernel.modules_disabled = 1 forbids loading until reboot"
    return f"the kernel's modprobe helper {ld.modprobe or '(kernel.modprobe is empty)'} is missing"


def _why_not_kernel(f: Facts, mod: str, state: str) -> str:
    where = f"/lib/modules/{f.modules.release}"
    if state == "loadable":
        return f"module {mod} is in {where} but {_no_loading(f)}"
    if not f.loading.supported:
        return f"no {mod} module: not loaded, not built in, and {_no_loading(f)}"
    return f"no {mod} module: not loaded, not built in, " + (
        f"not in {where}/modules.dep" if f.modules.have_dep else f"no {where}")


def kernel_ok(f: Facts, mode: str) -> tuple[bool, str, str]:
    """Whether the kernel data plane serves a mode: (yes?, module state, why)."""
    mod = MODULE[mode]
    state = module_state(f, mod)
    if state == "loaded":
        return True, state, f"module {mod} is loaded"
    if state == "builtin":
        return True, state, f"{mod} is built into the kernel"
    if state == "loadable" and f.loading.works:
        # rtnl_newlink(): an unknown kind makes the kernel request_module("rtnl-link-KIND")
        return True, state, (f"module {mod} is in /lib/modules/{f.modules.release}: the kernel "
                             "loads it on first use "
                             f'(request_module("rtnl-link-{RTNL_KIND[mod]}"))')
    return False, state, _why_not_kernel(f, mod, state)


def userspace_problems(f: Facts, proto: int) -> list[str]:
    out = []
    if f.tun_errno:
        out.append(f"/dev/net/tun: {_err(f.tun_errno)}")
    if f.raw_errno.get(proto):
        out.append(f"raw IP protocol {proto} socket: {_err(f.raw_errno[proto])}")
    return out


def plane(f: Facts, mode: str) -> Plane:
    ok, state, why = kernel_ok(f, mode)
    mod = MODULE[mode]
    if ok:
        return Plane("kernel", mod, state, why)
    if mode == "vti":            # ESP is tunld's own work: the eBPF programs have none of it
        problems = userspace_problems(f, PROTO_ESP)
        if problems:
            return Plane("unavailable", mod, state,
                         f"{why}; userspace cannot run: {'; '.join(problems)}")
        return Plane("userspace", mod, state,
                     f"{why}; tunld carries vti itself (ESP): /dev/net/tun and raw IP protocol "
                     f"{PROTO_ESP} sockets work")
    problems = userspace_problems(f, PROTO[mode])
    if problems:
        return Plane("unavailable", mod, state,
                     f"{why}; userspace cannot run: {'; '.join(problems)}")
    no_bpf = ebpf_problems(f)
    if not no_bpf:
        return Plane("ebpf", mod, state, f"{why}; the eBPF programs load and tc can attach "
                     f"them{SLOW_PATH[mode]}")
    no_bpf = "" if no_bpf == ["not probed"] else f"; no eBPF ({'; '.join(no_bpf)})"
    return Plane("userspace", mod, state,
                 f"{why}{no_bpf}; /dev/net/tun and raw IP protocol {PROTO[mode]} sockets work")


# what each mode's eBPF tunnels leave to the userspace slow path (daemon/ebpf.slow_reasons())
SLOW_PATH = {
    "ipip": "",
    "gre": "; oseq, ocsum, iseq and icsum tunnels take tunld's slow path in that direction",
    "sit": "; a sit tunnel without remote (6rd, ::a.b.c.d next hops) takes tunld's slow path",
    "isatap": "; isatap packets take tunld's slow path (PRL and next-hop rules)",
}


def ebpf_problems(f: Facts) -> list[str]:
    """Why tunnels cannot get the eBPF data plane here (empty: they can)."""
    b = f.bpf
    if b is None or b.load_error == "not probed":
        return ["not probed"]
    out = []
    if b.load_error:
        out.append(b.load_error)
    for mod, state in (("cls_bpf", b.cls_bpf), ("sch_ingress", b.clsact)):
        # without /lib/modules a built-in module leaves no trace: only a listing can say "no"
        if (state == "absent" and f.modules.have_dep
                or state == "loadable" and not f.loading.works):
            out.append(f"tc has no {mod} ({'clsact' if mod == 'sch_ingress' else 'bpf'} "
                       f"filters)")
    return out


def planes(f: Facts) -> dict[str, Plane]:
    return {m: plane(f, m) for m in MODES}


def _needs_userspace(f: Facts) -> bool:
    return any(not kernel_ok(f, m)[0] for m in PROTO)


# -- privileges and the userspace data plane's needs ---------------------------------------

def check_root(f: Facts) -> list[Finding]:
    if f.euid != 0:
        return [Finding("FAIL", f"not root (uid {f.euid}): tunl needs root to create tunnels, "
                        "and this report misses what only root can see",
                        "run it as root: sudo tunl doctor")]
    missing = [n for bit, n in CAP_NAMES.items() if f.cap_eff is not None
               and not f.cap_eff >> bit & 1]
    if missing:
        return [Finding("FAIL", f"root without {' and '.join(missing)} (CapEff {f.cap_eff:#x}): "
                        "tunl cannot create tunnels with them dropped",
                        "run tunl with them (a container: docker run --cap-add NET_ADMIN "
                        "--cap-add NET_RAW)")]
    return [Finding("OK", "running as root")]


def check_sysfs(f: Facts) -> list[Finding]:
    if f.proc_devs is None or set(f.proc_devs) == {l.name for l in f.links}:
        return []
    return [Finding("WARN", "/sys/class/net shows other devices than this network namespace has "
                    "(/proc/net/dev): /sys belongs to another namespace (entered with nsenter?), "
                    "so the device facts below may be wrong",
                    "enter the namespace with ip netns exec, which mounts its own /sys")]


def check_tun(f: Facts) -> list[Finding]:
    if not f.tun_errno:
        return [Finding("OK", "/dev/net/tun opens: the userspace data plane can create its TUN "
                        "devices")]
    status = "FAIL" if _needs_userspace(f) else "WARN"
    if f.tun_errno == errno.ENOENT:
        return [Finding(status, "/dev/net/tun is missing: userspace tunnels cannot be created",
                        "mkdir -p /dev/net && mknod /dev/net/tun c 10 200 (in a container: "
                        "docker run --device /dev/net/tun)")]
    if f.tun_errno in (errno.EACCES, errno.EPERM):
        return [Finding(status, f"/dev/net/tun cannot be opened ({_err(f.tun_errno)}): userspace "
                        "tunnels cannot be created", "run tunl as root; a container needs the "
                        "device allowed: docker run --device /dev/net/tun")]
    if f.tun_errno in (errno.ENODEV, errno.ENXIO):
        return [Finding(status, f"/dev/net/tun cannot be opened ({_err(f.tun_errno)}): the kernel "
                        "has no TUN driver", "modprobe tun, or a kernel built with CONFIG_TUN")]
    return [Finding(status, f"/dev/net/tun cannot be opened ({_err(f.tun_errno)}): userspace "
                    "tunnels cannot be created")]


def check_ebpf(f: Facts) -> list[Finding]:
    b = f.bpf
    if b is None or b.load_error == "not probed":
        return []
    problems = ebpf_problems(f)
    out = []
    if not problems:
        out.append(Finding("OK", "eBPF: the programs load (bpf(2), privileges, verifier, "
                           "helpers) and tc has clsact and bpf filters: tunnels without a "
                           "kernel module get the eBPF data plane"))
    elif b.load_error and b.load_error.startswith("object"):
        out.append(Finding("WARN", f"eBPF: {b.load_error}: tunnels take the userspace data "
                           "plane", "run ./dev setup (clang -target bpf builds tunl.bpf.o)"))
    elif b.load_error and b.load_error.startswith("libbpf"):
        out.append(Finding("WARN", f"eBPF: {b.load_error}: tunnels take the userspace data "
                           "plane", "apt install libbpf1"))
    elif b.load_error and "errno 1)" in b.load_error:
        out.append(Finding("WARN", "eBPF: the kernel refused to load the programs (EPERM): "
                           "tunnels take the userspace data plane",
                           "run tunl as root with CAP_BPF and CAP_NET_ADMIN (or "
                           "CAP_SYS_ADMIN); a container: --cap-add BPF --cap-add NET_ADMIN"))
    else:
        out.append(Finding("WARN", f"eBPF: {'; '.join(problems)}: tunnels take the userspace "
                           "data plane", "a kernel with CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF "
                           "and CONFIG_NET_SCH_INGRESS"))
    if not b.btf:
        out.append(Finding("WARN", "eBPF: no kernel BTF (/sys/kernel/btf/vmlinux): tunl cannot "
                           "tell which BPF flags this kernel has, so received IPv6-in-IPv4 "
                           "takes the slow path", "a kernel with CONFIG_DEBUG_INFO_BTF"))
    elif not b.decap_l3 and not problems:
        out.append(Finding("OK", "eBPF: this kernel has no BPF_F_ADJ_ROOM_DECAP_L3_* (Linux "
                           "6.3): received IPv6 inside IPv4 (sit, gre) takes the slow path"))
    return out


def check_raw(f: Facts) -> list[Finding]:
    bad = [p for p in PROTO_MODE if f.raw_errno.get(p)]
    if not bad:
        return [Finding("OK", f"raw sockets for {_protos(list(PROTO_MODE))} open: the userspace "
                        "data plane can send and receive")]
    why = _err(f.raw_errno[bad[0]])
    status = "FAIL" if _needs_userspace(f) else "WARN"
    return [Finding(status, f"raw sockets for {_protos(bad)} cannot be opened ({why}): userspace "
                    "tunnels of those modes cannot send or receive",
                    "run tunl as root with CAP_NET_RAW")]


# -- sysctls -------------------------------------------------------------------------------

def check_ip_forward(f: Facts) -> list[Finding]:
    if f.ip_forward is None:
        return []
    if f.ip_forward:
        return [Finding("OK", f"net.ipv4.ip_forward = {f.ip_forward}: containers and bridges "
                        "behind this host can reach the tunnel")]
    # ip_route_input_slow(): a packet for another host on a device without forwarding is
    # dropped (-EHOSTUNREACH); it is what a container's packet to the tunnel is
    bridges = [l.name for l in f.links if l.bridge]
    here = f"; it matters here: bridge {', '.join(bridges)} is on this host" if bridges else ""
    return [Finding("WARN", "net.ipv4.ip_forward = 0: containers and bridges behind this host "
                    "cannot reach the tunnel (the kernel forwards nothing; this host's own "
                    f"traffic is not affected){here}", "sysctl -w net.ipv4.ip_forward=1")]


def _rp(f: Facts, key: str) -> int:
    return f.rp_filter.get(key) or 0


def _conf(dev: str) -> str:
    return dev.replace(".", "/")       # sysctl writes a dot in a device name as "/"


def _fallback(l: Link) -> bool:
    """A module's own fallback device (tunl0, gre0, …), not one tunl set up."""
    return l.name in probe.FALLBACK and l.kind is not None and l.spec is None


def tunnels(f: Facts) -> list[Link]:
    """Kernel tunnel devices and tunl's userspace tunnels, fallback devices left out unless up."""
    return [l for l in f.links if l.tunl or l.kind and (l.up or not _fallback(l))]


def check_rp_default(f: Facts) -> list[Finding]:
    a, d = _rp(f, "all"), _rp(f, "default")
    what = f"net.ipv4.conf.all.rp_filter = {a}, net.ipv4.conf.default.rp_filter = {d}"
    if max(a, d) != 1:
        return [Finding("OK", f"{what}: tunnel devices created from now on are not strict")]
    return [Finding("WARN", f"{what}: tunnel devices created from now on are strict (the "
                    "effective value is the larger of all and the device's): fib_validate_source()"
                    " drops a packet they receive unless the route back to its source leaves by "
                    "the same device", "sysctl -w net.ipv4.conf.default.rp_filter=2 (loose)")]


def check_rp_tunnel(f: Facts, t: Link) -> list[Finding]:
    a, v = _rp(f, "all"), _rp(f, t.name)
    eff = max(a, v)                                  # IN_DEV_RPFILTER(): IN_DEV_MAXCONF()
    if eff != 1:
        return [Finding("OK", f"rp_filter on {t.name} is {eff} ({'loose' if eff else 'off'}): "
                        "packets it receives are not dropped for their source")]
    what = (f"rp_filter on {t.name} is 1 (strict: the larger of net.ipv4.conf.all.rp_filter = "
            f"{a} and net.ipv4.conf.{_conf(t.name)}.rp_filter = {v})")
    fix = f"sysctl -w net.ipv4.conf.{_conf(t.name)}.rp_filter=2 (loose)"
    back = [str(r.dst) for r in f.routes if r.dev == t.name]
    if not back:
        return [Finding("FAIL", f"{what} and no route leads back out {t.name}: "
                        f"fib_validate_source() drops every packet {t.name} receives",
                        f"{fix}, or route the far side's networks through {t.name}")]
    return [Finding("WARN", f"{what}: fib_validate_source() drops a packet {t.name} receives "
                    f"unless its source is in {', '.join(back)}", fix)]


def check_rp_underlay(f: Facts, dev: str) -> list[Finding]:
    eff = max(_rp(f, "all"), _rp(f, dev))
    if eff == 1:
        return [Finding("OK", f"rp_filter on {dev} (underlay) is 1 (strict): outer packets pass, "
                        f"as the route back to each remote leaves by {dev}")]
    return [Finding("OK", f"rp_filter on {dev} (underlay) is {eff} ({'loose' if eff else 'off'})")]


# -- underlay and MTU ----------------------------------------------------------------------

def underlays(f: Facts) -> dict[str, list[str]]:
    """Each underlay device and why it is one: the default route, the route to a remote."""
    out: dict[str, list[str]] = {}
    d = probe.default_route(f.routes)
    if d is not None:
        out.setdefault(d.dev, []).append("default route")
    for t in tunnels(f):
        if t.spec and t.spec.get("dev"):
            out.setdefault(t.spec["dev"], []).append(f"dev of {t.name}")
        for dst in probe.outer_destinations(t, f.routes):
            dev = f.route_dev.get(dst)
            if dev and dev != t.name:
                out.setdefault(dev, []).append(f"route to {dst} of {t.name}")
    return out


def _link(f: Facts, name: str) -> Link | None:
    return next((l for l in f.links if l.name == name), None)


def _mtus(m: int) -> str:
    return f"ipip {m - 20}, gre {m - 24}, sit {m - 20}"


def check_underlay(f: Facts, dev: str, why: list[str]) -> list[Finding]:
    l = _link(f, dev)
    if l is None:
        return []
    what = f"underlay {dev} ({', '.join(why)}) has MTU {l.mtu}"
    if l.mtu >= ETH_DATA_LEN:
        return [Finding("OK", f"{what}: tunnels over it get MTU {_mtus(l.mtu)}")]
    return [Finding("WARN", f"{what}, below {ETH_DATA_LEN}: tunnels over it shrink to MTU "
                    f"{_mtus(l.mtu)}", "keep what enters the tunnels within that (containers "
                    f"behind them too), or raise {dev}'s MTU where its network carries "
                    f"{ETH_DATA_LEN}: ip link set {dev} mtu {ETH_DATA_LEN}")]


def overhead(t: Link) -> int | None:
    """Outer header bytes of a tunnel: tunl's from its spec (GRE options count), a kernel
    tunnel's from its kind."""
    if t.spec is None:
        return KIND_OVERHEAD.get(t.kind or "")
    known = {x.name for x in fields(TunnelSpec)}     # a kernel tunnel's alias adds "dataplane"
    try:
        spec = TunnelSpec.from_dict({k: v for k, v in t.spec.items() if k in known})
    except (TunlError, ValueError, TypeError, KeyError):
        return None
    return gre.overhead(spec) if spec.mode is TunnelMode.GRE else spec.mode.overhead


def check_tunnel_path(f: Facts, t: Link) -> list[Finding]:
    out = []
    for dst in probe.outer_destinations(t, f.routes):
        dev = f.route_dev.get(dst)
        if dev is None:
            out.append(Finding("FAIL", f"{t.name}: no route to {dst}: its outer packets cannot "
                               "leave", f"ip route add {dst} via GATEWAY (a route to the remote)"))
        elif dev == t.name:
            # ip_tunnel_xmit(): rt->dst.dev == dev is dropped and counted as a collision
            out.append(Finding("FAIL", f"{t.name}: the route to {dst} leads into {t.name} "
                               "itself: the kernel drops such packets as a routing loop",
                               f"ip route add {dst}/32 via GATEWAY dev UNDERLAY"))
        else:
            out += _check_tunnel_mtu(f, t, dev)
    return out


def _check_tunnel_mtu(f: Facts, t: Link, dev: str) -> list[Finding]:
    under, oh = _link(f, dev), overhead(t)
    if under is None or oh is None or t.mtu <= under.mtu - oh:
        return []
    fit = under.mtu - oh
    return [Finding("FAIL", f"{t.name} has MTU {t.mtu}, more than {dev} (MTU {under.mtu}) "
                    f"carries for {t.mode} ({fit}): bigger packets are fragmented, or dropped "
                    "when they have DF", f"ip link set {t.name} mtu {fit}")]


# -- firewall ------------------------------------------------------------------------------

def _applies(r: FwRule, p: int) -> str | None:
    """Whether a rule matches an IPv4 packet of protocol p: "always", "maybe" (it has other
    conditions) or None."""
    if r.protos is not None and (p in r.protos) == r.negate:
        return None
    return "maybe" if r.other else "always"


def fate(table: FwTable, chain: FwChain, p: int, depth: int = 0) -> tuple[str, FwRule] | None:
    """The rule that decides protocol p in a chain, as ("accept" | "drop", rule); None when the
    packet runs off the end (the policy decides). A drop that names the protocol counts even
    under other conditions ("may drop"); an accept counts only when nothing else is asked."""
    for r in chain.rules if depth < 16 else ():
        m = _applies(r, p)
        if m is None:
            continue
        if r.verdict == "accept" and m == "always":
            return "accept", r
        if r.verdict in ("drop", "reject") and (m == "always" or r.protos is not None):
            return "drop", r
        if r.verdict in ("jump", "goto") and r.target in table.chains:
            sub = fate(table, table.chains[r.target], p, depth + 1)
            if sub is not None or r.verdict == "goto":    # the end of a goto is the caller's end
                return sub
        if r.verdict == "return" and m == "always":
            return None
    return None


def _partial_accepts(table: FwTable, p: int) -> list[str]:
    return [r.text for c in table.chains.values() for r in c.rules
            if r.verdict == "accept" and r.protos and p in r.protos and not r.negate and r.other]


def _accept_fix(table: FwTable, chain: FwChain, ps: list[int]) -> str:
    if table.tool == "nft":
        v = str(ps[0]) if len(ps) == 1 else "{ " + ", ".join(map(str, ps)) + " }"
        return f"nft insert rule {table.family} {table.name} {chain.name} ip protocol {v} accept"
    return " && ".join(f"iptables -I {chain.name} -p {p} -j ACCEPT" for p in ps)


def _chain_findings(f: Facts, table: FwTable, chain: FwChain) -> list[Finding]:
    verdicts: dict[tuple, list[int]] = {}
    for p in PROTO_MODE:
        v = fate(table, chain, p)
        if v is None and chain.policy == "drop":
            verdicts.setdefault(("policy", None), []).append(p)
        elif v is not None and v[0] == "drop":
            verdicts.setdefault(("rule", v[1]), []).append(p)
    where = (f"{table.family} {table.name} {chain.name}" if table.tool == "nft" else
             f"{chain.name} of the {table.name} table")
    forwarded = " forwarded to tunnel hosts behind this one" if chain.hook == "forward" else ""
    out = []
    for (how, rule), ps in verdicts.items():
        if how == "rule":
            what = f"rule `{rule.text}`"
        else:
            partial = sorted({t for p in ps for t in _partial_accepts(table, p)})
            what = "policy drop and " + (f"only `{'`, `'.join(partial)}` accepts them" if partial
                                         else "no rule that accepts them")
        used = {PROTO.get(t.mode or "") for t in tunnels(f)}
        named = how == "rule" and rule.protos is not None and not rule.negate and not rule.other
        sure = named and chain.hook == "input" and used & set(ps)   # a tunnel here is cut off
        out.append(Finding("FAIL" if sure else "WARN",
                           f"{table.tool} may drop {_protos(ps)}{forwarded}: chain {where} has "
                           f"{what}", _accept_fix(table, chain, ps)))
    return out


MEMBERS_TABLE = "tunl_members"      # kernel.nft.MEMBERS: the mesh agent's, judged by check_members


def check_members(f: Facts, t: Link) -> list[Finding]:
    """A tunnel without remote (the overlay's one-to-many device) decapsulates what any host
    sends it, unless only the overlay's nodes may send (tunld's member set, or the mesh
    agent's nftables table on the kernel data plane)."""
    proto = PROTO.get(t.mode or "")
    if t.remote or not t.up or proto is None:
        return []
    what = f"{t.name} ({PROTO_MODE[proto]}, no remote)"
    if t.tunl:
        if t.name not in f.members:
            return []                    # tunld did not answer: check_tunnel_state says so
        n = f.members[t.name]
        if n is not None:
            return [Finding("OK", f"{what} takes encapsulated packets only from the overlay's "
                                  f"{n} nodes (tunld drops the rest as not_member)")]
        return [Finding("WARN", f"{what} takes encapsulated packets from any host: one outside "
                        "the overlay can send into it",
                        "run `tunl mesh agent` (it hands tunld the overlay's nodes)")]
    guarded = any(tb.tool == "nft" and tb.name == MEMBERS_TABLE and any(
        r.protos and proto in r.protos and r.verdict == "drop"
        for c in tb.chains.values() for r in c.rules) for fw in f.firewalls for tb in fw.tables)
    if guarded:
        return [Finding("OK", f"{what} takes encapsulated packets only from the overlay's nodes "
                              f"(nftables table ip {MEMBERS_TABLE})")]
    nft = any(fw.tool == "nft" and fw.installed for fw in f.firewalls)
    return [Finding("WARN", f"{what} is the kernel's device: it decapsulates protocol {proto} "
                    "from any host, so one outside the overlay can send into it",
                    ("run `tunl mesh agent` (it keeps nftables table ip tunl_members with the "
                     f"overlay's nodes), or drop protocol {proto} from other sources") if nft
                    else "apt install nftables, then run `tunl mesh agent`: it keeps only the "
                         "overlay's nodes")]


def check_firewall(f: Facts) -> list[Finding]:
    if not any(fw.installed for fw in f.firewalls):
        return [Finding("OK", "firewall not inspected: neither nft nor iptables-save is installed")]
    out = []
    for fw in f.firewalls:
        if not fw.installed or fw.via_nft:
            continue
        if fw.error:
            out.append(Finding("WARN", f"{fw.tool} could not list the ruleset ({fw.error}): the "
                               "firewall was not inspected",
                               "run tunl doctor as root" if f.euid else None))
            continue
        found = [x for t in fw.tables for c in t.chains.values()
                 if c.hook in ("input", "forward") and t.family in ("ip", "inet")
                 and not (t.tool == "nft" and t.name == MEMBERS_TABLE)
                 for x in _chain_findings(f, t, c)]
        out += found or [Finding("OK", f"{fw.tool}: no input or forward chain drops "
                                       f"{_protos(list(PROTO_MODE))}")]
    return out


# -- the tunnels ---------------------------------------------------------------------------

def check_tunnel_state(t: Link) -> list[Finding]:
    if not t.up:
        return [Finding("WARN", f"{t.name} is down: it carries nothing",
                        f"ip link set {t.name} up")]
    if t.tunl and t.carrier is False:
        return [Finding("WARN", f"{t.name} is up but no tunld holds it (no carrier): packets "
                        "routed into it are dropped", "tunl daemon start")]
    return []


def tunnel_json(f: Facts, t: Link) -> dict:
    dsts = probe.outer_destinations(t, f.routes)
    return {"name": t.name, "mode": t.mode, "dataplane": _dataplane(t),
            "mtu": t.mtu, "up": t.up, "remote": t.remote, "local": t.local,
            "underlay": sorted({f.route_dev[d] for d in dsts if f.route_dev.get(d)}),
            "fallback": _fallback(t),
            "tunld": (t.carrier is True) if t.tunl and t.up else None}


def _dataplane(t: Link) -> str:
    if not t.tunl:
        return "kernel"
    from ..bpf.programs import Programs
    try:
        return "ebpf" if Programs.attached(t.index, ingress=False) else "userspace"
    except OSError:
        return "userspace"


def tunnel_line(j: dict, width: int = 0) -> str:
    parts = [f"{j['name']:<{width}}", f"{j['mode'] or '?':<6}", f"{j['dataplane']:<9}",
             f"mtu {j['mtu']:<5}", f"{'up' if j['up'] else 'down':<4}",
             f"remote {j['remote'] or 'any'} local {j['local'] or 'any'}"]
    if j["underlay"]:
        parts.append(f"over {', '.join(j['underlay'])}")
    if j["fallback"]:
        parts.append("fallback device")
    if j["tunld"] is not None:
        parts.append("tunld attached" if j["tunld"] else "no tunld")
    return "  " + "  ".join(parts)


# -- the report ----------------------------------------------------------------------------

def findings(f: Facts) -> list[Finding]:
    ts = tunnels(f)
    out = check_root(f) + check_sysfs(f) + check_tun(f) + check_raw(f) + check_ebpf(f)
    out += check_ip_forward(f)
    out += check_rp_default(f)
    for t in ts:
        out += check_rp_tunnel(f, t)
    unders = underlays(f)
    for dev in unders:
        out += check_rp_underlay(f, dev)
    for dev, why in unders.items():
        out += check_underlay(f, dev, why)
    if not unders:
        out.append(Finding("OK", "no default route and no tunnel remote: no underlay MTU to check"))
    for t in ts:
        out += check_tunnel_path(f, t) + check_tunnel_state(t) + check_members(f, t)
    return out + check_firewall(f)


def report(f: Facts) -> dict:
    return {"dataplane": {m: asdict(p) for m, p in planes(f).items()},
            "findings": [asdict(x) for x in findings(f)],
            "tunnels": [tunnel_json(f, t) for t in tunnels(f)]}


def text(f: Facts, r: dict) -> str:
    lines = [f"data plane for each mode (kernel {f.release}):"]
    lines += [f"  {m:<7} {p['plane']:<12} {p['why']}" for m, p in r["dataplane"].items()]
    lines.append("findings:")
    lines += [Finding(**x).line() for x in r["findings"]]
    lines.append("tunnels:" if r["tunnels"] else "tunnels: none")
    width = max((len(t["name"]) for t in r["tunnels"]), default=0)
    lines += [tunnel_line(t, width) for t in r["tunnels"]]
    return "\n".join(lines) + "\n"


def _tunld_members() -> dict[str, int | None]:
    """What tunld says of its tunnels' member sets; nothing when no tunld answers."""
    from ..planes.tunld import TunldPlane
    try:
        return {t["spec"]["name"]: t.get("members") for t in TunldPlane("auto").show()}
    except TunlError:
        return {}


def exit_status(r: dict) -> int:
    return 1 if any(x["status"] == "FAIL" for x in r["findings"]) else 0


def main(argv: list[str], opts: dict, readers: probe.Readers | None = None) -> int:
    as_json = opts.get("json", False)
    for a in argv:
        if a in ("help", "-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if a not in ("--json", "-j", "-json"):
            raise ConfigError(f'doctor "{a}": unknown argument; tunl doctor takes only --json')
        as_json = True
    f = probe.gather(readers or probe.live())
    if readers is None:
        f.members.update(_tunld_members())
    r = report(f)
    if as_json:
        json.dump(r, sys.stdout, indent=2 if opts.get("pretty") else None)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text(f, r))
    return exit_status(r)
