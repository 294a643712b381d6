"""The fleet agent and routes over the real service, app and SQLite store (the stand-in
datapath), against a real 1-member etcd 3.4 on loopback (no root needed). The same through
the kernel, real server processes and a 3-member cluster with faults: tests/test_fleet.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.fleet import state
from api.fleet.agent import FleetAgent, FleetConfig
from api.fleet.etcd import EtcdClient, prefix_end
from api.fleet.state import Desired, Layout, decode_source, encode_chunks
from api.service import FirewallService
from api.settings import Settings
from api.store import Store
from tests.etcd_cluster import Cluster, etcd_cluster
from tests.fakes import FakeDatapath
from tests.server import free_port
from tests.test_api_pure import TOKEN

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
              start: bool = True, labels: dict[str, str] | None = None) -> Node:
    dp = FakeDatapath()
    store = Store(db)
    svc = FirewallService(dp, store)
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

    def make(name: str, labels: dict[str, str] | None = None) -> Node:
        n = make_node(tmp_path / f"{name}.sqlite3", etcd1.urls, prefix, name, labels=labels)
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
    assert len(parts) > 10 and all(len(p) <= 4096 + 200 for p in parts)
    back = [c for p in parts for c in json.loads(p)["codes"]]
    assert back == codes
    assert encode_chunks([], None, None) == [b'{"codes":[]}']


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
    # Writes not routed to the store yet say so (and change nothing).
    r = a.client.post("/v1/rules/bulk", content="192.0.2.9\n", headers=PLAIN)
    assert r.status_code == 501 and "PUT /v1/sources" in r.json()["detail"]
    assert "192.0.2.9/32" not in a.held("api")


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
