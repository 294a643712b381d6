"""/healthz: is the program loaded and attached where it should be."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import ServiceDep
from api.models import HealthOut, TableUsage
from api.routes.interfaces import interface_states

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "an interface is not attached"}},
)
def healthz(svc: ServiceDep) -> JSONResponse:
    """200 when every wanted interface runs our program; 503 otherwise. Needs no token."""
    ifaces = interface_states(svc)
    ok = bool(ifaces) and all(i.attached for i in ifaces)
    body = HealthOut(
        status="ok" if ok else "degraded",
        prog_id=svc.dp.prog_id,
        adopted=svc.dp.adopted,
        rules=len(svc.dp.compiler) - len(svc.protected),
        protected=[p.src.with_prefixlen for p in svc.protected if p.src is not None],
        interfaces=ifaces,
        capacity={
            name: TableUsage(entries=used, capacity=cap)
            for name, (used, cap) in svc.dp.table_usage().items()
        },
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
