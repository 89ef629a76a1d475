"""Prometheus metrics of the agent (prometheus_client): its lease, peers and routes, how long
reconciling takes, registry errors, and the counters of its tunnel by drop reason."""
from __future__ import annotations

from typing import Callable

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..daemon import metrics
from .agent import Agent


class AgentCollector:
    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        a, s = self.agent, self.agent.status
        for family, name, what, value in (
                (GaugeMetricFamily, "leases", "Valid subnet leases in the registry",
                 len(a.leases)),
                (GaugeMetricFamily, "refused_leases",
                 "Registry entries refused (garbage, or outside the network)", len(s.refused)),
                (GaugeMetricFamily, "peers", "Other nodes this node routes to", s.peers),
                (GaugeMetricFamily, "routes_programmed", "Routes this agent has programmed",
                 s.routes),
                (GaugeMetricFamily, "direct_routes",
                 "Peers routed over the underlay without encapsulation (--cross-subnet)",
                 s.direct),
                (GaugeMetricFamily, "members",
                 "Outer sources the tunnel accepts (0: not enforced here)", s.members),
                (GaugeMetricFamily, "registry_up", "1 while the registry answers",
                 1 if s.registry_up else 0),
                (CounterMetricFamily, "registry_errors", "Failed registry requests",
                 s.registry_errors),
                (CounterMetricFamily, "route_errors", "Route changes the kernel refused",
                 s.route_errors)):
            m = family(f"tunl_mesh_{name}", what)
            m.add_metric([], value)
            yield m
        g = GaugeMetricFamily("tunl_mesh_lease_info", "This node's lease",
                              labels=["subnet", "public_ip", "node"])
        if s.lease:
            g.add_metric([str(s.lease.subnet), str(s.lease.public_ip), s.lease.node], 1)
        yield g


def serve(agent: Agent, listen: str, tunnel: Callable[[], list[dict] | None]) -> Histogram:
    """Serve /metrics on listen ("[ADDR:]PORT"): the agent's, and its tunnel's counters;
    returns the histogram the agent's reconciles go into."""
    registry = metrics.serve(listen, AgentCollector(agent), metrics.TunnelCollector(tunnel))
    return Histogram("tunl_mesh_reconcile_seconds", "Time to plan and program the routes",
                     registry=registry,
                     buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
