"""The eBPF data plane's programs and maps in one network namespace: load them (or find the
ones already attached, after a restart), attach them, and keep their maps.

No pin is made: the tc filters hold the programs and the programs hold the maps, so a tunld
that is killed leaves the kernel forwarding, the next tunld finds the maps again through the
filter on a tunnel device, and deleting the namespace (its devices, their filters) frees
everything.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from functools import lru_cache
from pathlib import Path

from . import libbpf
from .libbpf import BPF_TC_EGRESS, BPF_TC_INGRESS

OBJECT = Path(__file__).with_name("tunl.bpf.o")
HANDLE, PRIORITY = 0x7475, 1           # tc filter handle 0x7475 ("tu"), pref 1
MAPS = ("tunl_tunnels", "tunl_rx", "tunl_routes", "tunl_paths", "tunl_members", "tunl_stats")

MODE_IPIP, MODE_GRE, MODE_SIT = 1, 2, 3
F_PMTUDISC, F_OKEY, F_SLOW_TX, F_SLOW_RX, F_DECAP_L3, F_MEMBERS = 1, 2, 4, 8, 0x20, 0x40
(C_RX_PACKETS, C_RX_BYTES, C_TX_PACKETS, C_TX_BYTES, C_RX_ECN, C_TX_DEAD_LOOP,
 C_RX_SLOW, C_TX_SLOW, C_RX_NOT_MEMBER, C_MAX) = range(10)


B4 = ctypes.c_ubyte * 4


def b4(packed: bytes | None) -> B4:
    return B4(*(packed or bytes(4)))


class Tnl(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("link", ctypes.c_uint32),
                ("local", B4), ("remote", B4),
                ("okey", B4), ("mode", ctypes.c_uint8), ("ttl", ctypes.c_uint8),
                ("tos", ctypes.c_uint8), ("flags", ctypes.c_uint8)]


class RxKey(ctypes.Structure):
    _fields_ = [("local", B4), ("remote", B4),
                ("key", B4), ("proto", ctypes.c_uint8),
                ("has_key", ctypes.c_uint8), ("pad", ctypes.c_uint16)]

    def __eq__(self, other):
        return bytes(self) == bytes(other)

    def __hash__(self):
        return hash(bytes(self))


class RouteKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("ifindex", B4), ("addr", B4)]


class PathKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("dst", B4)]


class MemberKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("addr", B4)]


class OuterPath(ctypes.Structure):
    _fields_ = [("oif", ctypes.c_uint32), ("src", B4), ("mtu", ctypes.c_uint32)]


U32 = ctypes.c_uint32
U8 = ctypes.c_uint8


@lru_cache(maxsize=1)
def kernel_features() -> frozenset[str]:
    """The BPF flags this kernel knows, from its BTF (/sys/kernel/btf/vmlinux): what the
    programs may ask of bpf_skb_adjust_room() and bpf_fib_lookup()."""
    try:
        data = Path("/sys/kernel/btf/vmlinux").read_bytes()
    except OSError:
        return frozenset()
    return frozenset(m.decode() for m in re.findall(
        rb"BPF_F_ADJ_ROOM_DECAP_L3_IPV6|BPF_F_ADJ_ROOM_ENCAP_L4_GRE", data))


def feature_flags() -> int:
    return F_DECAP_L3 if "BPF_F_ADJ_ROOM_DECAP_L3_IPV6" in kernel_features() else 0


class Programs:
    """The loaded programs and the fds of their maps, for one namespace."""

    def __init__(self, obj_path: Path = OBJECT):
        self.obj_path = obj_path
        self.obj: libbpf.Object | None = None
        self.egress_fd = self.ingress_fd = -1
        self.maps: dict[str, int] = {}
        # what tunl last wrote to the per-tunnel maps: {map: {ifindex: {key: value}}}, so
        # that a sync costs one write per change, not a walk of the map per tunnel
        self._pushed: dict[str, dict[int, dict[bytes, bytes]]] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def load(self, adopt_from=()) -> None:
        """Load the programs. The maps of the programs attached at adopt_from ((ifindex,
        BPF_TC_EGRESS or BPF_TC_INGRESS) pairs) are reused, so that their tunnels, paths and
        counters carry on."""
        if self.obj is not None:
            return
        if not self.obj_path.exists():
            raise FileNotFoundError(f"{self.obj_path} is not built; run ./dev setup "
                                    "(clang -target bpf)")
        found: dict[str, int] = {}
        for ifindex, point in adopt_from:
            prog_id = libbpf.tc_query(ifindex, point, HANDLE, PRIORITY)
            for name, fd in (libbpf.prog_maps(prog_id) if prog_id else {}).items():
                if name in found or name not in MAPS:
                    os.close(fd)
                else:
                    found[name] = fd
            if len(found) == len(MAPS):
                break
        obj = libbpf.Object(str(self.obj_path))
        try:
            for name, fd in found.items():
                if name in MAPS:
                    obj.reuse_map(name, fd)
            try:
                obj.load()
            except OSError:
                if not found:
                    raise
                # maps of another build of the programs (a value grew): new maps, which
                # tunld fills again; the old programs keep theirs until they are replaced
                obj.close()
                obj = libbpf.Object(str(self.obj_path))
                obj.load()
            self.egress_fd = obj.prog_fd("tunl_egress")
            self.ingress_fd = obj.prog_fd("tunl_ingress")
            self.maps = {m: obj.map_fd(m) for m in MAPS}
            self._pushed = {"tunl_paths": self._read(self.maps["tunl_paths"], PathKey,
                                                     OuterPath, lambda k: k.ifindex),
                            "tunl_routes": self._read(self.maps["tunl_routes"], RouteKey, B4,
                                                      _route_owner),
                            "tunl_members": self._read(self.maps["tunl_members"], MemberKey,
                                                       U8, lambda k: k.ifindex)}
        except BaseException:
            obj.close()
            raise
        finally:
            for fd in found.values():
                os.close(fd)
        self.obj = obj

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
        self.obj, self.maps, self._pushed = None, {}, {}

    # -- attach -------------------------------------------------------------------------------

    def attach_egress(self, ifindex: int) -> None:
        libbpf.tc_attach(ifindex, BPF_TC_EGRESS, self.egress_fd, HANDLE, PRIORITY)

    def attach_ingress(self, ifindex: int) -> None:
        libbpf.tc_attach(ifindex, BPF_TC_INGRESS, self.ingress_fd, HANDLE, PRIORITY)

    @staticmethod
    def detach_ingress(ifindex: int) -> bool:
        return libbpf.tc_detach(ifindex, BPF_TC_INGRESS, HANDLE, PRIORITY)

    @staticmethod
    def detach_egress(ifindex: int) -> bool:
        return libbpf.tc_detach(ifindex, BPF_TC_EGRESS, HANDLE, PRIORITY)

    @staticmethod
    def attached(ifindex: int, ingress: bool) -> bool:
        return libbpf.tc_query(ifindex, BPF_TC_INGRESS if ingress else BPF_TC_EGRESS,
                               HANDLE, PRIORITY) is not None

    # -- maps ---------------------------------------------------------------------------------

    def put_tunnel(self, tnl: Tnl, rx: RxKey) -> None:
        libbpf.update(self.maps["tunl_tunnels"], U32(tnl.ifindex), tnl)
        libbpf.update(self.maps["tunl_rx"], rx, U32(tnl.ifindex))

    def tunnels(self) -> dict[int, Tnl]:
        fd, out = self.maps["tunl_tunnels"], {}
        for k in libbpf.keys(fd, U32):
            v = Tnl()
            if libbpf.lookup(fd, k, v):
                out[k.value] = v
        return out

    def rx_keys(self) -> dict[RxKey, int]:
        fd, out = self.maps["tunl_rx"], {}
        for k in libbpf.keys(fd, RxKey):
            v = U32()
            if libbpf.lookup(fd, k, v):
                out[k] = v.value
        return out

    def drop_tunnel(self, ifindex: int) -> None:
        libbpf.delete(self.maps["tunl_tunnels"], U32(ifindex))
        libbpf.delete(self.maps["tunl_stats"], U32(ifindex))
        for k, v in self.rx_keys().items():
            if v == ifindex:
                libbpf.delete(self.maps["tunl_rx"], k)
        self.set_paths(ifindex, {})
        self.set_routes(ifindex, {})
        self.set_members(ifindex, ())

    def drop_rx(self, key: RxKey) -> None:
        libbpf.delete(self.maps["tunl_rx"], key)

    def set_paths(self, ifindex: int, paths: dict[bytes, tuple[int, bytes, int]]) -> None:
        """The tunnel's outer routes: {outer dst: (oif, preferred source, path MTU)}."""
        self._sync("tunl_paths", PathKey, ifindex,
                   [(PathKey(ifindex, b4(d)), OuterPath(o, b4(s), m))
                    for d, (o, s, m) in paths.items()])

    def set_routes(self, ifindex: int, routes: dict[tuple[bytes, int], bytes | None]) -> None:
        """The tunnel's IPv4 routes: {(prefix, length): gateway or None}."""
        idx = b4(ifindex.to_bytes(4, "big"))
        self._sync("tunl_routes", RouteKey, ifindex,
                   [(RouteKey(32 + plen, idx, b4(net)), b4(gw))
                    for (net, plen), gw in routes.items()])

    def set_members(self, ifindex: int, addrs) -> None:
        """The outer sources (4 bytes each) the tunnel takes packets from, while its F_MEMBERS
        flag is set (written before the flag is set, emptied after it is cleared)."""
        self._sync("tunl_members", MemberKey, ifindex,
                   [(MemberKey(ifindex, b4(a)), U8(1)) for a in addrs])

    @staticmethod
    def _read(fd: int, key_type, value_type, owner) -> dict[int, dict[bytes, bytes]]:
        """A map's entries by tunnel: one walk, when the maps are (re)opened."""
        out: dict[int, dict[bytes, bytes]] = {}
        for k in libbpf.keys(fd, key_type):
            v = value_type()
            if libbpf.lookup(fd, k, v):
                out.setdefault(owner(k), {})[bytes(k)] = bytes(v)
        return out

    def _sync(self, name: str, key_type, ifindex: int, want: list) -> None:
        """Make the map's entries of one tunnel exactly `want`, writing only what differs from
        what was written last."""
        fd = self.maps[name]
        wanted = {bytes(k): (k, v) for k, v in want}
        with self._lock:
            have = self._pushed.setdefault(name, {}).setdefault(ifindex, {})
            for kb in have.keys() - wanted.keys():
                libbpf.delete(fd, key_type.from_buffer_copy(kb))
                del have[kb]
            for kb, (k, v) in wanted.items():
                vb = bytes(v)
                if have.get(kb) != vb:
                    libbpf.update(fd, k, v)
                    have[kb] = vb
            if not have:
                del self._pushed[name][ifindex]

    def lower_mtu(self, dst: bytes, mtu: int) -> None:
        """A path MTU learned for dst: every tunnel's path to it shrinks at once."""
        fd = self.maps["tunl_paths"]
        with self._lock:
            for entries in self._pushed.get("tunl_paths", {}).values():
                for kb, vb in entries.items():
                    k, v = PathKey.from_buffer_copy(kb), OuterPath.from_buffer_copy(vb)
                    if bytes(k.dst) == dst and v.mtu > mtu:
                        v.mtu = mtu
                        libbpf.update(fd, k, v)
                        entries[kb] = bytes(v)

    def counters(self, ifindex: int) -> list[int]:
        """The tunnel's counters summed over the CPUs (C_* order)."""
        ncpu = _possible_cpus()
        row = ctypes.c_uint64 * C_MAX
        vals = (row * ncpu)()
        if not libbpf.lookup(self.maps["tunl_stats"], U32(ifindex), vals):
            return [0] * C_MAX
        return [sum(vals[c][i] for c in range(ncpu)) for i in range(C_MAX)]


def _route_owner(k: RouteKey) -> int:
    return int.from_bytes(bytes(k.ifindex), "big")


@lru_cache(maxsize=1)
def _possible_cpus() -> int:
    """libbpf_num_possible_cpus(): per-CPU map values come one per possible CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n = max(n, int(b or a) + 1)
    return n
