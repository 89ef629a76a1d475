"""Test hosts in network namespaces, each with its own tunld (started on demand by tunl)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import uuid

TUNL = os.path.join(os.path.dirname(sys.executable), "tunl")
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "")}


def sh(cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=check,
                          timeout=timeout, env=ENV)


class Host:
    def __init__(self, ns: str):
        self.ns = ns

    def run(self, cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(["ip", "netns", "exec", self.ns, "sh", "-c", cmd], capture_output=True,
                           text=True, timeout=timeout, env=ENV)
        if check and p.returncode != 0:
            raise AssertionError(f"[{self.ns}] {cmd} -> {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def popen(self, cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, "sh", "-c", "exec " + cmd],
                                env=ENV, text=True, **kw)

    def tunl(self, args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(f"{TUNL} {args}", check=check)

    def tunnels(self) -> list[dict]:
        return json.loads(self.tunl("-j tunnel show").stdout)

    def counters(self, name: str = "tunl0") -> dict:
        return next(t["stats"] for t in self.tunnels() if t["ifname"] == name)

    def tunld_pid(self) -> int:
        return json.loads(self.tunl("-j daemon status").stdout)["pid"]

    def send_raw(self, proto: int, dst: str, payloads: list[bytes]) -> None:
        """Send each payload from this host in an IPv4 packet of `proto` built by its kernel."""
        blob = f"/tmp/{self.ns}-{uuid.uuid4().hex[:6]}.raw"
        with open(blob, "wb") as f:
            for p in payloads:
                f.write(struct.pack("!H", len(p)) + p)
        try:
            self.run("python3 -c 'import socket,struct,time\n"
                     f"s=socket.socket(socket.AF_INET,socket.SOCK_RAW,{proto})\n"
                     f"d=open(\"{blob}\",\"rb\").read();i=0\n"
                     "while i<len(d):\n"
                     " n=struct.unpack_from(\"!H\",d,i)[0]\n"
                     f" s.sendto(d[i+2:i+2+n],(\"{dst}\",0));i+=2+n\n"
                     " time.sleep(0.0002)'", timeout=120)
        finally:
            os.unlink(blob)

    def forge_frag_needed(self, outer_src: str, outer_dst: str, mtu: int, proto: int = 4) -> None:
        """Send outer_src an ICMP fragmentation needed (built by scapy) about a tunnel packet
        outer_src -> outer_dst of `proto`, as a router on the underlay path would."""
        from scapy.layers.inet import ICMP, IPerror
        quoted = IPerror(src=outer_src, dst=outer_dst, proto=proto, len=1500, flags="DF")
        self.send_raw(1, outer_src, [bytes(ICMP(type=3, code=4, nexthopmtu=mtu) / quoted /
                                           bytes(8))])

    def ping(self, dst: str, count: int = 1, extra: str = "") -> subprocess.CompletedProcess:
        return self.run(f"ping -n -c {count} -i 0.2 -W 2 {extra} {dst}", check=False)


class Net:
    """Namespaces named tl-it<id>-<name>; close() ends their processes and deletes them."""

    def __init__(self):
        self.prefix = f"tl-it{uuid.uuid4().hex[:6]}-"
        self.names: list[str] = []

    def host(self, name: str) -> Host:
        ns = self.prefix + name
        sh(f"ip netns add {ns}")
        self.names.append(ns)
        sh(f"ip -n {ns} link set lo up")
        return Host(ns)

    def underlay(self, hosts: dict[Host, str], mtu: int = 1500) -> Host:
        """A bridge in its own namespace, and an eth0 with `address` in each host on it."""
        ul = self.host("ul")
        ul.run(f"ip link add br0 type bridge && ip link set br0 mtu {mtu} up")
        for h, addr in hosts.items():
            self.attach(ul, h, addr, mtu)
        return ul

    def attach(self, ul: Host, h: Host, addr: str, mtu: int = 1500) -> None:
        """Give host h an eth0 with addr on the bridge br0 of ul."""
        port = "p-" + h.ns[len(self.prefix):][:12]
        ul.run(f"ip link add {port} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {h.ns}"
               f" && ip link set {port} master br0 up")
        h.run(f"ip addr add {addr} dev eth0 && ip link set eth0 up")

    def remove(self, h: Host) -> None:
        """End the processes of one host and delete its namespace (and so its links)."""
        self.names.remove(h.ns)
        _delete(h.ns)

    def container(self, host: Host, name: str, addr: str, gw: str, bridge: str = "mybr0") -> Host:
        c = self.host(name)
        host.run(f"ip link add c-{name} type veth peer name eth0 netns {c.ns} && "
                 f"ip link set c-{name} master {bridge} up && sysctl -qw net.ipv4.ip_forward=1")
        c.run(f"ip addr add {addr} dev eth0 && ip link set eth0 up && ip route add default via {gw}")
        return c

    def close(self) -> None:
        for ns in reversed(self.names):
            _delete(ns)
        self.names.clear()


A_UL, B_UL = "172.16.232.172", "172.16.232.194"      # the walkthrough's underlay


def one_to_one(net: Net) -> tuple[Host, Host]:
    """The walkthrough's one-to-one ipip tunnel: hosts A (10.42.1.1/24) and B (10.42.2.1/24)
    on an underlay bridge, each routing the other's /24 into tunl0."""
    a, b = net.host("A"), net.host("B")
    net.underlay({a: f"{A_UL}/16", b: f"{B_UL}/16"})
    for h, me, peer, mine, theirs in ((a, A_UL, B_UL, "10.42.1", "10.42.2"),
                                      (b, B_UL, A_UL, "10.42.2", "10.42.1")):
        h.tunl(f"tunnel add tunl0 mode ipip remote {peer} local {me}")
        h.run(f"ip addr add {mine}.1/24 dev tunl0 && ip link set tunl0 up && "
              f"ip route add {theirs}.0/24 dev tunl0")
    return a, b


