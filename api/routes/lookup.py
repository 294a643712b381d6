"""/v1/lookup: the verdict the data plane gives a packet, and every rule that matches it."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep
from api.models import RuleOut
from xdpfw.lookup import tcp_flags_text

__all__ = ["LookupOut", "router"]

router = APIRouter(
    prefix="/v1/lookup", tags=["lookup"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES}
)


class LookupPacketOut(BaseModel):
    src: str
    dst: str | None
    proto: int | None = Field(description="IP protocol number; null: one no rule names")
    dport: int | None
    tcp_flags: str | None = Field(
        description='the TCP flags set, e.g. "SYN" ("" none); null: not asked (no flags rule '
        "matches)"
    )


class LookupMatchOut(BaseModel):
    table: str = Field(description="the kernel map whose entry held the rule")
    rule: RuleOut


class LookupEntryOut(BaseModel):
    table: str
    network: str = Field(description="the entry's key ('*' for the address-less table)")


class LookupOut(BaseModel):
    verdict: Literal["drop", "pass", "monitor", "limit"] = Field(
        description="drop; pass (an allow rule, or no rule); monitor (passed and counted); "
        "limit (a rate-limit rule decides: passed within its budget, dropped over it)"
    )
    rule_id: int | None = Field(description="the credited rule (its counters count the packet)")
    rule: RuleOut | None
    matches: list[LookupMatchOut] = Field(description="every matching rule, best first")
    entries: list[LookupEntryOut] = Field(description="the entries the program looks up")
    packet: LookupPacketOut


@router.get("", response_model=LookupOut, dependencies=[ReadAccess])
def lookup(
    svc: ServiceDep,
    src: Annotated[str, Query(max_length=64, description="source address")],
    dst: Annotated[str | None, Query(max_length=64, description="destination address")] = None,
    proto: Annotated[
        str | None, Query(max_length=8, description="tcp, udp, icmp, icmpv6 or a number")
    ] = None,
    dport: Annotated[int | None, Query(ge=0, le=65535, description="destination port")] = None,
    tcp_flags: Annotated[
        str | None,
        Query(max_length=40, description='TCP flags set in the packet, e.g. "SYN" or '
              '"SYN,ACK" (with proto tcp); without them no TCP-flags rule matches'),
    ] = None,
) -> LookupOut:
    """What the XDP program does with a packet from `src` (to `dst`, `proto`, `dport`).

    Computed from the entries the program looks up (the same steps, the same ranks), so the
    verdict and the credited rule are the kernel's. Without `dst` (or `proto`) the packet is
    one whose destination (protocol) no rule names: only rules naming none can match; a TCP
    packet without `tcp_flags`, one that no TCP-flags rule matches.
    """
    answer = svc.lookup(src, dst, proto, dport, tcp_flags)
    matches = [LookupMatchOut(table=m.table, rule=RuleOut.of(m.stored)) for m in answer.matches]
    p = answer.packet
    return LookupOut(
        verdict=answer.decision.verdict,
        rule_id=answer.decision.rule_id,
        rule=matches[0].rule if answer.decision.rule_id is not None else None,
        matches=matches,
        entries=[LookupEntryOut(table=t, network=n) for t, n in answer.decision.looked_up],
        packet=LookupPacketOut(
            src=str(p.src), dst=None if p.dst is None else str(p.dst), proto=p.proto,
            dport=p.dport,
            tcp_flags=None if p.tcp_flags is None else tcp_flags_text(p.tcp_flags),
        ),
    )
