"""What this host offers tunnels: the facts `tunl doctor` judges.

Everything is read from files under a root (/proc, /sys, /lib/modules, /dev/net/tun) or from
injected readers (`Readers`), so that unit tests run on a fake tree in a temporary directory.
Only the live readers touch the system beyond files: they open /dev/net/tun and raw sockets,
run `nft` and `iptables-save`, and ask rtnetlink (pyroute2) for routes and link kinds.

Nothing here judges: a fact is what was found, and doctor says what it means.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..model import alias_record

# ARPHRD_* of include/uapi/linux/if_arp.h: what /sys/class/net/X/type says about a tunnel.
# vti devices are ARPHRD_TUNNEL too; only netlink's IFLA_INFO_KIND tells them from ipip.
ARPHRD_KIND = {768: "ipip", 769: "ip6tnl", 776: "sit", 778: "gre", 823: "ip6gre"}
TUNNEL_KINDS = {"ipip", "gre", "gretap", "erspan", "sit", "vti", "ip6tnl", "ip6gre",
                "ip6gretap", "ip6erspan", "vti6"}
IFF_UP = 0x1

# The fallback device each module creates in every network namespace (ipip_init_net(),
# ipgre_init_net(), sit_init_net(), vti_init_net()): its presence proves the module is in.
FALLBACK = {"tunl0": "ipip", "gre0": "ip_gre", "sit0": "sit", "ip_vti0": "ip_vti"}

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


# -- readers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A finished command: exit status, standard output and standard error."""

    rc: int
    out: str
    err: str


def _run(argv: list[str]) -> Run | None:
    """Run a command; None when it is not installed."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return Run(124, "", f"{argv[0]}: timed out after 10 s")
    except OSError as e:
        return Run(126, "", f"{argv[0]}: {e.strerror}")
    return Run(p.returncode, p.stdout, p.stderr)


def _open_close(path: str) -> None:
    """Open a character device read-write and close it (raises OSError)."""
    os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))


def _raw_open_close(proto: int) -> None:
    """Open and close socket(AF_INET, SOCK_RAW, proto): needs CAP_NET_RAW (raises OSError)."""
    socket.socket(socket.AF_INET, socket.SOCK_RAW, proto).close()


def netlink_route_dev(dst: str) -> str | None:
    """The device of the kernel's route to dst (`ip route get`), None when there is none."""
    from .netlink import Kernel
    from ..errors import NotFoundError
    k = Kernel()
    try:
        return k.route_get(dst)[0]
    except NotFoundError:
        return None
    finally:
        k.close()


def netlink_kinds() -> dict[str, str]:
    """IFLA_INFO_KIND of every link by name (`ip -d link`): tells vti from ipip."""
    from .netlink import Kernel
    k = Kernel()
    try:
        return {l.name: l.kind for l in k.links() if l.kind}
    finally:
        k.close()


@dataclass(frozen=True)
class Readers:
    """Where the facts come from. The defaults read this host; tests pass a fake tree.

    route_dev: None looks routes up in <root>/proc/net/route (longest prefix, main table);
    link_kinds: None takes tunnel kinds from the ARPHRD type alone."""

    root: Path = Path("/")
    euid: Callable[[], int] = os.geteuid
    open_tun: Callable[[str], None] = _open_close
    raw_socket: Callable[[int], None] = _raw_open_close
    run: Callable[[list[str]], Run | None] = _run
    route_dev: Callable[[str], str | None] | None = None
    link_kinds: Callable[[], dict[str, str]] | None = None
    bpf_load: Callable[[], str | None] | None = None


def live() -> Readers:
    return Readers(route_dev=netlink_route_dev, link_kinds=netlink_kinds, bpf_load=bpf_load)


