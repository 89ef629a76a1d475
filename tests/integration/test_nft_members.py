"""The kernel data plane's members-only protection, with the real nft on this host: the mesh
agent's table ip tunl_members drops encapsulated packets from hosts outside the overlay before
anything decapsulates them (a raw socket of the protocol stands in for the kernel's tunl0,
which this host's kernel does not have: both sit behind the input hook), counts them, and lets
members through; the set is refilled without losing the counts."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from nsutil import Host, Net

pytestmark = [pytest.mark.root]

M, P, X = "172.31.9.1", "172.31.9.2", "172.31.9.66"     # member, peer, outsider
PY = sys.executable


def nft_call(h: Host, code: str) -> str:
    return h.run(f"{PY} -c 'from ipaddress import IPv4Address as A\n"
                 f"from tunl.kernel import nft\n{code}'").stdout


@pytest.fixture
def hosts():
    net = Net()
    try:
        m, p, x = net.host("m"), net.host("p"), net.host("x")
        net.underlay({m: f"{M}/24", p: f"{P}/24", x: f"{X}/24"})
        yield m, p, x
    finally:
        net.close()


def received(m: Host, proto: int, senders: list[tuple[Host, str]]) -> set[str]:
    """The sources whose packet of `proto` reached a raw socket on m."""
    listener = m.popen(f"{PY} -c 'import socket,sys\n"
                       f"s=socket.socket(socket.AF_INET,socket.SOCK_RAW,{proto});s.settimeout(1.5)\n"
                       "print(\"ready\",flush=True)\n"
                       "try:\n while True:\n  d=s.recv(2000);print(socket.inet_ntoa(d[12:16]),"
                       "flush=True)\nexcept socket.timeout: pass'",
                       stdout=subprocess.PIPE)
    assert listener.stdout.readline().strip() == "ready"
    for h, _ in senders:
        h.send_raw(proto, M, [bytes(20)])
    out, _ = listener.communicate(timeout=10)
    return set(out.split())


def dropped(m: Host) -> dict:
    return json.loads(nft_call(m, "import json; print(json.dumps(nft.members()))"))


def test_only_members_reach_the_decapsulating_socket_and_the_rest_is_counted(hosts):
    m, p, x = hosts
    assert received(m, 4, [(p, P), (x, X)]) == {P, X}           # open: anyone
    nft_call(m, f"nft.set_members(\"ipip\", frozenset([A(\"{M}\"), A(\"{P}\")]))")
    assert received(m, 4, [(p, P), (x, X)]) == {P}
    state = dropped(m)
    assert sorted(state["members"]) == [M, P]
    assert state["dropped"] == {"ipip": 1}
    # other protocols are not this overlay's: untouched
    assert received(m, 47, [(x, X)]) == {X}
    # the set is refilled in place: the count stays, the outsider is let in
    nft_call(m, f"nft.set_members(\"ipip\", frozenset([A(\"{P}\"), A(\"{X}\")]))")
    assert received(m, 4, [(x, X)]) == {X}
    assert dropped(m)["dropped"] == {"ipip": 1}
    # removed: open again
    nft_call(m, "nft.remove(nft.MEMBERS)")
    assert dropped(m) is None
    assert received(m, 4, [(x, X)]) == {X}


def test_a_gre_overlay_guards_protocol_47_and_replaces_an_ipip_table(hosts):
    m, p, x = hosts
    nft_call(m, f"nft.set_members(\"ipip\", frozenset([A(\"{P}\")]))")
    nft_call(m, f"nft.set_members(\"gre\", frozenset([A(\"{P}\")]))")
    assert received(m, 47, [(p, P), (x, X)]) == {P}
    assert received(m, 4, [(x, X)]) == {X}
    assert dropped(m)["dropped"] == {"gre": 1}


def test_an_empty_set_lets_no_one_in(hosts):
    m, p, x = hosts
    nft_call(m, "nft.set_members(\"ipip\", frozenset())")
    time.sleep(0.05)
    assert received(m, 4, [(p, P)]) == set()
