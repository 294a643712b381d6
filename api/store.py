"""The desired state in SQLite: rules (with comment, creation and expiry times) and interfaces.

The database is the source of truth across restarts; the pinned maps are what the kernel
enforces. The service changes both under one lock, database transaction open around the map
update, and undoes the map change when the COMMIT fails, so a failure on either side leaves
them agreeing.

Every sqlite3 error leaves this module as an xdpfw.errors.StorageError: StorageFull when the
disk is full (SQLITE_FULL, or an I/O error on a filesystem with no room left), DatabaseCorrupt
when the file is garbage or not ours (with the command that recovers), StorageError otherwise.
A missing, empty (0 bytes) or table-less file counts as new (`created`, until the service's
first reconcile commits): the service then adopts the rules of the pinned maps instead of
wiping them.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xdpfw import codes as wire
from xdpfw.errors import CapacityExceeded, DatabaseCorrupt, StorageError, StorageFull
from xdpfw.rules import (
    MAX_RULE_ID,
    Limit,
    Rule,
    RuleSpec,
    TcpFlags,
    code_from_texts,
    code_texts,
)

__all__ = [
    "ID_LIMIT",
    "PROTECT_BASE",
    "PROTECT_IDS",
    "SCHEMA_VERSION",
    "Store",
    "StoredRule",
    "corrupt_error",
    "is_protected_id",
    "recovery_command",
    "storage_error",
]

log = logging.getLogger("xdpfw.store")

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
-- issue 16: a rule's TCP flags and rate limit, beside its row (created on open when missing)
CREATE TABLE IF NOT EXISTS rule_extras (
    rule_id INTEGER PRIMARY KEY,
    tcp_flags TEXT,
    rate_limit TEXT
);
"""
# The rules with their extras (issue 16), for every read that makes a Rule or a code.
_RULES_JOINED = (
    "SELECT r.*, e.tcp_flags AS tcp_flags, e.rate_limit AS rate_limit FROM rules r"
    " LEFT JOIN rule_extras e ON e.rule_id = r.id"
)
_COLUMNS = "id, action, mode, src, dst, proto, dport, comment, created_at, expires_at"
_TABLES = {
    "meta": {"key", "value"},
    "rules": {"id", "action", "mode", "src", "dst", "proto", "dport", "comment", "created_at",
              "expires_at"},
    "interfaces": {"name", "mode"},
}

# SQLite primary result codes (sqlite3.h)
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_FULL, _SQLITE_NOTADB = 10, 11, 14, 13, 26
_LOW_SPACE = 1 << 20  # an I/O error with less than this free is a full disk


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path if path.is_dir() else path.parent)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def recovery_command(path: Path) -> str:
    """The shell command that moves a bad database (and its WAL files) aside."""
    parts = [f"mv {path} {path}.corrupt"]
    for side in ("-wal", "-shm"):
        if Path(f"{path}{side}").exists():
            parts.append(f"mv {path}{side} {path}.corrupt{side}")
    return " && ".join(parts)


def corrupt_error(path: Path, why: str) -> DatabaseCorrupt:
    return DatabaseCorrupt(
        f"the rule database {path} is unreadable: {why}. The pinned program keeps enforcing "
        f"its rules (nothing was removed). Move it aside: `{recovery_command(path)}`; the next "
        "start adopts the rules from the pinned maps into a fresh database",
        str(path),
    )


