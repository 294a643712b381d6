"""Reading pinned maps back: entries, slots, rule sets and counter indices.

The maps hold exactly what the compiler wrote, so adoption replans nothing: one pass over
every lookup table yields each entry as (table, compact key, slots) for
`RuleCompiler.adopt`, and records on the way which rule set each entry points at and each
rule's counter index. A table is read through `tables(table)`: a map, or the IPv4 prefix
arrays (d248.PrefixTable, which show their entries as the IPv4 tries of ABI 4 did; ABI 4's
tries themselves are read the same way by an upgrade).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdpfw import codes
from xdpfw.abi import Table
from xdpfw.compiler import HostBatch, TableKey
from xdpfw.datapath.keys import LPM4_KEY, compact_key, table_key
from xdpfw.datapath.slots import ENTRY_DTYPE, ENTRY_SET_ID, SLOT, U32, read_slot
from xdpfw.kernel import bpfsys

__all__ = ["Adopted", "Tables", "map_tables", "read_columns", "read_entries"]

_V4 = {  # the IPv4 tables read as columns: (direction, exact)
    Table.SRC4: (codes.DIR_SRC, True),
    Table.DST4: (codes.DIR_DST, True),
    Table.SRC4_LPM: (codes.DIR_SRC, False),
    Table.DST4_LPM: (codes.DIR_DST, False),
}


@dataclass
class Adopted:
    """What `read_entries` found besides the entries themselves."""

    set_of: dict[TableKey, int] = field(default_factory=dict)  # entry -> its rule set
    counters: dict[int, int] = field(default_factory=dict)  # rule id -> counter index


Tables = Callable[[Table], Any]  # a table -> what holds its entries (dump_raw, dump_columns)


def map_tables(maps: dict[str, bpfsys.Map[Any, Any]]) -> Tables:
    """Every table in the map of its name (ABI 4's pins: the IPv4 prefixes in tries)."""
    return lambda table: maps[table.map_name]


def read_entries(
    maps: dict[str, bpfsys.Map[Any, Any]], found: Adopted, tables: Tables
) -> Iterator[tuple[Table, int, list[tuple[int, int]]]]:
    """Every lookup-table entry as (table, compact key, slots), best slot first.

    A slot is (rule id, code) when the rule is the entry's own, (rule id, -1) when it is
    inherited from a covering prefix. Fills `found` as it goes.
    """
    sets = maps["xdpfw_sets"]
    for table in Table:
        if table is Table.MAX:
            continue
        for raw_key, raw in tables(table).dump_raw():
            yield _entry(table, raw_key, raw, sets, found)


def _entry(
    table: Table, raw_key: bytes, raw: bytes, sets: bpfsys.Map[Any, Any], found: Adopted
) -> tuple[Table, int, list[tuple[int, int]]]:
    k = compact_key(table, raw_key)
    (set_id,) = U32.unpack_from(raw, ENTRY_SET_ID)
    slots = [read_slot(k, raw, 0)]
    if set_id:
        found.set_of[table_key(table, k)] = set_id
        rest = sets.lookup_raw(U32.pack(set_id)) or b""
        for off in range(0, len(rest) - SLOT.size + 1, SLOT.size):
            slot = read_slot(k, rest, off)
            if slot[0]:  # rank 0: an unused slot
                slots.append(slot)
    out = []
    for _, rule_id, code, counter in slots:
        found.counters[rule_id] = counter
        out.append((rule_id, code))
    return table, k, out


def read_columns(
    maps: dict[str, bpfsys.Map[Any, Any]], found: Adopted, tables: Tables
) -> tuple[list[HostBatch], Iterator[tuple[Table, int, list[tuple[int, int]]]]]:
    """`read_entries`, with the one-slot entries of the IPv4 tables (no rule set: the entry's
    own rule, most of a big rule set) read as columns: (batches for `RuleCompiler.adopt`,
    the other entries as `read_entries` yields them). Fills `found` as it goes."""
    batches: list[HostBatch] = []
    rest: list[tuple[Table, bytes, bytes]] = []
    u64 = np.uint64
    for table, (direction, exact) in _V4.items():
        m = tables(table)
        keys, values, n = m.dump_columns()
        if not n:
            continue
        entries = np.frombuffer(values, dtype=ENTRY_DTYPE, count=n)
        alone = entries["set_id"] == 0
        if exact:
            addr = np.frombuffer(keys, dtype=">u4", count=n).astype(u64)
            plen = np.full(n, codes.ADDR_BITS_V4, dtype=u64)
        else:
            lpm = np.frombuffer(keys, dtype=LPM4_KEY, count=n)
            addr, plen = lpm["addr"].astype(u64), lpm["plen"].astype(u64)
        ks, vs = m.key_size, ENTRY_DTYPE.itemsize
        for i in np.flatnonzero(~alone).tolist():  # entries with a rule set: the general way
            rest.append((table, keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]))
        sel = np.flatnonzero(alone)
        if not len(sel):
            continue
        first = entries["first"][sel]
        key_low = (plen[sel] << u64(codes.PLEN.shift)) | u64(direction)
        key = (addr[sel] << u64(codes.ADDR.shift)) | key_low
        has_ports = first["has_ports"].astype(u64)
        low = (
            (first["verdict"].astype(u64) << u64(codes.VERDICT.shift))
            | (first["proto"].astype(u64) << u64(codes.PROTO.shift))
            | (has_ports << u64(codes.HAS_PORTS.shift))
            | np.where(has_ports == u64(1),
                       (first["port_lo"].astype(u64) << u64(codes.PORT_LO.shift))
                       | first["port_hi"].astype(u64), u64(0))
            | (first["tcp_mask"].astype(u64) << u64(codes.TCP_MASK.shift))  # issue 16
            | (first["tcp_want"].astype(u64) << u64(codes.TCP_WANT.shift))
        )
        key_list = key.tolist()
        shift = codes.KEY.shift
        rule_ids = first["rule_id"].astype(np.uint32)
        ids = rule_ids.tolist()
        batch = HostBatch(
            table, ids, key_list,
            [(k << shift) | lo for k, lo in zip(key_list, low.tolist(), strict=True)],
            rule_ids, low, key_low,
        )
        batches.append(batch)
        found.counters.update(zip(ids, first["counter"].tolist(), strict=True))
    return batches, _chain(maps, found, rest, tables)


def _chain(
    maps: dict[str, bpfsys.Map[Any, Any]], found: Adopted, rest: list[tuple[Table, bytes, bytes]],
    tables: Tables,
) -> Iterator[tuple[Table, int, list[tuple[int, int]]]]:
    sets = maps["xdpfw_sets"]
    for table, raw_key, raw in rest:
        yield _entry(table, raw_key, raw, sets, found)
    for table in Table:
        if table is Table.MAX or table in _V4:
            continue
        for raw_key, raw in tables(table).dump_raw():
            yield _entry(table, raw_key, raw, sets, found)
