"""/healthz: is the program loaded and attached where it should be; /livez: is the service
itself alive (the liveness probe: a degraded interface is no reason to restart it).

A probe must answer while a big load runs: the service answers health without its write
lock (`FirewallService.health`), and the route runs it on its own small thread budget, so
requests queued on the lock in the shared threadpool cannot hold it up either. /livez runs
on the event loop (it reads one number), for the same reason.
"""

from __future__ import annotations

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.auth import Refusal, authorize
from api.crowdsec import CrowdsecBouncer
from api.models import CrowdsecHealthOut, HealthOut, InterfaceOut, TableUsage, iso
from api.service import FirewallService
from api.settings import Settings

__all__ = ["router"]

router = APIRouter(tags=["health"])


def _health_threads(request: Request) -> CapacityLimiter:
    """The app's own few threads for health, made on first use (inside its event loop)."""
    state = request.app.state
    threads: CapacityLimiter | None = getattr(state, "health_threads", None)
    if threads is None:
        threads = state.health_threads = CapacityLimiter(4)
    return threads


@router.get(
    "/healthz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "an interface is not attached"}},
)
async def healthz(request: Request) -> JSONResponse:
    """200 when every wanted interface runs our program; 503 otherwise. Needs no token.

    Off loopback, a caller without the token gets the status only: the protected prefixes,
    interfaces and tables are shown with the token.
    """
    # The service straight from app.state, not the ServiceDep dependency: a sync dependency
    # runs in the shared threadpool, which writers waiting on the lock may fill.
    svc: FirewallService = request.app.state.service
    settings: Settings = request.app.state.settings
    health = await to_thread.run_sync(svc.health, limiter=_health_threads(request))
    if not settings.loopback_only and not _has_token(request):
        return JSONResponse(
            {"status": "ok" if health.ok else "degraded", "detail": HIDDEN},
            status_code=200 if health.ok else 503,
        )
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
        crowdsec=_crowdsec(request),
    )
    return JSONResponse(body.model_dump(), status_code=200 if health.ok else 503)


def _crowdsec(request: Request) -> CrowdsecHealthOut | None:
    bouncer: CrowdsecBouncer | None = getattr(request.app.state, "crowdsec", None)
    if bouncer is None:
        return None
    st = bouncer.status()
    return CrowdsecHealthOut(
        lapi=st.lapi,
        state=st.state,
        last_pull=iso(st.last_pull),
        last_full_pull=iso(st.last_full_pull),
        last_error=st.last_error,
        consecutive_errors=st.consecutive_errors,
        lapi_errors=st.lapi_errors,
        applied=st.applied,
        deleted=st.deleted,
        ignored=st.ignored,
        ignored_kinds=st.ignored_kinds,
    )


LIVE_WITHIN_S = 10.0  # the watchdog runs a round at least every second


@router.get(
    "/livez",
    responses={503: {"description": "the attachment watchdog has stopped running"}},
)
async def livez(request: Request) -> JSONResponse:
    """200 while the API answers and the attachment watchdog runs; 503 when the watchdog
    has not run for LIVE_WITHIN_S seconds. Needs no token; says nothing about rules."""
    svc: FirewallService = request.app.state.service
    age = svc.watchdog_age()
    if age is not None and age > LIVE_WITHIN_S:
        return JSONResponse(
            {"status": "stuck", "detail": f"the attachment watchdog last ran {age:.0f} s ago"},
            status_code=503,
        )
    return JSONResponse({"status": "alive"})


HIDDEN = (
    "send `Authorization: Bearer <token>` for the protected prefixes, interfaces and tables "
    "(hidden from callers without the token off loopback)"
)


def _has_token(request: Request) -> bool:
    """The admin or the read token, or a peer on the local socket."""
    who = authorize(
        request.scope, request.headers.get("authorization"), request.app.state.tokens, write=False
    )
    return not isinstance(who, Refusal)
