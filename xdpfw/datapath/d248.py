"""IPv4 prefix tables in DIR-24-8 (bpf/xdpfw_abi.h): the one writer of their arrays.

Each direction has three memory-mapped arrays: tbl24 (a cell per /24), tbl8 (256 cells per
group, for the /24s that hold prefixes longer than /24) and pfx (the entries, each followed by
its key: which prefix it is, and whether it is live). `PrefixTable` shows one direction as
the LPM trie's map did, keyed by struct bpf_lpm_trie_key bytes with abi.Entry values, so the
plan writer, its rollback and adoption use it as they used the trie; underneath:

- an entry is never rewritten in place: an update puts it at a fresh pfx index, then flips
  the cells; the old index is reused only after the next plan begins (`next_plan`), so a
  packet that read an old cell never reads a reused entry;
- the cells a prefix decides are found through a host-side shadow of each cell's prefix
  length (1 + length, 0 = none): adding a /L takes the cells of its range whose length is
  shorter; removing it gives the cells it decided to its longest covering prefix (or 0);
- a new tbl8 group is filled completely before its tbl24 cell flips to it, and a group
  whose last long prefix goes is flipped back before it is freed (and reused, like an index,
  from the next plan on). Every store is one aligned u32.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.errors import CapacityExceeded
from xdpfw.kernel import bpfsys

__all__ = [
    "D248_TABLES",
    "GROUP",
    "PFX_KEY_DTYPE",
    "PrefixTable",
    "PrefixTables",
    "Reference",
    "reference",
    "reference_runs",
    "sparse_reference",
]

GROUP = abi.D248_GROUP
D248_TABLES = (Table.SRC4_LPM, Table.DST4_LPM)
PFX_KEY_DTYPE = np.dtype([("addr", ">u4"), ("plen", "u1"), ("live", "u1"), ("pad", "u2")])
_ENTRY = ctypes.sizeof(abi.Entry)
_PFX = ctypes.sizeof(abi.PfxEntry)
_LPM4 = struct.Struct("=I4s")  # struct bpf_lpm_trie_key for IPv4
_CELLS24 = 1 << 24

_U32 = np.ndarray[Any, np.dtype[np.uint32]]
_U8 = np.ndarray[Any, np.dtype[np.uint8]]


def _pos(addr: int, plen: int) -> int:
    return addr << 6 | plen


def _span(idx_lo: _U32 | np.ndarray[Any, Any], width: int) -> np.ndarray[Any, Any]:
    """Cells lo .. lo+width-1 of every lo."""
    lo = np.asarray(idx_lo, dtype=np.int64)
    return (lo[:, None] + np.arange(width, dtype=np.int64)[None, :]).ravel()


class _Pool:
    """Indices 1.. (pfx) or 0.. (groups) with a rest: what is freed is handed out again only
    after the next plan has begun."""

    def __init__(self, first: int, end: int) -> None:
        self._next, self._end = first, end
        self._free: list[int] = []
        self._resting: list[int] = []

    def available(self) -> int:
        return len(self._free) + self._end - self._next

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next >= self._end:
            raise IndexError("pool empty")
        self._next += 1
        return self._next - 1

    def take_many(self, n: int) -> list[int]:
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - len(out) :]
        rest = n - len(out)
        if rest > self._end - self._next:
            self._free.extend(out)
            raise IndexError("pool empty")
        out.extend(range(self._next, self._next + rest))
        self._next += rest
        return out

    def give_back(self, i: int) -> None:
        """Freed: resting until the next plan."""
        self._resting.append(i)

    def wake(self) -> None:
        self._free.extend(self._resting)
        self._resting.clear()

    def adopt(self, used: set[int], first: int) -> None:
        top = max(used, default=first - 1) + 1
        self._next = max(top, first)
        self._free = [i for i in range(first, self._next) if i not in used]
        self._resting = []


@dataclass
class Reference:
    """What the cells of one direction must resolve to, from a set of prefixes: for each
    /24, the number of the longest prefix of /24 or shorter covering it (0 = none) and, for
    the /24s holding longer prefixes, the 256 addresses' numbers (prefix i is number i + 1)."""

    tbl24: _U32
    groups: dict[int, _U32]


