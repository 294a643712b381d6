"""Differential harness: the real loaded XDP program against the reference model.

    result = run(dp.prog_fd, frame)                   # one BPF_PROG_TEST_RUN -> Verdict
    result = run(dp.prog_fd, frame, repeat=1_000_000) # .ns_per_packet for benchmarks

    differ = Differ(dp)                               # the rules installed in dp
    mismatches = differ.check(frames)                 # [] when program and model agree

`run` drives BPF_PROG_TEST_RUN through xdpfw.kernel.bpfsys (the bpf(2) syscall via ctypes; bcc 0.26
has no wrapper and this module never imports bcc).

`Differ.check` compares, for every frame, the program's verdict (its return value) with
`xdpfw.verify.model.evaluate`, checks that the program never returns XDP_ABORTED nor modifies the
frame, and checks the counters per batch: it reads the per-rule counters (one batch syscall) and the
global counters before and after a batch of frames, and requires the per-rule deltas (packets
and bytes, for every rule) and the global deltas to equal the sums of the model's outcomes.
When a batch disagrees it bisects (re-running halves of the batch) down to the first offending
frame, which it checks on its own, exactly like a hand-written test. Sums cannot see two frames
of the same length trading credits, so every ``exact_every``-th frame is also re-run on its own
with every counter compared exactly. `Differ.minimize` then shrinks the rule set of a mismatch
to a small reproducer.

The model's `evaluate` looks at every rule; with thousands of rules the Differ hands it only the
candidates (rules without an address plus the rules whose network contains the frame's source
or destination), found with a per-rule-set `ModelIndex`. That is an optimisation of the test,
not of the oracle: rules outside the candidates cannot match, and every `cross_check_every`-th
frame is evaluated against the full rule list too.

Frames must be 14 (an Ethernet header) to MAX_FRAME bytes: the kernel refuses shorter input,
and hands an XDP program without multi-buffer support only the first MAX_FRAME bytes of a longer
one (the rest go to fragments the program never sees), which the model cannot know.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from xdpfw import abi
from xdpfw.abi import Stat, Table
from xdpfw.compiler import RuleCompiler, TableKey
from xdpfw.datapath import decode_key
from xdpfw.datapath.d248 import D248_TABLES, PrefixTable
from xdpfw.datapath.slots import ENTRY, ENTRY_SET_ID, SLOT, slot_fields
from xdpfw.errors import CapacityExceeded, KernelError
from xdpfw.kernel import bpfsys
from xdpfw.rules import Rule, RuleSpec
from xdpfw.verify import model

if TYPE_CHECKING:
    from xdpfw.datapath import Datapath

__all__ = [
    "MAX_FRAME",
    "MIN_FRAME",
    "Differ",
    "Mismatch",
    "ModelIndex",
    "RunResult",
    "Verdict",
    "check_batch",
    "d248_mismatches",
    "entry_mismatches",
    "rule_from_dict",
    "rule_to_dict",
    "run",
    "table_snapshot",
]

MIN_FRAME = model.ETH_HLEN
# PAGE_SIZE - XDP_PACKET_HEADROOM - sizeof(struct skb_shared_info) on x86_64 with 4 KiB pages:
# the linear part of a BPF_PROG_TEST_RUN XDP buffer (tests/test_differential.py checks it).
MAX_FRAME = 4096 - 256 - 320

_STATS = tuple(s for s in Stat if s is not Stat.MAX)
_SLOT = SLOT  # struct xdpfw_slot
_SLOT_NAMES = [f[0] for f in abi.Slot._fields_ if f[0] != "pad"]  # SLOT's fields, in order
_COUNTER = _SLOT_NAMES.index("counter")  # the counter index (the datapath assigns it)
_N_SLOT = len(_SLOT_NAMES)
_ENTRY = ENTRY  # struct xdpfw_entry: the first slot, then set_id
_U32 = struct.Struct("=I")


class Verdict(IntEnum):
    """enum xdp_action: what an XDP program returns."""

    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


_EXPECTED = {"pass": Verdict.PASS, "drop": Verdict.DROP}


@dataclass(frozen=True)
class RunResult:
    """One BPF_PROG_TEST_RUN: the verdict, the kernel's mean time per run, the frame after."""

    verdict: Verdict
    ns_per_packet: float
    data_out: bytes = b""


