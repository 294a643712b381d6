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
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from sortedcontainers import SortedList

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.errors import CapacityExceeded, RuleConflict, RuleNotFound
from xdpfw.rules import Network, Rule

__all__ = [
    "MAX_SLOTS",
    "Capacities",
    "Plan",
    "RuleCompiler",
    "TableKey",
    "key_of",
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


def _rank_desc(rule: Rule) -> int:
    return -rule.rank()


@dataclass(frozen=True)
class _Pending:
    """Trie keys a plan touches, indexed for ancestor and descendant queries."""

    keys: frozenset[TableKey]
    plens: frozenset[int]
    sorted: list[tuple[int, int, TableKey]]  # (address, plen, key), by address

    @classmethod
    def of(cls, keys: set[TableKey]) -> _Pending:
        return cls(
            frozenset(keys),
            frozenset(k.plen for k in keys),
            sorted((int.from_bytes(k.addr, "big"), k.plen, k) for k in keys),
        )


@dataclass
class Plan:
    """What a change does to the tables: new slot lists (empty = delete the entry)."""

    entries: dict[TableKey, tuple[Rule, ...]] = field(default_factory=dict)
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)


class RuleCompiler:
    """Rules and the entries they compile to. Not thread-safe: callers serialise changes."""

    def __init__(self, caps: Capacities) -> None:
        self.caps = caps
        self.rules: dict[int, Rule] = {}
        self._own: dict[TableKey, list[Rule]] = {}  # key -> its own rules, best first
        # LPM key -> slots in the map (own + inherited). Exact and address-less keys inherit
        # nothing, so their slots are their own rules and are not stored twice.
        self._compiled: dict[TableKey, tuple[Rule, ...]] = {}
        # Per trie: keys ordered by (address, plen) so a prefix's descendants are a range.
        self._trie_keys: dict[Table, SortedList] = {t: SortedList() for t in LPM_TABLES}
        self._trie_plens: dict[Table, dict[int, int]] = {t: {} for t in LPM_TABLES}
        self._by_match: dict[bytes, int] = {}
        self._counts = [0] * Table.MAX  # entries per table
        self._n_sets = 0  # entries holding more than one slot

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rules)

    def entries(self) -> Iterator[tuple[TableKey, tuple[Rule, ...]]]:
        """Every entry in the maps with its slots, best first."""
        for key, own in self._own.items():
            if key.table not in LPM_TABLES:
                yield key, tuple(own)
        yield from self._compiled.items()

    def compiled(self, key: TableKey) -> tuple[Rule, ...]:
        if key.table in LPM_TABLES:
            return self._compiled.get(key, ())
        return tuple(self._own.get(key, ()))

    def table_counts(self) -> list[int]:
        return list(self._counts)

    @property
    def n_sets(self) -> int:
        return self._n_sets

    def find_duplicate(self, rule: Rule) -> int | None:
        return self._by_match.get(rule.match_key())

    # -- planning ------------------------------------------------------------------------------

    def plan_add(self, rules: Iterable[Rule]) -> Plan:
        """Entries after adding `rules` (all or nothing). Raises before anything changes."""
        plan = Plan()
        new_own: dict[TableKey, list[Rule]] = {}
        seen_ids: set[int] = set()
        seen_match: dict[bytes, int] = {}
        for rule in rules:
            if rule.id in self.rules or rule.id in seen_ids:
                raise RuleConflict(f"rule id {rule.id} already exists", rule.id)
            dup = self._by_match.get(rule.match_key(), seen_match.get(rule.match_key()))
            if dup is not None:
                raise RuleConflict(
                    f"an identical rule already exists (id {dup}): {rule.describe()}", dup
                )
            seen_ids.add(rule.id)
            seen_match[rule.match_key()] = rule.id
            new_own.setdefault(key_of(rule), []).append(rule)
            plan.added.append(rule)
        if len(self.rules) + len(plan.added) > self.caps.max_rules:
            raise CapacityExceeded(
                "rule table", self.caps.max_rules, "raise --max-rules or remove rules"
            )
        self._plan_keys(plan, new_own, {})
        return plan

    def plan_remove(self, rule_ids: Iterable[int]) -> Plan:
        plan = Plan()
        gone: dict[TableKey, set[int]] = {}
        for rid in rule_ids:
            rule = self.rules.get(rid)
            if rule is None:
                raise RuleNotFound(rid)
            if rid in gone.get(key_of(rule), set()):
                continue
            gone.setdefault(key_of(rule), set()).add(rid)
            plan.removed.append(rule)
        self._plan_keys(plan, {}, gone)
        return plan

    def _plan_keys(
        self,
        plan: Plan,
        added: dict[TableKey, list[Rule]],
        removed: dict[TableKey, set[int]],
    ) -> None:
        changed = set(added) | set(removed)

        def own_after(key: TableKey) -> list[Rule]:
            cur = list(self._own.get(key, ()))
            drop = removed.get(key)
            if drop:
                cur = [r for r in cur if r.id not in drop]
            extra = added.get(key)
            if extra:
                cur.extend(extra)
            return cur

        # Keys whose compiled slots change: the changed keys plus, in tries, their descendants.
        affected: set[TableKey] = set(changed)
        by_trie: dict[Table, set[TableKey]] = {}
        for key in changed:
            if key.table in LPM_TABLES:
                by_trie.setdefault(key.table, set()).add(key)
        pending = {t: _Pending.of(keys) for t, keys in by_trie.items()}
        none = _Pending.of(set())
        for key in changed:
            if key.table in LPM_TABLES:
                affected.update(self._descendants(key, pending[key.table]))

        own_cache: dict[TableKey, list[Rule]] = {}

        def own(key: TableKey) -> list[Rule]:
            if key not in own_cache:
                own_cache[key] = own_after(key) if key in changed else list(self._own.get(key, ()))
            return own_cache[key]

        counts = self.table_counts()
        for key in affected:
            mine = own(key)
            if not mine:
                plan.entries[key] = ()
                if self._has_entry(key):
                    counts[key.table] -= 1
                continue
            slots = list(mine)
            if key.table in LPM_TABLES:
                for anc in self._ancestors(key, pending.get(key.table, none)):
                    slots.extend(own(anc))
            if len(slots) > MAX_SLOTS:
                raise CapacityExceeded(
                    f"rules covering {key.network}",
                    MAX_SLOTS,
                    "a prefix and the prefixes covering it can hold that many rules in all; "
                    "merge port rules into ranges",
                )
            slots.sort(key=_rank_desc)
            plan.entries[key] = tuple(slots)
            if not self._has_entry(key):
                counts[key.table] += 1
        for table in Table:
            if table is Table.MAX:
                continue
            if counts[table] > self.caps.limit(table):
                raise CapacityExceeded(
                    table.map_name, self.caps.limit(table), "raise the capacity at load time"
                )
        sets = self._n_sets
        for key, new in plan.entries.items():
            sets += (len(new) > 1) - (len(self.compiled(key)) > 1)
        if sets > self.caps.max_sets - 1:
            raise CapacityExceeded(
                "xdpfw_sets (entries holding more than one rule)",
                self.caps.max_sets - 1,
                "raise --max-sets",
            )

    def _has_entry(self, key: TableKey) -> bool:
        return key in (self._compiled if key.table in LPM_TABLES else self._own)

    def _ancestors(self, key: TableKey, pending: _Pending) -> Iterator[TableKey]:
        """Shorter prefixes in the same trie that cover `key` (existing or being added)."""
        plens = self._trie_plens[key.table]
        addr = int.from_bytes(key.addr, "big")
        bits = len(key.addr) * 8
        for plen in sorted(plens.keys() | pending.plens):
            if plen >= key.plen:
                break
            masked = addr & ~((1 << (bits - plen)) - 1) if plen < bits else addr
            anc = TableKey(key.table, masked.to_bytes(len(key.addr), "big"), plen)
            if anc in self._own or anc in pending.keys:
                yield anc

    def _descendants(self, key: TableKey, pending: _Pending) -> Iterator[TableKey]:
        """Longer prefixes in the same trie inside `key` (existing or being added)."""
        bits = len(key.addr) * 8
        lo = int.from_bytes(key.addr, "big")
        hi = lo | ((1 << (bits - key.plen)) - 1)
        for addr, plen in self._trie_keys[key.table].irange((lo, 0), (hi, bits + 1)):
            if plen > key.plen:
                yield TableKey(key.table, addr.to_bytes(len(key.addr), "big"), plen)
        # Pending keys sorted by address: a range, not a scan (bulk loads add many prefixes).
        i = bisect_left(pending.sorted, (lo, 0))
        while i < len(pending.sorted) and pending.sorted[i][0] <= hi:
            _, plen, other = pending.sorted[i]
            if plen > key.plen:
                yield other
            i += 1

    # -- committing ----------------------------------------------------------------------------

    def commit(self, plan: Plan) -> None:
        """Record a plan whose map writes succeeded."""
        old_sizes = {key: len(self.compiled(key)) for key in plan.entries}
        for rule in plan.removed:
            del self.rules[rule.id]
            self._by_match.pop(rule.match_key(), None)
            key = key_of(rule)
            own = self._own[key]
            own.remove(rule)
            if not own:
                del self._own[key]
                self._forget_trie_key(key)
        for rule in plan.added:
            self.rules[rule.id] = rule
            self._by_match[rule.match_key()] = rule.id
            key = key_of(rule)
            mine = self._own.get(key)
            if mine is None:
                self._own[key] = [rule]
                self._remember_trie_key(key)
            else:
                insort(mine, rule, key=_rank_desc)
        for key, slots in plan.entries.items():
            old = old_sizes[key]
            self._n_sets += (len(slots) > 1) - (old > 1)
            self._counts[key.table] += bool(slots) - bool(old)
            if key.table not in LPM_TABLES:
                continue  # the own list is the entry
            if slots:
                self._compiled[key] = slots
            else:
                self._compiled.pop(key, None)

    def _remember_trie_key(self, key: TableKey) -> None:
        if key.table in LPM_TABLES:
            self._trie_keys[key.table].add((int.from_bytes(key.addr, "big"), key.plen))
            plens = self._trie_plens[key.table]
            plens[key.plen] = plens.get(key.plen, 0) + 1

    def _forget_trie_key(self, key: TableKey) -> None:
        if key.table in LPM_TABLES:
            self._trie_keys[key.table].remove((int.from_bytes(key.addr, "big"), key.plen))
            plens = self._trie_plens[key.table]
            plens[key.plen] -= 1
            if not plens[key.plen]:
                del plens[key.plen]
