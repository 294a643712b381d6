"""End to end: the real `xdpfw serve` process on a veth lab, driven over HTTP, real packets."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random

import httpx
import pytest

from tests.conftest import unique_pin_dir
from tests.server import XDPFW, Server, running_server
from tests.traffic import udp_roundtrip

pytestmark = pytest.mark.e2e

N = 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, unique_pin_dir("e2e")) as srv:
        yield srv


def rule_packets(c: httpx.Client, rule_id: int) -> int:
    stats = c.get("/v1/stats").json()
    return next((r["packets"] for r in stats["rules"] if r["id"] == rule_id), 0)


def metric(c: httpx.Client, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.compile(rf"^{name}(?:\{{{re.escape(want)}\}})? (\S+)$", re.M)
    m = pat.search(c.get("/metrics").text)
    return float(m.group(1)) if m else 0.0


def test_rule_drops_traffic_and_counts_exactly(server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        health = c.get("/healthz").json()
        assert health["status"] == "ok"
        assert [i["name"] for i in health["interfaces"]] == [lab.host_if]
        assert health["capacity"]["rules"] == {"entries": 0, "capacity": 8192}
        assert udp_roundtrip(lab, count=N) == N

        r = c.post("/v1/rules", json={"src": lab.peer_ip4, "comment": "e2e"})
        assert r.status_code == 201, r.text
        rule = r.json()
        assert rule["src"] == f"{lab.peer_ip4}/32" and rule["dport"] is None
        assert rule["created_at"].endswith("Z") and rule["expires_at"] is None

        before = c.get("/v1/stats").json()["totals"]
        assert udp_roundtrip(lab, count=N) == 0
        assert rule_packets(c, rule["id"]) == N
        after = c.get("/v1/stats").json()["totals"]
        assert after["dropped"] - before["dropped"] >= N
        assert metric(c, "xdpfw_rule_packets_total", rule_id=str(rule["id"])) == N
        one = c.get(f"/v1/rules/{rule['id']}").json()
        frame_len = 14 + 20 + 8 + len(b"xdpfw-test 0")
        assert one["counters"]["packets"] == N
        assert one["counters"]["bytes"] >= N * frame_len
        assert one["counters"]["last_hit"] is not None

        assert c.delete(f"/v1/rules/{rule['id']}").status_code == 204
        assert c.get(f"/v1/rules/{rule['id']}").status_code == 404
        assert udp_roundtrip(lab, count=N) == N


def test_ipv6_port_range_rule(server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        r = c.post("/v1/rules", json={"src": lab.peer_ip6, "proto": "udp", "dport": "9000-9100"})
        assert r.status_code == 201, r.text
        assert r.json()["dport"] == "9000-9100"
        assert udp_roundtrip(lab, family=6, count=N, dport=9050) == 0
        assert udp_roundtrip(lab, family=6, count=N, dport=9200) == N
        assert rule_packets(c, r.json()["id"]) == N


def test_duplicate_add_returns_existing(server: Server) -> None:
    with server.client() as c:
        first = c.post("/v1/rules", json={"src": "198.18.200.0/24"})
        again = c.post("/v1/rules", json={"src": "198.18.200.0/24", "comment": "again"})
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        assert len(c.get("/v1/rules").json()["rules"]) == 1


BAD_RULES = [
    ({"src": "198.18.0.300"}, "src"),
    ({"src": "198.18.0.1/24"}, "src"),
    ({"src": "not-an-ip"}, "src"),
    ({"proto": "tcp", "dport": 70000}, "dport"),
    ({"proto": "tcp", "dport": "2000-1000"}, "dport"),
    ({"proto": "tcp", "dport": "22-"}, "dport"),
    ({"dport": 22}, "dport"),
    ({"proto": "icmp", "dport": 22}, "dport"),
    ({"src": "2001:db8::1", "proto": "icmp"}, "proto"),
    ({"src": "198.18.0.1", "proto": "icmpv6"}, "proto"),
    ({}, "rule"),
    ({"comment": "nothing to match"}, "rule"),
    ({"src": "198.18.0.1", "dst": "198.18.0.2"}, "dst"),
    ({"action": "allow", "mode": "monitor", "src": "198.18.0.1"}, "mode"),
    ({"src": "198.18.0.1", "action": "reject"}, "action"),
    ({"src": "198.18.0.1", "proto": "sctp"}, "proto"),
    ({"src": "198.18.0.1", "ttl_seconds": 0}, "ttl_seconds"),
    ({"src": "198.18.0.1", "bogus": 1}, "bogus"),
]


def test_validation_names_the_field(server: Server) -> None:
    with server.client() as c:
        for body, field in BAD_RULES:
            r = c.post("/v1/rules", json=body)
            assert r.status_code == 422, (body, r.text)
            locs = [d["loc"] for d in r.json()["errors"]]
            assert any(field in loc for loc in locs), (body, r.json())
        assert c.get("/v1/rules").json()["rules"] == []
        assert c.get("/v1/rules/12345").status_code == 404
        assert c.delete("/v1/rules/12345").status_code == 404
        assert c.get("/v1/rules?limit=0").status_code == 422


def test_auth(server: Server) -> None:
    mode = stat.S_IMODE(os.stat(server.state_dir / "token").st_mode)
    assert mode == 0o600
    with server.client() as c:
        rid = c.post("/v1/rules", json={"src": "198.18.201.1"}).json()["id"]
    calls = [
        ("POST", "/v1/rules", {"json": {"src": "198.18.201.2"}}),
        ("DELETE", f"/v1/rules/{rid}", {}),
        ("POST", "/v1/rules/bulk", {"json": [{"src": "198.18.201.3"}]}),
        ("POST", "/v1/interfaces", {"json": {"name": server.lab.host_if}}),
        ("DELETE", f"/v1/interfaces/{server.lab.host_if}", {}),
    ]
    with server.client(token=None) as anon, server.client(token="wrong") as wrong:
        for method, path, kw in calls:
            assert anon.request(method, path, **kw).status_code == 401, path
            assert wrong.request(method, path, **kw).status_code == 403, path
        # Reads need no token on a loopback-only listener.
        assert anon.get("/v1/rules").status_code == 200
        assert anon.get("/v1/stats").status_code == 200
        assert anon.get("/metrics").status_code == 200
    with server.client() as c:
        assert c.get(f"/v1/rules/{rid}").status_code == 200


def test_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDPFW_TOKEN"}
    proc = subprocess.run(
        [XDPFW, "serve", "--iface", "nosuch0", "--listen", "198.18.0.1:8000",
         "--state-dir", str(tmp_path / "s"), "--bpffs-dir", str(unique_pin_dir("x"))],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 2
    assert "without a token" in proc.stderr and "XDPFW_TOKEN" in proc.stderr


def test_bulk_text_and_json_all_or_nothing(server: Server) -> None:
    with server.client() as c:
        body = "# blocklist\n198.18.10.0/24 ; SBL1\n\n198.18.11.5  # a host\n2001:db8:10::/48\n"
        r = c.post("/v1/rules/bulk?comment=list&ttl_seconds=3600", content=body,
                   headers={"content-type": "text/plain"})
        assert r.status_code == 201, r.text
        assert r.json()["added"] == 3
        rules = c.get("/v1/rules").json()["rules"]
        assert {x["src"] for x in rules} == {"198.18.10.0/24", "198.18.11.5/32", "2001:db8:10::/48"}
        assert all(x["comment"] == "list" and x["expires_at"] for x in rules)

        bad = "198.18.12.1\nnope\n198.18.12.2\n198.18.12.3/16\n"
        r = c.post("/v1/rules/bulk", content=bad, headers={"content-type": "text/plain"})
        assert r.status_code == 422
        msg = r.json()["errors"][0]["msg"]
        assert "2, 4" in msg and "line 2" in msg and "line 4" in msg
        assert len(c.get("/v1/rules").json()["rules"]) == 3

        r = c.post("/v1/rules/bulk", json=[{"src": "198.18.13.1"}, {"dport": 5}])
        assert r.status_code == 422 and "element 1" in r.json()["errors"][0]["msg"]
        r = c.post("/v1/rules/bulk", json=[
            {"src": "198.18.13.1"}, {"proto": "udp", "dport": "53"}, {"src": "198.18.10.0/24"}])
        assert r.status_code == 201, r.text
        assert r.json()["added"] == 2 and r.json()["duplicates"] == 1
        assert len(c.get("/v1/rules").json()["rules"]) == 5


def test_pagination(server: Server) -> None:
    with server.client() as c:
        c.post("/v1/rules/bulk", content="\n".join(f"198.18.20.{i}" for i in range(1, 26)),
               headers={"content-type": "text/plain"})
        seen: list[int] = []
        cursor = None
        while True:
            params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/rules", params=params).json()
            seen += [r["id"] for r in page["rules"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == 25 and seen == sorted(seen)


def test_ttl_expires(server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        r = c.post("/v1/rules", json={"src": lab.peer_ip4, "ttl_seconds": 1})
        assert r.status_code == 201
        assert udp_roundtrip(lab, count=5) == 0
        deadline = time.monotonic() + 5
        while c.get(f"/v1/rules/{r.json()['id']}").status_code != 404:
            assert time.monotonic() < deadline, "TTL rule was not removed"
            time.sleep(0.2)
        assert udp_roundtrip(lab, count=5) == 5


def test_restart_adopts_and_keeps_filtering(server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        prog_id = c.get("/healthz").json()["prog_id"]
        keep = c.post("/v1/rules", json={"src": lab.peer_ip4}).json()
        ttl = c.post("/v1/rules", json={"src": "198.18.250.0/24", "ttl_seconds": 6}).json()
        assert udp_roundtrip(lab, count=N) == 0
        rules_before = c.get("/v1/rules").json()["rules"]

    assert server.stop() == 0
    # Service down: the program stays attached and keeps dropping and counting.
    assert udp_roundtrip(lab, count=N) == 0

    server.start()
    with server.client() as c:
        health = c.get("/healthz").json()
        assert health["prog_id"] == prog_id and health["adopted"] is True
        assert c.get("/v1/rules").json()["rules"] == rules_before
        assert rule_packets(c, keep["id"]) == 2 * N  # counted while we were down
        assert udp_roundtrip(lab, count=N) == 0
        assert rule_packets(c, keep["id"]) == 3 * N
        # The TTL survives the restart with its original expiry, then fires.
        assert c.get(f"/v1/rules/{ttl['id']}").json()["expires_at"] == ttl["expires_at"]
        deadline = time.monotonic() + 10
        while c.get(f"/v1/rules/{ttl['id']}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_interfaces_detach_and_attach(server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        c.post("/v1/rules", json={"src": lab.peer_ip4})
        listed = c.get("/v1/interfaces").json()
        assert listed[0]["name"] == lab.host_if and listed[0]["attached"]
        assert c.delete(f"/v1/interfaces/{lab.host_if}").status_code == 204
        assert udp_roundtrip(lab, count=5) == 5
        assert c.get("/healthz").status_code == 503
        assert c.delete(f"/v1/interfaces/{lab.host_if}").status_code == 404
        r = c.post("/v1/interfaces", json={"name": lab.host_if, "mode": "generic"})
        assert r.status_code == 201 and r.json()["mode"] == "generic"
        assert udp_roundtrip(lab, count=5) == 0
        assert c.post("/v1/interfaces", json={"name": "xfw-nosuch0"}).status_code == 404


def test_concurrent_writers_agree(server: Server) -> None:
    """8 clients x 40 random adds/removes: afterwards the API, the DB and the maps agree."""
    errors: list[str] = []

    def worker(seed: int) -> None:
        try:
            run_worker(seed)
        except Exception as exc:  # a dead thread must fail the test, not vanish
            errors.append(f"worker {seed}: {exc!r}")

    def run_worker(seed: int) -> None:
        rng = Random(seed)
        mine: list[int] = []
        with server.client() as c:
            for _ in range(40):
                if mine and rng.random() < 0.4:
                    rid = mine.pop(rng.randrange(len(mine)))
                    r = c.delete(f"/v1/rules/{rid}")
                    if r.status_code != 204:
                        errors.append(f"delete {rid}: {r.status_code} {r.text}")
                else:
                    src = f"198.18.{rng.randrange(100, 140)}.{rng.randrange(1, 255)}"
                    r = c.post("/v1/rules", json={"src": src, "proto": "udp",
                                                  "dport": str(rng.randrange(1, 5))})
                    if r.status_code == 201:
                        mine.append(r.json()["id"])
                    elif r.status_code != 200:
                        errors.append(f"add: {r.status_code} {r.text}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    with server.client() as c:
        api_rules = {r["id"]: r for r in c.get("/v1/rules?limit=10000").json()["rules"]}
        stats_ids = {r["id"] for r in c.get("/v1/stats").json()["rules"]}
    assert set(api_rules) == stats_ids  # per-rule counters exist exactly for listed rules
    server.stop()
    import sqlite3

    db = sqlite3.connect(server.state_dir / "rules.sqlite3")
    db_ids = {row[0] for row in db.execute("SELECT id FROM rules")}
    db.close()
    from xdpfw.datapath import Datapath, DatapathConfig

    dp = Datapath.open(DatapathConfig(bpffs_dir=server.bpffs_dir))
    try:
        map_rules = {r.id: r for r in dp.rules()}
    finally:
        dp.close()
    assert db_ids == set(api_rules) == set(map_rules)
    for rid, r in api_rules.items():
        assert map_rules[rid].src is not None
        assert map_rules[rid].src.with_prefixlen == r["src"]
        assert str(map_rules[rid].dport) == r["dport"]


def test_sigterm_keeps_program_and_pins(server: Server) -> None:
    with server.client() as c:
        prog_id = c.get("/healthz").json()["prog_id"]
    assert server.stop(signal.SIGTERM) == 0
    assert (server.bpffs_dir / "prog").exists()
    out = subprocess.run(["ip", "-d", "link", "show", server.lab.host_if],
                         capture_output=True, text=True).stdout
    assert f"prog/xdp id {prog_id}" in out


def _demo(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [XDPFW, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "demo"),
         "--bpffs-dir", str(tmp_path_pin(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def tmp_path_pin(tmp_path: Path) -> Path:
    return Path("/sys/fs/bpf") / f"xdpfw-test-demo-{tmp_path.name[-12:].replace('.', '')}"


def test_demo_lab_starts_twice_and_cleans_up(tmp_path: Path) -> None:
    """`make run` with no interface: a demo lab, removed with the pins on Ctrl-C."""
    from tests.server import free_port

    for _ in range(2):  # the second start must not trip over the first lab's leftovers
        port = free_port()
        proc = _demo(tmp_path, port)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert health.status_code == 200, health.text
            lab_if = health.json()["interfaces"][0]["name"]
            assert lab_if.startswith("xfw-demo")
        finally:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, out
        assert "ip netns exec" in out  # the printed walk-through
        assert not tmp_path_pin(tmp_path).exists()
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert lab_if not in links
