"""Fleet mode end to end: real `xdpfw serve` nodes (each on its own veth lab, state dir and
pins) sharing a real 3-member etcd 3.4 cluster on loopback; real packets; faults.

One cluster and three nodes for the module (a server start costs ~5 s here); each test
uses its own sources and deletes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from api.fleet.etcd import EtcdClient
from api.fleet.state import Conflict, Layout, Writer, chunk_body
from tests.conftest import unique_pin_dir
from tests.etcd_cluster import Cluster, etcd_cluster
from tests.server import XDPFW, Server, _remove_pins
from tests.traffic import udp_roundtrip
from xdpfw.lab import veth_lab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd"), 3) as c:
        yield c


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, cluster: Cluster
) -> Iterator[list[Server]]:
    """Three nodes for the module (a server start costs ~5 s here): each test uses its own
    sources and deletes them."""
    with fleet_nodes(tmp_path_factory.mktemp("fleet"), cluster, PREFIX, 3) as nodes:
        yield nodes


PREFIX = f"/xfw-{uuid.uuid4().hex[:8]}"


@contextmanager
def fleet_nodes(tmp: Path, cluster: Cluster, prefix: str, n: int, first: int = 0,
                protect_peer: bool = False, start: bool = True) -> Iterator[list[Server]]:
    """Nodes n<first>... (`protect_peer`: each with --protect of its own lab's peer)."""
    with ExitStack() as stack:
        nodes: list[Server] = []
        for i in range(first, first + n):
            lab = stack.enter_context(veth_lab(prefix="xfw"))
            pins = unique_pin_dir(f"fleet{i}")
            srv = Server(lab=lab, state_dir=tmp / f"node{i}", bpffs_dir=pins, extra_args=[
                "--etcd", cluster.endpoints, "--node", f"n{i}", "--etcd-prefix", prefix,
                "--node-label", f"rack=r{i % 2}",
                *(["--protect", lab.peer_ip4] if protect_peer else []),
            ])
            stack.callback(_remove_pins, pins)
            stack.callback(srv.stop)
            nodes.append(srv)
        for srv in nodes if start else ():
            srv.start()
        yield nodes


def until(check: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> float:
    """Seconds until `check()` holds; fails the test past `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached in {timeout}s: {check}")
        time.sleep(every)
    return time.monotonic() - start


def blocked(srv: Server) -> bool:
    return udp_roundtrip(srv.lab, count=3, settle=0.1) == 0


def write(srv: Server, method: str, path: str, **kw: object) -> httpx.Response:
    with srv.client() as c:
        return c.request(method, path, **kw)  # type: ignore[arg-type]


def put_list(srv: Server, name: str, entries: list[str], wait: bool = True) -> httpx.Response:
    return write(srv, "PUT", f"/v1/sources/{name}" + ("?wait=applied" if wait else ""),
                 content="\n".join(entries) + "\n", headers={"content-type": "text/plain"})


def source_members(srv: Server, name: str) -> set[str]:
    with srv.client() as c:
        r = c.get(f"/v1/sources/{name}", params={"limit": 10_000})
        if r.status_code == 404:
            return set()
        assert r.status_code == 200, r.text
        return {rule["src"] for rule in r.json()["page"]["rules"]}


def status(srv: Server) -> dict[str, object]:
    with srv.client() as c:
        out: dict[str, object] = c.get("/v1/fleet").json()
        return out


def clean(nodes: list[Server], *sources: str) -> None:
    for name in sources:
        write(nodes[0], "DELETE", f"/v1/sources/{name}?wait=applied")
    for s in nodes:
        until(lambda s=s: not blocked(s))  # type: ignore[misc]


def cli(srv: Server, *args: str) -> str:
    """The real CLI against node `srv`; its stdout (a non-zero exit fails the test)."""
    run = subprocess.run([XDPFW, "--state-dir", str(srv.state_dir), *args],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDPFW_API": srv.url})
    assert run.returncode == 0, (args, run.stdout, run.stderr)
    return run.stdout


def test_one_write_enforced_on_every_node(fleet: list[Server]) -> None:
    a, b, c = fleet
    try:
        assert not any(blocked(s) for s in (a, b, c))
        # A source written on A, with every node's peer: each node drops its own peer.
        r = put_list(a, "banned", [s.lab.peer_ip4 for s in (a, b, c)])
        assert r.status_code == 200, r.text
        assert r.json()["applied"] is True
        rev = r.json()["revision"]
        for s in (a, b, c):
            until(lambda s=s: blocked(s))  # type: ignore[misc]
            assert status(s)["applied_revision"] >= rev
        # A single rule written on B reaches C (and A lists it from its cache).
        r = write(b, "POST", "/v1/rules", json={"src": "198.51.100.7", "comment": "one"})
        assert r.status_code == 202, r.text
        until(lambda: "198.51.100.7/32" in source_members(c, "api"))
        with a.client() as ca:
            until(lambda: any(x["src"] == "198.51.100.7/32"
                              for x in ca.get("/v1/rules").json()["rules"]))
            got = ca.get("/v1/rules").json()["rules"]
            rid = next(x["id"] for x in got if x["src"] == "198.51.100.7/32")
            assert ca.get("/v1/rules").headers["x-xdpfw-fleet-revision"]
            # Delete by id on A: gone everywhere.
            d = ca.delete(f"/v1/rules/{rid}", params={"wait": "applied"})
            assert d.status_code == 204 and int(d.headers["x-xdpfw-fleet-committed"]) > rev
        until(lambda: "198.51.100.7/32" not in source_members(c, "api"))
        # The registry: three nodes, labels, no lag once applied.
        with a.client() as ca:
            nodes = ca.get("/v1/fleet/nodes").json()
        assert [n["name"] for n in nodes] == ["n0", "n1", "n2"]
        assert nodes[1]["labels"] == {"rack": "r1"}
        assert all(n["healthy"] and n["heartbeat_age"] < 10 for n in nodes)
        p = subprocess.run(
            [XDPFW, "--state-dir", str(b.state_dir), "fleet", "ls"], capture_output=True,
            text=True, timeout=60, env={**os.environ, "XDPFW_API": b.url},
        )
        assert p.returncode == 0, p.stderr
        assert [ln.split()[0] for ln in p.stdout.splitlines()] == ["NODE", "n0", "n1", "n2"]
        assert "rack=r1" in p.stdout
        # The CLI works unchanged in fleet mode (it asks ?wait=applied): add on B, rm on C.
        added = json.loads(cli(b, "rule", "add", "--src", "198.51.100.8", "--json"))
        assert added["src"] == "198.51.100.8/32"
        until(lambda: "198.51.100.8/32" in source_members(c, "api"))
        listed = json.loads(cli(c, "rule", "ls", "--json"))
        rows = listed["rules"] if isinstance(listed, dict) else listed
        cid = next(x["id"] for x in rows if x["src"] == "198.51.100.8/32")
        cli(c, "rule", "rm", str(cid))
        assert "198.51.100.8/32" not in source_members(c, "api")
        until(lambda: "198.51.100.8/32" not in source_members(a, "api"))
        with c.client() as cc:
            text = cc.get("/metrics").text
        assert 'xdpfw_fleet_applied_revision{node="n2"}' in text
        assert 'xdpfw_fleet_store_up{node="n2"} 1' in text
        # Deleting the source on C unblocks every node.
        assert write(c, "DELETE", "/v1/sources/banned?wait=applied").status_code == 200
        for s in (a, b, c):
            until(lambda s=s: not blocked(s))  # type: ignore[misc]
    finally:
        clean(fleet, "banned")


def test_a_rule_scoped_to_one_node_drops_there_only(fleet: list[Server]) -> None:
    a, b, c = fleet
    net = "198.18.0.0/15"  # every lab's peer: what a node drops shows on its own probe
    try:
        # Written through A's CLI, for B only: A answers "committed" (it does not enforce it).
        out = cli(a, "rule", "add", "--src", net, "--nodes", "n1", "--comment", "b only")
        assert out.startswith("committed at revision") and "n1" in out, out
        until(lambda: blocked(b))
        assert not blocked(c) and not blocked(a)
        listed = json.loads(cli(c, "fleet", "rules", "--json"))
        mine = [r for r in listed if r["src"] == net]
        assert len(mine) == 1 and mine[0]["nodes"] == ["n1"] and mine[0]["here"] is False
        assert "n1" in cli(c, "fleet", "rules")  # the SCOPE column
        # The same rule re-scoped by label (rack=r0: n0 and n2), written on C (in scope).
        cli(c, "rule", "add", "--src", net, "--selector", "rack=r0")
        until(lambda: blocked(a) and blocked(c))
        until(lambda: not blocked(b))
        # Delete by value on B (outside the scope): gone from the store, every node passes.
        r = write(b, "DELETE", "/v1/rules", params={"src": net, "wait": "applied"})
        assert r.status_code == 200 and r.json()["removed"] == 1, r.text
        for s in (a, c):
            until(lambda s=s: not blocked(s))  # type: ignore[misc]
    finally:
        write(a, "DELETE", "/v1/rules", params={"src": net})
        for s in fleet:
            until(lambda s=s: not blocked(s))  # type: ignore[misc]


def test_leader_killed_writes_continue(fleet: list[Server], cluster: Cluster) -> None:
    a, b, _ = fleet
    assert put_list(a, "s1", [a.lab.peer_ip4, b.lab.peer_ip4]).status_code == 200
    leader = cluster.leader()
    cluster.kill(leader)
    try:
        # After the election (~0.5-1 s here), writes through either node commit again.
        answers: list[int] = []

        def committed() -> bool:
            r = write(b, "POST", "/v1/rules", json={"src": "203.0.113.9"})
            answers.append(r.status_code)
            return r.status_code == 202

        until(committed, timeout=15, every=0.2)
        assert set(answers) <= {202, 503}, answers
        for s in (a, b):
            until(lambda s=s: "203.0.113.9/32" in source_members(s, "api"))  # type: ignore[misc]
            assert blocked(s)  # the source written before the kill still enforced
    finally:
        cluster.start(leader)
        cluster.wait_ready()
    clean(fleet, "s1")


def test_cluster_down_nodes_enforce_and_restart(fleet: list[Server], cluster: Cluster) -> None:
    a, b, _ = fleet
    assert put_list(a, "s2", [a.lab.peer_ip4, b.lab.peer_ip4]).status_code == 200
    until(lambda: blocked(b))
    resyncs_a = status(a)["resyncs"]
    cluster.stop_all()
    try:
        # Writes: 503 with a clear message; nothing half made.
        r = write(a, "POST", "/v1/rules", json={"src": "203.0.113.10"})
        assert r.status_code == 503, r.text
        assert "unreachable" in r.json()["detail"] and "NOT made" in r.json()["detail"]
        # Reads: from the cache, saying so.
        with b.client() as cb:
            until(lambda: "x-xdpfw-stale" in cb.get("/v1/sources").headers)
            r = cb.get("/v1/sources/s2")
            assert r.status_code == 200 and "may be stale" in r.headers["x-xdpfw-stale"]
        assert blocked(a) and blocked(b)
        # B restarted while the store is down: comes up filtering (pins + cache).
        b.stop()
        assert blocked(b)  # the pinned program filters while no process runs
        b.start()
        assert blocked(b)
        assert b.lab.peer_ip4 + "/32" in source_members(b, "s2")
    finally:
        cluster.start_all()
        cluster.wait_ready()
    # Back: a new write converges on both, by the watch (no full reload).
    r = write(b, "POST", "/v1/rules?wait=applied", json={"src": "203.0.113.11"})
    assert r.status_code == 201, r.text
    until(lambda: "203.0.113.11/32" in source_members(a, "api"), timeout=15)
    assert status(a)["resyncs"] == resyncs_a  # a caught up by its watch
    assert status(b)["resyncs"] == 0  # b (restarted) resumed from its stored revision
    assert status(a)["store_reachable"] and status(b)["store_reachable"]
    clean(fleet, "s2")


def test_compaction_resyncs_without_a_window(fleet: list[Server], cluster: Cluster) -> None:
    a, b, _ = fleet
    assert put_list(a, "keep", [b.lab.peer_ip4, "198.51.100.1"]).status_code == 200
    until(lambda: blocked(b))
    with b.client() as cb:
        before = {x["src"]: x["id"] for x in cb.get("/v1/rules?source=keep").json()["rules"]}
    b.stop()  # its pins keep filtering
    # While B is away: "keep" changes (one entry out, one in), "gone" comes and goes.
    assert put_list(a, "keep", [b.lab.peer_ip4, "198.51.100.2"]).status_code == 200
    assert put_list(a, "gone", ["198.51.100.3"]).status_code == 200
    assert write(a, "DELETE", "/v1/sources/gone?wait=applied").status_code == 200
    etcd = EtcdClient(cluster.urls)
    _, rev = etcd.get(b"/")
    etcd.compact(rev)
    etcd.close()
    # B's probe runs during its whole resync: its peer never passes.
    passed: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            passed.append(udp_roundtrip(b.lab, count=2, settle=0.05))

    t = threading.Thread(target=probe)
    t.start()
    try:
        b.start()
        # The restarted process resumes from a compacted revision: one full resync.
        until(lambda: status(b)["resyncs"] == 1, timeout=15)
        until(lambda: source_members(b, "keep") == {f"{b.lab.peer_ip4}/32",
                                                   "198.51.100.2/32"})
    finally:
        stop.set()
        t.join()
    assert passed and sum(passed) == 0, passed
    with b.client() as cb:
        after = {x["src"]: x["id"] for x in cb.get("/v1/rules?source=keep").json()["rules"]}
        assert cb.get("/v1/sources/gone").status_code == 404
    key = f"{b.lab.peer_ip4}/32"
    assert after[key] == before[key]  # the same kernel rule all along: never removed
    clean(fleet, "keep")


def test_two_writers_one_wins_whole(fleet: list[Server], cluster: Cluster) -> None:
    # Straight on the store (a prefix no node watches): two writers race replaces of one
    # big (many-chunk) source.
    layout = Layout(PREFIX + "-raw")
    lists = {w: [(w << 96) + i for i in range(40_000)] for w in (1, 2)}
    outcomes: dict[int, list[str]] = {1: [], 2: []}
    barrier = threading.Barrier(2)

    def race(w: int) -> None:
        etcd = EtcdClient(cluster.urls)
        writer = Writer(etcd, layout, f"w{w}")
        for _ in range(4):
            barrier.wait()
            try:
                writer.replace_source("contested", lists[w])
                outcomes[w].append("won")
            except Conflict:
                outcomes[w].append("lost")
        etcd.close()

    threads = [threading.Thread(target=race, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(o == "lost" for w in outcomes for o in outcomes[w]), outcomes  # they did race
    etcd = EtcdClient(cluster.urls)
    manifest, _ = etcd.get(layout.manifest("contested"))
    assert manifest is not None
    m = json.loads(manifest.value)
    chunks, _ = etcd.prefix(layout.chunks("contested", m["gen"]))
    assert m["chunks"] == len(chunks) > 1
    codes = [c for kv in chunks for c in chunk_body(kv.value)["codes"]]
    assert codes in (lists[1], lists[2])  # whole, never a mix
    # No orphan chunks of the losers left behind: one generation only.
    every, _ = etcd.prefix(layout.chunks("contested"), )
    assert {kv.key.split(b"/")[-2] for kv in every} == {m["gen"].encode()}
    etcd.close()

    # Through two nodes' REST APIs: each answer is 200 or 409, both nodes converge on one.
    a, b, _ = fleet
    entries = {a.url: [f"198.51.100.{i}" for i in range(1, 60)],
               b.url: [f"203.0.113.{i}" for i in range(1, 60)]}
    codes_seen: list[int] = []

    def rest(srv: Server) -> None:
        for _ in range(3):
            codes_seen.append(put_list(srv, "shared", entries[srv.url], wait=False)
                              .status_code)

    ts = [threading.Thread(target=rest, args=(s,)) for s in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert set(codes_seen) <= {200, 409}, codes_seen
    wanted = [{e + "/32" for e in v} for v in entries.values()]
    until(lambda: source_members(a, "shared") in wanted
          and source_members(a, "shared") == source_members(b, "shared"))


def protected_here(srv: Server) -> list[str]:
    with srv.client() as c:
        out: list[str] = c.get("/healthz").json()["protected"]
        return out


def test_fleet_protected_prefixes(fleet: list[Server], cluster: Cluster, tmp_path: Path
                                  ) -> None:
    """A fleet-wide drop of every lab's peer, then fleet protected prefixes inside it put on
    A: B's and C's peers pass; taken out, they drop again. D protects its own peer
    (--protect): the fleet putting and removing the same prefix leaves it protected."""
    a, b, c = fleet
    net = "198.18.0.0/15"  # every lab's peer
    bp, cp = f"{b.lab.peer_ip4}/32", f"{c.lab.peer_ip4}/32"
    with fleet_nodes(tmp_path, cluster, PREFIX, 1, first=3, protect_peer=True,
                     start=False) as (d,):
        starting = threading.Thread(target=d.start)  # meanwhile: a start costs seconds
        starting.start()
        try:
            r = write(a, "POST", "/v1/rules?wait=applied", json={"src": net})
            assert r.status_code == 201, r.text
            until(lambda: blocked(b) and blocked(c))
            # Put on A (its CLI, then the API): B and C pass (and say so in /healthz).
            out = cli(a, "fleet", "protect", "add", b.lab.peer_ip4)
            assert bp in out, out
            rev = int(out.split("at revision ")[1].split(":")[0])
            until(lambda: int(status(b)["applied_revision"]) >= rev)  # type: ignore[call-overload]
            table = cli(b, "fleet", "protect", "ls").splitlines()
            assert table[0].split() == ["PREFIX", "FROM", "ENFORCED"], table
            assert table[1].split() == [bp, "fleet", "yes"], table
            r = write(a, "PUT", "/v1/fleet/protected",
                      json={"prefixes": [bp, cp], "revision": rev})
            assert r.status_code == 200, r.text
            until(lambda: not blocked(b) and not blocked(c))
            assert protected_here(c) == [bp, cp]
            assert blocked(a)  # A's own peer was never protected
            # B's prefix out: B drops again, C still passes; then the whole list emptied.
            cli(c, "fleet", "protect", "rm", bp)
            until(lambda: blocked(b))
            assert not blocked(c)
            r = write(b, "PUT", "/v1/fleet/protected?wait=applied", json={"prefixes": []})
            assert r.status_code == 200 and r.json()["prefixes"] == [], r.text
            until(lambda: blocked(c))
            assert protected_here(b) == [] and protected_here(c) == []
            # D's own --protect of its peer: the fleet's same prefix comes and goes, and D's
            # peer passes throughout (the fleet's drop rule is applied there too).
            starting.join()
            dp = f"{d.lab.peer_ip4}/32"
            rev = write(a, "PUT", "/v1/fleet/protected", json={"prefixes": [dp]}
                        ).json()["revision"]
            until(lambda: int(status(d)["applied_revision"]) >= rev)  # type: ignore[call-overload]
            assert not blocked(d) and protected_here(d) == [dp]
            rev = write(a, "PUT", "/v1/fleet/protected", json={"prefixes": []}
                        ).json()["revision"]
            until(lambda: int(status(d)["applied_revision"]) >= rev)  # type: ignore[call-overload]
            assert not blocked(d) and protected_here(d) == [dp]
            with d.client() as cd:
                assert any(x["src"] == net for x in cd.get("/v1/rules").json()["rules"])
        finally:
            starting.join()
            write(a, "PUT", "/v1/fleet/protected", json={"prefixes": []})
            write(a, "DELETE", "/v1/rules", params={"src": net, "wait": "applied"})
            for s in fleet:
                until(lambda s=s: not blocked(s))  # type: ignore[misc]
