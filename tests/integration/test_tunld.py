"""tunld holds up: it heals itself, keeps its record where `ip` cannot reach it, follows route
bursts at the cost of the change, and stays small with many tunnels. Everything is observed
from outside: ping, /proc, `ip`, and tunl's own commands.
"""
from __future__ import annotations

import configparser
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tunl.lab.netns import mirror_rows
from nsutil import A_UL, B_UL, ENV, TUNL, Host, Net, alive, one_to_one, sh, tunld_pids, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

UNIT = os.path.join(os.path.dirname(__file__), "..", "..", "systemd", "tunld@.service")


@pytest.fixture
def pair():
    net = Net()
    try:
        yield (net, *one_to_one(net))
    finally:
        net.close()


def status(h: Host) -> dict:
    return json.loads(h.tunl("-j daemon status").stdout)






def ping_back_after(h: Host, dst: str, timeout: float = 5.0) -> float | None:
    """Seconds until a ping from h to dst is answered (probing every 50 ms), None if never;
    nothing but ping runs meanwhile."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if h.run(f"ping -n -c 1 -W 0.05 {dst}", check=False).returncode == 0:
            return time.monotonic() - t0
    return None


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])       # utime + stime


# -- 1. self-healing --------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_traffic_comes_back_by_itself_when_the_data_plane_dies(pair, sig):
    _, a, _ = pair
    st = status(a)
    os.kill(st["pid"], sig)
    assert wait_for(lambda: not alive(st["pid"]), 5), "the data plane did not end"
    took = ping_back_after(a, "10.42.2.1")
    print(f"\n{signal.Signals(sig).name}: traffic back after {took:.2f} s" if took else "")
    assert took is not None, "traffic did not come back with nothing typed"
    after = status(a)
    assert after["pid"] != st["pid"] and after["supervisor"] == st["supervisor"]
    assert after["tunnels"] == ["tunl0"]


def test_killing_the_supervisor_leaves_traffic_up_and_a_new_supervisor_in_charge(pair):
    _, a, _ = pair
    st = status(a)
    pinger = a.popen("ping -n -i 0.05 -c 40 10.42.2.1", stdout=subprocess.PIPE)
    time.sleep(0.3)
    os.kill(st["supervisor"], signal.SIGKILL)
    out, _ = pinger.communicate(timeout=20)
    assert " 0% packet loss" in out, out
    new = wait_for(lambda: (s := status(a))["supervisor"] != st["supervisor"] and s, 3)
    assert new and new["pid"] == st["pid"], "the data plane should have kept running"
    assert alive(new["supervisor"])
    # and the new supervisor heals the data plane in turn
    os.kill(new["pid"], signal.SIGKILL)
    assert ping_back_after(a, "10.42.2.1") is not None


def test_both_processes_are_named_tunld(pair):
    _, a, _ = pair
    st = status(a)
    for pid, role in ((st["pid"], "data plane"), (st["supervisor"], "supervisor")):
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "tunld"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0].decode() == f"tunld: {role}"
    assert sorted(tunld_pids(a)) == sorted([st["pid"], st["supervisor"]])


def test_ip_netns_del_takes_tunld_with_it():
    net = Net()
    try:
        h = net.host("gone")
        h.tunl("tunnel add tunl0 mode ipip remote 172.16.1.2 local 172.16.1.1")
        pids = tunld_pids(h)
        assert len(pids) == 2
        net.names.remove(h.ns)
        sh(f"ip netns del {h.ns}")              # nothing killed: tunld must notice
        assert wait_for(lambda: not any(alive(p) for p in pids), 5), \
            "tunld outlived its network namespace"
    finally:
        net.close()


def test_daemon_stop_ends_both_processes_and_nothing_restarts_them(pair):
    _, a, _ = pair
    pids = tunld_pids(a)
    out = a.tunl("daemon stop").stdout
    assert "carry no traffic" in out, out
    assert wait_for(lambda: not any(alive(p) for p in pids), 5)
    time.sleep(1.5)
    assert tunld_pids(a) == [], "an orderly stop was undone"
    # the next command starts tunld, which takes the tunnel back
    assert a.tunl("tunnel show tunl0").stdout.startswith("tunl0: ip/ip remote")
    assert a.ping("10.42.2.1", count=2).returncode == 0


def test_the_cli_gives_up_on_a_stopped_tunld_with_one_line(pair):
    _, a, _ = pair
    pids = tunld_pids(a)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = a.run(f"TUNL_TIMEOUT=1 {TUNL} tunnel show", check=False, timeout=20)
        took = time.monotonic() - t0
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer within 1 s" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert took < 10, f"the CLI waited {took:.1f} s"


def unit_command(ns: str) -> list[str]:
    """ExecStart of the shipped unit, for network namespace `ns`, with this checkout's tunld."""
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(UNIT)
    argv = shlex.split(unit["Service"]["ExecStart"].replace("%I", ns))
    tunld = os.path.join(os.path.dirname(sys.executable), "tunld")
    return [tunld if a == "/usr/local/bin/tunld" else a for a in argv]


