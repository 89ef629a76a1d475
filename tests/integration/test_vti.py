"""vti on the userspace data plane: two tunl peers in namespaces, each with `tunl tunnel add
vti1 mode vti ... ikey 7 okey 7` and the same `tunl xfrm state|policy add` words as `ip xfrm`
takes, for both suites (AES-GCM, RFC 4106; AES-CBC + HMAC-SHA-256-128, RFC 4868).

Observed from outside only: ping, a TCP stream whose SHA-256 is compared, tcpdump on the
underlay, raw ESP packets sent from a peer, `tunl xfrm state` (the anti-replay context),
`tunl -s [-j] tunnel show` (the per-tunnel drops and the namespace's xfrm MIB), and tunld's
record xfrm.json.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess

import pytest

import nsutil
from nsutil import Host, Net, alive, transfer, tunld_pids, wait_for
from nsutil import VTI_MARK as MARK, vti_forged, vti_key as key
from nsutil import vti_policy_words as policy_words, vti_state_words as state_words

pytestmark = [pytest.mark.root]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

A_UL, B_UL = "172.16.232.172", "172.16.232.194"
A_IN, B_IN = "10.62.1.1", "10.62.1.2"
SPI_AB, SPI_BA = 0x1000, 0x2000
SUITES = ["gcm", "cbc"]


@pytest.fixture(autouse=True, scope="module")
def userspace():
    """Every `tunl tunnel add` and `tunl xfrm` of this module is on the userspace plane."""
    old = nsutil.ENV.get("TUNL_DATAPLANE")
    nsutil.ENV["TUNL_DATAPLANE"] = "userspace"
    yield
    if old is None:
        nsutil.ENV.pop("TUNL_DATAPLANE", None)
    else:
        nsutil.ENV["TUNL_DATAPLANE"] = old










def make_vti(h: Host, me: str, peer: str, inside: str, suite: str) -> None:
    h.tunl(f"tunnel add vti1 mode vti local {me} remote {peer} ikey {MARK} okey {MARK}")
    h.tunl("xfrm " + state_words(A_UL, B_UL, SPI_AB, suite, 1))
    h.tunl("xfrm " + state_words(B_UL, A_UL, SPI_BA, suite, 2))
    h.tunl("xfrm " + policy_words("out", me, peer))
    h.tunl("xfrm " + policy_words("in", peer, me))
    h.run(f"ip addr add {inside}/24 dev vti1 && ip link set vti1 up")


@pytest.fixture(params=SUITES)
def pair(request):
    """Hosts A and B on an underlay bridge, a vti between them with the suite's states."""
    net = Net()
    try:
        a, b = net.host("A"), net.host("B")
        net.underlay({a: f"{A_UL}/16", b: f"{B_UL}/16"})
        make_vti(a, A_UL, B_UL, A_IN, request.param)
        make_vti(b, B_UL, A_UL, B_IN, request.param)
        yield request.param, a, b
    finally:
        net.close()


# -- reading what tunl shows ----------------------------------------------------------------

def vti1(h: Host) -> dict:
    return next(t for t in json.loads(h.tunl("-s -j tunnel show").stdout)
                if t["ifname"] == "vti1")


def mib(h: Host) -> dict:
    return vti1(h)["xfrm"]


def replay(h: Host, spi: int) -> dict:
    """The anti-replay context of a state, from `tunl -j xfrm state`."""
    return next(s["replay"] for s in json.loads(h.tunl("-j xfrm state").stdout)
                if s["spi"] == spi)


def replay_lines(h: Host) -> dict[int, tuple[int, int, int]]:
    """spi -> (seq, oseq, bitmap), from the text of `tunl xfrm state`, as ip prints it."""
    text = h.tunl("xfrm state").stdout
    spis = [int(s, 16) for s in re.findall(r"proto esp spi 0x([0-9a-f]{8}) ", text)]
    ctx = [tuple(int(v, 16) for v in m) for m in re.findall(
        r"anti-replay context: seq 0x([0-9a-f]+), oseq 0x([0-9a-f]+), bitmap 0x([0-9a-f]{8})",
        text)]
    assert len(spis) == len(ctx) == 2, text
    return dict(zip(spis, ctx))


