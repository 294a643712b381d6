"""/v1/stats (JSON, the endpoint users curl) and /metrics (Prometheus)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep
from api.metrics import PARTS, Exposition
from api.models import RuleStatOut, SamplesOut, StatsOut, TotalsOut, iso
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
    ranked = svc.top_counters(top)
    return StatsOut(
        samples=_samples(svc),
        totals=TotalsOut.of(totals),
        rules=[
            RuleStatOut(id=rid, packets=c.packets, bytes=c.bytes, last_hit=iso(c.last_hit))
            for rid, c in ranked
        ],
    )


def _samples(svc: FirewallService) -> SamplesOut:
    """X-ray's counters, with the cap and snap length in force."""
    snaplen, max_pps = svc.sample_settings()
    return SamplesOut(
        **svc.sample_stats(), max_pps=max_pps, snaplen=snaplen, streams=svc.sample_streams()
    )


@metrics_router.get(
    "/metrics",
    dependencies=[ReadAccess],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
)
def metrics(request: Request) -> Response:
    """Prometheus exposition (the families: api/metrics.py, README "Prometheus and Grafana")."""
    exposition: Exposition = request.app.state.metrics
    parts = [getattr(request.app.state, name, None) for name in PARTS]
    return Response(exposition.render(parts), media_type=CONTENT_TYPE_LATEST)
