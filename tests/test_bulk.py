"""The columnar bulk path: `RuleCompiler.plan_codes` / `Datapath.add_codes`.

- pure: `codes.rank_columns` and `slots.entry_columns` give exactly what `codes.rank` and
  `slots.entry_bytes` give, element by element; `plan_codes` + `commit` leaves the compiler in
  the state `plan_add` leaves it in (every entry, slot order, table count, set count) on random
  batches that mix new hosts, hosts already present, keys repeated in the batch, prefixes and
  address-less rules; a refused batch (id conflict, full table) changes nothing;
- bpf: `Datapath.add_codes` on random rule sets leaves the maps equal to a fresh compile
  (`harness.entry_mismatches`: entries, slots, counts, counter indices, hint) and the program
  agrees with the reference model frame by frame (`harness.Differ`), also after removals and
  a second batch over the first; a batch refused by the kernel (a host table too small) leaves
  the maps as they were.
"""

from __future__ import annotations

import errno
import ipaddress
import random

import numpy as np
import pytest
from conftest import unique_pin_dir

from xdpfw import abi, codes
from xdpfw.abi import Table
from xdpfw.compiler import LPM_TABLES, Capacities, RuleCompiler
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.datapath.slots import entry_bytes, entry_columns
from xdpfw.errors import CapacityExceeded, RuleConflict
from xdpfw.kernel import bpfsys
from xdpfw.rules import Rule, RuleSpec, rule_from_code
from xdpfw.verify import harness
from xdpfw.verify.soak import SOAK_CAPS, FrameGen, RuleGen, fit


