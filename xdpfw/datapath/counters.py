"""Per-rule counters: who owns which counter index, and reading the counters.

Each slot carries its rule's index into xdpfw_rule_stats (per-CPU packets and bytes) and
xdpfw_rule_seen (the last hit, one memory-mapped u64 shared by the CPUs). `CounterIndex`
hands the indices out; `Counters` zeroes an index before it is handed out, reads the
counters back (summed over CPUs, last hit as Unix time) and carries them over to another
program on an upgrade. The per-CPU value layout is abi.RuleStats at bpfsys' per-CPU stride.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xdpfw import abi
from xdpfw.datapath.slots import U32, struct_of
from xdpfw.errors import CapacityExceeded, DatapathError
from xdpfw.kernel import bpfsys

__all__ = [
    "COUNTER_QUARANTINE_S",
    "CounterArrays",
    "CounterIndex",
    "Counters",
    "GlobalCounters",
    "RuleCounters",
    "as_counters",
    "copy_global",
    "read_global",
]

# A freed counter index is held back as long as a freed rule set: a packet that read the old
# slot may still credit it.
COUNTER_QUARANTINE_S = 0.2
_FEW_HOT = 2048  # up to this many hit rules, counters are read one by one, not in one batch
_STAT_FIELDS = [f[0] for f in abi.RuleStats._fields_]
_PACKETS, _BYTES = _STAT_FIELDS.index("packets"), _STAT_FIELDS.index("bytes")

_U32Array = np.ndarray[Any, np.dtype[np.uint32]]
_U64Array = np.ndarray[Any, np.dtype[np.uint64]]
CounterArrays = tuple[_U32Array, _U64Array, _U64Array, _U64Array]


@dataclass(frozen=True)
class RuleCounters:
    packets: int
    bytes: int
    last_hit: float | None  # Unix time of the last credited packet


@dataclass(frozen=True)
class GlobalCounters:
    packets: int
    passed: int
    dropped: int
    monitored: int
    malformed: int
    non_ip: int
    fragments: int
    bytes: int
    limited: int = 0  # dropped by a limit rule (issue 16)

    def by_stat(self) -> dict[abi.Stat, int]:
        """The same numbers keyed by XDPFW_STAT_* (what the model and the harness compare)."""
        return {stat: getattr(self, stat.name.lower()) for stat in abi.Stat if stat < abi.Stat.MAX}


def read_global(stats: bpfsys.Map[Any, Any]) -> GlobalCounters:
    """xdpfw_stats summed over CPUs."""
    per_cpu = stats.lookup_percpu(U32.pack(0)) or []
    tot = [sum(c.counter[i] for c in per_cpu) for i in range(abi.Stat.MAX)]
    return GlobalCounters(**{s.name.lower(): tot[s] for s in abi.Stat if s is not abi.Stat.MAX})


def _split(m: bpfsys.Map[Any, Any], raw: bytes) -> list[bytes]:
    """A per-CPU value as the syscalls see it, one value per CPU."""
    return [raw[c * m.stride : c * m.stride + m.value_size] for c in range(m.ncpus)]


def copy_global(src: bpfsys.Map[Any, Any], dst: bpfsys.Map[Any, Any]) -> None:
    """xdpfw_stats of another program, CPU by CPU."""
    for k, v in src.dump_raw():
        dst.update_percpu(k, _split(dst, v))


def _mono_offset() -> float:
    """Unix time minus CLOCK_MONOTONIC, to turn bpf_ktime_get_coarse_ns() into wall time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def as_counters(
    ids: _U32Array, packets: _U64Array, nbytes: _U64Array, last: _U64Array
) -> list[tuple[int, RuleCounters]]:
    """Counter arrays (see Counters.arrays) as (rule id, RuleCounters), in order."""
    offset = _mono_offset()
    return [
        (rid, RuleCounters(p, b, offset + t / 1e9 if t else None))
        for rid, p, b, t in zip(
            ids.tolist(), packets.tolist(), nbytes.tolist(), last.tolist(), strict=True
        )
    ]


