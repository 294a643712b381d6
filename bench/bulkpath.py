"""Item 4's cost table: where a bulk load's time goes, step by step, in process.

`FirewallService.bulk_add_codes` (what `POST /v1/rules/bulk` with `text/plain` runs after
parsing) loads the master list's first `bulk_total` entries into a Datapath of its own
(loaded for this, pinned under a directory of this pid, removed at the end) and a fresh SQLite
file; each step is timed by wrapping the method that does it (a handful of calls, so the
wrappers cost nothing measurable): the line parser, the service's loop (protected-prefix
check, duplicate lookup), the SQLite insert, the compiler's plan (columns, and the general
planner for what is not columnar), counter indices, the /24 hint, the map writes and the
compiler's commit. Then, on the same machine in the same run: SQLite alternatives for the
same rows (the schema's one row per rule with texts, a narrow (id, code) row, one blob) and
the old entry point `Datapath.add_rules` (Rule objects) against `Datapath.add_codes` on the
same `bulk_compare` entries. After the load, item 4e in process: the loaded entries become a
source's and `FirewallService.replace_source` replaces it with 1% changed (`_replace_steps`),
step by step the same way.
"""

from __future__ import annotations

import functools
import os
import resource
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.lists import MasterList
from bench.ours import pin_dir
from bench.profiles import Profile
from bench.sysutil import log

__all__ = ["run_bulkpath"]


