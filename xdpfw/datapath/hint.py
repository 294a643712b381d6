"""The IPv4 prefix hint: one bit per /24 and IPv4 trie, set where a trie prefix covers or lies
inside the /24 (bpf/xdpfw_abi.h, xdpfw_lpm4_hint), so a frame elsewhere skips the trie walk.

The map is memory-mapped and written in place. Besides the words, the hint keeps the trie
keys behind them: per /16, how many keys of length <= 16 cover it (`cover`), and the longer
keys inside it (`inner`, address << 6 | length). A change widens the hint before its entries
appear and narrows it only after they are gone, rewriting each /16 it touches once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.compiler import Plan, TableKey
from xdpfw.datapath.keys import table_key
from xdpfw.kernel import bpfsys
from xdpfw.rules import Rule

__all__ = ["HINT_TRIES", "HintChange", "PrefixHint"]

HINT_TRIES = {Table.SRC4_LPM: abi.HINT_SRC, Table.DST4_LPM: abi.HINT_DST}  # xdpfw_lpm4_hint halves
HintChange = tuple[int, TableKey, int]  # (trie, key, +1 added or -1 removed)

_INNER_PLEN_BITS = 6  # an inner key: address << 6 | prefix length (<= 32)
_WORDS_PER_16 = 4  # 256 /24s in a /16, 64 to a word
_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _span(key: TableKey, bits: int) -> tuple[int, int]:
    """The /`bits` networks an IPv4 trie key covers or lies in: [lo, hi)."""
    first = int.from_bytes(key.addr, "big") >> (32 - bits)
    return first, first + (1 << (bits - key.plen) if key.plen < bits else 1)


def _set_bits(words: np.ndarray[Any, np.dtype[np.uint64]], lo: int, hi: int) -> None:
    """Set bits lo .. hi-1 of a little-endian bit array held in 64-bit words."""
    while lo < hi:
        word, bit = divmod(lo, 64)
        if bit == 0 and hi - lo >= 64:
            n = (hi - lo) // 64
            words[word : word + n] = _ALL
            lo += n * 64
            continue
        top = min(hi - word * 64, 64)
        words[word] |= np.uint64(((1 << (top - bit)) - 1) << bit)
        lo = word * 64 + top


class PrefixHint:
    """xdpfw_lpm4_hint, memory-mapped, and the trie keys that decide its bits."""

    def __init__(self, hint_map: bpfsys.Map[Any, Any]) -> None:
        self._mem = hint_map.mmap_array()
        self.words: np.ndarray[Any, np.dtype[np.uint64]] = np.frombuffer(
            self._mem, dtype=np.uint64, count=2 * abi.HINT_WORDS
        ).reshape(2, abi.HINT_WORDS)
        self._cover = np.zeros((2, 1 << 16), dtype=np.int32)
        self._inner: tuple[dict[int, set[int]], dict[int, set[int]]] = ({}, {})

    def close(self) -> None:
        self.words = np.zeros((2, 0), dtype=np.uint64)
        with contextlib.suppress(BufferError):  # a view escaped: GC unmaps it
            self._mem.close()

    @staticmethod
    def changes(plan: Plan, old_entries: dict[TableKey, tuple[Rule, ...]]) -> list[HintChange]:
        """(trie, key, +1 or -1) for each IPv4 trie entry `plan` creates or deletes."""
        out = []
        for key, slots in plan.entries.items():
            trie = HINT_TRIES.get(key.table)
            if trie is not None and bool(slots) != bool(old_entries[key]):
                out.append((trie, key, 1 if slots else -1))
        return out

    @staticmethod
    def batch_changes(table: Table, keys: Sequence[int]) -> list[HintChange]:
        """(trie, key, +1) for new entries of a column batch (compact keys) in an IPv4
        trie; [] for any other table."""
        trie = HINT_TRIES.get(table)
        if trie is None:
            return []
        return [(trie, table_key(table, k), 1) for k in keys]

    def widen(self, changes: Iterable[HintChange]) -> None:
        """Set the bits of every key the change adds (before its entries are written)."""
        for trie, key, delta in changes:
            if delta > 0:
                _set_bits(self.words[trie], *_span(key, 24))

    def account(self, changes: Iterable[HintChange]) -> None:
        """Record added keys and forget removed ones (the words are left as they are)."""
        for trie, key, delta in changes:
            if key.plen <= 16:
                lo, hi = _span(key, 16)
                self._cover[trie, lo:hi] += delta
                continue
            addr = int.from_bytes(key.addr, "big")
            packed = addr << _INNER_PLEN_BITS | key.plen
            block = self._inner[trie].setdefault(addr >> 16, set())
            if delta > 0:
                block.add(packed)
            else:
                block.discard(packed)
                if not block:
                    del self._inner[trie][addr >> 16]

    def redo(self, changes: Iterable[HintChange]) -> None:
        """Rewrite the hint words of every /16 the changed keys touch, from the recorded keys:
        each /16 once, however many of the changed keys lie in it."""
        spans: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        for trie, key, _ in changes:
            spans[trie].append(_span(key, 16))
        for trie, ranges in enumerate(spans):
            ranges.sort()
            merged: list[list[int]] = []
            for lo, hi in ranges:
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            for lo, hi in merged:
                self.redo_range(trie, lo, hi)

    def redo_range(self, trie: int, lo: int, hi: int, widen_only: bool = False) -> None:
        """Recompute the words of /16s lo .. hi-1 of one trie; store only those that differ.
        With widen_only, set missing bits but clear none (another process may be adding)."""
        cover = self._cover[trie, lo:hi] > 0
        fresh = np.where(np.repeat(cover, _WORDS_PER_16), _ALL, np.uint64(0))
        inner = self._inner[trie]
        blocks = range(lo, hi) if hi - lo <= len(inner) else sorted(inner)
        for block in blocks:
            keys = inner.get(block)
            if not keys or not lo <= block < hi or cover[block - lo]:
                continue
            at = (block - lo) * _WORDS_PER_16
            part = fresh[at : at + _WORDS_PER_16]  # a view: 256 /24s
            for packed in keys:
                plen = packed & ((1 << _INNER_PLEN_BITS) - 1)
                first = (packed >> (_INNER_PLEN_BITS + 8)) & 0xFF  # its first /24 in the /16
                _set_bits(part, first, first + (1 << (24 - plen) if plen < 24 else 1))
        words = self.words[trie, lo * _WORDS_PER_16 : hi * _WORDS_PER_16]
        if widen_only:
            fresh |= words
        changed = np.flatnonzero(words != fresh)
        words[changed] = fresh[changed]

    def adopt(self, trie_keys: Iterable[HintChange]) -> None:
        """Take the IPv4 trie keys of adopted maps; only widen the words (adoption may run
        beside a live service, `xdpfw detach`)."""
        self.account(trie_keys)
        for trie in (0, 1):
            self.redo_range(trie, 0, 1 << 16, widen_only=True)
