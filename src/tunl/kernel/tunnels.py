"""The kernel data plane: the kernel's own ipip, gre, sit and vti devices, over netlink.

A device tunl creates carries its spec in its alias, as the userspace devices do; a tunnel
device without it (the fallback tunl0, gre0 and sit0 that loading a module makes, or one made
with `ip tunnel add`) is shown but never changed. The potential router list of isatap has no
netlink attribute: it goes through the SIOCADDPRL/SIOCDELPRL ioctls, as iproute2 does.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import (ConfigError, ExistsError, ForeignDeviceError, LinkError, NotFoundError,
                      TunlError)
from ..wire.gre import CSUM as GRE_CSUM, KEY as GRE_KEY, SEQ as GRE_SEQ
from ..model import TunnelMode, TunnelSpec, spec_from_alias, spec_to_alias

KIND = {TunnelMode.IPIP: "ipip", TunnelMode.GRE: "gre", TunnelMode.SIT: "sit",
        TunnelMode.ISATAP: "sit", TunnelMode.VTI: "vti"}
MODULE = {"ipip": "ipip", "gre": "ip_gre", "sit": "sit", "vti": "ip_vti"}
KINDS = frozenset(KIND.values())
SIT_ISATAP = 0x0001
SIOCGETPRL, SIOCADDPRL, SIOCDELPRL = 0x89F4, 0x89F5, 0x89F6
PRL_DEFAULT = 0x0001
EXISTS = "File exists (a tunnel with these addresses and key exists)"


def module_state(mode: TunnelMode, root: str = "/") -> str:
    """"loaded", "loadable" or "missing": whether the kernel can make this mode's devices."""
    mod = MODULE[KIND[mode]]
    if os.path.isdir(os.path.join(root, "sys/module", mod)):
        return "loaded"
    release = os.uname().release
    base = os.path.join(root, "lib/modules", release)
    for name in ("modules.builtin", "modules.dep"):
        try:
            with open(os.path.join(base, name)) as f:
                if any(os.path.basename(line.split(":")[0]).split(".ko")[0] == mod
                       for line in f):
                    return "loaded" if name == "modules.builtin" else "loadable"
        except OSError:
            continue
    return "missing"


def _info_data(spec: TunnelSpec) -> dict:
    """pyroute2's IFLA_INFO_DATA words for a spec (IFLA_IPTUN_*, IFLA_GRE_*, IFLA_VTI_*)."""
    kind = KIND[spec.mode]
    local = str(spec.local) if spec.local else "0.0.0.0"
    remote = str(spec.remote) if spec.remote else "0.0.0.0"
    if kind == "vti":
        d = {"vti_local": local, "vti_remote": remote,
             "vti_ikey": spec.ikey or 0, "vti_okey": spec.okey or 0}
        return d
    p = kind + "_"
    d = {p + "local": local, p + "remote": remote, p + "ttl": spec.ttl, p + "tos": spec.tos,
         p + "pmtudisc": int(spec.pmtudisc)}
    if kind == "gre":
        d.update(gre_iflags=(GRE_KEY if spec.ikey is not None else 0) |
                 (GRE_SEQ if spec.iseq else 0) | (GRE_CSUM if spec.icsum else 0),
                 gre_oflags=(GRE_KEY if spec.okey is not None else 0) |
                 (GRE_SEQ if spec.oseq else 0) | (GRE_CSUM if spec.ocsum else 0),
                 gre_ikey=spec.ikey or 0, gre_okey=spec.okey or 0)
    if kind == "sit":
        d["sit_flags"] = SIT_ISATAP if spec.mode is TunnelMode.ISATAP else 0
        prefix, relay = spec.sixrd
        d.update(sit_6rd_prefix=str(prefix.network_address), sit_6rd_prefixlen=prefix.prefixlen,
                 sit_6rd_relay_prefix=str(relay.network_address),
                 sit_6rd_relay_prefixlen=relay.prefixlen)
    return d


