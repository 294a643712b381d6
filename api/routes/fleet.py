"""Fleet mode (`xdpfw serve --etcd ...`, docs/fleet.md): /v1/fleet, and the rule and source
writes routed to etcd instead of this node's service.

`install(app, agent)` mounts these routes BEFORE the single-node ones, so in fleet mode
`POST /v1/rules`, `DELETE /v1/rules/{id}`, `PUT/DELETE /v1/sources/{name}` are these; the
reads stay the single-node ones (this node's cache), with `X-Xdpfw-Fleet-Revision` and,
while the store is unreachable, `X-Xdpfw-Stale`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep, WriteAccess
from api.fleet.agent import FleetAgent
from api.fleet.etcd import EtcdError, EtcdUnavailable
from api.fleet.state import Conflict, protected_prefixes, rule_code
from api.models import MAX_TTL, RuleIn, RuleOut, bulk_rules, iso
from api.routes.rules import RuleId, SourceQuery, read_list
from api.service import FirewallService
from api.store import PROTECT_IDS
from xdpfw import codes as wire
from xdpfw.errors import InvalidRule, RuleNotFound
from xdpfw.rules import RuleSpec, parse_network, rule_from_code
from xdpfw.sources import DEFAULT_SOURCE, SOURCE_PATTERN, check_source

__all__ = [
    "FleetBulkOut",
    "FleetProtectedIn",
    "FleetProtectedOut",
    "FleetRuleOut",
    "FleetSourceOut",
    "FleetStatusOut",
    "FleetWriteOut",
    "NodeOut",
    "install",
    "router",
    "writes",
]

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
    applied: bool  # this node has applied it already (always with ?wait=applied)
    source: str
    detail: str
    removed: int | None = None
    nodes: list[str] | None = None  # a scoped rule: only these nodes enforce it
    selector: dict[str, str] | None = None  # a scoped rule: only nodes with these labels
    here: bool = True  # this node is in the write's scope (False: it does not enforce it)


class FleetBulkOut(FleetWriteOut):
    """A bulk add committed: its entries joined the source's list in etcd."""

    added: int = Field(description="entries the source did not hold before")
    duplicates: int = Field(description="entries it held already (nothing changed for them)")


class FleetRuleOut(BaseModel):
    """A single rule in the fleet store (POST /v1/rules), with its scope: every node sees
    every rule here, also those scoped to other nodes (a node's GET /v1/rules shows what
    it enforces)."""

    source: str
    action: str
    mode: str
    src: str | None
    dst: str | None
    proto: str | None
    dport: str | None
    tcp_flags: str | None
    comment: str
    expires_at: str | None
    nodes: list[str] | None = Field(description="only these nodes enforce it (null: any)")
    selector: dict[str, str] | None = Field(
        description="only nodes with all these labels enforce it (null: any)")
    here: bool = Field(description="this node is in its scope")
    revision: int = Field(description="the etcd revision that wrote it")


class FleetSourceOut(FleetWriteOut):
    """A source replace committed: the diff against the version it replaced, in etcd (each
    node logs its own overlaps with its protected prefixes)."""

    added: int
    unchanged: int
    overlaps: list[str] = []
    overlap_count: int = 0


class FleetProtectedIn(BaseModel):
    """The fleet's protected prefixes, the whole list (PUT replaces it)."""

    prefixes: list[str] = Field(max_length=PROTECT_IDS - 1,
                                description="CIDRs (or addresses) every node allows above "
                                "every drop rule")
    revision: int | None = Field(None, ge=0, description="write only if the list is still "
                                 "the one of this revision (GET's `revision`; 0: never "
                                 "written), else 409")


class FleetProtectedOut(BaseModel):
    """The fleet's protected prefixes (every node enforces them, with its own --protect)."""

    prefixes: list[str]
    revision: int = Field(description="the etcd revision that wrote the list (0: never)")
    applied: bool = Field(description="this node enforces this list")
    local: list[str] = Field(description="this node's own protected prefixes (--protect): "
                             "enforced whatever the fleet's list says")
    enforced: list[str] = Field(description="the fleet's prefixes this node enforces now")
    stale: bool = Field(False, description="etcd unreachable: `prefixes` is this node's "
                        "cache (what it enforces), `revision` the one it applied")


