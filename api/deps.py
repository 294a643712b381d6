"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from api.limits import bearer_problem
from api.service import FirewallService
from api.settings import Settings

__all__ = [
    "AUTH_RESPONSES",
    "BODY_RESPONSES",
    "ERROR_RESPONSES",
    "ErrorOut",
    "ReadAccess",
    "ServiceDep",
    "SettingsDep",
    "WriteAccess",
]

_bearer = HTTPBearer(auto_error=False, description="the token in <state-dir>/token")


def _service(request: Request) -> FirewallService:
    svc: FirewallService = request.app.state.service
    return svc


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


class ErrorOut(BaseModel):
    """Body of every non-validation error."""

    detail: str
    error: str | None = None
    errno: int | None = Field(default=None, description="kernel errno, for kernel failures")
    hint: str | None = None
    limit: int | None = Field(default=None, description="the capacity that was reached")
    existing_id: int | None = None
    setting: str | None = Field(default=None, description="the setting that raises `limit`")


_ERR: dict[str, Any] = {"model": ErrorOut}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_ERR, "description": "no bearer token"},
    403: {**_ERR, "description": "wrong bearer token"},
}
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERR, "description": "the body is not valid JSON"},
    413: {**_ERR, "description": "the body is above its limit (`limit` bytes; see `setting`)"},
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    500: {**_ERR, "description": "a kernel (bpf/netlink) call failed; `errno` says which"},
    503: {**_ERR, "description": "the datapath is not usable"},
}

ServiceDep = Annotated[FirewallService, Depends(_service)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def _check_token(request: Request, creds: HTTPAuthorizationCredentials | None) -> None:
    # api/limits.py checks writes before their body is read; this checks reads, and writes
    # again for an app built without that middleware.
    expected: str = request.app.state.token
    header = f"Bearer {creds.credentials}" if creds is not None else None
    problem = bearer_problem(header, expected)
    if problem is not None:
        code, why = problem
        headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else None
        raise HTTPException(code, why, headers=headers)


def _write_access(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    _check_token(request, creds)


def _read_access(request: Request, settings: SettingsDep) -> None:
    # Not declared as a security dependency: on a loopback-only listener reads are open, and
    # create_app() adds the bearer requirement to the read operations' OpenAPI otherwise.
    if settings.loopback_only:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    creds = None
    if scheme.lower() == "bearer" and credentials:
        creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=credentials)
    _check_token(request, creds)


WriteAccess = Depends(_write_access)
ReadAccess = Depends(_read_access)
