"""Rule sources over the real service, app and SQLite store (the stand-in datapath).

What a source means (xdpfw/sources.py, api/service.py): a rule is held by one or more sources;
it leaves the maps with its last holder. These prove the semantics: replace as a diff (ids and
counters kept), sources independent, TTL per holding, delete by value, overlaps with protected
prefixes, the 404/413/422/507 answers, and the schema migration from a real version-1 file.
The same through the kernel and a server process: tests/test_sources_e2e.py.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.service import NewCodes, NewRule
from api.store import SCHEMA_VERSION, Store, StoredRule
from tests.fakes import FakeDatapath
from tests.test_api_pure import PROTECTED, Api, _api
from tests.test_storage_faults import assert_agree, failing_commit
from xdpfw import errors
from xdpfw.compiler import Capacities
from xdpfw.importers import list_codes
from xdpfw.rules import Limit, RuleSpec
from xdpfw.sources import check_source

pytestmark = pytest.mark.pure

PLAIN = {"content-type": "text/plain"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = _api(tmp_path / "rules.sqlite3", protect=(PROTECTED,))
    yield a
    a.store.close()


def put(a: Api, name: str, body: str | bytes, **params: Any) -> Any:
    return a.client.put(f"/v1/sources/{name}", content=body, params=params, headers=PLAIN)


def lines(*nets: str) -> str:
    return "".join(f"{n}\n" for n in nets)


def held(a: Api, name: str) -> dict[str, int]:
    """src -> rule id of every rule the source holds (through the API)."""
    page = a.client.get("/v1/rules", params={"source": name, "limit": 10_000}).json()
    return {r["src"]: r["id"] for r in page["rules"]}


def in_maps(a: Api) -> set[str]:
    return {str(r.src) for r in a.dp.rules() if r.src is not None and r.id < 1 << 20}


def test_source_names() -> None:
    for good in ("api", "firehol_level1", "fail2ban.sshd", "0day", "a" * 64):
        assert check_source(good) == good
    for bad in ("", "Upper", "-x", ".x", "a" * 65, "sp ace", "a/b", "é"):
        with pytest.raises(errors.InvalidRule) as exc:
            check_source(bad)
        assert exc.value.field == "source"


def test_replace_is_a_diff_that_keeps_ids_and_counters(api: Api) -> None:
    r = put(api, "feed", lines("198.18.1.0/24", "198.18.2.1", "198.18.3.1"), comment="v1")
    assert r.status_code == 200, r.text
    assert r.json() == {"source": "feed", "added": 3, "removed": 0, "unchanged": 0,
                        "overlaps": [], "overlap_count": 0}
    before = held(api, "feed")
    api.dp.hit(before["198.18.2.1/32"], 7, 700)
    r = put(api, "feed", lines("198.18.2.1", "198.18.3.1", "198.18.4.1"), comment="v2")
    assert r.json()["added"] == 1 and r.json()["removed"] == 1 and r.json()["unchanged"] == 2
    after = held(api, "feed")
    assert set(after) == {"198.18.2.1/32", "198.18.3.1/32", "198.18.4.1/32"}
    assert after["198.18.2.1/32"] == before["198.18.2.1/32"]  # same rule id
    assert api.dp.rule_counters([after["198.18.2.1/32"]])[after["198.18.2.1/32"]].packets == 7
    assert in_maps(api) == set(after)
    one = api.client.get(f"/v1/rules/{after['198.18.2.1/32']}").json()
    assert one["comment"] == "v2" and one["source"] == "feed" and one["sources"] == ["feed"]
    # the same list again changes nothing
    r = put(api, "feed", lines("198.18.2.1", "198.18.3.1", "198.18.4.1"))
    assert (r.json()["added"], r.json()["removed"], r.json()["unchanged"]) == (0, 0, 3)
    assert held(api, "feed") == after
    assert_agree(api)


def test_sources_are_independent_and_a_shared_rule_is_one_rule(api: Api) -> None:
    c = api.client
    assert put(api, "a", lines("198.18.5.1", "198.18.5.2")).status_code == 200
    assert put(api, "b", lines("198.18.5.2", "198.18.5.3")).status_code == 200
    a, b = held(api, "a"), held(api, "b")
    shared = a["198.18.5.2/32"]
    assert b["198.18.5.2/32"] == shared  # one kernel rule, held twice
    assert len(api.dp.compiler) - 1 == 3  # (one protected rule)
    rule = c.get(f"/v1/rules/{shared}").json()
    assert rule["source"] == "a" and rule["sources"] == ["a", "b"]
    # the shared rule's counters count in both sources' sums
    api.dp.hit(shared, 5, 500)
    api.dp.hit(a["198.18.5.1/32"], 1, 100)
    sums = {s["name"]: s for s in c.get("/v1/sources").json()}
    assert (sums["a"]["packets"], sums["a"]["bytes"], sums["a"]["rules"]) == (6, 600, 2)
    assert (sums["b"]["packets"], sums["b"]["bytes"], sums["b"]["rules"]) == (5, 500, 2)
    assert sums["a"]["last_hit"] is not None and sums["b"]["updated_at"].endswith("Z")
    # replacing a without the shared entry keeps it for b
    assert put(api, "a", lines("198.18.5.1")).json()["removed"] == 1
    assert "198.18.5.2/32" in in_maps(api)
    assert c.get(f"/v1/rules/{shared}").json()["sources"] == ["b"]
    # deleting b: the shared rule goes now (its last holder); a's rule stays
    r = c.delete("/v1/sources/b")
    assert r.status_code == 200 and r.json() == {"removed": 2}
    assert in_maps(api) == {"198.18.5.1/32"}
    assert c.get("/v1/sources/b").status_code == 404
    assert c.delete("/v1/sources/b").status_code == 404
    assert [s["name"] for s in c.get("/v1/sources").json()] == ["a"]
    assert_agree(api)


def test_a_hand_made_rule_survives_a_source_that_listed_it(api: Api) -> None:
    c = api.client
    rid = c.post("/v1/rules", json={"src": "198.18.6.1", "comment": "by hand"}).json()["id"]
    r = put(api, "feed", lines("198.18.6.1", "198.18.6.2"))
    assert r.json()["added"] == 2 and held(api, "feed")["198.18.6.1/32"] == rid
    assert c.delete("/v1/sources/feed").json() == {"removed": 2}
    assert in_maps(api) == {"198.18.6.1/32"}
    assert c.get(f"/v1/rules/{rid}").json()["sources"] == ["api"]


def test_ttl_per_holding_and_refresh(api: Api) -> None:
    c = api.client
    first = c.post("/v1/rules", json={"src": "198.18.7.1", "ttl_seconds": 60,
                                      "source": "f2b"})
    assert first.status_code == 201 and first.json()["source"] == "f2b"
    again = c.post("/v1/rules", json={"src": "198.18.7.1", "ttl_seconds": 3600,
                                      "source": "f2b"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["expires_at"] > first.json()["expires_at"]  # the new expiry
    same = c.post("/v1/rules", json={"src": "198.18.7.1", "source": "f2b"})  # no TTL: kept
    assert same.status_code == 200 and same.json()["expires_at"] == again.json()["expires_at"]
    rid = first.json()["id"]
    # another source holds it without a TTL: the f2b holding expiring keeps the rule
    assert c.post("/v1/rules", json={"src": "198.18.7.1", "source": "feed"}).status_code == 200
    assert api.svc.expire_due(time.time() + 7200) == []
    assert "198.18.7.1/32" in in_maps(api)
    assert c.get(f"/v1/rules/{rid}").json()["sources"] == ["feed"]
    # its own TTL: the rule goes with its last holding
    c.post("/v1/rules", json={"src": "198.18.7.2", "ttl_seconds": 5, "source": "f2b"})
    gone = api.svc.expire_due(time.time() + 10)
    assert len(gone) == 1 and "198.18.7.2/32" not in in_maps(api)
    assert_agree(api)


def test_delete_by_value(api: Api) -> None:
    c = api.client
    c.post("/v1/rules", json={"src": "198.18.8.0/24"})
    c.post("/v1/rules", json={"src": "198.18.8.9"})
    c.post("/v1/rules", json={"src": "198.18.8.9", "proto": "udp", "dport": 53})
    c.post("/v1/rules", json={"src": "198.18.8.9", "source": "f2b"})
    assert c.post("/v1/rules", json={"dst": "198.18.9.9", "force": True}).status_code == 201
    # only f2b's holding: the rule stays (api holds it)
    assert c.delete("/v1/rules", params={"src": "198.18.8.9", "source": "f2b"}).json() == {
        "removed": 1}
    assert "198.18.8.9/32" in in_maps(api)
    # every holder: the host rules go, the covering /24 stays
    assert c.delete("/v1/rules", params={"src": "198.18.8.9/32"}).json() == {"removed": 2}
    assert in_maps(api) == {"198.18.8.0/24"}
    assert c.delete("/v1/rules", params={"dst": "198.18.9.9"}).json() == {"removed": 1}
    assert c.delete("/v1/rules", params={"src": "198.18.99.1"}).json() == {"removed": 0}
    assert c.delete("/v1/rules").status_code == 422
    assert c.delete("/v1/rules", params={"src": "198.18.8.1/24"}).status_code == 422  # host bits
    assert c.delete("/v1/rules", params={"src": "198.18.8.9", "source": "Bad"}).status_code == 422
    assert_agree(api)


def test_overlaps_load_and_are_reported(api: Api) -> None:
    c = api.client
    body = lines("198.18.0.0/15", "198.18.255.7", "203.0.113.0/24")
    r = put(api, "firehol", body)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 3 and r.json()["overlap_count"] == 2
    assert all(PROTECTED in o for o in r.json()["overlaps"])
    # bulk with a source: the same; without one: 409 as before
    r = c.post("/v1/rules/bulk", content=lines("198.18.255.8"), headers=PLAIN,
               params={"source": "other"})
    assert r.status_code == 201 and r.json()["overlap_count"] == 1
    assert c.post("/v1/rules/bulk", content=lines("198.18.255.9"), headers=PLAIN
                  ).status_code == 409
    assert c.post("/v1/rules", json={"src": "198.18.255.10"}).status_code == 409
    # a list naming the protected allow rule itself: skipped, reported
    r = put(api, "allows", lines("198.18.255.0/24"), action="allow")
    assert r.status_code == 200 and r.json()["added"] == 0 and r.json()["overlap_count"] == 1


def test_a_refresh_is_a_diff_that_still_checks_and_refreshes_every_member(api: Api) -> None:
    """The replace takes only the entries the source does not hold through its per-entry
    checks, yet a re-PUT reports the overlaps of unchanged members again, gives every kept
    holding the call's comment and expiry (none too), and takes a rule held elsewhere."""
    c = api.client
    assert c.post("/v1/rules", json={"src": "198.18.6.6"}).status_code == 201  # source api
    body = lines("198.18.0.0/15", "198.18.5.1", "198.18.5.1", "198.18.6.6")
    r = put(api, "feed", body, ttl_seconds=600, comment="v1")
    assert (r.json()["added"], r.json()["unchanged"], r.json()["overlap_count"]) == (3, 0, 1)
    ids = held(api, "feed")
    for again in ({}, {"ttl_seconds": 60, "comment": "v3"}):
        r = put(api, "feed", body, **again)
        assert r.json() == {"source": "feed", "added": 0, "removed": 0, "unchanged": 3,
                            "overlaps": r.json()["overlaps"], "overlap_count": 1}
        assert PROTECTED in r.json()["overlaps"][0]
        assert held(api, "feed") == ids
        for rid in ids.values():
            one = api.store.get(rid, "feed")  # feed's holding (the api holds 198.18.6.6 too)
            assert one is not None and one.comment == again.get("comment", "")
            assert (one.expires_at is None) == ("ttl_seconds" not in again)
    r = put(api, "feed", lines("198.18.5.1"))
    assert (r.json()["added"], r.json()["removed"], r.json()["unchanged"]) == (0, 2, 1)
    assert "198.18.6.6/32" in in_maps(api)  # api holds it still
    assert_agree(api)


