"""/healthz: is the program loaded and attached where it should be."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import ServiceDep, SettingsDep
from api.models import HealthOut, InterfaceOut, TableUsage

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "an interface is not attached"}},
)
def healthz(svc: ServiceDep, settings: SettingsDep, request: Request) -> JSONResponse:
    """200 when every wanted interface runs our program; 503 otherwise. Needs no token.

    Off loopback, a caller without the token gets the status only: the protected prefixes,
    interfaces and tables are shown with the token.
    """
    health = svc.health()
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
    )
    return JSONResponse(body.model_dump(), status_code=200 if health.ok else 503)


HIDDEN = (
    "send `Authorization: Bearer <token>` for the protected prefixes, interfaces and tables "
    "(hidden from callers without the token off loopback)"
)


def _has_token(request: Request) -> bool:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    expected: str = request.app.state.token
    return scheme.lower() == "bearer" and secrets.compare_digest(
        credentials.strip().encode(), expected.encode()
    )