def _agent(request: Request) -> FleetAgent:
    agent: FleetAgent = request.app.state.fleet
    return agent


def _answer(agent: FleetAgent, revision: int, wait: str | None, source: str,
            detail: str, status: int, removed: int | None = None,
            diff: tuple[int, int, int] | None = None,
            body: FleetWriteOut | None = None) -> JSONResponse:
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
    if body is not None:
        body.applied = applied
    elif diff is not None:
        body = FleetSourceOut(revision=revision, applied=applied, source=source, detail=detail,
                              added=diff[0], removed=diff[1], unchanged=diff[2])
    else:
        body = FleetWriteOut(revision=revision, applied=applied, source=source, detail=detail,
                             removed=removed)
    return JSONResponse(body.model_dump(), status_code=status)


def _scope_text(nodes: list[str] | None, selector: dict[str, str] | None) -> str:
    parts = []
    if nodes is not None:
        parts.append("nodes " + ",".join(nodes))
    if selector is not None:
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in sorted(selector.items())))
    return " and ".join(parts) or "every node"


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


@router.get("/rules", response_model=list[FleetRuleOut], dependencies=[ReadAccess])
def fleet_rules(request: Request, source: SourceQuery = None) -> list[FleetRuleOut]:
    """The single rules in the fleet store (POST /v1/rules) with their scope, read from etcd
    (503 while it is unreachable); `source`: only that source's. The entries of sources'
    lists are not listed here (GET /v1/sources/NAME on a node that enforces them)."""
    a = _agent(request)
    prefix = a.layout.rules(source) if source else a.layout.desired + b"rules/"
    kvs, _ = a.etcd.prefix(prefix)
    out = []
    for kv in kvs:
        name = a.layout.source_of(kv.key)
        if name is None:
            continue
        r = rule_from_code(1, rule_code(kv.key))
        body = json.loads(kv.value)
        nodes, selector = body.get("nodes"), body.get("selector")
        out.append(FleetRuleOut(
            source=name, action=r.action.value, mode=r.mode.value,
            src=r.src.with_prefixlen if r.src is not None else None,
            dst=r.dst.with_prefixlen if r.dst is not None else None,
            proto=r.proto.value if r.proto is not None else None,
            dport=str(r.dport) if r.dport is not None else None,
            tcp_flags=str(r.tcp_flags) if r.tcp_flags is not None else None,
            comment=body.get("comment", ""), expires_at=iso(body.get("expires_at")),
            nodes=nodes, selector=selector, here=a.in_scope(nodes, selector),
            revision=kv.mod_revision,
        ))
    return out


def _protected_out(agent: FleetAgent, svc: FirewallService, prefixes: list[str], revision: int,
                   stale: bool = False) -> FleetProtectedOut:
    return FleetProtectedOut(
        prefixes=prefixes, revision=revision, applied=agent.applied >= revision,
        local=[r.src.with_prefixlen for r in svc.local_protected if r.src is not None],
        enforced=[r.src.with_prefixlen for r in svc.fleet_protected if r.src is not None],
        stale=stale,
    )


@router.get("/protected", response_model=FleetProtectedOut, dependencies=[ReadAccess])
def fleet_protected(request: Request, svc: ServiceDep) -> FleetProtectedOut:
    """The fleet's protected prefixes, read from etcd; while it is unreachable, this node's
    cache (`stale`: true). Each node enforces them together with its own --protect."""
    agent = _agent(request)
    try:
        kv, _ = agent.etcd.get(agent.layout.protected)
    except EtcdUnavailable:
        return _protected_out(agent, svc, agent.protected_cache(), agent.applied, stale=True)
    return _protected_out(agent, svc, protected_prefixes(kv.value if kv else None),
                          kv.mod_revision if kv else 0)


@router.put("/protected", response_model=FleetProtectedOut, dependencies=[WriteAccess],
            responses={409: {"description": "`revision` given and the list changed since"}})
