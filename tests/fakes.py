"""An in-memory datapath for pure API tests: the `api.ports.DatapathPort` the service uses.

Plans are real (the pure `xdpfw.compiler.RuleCompiler` plans and commits every change, so
duplicates, capacities and table usage behave as in the kernel); counters and attachments are
plain dicts. `fail_next` makes the next map change raise, to test how errors travel.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from api.ports import CounterArrays
from xdpfw.abi import Table
from xdpfw.compiler import Capacities, RuleCompiler
from xdpfw.datapath import Attachment, GlobalCounters, RuleCounters
from xdpfw.errors import ForeignProgram, InterfaceNotFound, RuleNotFound, XdpfwError
from xdpfw.rules import Rule

__all__ = ["FakeDatapath"]

SMALL_CAPS = Capacities(max_rules=8192, max_prefixes=4096, max_sets=512)


@dataclass
class FakeDatapath:
    """A stand-in for xdpfw.datapath.Datapath, with the members the service calls."""

    caps: Capacities = SMALL_CAPS
    prog_id: int = 4242
    adopted: bool = False
    interfaces: set[str] = field(default_factory=lambda: {"eth0", "eth1"})  # that exist
    foreign: dict[str, int] = field(default_factory=dict)  # ifname -> someone else's prog id
    fail_next: XdpfwError | None = None
    totals: GlobalCounters = field(
        default_factory=lambda: GlobalCounters(0, 0, 0, 0, 0, 0, 0, 0)
    )
    compiler: RuleCompiler = field(init=False)
    hits: dict[int, RuleCounters] = field(default_factory=dict)  # rule id -> counters
    attached: dict[str, Attachment] = field(default_factory=dict)
    changes: int = 0  # map changes applied (reconcile tests: "nothing touched")
    # X-ray: the sampling maps and the ring, in memory
    sampled: dict[int, int] = field(default_factory=dict)  # rule id -> every
    sample_conf: tuple[int, int] = (0, 0)  # (snaplen, max_pps)
    sample_counts: dict[str, int] = field(
        default_factory=lambda: {"sent": 0, "lost_ring": 0, "lost_cap": 0}
    )
    ring: FakeRing = field(default_factory=lambda: FakeRing())

    def __post_init__(self) -> None:
        self.compiler = RuleCompiler(self.caps)

    # -- rules ---------------------------------------------------------------------------------

    def _maybe_fail(self) -> None:
        exc, self.fail_next = self.fail_next, None
        if exc is not None:
            raise exc

    def add_rules(self, rules: Sequence[Rule]) -> None:
        plan = self.compiler.plan_add(rules)
        self._maybe_fail()
        self.compiler.commit(plan)
        for r in plan.added:
            self.hits[r.id] = RuleCounters(0, 0, None)
        self.changes += 1

    def remove_rules(self, rule_ids: Iterable[int]) -> list[Rule]:
        plan = self.compiler.plan_remove(rule_ids)
        self._maybe_fail()
        self.compiler.commit(plan)
        for r in plan.removed:
            self.hits.pop(r.id, None)
            self.sampled.pop(r.id, None)
        self.changes += 1
        return plan.removed

    def rules(self) -> list[Rule]:
        return [self.compiler.rules[rid] for rid in sorted(self.compiler.rules)]

    # -- counters ------------------------------------------------------------------------------

    def hit(self, rule_id: int, packets: int, nbytes: int, when: float = 1.7e9) -> None:
        """Credit packets to a rule, as the XDP program would."""
        c = self.hits[rule_id]
        self.hits[rule_id] = RuleCounters(c.packets + packets, c.bytes + nbytes, when)

    def rule_counters(self, rule_ids: Iterable[int] | None = None) -> dict[int, RuleCounters]:
        ids = self.hits if rule_ids is None else rule_ids
        return {rid: self.hits[rid] for rid in ids if rid in self.hits}

    def top_counters(self, n: int | None = None) -> list[tuple[int, RuleCounters]]:
        ranked = sorted(self.hits.items(), key=lambda kv: (-kv[1].packets, kv[0]))
        return ranked if n is None else ranked[: max(n, 0)]

    def counter_arrays(self) -> CounterArrays:
        items = list(self.hits.items())
        return (
            np.array([rid for rid, _ in items], dtype=np.uint32),
            np.array([c.packets for _, c in items], dtype=np.uint64),
            np.array([c.bytes for _, c in items], dtype=np.uint64),
            np.array([int((c.last_hit or 0) * 1e9) for _, c in items], dtype=np.uint64),
        )

    def global_counters(self) -> GlobalCounters:
        return self.totals

    def table_usage(self) -> dict[str, tuple[int, int]]:
        counts = self.compiler.table_counts()
        usage = {
            t.map_name: (counts[t], self.caps.limit(t)) for t in Table if t is not Table.MAX
        }
        usage["rules"] = (len(self.compiler), self.caps.max_rules)
        usage["xdpfw_sets"] = (self.compiler.n_sets, self.caps.max_sets - 1)
        return usage

    # -- interfaces ----------------------------------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        if ifname not in self.interfaces:
            raise InterfaceNotFound(ifname)
        if ifname in self.foreign:
            raise ForeignProgram(ifname, self.foreign[ifname])
        att = self.attached.get(ifname)
        if att is None:
            index = sorted(self.interfaces).index(ifname) + 2
            att = Attachment(ifname, index, "generic" if mode == "generic" else "native",
                             self.prog_id)
            self.attached[ifname] = att
        return att

    def detach(self, ifname: str) -> None:
        if ifname not in self.interfaces:
            raise InterfaceNotFound(ifname)
        self.attached.pop(ifname, None)

    def attachments(self) -> list[Attachment]:
        return list(self.attached.values())

    # -- X-ray ---------------------------------------------------------------------------------

    def sample_configure(self, max_pps: int, snaplen: int) -> None:
        self.sample_conf = (snaplen, max_pps)

    def sample_set(self, every: dict[int, int | None]) -> None:
        for rid, n in every.items():
            if n and rid not in self.compiler.rules:
                raise RuleNotFound(rid)
        self._maybe_fail()
        for rid, n in every.items():
            if n:
                self.sampled[rid] = n
            else:
                self.sampled.pop(rid, None)

    def sample_rules(self) -> dict[int, int]:
        return dict(self.sampled)

    def sample_settings(self) -> tuple[int, int]:
        return self.sample_conf

    def sample_stats(self) -> dict[str, int]:
        return dict(self.sample_counts)

    def sample_ring(self) -> FakeRing:
        return self.ring


class FakeRing:
    """The ring buffer's stand-in: records put with `inject` are drained in order."""

    def __init__(self) -> None:
        self._records: deque[bytes] = deque()
        self._ready = threading.Condition()

    def inject(self, raw: bytes) -> None:
        with self._ready:
            self._records.append(raw)
            self._ready.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._ready:
            return self._ready.wait_for(lambda: bool(self._records), timeout)

    def drain(self, handle: Callable[[bytes], None], limit: int = 1 << 30) -> int:
        n = 0
        while n < limit:
            with self._ready:
                if not self._records:
                    break
                raw = self._records.popleft()
            handle(raw)
            n += 1
        return n

    def close(self) -> None:
        pass
