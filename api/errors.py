"""Domain errors -> HTTP status codes, in one table, registered once on the app.

Routes raise xdpfw.errors exceptions and never build HTTPExceptions for them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from api.limits import CLOSE, BodyTooLarge
from xdpfw import errors as e

__all__ = ["MAX_ECHO", "MAX_ERRORS", "STATUS", "install_error_handlers", "safe_echo"]

log = logging.getLogger("xdpfw.api")

# Most specific class first; the first isinstance match wins.
STATUS: list[tuple[type[e.XdpfwError], int]] = [
    (e.InvalidRule, 422),
    (e.RuleNotFound, 404),
    (e.SourceNotFound, 404),
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
    return JSONResponse(_encodable(_body(exc)), status_code=code)


def _encodable(value: object) -> object:
    """Lone surrogates (valid in a JSON string, not encodable as UTF-8) spelled as escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    return value


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


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return JSONResponse(exc.body(), status_code=413, headers=CLOSE)


MAX_ERRORS = 100  # validation errors named in one 422
MAX_ECHO = 200  # characters of any one echoed value (input, key, message)
_MAX_ITEMS = 10  # elements of an echoed list or object


def safe_echo(value: object, depth: int = 0) -> object:
    """A JSON-able copy of an echoed value that is small and encodable: strings cut to
    MAX_ECHO characters with lone surrogates (which UTF-8 cannot encode) spelled as escapes,
    lists and objects cut to a few items, nesting cut at 4."""
    if isinstance(value, str):
        text = value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "..."
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth >= 4:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(safe_echo(str(k))): safe_echo(v, depth + 1) for k, v in items[:_MAX_ITEMS]}
        if len(items) > _MAX_ITEMS:
            out["..."] = f"{len(items) - _MAX_ITEMS} more"
        return out
    if isinstance(value, list | tuple):
        cut = [safe_echo(v, depth + 1) for v in value[:_MAX_ITEMS]]
        return [*cut, "..."] if len(value) > _MAX_ITEMS else cut
    return safe_echo(repr(value), depth)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, bounded: the first MAX_ERRORS errors, each echo cut (see safe_echo),
    and a last entry with the total when there were more."""
    assert isinstance(exc, RequestValidationError)
    found = exc.errors()
    detail: list[object] = []
    for err in found[:MAX_ERRORS]:
        try:
            plain = jsonable_encoder(err)
        except (ValueError, TypeError, RecursionError):
            plain = {k: repr(v) for k, v in err.items()}
        detail.append(safe_echo(plain, -2))  # the error itself and its loc are not cut
    if len(found) > MAX_ERRORS:
        detail.append(
            {
                "loc": ["body"],
                "msg": f"{len(found)} errors in all; the first {MAX_ERRORS} are listed",
                "type": "too_many_errors",
            }
        )
    return JSONResponse({"detail": detail}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.XdpfwError, _handle)
    app.add_exception_handler(StarletteHTTPException, _method_not_allowed)
    app.add_exception_handler(BodyTooLarge, _too_large)
    app.add_exception_handler(RequestValidationError, _invalid)
