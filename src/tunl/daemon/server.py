"""tunld's data-plane process, one per network namespace (its supervisor starts it).

It holds the TUN queues of the namespace's userspace tunnels and runs their data plane. The
TUN devices it creates are persistent, so their addresses and routes outlive the process;
which devices are tunl's, with which spec, is recorded in a root-only state file (daemon/
state.py), and the alias `ip link show` prints is a copy for people. A process started after a
crash or `kill -9` takes every tunnel back from that record.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from ..dataplane import tun
from ..dataplane.engine import Engine
from ..errors import (ConfigError, DaemonError, ExistsError, ForeignDeviceError,
                      NotFoundError, TunlError, UnsupportedError)
from ..dataplane.ratelimit import RateLimitedLog
from ..kernel import Kernel, rtnl
from ..kernel.netlink import disable_ipv6, no_link_local
from ..tunnel import modes
from ..model import TunnelMode, TunnelSpec, spec_from_alias, spec_to_alias
from . import logs
from .control import ControlServer, check_request, needs_root
from .ebpf import EbpfTunnels, slow_reasons
from .mirror import Changes, Mirror
from .process import STOP, name_process, recv_partner, spawn
from .state import State

log = logging.getLogger("tunl.daemon")
LOG = RateLimitedLog(log)

UNDERLAY_MTU = 1500   # ETH_DATA_LEN: the kernel's guess when a tunnel has no underlay device
PATH_REFRESH = 1.0    # seconds: paths to outer destinations are looked up again this often
COALESCE = 0.05       # seconds: the data plane's route tables are rebuilt at most this often
RESYNC_INTERVAL = 30.0  # seconds: everything is dumped again this often, whatever the events
PATH_COALESCE = 0.25  # seconds: under a stream of events, paths are looked up again this often
AF_INET6 = socket.AF_INET6
BROADCAST = IPv4Address("255.255.255.255")

# the requests tunld takes: op -> argument -> (JSON types, required)
SPEC = (dict, True)
DATAPLANE = (str, False)
OPS = {
    "add": {"spec": SPEC, "dataplane": DATAPLANE},
    "change": {"spec": SPEC, "dataplane": DATAPLANE},
    "del": {"name": (str, True)},
    "prl": {"name": (str, True), "action": (str, True), "addr": (str, True),
            "default": (bool, True)},
    "sixrd": {"name": (str, True), "prefix": ((str, type(None)), True),
              "relay": ((str, type(None)), True)},
    "members": {"name": (str, True), "addrs": ((list, type(None)), True)},
    "show": {"name": ((str, type(None)), False)},
    "routes": {"name": (str, True)},
    "capture": {"name": (str, True), "pid": ((int, type(None)), True)},
    "status": {},
    "shutdown": {},
    "xfrm": {"call": (str, True), "item": ((dict, type(None)), False), "update": (bool, False)},
}
# what any user of the namespace may ask (`tunl tunnel show`, `-s`, `-j`, `tunl daemon
# status`), as iproute2 lets anyone read tunnels, links and counters; the rest is root's
READ_ONLY = frozenset({"show", "status", "routes"})


class Tunld:
    """The data-plane process of a namespace's tunld: the engine, the mirror of the kernel
    state it needs, and the control socket."""

    def __init__(self, state: State | None = None):
        self.kernel = Kernel()
        self.state = state or State()
        self.records: dict[str, tuple[int, TunnelSpec]] = {}
        self._per_thread = threading.local()
        self.engine = Engine(time.monotonic, self._route_via)
        self.mirror = Mirror()
        self.ebpf = EbpfTunnels(lambda dst, src, oif: self._rtnl().route_get(dst, src, oif))
        self.planes: dict[str, str] = {}     # name -> "ebpf" | "userspace"
        # name -> the outer sources a tunnel takes packets from (no entry: from anyone)
        self.members: dict[str, frozenset[IPv4Address]] = {}
        self.engine.on_pmtu = self._pmtu_learned
        self.lock = threading.Lock()
        self.running = True
        self._stop_r, self._stop_w = os.pipe()
        self._watcher = threading.Thread(target=self._watch, name="kernel-events", daemon=True)
        self._events: rtnl.Events | None = None
        self.resyncs = 0
        self.overflows = 0
        self.supervisor_pid = 0
        self.stop_requested = False
        self.log_path = logs.log_path()     # or logs.STDERR: main() says which
        self._path_mtu: dict[tuple, int] = {}   # (dst, src, dev) -> MTU last looked up

    def _rtnl(self) -> rtnl.Rtnl:
        r = getattr(self._per_thread, "rtnl", None)
        if r is None:
            r = self._per_thread.rtnl = rtnl.Rtnl()
        return r

    def _route_via(self, dst: str, src: str | None = None, dev: str | None = None):
        """For the data plane's threads (each with its own netlink socket): the kernel's
        route to dst from src (out of dev, as ip_tunnel_xmit() asks with parms.link), as
        (ifindex, gateway, path MTU); None if it has none."""
        oif = self.mirror.index(dev) if dev else None
        got = self._rtnl().route_get(dst, src, oif)
        if isinstance(got, int):
            return None
        mtu = got.mtu or self.mirror.mtu(got.oif) or UNDERLAY_MTU
        key = (dst, src, dev)
        was = self._path_mtu.get(key)
        if was != mtu:               # lookups are cached per destination: this is no flood
            if len(self._path_mtu) >= 4096:
                self._path_mtu.clear()
            self._path_mtu[key] = mtu
            log.debug("path to %s%s: MTU %d%s (route out of ifindex %d)", dst,
                      f" from {src}" if src else "", mtu,
                      f", was {was}" if was is not None else "", got.oif)
        return got.oif, got.gateway.packed if got.gateway else None, mtu

    # -- lifecycle --------------------------------------------------------------------------

    def reclaim(self) -> None:
        """Take back the tunnels this namespace's tunld made, by its own record: the device
        must still be a TUN device with the same ifindex. An alias changed by hand is put
        back; a device that only claims to be tunl's (its alias) is left alone. With no
        record at all (tunl 0.1 kept none, or /run was wiped while the devices stayed), the
        TUN devices whose alias is tunl's are taken back once, and recorded from then on."""
        links = {link.name: link for link in self.kernel.links()}
        recorded = self.state.load()
        self.planes = dict(self.state.planes)
        self.members = dict(self.state.members)
        self._load_xfrm()
        if recorded is None:
            recorded = {link.name: (link.index, spec) for link in links.values()
                        if link.kind == "tun" and (spec := spec_from_alias(link.alias))
                        is not None and spec.name == link.name}
            if recorded:
                log.warning("no record of tunl's tunnels here; taking back %s by their alias",
                            " ".join(sorted(recorded)))
        by_index = {link.index: link for link in links.values()}
        for name, (ifindex, spec) in recorded.items():
            link = by_index.get(ifindex)
            if link is None or link.kind != "tun":
                log.warning("%s is gone or is another device now; forgetting it", name)
                continue
            if link.name != name:                     # renamed while no tunld ran
                log.info("%s is now called %s", name, link.name)
                spec = spec.with_(name=link.name)
                for by_name in (self.planes, self.members):
                    if name in by_name:
                        by_name[link.name] = by_name.pop(name)
            self.records[link.name] = (ifindex, spec)  # kept even if it cannot be opened now
            self._take_back(link.name, ifindex, spec, link)
        self.members = {n: m for n, m in self.members.items() if n in self.records}
        for link in links.values():
            if link.name not in self.records and spec_from_alias(link.alias) is not None:
                log.warning("%s has a tunl alias but tunl did not create it; left alone",
                            link.name)
        try:
            self._save()
        except DaemonError:
            pass                  # logged; the tunnels run, and the next change tries again

    def _take_back(self, name: str, ifindex: int, spec: TunnelSpec, link) -> bool:
        try:
            fd = tun.attach(name)
        except (TunlError, OSError) as e:     # one bad device must not stop the rest
            LOG.error("cannot take back %s yet: %s", name, e, key=("attach", name))
            return False
        # the member set goes in with the tunnel: a restart never takes a packet it refused
        members = self.members.get(name)
        try:
            self.engine.add(spec, fd, ifindex, link.mtu, members=_packed(members))
        except (TunlError, OSError) as e:
            os.close(fd)
            LOG.error("cannot take back %s yet: %s", name, e, key=("attach", name))
            return False
        if self.planes.get(name) == "ebpf":
            try:
                self.ebpf.set_members(ifindex, _packed(members))
                self.ebpf.put(spec, ifindex, self._link_index(spec))
            except (TunlError, OSError) as e:
                LOG.error("%s: cannot attach the eBPF programs (%s); its packets take the "
                          "userspace data plane", name, e, key=("ebpf", name))
        if link.alias != spec_to_alias(spec):
            try:
                self.kernel.set_link(name, alias=spec_to_alias(spec), index=ifindex)
                log.warning("%s: its alias was changed; put back", name)
            except TunlError as e:
                log.error("%s: cannot put its alias back: %s", name, e)
        log.info("took back %s", name)
        log.debug("%s: %s, ifindex %d, mtu %d, %s data plane", name, describe(spec), ifindex,
                  link.mtu, self.planes.get(name, "userspace"))
        return True

    def _retry_take_back(self) -> None:
        """Recorded tunnels that could not be opened at start (a queue held elsewhere)."""
        waiting = [n for n in self.records if n not in self.engine.tunnels]
        if not waiting:
            return
        by_index = {link.index: link for link in self.kernel.links()}
        for name in waiting:
            ifindex, spec = self.records.pop(name)
            link = by_index.get(ifindex)
            if link is None or link.kind != "tun":
                continue                               # gone: forgotten
            spec = spec.with_(name=link.name)
            if name != link.name and name in self.members:
                self.members[link.name] = self.members.pop(name)
            self.records[link.name] = (ifindex, spec)
            if self._take_back(link.name, ifindex, spec, link):
                self._watch_tunnel(self.engine.tunnels[link.name])
        try:
            self._save()
        except DaemonError:
            pass

    def _save(self) -> None:
        """Write the record. A failure is logged, and the tunnels go on: they are lost only
        if tunld also restarts before the record can be written."""
        try:
            self.state.save(self.records, self.planes, self.members)
        except OSError as e:
            LOG.error("cannot write the record of tunl's tunnels %s: %s", self.state.path, e,
                      key="save")
            raise DaemonError(f"cannot record the tunnels in {self.state.path}: "
                              f"{e.strerror}") from e

    def _record(self, t) -> None:
        self.records[t.spec.name] = (t.ifindex, t.spec)
        self._save()

    # -- kernel events ----------------------------------------------------------------------

    def _watched(self) -> set[int]:
        return {t.ifindex for t in self.engine.tunnels.values()}

    def _dump(self, r: rtnl.Rtnl) -> tuple:
        """Full dumps of what the mirror holds, for the tunnels watched now. Safe without the
        lock: the event socket was subscribed first, so whatever changes meanwhile arrives
        after as an event and is applied on top (adds and deletes replay idempotently)."""
        want = self._watched()
        return want, r.dump_routes(want), r.dump_links(), r.dump_addrs(AF_INET6)

    def _resync(self, r: rtnl.Rtnl, dumped: tuple | None = None) -> bool:
        """Everything from full dumps: at start, after the event socket overflowed, and every
        RESYNC_INTERVAL in case the kernel changed something without an event. False when
        the tunnels changed since `dumped` was taken (then it is taken again next time)."""
        want, routes, links, addrs = dumped or self._dump(r)
        if want != self._watched():
            return False
        self.resyncs += 1
        self._apply(self.mirror.load(want, routes, links, addrs))
        return True

    def _apply(self, ch) -> None:
        by_index = {t.ifindex: t for t in self.engine.tunnels.values()}
        for index in ch.gone:
            t = by_index.pop(index, None)
            if t is not None:
                self._forget(t.spec.name)
                log.info("%s was deleted", t.spec.name)
        redump = {i for i in ch.redump if i in by_index}
        if redump:                    # one dump for all of them
            self.mirror.reload(redump, self._rtnl().dump_routes(redump))
            ch.routes |= redump
        renamed = []
        for index in ch.links:
            t, link = by_index.get(index), self.mirror.links.get(index)
            if t is not None and link is not None and link.name and link.name != t.spec.name:
                renamed.append((t, link.name))
        if renamed:
            self._renamed(renamed)
        for index in ch.routes | ch.prefixes | ch.links:
            t = by_index.get(index)
            link = self.mirror.links.get(index)
            if t is None or link is None:
                continue
            if link.mtu != t.mtu or link.up != t.up:
                log.debug("%s: device %s, mtu %d%s", t.spec.name, "up" if link.up else "down",
                          link.mtu, f" (was {t.mtu})" if link.mtu != t.mtu else "")
            self.engine.set_state(
                t.spec.name,
                self.mirror.tunnel_routes(index) if index in ch.routes else None,
                link.up, link.mtu,
                self.mirror.tunnel_prefixes(index) if index in ch.prefixes else None)
        if ch.any:
            self.engine.paths_changed()
        if self.ebpf.tunnels and (ch.routes or ch.links or ch.any):
            if ch.links:
                self.ebpf.attach_underlay()
            self._ebpf_sync()

    def _ebpf_sync(self) -> None:
        """The eBPF maps of every eBPF tunnel: its routes and the paths to its peers."""
        for t in list(self.engine.tunnels.values()):
            if t.ifindex in self.ebpf.tunnels:
                try:
                    self.ebpf.sync(t.ifindex, self.mirror.tunnel_routes(t.ifindex),
                                   self.engine.pmtu.get, t.up)
                except OSError as e:
                    LOG.error("%s: eBPF maps: %s", t.spec.name, e, key=("ebpf-sync", t.ifindex))

    def _pmtu_learned(self, peer: bytes, mtu: int) -> None:
        """From the engine's ICMP thread: the eBPF paths to peer shrink now, not at the next
        refresh (the maps are the kernel's; no lock of tunld's is needed)."""
        programs = self.ebpf.programs
        if programs.obj is not None:
            log.debug("eBPF maps: path MTU to %s lowered to %d", socket.inet_ntoa(peer), mtu)
            try:
                programs.lower_mtu(peer, mtu)
            except OSError as e:
                LOG.error("eBPF path MTU to %s: %s", socket.inet_ntoa(peer), e, key="ebpf-pmtu")

    def _renamed(self, renamed: list) -> None:
        """`ip link set OLD name NEW`: the kernel's tunnels keep working under a new name,
        and so do tunl's. All renames of a batch at once: one may take a name another gave
        up (a swap)."""
        was = [(t.spec.name, name) for t, name in renamed]     # before the engine renames
        self.engine.rename(dict(was))
        planes = {name: self.planes.pop(old, "userspace") for old, name in was}
        self.planes.update(planes)
        members = {name: self.members.pop(old) for old, name in was if old in self.members}
        self.members.update(members)
        for t, _name in renamed:
            self.records = {n: r for n, r in self.records.items() if r[0] != t.ifindex}
        for t, name in renamed:
            self.records[name] = (t.ifindex, t.spec)
            try:
                self.kernel.set_link(name, alias=spec_to_alias(t.spec), index=t.ifindex)
            except TunlError as e:
                log.error("%s: cannot update its alias: %s", name, e)
            log.info("tunnel %d is now called %s", t.ifindex, name)
        try:
            self._save()
        except DaemonError:
            pass                  # logged; the record catches up with the next change

    def _forget(self, name: str) -> None:
        t = self.engine.tunnels.get(name)
        if t is not None:
            self.mirror.unwatch(t.ifindex)
            self.ebpf.remove(t.ifindex)
            os.close(self.engine.remove(name))
        self.planes.pop(name, None)
        self.members.pop(name, None)
        if self.records.pop(name, None) is not None:
            try:
                self._save()
            except DaemonError:
                pass          # logged; a stale entry is dropped when its device is not found

    def _watch(self) -> None:
        """Follow the kernel's events. The mirror takes each batch at once (dict updates), and
        so does the data plane for links, addresses and paths; its route tables are rebuilt
        at most every COALESCE seconds, so that a burst of routes costs a few rebuilds, not
        one per route (meanwhile the data plane asks the kernel about a route it lacks).
        Paths to outer destinations are looked up again after any event, and at least every
        PATH_REFRESH (for the MTUs the kernel learns and forgets on its own)."""
        r = self._rtnl()
        poller = select.poll()
        poller.register(self._events.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        routes: set[int] = set()          # tunnels whose route table waits to be rebuilt
        paths = False                     # paths wait to be looked up again
        now = time.monotonic()
        last_routes = last_paths = 0.0
        next_refresh, next_resync = now + PATH_REFRESH, now + RESYNC_INTERVAL
        while self.running:
            now = time.monotonic()
            due = min(next_refresh, next_resync,
                      last_routes + COALESCE if routes else next_refresh,
                      last_paths + PATH_COALESCE if paths else next_refresh)
            ready = poller.poll(max(0.0, due - now) * 1000)
            if any(fd == self._stop_r for fd, _ in ready):
                return
            try:
                dumped = None
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + RESYNC_INTERVAL
                    dumped = self._dump(r)           # outside the lock: requests go on
                with self.lock:
                    now = time.monotonic()
                    if ready:
                        msgs = self._events.read(self._watched())
                        if msgs is None:                 # overflow: events were lost
                            log.warning("kernel events overflowed; resynchronising")
                            self.overflows += 1
                            self._resync(r)
                            routes, paths, last_routes = set(), False, now
                            continue
                        ch = self.mirror.apply(msgs)
                        ch.any = False          # paths: below, at most every PATH_COALESCE
                        paths = True            # (routes of other devices are filtered out)
                        routes |= ch.routes
                        ch.routes = set()
                        self._apply(ch)
                    if dumped is not None:
                        if self._resync(r, dumped):
                            routes, paths, last_routes = set(), False, now
                        self._retry_take_back()
                    if now >= next_refresh:
                        paths, last_paths = True, 0.0
                        next_refresh = now + PATH_REFRESH
                    if paths and now >= last_paths + PATH_COALESCE:
                        self.engine.paths_changed()
                        self.ebpf.end_dead_captures()
                        self._ebpf_sync()
                        paths, last_paths = False, now
                    if routes and now >= last_routes + COALESCE:
                        self._apply(Changes(routes=routes))
                        routes, last_routes = set(), now
            except Exception:         # a bug must not stop the mirror: log it, go on
                LOG.exception("kernel events", key="events")
                routes = set()

    def _watch_tunnel(self, t) -> None:
        r = self._rtnl()
        self.mirror.watch(t.ifindex, r.dump_routes({t.ifindex}),
                          [a for a in r.dump_addrs(AF_INET6) if a.index == t.ifindex])
        link = self.kernel.link(t.spec.name)
        if link is not None:
            self.engine.set_state(t.spec.name, self.mirror.tunnel_routes(t.ifindex), link.up,
                                  link.mtu, self.mirror.tunnel_prefixes(t.ifindex))
        self._ebpf_sync()

    # -- serving ----------------------------------------------------------------------------

    def start(self) -> None:
        """Take the tunnels back and start moving their packets."""
        # before the dump, so that no change falls in between; TUNLD_EVENT_RCVBUF (bytes)
        # shrinks its buffer, to see an overflow handled
        size = os.environ.get("TUNLD_EVENT_RCVBUF", "")
        self._events = (rtnl.Events(rcvbuf=int(size)) if size.isdigit() else rtnl.Events())
        self.reclaim()
        with self.lock:
            self._resync(self._rtnl())
        self.engine.start()
        self._watcher.start()
        log.info("tunld %d serving %d tunnel(s)", os.getpid(), len(self.engine.tunnels))

    def stop(self) -> None:
        self.running = False
        os.write(self._stop_w, b"x")
        if self._watcher.is_alive():
            self._watcher.join(5)
        got = self.lock.acquire(timeout=5)     # a watcher still busy must not race the stop
        try:
            self.engine.stop()   # closes the queues; the persistent devices stay
        finally:
            if got:
                self.lock.release()
        if self._events is not None:
            self._events.close()

    def handle(self, req: dict, uid: int) -> object:
        op, args = check_request(req, OPS)
        if uid != 0 and op not in READ_ONLY:     # the control server refused it already
            raise needs_root(op, READ_ONLY)
        with self.lock:
            return getattr(self, "op_" + op)(**args)

    # -- operations -------------------------------------------------------------------------

    def _check_dataplane(self, spec: TunnelSpec, dataplane: str) -> str:
        """The plane tunld gives a tunnel asked for with --dataplane: "ebpf" or "userspace"."""
        if dataplane == "kernel":
            raise UnsupportedError("--dataplane kernel: the kernel's own tunnels are not "
                                   "tunld's; use --dataplane ebpf, userspace or auto")
        if dataplane not in ("auto", "ebpf", "userspace"):
            raise ConfigError(f'--dataplane "{dataplane}": the data planes are auto, kernel, '
                              "ebpf and userspace")
        modes.module_for(spec.mode)
        if spec.mode is TunnelMode.VTI:
            if dataplane == "ebpf":
                raise UnsupportedError("--dataplane ebpf: a vti's packets are encrypted and "
                                       "decrypted by tunld itself (ESP), not by the eBPF "
                                       "programs; use --dataplane userspace (or auto)")
            return "userspace"
        if dataplane == "userspace":
            return dataplane
        why = self.ebpf.available()
        if why is None:
            return "ebpf"
        if dataplane == "ebpf":
            raise UnsupportedError(f"--dataplane ebpf: {why}; use --dataplane userspace "
                                   "(or auto)")
        return "userspace"

    def _link_index(self, spec: TunnelSpec) -> int:
        link = self.kernel.link(spec.dev) if spec.dev else None
        return link.index if link is not None else 0

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
        s = _spec(spec)
        plane = self._check_dataplane(s, dataplane)
        if s.name in self.engine.tunnels or self.kernel.link(s.name) is not None:
            raise ExistsError(f'add tunnel "{s.name}" failed: File exists')
        self._refuse_twin(s, "add")
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
        t = self.engine.add(s, fd, link.index, link.mtu)
        self.planes[s.name] = plane
        self.members.pop(s.name, None)          # a new tunnel takes packets from anyone
        try:
            if plane == "ebpf":
                try:
                    self.ebpf.put(s, t.ifindex, self._link_index(s))
                except OSError as e:
                    self.ebpf.remove(t.ifindex)
                    if dataplane == "ebpf":
                        raise UnsupportedError(f"--dataplane ebpf: cannot attach the programs "
                                               f"to {s.name}: {e.strerror or e}") from e
                    LOG.warning("%s: cannot attach the eBPF programs (%s); it takes the "
                                "userspace data plane", s.name, e, key=("ebpf", s.name))
                    self.planes[s.name] = "userspace"
            self._record(t)
        except (DaemonError, UnsupportedError):
            self.records.pop(s.name, None)           # unrecorded: it would be lost; undo
            self.planes.pop(s.name, None)
            self.ebpf.remove(t.ifindex)
            tun.destroy(self.engine.remove(s.name))
            raise
        self._watch_tunnel(t)
        log.info("added %s: %s, %s data plane", s.name, describe(s), self.planes[s.name])
        log.debug("%s: ifindex %d, mtu %d", s.name, t.ifindex, link.mtu)
        return self._status(s.name)

    def _refuse_twin(self, s: TunnelSpec, verb: str, changed=None) -> None:
        """ip_tunnel_add() and ip_tunnel_changelink() (the kernel's EEXIST): no two tunnels
        with the same protocol, local and remote addresses and key. `changed`: the tunnel
        being changed, which is not its own twin."""
        for other in self.engine.tunnels.values():
            o = other.spec
            if other is changed:
                continue
            if (o.mode.proto, o.local, o.remote, o.ikey) == (s.mode.proto, s.local, s.remote,
                                                             s.ikey):
                raise ExistsError(f'{verb} tunnel "{s.name}" failed: {o.name} has the same '
                                  'protocol, local and remote addresses and key')

    def _ours(self, name: str, verb: str):
        t = self.engine.tunnels.get(name)
        if t is not None:
            return t
        if self.kernel.link(name) is not None:
            raise ForeignDeviceError(f"{name} exists but tunl did not create it; tunl does not "
                                     "modify a device it did not create")
        raise NotFoundError(f'{verb} tunnel "{name}" failed: No such device')

    def op_change(self, spec: dict, dataplane: str = "auto") -> dict:
        s = _spec(spec)
        t = self._ours(s.name, "change")
        if s.mode is not t.spec.mode:
            raise ConfigError(f"mode {s.mode.value}: {s.name} is {t.spec.mode.a_tunnel}; "
                              "change cannot switch modes (delete and add it)")
        if dataplane != "auto" and self._check_dataplane(s, dataplane) != self.planes.get(
                s.name, "userspace"):
            raise ConfigError(f"--dataplane {dataplane}: {s.name} is on the "
                              f"{self.planes.get(s.name, 'userspace')} data plane; change "
                              "cannot move a tunnel (delete and add it)")
        modes.module_for(s.mode)
        self._refuse_twin(s, "change", changed=t)
        if modes.codec_for(s).overhead != t.codec.overhead or s.dev != t.spec.dev:
            self.kernel.set_link(s.name, mtu=self._mtu_for(s))    # like ipgre_link_update()
        return self._respec(t, s)

    def _respec(self, t, new: TunnelSpec) -> dict:
        """Record the new spec first: a change that cannot be recorded is not made."""
        old = self.records.get(new.name)
        self.records[new.name] = (t.ifindex, new)
        try:
            self._save()
        except DaemonError:
            if old is not None:
                self.records[new.name] = old
            raise
        self.kernel.set_link(new.name, alias=spec_to_alias(new), index=t.ifindex)
        self.engine.reconfigure(new)
        if t.ifindex in self.ebpf.tunnels:
            self.ebpf.put(new, t.ifindex, self._link_index(new))
            self._ebpf_sync()
        log.info("changed %s: %s", new.name, describe(new))
        return self._status(new.name)

    def op_prl(self, name: str, action: str, addr: str, default: bool) -> dict:
        """SIOCADDPRL / SIOCDELPRL on an isatap tunnel (ipip6_tunnel_add_prl(), _del_prl())."""
        t = self._ours(name, "prl")
        return self._respec(t, t.spec.prl_changed(action, _addr(addr, "prl"), default))

    def op_sixrd(self, name: str, prefix: str | None, relay: str | None) -> dict:
        """SIOCADD6RD / SIOCDEL6RD (ipip6_tunnel_update_6rd()); no prefix: 6rd-reset."""
        t = self._ours(name, "6rd")
        if t.spec.mode not in (TunnelMode.SIT, TunnelMode.ISATAP):
            raise ConfigError(f"6rd on {name}: {name} is {t.spec.mode.a_tunnel}; 6rd is "
                              "for sit tunnels")
        try:
            new = t.spec.with_(ip6rd_prefix=IPv6Network(prefix) if prefix else None,
                               ip6rd_relay_prefix=IPv4Network(relay) if relay else None)
        except ValueError as e:
            raise ConfigError(f"6rd: {e}") from e
        return self._respec(t, new)

    def op_members(self, name: str, addrs: list | None) -> dict:
        """Only packets whose outer source is in addrs are taken from the underlay (None:
        from anyone, an empty list: from no one); the rest are dropped and counted as
        not_member. Recorded first: a set that cannot be recorded is not enforced, since a
        restart would lose it."""
        t = self._ours(name, "members")
        members = member_set(addrs)
        old = self.members.get(name)
        if members == old:
            return self._status(name)
        if members is None:
            self.members.pop(name, None)
        else:
            self.members[name] = members
        try:
            self._save()
        except DaemonError:
            if old is None:
                self.members.pop(name, None)
            else:
                self.members[name] = old
            raise
        self.engine.set_members(name, _packed(members))
        if t.ifindex in self.ebpf.tunnels:
            try:
                self.ebpf.set_members(t.ifindex, _packed(members))
            except OSError as e:
                raise DaemonError(f"members on {name}: the eBPF maps refused the set "
                                  f"({e.strerror or e}); its received packets take the slow "
                                  "path, where tunld checks the set") from e
        log.info("%s: %s", name, "members: anyone" if members is None else
                 f"members: {len(members)}")
        log.debug("%s: members %s", name, "any" if members is None else
                  " ".join(map(str, sorted(members))) or "none")
        return self._status(name)

    def op_del(self, name: str) -> dict:
        t = self._ours(name, "delete")
        self.mirror.unwatch(t.ifindex)
        self.ebpf.remove(t.ifindex)
        tun.destroy(self.engine.remove(name))
        self._forget(name)
        log.info("deleted %s", name)
        return {"deleted": name}

    def _status(self, name: str) -> dict:
        t = self.engine.tunnels[name]
        out = {"spec": t.spec.to_dict(), "dataplane": "userspace", "ifindex": t.ifindex,
               "mtu": t.mtu, "up": t.up, "routes": len(t.fib4) + len(t.fib6),
               "members": None if t.members is None else len(t.members),
               "counters": t.counters.as_dict()}
        if t.spec.mode is TunnelMode.VTI:       # the namespace's, as /proc/net/xfrm_stat
            out["xfrm"] = self.engine.xfrm.counters()
        if t.ifindex in self.ebpf.tunnels:
            out["dataplane"] = "ebpf"
            out["ebpf"] = self.ebpf.status(t.ifindex, out["counters"])
            tx, rx = slow_reasons(t.spec)
            rx += self.ebpf.slow_rx_why(t.ifindex)
            out["ebpf"]["slow_tx_why"], out["ebpf"]["slow_rx_why"] = tx, rx
        return out

    def op_show(self, name: str | None = None) -> list[dict]:
        if name is not None:
            self._ours(name, "get")
            return [self._status(name)]
        return [self._status(n) for n in sorted(self.engine.tunnels)]

    def op_status(self) -> dict:
        return {"pid": os.getpid(), "supervisor": self.supervisor_pid,
                "tunnels": sorted(self.engine.tunnels), "engine": self.engine.stats(),
                "threads": threading.active_count(), "resyncs": self.resyncs,
                "overflows": self.overflows,
                "log": self.log_path}

    def op_capture(self, name: str, pid: int | None) -> dict:
        """`tunl tunnel capture`: an eBPF tunnel sends through its queue while pid runs."""
        t = self._ours(name, "capture")
        if t.ifindex in self.ebpf.tunnels:
            self.ebpf.capture(t.ifindex, pid)
        return self._status(name)

    def op_routes(self, name: str) -> list[list]:
        """The route mirror of one tunnel, as [destination, gateway, table] (for checks)."""
        t = self._ours(name, "get")
        return sorted([str(r.dst), str(r.gateway) if r.gateway else None, r.table]
                      for r in t.fib4.routes + t.fib6.routes)

    # -- IPsec: what `ip xfrm state` and `ip xfrm policy` keep in the kernel ----------------

    def _load_xfrm(self) -> None:
        states, policies = self.state.load_xfrm()
        if not states and not policies:
            return
        from ..xfrm import XfrmPolicy, XfrmState
        for kind, items, cls, add in (("state", states, XfrmState, self.engine.xfrm.add_state),
                                      ("policy", policies, XfrmPolicy,
                                       self.engine.xfrm.add_policy)):
            for d in items:
                try:
                    add(cls.from_dict(d))
                except (TunlError, ValueError, KeyError, TypeError) as e:
                    LOG.error("xfrm %s in %s refused: %s", kind, self.state.xfrm_path, e,
                              key=("xfrm-load", kind))

    def _save_xfrm(self) -> None:
        x = self.engine.xfrm
        try:
            self.state.save_xfrm([sa.state.to_dict() for sa in x.states.values()],
                                 [p.to_dict() for p in x.policies])
        except OSError as e:
            raise DaemonError(f"cannot record the IPsec states in {self.state.xfrm_path}: "
                              f"{e.strerror}") from e

    def op_xfrm(self, call: str, item: dict | None = None, update: bool = False):
        """`tunl xfrm` on tunld's data plane: the XfrmStore verbs (tunl.xfrm), one per call."""
        from ..xfrm import PolicyEntry, StateEntry, XfrmPolicy, XfrmState
        x = self.engine.xfrm
        try:
            if call == "states":
                return [StateEntry(sa.state, sa.esp.seq, sa.esp.oseq, sa.esp.bitmap).to_dict()
                        for sa in x.states.values()]
            if call == "policies":
                return [PolicyEntry(p, i + 1).to_dict() for i, p in enumerate(x.policies)]
            if call == "add_state":
                x.add_state(XfrmState.from_dict(item or {}), update)
            elif call == "del_state":
                x.del_state(IPv4Address((item or {})["dst"]), int(item["spi"]))
            elif call == "flush_states":
                x.states = {}
            elif call == "add_policy":
                x.add_policy(XfrmPolicy.from_dict(item or {}), update)
            elif call == "del_policy":
                d = item or {}
                x.del_policy((d["dir"], (IPv4Network(d["src"]), IPv4Network(d["dst"]),
                                         d.get("proto")), (d.get("mark"), int(d["mark_mask"]))))
            elif call == "flush_policies":
                x.policies = []
            else:
                raise ConfigError(f'xfrm "{call}": not a verb of tunld\'s xfrm')
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"xfrm {call}: {type(e).__name__}: {e}") from None
        self._save_xfrm()
        log.info("xfrm %s", call)
        return {"states": len(x.states), "policies": len(x.policies)}

    def op_shutdown(self) -> dict:
        """An orderly stop of the whole daemon: the supervisor is told not to restart it."""
        log.info("asked to stop")
        self.running = False
        self.stop_requested = True
        return {"pid": os.getpid(), "supervisor": self.supervisor_pid}


