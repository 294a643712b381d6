"""The fleet agent and routes over the real service, app and SQLite store (the stand-in
datapath), against a real 1-member etcd 3.4 on loopback (no root needed). The same through
the kernel, real server processes and a 3-member cluster with faults: tests/test_fleet.py.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.fleet import state
from api.fleet.agent import FleetAgent, FleetConfig, cached_protected
from api.fleet.etcd import EtcdClient, prefix_end
from api.fleet.state import Desired, Layout, chunk_body, decode_source, encode_chunks
from api.lookup import lookup
from api.service import API_RULE_ID, PROTECT_BASE, FirewallService, NewRule
from api.settings import Settings
from api.store import Store
from tests.etcd_cluster import Cluster, etcd_cluster
from tests.fakes import FakeDatapath
from tests.server import free_port
from tests.test_api_pure import TOKEN
from xdpfw.errors import InvalidRule, RuleConflict
from xdpfw.rules import Action, RuleSpec

pytestmark = pytest.mark.pure

PLAIN = {"content-type": "text/plain"}


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd1"), 1) as c:
        yield c


@dataclass
class Node:
    client: TestClient
    svc: FirewallService
    dp: FakeDatapath
    store: Store
    agent: FleetAgent

    def held(self, source: str) -> set[str]:
        r = self.client.get("/v1/rules", params={"source": source, "limit": 10_000})
        return {x["src"] for x in r.json()["rules"]}

    def ids(self, source: str) -> dict[str, int]:
        r = self.client.get("/v1/rules", params={"source": source, "limit": 10_000})
        return {x["src"]: x["id"] for x in r.json()["rules"]}


def make_node(db: Path, endpoints: list[str], prefix: str, name: str,
              start: bool = True, labels: dict[str, str] | None = None,
              protect: tuple[str, ...] = ()) -> Node:
    dp = FakeDatapath()
    store = Store(db)
    # as `xdpfw serve --etcd` does: the cached fleet protected prefixes before the reconcile
    svc = FirewallService(dp, store, protect, fleet_protect=cached_protected(store))
    svc.reconcile()
    agent = FleetAgent(
        FleetConfig(endpoints, name, prefix, labels or {"zone": "z1"}, heartbeat=0.3), svc
    )
    if start:
        agent.start()
    app = create_app(Settings(state_dir=db.parent), svc, TOKEN, fleet=agent)
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    return Node(client, svc, dp, store, agent)


@pytest.fixture
def nodes(tmp_path: Path, etcd1: Cluster) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []
    prefix = f"/t{time.monotonic_ns()}"

    def make(name: str, labels: dict[str, str] | None = None,
             protect: tuple[str, ...] = ()) -> Node:
        n = make_node(tmp_path / f"{name}.sqlite3", etcd1.urls, prefix, name, labels=labels,
                      protect=protect)
        made.append(n)
        return n

    yield make
    for n in made:
        n.agent.stop()
        n.store.close()


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached in {timeout}s"
        time.sleep(0.02)


# -- the codec, no store -------------------------------------------------------------------------


def test_chunks_round_trip_and_stay_under_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "CHUNK_BYTES", 4096)
    codes = [(7 << 100) + i for i in range(2000)]
    parts = encode_chunks(codes, None, None)
    assert len(parts) > 10 and all(len(zlib.decompress(p)) <= 4096 + 200 for p in parts)
    back = [c for p in parts for c in chunk_body(p)["codes"]]
    assert back == codes
    assert chunk_body(encode_chunks([], None, None)[0]) == {"codes": []}
    assert chunk_body(b'{"codes":[5]}') == {"codes": [5]}  # as written before compression


def test_layout_and_decode() -> None:
    L = Layout("/x")
    assert L.source_of(L.manifest("fw")) == "fw"
    assert L.source_of(L.rule("api", 255)) == "api"
    assert L.source_of(L.node("n1")) is None
    from api.fleet.etcd import KV

    m = KV(L.manifest("s"), json.dumps({"gen": "g", "chunks": 1, "comment": "c",
                                        "expires_at": None}).encode(), 5, 5, 1)
    ch = KV(L.chunk("s", "g", 0), b'{"codes":[1,2,3]}', 5, 5, 1)
    d = decode_source("s", m, [ch], [])
    assert isinstance(d, Desired) and d.codes == [1, 2, 3] and d.uniform == ("c", None)
    r = KV(L.rule("s", 4), json.dumps({"comment": "one", "expires_at": time.time() + 30}
                                      ).encode(), 6, 6, 1)
    gone = KV(L.rule("s", 5), json.dumps({"comment": "old", "expires_at": 1.0}).encode(),
              6, 6, 1)
    d = decode_source("s", m, [ch], [r, gone])
    assert d is not None and d.codes == [1, 2, 3, 4] and d.uniform is None
    assert d.comments[3] == "one" and 29 <= (d.ttls[3] or 0) <= 31
    assert decode_source("s", None, [], []) is None
    with pytest.raises(ValueError, match="chunk"):
        decode_source("s", m, [], [])


def test_settings() -> None:
    s = Settings(etcd="http://a:2379, https://b:2379", node="edge-1",  # type: ignore[arg-type]
                 node_labels="rack=r1,zone=eu")  # type: ignore[arg-type]
    assert s.etcd == ["http://a:2379", "https://b:2379"]
    assert s.node_labels == {"rack": "r1", "zone": "eu"}
    with pytest.raises(ValueError, match="http://"):
        Settings(etcd="a:2379")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="node name"):
        Settings(node="Edge 1")
    assert Settings().etcd == []


# -- agents on a real etcd -----------------------------------------------------------------------


def test_a_write_on_one_node_is_applied_on_the_other(nodes: Callable[..., Node]) -> None:
    a, b = nodes("a"), nodes("b")
    r = a.client.put("/v1/sources/fw?wait=applied", content="198.51.100.0/24\n192.0.2.1\n",
                     headers=PLAIN)
    assert r.status_code == 200, r.text
    assert r.json()["applied"] and a.held("fw") == {"198.51.100.0/24", "192.0.2.1/32"}
    until(lambda: b.held("fw") == {"198.51.100.0/24", "192.0.2.1/32"})
    # A replace is a diff on every node: the unchanged entry keeps its rule id.
    kept = b.ids("fw")["192.0.2.1/32"]
    r = a.client.put("/v1/sources/fw?wait=applied", content="192.0.2.1\n192.0.2.2\n",
                     headers=PLAIN)
    until(lambda: b.held("fw") == {"192.0.2.1/32", "192.0.2.2/32"})
    assert b.ids("fw")["192.0.2.1/32"] == kept
    # A single rule with a TTL: a lease in etcd; gone everywhere when it runs out.
    r = b.client.post("/v1/rules", json={"src": "203.0.113.5", "ttl_seconds": 2})
    assert r.status_code == 202, r.text
    until(lambda: "203.0.113.5/32" in a.held("api"))
    until(lambda: "203.0.113.5/32" not in a.held("api"), timeout=8)
    etcd = EtcdClient(a.agent.config.endpoints)
    keys, _ = etcd.prefix(a.agent.layout.rules("api"))
    assert keys == []
    etcd.close()
    # The registry and the status.
    nodes_seen = a.client.get("/v1/fleet/nodes").json()
    assert [n["name"] for n in nodes_seen] == ["a", "b"]
    assert nodes_seen[0]["labels"] == {"zone": "z1"}
    st = b.client.get("/v1/fleet").json()
    assert st["store_reachable"] and st["lag"] == 0 and "fw" in st["managed_sources"]
    # The OpenAPI document describes the fleet routes where they shadow the single-host ones.
    paths = a.client.get("/openapi.json").json()["paths"]
    assert paths["/v1/rules"]["post"]["operationId"].startswith("fleet_")
    assert paths["/v1/sources/{name}"]["put"]["operationId"].startswith("fleet_")
    assert "/v1/fleet/nodes" in paths
    assert paths["/v1/rules/bulk"]["post"]["operationId"].startswith("fleet_")


def test_big_source_in_chunks(nodes: Callable[..., Node],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "CHUNK_BYTES", 16 * 1024)
    a, b = nodes("a"), nodes("b")
    entries = [f"10.{i >> 8}.{i & 255}.1" for i in range(5000)]
    r = a.client.put("/v1/sources/big?wait=applied", content="\n".join(entries),
                     headers=PLAIN)
    assert r.status_code == 200, r.text
    until(lambda: len(b.held("big")) == 5000)
    etcd = EtcdClient(a.agent.config.endpoints)
    m, _ = etcd.get(a.agent.layout.manifest("big"))
    assert m is not None and json.loads(m.value)["chunks"] > 5
    etcd.close()


def test_store_down_writes_503_reads_stale(tmp_path: Path) -> None:
    dead = [f"http://127.0.0.1:{free_port()}"]
    n = make_node(tmp_path / "n.sqlite3", dead, "/x", "lonely")
    try:
        until(lambda: n.agent.last_error is not None)
        r = n.client.post("/v1/rules", json={"src": "192.0.2.1"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "unreachable" in r.json()["detail"] and "NOT made" in r.json()["detail"]
        r = n.client.get("/v1/rules")
        assert r.status_code == 200 and "may be stale" in r.headers["x-xdpfw-stale"]
        assert n.client.get("/metrics").text.count('xdpfw_fleet_store_up{node="lonely"} 0') == 1
    finally:
        n.agent.stop()
        n.store.close()


def test_compacted_revision_full_resync_keeps_rules(tmp_path: Path, etcd1: Cluster) -> None:
    prefix = f"/c{time.monotonic_ns()}"
    a = make_node(tmp_path / "a.sqlite3", etcd1.urls, prefix, "a")
    b = make_node(tmp_path / "b.sqlite3", etcd1.urls, prefix, "b")
    try:
        a.client.put("/v1/sources/keep?wait=applied", content="192.0.2.1\n192.0.2.2\n",
                     headers=PLAIN)
        a.client.put("/v1/sources/old?wait=applied", content="192.0.2.3\n", headers=PLAIN)
        until(lambda: b.held("keep") == {"192.0.2.1/32", "192.0.2.2/32"} and
              b.held("old") == {"192.0.2.3/32"})
        kept = b.ids("keep")["192.0.2.1/32"]
        b.agent.stop()
        a.client.put("/v1/sources/keep?wait=applied", content="192.0.2.1\n192.0.2.4\n",
                     headers=PLAIN)
        a.client.delete("/v1/sources/old?wait=applied")
        etcd = EtcdClient(etcd1.urls)
        _, rev = etcd.get(b"/")
        etcd.compact(rev)
        etcd.close()
        # b again, from its SQLite (applied revision < compaction): a full resync.
        b.store.close()
        b2 = make_node(tmp_path / "b.sqlite3", etcd1.urls, prefix, "b", start=False)
        try:
            assert b2.held("keep") == {"192.0.2.1/32", "192.0.2.2/32"}  # the cache, at once
            b2.agent.start()
            until(lambda: b2.agent.resyncs == 1)
            assert b2.held("keep") == {"192.0.2.1/32", "192.0.2.4/32"}
            assert b2.held("old") == set()
            assert b2.ids("keep")["192.0.2.1/32"] == kept  # never left the maps
        finally:
            b2.agent.stop()
            b2.store.close()
    finally:
        a.agent.stop()
        a.store.close()


def test_scoped_to_nodes_and_labels(nodes: Callable[..., Node]) -> None:
    a, b = nodes("a"), nodes("b", {"zone": "z2"})
    put = lambda q: a.client.put(f"/v1/sources/edge?wait=applied&{q}",  # noqa: E731
                                 content="192.0.2.7\n", headers=PLAIN)
    both = {"192.0.2.7/32"}
    assert put("").status_code == 200
    until(lambda: a.held("edge") == both and b.held("edge") == both)
    assert put("nodes=a").status_code == 200  # b drops what it enforced
    until(lambda: b.held("edge") == set())
    assert a.held("edge") == both
    assert put("selector=zone=z2").status_code == 200  # by label: b only
    until(lambda: a.held("edge") == set() and b.held("edge") == both)
    assert put("nodes=a,b&selector=zone=z1").status_code == 200  # both must hold
    until(lambda: a.held("edge") == both and b.held("edge") == set())
    assert put("nodes=Bad Name").status_code == 422


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"\xff") == b"\0"


# -- issue 19, left open: scoped single rules, bulk and delete by value in etcd -----------------


def test_a_single_rule_scoped_to_nodes_or_labels(nodes: Callable[..., Node]) -> None:
    a, b = nodes("a"), nodes("b", {"zone": "z2"})
    # Scoped to b by name, written on a: a answers 202 (not enforced here), b holds it.
    r = a.client.post("/v1/rules?wait=applied", json={"src": "192.0.2.20", "nodes": ["b"]})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["here"] is False and body["nodes"] == ["b"] and "not by this node" in \
        body["detail"]
    until(lambda: "192.0.2.20/32" in b.held("api"))
    # By label, written on b (in scope): 201 with the rule as enforced, as on one host.
    r = b.client.post("/v1/rules?wait=applied",
                      json={"src": "192.0.2.21", "selector": {"zone": "z2"}})
    assert r.status_code == 201 and r.json()["src"] == "192.0.2.21/32", r.text
    r = a.client.post("/v1/rules?wait=applied", json={"src": "192.0.2.22"})  # every node
    assert r.status_code == 201, r.text
    until(lambda: b.held("api") == {"192.0.2.20/32", "192.0.2.21/32", "192.0.2.22/32"})
    assert a.held("api") == {"192.0.2.22/32"}  # a applied all three writes, enforces one
    # GET /v1/fleet/rules: every rule with its scope, on any node.
    seen = {x["src"]: x for x in a.client.get("/v1/fleet/rules").json()}
    assert seen["192.0.2.20/32"]["nodes"] == ["b"] and not seen["192.0.2.20/32"]["here"]
    assert seen["192.0.2.21/32"]["selector"] == {"zone": "z2"}
    assert seen["192.0.2.22/32"]["nodes"] is None and seen["192.0.2.22/32"]["here"]
    # A changed scope is one more write: the rule moves from b to a.
    r = a.client.post("/v1/rules?wait=applied", json={"src": "192.0.2.20", "nodes": ["a"]})
    assert r.status_code == 201, r.text
    until(lambda: "192.0.2.20/32" not in b.held("api"))
    assert "192.0.2.20/32" in a.held("api")
    bad = a.client.post("/v1/rules", json={"src": "192.0.2.23", "nodes": ["Not A Node"]})
    assert bad.status_code == 422


def test_a_scoped_rule_on_a_single_host_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "one.sqlite3")
    svc = FirewallService(FakeDatapath(), store)
    svc.reconcile()
    app = create_app(Settings(state_dir=tmp_path), svc, TOKEN)
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        r = client.post("/v1/rules", json={"src": "192.0.2.30", "nodes": ["edge-1"]})
        assert r.status_code == 422 and "fleet mode" in r.text, r.text
        r = client.post("/v1/rules", json={"src": "192.0.2.30", "selector": {"rack": "r1"}})
        assert r.status_code == 422
        assert client.get("/v1/rules").json()["rules"] == []
        r = client.post("/v1/rules", json={"src": "192.0.2.30"})  # unscoped: as ever
        assert r.status_code == 201
        r = client.put("/v1/sources/eu?selector=zone=eu", content="192.0.2.31", headers=PLAIN)
        assert r.status_code == 422 and "fleet mode" in r.text, r.text
        assert client.get("/v1/sources/eu").status_code == 404
    finally:
        store.close()


def test_the_cli_scope_flags() -> None:
    from xdpfw.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["rule", "add", "--src", "192.0.2.1", "--nodes", "edge-1,edge-2",
                              "--selector", "rack=r1,zone=eu"])
    assert args.nodes == ["edge-1", "edge-2"] and args.selector == {"rack": "r1", "zone": "eu"}
    args = parser.parse_args(["source", "replace", "eu", "-", "--selector", "zone=eu"])
    assert args.selector == {"zone": "eu"} and args.nodes is None
    for bad in (["--nodes", "Edge 1"], ["--selector", "rack"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["rule", "add", "--src", "192.0.2.1", *bad])


def test_bulk_and_delete_by_value_go_to_etcd(nodes: Callable[..., Node],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "CHUNK_BYTES", 2048)  # a few chunks from a small list
    a, b = nodes("a"), nodes("b")
    etcd = EtcdClient(a.agent.config.endpoints)
    L = a.agent.layout
    try:
        a.client.post("/v1/rules?wait=applied", json={"src": "192.0.2.40", "comment": "one"})
        entries = [f"198.51.100.{i}" for i in range(200)]
        r = a.client.post("/v1/rules/bulk?wait=applied&comment=bulk",
                          content="\n".join([*entries, "192.0.2.40"]), headers=PLAIN)
        assert r.status_code == 201, r.text
        assert (r.json()["added"], r.json()["duplicates"]) == (200, 1)
        _, rev0 = etcd.get(b"/")
        until(lambda: len(b.held("api")) == 201)
        m, _ = etcd.get(L.manifest("api"))
        assert m is not None and json.loads(m.value)["chunks"] > 2
        assert len(etcd.prefix(L.rules("api"))[0]) == 1  # the single rule stays a rule key
        # A second bulk (JSON) joins the same list: one new generation, the old one deleted.
        r = a.client.post("/v1/rules/bulk?wait=applied", json=[
            {"src": "203.0.113.1", "comment": "j", "ttl_seconds": 600},
            {"src": "198.51.100.1"},
        ])
        assert r.status_code == 201 and r.json()["added"] == 1, r.text
        gens = {k.key.split(b"/")[-2] for k in etcd.prefix(L.chunks("api"))[0]}
        assert len(gens) == 1
        until(lambda: "203.0.113.1/32" in b.held("api"))
        ids = b.ids("api")
        # Delete by value: the rule key and a list entry, in ONE transaction (one revision).
        a.client.post("/v1/rules?wait=applied", json={"src": "198.51.100.7", "proto": "udp"})
        key = L.rule("api", RuleSpec.parse(src="198.51.100.7", proto="udp").code())
        r = a.client.delete("/v1/rules", params={"src": "198.51.100.7", "wait": "applied"})
        assert r.status_code == 200 and r.json()["removed"] == 2, r.text
        rev = r.json()["revision"]
        m, _ = etcd.get(L.manifest("api"))
        assert m is not None and m.mod_revision == rev  # the list's new generation ...
        assert etcd.range(key, revision=rev - 1)[0] and not etcd.range(key, revision=rev)[0]
        until(lambda: "198.51.100.7/32" not in b.held("api"))
        assert len(b.held("api")) == 201  # the rest stays, with its rule ids
        assert b.ids("api")["198.51.100.8/32"] == ids["198.51.100.8/32"]
        r = a.client.delete("/v1/rules", params={"src": "198.51.100.7"})
        assert r.status_code == 200 and r.json()["removed"] == 0
        # Delete by id of a list entry: it leaves the list (no more 422).
        rid = a.ids("api")["198.51.100.9/32"]
        assert a.client.delete(f"/v1/rules/{rid}?wait=applied").status_code == 204
        until(lambda: "198.51.100.9/32" not in b.held("api"))
        # A bulk with a scope of its own is refused: the list has the source's scope.
        r = a.client.post("/v1/rules/bulk?nodes=b", content="192.0.2.99", headers=PLAIN)
        assert r.status_code == 422 and "scope" in r.text
        assert rev0 > 0
        # A bulk into a source with a TTL: the source's expiry moves onto its old entries
        # (no lease left to take the bulk's entries with it).
        a.client.put("/v1/sources/tmp?ttl_seconds=600&wait=applied", content="192.0.2.50",
                     headers=PLAIN)
        r = a.client.post("/v1/rules/bulk?source=tmp&wait=applied", content="192.0.2.51",
                          headers=PLAIN)
        assert r.status_code == 201, r.text
        m, _ = etcd.get(L.manifest("tmp"))
        assert m is not None and m.lease == 0
        until(lambda: b.held("tmp") == {"192.0.2.50/32", "192.0.2.51/32"})
        rows = b.client.get("/v1/rules", params={"source": "tmp"}).json()["rules"]
        expiry = {x["src"]: x["expires_at"] for x in rows}
        assert expiry["192.0.2.50/32"] is not None and expiry["192.0.2.51/32"] is None
    finally:
        etcd.close()


def test_chunks_carry_absolute_expiries() -> None:
    from api.fleet.etcd import KV

    L = Layout("/x")
    parts = encode_chunks([1, 2, 3], ["a", "b", "c"], None, [None, time.time() + 60, 1.0])
    m = KV(L.manifest("s"), json.dumps({"gen": "g", "chunks": len(parts), "comment": "",
                                        "expires_at": None}).encode(), 5, 5, 1)
    chunks = [KV(L.chunk("s", "g", i), p, 5, 5, 1) for i, p in enumerate(parts)]
    d = decode_source("s", m, chunks, [])
    assert d is not None and d.codes == [1, 2] and d.comments == ["a", "b"]  # 3 expired
    assert d.ttls[0] is None and 59 <= (d.ttls[1] or 0) <= 61 and d.uniform is None


def test_the_clients_fleet_shapes_match_the_fleet_routes_schema() -> None:
    """The CLI's view of the fleet answers (client.FleetNode, FleetRule, FleetWrite) against
    the OpenAPI schema of the fleet routes (a fleet node's; tests/test_contracts.py checks
    the single-host ones the same way)."""
    from typing import get_type_hints

    from fastapi import FastAPI

    from api.routes import fleet as fleet_routes
    from tests.test_contracts import _py_type, _schema_type
    from xdpfw.cli import client

    app = FastAPI()
    app.include_router(fleet_routes.router)
    app.include_router(fleet_routes.writes)
    components = app.openapi()["components"]["schemas"]
    for shape, name in ((client.FleetNode, "NodeOut"), (client.FleetRule, "FleetRuleOut"),
                        (client.FleetWrite, "FleetWriteOut"),
                        (client.FleetProtected, "FleetProtectedOut")):
        want = {k: _schema_type(p) for k, p in components[name]["properties"].items()}
        have = {k: _py_type(t) for k, t in get_type_hints(shape).items()}
        assert have == want, f"client.{shape.__name__} vs {name}"


def test_the_agent_exposes_what_the_fleet_alerts_read(tmp_path: Path) -> None:
    """deploy/prometheus/alerts.yml's XdpfwFleetNodeBehind and XdpfwFleetStoreUnreachable
    read these names (tests/test_prometheus.py FLEET_METRICS); a node of no fleet exposes
    none of them, so the check is here."""
    from tests.test_prometheus import FLEET_METRICS, rule_groups

    n = make_node(tmp_path / "m.sqlite3", [f"http://127.0.0.1:{free_port()}"], "/m", "m1",
                  start=False)
    try:
        names = {s.name for family in n.agent.metrics() for s in family.samples}
        assert names >= FLEET_METRICS, names
        exprs = " ".join(r["expr"] for r in rule_groups() if "alert" in r)
        assert all(name in exprs for name in FLEET_METRICS)
    finally:
        n.store.close()
        n.agent.etcd.close()


def test_the_issues_flags_and_env_names(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    """Issue 19's `serve --etcd URL[,URL...] --node NAME [--etcd-prefix] [--etcd-ca/--etcd-cert/
    --etcd-key]` and env `XDPFW_ETCD`, `XDPFW_NODE`, ...: flags over env over defaults."""
    from api.settings import get_settings
    from xdpfw.cli.main import build_parser
    from xdpfw.cli.serve import _fleet_flags

    for name in ("XDPFW_ETCD", "XDPFW_NODE", "XDPFW_NODE_LABELS", "XDPFW_ETCD_PREFIX",
                 "XDPFW_ETCD_CA", "XDPFW_ETCD_CERT", "XDPFW_ETCD_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDPFW_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("XDPFW_ETCD", "http://e1:2379,http://e2:2379")
    monkeypatch.setenv("XDPFW_NODE", "edge-9")
    monkeypatch.setenv("XDPFW_NODE_LABELS", "rack=r9")
    monkeypatch.setenv("XDPFW_ETCD_PREFIX", "/fleet-a")
    monkeypatch.setenv("XDPFW_ETCD_CA", "/etc/xdpfw/etcd/ca.crt")
    monkeypatch.setenv("XDPFW_ETCD_CERT", "/etc/xdpfw/etcd/tls.crt")
    monkeypatch.setenv("XDPFW_ETCD_KEY", "/etc/xdpfw/etcd/tls.key")
    s = get_settings()
    assert (s.etcd, s.node, s.node_labels, s.etcd_prefix) == (
        ["http://e1:2379", "http://e2:2379"], "edge-9", {"rack": "r9"}, "/fleet-a")
    assert (str(s.etcd_ca), str(s.etcd_cert), str(s.etcd_key)) == (
        "/etc/xdpfw/etcd/ca.crt", "/etc/xdpfw/etcd/tls.crt", "/etc/xdpfw/etcd/tls.key")
    args = build_parser().parse_args([
        "serve", "--etcd", "https://f1:2379", "--node", "edge-1", "--node-label", "rack=r1",
        "--node-label", "zone=eu", "--etcd-prefix", "/fleet-b", "--etcd-ca", "/c/ca.pem",
        "--etcd-cert", "/c/cert.pem", "--etcd-key", "/c/key.pem",
    ])
    s = get_settings(**_fleet_flags(args))  # the flags win over the environment
    assert (s.etcd, s.node, s.node_labels, s.etcd_prefix) == (
        ["https://f1:2379"], "edge-1", {"rack": "r1", "zone": "eu"}, "/fleet-b")
    assert str(s.etcd_key) == "/c/key.pem"
    monkeypatch.setenv("XDPFW_ETCD", "")  # compose/ConfigMap's empty value: one host
    monkeypatch.setenv("XDPFW_NODE", "")
    assert get_settings().etcd == [] and get_settings().node is None


def test_the_deploy_files_carry_the_fleet_settings() -> None:
    """Compose and the DaemonSet pass every fleet setting through (empty: one host), and the
    DaemonSet mounts the optional Secret xdpfw-etcd where the ConfigMap says the certs are."""
    import yaml

    from api.settings import get_settings

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    env = next(iter(compose["services"].values()))["environment"]
    fleet_env = {"XDPFW_ETCD", "XDPFW_NODE", "XDPFW_NODE_LABELS", "XDPFW_ETCD_PREFIX",
                 "XDPFW_ETCD_CA", "XDPFW_ETCD_CERT", "XDPFW_ETCD_KEY"}
    assert fleet_env <= set(env)
    k8s = root / "deploy" / "kubernetes"
    cm = yaml.safe_load((k8s / "configmap.yaml").read_text())
    assert {"XDPFW_ETCD", "XDPFW_ETCD_PREFIX", "XDPFW_ETCD_CA", "XDPFW_ETCD_CERT",
            "XDPFW_ETCD_KEY"} <= set(cm["data"])
    # The ConfigMap's defaults are one host: every empty value is "unset".
    s = get_settings(**{k.removeprefix("XDPFW_").lower(): v for k, v in cm["data"].items()
                        if k.startswith("XDPFW_ETCD")})
    assert s.etcd == [] and s.etcd_ca is None and s.etcd_key is None
    ds = yaml.safe_load((k8s / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    node_env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert node_env["XDPFW_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    vol = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "xdpfw-etcd")
    assert vol["secret"]["optional"] is True  # no Secret: the pod still starts (no TLS)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == vol["name"])
    assert mount["mountPath"] == "/etc/xdpfw/etcd" and mount["readOnly"] is True
    text = (k8s / "configmap.yaml").read_text()
    assert "/etc/xdpfw/etcd/ca.crt" in text and "create secret generic xdpfw-etcd" in text
    assert all(f"--from-file={name}" in text for name in ("ca.crt", "tls.crt", "tls.key"))


def test_two_bulks_into_one_source_at_once_both_land(etcd1: Cluster,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding is order-free: the bulk that loses the txn's compare reads again and retries,
    so both land whole and one generation is left (a replace that loses answers 409)."""
    import threading

    from api.fleet.state import Writer, chunk_body

    monkeypatch.setattr(state, "CHUNK_BYTES", 1024)
    L = Layout(f"/b{time.monotonic_ns()}")
    etcd = EtcdClient(etcd1.urls)
    try:
        writers = [Writer(EtcdClient(etcd1.urls), L, f"w{i}") for i in range(2)]
        lists = [[(9 << 100) + i * 1000 + j for j in range(300)] for i in range(2)]
        errors: list[BaseException] = []
        gate = threading.Barrier(2)

        def run(i: int) -> None:
            try:
                gate.wait()
                for k in range(0, 300, 100):  # three bulks each, interleaved with the other's
                    part = lists[i][k:k + 100]
                    writers[i].add_to_source("both", part, [""] * 100, [None] * 100)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        m, _ = etcd.get(L.manifest("both"))
        assert m is not None
        gen = json.loads(m.value)["gen"]
        kvs, _ = etcd.prefix(L.chunks("both"))
        assert {kv.key.split(b"/")[-2].decode() for kv in kvs} == {gen}  # one generation
        stored = [c for kv in kvs for c in chunk_body(kv.value)["codes"]]
        assert sorted(stored) == sorted(lists[0] + lists[1])
        for w in writers:
            w.etcd.close()
    finally:
        etcd.close()


# -- protected prefixes, fleet-wide (P/desired/protected) ----------------------------------------


def _allowed(dp: FakeDatapath) -> dict[str, int]:
    """The maps' reserved allow rules by source prefix: {cidr: rule id}."""
    return {r.src.with_prefixlen: rid for rid, r in dp.compiler.rules.items()
            if rid >= PROTECT_BASE and r.src is not None and r.action == Action.ALLOW}


def test_the_service_enforces_its_own_and_the_fleets_protected_prefixes(tmp_path: Path) -> None:
    dp = FakeDatapath()
    store = Store(tmp_path / "p.sqlite3")
    svc = FirewallService(dp, store, ["192.0.2.0/24"], ("0.0.0.0", 8000))
    svc.reconcile()
    try:
        own = _allowed(dp)["192.0.2.0/24"]
        assert API_RULE_ID in dp.compiler.rules
        # The node's own prefix in the fleet's list makes no second rule; repeats neither.
        got = svc.set_fleet_protected(["198.51.100.0/24", "192.0.2.0/24", "198.51.100.0/24"])
        assert got == ["198.51.100.0/24"]
        fleet_id = _allowed(dp)["198.51.100.0/24"]
        assert fleet_id not in (own, API_RULE_ID)
        assert svc.health().protected == ["192.0.2.0/24", "198.51.100.0/24"]
        # A lookup names which list protects an address.
        said = {ip: lookup(svc, ip).credited for ip in ("198.51.100.7", "192.0.2.7")}
        assert [m.stored.comment if m else None for m in said.values()] == [
            "fleet protected prefix (/v1/fleet/protected)", "protected prefix (--protect)"]
        # The union is what an overlap check sees: a drop rule over a fleet prefix is 409.
        with pytest.raises(RuleConflict, match=r"198\.51\.100\.0/24"):
            svc.add(NewRule(RuleSpec.parse(src="198.51.100.7")))
        # Another prefix: the first keeps its rule id (its counters).
        svc.set_fleet_protected(["198.51.100.0/24", "203.0.113.0/24"])
        assert _allowed(dp)["198.51.100.0/24"] == fleet_id
        # A bad prefix: refused, nothing changed.
        before = dict(dp.compiler.rules)
        with pytest.raises(InvalidRule):
            svc.set_fleet_protected(["203.0.113.0/24", "not-a-prefix"])
        assert dp.compiler.rules == before
        # The fleet's list emptied (its own prefix included): only the fleet's rules go;
        # the node's own and the API port's stay, and the drop rule is taken now.
        assert svc.set_fleet_protected([]) == []
        assert _allowed(dp) == {"192.0.2.0/24": own}
        assert API_RULE_ID in dp.compiler.rules
        assert svc.health().protected == ["192.0.2.0/24"]
        svc.add(NewRule(RuleSpec.parse(src="198.51.100.7")))
        # A restart with the cached list: the start-up reconcile keeps the fleet's rules.
        svc.set_fleet_protected(["203.0.113.0/24"])
        kept = _allowed(dp)["203.0.113.0/24"]
        again = FirewallService(dp, store, ["192.0.2.0/24"], ("0.0.0.0", 8000),
                                fleet_protect=["203.0.113.0/24"])
        changes = dp.changes
        again.reconcile()
        assert dp.changes == changes and _allowed(dp)["203.0.113.0/24"] == kept
    finally:
        store.close()


def test_fleet_protected_prefixes_through_etcd(nodes: Callable[..., Node], tmp_path: Path,
                                               etcd1: Cluster) -> None:
    a = nodes("a")
    b = make_node(tmp_path / "b.sqlite3", etcd1.urls, a.agent.config.prefix, "b",
                  protect=("198.51.100.0/24",))
    try:
        _through_etcd(a, b)
    finally:
        b.agent.stop()
        b.store.close()
    # b restarted with etcd unreachable and without its own --protect: its cache (the
    # fleet's whole list, b's own prefix included) protects both at once.
    dead = [f"http://127.0.0.1:{free_port()}"]
    b2 = make_node(tmp_path / "b.sqlite3", dead, "/x", "b", start=False)
    try:
        assert set(_allowed(b2.dp)) == {"198.51.100.0/24", "192.0.2.9/32"}
        stale = b2.client.get("/v1/fleet/protected").json()
        assert stale["stale"] and stale["prefixes"] == ["192.0.2.9/32", "198.51.100.0/24"]
        assert stale["local"] == [] and len(stale["enforced"]) == 2
    finally:
        b2.store.close()


def _through_etcd(a: Node, b: Node) -> None:
    r = a.client.get("/v1/fleet/protected")
    assert r.status_code == 200 and r.json()["prefixes"] == [], r.text
    r = a.client.put("/v1/fleet/protected?wait=applied",
                     json={"prefixes": ["198.51.100.0/24", "203.0.113.7", "bogus"]})
    assert r.status_code == 422, r.text
    r = a.client.put("/v1/fleet/protected?wait=applied",
                     json={"prefixes": ["198.51.100.0/24", "203.0.113.7"], "revision": 0})
    assert r.status_code == 200, r.text
    rev = r.json()["revision"]
    assert r.json()["prefixes"] == ["198.51.100.0/24", "203.0.113.7/32"]
    assert r.json()["applied"] and set(_allowed(a.dp)) == {"198.51.100.0/24", "203.0.113.7/32"}
    until(lambda: b.agent.applied >= rev)
    assert set(_allowed(b.dp)) == {"198.51.100.0/24", "203.0.113.7/32"}
    got = b.client.get("/v1/fleet/protected").json()
    assert got["local"] == ["198.51.100.0/24"] and got["enforced"] == ["203.0.113.7/32"]
    assert got["revision"] == rev
    # A read-modify-write against an older revision: 409, nothing written.
    r = b.client.put("/v1/fleet/protected", json={"prefixes": [], "revision": rev - 1})
    assert r.status_code == 409, r.text
    # Emptied: a's rules go; b keeps its own --protect of the same prefix.
    r = a.client.put("/v1/fleet/protected?wait=applied", json={"prefixes": ["192.0.2.9"]})
    rev = r.json()["revision"]
    until(lambda: b.agent.applied >= rev)
    assert set(_allowed(a.dp)) == {"192.0.2.9/32"}
    assert set(_allowed(b.dp)) == {"198.51.100.0/24", "192.0.2.9/32"}
    # b's own prefix back in the fleet's list: still one rule on b (its own).
    r = a.client.put("/v1/fleet/protected?wait=applied",
                     json={"prefixes": ["192.0.2.9", "198.51.100.0/24"]})
    rev = r.json()["revision"]
    until(lambda: b.agent.applied >= rev)
    assert [r.src.with_prefixlen for r in b.svc.fleet_protected if r.src] == ["192.0.2.9/32"]


def test_fleet_protected_on_a_single_host_is_404(tmp_path: Path) -> None:
    store = Store(tmp_path / "one.sqlite3")
    svc = FirewallService(FakeDatapath(), store)
    svc.reconcile()
    client = TestClient(create_app(Settings(state_dir=tmp_path), svc, TOKEN),
                        headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        assert client.get("/v1/fleet/protected").status_code == 404
        assert client.put("/v1/fleet/protected", json={"prefixes": []}).status_code == 404
    finally:
        store.close()
