"""Fleet mode (`xdpfw serve --etcd ...`, docs/fleet.md): /v1/fleet, and the rule and source
writes routed to etcd instead of this node's service.

`install(app, agent)` mounts these routes BEFORE the single-node ones, so in fleet mode
`POST /v1/rules`, `DELETE /v1/rules/{id}`, `PUT/DELETE /v1/sources/{name}` are these; the
reads stay the single-node ones (this node's cache), with `X-Xdpfw-Fleet-Revision` and,
while the store is unreachable, `X-Xdpfw-Stale`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep, WriteAccess
from api.fleet.agent import FleetAgent
from api.fleet.etcd import EtcdError, EtcdUnavailable
from api.fleet.state import Conflict
from api.models import MAX_TTL, RuleIn, RuleOut, bulk_rules
from api.routes.rules import RuleId, read_list
from xdpfw.errors import InvalidRule, RuleNotFound
from xdpfw.sources import SOURCE_PATTERN, check_source

__all__ = ["FleetSourceOut", "FleetWriteOut", "NodeOut", "install", "router", "writes"]

router = APIRouter(prefix="/v1/fleet", tags=["fleet"],
                   responses={**AUTH_RESPONSES, **ERROR_RESPONSES})
writes = APIRouter(tags=["fleet"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES})
Wait = Annotated[
    Literal["committed", "applied"] | None,
    Query(description="`applied`: answer when this node enforces the change too"),
]
SourceName = Annotated[str, Path(pattern=SOURCE_PATTERN)]
APPLY_TIMEOUT = 10.0  # s ?wait=applied waits for this node before answering 504


class NodeOut(BaseModel):
    name: str
    labels: dict[str, str]
    applied_revision: int
    lag: int
    last_heartbeat: float
    heartbeat_age: float
    healthy: bool
    resyncs: int


class FleetStatusOut(BaseModel):
    node: str
    endpoints: list[str]
    prefix: str
    store_reachable: bool
    unreachable_since: float | None
    applied_revision: int
    head_revision: int
    lag: int
    resyncs: int
    managed_sources: list[str]
    failed_sources: dict[str, str]  # sources this node could not apply (retried), and why
    last_error: str | None


class FleetWriteOut(BaseModel):
    """A write committed to the fleet store (etcd)."""

    revision: int
    applied: bool  # this node enforces it already (always with ?wait=applied)
    source: str
    detail: str
    removed: int | None = None


class FleetSourceOut(FleetWriteOut):
    """A source replace committed: the diff against the version it replaced, in etcd (each
    node logs its own overlaps with its protected prefixes)."""

    added: int
    unchanged: int
    overlaps: list[str] = []
    overlap_count: int = 0


def _agent(request: Request) -> FleetAgent:
    agent: FleetAgent = request.app.state.fleet
    return agent


def _answer(agent: FleetAgent, revision: int, wait: str | None, source: str,
            detail: str, status: int, removed: int | None = None,
            diff: tuple[int, int, int] | None = None) -> JSONResponse:
    applied = agent.applied >= revision
    if wait == "applied" and not applied:
        applied = agent.wait_applied(revision, APPLY_TIMEOUT)
        if not applied:
            return JSONResponse(
                {"detail": f"committed to the fleet store at revision {revision}, but this "
                 f"node has not applied it within {APPLY_TIMEOUT:.0f} s (applied revision "
                 f"{agent.applied}); see GET /v1/fleet", "error": "not_applied"},
                status_code=504,
            )
    body: FleetWriteOut
    if diff is not None:
        body = FleetSourceOut(revision=revision, applied=applied, source=source, detail=detail,
                              added=diff[0], removed=diff[1], unchanged=diff[2])
    else:
        body = FleetWriteOut(revision=revision, applied=applied, source=source, detail=detail,
                             removed=removed)
    return JSONResponse(body.model_dump(), status_code=status)


# -- /v1/fleet ------------------------------------------------------------------------------


@router.get("", response_model=FleetStatusOut, dependencies=[ReadAccess])
def fleet_status(request: Request) -> FleetStatusOut:
    """This node's view of the fleet: store reachable, applied revision, lag."""
    a = _agent(request)
    c = a.config
    return FleetStatusOut(
        node=c.node, endpoints=list(c.endpoints), prefix=c.prefix,
        store_reachable=a.reachable, unreachable_since=a.down_since,
        applied_revision=a.applied, head_revision=a.head, lag=a.lag, resyncs=a.resyncs,
        managed_sources=sorted(a.managed), failed_sources=dict(a.failed),
        last_error=a.last_error,
    )


