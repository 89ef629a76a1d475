"""vti with IPsec ESP between tunl's userspace data plane (host side) and the kernel's ip_vti
+ xfrm (guest), with the same `ip tunnel` and `ip xfrm` words on both sides, for both
suites (AES-GCM, RFC 4106; AES-CBC + HMAC-SHA-256-128, RFC 4868): pings both ways, a TCP
stream whose SHA-256 is compared, a replayed ESP packet and one sealed with a wrong key
dropped and counted on both sides; then the guest's side built by tunl itself on the
kernel data plane, with `ip xfrm state` showing what `ip xfrm state add` gives."""
from __future__ import annotations

import re
import time

import pytest

from conftest import GUEST, PLANE
from test_matrix import HOST, pings, tcp
from nsutil import VTI_MARK as MARK, vti_policy_words as policy_words
from nsutil import vti_forged, vti_state_words as sa_words

SPI_IN, SPI_OUT = 0x1001, 0x2002     # as the host sees them: guest -> host, host -> guest










def xfrm_stat(rig) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)\s+(\d+)",
                                              rig.guest("cat /proc/net/xfrm_stat"))}


def guest_side(rig, suite: str, by: str) -> None:
    """The guest's vti and SAs, made with `ip` or with tunl (kernel data plane)."""
    from test_mesh_interop import TUNL
    tool = "ip" if by == "ip" else TUNL
    rig.guest(f"{tool} tunnel add vti1 mode vti local {GUEST} remote {HOST} ikey {MARK} "
              f"okey {MARK}", undo="ip link del vti1; ip xfrm state flush; ip xfrm policy flush")
    rig.guest(f"{tool} xfrm {sa_words(GUEST, HOST, SPI_IN, suite, 1)}")
    rig.guest(f"{tool} xfrm {sa_words(HOST, GUEST, SPI_OUT, suite, 2)}")
    rig.guest(f"{tool} xfrm {policy_words('out', GUEST, HOST)}")
    rig.guest(f"{tool} xfrm {policy_words('in', HOST, GUEST)}")
    rig.guest("ip addr add 10.62.1.2/24 dev vti1 && ip link set vti1 up")


def host_side(rig, suite: str):
    host = rig.node("a", HOST)
    host.tunl(f"tunnel add vti1 mode vti local {HOST} remote {GUEST} ikey {MARK} okey {MARK}")
    host.tunl(f"xfrm {sa_words(HOST, GUEST, SPI_OUT, suite, 2)}")
    host.tunl(f"xfrm {sa_words(GUEST, HOST, SPI_IN, suite, 1)}")
    host.tunl(f"xfrm {policy_words('out', HOST, GUEST)}")
    host.tunl(f"xfrm {policy_words('in', GUEST, HOST)}")
    host.run("ip addr add 10.62.1.1/24 dev vti1 && ip link set vti1 up")
    return host


def host_xfrm(host) -> dict[str, int]:
    import json
    t = next(t for t in json.loads(host.tunl("-j tunnel show").stdout) if t["ifname"] == "vti1")
    return t.get("xfrm", {})