def describe(spec: TunnelSpec) -> str:
    """A spec in the words of `ip tunnel` (for log lines): the settings that are not the
    defaults."""
    words = [spec.mode.value]
    for k, v in spec.to_compact().items():
        if k in ("name", "mode"):
            continue
        if k == "prl":
            words += [f"prl-{'default' if d else 'nodefault'} {a}" for a, d in spec.prl]
        elif isinstance(v, bool):
            words.append(k if v else f"no{k}")
        else:
            words.append(f"{k} {v}")
    return " ".join(words)


def _spec(d: dict) -> TunnelSpec:
    """A tunnel spec from a request: its own rules (ConfigError), and a clean error for a
    request no tunl command would send."""
    try:
        return TunnelSpec.from_dict(d)
    except TunlError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f'argument "spec": not a tunnel spec ({e})') from e


def member_set(addrs: list | None) -> frozenset[IPv4Address] | None:
    """The member set of a `members` request: None (anyone) or unicast IPv4 addresses, each
    the outer source of a node of the overlay. A bad one is a one-line ConfigError."""
    if addrs is None:
        return None
    out = set()
    for a in addrs:
        if not isinstance(a, str):
            raise ConfigError(f"members {json.dumps(a)[:40]}: not an IPv4 address (a string "
                              "like 192.0.2.1)")
        ip = _addr(a[:40], "members")
        if ip.is_multicast or ip.is_unspecified or ip == BROADCAST:
            raise ConfigError(f'members "{ip}": not a unicast address; a member is the outer '
                              "source of a node")
        out.add(ip)
    return frozenset(out)


