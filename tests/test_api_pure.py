"""The REST API below e2e: the real app, service and SQLite store over an in-memory datapath.

No root, no bcc: tests/fakes.py stands in for the kernel side (its plans are the real
compiler's). What tests/test_e2e_api.py proves with a server process and packets, these prove
for the API's own logic: auth, the error table, adds, bulk loads, TTLs, reconcile, protection.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import STATUS
from api.ports import DatapathPort
from api.service import PROTECT_BASE, FirewallService, NewRule
from api.settings import Settings
from api.store import Store
from tests.fakes import FakeDatapath
from tests.test_e2e_api import BAD_RULES
from xdpfw import errors, importers
from xdpfw.rules import RuleSpec

pytestmark = pytest.mark.pure

TOKEN = "s3cret-token"
PROTECTED = "198.18.255.0/24"


@dataclass
class Api:
    client: TestClient  # sends the token
    anon: TestClient  # sends none
    svc: FirewallService
    dp: FakeDatapath
    store: Store


def _api(
    db: Path,
    dp: FakeDatapath | None = None,
    *,
    listen: str = "127.0.0.1:8000",
    protect: tuple[str, ...] = (),
) -> Api:
    dp = dp or FakeDatapath()
    port: DatapathPort = dp  # the stand-in implements the service's datapath surface
    store = Store(db)
    svc = FirewallService(port, store, protect)
    svc.reconcile()
    app = create_app(Settings(listen=listen, state_dir=db.parent), svc, TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    return Api(TestClient(app, headers=auth), TestClient(app), svc, dp, store)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = _api(tmp_path / "rules.sqlite3", protect=(PROTECTED,))
    yield a
    a.store.close()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Api]:
    """No protected prefix (as the e2e server runs)."""
    a = _api(tmp_path / "rules.sqlite3")
    yield a
    a.store.close()


def _text(c: TestClient, body: str | bytes, **params: Any) -> Any:
    return c.post(
        "/v1/rules/bulk", content=body, params=params, headers={"content-type": "text/plain"}
    )


def _msg(r: Any) -> str:
    assert r.status_code == 422, r.text
    return str(r.json()["errors"][0]["msg"])


# -- auth --------------------------------------------------------------------------------------


def _writes(rid: int) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("POST", "/v1/rules", {"json": {"src": "198.18.201.2"}}),
        ("DELETE", f"/v1/rules/{rid}", {}),
        ("POST", "/v1/rules/bulk", {"json": [{"src": "198.18.201.3"}]}),
        ("POST", "/v1/interfaces", {"json": {"name": "eth0"}}),
        ("DELETE", "/v1/interfaces/eth0", {}),
    ]


READS = ["/v1/rules", "/v1/stats", "/metrics", "/v1/interfaces"]


def test_writes_need_the_token_reads_are_open_on_loopback(api: Api) -> None:
    rid = api.client.post("/v1/rules", json={"src": "198.18.201.1"}).json()["id"]
    wrong = TestClient(api.client.app, headers={"Authorization": "Bearer wrong"})
    for method, path, kw in _writes(rid):
        r = api.anon.request(method, path, **kw)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in r.json()["detail"]
        assert wrong.request(method, path, **kw).status_code == 403, path
    assert [r["id"] for r in api.client.get("/v1/rules").json()["rules"]] == [rid]
    for path in [*READS, f"/v1/rules/{rid}"]:
        assert api.anon.get(path).status_code == 200, path
    assert api.anon.get("/healthz").status_code in (200, 503)


def test_reads_need_the_token_off_loopback(tmp_path: Path) -> None:
    a = _api(tmp_path / "db", listen="0.0.0.0:8000")
    wrong = TestClient(a.client.app, headers={"Authorization": "Bearer wrong"})
    for path in READS:
        assert a.anon.get(path).status_code == 401, path
        assert wrong.get(path).status_code == 403, path
        assert a.client.get(path).status_code == 200, path
    assert a.anon.get("/healthz").status_code == 503  # no token needed; nothing attached
    doc = a.client.get("/openapi.json").json()
    assert doc["paths"]["/v1/rules"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    a.store.close()


# -- the error table ---------------------------------------------------------------------------

ERROR_CASES: list[tuple[errors.XdpfwError, int, dict[str, Any]]] = [
    (errors.InvalidRule("src", "bad"), 422,
     {"errors": [{"loc": ["body", "src"], "msg": "bad", "type": "value_error"}]}),
    (errors.InvalidRule("body", "bad body"), 422,
     {"errors": [{"loc": ["body"], "msg": "bad body", "type": "value_error"}]}),
    (errors.RuleNotFound(7), 404, {"detail": "no rule with id 7", "error": "RuleNotFound"}),
    (errors.SourceNotFound("feed"), 404, {"error": "SourceNotFound"}),  # issue 13: sources
    (errors.InterfaceNotFound("eth9"), 404,
     {"detail": "eth9: no such network interface", "error": "InterfaceNotFound"}),
    (errors.RuleConflict("clash", existing_id=3), 409,
     {"detail": "clash", "error": "RuleConflict", "existing_id": 3}),
    (errors.RuleConflict("clash"), 409, {"detail": "clash", "error": "RuleConflict"}),
    (errors.CapacityExceeded("xdpfw_src4", 10), 507,
     {"detail": "xdpfw_src4 is full (limit 10)", "error": "CapacityExceeded", "limit": 10}),
    (errors.StorageFull("disk full", "/s/rules.sqlite3"), 507,
     {"detail": "disk full", "error": "StorageFull"}),
    (errors.DatabaseCorrupt("garbage", "/s/rules.sqlite3"), 503,
     {"detail": "garbage", "error": "DatabaseCorrupt"}),
    (errors.StorageError("sqlite failed"), 503,
     {"detail": "sqlite failed", "error": "StorageError"}),
    (errors.KernelError("map update", 28, "No space left"), 500,
     {"detail": "map update: No space left (errno 28)", "error": "KernelError", "errno": 28}),
    (errors.HeadersMissing("no headers"), 503, {"detail": "no headers", "error": "HeadersMissing"}),
    (errors.CompileError("no compile"), 503, {"detail": "no compile", "error": "CompileError"}),
    (errors.AbiMismatch("abi 1"), 503, {"detail": "abi 1", "error": "AbiMismatch"}),
    (errors.ForeignProgram("eth0", 99, "other"), 409, {"error": "ForeignProgram"}),
    (errors.DatapathError("broken"), 503, {"detail": "broken", "error": "DatapathError"}),
    (errors.XdpfwError("odd"), 500, {"detail": "odd", "error": "XdpfwError"}),
]


def test_every_domain_error_has_a_case() -> None:
    classes = {
        obj for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.XdpfwError)
    }
    assert classes == {type(exc) for exc, _, _ in ERROR_CASES} == {c for c, _ in STATUS} | {
        errors.HeadersMissing, errors.CompileError, errors.AbiMismatch
    }


@pytest.mark.parametrize(("exc", "status", "body"), ERROR_CASES, ids=lambda v: repr(v)[:40])
def test_error_table(api: Api, exc: errors.XdpfwError, status: int, body: dict[str, Any]) -> None:
    api.dp.fail_next = exc  # the maps refuse the change
    r = api.client.post("/v1/rules", json={"src": "198.18.7.1"})
    assert r.status_code == status, r.text
    got = r.json()
    assert {k: got[k] for k in body} == body
    if isinstance(exc, errors.KernelError):
        assert "retrying is safe" in got["hint"]
    if isinstance(exc, errors.ForeignProgram):
        assert "program id 99 (other)" in got["detail"]
    # the database rolled back with the maps: nothing was added anywhere
    assert api.client.get("/v1/rules").json()["rules"] == []
    assert len(api.dp.compiler) == 1  # the protected prefix only
    assert api.client.post("/v1/rules", json={"src": "198.18.7.1"}).status_code == 201


def test_real_errors_of_each_kind(api: Api) -> None:
    c = api.client
    assert c.get("/v1/rules/12345").json()["error"] == "RuleNotFound"
    assert c.delete("/v1/rules/12345").status_code == 404
    assert c.get("/v1/rules?limit=0").status_code == 422
    assert c.post("/v1/interfaces", json={"name": "nosuch0"}).status_code == 404
    api.dp.foreign["eth1"] = 77
    r = c.post("/v1/interfaces", json={"name": "eth1"})
    assert r.status_code == 409 and r.json()["error"] == "ForeignProgram"
    r = c.post("/v1/rules", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = c.put("/v1/rules")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, POST"


# -- single adds -------------------------------------------------------------------------------


def test_add_get_delete_and_duplicates(api: Api) -> None:
    c = api.client
    r = c.post("/v1/rules", json={"src": "198.18.7.9", "comment": "pure"})
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["src"] == "198.18.7.9/32" and rule["dport"] is None
    assert rule["created_at"].endswith("Z") and rule["expires_at"] is None
    assert rule["comment"] == "pure" and rule["action"] == "drop" and rule["mode"] == "enforce"
    again = c.post("/v1/rules", json={"src": "198.18.7.9/32", "comment": "again"})
    assert again.status_code == 200 and again.json() == rule
    assert len(c.get("/v1/rules").json()["rules"]) == 1
    api.dp.hit(rule["id"], 20, 2000)
    one = c.get(f"/v1/rules/{rule['id']}").json()
    assert one["counters"]["packets"] == 20 and one["counters"]["bytes"] == 2000
    assert one["counters"]["last_hit"] is not None
    r = c.post("/v1/rules", json={"src": "2001:db8::1", "proto": "udp", "dport": "9000-9100"})
    assert r.status_code == 201 and r.json()["dport"] == "9000-9100"
    assert c.delete(f"/v1/rules/{rule['id']}").status_code == 204
    assert c.get(f"/v1/rules/{rule['id']}").status_code == 404
    assert rule["id"] not in api.dp.compiler.rules


def test_validation_names_the_field(api: Api) -> None:
    for body, field in BAD_RULES:
        r = api.client.post("/v1/rules", json=body)
        assert r.status_code == 422, (body, r.text)
        locs = [d["loc"] for d in r.json()["errors"]]
        assert any(field in loc for loc in locs), (body, r.json())
    assert api.client.get("/v1/rules").json()["rules"] == []


def test_pagination(api: Api) -> None:
    c = api.client
    _text(c, "\n".join(f"198.18.20.{i}" for i in range(1, 26)))
    seen: list[int] = []
    cursor = None
    while True:
        page = c.get("/v1/rules", params={"limit": 10, **({"cursor": cursor} if cursor else {})})
        seen += [r["id"] for r in page.json()["rules"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 25 and seen == sorted(seen)


# -- bulk adds ---------------------------------------------------------------------------------


def test_bulk_text_and_json_all_or_nothing(plain: Api) -> None:
    c = plain.client
    body = "# blocklist\n198.18.10.0/24 ; SBL1\n\n198.18.11.5  # a host\n2001:db8:10::/48\n"
    r = _text(c, body, comment="list", ttl_seconds=3600)
    assert r.status_code == 201, r.text
    assert r.json()["added"] == 3 and r.json()["duplicates"] == 0
    rules = c.get("/v1/rules").json()["rules"]
    assert {x["src"] for x in rules} == {"198.18.10.0/24", "198.18.11.5/32", "2001:db8:10::/48"}
    assert all(x["comment"] == "list" and x["expires_at"] for x in rules)
    assert r.json()["ids"] == [x["id"] for x in rules]

    msg = _msg(_text(c, "198.18.12.1\nnope\n198.18.12.2\n198.18.12.3/16\n"))
    assert "2 invalid line(s): 2, 4 --" in msg and "line 2" in msg and "line 4" in msg
    assert "did you mean 198.18.0.0/16" in msg
    assert len(c.get("/v1/rules").json()["rules"]) == 3

    r = c.post("/v1/rules/bulk", json=[{"src": "198.18.13.1"}, {"dport": 5}])
    assert "element 1" in _msg(r)
    r = c.post("/v1/rules/bulk", json=[
        {"src": "198.18.13.1"}, {"proto": "udp", "dport": "53"}, {"src": "198.18.10.0/24"}])
    assert r.status_code == 201, r.text
    assert r.json()["added"] == 2 and r.json()["duplicates"] == 1
    assert r.json()["duplicate_ids"] == [rules[0]["id"]]
    assert len(c.get("/v1/rules").json()["rules"]) == 5
    assert "JSON array" in _msg(c.post("/v1/rules/bulk", json=[]))
    assert "not JSON" in _msg(c.post("/v1/rules/bulk", content=b"[",
                                     headers={"content-type": "application/json"}))


def test_bulk_text_duplicates_modes_and_bad_bodies(api: Api) -> None:
    c = api.client
    first = c.post("/v1/rules", json={"src": "198.18.30.1"}).json()
    r = _text(c, "198.18.30.1\n198.18.30.2\n198.18.30.2/32\n", mode="monitor")
    assert r.status_code == 201, r.text
    # a monitor rule is not the enforce rule: both new; the in-body repeat is a duplicate
    assert r.json()["added"] == 2 and r.json()["duplicate_ids"] == [r.json()["ids"][1]]
    r = _text(c, "198.18.30.1\n")
    assert r.json() == {"added": 0, "duplicates": 1, "ids": [], "duplicate_ids": [first["id"]],
                        "overlaps": [], "overlap_count": 0}
    r = _text(c, "198.18.31.1\n", action="allow")
    assert r.status_code == 201 and c.get(f"/v1/rules/{r.json()['ids'][0]}").json()["action"] \
        == "allow"
    msg = _msg(_text(c, "198.18.32.1\nbad\n198.18.32.2\n", action="allow", mode="monitor"))
    assert "3 invalid line(s): 1, 2, 3 --" in msg and "monitor applies to drop rules" in msg
    assert "no addresses" in _msg(_text(c, "# only a comment\n\n"))
    assert "not UTF-8" in _msg(_text(c, b"198.18.33.1\n\xff\n"))
    # Spamhaus DROP JSON lines load as they do with the CLI
    r = _text(c, '{"cidr": "198.18.34.0/24", "sblid": "SBL1"}\n{"type": "metadata"}\n')
    assert r.status_code == 201 and r.json()["added"] == 1


SEPARATORS = "198.18.40.1\r\n198.18.40.2\x0b\nbad1\n198.18.40.3\u2028198.18.40.4\nbad2\x1c\n" \
    "\x85\n198.18.40.5\x0c\nbad3\r\n\u2029\n198.18.40.6\n"


def test_line_numbers_match_the_cli_parser(api: Api) -> None:
    """Only "\\n" ends a line, on both sides: \\r, \\v, \\f, \\x1c, \\x85, \\u2028, \\u2029
    inside a line do not shift the numbers (str.splitlines would)."""
    cli = importers.parse_blocklist(importers.lines_of(SEPARATORS))
    want = [r.lineno for r in cli.rejected]
    assert want == [3, 4, 5, 8]
    msg = _msg(_text(api.client, SEPARATORS))
    assert f"{len(want)} invalid line(s): {', '.join(map(str, want))} --" in msg
    for r in cli.rejected:
        assert f"line {r.lineno}: {r.reason}" in msg
    # str.splitlines (the route's old split) puts the "bad" lines elsewhere
    split = [n for n, line in enumerate(SEPARATORS.splitlines(), 1) if "bad" in line]
    assert split != [3, 5, 8]
    good = "".join(line + "\n" for line in importers.lines_of(SEPARATORS)
                   if "bad" not in line and "\u2028" not in line)
    r = _text(api.client, good)
    assert r.status_code == 201, r.text
    cli_good = importers.parse_blocklist(importers.lines_of(good))
    assert {x["src"] for x in api.client.get("/v1/rules").json()["rules"]} == {
        e.cidr for e in cli_good.entries
    } and len(cli_good.entries) == 4


# -- TTL ---------------------------------------------------------------------------------------


def test_ttl_expiry(api: Api) -> None:
    c = api.client
    r = c.post("/v1/rules", json={"src": "198.18.50.1", "ttl_seconds": 60})
    keep = c.post("/v1/rules", json={"src": "198.18.50.2"}).json()
    rid = r.json()["id"]
    assert r.json()["expires_at"] is not None
    assert api.svc.expire_due() == []
    assert api.svc.expire_due(now=time.time() + 61) == [rid]
    assert c.get(f"/v1/rules/{rid}").status_code == 404
    assert rid not in api.dp.compiler.rules and keep["id"] in api.dp.compiler.rules
    # the sweeper thread does the same on its own
    rid = c.post("/v1/rules", json={"src": "198.18.50.3", "ttl_seconds": 1}).json()["id"]
    api.svc.start_sweeper(0.05)
    try:
        deadline = time.monotonic() + 5
        while c.get(f"/v1/rules/{rid}").status_code != 404:
            assert time.monotonic() < deadline, "TTL rule was not removed"
            time.sleep(0.05)
    finally:
        api.svc.stop()
    assert rid not in api.dp.compiler.rules


# -- reconcile at start ------------------------------------------------------------------------


def _rules(*srcs: str, base: int = 1) -> list[Any]:
    return [RuleSpec.parse(src=s).with_id(base + i) for i, s in enumerate(srcs)]


def test_reconcile_adopts_the_maps_when_the_database_is_new(tmp_path: Path) -> None:
    dp = FakeDatapath(adopted=True)
    dp.add_rules(_rules("198.18.60.1", "198.18.60.0/24", "2001:db8:60::/48", base=10))
    before = dp.changes
    svc = FirewallService(dp, Store(tmp_path / "db"), (PROTECTED,))
    assert svc.reconcile() == {"adopted": 3, "added": 0, "removed": 0}
    assert dp.changes == before + 1  # only the protected prefix was written
    stored = svc.store.all()
    assert [s.rule for s in stored] == [r for r in dp.rules() if r.id < PROTECT_BASE]
    assert {s.comment for s in stored} == {"adopted from pinned maps"}
    svc.store.close()


def test_reconcile_removes_stale_adds_missing_keeps_agreeing(tmp_path: Path) -> None:
    db = tmp_path / "db"
    dp = FakeDatapath()
    a = _api(db, dp, protect=(PROTECTED,))
    ids = a.client.post("/v1/rules/bulk", json=[{"src": f"198.18.70.{i}"} for i in range(1, 6)]
                        ).json()["ids"]
    a.store.close()
    # restart with the maps as they are: nothing is touched
    before = dp.changes
    svc = FirewallService(dp, Store(db), (PROTECTED,))
    assert svc.reconcile() == {"adopted": 0, "added": 0, "removed": 0}
    assert dp.changes == before
    svc.store.close()
    # drift: a rule only in the maps, one only in the database, one changed
    dp.add_rules(_rules("198.18.71.1", base=900_000))
    dp.remove_rules([ids[0]])
    dp.remove_rules([ids[1]])
    dp.add_rules(_rules("198.18.72.1", base=ids[1]))
    kept = {rid: dp.compiler.rules[rid] for rid in ids[2:]}
    svc = FirewallService(dp, Store(db), (PROTECTED,))
    assert svc.reconcile() == {"adopted": 0, "added": 2, "removed": 2}
    assert {r.id: r for r in dp.rules()} == {
        **{s.id: s.rule for s in svc.store.all()},
        PROTECT_BASE: svc.protected[0],
    }
    assert all(dp.compiler.rules[rid] == r for rid, r in kept.items())
    svc.store.close()
    # an old (not new: reconciled once) database that is empty wins over the maps: no adoption
    first = FirewallService(FakeDatapath(), Store(tmp_path / "empty"), (PROTECTED,))
    first.reconcile()
    first.store.close()
    svc = FirewallService(dp, Store(tmp_path / "empty"), (PROTECTED,))
    assert svc.reconcile() == {"adopted": 0, "added": 0, "removed": 5}
    assert [r.id for r in dp.rules()] == [PROTECT_BASE]
    svc.store.close()


def test_reconcile_replaces_changed_protected_prefixes(tmp_path: Path) -> None:
    dp = FakeDatapath()
    svc = FirewallService(dp, Store(tmp_path / "db"), ("198.18.80.0/24",))
    svc.reconcile()
    rid = svc.add(NewRule(RuleSpec.parse(action="allow", src="198.18.81.0/24")))[0].id
    svc.store.close()
    # the same allow rule is now a protected prefix: the protected one replaces it
    svc = FirewallService(dp, Store(tmp_path / "db"), ("198.18.81.0/24",))
    svc.reconcile()
    assert [(r.id, str(r.src)) for r in dp.rules()] == [(PROTECT_BASE, "198.18.81.0/24")]
    assert svc.store.get(rid) is None
    svc.store.close()


# -- protected prefixes ------------------------------------------------------------------------


def test_protected_prefixes(api: Api) -> None:
    c = api.client
    r = c.post("/v1/rules", json={"src": "198.18.0.0/16"})
    assert r.status_code == 409 and "protected prefix 198.18.255.0/24" in r.json()["detail"]
    assert "force" in r.json()["detail"]
    r = c.post("/v1/rules", json={"proto": "tcp", "dport": 22})
    assert r.status_code == 409 and "matches every source" in r.json()["detail"]
    assert c.post("/v1/rules", json={"src": "198.18.255.7", "mode": "monitor"}).status_code == 201
    # a dst drop names no source: it drops the protected ones too (issue 20, item 11)
    r = c.post("/v1/rules", json={"dst": "198.18.255.7"})
    assert r.status_code == 409 and "names no source" in r.json()["detail"]
    assert c.post("/v1/rules", json={"dst": "198.18.255.7", "force": True}).status_code == 201
    assert c.post("/v1/rules", json={"src": "198.18.254.0/24"}).status_code == 201
    r = c.post("/v1/rules", json={"src": "198.18.0.0/16", "force": True})
    assert r.status_code == 201, r.text
    r = c.post("/v1/rules", json={"action": "allow", "src": PROTECTED})
    assert r.status_code == 409 and "is a protected prefix" in r.json()["detail"]
    # bulk: all or nothing, unless forced
    assert _text(c, "198.18.90.1\n198.18.255.9\n").status_code == 409
    assert c.get("/v1/rules").json()["rules"].__len__() == 4
    assert _text(c, "198.18.90.1\n198.18.255.9\n", force="true").status_code == 201
    # invisible in listings, visible in health, not deletable
    listed = c.get("/v1/rules?limit=10000").json()["rules"]
    assert len(listed) == 6 and all(x["id"] < PROTECT_BASE for x in listed)
    assert PROTECT_BASE in api.dp.compiler.rules
    assert c.get(f"/v1/rules/{PROTECT_BASE}").status_code == 404
    assert c.delete(f"/v1/rules/{PROTECT_BASE}").status_code == 404
    health = c.get("/healthz").json()
    assert health["protected"] == [PROTECTED] and health["rules"] == 6
    assert health["capacity"]["rules"] == {"entries": 7, "capacity": 8192}


# -- health, interfaces, stats -----------------------------------------------------------------


def test_health_and_interfaces(api: Api) -> None:
    c = api.client
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert r.json()["prog_id"] == 4242 and r.json()["adopted"] is False
    r = c.post("/v1/interfaces", json={"name": "eth0", "mode": "generic"})
    assert r.status_code == 201 and r.json() == {
        "name": "eth0", "attached": True, "mode": "generic", "prog_id": 4242, "ifindex": 2}
    health = c.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [i["name"] for i in health.json()["interfaces"]] == ["eth0"]
    api.dp.attached.clear()  # the interface lost the program behind our back
    assert c.get("/healthz").status_code == 503
    assert c.get("/v1/interfaces").json() == [
        {"name": "eth0", "attached": False, "mode": "generic", "prog_id": 0, "ifindex": 0}]
    assert c.delete("/v1/interfaces/eth0").status_code == 204
    assert c.delete("/v1/interfaces/eth0").status_code == 404
    assert c.get("/v1/interfaces").json() == []


def test_stats_and_metrics(api: Api) -> None:
    c = api.client
    ids = c.post("/v1/rules/bulk", json=[{"src": f"198.18.100.{i}"} for i in range(1, 5)]
                 ).json()["ids"]
    api.dp.hit(ids[2], 30, 3000)
    api.dp.hit(ids[0], 30, 1000)
    api.dp.hit(ids[3], 5, 500)
    stats = c.get("/v1/stats").json()
    assert [r["id"] for r in stats["rules"]] == [ids[0], ids[2], ids[3], ids[1], PROTECT_BASE]
    assert stats["totals"]["packets"] == 0
    top = c.get("/v1/stats?top=2").json()["rules"]
    assert [(r["id"], r["packets"], r["bytes"]) for r in top] == [
        (ids[0], 30, 1000), (ids[2], 30, 3000)]
    text = c.get("/metrics").text
    assert f'xdpfw_rule_packets_total{{rule_id="{ids[2]}"}} 30.0' in text
    assert f'xdpfw_rule_bytes_total{{rule_id="{ids[3]}"}} 500.0' in text
    assert 'xdpfw_table_entries{table="rules"} 5.0' in text
    assert 'xdpfw_table_capacity{table="rules"} 8192.0' in text
    assert 'xdpfw_frames_total{verdict="drop"} 0.0' in text


# -- bounded inputs (docs/guarantees.md "Bounded inputs"; e2e: tests/test_limits.py) ------------


def _limited(a: Api, **limits: int) -> TestClient:
    settings = Settings(listen="127.0.0.1:8000", state_dir=a.store.path.parent, **limits)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    return TestClient(create_app(settings, a.svc, TOKEN), headers=auth)


def test_writes_without_the_token_are_refused_before_the_body_is_read(api: Api) -> None:
    """FastAPI reads (and parses) a route's body before its dependencies run: the token is
    checked by api/limits.py first, so not one chunk of an anonymous body is pulled."""
    import anyio

    app = api.client.app

    async def call(token: str | None) -> tuple[int, int]:
        pulled = 0
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal pulled
            pulled += 1
            return {"type": "http.request", "body": b'{"src": "198.18.202.1"}', "more_body":
                    pulled < 5000}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        auth = [(b"authorization", f"Bearer {token}".encode())] if token else []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/rules", "raw_path": b"/v1/rules",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8000),
                 "headers": [(b"content-type", b"application/json"), *auth]}
        await app(scope, receive, send)  # type: ignore[arg-type]
        return status, pulled

    assert anyio.run(call, None) == (401, 0)
    assert anyio.run(call, "wrong") == (403, 0)
    status, pulled = anyio.run(call, TOKEN)  # with the token the body is read (and too big)
    assert status == 413 and pulled > 1


def test_bodies_above_their_limit_answer_413_naming_the_setting(api: Api) -> None:
    c = _limited(api, max_body_bytes=4096, max_bulk_bytes=100_000, max_bulk_json_bytes=8192)
    r = c.post("/v1/rules", content=b'{"src": "198.18.203.1", "comment": "' + b"x" * 5000 + b'"}',
               headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["limit"] == 4096 and r.json()["setting"] == "XDPFW_MAX_BODY_BYTES"
    assert "4096 bytes" in r.json()["detail"]

    def chunked(n: int) -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for i in range(n):
            yield f"198.18.{i // 250}.{i % 250 + 1}\n".encode()

    r = c.post("/v1/rules/bulk", content=chunked(20_000), headers={"content-type": "text/plain"})
    assert r.status_code == 413 and r.json()["setting"] == "XDPFW_MAX_BULK_BYTES", r.text
    r = c.post("/v1/rules/bulk", content=chunked(2_000), headers={"content-type": "text/plain"})
    assert r.status_code == 201 and r.json()["added"] == 2_000, r.text
    big = [{"src": f"198.18.204.{i % 250 + 1}"} for i in range(500)]
    r = c.post("/v1/rules/bulk", json=big)
    assert r.status_code == 413 and r.json()["setting"] == "XDPFW_MAX_BULK_JSON_BYTES"
    assert "text/plain" in r.json()["hint"]
    assert api.store.count() == 2_000  # the refused bodies added nothing


def test_text_bulk_parsed_in_pieces_is_parsed_as_one_text() -> None:
    """ListReader (the route's streaming parser) = list_codes, however the bytes are split."""
    text = ("# FireHOL list\n198.18.0.1\r\n2001:db8::/32 ; x\n\n10.0.0.0/8\n" * 50
            + "\ufeffé 198.18.0.9/33\nbad\n198.18.0.7")
    raw = text.encode()
    for size in (1, 2, 3, 7, 64, len(raw)):
        reader = importers.ListReader()
        for i in range(0, len(raw), size):
            reader.feed(raw[i : i + size])
        with pytest.raises(errors.InvalidRule) as got:
            reader.finish()
        with pytest.raises(errors.InvalidRule) as want:
            importers.list_codes(text)
        assert str(got.value) == str(want.value)
    good = "198.18.0.1\n\n10.0.0.0/8 # x\n198.18.0.2"
    reader = importers.ListReader(mode="monitor")
    for ch in good.encode():
        reader.feed(bytes([ch]))
    assert reader.finish() == importers.list_codes(good, mode="monitor")
    reader = importers.ListReader()
    with pytest.raises(errors.InvalidRule, match="not UTF-8 text: line 3"):
        reader.feed(b"198.18.0.1\n198.18.0.2\n198.18\xff.0.3\n")


def test_422_names_at_most_100_bad_lines_and_never_echoes_megabytes(api: Api) -> None:
    c = api.client
    body = "".join(f"bad-{i}-{'y' * 30}\n" for i in range(5_000)) + "z" * 1_000_000 + "\n"
    r = _text(c, body)
    assert r.status_code == 422 and len(r.content) < 20_000, len(r.content)
    msg = _msg(r)
    assert msg.startswith("nothing added; 5001 invalid line(s): 1, 2, 3,")
    assert "line 100: " in msg and "line 101:" not in msg and "4901 more" in msg
    # FastAPI's own validation errors: each echoed value cut, at most 100 errors listed
    r = c.post("/v1/rules", json={"src": "198.18.205.1", "comment": "c" * 60_000})
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)
    assert r.json()["errors"][0]["input"].startswith("ccc")
    r = _limited(api, max_body_bytes=10_000_000).post(
        "/v1/rules", json={f"k{i}" + "x" * 1000: i for i in range(300)})
    assert r.status_code == 422 and len(r.content) < 60_000, len(r.content)
    detail = r.json()["errors"]
    assert len(detail) == 101 and detail[-1]["type"] == "too_many_errors"
    assert detail[-1]["msg"].startswith("300 errors in all")


def test_deep_json_and_lone_surrogates_answer_422_not_500(api: Api) -> None:
    c = api.client
    deep = "[" * 5000 + "]" * 5000
    r = c.post("/v1/rules/bulk", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "nested too deeply" in _msg(r), r.text
    for path, body in [
        ("/v1/rules", '{"src": "198.18.206.1", "comment": "\\ud800"}'),
        ("/v1/rules", '{"src": "198.18.206.1", "comment": "\\ud800' + "x" * 300 + '"}'),
        ("/v1/rules/bulk", '[{"src": "198.18.206.1", "comment": "\\udfff"}]'),
        ("/v1/rules/bulk", '[{"src": "198.18.206.1", "\\ud800": 1}]'),
    ]:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, body[:60], r.text)
        assert r.headers["content-type"] == "application/problem+json"
        text = r.text
        assert "unicode" in text or "\\\\ud800" in text or "\\\\udfff" in text, text
    assert c.get("/v1/rules").json()["rules"] == []
