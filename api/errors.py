"""Domain errors -> HTTP status codes, in one table, registered once on the app.

Routes raise xdpfw.errors exceptions and never build HTTPExceptions for them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from xdpfw import errors as e

__all__ = ["STATUS", "install_error_handlers"]

log = logging.getLogger("xdpfw.api")

# Most specific class first; the first isinstance match wins.
STATUS: list[tuple[type[e.XdpfwError], int]] = [
    (e.InvalidRule, 422),
    (e.RuleNotFound, 404),
    (e.InterfaceNotFound, 404),
    (e.RuleConflict, 409),
    (e.ForeignProgram, 409),
    (e.CapacityExceeded, 507),
    (e.StorageFull, 507),
    (e.DatabaseCorrupt, 503),
    (e.StorageError, 503),
    (e.KernelError, 500),
    (e.DatapathError, 503),
    (e.XdpfwError, 500),
]


def status_of(exc: e.XdpfwError) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def _body(exc: e.XdpfwError) -> dict[str, object]:
    if isinstance(exc, e.InvalidRule):
        # The same shape FastAPI uses for its own validation errors.
        return {
            "detail": [
                {
                    "loc": ["body"] if exc.field == "body" else ["body", exc.field],
                    "msg": exc.problem,
                    "type": "value_error",
                }
            ]
        }
    body: dict[str, object] = {"detail": str(exc), "error": type(exc).__name__}
    if isinstance(exc, e.KernelError):
        body["errno"] = exc.errno
        body["hint"] = (
            "the kernel refused a map or netlink update; check `dmesg`, the service log and "
            "`xdpfw status`; retrying is safe (nothing was half applied)"
        )
    if isinstance(exc, e.CapacityExceeded):
        body["limit"] = exc.limit
    if isinstance(exc, e.RuleConflict) and exc.existing_id is not None:
        body["existing_id"] = exc.existing_id
    return body


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.XdpfwError)
    code = status_of(exc)
    if code >= 500:
        log.error("%s %s -> %d: %s", request.method, request.url.path, code, exc)
    return JSONResponse(_body(exc), status_code=code)


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    """405 with an Allow header naming every method the path has (Starlette names one route's)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code != 405:
        return await http_exception_handler(request, exc)
    allowed: set[str] = set()
    for route in request.app.routes:
        # API routes only (not /docs or /openapi.json); FastAPI >= 0.16x nests each included
        # router's routes in one route object, so ask each route about each method.
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            continue
        for method in _METHODS:
            match, _ = route.matches({**request.scope, "method": method})
            if match is Match.FULL:
                allowed.add(method)
    return JSONResponse(
        {"detail": "Method Not Allowed"},
        status_code=405,
        headers={"Allow": ", ".join(sorted(allowed))},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.XdpfwError, _handle)
    app.add_exception_handler(StarletteHTTPException, _method_not_allowed)
