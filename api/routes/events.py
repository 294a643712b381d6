"""X-ray: sampled frames as Server-Sent Events (`GET /v1/events`), and a rule's sampling
(`PUT`/`GET`/`DELETE /v1/rules/{id}/sample`: a map write, never a program reload).

The stream opens with one `hello` event (snap length, cap, the interfaces known), then one
`sample` event per sampled frame that passes the filters (JSON: rule, verdict, ifindex,
ifname, time_ns, len, caplen, data in base64), and a `: keepalive` comment line every few
seconds. A stream whose queue overflows (a slow reader) loses samples: each `sample` event
carries the stream's `lost` count so far.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.responses import StreamingResponse
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
from api.models import SampleIn, SampleOut
from api.service import FirewallService
from xdpfw.errors import DatapathError
from xdpfw.rules import MAX_RULE_ID
from xdpfw.xray.hub import Filter, Hub, Subscriber

__all__ = ["KEEPALIVE_S", "router"]

KEEPALIVE_S = 1.0

router = APIRouter(tags=["x-ray"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES})
RuleId = Annotated[int, Path(ge=1, le=MAX_RULE_ID, description="rule id")]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "no rule with that id"}
}


@router.put(
    "/v1/rules/{rule_id:int}/sample",
    response_model=SampleOut,
    dependencies=[WriteAccess],
    responses={**_NOT_FOUND, **BODY_RESPONSES},
)
def set_sample(rule_id: RuleId, body: SampleIn, svc: ServiceDep) -> SampleOut:
    """Sample the rule: 1 in `every` frames it decides goes to /v1/events (a map write)."""
    svc.set_sample(rule_id, body.every)
    return SampleOut(every=body.every)


@router.get(
    "/v1/rules/{rule_id:int}/sample",
    response_model=SampleOut | None,
    dependencies=[ReadAccess],
    responses=_NOT_FOUND,
)
def get_sample(rule_id: RuleId, svc: ServiceDep) -> SampleOut | None:
    """The rule's sampling; null when it is not sampled."""
    svc.get(rule_id)  # 404 for an unknown rule
    every = svc.sample_of(rule_id)
    return SampleOut(every=every) if every else None


@router.delete(
    "/v1/rules/{rule_id:int}/sample",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAccess],
    responses=_NOT_FOUND,
)
def delete_sample(rule_id: RuleId, svc: ServiceDep) -> Response:
    """Stop sampling the rule."""
    svc.set_sample(rule_id, None)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _hello(svc: FirewallService, hub: Hub) -> dict[str, Any]:
    snaplen, max_pps = svc.sample_settings()
    names = hub.names_now()
    for att in svc.attachments():
        names[att.ifindex] = att.ifname
    return {
        "snaplen": snaplen,
        "max_pps": max_pps,
        "interfaces": [{"ifindex": i, "name": n} for i, n in sorted(names.items()) if n],
        "sampled_rules": svc.sample_rules(),
    }


async def _stream(hello: dict[str, Any], hub: Hub, sub: Subscriber) -> AsyncIterator[bytes]:
    try:
        yield _sse("hello", hello)
        seq = 0
        while True:
            try:
                s = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            seq += 1
            ev = s.event()
            ev["seq"] = seq
            ev["lost"] = sub.lost
            yield _sse("sample", ev)
    finally:
        hub.unsubscribe(sub)


@router.get(
    "/v1/events",
    dependencies=[ReadAccess],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the sample stream"}},
)
async def events(
    svc: ServiceDep,
    rule: Annotated[list[int] | None, Query(description="rule ids (repeat for several)")] = None,
    source: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")] = None,
    verdict: Literal["drop", "pass", "monitor", "limited"] | None = None,
) -> StreamingResponse:
    """Sampled frames of the sampled rules, as Server-Sent Events, until the client leaves.

    Only rules that carry `"sample": {"every": N}` are sampled; filter further by rule id,
    source or verdict. `xdpfw capture` reads this stream and writes pcapng.
    """
    hub = svc.xray
    if hub is None or not hub.running:
        raise DatapathError("the sample reader is not running (see the service log)")
    want = Filter(frozenset(rule) if rule else None, verdict, source)
    hello = await run_in_threadpool(_hello, svc, hub)  # netlink: never on the event loop
    sub = hub.subscribe(want, asyncio.get_running_loop())
    return StreamingResponse(
        _stream(hello, hub, sub),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
