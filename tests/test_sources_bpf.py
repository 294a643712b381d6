"""Sources in the differential harness: the real service, SQLite and loaded program, against
the holdings model (xdpfw/verify/holdings.py) and the verdict model (xdpfw/verify/model.py).

A Hypothesis state machine replaces, adds to (with TTLs), deletes by value, expires and drops
sources through `FirewallService` over the real `Datapath`; after every step the installed
rules must be exactly the union the holdings model says (one rule per code, whoever holds it),
the database must agree, the maps must be a fresh compile, and random frames must get the
verdicts and counters the reference model gives for that union (`Differ.check`).
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from api.service import FirewallService, NewCodes, NewRule
from api.store import Store
from tests.test_differential import CI, frames_for, rule_specs
from xdpfw.datapath import Datapath
from xdpfw.rules import RuleSpec, rule_from_code
from xdpfw.verify.harness import Differ
from xdpfw.verify.holdings import Holdings

pytestmark = pytest.mark.bpf

SOURCES = ["api", "feed", "f2b"]
# Nested and neighbouring networks, so sources overlap and replaces cross covering prefixes.
ANCHORS = [
    (4, int(ipaddress.IPv4Address("198.18.7.1"))),
    (4, int(ipaddress.IPv4Address("198.18.7.200"))),
    (4, int(ipaddress.IPv4Address("198.19.0.9"))),
    (6, int(ipaddress.IPv6Address("2001:db8:7::1"))),
]
TTLS = st.none() | st.sampled_from([20, 80])  # expiries 30 s away from the sweeps' times
# Specs from a small pool (so sources often hold the same rule), plus any from the
# differential tests' generator around the same anchors.
POOL = [
    RuleSpec.parse(**kw) for kw in (
        {"src": "198.18.7.1"}, {"src": "198.18.7.0/24"}, {"src": "198.18.0.0/15"},
        {"src": "198.18.7.200"}, {"src": "198.18.7.128/25", "mode": "monitor"},
        {"src": "198.18.7.0/24", "proto": "udp", "dport": "1000-2000"},
        {"src": "198.18.7.1", "action": "allow"}, {"dst": "198.18.7.1"},
        {"dst": "198.19.0.0/16", "proto": "tcp", "dport": 80}, {"src": "2001:db8:7::/48"},
        {"src": "2001:db8:7::1"}, {"proto": "udp", "dport": 53, "mode": "monitor"},
    )
]
specs = st.one_of(
    st.sampled_from(POOL), st.sampled_from(POOL),
    rule_specs(ANCHORS).map(lambda kw: RuleSpec.parse(**kw)),
)


@pytest.fixture
def dp(soak_dp: Datapath) -> Datapath:
    return soak_dp  # conftest's soak-capacity program, emptied around each test


def _machine(dp: Datapath, tmp: Path) -> type[RuleBasedStateMachine]:
    runs = iter(range(1_000_000))

    class Sources(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            dp.remove_rules([r.id for r in dp.rules()])
            self.store = Store(tmp / f"rules-{next(runs)}.sqlite3")
            self.svc = FirewallService(dp, self.store)
            self.svc.reconcile()
            self.model = Holdings()
            self.differ = Differ(dp)
            self.now = time.time()

        def teardown(self) -> None:
            self.store.close()

        @rule(source=st.sampled_from(SOURCES), batch=st.lists(specs, min_size=1, max_size=12),
              ttl=TTLS)
        def replace(self, source: str, batch: list[RuleSpec], ttl: int | None) -> None:
            codes = [s.code() for s in batch]
            change = self.svc.replace_source(source, NewCodes(codes, ttl_seconds=ttl))
            exp = time.time() + ttl if ttl else None
            want = self.model.replace(source, codes, exp)
            assert (change.added, change.removed, change.unchanged) == want

        @rule(source=st.sampled_from(SOURCES), spec=specs, ttl=TTLS)
        def add(self, source: str, spec: RuleSpec, ttl: int | None) -> None:
            self.svc.add(NewRule(spec, ttl_seconds=ttl, force=True, source=source))
            self.model.add(source, spec.code(), time.time() + ttl if ttl else None)

        @precondition(lambda self: bool(self.model.union()))
        @rule(data=st.data(), everyone=st.booleans())
        def remove_by_value(self, data: st.DataObject, everyone: bool) -> None:
            code = data.draw(st.sampled_from(sorted(self.model.union())))
            r = rule_from_code(1, code)
            net = r.src if r.src is not None else r.dst
            if net is None:
                return
            source = None if everyone else data.draw(st.sampled_from(sorted(
                self.model.holders(code))))
            side = {"src": net.with_prefixlen} if r.src is not None else {
                "dst": net.with_prefixlen}
            n = self.svc.remove_where(**side, source=source)
            same = [c for c in self.model.union()
                    if getattr(rule_from_code(1, c), "src" if r.src is not None else "dst")
                    == net]
            assert n == self.model.release(source, same)

        @rule(source=st.sampled_from(SOURCES))
        def drop(self, source: str) -> None:
            if self.store.source(source) is None:
                return
            assert self.svc.drop_source(source) == self.model.drop(source)

        @rule(seconds=st.sampled_from([50, 101]))
        def expire(self, seconds: int) -> None:
            later = time.time() + seconds
            self.svc.expire_due(later)
            self.model.expire(later)

        @rule(data=st.data())
        def send(self, data: st.DataObject) -> None:
            rules = self.differ.follow()
            frames = data.draw(st.lists(frames_for(rules), min_size=1, max_size=30))
            found = self.differ.check(frames)
            assert not found, f"{found[0]}"

        @invariant()
        def the_kernel_holds_the_union(self) -> None:
            installed = {r.code(): r.id for r in dp.rules()}
            assert set(installed) == self.model.union()
            assert dict(self.store.codes()) == {rid: c for c, rid in installed.items()}
            holders = self.store.holders(installed.values())
            for code, rid in installed.items():
                assert set(holders[rid]) == self.model.holders(code)
            self.differ.follow()
            assert self.differ.check_entries() == []

    return Sources


def test_sources_state_machine(dp: Datapath, tmp_path: Path) -> None:
    run_state_machine_as_test(
        _machine(dp, tmp_path),
        settings=settings(CI, max_examples=25, stateful_step_count=20),
    )


def test_the_union_model() -> None:
    """The holdings model itself, on the shared-rule case the README names."""
    m = Holdings()
    a, b = (RuleSpec.parse(src=s).code() for s in ("198.18.7.1", "198.18.7.0/24"))
    assert m.replace("x", [a, b]) == (2, 0, 0)
    m.add("y", a)
    assert m.union() == {a, b} and m.holders(a) == {"x", "y"}
    assert m.replace("x", [b]) == (0, 1, 1)
    assert m.union() == {a, b}  # y still holds a
    assert m.drop("y") == 1 and m.union() == {b}