@contextmanager
def _timing(steps: dict[str, float], targets: list[tuple[object, str, str]]) -> Iterator[None]:
    """Wrap obj.attr (instance attributes) with timers adding into steps[name]."""
    saved = []
    for obj, attr, name in targets:
        fn: Callable[..., Any] = getattr(obj, attr)

        def timed(*a: Any, _fn: Callable[..., Any] = fn, _name: str = name, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                steps[_name] = steps.get(_name, 0.0) + time.perf_counter() - t

        functools.update_wrapper(timed, fn)
        saved.append((obj, attr))
        setattr(obj, attr, timed)
    try:
        yield
    finally:
        for obj, attr in saved:
            delattr(obj, attr)


def _text(master: MasterList, n: int) -> bytes:
    return ("\n".join(master.lines(n)) + "\n").encode()


def run_bulkpath(p: Profile, master: MasterList) -> dict[str, Any]:
    from api.service import FirewallService, NewCodes
    from api.store import Store
    from xdpfw.abi import Table
    from xdpfw.compiler import Capacities
    from xdpfw.datapath import Datapath, DatapathConfig
    from xdpfw.importers import ListReader

    n = p.bulk_total
    out: dict[str, Any] = {"entries": n, "prefixes": n // 8}
    text = _text(master, n)
    steps: dict[str, float] = {}
    # room for the 1% replace too (old + new, `_replace_steps`)
    caps = Capacities(max_rules=max(n + n // 50 + 1024, 1 << 16),
                      max_prefixes=max(n // 4, 1 << 14))
    with tempfile.TemporaryDirectory(prefix="xbn-bulk-") as tmp:
        log(f"item 4: the bulk path step by step, {n:,} entries in process")
        t = time.perf_counter()
        reader = ListReader()
        for i in range(0, len(text), 1 << 20):
            reader.feed(text[i : i + (1 << 20)])
        codes = reader.finish()
        steps["parse (ListReader, text -> codes)"] = time.perf_counter() - t
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with Datapath.open(DatapathConfig(bpffs_dir=pin_dir("bulk"), caps=caps)) as dp:
            store = Store(Path(tmp) / "rules.sqlite3")
            svc = FirewallService(dp, store)
            w = dp._writer  # the bench names the private steps it times
            src4 = dp.table(Table.SRC4_LPM)
            comp = dp.compiler
            targets = [
                (store, "insert_codes", "SQLite: insert the rows (one per rule)"),
                (store, "next_ids", "SQLite: next ids"),
                (dp, "add_codes", "Datapath.add_codes (total)"),
                (comp, "plan_codes", "compiler: plan_codes (total)"),
                (comp, "plan_add", "compiler: of it, the general planner (nested prefixes)"),
                (comp, "commit", "compiler: commit"),
                (w._counters.index, "alloc_many", "counters: indices (columns)"),
                (w._counters.index, "alloc", "counters: indices (others)"),
                (w._counters, "zero", "counters: zero them (batched)"),
                (w, "_write_hosts", "maps: column entries (numpy pack + batches)"),
                (w, "_write_entries", "maps: other entries"),
                # IPv4 prefixes: the DIR-24-8 arrays (issue 18; the /24 hint is retired)
                (src4, "update_batch_raw", "prefix arrays: column batches (src)"),
                (src4, "_put", "prefix arrays: of it, one prefix at a time (src)"),
            ]
            with _timing(steps, targets):
                t = time.perf_counter()
                svc.bulk_add_codes(NewCodes(codes))
                total = time.perf_counter() - t
            steps["FirewallService.bulk_add_codes (total)"] = total
            other = ("SQLite: insert the rows (one per rule)", "SQLite: next ids",
                     "Datapath.add_codes (total)")
            steps["service: its own loop (protected check, duplicates)"] = total - sum(
                steps.get(k, 0.0) for k in other
            )
            out["rules_loaded"] = len(dp.compiler)
            from xdpfw.kernel.bpfsys import Cmd

            out["batch_update"] = {  # did the kernel take BPF_MAP_UPDATE_BATCH for each map
                name: dp.map(name)._batch_ok.get(Cmd.MAP_UPDATE_BATCH)
                for name in ("xdpfw_src4", "xdpfw_rule_stats")
            }
            out["maxrss_growth_mib"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
            ) / 1024
            out["replace"] = _replace_steps(svc, master, n)
            store.close()
        out["steps_s"] = steps
        out["sqlite"] = _sqlite_alternatives(Path(tmp), codes)
    out["paths"] = _paths(p, master, caps)
    return out


def _replace_steps(svc: Any, master: MasterList, n: int) -> dict[str, Any]:
    """Item 4e in process: the loaded entries become source `bench`'s (their holdings moved
    in SQLite, untimed), then `FirewallService.replace_source` with 1% changed (every
    100th entry out, as many new hosts in: `control.changed_list`), each step timed by
    wrapping the method that does it; the parse of the changed text (what the PUT route runs
    first) is timed on its own."""
    from api.service import NewCodes
    from bench.control import changed_list
    from bench.lists import entry_text
    from xdpfw.importers import ListReader

    store, dp = svc.store, svc.dp
    with store.transaction():  # the bulk load's holdings (source api) become bench's
        store._db.execute("UPDATE holdings SET source='bench' WHERE source='api'")
        store.touch("bench", time.time())
    text = ("\n".join(entry_text(e) for e in changed_list(master.take(n))) + "\n").encode()
    steps: dict[str, float] = {}
    t = time.perf_counter()
    reader = ListReader()
    for i in range(0, len(text), 1 << 20):
        reader.feed(text[i : i + (1 << 20)])
    changed = reader.finish()
    steps["parse (ListReader, text -> codes)"] = time.perf_counter() - t
    targets = [
        (store, "held", "SQLite: the source's holdings (ids)"),
        (store, "rows", "SQLite: rows of the removed (for an undo)"),
        (store, "insert_codes", "SQLite: insert the new rows"),
        (store, "refresh", "SQLite: refresh the kept holdings"),
        (store, "release", "SQLite: release the removed"),
        (dp, "add_codes", "Datapath.add_codes (the new)"),
        (dp, "remove_rules", "Datapath.remove_rules (the removed)"),
    ]
    with _timing(steps, targets):
        t = time.perf_counter()
        change = svc.replace_source("bench", NewCodes(changed, source="bench"))
        total = time.perf_counter() - t
    steps["FirewallService.replace_source (total)"] = total
    steps["service: its own work (the diff, the checks)"] = total - sum(
        v for k, v in steps.items() if k.startswith(("SQLite", "Datapath"))
    )
    for k, v in steps.items():
        log(f"  replace: {k}: {v:.3f} s")
    return {"steps_s": steps, "added": change.added, "removed": change.removed,
            "unchanged": change.unchanged}


def _sqlite_alternatives(tmp: Path, codes: list[int]) -> dict[str, float]:
    """The same rows three ways, each in one transaction of a fresh WAL database."""
    import numpy as np

    from xdpfw.rules import code_texts

    out: dict[str, float] = {}

    def db(name: str) -> sqlite3.Connection:
        c = sqlite3.connect(tmp / name, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        return c

    c = db("rows.sqlite3")
    c.execute("CREATE TABLE rules (id INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL,"
              " mode TEXT NOT NULL, src TEXT, dst TEXT, proto TEXT, dport TEXT, comment TEXT"
              " NOT NULL DEFAULT '', created_at REAL NOT NULL, expires_at REAL)")
    t = time.perf_counter()
    c.execute("BEGIN")
    c.executemany("INSERT INTO rules VALUES (?,?,?,?,?,?,?,?,?,?)",
                  ((i + 1, *code_texts(code), "", 1.0, None) for i, code in enumerate(codes)))
    c.execute("COMMIT")
    out["one row per rule, texts (today's schema)"] = time.perf_counter() - t
    c.close()
    c = db("narrow.sqlite3")
    c.execute("CREATE TABLE codes (id INTEGER PRIMARY KEY, code BLOB NOT NULL)")
    t = time.perf_counter()
    c.execute("BEGIN")
    c.executemany("INSERT INTO codes VALUES (?,?)",
                  ((i + 1, code.to_bytes(24, "little")) for i, code in enumerate(codes)))
    c.execute("COMMIT")
    out["one row per rule, (id, code)"] = time.perf_counter() - t
    c.close()
    c = db("blob.sqlite3")
    c.execute("CREATE TABLE chunks (first_id INTEGER PRIMARY KEY, ids BLOB, codes BLOB)")
    t = time.perf_counter()
    ids = np.arange(1, len(codes) + 1, dtype=np.uint32).tobytes()
    blob = b"".join(code.to_bytes(24, "little") for code in codes)
    c.execute("BEGIN")
    c.execute("INSERT INTO chunks VALUES (?,?,?)", (1, ids, blob))
    c.execute("COMMIT")
    out["one blob for the whole load"] = time.perf_counter() - t
    c.close()
    return out


def _paths(p: Profile, master: MasterList, caps: Any) -> dict[str, Any]:
    """Datapath.add_rules (Rule objects, the general planner) against Datapath.add_codes
    (columns) on the same entries, each into a fresh program."""
    from xdpfw.compiler import gc_paused
    from xdpfw.datapath import Datapath, DatapathConfig
    from xdpfw.importers import list_codes
    from xdpfw.rules import rule_from_code

    m = min(p.bulk_total, p.bulk_compare)
    codes = list_codes(_text(master, m).decode())
    ids = list(range(1, m + 1))
    out: dict[str, Any] = {"entries": m}
    for name in ("add_rules", "add_codes"):
        with Datapath.open(DatapathConfig(bpffs_dir=pin_dir(f"path{os.getpid()}"),
                                          caps=caps)) as dp, gc_paused():
            t = time.perf_counter()
            if name == "add_rules":
                dp.add_rules([rule_from_code(i, c) for i, c in zip(ids, codes, strict=True)])
            else:
                dp.add_codes(ids, codes)
            out[name + "_s"] = time.perf_counter() - t
        log(f"  Datapath.{name} of {m:,} entries: {out[name + '_s']:.2f} s")
    return out
