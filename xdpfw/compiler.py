"""Rules -> lookup-table entries: which key each rule lives under and what slots each entry holds.

Each rule lives under one key: its source or destination network (a rule names at most one),
or the address-less table. A host route (/32, /128) goes to an exact hash table, anything
shorter to an LPM trie. The data plane looks up each table once, so an LPM entry must also
carry the slots of every shorter prefix in the same trie that covers it: a trie lookup only
returns the longest match, and that entry's own rules may not match the packet's protocol
or port while a covering prefix's rule does.

`RuleCompiler` keeps that derived state incrementally. `plan_add`/`plan_remove` compute the
new slot lists of every entry a change touches, check the capacity limits, and only then let
the caller `commit` them; a plan that does not fit raises CapacityExceeded and changes nothing.

A million rules must stay cheap, so the compiler keeps no objects per rule: a rule is its id
and its code (`RuleSpec.code()`, one int), an entry is the key part of its rules' codes (one
int) mapped to its own rule ids (an int, or a list when several rules share the entry), and a
trie key is one int (its `codes.trie_position`) in a sorted list per trie. `Rule` and
`TableKey` objects are made only at the edges: for the entries a plan writes and for callers
that ask (`rules`, `compiled`, `entries`).
"""

from __future__ import annotations

import gc
import ipaddress
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from sortedcontainers import SortedList

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.codes import (
    ADDR,
    ADDR_BITS_V4,
    ADDR_BITS_V6,
    CODE_LOW,
    DIR,
    DIR_DST,
    DIR_SRC,
    KEY,
    KEY_LOW,
    PLEN,
    TABLE_BITS,
    TRIE_ADDR,
    TRIE_PLEN,
    V6,
    key_addr,
    key_bits,
    key_is_exact,
    key_is_prefix,
    key_plen,
    key_table,
    pack_key,
    rank,
    trie_position,
)
from xdpfw.errors import CapacityExceeded, RuleConflict, RuleNotFound
from xdpfw.rules import MAX_RULE_ID, Network, Rule, rule_from_code

__all__ = [
    "MAX_SLOTS",
    "Capacities",
    "HostBatch",
    "Plan",
    "RuleCompiler",
    "RuleView",
    "TableKey",
    "gc_paused",
    "key_of",
    "let_go",
    "table_of",
    "trie_of",
]

MAX_SLOTS = 1 + abi.SET_SLOTS

_LPM_TABLES = {
    ("src", 4): Table.SRC4_LPM,
    ("dst", 4): Table.DST4_LPM,
    ("src", 6): Table.SRC6_LPM,
    ("dst", 6): Table.DST6_LPM,
}
_EXACT_TABLES = {
    ("src", 4): Table.SRC4,
    ("dst", 4): Table.DST4,
    ("src", 6): Table.SRC6,
    ("dst", 6): Table.DST6,
}
LPM_TABLES = frozenset(_LPM_TABLES.values())
EXACT_TABLES = frozenset(_EXACT_TABLES.values())


@dataclass(frozen=True)
class Capacities:
    """Map sizes; set at load time, recorded in the config map."""

    max_rules: int = 1_048_576
    max_prefixes: int = 262_144
    max_sets: int = 16_384
    # IPv4 /24s holding prefixes longer than /24, per direction (DIR-24-8's tbl8 groups, 1 KiB
    # of kernel memory each, allocated at load)
    max_tbl8_groups: int = abi.MAX_TBL8_GROUPS

    def limit(self, table: Table) -> int:
        if table is Table.ANY:
            return 1
        return self.max_prefixes if table in LPM_TABLES else self.max_rules


class TableKey(NamedTuple):
    """Where an entry lives: table, network address (packed, big-endian) and prefix length.

    A tuple, so hashing it (done a lot in bulk loads) stays in C.
    """

    table: Table
    addr: bytes = b""
    plen: int = 0

    @property
    def network(self) -> Network | None:
        if self.table is Table.ANY:
            return None
        return ipaddress.ip_network((self.addr, self.plen))

    def __str__(self) -> str:
        net = self.network
        return f"{self.table.map_name}[{'*' if net is None else net.with_prefixlen}]"


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a bulk change runs (re-enabled by whoever paused it).

    A bulk change makes a few objects per rule (rules, networks, plan entries), none of them in
    a cycle, so reference counting frees them all; but every 700 allocations CPython's
    collector runs, and its older generations walk every tracked object of the process: a
    quarter of a bulk load's time.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        # What the change left alive (the compiler's tables: long-lived) goes to the permanent
        # generation first; else the first collection after re-enabling walks every object the
        # change made, holding the GIL for most of a second at a million rules (every other
        # thread, the API's event loop included, waits). Frozen objects are still freed by
        # reference counting; only a cycle among them would never be collected.
        gc.freeze()
        gc.enable()