def captured_esp(host, spi: int, action) -> bytes:
    """One ESP packet with `spi` seen on the host's eth0 while `action` runs (its ESP part)."""
    import subprocess
    p = subprocess.Popen(["ip", "netns", "exec", host.ns, "tcpdump", "-U", "-c", "1", "-w",
                          "-", "-i", "eth0", f"ip proto 50 and ip[20:4] = {spi}"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    action()
    raw, _ = p.communicate(timeout=10)
    import io
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapReader
    for pkt in PcapReader(io.BytesIO(raw)):
        return bytes(Ether(bytes(pkt))[IP].payload)
    raise AssertionError("no ESP packet captured")




def guest_send_raw(rig, proto: int, dst: str, payload: bytes) -> None:
    rig.guest("python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_RAW,"
              f"{proto});s.sendto(bytes.fromhex(\"{payload.hex()}\"),(\"{dst}\",0))'")


def replay_and_wrong_key(rig, record, host, suite: str) -> None:
    case = f"vti {suite}"
    # tunl -> kernel: a packet the host sent, sent again; then one with the wrong key
    before = xfrm_stat(rig)
    esp = captured_esp(host, SPI_OUT, lambda: host.ping("10.62.1.2"))
    host.send_raw(50, GUEST, [esp])
    host.send_raw(50, GUEST, [forged(suite, SPI_OUT, HOST, GUEST, 10_000)])
    time.sleep(0.3)
    after = xfrm_stat(rig)
    seq = after["XfrmInStateSeqError"] - before["XfrmInStateSeqError"]
    proto = after["XfrmInStateProtoError"] - before["XfrmInStateProtoError"]
    ok = seq >= 1 and proto >= 1
    record(case, "kernel drops a replayed and a wrong-key ESP packet", ok,
           f"XfrmInStateSeqError +{seq}, XfrmInStateProtoError +{proto}")
    assert ok, (before, after)
    # kernel -> tunl: the same both ways
    before = host_xfrm(host)
    esp = captured_esp(host, SPI_IN, lambda: rig.guest("ping -n -c 1 -W 2 10.62.1.1",
                                                       check=False))
    guest_send_raw(rig, 50, HOST, esp)
    guest_send_raw(rig, 50, HOST, forged(suite, SPI_IN, GUEST, HOST, 10_000))
    time.sleep(0.3)
    after = host_xfrm(host)
    seq = after.get("XfrmInStateSeqError", 0) - before.get("XfrmInStateSeqError", 0)
    proto = after.get("XfrmInStateProtoError", 0) - before.get("XfrmInStateProtoError", 0)
    ok = seq >= 1 and proto >= 1
    record(case, "tunl drops a replayed and a wrong-key ESP packet", ok,
           f"XfrmInStateSeqError +{seq}, XfrmInStateProtoError +{proto}")
    assert ok, (before, after)


@pytest.fixture
def userspace_only(interop):
    if PLANE[0] != "userspace":
        pytest.skip("a vti's ESP is tunld's own work on the userspace plane; the eBPF "
                    "programs have nothing to do for it")
    return interop


@pytest.mark.parametrize("suite", ["gcm", "cbc"])
def test_vti_esp_against_the_kernel(userspace_only, record, suite):
    rig = userspace_only
    guest_side(rig, suite, "ip")
    host = host_side(rig, suite)
    pings(rig, record, f"vti {suite}", host, "10.62.1.1", "10.62.1.2")
    tcp(rig, record, f"vti {suite}", host, "10.62.1.2")
    replay_and_wrong_key(rig, record, host, suite)


@pytest.mark.parametrize("suite", ["gcm", "cbc"])
def test_vti_by_tunl_on_the_kernel_data_plane(userspace_only, record, suite):
    """The guest's vti and SAs made by tunl (kernel data plane): the same `ip xfrm state`
    as `ip xfrm state add` gives, and the same traffic."""
    rig = userspace_only
    from test_mesh_interop import TUNL
    rig.guest(f"ip xfrm {sa_words(GUEST, HOST, SPI_IN, suite, 1)} && "
              f"ip xfrm {policy_words('out', GUEST, HOST)}",
              undo="ip xfrm state flush; ip xfrm policy flush")
    by_ip = (rig.guest("ip xfrm state"), rig.guest("ip xfrm policy"))
    rig.guest("ip xfrm state flush; ip xfrm policy flush")
    rig.guest(f"{TUNL} xfrm {sa_words(GUEST, HOST, SPI_IN, suite, 1)} && "
              f"{TUNL} xfrm {policy_words('out', GUEST, HOST)}")
    by_tunl = (rig.guest("ip xfrm state"), rig.guest("ip xfrm policy"))
    same = by_ip == by_tunl
    record(f"vti {suite} (kernel plane)", "ip xfrm state/policy as ip xfrm add gives", same)
    assert same, (by_ip, by_tunl)
    assert rig.guest(f"{TUNL} xfrm state") == by_ip[0]
    rig.guest("ip xfrm state flush; ip xfrm policy flush")
    guest_side(rig, suite, "tunl")
    assert "vti" in rig.guest("ip -d link show vti1")
    host = host_side(rig, suite)
    pings(rig, record, f"vti {suite} (kernel plane)", host, "10.62.1.1", "10.62.1.2")
    tcp(rig, record, f"vti {suite} (kernel plane)", host, "10.62.1.2")


def forged(suite: str, spi: int, src: str, dst: str, seq: int) -> bytes:
    return vti_forged(suite, spi, src, dst, seq, "10.62.1.9", "10.62.1.1")
