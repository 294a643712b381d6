"""Adopting pinned maps without re-planning, and the service's code paths, on real maps and a
real SQLite database (the parts that make a million rules cheap)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.service import PROTECT_BASE, FirewallService, NewCodes, NewRule
from api.store import Store
from tests.conftest import TEST_CAPS, unique_pin_dir
from xdpfw import abi
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.errors import InvalidRule, RuleConflict
from xdpfw.rules import Rule, RuleSpec, parse_src_code
from xdpfw.verify.harness import entry_mismatches

pytestmark = pytest.mark.bpf


@pytest.fixture
def pins() -> Iterator[Path]:
    path = unique_pin_dir("scale")
    yield path
    if (path / "prog").exists():
        Datapath.open(DatapathConfig(bpffs_dir=path, caps=TEST_CAPS)).close(cleanup=True)
    assert not path.exists()


def _open(pins: Path) -> Datapath:
    return Datapath.open(DatapathConfig(bpffs_dir=pins, caps=TEST_CAPS))


def _mixed_rules(n: int, seed: int) -> list[Rule]:
    """Hosts, nested prefixes (entries that inherit, sets), ports, dst, IPv6 and address-less
    rules, all distinct."""
    rng = random.Random(seed)
    out: list[Rule] = []
    seen: set[int] = set()

    def add(**kw: object) -> None:
        spec = RuleSpec.parse(**kw)  # type: ignore[arg-type]
        if spec.code() not in seen:
            seen.add(spec.code())
            out.append(spec.with_id(len(out) + 1))

    for p in (22, 80):
        add(proto="tcp", dport=p)
    add(mode="monitor", proto="udp", dport="1000-2000")
    while len(out) < n:
        roll = rng.random()
        third = rng.randrange(256)
        if roll < 0.6:
            add(src=f"198.18.{third}.{rng.randrange(256)}")
        elif roll < 0.7:
            add(src=f"198.18.{third}.{rng.randrange(256)}", proto="tcp", dport=rng.randrange(1, 9))
        elif roll < 0.8:
            plen = rng.choice((16, 20, 24, 26))
            net = f"198.18.{third & (0xFF << (24 - plen)) & 0xFF if plen < 24 else third}.0"
            add(src=f"{net}/{plen}", action=rng.choice(("drop", "allow")))
        elif roll < 0.85:
            add(src=f"198.18.{third}.0/24", proto="udp", dport=rng.randrange(1, 5))
        elif roll < 0.92:
            add(dst=f"198.19.{third}.{rng.randrange(256)}", mode="monitor")
        elif roll < 0.96:
            add(src=f"2001:db8:{third:x}::{rng.randrange(1, 99):x}")
        else:
            add(dst=f"2001:db8:{third:x}::/{rng.choice((48, 56, 64))}", proto="icmpv6")
    return out


def _fit(dp: Datapath, rules: list[Rule]) -> list[Rule]:
    """The rules that can be added, in order, in chunks (a chunk too big for a prefix's slots
    is skipped)."""
    kept: list[Rule] = []
    for i in range(0, len(rules), 50):
        chunk = rules[i : i + 50]
        try:
            dp.add_rules(chunk)
        except Exception:
            continue
        kept.extend(chunk)
    return kept


def test_adopt_takes_the_maps_as_they_are(pins: Path) -> None:
    dp = _open(pins)
    try:
        rules = _fit(dp, _mixed_rules(1500, seed=3))
        assert len(rules) > 1000 and dp.compiler.n_sets > 10
        before = {
            "rules": dp.rules(),
            "entries": dict(dp.compiler.entries()),
            "usage": dp.table_usage(),
            "sets": dp.rule_set_ids(),
        }
    finally:
        dp.close()
    dp = _open(pins)
    try:
        assert dp.adopted
        assert dp.rules() == before["rules"]
        assert dict(dp.compiler.entries()) == before["entries"]
        assert dp.table_usage() == before["usage"]
        assert dp.rule_set_ids() == before["sets"]
        assert entry_mismatches(dp) == []
        # and it goes on changing exactly like a compiler that planned everything
        dp.remove_rules([r.id for r in rules[::3]])
        more = [r.spec().with_id(r.id + 100_000) for r in _mixed_rules(300, seed=4)]
        added = _fit(dp, more)
        assert added
        assert entry_mismatches(dp) == []
        assert {r.id for r in dp.rules()} == {r.id for r in rules} - {
            r.id for r in rules[::3]
        } | {r.id for r in added}
    finally:
        dp.close()


def _service(dp: Datapath, db: Path, protect: tuple[str, ...] = ()) -> FirewallService:
    return FirewallService(dp, Store(db), protect=protect)


def test_service_codes_path_reconcile_and_restart(pins: Path, tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    dp = _open(pins)
    try:
        svc = _service(dp, db, protect=("198.18.255.0/24",))
        assert svc.reconcile() == {"adopted": 0, "added": 0, "removed": 0}
        drop = abi.VERDICT_DROP
        codes = [parse_src_code(f"198.18.{i // 256}.{i % 256}", drop) for i in range(2000)]
        codes += [parse_src_code("198.19.0.0/24", drop), codes[5]]  # a repeat within the batch
        res = svc.bulk_add_codes(NewCodes(codes, "blocklist", ttl_seconds=3600))
        assert len(res.added) == 2001 and res.duplicates == [res.added[5].id]
        assert res.added[0].comment == "blocklist" and res.added[0].expires_at is not None
        stored = svc.get(res.added[2000].id)
        assert stored.rule.src is not None and str(stored.rule.src) == "198.19.0.0/24"
        assert stored.rule == dp.get_rule(stored.id)
        # existing duplicates, reported in input order, nothing added
        again = svc.bulk_add_codes(NewCodes(codes[:3]))
        assert again.added == [] and again.duplicates == [s.id for s in res.added[:3]]
        # the protected prefix: refused (all or nothing) unless forced
        with pytest.raises(RuleConflict, match=r"protected prefix 198\.18\.255\.0/24"):
            svc.bulk_add_codes(NewCodes([parse_src_code("198.18.0.0/16", drop), codes[0]]))
        with pytest.raises(RuleConflict, match="is a protected prefix"):
            svc.bulk_add([NewRule(RuleSpec.parse(action="allow", src="198.18.255.0/24"))])
        assert len(dp.compiler) == 2001 + 1
        assert entry_mismatches(dp) == []
        svc.store.close()
    finally:
        dp.close()

    # restart: everything agrees, nothing is touched
    dp = _open(pins)
    try:
        svc = _service(dp, db, protect=("198.18.255.0/24",))
        assert svc.reconcile() == {"adopted": 0, "added": 0, "removed": 0}
        # drift: a rule only in the maps, a rule only in the database, one changed
        extra = RuleSpec.parse(src="198.18.200.1").with_id(900_000)
        dp.add_rules([extra])
        dp.remove_rules([res.added[7].id])
        changed = res.added[8].id
        dp.remove_rules([changed])
        dp.add_rules([RuleSpec.parse(src="198.18.201.1").with_id(changed)])
        assert svc.reconcile() == {"adopted": 0, "added": 2, "removed": 2}
        assert {r.id: r for r in dp.rules()} == {
            **{s.id: s.rule for s in svc.store.all()},
            PROTECT_BASE: svc.protected[0],
        }
        assert entry_mismatches(dp) == []
        svc.store.close()
        # a lost database adopts the maps' rules
        new_db = tmp_path / "new.db"
        svc = _service(dp, new_db, protect=("198.18.255.0/24",))
        assert svc.reconcile() == {"adopted": 2001, "added": 0, "removed": 0}
        assert [s.rule for s in svc.store.all()] == [
            r for r in dp.rules() if r.id < PROTECT_BASE
        ]
        svc.store.close()
    finally:
        dp.close()


def test_text_bulk_fast_path_names_every_bad_line() -> None:
    from xdpfw.importers import bad_summary, list_codes

    body = "# list\n198.18.0.1\n198.18.0.1/24 ; host bits\n\n2001:db8::/32\n10.0.0.0/8\nx\n"
    with pytest.raises(InvalidRule) as fast:
        list_codes(body, "drop", "enforce")
    slow: list[tuple[int, str]] = []  # what RuleSpec.parse says of each bad line
    for lineno, entry in ((3, "198.18.0.1/24"), (7, "x")):
        with pytest.raises(InvalidRule) as exc:
            RuleSpec.parse(action="drop", mode="enforce", src=entry)
        slow.append((lineno, exc.value.problem))
    assert str(fast.value) == str(InvalidRule("body", bad_summary("line", slow)))
    assert "2 invalid line(s): 3, 7 --" in str(fast.value)
    good = "198.18.0.1\n2001:db8::/32 # v6\n10.0.0.0/8\n"
    assert list_codes(good, "drop", "monitor") == [
        RuleSpec.parse(action="drop", mode="monitor", src=src).code()
        for src in ("198.18.0.1", "2001:db8::/32", "10.0.0.0/8")
    ]
