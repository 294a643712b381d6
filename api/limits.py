"""Bounded request bodies, and the token checked before any body is read.

A pure ASGI middleware, outside FastAPI's routing: FastAPI reads and parses a route's body
*before* it runs the route's dependencies, so the WriteAccess dependency alone would let an
anonymous client make the service read (and parse, on the event loop) a body of any size. Here:

- a write (any method but GET/HEAD/OPTIONS) under /v1/ without the right bearer token is
  answered 401/403 before one byte of its body is read;
- a body whose declared Content-Length is above its route's limit is answered 413 at once;
- a body without one (chunked) is counted as it streams and refused with 413 as soon as it
  passes the limit: `BodyTooLarge` is raised from `receive`, and api/errors.py renders it.

Limits, each a setting: `XDPFW_MAX_BODY_BYTES` for every route but bulk, `XDPFW_MAX_BULK_BYTES`
for a text/plain bulk body, `XDPFW_MAX_BULK_JSON_BYTES` for any other bulk body.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import MISSING_TOKEN, WRONG_TOKEN, Refusal, Tokens, authorize
from api.settings import Settings

__all__ = [
    "BULK_PATHS",
    "BULK_PREFIXES",
    "CLOSE",
    "MISSING_TOKEN",
    "WRONG_TOKEN",
    "BodyLimits",
    "BodyTooLarge",
]

BULK_PATHS: tuple[str, ...] = ("/v1/rules/bulk",)
BULK_PREFIXES: tuple[str, ...] = ("/v1/sources/",)  # issue 13: PUT /v1/sources/{name}
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
# On a refusal before the body is read: the server closes the connection after answering,
# instead of reading (and dropping) the rest of a body it will never use.
CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """A request body above its route's limit (413)."""

    def __init__(self, limit: int, setting: str, what: str, hint: str = "") -> None:
        self.limit = limit
        self.setting = setting
        self.hint = hint or f"raise the limit with {setting} (bytes) if this body is legitimate"
        super().__init__(
            413, f"request body larger than {limit} bytes, the limit for {what} ({setting})"
        )

    def body(self) -> dict[str, object]:
        return {
            "detail": self.detail,
            "error": "BodyTooLarge",
            "limit": self.limit,
            "setting": self.setting,
            "hint": self.hint,
        }


def _problem(
    code: int, why: Refusal | BodyTooLarge, path: str, headers: dict[str, str]
) -> Response:
    """The refusal as an RFC 9457 problem (api/errors.py renders every other error)."""
    from api.errors import problem_response

    if isinstance(why, BodyTooLarge):
        return problem_response(code, headers=headers, instance=path, **why.body())
    return problem_response(
        code, detail=why.detail, error=why.error, instance=path, headers=headers
    )


class BodyLimits:
    """The middleware (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        token: str | Tokens,
        bulk_paths: Sequence[str] = BULK_PATHS,
    ) -> None:
        self.app = app
        self.settings = settings
        self.tokens = token if isinstance(token, Tokens) else Tokens(token)
        self.bulk_paths = frozenset(bulk_paths)

    def limit_for(self, path: str, headers: Headers) -> BodyTooLarge:
        """The limit of a request, as the error that exceeding it raises."""
        s = self.settings
        if path.rstrip("/") in self.bulk_paths or path.startswith(BULK_PREFIXES):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "text/plain":
                return BodyTooLarge(s.max_bulk_bytes, "XDPFW_MAX_BULK_BYTES", "a text/plain bulk")
            return BodyTooLarge(
                s.max_bulk_json_bytes,
                "XDPFW_MAX_BULK_JSON_BYTES",
                "a JSON bulk",
                "send big lists as text/plain, one address or CIDR per line (limit "
                f"XDPFW_MAX_BULK_BYTES, {s.max_bulk_bytes} bytes), or raise "
                "XDPFW_MAX_BULK_JSON_BYTES",
            )
        return BodyTooLarge(s.max_body_bytes, "XDPFW_MAX_BODY_BYTES", "this route")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        if scope["method"] not in _READS and path.startswith("/v1/"):
            who = authorize(scope, headers.get("authorization"), self.tokens, write=True)
            if isinstance(who, Refusal):
                code = who.status
                extra = {"WWW-Authenticate": "Bearer"} if code == 401 else {}
                refusal = _problem(code, who, path, {**extra, **CLOSE})
                await refusal(scope, receive, send)
                return
        too_large = self.limit_for(path, headers)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > too_large.limit:
            await _problem(413, too_large, path, CLOSE)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > too_large.limit:
                    raise too_large
            return message

        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:  # raised where no exception handler saw it
            if started:
                raise
            await _problem(413, exc, path, CLOSE)(scope, receive, send)