def fleet_set_protected(body: FleetProtectedIn, request: Request, svc: ServiceDep,
                        wait: Wait = None) -> JSONResponse:
    """Replace the fleet's protected prefixes (one etcd txn); every node allows them above
    every drop rule. A prefix taken out stays protected on a node that has it in its own
    --protect. 422: a bad prefix; `?wait=applied`: answer once this node enforces it."""
    agent = _agent(request)
    prefixes: list[str] = []
    for text in body.prefixes:
        net = parse_network(text, "prefixes").with_prefixlen  # InvalidRule -> 422
        if net not in prefixes:
            prefixes.append(net)
    try:
        rev = agent.writer.set_protected(prefixes, body.revision)
    except Conflict:
        return JSONResponse(
            {"detail": "the fleet's protected prefixes changed since revision "
             f"{body.revision}: nothing was written; read them and retry",
             "error": "conflict"}, status_code=409)
    if wait == "applied" and not agent.wait_applied(rev, APPLY_TIMEOUT):
        return JSONResponse(
            {"detail": f"committed to the fleet store at revision {rev}, but this node has "
             f"not applied it within {APPLY_TIMEOUT:.0f} s (applied revision "
             f"{agent.applied}); see GET /v1/fleet", "error": "not_applied"},
            status_code=504)
    return JSONResponse(_protected_out(agent, svc, prefixes, rev).model_dump())


# -- writes, routed to etcd -------------------------------------------------------------------


@writes.post("/v1/rules", response_model=FleetWriteOut, status_code=202,
             dependencies=[WriteAccess])
def fleet_add_rule(body: RuleIn, request: Request, wait: Wait = None) -> JSONResponse:
    """Fleet mode: the rule goes to the fleet store, held by its `source`; every node
    applies it. 202 when committed; `?wait=applied`: 201 when this node enforces it."""
    agent = _agent(request)
    source = check_source(body.source)
    code = body.spec().code()
    rev = agent.writer.add_rule(source, code, body.comment, body.ttl_seconds,
                                body.nodes, body.selector)
    here = agent.in_scope(body.nodes, body.selector)
    detail = "committed to the fleet store"
    if body.scoped():
        detail += f"; enforced by {_scope_text(body.nodes, body.selector)}" + (
            "" if here else f" (not by this node, {agent.config.node})")
    out = FleetWriteOut(revision=rev, applied=False, source=source, detail=detail,
                        nodes=body.nodes, selector=body.selector, here=here)
    answer = _answer(agent, rev, wait, source, detail,
                     201 if wait == "applied" and here else 202, body=out)
    if wait == "applied" and here and answer.status_code == 201:
        stored = agent.rule_of(source, code)  # the single-host answer: the rule as enforced
        if stored is not None:
            return JSONResponse(jsonable_encoder(RuleOut.of(stored)), status_code=201)
    return answer


