"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.service import FirewallService
from api.settings import Settings

__all__ = ["ReadAccess", "ServiceDep", "SettingsDep", "WriteAccess"]

_bearer = HTTPBearer(auto_error=False, description="the token in <state-dir>/token")


def _service(request: Request) -> FirewallService:
    svc: FirewallService = request.app.state.service
    return svc


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[FirewallService, Depends(_service)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def _check_token(request: Request, creds: HTTPAuthorizationCredentials | None) -> None:
    expected: str = request.app.state.token
    if creds is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer <token>` (the token is in "
            "<state-dir>/token, or XDPFW_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(creds.credentials.encode(), expected.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong token")


def _write_access(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    _check_token(request, creds)


def _read_access(
    request: Request,
    settings: SettingsDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if not settings.loopback_only:
        _check_token(request, creds)


WriteAccess = Depends(_write_access)
ReadAccess = Depends(_read_access)
