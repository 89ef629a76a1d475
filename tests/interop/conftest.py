"""The interop rig: a guest running Debian's kernel, with its own ipip, ip_gre and sit
modules, on an underlay bridge beside host-side namespaces that run tunl's eBPF or userspace
data plane (every test runs on both). Tests build a tunnel on each side with the same words
and check what crosses.

Everything is skipped, with the reason printed, where the rig cannot be built (not root, no
QEMU, no kernel package); `./dev interop` runs these tests alone.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))

import nsutil  # noqa: E402
from nsutil import Host, Net  # noqa: E402

import image  # noqa: E402
from vm import QEMU, VM, VMError  # noqa: E402

GUEST = "172.16.165.244"
UNDERLAY = "/16"
RESULTS: list[tuple[str, str, str, str]] = []
PLANE: list[str] = ["userspace"]        # the host side's data plane of the running test


class Rig:
    def __init__(self, net: Net, ul: Host, vm: VM):
        self.net, self.ul, self.vm = net, ul, vm
        self.nodes: list[Host] = []
        self.undo: list[str] = []

    def node(self, name: str, addr: str) -> Host:
        """A host-side namespace on the underlay, with its own tunld."""
        h = self.net.host(name)
        self.net.attach(self.ul, h, addr + UNDERLAY)
        self.nodes.append(h)
        return h

    def guest(self, cmd: str, undo: str | None = None, **kw) -> str:
        """Run cmd in the guest (host userland, guest kernel); `undo` runs after the test."""
        if undo:
            self.undo.append(undo)
        return self.vm.run(cmd, **kw)[1]

    def reset(self) -> None:
        for cmd in reversed(self.undo):
            self.vm.run(cmd, check=False)
        self.undo.clear()
        for h in self.nodes:
            self.net.remove(h)
        self.nodes.clear()
        # the next test's nodes reuse these addresses with new MAC addresses
        self.vm.run("ip neigh flush dev eth0", check=False)


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, a tap device, QEMU)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun for the guest's tap device"
    return None


@pytest.fixture(scope="session")
def rig():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    try:
        kernel, initrd, kver = image.build()
    except (image.ImageError, OSError) as e:
        pytest.skip(f"cannot build the guest image from Debian's packages: {e}")
    net = Net()
    try:
        ul = net.host("ul")
        ul.run("ip link add br0 type bridge && ip link set br0 up && "
               "ip tuntap add tap0 mode tap && ip link set tap0 master br0 up")
        vm = VM(kernel, initrd, guest_ip=GUEST + UNDERLAY, netns=ul.ns, tap="tap0")
        try:
            vm.start()
        except VMError as e:
            pytest.skip(f"the guest does not boot here: {e}")
        try:
            for mod in ("ipip", "ip_gre", "sit"):
                vm.run(f"modprobe {mod}", chroot=False)
            # IPsec for vti: xfrm, ESP and the two suites' crypto (seqiv and echainiv make
            # their IVs from drbg); a module the kernel has built in is no error
            for mod in ("xfrm_user", "esp4", "ip_vti", "gcm", "ghash_generic", "ctr",
                        "seqiv", "echainiv", "authenc", "cbc", "hmac", "jitterentropy_rng",
                        "drbg"):
                vm.run(f"modprobe {mod}", chroot=False, check=False)
            vm.kver = kver
            print(f"\nguest: Linux {kver} booted in {vm.boot_time:.1f} s", file=sys.stderr)
            r = Rig(net, ul, vm)
            yield r
        finally:
            vm.stop()
    finally:
        net.close()


@pytest.fixture
def guest(rig):
    """The rig for tests that run tunl in the guest only (its kernel data plane)."""
    yield rig
    rig.reset()


@pytest.fixture(params=["ebpf", "userspace"])
def interop(rig, request):
    """The rig, with the host side's tunnels on one data plane (TUNL_DATAPLANE)."""
    if request.param == "ebpf":
        from tunl.kernel.probe import bpf_load
        why = bpf_load()
        if why:
            pytest.skip(f"no eBPF data plane here: {why}")
    nsutil.ENV["TUNL_DATAPLANE"] = PLANE[0] = request.param
    try:
        yield rig
    finally:
        nsutil.ENV.pop("TUNL_DATAPLANE", None)
        rig.reset()


@pytest.fixture
def record():
    """record(case, direction, ok): a row of the matrix printed at the end of the run."""
    def add(case: str, direction: str, ok: bool, detail: str = "") -> None:
        RESULTS.append((PLANE[0], case, direction,
                        ("ok" if ok else "FAIL") + (f" {detail}" if detail else "")))
    return add


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    w = max(len(c) for _, c, _, _ in RESULTS)
    tr = terminalreporter
    tr.section("interop matrix: tunl eBPF and userspace (host) against the Linux kernel (guest)")
    tr.write_line(f"{'plane':<9}  {'case':<{w}}  {'direction':<28}  result")
    for plane, case, direction, result in RESULTS:
        tr.write_line(f"{plane:<9}  {case:<{w}}  {direction:<28}  {result}")