def test_bad_bodies_change_nothing(api: Api) -> None:
    put(api, "feed", lines("198.18.10.1"))
    before = held(api, "feed")
    r = put(api, "feed", "198.18.10.2\n198.18.10.3/24\nnonsense\n")
    assert r.status_code == 422
    msg = r.json()["errors"][0]["msg"]
    assert "line 2" in msg and "line 3" in msg
    assert put(api, "feed", b"\xff\xfe198.18.1.1\n").status_code == 422
    assert put(api, "feed", "# only comments\n").status_code == 422
    r = api.client.put("/v1/sources/feed", content=b"<x/>", headers={"content-type": "text/xml"})
    assert r.status_code == 422
    r = api.client.put("/v1/sources/feed", json={"src": "198.18.1.1"})  # not an array
    assert r.status_code == 422
    assert put(api, "Bad-Name", lines("198.18.1.1")).status_code == 422
    assert api.client.get("/v1/sources/Bad").status_code == 422
    assert api.client.delete("/v1/sources/Bad").status_code == 422
    assert api.client.get("/v1/sources/nosuch").status_code == 404
    assert held(api, "feed") == before
    assert_agree(api)


def test_json_replace_each_body_its_own(api: Api) -> None:
    r = api.client.put("/v1/sources/mix", json=[
        {"src": "198.18.11.1", "comment": "one", "ttl_seconds": 60},
        {"src": "198.18.11.0/24", "proto": "udp", "dport": 53, "action": "allow"},
    ])
    assert r.status_code == 200 and r.json()["added"] == 2
    page = api.client.get("/v1/sources/mix").json()
    assert page["rules"] == 2 and len(page["page"]["rules"]) == 2
    assert {x["comment"] for x in page["page"]["rules"]} == {"one", ""}
    # kept members take the new body's comment and expiry
    r = api.client.put("/v1/sources/mix", json=[{"src": "198.18.11.1", "comment": "two"}])
    assert (r.json()["unchanged"], r.json()["removed"]) == (1, 1)
    kept = api.client.get("/v1/sources/mix").json()["page"]["rules"]
    assert [(x["comment"], x["expires_at"]) for x in kept] == [("two", None)]


