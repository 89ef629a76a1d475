"""Every example topology (examples/*.toml, found by a glob: a new one is covered) for real.

Each one comes up under a lab name of its own (e<random>, namespaces tl-e<random>-*), so that
it never meets a demo of the same file or another run; every host pings every ping target of
every other host, IPv4 and IPv6; then the lab goes down and nothing of it may be left: no
namespace, no process that was in one, no veth in the root namespace. A few examples are
checked further, on the wire and in the counters, while they are up (CHECKS).
"""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root: the examples run in network namespaces (run as root, e.g. "
                "sudo ./dev test)", allow_module_level=True)
_missing = [t for t in ("ip", "ping", "tcpdump") if shutil.which(t) is None]
if _missing:
    pytest.skip(f"needs {', '.join(_missing)} (./dev setup installs them)",
                allow_module_level=True)

from tunl.lab import control, demo, netns, topology  # noqa: E402

from nsutil import Host, alive, lab_cli, namespaces  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
_NAME = re.compile(r'^name\s*=\s*"[^"]*"', re.MULTILINE)


def ping(host: Host, target: str, count: int = 2, source: str = "") -> subprocess.CompletedProcess:
    src = f"-I {source} " if source else ""
    return host.run(f"ping -n -c {count} -i 0.2 -W 2 {src}{target}", check=False)


def stats_text(host: Host, dev: str) -> tuple[int, int]:
    """(RX packets, TX packets) from the text of `tunl -s tunnel show DEV`."""
    out = host.run(f"tunl -s tunnel show {dev}").stdout.splitlines()
    rx = next(i for i, line in enumerate(out) if line.lstrip().startswith("RX:"))
    tx = next(i for i, line in enumerate(out) if line.lstrip().startswith("TX:"))
    return int(out[rx + 1].split()[0]), int(out[tx + 1].split()[0])


class Tcpdump:
    """tcpdump -l in a namespace, started once it says it is listening."""

    def __init__(self, host: Host, args: str):
        self.p = host.popen(f"tcpdump -l -n {args}", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        seen = ""
        while "listening on" not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.p.stderr], [], [], left)[0], \
                f"tcpdump did not start: {seen}"
            line = self.p.stderr.readline()
            assert line, f"tcpdump exited {self.p.wait()}: {seen}"
            seen += line

    def output(self, timeout: float = 3) -> str:
        """What it printed, once it has its count (-c) or `timeout` s have passed."""
        try:
            out, _ = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.send_signal(2)
            out, _ = self.p.communicate(timeout=5)
        return out


# -- checks for particular examples, while they are up ------------------------------------------

def check_gre_keys(topo: topology.Topology) -> None:
    """Two tunnels, one pair of outer addresses: the key tells them apart on the wire, and
    gre2's packets carry a sequence number and a checksum."""
    a, b = Host(topo.ns_host("A")), Host(topo.ns_host("B"))
    rx_before, _ = stats_text(b, "gre2")
    dump = Tcpdump(b, "-v -i eth0 -c 4 proto gre")
    for target in ("10.50.1.2", "10.50.2.2"):
        r = ping(a, target, count=1)
        assert r.returncode == 0, r.stdout + r.stderr
    out = dump.output()
    gre_lines = [line for line in out.splitlines() if "GREv0" in line]
    assert len(gre_lines) == 4, out
    key1 = [line for line in gre_lines if "key=0x1," in line]
    key2 = [line for line in gre_lines if "key=0x2," in line]
    assert len(key1) == len(key2) == 2, out
    assert all("Flags [key present]" in line for line in key1), out
    for line in key2:
        assert "Flags [checksum present, key present, sequence# present]" in line, out
        assert re.search(r"\bsum 0x[0-9a-f]+, off 0x0, key=0x2, seq \d+,", line), out
    # `tunl -s tunnel show gre2` on B counts what it took: the one request (and sent the reply)
    rx_after, _ = stats_text(b, "gre2")
    assert rx_after == rx_before + 1