@router.get("/nodes", response_model=list[NodeOut], dependencies=[ReadAccess])
def fleet_nodes(request: Request) -> list[NodeOut]:
    """Every node in the registry (a node leaves it when its lease expires, ~10 s after its
    last heartbeat): labels, applied revision, lag behind the store, last heartbeat."""
    now = time.time()
    return [
        NodeOut(name=n.name, labels=n.labels, applied_revision=n.applied_revision, lag=n.lag,
                last_heartbeat=n.last_heartbeat, heartbeat_age=round(now - n.last_heartbeat, 3),
                healthy=n.healthy, resyncs=n.resyncs)
        for n in _agent(request).nodes()
    ]


# -- writes, routed to etcd -------------------------------------------------------------------


@writes.post("/v1/rules", response_model=FleetWriteOut, status_code=202,
             dependencies=[WriteAccess])
def fleet_add_rule(body: RuleIn, request: Request, wait: Wait = None) -> JSONResponse:
    """Fleet mode: the rule goes to the fleet store, held by its `source`; every node
    applies it. 202 when committed; `?wait=applied`: 201 when this node enforces it."""
    agent = _agent(request)
    source = check_source(body.source)
    code = body.spec().code()
    rev = agent.writer.add_rule(source, code, body.comment, body.ttl_seconds)
    answer = _answer(agent, rev, wait, source, "committed to the fleet store",
                     201 if wait == "applied" else 202)
    if wait == "applied" and answer.status_code == 201:
        stored = agent.rule_of(source, code)  # the single-host answer: the rule as enforced
        if stored is not None:
            return JSONResponse(jsonable_encoder(RuleOut.of(stored)), status_code=201)
    return answer


@writes.delete("/v1/rules/{rule_id:int}", status_code=204, dependencies=[WriteAccess])
def fleet_delete_rule(rule_id: RuleId, request: Request, svc: ServiceDep,
                      wait: Wait = None) -> Response:
    """Fleet mode: the rule's keys leave the fleet store (every node removes it): 204 as on
    one host, with the revision in `X-Xdpfw-Fleet-Committed`; `?wait=applied`: once this
    node no longer enforces it. A rule that is part of a source's list is removed by
    replacing or deleting that source (422)."""
    agent = _agent(request)
    stored = svc.get(rule_id)  # RuleNotFound -> 404
    code = stored.rule.code()
    removed, rev = agent.writer.remove_rules([(s, code) for s in stored.sources])
    if not removed:
        raise InvalidRule(
            "rule_id", f"rule {rule_id} comes from the list of source(s) "
            f"{', '.join(stored.sources)}: replace that source (PUT /v1/sources/NAME) or "
            "delete it"
        )
    answer = _answer(agent, rev, wait, stored.source, "removed from the fleet store", 200,
                     removed)
    if answer.status_code != 200:
        return answer
    return Response(status_code=204, headers={"X-Xdpfw-Fleet-Committed": str(rev)})


@writes.put("/v1/sources/{name}", response_model=FleetSourceOut, dependencies=[WriteAccess])
async def fleet_replace_source(
    name: SourceName, request: Request, wait: Wait = None,
    action: Literal["drop", "allow"] = "drop",
    mode: Literal["enforce", "monitor"] = "enforce",
    comment: Annotated[str, Query(max_length=256)] = "",
    ttl_seconds: Annotated[int | None, Query(ge=1, le=MAX_TTL)] = None,
    nodes: Annotated[str | None, Query(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}(,[a-z0-9][a-z0-9._-]{0,63})*$",
        description="only these nodes enforce it (comma separated); default every node")] = None,
    selector: Annotated[str | None, Query(
        pattern=r"^[^=,]+=[^=,]*(,[^=,]+=[^=,]*)*$",
        description="only nodes with all these labels (k=v,k2=v2) enforce it")] = None,
) -> JSONResponse:
    """Fleet mode: the source's new list goes to the fleet store in chunks, then one
    transaction makes it current; a concurrent replace of the same source by another
    writer answers 409 (one of the two wins whole, never a mix). `nodes`/`selector` scope
    it: the other nodes do not enforce it (and drop it if they did)."""
    agent = _agent(request)
    only: list[str] | None = nodes.split(",") if nodes else None
    labels: dict[str, str] | None = (
        dict(p.split("=", 1) for p in selector.split(",")) if selector else None
    )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "text/plain":
        codes = await read_list(request, action, mode)
        rev, diff = await run_in_threadpool(
            lambda: agent.writer.replace_source(name, codes, comment, ttl_seconds,
                                                nodes=only, selector=labels)
        )
        count = len(codes)
    elif ctype in ("application/json", ""):
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
        items = await run_in_threadpool(bulk_rules, bytes(raw), True, name)
        count = len(items)
        rev, diff = await run_in_threadpool(
            lambda: agent.writer.replace_source(
                name, [i.spec.code() for i in items], "", None,
                [i.comment for i in items], [i.ttl_seconds for i in items],
                nodes=only, selector=labels,
            )
        )
    else:
        raise InvalidRule("body", f"content type {ctype!r}: send text/plain (a list) or "
                          "application/json (an array of rule bodies)")
    return await run_in_threadpool(
        _answer, agent, rev, wait, name, f"{count} entries committed to the fleet store", 200,
        None, diff,
    )


