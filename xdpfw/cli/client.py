"""A small typed client of the xdpfw REST API (httpx), used by the CLI.

Every failure leaves this module as one exception, `ClientError(message, exit_code)`, whose
message says what to do (start the service, where the token comes from, which field is wrong):

    ClientError
        exit_code EXIT_UNREACHABLE  the service does not answer (connection refused, timeout)
        exit_code EXIT_AUTH         401/403: no token, or the wrong one
        exit_code EXIT_USAGE        422 (each field and problem), or a malformed --api URL
        exit_code EXIT_ERROR        404, 409, 507, 5xx: the API's own words

Response bodies are typed as the API's shapes (api/models.py) but not re-validated here;
tests/test_contracts.py checks each TypedDict below against the API's OpenAPI schema.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import httpx

__all__ = [
    "DEFAULT_API",
    "DEFAULT_STATE_DIR",
    "DEMO_STATE_DIR",
    "EXIT_AUTH",
    "EXIT_ERROR",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "START_HINT",
    "BulkResult",
    "Client",
    "ClientError",
    "CrowdsecHealth",
    "FieldError",
    "FleetNode",
    "FleetRule",
    "FleetWrite",
    "Health",
    "Interface",
    "Lookup",
    "LookupEntry",
    "LookupMatch",
    "LookupPacket",
    "Problem",
    "Removed",
    "Rule",
    "RuleCounters",
    "RulePage",
    "RuleStat",
    "Source",
    "SourceChange",
    "SourceDetail",
    "Stats",
    "TableUsage",
    "Token",
    "Totals",
    "error_for",
    "find_token",
    "parse_table_usage",
]

DEFAULT_API = "http://127.0.0.1:8000"
DEFAULT_STATE_DIR = Path("/var/lib/xdpfw")
DEMO_STATE_DIR = Path("/run/xdpfw-demo")  # where `xdpfw serve` with no --iface keeps state

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4

START_HINT = (
    "is the service running? start it with `sudo make run` or `sudo xdpfw serve --iface IFACE`"
    ", or point --api / XDPFW_API at it"
)


# --- the API's shapes (api/models.py) ------------------------------------------------------


# -- issue 16: rate limits --


class LimitCounters(TypedDict):
    passed: int
    limited: int
    banned: int


class Limit(TypedDict):
    pps: int | None
    burst: int | None
    bps: int | None
    burst_bytes: int | None
    per: str
    ban_seconds: int


class Ban(TypedDict):
    rule_id: int
    source: str
    expires_in: float


class Bans(TypedDict):
    bans: list[Ban]


class Unban(TypedDict):
    unbanned: int


# --


class RuleCounters(TypedDict):
    packets: int
    bytes: int
    last_hit: str | None
    limit: LimitCounters | None


class Sample(TypedDict):
    """SampleOut (X-ray): a rule's sampling."""

    every: int


class Rule(TypedDict):
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
    counters: RuleCounters | None
    source: str
    sources: list[str]
    sample: NotRequired[Sample | None]  # X-ray
    tcp_flags: str | None  # issue 16
    limit: Limit | None


class RulePage(TypedDict):
    rules: list[Rule]
    next_cursor: str | None


class BulkResult(TypedDict):
    added: int
    duplicates: int
    ids: list[int]
    duplicate_ids: list[int]
    overlaps: list[str]
    overlap_count: int


class Source(TypedDict):
    name: str
    rules: int
    packets: int
    bytes: int
    last_hit: str | None
    updated_at: str


class SourceDetail(TypedDict):
    name: str
    rules: int
    packets: int
    bytes: int
    last_hit: str | None
    updated_at: str
    page: RulePage


class SourceChange(TypedDict):
    source: str
    added: int
    removed: int
    unchanged: int
    overlaps: list[str]
    overlap_count: int


class Removed(TypedDict):
    removed: int


# -- fleet mode (issue 19): api/routes/fleet.py; tests/test_contracts.py checks them too --


_NO_FLEET = "this xdpfw runs without a fleet store: start it with --etcd URL"


class FleetWrite(TypedDict):
    """A write committed to the fleet store (a 202: not, or not yet, enforced here)."""

    revision: int
    applied: bool
    source: str
    detail: str
    removed: int | None
    nodes: list[str] | None
    selector: dict[str, str] | None
    here: bool


