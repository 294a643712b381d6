"""Rule-set ids (elements of xdpfw_sets) for entries with more than one slot, with quarantine.

An entry whose rules do not fit in its own slot points at a rule set (struct xdpfw_set).
A rewritten entry gets a fresh set and its old one is freed; a freed set is not handed out
again for SET_QUARANTINE_S, since a packet may still be reading it. Set 0 means "none".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from xdpfw.compiler import TableKey
from xdpfw.errors import CapacityExceeded

__all__ = ["SET_QUARANTINE_S", "SetAllocator"]

SET_QUARANTINE_S = 0.2  # a freed rule set is not rewritten while a packet may still read it


class SetAllocator:
    """Set ids 1 .. max_sets-1, and which entry holds which (`of`)."""

    def __init__(self, max_sets: int) -> None:
        self.max_sets = max_sets
        self.of: dict[TableKey, int] = {}
        self._next = 1
        self._free: deque[tuple[int, float]] = deque()

    def alloc(self) -> int:
        if self._free and time.monotonic() - self._free[0][1] >= SET_QUARANTINE_S:
            return self._free.popleft()[0]
        if self._next < self.max_sets:
            self._next += 1
            return self._next - 1
        if self._free:  # every set is in use or quarantined: wait out the quarantine
            set_id, freed = self._free.popleft()
            time.sleep(max(0.0, SET_QUARANTINE_S - (time.monotonic() - freed)))
            return set_id
        raise CapacityExceeded("xdpfw_sets", self.max_sets - 1, "raise --max-sets")

    def release(self, set_id: int) -> None:
        self._free.append((set_id, time.monotonic()))

    def adopt(self, used: Iterable[int]) -> None:
        """Take the set ids adopted entries point at; the others are free (not quarantined:
        no packet can be reading a set no entry names)."""
        used = set(used)
        self._next = max(used, default=0) + 1
        now = time.monotonic() - SET_QUARANTINE_S
        self._free.extend((i, now) for i in range(1, self._next) if i not in used)