def _packed(members: frozenset[IPv4Address] | None) -> frozenset[bytes] | None:
    """The set as the data plane compares it: outer source addresses as 4 bytes."""
    return None if members is None else frozenset(a.packed for a in members)


def _addr(text: str, word: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError as e:
        raise ConfigError(f'{word} "{text}": not an IPv4 address') from e


def main(argv: list[str] | None = None) -> int:
    """The data-plane process; the supervisor starts it. Run without a control socket to
    hand, it is `tunld` itself (the supervisor)."""
    ap = argparse.ArgumentParser(prog="tunld", description="tunl's daemon: the data plane")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--service", action="store_true")
    ap.add_argument("--listen-fd", type=int)
    ap.add_argument("--partner-fd", type=int)
    ap.add_argument("--supervisor-pid", type=int, default=0)
    ap.add_argument("--metrics", metavar="[ADDR:]PORT")
    args = ap.parse_args(argv)
    if args.listen_fd is None or args.partner_fd is None:
        from . import supervisor
        return supervisor.main(argv)
    where = logs.setup(args.verbose, args.service)
    name_process("data plane")
    sys.setswitchinterval(0.0005)   # hand the GIL over quickly between ingress and egress
    _raise_fd_limit()
    listener = socket.socket(fileno=args.listen_fd)
    partner = socket.socket(fileno=args.partner_fd)
    partner.setblocking(False)
    try:
        d = Tunld()
    except (TunlError, OSError) as e:
        print(f"tunld: {e}", file=sys.stderr)
        return 1
    d.supervisor_pid = args.supervisor_pid
    d.log_path = where
    signal.signal(signal.SIGTERM, lambda *_: setattr(d, "running", False))
    signal.signal(signal.SIGINT, lambda *_: setattr(d, "running", False))
    d.start()
    if args.metrics:
        serve_metrics(d, args.metrics)
    control = ControlServer(listener, d.handle, open_ops=READ_ONLY)
    supervisors = []          # supervisors this process started (to reap them)
    try:
        while d.running:
            control.serve(0.2)
            said = recv_partner(partner)
            if said and STOP in said:
                d.running = False            # the supervisor stops us in order
            elif said == b"":
                partner.close()
                if args.service:
                    log.info("the supervisor ended; so does the data plane")
                    d.running = False
                    break
                log.error("the supervisor (pid %d) died; starting a new one",
                          d.supervisor_pid)
                proc, partner = spawn("tunl.daemon.supervisor",
                                      (["-v"] if args.verbose else []) +
                                      (["--metrics", args.metrics] if args.metrics else []) +
                                      ["--adopt", str(os.getpid())], listener)
                partner.setblocking(False)
                d.supervisor_pid = proc.pid
                supervisors.append(proc)
            supervisors = [p for p in supervisors if p.poll() is None]
        if d.stop_requested:
            try:
                partner.sendall(STOP)        # tell the supervisor not to start another
            except OSError:
                pass
            control.serve(0.2)               # the answer to `tunl daemon stop`
    finally:
        d.stop()
        control.close()
    log.info("data plane %d stopped", os.getpid())
    return 0


def serve_metrics(d: "Tunld", listen: str) -> None:
    """Prometheus metrics of every tunnel on `listen`, read from the engine at each scrape
    (a read that meets a counter being added is tried again)."""
    from .metrics import TunnelCollector, serve

    def show():
        for _ in range(3):
            try:
                return d.op_show()
            except RuntimeError:       # a drop reason counted for the first time meanwhile
                continue
        return None
    try:
        serve(listen, TunnelCollector(show))
        log.info("metrics on %s", listen)
    except (OSError, ValueError) as e:
        log.error("metrics: cannot listen on %s: %s", listen, e)


def _raise_fd_limit() -> None:
    """Two descriptors per tunnel (its queue, its state in the epoll): lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    sys.exit(main())
