"""The Store contract (tunl.mesh.store), held to by both stores: SqliteStore on a file, and
EtcdStore on a real 3-member etcd cluster on loopback (tunl.lab.etcd). No root, no namespaces.

Every test writes under its own key prefix, so the tests share one cluster without seeing each
other. SQLite's leases run on a FakeClock, so they run out at once; etcd's on the real clock, so
its expiry tests wait (under 3 s). Killing members and taking the registry down get clusters of
their own.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest

from tunl.lab.etcd import EtcdCluster
from tunl.mesh.etcd import EtcdStore
from tunl.mesh.fake import FakeClock
from tunl.mesh.sqlite import SqliteStore
from tunl.mesh.store import CompactedError, Event, RegistryError

NO_ETCD = shutil.which("etcd") is None
needs_etcd = pytest.mark.skipif(NO_ETCD, reason="etcd is not installed (apt install etcd-server)")
LONG = 30            # a lease TTL no test outlives
SHORT = 1            # a lease TTL that runs out during the test (etcd's minimum here is 1 s)
RACERS = 8


@dataclass
class Backend:
    kind: str                          # "sqlite" | "etcd"
    new: Callable[[], object]          # a new store object over the same registry
    clock: FakeClock | None            # SQLite's lease clock; None: real time (etcd)

    def run_out(self, store, key: str) -> None:
        """Let every lease of SHORT seconds run out, until `key` (held under one) is gone."""
        if self.clock is not None:
            self.clock.advance(SHORT + 0.5)
            return
        assert eventually(lambda: store.get(key) is None, within=3.0), \
            f"{key} still there 3 s after its {SHORT} s lease went unrenewed"


def eventually(cond: Callable[[], bool], within: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)


def drain(watch, count: int, within: float = 5.0) -> list[Event]:
    """Events from `watch` until there are `count` of them, or `within` seconds have passed."""
    events: list[Event] = []
    deadline = time.monotonic() + within
    while len(events) < count and time.monotonic() < deadline:
        events += watch.get(0.2)
    return events


def brief(events: list[Event]) -> list[tuple]:
    return [(e.kind, e.key, e.value) for e in events]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if NO_ETCD:
        pytest.skip("etcd is not installed (apt install etcd-server)")
    c = EtcdCluster(3, str(tmp_path_factory.mktemp("etcd")))
    c.start()
    yield c
    c.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    stores = []
    if request.param == "sqlite":
        clock = FakeClock(1_000_000.0)
        path = str(tmp_path / "mesh.db")
        make = lambda: SqliteStore(path, clock)          # noqa: E731
    else:
        clock = None
        c = request.getfixturevalue("cluster")
        make = lambda: EtcdStore(c.endpoints)            # noqa: E731

    def new():
        stores.append(make())
        return stores[-1]
    yield Backend(request.param, new, clock)
    for s in stores:
        s.close()


@pytest.fixture
def store(backend):
    return backend.new()


@pytest.fixture
def prefix(request):
    """A key prefix of this test alone."""
    return f"/t/{request.node.originalname}-{uuid.uuid4().hex[:8]}/"


# -- get, put, list, create -------------------------------------------------------------------

def test_get_put_list_under_a_prefix(store, prefix):
    outside = [prefix[:-1], prefix[:-1] + "0", prefix[:-1] + "-x/a", "/t/other/" + prefix]
    for k in outside:        # the prefix without its slash; its range end ("/"+1 is "0"); ...
        store.put(k, b"outside")
    _, rev0 = store.list(prefix)
    store.put(prefix + "a", b"1")
    store.put(prefix + "b/c", b"\x00\xff binary")
    entries, rev1 = store.list(prefix)
    assert {e.key: e.value for e in entries} == {prefix + "a": b"1",
                                                  prefix + "b/c": b"\x00\xff binary"}
    assert rev1 >= rev0 + 2
    assert all(e.lease == 0 for e in entries)

    a = store.get(prefix + "a")
    assert (a.key, a.value, a.lease) == (prefix + "a", b"1", 0)
    assert rev0 < a.mod_rev <= rev1
    assert store.get(prefix + "missing") is None

    store.put(prefix + "a", b"2")
    entries, rev2 = store.list(prefix)
    a2 = store.get(prefix + "a")
    assert a2.value == b"2" and a2.mod_rev == rev2 > rev1
    assert len(entries) == 2

    store.delete(prefix + "a")
    store.delete(prefix + "never-there")
    entries, rev3 = store.list(prefix)
    assert [e.key for e in entries] == [prefix + "b/c"] and rev3 > rev2
    assert store.get(prefix[:-1] + "0").value == b"outside"


def test_list_is_a_snapshot_while_another_writes(backend, prefix):
    """list's entries and revision are of one moment: a watch from the revision after it
    misses nothing. Here every write adds one key under the prefix, so they must agree."""
    reader, writer = backend.new(), backend.new()
    _, base = reader.list(prefix)
    done = threading.Event()

    def write():
        for n in range(120):
            writer.put(prefix + f"k{n:03d}", b"v")
        done.set()

    t = threading.Thread(target=write)
    t.start()
    behind = []
    while not done.is_set():
        entries, rev = reader.list(prefix)
        if len(entries) != rev - base:
            behind.append((len(entries), rev - base))
    t.join()
    assert not behind, f"entries vs writes by the revision: {behind[:5]}"


def test_create_only_where_absent(store, prefix):
    assert store.create(prefix + "config", b"first") is True
    assert store.create(prefix + "config", b"second") is False
    e = store.get(prefix + "config")
    assert (e.value, e.lease) == (b"first", 0)
    store.delete(prefix + "config")
    assert store.create(prefix + "config", b"third") is True
    assert store.get(prefix + "config").value == b"third"


# -- claim ------------------------------------------------------------------------------------

def test_claim_compares_the_mod_revision(store, prefix):
    key = prefix + "10.42.1.0-24"
    lease = store.grant(LONG)
    assert store.claim(key, b"mine", lease, 0) is True
    e = store.get(key)
    assert (e.value, e.lease) == (b"mine", lease)
    assert store.claim(key, b"again", lease, 0) is False            # 0: only where absent
    assert store.claim(key, b"stale", lease, e.mod_rev - 1) is False
    assert store.get(key).value == b"mine"
    assert store.claim(key, b"renewed", lease, e.mod_rev) is True   # the current one
    e2 = store.get(key)
    assert e2.value == b"renewed" and e2.mod_rev > e.mod_rev
    assert store.claim(key, b"late", lease, e.mod_rev) is False     # now stale
    assert store.get(key).value == b"renewed"
    store.revoke(lease)


def test_claim_race_for_one_key_has_one_winner(backend, prefix):
    key = prefix + "10.42.7.0-24"
    stores = [backend.new() for _ in range(RACERS)]
    leases = [s.grant(LONG) for s in stores]
    go = threading.Barrier(RACERS)
    won: dict[int, bool] = {}
    errors: list[BaseException] = []

    def race(i):
        try:
            go.wait()
            won[i] = stores[i].claim(key, f"node{i}".encode(), leases[i], 0)
        except BaseException as e:           # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    winners = [i for i, w in won.items() if w]
    assert len(won) == RACERS and len(winners) == 1, won
    e = stores[0].get(key)
    assert (e.value, e.lease) == (f"node{winners[0]}".encode(), leases[winners[0]])


def test_claim_race_for_a_few_keys_holds_each_once(backend, prefix):
    keys = [prefix + f"10.42.{n}.0-24" for n in range(3)]
    stores = [backend.new() for _ in range(RACERS)]
    leases = [s.grant(LONG) for s in stores]
    go = threading.Barrier(RACERS)
    claims: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def race(i):
        s, rng = stores[i], random.Random(i)
        try:
            go.wait()
            for _ in range(50):
                entries, _ = s.list(prefix)
                free = sorted(set(keys) - {e.key for e in entries})
                if not free:
                    return
                key = rng.choice(free)
                if s.claim(key, f"node{i}".encode(), leases[i], 0):
                    claims.append((key, i))
                    return
        except BaseException as e:           # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    held = [k for k, _ in claims]
    assert sorted(held) == sorted(keys), f"claims {claims}: a key held twice or not at all"
    for key, i in claims:
        e = stores[0].get(key)
        assert (e.value, e.lease) == (f"node{i}".encode(), leases[i])


# -- leases -----------------------------------------------------------------------------------

def test_keepalive_returns_the_ttl(store):
    lease = store.grant(LONG)
    assert store.keepalive(lease) == LONG
    assert 0 < store.ttl(lease) <= LONG
    store.revoke(lease)
    assert store.keepalive(lease) is None
    assert store.ttl(lease) is None
    store.revoke(lease)                      # gone already: no error


def test_an_unrenewed_lease_runs_out_and_its_keys_go(backend, store, prefix):
    short, kept = store.grant(SHORT), store.grant(LONG)
    assert store.claim(prefix + "dies", b"x", short, 0)
    assert store.claim(prefix + "stays", b"y", kept, 0)
    store.put(prefix + "plain", b"z")
    assert store.keepalive(short) == SHORT
    assert 0 <= store.ttl(short) <= SHORT    # under a second left is still a lease (etcd: 0)
    backend.run_out(store, prefix + "dies")
    assert store.keepalive(kept) == LONG     # etcd: within its TTL even after the wait
    assert store.get(prefix + "dies") is None
    assert store.keepalive(short) is None
    assert store.ttl(short) is None
    assert sorted(e.key for e in store.list(prefix)[0]) == [prefix + "plain", prefix + "stays"]
    with pytest.raises(RegistryError):       # a claim under a lease that ran out
        store.claim(prefix + "dies", b"again", short, 0)
    store.revoke(kept)


def test_revoke_deletes_the_keys_of_the_lease(store, prefix):
    lease, other = store.grant(LONG), store.grant(LONG)
    assert store.claim(prefix + "a", b"1", lease, 0)
    assert store.claim(prefix + "b", b"2", lease, 0)
    assert store.claim(prefix + "c", b"3", other, 0)
    store.revoke(lease)
    assert [e.key for e in store.list(prefix)[0]] == [prefix + "c"]
    assert store.keepalive(lease) is None
    assert store.keepalive(other) == LONG
    store.revoke(other)
    assert store.list(prefix)[0] == []


# -- watch ------------------------------------------------------------------------------------

def test_watch_delivers_changes_in_order(backend, store, prefix):
    _, rev = store.list(prefix)
    w = store.watch(prefix, rev + 1)
    try:
        lease = store.grant(SHORT)
        store.put(prefix + "a", b"1")
        store.put(prefix[:-1] + "0", b"outside")            # not under the prefix
        store.put(prefix + "b", b"2")
        store.put(prefix + "a", b"3")
        store.delete(prefix + "b")
        assert store.claim(prefix + "c", b"4", lease, 0)
        first = drain(w, 5)
        backend.run_out(store, prefix + "c")
        events = first + drain(w, 6 - len(first))
        assert brief(events) == [("put", prefix + "a", b"1"), ("put", prefix + "b", b"2"),
                                 ("put", prefix + "a", b"3"), ("delete", prefix + "b", None),
                                 ("put", prefix + "c", b"4"), ("delete", prefix + "c", None)]
        revs = [e.revision for e in events]
        assert revs == sorted(set(revs)) and revs[0] > rev
        assert events[2].revision == store.list(prefix)[0][0].mod_rev   # a's last put
        assert w.get(0.3) == []
    finally:
        t0 = time.monotonic()
        w.close()
        assert time.monotonic() - t0 < 1.0, "closing a watch waits for its stream"


def test_watch_from_an_old_revision_delivers_the_history(store, prefix):
    store.put(prefix + "a", b"1")
    since = store.get(prefix + "a").mod_rev
    store.put(prefix + "b", b"2")
    store.delete(prefix + "a")
    w = store.watch(prefix, since)
    try:
        assert brief(drain(w, 3)) == [("put", prefix + "a", b"1"), ("put", prefix + "b", b"2"),
                                      ("delete", prefix + "a", None)]
        store.put(prefix + "c", b"3")                       # and goes on from there
        assert brief(drain(w, 1)) == [("put", prefix + "c", b"3")]
    finally:
        w.close()
    later = store.watch(prefix, since + 1)                  # from a revision in between
    try:
        assert [e.key for e in drain(later, 3)] == [prefix + "b", prefix + "a", prefix + "c"]
    finally:
        later.close()


def test_watch_from_before_a_compaction_is_told_to_list_again(store, prefix):
    for v in (b"1", b"2", b"3"):
        store.put(prefix + "x", v)
    last = store.get(prefix + "x").mod_rev
    store.compact(last)
    w = store.watch(prefix, last - 2)
    try:
        with pytest.raises(CompactedError):
            drain(w, 1)
        with pytest.raises(CompactedError):                 # and keeps saying so
            w.get(0.5)
    finally:
        w.close()
    w = store.watch(prefix, last)                           # the compacted revision itself
    try:
        assert brief(drain(w, 1)) == [("put", prefix + "x", b"3")]
    finally:
        w.close()
    with pytest.raises(RegistryError):                     # a revision not written yet
        store.compact(store.list(prefix)[1] + 1000)


# -- etcd: a member dies, the registry goes, operator tooling ---------------------------------

def _do(what: Callable[[], object], within: float = 2.0):
    """`what`, retried on RegistryError for `within` seconds (a leader election)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return what()
        except RegistryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_etcd