def bpf_load() -> str | None:
    """Load the eBPF data plane's programs into this kernel and unload them: None when the
    kernel takes them (BPF syscall, privileges, verifier, helpers), else why not."""
    from ..bpf import programs
    from ..bpf.libbpf import LibbpfMissing
    p = programs.Programs()
    try:
        p.load()
    except FileNotFoundError:
        return f"object: {programs.OBJECT} is not built"
    except LibbpfMissing as e:
        return f"libbpf: {e}"
    except OSError as e:
        return f"load: {e.strerror or e} (errno {e.errno})"
    finally:
        p.close()
    return None


@dataclass(frozen=True)
class Bpf:
    """What the eBPF data plane needs of this host."""

    load_error: str | None              # None: the programs load; "not probed" in tests
    btf: bool                           # /sys/kernel/btf/vmlinux: the kernel's flags can be read
    decap_l3: bool                      # bpf_skb_adjust_room() knows BPF_F_ADJ_ROOM_DECAP_L3_*
    cls_bpf: str                        # module states of cls_bpf and sch_ingress (clsact)
    clsact: str


def read(root: Path, rel: str) -> str | None:
    """A file under root, stripped; None when it cannot be read (missing, EINVAL, EACCES)."""
    try:
        return (root / rel).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_int(root: Path, rel: str) -> int | None:
    v = read(root, rel)
    try:
        return None if v is None else int(v, 16) if v.startswith("0x") else int(v)
    except ValueError:
        return None


# -- kernel modules ------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleLoading:
    """Whether this kernel loads modules at all."""

    supported: bool          # CONFIG_MODULES: /proc/modules exists
    disabled: bool           # kernel.modules_disabled = 1 (one way, until reboot)
    modprobe: str | None     # kernel.modprobe: the helper request_module() runs ("" = none)
    modprobe_present: bool

    @property
    def works(self) -> bool:
        return self.supported and not self.disabled and self.modprobe_present


def module_loading(root: Path) -> ModuleLoading:
    helper = read(root, "proc/sys/kernel/modprobe")
    present = bool(helper) and (root / helper.lstrip("/")).exists()
    return ModuleLoading(supported=(root / "proc/modules").exists(),
                         disabled=read(root, "proc/sys/kernel/modules_disabled") == "1",
                         modprobe=helper, modprobe_present=present)


def _module_names(text: str | None, dep: bool) -> set[str]:
    """Module names in modules.dep ("kernel/net/ipv4/ipip.ko.xz: deps") or modules.builtin."""
    names = set()
    for line in (text or "").splitlines():
        path = line.split(":", 1)[0].strip() if dep else line.strip()
        base = path.rsplit("/", 1)[-1]
        for suffix in MODULE_SUFFIXES:
            if base.endswith(suffix):
                names.add(base[:-len(suffix)].replace("-", "_"))
                break
    return names


@dataclass(frozen=True)
class Modules:
    """What /sys/module and /lib/modules/<release> say about every module."""

    release: str
    loaded: frozenset[str]        # /sys/module/NAME/initstate: a loaded module
    builtin: frozenset[str]       # modules.builtin, or /sys/module/NAME without initstate
    loadable: frozenset[str]      # modules.dep
    have_dep: bool                # modules.dep was there to read

    def state(self, name: str) -> str:
        """loaded | builtin | loadable | absent"""
        for state in ("loaded", "builtin", "loadable"):
            if name in getattr(self, state):
                return state
        return "absent"


def modules(root: Path, release: str) -> Modules:
    loaded, builtin = set(), set()
    try:
        entries = list((root / "sys/module").iterdir())
    except OSError:
        entries = []
    for d in entries:
        (loaded if (d / "initstate").exists() else builtin).add(d.name)
    base = f"lib/modules/{release}"
    dep = read(root, f"{base}/modules.dep")
    builtin |= _module_names(read(root, f"{base}/modules.builtin"), dep=False)
    return Modules(release, frozenset(loaded), frozenset(builtin),
                   frozenset(_module_names(dep, dep=True)), dep is not None)


def kernel_release(root: Path) -> str:
    return read(root, "proc/sys/kernel/osrelease") or os.uname().release


