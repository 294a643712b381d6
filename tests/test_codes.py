"""Rule codes (rules as ints) and the compact compiler built on them, against brute force."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest

from xdpfw import abi, codes
from xdpfw.abi import Table
from xdpfw.compiler import LPM_TABLES, MAX_SLOTS, Capacities, RuleCompiler, TableKey, key_of
from xdpfw.errors import CapacityExceeded, InvalidRule, RuleConflict
from xdpfw.rules import (
    Rule,
    RuleSpec,
    code_from_texts,
    code_texts,
    parse_network,
    parse_src_code,
    rule_from_code,
)

pytestmark = pytest.mark.pure


def _random_spec(rng: random.Random) -> RuleSpec:
    v6 = rng.random() < 0.3
    action, mode = rng.choice([("drop", "enforce"), ("drop", "monitor"), ("allow", "enforce")])
    proto = rng.choice([None, None, "tcp", "udp", "icmpv6" if v6 else "icmp"])
    dport = None
    if proto in ("tcp", "udp") and rng.random() < 0.5:
        lo = rng.randrange(65536)
        dport = f"{lo}-{rng.randrange(lo, 65536)}" if rng.random() < 0.5 else str(lo)
    where = rng.choice(["src", "src", "dst", "none"])
    if where == "none" and proto is None:
        where = "src"
    net = None
    if where != "none":
        bits = 128 if v6 else 32
        plen = rng.choice([bits, bits, rng.randrange(0, bits + 1)])
        base = 0x20010DB8 << 96 if v6 else 0xC6120000
        addr = (base | rng.getrandbits(17 if not v6 else 40)) >> (bits - plen) << (bits - plen)
        kind = ipaddress.IPv6Network if v6 else ipaddress.IPv4Network
        net = str(kind((addr, plen)))
    return RuleSpec.parse(
        action=action,
        mode=mode,
        src=net if where == "src" else None,
        dst=net if where == "dst" else None,
        proto=proto,
        dport=dport,
    )


def test_code_round_trips_rank_and_texts() -> None:
    rng = random.Random(1)
    seen = set()
    for i in range(3000):
        spec = _random_spec(rng)
        rid = rng.randrange(1, abi.RANK_ID_MASK + 1)
        rule = spec.with_id(rid)
        code = spec.code()
        back = rule_from_code(rid, code)
        assert back == rule, (i, rule)
        assert codes.rank(code, rid) == rule.rank() == back.rank()
        action, mode, src, dst, proto, dport = code_texts(code)
        assert (action, mode, proto) == (
            rule.action.value,
            rule.mode.value,
            rule.proto.value if rule.proto else None,
        )
        assert src == (rule.src.with_prefixlen if rule.src else None)
        assert dst == (rule.dst.with_prefixlen if rule.dst else None)
        assert dport == (str(rule.dport) if rule.dport else None)
        assert code_from_texts(action, mode, src, dst, proto, dport) == code
        assert key_of(rule) == key_of(back)
        seen.add((code, spec))
    # equal codes <=> equal specs
    assert len({c for c, _ in seen}) == len({s for _, s in seen})


@pytest.mark.parametrize(
    "text",
    [
        "198.18.0.1", "198.18.0.0/15", "0.0.0.0/0", "255.255.255.255", "198.18.0.1/32",
        "198.18.0.0/024", "198.18.0.1/31", "198.18.0.0/33", "198.018.0.1", "198.18.0",
        "198.18.0.0/", "198.18.0.0/-1", "198.18.0.0/255.254.0.0", "198.18.0.0/ 15",
        "1.2.3.4\x00", "2001:db8::/32", "2001:db8::1", "2001:db8::1/32", "::ffff:1.2.3.4",
        "1.2.3.4/²", "nonsense", " 198.18.0.1 ",
    ],
)  # fmt: skip
def test_fast_parse_agrees_with_ipaddress(text: str) -> None:
    try:
        net = parse_network(text, "src")
    except InvalidRule as exc:
        with pytest.raises(InvalidRule) as got:
            parse_src_code(text, abi.VERDICT_DROP)
        assert str(got.value) == str(exc)
        return
    code = parse_src_code(text, abi.VERDICT_DROP)
    assert code == RuleSpec.parse(src=net).code()
    assert codes.key_dir(codes.key(code)) == codes.DIR_SRC


# -- the compiler against brute force -------------------------------------------------------


def _expected(rules: list[Rule]) -> dict[TableKey, tuple[int, ...]]:
    """Every entry's slot ids: own rules plus every covering prefix's in the same trie."""
    own: dict[TableKey, list[Rule]] = {}
    for r in rules:
        own.setdefault(key_of(r), []).append(r)
    out = {}
    for key, mine in own.items():
        slots = list(mine)
        if key.table in LPM_TABLES:
            net = key.network
            assert net is not None
            for other, theirs in own.items():
                on = other.network
                if (
                    other.table is key.table
                    and on is not None
                    and on.prefixlen < net.prefixlen
                    and net.subnet_of(on)  # type: ignore[arg-type]
                ):
                    slots.extend(theirs)
        out[key] = tuple(r.id for r in sorted(slots, key=lambda r: -r.rank()))
    return out


def _state(c: RuleCompiler) -> dict[TableKey, tuple[int, ...]]:
    return {k: tuple(r.id for r in slots) for k, slots in c.entries()}


def _check(c: RuleCompiler, rules: dict[int, Rule]) -> None:
    want = _expected(list(rules.values()))
    assert _state(c) == want
    counts = [0] * Table.MAX
    for key in want:
        counts[key.table] += 1
    assert c.table_counts() == counts
    assert c.n_sets == sum(len(s) > 1 for s in want.values())
    assert dict(c.rules) == rules
    for key, ids in want.items():
        assert tuple(r.id for r in c.compiled(key)) == ids
    for r in rules.values():
        assert c.find_duplicate(r) == r.id


def _adopted(c: RuleCompiler) -> RuleCompiler:
    """A compiler that adopts c's entries the way Datapath does from the maps."""
    from xdpfw.compiler import _compact  # the compact key, as the datapath computes it

    fresh = RuleCompiler(c.caps)
    fresh.adopt(
        (
            key.table,
            _compact(key),
            [(r.id, r.code() if key_of(r) == key else -1) for r in slots],
        )
        for key, slots in c.entries()
    )
    return fresh


