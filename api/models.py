"""Request and response bodies of the REST API (pydantic). Shapes are the API contract."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.service import InterfaceState, NewRule, SourceSummary
from api.store import StoredRule
from xdpfw.datapath import Attachment, Ban, GlobalCounters, LimitCounters, RuleCounters
from xdpfw.errors import InvalidRule
from xdpfw.importers import bad_summary
from xdpfw.rules import Limit, RuleSpec
from xdpfw.sources import DEFAULT_SOURCE, SOURCE_PATTERN

__all__ = [
    "BanOut",
    "BansOut",
    "BulkOut",
    "HealthOut",
    "InterfaceIn",
    "InterfaceOut",
    "LimitCountersOut",
    "LimitIn",
    "LimitOut",
    "RemovedOut",
    "RuleCountersOut",
    "RuleIn",
    "RuleOut",
    "RulePage",
    "SampleIn",
    "SampleOut",
    "SamplesOut",
    "SourceChangeOut",
    "SourceDetailOut",
    "SourceOut",
    "StatsOut",
    "TableUsage",
    "TotalsOut",
    "UnbanOut",
    "bulk_rules",
    "iso",
]

MAX_TTL = 10 * 365 * 86400


def iso(ts: float | None) -> str | None:
    """Unix time -> ISO 8601 UTC with a Z, to the millisecond."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_CIDR_PATTERN = r"^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$"


def _rule_schema(schema: dict[str, Any]) -> None:
    """The cross-field rules of RuleSpec.validate, as far as JSON Schema can say them."""
    def named(*fields: str) -> dict[str, Any]:  # present and not null
        return {
            "required": list(fields),
            "properties": {f: {"not": {"type": "null"}} for f in fields},
        }

    schema["anyOf"] = [named(f) for f in ("src", "dst", "proto", "dport")]
    schema["not"] = named("src", "dst")
    schema["if"] = named("dport")
    schema["then"] = {"required": ["proto"], "properties": {"proto": {"enum": ["tcp", "udp"]}}}
    # issue 16: flags need tcp; a limit rule needs its budget, and only a limit rule has one
    schema["allOf"] = [
        {"if": named("tcp_flags"),
         "then": {"required": ["proto"], "properties": {"proto": {"const": "tcp"}}}},
        {"if": {"required": ["action"], "properties": {"action": {"const": "limit"}}},
         "then": named("limit"), "else": {"not": named("limit")}},
    ]
    schema["examples"] = [
        {"src": "198.18.7.0/24", "comment": "abuse ticket 4711", "ttl_seconds": 3600},
        {"action": "allow", "src": "198.18.7.9", "proto": "tcp", "dport": "22"},
        {"mode": "monitor", "proto": "udp", "dport": "1000-2000"},
        {"action": "limit", "proto": "tcp", "dport": "80", "tcp_flags": "syn",
         "limit": {"pps": 100, "burst": 200, "per": "source", "ban_seconds": 600}},
    ]


# --- X-ray (issue 17): a rule's sampling ------------------------------------------------------


class SampleIn(BaseModel):
    """Copy 1 in `every` frames the rule decides to the sample stream (/v1/events)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    every: int = Field(ge=1, le=1 << 31, description="1 = every frame the rule decides")


class SampleOut(BaseModel):
    every: int


class SamplesOut(BaseModel):
    """Samples of every rule: sent to the ring, and lost by reason."""

    sent: int = Field(description="frames copied into the sample ring")
    lost_ring: int = Field(description="chosen, but the ring was full")
    lost_cap: int = Field(description="chosen, but over the cap (--sample-max-pps)")
    lost_client: int = Field(description="read, but a slow stream's queue was full")
    max_pps: int = Field(description="the cap, samples per second over all rules and CPUs")
    snaplen: int = Field(description="bytes kept of each sampled frame")
    streams: int = Field(description="open /v1/events streams")
# -- rate limits and TCP flags (issue 16) -------------------------------------------------------


class LimitIn(BaseModel):
    """A limit rule's budget: pps and/or bps, each with its burst; per source or per rule."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pps: int | None = Field(default=None, description="packets per second (>= 1)")
    burst: int | None = Field(
        default=None, description="packets that may pass at once (>= 1; default: pps)"
    )
    bps: int | None = Field(default=None, description="bytes per second (>= 1)")
    burst_bytes: int | None = Field(
        default=None, description="bytes that may pass at once (>= 1514; default: bps)"
    )
    per: Literal["source", "rule"] = Field(
        default="source", description="a budget per source address, or one for the rule"
    )
    ban_seconds: int | None = Field(
        default=None, description="drop a source that goes over for this long (per source)"
    )

    def limit(self) -> Limit:
        return Limit.parse(
            pps=self.pps, burst=self.burst, bps=self.bps, burst_bytes=self.burst_bytes,
            per=self.per, ban_seconds=self.ban_seconds,
        )


