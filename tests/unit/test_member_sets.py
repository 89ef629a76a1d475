"""Only members of the overlay send into it: a tunnel with a member set drops and counts
(not_member) every received packet whose outer source is not in the set. The engine's check
runs on packets built here and fed to its ingress step; the control op's validation, the
record and the eBPF map entries are checked without root."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from ipaddress import IPv4Address

import pytest

from tunl.bpf import programs as P
from tunl.daemon import server
from tunl.daemon.control import check_request
from tunl.daemon.ebpf import MEMBERS_SLOW, EbpfTunnels, tnl_for
from tunl.daemon.metrics import TunnelCollector
from tunl.daemon.server import OPS, member_set
from tunl.daemon.state import State
from tunl.dataplane.engine import Engine, TunnelPlane
from tunl.errors import ConfigError
from tunl.model import TunnelMode, TunnelSpec
from tunl.tunnel import modes
from tunl.wire import ipv4
from tunl.wire.drop import Drop
from tunl.wire.ipv4 import PROTO_GRE, PROTO_IPIP, PROTO_UDP

MEMBER, OUTSIDER, ME = "172.16.0.2", "172.16.0.3", "172.16.0.1"
INNER = ipv4.build("10.42.2.7", "10.42.1.1", PROTO_UDP, bytes(8) + b"hello")


@pytest.fixture
def plane():
    """An engine with one NBMA ipip tunnel whose device queue is a pipe."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    e = Engine.__new__(Engine)               # no sockets: only the ingress step is exercised
    t = TunnelPlane(TunnelSpec(name="tunl0", mode=TunnelMode.IPIP), w, 7, 1480, None)
    t.up = True
    e.tunnels = {"tunl0": t}
    e._reindex()
    yield e, t, r
    os.close(r)
    os.close(w)


def receive(e: Engine, src: str, proto: int = PROTO_IPIP, inner: bytes = INNER) -> bytes:
    """Feed one outer packet from src to the ingress step; what reached the device."""
    pkt = ipv4.build(src, ME, proto, inner)
    buf = bytearray(pkt) + bytearray(64)
    unmatched = {}
    e._receive_one(proto, modes.module_for_proto(proto).demux, buf, memoryview(buf),
                   len(pkt), unmatched)
    return unmatched


def delivered(r: int) -> bytes:
    try:
        return os.read(r, 65536)
    except BlockingIOError:
        return b""


def test_without_a_set_anyone_is_taken(plane):
    e, t, r = plane
    receive(e, OUTSIDER)
    assert delivered(r) == INNER
    assert t.counters.rx_packets == 1 and not t.counters.rx_drop


def test_a_set_takes_its_members_and_drops_and_counts_the_rest(plane):
    e, t, r = plane
    e.set_members("tunl0", frozenset({IPv4Address(MEMBER).packed}))
    receive(e, MEMBER)
    assert delivered(r) == INNER
    receive(e, OUTSIDER)
    receive(e, OUTSIDER)
    assert delivered(r) == b""
    c = t.counters
    assert (c.rx_packets, c.rx_errors, c.rx_drop[Drop.NOT_MEMBER]) == (1, 2, 2)
    assert c.as_dict()["rx_drop"] == {"not_member": 2}


def test_an_empty_set_takes_no_one_and_none_takes_anyone_again(plane):
    e, t, r = plane
    e.set_members("tunl0", frozenset())
    receive(e, MEMBER)
    assert delivered(r) == b"" and t.counters.rx_drop[Drop.NOT_MEMBER] == 1
    e.set_members("tunl0", None)
    receive(e, OUTSIDER)
    assert delivered(r) == INNER


def test_a_set_given_with_the_tunnel_is_in_force_before_its_first_packet():
    t = TunnelPlane(TunnelSpec(name="tunl0", mode=TunnelMode.IPIP), -1, 7, 1480, None,
                    frozenset({IPv4Address(MEMBER).packed}))
    assert t.members == frozenset({IPv4Address(MEMBER).packed})


def test_gre_tunnels_check_the_outer_source_too():
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        e = Engine.__new__(Engine)
        t = TunnelPlane(TunnelSpec(name="gre1", mode=TunnelMode.GRE), w, 8, 1476, None,
                        frozenset({IPv4Address(MEMBER).packed}))
        t.up = True
        e.tunnels = {"gre1": t}
        e._reindex()
        gre = bytes([0, 0, 0x08, 0x00]) + INNER
        receive(e, OUTSIDER, PROTO_GRE, gre)
        assert delivered(r) == b"" and t.counters.rx_drop[Drop.NOT_MEMBER] == 1
        receive(e, MEMBER, PROTO_GRE, gre)
        assert delivered(r) == INNER
    finally:
        os.close(r)
        os.close(w)


# -- the control op -------------------------------------------------------------------------