# -- links ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """One network device as /sys/class/net/NAME shows it."""

    name: str
    index: int
    arphrd: int
    mtu: int
    up: bool                       # IFF_UP: `ip link set NAME up`
    carrier: bool | None           # None while down (reading it gives EINVAL)
    kind: str | None               # a kernel tunnel's kind (netlink's, else by ARPHRD), else None
    tun: bool                      # a TUN/TAP device (has tun_flags)
    bridge: bool
    alias: str = ""
    local: str | None = None       # kernel tunnels: dev_addr and broadcast are the endpoints
    remote: str | None = None
    spec: dict | None = None       # tunl's userspace tunnels: the spec in the alias

    @property
    def tunl(self) -> bool:
        """A userspace tunnel of tunl: a TUN device whose alias carries a tunnel spec."""
        return self.tun and self.spec is not None

    @property
    def mode(self) -> str | None:
        return self.spec.get("mode", "ipip") if self.spec is not None else self.kind


def _ipv4_hw(text: str | None) -> str | None:
    """The 4-byte "0a:09:00:02" of a tunnel's address or broadcast; None for 0.0.0.0."""
    parts = (text or "").split(":")
    if len(parts) != 4:
        return None
    try:
        addr = ipaddress.IPv4Address(bytes(int(p, 16) for p in parts))
    except ValueError:
        return None
    return str(addr) if int(addr) else None


def link(root: Path, name: str, kinds: dict[str, str]) -> Link | None:
    d = f"sys/class/net/{name}"
    index, arphrd = read_int(root, f"{d}/ifindex"), read_int(root, f"{d}/type")
    if index is None or arphrd is None:
        return None
    tunnel = arphrd in ARPHRD_KIND
    kind = kinds.get(name) if kinds.get(name) in TUNNEL_KINDS else ARPHRD_KIND.get(arphrd)
    alias = read(root, f"{d}/ifalias") or ""
    carrier = read_int(root, f"{d}/carrier")
    spec = alias_record(alias)
    # a kernel tunnel's dev_addr and broadcast are its local and remote (ipip_tunnel_init(),
    # ipgre_tunnel_init(), ipip6_tunnel_init()); tunl's userspace tunnel keeps them in its spec
    local, remote = ((_ipv4_hw(read(root, f"{d}/address")), _ipv4_hw(read(root, f"{d}/broadcast")))
                     if tunnel else ((spec or {}).get("local"), (spec or {}).get("remote")))
    return Link(name=name, index=index, arphrd=arphrd, mtu=read_int(root, f"{d}/mtu") or 0,
                up=bool((read_int(root, f"{d}/flags") or 0) & IFF_UP),
                carrier=None if carrier is None else bool(carrier), kind=kind,
                tun=(root / d / "tun_flags").exists(), bridge=(root / d / "bridge").is_dir(),
                alias=alias, local=local, remote=remote, spec=spec)


def proc_net_dev(root: Path) -> list[str] | None:
    """The devices of this process's network namespace (/proc/net is /proc/self/net, always
    the caller's namespace; /sys is the namespace of whoever mounted it)."""
    text = read(root, "proc/net/dev")
    if text is None:
        return None
    return sorted(l.split(":", 1)[0].strip() for l in text.splitlines()[2:] if ":" in l)


def links(root: Path, kinds: dict[str, str] | None = None) -> list[Link]:
    try:
        names = sorted(p.name for p in (root / "sys/class/net").iterdir())
    except OSError:
        return []
    found = (link(root, n, kinds or {}) for n in names)
    return sorted((l for l in found if l is not None), key=lambda l: l.index)


# -- routes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route4:
    """One IPv4 route of the main table, from /proc/net/route."""

    dev: str
    dst: ipaddress.IPv4Network
    gateway: str | None
    metric: int


