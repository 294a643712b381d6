"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import Refusal, Tokens, authorize
from api.errors import Problem
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


# Every error answer is an RFC 9457 problem (api/errors.py); the name stays for the routes.
ErrorOut = Problem


_ERR: dict[str, Any] = {"model": ErrorOut}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_ERR, "description": "no bearer token"},
    403: {**_ERR, "description": "wrong bearer token, or the read-only token on a change"},
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


def _check(request: Request, *, write: bool) -> None:
    # api/limits.py checks writes before their body is read; this checks reads, and writes
    # again for an app built without that middleware.
    tokens: Tokens = request.app.state.tokens
    who = authorize(request.scope, request.headers.get("authorization"), tokens, write=write)
    if isinstance(who, Refusal):
        unauthorized = who.status == status.HTTP_401_UNAUTHORIZED
        headers = {"WWW-Authenticate": "Bearer"} if unauthorized else None
        exc = HTTPException(who.status, who.detail, headers=headers)
        exc.error = who.error  # type: ignore[attr-defined]  # api/errors.py names the problem
        raise exc


def _write_access(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    _check(request, write=True)


def _read_access(request: Request, settings: SettingsDep) -> None:
    # Not declared as a security dependency: on a loopback-only listener reads are open (a
    # token sent anyway names the caller, and a wrong one is ignored), and create_app() adds
    # the bearer requirement to the read operations' OpenAPI otherwise.
    if settings.loopback_only:
        tokens: Tokens = request.app.state.tokens
        authorize(request.scope, request.headers.get("authorization"), tokens, write=False)
        return
    _check(request, write=False)


WriteAccess = Depends(_write_access)
ReadAccess = Depends(_read_access)
