"""/v1/sources: named rule sources, replaced as a whole (xdpfw/sources.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    ERROR_RESPONSES,
    ErrorOut,
    ReadAccess,
    ServiceDep,
    WriteAccess,
)
from api.models import (
    MAX_TTL,
    RemovedOut,
    SourceChangeOut,
    SourceDetailOut,
    SourceOut,
    bulk_rules,
)
from api.routes.rules import read_list, rule_page
from api.service import NewCodes, NewRule, SourceChange
from xdpfw.errors import InvalidRule
from xdpfw.sources import SOURCE_PATTERN

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/sources",
    tags=["sources"],
    responses={**AUTH_RESPONSES, **ERROR_RESPONSES},
)
SourceName = Annotated[
    str, Path(pattern=SOURCE_PATTERN, description="the source's name, e.g. firehol_level1")
]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "no source with that name"}
}
_LIST_EXAMPLE = "# firehol_level1\n198.18.7.0/24\n198.18.9.1\n2001:db8:bad::/48\n"


@router.get("", response_model=list[SourceOut], dependencies=[ReadAccess])
def list_sources(svc: ServiceDep) -> list[SourceOut]:
    """Every source: its rule count, packets/bytes/last hit summed over its rules (a rule two
    sources hold counts in both), and its last change."""
    return [SourceOut.of(s) for s in svc.sources()]


@router.get(
    "/{name}", response_model=SourceDetailOut, dependencies=[ReadAccess], responses=_NOT_FOUND
)
def get_source(
    name: SourceName,
    svc: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,10}$")] = None,
) -> SourceDetailOut:
    """A source's summary and a page of its rules (as it holds them; follow
    `page.next_cursor`)."""
    summary = SourceOut.of(svc.source(name))
    return SourceDetailOut(**summary.model_dump(), page=rule_page(svc, limit, cursor, name))


@router.put(
    "/{name}",
    response_model=SourceChangeOut,
    dependencies=[WriteAccess],
    responses={
        507: {"model": ErrorOut, "description": "a table or the disk is full: nothing changed"},
        **BODY_RESPONSES,
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "text/plain": {"schema": {"type": "string"}, "example": _LIST_EXAMPLE},
                "application/json": {
                    "schema": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": "#/components/schemas/RuleIn"},
                    }
                },
            },
            "required": True,
        }
    },
)
async def replace_source(
    name: SourceName,
    request: Request,
    svc: ServiceDep,
    action: Literal["drop", "allow"] = "drop",
    mode: Literal["enforce", "monitor"] = "enforce",
    comment: Annotated[str, Query(max_length=256)] = "",
    ttl_seconds: Annotated[int | None, Query(ge=1, le=MAX_TTL)] = None,
    nodes: Annotated[str | None, Query(description="fleet mode only (422 here)")] = None,
    selector: Annotated[str | None, Query(description="fleet mode only (422 here)")] = None,
) -> SourceChangeOut:
    """Replace the whole membership of a source, as one change.

    `text/plain`: the bulk formats (plain, FireHOL netset/ipset, Spamhaus DROP/EDROP, JSON
    lines), with `action`, `mode`, `comment`, `ttl_seconds` from the query; or a JSON array
    of rule bodies (each its own). Members absent from the new body are removed, new ones
    added, unchanged ones keep their rule id, counters and last hit (and get this call's
    comment and expiry). An address listed before and after is never passed during the
    replace; one only in the new list is dropped when this returns. Any bad line -> 422
    naming every bad line, and nothing changes; a full table or disk -> 507, nothing changes.
    Entries overlapping a protected prefix are loaded anyway (protection wins in the data
    plane) and listed in `overlaps`. A rule another source also holds stays in the kernel.
    """
    if nodes is not None or selector is not None:  # issue 19: a scope needs a fleet
        raise InvalidRule("nodes", "this node runs alone (no --etcd): a source scoped to "
                          "nodes or labels needs fleet mode (docs/fleet.md)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    batch: NewCodes | list[NewRule]
    if ctype == "text/plain":
        codes = await read_list(request, action, mode)
        batch = NewCodes(codes, comment, ttl_seconds, True, name, overlaps_ok=True)
        del codes
    elif ctype in ("application/json", ""):
        raw = bytearray()
        async for chunk in request.stream():  # api/limits.py bounds it
            raw += chunk
        batch = await run_in_threadpool(bulk_rules, bytes(raw), True, name)
        del raw
    else:
        raise InvalidRule(
            "body", f"content type {ctype!r}: send text/plain (a list) or application/json "
            "(an array of rule bodies)"
        )
    change: SourceChange = await run_in_threadpool(svc.replace_source, name, batch)
    return SourceChangeOut(
        source=change.source,
        added=change.added,
        removed=change.removed,
        unchanged=change.unchanged,
        overlaps=change.overlaps,
        overlap_count=change.overlap_count,
    )


@router.delete(
    "/{name}", response_model=RemovedOut, dependencies=[WriteAccess], responses=_NOT_FOUND
)
def delete_source(name: SourceName, svc: ServiceDep) -> RemovedOut:
    """Delete a source: its holdings go; a rule another source holds stays in the kernel."""
    return RemovedOut(removed=svc.drop_source(name))