def _hex_ipv4(h: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(struct.pack("<I", int(h, 16)))   # host order: little-endian


def routes(root: Path) -> list[Route4]:
    out = []
    for line in (read(root, "proc/net/route") or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 8 or not int(f[3], 16) & 0x1:          # RTF_UP
            continue
        gw = _hex_ipv4(f[2])
        dst = ipaddress.IPv4Network(f"{_hex_ipv4(f[1])}/{_hex_ipv4(f[7])}", strict=False)
        out.append(Route4(f[0], dst, str(gw) if int(gw) else None, int(f[6])))
    return out


def default_route(rts: list[Route4]) -> Route4 | None:
    defaults = [r for r in rts if r.dst.prefixlen == 0]
    return min(defaults, key=lambda r: r.metric) if defaults else None


def lookup(rts: list[Route4], dst: str) -> str | None:
    """The device of the longest matching prefix (then the lowest metric), like fib_lookup()
    in the main table without rules."""
    a = ipaddress.IPv4Address(dst)
    hits = [r for r in rts if a in r.dst]
    return min(hits, key=lambda r: (-r.dst.prefixlen, r.metric)).dev if hits else None


# -- firewall ------------------------------------------------------------------------------

# protocol numbers by the names nft and iptables print (/etc/protocols)
PROTO_NAMES = {"ipencap": 4, "ip-encap": 4, "ipip": 4, "gre": 47, "ipv6": 41, "tcp": 6,
               "udp": 17, "icmp": 1, "esp": 50, "ah": 51, "sctp": 132, "udplite": 136,
               "dccp": 33, "comp": 108, "icmpv6": 58, "ipv6-icmp": 58, "igmp": 2}
# nft payload headers that only IPv4 packets of one protocol carry (the rule implies it)
L4_HEADERS = {"tcp": {6}, "udp": {17}, "udplite": {136}, "sctp": {132}, "dccp": {33},
              "icmp": {1}, "ah": {51}, "esp": {50}, "comp": {108}, "gre": {47},
              "th": {6, 17, 136, 132, 33}, "ip6": set(), "icmpv6": set()}
NON_CONDITIONS = {"counter", "log", "comment", "notrack", "nftrace"}
VERDICTS = ("accept", "drop", "reject", "return", "jump", "goto")


@dataclass(frozen=True)
class FwRule:
    """A rule reduced to what decides the fate of an IPv4 packet of protocol 4, 47 or 41.

    protos: the protocols its protocol test lets through (negate: all but those); None when
    it has no protocol test. other: it has conditions besides the protocol (addresses,
    interfaces, conntrack state …), so it may not apply to a given tunnel packet."""

    text: str
    protos: frozenset[int] | None
    negate: bool
    other: bool
    verdict: str | None            # accept | drop | reject | return | jump | goto | None
    target: str | None = None      # the chain of jump and goto


@dataclass(frozen=True)
class FwChain:
    name: str
    hook: str | None               # input | forward | … for a base chain, None for a regular one
    policy: str                    # accept | drop
    rules: tuple[FwRule, ...]


@dataclass(frozen=True)
class FwTable:
    tool: str                      # nft | iptables
    family: str                    # ip | inet | …
    name: str
    chains: dict[str, FwChain]


@dataclass(frozen=True)
class Firewall:
    """What one tool showed: its tables, or why it showed none."""

    tool: str
    tables: list[FwTable] = field(default_factory=list)
    error: str | None = None       # the tool failed: its first line of stderr
    installed: bool = True
    via_nft: bool = False          # iptables-nft: its rules are in nft's ruleset


def _proto_number(v) -> int | None:
    if isinstance(v, int):
        return v
    s = str(v).lower()
    return int(s) if s.isdigit() else PROTO_NAMES.get(s, -1)


def _nft_values(right) -> set[int] | None:
    """The protocol numbers of a match's right side, None when not understood (a named set)."""
    items = right.get("set") if isinstance(right, dict) else right
    if not isinstance(items, list):
        items = [items]
    out: set[int] = set()
    for v in items:
        if isinstance(v, dict) and "range" in v:
            lo, hi = (_proto_number(x) for x in v["range"])
            out |= set(range(lo, hi + 1))
        elif isinstance(v, (int, str)) and not str(v).startswith("@"):
            out.add(_proto_number(v))
        else:
            return None
    return out


def _nft_rule(expr: list, text: str) -> FwRule:
    protos, negate, other, verdict, target = None, False, False, None, None
    for e in expr:
        key, val = next(iter(e.items())) if isinstance(e, dict) and len(e) == 1 else ("?", None)
        if key in VERDICTS:
            verdict = key
            target = val.get("target") if isinstance(val, dict) else None
        elif key in NON_CONDITIONS:
            continue
        elif key != "match":
            other = True
            continue
        else:
            left, op, right = val.get("left", {}), val.get("op"), val.get("right")
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            meta = left.get("meta", {}) if isinstance(left, dict) else {}
            proto_test = (payload.get("protocol") == "ip" and payload.get("field") == "protocol"
                          or meta.get("key") == "l4proto")
            values = _nft_values(right) if proto_test and op in ("==", "in", "!=") else None
            if values is not None:
                protos, negate = frozenset(values), op == "!="
            elif payload.get("protocol") in L4_HEADERS:     # tcp dport 22: only TCP matches
                before = set(range(256)) if protos is None else protos
                protos = frozenset(L4_HEADERS[payload["protocol"]] & before)
            elif meta.get("key") == "nfproto":       # inet tables: tunnel outers are IPv4
                if (right == "ipv4") == (op == "!="):
                    protos = frozenset()
            else:
                other = True
    return FwRule(text, protos, negate, other, verdict, target)


def _nft_texts(listing: str) -> dict[tuple, str]:
    """Rule text by (family, table, chain, handle) from `nft -a list ruleset`."""
    texts, table, chain = {}, None, None
    for line in listing.splitlines():
        s = line.strip()
        m = re.match(r"table (\S+) (\S+) \{", s)
        if m:
            table = m.groups()
            continue
        m = re.match(r"chain (\S+) \{", s)
        if m:
            chain = m.group(1)
            continue
        m = re.match(r"(.*?)\s*# handle (\d+)$", s)
        if m and table and chain and not s.startswith(("type ", "chain ", "table ")):
            texts[(*table, chain, int(m.group(2)))] = m.group(1)
    return texts


def parse_nft(ruleset_json: str, listing: str = "") -> list[FwTable]:
    """Tables of `nft -j list ruleset`, with rule texts from `nft -a list ruleset`."""
    texts = _nft_texts(listing)
    items = json.loads(ruleset_json or '{"nftables": []}').get("nftables", [])
    chains: dict[tuple, dict] = {}
    for it in items:
        if "chain" in it:
            c = it["chain"]
            chains[(c["family"], c["table"], c["name"])] = {
                "hook": c.get("hook"), "policy": c.get("policy", "accept"),
                "type": c.get("type"), "rules": []}
    for it in items:
        if "rule" in it:
            r = it["rule"]
            key = (r["family"], r["table"], r["chain"])
            text = texts.get((*key, r.get("handle")), f"handle {r.get('handle')}")
            if key in chains:
                chains[key]["rules"].append(_nft_rule(r.get("expr", []), text))
    tables: dict[tuple, FwTable] = {}
    for (fam, tab, name), c in chains.items():
        hook = c["hook"] if c["type"] in (None, "filter") else None
        t = tables.setdefault((fam, tab), FwTable("nft", fam, tab, {}))
        t.chains[name] = FwChain(name, hook, c["policy"], tuple(c["rules"]))
    return list(tables.values())


IPT_BUILTIN = {"INPUT": "input", "FORWARD": "forward", "OUTPUT": "output",
               "PREROUTING": "prerouting", "POSTROUTING": "postrouting"}


IPT_VERDICTS = {"ACCEPT": "accept", "DROP": "drop", "REJECT": "reject", "RETURN": "return"}


def _ipt_target(arg: str, goto: bool, chains: set[str]) -> tuple[str | None, str | None]:
    """The verdict of -j/-g ARG: a user chain is a jump (or goto); LOG, MARK and the other
    extension targets decide nothing (None)."""
    if arg in IPT_VERDICTS:
        return IPT_VERDICTS[arg], None
    if arg in chains:
        return ("goto" if goto else "jump"), arg
    return None, None


def _ipt_rule(words: list[str], text: str, chains: set[str]) -> FwRule:
    protos, negate, other, verdict, target = None, False, False, None, None
    i, neg = 0, False
    while i < len(words):
        w, arg = words[i], (words[i + 1] if i + 1 < len(words) else "")
        if w == "!":
            neg, i = True, i + 1
            continue
        if w in ("-p", "--protocol"):
            if arg.lower() not in ("all", "0"):
                protos, negate = frozenset({_proto_number(arg)}), neg
            i += 2
        elif w in ("-j", "--jump", "-g", "--goto"):
            verdict, target = _ipt_target(arg, w in ("-g", "--goto"), chains)
            i += 2
        elif w in ("-m", "--match") and arg == "comment":
            i += 4
        elif w in ("-m", "--match") and arg in ("tcp", "udp", "sctp", "icmp"):
            i += 2                               # implied by -p, which sets protos
        else:
            other = other or w.startswith("-")
            i += 1
        neg = False
    return FwRule(text, protos, negate, other, verdict, target)


def parse_iptables_save(text: str) -> list[FwTable]:
    """The filter table of `iptables-save` (the only one that drops by policy)."""
    tables, chains, rules, current = [], {}, {}, None
    for line in text.splitlines():
        line = re.sub(r"^\[\d+:\d+\]\s*", "", line.strip())
        if line.startswith("*"):
            current, chains, rules = line[1:], {}, {}
        elif line.startswith(":") and current:
            name, policy = line[1:].split()[:2]
            chains[name] = "accept" if policy == "-" else policy.lower()
            rules[name] = []
        elif line.startswith("-A ") and current:
            words = shlex.split(line)
            rules.setdefault(words[1], []).append(_ipt_rule(words[2:], line, set(chains)))
        elif line == "COMMIT" and current == "filter":
            tables.append(FwTable("iptables", "ip", "filter", {
                n: FwChain(n, IPT_BUILTIN.get(n), chains.get(n, "accept"), tuple(rules[n]))
                for n in rules}))
    return tables


def _first_line(text: str) -> str:
    return next((l.strip() for l in text.splitlines() if l.strip()), "no message")


def nft_firewall(run: Callable[[list[str]], Run | None]) -> Firewall:
    j = run(["nft", "-j", "list", "ruleset"])
    if j is None:
        return Firewall("nft", installed=False)
    if j.rc != 0:
        return Firewall("nft", error=_first_line(j.err or j.out))
    a = run(["nft", "-a", "list", "ruleset"])
    try:
        return Firewall("nft", parse_nft(j.out, a.out if a and a.rc == 0 else ""))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return Firewall("nft", error=f"cannot read its JSON: {e}")


def iptables_firewall(run: Callable[[list[str]], Run | None], nft_seen: bool) -> Firewall:
    """nft_seen: nft listed the ruleset, which holds the rules of iptables-nft too."""
    p = run(["iptables-save"])
    if p is None:
        return Firewall("iptables", installed=False)
    if p.rc != 0:
        return Firewall("iptables", error=_first_line(p.err or p.out))
    if nft_seen and "(nf_tables)" in p.out[:300]:
        return Firewall("iptables", via_nft=True)
    try:
        return Firewall("iptables", parse_iptables_save(p.out))
    except (ValueError, IndexError) as e:
        return Firewall("iptables", error=f"cannot read its output: {e}")


# -- the whole picture ---------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    release: str
    euid: int
    cap_eff: int | None                 # CapEff of /proc/self/status, None when unreadable
    modules: Modules
    loading: ModuleLoading
    tun_errno: int                      # 0: /dev/net/tun opened
    raw_errno: dict[int, int]           # IP protocol -> 0 or the errno of socket()
    ip_forward: int | None
    rp_filter: dict[str, int | None]    # "all", "default" and device names
    links: list[Link]
    proc_devs: list[str] | None         # device names in /proc/net/dev
    routes: list[Route4]
    route_dev: dict[str, str | None]    # tunnel remote or gateway -> underlay device
    firewalls: list[Firewall]
    bpf: Bpf | None = None
    # tunld's tunnels: name -> how many outer sources it takes (None: any), as tunld says;
    # filled in by the caller that can ask tunld (kernel/ is below the daemon)
    members: dict[str, int | None] = field(default_factory=dict)


def _errno_of(f: Callable, arg) -> int:
    try:
        f(arg)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def cap_eff(root: Path) -> int | None:
    for line in (read(root, "proc/self/status") or "").splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def outer_destinations(l: Link, rts: list[Route4]) -> list[str]:
    """Where a tunnel sends its outer packets: its remote, or for a tunnel without one (NBMA)
    the gateways of the routes through it (ipip_tunnel_xmit() takes rt_nexthop())."""
    if l.remote:
        return [l.remote]
    return sorted({r.gateway for r in rts if r.dev == l.name and r.gateway})


def gather(rd: Readers) -> Facts:
    root = Path(rd.root)
    release = kernel_release(root)
    kinds = _safe(rd.link_kinds, {})
    lks = links(root, kinds)
    rts = routes(root)
    tunnels = [l for l in lks if l.kind or l.tunl]
    dsts = {d for l in tunnels for d in outer_destinations(l, rts)}
    rp_devs = ["all", "default"] + [l.name for l in lks]
    mods = modules(root, release)
    return Facts(
        release=release, euid=rd.euid(), cap_eff=cap_eff(root),
        modules=mods, loading=module_loading(root),
        tun_errno=_errno_of(rd.open_tun, str(root / "dev/net/tun")),
        raw_errno={p: _errno_of(rd.raw_socket, p) for p in (4, 47, 41, 50)},
        ip_forward=read_int(root, "proc/sys/net/ipv4/ip_forward"),
        rp_filter={d: read_int(root, f"proc/sys/net/ipv4/conf/{d}/rp_filter") for d in rp_devs},
        links=lks, proc_devs=proc_net_dev(root), routes=rts,
        route_dev={d: _route_dev(rd.route_dev, rts, d) for d in sorted(dsts)},
        firewalls=_firewalls(rd.run), bpf=_bpf(rd, root, mods))


def _bpf(rd: Readers, root: Path, mods: Modules) -> Bpf:
    btf = read_bytes(root, "sys/kernel/btf/vmlinux")
    return Bpf(load_error=_safe(rd.bpf_load, "probe failed") if rd.bpf_load else "not probed",
               btf=btf is not None,
               decap_l3=btf is not None and b"BPF_F_ADJ_ROOM_DECAP_L3_IPV6" in btf,
               cls_bpf=mods.state("cls_bpf"), clsact=mods.state("sch_ingress"))


def read_bytes(root: Path, rel: str) -> bytes | None:
    try:
        return (root / rel).read_bytes()
    except OSError:
        return None


def _route_dev(live_dev: Callable[[str], str | None] | None, rts: list[Route4], dst: str):
    """The kernel's answer when it can give one; else the longest match in the main table."""
    return _safe(lambda: live_dev(dst), lookup(rts, dst)) if live_dev else lookup(rts, dst)


def _firewalls(run: Callable[[list[str]], Run | None]) -> list[Firewall]:
    nft = nft_firewall(run)
    return [nft, iptables_firewall(run, nft.installed and nft.error is None)]


def _safe(f: Callable | None, fallback):
    """A live reader that fails (no netlink here, say) gives the fallback, not a traceback."""
    if f is None:
        return fallback
    try:
        return f()
    except Exception:       # pyroute2 raises many kinds; a fact we cannot get is no fact
        return fallback
