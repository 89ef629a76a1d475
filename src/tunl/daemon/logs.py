"""Where tunld's log lines go: one file per network namespace, bounded; or, under a service
manager, its stderr (the journal).

    /run/tunl/netns-<cookie>/tunld.log      the newest lines; root only (file 0600, dir 0700)
    /run/tunl/netns-<cookie>/tunld.log.1    .. tunld.log.3: older ones, at most 1 MiB each

The file sits beside the namespace's record (daemon/state.py), named by the namespace's
cookie, which the kernel never reuses: a log never mixes two namespaces, as one named by the
inode of /proc/self/ns/net did, and it goes with the record when tunld ends with its
namespace. `tunl daemon status` prints its path. With --service (systemd runs tunld) the
lines go to stderr, which the service manager keeps; when that is the journal, each line
starts with its syslog priority (`<3>` for an error: sd-daemon(3)), so that
`journalctl -p err` finds them.

Only tunl's own loggers speak at debug level with -v (requests, tunnels added, taken back
and removed, path MTUs, eBPF programs attached); other libraries' (pyroute2 logs every
netlink message it parses at debug level) say only their warnings and errors.
"""
from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import sys

from .state import state_dir

LOG_NAME = "tunld.log"
MAX_BYTES = 1 << 20         # a file is rotated before it passes 1 MiB
BACKUPS = 3                 # tunld.log.1 .. tunld.log.3 are kept: at most 4 MiB in all
FILE_FORMAT = "%(asctime)s tunld[%(process)d] %(levelname)s %(message)s"
STDERR_FORMAT = "tunld[%(process)d] %(levelname)s %(message)s"   # the journal has the time
STDERR = "stderr"           # what `status` says for "log" when lines go to stderr

# syslog priorities (sd-daemon(3): a line on a journal stream may start with "<N>")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def log_path(directory: str | None = None) -> str:
    """The log file of this network namespace's tunld."""
    return os.path.join(directory or state_dir(), LOG_NAME)


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that several processes append to at once.

    Both processes of tunld write the namespace's one log (and, for a moment, those that
    replace them: a supervisor the data plane starts, a service that takes over). A plain
    RotatingFileHandler is not safe for that: two processes that both find the file full
    both rotate (and a generation is lost), and a process that did not rotate goes on
    writing into the renamed file, unbounded. Letting only one of them rotate is not enough
    either: either may be the only one running (the supervisor between two data planes, the
    data plane between two supervisors). So any process may rotate, one at a time: every
    record is written under an exclusive flock(2) on tunld.log.lock, a file that is never
    renamed; under it the handler first reopens the log if the path no longer names the file
    it has open (another process rotated it: the test WatchedFileHandler makes), rotates if
    the record would take the file past maxBytes, then appends the record and flushes it
    (O_APPEND: the write lands at the end, whoever wrote last). The lock is held for that
    one write, never across anything that can block for long.

    With capture_stderr, the file is also the process's fd 2 (again after every reopen), so
    that what reaches stderr without logging (an uncaught exception's traceback, Python's
    own warnings, a C library) lands in the current log, not in a rotated one.
    """

    def __init__(self, filename: str, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 capture_stderr: bool = False):
        self.capture_stderr = capture_stderr
        self._lock_fd = os.open(filename + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                         errors="backslashreplace")

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        if self.capture_stderr:
            os.dup2(fd, 2)            # fd 2 stays inheritable: a process we start shares it
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def _moved(self) -> bool:
        """Whether the path no longer names the file we write (rotated or removed)."""
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        ours = os.fstat(self.stream.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (ours.st_dev, ours.st_ino)

    def shouldRollover(self, record) -> bool:     # noqa: N802 - logging's name
        return False                  # emit() decides, under the lock

    def emit(self, record) -> None:
        try:
            text = self.format(record) + self.terminator
            size = len(text.encode(self.encoding, self.errors))
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                if self.stream is None or self._moved():
                    if self.stream is not None:
                        self.stream.close()
                    self.stream = self._open()
                used = os.fstat(self.stream.fileno()).st_size
                if used and used + size > self.maxBytes:
                    self.doRollover()             # renames .2 -> .3, .1 -> .2, log -> .1
                self.stream.write(text)
                self.stream.flush()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except RecursionError:
            raise
        except Exception:             # noqa: BLE001 - logging's own rule: never raise
            self.handleError(record)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


class JournalFormatter(logging.Formatter):
    """Each line with its syslog priority in front, which the journal takes off."""

    def format(self, record) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal() -> bool:
    """Whether fd 2 is the stream systemd connected to the journal ($JOURNAL_STREAM names
    its device and inode: systemd.exec(5))."""
    word = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in word.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(verbose: bool, service: bool, path: str | None = None) -> str:
    """Send this tunld process's log lines where they belong: the namespace's log file (or
    `path`), or stderr under a service manager. Returns the file's path, or STDERR."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    handler: logging.Handler | None = None
    where = STDERR
    if not service:
        path = path or log_path()
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            # stderr that is a terminal (tunld started by hand) stays the terminal's
            handler = SharedRotatingFileHandler(path, capture_stderr=not os.isatty(2))
            handler.setFormatter(logging.Formatter(FILE_FORMAT))
            where = path
        except OSError as e:
            print(f"tunld: cannot write its log {path} ({e.strerror or e}); logging to "
                  "stderr", file=sys.stderr)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter(STDERR_FORMAT) if stderr_is_journal()
                             else logging.Formatter(STDERR_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)       # other libraries: warnings and errors only
    logging.getLogger("tunl").setLevel(logging.DEBUG if verbose else logging.INFO)
    return where
