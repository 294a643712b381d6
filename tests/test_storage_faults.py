"""Disk faults and lost databases: the database and the maps agree after every call.

Pure tests drive the real service and SQLite store over the stand-in datapath, with a COMMIT
that fails as on a full disk (every mutation path) or a real SQLITE_FULL. E2e tests run the real
server with its state dir on a tiny tmpfs filled to the last byte, and with its database
truncated or overwritten with garbage, and check real packets on a veth lab.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.service import FirewallService
from api.store import PROTECT_BASE, Store
from tests.conftest import unique_pin_dir
from tests.fakes import FakeDatapath
from tests.server import Server, running_server
from tests.test_api_pure import PROTECTED, Api, _api, _text
from tests.traffic import udp_roundtrip
from xdpfw import errors
from xdpfw.rules import RuleSpec

FULL = "database or disk is full"


# -- pure: a COMMIT that fails, on every mutation path -----------------------------------------


def _db_codes(store: Store) -> dict[int, int]:
    return dict(store.codes())


def _map_codes(dp: FakeDatapath) -> dict[int, int]:
    return {rid: code for rid, code in dp.compiler.codes().items() if rid < PROTECT_BASE}


def assert_agree(a: Api) -> None:
    """The database and the (stand-in) maps hold the same rules and interfaces."""
    assert _db_codes(a.store) == _map_codes(a.dp)
    assert set(a.store.interfaces()) == set(a.dp.attached)
    assert not a.store._db.in_transaction


@contextmanager
def failing_commit(a: Api, message: str = FULL) -> Iterator[list[int]]:
    """Every COMMIT raises as SQLite does on a full disk; yields a list counting them."""
    calls: list[int] = []

    def commit() -> None:
        calls.append(1)
        raise sqlite3.OperationalError(message)

    a.store._commit = commit  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del a.store._commit


@pytest.fixture
def fa(tmp_path: Path) -> Iterator[Api]:
    a = _api(tmp_path / "rules.sqlite3", protect=(PROTECTED,))
    c = a.client
    assert c.post("/v1/interfaces", json={"name": "eth0"}).status_code == 201
    r = c.post("/v1/rules/bulk", json=[{"src": f"198.18.40.{i}"} for i in range(1, 4)])
    assert r.status_code == 201
    assert c.post("/v1/rules", json={"src": "198.18.41.1", "ttl_seconds": 60}).status_code == 201
    yield a
    a.store.close()


def _507(r: Any, state_dir: Path) -> None:
    assert r.status_code == 507, r.text
    body = r.json()
    assert body["error"] == "StorageFull"
    assert str(state_dir) in body["detail"] and "Free space" in body["detail"]


@pytest.mark.pure
def test_failed_commit_on_each_mutation_leaves_db_and_maps_equal(fa: Api, tmp_path: Path) -> None:
    c = fa.client
    before = _db_codes(fa.store)
    rid = min(before)
    with failing_commit(fa) as commits:
        _507(c.post("/v1/rules", json={"src": "198.18.42.1"}), tmp_path)
        assert_agree(fa)
        _507(c.post("/v1/rules/bulk", json=[{"src": f"198.18.43.{i}"} for i in range(200)]),
             tmp_path)
        assert_agree(fa)
        _507(_text(c, "\n".join(f"198.18.44.{i}" for i in range(200))), tmp_path)
        assert_agree(fa)
        _507(c.delete(f"/v1/rules/{rid}"), tmp_path)
        assert_agree(fa)
        assert rid in fa.dp.compiler.rules and c.get(f"/v1/rules/{rid}").status_code == 200
        with pytest.raises(errors.StorageFull):  # the TTL sweeper's call
            fa.svc.expire_due(now=time.time() + 3600)
        assert_agree(fa)
        _507(c.post("/v1/interfaces", json={"name": "eth1"}), tmp_path)
        assert "eth1" not in fa.dp.attached
        assert_agree(fa)
        _507(c.delete("/v1/interfaces/eth0"), tmp_path)
        assert "eth0" in fa.dp.attached
        assert_agree(fa)
        assert len(commits) == 7
    assert _db_codes(fa.store) == before
    # space again: the same calls succeed, no 409 "already exists", no restart
    r = c.post("/v1/rules", json={"src": "198.18.42.1"})
    assert r.status_code == 201, r.text
    assert c.post("/v1/rules/bulk", json=[{"src": f"198.18.43.{i}"} for i in range(200)]
                  ).status_code == 201
    assert c.delete(f"/v1/rules/{rid}").status_code == 204
    assert fa.svc.expire_due(now=time.time() + 3600)
    assert c.post("/v1/interfaces", json={"name": "eth1"}).status_code == 201
    assert c.delete("/v1/interfaces/eth0").status_code == 204
    assert_agree(fa)


@pytest.mark.pure
def test_a_delete_on_a_full_disk_keeps_the_rule_and_its_counters(fa: Api) -> None:
    rid = min(_db_codes(fa.store))
    fa.dp.hit(rid, 5, 500)
    changes = fa.dp.changes
    with failing_commit(fa):
        assert fa.client.delete(f"/v1/rules/{rid}").status_code == 507
    assert fa.dp.changes == changes  # the maps were never touched
    assert fa.dp.rule_counters([rid])[rid].packets == 5


@pytest.mark.pure
def test_maps_refusing_a_removal_put_the_rows_back(fa: Api) -> None:
    rid = min(_db_codes(fa.store))
    row = fa.store.rows([rid])
    fa.dp.fail_next = errors.KernelError("map delete", 1, "Operation not permitted")
    assert fa.client.delete(f"/v1/rules/{rid}").status_code == 500
    assert fa.store.rows([rid]) == row  # comment, created_at, expires_at as they were
    assert_agree(fa)


@pytest.mark.pure
def test_other_sqlite_errors_are_a_clear_503(fa: Api) -> None:
    with failing_commit(fa, "database is locked"):
        r = fa.client.post("/v1/rules", json={"src": "198.18.45.1"})
    assert r.status_code == 503 and r.json()["error"] == "StorageError", r.text
    assert "database is locked" in r.json()["detail"]
    assert_agree(fa)


@pytest.mark.pure
def test_a_real_sqlite_full_mid_bulk(fa: Api, tmp_path: Path) -> None:
    """SQLite's own SQLITE_FULL (max_page_count pinned at the current size), not a stand-in."""
    pages = fa.store._db.execute("PRAGMA page_count").fetchone()[0]
    fa.store._db.execute(f"PRAGMA max_page_count={pages}")
    r = fa.client.post("/v1/rules/bulk", json=[{"src": f"198.18.46.{i}"} for i in range(250)]
                       + [{"src": f"198.18.47.{i}"} for i in range(250)])
    _507(r, tmp_path)
    assert_agree(fa)
    fa.store._db.execute("PRAGMA max_page_count=1073741823")
    assert fa.client.post("/v1/rules/bulk", json=[{"src": "198.18.46.1"}]).status_code == 201
    assert_agree(fa)


