"""The few libbpf calls tunl needs, through ctypes: open and load an object, find its programs
and maps, attach them to tc (clsact, direct action) and read and write map entries.

libbpf.so.1 is the library iproute2 itself links against, so it is there wherever `ip` is;
no compiler and no Python binding are needed at run time. Errors come back as OSError with
the errno libbpf reports.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_lib = None

BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2
BPF_TC_F_REPLACE = 1
BPF_ANY, BPF_NOEXIST = 0, 1


class TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int),
                ("attach_point", ctypes.c_int), ("parent", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class LibbpfMissing(OSError):
    pass


def lib():
    """libbpf.so.1, loaded once; LibbpfMissing when this host has none."""
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            so = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise LibbpfMissing(f"libbpf: {e} (Debian: apt install libbpf1)") from e
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        for fn, res, args in (
                ("bpf_object__open_file", vp, [cp, vp]),
                ("bpf_object__load", ci, [vp]),
                ("bpf_object__close", None, [vp]),
                ("bpf_object__find_program_by_name", vp, [vp, cp]),
                ("bpf_object__find_map_by_name", vp, [vp, cp]),
                ("bpf_program__fd", ci, [vp]),
                ("bpf_map__fd", ci, [vp]),
                ("bpf_map__reuse_fd", ci, [vp, ci]),
                ("libbpf_get_error", ctypes.c_long, [vp]),
                ("bpf_map_update_elem", ci, [ci, vp, vp, ctypes.c_uint64]),
                ("bpf_map_lookup_elem", ci, [ci, vp, vp]),
                ("bpf_map_delete_elem", ci, [ci, vp]),
                ("bpf_map_get_next_key", ci, [ci, vp, vp]),
                ("bpf_tc_hook_create", ci, [ctypes.POINTER(TcHook)]),
                ("bpf_tc_attach", ci, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
                ("bpf_tc_detach", ci, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
                ("bpf_tc_query", ci, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
                ("bpf_prog_get_fd_by_id", ci, [ctypes.c_uint32]),
                ("bpf_map_get_fd_by_id", ci, [ctypes.c_uint32]),
                ("bpf_obj_get_info_by_fd", ci, [ci, vp, ctypes.POINTER(ctypes.c_uint32)]),
                ("libbpf_set_print", vp, [vp])):
            f = getattr(so, fn)
            f.restype, f.argtypes = res, args
        so.libbpf_set_print(None)           # its warnings are not tunl's output
        _lib = so
    return _lib


def check(rc: int, what: str) -> int:
    """rc of a libbpf call: libbpf 1.x returns -errno (and sets errno)."""
    if rc < 0:
        err = -rc if rc < -1 else ctypes.get_errno() or 1
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def check_ptr(p, what: str):
    if not p:
        err = ctypes.get_errno() or 2
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return p


class Object:
    """An opened (and then loaded) BPF ELF object."""

    def __init__(self, path: str):
        self.lib = lib()
        self.ptr = check_ptr(self.lib.bpf_object__open_file(path.encode(), None),
                             f"open {path}")

    def map(self, name: str):
        return check_ptr(self.lib.bpf_object__find_map_by_name(self.ptr, name.encode()),
                         f"map {name}")

    def reuse_map(self, name: str, fd: int) -> None:
        check(self.lib.bpf_map__reuse_fd(self.map(name), fd), f"reuse map {name}")

    def load(self) -> None:
        check(self.lib.bpf_object__load(self.ptr), "load")

    def prog_fd(self, name: str) -> int:
        p = check_ptr(self.lib.bpf_object__find_program_by_name(self.ptr, name.encode()),
                      f"program {name}")
        return check(self.lib.bpf_program__fd(p), f"program {name}")

    def map_fd(self, name: str) -> int:
        return check(self.lib.bpf_map__fd(self.map(name)), f"map {name}")

    def close(self) -> None:
        if self.ptr:
            self.lib.bpf_object__close(self.ptr)
            self.ptr = None


def _hook(ifindex: int, point: int) -> TcHook:
    return TcHook(ctypes.sizeof(TcHook), ifindex, point, 0, 0)


def tc_attach(ifindex: int, point: int, prog_fd: int, handle: int, priority: int) -> None:
    """Attach (or atomically replace) a direct-action cls_bpf filter on the clsact qdisc,
    which is created if the device has none."""
    h = _hook(ifindex, point)
    rc = lib().bpf_tc_hook_create(ctypes.byref(h))
    if rc < 0 and rc != -17:                            # EEXIST: the qdisc is there
        check(rc, f"tc qdisc clsact on ifindex {ifindex}")
    o = TcOpts(ctypes.sizeof(TcOpts), prog_fd, BPF_TC_F_REPLACE, 0, handle, priority, 0)
    check(lib().bpf_tc_attach(ctypes.byref(h), ctypes.byref(o)),
          f"tc attach on ifindex {ifindex}")


def tc_detach(ifindex: int, point: int, handle: int, priority: int) -> bool:
    h = _hook(ifindex, point)
    o = TcOpts(ctypes.sizeof(TcOpts), 0, 0, 0, handle, priority, 0)
    return lib().bpf_tc_detach(ctypes.byref(h), ctypes.byref(o)) == 0


def tc_query(ifindex: int, point: int, handle: int, priority: int) -> int | None:
    """The id of the program attached with this handle and priority, or None."""
    h = _hook(ifindex, point)
    o = TcOpts(ctypes.sizeof(TcOpts), 0, 0, 0, handle, priority, 0)
    if lib().bpf_tc_query(ctypes.byref(h), ctypes.byref(o)) < 0:
        return None
    return o.prog_id


# struct bpf_prog_info and struct bpf_map_info: only the leading fields tunl reads
_PROG_NR_MAP_IDS, _PROG_MAP_IDS = 52, 56
_MAP_NAME = 24


def prog_maps(prog_id: int) -> dict[str, int]:
    """{map name: fd} of the maps a loaded program uses (the caller closes the fds)."""
    L = lib()
    pfd = check(L.bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")
    try:
        ids = (ctypes.c_uint32 * 16)()
        info = (ctypes.c_uint8 * 256)()
        ctypes.c_uint32.from_buffer(info, _PROG_NR_MAP_IDS).value = 16
        ctypes.c_uint64.from_buffer(info, _PROG_MAP_IDS).value = ctypes.addressof(ids)
        n = ctypes.c_uint32(256)
        check(L.bpf_obj_get_info_by_fd(pfd, info, ctypes.byref(n)), "program info")
        count = min(16, ctypes.c_uint32.from_buffer(info, _PROG_NR_MAP_IDS).value)
    finally:
        os.close(pfd)
    out = {}
    for map_id in ids[:count]:
        fd = L.bpf_map_get_fd_by_id(map_id)
        if fd < 0:
            continue
        minfo = (ctypes.c_uint8 * 128)()
        n = ctypes.c_uint32(128)
        if L.bpf_obj_get_info_by_fd(fd, minfo, ctypes.byref(n)) < 0:
            os.close(fd)
            continue
        name = bytes(minfo[_MAP_NAME:_MAP_NAME + 16]).split(b"\0")[0].decode()
        out[name] = fd
    return out


def update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    check(lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
          "map update")


def delete(fd: int, key) -> bool:
    return lib().bpf_map_delete_elem(fd, ctypes.byref(key)) == 0


def lookup(fd: int, key, value) -> bool:
    return lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0


def keys(fd: int, key_type) -> list:
    out, prev, nxt = [], None, key_type()
    while lib().bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                     ctypes.byref(nxt)) == 0:
        out.append(nxt)
        prev, nxt = nxt, key_type()
    return out