def storage_error(exc: BaseException, path: Path, doing: str) -> StorageError:
    """The domain error for a sqlite3 (or OS) error met while `doing` something to `path`."""
    if isinstance(exc, StorageError):
        return exc
    text = str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    errno_ = getattr(exc, "errno", None)
    low = text.lower()
    state_dir = path.parent
    if primary == _SQLITE_FULL or "database or disk is full" in low or errno_ == 28:
        full = True
    elif primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or "disk i/o error" in low:
        free = _free_bytes(path)
        full = free is not None and free < _LOW_SPACE
    else:
        full = False
    if full:
        free = _free_bytes(path)
        room = f" ({free} bytes free)" if free is not None else ""
        return StorageFull(
            f"cannot {doing}: the disk holding the state dir {state_dir} is full{room} "
            f"(SQLite: {text}); nothing was changed. Free space there (or move --state-dir to "
            "a larger disk) and retry",
            str(path),
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "not a database" in low or (
        "malformed" in low
    ):
        return corrupt_error(path, text)
    return StorageError(
        f"cannot {doing}: the rule database {path} failed (SQLite: {text}); nothing was "
        "changed. Check the disk and the service log, then retry",
        str(path),
    )


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
        tcp_flags=row["tcp_flags"],
        limit=_limit_of(row["rate_limit"]),
    )
    return StoredRule(spec.with_id(row["id"]), row["comment"], row["created_at"], row["expires_at"])


def _limit_of(text: str | None) -> Limit | None:
    return None if text is None else Limit.from_dict(json.loads(text))


def _extras(rid: int, code: int, limit: Limit | None) -> tuple[int, str | None, str | None] | None:
    """The rule_extras row of a rule, None when it has no TCP flags and no limit."""
    flags = wire.tcp_flags(code)
    if flags is None and limit is None:
        return None
    return (
        rid,
        None if flags is None else str(TcpFlags(*flags)),
        None if limit is None else json.dumps(limit.to_dict()),
    )