def test_compiler_matches_brute_force_through_adds_and_removes() -> None:
    rng = random.Random(7)
    caps = Capacities(max_rules=100_000, max_prefixes=100_000, max_sets=100_000)
    c = RuleCompiler(caps)
    rules: dict[int, Rule] = {}
    next_id = 1
    for step in range(60):
        if rules and rng.random() < 0.35:
            gone = rng.sample(sorted(rules), k=min(len(rules), rng.randrange(1, 40)))
            plan = c.plan_remove(gone)
            c.commit(plan)
            assert {r.id for r in plan.removed} == set(gone)
            for rid in gone:
                del rules[rid]
        else:
            batch: list[Rule] = []
            seen = {r.code() for r in rules.values()}
            for _ in range(rng.randrange(1, 80)):
                spec = _random_spec(rng)
                if spec.code() in seen:
                    continue
                seen.add(spec.code())
                batch.append(spec.with_id(next_id))
                next_id += 1
            try:
                plan = c.plan_add(batch)
            except CapacityExceeded:
                continue  # too many slots under one prefix: nothing changed
            c.commit(plan)
            rules.update((r.id, r) for r in batch)
        _check(c, rules)
        if step % 10 == 9:
            again = _adopted(c)
            _check(again, rules)
            c = again  # and keep changing the adopted one


def test_duplicates_and_slot_limit_are_refused() -> None:
    c = RuleCompiler(Capacities())
    c.commit(c.plan_add([RuleSpec.parse(src="198.18.0.1").with_id(1)]))
    with pytest.raises(RuleConflict, match="id 1"):
        c.plan_add([RuleSpec.parse(src="198.18.0.1").with_id(2)])
    with pytest.raises(RuleConflict, match="rule id 1 already exists"):
        c.plan_add([RuleSpec.parse(src="198.18.0.2").with_id(1)])
    ports = [
        RuleSpec.parse(src="198.18.0.0/24", proto="tcp", dport=p).with_id(10 + p)
        for p in range(MAX_SLOTS + 1)
    ]
    with pytest.raises(CapacityExceeded, match=r"rules covering 198\.18\.0\.0/24"):
        c.plan_add(ports)
    assert len(c) == 1


@pytest.mark.parametrize(
    "text",
    ["198.18.0.1", "198.18.0.0/15", "198.18.0.0/015", "198.18.0.1/31", "198.018.0.1",
     "2001:db8::/32", "198.18.0.0/24 # note", "  198.18.0.9\r", "\ufeff198.18.0.7"],
)  # fmt: skip
def test_importer_fast_lines_agree_with_ipaddress(text: str) -> None:
    from xdpfw import importers

    parsed = importers.parse_blocklist([text])
    entry, _ = importers.entry_text(text)
    assert entry is not None
    try:
        want = parse_network(entry, "src").with_prefixlen
    except InvalidRule as exc:
        assert [r.reason for r in parsed.rejected] == [exc.problem]
        return
    assert [e.cidr for e in parsed.entries] == [want]
    assert parsed.entries[0].network == ipaddress.ip_network(want)


def test_store_round_trips_every_kind_of_rule(tmp_path: Path) -> None:
    from api.store import Store, StoredRule

    rng = random.Random(11)
    specs = {_random_spec(rng) for _ in range(400)}
    rules = [s.with_id(i) for i, s in enumerate(sorted(specs, key=lambda s: s.code()), 1)]
    store = Store(tmp_path / "rules.db")
    try:
        with store.transaction():
            store.insert(StoredRule(r, f"c{r.id}", 1.5, None) for r in rules[:200])
            store.insert_codes((r.id, r.code(), "", 2.5, 9.5) for r in rules[200:])
        assert [s.rule for s in store.all()] == rules
        assert list(store.codes()) == [(r.id, r.code()) for r in rules]
        assert sorted(store.ids()) == [r.id for r in rules]
        got = store.get(rules[0].id)
        assert got is not None and (got.comment, got.created_at) == ("c1", 1.5)
    finally:
        store.close()
