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
        g = GaugeMetricFamily("tunl_mesh_leases", "Valid subnet leases in the registry")
        g.add_metric([], len(a.leases))
        yield g
        g = GaugeMetricFamily("tunl_mesh_refused_leases",
                              "Registry entries refused (garbage, or outside the network)")
        g.add_metric([], len(s.refused))
        yield g
        g = GaugeMetricFamily("tunl_mesh_peers", "Other nodes this node routes to")
        g.add_metric([], s.peers)
        yield g
        g = GaugeMetricFamily("tunl_mesh_routes_programmed", "Routes this agent has programmed")
        g.add_metric([], s.routes)
        yield g
        g = GaugeMetricFamily("tunl_mesh_registry_up", "1 while the registry answers")
        g.add_metric([], 1 if s.registry_up else 0)
        yield g
        c = CounterMetricFamily("tunl_mesh_registry_errors", "Failed registry requests")
        c.add_metric([], s.registry_errors)
        yield c
        c = CounterMetricFamily("tunl_mesh_route_errors", "Route changes the kernel refused")
        c.add_metric([], s.route_errors)
        yield c
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