def test_etcd_fails_over_when_a_member_dies(tmp_path):
    prefix = "/t/failover/"
    with EtcdCluster(3, str(tmp_path)) as c:
        assert eventually(lambda: c.leader() is not None, within=5)
        leader = c.leader()
        follower = next(i for i in range(3) if i != leader)
        # the store's first endpoint is a follower: killing it takes no leader with it
        order = [follower] + [i for i in range(3) if i != follower]
        store = EtcdStore([c.endpoints[i] for i in order])
        lease = store.grant(LONG)
        assert store.claim(prefix + "a", b"1", lease, 0)
        _, rev = store.list(prefix)
        w = store.watch(prefix, rev + 1)
        try:
            store.put(prefix + "before", b"0")
            assert brief(drain(w, 1)) == [("put", prefix + "before", b"0")]

            c.kill_member(follower)
            t0 = time.monotonic()
            entries, _ = store.list(prefix)
            assert [e.key for e in entries] == [prefix + "a", prefix + "before"]
            assert store.claim(prefix + "b", b"2", lease, 0)
            assert store.claim(prefix + "a", b"1'", lease, entries[0].mod_rev)
            assert store.keepalive(lease) == LONG
            assert time.monotonic() - t0 < 2.0
            assert brief(drain(w, 2)) == [("put", prefix + "b", b"2"),
                                          ("put", prefix + "a", b"1'")]

            c.start_member(follower)
            c.kill_member(leader)                  # now the leader: an election, then on
            t0 = time.monotonic()
            entries, _ = _do(lambda: store.list(prefix))
            assert len(entries) == 3
            _do(lambda: store.claim(prefix + "c", b"3", lease, 0))   # a retry may find it won
            c_entry = _do(lambda: store.get(prefix + "c"))
            assert (c_entry.value, c_entry.lease) == (b"3", lease)
            assert _do(lambda: store.keepalive(lease)) == LONG
            assert time.monotonic() - t0 < 3.0
            assert brief(drain(w, 1)) == [("put", prefix + "c", b"3")]

            c.start_member(leader)
            assert _do(lambda: store.get(prefix + "c")).value == b"3"
        finally:
            w.close()
            store.close()


