"""Writing a compiled plan into the maps, all or nothing, and the config map.

A plan (RuleCompiler.plan_add / plan_remove) names the new slot lists of every entry a change
touches. `PlanWriter.apply` hands the added rules zeroed counter indices, writes rule sets and
entries in batches (IPv4 prefix entries through d248.PrefixTable, which flips the DIR-24-8
cells after each entry is in), and commits the plan to the compiler; on any failure it puts
the touched entries back, frees what it took and says why (CapacityExceeded or KernelError).
Only after the commit are freed counter indices and rule sets retired (quarantined) and the
per-table counts published in xdpfw_config.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from typing import Any

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.compiler import Capacities, HostBatch, Plan, RuleCompiler, TableKey
from xdpfw.datapath.counters import Counters
from xdpfw.datapath.d248 import PrefixTable, PrefixTables
from xdpfw.datapath.keys import batch_keys, encode_key
from xdpfw.datapath.sets import SetAllocator
from xdpfw.datapath.slots import U32, entry_bytes, entry_columns, slot_bytes
from xdpfw.datapath.translate import kernel_door, kernel_error
from xdpfw.errors import CapacityExceeded, DatapathError
from xdpfw.kernel import bpfsys
from xdpfw.rules import Rule

__all__ = ["PlanWriter"]

_NO_ROOM = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)


class PlanWriter:
    """The one writer of the lookup tables, xdpfw_sets and xdpfw_config (callers hold the lock)."""

    def __init__(
        self,
        maps: dict[str, bpfsys.Map[Any, Any]],
        compiler: RuleCompiler,
        caps: Capacities,
        sets: SetAllocator,
        counters: Counters,
        prefixes: PrefixTables | None,
    ) -> None:
        self._maps = maps
        self._compiler = compiler
        self._caps = caps
        self._sets = sets
        self._counters = counters
        self._prefixes = prefixes
        self.build_id = b""  # recorded in xdpfw_config: which build loaded the program

    def table(self, table: Table) -> bpfsys.Map[Any, Any] | PrefixTable:
        """Where a table's entries are written: its map, or the IPv4 prefix arrays (an ABI 4
        pin set, read by an upgrade only, has no prefixes: its tries are maps)."""
        if table.is_map or self._prefixes is None:
            return self._maps[table.map_name]
        return self._prefixes[table]

    def apply(self, plan: Plan) -> None:
        if self._prefixes is None:
            raise DatapathError("an ABI 4 pin set is only read (by an upgrade), never written")
        self._prefixes.next_plan()  # what the last plan freed may be reused from now on
        old_entries = {k: self._compiler.compiled(k) for k in plan.entries}
        set_of = self._sets.of
        old_sets = {k: set_of.get(k, 0) for k in plan.entries}
        new_sets: dict[TableKey, int] = {}
        # New rules get zeroed counter indices before any slot points at them.
        index = self._counters.index
        ctrs = index.alloc(r.id for r in plan.added)
        host_ctrs: list[Any] = []
        try:
            for h in plan.hosts:
                host_ctrs.append(index.alloc_many(h.rule_ids))
        except BaseException:
            index.release(plan.added_ids)
            raise
        written: list[tuple[HostBatch, bytes, int]] = []  # host entries in the maps
        try:
            self._counters.zero(ctrs)
            for c in host_ctrs:
                self._counters.zero(c)
            self._write_hosts(plan.hosts, host_ctrs, written)
            self._write_entries(plan.entries, new_sets)
            self._compiler.commit(plan)
        except BaseException as exc:  # CapacityExceeded from the set allocator, too
            self._rollback(old_entries, old_sets, new_sets)
            self._unwrite_hosts(written)
            index.release(plan.added_ids)
            if not isinstance(exc, OSError):
                raise
            if exc.errno in _NO_ROOM:
                raise CapacityExceeded(
                    "a kernel map", self._caps.max_rules, f"the kernel said: {exc}"
                ) from exc
            raise kernel_error("updating rule maps", exc) from exc
        # Committed: publish the counts and retire what is no longer referenced.
        index.release(r.id for r in plan.removed)
        for key in plan.entries:
            old = old_sets.get(key, 0)
            if key in new_sets:
                set_of[key] = new_sets[key]
            elif not plan.entries[key] or len(plan.entries[key]) == 1:
                set_of.pop(key, None)
            if old and set_of.get(key) != old:
                self._sets.release(old)
        self.write_config()

    def _write_entries(
        self, entries: dict[TableKey, tuple[Rule, ...]], new_sets: dict[TableKey, int]
    ) -> None:
        sets = self._maps["xdpfw_sets"]
        ctr = self._counters.index
        set_size = ctypes.sizeof(abi.Set)
        updates: dict[Table, tuple[list[bytes], list[bytes]]] = {}
        deletes: dict[Table, list[bytes]] = {}
        for key, slots in entries.items():
            if not slots:
                deletes.setdefault(key.table, []).append(encode_key(key))
                continue
            set_id = 0
            if len(slots) > 1:
                set_id = self._sets.alloc()
                new_sets[key] = set_id
                rest = b"".join(slot_bytes(r, ctr[r.id]) for r in slots[1:])
                sets.update(U32.pack(set_id), rest.ljust(set_size, b"\0"))
            ks, vs = updates.setdefault(key.table, ([], []))
            ks.append(encode_key(key))
            vs.append(entry_bytes(slots[0], ctr[slots[0].id], set_id))
        for table, (ks, vs) in updates.items():
            self.table(table).update_batch(ks, vs)
        for table, dks in deletes.items():
            self.table(table).delete_batch(dks)

    def _write_hosts(
        self,
        hosts: list[HostBatch],
        counters: list[Any],
        written: list[tuple[HostBatch, bytes, int]],
    ) -> None:
        """New one-slot host entries, packed with numpy and written in batches; `written`
        records what reached the maps (for `_unwrite_hosts`)."""
        for h, ctrs in zip(hosts, counters, strict=True):
            keys = batch_keys(h)
            values = entry_columns(h.rule_ids, h.low, h.key_low, ctrs)
            try:
                self.table(h.table).update_batch_raw(keys, values, len(h.ids))
            except bpfsys.BpfError as exc:
                written.append((h, keys, exc.applied or 0))
                raise
            written.append((h, keys, len(h.ids)))

    def _unwrite_hosts(self, written: list[tuple[HostBatch, bytes, int]]) -> None:
        """Best effort: delete the host entries a failed change wrote (they were new)."""
        for h, keys, n in written:
            size = len(keys) // max(1, len(h.ids))
            m = self.table(h.table)
            try:
                m.delete_batch([keys[i * size : (i + 1) * size] for i in range(n)])
            except OSError:
                for i in range(n):
                    with contextlib.suppress(OSError):
                        m.delete(keys[i * size : (i + 1) * size])

    def _rollback(
        self,
        old_entries: dict[TableKey, tuple[Rule, ...]],
        old_sets: dict[TableKey, int],
        new_sets: dict[TableKey, int],
    ) -> None:
        """Best effort: put back the entries a failed change may have touched."""
        ctr = self._counters.index
        for key, slots in old_entries.items():
            m = self.table(key.table)
            try:
                if slots:
                    first = slots[0]
                    value = entry_bytes(first, ctr[first.id], old_sets.get(key, 0))
                    m.update(encode_key(key), value)
                else:
                    m.delete(encode_key(key))
            except OSError:
                pass
        for set_id in new_sets.values():
            self._sets.release(set_id)

    def write_config(self) -> None:
        """xdpfw_config: this ABI, the per-table entry counts, the capacities, the build."""
        conf = abi.Config()
        conf.abi_version = abi.ABI_VERSION
        for i, n in enumerate(self._compiler.table_counts()):
            conf.n_entries[i] = n
        conf.max_rules = self._caps.max_rules
        conf.max_prefixes = self._caps.max_prefixes
        conf.max_sets = self._caps.max_sets
        conf.max_tbl8_groups = self._caps.max_tbl8_groups
        conf.build_id[:] = self.build_id.ljust(8, b"\0")[:8]
        with kernel_door("writing xdpfw_config"):
            self._maps["xdpfw_config"].update(U32.pack(0), conf)