@writes.delete("/v1/rules/{rule_id:int}", status_code=204, dependencies=[WriteAccess])
def fleet_delete_rule(rule_id: RuleId, request: Request, svc: ServiceDep,
                      wait: Wait = None) -> Response:
    """Fleet mode: the rule's keys leave the fleet store (every node removes it): 204 as on
    one host, with the revision in `X-Xdpfw-Fleet-Committed`; `?wait=applied`: once this
    node no longer enforces it. A rule in a source's list leaves that list (a new
    generation of it, in the same one transaction)."""
    agent = _agent(request)
    stored = svc.get(rule_id)  # RuleNotFound -> 404
    code = stored.rule.code()
    removed, rev = agent.writer.remove_matching(
        lambda c: c == code, None, agent.lists_to_read(set(stored.sources)))
    if not removed:
        raise InvalidRule(
            "rule_id", f"rule {rule_id} is not in the fleet store: it is held by this "
            f"node's own source(s) {', '.join(stored.sources)} (an integration of this node)"
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


ScopeQuery = Annotated[str | None, Query(
    description="not taken: a bulk joins its source's list, whose scope is the source's")]


@writes.post("/v1/rules/bulk", response_model=FleetBulkOut, status_code=202,
             dependencies=[WriteAccess])
async def fleet_bulk_add(
    request: Request, wait: Wait = None,
    action: Literal["drop", "allow"] = "drop",
    mode: Literal["enforce", "monitor"] = "enforce",
    comment: Annotated[str, Query(max_length=256)] = "",
    ttl_seconds: Annotated[int | None, Query(ge=1, le=MAX_TTL)] = None,
    force: bool = False,
    source: SourceQuery = None,
    nodes: ScopeQuery = None,
    selector: ScopeQuery = None,
) -> JSONResponse:
    """Fleet mode: a bulk is one write to the fleet store: its entries join the list of
    `source` (default `api`) as a new generation of that list (chunks, then ONE
    transaction; the source's single rules and scope stay), so every node applies it whole
    or not at all. 202 when committed; `?wait=applied`: 201 when this node has applied it.
    Entries the source holds already are `duplicates`. The same bodies as on one host
    (text/plain list with `action`, `mode`, `comment`, `ttl_seconds`; or a JSON array of
    rule bodies); `force` is implied (each node loads protected overlaps and logs them)."""
    if nodes is not None or selector is not None:
        raise InvalidRule("nodes", "a bulk joins its source's list, and a list has the "
                          "source's scope: scope the source (PUT /v1/sources/NAME?nodes=...) "
                          "or add scoped rules one by one (POST /v1/rules with nodes)")
    agent = _agent(request)
    name = check_source(source or DEFAULT_SOURCE)
    _ = force
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    now = time.time()
    if ctype == "text/plain":
        codes = await read_list(request, action, mode)
        comments = [comment] * len(codes)
        expires: list[float | None] = [now + ttl_seconds if ttl_seconds else None] * len(codes)
    else:
        raw = bytearray()
        async for chunk in request.stream():  # api/limits.py bounds it
            raw += chunk
        items = await run_in_threadpool(bulk_rules, bytes(raw), True, name)
        codes = [i.spec.code() for i in items]
        comments = [i.comment for i in items]
        expires = [now + i.ttl_seconds if i.ttl_seconds else None for i in items]
    rev, added, dups = await run_in_threadpool(
        agent.writer.add_to_source, name, codes, comments, expires)
    out = FleetBulkOut(revision=rev, applied=False, source=name,
                       detail=f"{added} entries joined source {name} in the fleet store",
                       added=added, duplicates=dups)
    return await run_in_threadpool(
        _answer, agent, rev, wait, name, out.detail, 201 if wait == "applied" else 202,
        None, None, out)


@writes.delete("/v1/rules", response_model=FleetWriteOut, dependencies=[WriteAccess])
def fleet_delete_where(
    request: Request, svc: ServiceDep, wait: Wait = None,
    src: Annotated[str | None, Query(max_length=64, description="CIDR or address")] = None,
    dst: Annotated[str | None, Query(max_length=64, description="CIDR or address")] = None,
    source: SourceQuery = None,
) -> JSONResponse:
    """Fleet mode: delete by value in the fleet store, in ONE transaction: the single rules
    whose `src` (and/or `dst`) is exactly this network, and such entries of sources' lists
    (each list that held one becomes a new generation without it), of `source` only when
    named. `removed`: how many went (0: none matched, nothing written)."""
    agent = _agent(request)
    if src is None and dst is None:
        raise InvalidRule("src", "name the rules to remove by src, dst or both")
    keys = [wire.key(RuleSpec.parse(src=src).code())] if src is not None else []
    if dst is not None:
        keys.append(wire.key(RuleSpec.parse(dst=dst).code()))
    local = svc.sources_where(src, dst)
    removed, rev = agent.writer.remove_matching(
        lambda c: all(wire.key(c) == k for k in keys), source, agent.lists_to_read(local))
    detail = (f"{removed} removed from the fleet store" if removed
              else "nothing matched in the fleet store")
    return _answer(agent, rev, wait if removed else None, source or "*", detail, 200,
                   removed)


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
            {"detail": f"source {exc} was changed by another writer while this write was "
             "being made: nothing of this write was applied (the other one won whole); "
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