def reference(addrs: Sequence[int] | np.ndarray[Any, Any],
              plens: Sequence[int] | np.ndarray[Any, Any]) -> Reference:
    """Longest-match numbers of every cell for prefixes (addr, plen), painted shortest first
    (a longer prefix overwrites the part of a shorter one it covers), numpy throughout."""
    a = np.asarray(addrs, dtype=np.int64)
    ln = np.asarray(plens, dtype=np.int64)
    vals = np.arange(1, len(a) + 1, dtype=np.uint32)
    tbl24 = np.zeros(_CELLS24, np.uint32)
    for plen in range(25):
        sel = ln == plen
        if sel.any():
            width = 1 << (24 - plen)
            tbl24[_span(a[sel] >> 8, width)] = np.repeat(vals[sel], width)
    groups: dict[int, _U32] = {}
    long_ = np.flatnonzero(ln > 24)
    for i in long_[np.argsort(ln[long_], kind="stable")].tolist():
        c = int(a[i]) >> 8
        g = groups.get(c)
        if g is None:
            g = groups[c] = np.full(256, tbl24[c], np.uint32)
        lo = int(a[i]) & 0xFF
        g[lo : lo + (1 << (32 - int(ln[i])))] = vals[i]
    return Reference(tbl24, groups)


class PrefixTable:
    """One direction's DIR-24-8 arrays, shown as the IPv4 trie's map was (see the module)."""

    key_size = _LPM4.size
    value_size = _ENTRY

    def __init__(self, table: Table, maps: dict[str, bpfsys.Map[Any, Any]], groups: int,
                 entries: int) -> None:
        self.table = table
        self.name = table.map_name
        names = abi.d248_maps(table)
        self._maps = [maps[n] for n in names]
        self._mems: list[mmap.mmap] = [m.mmap_array() for m in self._maps]
        self.max_groups, self.n_entries = groups, entries
        self.tbl24: _U32 = np.frombuffer(self._mems[0], np.uint32, count=_CELLS24)
        self.tbl8: _U32 = np.frombuffer(self._mems[1], np.uint32, count=groups * 256)
        # struct xdpfw_pfx_entry: the entry (what the program reads), then its key
        raw = np.frombuffer(self._mems[2], np.uint8, count=entries * _PFX).reshape(entries, _PFX)
        self.pfx: _U8 = raw[:, :_ENTRY]
        self.keys: np.ndarray[Any, Any] = np.ndarray(
            shape=(entries,), dtype=PFX_KEY_DTYPE, buffer=self._mems[2], offset=_ENTRY,
            strides=(_PFX,))
        self._len24: _U8 = np.zeros(_CELLS24, np.uint8)  # 1 + plen deciding each cell
        self._len8: _U8 = np.zeros((groups, 256), np.uint8)
        self._index: dict[int, int] = {}  # addr << 6 | plen -> pfx index
        self._plens: Counter[int] = Counter()
        self._group: dict[int, int] = {}  # /24 -> its tbl8 group
        self._inner: dict[int, int] = {}  # /24 with a group -> prefixes longer than /24 in it
        self._base: dict[int, int] = {}  # /24 with a group -> its /24-or-shorter match
        self._idx = _Pool(1, entries)
        self._groups = _Pool(0, groups)

    def close(self) -> None:
        self.tbl24 = self.tbl8 = np.zeros(0, np.uint32)
        self.pfx = np.zeros((0, _ENTRY), np.uint8)
        self.keys = np.zeros(0, PFX_KEY_DTYPE)
        for mem in self._mems:
            with contextlib.suppress(BufferError):  # a view escaped: GC unmaps it
                mem.close()

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def index_of(self, addr: int, plen: int) -> int:
        """The pfx index of a prefix's entry (0: none)."""
        return self._index.get(_pos(addr, plen), 0)

    def groups_used(self) -> int:
        return len(self._group)

    def _items(self) -> Iterator[tuple[int, int, int]]:
        for pos, i in list(self._index.items()):
            yield pos >> 6, pos & 63, i

    def dump_raw(self) -> Iterator[tuple[bytes, bytes]]:
        for addr, plen, i in self._items():
            yield _LPM4.pack(plen, addr.to_bytes(4, "big")), bytes(self.pfx[i])

    def items(self) -> Iterator[tuple[bytes, abi.Entry]]:
        for k, v in self.dump_raw():
            yield k, abi.Entry.from_buffer_copy(v)

    def dump_columns(self) -> tuple[bytes, bytes, int]:
        """(LPM keys back to back, entries back to back, count), as a map's dump_columns."""
        n = len(self._index)
        pos = np.fromiter(self._index.keys(), dtype=np.uint64, count=n)
        idx = np.fromiter(self._index.values(), dtype=np.int64, count=n)
        keys = np.zeros(n, dtype=[("plen", "=u4"), ("addr", ">u4")])
        keys["plen"] = pos & np.uint64(63)
        keys["addr"] = pos >> np.uint64(6)
        return keys.tobytes(), self.pfx[idx].tobytes(), n

    def lookup_raw(self, key: bytes) -> bytes | None:
        plen, addr = _LPM4.unpack(bytes(key))
        i = self._index.get(_pos(int.from_bytes(addr, "big"), plen))
        return None if i is None else bytes(self.pfx[i])

    def resolve(self, addr: int) -> int:
        """The pfx index the program reads for an address (what d248 in the program does)."""
        v = int(self.tbl24[addr >> 8])
        if v & GROUP:
            v = int(self.tbl8[((v & ~GROUP) << 8) | (addr & 0xFF)])
        return v

    # -- writing ---------------------------------------------------------------------------

    def next_plan(self) -> None:
        """A new plan begins: what the last one freed may be reused."""
        self._idx.wake()
        self._groups.wake()

    def update(self, key: bytes, value: bytes | abi.Entry) -> None:
        self.update_batch([key], [value])

    def update_batch(self, keys: Sequence[bytes], values: Sequence[bytes | abi.Entry],
                     flags: int = 0) -> None:
        parsed = [_LPM4.unpack(bytes(k)) for k in keys]
        self._need(len(parsed), [(int.from_bytes(a, "big"), p) for p, a in parsed])
        for (plen, addr), value in zip(parsed, values, strict=True):
            self._put(int.from_bytes(addr, "big"), plen, bytes(value))

    def update_batch_raw(self, keys: bytes, values: bytes, count: int, *,
                         step: int = 65536) -> None:
        """New entries given as columns (the bulk path): the /24-and-shorter prefixes that are
        new and touch no cell of another prefix are written in one vectorised pass."""
        ks = np.frombuffer(keys, dtype=[("plen", "=u4"), ("addr", ">u4")], count=count)
        addr = ks["addr"].astype(np.int64)
        plen = ks["plen"].astype(np.int64)
        vals = np.frombuffer(values, np.uint8, count=count * _ENTRY).reshape(count, _ENTRY)
        self._need(count, list(zip(addr.tolist(), plen.tolist(), strict=True)))
        short = plen <= 24
        fast = np.zeros(count, dtype=bool)
        if short.any():
            known = np.fromiter((_pos(a, p) in self._index for a, p in
                                 zip(addr[short].tolist(), plen[short].tolist(), strict=True)),
                                dtype=bool, count=int(short.sum()))
            fast[np.flatnonzero(short)[~known]] = True
        # a fast prefix must find all its cells empty: no shorter prefix, no group
        for p in np.unique(plen[fast]).tolist():
            sel = np.flatnonzero(fast & (plen == p))
            width = 1 << (24 - p)
            cells = _span(addr[sel] >> 8, width).reshape(len(sel), width)
            clear = ~(self.tbl24[cells] != 0).any(axis=1)  # no value, no group
            fast[sel[~clear]] = False
        # overlapping among themselves: not fast either (sorted by start, a range that
        # starts before the previous one ends)
        f = np.flatnonzero(fast)
        if len(f) > 1:
            lo = addr[f] >> 8
            hi = lo + (np.int64(1) << (24 - plen[f]))
            order = np.argsort(lo, kind="stable")
            overlap = np.zeros(len(f), dtype=bool)
            ends = np.maximum.accumulate(hi[order])
            overlap[order[1:]] = lo[order[1:]] < ends[:-1]
            overlap[order[:-1]] |= overlap[order[1:]]
            fast[f[overlap]] = False
        f = np.flatnonzero(fast)
        if len(f):
            idx = np.array(self._idx.take_many(len(f)), dtype=np.int64)
            self.pfx[idx] = vals[f]
            k = self.keys
            k["addr"][idx] = addr[f]
            k["plen"][idx] = plen[f]
            k["live"][idx] = 1
            for p in np.unique(plen[f]).tolist():
                sel = plen[f] == p
                width = 1 << (24 - p)
                cells = _span(addr[f][sel] >> 8, width)
                self._len24[cells] = p + 1
                self.tbl24[cells] = np.repeat(idx[sel].astype(np.uint32), width)
            self._index.update(zip((_pos(a, p) for a, p in zip(
                addr[f].tolist(), plen[f].tolist(), strict=True)), idx.tolist(), strict=True))
            self._plens.update(plen[f].tolist())
        for i in np.flatnonzero(~fast).tolist():
            self._put(int(addr[i]), int(plen[i]), bytes(vals[i]))

    def delete(self, key: bytes) -> None:
        self.delete_batch([key])

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            plen, addr = _LPM4.unpack(bytes(k))
            a = int.from_bytes(addr, "big")
            if _pos(a, plen) not in self._index:
                raise bpfsys.BpfError(2, op="BPF_MAP_DELETE_ELEM")  # ENOENT, as a map says
            self._drop(a, plen)

    def _need(self, n: int, keys: list[tuple[int, int]]) -> None:
        """Refuse, before any store, a change that would not fit the arrays."""
        if n > self._idx.available():
            raise CapacityExceeded(
                f"{self.name} entries", self.n_entries - 1,
                "raise --max-prefixes (entries rest one change before they are reused)")
        new_groups = {a >> 8 for a, p in keys if p > 24} - self._group.keys()
        if len(new_groups) > self._groups.available():
            raise CapacityExceeded(
                f"{self.name} tbl8 groups (/24s holding prefixes longer than /24)",
                self.max_groups, "raise XDPFW_MAX_TBL8_GROUPS (a capacity set at load time)")

    def _put(self, addr: int, plen: int, value: bytes) -> None:
        """The entry of prefix (addr, plen) becomes `value`: at a fresh index, then the cells."""
        addr &= ~((1 << (32 - plen)) - 1) & 0xFFFF_FFFF if plen else 0
        pos = _pos(addr, plen)
        old = self._index.get(pos)
        i = self._idx.take()
        self.pfx[i] = np.frombuffer(value, np.uint8, count=_ENTRY)
        k = self.keys[i : i + 1]
        k["addr"], k["plen"], k["live"] = addr, plen, 1
        self._index[pos] = i
        if old is None:
            self._plens[plen] += 1
            self._paint(addr, plen, lambda ln: ln < plen + 1, i, plen + 1, adding=True)
        else:
            self._paint(addr, plen, lambda ln: ln == plen + 1, i, plen + 1)
            self._retire(old)

    def _drop(self, addr: int, plen: int) -> None:
        pos = _pos(addr, plen)
        old = self._index.pop(pos)
        self._plens[plen] -= 1
        if not self._plens[plen]:
            del self._plens[plen]
        anc_i, anc_len = self._ancestor(addr, plen)
        self._paint(addr, plen, lambda ln: ln == plen + 1, anc_i, anc_len, removing=True)
        self._retire(old)

    def _retire(self, i: int) -> None:
        self.keys["live"][i] = 0
        self._idx.give_back(i)

    def _ancestor(self, addr: int, plen: int) -> tuple[int, int]:
        """(pfx index, 1 + length) of the longest prefix strictly covering (addr, plen); (0, 0)."""
        for p in sorted((p for p in self._plens if p < plen), reverse=True):
            i = self._index.get(_pos(addr & ~((1 << (32 - p)) - 1) & 0xFFFF_FFFF if p else 0, p))
            if i is not None:
                return i, p + 1
        return 0, 0

    def _paint_base(self, c: int, select: Any, value: int, new_len: int) -> None:
        """The /24-or-shorter match of a /24 that has a group: its base cells in the group."""
        g = self._group[c]
        row = self._len8[g]
        cells = np.flatnonzero(select(row))
        self.tbl8[g * 256 + cells] = value
        row[cells] = new_len
        self._base[c] = value

    def _paint(self, addr: int, plen: int, select: Any, value: int, new_len: int,
               adding: bool = False, removing: bool = False) -> None:
        """Cells of (addr, plen) whose length passes `select` get `value` and `new_len`."""
        if plen <= 24:
            s = addr >> 8
            e = s + (1 << (24 - plen))
            seg = self._len24[s:e]
            mask = select(seg) if e - s > 1 else np.array([bool(select(int(seg[0])))])
            if e - s == 1:  # one /24 (most prefixes): no masks
                if not mask[0]:
                    return
                seg[0] = new_len
                if s in self._group:
                    self._paint_base(s, select, value, new_len)
                else:
                    self.tbl24[s] = value
                return
            if not mask.any():
                return
            seg[mask] = new_len
            if e - s < len(self._group):  # the /24s of the range that have a group
                grouped = (np.flatnonzero(self.tbl24[s:e] & np.uint32(GROUP)) + s).tolist()
            else:
                grouped = [c for c in self._group if s <= c < e]
            for c in [c for c in grouped if mask[c - s]]:
                self._paint_base(c, select, value, new_len)
                mask[c - s] = False  # its tbl24 cell names the group
            np.putmask(self.tbl24[s:e], mask, np.uint32(value))  # only where mask is set
            return
        c, lo = addr >> 8, addr & 0xFF
        hi = lo + (1 << (32 - plen))
        found = self._group.get(c)
        if found is None:
            if not adding:
                return
            g = self._groups.take()
            base = int(self.tbl24[c])
            self.tbl8[g * 256 : (g + 1) * 256] = base
            self._len8[g] = self._len24[c]
            self._group[c], self._base[c], self._inner[c] = g, base, 0
            self._len8[g, lo:hi] = new_len
            self.tbl8[g * 256 + lo : g * 256 + hi] = value
            self._inner[c] = 1
            self.tbl24[c] = GROUP | g  # filled completely first
            return
        g = found
        row = self._len8[g, lo:hi]
        cells = np.flatnonzero(select(row))
        self.tbl8[g * 256 + lo + cells] = value
        row[cells] = new_len
        if adding:
            self._inner[c] += 1
        elif removing:
            self._inner[c] -= 1
            if not self._inner[c]:
                self.tbl24[c] = self._base[c]  # flipped back before the group is freed
                del self._group[c], self._inner[c], self._base[c]
                self._groups.give_back(g)

    # -- adoption and checks ---------------------------------------------------------------

    def adopt(self) -> list[str]:
        """Take the arrays as pinned: the live keys are the prefixes; the cells are rebuilt
        from them where they differ (a change killed half way), keeping the groups in place.
        Returns what had to be repaired (empty for a clean set)."""
        k = self.keys
        live = np.flatnonzero(k["live"][1:] == 1) + 1
        addr = k["addr"][live].astype(np.int64)
        plen = k["plen"][live].astype(np.int64)
        # a key twice (killed between writing the new entry and retiring the old): keep the
        # index the cells point at
        nonzero = np.flatnonzero(self.tbl24)
        vals = self.tbl24[nonzero]
        is_group = (vals & np.uint32(GROUP)) != 0
        used_cells = set(np.unique(vals[~is_group]).tolist())
        groups = {int(c): int(v) & ~GROUP for c, v in zip(nonzero[is_group].tolist(),
                                                          vals[is_group].tolist(), strict=True)}
        for g in groups.values():
            if g < self.max_groups:
                used_cells.update(self.tbl8[g * 256 : (g + 1) * 256].tolist())
        chosen: dict[int, int] = {}
        for i, a, p in zip(live.tolist(), addr.tolist(), plen.tolist(), strict=True):
            pos = _pos(a, p)
            if pos not in chosen or (i in used_cells and chosen[pos] not in used_cells):
                chosen[pos] = i
        repairs: list[str] = []
        for i in set(live.tolist()) - set(chosen.values()):
            k["live"][i] = 0
            repairs.append(f"{self.name}: entry {i} was a replaced copy")
        self._index = chosen
        self._plens = Counter(p & 63 for p in chosen)
        order = list(chosen.items())
        a_arr = np.array([p >> 6 for p, _ in order], dtype=np.int64)
        l_arr = np.array([p & 63 for p, _ in order], dtype=np.int64)
        idx = np.array([0] + [i for _, i in order], dtype=np.uint32)  # number -> pfx index
        cells24, ref24, ref_groups = sparse_reference(
            list(zip(a_arr.tolist(), l_arr.tolist(), strict=True)), nonzero)
        lens = np.array([0] + [p + 1 for p in l_arr.tolist()], dtype=np.uint8)
        want24 = idx[ref24]  # per cell of cells24
        self._len24 = np.zeros(_CELLS24, np.uint8)
        self._len24[cells24] = lens[ref24]
        self._group, self._inner, self._base = {}, {}, {}
        self._len8 = np.zeros((self.max_groups, 256), np.uint8)
        long_per_24 = Counter(int(a) >> 8 for a, p in zip(a_arr.tolist(), l_arr.tolist(),
                                                          strict=True) if p > 24)
        free_groups = sorted(set(range(self.max_groups)) - set(groups.values()), reverse=True)
        for c, cells in ref_groups.items():
            had = groups.get(c)
            want8 = idx[cells]
            base = int(want24[np.searchsorted(cells24, c)])
            if had is None or had >= self.max_groups:
                g = free_groups.pop()
                self.tbl8[g * 256 : (g + 1) * 256] = want8
                self.tbl24[c] = GROUP | g
                repairs.append(f"{self.name}: /24 {c} had no group")
            else:
                g = had
                part = self.tbl8[g * 256 : (g + 1) * 256]
                bad = np.flatnonzero(part != want8)
                if len(bad):
                    part[bad] = want8[bad]
                    repairs.append(f"{self.name}: {len(bad)} cells of group {g}")
            self._group[c], self._inner[c], self._base[c] = g, long_per_24[c], base
            self._len8[g] = lens[cells]
        plain = np.ones(len(cells24), dtype=bool)
        if self._group:
            plain[np.searchsorted(cells24, np.fromiter(self._group.keys(), dtype=np.int64))] = False
        cur = self.tbl24[cells24]
        bad = np.flatnonzero(plain & (cur != want24))
        if len(bad):
            self.tbl24[cells24[bad]] = want24[bad]
            repairs.append(f"{self.name}: {len(bad)} tbl24 cells")
        self._idx.adopt(set(chosen.values()), 1)
        self._groups.adopt(set(self._group.values()), 0)
        return repairs

    def mismatches(self, want: Sequence[tuple[int, int]]) -> list[str]:
        """Differences between the arrays (read through the mapping) and what the prefixes
        `want` (addr, plen) imply, bit for bit: every cell must name the entry of its longest
        matching prefix (`sparse_reference`), whose key array says it is that prefix, and a
        /24 holds a tbl8 group exactly when a longer prefix lies in it."""
        problems: list[str] = []
        k = self.keys
        n = len(want)
        # number (1..n) of each pfx index, from the key array; index 0 is 0 (none), and an
        # index with no live key of `want` a number no prefix has (a cell naming it is wrong)
        number = np.full(self.n_entries, np.uint32(0x7FFF_FFFE), dtype=np.uint32)
        number[0] = 0
        by_key = {_pos(a, p): j + 1 for j, (a, p) in enumerate(want)}
        live = np.flatnonzero(k["live"] == 1)
        seen: set[int] = set()
        for i, a, p in zip(live.tolist(), k["addr"][live].tolist(), k["plen"][live].tolist(),
                           strict=True):
            j = by_key.get(_pos(a, p))
            if j is None:
                problems.append(f"{self.name}_pfx[{i}]: live key {a:#x}/{p} not compiled")
                continue
            if j in seen:
                problems.append(f"{self.name}_pfx[{i}]: {a:#x}/{p} is live twice")
            number[i] = j
            seen.add(j)
        if len(seen) != n:
            problems.append(f"{self.name}: {n - len(seen)} prefixes have no live key")
        cells = self.tbl24
        # tbl24 as runs (a wide prefix is one run, not 2^k cells), each run's number from the
        # key array; a /24 with a group is a run of its own, marked GROUP
        starts = np.concatenate([[0], np.flatnonzero(cells[1:] != cells[:-1]) + 1])
        vals = cells[starts]
        is_group = (vals & np.uint32(GROUP)) != 0
        got = np.where(is_group, np.uint32(GROUP), number[np.where(is_group, 0, vals)])
        ref_starts, ref_vals, ref_groups = reference_runs(want)
        got_s, got_v = _merge_runs(starts, got)
        if not (np.array_equal(got_s, ref_starts) and np.array_equal(got_v, ref_vals)):
            c = _first_difference(got_s, got_v, ref_starts, ref_vals)
            problems.append(f"{self.name}_tbl24: cells wrong, first at /24 "
                            f"{c >> 16}.{c >> 8 & 255}.{c & 255}.0")
        grouped = starts[is_group].tolist()
        groups_seen: set[int] = set()
        for c in sorted(set(grouped) | ref_groups.keys()):
            v = int(cells[c])
            if c not in ref_groups:
                problems.append(f"{self.name}_tbl24[{c}]: a group where no long prefix is")
                continue
            if not v & GROUP:
                problems.append(f"{self.name}_tbl24[{c}]: no group for its long prefixes")
                continue
            g = v & ~GROUP
            if g >= self.max_groups or g in groups_seen:
                problems.append(f"{self.name}_tbl24[{c}]: group {g} out of range or shared")
                continue
            groups_seen.add(g)
            got8 = number[self.tbl8[g * 256 : (g + 1) * 256]]
            if (got8 != ref_groups[c]).any():
                problems.append(f"{self.name}_tbl8 group {g} (/24 {c}): "
                                f"{int((got8 != ref_groups[c]).sum())} cells wrong")
        return problems

    def digest(self) -> bytes:
        """The cells resolved to the keys they name (not the indices, which a rollback may
        change), hashed: equal digests mean the program answers every address alike. Hashed
        as runs (where the resolved key changes), so a wide prefix costs one run, not 2^k
        cells."""
        k = self.keys
        key_of = (k["addr"].astype(np.uint64) << np.uint64(6)) | k["plen"].astype(np.uint64)
        key_of[0] = np.uint64(1 << 63)  # none
        cells = self.tbl24
        starts = np.concatenate([[0], np.flatnonzero(cells[1:] != cells[:-1]) + 1])
        vals = cells[starts]
        grouped = (vals & np.uint32(GROUP)) != 0
        resolved = key_of[np.where(grouped, 0, vals)]
        resolved[grouped] = np.uint64(1 << 62)  # a group: hashed below
        keep = np.concatenate([[True], resolved[1:] != resolved[:-1]]) | grouped
        h = hashlib.sha256(starts[keep].astype(np.int64).tobytes())
        h.update(resolved[keep].tobytes())
        for cell in starts[grouped].tolist():  # a group is one /24's: a run of one cell
            g = int(cells[cell]) & ~GROUP
            h.update(cell.to_bytes(4, "little"))
            h.update(key_of[self.tbl8[g * 256 : (g + 1) * 256]].tobytes())
        return h.digest()


