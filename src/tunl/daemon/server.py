"""tunld: the daemon of one network namespace.

It holds the TUN queues of the namespace's userspace tunnels and runs their data plane. Its
state is the devices themselves: each TUN device it creates is persistent and carries its tunnel
spec in its alias (`ip link show` prints it), so a tunld started after a crash or `kill -9`
finds every tunnel, address and route where it was and takes them back.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from ..dataplane import tun
from ..dataplane.engine import Engine
from ..errors import (ConfigError, ExistsError, ForeignDeviceError, NotFoundError, TunlError,
                      UnsupportedError)
from ..kernel import Kernel, RouteWatcher
from ..kernel.netlink import disable_ipv6, no_link_local
from ..tunnel import modes
from ..model import TunnelMode, TunnelSpec, spec_from_alias, spec_to_alias
from . import CONTROL_ADDRESS

log = logging.getLogger("tunl.daemon")

UNDERLAY_MTU = 1500   # ETH_DATA_LEN: the kernel's guess when a tunnel has no underlay device


class Tunld:
    def __init__(self):
        self.kernel = Kernel()
        self._per_thread = threading.local()
        self.engine = Engine(time.monotonic, self._route_via)
        self.lock = threading.Lock()
        self.watcher: RouteWatcher | None = None
        self.running = True

    def _route_via(self, dst: str):
        """For the data plane's threads: each gets its own netlink socket."""
        k = getattr(self._per_thread, "kernel", None)
        if k is None:
            k = self._per_thread.kernel = Kernel()
        return k.route_via(dst)

    # -- lifecycle --------------------------------------------------------------------------

    def reclaim(self) -> None:
        """Take back the tunnels a previous tunld of this namespace created."""
        for link in self.kernel.links():
            spec = spec_from_alias(link.alias)
            if link.kind != "tun" or spec is None or spec.name != link.name:
                continue
            try:
                fd = tun.attach(link.name)
            except (TunlError, OSError) as e:     # one bad device must not stop the rest
                log.error("cannot take back %s: %s", link.name, e)
                continue
            try:
                self.engine.add(spec, fd, link.index, link.mtu)
            except (TunlError, OSError) as e:
                os.close(fd)
                log.error("cannot take back %s: %s", link.name, e)
                continue
            log.info("took back %s", link.name)

    def resync(self, k: Kernel) -> None:
        """Mirror each tunnel's routes, state and MTU from the kernel (on every event)."""
        with self.lock:
            for name in list(self.engine.tunnels):
                link = k.link(name)
                if link is None or link.kind != "tun":      # deleted behind our back
                    os.close(self.engine.remove(name))
                    log.info("%s was deleted", name)
                    continue
                self.engine.set_state(name, k.routes(link.index), link.up, link.mtu,
                                      k.prefixes6(link.index))

    def serve(self) -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            srv.bind(CONTROL_ADDRESS)
        except OSError:
            log.info("another tunld already serves this network namespace")
            return
        srv.listen(16)
        self.reclaim()
        self.engine.start()
        self.watcher = RouteWatcher(self.resync)
        self.watcher.start()
        log.info("tunld %d serving %d tunnel(s)", os.getpid(), len(self.engine.tunnels))
        srv.settimeout(0.5)
        while self.running:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            with conn:
                conn.settimeout(5)
                self._serve_one(conn)
        srv.close()
        self.watcher.stop()
        self.engine.stop()       # closes the queues; the persistent devices stay

    def _serve_one(self, conn: socket.socket) -> None:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_PEERCRED, 12))
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        try:
            if uid != 0:
                raise TunlError("tunld answers root only (Operation not permitted)")
            req = json.loads(data)
            op = req.pop("op")
            handler = getattr(self, "op_" + op, None)
            if handler is None:
                raise ConfigError(f'op "{op}": tunld does not know it')
            with self.lock:
                reply = {"ok": True, "result": handler(**req)}
        except TunlError as e:
            reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
        except Exception as e:  # a bug: keep serving, tell the caller
            log.exception("request failed")
            reply = {"ok": False, "error": "TunlError", "message": f"tunld: internal error: {e!r}"}
        try:
            conn.sendall(json.dumps(reply).encode())
        except OSError:
            pass

    # -- operations -------------------------------------------------------------------------

    def _check_dataplane(self, spec: TunnelSpec, dataplane: str) -> None:
        if dataplane == "kernel":
            raise UnsupportedError("--dataplane kernel: this tunl has the userspace data plane "
                                   "only; use --dataplane userspace or auto")
        modes.module_for(spec.mode)     # vti: refused with the reason

    def _mtu_for(self, spec: TunnelSpec) -> int:
        """Underlay MTU minus the outer header, as ip_tunnel_bind_dev() computes it."""
        under = UNDERLAY_MTU
        if spec.dev:
            link = self.kernel.link(spec.dev)
            if link is None:
                raise ConfigError(f'dev "{spec.dev}": Cannot find device')
            under = link.mtu
        elif spec.remote:
            try:
                under = self.kernel.route_get(str(spec.remote))[1]
            except NotFoundError:
                pass
        mtu = under - modes.codec_for(spec).overhead
        if spec.mode in (TunnelMode.SIT, TunnelMode.ISATAP):
            mtu = max(mtu, 1280)           # ipip6_tunnel_bind_dev(): IPv6 needs 1280
        return mtu

    def op_add(self, spec: dict, dataplane: str = "auto") -> dict:
        s = TunnelSpec.from_dict(spec)
        self._check_dataplane(s, dataplane)
        if self.kernel.link(s.name) is not None:
            raise ExistsError(f'add tunnel "{s.name}" failed: File exists')
        for other in self.engine.tunnels.values():
            o = other.spec
            if (o.mode.proto, o.local, o.remote, o.ikey) == (s.mode.proto, s.local, s.remote, s.ikey):
                # ip_tunnel_add() finds a tunnel with the same parameters
                raise ExistsError(f'add tunnel "{s.name}" failed: {o.name} has the same '
                                  'protocol, local and remote addresses and key')
        mtu = self._mtu_for(s)
        fd = tun.create(s.name)
        try:
            self.kernel.set_link(s.name, mtu=mtu, alias=spec_to_alias(s))
            if s.mode is TunnelMode.IPIP:
                disable_ipv6(s.name)
            else:
                no_link_local(s.name)
            link = self.kernel.link(s.name)
        except BaseException:
            tun.destroy(fd)
            raise
        self.engine.add(s, fd, link.index, link.mtu)
        self.engine.set_state(s.name, [], link.up, link.mtu)
        return self._status(s.name)

    def _ours(self, name: str, verb: str):
        t = self.engine.tunnels.get(name)
        if t is not None:
            return t
        if self.kernel.link(name) is not None:
            raise ForeignDeviceError(f"{name} exists but tunl did not create it; tunl does not "
                                     "modify a device it did not create")
        raise NotFoundError(f'{verb} tunnel "{name}" failed: No such device')

    def op_change(self, spec: dict, dataplane: str = "auto") -> dict:
        s = TunnelSpec.from_dict(spec)
        t = self._ours(s.name, "change")
        if s.mode is not t.spec.mode:
            raise ConfigError(f"mode {s.mode.value}: {s.name} is a {t.spec.mode.value} tunnel; "
                              "change cannot switch modes (delete and add it)")
        self._check_dataplane(s, dataplane)
        if modes.codec_for(s).overhead != t.codec.overhead or s.dev != t.spec.dev:
            self.kernel.set_link(s.name, mtu=self._mtu_for(s))    # like ipgre_link_update()
        return self._respec(t, s)

    def _respec(self, t, new: TunnelSpec) -> dict:
        self.kernel.set_link(new.name, alias=spec_to_alias(new))
        self.engine.reconfigure(new)
        return self._status(new.name)

    def op_prl(self, name: str, action: str, addr: str, default: bool) -> dict:
        """SIOCADDPRL / SIOCDELPRL on an isatap tunnel (ipip6_tunnel_add_prl(), _del_prl())."""
        t = self._ours(name, "prl")
        return self._respec(t, t.spec.prl_changed(action, IPv4Address(addr), default))

    def op_sixrd(self, name: str, prefix: str | None, relay: str | None) -> dict:
        """SIOCADD6RD / SIOCDEL6RD (ipip6_tunnel_update_6rd()); no prefix: 6rd-reset."""
        t = self._ours(name, "6rd")
        if t.spec.mode not in (TunnelMode.SIT, TunnelMode.ISATAP):
            raise ConfigError(f"6rd on {name}: {name} is a {t.spec.mode.value} tunnel; 6rd is "
                              "for sit tunnels")
        new = t.spec.with_(ip6rd_prefix=IPv6Network(prefix) if prefix else None,
                           ip6rd_relay_prefix=IPv4Network(relay) if relay else None)
        return self._respec(t, new)

    def op_del(self, name: str) -> dict:
        self._ours(name, "delete")
        fd = self.engine.remove(name)
        tun.destroy(fd)
        return {"deleted": name}

    def _status(self, name: str) -> dict:
        t = self.engine.tunnels[name]
        return {"spec": t.spec.to_dict(), "dataplane": "userspace", "ifindex": t.ifindex,
                "mtu": t.mtu, "up": t.up, "routes": len(t.fib4) + len(t.fib6),
                "counters": t.counters.as_dict()}

    def op_show(self, name: str | None = None) -> list[dict]:
        if name is not None:
            self._ours(name, "get")
            return [self._status(name)]
        return [self._status(n) for n in sorted(self.engine.tunnels)]

    def op_status(self) -> dict:
        return {"pid": os.getpid(), "tunnels": sorted(self.engine.tunnels),
                "engine": self.engine.stats()}

    def op_shutdown(self) -> dict:
        self.running = False
        return {"pid": os.getpid()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tunld", description="tunl's daemon for this network namespace")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s tunld[%(process)d] %(levelname)s %(message)s")
    sys.setswitchinterval(0.0005)   # hand the GIL over quickly between ingress and egress
    try:
        d = Tunld()
        signal.signal(signal.SIGTERM, lambda *_: setattr(d, "running", False))
        d.serve()
    except KeyboardInterrupt:
        pass
    except (TunlError, OSError) as e:
        print(f"tunld: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
