"""Log lines of the data path, rate limited per kind as the kernel's net_ratelimit() does.

A packet that triggers a log line can come 100,000 times a second; each kind of line (its
key) may be written BURST times per INTERVAL seconds, and the next line written after a quiet
spell says how many were suppressed.
"""
from __future__ import annotations

import logging
import threading
import time

INTERVAL = 5.0     # net_ratelimit(): 5 s
BURST = 10         # and 10 messages
MAX_KEYS = 1024


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = INTERVAL, burst: int = BURST,
                 clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[object, list] = {}    # key -> [window start, written, suppressed]

    def _allow(self, key) -> int | None:
        """None to suppress; else how many were suppressed before this one."""
        now = self._clock()
        with self._lock:
            st = self._state.get(key)
            if st is None:
                if len(self._state) >= MAX_KEYS:
                    self._state.clear()
                st = self._state[key] = [now, 0, 0]
            if now - st[0] >= self.interval:
                st[0], st[1] = now, 0
            if st[1] >= self.burst:
                st[2] += 1
                return None
            st[1] += 1
            suppressed, st[2] = st[2], 0
            return suppressed

    def _log(self, level: int, msg: str, args, key, exc_info=False) -> None:
        suppressed = self._allow(key if key is not None else msg)
        if suppressed is None:
            return
        if suppressed:
            msg += f" ({suppressed} similar messages suppressed)"
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def info(self, msg: str, *args, key=None) -> None:
        self._log(logging.INFO, msg, args, key)

    def error(self, msg: str, *args, key=None) -> None:
        self._log(logging.ERROR, msg, args, key)

    def exception(self, msg: str, *args, key=None) -> None:
        self._log(logging.ERROR, msg, args, key, exc_info=True)
