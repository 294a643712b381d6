"""CrowdSec decisions as xdpfw rules: the stream's shapes, Go durations, the mapping, backoff.

No I/O here (the HTTP client and the loop that applies decisions to the service are in
`api/crowdsec.py`). The Local API (LAPI) answers `GET /v1/decisions/stream` with
`{"new": [...] | null, "deleted": [...] | null}`; each decision reads

    {"id": 7, "origin": "cscli", "scenario": "crowdsecurity/ssh-bf", "scope": "Ip",
     "type": "ban", "value": "198.51.100.7", "duration": "3h59m56.9s"}

A `ban` on scope `Ip` becomes a drop rule for that host, a `ban` on `Range` one for that
prefix (IPv4 or IPv6; host bits are cleared, as CrowdSec matches the range), its `duration` the
rule's TTL and its `scenario` the rule's comment. Everything else (captcha, throttle, custom
types; scopes such as Country or AS; unparsable values) is ignored, with a reason.
"""

from __future__ import annotations

import ipaddress
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from xdpfw.errors import InvalidRule
from xdpfw.rules import Network, parse_network

__all__ = [
    "SOURCE",
    "Backoff",
    "Ban",
    "Decision",
    "Ignored",
    "StreamAnswer",
    "StreamFormatError",
    "latest_bans",
    "map_decision",
    "parse_go_duration",
    "parse_stream",
]

SOURCE = "crowdsec"  # the rule source every CrowdSec decision lands in
COMMENT_MAX = 200  # a scenario longer than this is cut in the rule's comment


