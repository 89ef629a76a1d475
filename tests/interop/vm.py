"""A Linux guest under QEMU (TCG) for interop tests: the kernel is Debian's, the userland is
the host's own root file system mounted read-only over 9p (commands run chrooted into it, so
the guest has the host's ip, ping, tcpdump and Python).

Commands go over a virtio-serial port to the guest's init (guest/init):
    request:  "<id> <b|c> <timeout> <base64(cmd)>\\n"   c: chroot /host, b: busybox
    answer:   <output> "\\n__TLVM_END_<id>_<rc>__\\n"
"""
from __future__ import annotations

import base64
import ctypes
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

QEMU = "qemu-system-x86_64"


def _die_with_parent():          # QEMU gets SIGTERM if the process that started it dies
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class VMError(Exception):
    pass


class VM:
    def __init__(self, kernel: str, initrd: str, *, guest_ip: str, netns: str, tap: str,
                 mem: int = 512, boot_timeout: float = 120):
        self.kernel, self.initrd, self.guest_ip = kernel, initrd, guest_ip
        self.netns, self.tap, self.mem, self.boot_timeout = netns, tap, mem, boot_timeout
        self.workdir = tempfile.mkdtemp(prefix="tunl-vm-")
        self.sock_path = os.path.join(self.workdir, "cmd.sock")
        self.console_log = os.path.join(self.workdir, "console.log")
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.keep_logs = False
        self._buf, self._last, self._seq, self.boot_time = b"", b"", 0, 0.0

    def _argv(self) -> list[str]:
        append = (f"console=ttyS0 quiet loglevel=4 panic=-1 tlvm.ip={self.guest_ip} tlvm.fs=9p")
        return ["ip", "netns", "exec", self.netns,          # ip execs QEMU: the same PID
                QEMU, "-accel", "tcg", "-M", "q35", "-m", str(self.mem), "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", self.kernel, "-initrd", self.initrd, "-append", append,
                "-serial", "file:" + self.console_log,
                "-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,id=cmd,path={self.sock_path},server=on,wait=off",
                "-device", "virtserialport,bus=vser0.0,chardev=cmd,name=tlvm.cmd",
                "-fsdev", "local,id=fs0,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=hostroot",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                # no checksum offload: a real NIC fills in the checksums (GRE's too) that a
                # tap and a veth would otherwise carry unfilled to the other side
                "-device", "virtio-net-pci,netdev=n0,csum=off,guest_csum=off"]

    def start(self) -> "VM":
        t0 = time.monotonic()
        log = open(os.path.join(self.workdir, "qemu.log"), "wb")
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        log.close()
        deadline = t0 + self.boot_timeout
        try:
            while self.sock is None:          # QEMU listens before the guest runs
                self._check_alive()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.sock_path)
                    self.sock = s
                except (FileNotFoundError, ConnectionRefusedError):
                    s.close()
                    if time.monotonic() > deadline:
                        raise VMError("QEMU's command socket never appeared")
                    time.sleep(0.05)
            self._read_until(b"__TLVM_READY__\n", deadline)
        except BaseException:
            self.keep_logs = True
            self.stop()
            raise
        self.boot_time = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.sock:
            self.sock.close()
            self.sock = None
        p, self.proc = self.proc, None
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)      # only the process we started
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, cmd: str, timeout: float = 60, chroot: bool = True,
            check: bool = True) -> tuple[int, str]:
        """Run cmd with sh -c in the guest: (exit code, stdout and stderr). One at a time."""
        if not self.sock:
            raise VMError("the guest is not running")
        self._seq += 1
        cid = f"{self._seq}x{os.getpid() & 0xFFFF:04x}"
        line = f"{cid} {'c' if chroot else 'b'} {max(1, int(timeout))} " \
               f"{base64.b64encode((cmd or ':').encode()).decode()}\n"
        self.sock.sendall(line.encode())
        end = re.compile(rb"\n__TLVM_END_" + cid.encode() + rb"_(\d+)__\n")
        m = self._read_until(end, time.monotonic() + timeout + 15)
        rc, out = int(m.group(1)), self._last.decode("utf-8", "replace")
        if check and rc != 0:
            raise VMError(f"guest: {cmd!r} -> exit {rc}\n{out}")
        return rc, out

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.keep_logs = True
            raise VMError(f"QEMU exited ({self.proc and self.proc.returncode}); logs in "
                          f"{self.workdir}")

    def _read_until(self, pat, deadline: float):
        while True:
            if isinstance(pat, bytes):
                i = self._buf.find(pat)
                if i >= 0:
                    self._last, self._buf = self._buf[:i], self._buf[i + len(pat):]
                    return True
            else:
                m = pat.search(self._buf)
                if m:
                    self._last, self._buf = self._buf[:m.start()], self._buf[m.end():]
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                self.keep_logs = True
                self.stop()                     # the channel is in an unknown state
                raise VMError(f"the guest did not answer in time; logs in {self.workdir}")
            if not select.select([self.sock], [], [], min(left, 1.0))[0]:
                self._check_alive()
                continue
            data = self.sock.recv(65536)
            if not data:
                self.keep_logs = True
                self.stop()
                raise VMError(f"the guest closed the command channel; logs in {self.workdir}")
            self._buf += data
