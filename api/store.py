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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
from xdpfw.sources import DEFAULT_SOURCE

__all__ = [
    "ANY_SOURCE",
    "ID_LIMIT",
    "PROTECT_BASE",
    "PROTECT_IDS",
    "SCHEMA_VERSION",
    "Rows",
    "SourceRow",
    "Store",
    "StoredRule",
    "corrupt_error",
    "is_protected_id",
    "recovery_command",
    "storage_error",
]

log = logging.getLogger("xdpfw.store")

# The rule id space. The database hands out ids up to ID_LIMIT; the PROTECT_IDS ids above are
# reserved for the service's protected-prefix allow rules, which live in the maps only.
PROTECT_IDS = 4096
PROTECT_BASE = MAX_RULE_ID - PROTECT_IDS + 1
ID_LIMIT = PROTECT_BASE - 1


def is_protected_id(rule_id: int) -> bool:
    """A reserved id: a protected prefix's rule, never in the database nor in listings."""
    return rule_id >= PROTECT_BASE

# The schema, by version (`PRAGMA user_version`; version 1 kept it in meta.schema). A new
# database gets the latest at once; an older one is migrated in place by `_MIGRATIONS`, in
# order, inside one transaction (a failure leaves the file as it was); a newer one is refused.
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
# v2: sources. A rule (one kernel rule) is held by one or more sources; each holding has its
# own comment, creation and expiry (rules.expires_at is no longer used: NULL). `sources` keeps
# each source's last change (and a source whose holdings all went, until it is deleted).
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS holdings (
    source TEXT NOT NULL,
    rule_id INTEGER NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL,
    PRIMARY KEY (source, rule_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holdings_rule ON holdings(rule_id);
CREATE INDEX IF NOT EXISTS holdings_expiry ON holdings(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, updated_at REAL NOT NULL);
"""
# v3: beside a rule's row, X-ray's sampling (rule_sample: 1 in `every` frames) and issue 16's
# TCP flags and rate limit (rule_extras, JSON). A rule without either has no row there.
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS rule_sample (rule_id INTEGER PRIMARY KEY, every INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rule_extras (
    rule_id INTEGER PRIMARY KEY,
    tcp_flags TEXT,
    rate_limit TEXT
);
"""
# v4: each rule's code (xdpfw/codes.py) beside its texts, `_CODE_BYTES` little-endian, so the
# start-up reconcile reads a million codes back without parsing texts (Store.codes).
_SCHEMA_V4 = """
ALTER TABLE rules ADD COLUMN code BLOB;
"""
_CODE_BYTES = (wire.KEY.shift + wire.ADDR.shift + wire.ADDR_BITS_V6 + 7) // 8
# No index on rules(src): delete by value scans (~0.1-0.3 s at 1M rules, measured), where an
# index would cost every bulk load ~25% more (0.5 s per 200k rows, measured).
_COLUMNS = "id, action, mode, src, dst, proto, dport, comment, created_at, expires_at, code"
_HOLDING_COLUMNS = "source, rule_id, comment, created_at, expires_at"
_TABLES = {
    "meta": {"key", "value"},
    "rules": {"id", "action", "mode", "src", "dst", "proto", "dport", "comment", "created_at",
              "expires_at"},
    "interfaces": {"name", "mode"},
}
_TABLES_V2 = {
    "holdings": {"source", "rule_id", "comment", "created_at", "expires_at"},
    "sources": {"name", "updated_at"},
}


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Holdings: every rule becomes a holding of source `api`, with its comment and expiry."""
    for statement in _statements(_SCHEMA_V2):
        db.execute(statement)
    now = time.time()
    db.execute(
        "INSERT INTO holdings (source, rule_id, comment, created_at, expires_at)"
        " SELECT ?, id, comment, created_at, expires_at FROM rules",
        (DEFAULT_SOURCE,),
    )
    db.execute(
        "INSERT INTO sources SELECT ?, ? WHERE EXISTS (SELECT 1 FROM rules)",
        (DEFAULT_SOURCE, now),
    )
    db.execute("UPDATE rules SET expires_at=NULL WHERE expires_at IS NOT NULL")


# _MIGRATIONS[v] takes a database at version v to v + 1 (never renumbered, never edited once
# released: a new change is a new function at the end).
def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Sampling and rate limits: their tables (empty: no rule of v2 has either)."""
    for statement in _statements(_SCHEMA_V3):
        db.execute(statement)


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Codes: every rule's code, parsed from its texts once here."""
    for statement in _statements(_SCHEMA_V4):
        db.execute(statement)
    db.executemany(
        "UPDATE rules SET code=? WHERE id=?",
        ((code.to_bytes(_CODE_BYTES, "little"), rid) for rid, code in _parsed_codes(db)),
    )


def _parsed_codes(db: sqlite3.Connection, where: str = "") -> Iterator[tuple[int, int]]:
    """(id, code) of the rules (`where`: a condition on `r`), from their texts, in id order."""
    cur = db.cursor()
    cur.row_factory = None
    cur.execute(
        "SELECT r.id, action, mode, src, dst, proto, dport, e.tcp_flags FROM rules r"
        f" LEFT JOIN rule_extras e ON e.rule_id = r.id {where} ORDER BY r.id"
    )
    for rid, action, mode, src, dst, proto, dport, flags in cur:
        if action == "limit":  # its limit is not part of the code; any valid one does
            yield rid, code_from_texts(
                action, mode, src, dst, proto, dport, flags, Limit.parse(pps=1)
            )
            continue
        yield rid, code_from_texts(action, mode, src, dst, proto, dport, flags)


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
}
SCHEMA_VERSION = 4
ANY_SOURCE = -1  # `source` argument of Store.release: every source

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
    """A rule as one of its holders holds it: `source` is that holder (the first one, by
    creation, when no source was asked for), comment and times are that holding's, `sources`
    every holder, first first."""

    rule: Rule
    comment: str
    created_at: float
    expires_at: float | None
    source: str = DEFAULT_SOURCE
    sources: tuple[str, ...] = (DEFAULT_SOURCE,)

    @property
    def id(self) -> int:
        return self.rule.id


@dataclass(frozen=True)
class SourceRow:
    """A source as the database knows it: its holdings and its last change."""

    name: str
    rules: int
    updated_at: float


class Rows(NamedTuple):
    """Stored rows of some rules and all their holdings, as they are (see Store.rows)."""

    rules: list[tuple[object, ...]]
    holdings: list[tuple[object, ...]]
    extras: Sequence[tuple[object, ...]] = ()  # rule_extras rows (issue 16)


def _spec_of(row: sqlite3.Row) -> RuleSpec:
    return RuleSpec.parse(
        action=row["action"],
        mode=row["mode"],
        src=row["src"],
        dst=row["dst"],
        proto=row["proto"],
        dport=row["dport"],
        tcp_flags=row["tcp_flags"],
        limit=_limit_of(row["rate_limit"]),
    )


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
                for statement in (
                    _statements(_SCHEMA) + _statements(_SCHEMA_V2) + _statements(_SCHEMA_V3)
                    + _statements(_SCHEMA_V4)
                ):
                    self._db.execute(statement)
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("schema", str(SCHEMA_VERSION)), ("new", "1")],
                )
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        else:
            foreign = [t for t, cols in _TABLES.items() if not cols <= tables.get(t, set())]
            if foreign:
                raise corrupt_error(
                    path,
                    f"it is an SQLite file but not an xdpfw rule database (tables "
                    f"{', '.join(sorted(tables))}; missing or different: {', '.join(foreign)})",
                )
            self._upgrade()
        with self._sql(f"write the rule database {path}"):
            meta = {r["key"]: r["value"] for r in self._db.execute("SELECT * FROM meta")}
            # an index added since: no-op otherwise
            self._db.executescript(_SCHEMA + _SCHEMA_V2 + _SCHEMA_V3)
            # One write at every open: a full disk shows at start, not at the first change.
            self._db.execute(
                "INSERT INTO meta VALUES ('opened_at', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (repr(time.time()),),
            )
        self.created = "new" in meta

    def version(self) -> int:
        """The schema version of the file: PRAGMA user_version, or meta.schema (version 1)."""
        with self._sql(f"read the rule database {self.path}"):
            found = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if found:
                return found
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        try:
            return int(row["value"]) if row is not None else 1
        except ValueError:
            raise corrupt_error(self.path, f"meta.schema is {row['value']!r}") from None

    def _upgrade(self) -> None:
        """Migrate an older database in place (one transaction: a failure, a full disk or a
        kill leaves it as it was); refuse a newer one."""
        path = self.path
        found = self.version()
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"{path} has schema version {found}, this xdpfw knows versions up to "
                f"{SCHEMA_VERSION}: it was written by a newer xdpfw. Run that version (or a "
                f"newer one), or move it aside (`{recovery_command(path)}`) to adopt the "
                "pinned maps' rules into a fresh database",
                str(path),
            )
        if found == SCHEMA_VERSION:
            return
        with self.transaction(), self._sql(
            f"migrate the rule database {path} from schema {found} to {SCHEMA_VERSION}"
        ):
            for v in range(found, SCHEMA_VERSION):
                _MIGRATIONS[v](self._db)
            self._db.execute(
                "INSERT INTO meta VALUES ('schema', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(SCHEMA_VERSION),),
            )
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        log.warning("migrated %s from schema version %d to %d", path, found, SCHEMA_VERSION)

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

    # -- rules and holdings -----------------------------------------------------------------
    # The invariant, kept by every writer inside one transaction: a rule has at least one
    # holding; a holding's rule exists.

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
        """Insert rules, each held by its `source` (test helper and adoption)."""
        by_source: dict[str, list[tuple[int, int, str, float, float | None]]] = {}
        limits: dict[int, Limit] = {}
        for r in rules:
            by_source.setdefault(r.source, []).append(
                (r.id, r.rule.code(), r.comment, r.created_at, r.expires_at)
            )
            if r.rule.limit is not None:
                limits[r.id] = r.rule.limit
        for source, rows in by_source.items():
            mine = {rid: limits[rid] for rid, *_ in rows if rid in limits}
            self.insert_codes(rows, source, mine)

    def insert_codes(
        self,
        rows: Iterable[tuple[int, int, str, float, float | None]],
        source: str = DEFAULT_SOURCE,
        limits: Mapping[int, Limit] | None = None,
    ) -> None:
        """Insert (id, code, comment, created_at, expires_at) rows as new rules, each held by
        `source` (inside a transaction): no Rule objects needed. `limits`: the rate limits of
        the limit rules among them (issue 16)."""
        rows = rows if isinstance(rows, Sequence) else list(rows)
        extras: list[tuple[int, str | None, str | None]] = []
        tcp_bits, limit_bits = wire.TCP_MASK.mask, wire.LIMIT.mask

        def texts() -> Iterable[tuple[object, ...]]:
            for rid, code, comment, created, _ in rows:
                if code & (tcp_bits | limit_bits):
                    extra = _extras(rid, code, (limits or {}).get(rid))
                    if extra is not None:
                        extras.append(extra)
                yield (rid, *code_texts(code), comment, created,
                       code.to_bytes(_CODE_BYTES, "little"))

        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany(
                "INSERT INTO rules (id, action, mode, src, dst, proto, dport, comment,"
                " created_at, expires_at, code) VALUES (?,?,?,?,?,?,?,?,?,NULL,?)",
                texts(),
            )
            if extras:
                self._db.executemany("INSERT INTO rule_extras VALUES (?,?,?)", extras)
            self._db.executemany(
                f"INSERT INTO holdings ({_HOLDING_COLUMNS}) VALUES (?,?,?,?,?)",
                ((source, rid, comment, created, expires)
                 for rid, _, comment, created, expires in rows),
            )
            if rows:
                self.touch(source, rows[0][3])

    def hold(
        self,
        source: str,
        rows: Iterable[tuple[int, str, float, float | None]],
        *,
        exact: bool = False,
    ) -> None:
        """(rule_id, comment, created_at, expires_at): `source` holds these existing rules. A
        holding it has already gets a new expiry when one is given (a re-add without a TTL
        keeps the holding as it is); `exact` (a replace): the expiry and comment given, even
        none. The creation time stays."""
        update = (
            "expires_at=excluded.expires_at, comment=excluded.comment" if exact
            else "expires_at=COALESCE(excluded.expires_at, expires_at)"
        )
        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany(
                f"INSERT INTO holdings ({_HOLDING_COLUMNS}) VALUES (?,?,?,?,?)"
                f" ON CONFLICT(source, rule_id) DO UPDATE SET {update}",
                ((source, rid, comment, created, expires)
                 for rid, comment, created, expires in rows),
            )

    # -- issue 16: the extras (TCP flags, rate limits) of rules --------------------------------

    def limits(self) -> dict[int, Limit]:
        """The rate limit of every limit rule."""
        with self._sql("read the rule database"):
            rows = self._db.execute(
                "SELECT rule_id, rate_limit FROM rule_extras WHERE rate_limit IS NOT NULL"
            ).fetchall()
        return {r["rule_id"]: Limit.from_dict(json.loads(r["rate_limit"])) for r in rows}

    def touch(self, source: str, when: float) -> None:
        """The source changed at `when` (made if new)."""
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute(
                "INSERT INTO sources VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET updated_at=excluded.updated_at",
                (source, when),
            )

    def held(self, source: str) -> list[int]:
        """Ids of the rules `source` holds, in id order. One text of them all, split here: a
        row per holding costs a Python tuple each (0.25-0.6 s for a million, measured)."""
        with self._sql("read the rule database"):
            (text,) = self._db.execute(
                "SELECT group_concat(rule_id) FROM (SELECT rule_id FROM holdings"
                " WHERE source=? ORDER BY rule_id)",
                (source,),
            ).fetchone()
        return list(map(int, text.split(","))) if text else []

    def holders(self, rule_ids: Iterable[int]) -> dict[int, list[str]]:
        """rule id -> its sources, first holder first (by creation, then name)."""
        out: dict[int, list[str]] = {}
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            cur.execute(
                "SELECT rule_id, source FROM holdings WHERE rule_id IN"
                " (SELECT value FROM json_each(?)) ORDER BY rule_id, created_at, source",
                (json.dumps(list(rule_ids)),),
            )
            for rid, source in cur:
                out.setdefault(rid, []).append(source)
        return out

    def release(self, source: str | int, rule_ids: Sequence[int]) -> tuple[int, list[int]]:
        """Inside a transaction: `source` (or every source: ANY_SOURCE) lets these rules go.
        Returns (holdings removed, ids of the rules no source holds any more); those rules'
        rows are deleted too (the caller removes them from the maps)."""
        ids = json.dumps(list(rule_ids))
        with self._sql(f"write the rule database {self.path}"):
            if source == ANY_SOURCE:
                cur = self._db.execute(
                    "DELETE FROM holdings WHERE rule_id IN (SELECT value FROM json_each(?))",
                    (ids,),
                )
            else:
                cur = self._db.execute(
                    "DELETE FROM holdings WHERE source=? AND rule_id IN"
                    " (SELECT value FROM json_each(?))",
                    (source, ids),
                )
            removed = cur.rowcount
            orphans = [
                r[0] for r in self._db.execute(
                    "SELECT value FROM json_each(?) WHERE NOT EXISTS"
                    " (SELECT 1 FROM holdings WHERE rule_id=json_each.value)",
                    (ids,),
                )
            ]
            self._db.executemany("DELETE FROM rules WHERE id=?", ((i,) for i in orphans))
            for side in ("rule_sample", "rule_extras"):  # X-ray's and issue 16's, beside the row
                self._db.executemany(
                    f"DELETE FROM {side} WHERE rule_id=?", ((i,) for i in orphans)
                )
        return removed, orphans

    def release_pairs(self, pairs: Sequence[tuple[str, int]]) -> tuple[int, list[int]]:
        """`release` for (source, rule_id) holdings of several sources (TTL expiry)."""
        removed = 0
        for source in {s for s, _ in pairs}:
            removed += self.release(source, [rid for s, rid in pairs if s == source])[0]
        orphans = self.orphans_of([rid for _, rid in pairs])
        return removed, orphans

    def orphans_of(self, rule_ids: Sequence[int]) -> list[int]:
        """Of these ids, those whose rules are gone (deleted by `release`)."""
        with self._sql("read the rule database"):
            return [
                r[0] for r in self._db.execute(
                    "SELECT DISTINCT value FROM json_each(?) WHERE NOT EXISTS"
                    " (SELECT 1 FROM rules WHERE id=json_each.value)",
                    (json.dumps(list(rule_ids)),),
                )
            ]

    def refresh(self, source: str, comment: str, expires_at: float | None) -> None:
        """Every holding of `source` gets this comment and expiry (a replace's uniform one).
        Rows that have them already are not written (a refresh without a TTL writes none)."""
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute(
                "UPDATE holdings SET comment=?, expires_at=? WHERE source=?"
                " AND (comment IS NOT ? OR expires_at IS NOT ?)",
                (comment, expires_at, source, comment, expires_at),
            )

    def drop_source_row(self, source: str) -> None:
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute("DELETE FROM sources WHERE name=?", (source,))

    def sources(self) -> list[SourceRow]:
        """Every known source (by name) with its holdings' count."""
        with self._sql("read the rule database"):
            rows = self._db.execute(
                "SELECT s.name AS name, s.updated_at AS updated_at,"
                " (SELECT COUNT(*) FROM holdings h WHERE h.source=s.name) AS n"
                " FROM sources s ORDER BY s.name"
            ).fetchall()
        return [SourceRow(r["name"], r["n"], r["updated_at"]) for r in rows]

    def source(self, name: str) -> SourceRow | None:
        with self._sql("read the rule database"):
            row = self._db.execute(
                "SELECT updated_at, (SELECT COUNT(*) FROM holdings WHERE source=?) AS n"
                " FROM sources WHERE name=?",
                (name, name),
            ).fetchone()
        return None if row is None else SourceRow(name, row["n"], row["updated_at"])

    def matching(self, src: str | None, dst: str | None, source: str | None) -> list[int]:
        """Ids of the rules whose src (and/or dst) is exactly this canonical CIDR text, held
        by `source` when one is named."""
        where, args = [], []
        for column, value in (("src", src), ("dst", dst)):
            if value is not None:
                where.append(f"r.{column}=?")
                args.append(value)
        if source is not None:
            where.append("EXISTS (SELECT 1 FROM holdings h WHERE h.source=? AND h.rule_id=r.id)")
            args.append(source)
        assert where
        with self._sql("read the rule database"):
            return [
                r[0] for r in self._db.execute(
                    f"SELECT r.id FROM rules r WHERE {' AND '.join(where)} ORDER BY r.id", args
                )
            ]

    def rows(self, rule_ids: Iterable[int]) -> Rows:
        """The stored rows of these ids and their holdings, as they are (no parsing: cheap
        for 100k ids), for `restore` to put back."""
        ids = json.dumps(list(rule_ids))
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            cur.execute(
                f"SELECT {_COLUMNS} FROM rules WHERE id IN (SELECT value FROM json_each(?))",
                (ids,),
            )
            rules = cur.fetchall()
            cur.execute(
                f"SELECT {_HOLDING_COLUMNS} FROM holdings WHERE rule_id IN"
                " (SELECT value FROM json_each(?)) ORDER BY source, rule_id",
                (ids,),
            )
            holdings = cur.fetchall()
            cur.execute(
                "SELECT rule_id, tcp_flags, rate_limit FROM rule_extras WHERE rule_id IN"
                " (SELECT value FROM json_each(?))",
                (ids,),
            )
            return Rows(rules, holdings, cur.fetchall())

    def restore(self, rows: Rows) -> None:
        """Put back rows read by `rows` (inside a transaction); what is still there stays."""
        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany(
                f"INSERT OR IGNORE INTO rules ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows.rules,
            )
            self._db.executemany(
                f"INSERT OR REPLACE INTO holdings ({_HOLDING_COLUMNS}) VALUES (?,?,?,?,?)",
                rows.holdings,
            )
            self._db.executemany("INSERT OR IGNORE INTO rule_extras VALUES (?,?,?)", rows.extras)
            for source in {h[0] for h in rows.holdings}:
                self._db.execute(
                    "INSERT OR IGNORE INTO sources VALUES (?, ?)", (source, time.time())
                )

    def codes(self) -> Iterator[tuple[int, int]]:
        """(id, code) of every rule, in id order; for comparing a million rules cheaply: the
        stored codes (schema v4), no texts parsed (a row without one, which only a hand-made
        write could leave, is parsed from its texts and comes last)."""
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            cur.execute("SELECT id, code FROM rules ORDER BY id")
            decode = int.from_bytes
            missing = False
            for rid, blob in cur:
                if blob is None:
                    missing = True
                    continue
                yield rid, decode(blob, "little")
            if missing:
                yield from sorted(_parsed_codes(self._db, "WHERE r.code IS NULL"))

    def ids(self) -> Iterator[int]:
        with self._sql("read the rule database"):
            cur = self._db.cursor()
            cur.row_factory = None
            for (rid,) in cur.execute("SELECT id FROM rules"):
                yield rid

    def delete(self, rule_ids: Iterable[int]) -> None:
        """Delete rules and every holding of them (inside a transaction)."""
        ids = list(rule_ids)
        with self._sql(f"write the rule database {self.path}"):
            self._db.executemany("DELETE FROM holdings WHERE rule_id=?", ((i,) for i in ids))
            self._db.executemany("DELETE FROM rules WHERE id=?", ((i,) for i in ids))
            self._db.executemany("DELETE FROM rule_sample WHERE rule_id=?", ((i,) for i in ids))
            if self._db.execute("SELECT 1 FROM rule_extras LIMIT 1").fetchone() is not None:
                self._db.executemany(
                    "DELETE FROM rule_extras WHERE rule_id=?", ((i,) for i in ids)
                )

    _HELD = (
        "SELECT r.id AS id, r.action AS action, r.mode AS mode, r.src AS src, r.dst AS dst,"
        " r.proto AS proto, r.dport AS dport, h.source AS source, h.comment AS comment,"
        " h.created_at AS created_at, h.expires_at AS expires_at,"
        " e.tcp_flags AS tcp_flags, e.rate_limit AS rate_limit"  # issue 16
        " FROM holdings h JOIN rules r ON r.id=h.rule_id"
        " LEFT JOIN rule_extras e ON e.rule_id = r.id"
    )

    def _held_rules(self, rows: Sequence[sqlite3.Row]) -> list[StoredRule]:
        holders = self.holders(r["id"] for r in rows)
        return [
            StoredRule(
                _spec_of(r).with_id(r["id"]), r["comment"], r["created_at"], r["expires_at"],
                r["source"], tuple(holders.get(r["id"], [r["source"]])),
            )
            for r in rows
        ]

    def get(self, rule_id: int, source: str | None = None) -> StoredRule | None:
        """The rule as `source` holds it (None if it does not), or as its first holder does."""
        with self._sql("read the rule database"):
            if source is None:
                row = self._db.execute(
                    f"{self._HELD} WHERE h.rule_id=? ORDER BY h.created_at, h.source LIMIT 1",
                    (rule_id,),
                ).fetchone()
            else:
                row = self._db.execute(
                    f"{self._HELD} WHERE h.source=? AND h.rule_id=?", (source, rule_id)
                ).fetchone()
        return self._held_rules([row])[0] if row is not None else None

    def page(self, after: int, limit: int, source: str | None = None) -> list[StoredRule]:
        """Rules with ids above `after`, in id order: every rule (as its first holder holds
        it), or those `source` holds (as it holds them)."""
        with self._sql("read the rule database"):
            if source is not None:
                rows = self._db.execute(
                    f"{self._HELD} WHERE h.source=? AND h.rule_id>? ORDER BY h.rule_id LIMIT ?",
                    (source, after, limit),
                ).fetchall()
                return self._held_rules(rows)
            ids = [
                r[0] for r in self._db.execute(
                    "SELECT id FROM rules WHERE id>? ORDER BY id LIMIT ?", (after, limit)
                )
            ]
        return self._first_holdings(ids)

    def _first_holdings(self, ids: Sequence[int]) -> list[StoredRule]:
        with self._sql("read the rule database"):
            rows = self._db.execute(
                f"{self._HELD} WHERE h.rule_id IN (SELECT value FROM json_each(?))"
                " ORDER BY h.rule_id, h.created_at, h.source",
                (json.dumps(list(ids)),),
            ).fetchall()
        first: list[sqlite3.Row] = []
        for r in rows:
            if not first or first[-1]["id"] != r["id"]:
                first.append(r)
        return self._held_rules(first)

    def all(self) -> list[StoredRule]:
        with self._sql("read the rule database"):
            ids = [r[0] for r in self._db.execute("SELECT id FROM rules ORDER BY id")]
        return self._first_holdings(ids)

    def count(self) -> int:
        with self._sql("read the rule database"):
            return int(self._db.execute("SELECT COUNT(*) AS n FROM rules").fetchone()["n"])

    def due(self, now: float | None = None) -> list[tuple[str, int]]:
        """(source, rule id) of the holdings whose expiry has passed."""
        now = time.time() if now is None else now
        with self._sql("read the rule database"):
            rows = self._db.execute(
                "SELECT source, rule_id FROM holdings WHERE expires_at IS NOT NULL"
                " AND expires_at<=? ORDER BY rule_id, source",
                (now,),
            ).fetchall()
        return [(r["source"], r["rule_id"]) for r in rows]

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

    # -- X-ray (issue 17): which rules are sampled, 1 in `every` ---------------------------------

    def samples(self) -> dict[int, int]:
        """rule id -> every, of each sampled rule (rows of rules that no longer exist skipped)."""
        with self._sql(f"read the rule database {self.path}"):
            rows = self._db.execute(
                "SELECT rule_id, every FROM rule_sample WHERE rule_id IN (SELECT id FROM rules)"
            ).fetchall()
        return {int(r["rule_id"]): int(r["every"]) for r in rows}

    def set_samples(self, every: dict[int, int | None]) -> None:
        """Inside a transaction: sample these rules 1 in `every` (None: not sampled)."""
        with self._sql(f"write the rule database {self.path}"):
            for rid, n in every.items():
                if n:
                    self._db.execute(
                        "INSERT INTO rule_sample VALUES (?, ?)"
                        " ON CONFLICT(rule_id) DO UPDATE SET every=excluded.every",
                        (rid, n),
                    )
                else:
                    self._db.execute("DELETE FROM rule_sample WHERE rule_id=?", (rid,))

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

    # -- fleet (issue 19: api/fleet/) ------------------------------------------------------------

    def fleet_meta(self, key: str) -> str | None:
        """A `fleet.*` meta row (the applied etcd revision, the fleet-managed sources)."""
        with self._sql(f"read the rule database {self.path}"):
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (f"fleet.{key}",)
                                   ).fetchone()
        return None if row is None else str(row["value"])

    def set_fleet_meta(self, key: str, value: str) -> None:
        with self._sql(f"write the rule database {self.path}"):
            self._db.execute(
                "INSERT INTO meta VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (f"fleet.{key}", value),
            )
