"""`tunl doctor` run for real inside fresh network namespaces (tl-doc-<random>-<name>).

Each test builds what it needs in its own namespace: a veth underlay, a tunl tunnel, a sysctl,
an nft ruleset, and reads the lines doctor prints. Expected lines are written by hand.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from nsutil import TUNL, Host, Net, ebpf_unavailable

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces, TUN devices and raw sockets",
                allow_module_level=True)


def _kernel_has(module: str) -> bool:
    """Whether this kernel has a tunnel module (loaded, built in, or to load)."""
    if os.path.exists(f"/sys/module/{module}"):
        return True
    base = f"/lib/modules/{os.uname().release}"
    for name in ("modules.dep", "modules.builtin"):
        try:
            with open(f"{base}/{name}") as f:
                if f"/{module}.ko" in f.read():
                    return True
        except OSError:
            pass
    return False


NO_TUNNEL_MODULES = not any(_kernel_has(m) for m in ("ipip", "ip_gre", "sit", "ip_vti"))
# without a module: eBPF where the kernel takes tunl's programs (tried here), else userspace
NO_MODULE_PLANE = "userspace" if ebpf_unavailable() else "ebpf"


@pytest.fixture
def host():
    net = Net()
    net.prefix = f"tl-doc-{uuid.uuid4().hex[:6]}-"
    try:
        h = net.host("a")
        # a fresh namespace takes ip_forward from init_net (devconf_inherit_init_net = 0):
        # make it the 0 of a host that never enabled forwarding, whatever this machine has
        h.run("sysctl -qw net.ipv4.ip_forward=0")
        yield h
    finally:
        net.close()


@pytest.fixture
def underlay(host):
    """A veth pair with MTU 1400 (v0 10.9.0.1/24 here, v1 its peer) and tunl tunnel tl0 to
    10.9.0.2 over it."""
    host.run("ip link add v0 mtu 1400 type veth peer name v1 mtu 1400 && "
             "ip addr add 10.9.0.1/24 dev v0 && ip link set v0 up && ip link set v1 up")
    host.tunl("tunnel add tl0 mode ipip remote 10.9.0.2 local 10.9.0.1")
    host.run("ip link set tl0 up")
    return host


def doctor(h: Host, opts: str = "") -> tuple[int, list[str]]:
    p = h.run(f"{TUNL} {opts} doctor", check=False)
    assert p.stderr == "", p.stderr          # one report, never a traceback
    return p.returncode, p.stdout.splitlines()


def test_a_fresh_namespace(host):
    rc, out = doctor(host)
    assert rc == 0, "\n".join(out)
    assert ("WARN  net.ipv4.ip_forward = 0: containers and bridges behind this host cannot "
            "reach the tunnel (the kernel forwards nothing; this host's own traffic is not "
            "affected); fix: sysctl -w net.ipv4.ip_forward=1") in out
    assert "OK    running as root" in out
    assert "OK    /dev/net/tun opens: the userspace data plane can create its TUN devices" in out
    assert ("OK    raw sockets for IP protocols 4 (ipip), 47 (gre) and 41 (sit) open: the "
            "userspace data plane can send and receive") in out
    assert "OK    no default route and no tunnel remote: no underlay MTU to check" in out
    assert out[-1] == "tunnels: none"


@pytest.mark.skipif(not NO_TUNNEL_MODULES, reason="this kernel has tunnel modules")
def test_without_tunnel_modules_ipip_gre_sit_are_ebpf_or_userspace_and_vti_tunlds(host):
    _, out = doctor(host)
    planes = {l.split()[0]: l.split()[1] for l in out[1:6]}
    assert planes == {"ipip": NO_MODULE_PLANE, "gre": NO_MODULE_PLANE, "sit": NO_MODULE_PLANE,
                      "isatap": NO_MODULE_PLANE, "vti": "userspace"}
    assert out[5].endswith("; tunld carries vti itself (ESP): /dev/net/tun and raw IP protocol "
                           "50 sockets work")


def test_json(host):
    p = host.run(f"{TUNL} -j doctor", check=False)
    r = json.loads(p.stdout)
    assert p.returncode == 0
    assert set(r) == {"dataplane", "findings", "tunnels"}
    assert {"status": "WARN", "what": "net.ipv4.ip_forward = 0: containers and bridges behind "
            "this host cannot reach the tunnel (the kernel forwards nothing; this host's own "
            "traffic is not affected)", "fix": "sysctl -w net.ipv4.ip_forward=1"} in r["findings"]
    if NO_TUNNEL_MODULES:
        assert [r["dataplane"][m]["plane"] for m in ("ipip", "gre", "sit", "vti")] == [
            NO_MODULE_PLANE, NO_MODULE_PLANE, NO_MODULE_PLANE, "userspace"]


def test_not_root(host):
    p = host.run(f"setpriv --reuid=65534 --regid=65534 --clear-groups {TUNL} doctor", check=False)
    if p.returncode not in (0, 1) or "Traceback" in p.stderr:
        pytest.skip(f"tunl cannot run as uid 65534 here: {(p.stderr or p.stdout).strip()[-200:]}")
    out = p.stdout.splitlines()
    assert p.returncode == 1
    assert ("FAIL  not root (uid 65534): tunl needs root to create tunnels, and this report "
            "misses what only root can see; fix: run it as root: sudo tunl doctor") in out
    assert ("FAIL  /dev/net/tun cannot be opened (Permission denied): userspace tunnels cannot "
            "be created; fix: run tunl as root; a container needs the device allowed: docker "
            "run --device /dev/net/tun") in out


def test_sys_of_another_namespace(host):
    """nsenter enters the namespace but keeps the caller's /sys: doctor says so."""
    if shutil.which("nsenter") is None:
        pytest.skip("nsenter is not installed")
    p = subprocess.run(["nsenter", f"--net=/run/netns/{host.ns}", TUNL, "doctor"],
                       capture_output=True, text=True, timeout=60)
    assert ("WARN  /sys/class/net shows other devices than this network namespace has "
            "(/proc/net/dev): /sys belongs to another namespace (entered with nsenter?), so the "
            "device facts below may be wrong; fix: enter the namespace with ip netns exec, which "
            "mounts its own /sys") in p.stdout.splitlines()


