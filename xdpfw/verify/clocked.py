"""The differential check of rate limits: the program against the model, with the kernel's clock.

A limit rule's verdict depends on time, and BPF_PROG_TEST_RUN cannot set the program's clock
(bpf_ktime_get_ns). So every frame is run between two reads of CLOCK_MONOTONIC, t0 and t1
(the same clock): the kernel's `now` for the frame lies in [t0, t1]. For each frame:

1. the model (`model.credit`, `LimitState.peek`) answers at t0 and at t1. Where the two agree
   (nearly always: a budget boundary must fall inside one run of a few microseconds), the
   program must give exactly that answer; where they differ, either is right;
2. the program's answer (passed / limited / banned) is read from the rule's own counters
   (xdpfw_limit_stats), and its verdict must be the one that answer implies;
3. the bucket and the ban the program left must be the ones the model computes for some now
   in [t0, t1] (a charged arrival time between its t0 and t1 values, an untouched bucket
   exactly equal, a new ban ending between t0 + ban and t1 + ban, a served ban deleted);
4. the model then takes the kernel's state, so the next frame starts from the same state.

Frames no limit rule is credited for are checked like `harness.Differ` does, and at the end
the global counters, every rule's packets/bytes and every limit rule's passed/limited/banned
must equal the sums of the model's outcomes.
"""

from __future__ import annotations

import ctypes
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xdpfw.abi import Stat
from xdpfw.datapath.limits import bucket_key
from xdpfw.rules import Action, Mode, Rule
from xdpfw.verify import model
from xdpfw.verify.harness import Verdict, run

if TYPE_CHECKING:
    from xdpfw.datapath import Datapath

__all__ = ["ClockedDiffer", "ClockedReport"]

_STATS = tuple(s for s in Stat if s is not Stat.MAX)
_ANSWERS = ("passed", "limited", "banned")


def _clock() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class ClockedReport:
    frames: int = 0
    limit_frames: int = 0  # frames credited to a limit rule
    ambiguous: int = 0  # a budget boundary fell inside the run: either answer was right
    answers: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)