def without_replay(states: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in ("replay", "lastused")} for s in states]


def record_path(h: Host) -> str:
    """tunld's xfrm.json: next to its log and tunnels.json in the namespace's state dir."""
    st = json.loads(h.tunl("-j daemon status").stdout)
    return os.path.join(os.path.dirname(st["log"]), "xfrm.json")




def pings(h: Host, dst: str, count: int, interval: str = "0.2") -> int:
    """How many of `count` pings were answered."""
    out = h.run(f"ping -n -c {count} -i {interval} -W 2 {dst}", check=False).stdout
    m = re.search(r"(\d+) received", out)
    assert m, out
    return int(m.group(1))


# -- traffic ------------------------------------------------------------------------------------

def test_pings_both_ways_a_tcp_stream_and_the_replay_context_moves(pair, tmp_path):
    suite, a, b = pair
    for h in (a, b):
        t = vti1(h)
        assert (t["mode"], t["dataplane"], t["ikey"], t["okey"]) == ("vti", "userspace",
                                                                     MARK, MARK)
        assert "Xfrm:" not in h.tunl("-s tunnel show vti1").stdout    # nothing dropped yet
        assert replay_lines(h) == {SPI_AB: (0, 0, 0), SPI_BA: (0, 0, 0)}
    assert pings(a, B_IN, 3) == 3
    assert pings(b, A_IN, 3) == 3
    # six packets each way: A sent requests and replies on SPI_AB, B on SPI_BA
    ra, rb = replay_lines(a), replay_lines(b)
    assert ra[SPI_AB] == (0, 6, 0) and rb[SPI_AB] == (6, 0, 0b111111)
    assert rb[SPI_BA] == (0, 6, 0) and ra[SPI_BA] == (6, 0, 0b111111)
    data = os.urandom(1 << 20)
    assert transfer(a, b, B_IN, 5001, data, tmp_path) == hashlib.sha256(data).hexdigest()
    assert pings(a, B_IN, 1) == 1 and pings(b, A_IN, 1) == 1
    ra, rb = replay_lines(a), replay_lines(b)
    sent_ab, sent_ba = ra[SPI_AB][1], rb[SPI_BA][1]
    assert sent_ab > (1 << 20) // 1407 and sent_ba > 8      # the stream, and its ACKs
    # each receiver's window is at the last number its peer sent (the last ping's packets)
    assert rb[SPI_AB][0] == sent_ab and rb[SPI_AB][2] & 1
    assert ra[SPI_BA][0] == sent_ba and ra[SPI_BA][2] & 1
    for h in (a, b):
        assert h.tunl("-s tunnel show vti1").stdout.count("Xfrm:") == 0
        assert mib(h) == {}


# -- replayed and forged ESP --------------------------------------------------------------------