class CounterIndex:
    """Rule id -> index into xdpfw_rule_stats and xdpfw_rule_seen (1 .. size).

    Direct-mapped, so a million rules cost no Python object each: a rule's index is its
    "home" 1 + (id - 1) % size whenever that is free, and only the others (the home was
    taken or is in quarantine) are remembered in a dict. `owner` is the reverse map (0 =
    free). A freed index is held back for COUNTER_QUARANTINE_S, since a packet that read the
    old slot may still credit it; an index is zeroed by the caller before it is handed out.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.owner = array("I", bytes(4 * (size + 1)))
        self.view: _U32Array = np.frombuffer(self.owner, dtype=np.uint32)
        self.moved: dict[int, int] = {}
        self._held = bytearray(size + 1)
        self._quarantine: deque[tuple[int, float]] = deque()
        self._spare: deque[int] = deque()  # free indices found by the last scan
        self._scan = 1
        self.high = 1  # indices from here on were never handed out

    def get(self, rule_id: int) -> int | None:
        home = 1 + (rule_id - 1) % self.size
        if self.owner[home] == rule_id:
            return home
        return self.moved.get(rule_id)

    def __getitem__(self, rule_id: int) -> int:
        idx = self.get(rule_id)
        if idx is None:
            raise KeyError(rule_id)
        return idx

    def alloc(self, rule_ids: Iterable[int]) -> list[int]:
        now = time.monotonic()
        while self._quarantine and now - self._quarantine[0][1] >= COUNTER_QUARANTINE_S:
            self._held[self._quarantine.popleft()[0]] = 0
        out: list[int] = []
        try:
            for rid in rule_ids:
                home = 1 + (rid - 1) % self.size
                if self.get(rid) is not None:  # callers never ask twice; do not leak if they do
                    raise DatapathError(f"rule {rid} already has a counter index")
                if not self.owner[home] and not self._held[home]:
                    idx = home
                else:
                    idx = self._any_free()
                    self.moved[rid] = idx
                self.owner[idx] = rid
                self.high = max(self.high, idx + 1)
                out.append(idx)
        except BaseException:
            self.release(self.owner[i] for i in out)
            raise
        return out

    def alloc_many(self, rule_ids: _U32Array) -> _U32Array:
        """`alloc` for many ids at once: every id whose home index is free (the common case
        of a bulk load) in numpy, the others one by one. Indices in the order of the ids."""
        n = len(rule_ids)
        if n == 0:
            return np.zeros(0, dtype=np.uint32)
        ids = rule_ids.astype(np.int64)
        homes = 1 + (ids - 1) % self.size
        held = np.frombuffer(self._held, dtype=np.uint8)
        free = (self.view[homes] == 0) & (held[homes] == 0)
        # two ids of one batch with the same home (ids a whole table apart): the later ones
        # go the slow way
        if n > 1 and not (
            bool((np.diff(ids) > 0).all()) and int(ids[-1]) - int(ids[0]) < self.size
        ):
            _, first = np.unique(homes, return_index=True)
            once = np.zeros(n, dtype=bool)
            once[first] = True
            fast = free & once
        else:  # ascending ids less than a table apart: every home is different
            fast = free
        if self.moved and not self.moved.keys().isdisjoint(ids[fast].tolist()):
            fast[:] = False  # an id already holding a moved index: let alloc refuse it
        out = np.zeros(n, dtype=np.uint32)
        out[fast] = homes[fast]
        self.view[homes[fast]] = rule_ids[fast]
        if fast.any():
            self.high = max(self.high, int(homes[fast].max()) + 1)
        slow = np.flatnonzero(~fast)
        if len(slow):
            try:
                out[slow] = self.alloc(rule_ids[slow].tolist())
            except BaseException:
                self.release(rule_ids[fast].tolist())
                raise
        return out

    def _any_free(self) -> int:
        while self._spare:
            idx = self._spare.popleft()
            if not self.owner[idx] and not self._held[idx]:
                return idx
        held = np.frombuffer(self._held, dtype=np.uint8)
        for _ in range(2):  # from where the last scan stopped, then from the start
            while self._scan <= self.size:
                end = min(self._scan + 65536, self.size + 1)
                window = slice(self._scan, end)
                free = np.flatnonzero((self.view[window] == 0) & (held[window] == 0))
                start, self._scan = self._scan, end
                if len(free):
                    self._spare.extend((free + start).tolist())
                    return self._spare.popleft()
            self._scan = 1
        if not self._quarantine:  # the compiler's capacity check makes this unreachable
            raise CapacityExceeded("xdpfw_rule_stats", self.size, "raise --max-rules")
        idx, freed = self._quarantine.popleft()  # all in use or held: wait for the oldest
        time.sleep(max(0.0, COUNTER_QUARANTINE_S - (time.monotonic() - freed)))
        self._held[idx] = 0
        return idx

    def release(self, rule_ids: Iterable[int]) -> list[int]:
        now = time.monotonic()
        out = []
        for rid in rule_ids:
            idx = self.get(rid)
            if idx is None:
                continue
            self.owner[idx] = 0
            self.moved.pop(rid, None)
            self._held[idx] = 1
            self._quarantine.append((idx, now))
            out.append(idx)
        return out

    def adopt_arrays(self, rule_ids: _U32Array, indices: _U32Array) -> None:
        """`adopt` of (rule id, index) pairs given as two arrays: checked and taken in numpy,
        the indices off their home remembered in `moved`."""
        if not len(rule_ids):
            return
        idx = indices.astype(np.int64)
        if int(idx.min()) < 1 or int(idx.max()) > self.size or len(np.unique(idx)) != len(idx) \
                or bool(self.view[idx].any()):
            self.adopt(dict(zip(rule_ids.tolist(), indices.tolist(), strict=True)))  # says why
            return
        self.view[idx] = rule_ids
        homes = 1 + (rule_ids.astype(np.int64) - 1) % self.size
        off = np.flatnonzero(homes != idx)
        self.moved.update(zip(rule_ids[off].tolist(), indices[off].tolist(), strict=True))
        self.high = max(self.high, int(idx.max()) + 1)

    def adopt(self, pairs: dict[int, int]) -> None:
        """Take (rule id -> index) as read back from the slots of adopted maps."""
        for rid, idx in pairs.items():
            if not 1 <= idx <= self.size or self.owner[idx]:
                raise DatapathError(
                    f"pinned slots give rule {rid} counter index {idx}, which is out of range "
                    f"1-{self.size} or also rule {self.owner[idx] if idx <= self.size else '-'}'s"
                )
            self.owner[idx] = rid
            if idx != 1 + (rid - 1) % self.size:
                self.moved[rid] = idx
            self.high = max(self.high, idx + 1)


class Counters:
    """xdpfw_rule_stats and xdpfw_rule_seen (memory-mapped) with the index of their owners.

    `lock` is the datapath's: held while the index changes, and by readers only while they
    copy who owns which index, not during the reads.
    """

    def __init__(
        self,
        stats: bpfsys.Map[Any, Any],
        seen: bpfsys.Map[Any, Any],
        max_rules: int,
        lock: threading.RLock,
    ) -> None:
        self.index = CounterIndex(max_rules)
        self._stats = stats
        self._lock = lock
        # Last hit per counter index: 0 = no packet since the rule got the index.
        self._seen_mem = seen.mmap_array()
        self.seen: _U64Array = np.frombuffer(self._seen_mem, dtype=np.uint64, count=max_rules + 1)
        # One element of xdpfw_rule_stats as the syscalls see it: a RuleStats per CPU.
        per_cpu = struct_of(abi.RuleStats)
        pad = "x" * (stats.stride - per_cpu.size)
        self._unpack = struct.Struct("=" + (per_cpu.format[1:] + pad) * stats.ncpus).unpack
        self._row = np.dtype(
            {
                "names": _STAT_FIELDS,
                "formats": [np.uint64] * len(_STAT_FIELDS),
                "offsets": [getattr(abi.RuleStats, f).offset for f in _STAT_FIELDS],
                "itemsize": stats.stride,
            }
        )

    def close(self) -> None:
        self.seen = np.zeros(0, dtype=np.uint64)
        with contextlib.suppress(BufferError):  # a view escaped: GC unmaps it
            self._seen_mem.close()

    def zero(self, indices: Sequence[int] | _U32Array) -> None:
        """Zero the counters of indices about to be handed out."""
        self._stats.update_array(indices, bytes(self._stats.value_size))
        self.seen[indices] = 0

    def read(self, rule_ids: Iterable[int]) -> dict[int, RuleCounters]:
        """The counters of these rules, read one by one (rules without an index are left out)."""
        offset = _mono_offset()
        nf = len(_STAT_FIELDS)
        out: dict[int, RuleCounters] = {}
        for rid in rule_ids:
            idx = self.index.get(rid)
            if idx is None:
                continue
            t = int(self.seen[idx])
            if not t:
                out[rid] = RuleCounters(0, 0, None)
                continue
            raw = self._stats.lookup_raw(U32.pack(idx))
            if raw is None:
                continue
            vals = self._unpack(raw)
            out[rid] = RuleCounters(
                sum(vals[_PACKETS::nf]), sum(vals[_BYTES::nf]), offset + t / 1e9
            )
        return out

    def arrays(self) -> CounterArrays:
        """(rule ids, packets, bytes, last hit ns) of every rule, summed over CPUs.

        Only rules hit since they got their index (last hit != 0) have their per-CPU counters
        read: one element at a time when they are few, else in batches of 65,536 elements
        (only the hit rows of each kept). The lock covers the copy of who owns which index,
        not the reads: a rule change meanwhile only shifts which packets a reader sees.
        """
        stats = self._stats
        with self._lock:
            top = self.index.high
            owners = self.index.view[:top].copy()
            live = np.flatnonzero(owners)
            last = self.seen[live].copy()
        hot = live[last != 0]
        packets = np.zeros(len(live), dtype=np.uint64)
        nbytes = np.zeros(len(live), dtype=np.uint64)
        if len(hot):
            if len(hot) <= _FEW_HOT:
                empty = bytes(stats.stride * stats.ncpus)
                blob = b"".join(stats.lookup_raw(U32.pack(int(i))) or empty for i in hot)
                rows = np.frombuffer(blob, dtype=self._row).reshape(-1, stats.ncpus)
            else:
                step = 65536
                parts = []
                for lo in range(int(hot[0]) // step * step, int(hot[-1]) + 1, step):
                    want = hot[(hot >= lo) & (hot < lo + step)]
                    if not len(want):
                        continue
                    hi = int(want[-1]) + 1
                    chunk = np.frombuffer(stats.read_array(hi, start=lo), dtype=self._row)
                    parts.append(chunk.reshape(-1, stats.ncpus)[want - lo])
                rows = np.concatenate(parts)
            where = last != 0
            packets[where] = rows["packets"].sum(axis=1, dtype=np.uint64)
            nbytes[where] = rows["bytes"].sum(axis=1, dtype=np.uint64)
        return owners[live], packets, nbytes, last

    def top(self, n: int | None = None) -> list[tuple[int, RuleCounters]]:
        """Rules by packets, most first (ties: lower id first); the first n, or all.

        Vectorised over the counter array, so the cost is one batch read and a partition,
        not a Python object per rule.
        """
        ids, packets, nbytes, last = self.arrays()
        if n is not None and n < len(ids):
            if n <= 0:
                return []
            cut = len(ids) - n
            threshold = np.partition(packets, cut)[cut]  # the n-th largest count
            above = np.flatnonzero(packets > threshold)
            tied = np.flatnonzero(packets == threshold)
            want = n - len(above)
            if len(tied) > want:
                tied = tied[np.argpartition(ids[tied], want - 1)[:want]]
            sel = np.concatenate((above, tied))
        else:
            sel = np.arange(len(ids))
        sel = sel[np.lexsort((ids[sel], ~packets[sel]))]
        return as_counters(ids[sel], packets[sel], nbytes[sel], last[sel])

    def copy_from(self, old: Counters) -> None:
        """Each rule's counters from its index in `old` to its index here (an upgrade)."""
        src, dst = old._stats, self._stats
        blob = src.read_array(old.index.high)
        size = src.stride * src.ncpus
        keys: list[bytes] = []
        values: list[bytes] = []
        for old_idx in np.flatnonzero(old.index.view[: old.index.high]).tolist():
            new_idx = self.index.get(old.index.owner[old_idx])
            if new_idx is not None and old_idx * size < len(blob):
                keys.append(U32.pack(new_idx))
                values.append(blob[old_idx * size : (old_idx + 1) * size])
                self.seen[new_idx] = old.seen[old_idx]
        for i in range(0, len(keys), 8192):
            dst.update_batch(
                keys[i : i + 8192], [_split(dst, v) for v in values[i : i + 8192]]
            )