def run(prog_fd: int, frame: bytes, repeat: int = 1) -> RunResult:
    """Run the loaded XDP program ``prog_fd`` on ``frame`` ``repeat`` times.

    ns_per_packet is the kernel's average over the repetitions (its clock is read around the
    whole loop, so use a large ``repeat``, e.g. 1e6, for a benchmark). Every repetition bumps
    the program's counters. Raises ValueError for a frame outside MIN_FRAME..MAX_FRAME bytes or
    an unknown return code, KernelError when the syscall fails.
    """
    if not MIN_FRAME <= len(frame) <= MAX_FRAME:
        raise ValueError(
            f"a {len(frame)}-byte frame: BPF_PROG_TEST_RUN takes {MIN_FRAME}-{MAX_FRAME} bytes"
        )
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    try:
        out = bpfsys.prog_test_run(prog_fd, frame, repeat)
    except OSError as exc:
        raise KernelError("BPF_PROG_TEST_RUN", exc.errno or 0, str(exc)) from exc
    try:
        verdict = Verdict(out.retval)
    except ValueError:
        raise ValueError(f"the program returned {out.retval}, not an XDP action") from None
    return RunResult(verdict, float(out.duration_ns), out.data_out)


# --- rules as plain data (the corpus format) ----------------------------------------------------


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    """A rule as RuleSpec.parse keyword arguments plus its id (JSON-ready)."""
    out: dict[str, Any] = {"id": rule.id, "action": str(rule.action), "mode": str(rule.mode)}
    if rule.src is not None:
        out["src"] = rule.src.with_prefixlen
    if rule.dst is not None:
        out["dst"] = rule.dst.with_prefixlen
    if rule.proto is not None:
        out["proto"] = str(rule.proto)
    if rule.dport is not None:
        out["dport"] = str(rule.dport)
    return out


def rule_from_dict(data: dict[str, Any]) -> Rule:
    """The inverse of rule_to_dict (validated by RuleSpec.parse).

    Addresses become network objects first: the corpus probes the data plane with IPv6 rules
    in ::ffff:0:0/96, which the text parser would turn into IPv4 ones.
    """
    kwargs = {k: v for k, v in data.items() if k != "id"}
    for name in ("src", "dst"):
        if isinstance(kwargs.get(name), str):
            kwargs[name] = ipaddress.ip_network(kwargs[name])
    return RuleSpec.parse(**kwargs).with_id(int(data["id"]))


def _describe(rule: Rule) -> str:
    return f"#{rule.id} {rule.action}/{rule.mode} {rule.describe()}"


# --- the model, indexed -------------------------------------------------------------------------