@contextlib.contextmanager
def service(name: str):
    """A fresh namespace with tunld started by the unit's command line, as systemd starts it;
    yields (host, main process, tunld status)."""
    net = Net()
    try:
        h = net.host(name)
        argv = unit_command(h.ns)
        assert argv[:4] == ["/usr/bin/ip", "netns", "exec", h.ns]
        main = subprocess.Popen(argv, env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # asked without starting one: `tunl daemon status` would start a tunld of its
            # own if it came before the unit's
            probe = (f"{sys.executable} -c 'import json;from tunl.daemon import client;"
                     "print(json.dumps(client.call(\"status\", autostart=False)))'")
            st = wait_for(lambda: (r := h.run(probe, check=False)).returncode == 0
                          and json.loads(r.stdout), 10)
            assert st, "tunld did not answer"
            yield h, main, st
        finally:
            if main.poll() is None:
                main.kill()
                main.wait()
    finally:
        net.close()


def test_the_systemd_unit_runs_tunld_in_its_namespace_and_stops_on_sigterm():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(UNIT)
    assert unit["Service"]["Restart"] == "always" and unit["Service"]["KillMode"] == "mixed"
    with service("svc") as (h, main, st):
        # `ip netns exec` execs tunld: the main process is the supervisor, as systemd sees it
        assert st["supervisor"] == main.pid
        h.tunl("tunnel add tunl0 mode ipip remote 172.16.1.2 local 172.16.1.1")
        os.kill(st["pid"], signal.SIGKILL)           # the data plane dies: restarted
        new = wait_for(lambda: (s := status(h))["pid"] != st["pid"] and s, 5)
        assert new and new["tunnels"] == ["tunl0"]
        main.send_signal(signal.SIGTERM)             # systemctl stop (KillMode=mixed)
        assert main.wait(10) == 0
        assert wait_for(lambda: not alive(new["pid"]), 5), "the data plane outlived stop"


def test_under_a_service_manager_the_data_plane_ends_with_the_supervisor():
    """systemd restarts the whole service when its main process dies; the data-plane process
    must not linger beside the new one."""
    with service("svc9") as (_h, main, st):
        main.kill()
        main.wait()
        assert wait_for(lambda: not alive(st["pid"]), 5)


# -- 2. a record that `ip` cannot break or forge -----------------------------------------------

def test_an_alias_changed_by_hand_loses_nothing(pair):
    _, a, _ = pair
    a.run('ip link set tunl0 alias "my uplink"')
    os.kill(status(a)["pid"], signal.SIGKILL)
    assert ping_back_after(a, "10.42.2.1") is not None
    assert a.tunl("tunnel show").stdout.startswith("tunl0: ip/ip remote 172.16.232.194")
    assert "alias tunl:" in a.run("ip link show tunl0").stdout      # put back
    a.tunl("tunnel change tunl0 ttl 64")                            # still tunl's own
    a.tunl("tunnel change tunl0 ttl inherit")


def test_a_foreign_tun_device_with_a_tunl_alias_is_not_taken_over(pair):
    _, a, _ = pair
    a.run("ip tuntap add mode tun name fake0 && "
          "ip link set fake0 alias 'tunl:{\"name\":\"fake0\",\"mode\":\"ipip\"}'")
    os.kill(status(a)["pid"], signal.SIGKILL)
    assert ping_back_after(a, "10.42.2.1") is not None
    assert status(a)["tunnels"] == ["tunl0"]
    r = a.tunl("tunnel del fake0", check=False)
    assert r.returncode == 1 and "did not create" in r.stderr, r.stderr
    assert "fake0" in a.run("ip link show fake0").stdout           # left alone
    a.run("ip link del fake0")


# -- 3. route events in O(change) ------------------------------------------------------------

def kernel_routes(h: Host, dev: str) -> list:
    return sorted(row for fam in (4, 6) for row in mirror_rows(
        json.loads(h.run(f"ip -{fam} -j route show table all dev {dev}").stdout), fam))


def mirror(h: Host, dev: str) -> list:
    r = h.run(f"{sys.executable} -c 'import json; from tunl.daemon import client; "
              f"print(json.dumps(client.call(\"routes\", name=\"{dev}\")))'")
    return json.loads(r.stdout)


def burst(h: Host, lines: list[str]) -> None:
    p = subprocess.run(["ip", "-n", h.ns, "-batch", "-"], input="\n".join(lines) + "\n",
                       text=True, capture_output=True)
    assert p.returncode == 0, p.stderr


@pytest.fixture
def nbma():
    net = Net()
    try:
        a, b = net.host("A"), net.host("B")
        net.underlay({a: f"{A_UL}/16", b: f"{B_UL}/16"})
        yield net, a, b
    finally:
        net.close()


@pytest.mark.parametrize("rcvbuf", [None, 32768], ids=["events", "overflow"])
def test_a_burst_of_routes_leaves_the_mirror_exact_and_tunld_idle(nbma, rcvbuf):
    _, a, _ = nbma
    env = f"TUNLD_EVENT_RCVBUF={rcvbuf} " if rcvbuf else ""
    a.run(f"{env}{TUNL} tunnel add tunl0 mode ipip")
    a.run("ip link set tunl0 up && ip addr add 10.42.1.0/32 dev tunl0 && "
          "ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up")
    pid = status(a)["pid"]
    # 10,000 routes on another device, 2,000 on the tunnel, some in another table
    burst(a, [f"route add 10.{100 + i // 250}.{i % 250}.0/24 dev d0" for i in range(10000)] +
          [f"route add 10.42.{2 + i // 250}.{i % 250}/32 via 172.16.{i % 200}.{1 + i % 250} "
           f"dev tunl0 onlink" for i in range(1900)] +
          [f"route add 10.43.{i}.0/24 via 172.16.9.{i} dev tunl0 onlink table 100"
           for i in range(1, 101)])
    want = kernel_routes(a, "tunl0")
    assert len(want) == 2000
    assert wait_for(lambda: mirror(a, "tunl0") == want, 10), "the mirror is not the kernel's"
    # then delete half of them and change some
    burst(a, [f"route del 10.42.{2 + i // 250}.{i % 250}/32 dev tunl0" for i in range(0, 1900, 2)]
          + [f"route replace 10.43.{i}.0/24 via 172.16.8.{i} dev tunl0 onlink table 100"
             for i in range(1, 51)])
    want = kernel_routes(a, "tunl0")
    assert wait_for(lambda: mirror(a, "tunl0") == want, 10), "the mirror is not the kernel's"
    time.sleep(0.5)
    before = cpu_ticks(pid)
    time.sleep(2)
    idle = (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") / 2
    # a loop that does not settle takes a whole core; a busy machine adds a few ticks
    assert idle < 0.5, f"tunld busy at {idle:.0%} of a core after the burst"
    st = status(a)
    assert st["pid"] == pid
    if rcvbuf:
        assert st["overflows"] >= 1, "the burst should have overflowed the small event buffer"


# -- 4. many tunnels --------------------------------------------------------------------------

def test_200_tunnels_share_a_bounded_number_of_threads_and_sit_idle(nbma):
    _, a, _ = nbma
    script = ("import os\nfrom tunl.daemon import client\n"
              "for i in range(200):\n"
              "    client.call('add', spec={'name': f'g{i}', 'mode': 'gre', 'ikey': i + 1,"
              " 'okey': i + 1, 'remote': '172.16.232.194', 'local': '172.16.232.172'},"
              " dataplane=os.environ.get('TUNL_DATAPLANE', 'auto'))\n")
    a.run(f"{sys.executable} -c {shlex.quote(script)}", timeout=300)
    a.run("for i in $(seq 0 199); do ip link set g$i up; done")
    st = status(a)
    assert len(st["tunnels"]) == 200
    assert st["threads"] <= 8, st["threads"]
    lines = a.tunl("tunnel show").stdout.splitlines()
    assert sum(line.startswith("g") for line in lines) == 200
    time.sleep(1)
    before = cpu_ticks(st["pid"])
    time.sleep(2)
    idle = (cpu_ticks(st["pid"]) - before) / os.sysconf("SC_CLK_TCK") / 2
    assert idle < 0.5, f"tunld busy at {idle:.0%} of a core with 200 idle tunnels"


# -- 8. the outer source ---------------------------------------------------------------------

def test_a_local_address_gone_from_the_host_is_noroute_until_it_returns(nbma):
    _, a, b = nbma
    a.run("ip addr add 172.16.232.180/16 dev eth0")
    a.tunl("tunnel add tunl0 mode ipip remote 172.16.232.194 local 172.16.232.180")
    b.tunl("tunnel add tunl0 mode ipip remote 172.16.232.180 local 172.16.232.194")
    for h, mine, theirs in ((a, "10.42.1", "10.42.2"), (b, "10.42.2", "10.42.1")):
        h.run(f"ip addr add {mine}.1/24 dev tunl0 && ip link set tunl0 up && "
              f"ip route add {theirs}.0/24 dev tunl0")
    assert ping_back_after(a, "10.42.2.1") is not None      # a fresh underlay: give it time
    a.run("ip addr del 172.16.232.180/16 dev eth0")
    sent = a.counters()["tx_packets"]
    cap = b.popen("tcpdump -n -l -i eth0 ip proto 4 and src 172.16.232.180",
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(1)
    assert a.ping("10.42.2.1", count=3).returncode != 0
    time.sleep(0.3)
    cap.terminate()
    seen, _ = cap.communicate(timeout=10)
    assert seen.strip() == "", f"outer packets left with a source the host no longer has:\n{seen}"
    st = a.counters()
    assert st["tx_packets"] == sent
    assert st["tx_carrier_errors"] >= 3 and st["tx_drop"]["no_route"] >= 3, st   # NoRoute
    a.run("ip addr add 172.16.232.180/16 dev eth0")
    assert ping_back_after(a, "10.42.2.1") is not None


def test_outer_packets_are_routed_from_the_local_address_as_the_path_was_looked_up(nbma):
    """A source rule for the tunnel's local address routes its outer packets; tunld's raw
    sends must take the route its own lookup (with that source) found, not loop back into
    the tunnel through the main table."""
    _, a, b = nbma
    a.tunl(f"tunnel add tunl0 mode ipip local {A_UL}")
    a.run("ip addr add 10.42.1.0/32 dev tunl0 && ip link set tunl0 up && "
          "ip route add 10.99.0.0/16 dev tunl0 && "
          f"ip rule add from {A_UL} lookup 100 && "
          f"ip route add 10.99.0.0/16 via {B_UL} dev eth0 table 100")
    cap = b.popen("tcpdump -n -l -i eth0 ip proto 4", stdout=subprocess.PIPE,
                  stderr=subprocess.DEVNULL)
    time.sleep(1)
    a.run("python3 -c 'import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
          "for i in range(20): s.sendto(b\"x\", (\"10.99.1.%d\" % (i + 1), 9))'")
    time.sleep(0.5)
    cap.terminate()
    seen, _ = cap.communicate(timeout=10)
    outer = [line for line in seen.splitlines() if f"{A_UL} > 10.99.1." in line]
    assert len(outer) == 20, seen
    assert a.counters()["tx_packets"] == 20


def mirror_is_kernels(h: Host, dev: str = "tunl0", timeout: float = 5) -> bool:
    return bool(wait_for(lambda: mirror(h, dev) == kernel_routes(h, dev), timeout, 0.1))


@pytest.fixture
def nbma_tunnel(nbma):
    _, a, b = nbma
    a.tunl("tunnel add tunl0 mode ipip")
    a.run("ip addr add 10.42.1.0/32 dev tunl0 && ip link set tunl0 up && "
          "ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up && "
          f"ip route add 10.42.2.0/24 via {B_UL} dev tunl0 onlink && "
          f"ip route add 10.42.3.0/24 via 172.16.232.7 dev tunl0 onlink && "
          f"ip route add 10.42.4.0/24 via 172.16.232.8 dev tunl0 onlink table 100")
    assert mirror_is_kernels(a)
    return a, b


def test_routes_the_kernel_flushes_silently_leave_the_mirror(nbma_tunnel):
    """fib_sync_down_dev() removes a device's IPv4 routes when it goes down, and a replace
    that moves a route to another device sends no RTM_DELROUTE for the old one."""
    a, _ = nbma_tunnel
    a.run("ip route replace 10.42.3.0/24 dev d0")
    assert mirror_is_kernels(a), (mirror(a, "tunl0"), kernel_routes(a, "tunl0"))
    a.run("ip link set tunl0 down && ip link set tunl0 up")
    assert not any(r[1] for r in kernel_routes(a, "tunl0")), "the kernel kept its routes"
    assert mirror_is_kernels(a), (mirror(a, "tunl0"), kernel_routes(a, "tunl0"))


def test_a_renamed_tunnel_keeps_working_under_its_new_name(nbma_tunnel):
    a, _ = nbma_tunnel
    pid = status(a)["pid"]
    a.run("ip link set tunl0 down && ip link set tunl0 name tn9 && ip link set tn9 up && "
          f"ip route add 10.42.2.0/24 via {B_UL} dev tn9 onlink")
    assert wait_for(lambda: status(a)["tunnels"] == ["tn9"], 5)
    assert a.tunl("tunnel show tn9").stdout.startswith("tn9: ip/ip remote any")
    assert mirror_is_kernels(a, "tn9")
    a.tunl("tunnel add tunl0 mode gre key 5")                 # the old name is free again
    a.run("ip link del tn9")
    assert wait_for(lambda: status(a)["tunnels"] == ["tunl0"], 5)
    time.sleep(0.5)
    before = cpu_ticks(pid)
    time.sleep(1)
    assert cpu_ticks(pid) - before < os.sysconf("SC_CLK_TCK") // 10, "tunld spins"
    assert status(a)["pid"] == pid


def test_paths_follow_the_underlay_while_other_routes_churn(pair):
    """Events about other devices arrive all the time on a busy host: they must not keep
    tunld from seeing that the path to the peer now has a smaller MTU."""
    _, a, _ = pair
    churn = a.popen("sh -c 'while :; do ip route add 192.0.2.0/24 dev lo table 200; "
                    "ip route del 192.0.2.0/24 dev lo table 200; sleep 0.1; done'")
    try:
        time.sleep(0.5)
        assert a.ping("10.42.2.1", extra="-M do -s 1400").returncode == 0
        a.run(f"ip route add {B_UL}/32 dev eth0 mtu 1300")
        got = wait_for(lambda: "mtu = 1280" in (r := a.run(
            "ping -n -c 1 -W 1 -M do -s 1400 10.42.2.1", check=False)).stdout + r.stderr
            or "mtu=1280" in r.stderr, 5, 0.2)
        assert got, "the smaller path MTU was not seen while routes churned"
    finally:
        churn.terminate()
        churn.wait()


def test_with_no_record_the_tunnels_are_taken_back_by_their_alias(pair):
    """tunl 0.1 kept no record (and /run may be wiped while the devices stay)."""
    _, a, _ = pair
    st = status(a)
    a.run(f"{sys.executable} -c 'import shutil; from tunl.daemon.state import state_dir; "
          "shutil.rmtree(state_dir())'")
    os.kill(st["pid"], signal.SIGKILL)
    assert ping_back_after(a, "10.42.2.1") is not None
    assert status(a)["tunnels"] == ["tunl0"]


def test_two_tunnels_that_swap_names_in_one_go_keep_their_own_specs(nbma):
    _, a, _ = nbma
    a.tunl("tunnel add ga mode gre key 1")
    a.tunl("tunnel add gb mode gre key 2")
    pid = status(a)["pid"]
    burst(a, ["link set ga name tmp0", "link set gb name ga", "link set tmp0 name gb"])

    def keys():
        return {t["ifname"]: t.get("ikey") for t in a.tunnels()}
    assert wait_for(lambda: keys() == {"ga": 2, "gb": 1}, 5), keys()
    assert '"ikey":2' in a.run("ip link show ga").stdout        # the alias went with it
    os.kill(pid, signal.SIGKILL)                                 # and the record too
    assert wait_for(lambda: status(a)["pid"] != pid, 5)
    assert keys() == {"ga": 2, "gb": 1}


def test_a_tunnel_renamed_while_no_tunld_ran_is_taken_back_under_its_new_name(nbma):
    _, a, _ = nbma
    a.tunl("tunnel add ga mode gre key 1")
    st = status(a)
    for pid in (st["supervisor"], st["pid"]):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(st["pid"]) and not alive(st["supervisor"]), 5)
    a.run("ip link set ga name gz")
    assert [t["ifname"] for t in a.tunnels()] == ["gz"]         # starts tunld, which follows
    assert a.tunl("tunnel show gz").stdout.startswith("gz: gre/ip")


def test_the_service_takes_over_a_tunld_that_a_command_started():
    net = Net()
    try:
        h = net.host("svct")
        h.tunl("tunnel add tunl0 mode ipip remote 172.16.1.2 local 172.16.1.1")
        first = status(h)
        main = subprocess.Popen(unit_command(h.ns), env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def taken():                    # requests may meet the old tunld as it stops
                r = h.tunl("-j daemon status", check=False)
                return r.returncode == 0 and json.loads(r.stdout)["supervisor"] == main.pid
            assert wait_for(taken, 10), status(h)
            assert status(h)["tunnels"] == ["tunl0"]
            assert not alive(first["supervisor"]) and not alive(first["pid"])
        finally:
            main.terminate()
            main.wait(10)
    finally:
        net.close()


# -- 5. change refuses what add refuses -------------------------------------------------------

TWIN = "has the same protocol, local and remote addresses and key"


def test_change_refuses_a_twin_as_add_does_and_changes_nothing():
    """ip_tunnel_changelink() answers EEXIST when the new parameters are another tunnel's:
    tunld's change refuses it in the words of its add, and leaves the tunnel as it was."""
    net = Net()
    try:
        h = net.host("twin")
        h.tunl("tunnel add g1 mode gre key 1 remote 172.16.1.2 local 172.16.1.1")
        h.tunl("tunnel add g2 mode gre key 2 remote 172.16.1.2 local 172.16.1.1")
        h.tunl("tunnel add t1 mode ipip remote 172.16.1.3 local 172.16.1.1")
        h.tunl("tunnel add t2 mode ipip remote 172.16.1.4 local 172.16.1.1")
        before = h.tunl("-j tunnel show").stdout
        for words, twin in (("tunnel change g2 mode gre key 1 remote 172.16.1.2 "
                             "local 172.16.1.1", "g1"),
                            ("tunnel change t2 mode ipip remote 172.16.1.3 local 172.16.1.1",
                             "t1")):
            name = words.split()[2]
            r = h.tunl(words, check=False)
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert r.stderr == f'tunl: change tunnel "{name}" failed: {twin} {TWIN}\n'
            add = h.tunl(words.replace("change " + name, "add x" + name), check=False)
            assert add.stderr == f'tunl: add tunnel "x{name}" failed: {twin} {TWIN}\n'
        assert h.tunl("-j tunnel show").stdout == before
        # a tunnel is not its own twin; another key, or the twin gone, and change goes on
        h.tunl("tunnel change g1 mode gre key 1 remote 172.16.1.2 local 172.16.1.1 ttl 64")
        h.tunl("tunnel change g2 mode gre key 3 remote 172.16.1.2 local 172.16.1.1")
        h.tunl("tunnel del t1")
        h.tunl("tunnel change t2 mode ipip remote 172.16.1.3 local 172.16.1.1")
        shown = {t["ifname"]: t for t in h.tunnels()}
        assert str(shown["g1"]["ttl"]) == "64" and str(shown["g2"]["ikey"]) in ("3", "0.0.0.3")
        assert shown["t2"]["remote"] == "172.16.1.3"
    finally:
        net.close()


def test_the_kernel_planes_change_says_the_same_when_the_kernel_answers_eexist():
    """No tunnel module here to make the kernel answer: a stand-in for pyroute2 answers
    EEXIST to the change, as ip_tunnel_changelink() does."""
    from pyroute2.netlink.exceptions import NetlinkError
    from tunl.errors import ExistsError, LinkError
    from tunl.kernel.tunnels import KernelTunnels
    from tunl.model import TunnelSpec

    specs = {n: TunnelSpec.from_dict({"name": n, "mode": "gre", "remote": "172.16.1.2",
                                      "local": "172.16.1.1", "ikey": k, "okey": k})
             for n, k in (("g1", 1), ("g2", 2))}

    class IPR:
        def link(self, cmd, **kw):
            if cmd == "set" and "kind" in kw:
                raise NetlinkError(17, "File exists")
            return []

    k = KernelTunnels.__new__(KernelTunnels)
    k._ipr = IPR()
    k.owned = lambda name: specs.get(name)
    k.read = lambda name: specs.get(name)
    k.names = lambda: sorted(specs)
    want = specs["g2"].with_(ikey=1, okey=1)
    with pytest.raises(ExistsError) as e:
        k.change(want)
    assert str(e.value) == f'change tunnel "g2" failed: g1 {TWIN}'
    k.names = lambda: ["g2"]            # the other one cannot be found: the kernel's word
    with pytest.raises(LinkError) as e:
        k.change(want)
    assert str(e.value) == ("change tunnel g2: File exists (a tunnel with these addresses "
                            "and key exists)") and e.value.code == 17
