"""/v1/rules: add, list, show, delete, bulk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Request, Response, status
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
from api.models import MAX_TTL, BulkOut, RemovedOut, RuleIn, RuleOut, RulePage, bulk_rules
from api.service import BulkResult, FirewallService, NewCodes, NewRule
from xdpfw.errors import InvalidRule
from xdpfw.importers import ListReader
from xdpfw.rules import MAX_RULE_ID
from xdpfw.sources import DEFAULT_SOURCE, SOURCE_PATTERN

__all__ = ["SourceQuery", "read_list", "router", "rule_page"]

T = TypeVar("T")

router = APIRouter(
    prefix="/v1/rules",
    tags=["rules"],
    responses={**AUTH_RESPONSES, **ERROR_RESPONSES},
)
RuleId = Annotated[int, Path(ge=1, le=MAX_RULE_ID, description="rule id")]
SourceQuery = Annotated[
    str | None, Query(pattern=SOURCE_PATTERN, description="a source name (xdpfw/sources.py)")
]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "no rule with that id"}
}
# What adding rules can answer besides success, for the single and the bulk route.
_ADD_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "overlaps a protected prefix (send force)"},
    507: {"model": ErrorOut, "description": "a table is full"},
    **BODY_RESPONSES,
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=RuleOut,
    dependencies=[WriteAccess],
    responses={
        200: {"model": RuleOut, "description": "an identical rule already existed; returned as is"},
        **_ADD_ERRORS,
    },
)
def add_rule(body: RuleIn, svc: ServiceDep, response: Response) -> RuleOut:
    """Add a rule. It is in the kernel maps when this returns.

    Adding a rule identical in match, action and mode to an existing one creates nothing and
    answers **200** with the existing rule (so automation can repeat a call safely); the
    rule's `source` then holds it too, and a `ttl_seconds` sets that holding's new expiry
    (a ban extended).
    """
    if body.scoped():  # issue 19: a scope means something only in a fleet
        raise InvalidRule("nodes", "this node runs alone (no --etcd): a rule scoped to "
                          "nodes or labels needs fleet mode (docs/fleet.md); leave out "
                          "nodes/selector to add it here")
    stored, created = svc.add(
        NewRule(body.spec(), body.comment, body.ttl_seconds, body.force, body.source,
                sample=body.sample.every if body.sample else None)
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return RuleOut.of(stored, sample=svc.sample_of(stored.id))


@router.get("", response_model=RulePage, dependencies=[ReadAccess])
def list_rules(
    svc: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,10}$")] = None,
    source: SourceQuery = None,
) -> RulePage:
    """Rules in id order, `limit` at a time; follow `next_cursor` for the rest. `source`:
    only the rules that source holds (as it holds them)."""
    return rule_page(svc, limit, cursor, source)


def rule_page(svc: FirewallService, limit: int, cursor: str | None, source: str | None
              ) -> RulePage:
    after = int(cursor) if cursor else 0
    page = svc.page(after, limit + 1, source)
    more = len(page) > limit
    page = page[:limit]
    sampled = svc.sample_rules()  # X-ray
    return RulePage(
        rules=[RuleOut.of(s, sample=sampled.get(s.id)) for s in page],
        next_cursor=str(page[-1].id) if more and page else None,
    )


@router.delete("", response_model=RemovedOut, dependencies=[WriteAccess])
def delete_where(
    svc: ServiceDep,
    src: Annotated[str | None, Query(max_length=64, description="CIDR or address")] = None,
    dst: Annotated[str | None, Query(max_length=64, description="CIDR or address")] = None,
    source: SourceQuery = None,
) -> RemovedOut:
    """Delete by value: the rules whose `src` (and/or `dst`) is exactly this network (any
    action, mode, proto, port; a covering prefix is not touched), of `source` only when named
    (another source's holding stays, and so does its rule). Answers how many holdings went
    (0: none matched)."""
    return RemovedOut(removed=svc.remove_where(src, dst, source))


@router.get(
    "/{rule_id:int}", response_model=RuleOut, dependencies=[ReadAccess], responses=_NOT_FOUND
)
def get_rule(rule_id: RuleId, svc: ServiceDep) -> RuleOut:
    """One rule with its counters."""
    stored = svc.get(rule_id)
    counters = svc.counters([rule_id]).get(rule_id)
    limited = svc.limit_counters([rule_id]).get(rule_id) if stored.rule.limit else None
    return RuleOut.of(stored, counters, with_counters=True, sample=svc.sample_of(rule_id),
                      limit_counters=limited)


@router.delete(
    "/{rule_id:int}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAccess],
    responses=_NOT_FOUND,
)
def delete_rule(rule_id: RuleId, svc: ServiceDep) -> Response:
    svc.remove([rule_id])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_BULK_EXAMPLE = "# blocklist\n198.18.7.0/24\n198.18.9.1\n2001:db8:bad::/48\n"


@router.post(
    "/bulk",
    status_code=status.HTTP_201_CREATED,
    response_model=BulkOut,
    dependencies=[WriteAccess],
    responses=_ADD_ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": "#/components/schemas/RuleIn"},
                    }
                },
                "text/plain": {"schema": {"type": "string"}, "example": _BULK_EXAMPLE},
            },
            "required": True,
        }
    },
)
async def bulk_add(
    request: Request,
    svc: ServiceDep,
    action: Literal["drop", "allow"] = "drop",
    mode: Literal["enforce", "monitor"] = "enforce",
    comment: Annotated[str, Query(max_length=256)] = "",
    ttl_seconds: Annotated[int | None, Query(ge=1, le=MAX_TTL)] = None,
    force: bool = False,
    source: SourceQuery = None,
) -> Response:
    """Many rules in one call, all or nothing.

    Either a JSON array of rule bodies, or `text/plain` with one address/CIDR per line
    (`#` and `;` comments and blank lines ignored, so FireHOL and Spamhaus DROP files load as
    they are; `action`, `mode`, `comment`, `ttl_seconds` from the
    query). One bad line or element -> 422 naming every bad line, and nothing changes.
    Rules identical to existing ones are skipped and reported in `duplicate_ids`.

    Bodies are limited (413 beyond): text/plain by `XDPFW_MAX_BULK_BYTES`, JSON by
    `XDPFW_MAX_BULK_JSON_BYTES` (JSON costs far more to parse: send big lists as text).

    `source`: a source load: the rules are held by that source (added to what it holds; PUT
    /v1/sources/{name} replaces), and entries overlapping a protected prefix are loaded
    anyway and reported in `overlaps` instead of refusing the body (409).
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # The change and its answer (a million ids, for a big list) are made in a worker thread
    # and leave it as bytes: the event loop never builds, validates or frees them.
    body: bytes
    if ctype == "text/plain":
        codes = await read_list(request, action, mode)
        batch = NewCodes(codes, comment, ttl_seconds, force, source or DEFAULT_SOURCE,
                         overlaps_ok=source is not None)
        del codes
        body = await run_in_threadpool(_answered, svc.bulk_add_codes, batch)
    else:
        raw = bytearray()
        async for chunk in request.stream():  # api/limits.py bounds it
            raw += chunk
        items = await run_in_threadpool(bulk_rules, bytes(raw), force or source is not None,
                                        source)
        del raw
        body = await run_in_threadpool(_answered, svc.bulk_add, items)
    return Response(body, status_code=status.HTTP_201_CREATED, media_type="application/json")


def _answered(add: Callable[[T], BulkResult], what: T) -> bytes:
    result = add(what)
    head = BulkOut(
        added=len(result.added),
        duplicates=len(result.duplicates),
        ids=[],
        duplicate_ids=[],
        overlaps=result.overlaps,
        overlap_count=result.overlap_count,
    ).model_dump_json().encode()
    # The id lists (a million ints for a big list) are written a piece at a time: built in
    # one call (validated, then dumped) they held the GIL ~0.1 s, and /healthz waited.
    body = head.replace(b'"ids":[]', b'"ids":[' + _int_list(result.ids) + b"]", 1).replace(
        b'"duplicate_ids":[]', b'"duplicate_ids":[' + _int_list(result.duplicates) + b"]", 1
    )
    result.release()  # a million rules freed in pieces: the event loop keeps its turns
    return body


def _int_list(values: list[int]) -> bytes:
    """`1,2,3`: the JSON of a list of ints without its brackets, a piece at a time."""
    step = 1 << 16
    return b",".join(
        ",".join(map(str, values[i : i + step])).encode() for i in range(0, len(values), step)
    )


_PIECE = 1 << 20  # bytes of body parsed per trip to a worker thread


async def read_list(request: Request, action: str, mode: str) -> list[int]:
    """A text/plain bulk body -> codes, parsed as it streams in, off the event loop: memory
    is the codes plus about one piece, and other clients are answered meanwhile."""
    reader = ListReader(action, mode)
    piece = bytearray()
    async for chunk in request.stream():
        piece += chunk
        if len(piece) >= _PIECE:
            data = bytes(piece)
            piece.clear()
            await run_in_threadpool(reader.feed, data)
    data = bytes(piece)
    del piece
    await run_in_threadpool(reader.feed, data, final=True)
    return await run_in_threadpool(reader.finish)
