"""tunl doctor on fake hosts: /proc, /sys, /lib/modules and /dev/net/tun in a temporary
directory, and fakes for what is not a file (raw sockets, nft, iptables-save, uid).

Every expected line is written here by hand, as the user reads it.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tunl.cli import doctor
from tunl.errors import ConfigError
from tunl.kernel import probe

RELEASE = "6.1.0-test"


class Host:
    """A fake host tree: a root with lo and eth0 (MTU 1500, default route via 192.0.2.1),
    module loading on, no modules, ip_forward 1, rp_filter 0 everywhere."""

    def __init__(self, root: Path):
        self.root = root
        self.index = 0
        self.route_lines: list[str] = []
        self.commands: dict[str, probe.Run] = {}
        self.euid = 0
        self.tun_error: int | None = None
        self.raw_error: dict[int, int] = {}
        self.kinds: dict[str, str] = {}
        self.devs: list[str] = []
        self.bpf: str | None | bool = False        # False: not probed; None: the programs load
        self.write("proc/sys/kernel/osrelease", RELEASE)
        self.write("proc/modules", "")
        self.write("proc/sys/kernel/modules_disabled", "0")
        self.write("proc/sys/kernel/modprobe", "/sbin/modprobe")
        self.write("sbin/modprobe", "")
        self.write(f"lib/modules/{RELEASE}/modules.dep", "")
        self.write(f"lib/modules/{RELEASE}/modules.builtin", "")
        self.write("proc/self/status", "Name:\tpython\nCapEff:\t000001ffffffffff\n")
        self.write("dev/net/tun", "")
        self.sysctl("net.ipv4.ip_forward", 1)
        self.sysctl("net.ipv4.conf.all.rp_filter", 0)
        self.sysctl("net.ipv4.conf.default.rp_filter", 0)
        self.link("lo", arphrd=772, mtu=65536)
        self.link("eth0")
        self.route("eth0", "0.0.0.0/0", "192.0.2.1")
        self.route("eth0", "192.0.2.0/24")

    def write(self, rel: str, text: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n" if text else "")

    def remove(self, rel: str) -> None:
        (self.root / rel).unlink()

    def sysctl(self, key: str, value: int) -> None:
        self.write("proc/sys/" + key.replace(".", "/"), str(value))

    def link(self, name: str, *, arphrd: int = 1, mtu: int = 1500, up: bool = True,
             carrier: bool = True, alias: str = "", tun: bool = False, bridge: bool = False,
             address: str = "02:00:00:00:00:01", broadcast: str = "ff:ff:ff:ff:ff:ff") -> None:
        self.index += 1
        self.devs.append(name)
        self.write("proc/net/dev", "Inter-|   Receive\n face |bytes\n" + "\n".join(
            f"{n:>6}: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0" for n in self.devs))
        d = f"sys/class/net/{name}"
        for key, value in (("ifindex", self.index), ("type", arphrd), ("mtu", mtu),
                           ("flags", "0x1003" if up else "0x1002"), ("ifalias", alias),
                           ("address", address), ("broadcast", broadcast)):
            self.write(f"{d}/{key}", str(value))
        if up:
            self.write(f"{d}/carrier", "1" if carrier else "0")
        if tun:
            self.write(f"{d}/tun_flags", "0x1801")
        if bridge:
            (self.root / d / "bridge").mkdir()
        self.rp_filter(name, 0)

    def rp_filter(self, dev: str, value: int) -> None:
        self.write(f"proc/sys/net/ipv4/conf/{dev}/rp_filter", str(value))

    def tunl(self, name: str, mtu: int = 1480, up: bool = True, carrier: bool = True,
             **spec) -> None:
        """A userspace tunnel of tunl: a TUN device whose alias carries the spec."""
        alias = "tunl:" + json.dumps({"name": name, **spec}, separators=(",", ":"))
        self.link(name, arphrd=65534, mtu=mtu, up=up, carrier=carrier, alias=alias, tun=True,
                  address="", broadcast="")

    def route(self, dev: str, dst: str, gw: str | None = None, metric: int = 0) -> None:
        def h(a) -> str:
            return "%08X" % struct.unpack("<I", IPv4Address(a).packed)[0]
        n = IPv4Network(dst)
        flags = 0x1 | (0x2 if gw else 0)
        self.route_lines.append(f"{dev}\t{h(n.network_address)}\t{h(gw or '0.0.0.0')}\t"
                                f"{flags:04X}\t0\t0\t{metric}\t{h(n.netmask)}\t0\t0\t0")
        self.write("proc/net/route", "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\t"
                   "Mask\t\tMTU\tWindow\tIRTT\n" + "\n".join(self.route_lines))

    def nft(self, ruleset: list[dict], listing: str) -> None:
        self.commands["nft -j list ruleset"] = probe.Run(0, json.dumps({"nftables": ruleset}), "")
        self.commands["nft -a list ruleset"] = probe.Run(0, listing, "")

    def run(self, argv: list[str]) -> probe.Run | None:
        return self.commands.get(" ".join(argv))

    def readers(self) -> probe.Readers:
        def open_tun(path: str) -> None:
            if self.tun_error:
                raise OSError(self.tun_error, "fake")
            probe._open_close(path)

        def raw_socket(proto: int) -> None:
            if self.raw_error.get(proto):
                raise OSError(self.raw_error[proto], "fake")

        return probe.Readers(root=self.root, euid=lambda: self.euid, open_tun=open_tun,
                             raw_socket=raw_socket, run=self.run,
                             link_kinds=lambda: dict(self.kinds),
                             bpf_load=None if self.bpf is False else lambda: self.bpf)

    def facts(self) -> probe.Facts:
        return probe.gather(self.readers())

    def lines(self) -> list[str]:
        return [x.line() for x in doctor.findings(self.facts())]

    def plane(self, mode: str) -> doctor.Plane:
        return doctor.planes(self.facts())[mode]

    def tunnels(self) -> list[dict]:
        return doctor.report(self.facts())["tunnels"]


@pytest.fixture
def host(tmp_path) -> Host:
    return Host(tmp_path)


def with_status(lines: list[str], word: str) -> list[str]:
    return [l for l in lines if l.startswith(word)]


# -- the data plane of each mode -----------------------------------------------------------

# -- the eBPF data plane ---------------------------------------------------------------------

def ebpf_host(host, load_error=None, btf=b"BPF_F_ADJ_ROOM_DECAP_L3_IPV6"):
    host.bpf = load_error
    host.write("lib/modules/" + RELEASE + "/modules.builtin",
               "kernel/net/sched/cls_bpf.ko\nkernel/net/sched/sch_ingress.ko\n")
    if btf is not None:
        (host.root / "sys/kernel/btf").mkdir(parents=True, exist_ok=True)
        (host.root / "sys/kernel/btf/vmlinux").write_bytes(b"\0" + btf + b"\0")
    return host


def test_without_the_module_the_programs_loading_gives_the_ebpf_plane(host):
    ebpf_host(host)
    p = host.plane("ipip")
    assert p.plane == "ebpf", p
    assert "the eBPF programs load and tc can attach them" in p.why
    assert host.plane("vti").plane == "userspace"        # ESP: tunld's, not the programs'
    assert "oseq, ocsum, iseq and icsum tunnels take tunld's slow path" in host.plane("gre").why
    assert ("OK    eBPF: the programs load (bpf(2), privileges, verifier, helpers) and tc has "
            "clsact and bpf filters: tunnels without a kernel module get the eBPF data plane"
            ) in host.lines()


def test_a_loaded_module_beats_ebpf(host):
    ebpf_host(host)
    host.write("sys/module/ipip/initstate", "live")
    assert host.plane("ipip").plane == "kernel"
    assert host.plane("gre").plane == "ebpf"


def test_programs_refused_for_privileges_say_which_capabilities(host):
    ebpf_host(host, load_error="load: Operation not permitted (errno 1)")
    assert host.plane("ipip").plane == "userspace"
    assert "no eBPF (load: Operation not permitted (errno 1))" in host.plane("ipip").why
    assert ("WARN  eBPF: the kernel refused to load the programs (EPERM): tunnels take the "
            "userspace data plane; fix: run tunl as root with CAP_BPF and CAP_NET_ADMIN (or "
            "CAP_SYS_ADMIN); a container: --cap-add BPF --cap-add NET_ADMIN") in host.lines()


def test_an_unbuilt_object_says_to_run_the_setup(host):
    ebpf_host(host, load_error="object: /x/tunl.bpf.o is not built")
    assert host.plane("sit").plane == "userspace"
    assert any(l.startswith("WARN  eBPF: object: /x/tunl.bpf.o is not built") and
               l.endswith("fix: run ./dev setup (clang -target bpf builds tunl.bpf.o)")
               for l in host.lines())


def test_a_kernel_without_cls_bpf_gets_no_ebpf(host):
    ebpf_host(host)
    host.write("lib/modules/" + RELEASE + "/modules.builtin", "kernel/net/sched/sch_ingress.ko\n")
    assert host.plane("ipip").plane == "userspace"
    assert "tc has no cls_bpf (bpf filters)" in host.plane("ipip").why


def test_a_kernel_before_6_3_sends_received_ipv6_in_ipv4_to_the_slow_path(host):
    ebpf_host(host, btf=b"BPF_F_ADJ_ROOM_ENCAP_L3_IPV4")
    assert host.plane("sit").plane == "ebpf"
    assert ("OK    eBPF: this kernel has no BPF_F_ADJ_ROOM_DECAP_L3_* (Linux 6.3): received "
            "IPv6 inside IPv4 (sit, gre) takes the slow path") in host.lines()


def test_no_btf_is_a_warning(host):
    ebpf_host(host, btf=None)
    assert any(l.startswith("WARN  eBPF: no kernel BTF") for l in host.lines())


def test_a_loaded_module_gives_the_kernel_data_plane(host):
    host.write("sys/module/ipip/initstate", "live")
    assert host.plane("ipip") == doctor.Plane("kernel", "ipip", "loaded", "module ipip is loaded")


def test_a_builtin_module_gives_the_kernel_data_plane(host):
    host.write(f"lib/modules/{RELEASE}/modules.builtin", "kernel/net/ipv4/ip_gre.ko")
    assert host.plane("gre") == doctor.Plane("kernel", "ip_gre", "builtin",
                                             "ip_gre is built into the kernel")


def test_a_builtin_module_with_parameters_shows_in_sys_module_without_initstate(host):
    host.write("sys/module/sit/parameters/log_ecn_error", "Y")
    assert host.plane("sit").plane == "kernel"
    assert host.plane("isatap").why == "sit is built into the kernel"


def test_a_module_in_modules_dep_is_loaded_on_first_use(host):
    host.write(f"lib/modules/{RELEASE}/modules.dep",
               "kernel/net/ipv4/sit.ko.xz: kernel/net/ipv4/tunnel4.ko.xz "
               "kernel/net/ipv4/ip_tunnel.ko.xz")
    assert host.plane("sit") == doctor.Plane(
        "kernel", "sit", "loadable", f"module sit is in /lib/modules/{RELEASE}: the kernel "
        'loads it on first use (request_module("rtnl-link-sit"))')


def test_a_fallback_device_proves_the_module_is_in(host):
    host.link("tunl0", arphrd=768, mtu=1480, up=False, address="00:00:00:00",
              broadcast="00:00:00:00")
    assert host.plane("ipip").why == "module ipip is loaded"


def test_modules_disabled_leaves_userspace(host):
    host.write(f"lib/modules/{RELEASE}/modules.dep",
               "kernel/net/ipv4/ipip.ko: kernel/net/ipv4/tunnel4.ko")
    host.sysctl("kernel.modules_disabled", 1)
    assert host.plane("ipip") == doctor.Plane(
        "userspace", "ipip", "loadable", f"module ipip is in /lib/modules/{RELEASE} but "
        "kernel.modules_disabled = 1 forbids loading until reboot; /dev/net/tun and raw IP "
        "protocol 4 sockets work")


def test_a_missing_modprobe_helper_leaves_userspace(host):
    host.write(f"lib/modules/{RELEASE}/modules.dep", "kernel/net/ipv4/ipip.ko.zst:")
    host.remove("sbin/modprobe")
    assert host.plane("ipip").why == (
        f"module ipip is in /lib/modules/{RELEASE} but the kernel's modprobe helper "
        "/sbin/modprobe is missing; /dev/net/tun and raw IP protocol 4 sockets work")


def test_a_kernel_without_module_support(host):
    host.remove("proc/modules")
    assert host.plane("gre") == doctor.Plane(
        "userspace", "ip_gre", "absent", "no ip_gre module: not loaded, not built in, and this "
        "kernel loads no modules (no /proc/modules); /dev/net/tun and raw IP protocol 47 "
        "sockets work")


def test_no_lib_modules_for_this_release(host):
    host.remove(f"lib/modules/{RELEASE}/modules.dep")
    assert host.plane("ipip").why == (
        f"no ipip module: not loaded, not built in, no /lib/modules/{RELEASE}; /dev/net/tun "
        "and raw IP protocol 4 sockets work")


def test_vti_without_module_is_tunlds_own(host):
    assert host.plane("vti") == doctor.Plane(
        "userspace", "ip_vti", "absent", f"no ip_vti module: not loaded, not built in, not in "
        f"/lib/modules/{RELEASE}/modules.dep; tunld carries vti itself (ESP): /dev/net/tun and "
        "raw IP protocol 50 sockets work")


def test_vti_without_module_or_esp_sockets_is_unavailable(host):
    host.raw_error = {50: errno.EPERM}
    p = host.plane("vti")
    assert p.plane == "unavailable" and "raw IP protocol 50 socket" in p.why, p


def test_vti_with_its_module_is_kernel(host):
    host.write("sys/module/ip_vti/initstate", "live")
    assert host.plane("vti").plane == "kernel"


def test_userspace_without_tun_is_unavailable(host):
    host.remove("dev/net/tun")
    assert host.plane("ipip").why.endswith(
        "; userspace cannot run: /dev/net/tun: No such file or directory")
    assert host.plane("ipip").plane == "unavailable"


def test_userspace_without_raw_sockets_is_unavailable(host):
    host.raw_error = {47: errno.EPERM}
    assert host.plane("gre").plane == "unavailable"
    assert host.plane("gre").why.endswith(
        "; userspace cannot run: raw IP protocol 47 socket: Operation not permitted")
    assert host.plane("ipip").plane == "userspace"


# -- privileges and the userspace data plane's needs ---------------------------------------

def test_root_with_its_capabilities_is_ok(host):
    assert host.lines()[:3] == [
        "OK    running as root",
        "OK    /dev/net/tun opens: the userspace data plane can create its TUN devices",
        "OK    raw sockets for IP protocols 4 (ipip), 47 (gre) and 41 (sit) open: the userspace "
        "data plane can send and receive"]


def test_not_root_fails(host):
    host.euid = 1000
    assert host.lines()[0] == (
        "FAIL  not root (uid 1000): tunl needs root to create tunnels, and this report misses "
        "what only root can see; fix: run it as root: sudo tunl doctor")


def test_root_without_net_admin_fails(host):
    host.write("proc/self/status", "CapEff:\t0000000000002000\n")
    assert host.lines()[0] == (
        "FAIL  root without CAP_NET_ADMIN (CapEff 0x2000): tunl cannot create tunnels with "
        "them dropped; fix: run tunl with them (a container: docker run --cap-add NET_ADMIN "
        "--cap-add NET_RAW)")


def test_missing_tun_fails(host):
    host.remove("dev/net/tun")
    assert "FAIL  /dev/net/tun is missing: userspace tunnels cannot be created; fix: mkdir -p "\
           "/dev/net && mknod /dev/net/tun c 10 200 (in a container: docker run --device "\
           "/dev/net/tun)" in host.lines()


def test_missing_tun_only_warns_when_the_kernel_has_every_module(host):
    for m in ("ipip", "ip_gre", "sit"):
        host.write(f"sys/module/{m}/initstate", "live")
    host.remove("dev/net/tun")
    assert with_status(host.lines(), "WARN  /dev/net/tun")[0].startswith(
        "WARN  /dev/net/tun is missing")


def test_tun_permission_denied(host):
    host.tun_error = errno.EACCES
    assert "FAIL  /dev/net/tun cannot be opened (Permission denied): userspace tunnels cannot "\
           "be created; fix: run tunl as root; a container needs the device allowed: docker "\
           "run --device /dev/net/tun" in host.lines()


def test_tun_without_driver(host):
    host.tun_error = errno.ENODEV
    assert "FAIL  /dev/net/tun cannot be opened (No such device): the kernel has no TUN "\
           "driver; fix: modprobe tun, or a kernel built with CONFIG_TUN" in host.lines()


def test_raw_sockets_refused(host):
    host.raw_error = {4: errno.EPERM, 41: errno.EPERM}
    assert "FAIL  raw sockets for IP protocols 4 (ipip) and 41 (sit) cannot be opened "\
           "(Operation not permitted): userspace tunnels of those modes cannot send or "\
           "receive; fix: run tunl as root with CAP_NET_RAW" in host.lines()


def test_sys_of_another_namespace_warns(host):
    host.write("proc/net/dev", "Inter-|   Receive\n face |bytes\n    lo: 0\n  eth1: 0\n")
    assert host.lines()[1] == (
        "WARN  /sys/class/net shows other devices than this network namespace has "
        "(/proc/net/dev): /sys belongs to another namespace (entered with nsenter?), so the "
        "device facts below may be wrong; fix: enter the namespace with ip netns exec, which "
        "mounts its own /sys")


def test_sys_of_this_namespace_says_nothing(host):
    assert not any("/sys/class/net" in l for l in host.lines())


# -- ip_forward and rp_filter --------------------------------------------------------------

def test_ip_forward_off_warns(host):
    host.sysctl("net.ipv4.ip_forward", 0)
    assert "WARN  net.ipv4.ip_forward = 0: containers and bridges behind this host cannot "\
           "reach the tunnel (the kernel forwards nothing; this host's own traffic is not "\
           "affected); fix: sysctl -w net.ipv4.ip_forward=1" in host.lines()


def test_ip_forward_off_says_when_a_bridge_makes_it_matter(host):
    host.sysctl("net.ipv4.ip_forward", 0)
    host.link("mybr0", bridge=True)
    assert "WARN  net.ipv4.ip_forward = 0: containers and bridges behind this host cannot "\
           "reach the tunnel (the kernel forwards nothing; this host's own traffic is not "\
           "affected); it matters here: bridge mybr0 is on this host; fix: sysctl -w "\
           "net.ipv4.ip_forward=1" in host.lines()


def test_ip_forward_on_is_ok(host):
    assert "OK    net.ipv4.ip_forward = 1: containers and bridges behind this host can reach "\
           "the tunnel" in host.lines()


def test_rp_filter_default_off_is_ok(host):
    assert "OK    net.ipv4.conf.all.rp_filter = 0, net.ipv4.conf.default.rp_filter = 0: tunnel "\
           "devices created from now on are not strict" in host.lines()


def test_strict_rp_filter_for_new_devices_warns(host):
    host.sysctl("net.ipv4.conf.default.rp_filter", 1)
    assert "WARN  net.ipv4.conf.all.rp_filter = 0, net.ipv4.conf.default.rp_filter = 1: tunnel "\
           "devices created from now on are strict (the effective value is the larger of all "\
           "and the device's): fib_validate_source() drops a packet they receive unless the "\
           "route back to its source leaves by the same device; fix: sysctl -w "\
           "net.ipv4.conf.default.rp_filter=2 (loose)" in host.lines()


def test_strict_rp_filter_on_a_tunnel_without_routes_fails(host):
    host.tunl("tl0", remote="192.0.2.7")
    host.sysctl("net.ipv4.conf.tl0.rp_filter", 1)
    assert "FAIL  rp_filter on tl0 is 1 (strict: the larger of net.ipv4.conf.all.rp_filter = 0 "\
           "and net.ipv4.conf.tl0.rp_filter = 1) and no route leads back out tl0: "\
           "fib_validate_source() drops every packet tl0 receives; fix: sysctl -w "\
           "net.ipv4.conf.tl0.rp_filter=2 (loose), or route the far side's networks through "\
           "tl0" in host.lines()


def test_strict_all_makes_a_tunnel_with_routes_strict(host):
    host.tunl("tunl0")
    host.route("tunl0", "10.42.2.0/24", "192.0.2.8")
    host.route("tunl0", "10.42.3.0/24", "192.0.2.9")
    host.sysctl("net.ipv4.conf.all.rp_filter", 1)
    assert "WARN  rp_filter on tunl0 is 1 (strict: the larger of net.ipv4.conf.all.rp_filter "\
           "= 1 and net.ipv4.conf.tunl0.rp_filter = 0): fib_validate_source() drops a packet "\
           "tunl0 receives unless its source is in 10.42.2.0/24, 10.42.3.0/24; fix: sysctl -w "\
           "net.ipv4.conf.tunl0.rp_filter=2 (loose)" in host.lines()


def test_loose_rp_filter_on_a_tunnel_is_ok(host):
    host.tunl("tl0", remote="192.0.2.7")
    host.sysctl("net.ipv4.conf.tl0.rp_filter", 2)
    host.sysctl("net.ipv4.conf.all.rp_filter", 1)
    assert "OK    rp_filter on tl0 is 2 (loose): packets it receives are not dropped for their "\
           "source" in host.lines()


def test_strict_rp_filter_on_the_underlay_passes_outer_packets(host):
    host.sysctl("net.ipv4.conf.eth0.rp_filter", 1)
    assert "OK    rp_filter on eth0 (underlay) is 1 (strict): outer packets pass, as the route "\
           "back to each remote leaves by eth0" in host.lines()


def test_a_dot_in_a_device_name_is_a_slash_for_sysctl(host):
    host.tunl("tl.5", remote="192.0.2.7")
    host.rp_filter("tl.5", 1)
    assert any("fix: sysctl -w net.ipv4.conf.tl/5.rp_filter=2" in l for l in host.lines())


# -- underlay and MTU ----------------------------------------------------------------------

def test_underlay_of_1500_is_ok(host):
    assert "OK    underlay eth0 (default route) has MTU 1500: tunnels over it get MTU ipip "\
           "1480, gre 1476, sit 1480" in host.lines()


def test_a_small_underlay_shrinks_the_tunnel_mtu(host):
    host.link("v0", mtu=1400)
    host.route("v0", "10.9.0.0/24")
    host.tunl("tl0", mtu=1380, remote="10.9.0.2")
    assert "WARN  underlay v0 (route to 10.9.0.2 of tl0) has MTU 1400, below 1500: tunnels "\
           "over it shrink to MTU ipip 1380, gre 1376, sit 1380; fix: keep what enters the "\
           "tunnels within that (containers behind them too), or raise v0's MTU where its "\
           "network carries 1500: ip link set v0 mtu 1500" in host.lines()
    assert not with_status(host.lines(), "FAIL")


def test_the_gateways_of_a_tunnel_without_remote_are_its_outer_destinations(host):
    host.link("v0", mtu=9000)
    host.route("v0", "10.9.0.0/24")
    host.tunl("tunl0")
    host.route("tunl0", "10.42.2.0/24", "10.9.0.2")
    assert "OK    underlay v0 (route to 10.9.0.2 of tunl0) has MTU 9000: tunnels over it get "\
           "MTU ipip 8980, gre 8976, sit 8980" in host.lines()


def test_a_tunnel_bigger_than_its_underlay_carries_fails(host):
    host.link("v0", mtu=1400)
    host.route("v0", "10.9.0.0/24")
    host.tunl("tg0", mtu=1476, mode="gre", remote="10.9.0.2", okey=5)
    assert "FAIL  tg0 has MTU 1476, more than v0 (MTU 1400) carries for gre (1372): bigger "\
           "packets are fragmented, or dropped when they have DF; fix: ip link set tg0 mtu "\
           "1372" in host.lines()


def test_no_route_to_the_remote_fails(host):
    host.route_lines.clear()
    host.route("eth0", "192.0.2.0/24")
    host.tunl("tl0", remote="203.0.113.9")
    assert "FAIL  tl0: no route to 203.0.113.9: its outer packets cannot leave; fix: ip route "\
           "add 203.0.113.9 via GATEWAY (a route to the remote)" in host.lines()


def test_a_route_to_the_remote_through_the_tunnel_itself_fails(host):
    host.tunl("tl0", remote="203.0.113.9")
    host.route("tl0", "203.0.113.0/24")
    assert "FAIL  tl0: the route to 203.0.113.9 leads into tl0 itself: the kernel drops such "\
           "packets as a routing loop; fix: ip route add 203.0.113.9/32 via GATEWAY dev "\
           "UNDERLAY" in host.lines()


def test_no_underlay_at_all(host):
    host.remove("proc/net/route")
    assert "OK    no default route and no tunnel remote: no underlay MTU to check" in host.lines()


def test_the_kernel_answers_the_route_when_it_can(host):
    host.link("v0", mtu=1400)
    host.tunl("tl0", remote="10.9.0.2")
    facts = probe.gather(dataclasses.replace(host.readers(), route_dev=lambda dst: "v0"))
    assert facts.route_dev == {"10.9.0.2": "v0"}


# -- the tunnels ---------------------------------------------------------------------------

def test_userspace_tunnels_are_listed(host):
    host.tunl("tl0", mtu=1480, remote="192.0.2.7", local="192.0.2.5")
    host.tunl("tg0", mtu=1476, mode="gre", up=False)
    assert host.tunnels() == [
        {"name": "tl0", "mode": "ipip", "dataplane": "userspace", "mtu": 1480, "up": True,
         "remote": "192.0.2.7", "local": "192.0.2.5", "underlay": ["eth0"], "fallback": False,
         "tunld": True},
        {"name": "tg0", "mode": "gre", "dataplane": "userspace", "mtu": 1476, "up": False,
         "remote": None, "local": None, "underlay": [], "fallback": False, "tunld": None}]


def test_a_tun_device_that_is_not_tunls_is_no_tunnel(host):
    host.link("tun7", arphrd=65534, tun=True, alias="openvpn")
    assert host.tunnels() == []


def test_kernel_tunnels_are_listed_with_endpoints_from_sysfs(host):
    host.link("ipip1", arphrd=768, mtu=1480, address="c0:00:02:05", broadcast="c0:00:02:07")
    host.link("gre1", arphrd=778, mtu=1476, up=False, address="00:00:00:00",
              broadcast="c6:33:64:01")
    host.link("vti1", arphrd=768, mtu=1480, address="00:00:00:00", broadcast="00:00:00:00")
    host.kinds = {"vti1": "vti", "eth0": "veth"}
    assert [(t["name"], t["mode"], t["dataplane"], t["up"], t["remote"], t["local"])
            for t in host.tunnels()] == [
        ("ipip1", "ipip", "kernel", True, "192.0.2.7", "192.0.2.5"),
        ("gre1", "gre", "kernel", False, "198.51.100.1", None),
        ("vti1", "vti", "kernel", True, None, None)]


def test_kernel_tunnels_tunl_made_carry_its_spec(host):
    host.link("v0", mtu=1400)
    host.route("v0", "10.9.0.0/24")
    alias = 'tunl:{"name":"kg0","mode":"gre","okey":7,"remote":"10.9.0.2","dataplane":"kernel"}'
    host.link("kg0", arphrd=778, mtu=1476, alias=alias, address="00:00:00:00",
              broadcast="0a:09:00:02")
    assert host.tunnels() == [
        {"name": "kg0", "mode": "gre", "dataplane": "kernel", "mtu": 1476, "up": True,
         "remote": "10.9.0.2", "local": None, "underlay": ["v0"], "fallback": False,
         "tunld": None}]
    assert "FAIL  kg0 has MTU 1476, more than v0 (MTU 1400) carries for gre (1372): bigger "\
           "packets are fragmented, or dropped when they have DF; fix: ip link set kg0 mtu "\
           "1372" in host.lines()


def test_fallback_devices_are_listed_only_when_up(host):
    host.link("tunl0", arphrd=768, mtu=1480, up=False, address="00:00:00:00",
              broadcast="00:00:00:00")
    host.link("sit0", arphrd=776, mtu=1480, address="00:00:00:00", broadcast="00:00:00:00")
    assert [(t["name"], t["fallback"]) for t in host.tunnels()] == [("sit0", True)]


def test_a_tunnel_that_is_down_warns(host):
    host.tunl("tl0", remote="192.0.2.7", up=False)
    assert "WARN  tl0 is down: it carries nothing; fix: ip link set tl0 up" in host.lines()


def test_a_userspace_tunnel_without_tunld_warns(host):
    host.tunl("tl0", remote="192.0.2.7", carrier=False)
    assert "WARN  tl0 is up but no tunld holds it (no carrier): packets routed into it are "\
           "dropped; fix: tunl daemon start" in host.lines()


# -- firewall ------------------------------------------------------------------------------

def nft_chain(name: str, hook: str, policy: str = "accept", family: str = "inet",
              table: str = "filter") -> dict:
    return {"chain": {"family": family, "table": table, "name": name, "handle": 1,
                      "type": "filter", "hook": hook, "prio": 0, "policy": policy}}


def nft_rule(chain: str, handle: int, *expr, family: str = "inet", table: str = "filter") -> dict:
    return {"rule": {"family": family, "table": table, "chain": chain, "handle": handle,
                     "expr": list(expr)}}


def match(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


IP_PROTOCOL = {"payload": {"protocol": "ip", "field": "protocol"}}
CT_STATE = {"ct": {"key": "state"}}
TCP_DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}


def test_no_firewall_tool_is_said(host):
    assert host.lines()[-1] == ("OK    firewall not inspected: neither nft nor iptables-save is "
                                "installed")


def test_an_empty_nft_ruleset_is_ok(host):
    host.nft([{"metainfo": {"version": "1.0.6"}}], "")
    assert host.lines()[-1] == ("OK    nft: no input or forward chain drops IP protocols 4 (ipip), "
                                "47 (gre) and 41 (sit)")


def test_nft_dropping_protocol_4_may_drop(host):
    host.nft([nft_chain("input", "input"),
              nft_rule("input", 3, match(IP_PROTOCOL, "ipencap"), {"drop": None})],
             "table inet filter { # handle 1\n\tchain input { # handle 1\n"
             "\t\ttype filter hook input priority filter; policy accept;\n"
             "\t\tip protocol ipencap drop # handle 3\n\t}\n}\n")
    assert host.lines()[-1] == (
        "WARN  nft may drop IP protocol 4 (ipip): chain inet filter input has rule `ip protocol "
        "ipencap drop`; fix: nft insert rule inet filter input ip protocol 4 accept")


def test_nft_dropping_the_protocol_of_a_tunnel_here_fails(host):
    host.tunl("tl0", remote="192.0.2.7")
    host.nft([nft_chain("input", "input"),
              nft_rule("input", 3, match(IP_PROTOCOL, 4), {"counter": None}, {"drop": None})], "")
    assert host.lines()[-1] == (
        "FAIL  nft may drop IP protocol 4 (ipip): chain inet filter input has rule `handle 3`; "
        "fix: nft insert rule inet filter input ip protocol 4 accept")


def test_nft_policy_drop_with_only_conntrack_may_drop(host):
    host.nft([nft_chain("input", "input", "drop"),
              nft_rule("input", 2, match(CT_STATE, ["established", "related"], "in"),
                       {"accept": None}),
              nft_rule("input", 3, match(TCP_DPORT, 22), {"accept": None})], "")
    assert host.lines()[-1] == (
        "WARN  nft may drop IP protocols 4 (ipip), 47 (gre) and 41 (sit): chain inet filter "
        "input has policy drop and no rule that accepts them; fix: nft insert rule inet filter "
        "input ip protocol { 4, 47, 41 } accept")


def test_nft_policy_drop_names_the_conditional_accept(host):
    host.nft([nft_chain("forward", "forward", "drop"),
              nft_rule("forward", 2, match({"meta": {"key": "iifname"}}, "v0"),
                       match({"meta": {"key": "l4proto"}}, "gre"), {"accept": None}),
              nft_rule("forward", 3, match(IP_PROTOCOL, {"set": ["ipencap", "ipv6"]}),
                       {"accept": None})],
             "table inet filter {\n\tchain forward {\n"
             "\t\tiifname \"v0\" meta l4proto gre accept # handle 2\n\t}\n}\n")
    assert host.lines()[-1] == (
        "WARN  nft may drop IP protocol 47 (gre) forwarded to tunnel hosts behind this one: "
        "chain inet filter forward has policy drop and only `iifname \"v0\" meta l4proto gre "
        "accept` accepts them; fix: nft insert rule inet filter forward ip protocol 47 accept")


def test_nft_policy_drop_with_the_protocols_accepted_is_ok(host):
    host.nft([nft_chain("input", "input", "drop"),
              nft_rule("input", 2, match(IP_PROTOCOL, {"set": [4, "gre", 41]}), {"accept": None})],
             "")
    assert host.lines()[-1].startswith("OK    nft: no input or forward chain drops")


def test_nft_follows_jumps(host):
    host.nft([nft_chain("input", "input", family="ip"),
              {"chain": {"family": "ip", "table": "filter", "name": "tunnels", "handle": 2}},
              nft_rule("input", 4, {"jump": {"target": "tunnels"}}, family="ip"),
              nft_rule("tunnels", 5, match(IP_PROTOCOL, 41, "!="), {"accept": None},
                       family="ip"),
              nft_rule("tunnels", 6, {"reject": None}, family="ip")], "")
    assert host.lines()[-1] == (
        "WARN  nft may drop IP protocol 41 (sit): chain ip filter input has rule `handle 6`; "
        "fix: nft insert rule ip filter input ip protocol 41 accept")


def test_nft_goto_ends_where_its_chain_ends(host):
    host.nft([nft_chain("input", "input", "drop"),
              {"chain": {"family": "inet", "table": "filter", "name": "web", "handle": 2}},
              nft_rule("input", 3, {"goto": {"target": "web"}}),
              nft_rule("input", 4, {"accept": None}),
              nft_rule("web", 5, match(TCP_DPORT, 443), {"accept": None})], "")
    assert host.lines()[-1].startswith(
        "WARN  nft may drop IP protocols 4 (ipip), 47 (gre) and 41 (sit): chain inet filter "
        "input has policy drop")


def test_nft_ipv6_only_rules_leave_tunnel_packets_alone(host):
    nfproto = {"meta": {"key": "nfproto"}}
    host.nft([nft_chain("input", "input"),
              nft_rule("input", 2, match(nfproto, "ipv6"), {"drop": None}),
              nft_rule("input", 3, match(nfproto, "ipv4", "!="), {"drop": None}),
              nft_rule("input", 4, match({"payload": {"protocol": "ip6", "field": "nexthdr"}},
                                         4), {"drop": None})], "")
    assert host.lines()[-1].startswith("OK    nft: no input or forward chain drops")


def test_iptables_negated_protocol(host):
    host.commands["iptables-save"] = probe.Run(0, "*filter\n:INPUT ACCEPT [0:0]\n"
                                               "-A INPUT ! -p tcp -j REJECT\nCOMMIT\n", "")
    assert host.lines()[-1] == (
        "WARN  iptables may drop IP protocols 4 (ipip), 47 (gre) and 41 (sit): chain INPUT of "
        "the filter table has rule `-A INPUT ! -p tcp -j REJECT`; fix: iptables -I INPUT -p 4 "
        "-j ACCEPT && iptables -I INPUT -p 47 -j ACCEPT && iptables -I INPUT -p 41 -j ACCEPT")


def test_nft_that_cannot_list_warns(host):
    host.euid = 1000
    host.commands["nft -j list ruleset"] = probe.Run(1, "", "Error: Operation not permitted\n")
    assert host.lines()[-1] == (
        "WARN  nft could not list the ruleset (Error: Operation not permitted): the firewall "
        "was not inspected; fix: run tunl doctor as root")


IPTABLES = """# Generated by iptables-save v1.8.9 (legacy) on Tue Nov 25 20:00:00 2026
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:tunnels - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j tunnels
-A FORWARD -p ipencap -m comment --comment "no ipip here" -j DROP
-A tunnels -p gre -j ACCEPT
COMMIT
"""


def test_iptables_policy_drop_and_explicit_drop(host):
    host.commands["iptables-save"] = probe.Run(0, IPTABLES, "")
    assert host.lines()[-2:] == [
        "WARN  iptables may drop IP protocols 4 (ipip) and 41 (sit): chain INPUT of the filter "
        "table has policy drop and no rule that accepts them; fix: iptables -I INPUT -p 4 -j "
        "ACCEPT && iptables -I INPUT -p 41 -j ACCEPT",
        "WARN  iptables may drop IP protocol 4 (ipip) forwarded to tunnel hosts behind this one:"
        " chain FORWARD of the filter table has rule `-A FORWARD -p ipencap -m comment --comment "
        "\"no ipip here\" -j DROP`; fix: iptables -I FORWARD -p 4 -j ACCEPT"]


def test_iptables_nft_is_left_to_nft(host):
    host.nft([], "")
    host.commands["iptables-save"] = probe.Run(0, IPTABLES.replace("(legacy)", "(nf_tables)"), "")
    assert not any(l.startswith("WARN  iptables") for l in host.lines())


# -- probe details -------------------------------------------------------------------------

def test_module_names_of_modules_dep_and_builtin():
    dep = ("kernel/net/ipv4/ipip.ko.xz: kernel/net/ipv4/tunnel4.ko.xz\n"
           "kernel/net/ipv4/ip_gre.ko.zst: kernel/net/ipv4/gre.ko.zst\n"
           "kernel/net/ipv4/ip-vti.ko.gz:\n")
    assert probe._module_names(dep, dep=True) == {"ipip", "ip_gre", "ip_vti"}
    assert probe._module_names("kernel/net/ipv6/sit.ko\n", dep=False) == {"sit"}


def test_proc_net_route_and_longest_prefix(host):
    host.route("v0", "10.9.0.0/16")
    host.route("v1", "10.9.1.0/24", "10.9.0.1")
    rts = probe.routes(host.root)
    assert probe.default_route(rts) == probe.Route4("eth0", IPv4Network("0.0.0.0/0"),
                                                    "192.0.2.1", 0)
    assert probe.lookup(rts, "10.9.1.7") == "v1"
    assert probe.lookup(rts, "10.9.2.7") == "v0"
    assert probe.lookup(rts, "8.8.8.8") == "eth0"


def test_tunnel_endpoints_in_sysfs_hex():
    assert probe._ipv4_hw("0a:09:00:02") == "10.9.0.2"
    assert probe._ipv4_hw("00:00:00:00") is None
    assert probe._ipv4_hw("02:00:00:00:00:01") is None


# -- the command ---------------------------------------------------------------------------

def test_the_report_and_its_exit_status(host, capsys):
    host.sysctl("net.ipv4.ip_forward", 0)
    assert doctor.main([], {"json": False}, host.readers()) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data plane for each mode (kernel {RELEASE}):"
    assert out[1] == ("  ipip    userspace    no ipip module: not loaded, not built in, not in "
                      f"/lib/modules/{RELEASE}/modules.dep; /dev/net/tun and raw IP protocol 4 "
                      "sockets work")
    assert out[5].startswith("  vti     userspace    no ip_vti module")
    assert out[6] == "findings:"
    assert out[-1] == "tunnels: none"
    host.remove("dev/net/tun")
    assert doctor.main([], {"json": False}, host.readers()) == 1


def test_tunnel_lines(host, capsys):
    host.tunl("tl0", mtu=1480, remote="192.0.2.7", local="192.0.2.5")
    host.tunl("tunnel9", mtu=1476, mode="gre", carrier=False)
    doctor.main([], {"json": False}, host.readers())
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == [
        "tunnels:",
        "  tl0      ipip    userspace  mtu 1480   up    remote 192.0.2.7 local 192.0.2.5  over "
        "eth0  tunld attached",
        "  tunnel9  gre     userspace  mtu 1476   up    remote any local any  no tunld"]


def test_json(host, capsys):
    host.sysctl("net.ipv4.ip_forward", 0)
    assert doctor.main(["--json"], {"json": False}, host.readers()) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"dataplane", "findings", "tunnels"}
    assert r["dataplane"]["ipip"]["plane"] == "userspace"
    assert r["dataplane"]["vti"]["plane"] == "userspace"
    assert {"status": "WARN", "what": "net.ipv4.ip_forward = 0: containers and bridges behind "
            "this host cannot reach the tunnel (the kernel forwards nothing; this host's own "
            "traffic is not affected)", "fix": "sysctl -w net.ipv4.ip_forward=1"} in r["findings"]
    assert {"status": "OK", "what": "running as root", "fix": None} in r["findings"]


def test_json_from_the_global_option(host, capsys):
    doctor.main([], {"json": True}, host.readers())
    assert json.loads(capsys.readouterr().out)["tunnels"] == []


def test_an_unknown_argument_is_one_line():
    with pytest.raises(ConfigError, match='doctor "bogus": unknown argument; tunl doctor takes '
                                          "only --json"):
        doctor.main(["bogus"], {"json": False})


# -- only the overlay's nodes may send into it ------------------------------------------------

SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
MEMBERS_RULE = [nft_chain("input", "input", family="ip", table="tunl_members"),
                nft_rule("input", 4, match(IP_PROTOCOL, 4), match(SADDR, "@members", "!="),
                         {"counter": {"name": "not_member_ipip"}}, {"drop": None},
                         family="ip", table="tunl_members")]


def member_lines(host, members=None):
    f = host.facts()
    f.members.update(members or {})
    return [x.line() for x in doctor.findings(f) if "from any host" in x.what
            or "only from the overlay" in x.what]


def test_a_kernel_overlay_device_without_nftables_protection_is_warned_with_the_fix(host):
    host.link("tunl0", arphrd=768, mtu=1480, address="00:00:00:00", broadcast="00:00:00:00")
    host.nft([{"metainfo": {"version": "1.0.6"}}], "")
    assert member_lines(host) == [
        "WARN  tunl0 (ipip, no remote) is the kernel's device: it decapsulates protocol 4 from "
        "any host, so one outside the overlay can send into it; fix: run `tunl mesh agent` (it "
        "keeps nftables table ip tunl_members with the overlay's nodes), or drop protocol 4 "
        "from other sources"]


def test_without_nft_the_fix_is_to_install_it(host):
    host.link("tunl0", arphrd=768, mtu=1480, address="00:00:00:00", broadcast="00:00:00:00")
    assert member_lines(host)[0].endswith(
        "fix: apt install nftables, then run `tunl mesh agent`: it keeps only the overlay's nodes")


def test_the_mesh_agents_members_table_protects_the_kernel_device_and_is_no_firewall_warning(host):
    host.link("tunl0", arphrd=768, mtu=1480, address="00:00:00:00", broadcast="00:00:00:00")
    host.nft(MEMBERS_RULE, "")
    assert member_lines(host) == [
        "OK    tunl0 (ipip, no remote) takes encapsulated packets only from the overlay's nodes "
        "(nftables table ip tunl_members)"]
    assert host.lines()[-1].startswith("OK    nft: no input or forward chain drops")


def test_the_fallback_device_down_or_a_tunnel_with_remote_needs_no_members(host):
    host.link("tunl0", arphrd=768, mtu=1480, up=False, address="00:00:00:00",
              broadcast="00:00:00:00")
    host.link("ipip1", arphrd=768, mtu=1480, address="c0:00:02:05", broadcast="c0:00:02:07")
    assert member_lines(host) == []


def test_tunld_tunnels_say_whether_tunld_keeps_a_member_set(host):
    host.tunl("tunl0", mode="ipip")
    host.tunl("gre9", mode="gre")
    assert member_lines(host, {"tunl0": 3, "gre9": None}) == [
        "OK    tunl0 (ipip, no remote) takes encapsulated packets only from the overlay's 3 "
        "nodes (tunld drops the rest as not_member)",
        "WARN  gre9 (gre, no remote) takes encapsulated packets from any host: one outside the "
        "overlay can send into it; fix: run `tunl mesh agent` (it hands tunld the overlay's "
        "nodes)"]
    assert member_lines(host) == []            # tunld did not answer: nothing said here
