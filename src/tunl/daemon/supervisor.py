"""tunld's supervisor: `tunld` as people and service managers start it.

It binds the namespace's control socket (which is also the lock: one tunld per network
namespace), starts the data-plane process (tunl.daemon.server) and starts a new one the moment
the old one dies, whatever killed it: the TUN devices, addresses and routes outlive the
process, so the next one takes them back and traffic resumes within a second. It ends on
SIGTERM or SIGINT (taking the data-plane process with it), on `tunl daemon stop`, and when
its network namespace is deleted (`ip netns del`).

With --service (a service manager such as systemd runs it and restarts it), the data-plane
process ends when the supervisor ends instead of starting a new supervisor.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import shutil
import signal
import socket
import sys
import time

from . import CONTROL_ADDRESS, logs
from .process import STOP, name_process, netns_abandoned, recv_partner, spawn
from .state import state_dir

log = logging.getLogger("tunl.daemon")

CHECK_INTERVAL = 1.0       # how often the namespace is checked for deletion
STOP_TIMEOUT = 3.0         # an orderly stop, then SIGKILL
QUICK_DEATH = 2.0          # a process that dies sooner than this after its start backs off
MAX_BACKOFF = 5.0


class Supervisor:
    def __init__(self, listener: socket.socket | None, worker_args: list[str]):
        self.listener = listener
        self.worker_args = worker_args
        self.partner: socket.socket | None = None
        self.worker_pid = 0
        self.child = None             # the Popen of a worker we started (None if adopted)
        self.started_at = 0.0
        self.backoff = 0.0
        self.stopping = False         # SIGTERM or SIGINT
        self.stop_requested = False   # the data-plane process is stopping in order

    def adopt(self, partner: socket.socket, pid: int) -> None:
        """Supervise a data-plane process that started this supervisor (its last one died)."""
        self.partner, self.worker_pid, self.child = partner, pid, None
        self.started_at = time.monotonic()

    def start_worker(self) -> None:
        self.child, self.partner = spawn("tunl.daemon.server",
                                         [*self.worker_args, "--supervisor-pid", str(os.getpid())],
                                         self.listener)
        self.partner.setblocking(False)
        self.worker_pid = self.child.pid
        self.started_at = time.monotonic()
        log.info("started the data plane, pid %d", self.worker_pid)

    def _reap(self) -> str:
        if self.child is None:
            return "ended"
        try:
            code = self.child.wait(STOP_TIMEOUT)
        except Exception:           # noqa: BLE001 - still there: it is killed below
            return "did not end"
        return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def stop_worker(self) -> None:
        if self.partner is None:
            return
        try:
            self.partner.sendall(STOP)
        except OSError:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        waiter = select.poll()           # poll, not select: the fd may be above 1024
        waiter.register(self.partner, select.POLLIN)
        while time.monotonic() < deadline:
            if waiter.poll(max(0.0, deadline - time.monotonic()) * 1000) and \
                    recv_partner(self.partner) == b"":
                break
        else:
            try:
                os.kill(self.worker_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()
        self.partner.close()
        self.partner = None

    def catch_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop tunld in order; set before anything is started, so
        that a stop in the first moments is not undone."""
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def run(self) -> int:
        wake_r = self._wake_r
        next_check = time.monotonic() + CHECK_INTERVAL
        while True:
            waiter = select.poll()          # poll, not select: fds may be above 1024
            waiter.register(wake_r, select.POLLIN)
            if self.partner is not None:
                waiter.register(self.partner, select.POLLIN)
            timeout = max(0.0, next_check - time.monotonic())
            ready = {fd for fd, _ in waiter.poll(timeout * 1000)}
            if wake_r in ready:
                try:
                    os.read(wake_r, 64)
                except OSError:
                    pass
            if self.stopping:
                log.info("stopping")
                self.stop_worker()
                return 0
            if self.partner is not None and self.partner.fileno() in ready:
                said = recv_partner(self.partner)
                if said and STOP in said:
                    self.stop_requested = True
                elif said == b"":
                    how = self._reap()
                    self.partner.close()
                    self.partner = None
                    if self.stop_requested:
                        log.info("the data plane stopped in order; stopping")
                        return 0
                    self._restart(how)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_INTERVAL
                own = {os.getpid(), self.worker_pid}
                if netns_abandoned(own):
                    log.info("the network namespace was deleted; stopping")
                    self.stop_worker()
                    shutil.rmtree(state_dir(), ignore_errors=True)   # its record died with it
                    return 0

    def _restart(self, how: str) -> None:
        lived = time.monotonic() - self.started_at
        self.backoff = min(max(self.backoff * 2, 0.25), MAX_BACKOFF) if lived < QUICK_DEATH else 0
        log.error("the data plane (pid %d) %s after %.1f s; starting a new one%s",
                  self.worker_pid, how, lived,
                  f" in {self.backoff:.2f} s" if self.backoff else "")
        if self.backoff:
            time.sleep(self.backoff)
        self.start_worker()

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True


