"""`xdpfw stats`: per-rule counters and totals; the samples and rates `top` shares."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from xdpfw import abi
from xdpfw.cli import humanize as hz
from xdpfw.cli.output import print_json, rule_match, rule_verdict, table

if TYPE_CHECKING:
    from xdpfw.cli.client import Client, Rule, RuleStat, Stats

__all__ = [
    "STATS_EPILOG",
    "TOTALS",
    "TOTAL_LABELS",
    "Rates",
    "RuleCache",
    "Sample",
    "cmd_stats",
    "limited_text",
]

STATS_EPILOG = """Counters are cumulative since the rule was added. RATE is "-" unless --interval S
is given: then the counters are read twice, S seconds apart, and RATE is packets per second
(--json then adds a "rates" object next to the API's own fields).

examples:
  xdpfw stats
  xdpfw stats --top 10 --interval 2
  xdpfw stats --json | jq .totals.dropped
"""


# The totals' JSON field names (client.Totals), in ABI order, and how people read them.
TOTALS: tuple[str, ...] = tuple(stat.field for stat in abi.Stat.counters())
TOTAL_LABELS = {"packets": "frames", "non_ip": "non-IP"}


def limited_text(r: RuleStat) -> str:
    """A limit rule's limited frames, and banned ones when there are any; "-" for others."""
    lim = r.get("limit")
    if not lim:
        return "-"
    text = hz.count(lim["limited"])
    return f"{text} +{hz.count(lim['banned'])} banned" if lim["banned"] else text


def _totals(stats: Stats) -> dict[str, int]:
    return cast(dict[str, int], dict(stats["totals"]))


@dataclass
class Sample:
    t: float
    stats: Stats

    @staticmethod
    def take(api: Client, top: int | None = None) -> Sample:
        stats = api.stats(top)
        return Sample(time.monotonic(), stats)


@dataclass
class Rates:
    """Per second between two samples; rules present in both only."""

    interval: float
    totals: dict[str, float]
    pps: dict[int, float]
    bps: dict[int, float]

    @staticmethod
    def between(a: Sample, b: Sample) -> Rates:
        dt = max(b.t - a.t, 1e-6)
        ta, tb = _totals(a.stats), _totals(b.stats)
        totals = {k: max(0, tb[k] - ta[k]) / dt for k in ta}
        before = {r["id"]: r for r in a.stats["rules"]}
        pps: dict[int, float] = {}
        bps: dict[int, float] = {}
        for r in b.stats["rules"]:
            old = before.get(r["id"])
            if old is not None:
                pps[r["id"]] = max(0, r["packets"] - old["packets"]) / dt
                bps[r["id"]] = max(0, r["bytes"] - old["bytes"]) / dt
        return Rates(dt, totals, pps, bps)


class RuleCache:
    """Rule bodies by id for the stats/top tables (ids are never reused, so caching is safe)."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self.rules: dict[int, Rule | None] = {}

    def fetch(self, ids: Iterable[int], list_all_above: int = 50) -> None:
        from xdpfw.cli.client import ClientError

        missing = [i for i in ids if i not in self.rules]
        if len(missing) > list_all_above:
            found = {r["id"]: r for r in self.api.rules()}
            for i in missing:
                self.rules[i] = found.get(i)
            return
        for i in missing:
            try:
                self.rules[i] = self.api.rule(i)
            except ClientError as exc:
                if exc.status != 404:
                    raise
                self.rules[i] = None  # removed since the counters were read

    def match(self, rid: int) -> str:
        r = self.rules.get(rid)
        return rule_match(r) if r is not None else "(removed)"

    def verdict(self, rid: int) -> str:
        r = self.rules.get(rid)
        return rule_verdict(r) if r is not None else "-"


def cmd_stats(args: argparse.Namespace, api: Client) -> int:
    rates: Rates | None = None
    if args.interval is not None:
        first = Sample.take(api)
        time.sleep(args.interval)
        second = Sample.take(api)
        rates = Rates.between(first, second)
        stats = second.stats
        if args.top is not None:
            stats = {"totals": stats["totals"], "rules": stats["rules"][: args.top]}
    else:
        stats = api.stats(args.top)
    if args.json:
        out: dict[str, object] = dict(stats)
        if rates is not None:
            out["rates"] = {
                "interval_s": round(rates.interval, 3),
                "totals": {f"{k}_per_s": round(v, 3) for k, v in rates.totals.items()},
                "rules": {
                    str(r["id"]): {
                        "packets_per_s": round(rates.pps.get(r["id"], 0.0), 3),
                        "bytes_per_s": round(rates.bps.get(r["id"], 0.0), 3),
                    }
                    for r in stats["rules"]
                },
            }
        print_json(out)
        return 0
    cache = RuleCache(api)
    cache.fetch(r["id"] for r in stats["rules"])
    rows = [
        [
            str(r["id"]),
            cache.match(r["id"]),
            cache.verdict(r["id"]),
            hz.count(r["packets"]),
            hz.bytes_(r["bytes"]),
            hz.rate(rates.pps.get(r["id"]) if rates else None),
            hz.ago(r["last_hit"]),
            limited_text(r),
        ]
        for r in stats["rules"]
    ]
    if rows:
        print(
            table(
                ["RULE", "MATCH", "ACTION", "PACKETS", "BYTES", "RATE", "LAST HIT", "LIMITED"],
                rows,
                right=(0, 3, 4, 5, 7),
            )
        )
    else:
        print("no rules")
    t = _totals(stats)
    total_rows = [
        [
            TOTAL_LABELS.get(k, k),
            hz.bytes_(t[k]) if k == "bytes" else hz.count(t[k]),
            hz.rate(rates.totals[k] if rates else None, "B/s" if k == "bytes" else "pps"),
        ]
        for k in TOTALS
    ]
    print()
    print(table(["TOTALS", "COUNT", "RATE"], total_rows, right=(1, 2)))
    _print_samples(stats)
    return 0


def _print_samples(stats: Stats) -> None:
    """X-ray: sampled frames sent and lost, by reason (once anything was sampled)."""
    s = stats.get("samples")
    if not s or not (s["sent"] or s["lost_ring"] or s["lost_cap"] or s["lost_client"]):
        return
    print()
    print(
        f"samples: {hz.count(s['sent'])} sent; lost: {hz.count(s['lost_cap'])} over the cap "
        f"({s['max_pps']}/s), {hz.count(s['lost_ring'])} ring full, "
        f"{hz.count(s['lost_client'])} slow reader"
    )
