"""Prometheus metrics of tunnels (prometheus_client): tunld's (`tunld --metrics [ADDR:]PORT`)
and the mesh agent's tunnel. The counters are those of `tunl -s tunnel show`: packets, bytes,
errors, and drops by direction and reason (not_member, from a tunnel's member set, is there from
the moment the tunnel has a set); on the eBPF plane also the fast and slow path."""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("tunl.metrics")

TOTALS = ("packets", "bytes", "errors", "dropped")


class TunnelCollector:
    """Asks `show()` for the status of every tunnel at each scrape (one dict per tunnel, as
    `tunl -j tunnel show` has them inside tunld); None or an error: no tunnel metrics."""

    def __init__(self, show: Callable[[], list[dict] | None]):
        self.show = show

    def collect(self):
        try:
            tunnels = self.show() or []
        except Exception as e:          # the data plane away for a moment: no tunnel metrics
            log.debug("metrics: no tunnel status: %s", e)
            tunnels = []
        fams = {}
        for d in ("rx", "tx"):
            for what in TOTALS:
                fams[d, what] = CounterMetricFamily(
                    f"tunl_tunnel_{d}_{what}", f"The tunnel's {d} {what}", labels=["dev"])
        drops = CounterMetricFamily("tunl_tunnel_drops", "Packets dropped, by direction and "
                                    "reason (the reasons of `tunl -s tunnel show`)",
                                    labels=["dev", "dir", "reason"])
        path = CounterMetricFamily("tunl_tunnel_path_packets", "eBPF plane: packets by path",
                                   labels=["dev", "dir", "path"])
        up = GaugeMetricFamily("tunl_tunnel_up", "1 while the tunnel device is up",
                               labels=["dev", "dataplane"])
        members = GaugeMetricFamily("tunl_tunnel_members", "The outer sources a tunnel with "
                                    "a member set takes packets from", labels=["dev"])
        for t in tunnels:
            dev = (t.get("spec") or {}).get("name") or t.get("name") or "?"
            c = t.get("counters") or {}
            for d in ("rx", "tx"):
                for what in TOTALS:
                    fams[d, what].add_metric([dev], c.get(f"{d}_{what}", 0))
                dropped = dict(c.get(f"{d}_drop") or {})
                if d == "rx" and t.get("members") is not None:
                    dropped.setdefault("not_member", 0)
                    members.add_metric([dev], t["members"])
                for reason, n in sorted(dropped.items()):
                    drops.add_metric([dev, d, reason], n)
            e = t.get("ebpf") or {}
            for key, n in e.items():
                if isinstance(n, int) and key.split("_")[0] in ("fast", "slow") and \
                        key.split("_")[-1] in ("rx", "tx"):
                    path.add_metric([dev, key.split("_")[-1], key.split("_")[0]], n)
            up.add_metric([dev, str(t.get("dataplane", ""))], 1 if t.get("up") else 0)
        yield from fams.values()
        yield drops
        yield path
        yield up
        yield members


def serve(listen: str, *collectors) -> CollectorRegistry:
    """Serve /metrics on "[ADDR:]PORT" (all addresses when ADDR is left out)."""
    addr, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    start_http_server(int(port), addr or "0.0.0.0", registry=registry)
    return registry


def check_listen(listen: str) -> str:
    from ..errors import ConfigError
    addr, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'--metrics "{listen}": [ADDR:]PORT, a port 1-65535')
    return listen