class LimitOut(BaseModel):
    pps: int | None = None
    burst: int | None = None
    bps: int | None = None
    burst_bytes: int | None = None
    per: str
    ban_seconds: int

    @classmethod
    def of(cls, lim: Limit) -> LimitOut:
        return cls(
            pps=lim.pps, burst=lim.burst, bps=lim.bps, burst_bytes=lim.burst_bytes,
            per=lim.per.value, ban_seconds=lim.ban_seconds,
        )


class LimitCountersOut(BaseModel):
    passed: int = Field(description="frames within the budget")
    limited: int = Field(description="frames over the budget (dropped, or would be: monitor)")
    banned: int = Field(description="frames dropped while their source was banned")

    @classmethod
    def of(cls, c: LimitCounters) -> LimitCountersOut:
        return cls(passed=c.passed, limited=c.limited, banned=c.banned)


class BanOut(BaseModel):
    rule_id: int
    source: str
    expires_in: float = Field(description="seconds until the ban ends")

    @classmethod
    def of(cls, b: Ban) -> BanOut:
        return cls(rule_id=b.rule_id, source=b.source, expires_in=round(b.expires_in, 3))


class BansOut(BaseModel):
    bans: list[BanOut]


class UnbanOut(BaseModel):
    unbanned: int


class RuleIn(BaseModel):
    """A rule to add. At least one of src, dst, proto, dport; src or dst, not both."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_rule_schema)

    action: Literal["drop", "allow", "limit"] = "drop"
    mode: Literal["enforce", "monitor"] = "enforce"
    src: str | None = Field(
        default=None, max_length=64, pattern=_CIDR_PATTERN, description="CIDR or bare address"
    )
    dst: str | None = Field(
        default=None, max_length=64, pattern=_CIDR_PATTERN, description="CIDR or bare address"
    )
    proto: Literal["tcp", "udp", "icmp", "icmpv6"] | None = None
    dport: Annotated[int, Field(ge=0, le=65535)] | Annotated[
        str, Field(pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$")
    ] | None = Field(default=None, description='22 or "1000-2000" (tcp/udp only)')
    # -- issue 16 --
    tcp_flags: str | None = Field(
        default=None, max_length=64, pattern=r"^[!A-Za-z, ]+$",
        description='"syn" (SYN set, ACK clear) or e.g. "SYN,!ACK", "RST" (proto tcp only)',
    )
    limit: LimitIn | None = Field(default=None, description='the budget of "action": "limit"')
    # --
    comment: str = Field(default="", max_length=256)
    ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_TTL)
    force: bool = Field(
        default=False,
        description="add a drop rule even though it overlaps a protected prefix (the protected "
        "sources stay allowed in the data plane either way)",
    )
    # -- issue 13: sources --
    source: str = Field(
        default=DEFAULT_SOURCE, pattern=SOURCE_PATTERN,
        description="the source that holds the rule (a rule leaves the kernel when its last "
        "source lets it go); re-adding a rule the source holds sets its new expiry",
    )
    sample: SampleIn | None = None  # X-ray
    # -- issue 19: fleet mode (docs/fleet.md); a node without --etcd answers 422 --
    nodes: list[Annotated[str, Field(pattern=SOURCE_PATTERN)]] | None = Field(
        default=None, min_length=1, max_length=256,
        description="fleet mode: only these nodes enforce the rule (default: every node)",
    )
    selector: dict[str, Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=32,
        description="fleet mode: only nodes with all these labels (--node-label) enforce it",
    )

    def scoped(self) -> bool:
        return self.nodes is not None or self.selector is not None

    def spec(self) -> RuleSpec:
        return RuleSpec.parse(
            action=self.action,
            mode=self.mode,
            src=self.src,
            dst=self.dst,
            proto=self.proto,
            dport=self.dport,
            tcp_flags=self.tcp_flags,
            limit=None if self.limit is None else self.limit.limit(),
        )


def bulk_rules(raw: bytes, force: bool, source: str | None = None) -> list[NewRule]:
    """A JSON bulk body (an array of RuleIn) -> rules; InvalidRule naming every bad element.
    `source`: every rule's holder (a PUT /v1/sources body), else each element's own."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRule("body", f"not JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRule(
            "body", "JSON nested too deeply: a bulk body is an array of flat rule objects"
        ) from exc
    if not isinstance(data, list) or not data:
        raise InvalidRule("body", "expected a non-empty JSON array of rules (or text/plain)")
    items: list[NewRule] = []
    bad: list[tuple[int, str]] = []
    for i, obj in enumerate(data):
        try:
            body = RuleIn.model_validate(obj)
            if body.scoped():
                raise InvalidRule("nodes", "a bulk takes no per-rule scope: in fleet mode it "
                                  "joins its source's list, and the source's scope holds")
            items.append(
                NewRule(body.spec(), body.comment, body.ttl_seconds, body.force or force,
                        source or body.source,
                        sample=body.sample.every if body.sample else None)
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "rule"
            bad.append((i, f"{where}: {first['msg']}"))
        except InvalidRule as exc:
            bad.append((i, str(exc)))
    if bad:
        raise InvalidRule("body", bad_summary("element", bad))
    return items


class RuleCountersOut(BaseModel):
    packets: int
    bytes: int
    last_hit: str | None
    limit: LimitCountersOut | None = None  # issue 16: a limit rule's passed/limited/banned

    @classmethod
    def of(
        cls, c: RuleCounters | None, limit: LimitCounters | None = None
    ) -> RuleCountersOut:
        lim = None if limit is None else LimitCountersOut.of(limit)
        if c is None:
            return cls(packets=0, bytes=0, last_hit=None, limit=lim)
        return cls(packets=c.packets, bytes=c.bytes, last_hit=iso(c.last_hit), limit=lim)


class RuleOut(BaseModel):
    id: int
    action: str
    mode: str
    src: str | None
    dst: str | None
    proto: str | None
    dport: str | None
    comment: str
    created_at: str
    expires_at: str | None
    counters: RuleCountersOut | None = None
    # -- issue 13: sources --
    source: str = Field(description="the holder this view shows (comment and times are its "
                        "holding's): the one asked for, else the first")
    sources: list[str] = Field(description="every source holding the rule, first first")
    sample: SampleOut | None = None  # X-ray: null when the rule is not sampled
    # -- issue 16 --
    tcp_flags: str | None = None
    limit: LimitOut | None = None

    @classmethod
    def of(cls, s: StoredRule, counters: RuleCounters | None = None, *, with_counters: bool = False,
           sample: int | None = None, limit_counters: LimitCounters | None = None) -> RuleOut:
        r = s.rule
        return cls(
            id=r.id,
            action=r.action.value,
            mode=r.mode.value,
            src=r.src.with_prefixlen if r.src is not None else None,
            dst=r.dst.with_prefixlen if r.dst is not None else None,
            proto=r.proto.value if r.proto is not None else None,
            dport=str(r.dport) if r.dport is not None else None,
            comment=s.comment,
            created_at=iso(s.created_at) or "",
            expires_at=iso(s.expires_at),
            counters=RuleCountersOut.of(counters, limit_counters) if with_counters else None,
            source=s.source,
            sources=list(s.sources),
            sample=SampleOut(every=sample) if sample else None,
            tcp_flags=str(r.tcp_flags) if r.tcp_flags is not None else None,
            limit=LimitOut.of(r.limit) if r.limit is not None else None,
        )


class RulePage(BaseModel):
    rules: list[RuleOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class BulkOut(BaseModel):
    added: int
    duplicates: int
    ids: list[int] = Field(description="ids of the added rules, in input order")
    duplicate_ids: list[int] = Field(description="ids of existing identical rules that were kept")
    # -- issue 13: sources --
    overlaps: list[str] = Field(
        default_factory=list,
        description="entries of a source load that overlap a protected prefix, loaded anyway "
        "(protection wins in the data plane); the first 100",
    )
    overlap_count: int = 0


# -- issue 13: sources ---------------------------------------------------------------------------


class SourceChangeOut(BaseModel):
    """What a replace (PUT /v1/sources/{name}) did."""

    source: str
    added: int = Field(description="holdings added: new rules, or rules other sources held")
    removed: int = Field(description="holdings removed (a rule leaves with its last holder)")
    unchanged: int = Field(description="holdings kept: rule id, counters and last hit unchanged")
    overlaps: list[str] = Field(
        description="entries overlapping a protected prefix, loaded anyway; the first 100"
    )
    overlap_count: int


class SourceOut(BaseModel):
    name: str
    rules: int
    packets: int = Field(description="summed over the source's rules (a shared rule counts in "
                         "each of its sources)")
    bytes: int
    last_hit: str | None
    updated_at: str

    @classmethod
    def of(cls, s: SourceSummary) -> SourceOut:
        return cls(name=s.name, rules=s.rules, packets=s.packets, bytes=s.bytes,
                   last_hit=iso(s.last_hit), updated_at=iso(s.updated_at) or "")


class SourceDetailOut(SourceOut):
    """A source and one page of its rules (follow `next_cursor`)."""

    page: RulePage


class RemovedOut(BaseModel):
    removed: int = Field(description="holdings removed")


class TotalsOut(BaseModel):
    """The global counters; one field per ``abi.Stat`` counter, named by ``Stat.field``, in
    index order (tests/test_contracts.py checks it: a counter added to the ABI fails there)."""

    packets: int
    passed: int
    dropped: int
    monitored: int
    malformed: int
    non_ip: int
    fragments: int
    bytes: int
    limited: int  # issue 16: dropped by a limit rule

    @classmethod
    def of(cls, g: GlobalCounters) -> TotalsOut:
        return cls(**{stat.field: value for stat, value in g.by_stat().items()})


class RuleStatOut(BaseModel):
    id: int
    packets: int
    bytes: int
    last_hit: str | None
    limit: LimitCountersOut | None = Field(
        default=None, description="a limit rule's passed / limited / banned frames"
    )


class StatsOut(BaseModel):
    totals: TotalsOut
    rules: list[RuleStatOut]
    samples: SamplesOut | None = None  # X-ray


class InterfaceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.:@-]+$")
    mode: Literal["auto", "native", "generic"] = "auto"


class InterfaceOut(BaseModel):
    name: str
    attached: bool
    mode: str = Field(description="native|generic when attached, else the requested mode")
    prog_id: int
    ifindex: int

    @classmethod
    def of(cls, a: Attachment) -> InterfaceOut:
        return cls(name=a.ifname, attached=True, mode=a.mode, prog_id=a.prog_id, ifindex=a.ifindex)

    @classmethod
    def of_state(cls, i: InterfaceState) -> InterfaceOut:
        return cls(
            name=i.name, attached=i.attached, mode=i.mode, prog_id=i.prog_id, ifindex=i.ifindex
        )


class TableUsage(BaseModel):
    entries: int
    capacity: int


# -- CrowdSec bouncer (api/crowdsec.py) ---------------------------------------------------
class CrowdsecHealthOut(BaseModel):
    """The bouncer's state; a LAPI that is away leaves the rules in force (and the status
    of /healthz, which is about filtering, as it is)."""

    lapi: str
    state: Literal["starting", "ok", "unreachable", "failing"]
    last_pull: str | None = Field(description="the last successful pull (UTC)")
    last_full_pull: str | None = Field(description="the last full pull (startup=true)")
    last_error: str | None = Field(description="the last failure, until a pull succeeds")
    consecutive_errors: int
    lapi_errors: int
    applied: int
    deleted: int
    ignored: int
    ignored_kinds: dict[str, int] = Field(description="ignored decisions by type, scope, reason")


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    prog_id: int
    adopted: bool
    rules: int
    protected: list[str]
    interfaces: list[InterfaceOut]
    capacity: dict[str, TableUsage] = Field(
        description="entries and capacity per kernel table, plus `rules` and `xdpfw_sets`"
    )
    crowdsec: CrowdsecHealthOut | None = Field(
        default=None, description="the CrowdSec bouncer, when --crowdsec-lapi is set"
    )
