"""tunld's log (tunl.daemon.logs): one file per namespace beside its record, shared by several
processes that each may rotate it, bounded; stderr with syslog priorities under the journal;
debug lines from tunl's loggers only. No root needed: the files live in a temporary
directory, and the processes that share them are plain children of the test."""
from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

from tunl.daemon import logs

LINE = re.compile(r"^(\d+) (\d+) x+$")     # "<writer> <seq> xxx..."


def writers(path: str, n_procs: int, lines: int, max_bytes: int, backups: int,
            stderr_every: int = 0) -> None:
    """n_procs processes log `lines` lines each into `path` at once, through the handler
    tunld uses (each line "<writer> <seq> xxx..."); with stderr_every, every n-th line goes
    to fd 2 instead (captured into the log)."""
    code = textwrap.dedent(f"""
        import logging, os, sys
        from tunl.daemon.logs import SharedRotatingFileHandler
        me = int(sys.argv[1])
        h = SharedRotatingFileHandler({path!r}, max_bytes={max_bytes}, backups={backups},
                                      capture_stderr={bool(stderr_every)})
        h.setFormatter(logging.Formatter("%(message)s"))
        log = logging.getLogger("w")
        log.addHandler(h)
        log.setLevel(logging.INFO)
        for i in range({lines}):
            text = f"{{me}} {{i}} " + "x" * (20 + (i * 7 + me) % 60)
            if {stderr_every} and i % {stderr_every or 1} == {stderr_every or 1} - 1:
                log.info("%s", text + "y")        # rotates if it must, then fd 2 follows
                os.write(2, (f"{{me}} {{i}} stderr\\n").encode())
            else:
                log.info("%s", text)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], stderr=subprocess.PIPE
                              if not stderr_every else None) for k in range(n_procs)]
    for p in procs:
        assert p.wait(60) == 0


def files(path: str) -> list[str]:
    d = os.path.dirname(path)
    return sorted(os.path.join(d, f) for f in os.listdir(d)
                  if f.startswith(os.path.basename(path)) and not f.endswith(".lock"))


def test_two_processes_share_one_log_and_keep_it_bounded(tmp_path):
    path = str(tmp_path / "tunld.log")
    writers(path, n_procs=2, lines=3000, max_bytes=16 * 1024, backups=3)
    got = files(path)
    assert got == [path, path + ".1", path + ".2", path + ".3"]
    for f in got:
        assert os.path.getsize(f) <= 16 * 1024, f        # nobody wrote into a renamed file
    kept: dict[int, list[int]] = {}
    for f in reversed(got):                              # oldest first
        for line in open(f).read().splitlines():
            m = LINE.match(line)
            assert m, f"a torn or mixed line in {f}: {line!r}"
            kept.setdefault(int(m[1]), []).append(int(m[2]))
    # the files hold the newest writes of all, in order: of each writer, its last lines
    assert kept, "nothing kept"
    for w, seqs in kept.items():
        assert seqs == list(range(seqs[0], 3000)), f"writer {w}: lines missing or out of order"


def test_no_line_is_lost_when_both_processes_rotate(tmp_path):
    """With room for every generation, each line of each writer is there exactly once: no
    rotation happened twice for one full file (which would cost a generation), and no line
    went into a file that had been renamed already past the limit."""
    path = str(tmp_path / "tunld.log")
    writers(path, n_procs=3, lines=1500, max_bytes=8 * 1024, backups=200)
    seen = []
    got = files(path)
    assert len(got) > 10
    for f in got:
        assert os.path.getsize(f) <= 8 * 1024
        seen += [tuple(map(int, LINE.match(line).groups()))
                 for line in open(f).read().splitlines()]
    assert sorted(seen) == [(w, i) for w in range(3) for i in range(1500)]


def test_stderr_follows_the_log_across_rotations(tmp_path):
    """What a process writes to fd 2 (a traceback, a library's warning) lands in the log file
    in use at the time, not in a rotated one that nobody bounds."""
    path = str(tmp_path / "tunld.log")
    writers(path, n_procs=2, lines=1200, max_bytes=8 * 1024, backups=400, stderr_every=50)
    found = set()
    for f in files(path):
        assert os.path.getsize(f) <= 8 * 1024 + 64     # one stderr line may follow a record
        for line in open(f).read().splitlines():
            if line.endswith(" stderr"):
                found.add(tuple(map(int, line.split()[:2])))
    assert found == {(w, i) for w in range(2) for i in range(49, 1200, 50)}


def test_the_files_are_root_only_and_the_directory_too(tmp_path):
    path = str(tmp_path / "netns-42" / "tunld.log")
    saved = _save_logging()
    old_umask = os.umask(0)            # even with a umask that would let anyone read
    try:
        assert logs.setup(verbose=False, service=False, path=path) == path
        logging.getLogger("tunl.daemon").info("hello")
    finally:
        os.umask(old_umask)
        _restore_logging(saved)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path + ".lock").st_mode) == 0o600
    assert re.search(r" tunld\[\d+\] INFO hello$", open(path).read().strip())


def test_the_log_is_beside_the_record_named_by_the_namespace_cookie():
    from tunl.daemon.state import state_dir
    assert logs.log_path() == os.path.join(state_dir(), "tunld.log")
    assert re.fullmatch(r"/run/tunl/netns-(\d+|ino\d+)/tunld\.log", logs.log_path())


def _save_logging():
    root = logging.getLogger()
    return root.handlers[:], root.level, logging.getLogger("tunl").level


def _restore_logging(saved):
    handlers, level, tunl_level = saved
    root = logging.getLogger()
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("tunl").setLevel(tunl_level)


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_is_tunls_debug_lines_never_a_librarys(tmp_path, verbose):
    path = str(tmp_path / "tunld.log")
    saved = _save_logging()
    try:
        logs.setup(verbose=verbose, service=False, path=path)
        logging.getLogger("tunl.daemon.control").debug("request from pid 1 (uid 0): show: ok")
        logging.getLogger("tunl.daemon").info("added t0")
        logging.getLogger("pyroute2.netlink.core").debug("message {'attrs': [('IFLA_IFNAME'")
        logging.getLogger("asyncio").debug("Using selector: EpollSelector")
        logging.getLogger("pyroute2.ndb").warning("a library's warning")
    finally:
        _restore_logging(saved)
    text = open(path).read()
    assert ("DEBUG request from pid 1" in text) is verbose
    assert "INFO added t0" in text and "WARNING a library's warning" in text
    assert "IFLA_" not in text and "selector" not in text


def test_the_journal_gets_syslog_priorities(tmp_path, monkeypatch):
    """Under systemd, stderr is the journal's stream ($JOURNAL_STREAM is its device:inode):
    each line carries its priority, a traceback's lines included."""
    out = tmp_path / "journal"
    code = textwrap.dedent("""
        import logging, os
        from tunl.daemon import logs
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        assert logs.setup(verbose=True, service=True) == logs.STDERR
        log = logging.getLogger("tunl.daemon")
        log.debug("d"); log.info("i"); log.warning("w"); log.error("e")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("bug")
    """)
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60)
    lines = out.read_text().splitlines()
    assert [ln[:3] for ln in lines[:4]] == ["<7>", "<6>", "<4>", "<3>"]
    assert re.fullmatch(r"<6>tunld\[\d+\] INFO i", lines[1])
    assert all(ln.startswith("<3>") for ln in lines[4:]) and "ZeroDivisionError" in lines[-1]


def test_stderr_that_is_not_the_journal_gets_plain_lines(tmp_path):
    out = tmp_path / "stderr"
    code = ("import logging\nfrom tunl.daemon import logs\n"
            "logs.setup(verbose=False, service=True)\n"
            "logging.getLogger('tunl.daemon').info('plain')\n")
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60, env=env)
    assert re.fullmatch(r"tunld\[\d+\] INFO plain", out.read_text().strip())