class Store:
    """SQLite access. Not thread-safe by itself: the service serialises writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, path, f"open the rule database {path}") from exc
        with self._sql(f"open the rule database {path}"):
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        path = self.path
        with self._sql(f"open the rule database {path}"):
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            names = [
                r["name"] for r in self._db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'"
                    " AND name NOT LIKE 'sqlite_%'"
                )
            ]
            tables = {
                t: {c["name"] for c in self._db.execute("SELECT name FROM pragma_table_info(?)",
                                                        (t,))}
                for t in names
            }
        if not tables:
            # No file, an empty (0-byte) one, or one without tables: a new database, made in
            # one transaction and marked `new` until the service's first reconcile (which
            # adopts the pinned maps' rules in the same transaction that clears the mark).
            # A crash or a full disk in between leaves it new: the next start adopts again.
            with self.transaction(), self._sql(f"create the rule database {path}"):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("schema", str(SCHEMA_VERSION)), ("new", "1")],
                )
        else:
            foreign = [t for t, cols in _TABLES.items() if not cols <= tables.get(t, set())]
            if foreign:
                raise corrupt_error(
                    path,
                    f"it is an SQLite file but not an xdpfw rule database (tables "
                    f"{', '.join(sorted(tables))}; missing or different: {', '.join(foreign)})",
                )
        with self._sql(f"write the rule database {path}"):
            meta = {r["key"]: r["value"] for r in self._db.execute("SELECT * FROM meta")}
            if meta.get("schema", str(SCHEMA_VERSION)) != str(SCHEMA_VERSION):
                raise StorageError(
                    f"{path} has schema version {meta['schema']}, this xdpfw expects "
                    f"{SCHEMA_VERSION}: run the xdpfw version that wrote it, or move it aside "
                    f"(`{recovery_command(path)}`) to adopt the pinned maps' rules",
                    str(path),
                )
            self._db.executescript(_SCHEMA)  # an index added since: no-op otherwise
            # One write at every open: a full disk shows at start, not at the first change.
            self._db.execute(
                "INSERT INTO meta VALUES ('opened_at', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (repr(time.time()),),
            )
        self.created = "new" in meta

    def mark_reconciled(self) -> None:
        """Inside a transaction: the database is no longer new (see `created`)."""
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute("DELETE FROM meta WHERE key='new'")

    @contextmanager
    def _sql(self, doing: str) -> Iterator[None]:
        """Translate sqlite3 errors into the xdpfw.errors StorageError tree."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(exc, self.path, doing) from exc

    def close(self) -> None:
        self._db.close()

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the body or the COMMIT raises.

        A failed COMMIT (a full disk) raises StorageFull/StorageError with the transaction
        rolled back; the caller undoes whatever it changed outside the database."""
        with self._sql("start a database transaction"):
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            with self._sql(f"write the rule database {self.path}"):
                self._commit()
        except BaseException:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error as exc:  # the error being raised says more
                    log.error("rollback of %s failed: %s", self.path, exc)
            raise

    # -- rules ---------------------------------------------------------------------------------

    def next_ids(self, count: int) -> list[int]:
        """Ids the next `count` inserts will get (inside a transaction). Never reused."""
        with self._sql("read the rule database"):
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='rules'"
            ).fetchone()
            top = self._db.execute("SELECT MAX(id) AS m FROM rules").fetchone()["m"] or 0
        start = max(row["seq"] if row else 0, top) + 1
        if start + count > ID_LIMIT:
            raise CapacityExceeded("rule ids", ID_LIMIT, "the id space is exhausted")
        return list(range(start, start + count))

    def insert(self, rules: Iterable[StoredRule]) -> None:
        rules = list(rules)
        self.insert_codes(
            ((r.id, r.rule.code(), r.comment, r.created_at, r.expires_at) for r in rules),
            {r.id: r.rule.limit for r in rules if r.rule.limit is not None},
        )

    def insert_codes(
        self,
        rows: Iterable[tuple[int, int, str, float, float | None]],
        limits: Mapping[int, Limit] | None = None,
    ) -> None:
        """Insert (id, code, comment, created_at, expires_at) rows: no Rule objects needed.
        `limits`: the rate limits of the limit rules among them (issue 16)."""
        extras: list[tuple[int, str | None, str | None]] = []
        tcp_bits, limit_bits = wire.TCP_MASK.mask, wire.LIMIT.mask

        def texts() -> Iterable[tuple[object, ...]]:
            for rid, code, comment, created, expires in rows:
                if code & (tcp_bits | limit_bits):
                    extra = _extras(rid, code, (limits or {}).get(rid))
                    if extra is not None:
                        extras.append(extra)
                yield (rid, *code_texts(code), comment, created, expires)

        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany(
                "INSERT INTO rules (id, action, mode, src, dst, proto, dport, comment,"
                " created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                texts(),
            )
            if extras:
                self._db.executemany("INSERT INTO rule_extras VALUES (?,?,?)", extras)

    # -- issue 16: the extras (TCP flags, rate limits) of rules --------------------------------

    def extras_rows(self, rule_ids: Iterable[int]) -> list[tuple[object, ...]]:
        """The rule_extras rows of these ids (for `restore_extras`)."""
        ids = json.dumps(list(rule_ids))
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            cur.execute(
                "SELECT rule_id, tcp_flags, rate_limit FROM rule_extras"
                " WHERE rule_id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
            return cur.fetchall()

    def restore_extras(self, rows: Iterable[tuple[object, ...]]) -> None:
        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany("INSERT INTO rule_extras VALUES (?,?,?)", rows)

    def limits(self) -> dict[int, Limit]:
        """The rate limit of every limit rule."""
        with self._sql("read the rule database"):
            rows = self._db.execute(
                "SELECT rule_id, rate_limit FROM rule_extras WHERE rate_limit IS NOT NULL"
            ).fetchall()
        return {r["rule_id"]: Limit.from_dict(json.loads(r["rate_limit"])) for r in rows}

    def rows(self, rule_ids: Iterable[int]) -> list[tuple[object, ...]]:
        """The stored rows of these ids, as they are (no parsing: cheap for 100k ids), for
        `restore` to put back."""
        ids = json.dumps(list(rule_ids))
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            cur.execute(
                f"SELECT {_COLUMNS} FROM rules WHERE id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
            return cur.fetchall()

    def restore(self, rows: Iterable[tuple[object, ...]]) -> None:
        """Insert rows read by `rows` (inside a transaction)."""
        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany(
                f"INSERT INTO rules ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows
            )

    def codes(self) -> Iterator[tuple[int, int]]:
        """(id, code) of every rule, in id order; for comparing a million rules cheaply."""
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            cur.execute(
                "SELECT r.id, action, mode, src, dst, proto, dport, e.tcp_flags FROM rules r"
                " LEFT JOIN rule_extras e ON e.rule_id = r.id ORDER BY r.id"
            )
            for rid, action, mode, src, dst, proto, dport, flags in cur:
                if action == "limit":  # its limit is not part of the code; any valid one does
                    yield rid, code_from_texts(
                        action, mode, src, dst, proto, dport, flags, Limit.parse(pps=1)
                    )
                    continue
                yield rid, code_from_texts(action, mode, src, dst, proto, dport, flags)

    def ids(self) -> Iterator[int]:
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            for (rid,) in cur.execute("SELECT id FROM rules"):
                yield rid

    def delete(self, rule_ids: Iterable[int]) -> None:
        with self._sql(f"write the rule database {self.path}"):
            ids = [(i,) for i in rule_ids]
            self._db.executemany("DELETE FROM rules WHERE id=?", ids)
            if self._db.execute("SELECT 1 FROM rule_extras LIMIT 1").fetchone() is not None:
                self._db.executemany("DELETE FROM rule_extras WHERE rule_id=?", ids)

    def get(self, rule_id: int) -> StoredRule | None:
        with self._sql("read the rule database"):
            row = self._db.execute(f"{_RULES_JOINED} WHERE r.id=?", (rule_id,)).fetchone()
        return _row_to_rule(row) if row is not None else None

    def page(self, after: int, limit: int) -> list[StoredRule]:
        with self._sql("read the rule database"):
            rows = self._db.execute(
                f"{_RULES_JOINED} WHERE r.id>? ORDER BY r.id LIMIT ?", (after, limit)
            ).fetchall()
        return [_row_to_rule(r) for r in rows]

    def all(self) -> list[StoredRule]:
        with self._sql("read the rule database"):
            rows = self._db.execute(f"{_RULES_JOINED} ORDER BY r.id").fetchall()
        return [_row_to_rule(r) for r in rows]

    def count(self) -> int:
        with self._sql("read the rule database"):
            return int(self._db.execute("SELECT COUNT(*) AS n FROM rules").fetchone()["n"])

    def due(self, now: float | None = None) -> list[int]:
        """Ids of rules whose expiry has passed."""
        now = time.time() if now is None else now
        with self._sql("read the rule database"):
            rows = self._db.execute(
                "SELECT id FROM rules WHERE expires_at IS NOT NULL AND expires_at<=? ORDER BY id",
                (now,),
            ).fetchall()
        return [r["id"] for r in rows]

    # -- interfaces ----------------------------------------------------------------------------

    def interfaces(self) -> dict[str, str]:
        with self._sql("read the rule database"):
            rows = self._db.execute("SELECT * FROM interfaces").fetchall()
        return {r["name"]: r["mode"] for r in rows}

    def set_interface(self, name: str, mode: str) -> None:
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute(
                "INSERT INTO interfaces VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET mode=excluded.mode",
                (name, mode),
            )

    def drop_interface(self, name: str) -> None:
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute("DELETE FROM interfaces WHERE name=?", (name,))

    # -- protected prefixes --------------------------------------------------------------------

    def protected_prefixes(self) -> list[str]:
        """The protected prefixes of the last start (a meta row), to notice one dropped."""
        with self._sql(f"read the rule database {self.path}"):
            row = self._db.execute("SELECT value FROM meta WHERE key='protected'").fetchone()
        if row is None:
            return []
        try:
            value = json.loads(row["value"])
        except ValueError:
            return []
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def set_protected_prefixes(self, prefixes: Iterable[str]) -> None:
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute(
                "INSERT INTO meta VALUES ('protected', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (json.dumps(list(prefixes)),),
            )