# -- Go durations --------------------------------------------------------------------------

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """A Go `time.Duration` string (`3h59m56.9s`, `-101.2ms`, `1h30m`, `0`) in seconds.

    The grammar of Go's `time.ParseDuration`: an optional sign, then one or more decimal
    numbers each with a unit (ns, us/µs, ms, s, m, h). Raises ValueError otherwise.
    """
    s = text.strip()
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"{text!r} is not a duration (e.g. 4h, 1m30s, 3h59m56.9s)")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(
                f"{text!r} is not a duration (e.g. 4h, 1m30s, 3h59m56.9s): a number needs a "
                "unit of ns, us, ms, s, m or h"
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


# -- the stream ----------------------------------------------------------------------------


class StreamFormatError(ValueError):
    """The LAPI answered something that is not a decision stream (the message says what)."""


@dataclass(frozen=True, slots=True)
class Decision:
    id: int
    origin: str
    scenario: str
    scope: str
    type: str
    value: str
    duration: float  # seconds left (negative for a deleted, already expired one)


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    new: list[Decision]
    deleted: list[Decision]


def _decision(item: object, where: str) -> Decision:
    if not isinstance(item, Mapping):
        raise StreamFormatError(f"{where}: expected a decision object, got {type(item).__name__}")
    try:
        value = item["value"]
        scope = item["scope"]
        kind = item["type"]
    except KeyError as exc:
        raise StreamFormatError(f"{where}: a decision without {exc.args[0]!r}") from None
    if not all(isinstance(v, str) for v in (value, scope, kind)):
        raise StreamFormatError(f"{where}: value, scope and type must be strings")
    raw_duration = item.get("duration")
    try:
        duration = parse_go_duration(raw_duration) if isinstance(raw_duration, str) else math.nan
    except ValueError:
        duration = math.nan  # map_decision ignores it, with the reason
    ident = item.get("id")
    return Decision(
        id=ident if isinstance(ident, int) else 0,
        origin=str(item.get("origin") or ""),
        scenario=str(item.get("scenario") or ""),
        scope=scope,
        type=kind,
        value=value,
        duration=duration,
    )


def parse_stream(body: object) -> StreamAnswer:
    """The JSON body of `/v1/decisions/stream` (already decoded) as decisions."""
    if not isinstance(body, Mapping):
        raise StreamFormatError(
            f"expected a JSON object with 'new' and 'deleted', got {type(body).__name__}"
        )
    lists: dict[str, list[Decision]] = {}
    for key in ("new", "deleted"):
        items = body.get(key)
        if items is None:
            lists[key] = []
        elif isinstance(items, list):
            lists[key] = [_decision(it, f"{key}[{i}]") for i, it in enumerate(items)]
        else:
            raise StreamFormatError(f"'{key}' must be a list or null, got {type(items).__name__}")
    return StreamAnswer(new=lists["new"], deleted=lists["deleted"])


# -- decisions as rules --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ban:
    """What one ban decision becomes: a drop of `network`, for `ttl` seconds."""

    network: Network
    ttl: int
    comment: str

    @property
    def src(self) -> str:
        return self.network.with_prefixlen


@dataclass(frozen=True, slots=True)
class Ignored:
    """A decision that makes no rule, and why (`kind`: a type, a scope, or a problem)."""

    kind: str
    reason: str


def decision_network(d: Decision) -> Network | Ignored:
    """The network a decision's value names (Ip: a host; Range: a prefix, host bits cleared)."""
    scope = d.scope.lower()
    if scope not in ("ip", "range"):
        return Ignored(f"scope {d.scope}", f"scope {d.scope!r} is not an address (Ip or Range)")
    text = d.value.strip()
    try:
        if scope == "ip":
            if "/" in text:
                raise InvalidRule("value", f"{text!r} is a range, not an Ip")
            return parse_network(text, "value")
        # CrowdSec matches every address inside the range: 198.51.100.7/24 is 198.51.100.0/24.
        return parse_network(ipaddress.ip_network(text, strict=False).with_prefixlen, "value")
    except (InvalidRule, ValueError) as exc:
        problem = exc.problem if isinstance(exc, InvalidRule) else str(exc)
        return Ignored("bad value", f"{d.scope} {d.value!r}: {problem}")


def map_decision(d: Decision) -> Ban | Ignored:
    """A decision from `new` as the rule it makes, or why it makes none."""
    if d.type.lower() != "ban":
        return Ignored(f"type {d.type}", f"type {d.type!r} (only 'ban' drops packets)")
    net = decision_network(d)
    if isinstance(net, Ignored):
        return net
    if math.isnan(d.duration):
        return Ignored("bad duration", f"{d.value}: duration is not a Go duration")
    if d.duration <= 0:
        return Ignored("expired", f"{d.value}: the decision has expired already")
    comment = (d.scenario or f"crowdsec {d.origin}".strip())[:COMMENT_MAX]
    return Ban(network=net, ttl=max(1, math.ceil(d.duration)), comment=comment)


def latest_bans(decisions: Iterable[Decision]) -> tuple[list[Ban], list[tuple[Decision, Ignored]]]:
    """The bans of `decisions`, one per network (the longest TTL wins), and the ignored ones."""
    best: dict[Network, Ban] = {}
    ignored: list[tuple[Decision, Ignored]] = []
    for d in decisions:
        got = map_decision(d)
        if isinstance(got, Ignored):
            ignored.append((d, got))
            continue
        held = best.get(got.network)
        if held is None or got.ttl > held.ttl:
            best[got.network] = got
    return list(best.values()), ignored


# -- retrying --------------------------------------------------------------------------------


class Backoff:
    """Exponential backoff with jitter: `first`, doubled per failure up to `cap` seconds.

    `next()` is the wait after one more failure; `reset()` after a success. The jitter (up to
    `jitter` of the wait, subtracted) keeps bouncers that lost the same LAPI from returning in
    step.
    """

    def __init__(
        self, first: float = 1.0, cap: float = 60.0, jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:  # fmt: skip
        if first <= 0 or cap < first or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < first <= cap and 0 <= jitter < 1")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        base = min(self.cap, self.first * (2.0 ** min(self.failures, 60)))
        self.failures += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.failures = 0