_LET_GO_PIECE = 4096


def let_go(*containers: list[Any] | dict[Any, Any]) -> None:
    """Empty big containers a piece at a time, so that freeing what they hold (a million rules
    of a bulk change) never holds the GIL for long: freeing a whole list or dict is one C loop
    that no other thread (the API's event loop, a health probe) can interrupt. Empty after."""
    piece = _LET_GO_PIECE
    for c in containers:
        if isinstance(c, list):
            while c:
                del c[-piece:]
        else:
            while c:
                for _ in range(min(piece, len(c))):
                    c.popitem()


# Items per C-level call in bulk work (a set or dict built from a million big ints is one
# call that holds the GIL for 0.1-0.3 s, and /healthz waits on it): in pieces of this size
# each call takes a few ms and the other threads get their turns in between.
_PIECE = 1 << 16


def _n_distinct(items: list[int]) -> int:
    """len(set(items)), built a piece at a time."""
    seen: set[int] = set()
    for i in range(0, len(items), _PIECE):
        seen.update(items[i : i + _PIECE])
    return len(seen)


def _has_repeats(keys: list[int], v6: Any) -> bool:
    """Whether a key comes twice. IPv4 keys fit in 64 bits: sorted by numpy, which lets the
    other threads run meanwhile; a batch with IPv6 keys builds a set, a piece at a time."""
    if bool(v6.any()):
        return _n_distinct(keys) != len(keys)
    ordered = np.sort(np.fromiter(keys, dtype=np.uint64, count=len(keys)))
    return bool((ordered[1:] == ordered[:-1]).any())


def _update_in_pieces(d: dict[int, Any], keys: list[int], values: list[Any]) -> None:
    """d.update(zip(keys, values)), a piece at a time."""
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} keys for {len(values)} values")
    for i in range(0, len(keys), _PIECE):
        d.update(zip(keys[i : i + _PIECE], values[i : i + _PIECE], strict=True))


def key_of(rule: Rule) -> TableKey:
    """The one key a rule lives under."""
    if rule.src is not None:
        net, direction = rule.src, "src"
    elif rule.dst is not None:
        net, direction = rule.dst, "dst"
    else:
        return TableKey(Table.ANY)
    fam = net.version
    exact = net.prefixlen == net.max_prefixlen
    table = (_EXACT_TABLES if exact else _LPM_TABLES)[(direction, fam)]
    return TableKey(table, net.network_address.packed, net.prefixlen)


# -- compact keys -------------------------------------------------------------------------------
# An entry's compact key is the key part of its rules' codes (`codes.key`; 0 for the
# address-less table). Its TABLE_BITS (direction and family) and "exact or prefix" pick the table.

_SRC_TABLES = frozenset((Table.SRC4, Table.SRC6, Table.SRC4_LPM, Table.SRC6_LPM))


def _by_table_bits(tables: dict[tuple[str, int], Table]) -> dict[int, Table]:
    return {
        pack_key(0, 0, v6=fam == 6, direction=DIR_SRC if d == "src" else DIR_DST): t
        for (d, fam), t in tables.items()
    }


_EXACT_BY_BITS = _by_table_bits(_EXACT_TABLES)  # key & TABLE_BITS -> table, hosts
_LPM_BY_BITS = _by_table_bits(_LPM_TABLES)  # key & TABLE_BITS -> table, shorter prefixes


def _table_of(k: int) -> Table:
    if not k:
        return Table.ANY
    return (_EXACT_BY_BITS if key_is_exact(k) else _LPM_BY_BITS)[key_table(k)]


def table_of(k: int) -> Table:
    """The table an entry with this compact key lives in."""
    return _table_of(k)


def trie_of(k: int) -> Table:
    """The trie of the key's direction and family (also for a host key: where the prefixes
    covering that host live)."""
    return _LPM_BY_BITS[key_table(k)]


_ANY_KEY = TableKey(Table.ANY)
_tuple_new = tuple.__new__