class FleetNode(TypedDict):
    name: str
    labels: dict[str, str]
    applied_revision: int
    lag: int
    last_heartbeat: float
    heartbeat_age: float
    healthy: bool
    resyncs: int


class FleetRule(TypedDict):
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
    nodes: list[str] | None
    selector: dict[str, str] | None
    here: bool
    revision: int


class FleetProtected(TypedDict):
    """GET/PUT /v1/fleet/protected: the fleet's protected prefixes."""

    prefixes: list[str]
    revision: int
    applied: bool
    local: list[str]
    enforced: list[str]
    stale: bool


class Totals(TypedDict):
    """TotalsOut: one field per abi.Stat counter, named by Stat.field, in index order."""

    packets: int
    passed: int
    dropped: int
    monitored: int
    malformed: int
    non_ip: int
    fragments: int
    bytes: int
    limited: int  # issue 16


class RuleStat(TypedDict):
    id: int
    packets: int
    bytes: int
    last_hit: str | None
    limit: LimitCounters | None  # issue 16


class SampleStats(TypedDict):
    """SamplesOut (X-ray): sampled frames sent and lost by reason, the cap, the snap length."""

    sent: int
    lost_ring: int
    lost_cap: int
    lost_client: int
    max_pps: int
    snaplen: int
    streams: int


class Stats(TypedDict):
    totals: Totals
    rules: list[RuleStat]
    samples: NotRequired[SampleStats | None]


class Interface(TypedDict):
    name: str
    attached: bool
    mode: str
    prog_id: int
    ifindex: int


class TableUsage(TypedDict):
    entries: int
    capacity: int


# -- CrowdSec bouncer (api/crowdsec.py) --
class CrowdsecHealth(TypedDict):
    lapi: str
    state: str  # starting | ok | unreachable | failing
    last_pull: str | None
    last_full_pull: str | None
    last_error: str | None
    consecutive_errors: int
    lapi_errors: int
    applied: int
    deleted: int
    ignored: int
    ignored_kinds: dict[str, int]


class Health(TypedDict):
    status: str
    prog_id: int
    adopted: bool
    rules: int
    protected: list[str]
    interfaces: list[Interface]
    capacity: dict[str, TableUsage]  # per kernel table, plus "rules" and "xdpfw_sets"
    crowdsec: CrowdsecHealth | None  # when the service runs the CrowdSec bouncer


# GET /v1/lookup (api/routes/lookup.py)
class LookupPacket(TypedDict):
    src: str
    dst: str | None
    proto: int | None
    dport: int | None
    tcp_flags: str | None  # issue 16


class LookupMatch(TypedDict):
    table: str
    rule: Rule


class LookupEntry(TypedDict):
    table: str
    network: str


class Lookup(TypedDict):
    verdict: str
    rule_id: int | None
    rule: Rule | None
    matches: list[LookupMatch]
    entries: list[LookupEntry]
    packet: LookupPacket


class FieldError(TypedDict):
    loc: list[str | int]
    msg: str
    type: str