def test_ip_forward_on(host):
    host.run("sysctl -qw net.ipv4.ip_forward=1")
    _, out = doctor(host)
    assert ("OK    net.ipv4.ip_forward = 1: containers and bridges behind this host can reach "
            "the tunnel") in out


def test_strict_rp_filter_on_a_tunl_tunnel(underlay):
    underlay.run("sysctl -qw net.ipv4.conf.tl0.rp_filter=1")
    rc, out = doctor(underlay)
    assert rc == 1
    assert ("FAIL  rp_filter on tl0 is 1 (strict: the larger of net.ipv4.conf.all.rp_filter = 0 "
            "and net.ipv4.conf.tl0.rp_filter = 1) and no route leads back out tl0: "
            "fib_validate_source() drops every packet tl0 receives; fix: sysctl -w "
            "net.ipv4.conf.tl0.rp_filter=2 (loose), or route the far side's networks through "
            "tl0") in out
    underlay.run("ip route add 10.42.2.0/24 dev tl0")
    rc, out = doctor(underlay)
    assert rc == 0
    assert ("WARN  rp_filter on tl0 is 1 (strict: the larger of net.ipv4.conf.all.rp_filter = 0 "
            "and net.ipv4.conf.tl0.rp_filter = 1): fib_validate_source() drops a packet tl0 "
            "receives unless its source is in 10.42.2.0/24; fix: sysctl -w "
            "net.ipv4.conf.tl0.rp_filter=2 (loose)") in out


def test_an_underlay_of_mtu_1400_gives_ipip_1380(underlay):
    rc, out = doctor(underlay)
    assert rc == 0, "\n".join(out)
    assert ("WARN  underlay v0 (route to 10.9.0.2 of tl0) has MTU 1400, below 1500: tunnels "
            "over it shrink to MTU ipip 1380, gre 1376, sit 1380; fix: keep what enters the "
            "tunnels within that (containers behind them too), or raise v0's MTU where its "
            "network carries 1500: ip link set v0 mtu 1500") in out
    assert out[-2:] == [
        "tunnels:",
        f"  tl0  ipip    {NO_MODULE_PLANE:<9}  mtu 1380   up    remote 10.9.0.2 local 10.9.0.1  "
        "over v0  tunld attached"]


def test_the_default_route_is_an_underlay(host):
    host.run("ip link add v0 mtu 1400 type veth peer name v1 && ip addr add 10.9.0.1/24 dev v0"
             " && ip link set v0 up && ip link set v1 up && ip route add default via 10.9.0.254")
    _, out = doctor(host)
    assert ("WARN  underlay v0 (default route) has MTU 1400, below 1500: tunnels over it shrink "
            "to MTU ipip 1380, gre 1376, sit 1380; fix: keep what enters the tunnels within "
            "that (containers behind them too), or raise v0's MTU where its network carries "
            "1500: ip link set v0 mtu 1500") in out


def test_a_tunnel_bigger_than_its_underlay(underlay):
    underlay.run("ip link set tl0 mtu 1480")
    rc, out = doctor(underlay)
    assert rc == 1
    assert ("FAIL  tl0 has MTU 1480, more than v0 (MTU 1400) carries for ipip (1380): bigger "
            "packets are fragmented, or dropped when they have DF; fix: ip link set tl0 mtu "
            "1380") in out


def test_a_tunnel_without_tunld(underlay):
    underlay.tunl("daemon stop")
    _, out = doctor(underlay)
    assert ("WARN  tl0 is up but no tunld holds it (no carrier): packets routed into it are "
            "dropped; fix: tunl daemon start") in out
    assert out[-1].endswith("over v0  no tunld")


@pytest.fixture(scope="module")
def nft():
    if shutil.which("nft") is None:
        p = subprocess.run(["apt-get", "install", "-y", "nftables"], capture_output=True,
                           text=True, timeout=600)
        if p.returncode != 0 or shutil.which("nft") is None:
            last = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"nft is not installed and `apt-get install -y nftables` failed: {last[0]}")
    return shutil.which("nft")


def test_nft_dropping_protocol_4(underlay, nft):
    underlay.run("nft add table inet t && nft add chain inet t input "
                 "'{ type filter hook input priority 0; policy accept; }' && "
                 "nft add rule inet t input ip protocol 4 drop")
    rc, out = doctor(underlay)
    assert rc == 1                      # tl0 is an ipip tunnel: its packets cannot come in
    assert ("FAIL  nft may drop IP protocol 4 (ipip): chain inet t input has rule `ip protocol "
            "ipencap drop`; fix: nft insert rule inet t input ip protocol 4 accept") in out


def test_nft_policy_drop_in_forward(host, nft):
    host.run("nft add table ip f && nft add chain ip f fw "
             "'{ type filter hook forward priority 0; policy drop; }' && "
             "nft add rule ip f fw ct state established,related accept && "
             "nft add rule ip f fw ip protocol gre accept")
    rc, out = doctor(host)
    assert rc == 0
    assert ("WARN  nft may drop IP protocols 4 (ipip) and 41 (sit) forwarded to tunnel hosts "
            "behind this one: chain ip f fw has policy drop and no rule that accepts them; fix: "
            "nft insert rule ip f fw ip protocol { 4, 41 } accept") in out