def capture_esp(h: Host, spi: int, action) -> bytes:
    """The ESP part of the first packet with `spi` that h's eth0 sees while action runs."""
    p = subprocess.Popen(["ip", "netns", "exec", h.ns, "tcpdump", "-U", "-c", "1", "-w", "-",
                          "-i", "eth0", f"ip proto 50 and ip[20:4] = {spi}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"listening on" in p.stderr.readline()
        action()
        raw, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapReader
    for pkt in PcapReader(io.BytesIO(raw)):
        ip = Ether(bytes(pkt))[IP]
        assert ip.proto == 50
        return bytes(ip.payload)
    raise AssertionError("no ESP packet captured")




def test_a_replayed_and_a_wrong_key_packet_are_dropped_and_counted(pair):
    suite, a, b = pair
    esp = capture_esp(b, SPI_AB, lambda: a.ping(B_IN))
    assert esp[:4] == SPI_AB.to_bytes(4, "big") and esp[4:8] == (1).to_bytes(4, "big")
    before = vti1(b)
    assert before["xfrm"] == {} and replay(b, SPI_AB) == {"seq": 1, "oseq": 0, "bitmap": 1}

    a.send_raw(50, B_UL, [esp])                          # seq 1 again
    assert wait_for(lambda: mib(b).get("XfrmInStateSeqError"), 10) == 1
    a.send_raw(50, B_UL, [forged(suite, SPI_AB, A_UL, B_UL, 10_000)])
    assert wait_for(lambda: mib(b).get("XfrmInStateProtoError"), 10) == 1

    after = vti1(b)
    assert after["xfrm"] == {"XfrmInStateSeqError": 1, "XfrmInStateProtoError": 1}
    assert after["stats"]["rx_drop"] == {"esp_replay": 1, "esp_icv": 1}
    assert after["stats"]["rx_errors"] == before["stats"]["rx_errors"] + 2
    assert after["stats"]["rx_packets"] == before["stats"]["rx_packets"]
    # neither moved the window: the forged number 10000 was never accepted
    assert replay(b, SPI_AB) == {"seq": 1, "oseq": 0, "bitmap": 1}
    text = b.tunl("-s tunnel show vti1").stdout
    assert "Xfrm: XfrmInStateProtoError=1 XfrmInStateSeqError=1" in text.splitlines(), text
    assert "Drops: esp_icv=1 esp_replay=1" in text.splitlines(), text
    # and the tunnel carries on
    assert pings(a, B_IN, 2) == 2
    assert replay(b, SPI_AB) == {"seq": 3, "oseq": 0, "bitmap": 0b111}


# -- a restarted data plane ---------------------------------------------------------------------

def restart_data_plane(h: Host) -> None:
    """kill -9 of tunld's data plane process; its supervisor starts a new one."""
    st = json.loads(h.tunl("-j daemon status").stdout)
    assert sorted(tunld_pids(h)) == sorted([st["pid"], st["supervisor"]])
    os.kill(st["pid"], signal.SIGKILL)
    assert wait_for(lambda: not alive(st["pid"]), 5), "the data plane did not end"

    def restarted():
        p = h.tunl("-j daemon status", check=False)
        if p.returncode:
            return None
        new = json.loads(p.stdout)
        return new["pid"] != st["pid"] and new["tunnels"] == ["vti1"] and new
    new = wait_for(restarted, 10, 0.1)
    assert new and new["supervisor"] == st["supervisor"]


def test_kill_9_of_the_data_plane_keeps_the_states_and_the_peer_drops_reused_numbers(pair):
    """A restarted tunld reloads its states and policies from xfrm.json, but not their
    anti-replay context: its sequence numbers start again at 1, as a kernel SA added again
    would. The peer's window has moved on, so it drops them as the kernel drops them
    (xfrm_replay_check()): the last 32 numbers it saw as replays, older ones as left of the
    window, each counted in XfrmInStateSeqError, until the numbers pass the window's top."""
    suite, a, b = pair
    n = 40
    assert pings(a, B_IN, n, "0.01") == n
    states = json.loads(a.tunl("-j xfrm state").stdout)
    policies = json.loads(a.tunl("-j xfrm policy").stdout)
    with open(record_path(a)) as f:
        recorded = json.load(f)
    assert without_replay(states) == recorded["states"]
    assert replay(a, SPI_AB)["oseq"] == n
    assert replay(b, SPI_AB) == {"seq": n, "oseq": 0, "bitmap": 0xFFFFFFFF}

    restart_data_plane(a)
    assert without_replay(json.loads(a.tunl("-j xfrm state").stdout)) == \
        without_replay(states)
    assert json.loads(a.tunl("-j xfrm policy").stdout) == policies
    assert replay(a, SPI_AB) == {"seq": 0, "oseq": 0, "bitmap": 0}
    assert replay(a, SPI_BA) == {"seq": 0, "oseq": 0, "bitmap": 0}
    b_before = vti1(b)
    assert b_before["xfrm"] == {}

    # A's pings go out as 1, 2, 3 ...: B drops each until A passes n, then answers
    assert wait_for(lambda: pings(a, B_IN, 10, "0.01"), 60, 0), "traffic did not resume"
    b_after = vti1(b)
    drops = b_after["stats"]["rx_drop"]
    # seq n-31 .. n: in the window and received (replays); 1 .. n-32: left of it (too old)
    assert drops == {"esp_replay": 32, "esp_too_old": n - 32}, drops
    assert b_after["xfrm"] == {"XfrmInStateSeqError": n}
    assert b_after["stats"]["rx_errors"] - b_before["stats"]["rx_errors"] == n
    assert replay(b, SPI_AB)["seq"] == replay(a, SPI_AB)["oseq"] > n
    # B's numbers went on from n; A's new window takes them from wherever they are
    assert replay(a, SPI_BA)["seq"] == replay(b, SPI_BA)["oseq"] > n
    assert pings(a, B_IN, 3) == 3 and pings(b, A_IN, 3) == 3
    assert mib(a) == {} and mib(b) == {"XfrmInStateSeqError": n}


# -- states deleted and flushed -----------------------------------------------------------------

def test_deleted_and_flushed_states_drop_the_vti_packets_as_XfrmOutNoStates(pair):
    suite, a, b = pair
    assert pings(a, B_IN, 1) == 1
    a.tunl(f"xfrm state del src {A_UL} dst {B_UL} proto esp spi {SPI_AB:#x}")
    assert [s["spi"] for s in json.loads(a.tunl("-j xfrm state").stdout)] == [SPI_BA]
    with open(record_path(a)) as f:
        assert [s["spi"] for s in json.load(f)["states"]] == [SPI_BA]
    assert pings(a, B_IN, 3) == 0
    t = vti1(a)
    assert t["xfrm"] == {"XfrmOutNoStates": 3}
    assert t["stats"]["tx_drop"] == {"xfrm_out_no_state": 3}
    assert t["stats"]["tx_errors"] == 3
    text = a.tunl("-s tunnel show vti1").stdout
    assert "Xfrm: XfrmOutNoStates=3" in text.splitlines(), text

    b.tunl("xfrm state flush")
    assert json.loads(b.tunl("-j xfrm state").stdout) == []
    assert b.tunl("xfrm state count").stdout == "\t SAD count 0\n"
    assert len(json.loads(b.tunl("-j xfrm policy").stdout)) == 2       # policies stay
    assert pings(b, A_IN, 2) == 0
    t = vti1(b)
    assert t["xfrm"] == {"XfrmOutNoStates": 2}
    assert t["stats"]["tx_drop"] == {"xfrm_out_no_state": 2}
    assert "Xfrm: XfrmOutNoStates=2" in b.tunl("-s tunnel show vti1").stdout.splitlines()


# -- what is refused ----------------------------------------------------------------------------

@pytest.fixture
def host():
    net = Net()
    try:
        h = net.host("H")
        net.underlay({h: f"{A_UL}/16"})
        yield h
    finally:
        net.close()


def one_line_refusal(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.strip(), p.stderr
    return p.stderr


def test_a_vti_on_the_ebpf_plane_is_refused_with_one_line(host):
    err = one_line_refusal(host.tunl(f"tunnel add vti2 mode vti local {A_UL} remote {B_UL} "
                                     f"ikey 7 okey 7 --dataplane ebpf", check=False))
    assert "--dataplane ebpf" in err and "userspace" in err, err
    assert host.run("ip link show vti2", check=False).returncode != 0
    assert host.tunl("-j tunnel show").stdout.strip() in ("", "[]")
    # tunl xfrm, asked for the eBPF plane, says the same kind of thing
    err = one_line_refusal(host.tunl("xfrm state show --dataplane ebpf", check=False))
    assert "--dataplane ebpf" in err, err


BAD_WORDS = [
    # (words, the word the one line names): proto, mode, algorithms and lengths a vti's
    # state does not take
    (f"xfrm state add src {A_UL} dst {B_UL} proto ah spi 0x3000 mode tunnel "
     f"auth-trunc 'hmac(sha256)' 0x{key(1, 32)} 128", '"ah"'),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode transport "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 128", '"transport"'),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 16)} 128", "16 bytes"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 32", "32"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel "
     f"enc 'cbc(aes)' 0x{key(1, 16)}", "auth-trunc"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x10 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 128", "spi 0x10"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 128 replay-window 64", "replay-window 64"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 128 flag esn", "flag"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 128 mark 0x100000000", "0x100000000"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi 0x3000 mode tunnel", "aead"),
    (f"xfrm state add src {A_UL} dst nowhere proto esp spi 0x3000 mode tunnel "
     f"aead 'rfc4106(gcm(aes))' 0x{key(1, 20)} 128", '"nowhere"'),
    # policies
    (f"xfrm policy add dir sideways tmpl src {A_UL} dst {B_UL} proto esp mode tunnel",
     '"sideways"'),
    (f"xfrm policy add dir out tmpl src {A_UL} dst {B_UL} proto ah mode tunnel", '"ah"'),
    (f"xfrm policy add dir out action maybe tmpl src {A_UL} dst {B_UL} proto esp "
     "mode tunnel", '"maybe"'),
    (f"xfrm policy add dir out priority 4294967296 tmpl src {A_UL} dst {B_UL} proto esp "
     "mode tunnel", "4294967296"),
    # verbs and objects
    ("xfrm state frobnicate", '"frobnicate"'),
    ("xfrm state deleteall", '"deleteall"'),
    ("xfrm monitor", '"monitor"'),
    ("xfrm sideways", '"sideways"'),
    ("xfrm policy flush bogus", '"bogus"'),
    ("-s xfrm state", "-s"),
    # what is not there, and what is there already
    (f"xfrm state del src {A_UL} dst {B_UL} proto esp spi 0x9999", "spi 0x00009999"),
    (f"xfrm state add src {A_UL} dst {B_UL} proto esp spi {SPI_AB:#x} reqid 1 mode tunnel "
     f"mark {MARK} aead 'rfc4106(gcm(aes))' 0x{key(5, 20)} 128", "File exists"),
    (f"xfrm policy del src 0.0.0.0/0 dst 0.0.0.0/0 dir fwd mark {MARK}",
     "No such file or directory"),
]


def test_bad_xfrm_words_give_one_line_exit_1_and_change_nothing(host):
    host.tunl(f"tunnel add vti1 mode vti local {A_UL} remote {B_UL} ikey {MARK} okey {MARK}")
    host.tunl("xfrm " + state_words(A_UL, B_UL, SPI_AB, "gcm", 1))
    host.tunl("xfrm " + state_words(B_UL, A_UL, SPI_BA, "cbc", 2))
    host.tunl("xfrm " + policy_words("out", A_UL, B_UL))
    host.tunl("xfrm " + policy_words("in", B_UL, A_UL))
    path = record_path(host)

    def snapshot():
        with open(path) as f:
            return (host.tunl("-j xfrm state").stdout, host.tunl("-j xfrm policy").stdout,
                    f.read())
    was = snapshot()
    assert len(json.loads(was[0])) == 2 and len(json.loads(was[1])) == 2
    for words, named in BAD_WORDS:
        err = one_line_refusal(host.tunl(words, check=False))
        assert named in err, (words, err)
    assert snapshot() == was


def forged(suite: str, spi: int, src: str, dst: str, seq: int) -> bytes:
    return vti_forged(suite, spi, src, dst, seq, A_IN, B_IN)