@writes.delete("/v1/sources/{name}", response_model=FleetWriteOut, dependencies=[WriteAccess])
def fleet_delete_source(name: SourceName, request: Request, wait: Wait = None) -> JSONResponse:
    agent = _agent(request)
    removed, rev = agent.writer.drop_source(name)
    if not removed:
        return JSONResponse({"detail": f"no source {name!r} in the fleet store",
                             "error": "source_not_found"}, status_code=404)
    return _answer(agent, rev, wait, name, "deleted from the fleet store", 200, removed)


def _not_in_fleet(what: str, instead: str) -> Callable[[], JSONResponse]:
    def handler() -> JSONResponse:
        return JSONResponse(
            {"detail": f"{what} is not routed to the fleet store yet: {instead}",
             "error": "not_in_fleet_mode"}, status_code=501,
        )
    return handler


writes.add_api_route(
    "/v1/rules/bulk", _not_in_fleet(
        "a bulk add", "load the list as a source (PUT /v1/sources/NAME)"),
    methods=["POST"], dependencies=[WriteAccess], include_in_schema=False,
)
writes.add_api_route(
    "/v1/rules", _not_in_fleet(
        "a delete by value", "delete the rule by id, or replace its source"),
    methods=["DELETE"], dependencies=[WriteAccess], include_in_schema=False,
)


def _fleet_openapi(app: FastAPI) -> None:
    """The OpenAPI document of a fleet node: the fleet routes describe the paths they shadow
    (the single-host routes stay in the app, after these, and are never reached)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            only = FastAPI(title=app.title, version=app.version)
            only.include_router(router)
            only.include_router(writes)
            mine = only.openapi()
            for path, ops in mine.get("paths", {}).items():
                schema.setdefault("paths", {}).setdefault(path, {}).update(ops)
            for kind, items in mine.get("components", {}).items():
                schema.setdefault("components", {}).setdefault(kind, {}).update(items)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, agent: FleetAgent) -> None:
    """Fleet mode on `app`: call before the single-node routers are included."""
    app.state.fleet = agent
    app.include_router(router)
    app.include_router(writes)
    _fleet_openapi(app)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"the fleet store (etcd at {', '.join(agent.config.endpoints)}) is "
             f"unreachable: the write was NOT made. This node keeps enforcing the state of "
             f"revision {agent.applied}; retry when etcd is back ({exc})",
             "error": "store_unavailable"}, status_code=503, headers={"Retry-After": "2"},
        )

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"source {exc} was changed by another writer while this replace was "
             "being written: nothing of this replace was applied (the other one won whole); "
             "read the source and retry", "error": "conflict"}, status_code=409,
        )

    async def store_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"the fleet store refused the write: {exc}",
                             "error": "store_error"}, status_code=502)

    app.add_exception_handler(EtcdUnavailable, unavailable)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(EtcdError, store_error)

    @app.middleware("http")
    async def staleness(request: Request,
                        call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-Xdpfw-Fleet-Revision"] = str(agent.applied)
        if not agent.reachable and agent.down_since is not None:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(agent.down_since))
            response.headers["X-Xdpfw-Stale"] = (
                f"fleet store unreachable since {since}: data as of revision {agent.applied}, "
                "may be stale"
            )
        return response


_ = RuleNotFound  # raised by svc.get, mapped to 404 by api/errors.py