def _columns(rules: list[Rule]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cs = [r.code() for r in rules]
    low = np.array([c & codes.CODE_LOW for c in cs], dtype=np.uint64)
    key_low = np.array([(c >> codes.KEY.shift) & codes.KEY_LOW for c in cs], dtype=np.uint64)
    ids = np.array([r.id for r in rules], dtype=np.uint32)
    return ids, low, key_low


def _random_rules(seed: int, n: int) -> list[Rule]:
    gen = RuleGen(random.Random(seed))
    return gen.rule_set(n)


@pytest.mark.pure
def test_columns_equal_the_scalar_forms() -> None:
    rules = _random_rules(1, 3000)
    rules = [r.spec().with_id(random.Random(r.id).randint(1, codes.MAX_RULE_ID)) for r in rules]
    ids, low, key_low = _columns(rules)
    ranks = codes.rank_columns(low, key_low, ids)
    assert [int(x) for x in ranks] == [codes.rank(r.code(), r.id) for r in rules]
    ctrs = np.arange(7, 7 + len(rules), dtype=np.uint32)
    blob = entry_columns(ids, low, key_low, ctrs)
    want = b"".join(entry_bytes(r, int(c), 0) for r, c in zip(rules, ctrs, strict=True))
    assert blob == want


def _hosts(rng: random.Random, n: int, v6: float = 0.1) -> list[RuleSpec]:
    out = []
    for _ in range(n):
        roll = rng.random()
        side = "src" if rng.random() < 0.8 else "dst"
        if roll < v6:
            addr = f"2001:db8::{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}"
        else:
            addr = f"198.18.{rng.randrange(256)}.{rng.randrange(256)}"
        kw: dict[str, object] = {side: addr}
        if rng.random() < 0.1:
            kw.update(proto="tcp", dport=rng.choice((22, 80, "1000-2000")))
        if rng.random() < 0.2:
            kw["mode"] = "monitor"
        elif rng.random() < 0.1:
            kw["action"] = "allow"
        out.append(RuleSpec.parse(**kw))  # type: ignore[arg-type]
    return out


def _batch(rng: random.Random, first_id: int, n: int) -> list[Rule]:
    """New hosts (some repeating a key with another verdict or port), prefixes covering
    them, address-less rules; unique codes, ids from first_id."""
    specs = _hosts(rng, n)
    specs += [s for s in _random_rules(rng.randrange(1 << 30), max(1, n // 4))]
    seen: set[int] = set()
    out: list[Rule] = []
    for s in specs:
        if s.code() not in seen:
            seen.add(s.code())
            out.append(s.with_id(first_id + len(out)))
    rng.shuffle(out)
    return out


def _state(comp: RuleCompiler) -> tuple[object, ...]:
    entries = sorted((str(k), tuple((r.id, r.code()) for r in slots)) for k, slots in
                     comp.entries())
    return entries, comp.table_counts(), comp.n_sets, dict(comp.codes())


@pytest.mark.pure
def test_plan_codes_leaves_the_state_plan_add_leaves() -> None:
    rng = random.Random(5)
    caps = Capacities(max_rules=65_536, max_prefixes=65_536, max_sets=16_384)
    for round_ in range(30):
        a, b = RuleCompiler(caps), RuleCompiler(caps)
        next_id = 1
        held: list[Rule] = []
        for _ in range(3):  # batches over batches: keys present already go the general way
            new = [r for r in _batch(rng, next_id, rng.randint(1, 400))
                   if a.find_code(r.code()) is None]
            fitting, _ = fit(held + new, caps)
            rules = fitting[len(held):]
            held = fitting
            next_id += 1000
            a.commit(a.plan_add(rules))
            plan = b.plan_codes([r.id for r in rules], [r.code() for r in rules])
            assert sum(len(h.ids) for h in plan.hosts) + len(plan.added) == len(rules)
            b.commit(plan)
            assert _state(a) == _state(b), round_
        gone = rng.sample(sorted(a.codes()), len(a) // 3)
        a.commit(a.plan_remove(gone))
        b.commit(b.plan_remove(gone))
        assert _state(a) == _state(b)


def _prefix_list(rng: random.Random, n: int, first_id: int) -> list[Rule]:
    """A blocklist's shape: IPv4 prefixes /8-/31, most alone, some nested (in the batch or
    with what is loaded already), in both directions, with hosts."""
    out: list[Rule] = []
    seen: set[int] = set()
    while len(out) < n:
        plen = rng.choice((20, 22, 24, 24, 24, 26, 28, 30, 31, 32)) if rng.random() < 0.98 \
            else rng.choice((8, 12, 16))
        base = 0xC6120000 if rng.random() < 0.1 else rng.getrandbits(32)
        addr = ((base + rng.randrange(1 << 20)) & 0xFFFFFFFF) >> (32 - plen) << (32 - plen)
        side = "src" if rng.random() < 0.85 else "dst"
        net = f"{ipaddress.IPv4Address(addr)}/{plen}"
        spec = RuleSpec.parse(**{side: net}, mode="monitor" if rng.random() < 0.1 else "enforce")
        if spec.code() not in seen:
            seen.add(spec.code())
            out.append(spec.with_id(first_id + len(out)))
    return out


@pytest.mark.pure
def test_isolated_prefixes_go_as_columns_and_nested_ones_the_general_way() -> None:
    rng = random.Random(8)
    caps = Capacities(max_rules=65_536, max_prefixes=65_536, max_sets=16_384)
    a, b = RuleCompiler(caps), RuleCompiler(caps)
    columns = general = 0
    for round_ in range(6):
        rules = [r for r in _prefix_list(rng, 3000, 1 + round_ * 10_000)
                 if a.find_code(r.code()) is None]
        a.commit(a.plan_add(rules))
        plan = b.plan_codes([r.id for r in rules], [r.code() for r in rules])
        columns += sum(len(h.ids) for h in plan.hosts if h.table in LPM_TABLES)
        general += len(plan.added)
        b.commit(plan)
        assert _state(a) == _state(b), round_
        # the tries' own bookkeeping agrees too (what later plans walk)
        for t in LPM_TABLES:
            assert list(a._trie_keys[t]) == list(b._trie_keys[t])
            assert a._trie_plens[t] == b._trie_plens[t]
    assert columns > 8000 and general > 300, (columns, general)


@pytest.mark.pure
def test_a_refused_batch_changes_nothing() -> None:
    caps = Capacities(max_rules=100, max_prefixes=10, max_sets=8)
    comp = RuleCompiler(caps)
    first = [RuleSpec.parse(src=f"198.18.0.{i}").with_id(i + 1) for i in range(50)]
    comp.commit(comp.plan_codes([r.id for r in first], [r.code() for r in first]))
    before = _state(comp)
    more = [RuleSpec.parse(src=f"198.18.1.{i}").with_id(100 + i) for i in range(60)]
    with pytest.raises(CapacityExceeded):
        comp.plan_codes([r.id for r in more], [r.code() for r in more])
    again = [RuleSpec.parse(src="198.18.2.1").with_id(3)]  # id 3 exists
    with pytest.raises(RuleConflict):
        comp.plan_codes([r.id for r in again], [r.code() for r in again])
    twice = [RuleSpec.parse(src=f"198.18.3.{i}").with_id(200) for i in range(2)]
    with pytest.raises(RuleConflict):
        comp.plan_codes([r.id for r in twice], [r.code() for r in twice])
    assert _state(comp) == before


# -- through the kernel ----------------------------------------------------------------------------


@pytest.fixture
def dp(soak_dp: Datapath) -> Datapath:
    return soak_dp  # conftest's soak-capacity program, emptied around each test


def _add(dp: Datapath, rules: list[Rule]) -> None:
    dp.add_codes([r.id for r in rules], [r.code() for r in rules])


@pytest.mark.bpf
def test_add_codes_maps_equal_a_fresh_compile_and_the_program_agrees(dp: Datapath) -> None:
    rng = random.Random(11)
    frames = 0
    for _ in range(8):
        dp.remove_rules([r.id for r in dp.rules()])
        mixed = _batch(rng, 1, rng.randint(200, 1500))
        mixed += [r.spec().with_id(20_000 + i) for i, r in
                  enumerate(_prefix_list(rng, 800, 1)) if r.code() not in {m.code() for m in mixed}]
        first, _ = fit(mixed, dp.caps)
        _add(dp, first)
        assert harness.entry_mismatches(dp) == []
        second = [r for r in _batch(rng, 5000, rng.randint(50, 500))
                  if dp.compiler.find_code(r.code()) is None]
        second, _ = fit(first + second, dp.caps)
        second = second[len(first):]
        _add(dp, second)
        assert harness.entry_mismatches(dp) == []
        dp.remove_rules(rng.sample([r.id for r in dp.rules()], len(first) // 4))
        assert harness.entry_mismatches(dp) == []
        differ = harness.Differ(dp)
        gen = FrameGen(rng)
        gen.aim(differ.rules)
        found = differ.check(gen.frames(600))
        assert not found, str(found[0])
        frames += differ.frames_checked
    assert frames >= 4000


@pytest.mark.bpf
@pytest.mark.parametrize("failing", ["xdpfw_src4", "xdpfw_dst6", "xdpfw_src4_lpm"])
def test_a_batch_the_kernel_refuses_leaves_the_maps_as_they_were(
    dp: Datapath, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refuses the batch part-way through one table (ENOSPC after half of its
    elements, as a full map does), after other tables were written: every entry written goes,
    every counter index taken comes back, the maps are byte for byte as before."""
    dp.remove_rules([r.id for r in dp.rules()])
    base = [RuleSpec.parse(src=f"198.18.9.{i}").with_id(i + 1) for i in range(10)]
    base.append(RuleSpec.parse(src="198.18.0.0/16").with_id(11))
    _add(dp, base)
    before = harness.table_snapshot(dp)
    m = dp.table(Table.SRC4_LPM) if failing == "xdpfw_src4_lpm" else dp.map(failing)
    real_raw, real_batch = m.update_batch_raw, m.update_batch

    def half_raw(keys: bytes, values: bytes, count: int, **kw: object) -> None:
        n = count // 2
        real_raw(keys[: n * m.key_size], values[: n * m.value_size], n)
        raise bpfsys.BpfError(errno.ENOSPC, op="BPF_MAP_UPDATE_BATCH", applied=n)

    def half_batch(keys: list[bytes], values: list[bytes], flags: int = 0) -> None:
        n = len(keys) // 2
        real_batch(keys[:n], values[:n])
        raise bpfsys.BpfError(errno.ENOSPC, op="BPF_MAP_UPDATE_BATCH", applied=n)

    monkeypatch.setattr(m, "update_batch_raw", half_raw)
    monkeypatch.setattr(m, "update_batch", half_batch)
    many = [RuleSpec.parse(src=f"10.0.{i >> 8}.{i & 255}").with_id(100 + i) for i in range(3000)]
    many += [RuleSpec.parse(dst=f"2001:db8::{i:x}").with_id(5000 + i) for i in range(3000)]
    many += [RuleSpec.parse(src=f"10.9.{i}.0/24").with_id(9000 + i) for i in range(200)]
    many += [RuleSpec.parse(src="198.18.9.1", proto="tcp").with_id(9500)]  # a shared entry
    with pytest.raises(CapacityExceeded):
        _add(dp, many)
    monkeypatch.undo()
    assert harness.table_snapshot(dp) == before
    assert sorted(r.id for r in dp.rules()) == [r.id for r in base]
    assert harness.entry_mismatches(dp) == []
    assert dp.counter_indices_in_use() == len(base)
    _add(dp, many)  # and the same batch goes in once the kernel takes it
    assert harness.entry_mismatches(dp) == []


@pytest.mark.pure
def test_rule_from_code_roundtrip_of_host_codes() -> None:
    """The codes the columns are built from are the rules' own (a sanity check of _hosts)."""
    for s in _hosts(random.Random(2), 200):
        r = s.with_id(9)
        assert rule_from_code(9, r.code()) == r
        assert codes.verdict(r.code()) in (abi.VERDICT_DROP, abi.VERDICT_MONITOR,
                                           abi.VERDICT_ALLOW)


@pytest.mark.bpf
def test_adopting_reads_the_columns_back_as_they_were_written() -> None:
    """Close and re-open (a restart): the compiler's state, every counter index, the maps and
    the program's verdicts are what they were; IPv4 one-slot entries are read as columns."""
    rng = random.Random(21)
    pins = unique_pin_dir("bulk-adopt")
    rules, _ = fit(_batch(rng, 1, 1500) + [r.spec().with_id(30_000 + i) for i, r in
                                            enumerate(_prefix_list(rng, 1500, 1))], SOAK_CAPS)
    rules = list({r.code(): r for r in reversed(rules)}.values())[::-1]  # one rule per code
    rules = [r.spec().with_id(i + 1) for i, r in enumerate(rules)]
    first = Datapath.open(DatapathConfig(bpffs_dir=pins, caps=SOAK_CAPS))
    try:
        _add(first, rules)
        before = _state(first.compiler)
        indices = {r.id: first.counter_index(r.id) for r in rules}
        cells = harness.table_snapshot(first)["xdpfw_src4_tbl24"]
        first.close()
        again = Datapath.open(DatapathConfig(bpffs_dir=pins, caps=SOAK_CAPS, upgrade=False))
        first = again
        assert _state(again.compiler) == before
        assert {r.id: again.counter_index(r.id) for r in rules} == indices
        assert harness.table_snapshot(again)["xdpfw_src4_tbl24"] == cells
        assert harness.entry_mismatches(again) == []
        differ = harness.Differ(again)
        gen = FrameGen(rng)
        gen.aim(differ.rules)
        found = differ.check(gen.frames(500))
        assert not found, str(found[0])
        # and it goes on: a second batch over the adopted state
        more = [r for r in _batch(rng, 50_000, 300) if again.compiler.find_code(r.code()) is None]
        more, _ = fit(list(again.rules()) + more, SOAK_CAPS)
        _add(again, more[len(rules):])
        assert harness.entry_mismatches(again) == []
    finally:
        first.close(cleanup=True)


@pytest.mark.pure
def test_counter_indices_in_bulk_equal_one_by_one() -> None:
    from xdpfw.datapath.counters import CounterIndex
    from xdpfw.errors import DatapathError

    rng = random.Random(4)
    size = 1000
    ids = np.array(rng.sample(range(1, 5000), 600), dtype=np.uint32)
    a, b = CounterIndex(size), CounterIndex(size)
    got = b.alloc_many(ids)
    one = a.alloc(ids.tolist())
    # every id its own index, in range, found again by get; the homes where they were free
    assert len(set(got.tolist())) == len(ids) and got.min() >= 1 and got.max() <= size
    assert all(b.get(int(rid)) == int(i) for rid, i in zip(ids, got, strict=True))
    homes = [1 + (int(r) - 1) % size for r in ids]
    shared = {h for h in homes if homes.count(h) > 1}
    assert all(i == h for i, h in zip(got.tolist(), homes, strict=True) if h not in shared)
    assert len(set(one)) == len(ids)
    b.release(ids.tolist())
    assert not b.view.any() and not b.moved
    pairs = dict(zip(ids.tolist(), got.tolist(), strict=True))
    c, d = CounterIndex(size), CounterIndex(size)
    c.adopt(pairs)
    d.adopt_arrays(ids, got)
    assert c.owner == d.owner and c.moved == d.moved and c.high == d.high
    bad = got.copy()
    bad[1] = bad[0]  # two rules with one index
    with pytest.raises(DatapathError):
        CounterIndex(size).adopt_arrays(ids, bad)
    with pytest.raises(DatapathError):
        CounterIndex(10).adopt_arrays(ids[:3], np.array([1, 2, 11], dtype=np.uint32))