class Problem(TypedDict):
    """Every 4xx/5xx answer (RFC 9457); the CLI reads detail, errors, existing_id and hint."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None
    error: str | None
    errors: list[FieldError] | None
    existing_id: int | None
    limit: int | None
    setting: str | None
    errno: int | None
    hint: str | None


# --- errors --------------------------------------------------------------------------------


class ClientError(Exception):
    """One failed call, with a message for a person and the CLI's exit code."""

    def __init__(
        self,
        message: str,
        exit_code: int = EXIT_ERROR,
        *,
        status: int | None = None,
        problems: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status
        self.problems = list(problems)  # 422: (field, problem) pairs


@dataclass(frozen=True)
class Token:
    """The bearer token the CLI sends (or None) and where it came from, for error messages."""

    value: str | None
    source: str  # "--token", "XDPFW_TOKEN", a file path; or why there is none


def find_token(
    explicit: str | None,
    state_dir: Path | None,
    env: Mapping[str, str] | None = None,
) -> Token:
    """--token, else XDPFW_TOKEN, else <state-dir>/token (state dir from --state-dir,
    XDPFW_STATE_DIR, or /var/lib/xdpfw, falling back to the demo's /run/xdpfw-demo)."""
    env = os.environ if env is None else env
    if explicit:
        return Token(explicit.strip(), "--token")
    if env.get("XDPFW_TOKEN"):
        return Token(env["XDPFW_TOKEN"].strip(), "XDPFW_TOKEN")
    if state_dir is None and env.get("XDPFW_STATE_DIR"):
        state_dir = Path(env["XDPFW_STATE_DIR"])
    candidates = [state_dir] if state_dir is not None else [DEFAULT_STATE_DIR, DEMO_STATE_DIR]
    why: list[str] = []
    for d in candidates:
        path = d / "token"
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            why.append(f"{path} does not exist")
            continue
        except PermissionError:
            why.append(f"{path} is not readable by this user (try sudo)")
            continue
        except OSError as exc:
            why.append(f"{path}: {exc.strerror or exc}")
            continue
        if value:
            return Token(value, str(path))
        why.append(f"{path} is empty")
    return Token(None, "; ".join(why))


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    return body.get("detail", body) if isinstance(body, dict) else body


def _errors(response: httpx.Response) -> list[Any] | None:
    """A 422 problem's `errors[]` (each invalid field), None in an older server's answer."""
    try:
        body = response.json()
    except ValueError:
        return None
    errors = body.get("errors") if isinstance(body, dict) else None
    return errors if isinstance(errors, list) else None


def _error_name(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    name = body.get("error") if isinstance(body, dict) else None
    return name if isinstance(name, str) else None


def _field(loc: Sequence[object]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    return ".".join(parts) or "request"


def error_for(
    response: httpx.Response, token: Token | None = None, not_found: str | None = None
) -> ClientError:
    """An HTTP error response -> a ClientError that says what to do."""
    code = response.status_code
    detail = _detail(response)
    if code == 401:
        have = (
            f"no token was sent ({token.source})" if token and token.value is None
            else "no token was sent"
        )
        return ClientError(
            f"the API needs a token and {have}. Pass --token, set XDPFW_TOKEN, or let the CLI "
            "read <state-dir>/token (as root; --state-dir / XDPFW_STATE_DIR, default "
            f"{DEFAULT_STATE_DIR})",
            EXIT_AUTH,
            status=code,
        )
    if code == 403 and _error_name(response) == "ReadOnlyToken":
        src = token.source if token is not None else "the request"
        return ClientError(
            f"the token from {src} is the read-only token: it cannot change anything. Use "
            "the admin token (<state-dir>/token, XDPFW_TOKEN) or the local socket",
            EXIT_AUTH,
            status=code,
        )
    if code == 403:
        src = token.source if token is not None else "the request"
        return ClientError(
            f"the API refused the token from {src}: it must match the service's "
            "<state-dir>/token (or the XDPFW_TOKEN it was started with); check --token, "
            "XDPFW_TOKEN and --state-dir / XDPFW_STATE_DIR",
            EXIT_AUTH,
            status=code,
        )
    if code == 422:
        problems: list[tuple[str, str]] = []
        errors = _errors(response)
        if errors is not None:  # an RFC 9457 problem: detail is its summary, errors[] the list
            detail = errors
        if isinstance(detail, list):
            for d in detail:
                if isinstance(d, dict):
                    problems.append((_field(d.get("loc") or []), str(d.get("msg", d))))
                else:
                    problems.append(("request", str(d)))
        else:
            problems.append(("request", str(detail)))
        text = "; ".join(f"{f}: {m}" for f, m in problems)
        return ClientError(f"invalid request: {text}", EXIT_USAGE, status=code, problems=problems)
    if code == 404 and not_found is not None:
        return ClientError(not_found, EXIT_ERROR, status=code)
    message = detail if isinstance(detail, str) else str(detail)
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if body.get("existing_id") is not None:
            message += f" (existing rule {body['existing_id']})"
        if body.get("hint"):
            message += f"; {body['hint']}"
    if code == 507 and ";" not in message:  # the API's detail may carry its own hint
        message += "; remove rules (`xdpfw rule rm`) or restart the service with larger --max-*"
    return ClientError(f"{message} (HTTP {code})", EXIT_ERROR, status=code)


_METRIC = re.compile(
    r'^xdpfw_table_(entries|capacity)\{table="([^"]+)"\}\s+([0-9.eE+-]+)\s*$', re.M
)


def parse_table_usage(metrics: str) -> dict[str, tuple[int, int]]:
    """/metrics text -> {table: (entries, capacity)} from the xdpfw_table_* gauges."""
    used: dict[str, int] = {}
    cap: dict[str, int] = {}
    for kind, table, value in _METRIC.findall(metrics):
        (used if kind == "entries" else cap)[table] = int(float(value))
    return {t: (used.get(t, 0), cap[t]) for t in cap}


# --- the client ----------------------------------------------------------------------------


class Client:
    """One API endpoint per method. Not thread-safe (one httpx.Client)."""

    def __init__(
        self,
        base_url: str = DEFAULT_API,
        token: Token | str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if isinstance(token, str):
            token = Token(token, "--token")
        self.token = token or Token(None, "no token given")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        http_url = self.base_url
        if base_url.startswith("unix:"):  # the local socket (issue 15): no token needed
            transport = transport or httpx.HTTPTransport(uds=base_url[len("unix:"):])
            http_url = "http://xdpfw"
        headers = {"User-Agent": "xdpfw-cli"}
        if self.token.value:
            headers["Authorization"] = f"Bearer {self.token.value}"
        try:
            self._http = httpx.Client(
                base_url=http_url, headers=headers, timeout=timeout, transport=transport
            )
        except (httpx.InvalidURL, ValueError) as exc:
            raise ClientError(_bad_url(base_url, exc), EXIT_USAGE) from exc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        ok: Sequence[int] = (200,),
        not_found: str | None = None,
        timeout: float | None = None,
        **kw: Any,
    ) -> httpx.Response:
        try:
            r = self._http.request(
                method, path, timeout=timeout if timeout is not None else self.timeout, **kw
            )
        except httpx.TimeoutException as exc:
            raise ClientError(
                f"the API at {self.base_url} did not answer within "
                f"{timeout or self.timeout:g}s ({type(exc).__name__}); is the service stuck? "
                "check its log",
                EXIT_UNREACHABLE,
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ClientError(_bad_url(self.base_url, exc), EXIT_USAGE) from exc
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the xdpfw API at {self.base_url} ({_reason(exc)}): {START_HINT}",
                EXIT_UNREACHABLE,
            ) from exc
        if r.status_code not in ok:
            raise error_for(r, self.token, not_found)
        return r

    # --- endpoints ---------------------------------------------------------------------

    def health(self) -> Health:
        """GET /healthz; a degraded service (503 with a health body) is an answer, not an error."""
        r = self._request("GET", "/healthz", ok=(200, 503))
        body = r.json()
        if r.status_code == 503 and not (isinstance(body, dict) and "status" in body):
            raise error_for(r, self.token)
        if isinstance(body, dict) and "status" in body and "interfaces" not in body:
            raise ClientError(
                f"the service is {body['status']} but shows no detail without its token "
                "(it listens off loopback); pass --token, set XDPFW_TOKEN, or let the CLI "
                "read <state-dir>/token",
                EXIT_AUTH,
                status=r.status_code,
            )
        return cast(Health, body)

    def interfaces(self) -> list[Interface]:
        return cast(list[Interface], self._request("GET", "/v1/interfaces").json())

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def add_rule(self, body: Mapping[str, object]) -> tuple[Rule | FleetWrite, bool]:
        """POST /v1/rules -> (rule, created). created is False for an identical existing rule.
        In fleet mode a rule scoped away from this node answers the write (a FleetWrite,
        202): committed, and enforced by the nodes of its scope."""
        # wait=applied: in fleet mode (docs/fleet.md) answer once this node enforces it, with
        # the rule, as on one host (one host ignores it).
        r = self._request("POST", "/v1/rules", json=dict(body), ok=(200, 201, 202),
                          params={"wait": "applied"})
        if r.status_code == 202:
            return cast(FleetWrite, r.json()), True
        return cast(Rule, r.json()), r.status_code == 201

    def rule_pages(
        self, page_size: int = 10_000, source: str | None = None
    ) -> Iterator[RulePage]:
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": page_size}
            if source is not None:
                params["source"] = source
            if cursor is not None:
                params["cursor"] = cursor
            page = cast(RulePage, self._request("GET", "/v1/rules", params=params).json())
            yield page
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def rules(self, page_size: int = 10_000, source: str | None = None) -> list[Rule]:
        """Every rule (or every rule `source` holds), in id order (follows next_cursor)."""
        out: list[Rule] = []
        for page in self.rule_pages(page_size, source):
            out.extend(page["rules"])
        return out

    def rule(self, rule_id: int) -> Rule:
        """GET /v1/rules/{id}: one rule with its counters."""
        r = self._request("GET", f"/v1/rules/{rule_id}", not_found=_no_rule(rule_id))
        return cast(Rule, r.json())

    def delete_rule(self, rule_id: int) -> None:
        self._request("DELETE", f"/v1/rules/{rule_id}", ok=(204,), not_found=_no_rule(rule_id),
                      params={"wait": "applied"})  # fleet mode: once this node is done

    def bulk_text(
        self,
        text: str,
        *,
        action: str = "drop",
        mode: str = "enforce",
        comment: str = "",
        ttl_seconds: int | None = None,
        timeout: float = 300.0,
        source: str | None = None,
    ) -> BulkResult:
        """POST /v1/rules/bulk with one address/CIDR per line; all or nothing per call.
        `source`: a source load (held by it; protected overlaps reported, not refused)."""
        params: dict[str, str | int] = {"action": action, "mode": mode}
        if comment:
            params["comment"] = comment
        if ttl_seconds is not None:
            params["ttl_seconds"] = ttl_seconds
        if source is not None:
            params["source"] = source
        r = self._request(
            "POST",
            "/v1/rules/bulk",
            params=params,
            content=text.encode(),
            headers={"Content-Type": "text/plain"},
            ok=(201,),
            timeout=timeout,
        )
        return cast(BulkResult, r.json())

    def lookup(
        self, src: str, dst: str | None = None, proto: str | None = None,
        dport: int | None = None, tcp_flags: str | None = None,
    ) -> Lookup:
        """GET /v1/lookup: the data plane's verdict for such a packet and the rules matching."""
        params: dict[str, str | int] = {"src": src}
        for name, value in (("dst", dst), ("proto", proto), ("dport", dport),
                            ("tcp_flags", tcp_flags)):
            if value is not None:
                params[name] = value
        return cast(Lookup, self._request("GET", "/v1/lookup", params=params).json())

    # --- sources (issue 13) ---------------------------------------------------------------

    def delete_where(
        self, src: str | None = None, dst: str | None = None, source: str | None = None
    ) -> int:
        """DELETE /v1/rules?src=&dst=&source=: the holdings removed."""
        params = {k: v for k, v in (("src", src), ("dst", dst), ("source", source)) if v}
        r = self._request("DELETE", "/v1/rules", params=params)
        return cast(Removed, r.json())["removed"]

    def sources(self) -> list[Source]:
        return cast(list[Source], self._request("GET", "/v1/sources").json())

    # -- fleet mode (docs/fleet.md) --
    def fleet_nodes(self) -> list[FleetNode]:
        """GET /v1/fleet/nodes (404: this node does not run with --etcd)."""
        r = self._request("GET", "/v1/fleet/nodes", not_found=_NO_FLEET)
        return cast(list[FleetNode], r.json())

    def fleet_rules(self, source: str | None = None) -> list[FleetRule]:
        """GET /v1/fleet/rules: the single rules in the fleet store, with their scope."""
        r = self._request("GET", "/v1/fleet/rules", not_found=_NO_FLEET,
                          params={"source": source} if source else None)
        return cast(list[FleetRule], r.json())

    def fleet_protected(self) -> FleetProtected:
        """GET /v1/fleet/protected: the fleet's protected prefixes (and this node's own)."""
        r = self._request("GET", "/v1/fleet/protected", not_found=_NO_FLEET)
        return cast(FleetProtected, r.json())

    def set_fleet_protected(
        self, prefixes: list[str], revision: int | None = None
    ) -> FleetProtected | None:
        """PUT /v1/fleet/protected (the whole list), answered once this node enforces it;
        `revision`: only if the list is still that revision's, else None (409: retry)."""
        body: dict[str, Any] = {"prefixes": prefixes}
        if revision is not None:
            body["revision"] = revision
        r = self._request("PUT", "/v1/fleet/protected", ok=(200, 409), not_found=_NO_FLEET,
                          json=body, params={"wait": "applied"})
        return None if r.status_code == 409 else cast(FleetProtected, r.json())

    def source(self, name: str, limit: int = 100, cursor: str | None = None) -> SourceDetail:
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = self._request("GET", f"/v1/sources/{name}", params=params,
                          not_found=_no_source(name))
        return cast(SourceDetail, r.json())

    def replace_source(
        self,
        name: str,
        text: str | bytes,
        *,
        action: str = "drop",
        mode: str = "enforce",
        comment: str = "",
        ttl_seconds: int | None = None,
        timeout: float = 600.0,
        nodes: list[str] | None = None,
        selector: dict[str, str] | None = None,
    ) -> SourceChange:
        """PUT /v1/sources/{name} with a list (text): the source holds exactly these.
        `nodes`/`selector`: fleet mode, only the nodes in that scope enforce it."""
        params: dict[str, str | int] = {"action": action, "mode": mode, "wait": "applied"}
        if comment:
            params["comment"] = comment
        if ttl_seconds is not None:
            params["ttl_seconds"] = ttl_seconds
        if nodes is not None:
            params["nodes"] = ",".join(nodes)
        if selector is not None:
            params["selector"] = ",".join(f"{k}={v}" for k, v in selector.items())
        r = self._request(
            "PUT",
            f"/v1/sources/{name}",
            params=params,
            content=text.encode() if isinstance(text, str) else text,
            headers={"Content-Type": "text/plain"},
            timeout=timeout,
        )
        return cast(SourceChange, r.json())

    def delete_source(self, name: str) -> int:
        r = self._request("DELETE", f"/v1/sources/{name}", not_found=_no_source(name))
        return cast(Removed, r.json())["removed"]

    # issue 16: bans

    def bans(self) -> Bans:
        """GET /v1/limits/banned: the (rule, source) pairs dropped outright now."""
        return cast(Bans, self._request("GET", "/v1/limits/banned").json())

    def unban(self, source: str | None = None, rule: int | None = None) -> Unban:
        """DELETE /v1/limits/banned: lift a source's and/or a rule's bans (neither: all)."""
        params: dict[str, str | int] = {}
        if source is not None:
            params["source"] = source
        if rule is not None:
            params["rule"] = rule
        return cast(Unban, self._request("DELETE", "/v1/limits/banned", params=params).json())

    def stats(self, top: int | None = None) -> Stats:
        params = {"top": top} if top is not None else {}
        return cast(Stats, self._request("GET", "/v1/stats", params=params).json())

    # X-ray (issue 17)

    def set_sample(self, rule_id: int, every: int | None) -> None:
        """PUT (every) or DELETE (None) /v1/rules/{id}/sample."""
        if every is None:
            self._request("DELETE", f"/v1/rules/{rule_id}/sample", ok=(204,),
                          not_found=_no_rule(rule_id))
        else:
            self._request("PUT", f"/v1/rules/{rule_id}/sample", json={"every": every},
                          not_found=_no_rule(rule_id))

    def events(self, params: Mapping[str, str | int | list[int]]) -> Iterator[tuple[str, Any]]:
        """GET /v1/events: (event, JSON data) as they come; ("keepalive", None) for the
        stream's keepalive comments, so a caller with a deadline gets a turn every second."""
        try:
            with self._http.stream(
                "GET", "/v1/events", params=dict(params),
                timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 15.0)),
            ) as r:
                if r.status_code != 200:
                    r.read()
                    raise error_for(r, self.token)
                event, data = "message", list[str]()
                for line in r.iter_lines():
                    if not line:
                        if data:
                            yield event, json.loads("\n".join(data))
                        event, data = "message", []
                    elif line.startswith(":"):
                        yield "keepalive", None
                    else:
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if name == "event":
                            event = value
                        elif name == "data":
                            data.append(value)
        except httpx.TimeoutException as exc:
            raise ClientError(
                f"the event stream of {self.base_url} went silent ({type(exc).__name__}); "
                "is the service stuck? check its log",
                EXIT_UNREACHABLE,
            ) from exc
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the xdpfw API at {self.base_url} ({_reason(exc)}): {START_HINT}",
                EXIT_UNREACHABLE,
            ) from exc


def _no_source(name: str) -> str:
    return f"no source {name!r} (list them with `xdpfw source ls`)"


def _no_rule(rule_id: int) -> str:
    return f"no rule {rule_id} (list them with `xdpfw rule ls`)"


def _bad_url(url: str, exc: Exception) -> str:
    return f"bad API URL {url!r} ({exc}); use e.g. --api http://127.0.0.1:8000"


def _reason(exc: httpx.TransportError) -> str:
    """The innermost OS reason ('Connection refused'), else the exception's text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\]]+)", text)
    return m.group(1) if m else (text or type(exc).__name__)
