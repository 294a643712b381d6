"""/healthz never waits on the write lock, and never counts a change in progress (pure: the
real service and app over the stand-in datapath of tests/fakes.py)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import FirewallService, NewRule
from api.settings import Settings
from api.store import Store
from tests.fakes import FakeDatapath
from xdpfw.rules import Rule, RuleSpec

pytestmark = pytest.mark.pure


@dataclass
class SlowDatapath(FakeDatapath):
    """add_rules / add_codes commit to the compiler, then wait (map writes still going) until
    released."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def add_rules(self, rules: Sequence[Rule]) -> None:
        super().add_rules(rules)
        self.entered.set()
        assert self.release.wait(10)

    def add_codes(self, rule_ids: Sequence[int], codes: Sequence[int]) -> None:
        super().add_codes(rule_ids, codes)  # the service's bulk path (adds go through it)
        self.entered.set()
        assert self.release.wait(10)


def test_health_answers_during_a_change_with_the_state_before_it(tmp_path: Path) -> None:
    dp = SlowDatapath()
    store = Store(tmp_path / "rules.sqlite3")
    svc = FirewallService(dp, store)
    svc.reconcile()
    svc.attach("eth0", "auto")
    client = TestClient(create_app(Settings(state_dir=tmp_path), svc, "t" * 32))
    dp.release.set()
    svc.add(NewRule(RuleSpec.parse(src="198.18.0.1")))
    dp.release.clear()
    dp.entered.clear()

    adder = threading.Thread(target=svc.add, args=(NewRule(RuleSpec.parse(src="198.18.0.2")),))
    adder.start()
    try:
        assert dp.entered.wait(10)  # the change holds the lock, half done
        answers: list[dict[str, object]] = []
        poll = threading.Thread(target=lambda: answers.append(client.get("/healthz").json()))
        poll.start()
        poll.join(2)
        assert answers, "/healthz waited for the write lock"
        body = answers[0]
        assert body["rules"] == 1, body  # the state before the change, not a half-applied one
        assert body["capacity"]["rules"]["entries"] == 1, body  # type: ignore[index]
        assert [i["name"] for i in body["interfaces"]] == ["eth0"], body  # type: ignore[attr-defined]
    finally:
        dp.release.set()
        adder.join(10)
    assert client.get("/healthz").json()["rules"] == 2  # published as the change ended
    store.close()
