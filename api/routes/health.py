"""/healthz: is the program loaded and attached where it should be; /livez: is the service
itself alive (the liveness probe: a degraded interface is no reason to restart it)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import ServiceDep
from api.models import HealthOut, InterfaceOut, TableUsage

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "an interface is not attached"}},
)
def healthz(svc: ServiceDep) -> JSONResponse:
    """200 when every wanted interface runs our program; 503 otherwise. Needs no token."""
    health = svc.health()
    body = HealthOut(
        status="ok" if health.ok else "degraded",
        prog_id=health.prog_id,
        adopted=health.adopted,
        rules=health.rules,
        protected=health.protected,
        interfaces=[InterfaceOut.of_state(i) for i in health.interfaces],
        capacity={
            name: TableUsage(entries=used, capacity=cap)
            for name, (used, cap) in health.capacity.items()
        },
    )
    return JSONResponse(body.model_dump(), status_code=200 if health.ok else 503)


LIVE_WITHIN_S = 10.0  # the watchdog runs a round at least every second


@router.get(
    "/livez",
    responses={503: {"description": "the attachment watchdog has stopped running"}},
)
def livez(svc: ServiceDep) -> JSONResponse:
    """200 while the API answers and the attachment watchdog runs; 503 when the watchdog
    has not run for LIVE_WITHIN_S seconds. Needs no token; says nothing about rules."""
    age = svc.watchdog_age()
    if age is not None and age > LIVE_WITHIN_S:
        return JSONResponse(
            {"status": "stuck", "detail": f"the attachment watchdog last ran {age:.0f} s ago"},
            status_code=503,
        )
    return JSONResponse({"status": "alive"})