def test_a_full_table_or_disk_changes_nothing(tmp_path: Path) -> None:
    dp = FakeDatapath(caps=Capacities(max_rules=64, max_prefixes=64, max_sets=64))
    a = _api(tmp_path / "rules.sqlite3", dp)
    try:
        put(a, "feed", lines(*(f"198.18.12.{i}" for i in range(1, 41))))
        before, maps = held(a, "feed"), in_maps(a)
        # the new version needs room for its new entries before the old ones go
        r = put(a, "feed", lines(*(f"198.18.13.{i}" for i in range(1, 41))))
        assert r.status_code == 507, r.text
        assert held(a, "feed") == before and in_maps(a) == maps
        with failing_commit(a):
            r = put(a, "feed", lines(*(f"198.18.12.{i}" for i in range(5, 45))))
            assert r.status_code == 507
            assert a.client.delete("/v1/sources/feed").status_code == 507
        assert held(a, "feed") == before and in_maps(a) == maps
        assert_agree(a)
    finally:
        a.store.close()


def test_the_service_interface(api: Api) -> None:
    """What the other integrations call (crowdsec, fail2ban, feeds)."""
    svc = api.svc
    spec = RuleSpec.parse(src="198.18.14.1")
    stored, created = svc.add(NewRule(spec, "ban", 60, source="crowdsec"))
    assert created and stored.source == "crowdsec"
    again, created = svc.add(NewRule(spec, "ban", 600, source="crowdsec"))
    assert not created and again.id == stored.id
    assert again.expires_at is not None and stored.expires_at is not None
    assert again.expires_at > stored.expires_at
    change = svc.replace_source("crowdsec", NewCodes(list_codes("198.18.14.2\n")))
    assert (change.added, change.removed, change.unchanged) == (1, 1, 0)
    change = svc.replace_source("feed", [NewRule(RuleSpec.parse(src="198.18.14.2"))])
    assert (change.added, change.removed, change.unchanged) == (1, 0, 0)
    assert [s.name for s in svc.sources()] == ["crowdsec", "feed"]
    assert svc.remove_where(src="198.18.14.2", source="crowdsec") == 1
    assert svc.drop_source("feed") == 1
    assert len(svc.dp.compiler) == 1  # the protected prefix only
    with pytest.raises(errors.SourceNotFound):
        svc.drop_source("feed")


