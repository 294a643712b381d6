"""/v1/interfaces: list, attach, detach."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    ERROR_RESPONSES,
    ErrorOut,
    ReadAccess,
    ServiceDep,
    WriteAccess,
)
from api.models import InterfaceIn, InterfaceOut

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/interfaces", tags=["interfaces"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES}
)


@router.get("", response_model=list[InterfaceOut], dependencies=[ReadAccess])
def list_interfaces(svc: ServiceDep) -> list[InterfaceOut]:
    # wanted (database) and attached interfaces, merged; no docstring: the OpenAPI has none
    return [InterfaceOut.of_state(i) for i in svc.interface_states()]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=InterfaceOut,
    dependencies=[WriteAccess],
    responses={
        404: {"model": ErrorOut, "description": "no such interface"},
        409: {"model": ErrorOut, "description": "another XDP program is attached there"},
        **BODY_RESPONSES,
    },
)
def attach(body: InterfaceIn, svc: ServiceDep) -> InterfaceOut:
    """Attach the program (auto: native where the driver can, else generic)."""
    return InterfaceOut.of(svc.attach(body.name, body.mode))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAccess],
    responses={404: {"model": ErrorOut, "description": "not attached"}},
)
def detach(name: str, svc: ServiceDep) -> Response:
    svc.detach(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