class KernelTunnels:
    def __init__(self):
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> "KernelTunnels":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _link(self, name: str):
        try:
            return self._ipr.link("get", ifname=name)[0]
        except NetlinkError as e:
            if e.code == 19:
                return None
            raise LinkError("get link", name, e.code) from e

    def _kind(self, msg) -> str | None:
        info = msg.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else None

    def read(self, name: str) -> TunnelSpec | None:
        """The spec of any kernel tunnel device, read from its netlink attributes (the PRL of
        an isatap tunnel from tunl's own record, where it made the device)."""
        msg = self._link(name)
        if msg is None or self._kind(msg) not in KINDS:
            return None
        kind = self._kind(msg)
        data = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        a = {k.lower(): v for k, v in (data["attrs"] if data else [])}
        p = "ifla_" + ("iptun" if kind in ("ipip", "sit") else kind) + "_"

        def get(key, default=None):
            for prefix in (p, f"ifla_{kind}_"):
                if prefix + key in a:
                    return a[prefix + key]
            return default
        local, remote = get("local", "0.0.0.0"), get("remote", "0.0.0.0")
        link = get("link", 0)
        dev = None
        if link:
            dev_msg = self._ipr.link("get", index=link)[0]
            dev = dev_msg.get_attr("IFLA_IFNAME")
        f = dict(name=name, local=None if local == "0.0.0.0" else local,
                 remote=None if remote == "0.0.0.0" else remote, dev=dev)
        if kind == "vti":
            f.update(mode="vti", ikey=get("ikey") or None, okey=get("okey") or None)
        else:
            f.update(ttl=get("ttl", 0), tos=get("tos", 0), pmtudisc=bool(get("pmtudisc", 1)))
        if kind == "gre":
            iflags, oflags = get("iflags", 0), get("oflags", 0)
            f.update(mode="gre", ikey=get("ikey", 0) if iflags & GRE_KEY else None,
                     okey=get("okey", 0) if oflags & GRE_KEY else None,
                     iseq=bool(iflags & GRE_SEQ), oseq=bool(oflags & GRE_SEQ),
                     icsum=bool(iflags & GRE_CSUM), ocsum=bool(oflags & GRE_CSUM))
        elif kind == "sit":
            isatap = bool(get("flags", 0) & SIT_ISATAP)
            f["mode"] = "isatap" if isatap else "sit"
            plen, rlen = get("6rd_prefixlen", 16), get("6rd_relay_prefixlen", 0)
            prefix = f"{get('6rd_prefix', '2002::')}/{plen}"
            relay = f"{get('6rd_relay_prefix', '0.0.0.0')}/{rlen}"
            if (prefix, relay) != ("2002::/16", "0.0.0.0/0"):
                f.update(ip6rd_prefix=prefix, ip6rd_relay_prefix=relay)
        elif kind == "ipip":
            f["mode"] = "ipip"
        if f.get("ttl") and not f.get("pmtudisc", True):
            f["pmtudisc"] = True          # the kernel sets DF with a fixed ttl
        try:
            mine = self.owned(name)
        except ForeignDeviceError:
            mine = None
        if mine is not None:
            f["prl"] = [[str(a_), d] for a_, d in mine.prl]
        return TunnelSpec.from_dict(f)

    def owned(self, name: str) -> TunnelSpec | None:
        """The spec of a kernel tunnel tunl made, None if there is no kernel tunnel of that
        name; ForeignDeviceError for one tunl did not make."""
        msg = self._link(name)
        if msg is None or self._kind(msg) not in KINDS:
            return None
        spec = spec_from_alias(msg.get_attr("IFLA_IFALIAS"))
        if spec is None:
            raise ForeignDeviceError(f"{name} exists but tunl did not create it; tunl does not "
                                     "modify a device it did not create")
        return spec

    def add(self, spec: TunnelSpec) -> None:
        if self._link(spec.name) is not None:
            raise ExistsError(f'add tunnel "{spec.name}" failed: File exists')
        kw = _info_data(spec)
        if spec.dev:
            dev = self._link(spec.dev)
            if dev is None:
                raise ConfigError(f'dev "{spec.dev}": Cannot find device')
            kw[KIND[spec.mode] + "_link"] = dev["index"]
        try:
            self._ipr.link("add", ifname=spec.name, kind=KIND[spec.mode], **kw)
        except NetlinkError as e:
            detail = EXISTS if e.code == errno.EEXIST else ""
            raise LinkError("add tunnel", spec.name, e.code, detail) from e
        try:
            self._set(spec.name, ifalias=spec_to_alias(spec, dataplane="kernel"))
            for addr, default in spec.prl:
                self._prl(SIOCADDPRL, spec.name, addr, default)
        except BaseException:
            self._ipr.link("del", ifname=spec.name)
            raise

    def change(self, spec: TunnelSpec) -> None:
        old = self.owned(spec.name)
        if old is None:
            raise NotFoundError(f'change tunnel "{spec.name}" failed: No such device')
        if KIND[old.mode] != KIND[spec.mode] or old.mode is not spec.mode:
            raise ConfigError(f"mode {spec.mode.value}: {spec.name} is {old.mode.a_tunnel}"
                              "; change cannot switch modes (delete and add it)")
        kw = _info_data(spec)
        try:
            self._ipr.link("set", ifname=spec.name, kind=KIND[spec.mode], **kw)
        except NetlinkError as e:
            if e.code == errno.EEXIST:    # ip_tunnel_changelink(): another has these parms
                twin = self._twin(spec)
                if twin is not None:      # in the words of tunld's (and its add's) refusal
                    raise ExistsError(f'change tunnel "{spec.name}" failed: {twin} has the '
                                      'same protocol, local and remote addresses and key') from e
                raise LinkError("change tunnel", spec.name, e.code, EXISTS) from e
            raise LinkError("change tunnel", spec.name, e.code) from e
        for addr, default in old.prl:
            if (addr, default) not in spec.prl:
                self._prl(SIOCDELPRL, spec.name, addr, default)
        for addr, default in spec.prl:
            if (addr, default) not in old.prl:
                self._prl(SIOCADDPRL, spec.name, addr, default)
        self._set(spec.name, ifalias=spec_to_alias(spec, dataplane="kernel"))

    def _twin(self, spec: TunnelSpec) -> str | None:
        """The other kernel tunnel with the same protocol, local and remote addresses and
        key as `spec` (what makes the kernel answer EEXIST), if it can be found."""
        try:
            for name in self.names():
                if name == spec.name:
                    continue
                other = self.read(name)
                if other is not None and KIND[other.mode] == KIND[spec.mode] and (
                        other.local, other.remote, other.ikey, other.dev) == (
                        spec.local, spec.remote, spec.ikey, spec.dev):    # ip_tunnel_find()
                    return name
        except (NetlinkError, TunlError, OSError):
            pass                     # the kernel's word alone, then
        return None

    def _set(self, name: str, **kw) -> None:
        try:
            self._ipr.link("set", ifname=name, **kw)
        except NetlinkError as e:
            raise LinkError("change tunnel", name, e.code) from e

    def delete(self, name: str) -> None:
        if self.owned(name) is None:
            raise NotFoundError(f'delete tunnel "{name}" failed: No such device')
        try:
            self._ipr.link("del", ifname=name)
        except NetlinkError as e:
            raise LinkError("delete tunnel", name, e.code) from e

    def names(self) -> list[str]:
        return sorted(m.get_attr("IFLA_IFNAME") for m in self._ipr.get_links()
                      if self._kind(m) in KINDS)

    def _prl(self, cmd: int, name: str, addr, default: bool) -> None:
        """struct ip_tunnel_prl { __be32 addr; __u16 flags; __u16 reserved; __u32 datalen;
        __u32 reserved2; } handed to the device by pointer in ifr_data."""
        prl = ctypes.create_string_buffer(struct.pack("!4sHHII", addr.packed, 0, 0, 0, 0), 16)
        struct.pack_into("=H", prl, 4, PRL_DEFAULT if default else 0)
        ifr = struct.pack("16sP", name.encode(), ctypes.addressof(prl))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                fcntl.ioctl(s.fileno(), cmd, ifr)
            except OSError as e:
                raise LinkError("prl", name, e.errno) from e

