"""Rate-limit state in the maps (issue 16): each limit rule's parameters, its counters, the
buckets and the bans (bpf/xdpfw_abi.h, the rate-limit section).

A limit rule's code says *that* it limits; how much lives beside it, keyed by rule id:
xdpfw_limits holds struct xdpfw_limit, xdpfw_limit_stats (per CPU) its passed / limited /
banned frames. The parameters are written before the rule's slot lands and removed after it
left, so the data plane never meets a limit slot without a budget in steady state (it passes
such a frame uncounted, the moment a rule is being added).
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from xdpfw import abi
from xdpfw.kernel import bpfsys
from xdpfw.rules import Limit, Per

__all__ = ["Ban", "LimitCounters", "LimitMaps", "limit_value", "monotonic_ns"]


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns() (bans end on it)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def limit_value(limit: Limit) -> abi.Limit:
    """struct xdpfw_limit of a rule's budget."""
    return abi.Limit(
        pkt_cost_ns=limit.pkt_cost_ns,
        pkt_window_ns=limit.pkt_window_ns,
        byte_rate=limit.bps or 0,
        byte_window_ns=limit.byte_window_ns,
        ban_ns=limit.ban_ns,
        per=abi.PER_RULE if limit.per is Per.RULE else abi.PER_SOURCE,
    )


def _limit_of(v: abi.Limit) -> Limit:
    """The budget back from struct xdpfw_limit (adoption); exact for what limit_value wrote."""
    # Above ~31623 pps several rates share one cost: the one read back has the same cost.
    pps = 10**9 // v.pkt_cost_ns if v.pkt_cost_ns else None
    burst = v.pkt_window_ns // v.pkt_cost_ns if v.pkt_cost_ns else None
    bps = v.byte_rate or None
    burst_bytes = None
    if bps:
        burst_bytes = -(-v.byte_window_ns * bps // 10**9)
        while burst_bytes * 10**9 // bps > v.byte_window_ns:
            burst_bytes -= 1
    return Limit(
        pps, burst, bps, burst_bytes, Per.RULE if v.per == abi.PER_RULE else Per.SOURCE,
        v.ban_ns // 10**9,
    )


@dataclass(frozen=True)
class LimitCounters:
    passed: int = 0
    limited: int = 0
    banned: int = 0


@dataclass(frozen=True)
class Ban:
    """A (rule, source) the data plane drops outright until `expires_in` seconds from now."""

    rule_id: int
    source: str  # the address; "*" for a per-rule bucket (never banned today)
    expires_in: float


def _source_text(key: abi.BucketKey) -> str:
    raw = bytes(key.addr)
    if key.family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if key.family == 6:
        return str(ipaddress.IPv6Address(raw))
    return "*"


def bucket_key(rule_id: int, source: str | None) -> abi.BucketKey:
    key = abi.BucketKey(rule_id=rule_id)
    if source is not None:
        addr = ipaddress.ip_address(source)
        packed = addr.packed
        key.family = addr.version
        ctypes.memmove(key.addr, packed, len(packed))
    return key


class LimitMaps:
    """The four rate-limit maps of one program."""

    def __init__(self, maps: dict[str, bpfsys.Map[Any, Any]]) -> None:
        self._limits = maps["xdpfw_limits"]
        self._stats = maps["xdpfw_limit_stats"]
        self._buckets = maps["xdpfw_buckets"]
        self._bans = maps["xdpfw_bans"]
        self._zero = [abi.LimitStats()] * self._stats.ncpus

    def install(self, rules: Iterable[tuple[int, Limit]]) -> None:
        """Parameters and zeroed counters of new limit rules (before their slots land)."""
        for rule_id, limit in rules:
            key = ctypes.c_uint32(rule_id)
            self._limits.update(key, limit_value(limit))
            self._stats.update_percpu(key, self._zero)

    def remove(self, rule_ids: Iterable[int]) -> None:
        """Forget removed rules: parameters, counters, and their bans and buckets."""
        ids = set(rule_ids)
        for rule_id in ids:
            key = ctypes.c_uint32(rule_id)
            self._limits.delete(key)
            self._stats.delete(key)
        if not ids:
            return
        for m in (self._bans, self._buckets):
            stale = [k for k in list(m.keys()) if k.rule_id in ids]
            for k in stale:
                m.delete(k)

    def read(self) -> dict[int, Limit]:
        """Every limit rule's budget (adoption of pinned maps)."""
        return {int(k.value): _limit_of(v) for k, v in self._limits.items()}

    def counters(self, rule_ids: Iterable[int] | None = None) -> dict[int, LimitCounters]:
        """Per limit rule: frames passed within the budget, limited, banned (CPUs summed)."""
        out: dict[int, LimitCounters] = {}
        if rule_ids is None:
            pairs: Iterable[tuple[Any, list[abi.LimitStats]]] = self._stats.items_percpu()
            for k, per_cpu in pairs:
                out[int(k.value)] = _sum(per_cpu)
            return out
        for rule_id in rule_ids:
            found = self._stats.lookup_percpu(ctypes.c_uint32(rule_id))
            if found is not None:
                out[rule_id] = _sum(found)
        return out

    def bans(self) -> list[Ban]:
        """The bans in force now (expired ones still in the map are not listed)."""
        now = monotonic_ns()
        out = []
        for k, until in self._bans.items():
            left = int(until.value) - now
            if left > 0:
                out.append(Ban(int(k.rule_id), _source_text(k), left / 1e9))
        return sorted(out, key=lambda b: (b.rule_id, b.source))

    def unban(self, source: str | None = None, rule_id: int | None = None) -> int:
        """Lift the bans of a source and/or a rule (both None: every ban); how many."""
        n = 0
        want = None if source is None else ipaddress.ip_address(source)
        for k in list(self._bans.keys()):
            if rule_id is not None and k.rule_id != rule_id:
                continue
            if want is not None and _source_text(k) != str(want):
                continue
            if self._bans.delete(k):
                n += 1
            # the bucket too: an unbanned source starts with a full budget
            self._buckets.delete(k)
        return n

    def bucket_count(self) -> int:
        return sum(1 for _ in self._buckets)


def _sum(per_cpu: list[abi.LimitStats]) -> LimitCounters:
    return LimitCounters(
        sum(int(c.passed) for c in per_cpu),
        sum(int(c.limited) for c in per_cpu),
        sum(int(c.banned) for c in per_cpu),
    )
