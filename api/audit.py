"""One audit line per change: who, what, and how it ended.

An ASGI middleware around the app. Every request that may change something (any method but
GET/HEAD/OPTIONS, under /v1/) gives one line on the `xdpfw.audit` logger when its answer
starts, INFO for a 2xx and WARNING otherwise:

    change who=admin POST /v1/rules -> 201 ids=[12] count=1 source=api
    change who=uid:1001 DELETE /v1/rules/12 -> 204 ids=[12] count=1
    change who=read POST /v1/rules -> 403 error=ReadOnlyToken

`who` is the token's role (admin, read), the unix-socket peer (uid:N, api/localsock.py) or
anonymous; the rule ids, source and count come from the path, the query and the answer's
JSON (the first 64 KiB of it; the first ids of a bulk). With `--log-format json` the same
members are the line's JSON fields (api/logs.py).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import who_of

__all__ = ["MAX_IDS", "AuditLog"]

log = logging.getLogger("xdpfw.audit")

MAX_IDS = 20  # rule ids named in one line (a bulk's count says how many there were)
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_KEEP = 64 * 1024  # bytes of an answer read for its ids
_RULE_PATH = re.compile(r"^/v1/rules/(\d+)$")
_SOURCE_PATH = re.compile(r"^/v1/sources/([^/]+)")
_COUNTS = ("added", "removed", "unchanged", "count")


def _from_answer(body: bytes, out: dict[str, Any]) -> None:
    """ids / counts / source / error of a JSON answer (a cut one: the counts it shows)."""
    try:
        data = json.loads(body)
    except ValueError:
        head = body[:4096].decode(errors="replace")
        for key in (*_COUNTS, "error", "source"):
            m = re.search(rf'"{key}"\s*:\s*("?)([^",}}\]]*)\1', head)
            if m:
                out.setdefault(key, int(m[2]) if m[2].isdigit() else m[2])
        return
    if not isinstance(data, dict):
        return
    if isinstance(data.get("id"), int):
        out.setdefault("ids", [data["id"]])
    ids = data.get("ids")
    if isinstance(ids, list):
        out["ids"] = ids[:MAX_IDS]
        out.setdefault("count", len(ids))
    for key in _COUNTS:
        if isinstance(data.get(key), int):
            out.setdefault(key, data[key])
    for key in ("source", "error", "existing_id"):
        if isinstance(data.get(key), str | int):
            out.setdefault(key, data[key])


class AuditLog:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] in _READS or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 0
        kept = bytearray()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and len(kept) < _KEEP:
                kept.extend(message.get("body", b"")[: _KEEP - len(kept)])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            status = status or 500
            raise
        finally:
            self._line(scope, status, bytes(kept))

    def _line(self, scope: Scope, status: int, body: bytes) -> None:
        path: str = scope["path"]
        fields: dict[str, Any] = {
            "event": "change",
            "who": who_of(scope),
            "method": scope["method"],
            "path": path,
            "status": status,
        }
        m = _RULE_PATH.match(path)
        if m:
            fields["ids"] = [int(m[1])]
            fields["count"] = 1
        m = _SOURCE_PATH.match(path)
        if m:
            fields["source"] = m[1]
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        if query.get("source"):
            fields.setdefault("source", query["source"][0])
        if body:
            _from_answer(body, fields)
        if "ids" in fields and "count" not in fields:
            fields["count"] = len(fields["ids"])
        what = " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}"
            for k, v in fields.items()
            if k not in ("event", "who", "method", "path", "status")
        )
        level = logging.INFO if 200 <= status < 300 else logging.WARNING
        log.log(
            level,
            "change who=%s %s %s -> %d%s",
            fields["who"], scope["method"], path, status, f" {what}" if what else "",
            extra={"fields": fields},
        )  # fmt: skip