VERBS: dict[str, Callable] = {
    "get": lambda s, p, lease: s.get(p + "a"),
    "list": lambda s, p, lease: s.list(p),
    "create": lambda s, p, lease: s.create(p + "n", b"n"),
    "put": lambda s, p, lease: s.put(p + "a", b"2"),
    "grant": lambda s, p, lease: s.grant(LONG),
    "keepalive": lambda s, p, lease: s.keepalive(lease),
    "ttl": lambda s, p, lease: s.ttl(lease),
    "revoke": lambda s, p, lease: s.revoke(lease),
    "claim": lambda s, p, lease: s.claim(p + "c", b"c", lease, 0),
    "delete": lambda s, p, lease: s.delete(p + "a"),
    "compact": lambda s, p, lease: s.compact(1),
}


@needs_etcd
def test_etcd_down_every_verb_raises_registry_error_then_recovers(tmp_path):
    prefix = "/t/down/"
    with EtcdCluster(1, str(tmp_path)) as c:
        store = EtcdStore(c.endpoints)
        lease = store.grant(LONG)
        store.put(prefix + "a", b"1")
        _, rev = store.list(prefix)
        w = store.watch(prefix, rev + 1)
        c.stop()
        try:
            for name, verb in VERBS.items():
                t0 = time.monotonic()
                with pytest.raises(RegistryError):
                    verb(store, prefix, lease)
                assert time.monotonic() - t0 < 2.0, f"{name} took {time.monotonic() - t0:.1f} s"
            t0 = time.monotonic()
            with pytest.raises(RegistryError):           # the open watch ends, and says so
                drain(w, 1, within=2.0)
            fresh = store.watch(prefix, rev + 1)         # a watch opened while it is down
            with pytest.raises(RegistryError):
                drain(fresh, 1, within=2.0)
            assert time.monotonic() - t0 < 4.0
            fresh.close()

            c.start()                                    # the same store object works again
            store.put(prefix + "a", b"3")
            assert store.get(prefix + "a").value == b"3"
            assert store.keepalive(lease) == LONG        # etcd kept the lease over its stop
            w2 = store.watch(prefix, rev + 1)
            assert brief(drain(w2, 1)) == [("put", prefix + "a", b"3")]
            w2.close()
        finally:
            w.close()
            store.close()


