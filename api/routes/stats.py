"""/v1/stats (JSON, the endpoint users curl) and /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep
from api.models import LimitCountersOut, RuleStatOut, StatsOut, TotalsOut, iso
from api.service import FirewallService
from xdpfw import abi

__all__ = ["OUTCOMES", "metrics_router", "router"]

router = APIRouter(
    prefix="/v1/stats", tags=["stats"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES}
)
metrics_router = APIRouter(tags=["stats"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES})

# The `outcome` label values of xdpfw_packets_total: every counter but the two that have a
# family of their own (PACKETS is xdpfw_frames_total, BYTES is xdpfw_bytes_total).
OUTCOMES = tuple(
    s for s in abi.Stat.counters() if s not in (abi.Stat.PACKETS, abi.Stat.BYTES)
)


@router.get("", response_model=StatsOut, dependencies=[ReadAccess])
def stats(
    svc: ServiceDep, top: Annotated[int | None, Query(ge=1, le=1_000_000)] = None
) -> StatsOut:
    """Totals and per-rule counters, busiest rule first (`top=N` keeps the first N)."""
    totals = svc.totals()
    ranked = svc.top_counters(top)
    limits = svc.limit_counters()  # issue 16: limit rules also say passed / limited / banned
    return StatsOut(
        totals=TotalsOut.of(totals),
        rules=[
            RuleStatOut(
                id=rid, packets=c.packets, bytes=c.bytes, last_hit=iso(c.last_hit),
                limit=LimitCountersOut.of(limits[rid]) if rid in limits else None,
            )
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
        counters = totals.by_stat()
        for stat in OUTCOMES:
            frames.add_metric([stat.field], counters[stat])
        yield frames
        yield CounterMetricFamily(
            "xdpfw_frames", "Frames seen in all", value=counters[abi.Stat.PACKETS]
        )
        yield CounterMetricFamily(
            "xdpfw_bytes", "Bytes of all frames seen", value=counters[abi.Stat.BYTES]
        )
        usage = GaugeMetricFamily(
            "xdpfw_table_entries", "Entries in each table", labels=["table"]
        )
        cap = GaugeMetricFamily("xdpfw_table_capacity", "Capacity of each table", labels=["table"])
        for name, (used, limit) in self.svc.table_usage().items():
            usage.add_metric([name], used)
            cap.add_metric([name], limit)
        yield usage
        yield cap
        reattached = CounterMetricFamily(
            "xdpfw_reattach",
            "Times the watchdog attached the program again to an interface that lost it",
            labels=["interface"],
        )
        for name, n in self.svc.reattach_counts().items():
            reattached.add_metric([name], n)
        yield reattached


@metrics_router.get(
    "/metrics",
    dependencies=[ReadAccess],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
)
def metrics(svc: ServiceDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(svc))
    body = generate_latest(registry) + _rule_metrics(svc)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _rule_metrics(svc: FirewallService) -> bytes:
    """Per-rule counter families, by rule id, in the text format prometheus-client writes.

    Written directly from the counter arrays: a million rules are two million samples, too
    many to build as Python metric objects on every scrape.
    """
    ids, packets, nbytes, _ = svc.counter_arrays()
    order = ids.argsort(kind="stable")
    labels = [f'{{rule_id="{rid}"}} ' for rid in ids[order].tolist()]
    out = []
    for name, doc, values in (
        ("xdpfw_rule_packets", "Packets credited to a rule", packets),
        ("xdpfw_rule_bytes", "Bytes credited to a rule", nbytes),
    ):
        out.append(f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n")
        sample = f"{name}_total"
        out.extend(
            f"{sample}{label}{float(v)!r}\n"
            for label, v in zip(labels, values[order].tolist(), strict=True)
        )
    return "".join(out).encode()