def bind_control() -> socket.socket | None:
    """The control socket of this namespace, or None when another tunld holds it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(CONTROL_ADDRESS)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            return None
        raise
    s.listen(64)
    return s


def take_over(sup: Supervisor) -> socket.socket | None:
    """Stop the tunld that holds this namespace's control socket and bind it ourselves."""
    from . import client
    from ..errors import TunlError
    log.info("another tunld serves this network namespace; taking it over")
    listener = None
    while listener is None and not sup.stopping:
        try:
            client.call("shutdown", autostart=False)
            client.wait_gone()
        except TunlError as e:
            log.info("the other tunld: %s", e)
        listener = bind_control()
        if listener is None:
            time.sleep(0.5)
    return listener


def check_metrics(text: str) -> str:
    from ..errors import TunlError
    from .metrics import check_listen
    try:
        return check_listen(text)
    except TunlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tunld", description="tunl's daemon for this network namespace: a supervisor "
        "and the data plane it restarts",
        epilog=f"Its log is {logs.log_path('/run/tunl/netns-<cookie>')} (root only; at most "
        f"{logs.MAX_BYTES >> 20} MiB, then rotated, {logs.BACKUPS} older files kept; `tunl "
        "daemon status` prints the path), or stderr with --service.")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log debug lines too: requests, tunnels added and taken back, path "
                    "MTUs, eBPF programs attached")
    ap.add_argument("--service", action="store_true",
                    help="run under a service manager that restarts tunld (systemd); log to "
                    "stderr (the journal)")
    ap.add_argument("--metrics", metavar="[ADDR:]PORT", type=check_metrics,
                    help="serve Prometheus metrics of every tunnel (counters, drops by reason)"
                    " on this port (all addresses unless ADDR is given)")
    ap.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--partner-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--adopt", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    where = logs.setup(args.verbose, args.service)
    if where != logs.STDERR and os.isatty(2) and args.listen_fd is None:
        print(f"tunld: logging to {where}", file=sys.stderr)    # started by hand
    name_process("supervisor")
    worker_args = (["-v"] if args.verbose else []) + (["--service"] if args.service else []) + \
        (["--metrics", args.metrics] if args.metrics else [])
    sup = Supervisor(None, worker_args)
    sup.catch_signals()
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = bind_control()
        if listener is None and args.service:
            # a tunl command started one first: the service manager takes it over (its data
            # plane pauses for as long as a restart takes)
            listener = take_over(sup)
            if listener is None:
                return 0
        elif listener is None:
            print("tunld: another tunld already serves this network namespace", file=sys.stderr)
            return 0
    sup.listener = listener
    if args.adopt:
        partner = socket.socket(fileno=args.partner_fd)
        partner.setblocking(False)
        sup.adopt(partner, args.adopt)
        log.info("supervising the data plane, pid %d", args.adopt)
    else:
        sup.start_worker()
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