def tunld_pids(h: Host) -> list[int]:
    """The processes named tunld in a host's namespace."""
    out = []
    for pid in sh(f"ip netns pids {h.ns}", check=False).stdout.split():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "tunld":
                    out.append(int(pid))
        except OSError:
            pass
    return out


_why: list = []


def ebpf_unavailable() -> str | None:
    """Why this host gives no eBPF data plane (tunl's own probe: it loads the programs), or
    None; asked once per run."""
    if not _why:
        from tunl.kernel.probe import bpf_load
        _why.append(bpf_load())
    return _why[0]


def transfer(sender: Host, receiver: Host, addr: str, port: int, data: bytes, tmp) -> str:
    """Send data over TCP from sender to a sink on receiver at addr:port; the SHA-256 of
    what the sink received (hex), to compare with hashlib.sha256(data)."""
    src = tmp / f"payload-{port}"
    src.write_bytes(data)
    sink = receiver.popen("python3 -c 'import socket,hashlib\n"
                          f"s=socket.create_server((\"{addr}\",{port}));c,_=s.accept()\n"
                          "h=hashlib.sha256()\n"
                          "while (d:=c.recv(1<<16)): h.update(d)\n"
                          "print(h.hexdigest())'", stdout=-1)
    time.sleep(0.5)
    sender.run(f"python3 -c 'import socket;s=socket.create_connection((\"{addr}\",{port}));"
               f"s.sendfile(open(\"{src}\",\"rb\"));s.close()'", timeout=120)
    got, _ = sink.communicate(timeout=60)
    return got.strip()