class ModelIndex:
    """The rules that can possibly match a frame, to keep the model's O(rules) scan short.

    Candidates are every rule without an address plus, for the frame's source and destination,
    the rules whose network (for each prefix length in use) contains the address. A superset of
    the matching rules, so ``model.evaluate(index.candidates(p), frame)`` is the model's answer.
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.addressless: list[Rule] = []
        self._by_net: dict[tuple[str, int, int, int], list[Rule]] = {}
        self._plens: dict[tuple[str, int], list[int]] = {}
        plens: dict[tuple[str, int], set[int]] = {}
        for rule in rules:
            net = rule.src if rule.src is not None else rule.dst
            if net is None:
                self.addressless.append(rule)
                continue
            side = "src" if rule.src is not None else "dst"
            key = (side, net.version, net.prefixlen, int(net.network_address))
            self._by_net.setdefault(key, []).append(rule)
            plens.setdefault((side, net.version), set()).add(net.prefixlen)
        self._plens = {k: sorted(v) for k, v in plens.items()}

    def candidates(self, parsed: model.Parsed) -> list[Rule]:
        out = list(self.addressless)
        if parsed.status != "ok":
            return out
        for side, addr in (("src", parsed.src), ("dst", parsed.dst)):
            if addr is None:
                continue
            bits = addr.max_prefixlen
            value = int(addr)
            for plen in self._plens.get((side, addr.version), ()):
                masked = value >> (bits - plen) << (bits - plen) if plen else 0
                out.extend(self._by_net.get((side, addr.version, plen, masked), ()))
        return out


# --- mismatches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """A frame on which the program and the model disagree, with what each said.

    kind: "aborted", "verdict", "modified" (the program changed the frame), "rule_counters",
    "global_counters", "stale_counters" (counters of rules that are not installed),
    "unreproducible" (a batch disagreed, none of its frames alone does) or "index" (a harness
    self-check: the ModelIndex lost a rule).
    """

    kind: str
    rules: tuple[Rule, ...]
    frame: bytes
    expected: str
    got: str
    note: str = ""

    def reproducer(self, name: str = "reproducer", why: str = "") -> dict[str, Any]:
        """The mismatch in the regression-corpus format (tests/corpus/*.json)."""
        return {
            "name": name,
            "why": why or f"{self.kind}: expected {self.expected}, got {self.got}."
            + (f" {self.note}" if self.note else ""),
            "rules": [rule_to_dict(r) for r in sorted(self.rules, key=lambda r: r.id)],
            "frames": [self.frame.hex()],
        }

    def __str__(self) -> str:
        listed = "\n".join(f"    {_describe(r)}" for r in sorted(self.rules, key=lambda r: r.id))
        return (
            f"{self.kind} mismatch: expected {self.expected}, got {self.got}"
            + (f"\n  note: {self.note}" if self.note else "")
            + f"\n  rules ({len(self.rules)}):\n{listed or '    (none)'}"
            + f"\n  frame ({len(self.frame)} bytes): {self.frame.hex()}"
            + "\n  corpus entry: "
            + json.dumps(self.reproducer())
        )


def _outcome_text(out: model.Outcome) -> str:
    credit = "nobody" if out.rule_id is None else f"rule {out.rule_id}"
    return f"{out.action} (verdict class {out.verdict}, credited to {credit})"


def _nonzero(stats: dict[Stat, int]) -> dict[str, int]:
    return {s.name: v for s, v in stats.items() if v}


Counts = dict[int, tuple[int, int]]


def _delta(before: Counts, after: Counts) -> Counts:
    out: Counts = {}
    for rid in before.keys() | after.keys():
        b, a = before.get(rid, (0, 0)), after.get(rid, (0, 0))
        d = (a[0] - b[0], a[1] - b[1])
        if d != (0, 0):
            out[rid] = d
    return out


# --- the differ ---------------------------------------------------------------------------------


class Differ:
    """Runs frames through the program in ``dp`` and compares with the model of ``rules``.

    ``rules`` (default: what dp holds) must be exactly the installed rules. Change rules through
    `add`/`remove`/`replace` so the Differ's view follows. Not thread-safe.
    """

    def __init__(
        self,
        dp: Datapath,
        rules: Iterable[Rule] | None = None,
        *,
        batch: int = 1024,
        full_model_upto: int = 16,
        cross_check_every: int = 64,
        exact_every: int = 500,
    ) -> None:
        self.dp = dp
        self.batch = batch
        self.exact_every = exact_every
        self.full_model_upto = full_model_upto
        self.cross_check_every = cross_check_every
        self.frames_checked = 0
        self.batches_checked = 0
        self.verdicts: dict[int, int] = {}  # model verdict class -> frames
        installed = {r.id: r for r in dp.rules()}
        if rules is not None:
            wanted = {r.id: r for r in rules}
            if wanted != installed:
                raise ValueError(
                    f"the rules given ({len(wanted)}) are not the rules installed "
                    f"({len(installed)}); install them first"
                )
        self._set_rules(installed)

    # -- rule changes --------------------------------------------------------------------------

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def _set_rules(self, rules: dict[int, Rule]) -> None:
        self._by_id = dict(rules)
        self._rules = tuple(sorted(rules.values(), key=lambda r: r.id))
        self._index = ModelIndex(self._rules)
        self._ids = frozenset(rules)

    def add(self, rules: Sequence[Rule]) -> bool:
        """Add rules (all or nothing). False when the datapath refused them for capacity, in
        which case this checks that nothing changed (AssertionError otherwise)."""
        before = table_snapshot(self.dp)
        try:
            self.dp.add_rules(rules)
        except CapacityExceeded:
            after = table_snapshot(self.dp)
            if after != before:
                changed = sorted(k for k in before.keys() | after.keys()
                                 if before.get(k) != after.get(k))
                raise AssertionError(
                    f"a refused add of {[_describe(r) for r in rules]} changed {changed}"
                ) from None
            if {r.id for r in self.dp.rules()} != self._ids:
                raise AssertionError("a refused add changed the rule list") from None
            return False
        self._set_rules({**self._by_id, **{r.id: r for r in rules}})
        return True

    def remove(self, rule_ids: Iterable[int]) -> None:
        ids = set(rule_ids)
        self.dp.remove_rules(sorted(ids))
        self._set_rules({rid: r for rid, r in self._by_id.items() if rid not in ids})

    def follow(self) -> tuple[Rule, ...]:
        """The rules were changed by someone else (the service, e.g. a source replace): take
        what the datapath now holds as the installed rules, and return them."""
        self._set_rules({r.id: r for r in self.dp.rules()})
        return self._rules

    def replace(self, rules: Sequence[Rule]) -> bool:
        """Remove every rule, then add ``rules`` in one batch (False if refused: then empty)."""
        if self._by_id:
            self.remove(list(self._by_id))
        return self.add(rules) if rules else True

    # -- the model -----------------------------------------------------------------------------

    def expect(self, frame: bytes) -> model.Outcome:
        """The model's outcome for ``frame`` under the installed rules."""
        if len(self._rules) <= self.full_model_upto:
            return model.evaluate(self._rules, frame)
        return model.evaluate(self._index.candidates(model.parse_frame(frame)), frame)

    def _expect_checked(self, frame: bytes, n: int) -> tuple[model.Outcome, Mismatch | None]:
        out = self.expect(frame)
        if (
            len(self._rules) > self.full_model_upto
            and self.cross_check_every
            and n % self.cross_check_every == 0
        ):
            full = model.evaluate(self._rules, frame)
            if full != out:
                return full, Mismatch(
                    "index", self._rules, frame, _outcome_text(full), _outcome_text(out),
                    "harness bug: ModelIndex.candidates lost a matching rule",
                )
        return out, None

    # -- counters ------------------------------------------------------------------------------

    def _rule_counts(self) -> Counts:
        return {rid: (c.packets, c.bytes) for rid, c in self.dp.rule_counters().items()}

    def _global_counts(self) -> dict[Stat, int]:
        return self.dp.global_counters().by_stat()

    def _run_counted(
        self, frames: Sequence[bytes]
    ) -> tuple[list[RunResult], Counts, dict[Stat, int], set[int]]:
        """Run frames; return results, rule and global counter deltas, and counter keys."""
        rb, gb = self._rule_counts(), self._global_counts()
        fd = self.dp.prog_fd
        results = [run(fd, f) for f in frames]
        ra, ga = self._rule_counts(), self._global_counts()
        return results, _delta(rb, ra), {s: ga[s] - gb[s] for s in _STATS}, set(ra)

    # -- checking ------------------------------------------------------------------------------

    def check(self, frames: Iterable[bytes], *, stop_at_first: bool = True) -> list[Mismatch]:
        """Check every frame (in batches of ``self.batch``); [] when all agree."""
        found: list[Mismatch] = []
        chunk: list[bytes] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) >= self.batch:
                found += self._check_chunk(chunk)
                chunk = []
                if found and stop_at_first:
                    return found
        if chunk:
            found += self._check_chunk(chunk)
        return found

    def _check_chunk(self, frames: list[bytes]) -> list[Mismatch]:
        for f in frames:
            if not MIN_FRAME <= len(f) <= MAX_FRAME:
                raise ValueError(f"a {len(f)}-byte frame cannot be test-run: {f.hex()}")
        found: list[Mismatch] = []
        outcomes: list[model.Outcome] = []
        for f in frames:
            out, bad = self._expect_checked(f, self.frames_checked + len(outcomes))
            outcomes.append(out)
            if bad is not None:
                found.append(bad)
        first = self.frames_checked
        results, rule_delta, global_delta, keys = self._run_counted(frames)
        self.frames_checked += len(frames)
        self.batches_checked += 1
        for f, out, res in zip(frames, outcomes, results, strict=True):
            self.verdicts[out.verdict] = self.verdicts.get(out.verdict, 0) + 1
            bad = self._verdict_mismatch(f, out, res)
            if bad is not None:
                found.append(bad)
        if keys != self._ids:
            found.append(Mismatch(
                "stale_counters", self._rules, frames[0],
                f"counters for exactly the installed rules {sorted(self._ids)[:20]}",
                f"counters for {sorted(keys)[:20]}",
                f"extra: {sorted(keys - self._ids)[:20]}, missing: {sorted(self._ids - keys)[:20]}",
            ))
        want_rules: Counts = {}
        for f, out in zip(frames, outcomes, strict=True):
            if out.rule_id is not None:
                p, b = want_rules.get(out.rule_id, (0, 0))
                want_rules[out.rule_id] = (p + 1, b + len(f))
        want_global = model.total_stats(outcomes)
        if rule_delta != want_rules or global_delta != want_global:
            bad = self._locate(frames)
            if bad is None:
                bad = Mismatch(
                    "unreproducible", self._rules, frames[0],
                    f"rule deltas {want_rules}, global {_nonzero(want_global)}",
                    f"rule deltas {rule_delta}, global {_nonzero(global_delta)}",
                    f"a batch of {len(frames)} frames disagreed but no part of it does on replay",
                )
            found.append(bad)
        if self.exact_every and not found:
            # Batch sums cannot see two frames trading credits (same verdict class, same length):
            # re-run a sample of the frames alone, with every counter checked exactly.
            for i in range(-first % self.exact_every, len(frames), self.exact_every):
                bad = self._exact(frames[i])
                if bad is not None:
                    found.append(bad)
                    break
        return found

    def _verdict_mismatch(
        self, frame: bytes, out: model.Outcome, res: RunResult
    ) -> Mismatch | None:
        want = _EXPECTED[out.action]
        if res.verdict is Verdict.ABORTED:
            return Mismatch("aborted", self._rules, frame, _outcome_text(out), "XDP_ABORTED")
        if res.verdict != want:
            return Mismatch(
                "verdict", self._rules, frame, _outcome_text(out), f"XDP_{res.verdict.name}"
            )
        if res.data_out != frame:
            return Mismatch(
                "modified", self._rules, frame, "the frame unchanged",
                f"{len(res.data_out)} bytes out: {res.data_out.hex()}",
            )
        return None

    def _locate(self, frames: list[bytes]) -> Mismatch | None:
        """Bisect a batch whose counters disagreed down to its first offending frame."""
        if len(frames) == 1:
            return self._exact(frames[0])
        mid = len(frames) // 2
        for half in (frames[:mid], frames[mid:]):
            outcomes = [self.expect(f) for f in half]
            _, rule_delta, global_delta, _ = self._run_counted(half)
            want: Counts = {}
            for f, out in zip(half, outcomes, strict=True):
                if out.rule_id is not None:
                    p, b = want.get(out.rule_id, (0, 0))
                    want[out.rule_id] = (p + 1, b + len(f))
            if rule_delta != want or global_delta != model.total_stats(outcomes):
                return self._locate(half)
        return None

    def check_frame(self, frame: bytes) -> Mismatch | None:
        """One frame, everything exact: verdict, frame, every rule's and the global deltas."""
        self.frames_checked += 1
        return self._exact(frame)

    def _exact(self, frame: bytes) -> Mismatch | None:
        out = self.expect(frame)
        full = model.evaluate(self._rules, frame)
        if full != out:
            return Mismatch("index", self._rules, frame, _outcome_text(full), _outcome_text(out),
                            "harness bug: ModelIndex.candidates lost a matching rule")
        (res,), rule_delta, global_delta, keys = self._run_counted([frame])
        bad = self._verdict_mismatch(frame, out, res)
        if bad is not None:
            return bad
        want = {} if out.rule_id is None else {out.rule_id: (1, len(frame))}
        if rule_delta != want:
            return Mismatch(
                "rule_counters", self._rules, frame,
                f"{_outcome_text(out)}: rule deltas {want}",
                f"XDP_{res.verdict.name}, rule deltas (packets, bytes) {rule_delta}",
            )
        if global_delta != out.stats():
            return Mismatch(
                "global_counters", self._rules, frame,
                f"{_outcome_text(out)}: global deltas {_nonzero(out.stats())}",
                f"XDP_{res.verdict.name}, global deltas {_nonzero(global_delta)}",
            )
        if keys != self._ids:
            return Mismatch(
                "stale_counters", self._rules, frame,
                f"counters for exactly the installed rules {sorted(self._ids)[:20]}",
                f"counters for {sorted(keys)[:20]}",
            )
        return None

    # -- reproducers ---------------------------------------------------------------------------

    def minimize(self, mismatch: Mismatch, max_trials: int = 300) -> Mismatch:
        """The same kind of mismatch on the same frame with as few rules as a greedy search
        finds, on freshly installed rules.

        Reinstalls rules in the datapath: afterwards it holds ``mismatch.rules`` again, freshly
        added. When the mismatch does not reproduce on a fresh install (it depends on the
        history of adds and removes), returns it unchanged with a note saying so.
        """
        frame = mismatch.frame
        original = list(mismatch.rules)

        def fails(rules: list[Rule]) -> Mismatch | None:
            """The same kind of mismatch on ``rules`` freshly installed, or None."""
            if not self.replace(rules):
                return None
            got = self._exact(frame)
            return got if got is not None and got.kind == mismatch.kind else None

        try:
            current = fails(original)
            if current is None:
                return Mismatch(
                    mismatch.kind, mismatch.rules, frame, mismatch.expected, mismatch.got,
                    (mismatch.note + " " if mismatch.note else "")
                    + "Does not reproduce on a fresh install of these rules: it depends on the "
                    "order of adds and removes before the frame.",
                )
            rules = original
            trials = 0
            chunk = max(1, len(rules) // 2)
            while chunk >= 1 and trials < max_trials:
                i = 0
                shrunk = False
                while i < len(rules) and trials < max_trials:
                    trial = rules[:i] + rules[i + chunk :]
                    trials += 1
                    got = fails(trial)
                    if got is not None:
                        rules, current, shrunk = trial, got, True
                    else:
                        i += chunk
                if not shrunk:
                    chunk //= 2
            return current
        finally:
            self.replace(original)

    # -- structure -----------------------------------------------------------------------------

    def check_entries(self) -> list[str]:
        """entry_mismatches(dp) for the rules this Differ knows (stale or missing entries)."""
        return entry_mismatches(self.dp, self._rules)


def check_batch(dp: Datapath, rules: Iterable[Rule], frames: Iterable[bytes]) -> list[Mismatch]:
    """Run ``frames`` through dp's program (holding exactly ``rules``); the disagreements."""
    return Differ(dp, rules).check(frames, stop_at_first=False)


# --- the maps, read back ------------------------------------------------------------------------


def table_snapshot(dp: Datapath) -> dict[str, list[tuple[bytes, bytes]]]:
    """Raw contents of every lookup table, the rule sets in use, the config and what the IPv4
    prefix cells resolve to (a digest: pfx indices may change, the answers may not): what a
    refused change must leave alone."""
    snap: dict[str, list[tuple[bytes, bytes]]] = {}
    for table in Table:
        if table is not Table.MAX:
            snap[table.map_name] = sorted(dp.table(table).dump_raw())
    used = {
        _U32.unpack_from(v, ENTRY_SET_ID)[0] for rows in snap.values() for _, v in rows
    } - {0}
    sets = dp.map("xdpfw_sets")
    snap["xdpfw_sets"] = sorted(
        (_U32.pack(i), raw) for i in used if (raw := sets.lookup_raw(_U32.pack(i))) is not None
    )
    conf = dp.map("xdpfw_config").lookup_raw(_U32.pack(0))
    snap["xdpfw_config"] = [(b"", conf or b"")]
    for table in D248_TABLES:
        pt = dp.table(table)
        assert isinstance(pt, PrefixTable)
        snap[abi.d248_maps(table)[0]] = [(b"", pt.digest())]
    return snap


def _slot_of(rule: Rule) -> tuple[int, ...]:
    """A rule's slot as SLOT unpacks it, without the counter index (the datapath assigns it)."""
    return _without_counter(slot_fields(rule, 0))


def _without_counter(s: Sequence[int]) -> tuple[int, ...]:
    return tuple(s[:_COUNTER]) + tuple(s[_COUNTER + 1 :])


def entry_mismatches(dp: Datapath, rules: Sequence[Rule] | None = None) -> list[str]:
    """Differences between dp's lookup tables and a fresh compile of ``rules`` (default: the
    rules dp says it holds): stale, missing or wrong entries, wrong slots, wrong per-table entry
    counts in xdpfw_config, counter indices that are missing, shared or differ between the
    slots of one rule, and IPv4 prefix cells that are not what the prefixes imply
    (`d248_mismatches`). [] when the maps are exactly what the rules compile to."""
    rules = list(dp.rules()) if rules is None else list(rules)
    fresh = RuleCompiler(dp.caps)
    if rules:
        fresh.commit(fresh.plan_add(rules))
    want = {key: tuple(_slot_of(r) for r in slots) for key, slots in fresh.entries()}
    got: dict[TableKey, tuple[tuple[int, ...], ...]] = {}
    counters: dict[int, set[int]] = {}  # rule id -> the counter indices its slots carry
    sets = dp.map("xdpfw_sets")
    for table in Table:
        if table is Table.MAX:
            continue
        for raw_key, raw in dp.table(table).dump_raw():
            fields = _ENTRY.unpack(raw)
            slots = [fields[:_N_SLOT]]
            set_id = fields[_N_SLOT]
            if set_id:
                raw_set = sets.lookup_raw(_U32.pack(set_id)) or b""
                for i in range(abi.SET_SLOTS):
                    s = _SLOT.unpack_from(raw_set, i * _SLOT.size)
                    if not s[0]:
                        break
                    slots.append(s)
            for s in slots:
                counters.setdefault(s[1], set()).add(s[_COUNTER])
            got[decode_key(table, bytes(raw_key))] = tuple(_without_counter(s) for s in slots)
    problems: list[str] = []
    for key in sorted(want.keys() | got.keys(), key=str):
        if key not in got:
            problems.append(f"missing entry {key}: want rules {[s[1] for s in want[key]]}")
        elif key not in want:
            problems.append(f"stale entry {key}: holds rules {[s[1] for s in got[key]]}")
        elif got[key] != want[key]:
            problems.append(
                f"wrong slots in {key}: rules {[s[1] for s in got[key]]}, "
                f"want {[s[1] for s in want[key]]}"
            )
    conf = dp.map("xdpfw_config").lookup_raw(_U32.pack(0)) or b""
    counts = list(struct.unpack_from(f"={abi.Table.MAX}I", conf, 4)) if conf else []
    if counts != fresh.table_counts():
        problems.append(f"xdpfw_config.n_entries {counts}, want {fresh.table_counts()}")
    owners: dict[int, int] = {}
    for rid, idx in sorted(counters.items()):
        if len(idx) != 1:
            problems.append(f"rule {rid}: its slots carry counter indices {sorted(idx)}")
            continue
        (one,) = idx
        if not 1 <= one <= dp.caps.max_rules:
            problems.append(f"rule {rid}: counter index {one} out of range")
        elif one in owners:
            problems.append(f"rules {owners[one]} and {rid} share counter index {one}")
        elif dp.counter_index(rid) != one:
            problems.append(
                f"rule {rid}: slots carry counter index {one}, the datapath says "
                f"{dp.counter_index(rid)}"
            )
        owners[one] = rid
    if dp.counter_indices_in_use() != len(rules):
        problems.append(
            f"{dp.counter_indices_in_use()} counter indices in use for {len(rules)} rules"
        )
    problems += d248_mismatches(dp, fresh)
    return problems


def d248_mismatches(dp: Datapath, compiled: RuleCompiler | None = None) -> list[str]:
    """The DIR-24-8 arrays of both directions, read through their mappings, against the
    compiler's prefixes, bit for bit: every tbl24 cell and every cell of every tbl8 group must
    name the pfx entry of its longest matching prefix (`d248.reference`, painted from the
    compiled keys alone), the key array must name each entry's prefix, and no /24 may hold a
    group without a longer prefix in it. `compiled`: the compiler to read the prefixes of
    (default: dp's own)."""
    comp = compiled or dp.compiler
    want: dict[Table, list[tuple[int, int]]] = {t: [] for t in D248_TABLES}
    for key, _ in comp.entries():
        if key.table in want:
            want[key.table].append((int.from_bytes(key.addr, "big"), key.plen))
    problems: list[str] = []
    for table, prefixes in want.items():
        pt = dp.table(table)
        assert isinstance(pt, PrefixTable)
        problems += pt.mismatches(prefixes)
    return problems