class ClockedDiffer:
    """Checks frames against the model for the rules installed in ``dp`` (limits included)."""

    def __init__(self, dp: Datapath, *, max_mismatches: int = 5) -> None:
        self.dp = dp
        self.rules: tuple[Rule, ...] = tuple(dp.rules())
        self.state = model.LimitState()
        self.max_mismatches = max_mismatches
        # frame -> (parsed, credited rule): the rules do not change during a check
        self._credit: dict[bytes, tuple[model.Parsed, Rule | None]] = {}
        self._stats = dp.map("xdpfw_limit_stats")
        self._buckets = dp.map("xdpfw_buckets")
        self._bans = dp.map("xdpfw_bans")

    # -- the kernel's state of one bucket --------------------------------------------------------

    def _limit_counts(self, rule_id: int) -> tuple[int, int, int]:
        per_cpu = self._stats.lookup_percpu(ctypes.c_uint32(rule_id)) or []
        return (
            sum(int(c.passed) for c in per_cpu),
            sum(int(c.limited) for c in per_cpu),
            sum(int(c.banned) for c in per_cpu),
        )

    def _kernel_state(self, k: model.BucketKey) -> tuple[list[int] | None, int | None]:
        rule_id, family, addr = k
        key = bucket_key(rule_id, None)
        key.family = family
        ctypes.memmove(key.addr, addr, 16)
        b = self._buckets.lookup(key)
        ban = self._bans.lookup(key)
        return (
            None if b is None else [int(b.pkt_tat), int(b.byte_tat)],
            None if ban is None else int(ban.value),
        )

    # -- checking --------------------------------------------------------------------------------

    def check(self, frames: Iterable[bytes]) -> ClockedReport:
        rep = ClockedReport()
        outcomes: list[model.Outcome] = []
        g0 = self.dp.global_counters().by_stat()
        r0 = {rid: (c.packets, c.bytes) for rid, c in self.dp.rule_counters().items()}
        l0 = {rid: c for rid, c in self.dp.limit_counters().items()}
        fd = self.dp.prog_fd
        for frame in frames:
            rep.frames += 1
            known = self._credit.get(frame)
            if known is None:
                p = model.parse_frame(frame)
                known = self._credit[frame] = (p, model.credit(self.rules, p))
            p, rule = known
            if rule is None or rule.action is not Action.LIMIT:
                out = model.evaluate(self.rules, frame)
                got = run(fd, frame).verdict
                if got != (Verdict.DROP if out.action == "drop" else Verdict.PASS):
                    self._bad(rep, f"frame {rep.frames}: {got.name}, the model says {out.action}"
                              f" ({_who(rule)}): {frame.hex()}")
                outcomes.append(out)
                continue
            rep.limit_frames += 1
            checked = self._check_limited(rep, rule, p, frame, fd)
            if checked is not None:
                outcomes.append(checked)
            if len(rep.mismatches) >= self.max_mismatches:
                return rep
        self._check_totals(rep, outcomes, g0, r0, l0)
        return rep

    def _check_limited(
        self, rep: ClockedReport, rule: Rule, p: model.Parsed, frame: bytes, fd: int
    ) -> model.Outcome | None:
        assert rule.limit is not None
        lim = rule.limit
        k = self.state.key(rule, rule.id, p)
        old_bucket = list(self.state.buckets.get(k, [0, 0]))
        old_ban = self.state.bans.get(k)
        before = self._limit_counts(rule.id)
        t0 = _clock()
        verdict = run(fd, frame).verdict
        t1 = _clock()
        after = self._limit_counts(rule.id)
        moved = [a - b for a, b in zip(after, before, strict=True)]
        if sorted(moved) != [0, 0, 1]:
            self._bad(rep, f"frame {rep.frames}: rule #{rule.id}'s limit counters moved {moved}")
            return None
        answer = _ANSWERS[moved.index(1)]
        a0 = self.state.peek(rule, p, t0)[0]
        a1 = self.state.peek(rule, p, t1)[0]
        if a0 != a1:
            rep.ambiguous += 1
        if answer not in (a0, a1):
            self._bad(rep, f"frame {rep.frames}: rule #{rule.id} ({lim}) said {answer}, the "
                      f"model says {a0} at t0 and {a1} at t1; bucket {old_bucket}, ban {old_ban}")
            return None
        rep.answers[answer] += 1
        drop = rule.mode is Mode.ENFORCE and answer != "passed"
        if verdict != (Verdict.DROP if drop else Verdict.PASS):
            self._bad(rep, f"frame {rep.frames}: {verdict.name} for a {answer} frame of "
                      f"#{rule.id} ({rule.mode})")
            return None
        bucket, ban = self._kernel_state(k)
        problem = self._state_problem(rule, p, answer, t0, t1, old_bucket, old_ban, bucket, ban)
        if problem:
            self._bad(rep, f"frame {rep.frames}: rule #{rule.id} ({lim}), {answer}: {problem}")
            return None
        # the model at a time that gives the kernel's answer, then the kernel's exact state
        out = model.evaluate(self.rules, frame, limits=self.state, now=t1 if answer == a1 else t0)
        if bucket is None:
            self.state.buckets.pop(k, None)
        else:
            self.state.buckets[k] = bucket
        if ban is None:
            self.state.bans.pop(k, None)
        else:
            self.state.bans[k] = ban
        return out

    @staticmethod
    def _state_problem(
        rule: Rule,
        p: model.Parsed,
        answer: str,
        t0: int,
        t1: int,
        old: list[int],
        old_ban: int | None,
        bucket: list[int] | None,
        ban: int | None,
    ) -> str | None:
        lim = rule.limit
        assert lim is not None
        bans = bool(lim.ban_seconds) and rule.mode is Mode.ENFORCE
        if answer == "passed":
            if bucket is None:
                return "no bucket after a passed frame"
            costs = (lim.pkt_cost_ns if lim.pps else None,
                     lim.byte_cost_ns(p.length) if lim.bps else None)
            for i, cost in enumerate(costs):
                if cost is None:
                    if bucket[i] != old[i]:
                        return f"tat[{i}] changed without a rate: {old[i]} -> {bucket[i]}"
                    continue
                lo, hi = max(old[i], t0) + cost, max(old[i], t1) + cost
                if not lo <= bucket[i] <= hi:
                    return f"tat[{i}] {bucket[i]} outside [{lo}, {hi}]"
            if bans and ban is not None:
                return f"a ban ({ban}) survived a passed frame"
            return None
        if (bucket or [0, 0]) != old:
            return f"the bucket changed on a {answer} frame: {old} -> {bucket}"
        if answer == "banned":
            return None if ban == old_ban else f"the ban changed: {old_ban} -> {ban}"
        if bans:
            if ban is None or not t0 + lim.ban_ns <= ban <= t1 + lim.ban_ns:
                return f"ban end {ban} outside [{t0 + lim.ban_ns}, {t1 + lim.ban_ns}]"
        elif ban != old_ban:
            return f"a ban appeared without ban_seconds: {ban}"
        return None

    def _check_totals(
        self,
        rep: ClockedReport,
        outcomes: Sequence[model.Outcome],
        g0: dict[Stat, int],
        r0: dict[int, tuple[int, int]],
        l0: Mapping[int, object],
    ) -> None:
        g1 = self.dp.global_counters().by_stat()
        want = model.total_stats(outcomes)
        got = {s: g1[s] - g0[s] for s in _STATS}
        if got != want:
            diff = {s.field: (got[s], want[s]) for s in _STATS if got[s] != want[s]}
            self._bad(rep, f"global counters (program, model): {diff}")
        per_rule: dict[int, list[int]] = {}
        budgets: dict[int, Counter[str]] = {}
        for o in outcomes:
            if o.rule_id is None:
                continue
            acc = per_rule.setdefault(o.rule_id, [0, 0])
            acc[0] += 1
            acc[1] += o.bytes
            if o.budget is not None:
                budgets.setdefault(o.rule_id, Counter())[o.budget] += 1
        for rid, c in self.dp.rule_counters().items():
            p0, b0 = r0.get(rid, (0, 0))
            delta = [c.packets - p0, c.bytes - b0]
            if delta != per_rule.get(rid, [0, 0]):
                self._bad(rep, f"rule #{rid} counters {delta}, the model says {per_rule.get(rid)}")
        for rid, lc in self.dp.limit_counters().items():
            base = l0.get(rid)
            was = [getattr(base, a, 0) for a in _ANSWERS]
            now = [getattr(lc, a) for a in _ANSWERS]
            delta = [n - w for n, w in zip(now, was, strict=True)]
            expect = [budgets.get(rid, Counter())[a] for a in _ANSWERS]
            if delta != expect:
                self._bad(rep, f"rule #{rid} passed/limited/banned {delta}, the model {expect}")

    def _bad(self, rep: ClockedReport, text: str) -> None:
        rep.mismatches.append(text)


def _who(rule: Rule | None) -> str:
    return "no rule" if rule is None else f"#{rule.id} {rule.action}/{rule.mode}"


