"""The cluster registry: etcd v3 through etcd3gw, OpenStack's maintained client for etcd's
JSON gateway (/v3/...: plain HTTP through requests, no gRPC or protobuf to pin). Requests go to
one endpoint and move on to the next when it fails, so a 3-member cluster loses no agent when one
member dies. Leases are etcd's own leases; watches read the gateway's watch stream directly,
since etcd3gw's watcher drops the compaction notice that says a watch must list again.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
import queue
import socket
import threading
import time
from typing import Callable

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception,
                                 InternalServerError)
from etcd3gw.utils import _decode, _encode

from .store import CompactedError, Entry, Event, RegistryError

TIMEOUT = 1.0            # seconds for one request to one endpoint
WATCH_READ = 30.0        # a stream quiet this long is opened again (etcd notifies progress
                         # only every 10 minutes by default)


# the gateway's answers that say "not this member, not now": try the next endpoint
UNAVAILABLE = (ConnectionFailedError, ConnectionTimeoutError, InternalServerError)


def _why(e: Etcd3Exception) -> str:
    """etcd's own words (the gateway's {"error": ...}), else what failed on the way."""
    try:
        return str(json.loads(e.detail_text)["error"])
    except (TypeError, ValueError, KeyError):
        pass
    if isinstance(e, ConnectionFailedError):
        return "no connection"
    if isinstance(e, ConnectionTimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    return str(e) or type(e).__name__


def _range_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _encode(bytes(b))


class EtcdStore:
    def __init__(self, endpoints: list[tuple[str, int]], clock: Callable[[], float] = time.time):
        self.endpoints = endpoints
        self.url = "etcd://" + ",".join(f"{h}:{p}" for h, p in endpoints)
        self._clients = [Etcd3Client(host=h, port=p, timeout=TIMEOUT, api_path="/v3/")
                         for h, p in endpoints]
        self._current = 0
        self._lock = threading.Lock()
        self.requests = 0          # requests sent, for the benchmark's operations per renewal

    def _post(self, path: str, body: dict) -> dict:
        """One request, to the current endpoint or, when it cannot answer (no connection, a
        timeout, no leader), to each of the others. An answer that refuses the request (a lease
        not found, a compacted revision) is etcd's word for the whole cluster: raised at once."""
        errors = []
        with self._lock:
            start = self._current
        for i in range(len(self._clients)):
            n = (start + i) % len(self._clients)
            client = self._clients[n]
            where = f"{self.endpoints[n][0]}:{self.endpoints[n][1]}"
            try:
                self.requests += 1
                answer = client.post(client.get_url(path), json=body)
            except UNAVAILABLE as e:
                errors.append(f"{where}: {_why(e)}")
                continue
            except Etcd3Exception as e:
                raise RegistryError(f"registry {self.url}: {path}: {_why(e)}") from e
            except (requests.RequestException, ValueError) as e:   # broken off, not JSON
                errors.append(f"{where}: {type(e).__name__}")
                continue
            if n != start:
                with self._lock:
                    self._current = n
            if not isinstance(answer, dict):
                raise RegistryError(f"registry {self.url}: {path} answered {answer!r:.80}")
            return answer
        raise RegistryError(f"registry {self.url}: no endpoint answers ({'; '.join(errors)})")

    @contextmanager
    def _shape(self, path: str, answer):
        """An answer not shaped as etcd's: refused as the registry's fault, never a crash."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise RegistryError(f"registry {self.url}: {path} answered {answer!r:.120}, "
                                f"not etcd's answer ({type(e).__name__})") from e

    @staticmethod
    def _entry(kv: dict) -> Entry:
        return Entry(_decode(kv["key"]).decode(), _decode(kv.get("value", "")),
                     int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))

    def get(self, key: str) -> Entry | None:
        r = self._post("/kv/range", {"key": _encode(key)})
        with self._shape("/kv/range", r):
            kvs = r.get("kvs") or []
            return self._entry(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        r = self._post("/kv/range", {"key": _encode(prefix), "range_end": _range_end(prefix)})
        with self._shape("/kv/range", r):
            return [self._entry(kv) for kv in r.get("kvs") or []], int(r["header"]["revision"])

    def _txn_put(self, key: str, value: bytes, lease: int, mod_rev: int) -> bool:
        put = {"key": _encode(key), "value": _encode(value)}
        if lease:
            put["lease"] = lease
        r = self._post("/kv/txn", {
            "compare": [{"key": _encode(key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": mod_rev}],
            "success": [{"request_put": put}]})
        with self._shape("/kv/txn", r):
            if not isinstance(r.get("header"), dict):
                raise KeyError("header")
            return r.get("succeeded") is True

    def create(self, key: str, value: bytes) -> bool:
        return self._txn_put(key, value, 0, 0)

    def put(self, key: str, value: bytes) -> None:
        self._post("/kv/put", {"key": _encode(key), "value": _encode(value)})

    def grant(self, ttl: int) -> int:
        r = self._post("/lease/grant", {"TTL": ttl})
        if r.get("error") or "ID" not in r:
            raise RegistryError(f"registry {self.url}: lease grant answered {r!r:.120}")
        return int(r["ID"])

    def keepalive(self, lease: int) -> float | None:
        r = self._post("/lease/keepalive", {"ID": lease})
        with self._shape("/lease/keepalive", r):
            ttl = int(r["result"].get("TTL", 0))
        return float(ttl) if ttl > 0 else None

    def ttl(self, lease: int) -> float | None:
        # -1: no such lease; an absent TTL is 0 (the gateway leaves zeros out): under a second
        r = self._post("/kv/lease/timetolive", {"ID": lease})
        with self._shape("/kv/lease/timetolive", r):
            if not isinstance(r.get("header"), dict):
                raise KeyError("header")
            ttl = int(r.get("TTL", 0))
        return float(ttl) if ttl >= 0 else None

    def revoke(self, lease: int) -> None:
        try:
            self._post("/kv/lease/revoke", {"ID": lease})
        except RegistryError as e:
            if "lease not found" not in str(e):      # gone already: what revoke wants
                raise

    def claim(self, key: str, value: bytes, lease: int, mod_rev: int) -> bool:
        return self._txn_put(key, value, lease, mod_rev)

    def delete(self, key: str) -> None:
        self._post("/kv/deleterange", {"key": _encode(key)})

    def compact(self, revision: int) -> None:
        self._post("/kv/compaction", {"revision": revision, "physical": True})

    def watch(self, prefix: str, revision: int) -> "EtcdWatch":
        return EtcdWatch(self, prefix, revision)

    def close(self) -> None:
        for c in self._clients:
            c.session.close()


class EtcdWatch:
    """One watch stream, read by a thread into a queue. When the stream breaks it is opened
    again on the next endpoint from the revision after the last one delivered; only when no
    endpoint takes it does get() raise RegistryError."""

    def __init__(self, store: EtcdStore, prefix: str, revision: int):
        self._store, self._prefix, self._next = store, prefix, revision
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._response = None
        self._thread = threading.Thread(target=self._run, name="tunl-etcd-watch", daemon=True)
        self._thread.start()

    def _open(self):
        errors = []
        store = self._store
        for i in range(len(store._clients)):
            n = (store._current + i) % len(store._clients)
            client = store._clients[n]
            body = {"create_request": {"key": _encode(self._prefix),
                                       "range_end": _range_end(self._prefix),
                                       "start_revision": self._next, "progress_notify": True}}
            try:
                store.requests += 1
                resp = client.session.post(client.get_url("/watch"), data=json.dumps(body),
                                           stream=True, timeout=(TIMEOUT, WATCH_READ))
                if resp.status_code == 200:
                    return resp
                errors.append(f"{store.endpoints[n][0]}:{store.endpoints[n][1]}: "
                              f"HTTP {resp.status_code}")
            except requests.RequestException as e:
                errors.append(f"{store.endpoints[n][0]}:{store.endpoints[n][1]}: "
                              f"{type(e).__name__}")
        raise RegistryError(f"registry {store.url}: no endpoint takes a watch "
                            f"({'; '.join(errors)})")

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._response = self._open()
                if self._closed.is_set():        # closed while opening: close() may have missed it
                    self._response.close()
                    return
                for line in self._response.iter_lines(chunk_size=None):
                    if self._closed.is_set():
                        return
                    if line.strip():
                        try:
                            self._chunk(json.loads(line))
                        except (ValueError, KeyError, TypeError, AttributeError) as e:
                            raise RegistryError(f"registry {self._store.url}: the watch "
                                                f"stream carried {line[:80]!r}, not etcd's "
                                                f"events") from e
            except CompactedError as e:
                self._queue.put(e)
                return
            except RegistryError as e:
                if not self._closed.is_set():
                    self._queue.put(e)
                return
            except (requests.RequestException, ValueError, AttributeError, KeyError):
                continue      # the stream broke: open it again where it stopped

    def _chunk(self, chunk: dict) -> None:
        if "error" in chunk:
            raise RegistryError(f"registry {self._store.url}: watch: {chunk['error']!r:.120}")
        r = chunk["result"]             # every line of etcd's watch stream has one
        if not isinstance(r, dict):
            raise TypeError("result")
        if int(r.get("compact_revision", 0)):
            raise CompactedError(f"registry {self._store.url}: revision {self._next} is "
                                 f"compacted (etcd keeps from {r['compact_revision']})")
        if r.get("canceled"):
            raise RegistryError(f"registry {self._store.url}: the watch was cancelled "
                                f"({r.get('cancel_reason', 'no reason given')})")
        events = []
        for e in r.get("events") or []:
            kv = e["kv"]
            rev = int(kv.get("mod_revision", 0))
            kind = "delete" if e.get("type") == "DELETE" else "put"
            value = _decode(kv["value"]) if kind == "put" and "value" in kv else \
                (b"" if kind == "put" else None)
            events.append(Event(kind, _decode(kv["key"]).decode(), value, rev))
        if events:
            self._next = events[-1].revision + 1
            self._queue.put(events)

    def get(self, timeout: float) -> list[Event]:
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return []
        if isinstance(item, Exception):
            self._queue.put(item)      # the watch has ended: every later get() says so too
            raise item
        out = list(item)
        while True:       # whatever else is already there, in one batch
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, Exception):
                self._queue.put(item)
                return out
            out.extend(item)

    def close(self) -> None:
        self._closed.set()
        resp = self._response
        if resp is None:
            return
        # Shut the socket down first: the reading thread sits in recv() holding the stream's
        # lock, and resp.close() alone would wait for it, up to WATCH_READ seconds.
        sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            resp.close()
        except (OSError, requests.RequestException):
            pass
