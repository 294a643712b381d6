"""Reading pinned maps back: entries, slots, rule sets, counter indices and IPv4 trie keys.

The maps hold exactly what the compiler wrote, so adoption replans nothing: one pass over
every lookup table yields each entry as (table, compact key, slots) for
`RuleCompiler.adopt`, and records on the way which rule set each entry points at, each rule's
counter index and each IPv4 trie key (for the prefix hint).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from xdpfw.abi import Table
from xdpfw.compiler import TableKey
from xdpfw.datapath.hint import HINT_TRIES, HintChange
from xdpfw.datapath.keys import compact_key, table_key
from xdpfw.datapath.slots import ENTRY_SET_ID, SLOT, U32, read_slot
from xdpfw.kernel import bpfsys

__all__ = ["Adopted", "read_entries"]


@dataclass
class Adopted:
    """What `read_entries` found besides the entries themselves."""

    set_of: dict[TableKey, int] = field(default_factory=dict)  # entry -> its rule set
    counters: dict[int, int] = field(default_factory=dict)  # rule id -> counter index
    trie_keys: list[HintChange] = field(default_factory=list)  # IPv4 trie keys, as added


def read_entries(
    maps: dict[str, bpfsys.Map[Any, Any]], found: Adopted
) -> Iterator[tuple[Table, int, list[tuple[int, int]]]]:
    """Every lookup-table entry as (table, compact key, slots), best slot first.

    A slot is (rule id, code) when the rule is the entry's own, (rule id, -1) when it is
    inherited from a covering prefix. Fills `found` as it goes.
    """
    sets = maps["xdpfw_sets"]
    for table in Table:
        if table is Table.MAX:
            continue
        trie = HINT_TRIES.get(table)
        for raw_key, raw in maps[table.map_name].dump_raw():
            k = compact_key(table, raw_key)
            (set_id,) = U32.unpack_from(raw, ENTRY_SET_ID)
            slots = [read_slot(k, raw, 0)]
            if set_id or trie is not None:
                key = table_key(table, k)
                if set_id:
                    found.set_of[key] = set_id
                    rest = sets.lookup_raw(U32.pack(set_id)) or b""
                    for off in range(0, len(rest) - SLOT.size + 1, SLOT.size):
                        slot = read_slot(k, rest, off)
                        if slot[0]:  # rank 0: an unused slot
                            slots.append(slot)
                if trie is not None:
                    found.trie_keys.append((trie, key, 1))
            out = []
            for _, rule_id, code, counter in slots:
                found.counters[rule_id] = counter
                out.append((rule_id, code))
            yield table, k, out