def _merge_runs(starts: np.ndarray[Any, Any], vals: np.ndarray[Any, Any]
                ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Runs with adjacent equal values joined (a group run never joins: each is its /24's)."""
    keep = np.ones(len(starts), dtype=bool)
    keep[1:] = (vals[1:] != vals[:-1]) | (vals[1:] == np.uint32(GROUP))
    return starts[keep].astype(np.int64), vals[keep].astype(np.uint32)


def _first_difference(a_s: np.ndarray[Any, Any], a_v: np.ndarray[Any, Any],
                      b_s: np.ndarray[Any, Any], b_v: np.ndarray[Any, Any]) -> int:
    """The first cell where two run lists disagree."""
    bounds = np.union1d(a_s, b_s)
    va = a_v[np.searchsorted(a_s, bounds, side="right") - 1]
    vb = b_v[np.searchsorted(b_s, bounds, side="right") - 1]
    bad = np.flatnonzero(va != vb)
    return int(bounds[bad[0]]) if len(bad) else 0


def reference_runs(want: Sequence[tuple[int, int]]
                   ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], dict[int, _U32]]:
    """What tbl24 must hold for prefixes `want` (addr, plen; prefix j is number j + 1), as runs:
    (starts, numbers; GROUP for a /24 holding a longer prefix, 0 = none), merged like
    `_merge_runs`; and each such /24's 256 numbers. Painted shortest first on the elementary
    intervals the prefixes' bounds make, so its cost follows the number of prefixes."""
    a = np.array([x for x, _ in want], dtype=np.int64).reshape(-1)
    ln = np.array([p for _, p in want], dtype=np.int64).reshape(-1)
    short = np.flatnonzero(ln <= 24)
    lo = a[short] >> 8
    hi = lo + (np.int64(1) << (24 - ln[short]))
    long_24 = np.unique(a[ln > 24] >> 8)
    bounds = np.unique(np.concatenate([[0, _CELLS24], lo, hi, long_24, long_24 + 1]))
    num = np.zeros(len(bounds), dtype=np.uint32)  # of interval [bounds[i], bounds[i + 1])
    order = short[np.argsort(ln[short], kind="stable")]
    first = np.searchsorted(bounds, a[order] >> 8)
    last = np.searchsorted(bounds, (a[order] >> 8) + (np.int64(1) << (24 - ln[order])))
    for j, f, e in zip(order.tolist(), first.tolist(), last.tolist(), strict=True):
        num[f:e] = j + 1
    groups: dict[int, _U32] = {}
    long_ = np.flatnonzero(ln > 24)
    at24 = np.searchsorted(bounds, a[long_] >> 8)
    for i in np.argsort(ln[long_], kind="stable").tolist():
        j = int(long_[i])
        c = int(a[j]) >> 8
        g = groups.get(c)
        if g is None:
            g = groups[c] = np.full(256, num[at24[i]], np.uint32)
        x = int(a[j]) & 0xFF
        g[x : x + (1 << (32 - int(ln[j])))] = j + 1
    vals = num[:-1].copy()
    vals[np.searchsorted(bounds, long_24)] = np.uint32(GROUP)
    starts, merged = _merge_runs(bounds[:-1], vals)
    return starts, merged, groups


def sparse_reference(
    want: Sequence[tuple[int, int]], also: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], _U32, dict[int, _U32]]:
    """`reference` on the cells that matter only: those the prefixes cover and those in
    `also` (the kernel's non-zero cells). Returns (cells, their /24-or-shorter numbers, the
    groups' 256 numbers per /24 holding a longer prefix)."""
    a = np.array([x for x, _ in want], dtype=np.int64)
    ln = np.array([p for _, p in want], dtype=np.int64)
    short = np.flatnonzero(ln <= 24)
    lo = a[short] >> 8
    hi = lo + (np.int64(1) << (24 - ln[short]))
    # the /16 blocks (256 cells) that matter: those the prefixes touch and the kernel uses
    blocks = np.zeros(1 << 16, dtype=bool)
    blocks[np.asarray(also, dtype=np.int64) >> 8] = True
    blocks[a[ln > 24] >> 16] = True
    for s, e in zip(lo.tolist(), hi.tolist(), strict=True):
        blocks[s >> 8 : max((e + 255) >> 8, (s >> 8) + 1)] = True
    cells = (np.flatnonzero(blocks)[:, None] * 256 + np.arange(256)[None, :]).ravel()
    out = np.zeros(len(cells), np.uint32)
    order = short[np.argsort(ln[short], kind="stable")]
    for j in order.tolist():
        s = int(a[j]) >> 8
        e = s + (1 << (24 - int(ln[j])))
        out[np.searchsorted(cells, s) : np.searchsorted(cells, e)] = j + 1
    groups: dict[int, _U32] = {}
    long_ = np.flatnonzero(ln > 24)
    for j in long_[np.argsort(ln[long_], kind="stable")].tolist():
        c = int(a[j]) >> 8
        g = groups.get(c)
        if g is None:
            g = groups[c] = np.full(256, out[np.searchsorted(cells, c)], np.uint32)
        x = int(a[j]) & 0xFF
        g[x : x + (1 << (32 - int(ln[j])))] = j + 1
    return cells, out, groups


class PrefixTables:
    """Both directions' PrefixTable."""

    def __init__(self, maps: dict[str, bpfsys.Map[Any, Any]], groups: int, prefixes: int) -> None:
        entries = abi.pfx_entries(prefixes)
        self.by_table = {t: PrefixTable(t, maps, groups, entries) for t in D248_TABLES}

    def __getitem__(self, table: Table) -> PrefixTable:
        return self.by_table[table]

    def next_plan(self) -> None:
        for t in self.by_table.values():
            t.next_plan()

    def adopt(self) -> list[str]:
        out: list[str] = []
        for t in self.by_table.values():
            out += t.adopt()
        return out

    def close(self) -> None:
        for t in self.by_table.values():
            t.close()
