"""/v1/stats (JSON, the endpoint users curl) and /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep
from api.models import RuleStatOut, StatsOut, TotalsOut, iso
from api.service import FirewallService

__all__ = ["metrics_router", "router"]

router = APIRouter(
    prefix="/v1/stats", tags=["stats"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES}
)
metrics_router = APIRouter(tags=["stats"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES})


@router.get("", response_model=StatsOut, dependencies=[ReadAccess])
def stats(
    svc: ServiceDep, top: Annotated[int | None, Query(ge=1, le=1_000_000)] = None
) -> StatsOut:
    """Totals and per-rule counters, busiest rule first (`top=N` keeps the first N)."""
    totals = svc.totals()
    counters = svc.counters()
    ranked = sorted(counters.items(), key=lambda kv: (-kv[1].packets, kv[0]))
    if top is not None:
        ranked = ranked[:top]
    return StatsOut(
        totals=TotalsOut.of(totals),
        rules=[
            RuleStatOut(id=rid, packets=c.packets, bytes=c.bytes, last_hit=iso(c.last_hit))
            for rid, c in ranked
        ],
    )


class _Collector(Collector):
    def __init__(self, svc: FirewallService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        totals = self.svc.totals()
        frames = CounterMetricFamily(
            "xdpfw_packets", "Frames seen by the XDP program, by outcome", labels=["outcome"]
        )
        for outcome in ("passed", "dropped", "monitored", "malformed", "non_ip", "fragments"):
            frames.add_metric([outcome], getattr(totals, outcome))
        yield frames
        yield CounterMetricFamily("xdpfw_frames", "Frames seen in all", value=totals.packets)
        yield CounterMetricFamily("xdpfw_bytes", "Bytes of all frames seen", value=totals.bytes)
        pk = CounterMetricFamily(
            "xdpfw_rule_packets", "Packets credited to a rule", labels=["rule_id"]
        )
        by = CounterMetricFamily(
            "xdpfw_rule_bytes", "Bytes credited to a rule", labels=["rule_id"]
        )
        for rid, c in sorted(self.svc.counters().items()):
            pk.add_metric([str(rid)], c.packets)
            by.add_metric([str(rid)], c.bytes)
        yield pk
        yield by
        usage = GaugeMetricFamily(
            "xdpfw_table_entries", "Entries in each table", labels=["table"]
        )
        cap = GaugeMetricFamily("xdpfw_table_capacity", "Capacity of each table", labels=["table"])
        for name, (used, limit) in self.svc.dp.table_usage().items():
            usage.add_metric([name], used)
            cap.add_metric([name], limit)
        yield usage
        yield cap


@metrics_router.get(
    "/metrics",
    dependencies=[ReadAccess],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
)
def metrics(svc: ServiceDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(svc))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
