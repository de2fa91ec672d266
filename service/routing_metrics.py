"""Wiring of per-domain routing into an app: the ``DomainRoutes`` of the process and its Prometheus series.

``vss_route_versions`` (domain versions loaded for routing), ``vss_route_frames_total{version}`` (stream
frames served per version since start), ``vss_route_version{stream, version}`` (1 for the version serving
each open stream), ``vss_domain_distance{scope, stream}`` (signature distance of the process / a stream to
the base version's signature, when that is known) and ``vss_route_served_distance{stream}`` (to the
domain version serving it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .drift import DriftMonitor
from .engine_manager import EngineManager
from .metrics import Metrics
from .routing import DomainRoutes
from .settings import Settings


class RouteCollector(Collector):
    def __init__(self, routes: DomainRoutes) -> None:
        self.routes = routes

    def collect(self) -> Iterator[Any]:
        snap = self.routes.snapshot()
        yield GaugeMetricFamily("vss_route_versions", "Domain versions loaded for routing", value=len(snap["routes"]))
        frames = CounterMetricFamily("vss_route_frames", "Stream frames served per model version", labels=["version"])
        for version, n in sorted(snap["frames_by_version"].items()):
            frames.add_metric([version], float(n))
        yield frames
        serving = GaugeMetricFamily("vss_route_version", "1 for the version serving each open stream",
                                    labels=["stream", "version"])
        distance = GaugeMetricFamily("vss_domain_distance", "Signature distance to the base version's signature",
                                     labels=["scope", "stream"])
        served = GaugeMetricFamily("vss_route_served_distance", "Signature distance of a stream to the domain "
                                   "version serving it", labels=["stream"])
        if snap["process_distance_to_base"] is not None:
            distance.add_metric(["process", ""], snap["process_distance_to_base"])
        for sid, state in sorted(snap["streams"].items()):
            if state["version"] is not None:
                serving.add_metric([sid, state["version"]], 1.0)
            if state["distance_base"] is not None:
                distance.add_metric(["stream", sid], state["distance_base"])
            if state["distance_served"] is not None:
                served.add_metric([sid], state["distance_served"])
        yield from (serving, distance, served)


def attach_routes(manager: EngineManager, settings: Settings, metrics: Metrics,
                  drift: DriftMonitor | None) -> DomainRoutes:
    """The process's ``DomainRoutes``: polled after each ``ACTIVE`` poll of ``manager``, exported in /metrics."""
    routes = DomainRoutes(manager.registry, manager.factory, max_versions=settings.route_max_versions,
                          max_distance=settings.route_max_distance, margin=settings.route_margin,
                          warmup=settings.warmup, retry_failed_s=settings.registry_retry_s, drift=drift,
                          sample_every=settings.route_sample_every, poll_s=settings.route_poll_s)
    manager.followers.append(routes.sync)
    metrics.registry.register(RouteCollector(routes))
    return routes
