"""The eBPF plane's map layouts and what tunld writes into them.

The layouts are checked against the BTF that clang wrote into tunl.bpf.o (read by bpftool, not
by tunl), so that Python and C cannot drift apart; what a spec becomes is checked against the
rules of ip_tunnel_xmit()/ip_tunnel_lookup() the programs implement."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from ipaddress import IPv4Address

import pytest

from tunl.bpf import programs as P
from tunl.daemon.ebpf import slow_reasons, tnl_for
from tunl.model import TunnelMode, TunnelSpec

PAIRS = {"tnl": P.Tnl, "rx_key": P.RxKey, "route_key": P.RouteKey, "path_key": P.PathKey,
         "path": P.OuterPath}


@pytest.fixture(scope="module")
def btf() -> dict:
    if not P.OBJECT.exists():
        pytest.skip(f"{P.OBJECT} is not built (./dev setup builds it with clang)")
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed (apt install bpftool)")
    raw = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(P.OBJECT), "format",
                          "raw"], capture_output=True, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(raw)["types"] if t["kind"] == "STRUCT"}


@pytest.mark.parametrize("c_name", sorted(PAIRS))
def test_python_structures_match_the_programs(btf, c_name):
    py = PAIRS[c_name]
    t = btf[c_name]
    assert ctypes.sizeof(py) == t["size"]
    assert [(name, getattr(py, name).offset * 8) for name, _ in py._fields_] == \
        [(m["name"], m["bits_offset"]) for m in t["members"]]


def test_counters_have_one_slot_per_counter(btf):
    assert btf["counters"]["size"] == 8 * P.C_MAX


def spec(**kw) -> TunnelSpec:
    return TunnelSpec(**{"name": "t0", "mode": TunnelMode.IPIP, **kw})


def test_a_plain_ipip_tunnel_is_all_fast_path():
    tnl, rx = tnl_for(spec(remote=IPv4Address("192.0.2.2"), local=IPv4Address("192.0.2.1")),
                      7, 0)
    assert (tnl.ifindex, tnl.mode, tnl.ttl) == (7, P.MODE_IPIP, 0)      # ttl 0: inherit
    assert bytes(tnl.remote) == bytes([192, 0, 2, 2]) and bytes(tnl.local) == bytes([192, 0, 2, 1])
    assert not tnl.flags & (P.F_SLOW_TX | P.F_SLOW_RX)
    assert tnl.flags & P.F_PMTUDISC                                     # pmtudisc is the default
    assert (rx.proto, rx.has_key, bytes(rx.local), bytes(rx.remote)) == \
        (4, 0, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))


def test_gre_keys_go_out_as_okey_and_are_matched_as_ikey():
    tnl, rx = tnl_for(spec(mode=TunnelMode.GRE, ikey=5, okey=0x01020304), 3, 0)
    assert tnl.flags & P.F_OKEY and bytes(tnl.okey) == bytes([1, 2, 3, 4])
    assert (rx.proto, rx.has_key, bytes(rx.key)) == (47, 1, bytes([0, 0, 0, 5]))
    # a tunnel without ikey takes only packets without a key (ip_tunnel_key_match())
    _, rx = tnl_for(spec(mode=TunnelMode.GRE, okey=9), 3, 0)
    assert rx.has_key == 0


@pytest.mark.parametrize("kw, tx, rx", [
    (dict(mode=TunnelMode.GRE, oseq=True), True, False),
    (dict(mode=TunnelMode.GRE, ocsum=True), True, False),
    (dict(mode=TunnelMode.GRE, iseq=True), False, True),
    (dict(mode=TunnelMode.GRE, icsum=True), False, True),
    (dict(mode=TunnelMode.ISATAP), True, True),
    (dict(mode=TunnelMode.SIT), True, True),                       # no remote: 6rd rules
    (dict(mode=TunnelMode.SIT, remote=IPv4Address("192.0.2.2")), False, None),
])
def test_what_bpf_does_not_do_goes_to_the_slow_path(kw, tx, rx):
    tnl, _ = tnl_for(spec(**kw), 1, 0)
    why_tx, why_rx = slow_reasons(spec(**kw))
    assert bool(tnl.flags & P.F_SLOW_TX) is tx is bool(why_tx)
    if rx is not None:
        assert bool(tnl.flags & P.F_SLOW_RX) is rx is bool(why_rx)


def test_a_capture_sends_every_packet_through_the_queue():
    tnl, _ = tnl_for(spec(remote=IPv4Address("192.0.2.2")), 1, 0, capture=True)
    assert tnl.flags & P.F_SLOW_TX


def test_tos_and_ttl_are_the_tunnels():
    tnl, _ = tnl_for(spec(remote=IPv4Address("192.0.2.2"), ttl=33, tos=0xB9), 1, 0)
    assert (tnl.ttl, tnl.tos) == (33, 0xB9)        # bit 0: inherit, as iproute2 stores it
