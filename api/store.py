"""The desired state in SQLite: rules (with comment, creation and expiry times) and interfaces.

The database is the source of truth across restarts; the pinned maps are what the kernel
enforces. The service changes both under one lock, database transaction open around the map
update, so a failure on either side leaves them agreeing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xdpfw.errors import CapacityExceeded
from xdpfw.rules import MAX_RULE_ID, Rule, RuleSpec, code_from_texts, code_texts

__all__ = [
    "ID_LIMIT",
    "PROTECT_BASE",
    "PROTECT_IDS",
    "SCHEMA_VERSION",
    "Store",
    "StoredRule",
    "is_protected_id",
]

SCHEMA_VERSION = 1

# The rule id space. The database hands out ids up to ID_LIMIT; the PROTECT_IDS ids above are
# reserved for the service's protected-prefix allow rules, which live in the maps only.
PROTECT_IDS = 4096
PROTECT_BASE = MAX_RULE_ID - PROTECT_IDS + 1
ID_LIMIT = PROTECT_BASE - 1


def is_protected_id(rule_id: int) -> bool:
    """A reserved id: a protected prefix's rule, never in the database nor in listings."""
    return rule_id >= PROTECT_BASE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    mode TEXT NOT NULL,
    src TEXT,
    dst TEXT,
    proto TEXT,
    dport TEXT,
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS rules_expiry ON rules(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS interfaces (name TEXT PRIMARY KEY, mode TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoredRule:
    rule: Rule
    comment: str
    created_at: float
    expires_at: float | None

    @property
    def id(self) -> int:
        return self.rule.id


def _row_to_rule(row: sqlite3.Row) -> StoredRule:
    spec = RuleSpec.parse(
        action=row["action"],
        mode=row["mode"],
        src=row["src"],
        dst=row["dst"],
        proto=row["proto"],
        dport=row["dport"],
    )
    return StoredRule(spec.with_id(row["id"]), row["comment"], row["created_at"], row["expires_at"])


class Store:
    """SQLite access. Not thread-safe by itself: the service serialises writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row["value"]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path} has schema version {row['value']}, this xdpfw expects {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the body raises."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- rules ---------------------------------------------------------------------------------

    def next_ids(self, count: int) -> list[int]:
        """Ids the next `count` inserts will get (inside a transaction). Never reused."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='rules'").fetchone()
        top = self._db.execute("SELECT MAX(id) AS m FROM rules").fetchone()["m"] or 0
        start = max(row["seq"] if row else 0, top) + 1
        if start + count > ID_LIMIT:
            raise CapacityExceeded("rule ids", ID_LIMIT, "the id space is exhausted")
        return list(range(start, start + count))

    def insert(self, rules: Iterable[StoredRule]) -> None:
        self.insert_codes(
            (r.id, r.rule.code(), r.comment, r.created_at, r.expires_at) for r in rules
        )

    def insert_codes(
        self, rows: Iterable[tuple[int, int, str, float, float | None]]
    ) -> None:
        """Insert (id, code, comment, created_at, expires_at) rows: no Rule objects needed."""
        self._db.executemany(
            "INSERT INTO rules (id, action, mode, src, dst, proto, dport, comment, created_at,"
            " expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            ((rid, *code_texts(code), comment, created, expires)
             for rid, code, comment, created, expires in rows),
        )

    def codes(self) -> Iterator[tuple[int, int]]:
        """(id, code) of every rule, in id order; for comparing a million rules cheaply."""
        cur = self._db.cursor()
        cur.row_factory = None
        cur.execute("SELECT id, action, mode, src, dst, proto, dport FROM rules ORDER BY id")
        for rid, action, mode, src, dst, proto, dport in cur:
            yield rid, code_from_texts(action, mode, src, dst, proto, dport)

    def ids(self) -> Iterator[int]:
        cur = self._db.cursor()
        cur.row_factory = None
        for (rid,) in cur.execute("SELECT id FROM rules"):
            yield rid

    def delete(self, rule_ids: Iterable[int]) -> None:
        self._db.executemany("DELETE FROM rules WHERE id=?", ((i,) for i in rule_ids))

    def get(self, rule_id: int) -> StoredRule | None:
        row = self._db.execute("SELECT * FROM rules WHERE id=?", (rule_id,)).fetchone()
        return _row_to_rule(row) if row is not None else None

    def page(self, after: int, limit: int) -> list[StoredRule]:
        rows = self._db.execute(
            "SELECT * FROM rules WHERE id>? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return [_row_to_rule(r) for r in rows]

    def all(self) -> list[StoredRule]:
        return [_row_to_rule(r) for r in self._db.execute("SELECT * FROM rules ORDER BY id")]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) AS n FROM rules").fetchone()["n"])

    def due(self, now: float | None = None) -> list[int]:
        """Ids of rules whose expiry has passed."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT id FROM rules WHERE expires_at IS NOT NULL AND expires_at<=? ORDER BY id",
            (now,),
        )
        return [r["id"] for r in rows]

    # -- interfaces ----------------------------------------------------------------------------

    def interfaces(self) -> dict[str, str]:
        return {r["name"]: r["mode"] for r in self._db.execute("SELECT * FROM interfaces")}

    def set_interface(self, name: str, mode: str) -> None:
        self._db.execute(
            "INSERT INTO interfaces VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET mode=excluded.mode",
            (name, mode),
        )

    def drop_interface(self, name: str) -> None:
        self._db.execute("DELETE FROM interfaces WHERE name=?", (name,))

    # -- protected prefixes --------------------------------------------------------------------

    def protected_prefixes(self) -> list[str]:
        """The protected prefixes of the last start (a meta row), to notice one dropped."""
        row = self._db.execute("SELECT value FROM meta WHERE key='protected'").fetchone()
        if row is None:
            return []
        try:
            value = json.loads(row["value"])
        except ValueError:
            return []
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def set_protected_prefixes(self, prefixes: Iterable[str]) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES ('protected', ?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (json.dumps(list(prefixes)),),
        )
