"""Domain errors -> HTTP status codes, in one table, registered once on the app; and every
error answer (4xx/5xx) in one shape: an RFC 9457 problem (`application/problem+json`).

Routes raise xdpfw.errors exceptions and never build HTTPExceptions for them. A problem has
`type`, `title`, `status`, `detail` (a sentence for a person), `instance` (the path), and the
members that apply: `error` (the error's name, stable for programs), `errors[]` (422: each
invalid field), `existing_id` (409), `limit` and `setting` (413, 507), `errno` and `hint`.
docs/errors.md lists every type.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from api.limits import CLOSE, BodyTooLarge
from xdpfw import errors as e

__all__ = [
    "MAX_ECHO",
    "MAX_ERRORS",
    "PROBLEM_JSON",
    "PROBLEM_TYPE",
    "STATUS",
    "FieldError",
    "Problem",
    "install_error_handlers",
    "problem_body",
    "problem_response",
    "safe_echo",
]

log = logging.getLogger("xdpfw.api")

PROBLEM_JSON = "application/problem+json"
# The `type` of a problem named by its `error`: urn:xdpfw:problem:rule-conflict. Plain HTTP
# errors (an unknown path, a method the path does not have) are `about:blank`, as RFC 9457 says.
PROBLEM_TYPE = "urn:xdpfw:problem:"


class FieldError(BaseModel):
    """One invalid field of a 422 (FastAPI's validation error entry)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description="where: body, query or path, then the field")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem: the body of every 4xx and 5xx answer (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        default="about:blank",
        description="urn:xdpfw:problem:<error> (docs/errors.md), or about:blank for plain HTTP",
    )
    title: str = Field(description="a short summary, the same for every problem of this type")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what happened and what to do, for a person")
    instance: str | None = Field(default=None, description="the request path")
    error: str | None = Field(default=None, description="the error's name, for programs")
    errors: list[FieldError] | None = Field(default=None, description="422: each invalid field")
    existing_id: int | None = Field(default=None, description="409: the rule already there")
    limit: int | None = Field(default=None, description="413/507: the limit that was reached")
    setting: str | None = Field(default=None, description="the setting that raises `limit`")
    errno: int | None = Field(default=None, description="kernel errno, for kernel failures")
    hint: str | None = None


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def problem_body(status: int, *, detail: str | None = None, error: str | None = None,
                 **extra: object) -> dict[str, object]:
    """The JSON of a problem; `error` (a name like RuleConflict) gives its type and title."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if error:
        ptype, title = PROBLEM_TYPE + _kebab(error), _kebab(error).replace("-", " ").capitalize()
    else:
        ptype, title = "about:blank", phrase
    body: dict[str, object] = {"type": ptype, "title": title, "status": status,
                               "detail": detail or phrase}
    if error:
        body["error"] = error
    body.update({k: v for k, v in extra.items() if v is not None})
    return body  # fmt: skip


def problem_response(status: int, *, headers: dict[str, str] | None = None,
                     **fields: Any) -> JSONResponse:
    """A problem as an answer (`application/problem+json`)."""
    body = _encodable(problem_body(status, **fields))
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


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
    """The extension members of a domain error's problem (beyond type/title/status/detail)."""
    if isinstance(exc, e.InvalidRule):
        # The same entries FastAPI's own validation errors have.
        return {
            "errors": [
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


async def _handle(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.XdpfwError)
    code = status_of(exc)
    if code >= 500:
        log.error("%s %s -> %d: %s", request.method, request.url.path, code, exc)
    body: dict[str, Any] = _body(exc)
    body.pop("error", None)
    detail = body.pop("detail", None)
    if isinstance(exc, e.InvalidRule):
        detail = validation_summary(list(body["errors"]))
    return problem_response(
        code, detail=str(detail), error=type(exc).__name__, instance=request.url.path, **body
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as a problem (never a bare text 500)."""
    # Starlette re-raises it after this answer: uvicorn logs the traceback.
    log.error("%s %s -> 500: unexpected %s: %s", request.method, request.url.path,
              type(exc).__name__, exc)  # fmt: skip
    return problem_response(
        500,
        detail=f"unexpected {type(exc).__name__} in the service; its log has the traceback "
        "(nothing reports it as done: check with a GET before retrying a change)",
        error="InternalError",
        instance=request.url.path,
    )


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


_HTTP_ERRORS = {401: "MissingToken", 403: "Forbidden", 413: "BodyTooLarge"}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's and FastAPI's HTTP errors (an unknown path, 401/403 from the token check)
    as problems; 405 with an Allow header naming every method the path has (Starlette names
    one route's)."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    code = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else None
    error = getattr(exc, "error", None) or _HTTP_ERRORS.get(code)
    if code == 405:
        headers["Allow"] = ", ".join(sorted(_allowed(request)))
        detail = (
            f"{request.method} is not a method of {request.url.path}; it has "
            f"{headers['Allow'] or 'none'}"
        )
    elif code == 404 and detail == "Not Found":
        detail = f"no such path: {request.url.path} (the API is described at /docs)"
    if code == 405 or code == 404:
        error = None  # plain HTTP: about:blank
    return problem_response(
        code, detail=detail, error=error, instance=request.url.path, headers=headers or None
    )


def _allowed(request: Request) -> set[str]:
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
    return allowed


async def _too_large(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyTooLarge)
    return problem_response(413, headers=CLOSE, instance=request.url.path, **exc.body())


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
    return problem_response(
        422,
        detail=validation_summary(detail),
        error="ValidationError",
        errors=detail,
        instance=request.url.path,
    )


def validation_summary(found: list[object]) -> str:
    """'invalid request: src: not an address; dport: ...' from FastAPI's error entries."""
    parts: list[str] = []
    for item in found[:5]:
        if isinstance(item, dict):
            loc = [str(p) for p in item.get("loc") or []]
            if len(loc) > 1 and loc[0] in ("body", "query", "path"):
                loc = loc[1:]
            parts.append(f"{'.'.join(loc) or 'request'}: {item.get('msg', '')}")
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.XdpfwError, _handle)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(BodyTooLarge, _too_large)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