@pytest.mark.pure
def test_adoption_and_protected_clash_on_a_failing_commit(tmp_path: Path) -> None:
    dp = FakeDatapath(adopted=True)
    dp.add_rules([RuleSpec.parse(src="198.18.48.1").with_id(5),
                  RuleSpec.parse(action="allow", src="198.18.49.0/24").with_id(6)])
    store = Store(tmp_path / "rules.sqlite3")
    svc = FirewallService(dp, store, ("198.18.49.0/24",))
    a = Api(None, None, svc, dp, store)  # type: ignore[arg-type]  # no app needed
    with failing_commit(a), pytest.raises(errors.StorageFull):
        a.svc.reconcile()
    assert _db_codes(store) == {} and set(_map_codes(dp)) in ({5}, {5, 6})
    store.close()
    # a later start (disk freed) adopts; the protected prefix replaces its identical rule
    store = Store(tmp_path / "rules.sqlite3")
    svc = FirewallService(dp, store, ("198.18.49.0/24",))
    assert svc.reconcile()["adopted"] in (1, 2)
    svc.reconcile()
    assert _db_codes(store) == _map_codes(dp) == {5: dp.compiler.codes()[5]}
    store.close()


# -- pure: empty, table-less, garbage and foreign databases ------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize("kind", ["missing", "zero-bytes", "no-tables"])
def test_a_lost_database_adopts_the_maps(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "rules.sqlite3"
    dp = FakeDatapath(adopted=True)
    dp.add_rules([RuleSpec.parse(src=f"198.18.50.{i}").with_id(i) for i in range(1, 6)])
    if kind == "zero-bytes":
        db.write_bytes(b"")
    elif kind == "no-tables":
        sqlite3.connect(db).execute("PRAGMA user_version=7").connection.close()
        assert db.stat().st_size > 0
    svc = FirewallService(dp, Store(db), ())
    assert svc.reconcile() == {"adopted": 5, "added": 0, "removed": 0}
    assert len(dp.compiler) == 5 and svc.store.count() == 5
    svc.store.close()


@pytest.mark.pure
@pytest.mark.parametrize("kind", ["garbage", "foreign-schema", "truncated-page"])
def test_a_corrupt_database_is_refused_with_the_recovery_command(tmp_path: Path,
                                                                  kind: str) -> None:
    db = tmp_path / "rules.sqlite3"
    if kind == "garbage":
        db.write_bytes(os.urandom(8192))
    elif kind == "foreign-schema":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE rules (who TEXT)")
        con.commit()
        con.close()
    else:  # a real database, cut in the middle of a page
        Store(db).close()
        db.write_bytes(db.read_bytes()[:100])
    size = db.stat().st_size
    with pytest.raises(errors.DatabaseCorrupt) as err:
        Store(db)
    msg = str(err.value)
    assert str(db) in msg and f"mv {db} {db}.corrupt" in msg and "adopts" in msg
    assert db.stat().st_size == size  # not touched


# -- e2e: a tiny tmpfs as the state dir ---------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem has not one byte left."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def _counts(c: httpx.Client) -> tuple[int, int]:
    """(rules in the maps per /healthz, rules in the database per the API)."""
    listed = c.get("/v1/rules", params={"limit": 10_000}).json()
    assert listed["next_cursor"] is None
    return c.get("/healthz").json()["rules"], len(listed["rules"])


@pytest.fixture
def full_server(tmp_path: Path) -> Iterator[Server]:
    with tmpfs(tmp_path / "state"), running_server(tmp_path, unique_pin_dir("full")) as srv:
        yield srv


@pytest.mark.e2e
def test_full_disk_answers_507_changes_nothing_and_start_says_so(full_server: Server) -> None:
    srv, lab = full_server, full_server.lab
    with srv.client() as c:
        assert c.post("/v1/rules", json={"src": lab.peer_ip6}).status_code == 201
        v6 = c.get("/v1/rules").json()["rules"][0]["id"]
        assert udp_roundtrip(lab, family=6) == 0 and udp_roundtrip(lab) == 10
        filler = fill(srv.state_dir)

        r = c.post("/v1/rules", json={"src": lab.peer_ip4})
        assert r.status_code == 507, r.text
        assert r.json()["error"] == "StorageFull" and str(srv.state_dir) in r.json()["detail"]
        assert udp_roundtrip(lab) == 10  # not enforced
        assert _counts(c) == (1, 1)

        bulk = "\n".join(f"10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(20_000))
        r = c.post("/v1/rules/bulk", content=bulk, headers={"content-type": "text/plain"})
        assert r.status_code == 507, r.text
        assert _counts(c) == (1, 1)

        assert c.delete(f"/v1/rules/{v6}").status_code == 507
        assert udp_roundtrip(lab, family=6) == 0  # still enforced
        assert _counts(c) == (1, 1)
        assert c.get(f"/v1/rules/{v6}").status_code == 200

        filler.unlink()  # space again: no 409, no restart
        r = c.post("/v1/rules", json={"src": lab.peer_ip4})
        assert r.status_code == 201, r.text
        assert udp_roundtrip(lab) == 0
        assert c.delete(f"/v1/rules/{v6}").status_code == 204
        assert udp_roundtrip(lab, family=6) == 10
        assert _counts(c) == (1, 1)
    assert "Traceback" not in srv.output()

    # start-up on a full disk: says so, exits non-zero, the pinned program keeps dropping
    srv.stop()
    filler = fill(srv.state_dir)
    before = len(srv.output())
    with pytest.raises(RuntimeError, match="exited 1"):
        srv.start()
    out = srv.output()[before:]
    assert "is full" in out and str(srv.state_dir) in out and "Traceback" not in out, out
    assert udp_roundtrip(lab) == 0
    filler.unlink()
    srv.start()
    with srv.client() as c:
        assert _counts(c) == (1, 1)
    assert udp_roundtrip(lab) == 0


# -- e2e: the database truncated or garbage -----------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, unique_pin_dir("lostdb")) as srv:
        yield srv


def _prog_attached(srv: Server) -> bool:
    out = subprocess.run(["ip", "-d", "link", "show", srv.lab.host_if], capture_output=True,
                         text=True).stdout
    return "prog/xdp id" in out


@pytest.mark.e2e
def test_truncated_database_adopts_garbage_is_refused(server: Server) -> None:
    srv, lab = server, server.lab
    db = srv.state_dir / "rules.sqlite3"
    with srv.client() as c:
        r = c.post("/v1/rules/bulk", json=[{"src": lab.peer_ip4}]
                   + [{"src": f"198.18.90.{i}"} for i in range(1, 50)])
        assert r.status_code == 201
    srv.stop()
    os.truncate(db, 0)
    srv.start()
    with srv.client() as c:
        assert _counts(c) == (50, 50)
        assert c.get("/v1/rules").json()["rules"][0]["comment"] == "adopted from pinned maps"
    assert udp_roundtrip(lab) == 0
    assert "removed 50" not in srv.output() and "adopted 50 rules" in srv.output()

    srv.stop()
    db.write_bytes(os.urandom(64 * 1024))
    before = srv.output()
    with pytest.raises(RuntimeError, match="exited 1"):
        srv.start()
    out = srv.output()[len(before):]
    assert f"mv {db} {db}.corrupt" in out and "Traceback" not in out, out
    assert _prog_attached(srv) and udp_roundtrip(lab) == 0  # filtering on meanwhile
    db.rename(db.with_name("rules.sqlite3.corrupt"))
    srv.start()
    with srv.client() as c:
        assert _counts(c) == (50, 50)
    assert udp_roundtrip(lab) == 0
