"""The firewall service: the datapath and the database changed together, one change at a time.

Every mutation takes `self.lock`, opens a database transaction, updates the maps, and commits
only when the maps took the change; a map failure rolls the transaction back and the datapath
has already undone its own partial work. So the database and the maps always agree, and
concurrent callers see some serial order of their calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from api.store import Store, StoredRule
from xdpfw.datapath import Attachment, Datapath, GlobalCounters, RuleCounters
from xdpfw.errors import InterfaceNotFound, InvalidRule, RuleConflict, RuleNotFound
from xdpfw.rules import MAX_RULE_ID, Action, Mode, Rule, RuleSpec

__all__ = ["BulkResult", "FirewallService", "NewRule"]

log = logging.getLogger("xdpfw.service")


@dataclass(frozen=True)
class NewRule:
    spec: RuleSpec
    comment: str = ""
    ttl_seconds: int | None = None
    force: bool = False


@dataclass(frozen=True)
class BulkResult:
    added: list[StoredRule]
    duplicates: list[int]  # ids of existing identical rules


# Protected prefixes become allow rules with ids from the top of the id space, far above what
# the database's AUTOINCREMENT will reach; they live in the maps only, never in the database.
PROTECT_IDS = 4096
PROTECT_BASE = MAX_RULE_ID - PROTECT_IDS + 1


def is_protected_id(rule_id: int) -> bool:
    return rule_id >= PROTECT_BASE


class FirewallService:
    def __init__(
        self, datapath: Datapath, store: Store, protect: Sequence[str] = ()
    ) -> None:
        self.dp = datapath
        self.store = store
        if len(protect) > PROTECT_IDS:
            raise InvalidRule("protect", f"at most {PROTECT_IDS} protected prefixes")
        self.protected: list[Rule] = [
            RuleSpec.parse(action=Action.ALLOW, src=p).with_id(PROTECT_BASE + i)
            for i, p in enumerate(protect)
        ]
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- start-up ------------------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """Make the maps equal the database without touching rules that already agree.

        A brand-new database next to maps that already hold rules (the database was lost)
        takes the maps' rules instead of wiping them: the kernel's state is not thrown away.
        """
        with self.lock:
            self._reconcile_protected()
            in_maps = {r.id: r for r in self.dp.rules() if not is_protected_id(r.id)}
            if self.store.created and in_maps and self.store.count() == 0:
                now = time.time()
                with self.store.transaction():
                    self.store.insert(
                        StoredRule(r, "adopted from pinned maps", now, None)
                        for r in in_maps.values()
                    )
                log.warning("new database: adopted %d rules from the pinned maps", len(in_maps))
                return {"adopted": len(in_maps), "added": 0, "removed": 0}
            wanted = {s.id: s.rule for s in self.store.all()}
            remove = [rid for rid, r in in_maps.items() if wanted.get(rid) != r]
            add = [r for rid, r in wanted.items() if in_maps.get(rid) != r]
            if remove:
                self.dp.remove_rules(remove)
            if add:
                self.dp.add_rules(add)
            return {"adopted": 0, "added": len(add), "removed": len(remove)}

    def _reconcile_protected(self) -> None:
        """Protected prefixes as allow rules, first: the one thing that must never be missing."""
        have = {r.id: r for r in self.dp.rules() if is_protected_id(r.id)}
        want = {r.id: r for r in self.protected}
        stale = [rid for rid, r in have.items() if want.get(rid) != r]
        if stale:
            self.dp.remove_rules(stale)
        new = [r for rid, r in want.items() if have.get(rid) != r]
        # A user allow rule identical to a protected one would be a duplicate in the maps.
        clash = [r for r in new if self.dp.compiler.find_duplicate(r) is not None]
        for r in clash:
            dup = self.dp.compiler.find_duplicate(r)
            assert dup is not None
            log.warning("protected prefix %s replaces identical rule %d", r.src, dup)
            self.dp.remove_rules([dup])
            with self.store.transaction():
                self.store.delete([dup])
        if new:
            self.dp.add_rules(new)

    def check_protected(self, spec: RuleSpec) -> None:
        """Refuse an enforcing drop rule that covers or overlaps a protected prefix."""
        if spec.action is not Action.DROP or spec.mode is not Mode.ENFORCE:
            return
        for p in self.protected:
            net = p.src
            assert net is not None
            if spec.src is None and spec.dst is None:
                hit = "matches every source, including"
            elif spec.src is not None and spec.src.version == net.version and spec.src.overlaps(
                net
            ):
                hit = f"source {spec.src.with_prefixlen} overlaps"
            else:
                continue
            raise RuleConflict(
                f"this drop rule {hit} the protected prefix {net.with_prefixlen}; protected "
                "sources are never dropped (they are allowed above every drop rule). Send "
                '"force": true to add it anyway.'
            )

    # -- rules ---------------------------------------------------------------------------------

    def add(self, new: NewRule) -> tuple[StoredRule, bool]:
        """Add a rule; an identical one (match, action, mode) is returned instead, created=False."""
        with self.lock:  # the duplicate must not vanish before we read it back
            result = self.bulk_add([new])
            if result.added:
                return result.added[0], True
            existing = self.store.get(result.duplicates[0])
        assert existing is not None
        return existing, False

    def bulk_add(self, items: Sequence[NewRule]) -> BulkResult:
        """All or nothing. Duplicates of existing rules (or within the batch) are skipped."""
        with self.lock:
            now = time.time()
            fresh: list[NewRule] = []
            dups: list[int] = []
            seen: dict[bytes, int] = {}
            for item in items:
                if not item.force:
                    self.check_protected(item.spec)
                key = item.spec.match_key()
                probe = item.spec.with_id(1)
                existing = self.dp.compiler.find_duplicate(probe)
                if existing is not None and is_protected_id(existing):
                    raise RuleConflict(
                        f"{item.spec.describe()} is a protected prefix: it is allowed already"
                    )
                if existing is not None:
                    dups.append(existing)
                elif key in seen:
                    dups.append(-1)  # resolved below, once ids are known
                else:
                    seen[key] = len(fresh)
                    fresh.append(item)
            with self.store.transaction():
                ids = self.store.next_ids(len(fresh))
                stored = [
                    StoredRule(
                        item.spec.with_id(rid),
                        item.comment,
                        now,
                        now + item.ttl_seconds if item.ttl_seconds else None,
                    )
                    for item, rid in zip(fresh, ids, strict=True)
                ]
                self.store.insert(stored)
                self.dp.add_rules([s.rule for s in stored])
            if -1 in dups:
                dups = self._resolve_batch_dups(items, stored, dups)
            return BulkResult(stored, dups)

    @staticmethod
    def _resolve_batch_dups(
        items: Sequence[NewRule], stored: list[StoredRule], dups: list[int]
    ) -> list[int]:
        by_key = {s.rule.match_key(): s.id for s in stored}
        out = [d for d in dups if d != -1]
        first_seen: set[bytes] = set()
        for item in items:
            key = item.spec.match_key()
            if key in first_seen and key in by_key:
                out.append(by_key[key])
            first_seen.add(key)
        return out

    def remove(self, rule_ids: Sequence[int]) -> list[Rule]:
        with self.lock:
            for rid in rule_ids:
                if rid not in self.dp.compiler.rules or is_protected_id(rid):
                    raise RuleNotFound(rid)
            with self.store.transaction():
                self.store.delete(rule_ids)
                return self.dp.remove_rules(rule_ids)

    def get(self, rule_id: int) -> StoredRule:
        with self.lock:
            stored = self.store.get(rule_id)
        if stored is None:
            raise RuleNotFound(rule_id)
        return stored

    def page(self, after: int, limit: int) -> list[StoredRule]:
        with self.lock:
            return self.store.page(after, limit)

    def expire_due(self, now: float | None = None) -> list[int]:
        with self.lock:
            due = [rid for rid in self.store.due(now) if rid in self.dp.compiler.rules]
            if due:
                self.remove(due)
                log.info("expired %d rule(s): %s", len(due), due[:20])
            return due

    # -- TTL sweeper ---------------------------------------------------------------------------

    def start_sweeper(self, interval: float) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.expire_due()
                except Exception:  # keep sweeping; the error is logged with its traceback
                    log.exception("TTL sweep failed")

        self._sweeper = threading.Thread(target=run, name="xdpfw-ttl", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)

    # -- counters ------------------------------------------------------------------------------

    def counters(self, rule_ids: Sequence[int] | None = None) -> dict[int, RuleCounters]:
        return self.dp.rule_counters(rule_ids)

    def totals(self) -> GlobalCounters:
        return self.dp.global_counters()

    # -- interfaces ----------------------------------------------------------------------------

    def attach(self, name: str, mode: str) -> Attachment:
        with self.lock:
            att = self.dp.attach(name, mode)
            with self.store.transaction():
                self.store.set_interface(name, mode)
            return att

    def detach(self, name: str) -> None:
        with self.lock:
            if name not in self.store.interfaces() and name not in {
                a.ifname for a in self.dp.attachments()
            }:
                raise InterfaceNotFound(name, "xdpfw is not attached to it")
            self.dp.detach(name)
            with self.store.transaction():
                self.store.drop_interface(name)

    def interfaces(self) -> dict[str, str]:
        with self.lock:
            return self.store.interfaces()
