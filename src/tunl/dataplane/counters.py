"""Per-tunnel counters in the kernel's terms (struct rtnl_link_stats64), and drops by reason."""
from __future__ import annotations

from collections import Counter

FIELDS = ("rx_packets", "rx_bytes", "rx_errors", "rx_dropped", "rx_crc_errors",
          "rx_frame_errors", "rx_fifo_errors",
          "tx_packets", "tx_bytes", "tx_errors", "tx_dropped", "tx_carrier_errors",
          "collisions")


class Counters:
    """Each field is written by one thread only (rx by ingress, tx by egress)."""

    __slots__ = FIELDS + ("rx_drop", "tx_drop")

    def __init__(self):
        for f in FIELDS:
            setattr(self, f, 0)
        self.rx_drop: Counter = Counter()
        self.tx_drop: Counter = Counter()

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in FIELDS}
        # dict() copies in one step under the GIL; iterating a Counter another thread adds to
        # could fail with "dictionary changed size"
        d["rx_drop"] = {k.value: v for k, v in dict(self.rx_drop).items()}
        d["tx_drop"] = {k.value: v for k, v in dict(self.tx_drop).items()}
        return d