def check_isatap(topo: topology.Topology) -> None:
    """A host takes a packet whose outer source is not in its potential router list only if
    the inner source is the ISATAP address of that outer source (isatap_chksrc()): H2, not a
    router of H, sending from a source that is not ISATAP-form is dropped and counted."""
    h, h2 = Host(topo.ns_host("H")), Host(topo.ns_host("H2"))
    target = "2001:db8:5::5efe:172.16.1.2"
    drops = h.counters("isatap0")["rx_drop"].get("isatap_source", 0)
    # from its ISATAP address H2 gets through (what the pings above showed) ...
    assert ping(h2, target, count=1).returncode == 0
    # ... from another address of the same prefix it does not
    h2.run("ip -6 addr add 2001:db8:5::99/64 dev isatap0 nodad")
    r = ping(h2, target, count=2, source="2001:db8:5::99")
    assert r.returncode != 0 and " 0 received" in r.stdout, r.stdout + r.stderr
    assert h.counters("isatap0")["rx_drop"].get("isatap_source", 0) == drops + 2
    # R's packets, from a source that is not ISATAP-form, are taken: R is in H's list
    r = ping(Host(topo.ns_host("R")), target, count=1, source="2001:db8:99::1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert h.counters("isatap0")["rx_drop"].get("isatap_source", 0) == drops + 2


CHECKS = {"gre-keys": check_gre_keys, "isatap": check_isatap}


# -- the test ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example(path: Path, tmp_path):
    name = "e" + uuid.uuid4().hex[:8]
    text, n = _NAME.subn(f'name = "{name}"', path.read_text(), count=1)
    assert n == 1, f"{path.name}: no top-level name line"
    file = tmp_path / path.name
    file.write_text(text)
    topo = topology.load(file)
    assert topo.name == name
    try:
        r = lab_cli("up", str(file))
        assert r.returncode == 0, r.stdout + r.stderr
        # every process of the lab (each host's tunld), to be sure they end with it
        pids = [int(p) for ns in namespaces(name)
                for p in netns.run(["ip", "netns", "pids", ns]).stdout.split()]
        failed = []
        for a, b, target in demo.plan(topo):
            r = ping(Host(topo.ns_host(a)), target)
            if r.returncode != 0:
                failed.append(f"{a.name} -> {b.name} {target}: "
                              + (r.stdout.strip().splitlines() or [r.stderr.strip()])[-1])
        if failed:
            shows = [f"{h.name}: " + Host(topo.ns_host(h)).run("tunl -s tunnel show",
                                                              check=False).stdout
                     for h in topo.hosts]
            pytest.fail(f"{path.name}: {len(failed)} pings failed:\n  " + "\n  ".join(failed)
                        + "\n" + "\n".join(shows))
        if path.stem in CHECKS:
            CHECKS[path.stem](topo)
        r = lab_cli("down", str(file))
        assert r.returncode == 0, r.stdout + r.stderr
        assert namespaces(name) == []
        assert not [p for p in pids if alive(p)]
        root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for h in topo.hosts:
            assert f" {h.port}@" not in root_links and f" {h.port}:" not in root_links
        assert name not in control.running_labs()
    finally:
        control.down(name)


# -- the demo's word on NoRoute -------------------------------------------------------------------

_NOROUTE = re.compile(r"^  NoRoute (\d+) on (\S+): IPv6 multicast the kernel sent into \2,"
                      r" (\d+) MLDv2 reports? to ff02::16 \(for group ff02::2\): a tunnel"
                      r" without remote has no IPv4 destination for it$", re.MULTILINE)


@pytest.mark.parametrize("stem, host, dev", [("sit", "A", "sit2"), ("isatap", "R", "isatap0")])
def test_demo_says_why_a_tunnel_without_remote_counts_noroute(stem, host, dev, tmp_path):
    """The host that forwards joins ff02::2 on its tunnel without remote and reports it with
    MLDv2 (to ff02::16); the tunnel has no IPv4 destination for those reports and counts them
    as NoRoute. The demo says so under that host's counters, with the kernel's own count."""
    import sys
    from nsutil import ENV
    name = "e" + uuid.uuid4().hex[:8]
    text, n = _NAME.subn(f'name = "{name}"', (ROOT / "examples" / f"{stem}.toml").read_text(),
                         count=1)
    assert n == 1
    file = tmp_path / f"{stem}.toml"
    file.write_text(text)
    try:
        r = subprocess.run([sys.executable, "-m", "tunl.lab.cli", "demo", str(file)], env=ENV,
                           capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all 8 pings answered" in r.stdout
        found = _NOROUTE.findall(r.stdout)
        assert len(found) == 1, r.stdout
        noroute, where, mld = found[0]
        # every NoRoute of the tunnel is one of the kernel's MLD reports into it
        assert where == dev and int(noroute) == int(mld) >= 1, r.stdout
        # under the counters of the host that forwards, whose NoRoute column says the same
        section = r.stdout.split(f"\n{host}: tunl -d -s tunnel show\n")[1]
        section = section.split(": tunl -d -s tunnel show\n")[0]
        assert f"NoRoute {noroute} on {dev}:" in section
        lines = section.split(f"  {dev}: ")[1].splitlines()
        tx = next(i for i, line in enumerate(lines) if line.split()[:1] == ["TX:"])
        assert lines[tx].split()[5] == "NoRoute"
        assert lines[tx + 1].split()[4] == noroute
    finally:
        control.down(name)
    assert namespaces(name) == []