def _delete(ns: str) -> None:
    pids = sh(f"ip netns pids {ns}", check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2
    while pids and time.monotonic() < deadline:
        pids = sh(f"ip netns pids {ns}", check=False).stdout.split()
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    sh(f"ip netns del {ns}", check=False)


def q(s: str) -> str:
    return shlex.quote(s)


def lab_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`tunl lab ARGS` with this interpreter."""
    return subprocess.run([sys.executable, "-m", "tunl.lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def namespaces(lab: str) -> list[str]:
    """The namespaces of a lab that exist now."""
    from tunl.lab import netns
    return sorted(ns for ns in netns.list_ns() if ns.startswith(f"tl-{lab}-"))


class ExampleLabs:
    """examples/FILE copied under fresh lab names, with (old, new) text edits: write() gives
    (path, topology); down() takes every one down and checks nothing of it is left."""

    ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def __init__(self, tmp_path, prefix: str = "t"):
        self.tmp, self.prefix = tmp_path, prefix
        self.made: list[str] = []

    def write(self, file: str, *edits: tuple[str, str]):
        from tunl.lab import topology
        src = os.path.join(self.ROOT, "examples", file)
        name = self.prefix + uuid.uuid4().hex[:8]
        with open(src) as f:
            text = f.read()
        text = text.replace(f'name = "{topology.load(src).name}"', f'name = "{name}"', 1)
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new, 1)
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        self.made.append(name)
        return str(path), topology.load(path)

    def down(self) -> None:
        from tunl.lab import control, topology
        for name in self.made:
            control.down(name)
            assert namespaces(name) == []
            assert not os.path.exists(topology.run_dir(name))


def alive(pid: int) -> bool:
    """A process that is there and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# `tunl xfrm` against the kernel's xfrm (integration: this host; interop: the guest): the same
# words, the keys of both suites of a vti, and what `ip -s xfrm` prints that differs per run
XFRM_SUITES = {
    "gcm": "aead 'rfc4106(gcm(aes))' 0x" + bytes(range(1, 21)).hex() + " 128",  # key, salt
    "cbc": "enc 'cbc(aes)' 0x" + bytes(range(1, 17)).hex() + " auth-trunc 'hmac(sha256)' 0x"
           + bytes(range(1, 33)).hex() + " 128",
}
XFRM_STATE = "src 172.16.0.1 dst 172.16.0.2 proto esp spi 0x1000 reqid 1 mode tunnel mark 7 " \
             "{algo} replay-window 32"
XFRM_POLICIES = [
    "dir out tmpl src 172.16.0.1 dst 172.16.0.2 proto esp mode tunnel mark 7",
    "src 0.0.0.0/0 dst 0.0.0.0/0 dir in tmpl src 172.16.0.2 dst 172.16.0.1 proto esp "
    "mode tunnel reqid 1 mark 7",
    "src 10.0.0.0/8 dst 10.1.0.0/16 proto tcp dir fwd priority 5 mark 9 mask 0xff tmpl "
    "src 192.0.2.1 dst 192.0.2.2 proto esp mode tunnel reqid 3",
    "src 10.9.0.0/16 dst 0.0.0.0/0 dir out action block",
]
# ip -s prints when a state or policy was added and the index the kernel gave a policy
_XFRM_WHEN = re.compile(r"add \d{4}-\d\d-\d\d \d\d:\d\d:\d\d|index \d+ ")


def xfrm_listing(run, obj: str) -> tuple[str, str]:
    """`ip xfrm OBJ` and `ip -s xfrm OBJ` by run(cmd) -> its output, without the times and
    indexes that differ from one run to the next."""
    return run(f"ip xfrm {obj}"), _XFRM_WHEN.sub("", run(f"ip -s xfrm {obj}"))


def wait_for(cond, timeout: float, step: float = 0.05):
    """cond()'s first true value within timeout seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    return cond()


# -- a vti's IPsec in `ip xfrm`'s words (the host's vti tests and the interop VM's) -----------

VTI_MARK = 7


def vti_key(seed: int, n: int) -> str:
    return bytes((seed * 7 + i) & 0xFF for i in range(n)).hex()


def vti_algo(suite: str, seed: int) -> str:
    """The keys as `ip xfrm` takes them: the rfc4106 KEY is the AES key and 4 bytes of salt."""
    if suite == "gcm":
        return f"aead 'rfc4106(gcm(aes))' 0x{vti_key(seed, 20)} 128"
    return (f"enc 'cbc(aes)' 0x{vti_key(seed, 16)} "
            f"auth-trunc 'hmac(sha256)' 0x{vti_key(seed + 1, 32)} 128")


def vti_state_words(src: str, dst: str, spi: int, suite: str, seed: int) -> str:
    return (f"state add src {src} dst {dst} proto esp spi {spi:#x} reqid 1 mode tunnel "
            f"mark {VTI_MARK} {vti_algo(suite, seed)} replay-window 32")


def vti_policy_words(direction: str, src: str, dst: str) -> str:
    return (f"policy add dir {direction} tmpl src {src} dst {dst} proto esp reqid 1 "
            f"mode tunnel mark {VTI_MARK}")


def vti_forged(suite: str, spi: int, src: str, dst: str, seq: int, inner_src: str,
               inner_dst: str) -> bytes:
    """An ESP packet for `spi` sealed with keys that are not the state's (scapy, an
    independent implementation): its ESP part, an ICMP echo inside."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.ipsec import ESP, SecurityAssociation
    bad = bytes(range(100, 140))
    if suite == "gcm":
        sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=bad[:20],
                                 tunnel_header=IP(src=src, dst=dst))
    else:
        sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-CBC", crypt_key=bad[:16],
                                 auth_algo="SHA2-256-128", auth_key=bad[:32],
                                 tunnel_header=IP(src=src, dst=dst))
    sa.seq_num = seq
    return bytes(sa.encrypt(IP(src=inner_src, dst=inner_dst) / ICMP())[ESP])