def test_the_op_takes_a_name_and_a_list_or_null():
    assert check_request({"op": "members", "name": "tunl0", "addrs": None}, OPS) == \
        ("members", {"name": "tunl0", "addrs": None})
    assert check_request({"op": "members", "name": "tunl0", "addrs": [MEMBER]}, OPS)[1] == \
        {"name": "tunl0", "addrs": [MEMBER]}
    with pytest.raises(ConfigError, match=r'argument "addrs" must be an array or null'):
        check_request({"op": "members", "name": "tunl0", "addrs": MEMBER}, OPS)
    with pytest.raises(ConfigError, match=r'argument "addrs" is required'):
        check_request({"op": "members", "name": "tunl0"}, OPS)
    assert "members" not in server.READ_ONLY                    # root only


def test_every_address_is_checked_with_a_one_line_error():
    assert member_set(None) is None
    assert member_set([]) == frozenset()
    assert member_set([MEMBER, MEMBER, OUTSIDER]) == {IPv4Address(MEMBER), IPv4Address(OUTSIDER)}
    for bad, says in (("172.16.0.300", 'members "172.16.0.300": not an IPv4 address'),
                      ("2001:db8::1", 'members "2001:db8::1": not an IPv4 address'),
                      ("", 'members "": not an IPv4 address'),
                      (5, "members 5: not an IPv4 address"),
                      (None, "members null: not an IPv4 address"),
                      ("224.0.0.1", 'members "224.0.0.1": not a unicast address'),
                      ("0.0.0.0", 'members "0.0.0.0": not a unicast address'),
                      ("255.255.255.255", 'members "255.255.255.255": not a unicast address')):
        with pytest.raises(ConfigError) as e:
            member_set([MEMBER, bad])
        assert str(e.value).startswith(says) and "\n" not in str(e.value)


# -- the record -------------------------------------------------------------------------------

def test_the_record_keeps_the_set_and_a_damaged_one_takes_from_no_one(tmp_path):
    st = State(str(tmp_path / "ns"))
    spec = TunnelSpec(name="tunl0", mode=TunnelMode.IPIP)
    other = TunnelSpec(name="tunl1", mode=TunnelMode.IPIP, remote=IPv4Address("192.0.2.9"))
    st.save({"tunl0": (5, spec), "tunl1": (6, other)}, {"tunl0": "ebpf"},
            {"tunl0": frozenset({IPv4Address(MEMBER)})})
    again = State(st.dir)
    assert again.load() == {"tunl0": (5, spec), "tunl1": (6, other)}
    assert again.members == {"tunl0": frozenset({IPv4Address(MEMBER)})}     # tunl1: anyone
    st.save({"tunl0": (5, spec)}, members={"tunl0": frozenset()})
    again = State(st.dir)
    again.load()
    assert again.members == {"tunl0": frozenset()}                         # from no one
    with open(st.path) as f:
        raw = json.load(f)
    raw["tunnels"]["tunl0"]["members"] = ["172.16.0.2", "nonsense"]
    with open(st.path, "w") as f:
        json.dump(raw, f)
    again = State(st.dir)
    again.load()
    assert again.members == {"tunl0": frozenset()}


# -- the eBPF plane's entries -----------------------------------------------------------------

class FakePrograms:
    """The maps as dicts, and the order in which the flag and the entries were written."""

    def __init__(self, room: int = 100):
        self.obj = object()
        self.room = room
        self.flags: dict[int, int] = {}
        self.entries: dict[int, set] = {}
        self.log: list = []

    def load(self, adopt_from=()):
        pass

    def put_tunnel(self, tnl, rx):
        self.flags[tnl.ifindex] = tnl.flags
        self.log.append(("flag", bool(tnl.flags & P.F_MEMBERS)))

    def set_members(self, ifindex, addrs):
        addrs = set(addrs)
        if len(addrs) > self.room:
            self.entries[ifindex] = set(list(addrs)[:self.room])
            raise OSError(7, "Argument list too long")
        self.entries[ifindex] = addrs
        self.log.append(("entries", len(addrs)))

    def drop_rx(self, key):
        pass

    def attach_egress(self, ifindex):
        pass

    def drop_tunnel(self, ifindex):
        self.flags.pop(ifindex, None)
        self.entries.pop(ifindex, None)


def ebpf_tunnels(room: int = 100) -> EbpfTunnels:
    eb = EbpfTunnels(lambda *a: 2, FakePrograms(room))
    eb.attach_underlay = lambda: None
    return eb


def test_the_entries_go_in_before_the_flag_and_out_after_it():
    eb = ebpf_tunnels()
    spec = TunnelSpec(name="tunl0", mode=TunnelMode.IPIP)
    eb.put(spec, 7)
    members = frozenset({IPv4Address(MEMBER).packed, IPv4Address(OUTSIDER).packed})
    eb.programs.log.clear()
    eb.set_members(7, members)
    assert eb.programs.log == [("entries", 2), ("flag", True)]
    assert eb.programs.entries[7] == members
    eb.programs.log.clear()
    eb.set_members(7, None)
    assert eb.programs.log == [("flag", False), ("entries", 0)]


