"""The reference model of rule sources: who holds which rule, and what the kernel must enforce.

A rule (one code: match + action + mode) is held by sources; the kernel holds the union of the
holdings, one rule per code, and nothing else. The model is plain sets, written from the rule
contract (README "Sources") and not from api/service.py, so a differential test can drive the
real service and compare: the installed rules must be exactly `union()`, and the packets must
be what xdpfw.verify.model says for that union (tests/test_sources_bpf.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Holdings"]


@dataclass
class Holdings:
    """source -> {code: expires_at (None: never)}."""

    held: dict[str, dict[int, float | None]] = field(default_factory=dict)

    def add(self, source: str, code: int, expires_at: float | None = None) -> None:
        """A source holds a rule; holding it again with an expiry sets the new one (without,
        the holding stays as it was)."""
        mine = self.held.setdefault(source, {})
        if expires_at is not None or code not in mine:
            mine[code] = expires_at

    def replace(self, source: str, codes: Iterable[int], expires_at: float | None = None
                ) -> tuple[int, int, int]:
        """The source holds exactly these: (added, removed, unchanged) holdings."""
        old = self.held.get(source, {})
        new: dict[int, float | None] = dict.fromkeys(codes, expires_at)
        self.held[source] = new
        return len(new.keys() - old.keys()), len(old.keys() - new.keys()), len(
            new.keys() & old.keys())

    def release(self, source: str | None, codes: Iterable[int]) -> int:
        """`source` (None: every source) lets these rules go; the holdings removed."""
        codes = set(codes)
        removed = 0
        for name, mine in self.held.items():
            if source is None or name == source:
                for code in codes & mine.keys():
                    del mine[code]
                    removed += 1
        return removed

    def drop(self, source: str) -> int:
        return len(self.held.pop(source, {}))

    def expire(self, now: float) -> None:
        for mine in self.held.values():
            for code in [c for c, exp in mine.items() if exp is not None and exp <= now]:
                del mine[code]

    def holders(self, code: int) -> set[str]:
        return {name for name, mine in self.held.items() if code in mine}

    def union(self) -> set[int]:
        """The codes the kernel must hold: every code some source holds."""
        out: set[int] = set()
        for mine in self.held.values():
            out |= mine.keys()
        return out