# -- schema migration --------------------------------------------------------------------------

# The version-1 schema, as xdpfw 7db99c4 wrote it (api/store.py then).
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rules (
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
CREATE INDEX rules_expiry ON rules(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE interfaces (name TEXT PRIMARY KEY, mode TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO rules (action, mode, src, comment, created_at, expires_at)
    VALUES ('drop', 'enforce', '198.18.15.1/32', 'old one', 1700000000.5, NULL);
INSERT INTO rules (action, mode, src, proto, dport, comment, created_at, expires_at)
    VALUES ('drop', 'monitor', '198.18.15.0/24', 'udp', '53', 'ttl', 1700000001.5, 4000000000.0);
INSERT INTO interfaces VALUES ('eth0', 'auto');
"""


def v1_file(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    return path


def test_a_v1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = v1_file(tmp_path / "rules.sqlite3")
    a = _api(path)
    try:
        assert a.store.version() == SCHEMA_VERSION == 4
        rules = a.client.get("/v1/rules").json()["rules"]
        assert [(r["id"], r["src"], r["comment"], r["source"]) for r in rules] == [
            (1, "198.18.15.1/32", "old one", "api"), (2, "198.18.15.0/24", "ttl", "api")]
        assert rules[0]["expires_at"] is None and rules[1]["expires_at"].startswith("2096")
        assert len(a.dp.compiler) == 2  # reconcile put them in the maps
        assert [s["name"] for s in a.client.get("/v1/sources").json()] == ["api"]
        assert a.store.interfaces() == {"eth0": "auto"}
        rid = a.client.post("/v1/rules", json={"src": "198.18.15.2"}).json()["id"]
        assert rid == 3
    finally:
        a.store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(
        SCHEMA_VERSION)
    db.close()


def test_a_v2_database_gains_the_sampling_and_limit_tables(tmp_path: Path) -> None:
    """v2 (sources) -> v3 (X-ray's rule_sample, issue 16's rule_extras) -> v4: the rules
    stay."""
    path = tmp_path / "rules.sqlite3"
    s = Store(path)
    s.insert_codes([(1, RuleSpec.parse(src="198.18.16.1").code(), "kept", 1.0, None)], "feed")
    s.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE rule_sample; DROP TABLE rule_extras; PRAGMA user_version=2;"
                     " ALTER TABLE rules DROP COLUMN code;"
                     " UPDATE meta SET value='2' WHERE key='schema';")
    db.close()
    s = Store(path)
    try:
        assert s.version() == SCHEMA_VERSION == 4
        assert [(r.id, r.comment, r.source) for r in s.all()] == [(1, "kept", "feed")]
        tables = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master")}
        assert {"rule_sample", "rule_extras"} <= tables
    finally:
        s.close()


def test_a_v3_database_gains_the_codes_and_reads_them_back(tmp_path: Path) -> None:
    """v3 -> v4: every rule's code is parsed from its texts once, in the migration, and then
    read back as stored (limit and TCP-flag rules too); a row written without one is still
    read (parsed from its texts)."""
    path = tmp_path / "rules.sqlite3"
    specs = [RuleSpec.parse(src="198.18.17.1"), RuleSpec.parse(src="2001:db8:17::/48"),
             RuleSpec.parse(src="198.18.17.0/24", proto="tcp", dport="22", tcp_flags="syn"),
             RuleSpec.parse(action="limit", src="198.18.17.2", limit=Limit.parse(pps=50))]
    s = Store(path)
    s.insert([StoredRule(spec.with_id(i + 1), "", 1.0, None) for i, spec in enumerate(specs)])
    want = dict(s.codes())
    assert want == {i + 1: spec.code() for i, spec in enumerate(specs)}
    s.close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE rules DROP COLUMN code; PRAGMA user_version=3;"
                     " UPDATE meta SET value='3' WHERE key='schema';")
    db.close()
    s = Store(path)
    try:
        assert s.version() == SCHEMA_VERSION == 4
        assert [r[0] for r in s._db.execute("SELECT id FROM rules WHERE code IS NULL")] == []
        assert dict(s.codes()) == want
        assert s.limits() == {4: specs[3].limit}
        with s.transaction():  # a row without a code (a hand-made write)
            s._db.execute("UPDATE rules SET code=NULL WHERE id=2")
        assert dict(s.codes()) == want
    finally:
        s.close()


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from api import store as store_mod

    path = v1_file(tmp_path / "rules.sqlite3")

    def broken(db: sqlite3.Connection) -> None:
        store_mod._migrate_1_to_2(db)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setitem(store_mod._MIGRATIONS, 1, broken)
    with pytest.raises(errors.StorageFull):
        Store(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "holdings" not in tables
    assert db.execute("SELECT expires_at FROM rules WHERE id=2").fetchone()[0] == 4e9
    db.close()
    monkeypatch.undo()
    s = Store(path)  # and the real migration then works
    assert s.version() == SCHEMA_VERSION and len(s.all()) == 2
    s.close()


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=9")
    db.commit()
    db.close()
    with pytest.raises(errors.StorageError) as exc:
        Store(path)
    assert "schema version 9" in str(exc.value) and "newer xdpfw" in str(exc.value)
    assert not isinstance(exc.value, errors.DatabaseCorrupt)


def test_put_bodies_have_the_bulk_limits(api: Api) -> None:
    from collections.abc import Iterator as It

    from tests.test_api_pure import _limited

    c = _limited(api, max_body_bytes=4096, max_bulk_bytes=100_000, max_bulk_json_bytes=8192)

    def chunked(n: int) -> It[bytes]:  # no Content-Length: counted as it streams
        for i in range(n):
            yield f"198.18.{i // 250}.{i % 250 + 1}\n".encode()

    r = c.put("/v1/sources/feed", content=chunked(20_000), headers=PLAIN)
    assert r.status_code == 413 and r.json()["setting"] == "XDPFW_MAX_BULK_BYTES", r.text
    # a declared 2 GB body is refused before one byte of it is read
    r = c.put("/v1/sources/feed", content=b"198.18.1.1\n",
              headers={**PLAIN, "content-length": str(2 << 30)})
    assert r.status_code == 413
    r = c.put("/v1/sources/feed", json=[{"src": f"198.18.9.{i % 250 + 1}"} for i in range(500)])
    assert r.status_code == 413 and r.json()["setting"] == "XDPFW_MAX_BULK_JSON_BYTES"
    r = c.put("/v1/sources/feed", content=chunked(2_000), headers=PLAIN)
    assert r.status_code == 200 and r.json()["added"] == 2_000, r.text
    # a source name is not a path into anything else: /v1/sources/x/y is no route
    assert c.put("/v1/sources/feed/x", content=b"198.18.1.1\n", headers=PLAIN
                 ).status_code in (404, 405)