def test_a_set_known_before_the_put_is_in_force_with_the_first_write():
    eb = ebpf_tunnels()
    eb.set_members(7, frozenset({IPv4Address(MEMBER).packed}))       # taken back: not put yet
    eb.put(TunnelSpec(name="tunl0", mode=TunnelMode.IPIP), 7)
    assert eb.programs.log == [("entries", 1), ("flag", True)]


def test_a_set_too_big_for_the_map_sends_every_packet_to_the_slow_path():
    eb = ebpf_tunnels(room=1)
    eb.put(TunnelSpec(name="tunl0", mode=TunnelMode.IPIP), 7)
    eb.set_members(7, frozenset({IPv4Address(MEMBER).packed, IPv4Address(OUTSIDER).packed}))
    flags = eb.programs.flags[7]
    assert flags & P.F_SLOW_RX and not flags & P.F_MEMBERS
    assert eb.programs.entries[7] == set()
    assert eb.slow_rx_why(7) == [MEMBERS_SLOW]
    eb.set_members(7, None)
    assert not eb.programs.flags[7] & P.F_SLOW_RX and eb.slow_rx_why(7) == []


def test_the_flag_follows_the_check():
    spec = TunnelSpec(name="tunl0", mode=TunnelMode.IPIP)
    assert not tnl_for(spec, 7, 0)[0].flags & (P.F_MEMBERS | P.F_SLOW_RX)
    assert tnl_for(spec, 7, 0, members="map")[0].flags & P.F_MEMBERS
    tnl, _ = tnl_for(spec, 7, 0, members="slow")
    assert tnl.flags & P.F_SLOW_RX and not tnl.flags & P.F_MEMBERS


def test_the_programs_drops_are_counted_as_the_engine_counts_them():
    eb = ebpf_tunnels()
    counts = [0] * P.C_MAX
    counts[P.C_RX_NOT_MEMBER] = 3
    eb.programs.counters = lambda ifindex: counts
    eb.programs.attached = lambda ifindex, ingress: True
    c = {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0, "rx_errors": 1,
         "rx_drop": {"not_member": 2}, "tx_drop": {}}
    eb.status(7, c)
    assert c["rx_errors"] == 4 and c["rx_drop"] == {"not_member": 5}


def test_metrics_have_not_member_from_the_moment_a_tunnel_has_a_set():
    def show():
        counters = {"rx_packets": 0, "rx_drop": {}, "tx_drop": {}}
        return [{"spec": {"name": "tunl0"}, "counters": counters, "members": 2, "up": True},
                {"spec": {"name": "tunl1"}, "counters": counters, "members": None}]
    fams = {f.name: f for f in TunnelCollector(show).collect()}
    drops = {(s.labels["dev"], s.labels["reason"]): s.value
             for s in fams["tunl_tunnel_drops"].samples if s.name.endswith("_total")}
    assert drops == {("tunl0", "not_member"): 0}
    assert [(s.labels["dev"], s.value) for s in fams["tunl_tunnel_members"].samples] == \
        [("tunl0", 2)]


def test_the_member_key_matches_the_programs():
    if not P.OBJECT.exists() or shutil.which("bpftool") is None:
        pytest.skip("needs the built tunl.bpf.o and bpftool")
    raw = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(P.OBJECT), "format",
                          "raw"], capture_output=True, text=True, check=True).stdout
    t = next(t for t in json.loads(raw)["types"] if t.get("name") == "member_key")
    assert ctypes.sizeof(P.MemberKey) == t["size"]
    assert [(n, getattr(P.MemberKey, n).offset * 8) for n, _ in P.MemberKey._fields_] == \
        [(m["name"], m["bits_offset"]) for m in t["members"]]
    assert "tunl_members" in P.MAPS


def test_a_renamed_tunnel_keeps_its_set_and_its_plane():
    from types import SimpleNamespace
    d = server.Tunld.__new__(server.Tunld)
    spec = TunnelSpec(name="tunl0", mode=TunnelMode.IPIP)
    t = SimpleNamespace(spec=spec, ifindex=7)
    d.engine = SimpleNamespace(rename=lambda names: setattr(t, "spec",
                                                            t.spec.with_(name=names["tunl0"])))
    d.kernel = SimpleNamespace(set_link=lambda *a, **kw: None)
    d.planes = {"tunl0": "ebpf"}
    d.members = {"tunl0": frozenset({IPv4Address(MEMBER)})}
    d.records = {"tunl0": (7, spec)}
    saved = []
    d._save = lambda: saved.append((dict(d.records), dict(d.planes), dict(d.members)))
    d._renamed([(t, "ov0")])
    assert saved[-1] == ({"ov0": (7, spec.with_(name="ov0"))}, {"ov0": "ebpf"},
                         {"ov0": frozenset({IPv4Address(MEMBER)})})