def _table_key(k: int) -> TableKey:
    if not k:
        return TableKey(Table.ANY)
    return TableKey(_table_of(k), key_addr(k).to_bytes(key_bits(k) // 8, "big"), key_plen(k))


def _compact(key: TableKey) -> int:
    if key.table is Table.ANY:
        return 0
    direction = DIR_SRC if key.table in _SRC_TABLES else DIR_DST
    v6 = len(key.addr) * 8 == ADDR_BITS_V6
    return pack_key(int.from_bytes(key.addr, "big"), key.plen, v6=v6, direction=direction)


def _distinct(ids: np.ndarray[Any, np.dtype[np.int64]]) -> bool:
    """No id twice (ids of a bulk load come ascending: checked without sorting)."""
    if len(ids) < 2 or bool((np.diff(ids) > 0).all()):
        return True
    return len(np.unique(ids)) == len(ids)


class RuleView(Mapping[int, Rule]):
    """Rule id -> Rule, made on demand from the compiler's codes (read only)."""

    __slots__ = ("_codes",)

    def __init__(self, codes: dict[int, int]) -> None:
        self._codes = codes

    def __getitem__(self, rule_id: int) -> Rule:
        return rule_from_code(rule_id, self._codes[rule_id])

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._codes

    def __iter__(self) -> Iterator[int]:
        return iter(self._codes)

    def __len__(self) -> int:
        return len(self._codes)


@dataclass
class HostBatch:
    """New one-slot entries of one table that touch no other entry (exact hosts, isolated
    IPv4 prefixes: see `plan_codes`), as columns: a bulk load's common case, with no entry to
    merge, no trie to walk and no Rule object. ``ids``/``keys``/``codes`` are parallel lists
    (the compiler's own terms, for `commit`); the numpy columns are what the writer packs
    into map keys and values (xdpfw/datapath/keys.py, slots.py)."""

    table: Table
    ids: list[int]
    keys: list[int]  # compact keys
    codes: list[int]
    rule_ids: np.ndarray[Any, np.dtype[np.uint32]]
    low: np.ndarray[Any, np.dtype[np.uint64]]  # code & CODE_LOW
    key_low: np.ndarray[Any, np.dtype[np.uint64]]  # key & KEY_LOW


@dataclass
class Plan:
    """What a change does to the tables: new slot lists (empty = delete the entry), plus (a
    bulk load) new host entries as columns (`hosts`)."""

    entries: dict[TableKey, tuple[Rule, ...]] = field(default_factory=dict)
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)
    # The same change in the compiler's compact terms, for `commit`.
    codes: dict[int, int] = field(default_factory=dict, repr=False)  # added id -> code
    own: dict[int, list[int]] = field(default_factory=dict, repr=False)  # key -> own ids after
    inherit: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)  # LPM keys
    counts: list[int] = field(default_factory=list, repr=False)
    n_sets: int = field(default=0, repr=False)
    hosts: list[HostBatch] = field(default_factory=list, repr=False)

    @property
    def added_ids(self) -> list[int]:
        """Every rule the plan adds: those of `added` and of `hosts`."""
        out = [r.id for r in self.added]
        for h in self.hosts:
            out.extend(h.ids)
        return out


