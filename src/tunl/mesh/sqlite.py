"""The embedded registry: etcd's verbs (store.py) over one SQLite file, safe for many agents on
one host (WAL, every write in BEGIN IMMEDIATE, a busy timeout). Leases run out by the injected
clock: whoever touches the store next deletes the keys of expired leases and logs the deletes,
so watchers see a dead node go as they would in etcd. The change log keeps the last
KEEP_EVENTS revisions; a watch from before them is told to list again (CompactedError).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Callable

from .store import CompactedError, Entry, Event, RegistryError

KEEP_EVENTS = 10000
POLL = 0.05          # seconds between looks at the change log while watching
BUSY_MS = 5000

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,
                               lease INTEGER NOT NULL DEFAULT 0, mod_rev INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL,
                                   expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                                   key TEXT NOT NULL, value BLOB);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('rev', 1), ('compacted', 0);
"""


class SqliteStore:
    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self.url = f"sqlite://{path}"
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_MS / 1000)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise RegistryError(f"registry {self.url}: {e}") from e

    # -- one write transaction, with expired leases swept first -------------------------------

    def _write(self, fn):
        with self._lock:
            try:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._sweep(db)
                    result = fn(db)
                    db.execute("COMMIT")
                    return result
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise RegistryError(f"registry {self.url}: {e}") from e

    def _read(self, fn):
        """fn in one read transaction, a snapshot: list's entries and revision agree even while
        another process writes between its two SELECTs."""
        with self._lock:
            try:
                db = self._db
                db.execute("BEGIN")
                try:
                    if not self._expired(db):
                        return fn(db)
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as e:
                raise RegistryError(f"registry {self.url}: {e}") from e
        return self._write(fn)   # something expired: delete it (and log it) first

    def _expired(self, db) -> bool:
        return db.execute("SELECT 1 FROM leases WHERE expires <= ? LIMIT 1",
                          (self._clock(),)).fetchone() is not None

    def _sweep(self, db) -> None:
        now = self._clock()
        dead = [r[0] for r in db.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        for lease in dead:
            self._revoke(db, lease)

    @staticmethod
    def _bump(db) -> int:
        rev = db.execute("UPDATE meta SET value = value + 1 WHERE name = 'rev' "
                         "RETURNING value").fetchone()[0]
        if rev % 1000 == 0:
            db.execute("DELETE FROM events WHERE rev <= ?", (rev - KEEP_EVENTS,))
            db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'",
                       (rev - KEEP_EVENTS,))
        return rev

    def _set(self, db, key: str, value: bytes, lease: int) -> None:
        rev = self._bump(db)
        db.execute("INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                   "value = excluded.value, lease = excluded.lease, mod_rev = excluded.mod_rev",
                   (key, value, lease, rev))
        db.execute("INSERT INTO events VALUES (?, 'put', ?, ?)", (rev, key, value))

    def _del(self, db, key: str) -> None:
        if db.execute("DELETE FROM kv WHERE key = ? RETURNING 1", (key,)).fetchone():
            rev = self._bump(db)
            db.execute("INSERT INTO events VALUES (?, 'delete', ?, NULL)", (rev, key))

    def _revoke(self, db, lease: int) -> None:
        for (key,) in db.execute("SELECT key FROM kv WHERE lease = ?", (lease,)).fetchall():
            self._del(db, key)
        db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    # -- the Store verbs ----------------------------------------------------------------------

    def _entry(self, db, row) -> Entry:
        key, value, lease, mod_rev = row
        ttl = None
        if lease:
            r = db.execute("SELECT expires FROM leases WHERE id = ?", (lease,)).fetchone()
            ttl = max(0.0, r[0] - self._clock()) if r else None
        return Entry(key, bytes(value), mod_rev, lease, ttl)

    def get(self, key: str) -> Entry | None:
        def fn(db):
            row = db.execute("SELECT * FROM kv WHERE key = ?", (key,)).fetchone()
            return self._entry(db, row) if row else None
        return self._read(fn)

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        def fn(db):
            rows = db.execute("SELECT * FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                              (len(prefix), prefix)).fetchall()
            rev = db.execute("SELECT value FROM meta WHERE name = 'rev'").fetchone()[0]
            return [self._entry(db, r) for r in rows], rev
        return self._read(fn)

    def create(self, key: str, value: bytes) -> bool:
        def fn(db):
            if db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone():
                return False
            self._set(db, key, value, 0)
            return True
        return self._write(fn)

    def put(self, key: str, value: bytes) -> None:
        self._write(lambda db: self._set(db, key, value, 0))

    def grant(self, ttl: int) -> int:
        return self._write(lambda db: db.execute(
            "INSERT INTO leases (ttl, expires) VALUES (?, ?) RETURNING id",
            (ttl, self._clock() + ttl)).fetchone()[0])

    def keepalive(self, lease: int) -> float | None:
        def fn(db):
            row = db.execute("UPDATE leases SET expires = ? + ttl WHERE id = ? RETURNING ttl",
                             (self._clock(), lease)).fetchone()
            return float(row[0]) if row else None
        return self._write(fn)

    def ttl(self, lease: int) -> float | None:
        def fn(db):
            r = db.execute("SELECT expires FROM leases WHERE id = ?", (lease,)).fetchone()
            return max(0.0, r[0] - self._clock()) if r else None
        return self._read(fn)

    def revoke(self, lease: int) -> None:
        self._write(lambda db: self._revoke(db, lease))

    def claim(self, key: str, value: bytes, lease: int, mod_rev: int) -> bool:
        def fn(db):
            row = db.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
            if (row[0] if row else 0) != mod_rev:
                return False
            if not db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone():
                raise RegistryError(f"registry {self.url}: lease {lease} has run out")
            self._set(db, key, value, lease)
            return True
        return self._write(fn)

    def delete(self, key: str) -> None:
        self._write(lambda db: self._del(db, key))

    def watch(self, prefix: str, revision: int) -> "SqliteWatch":
        return SqliteWatch(self, prefix, revision)

    def _changes(self, prefix: str, revision: int) -> list[Event]:
        def fn(db):
            compacted = db.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0]
            if revision <= compacted:
                raise CompactedError(f"registry {self.url}: revision {revision} is compacted "
                                     f"(the log starts after {compacted})")
            rows = db.execute("SELECT rev, kind, key, value FROM events WHERE rev >= ? AND "
                              "substr(key, 1, ?) = ? ORDER BY rev",
                              (revision, len(prefix), prefix)).fetchall()
            return [Event(kind, key, bytes(v) if v is not None else None, rev)
                    for rev, kind, key, v in rows]
        return self._read(fn)

    def compact(self, revision: int) -> None:
        """Forget the change log before `revision` (as `etcdctl compact`)."""
        def fn(db):
            rev = db.execute("SELECT value FROM meta WHERE name = 'rev'").fetchone()[0]
            if revision > rev:       # as etcd: "required revision is a future revision"
                raise RegistryError(f"registry {self.url}: cannot compact at revision "
                                    f"{revision}, after the store's {rev}")
            db.execute("DELETE FROM events WHERE rev < ?", (revision,))
            db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'",
                       (revision - 1,))
        self._write(fn)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteWatch:
    """Polls the change log; `wait` is the pause between looks (injected for tests)."""

    def __init__(self, store: SqliteStore, prefix: str, revision: int,
                 wait: Callable[[float], object] | None = None):
        self._store, self._prefix, self._next = store, prefix, revision
        self._closed = threading.Event()
        self._wait = wait or self._closed.wait

    def get(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout     # real time: the registry's clock may be a fake
        while not self._closed.is_set():
            events = self._store._changes(self._prefix, self._next)
            if events:
                self._next = events[-1].revision + 1
                return events
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._wait(min(POLL, left))
        return []

    def close(self) -> None:
        self._closed.set()