@needs_etcd
@pytest.mark.skipif(shutil.which("etcdctl") is None, reason="etcdctl is not installed")
def test_flannel_layout_reads_back_with_etcdctl(cluster):
    key = "/coreos.com/network/subnets/10.42.1.0-24"
    lease_json = {"PublicIP": "172.16.0.1", "BackendType": "ipip",
                  "BackendData": {"Node": "a"}}
    store = EtcdStore(cluster.endpoints)
    try:
        store.put(key, json.dumps(lease_json).encode())
        env = {**os.environ, "ETCDCTL_API": "3"}
        out = subprocess.run(["etcdctl", "--endpoints", ",".join(cluster.client_urls), "get",
                              "--prefix", "/coreos.com/network"], env=env, capture_output=True,
                             text=True, timeout=20, check=True).stdout.splitlines()
        got = dict(zip(out[0::2], out[1::2]))              # key line, value line
        assert json.loads(got[key]) == lease_json
        store.delete(key)
    finally:
        store.close()


# -- SQLite: many agents on one host ----------------------------------------------------------

CLAIMER = """
import json, os, random, sys, time
from tunl.mesh.sqlite import SqliteStore
path, me, go, keys = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
store = SqliteStore(path)
while not os.path.exists(go):
    time.sleep(0.005)
lease, won, rng = store.grant(60), [], random.Random(me)
while True:
    entries, _ = store.list("/subnets/")
    free = sorted(set(keys) - {e.key for e in entries})
    if not free:
        break
    key = rng.choice(free)
    if store.claim(key, me.encode(), lease, 0):
        won.append(key)
print(json.dumps(won))
"""


def test_sqlite_many_processes_claim_apart(tmp_path):
    path, go = str(tmp_path / "mesh.db"), str(tmp_path / "go")
    keys = [f"/subnets/10.42.{n}.0-24" for n in range(40)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, path, f"p{i}", go,
                               json.dumps(keys)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    time.sleep(0.3)                            # most of them past the import and the open
    open(go, "w").close()
    won = {}
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "locked" not in err, f"p{i}: exit {p.returncode}\n{err}"
        won[f"p{i}"] = json.loads(out)
    held = [k for ks in won.values() for k in ks]
    assert sorted(held) == sorted(keys), "a subnet held twice or not at all"
    store = SqliteStore(path)
    try:
        for me, ks in won.items():
            assert all(store.get(k).value == me.encode() for k in ks)
    finally:
        store.close()