class RuleCompiler:
    """Rules and the entries they compile to. Not thread-safe: callers serialise changes."""

    def __init__(self, caps: Capacities) -> None:
        self.caps = caps
        self._codes: dict[int, int] = {}  # rule id -> code
        self.rules: Mapping[int, Rule] = RuleView(self._codes)
        # compact key -> its own rule ids, best first (one int for a single rule: most entries)
        self._own: dict[int, int | list[int]] = {}
        # LPM compact key -> slot ids (own + inherited, best first), for entries that inherit
        # from a covering prefix; any other entry's slots are its own rules.
        self._inherit: dict[int, tuple[int, ...]] = {}
        # Per trie: keys as trie positions (address, then length): a prefix's descendants are
        # one range.
        self._trie_keys: dict[Table, SortedList] = {t: SortedList() for t in LPM_TABLES}
        self._trie_plens: dict[Table, dict[int, int]] = {t: {} for t in LPM_TABLES}
        self._counts = [0] * Table.MAX  # entries per table
        self._n_sets = 0  # entries holding more than one slot

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._codes)

    def codes(self) -> Mapping[int, int]:
        """Rule id -> code, for callers that compare many rules (read only)."""
        return self._codes

    def entries(self) -> Iterator[tuple[TableKey, tuple[Rule, ...]]]:
        """Every entry in the maps with its slots, best first."""
        for k in list(self._own):
            yield _table_key(k), self._rules(self._slot_ids(k))

    def compiled(self, key: TableKey) -> tuple[Rule, ...]:
        k = _compact(key)
        if k not in self._own:  # a new entry (the datapath asks for each before writing it)
            return ()
        return self._rules(self._slot_ids(k))

    def table_counts(self) -> list[int]:
        return list(self._counts)

    @property
    def n_sets(self) -> int:
        return self._n_sets

    def has_entry(self, k: int) -> bool:
        """Whether the maps hold an entry under this compact key."""
        return k in self._own

    def slots(self, k: int) -> tuple[int, ...]:
        """The rule ids in the entry under this compact key, best first (its own rules and,
        in a trie, those of the prefixes covering it); () when there is no entry."""
        return self._slot_ids(k) if k in self._own else ()

    def prefix_lengths(self, table: Table) -> list[int]:
        """The prefix lengths that have entries in a trie, longest first."""
        return sorted(self._trie_plens[table], reverse=True)

    def find_duplicate(self, rule: Rule) -> int | None:
        return self.find_code(rule.code())

    def find_code(self, code: int) -> int | None:
        """The id of the rule with this code, if any."""
        own = self._own.get(code >> KEY.shift)
        if own is None:
            return None
        if isinstance(own, int):
            return own if self._codes[own] == code else None
        for rid in own:
            if self._codes[rid] == code:
                return rid
        return None

    def _own_ids(self, k: int) -> list[int]:
        own = self._own.get(k)
        if own is None:
            return []
        return [own] if isinstance(own, int) else list(own)

    def _slot_ids(self, k: int) -> tuple[int, ...]:
        inherited = self._inherit.get(k)
        return inherited if inherited is not None else tuple(self._own_ids(k))

    def _rules(self, ids: Iterable[int]) -> tuple[Rule, ...]:
        codes = self._codes
        return tuple(rule_from_code(rid, codes[rid]) for rid in ids)

    # -- planning ------------------------------------------------------------------------------

    def plan_add(self, rules: Iterable[Rule]) -> Plan:
        """Entries after adding `rules` (all or nothing). Raises before anything changes."""
        plan = Plan()
        codes, new_codes, own = self._codes, plan.codes, self._own
        batch: dict[int, Rule] = {}
        added: dict[int, list[int]] = {}  # compact key -> new ids
        key_shift = KEY.shift
        for rule in rules:
            rid = rule.id
            if rid in codes or rid in new_codes:
                raise RuleConflict(f"rule id {rid} already exists", rid)
            code = rule.code()
            k = code >> key_shift
            dup = self.find_code(code) if k in own else None
            ids = added.get(k)
            if ids is None:
                added[k] = [rid]
            else:
                if dup is None:
                    dup = next((other for other in ids if new_codes[other] == code), None)
                ids.append(rid)
            if dup is not None:
                raise RuleConflict(
                    f"an identical rule already exists (id {dup}): {rule.describe()}", dup
                )
            new_codes[rid] = code
            batch[rid] = rule
        plan.added = list(batch.values())
        if len(codes) + len(plan.added) > self.caps.max_rules:
            raise CapacityExceeded(
                "rule table", self.caps.max_rules, "raise --max-rules or remove rules"
            )
        self._plan_keys(plan, added, {}, batch)
        return plan

    def plan_codes(self, rule_ids: Sequence[int], codes: Sequence[int]) -> Plan:
        """`plan_add` of rules given as ids and codes (all or nothing), for bulk loads.

        A code that makes a new one-slot entry touching no other entry is planned as columns
        (`Plan.hosts`): an exact host whose key has no entry yet, and an IPv4 prefix whose key
        is new and which no other prefix of its trie (in the maps or in the batch) covers or
        lies inside (nothing to inherit, nobody inherits from it). No other code of the batch
        may share its key. The rest (nested prefixes, shared keys, IPv6 prefixes, address-less
        rules) are planned as `plan_add` plans them. Raises before anything changes.
        """
        n = len(codes)
        if len(rule_ids) != n:
            raise ValueError(f"{len(rule_ids)} ids for {n} codes")
        u64 = np.uint64
        key_shift = KEY.shift
        keys = [c >> key_shift for c in codes]
        # Columns from generators (np.fromiter), not np.array([...]): converting a million-item
        # list is one C loop that holds the GIL for 30-60 ms (a /healthz probe waits it out),
        # while a generator runs bytecode per item and other threads get their turns.
        key_low = np.fromiter((k & KEY_LOW for k in keys), u64, n)
        plen = (key_low >> u64(PLEN.shift)) & u64(PLEN.bits)
        v6 = (key_low & u64(V6.mask)) != 0
        addressed = (key_low & u64(DIR.bits)) != 0
        exact = addressed & (plen == np.where(v6, u64(ADDR_BITS_V6), u64(ADDR_BITS_V4)))
        prefix4 = addressed & ~v6 & ~exact  # IPv4 prefixes, the only prefixes done as columns
        cand = exact | prefix4
        if _has_repeats(keys, v6):  # a key twice in the batch: those go the general way
            twice = {k for k, c in Counter(keys).items() if c > 1}
            cand &= np.fromiter((k not in twice for k in keys), bool, n)
        own = self._own
        if own:
            where = np.flatnonzero(cand)
            fresh = (keys[i] not in own for i in where.tolist())
            cand[where] = np.fromiter(fresh, bool, len(where))
        table_bits = key_low & u64(TABLE_BITS)
        fast = cand & exact
        for bits, table in _LPM_BY_BITS.items():
            if bits & V6.mask:
                continue
            in_trie = prefix4 & (table_bits == u64(bits))
            if in_trie.any():
                fast |= self._isolated(table, keys, plen, in_trie, cand & in_trie)
        fast_at = np.flatnonzero(fast)
        slow = np.flatnonzero(~fast).tolist()
        plan = self.plan_add(rule_from_code(rule_ids[i], codes[i]) for i in slow)
        if not fast_at.size:
            return plan
        ids_all = np.asarray(rule_ids, dtype=np.int64)
        fast_ids = ids_all[fast_at]
        if (
            not _distinct(ids_all)
            or fast_ids.min() < 1
            or fast_ids.max() > MAX_RULE_ID
            or not self._codes.keys().isdisjoint(fast_ids.tolist())
        ):
            bad = self._bad_id(rule_ids)
            raise RuleConflict(f"rule id {bad} already exists or repeats", bad)
        low = np.fromiter((codes[i] & CODE_LOW for i in fast_at.tolist()), u64, len(fast_at))
        fast_bits, fast_exact, fast_kl = table_bits[fast_at], exact[fast_at], key_low[fast_at]
        counts = plan.counts or self.table_counts()
        groups = [(b, t, True) for b, t in _EXACT_BY_BITS.items()]
        groups += [(b, t, False) for b, t in _LPM_BY_BITS.items()]
        for bits, table, is_exact in groups:
            sel = np.flatnonzero((fast_bits == u64(bits)) & (fast_exact == is_exact))
            if not len(sel):
                continue
            at = fast_at[sel].tolist()
            plan.hosts.append(
                HostBatch(
                    table,
                    [rule_ids[i] for i in at],
                    [keys[i] for i in at],
                    [codes[i] for i in at],
                    fast_ids[sel].astype(np.uint32),
                    low[sel],
                    fast_kl[sel],
                )
            )
            counts[table] += len(sel)
            if counts[table] > self.caps.limit(table):
                raise CapacityExceeded(
                    table.map_name, self.caps.limit(table), "raise the capacity at load time"
                )
        if len(self._codes) + len(plan.added) + len(fast_at) > self.caps.max_rules:
            raise CapacityExceeded(
                "rule table", self.caps.max_rules, "raise --max-rules or remove rules"
            )
        plan.counts = counts
        return plan

    def _isolated(
        self,
        table: Table,
        keys: list[int],
        plen: np.ndarray[Any, np.dtype[np.uint64]],
        in_trie: np.ndarray[Any, np.dtype[np.bool_]],
        cand: np.ndarray[Any, np.dtype[np.bool_]],
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which of the batch's IPv4 prefixes `cand` (of `table`) no other prefix of the trie
        (in the maps, or `in_trie` in the batch) covers or lies inside: sorted by address then
        length, a prefix has a descendant iff the next one starts inside it, and an ancestor
        iff some earlier one ends at or after its start."""
        u64 = np.uint64
        out = np.zeros(len(keys), dtype=bool)
        at = np.flatnonzero(in_trie)
        addr_shift = ADDR.shift
        addr = np.fromiter((keys[i] >> addr_shift for i in at.tolist()), u64, len(at))
        lens = plen[at]
        have = self._trie_keys[table]
        if len(have):
            pos = np.fromiter(have, dtype=u64, count=len(have))
            addr = np.concatenate([addr, pos >> u64(TRIE_ADDR.shift)])
            lens = np.concatenate([lens, pos & u64(TRIE_PLEN.bits)])
        order = np.lexsort((lens, addr))
        a, ln = addr[order], lens[order]
        hi = a | ((u64(1) << (u64(ADDR_BITS_V4) - ln)) - u64(1))
        desc = np.zeros(len(a), dtype=bool)
        desc[:-1] = a[1:] <= hi[:-1]
        anc = np.zeros(len(a), dtype=bool)
        if len(a) > 1:
            anc[1:] = np.maximum.accumulate(hi)[:-1] >= a[1:]
        alone = np.empty(len(a), dtype=bool)
        alone[order] = ~(desc | anc)
        out[at] = alone[: len(at)]
        result: np.ndarray[Any, np.dtype[np.bool_]] = out & cand
        return result

    def _bad_id(self, rule_ids: Sequence[int]) -> int:
        seen: set[int] = set()
        for rid in rule_ids:
            if rid in self._codes or rid in seen or not 1 <= rid <= MAX_RULE_ID:
                return rid
            seen.add(rid)
        return rule_ids[0]

    def plan_remove(self, rule_ids: Iterable[int]) -> Plan:
        plan = Plan()
        gone: dict[int, set[int]] = {}
        batch: dict[int, Rule] = {}
        for rid in rule_ids:
            code = self._codes.get(rid)
            if code is None:
                raise RuleNotFound(rid)
            ids = gone.setdefault(code >> KEY.shift, set())
            if rid in ids:
                continue
            ids.add(rid)
            rule = rule_from_code(rid, code)
            batch[rid] = rule
            plan.removed.append(rule)
        self._plan_keys(plan, {}, gone, batch)
        return plan

    def _plan_keys(
        self,
        plan: Plan,
        added: dict[int, list[int]],
        removed: dict[int, set[int]],
        batch: dict[int, Rule],
    ) -> None:
        codes, new_codes = self._codes, plan.codes

        def rank_desc(rid: int) -> int:
            code = new_codes.get(rid)
            return -rank(codes[rid] if code is None else code, rid)

        def rule(rid: int) -> Rule:
            r = batch.get(rid)
            if r is None:
                r = batch[rid] = rule_from_code(rid, codes[rid])
            return r

        own_after = plan.own
        counts = self.table_counts()
        sets = self._n_sets
        entries = plan.entries
        tries: dict[Table, list[int]] = {}
        own = self._own
        slow: list[int] = []  # keys of the exact and address-less tables to plan in full
        plen_shift, plen_bits, addr_shift, v6_mask = PLEN.shift, PLEN.bits, ADDR.shift, V6.mask
        exact_by_bits, lpm_by_bits = _EXACT_BY_BITS, _LPM_BY_BITS
        for k, extra in added.items():
            if k not in own and k not in removed and len(extra) == 1:
                # The common case, a new entry holding one rule: no list to merge or sort.
                own_after[k] = extra
                plen = (k >> plen_shift) & plen_bits
                bits = ADDR_BITS_V6 if k & v6_mask else ADDR_BITS_V4
                if not k:
                    entries[_ANY_KEY] = (batch[extra[0]],)
                    counts[Table.ANY] += 1
                elif plen == bits:
                    table = exact_by_bits[k & TABLE_BITS]
                    addr = (k >> addr_shift).to_bytes(bits // 8, "big")
                    entries[_tuple_new(TableKey, (table, addr, plen))] = (batch[extra[0]],)
                    counts[table] += 1
                else:
                    tries.setdefault(lpm_by_bits[k & TABLE_BITS], []).append(k)
                continue
            cur = self._own_ids(k)
            drop = removed.get(k)
            if drop:
                cur = [r for r in cur if r not in drop]
            cur.extend(extra)
            if len(cur) > 1:
                cur.sort(key=rank_desc)
            own_after[k] = cur
            self._route(k, slow, tries)
        for k, drop in removed.items():
            if k not in added:
                own_after[k] = [r for r in self._own_ids(k) if r not in drop]
                self._route(k, slow, tries)

        for k in slow:
            ids = own_after[k]
            key = _table_key(k)
            old = own.get(k)
            old_n = 0 if old is None else 1 if isinstance(old, int) else len(old)
            if not ids:
                entries[key] = ()
                counts[key.table] -= bool(old_n)
                sets -= old_n > 1
                continue
            if len(ids) > MAX_SLOTS:
                raise self._too_many(key)
            entries[key] = tuple(rule(r) for r in ids)
            counts[key.table] += not old_n
            sets += (len(ids) > 1) - (old_n > 1)
        for table, changed in tries.items():
            sets += self._plan_trie(plan, table, changed, counts, rank_desc, rule)
        for table in Table:
            if table is Table.MAX:
                continue
            if counts[table] > self.caps.limit(table):
                raise CapacityExceeded(
                    table.map_name, self.caps.limit(table), "raise the capacity at load time"
                )
        if sets > self.caps.max_sets - 1:
            raise CapacityExceeded(
                "xdpfw_sets (entries holding more than one rule)",
                self.caps.max_sets - 1,
                "raise --max-sets",
            )
        plan.counts = counts
        plan.n_sets = sets

    def _plan_trie(
        self,
        plan: Plan,
        table: Table,
        changed: list[int],
        counts: list[int],
        rank_desc: Callable[[int], int],
        rule: Callable[[int], Rule],
    ) -> int:
        """Plan the entries of one trie whose keys `changed`; returns the change in sets.

        A changed prefix changes its own entry and the entries of every longer prefix inside
        it (they inherit its rules); each entry's slots are its own rules plus those of every
        shorter prefix covering it. Pending keys are sorted once, so a bulk load of P prefixes
        costs O(P log P), not O(P^2).
        """
        own_after = plan.own
        pending = set(changed)
        pending_sorted = sorted(map(trie_position, changed))
        plens = sorted(self._trie_plens[table].keys() | set(map(key_plen, changed)))
        affected = set(changed)
        for k in changed:
            affected.update(self._descendants(k, table, pending_sorted))
        sets = 0
        for k in affected:
            mine = own_after[k] if k in own_after else self._own_ids(k)
            key = _table_key(k)
            had = k in self._own
            old_n = len(self._slot_ids(k)) if had else 0
            if not mine:
                plan.entries[key] = ()
                plan.inherit[k] = ()
                counts[table] -= had
                sets -= old_n > 1
                continue
            slots = list(mine)
            inherits = False
            for anc in self._ancestors(k, plens, pending):
                anc_ids = own_after[anc] if anc in own_after else self._own_ids(anc)
                if anc_ids:
                    slots.extend(anc_ids)
                    inherits = True
            if len(slots) > MAX_SLOTS:
                raise self._too_many(key)
            if inherits:
                slots.sort(key=rank_desc)
            ids = tuple(slots)
            plan.inherit[k] = ids if inherits else ()
            plan.entries[key] = tuple(rule(r) for r in ids)
            counts[table] += not had
            sets += (len(ids) > 1) - (old_n > 1)
        return sets

    @staticmethod
    def _route(k: int, slow: list[int], tries: dict[Table, list[int]]) -> None:
        if key_is_prefix(k):
            tries.setdefault(_table_of(k), []).append(k)
        else:
            slow.append(k)

    @staticmethod
    def _too_many(key: TableKey) -> CapacityExceeded:
        return CapacityExceeded(
            f"rules covering {key.network}",
            MAX_SLOTS,
            "a prefix and the prefixes covering it can hold that many rules in all; "
            "merge port rules into ranges",
        )

    def _ancestors(self, k: int, plens: list[int], pending: set[int]) -> Iterator[int]:
        """Shorter prefixes in the same trie that cover `k` (existing or being added)."""
        plen, addr, bits, low = key_plen(k), key_addr(k), key_bits(k), key_table(k)
        addr_shift, plen_shift = ADDR.shift, PLEN.shift
        own = self._own
        for p in plens:
            if p >= plen:
                break
            anc = (((addr >> (bits - p)) << (bits - p)) << addr_shift) | (p << plen_shift) | low
            if anc in own or anc in pending:
                yield anc

    def _descendants(self, k: int, table: Table, pending_sorted: list[int]) -> Iterator[int]:
        """Longer prefixes in the same trie inside `k` (existing or being added)."""
        plen, bits, lo, low = key_plen(k), key_bits(k), key_addr(k), key_table(k)
        hi = lo | ((1 << (bits - plen)) - 1)
        # Trie positions are address << TRIE_ADDR.shift | plen: [first, last] spans the addresses.
        t_shift, t_plen = TRIE_ADDR.shift, TRIE_PLEN.bits
        addr_shift, plen_shift = ADDR.shift, PLEN.shift
        first, last = lo << t_shift, (hi << t_shift) | t_plen
        for v in self._trie_keys[table].irange(first, last):
            if (v & t_plen) > plen:
                yield ((v >> t_shift) << addr_shift) | ((v & t_plen) << plen_shift) | low
        # Pending keys sorted by address: a range, not a scan (bulk loads add many prefixes).
        i = bisect_left(pending_sorted, first)
        while i < len(pending_sorted) and pending_sorted[i] <= last:
            v = pending_sorted[i]
            if (v & t_plen) > plen:
                yield ((v >> t_shift) << addr_shift) | ((v & t_plen) << plen_shift) | low
            i += 1

    # -- committing ----------------------------------------------------------------------------

    def commit(self, plan: Plan) -> None:
        """Record a plan whose map writes succeeded (the last plan made: nothing in between)."""
        codes, own = self._codes, self._own
        for r in plan.removed:
            del codes[r.id]
        codes.update(plan.codes)
        plen_shift, plen_bits, v6_mask = PLEN.shift, PLEN.bits, V6.mask
        for k, ids in plan.own.items():
            had = k in own
            if ids:
                own[k] = ids[0] if len(ids) == 1 else ids
                if not had and k:
                    host = ADDR_BITS_V6 if k & v6_mask else ADDR_BITS_V4
                    if (k >> plen_shift) & plen_bits != host:  # a prefix: in a trie
                        self._remember_trie_key(k)
            elif had:
                del own[k]
                if key_is_prefix(k):
                    self._forget_trie_key(k)
        for k, slots in plan.inherit.items():
            if slots:
                self._inherit[k] = slots
            else:
                self._inherit.pop(k, None)
        for h in plan.hosts:
            _update_in_pieces(codes, h.ids, h.codes)
            _update_in_pieces(own, h.keys, h.ids)
            if h.table in LPM_TABLES:
                self._trie_keys[h.table].update(map(trie_position, h.keys))
                trie_plens = self._trie_plens[h.table]
                lens = (h.key_low >> np.uint64(PLEN.shift)) & np.uint64(PLEN.bits)
                for p, c in zip(*np.unique(lens, return_counts=True), strict=True):
                    trie_plens[int(p)] = trie_plens.get(int(p), 0) + int(c)
        if plan.counts:
            self._counts = list(plan.counts)
        self._n_sets = plan.n_sets if plan.counts else self._n_sets

    def adopt(
        self,
        entries: Iterable[tuple[Table, int, list[tuple[int, int]]]],
        batches: Iterable[HostBatch] = (),
    ) -> None:
        """Take over entries that are in the maps already, without planning them again.

        Each entry is (table, compact key, slots best first), a slot being (rule id, code) for
        the entry's own rules and (rule id, -1) for a rule inherited from a covering prefix:
        what a map entry holds. `batches`: one-slot entries (their own rule) as columns. The
        compiler must be empty.
        """
        if self._codes:
            raise ValueError("adopt() needs an empty compiler")
        codes, own, counts = self._codes, self._own, self._counts
        trie: dict[Table, list[int]] = {t: [] for t in LPM_TABLES}
        for b in batches:
            codes.update(zip(b.ids, b.codes, strict=True))
            own.update(zip(b.keys, b.ids, strict=True))
            counts[b.table] += len(b.ids)
            if b.table in trie:
                trie[b.table].extend(map(trie_position, b.keys))
        for table, k, slots in entries:
            if len(slots) == 1:  # most entries: one rule, its own
                rid, code = slots[0]
                if code < 0:
                    continue
                codes[rid] = code
                own[k] = rid
            else:
                mine = []
                for rid, code in slots:
                    if code >= 0:
                        codes[rid] = code
                        mine.append(rid)
                if not mine:
                    continue
                own[k] = mine[0] if len(mine) == 1 else mine
                self._n_sets += 1
                if len(mine) != len(slots):
                    self._inherit[k] = tuple(rid for rid, _ in slots)
            counts[table] += 1
            if table in trie:
                trie[table].append(trie_position(k))
        t_plen = TRIE_PLEN.bits
        for table, positions in trie.items():
            self._trie_keys[table] = SortedList(positions)
            plens = self._trie_plens[table]
            for v in positions:
                plens[v & t_plen] = plens.get(v & t_plen, 0) + 1

    def _remember_trie_key(self, k: int) -> None:
        table = _table_of(k)
        self._trie_keys[table].add(trie_position(k))
        plens = self._trie_plens[table]
        plen = key_plen(k)
        plens[plen] = plens.get(plen, 0) + 1

    def _forget_trie_key(self, k: int) -> None:
        table = _table_of(k)
        self._trie_keys[table].remove(trie_position(k))
        plens = self._trie_plens[table]
        plen = key_plen(k)
        plens[plen] -= 1
        if not plens[plen]:
            del plens[plen]
