"""Rule sources end to end: the real `xdpfw serve` process on a veth lab, real packets.

- a replace of a few thousand entries under continuous traffic: an address listed before and
  after never passes (leaks counted per packet: zero), one only in the new list is dropped
  from the moment the call returns;
- the server killed by SIGKILL inside a replace's transaction: after the restart the source
  is entirely the old version, in SQLite and in the maps (packets prove the maps);
- a version-1 database (built by the old schema's SQL) migrated by the real server;
- sources independent with real packets, a TTL extended by a re-add, delete by value (CLI);
- the real published lists (tests/corpus/lists/) on a service started with --protect for a
  range FireHOL level 1 lists (198.18.0.0/15: the lab's own network).
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.store import SCHEMA_VERSION
from tests.conftest import unique_pin_dir
from tests.server import XDPFW, Server, running_server
from tests.test_sources_pure import V1_SCHEMA
from tests.traffic import udp_roundtrip
from xdpfw import importers
from xdpfw.kernel import netlink

pytestmark = pytest.mark.e2e

LISTS = Path(__file__).parent / "corpus" / "lists"
PLAIN = {"content-type": "text/plain"}
BIG = ["--max-rules", "65536", "--max-prefixes", "65536", "--max-sets", "4096"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, unique_pin_dir("src")) as srv:
        yield srv


def put(c: httpx.Client, name: str, body: str, **params: str) -> httpx.Response:
    return c.put(f"/v1/sources/{name}", content=body, params=params, headers=PLAIN, timeout=120)


def lines(nets: list[str]) -> str:
    return "".join(f"{n}\n" for n in nets)


def cli(srv: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [XDPFW, "--api", srv.url, "--token", srv.token, *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


class Probes:
    """Source addresses added to the lab's peer, each sending UDP to the host; arrivals are
    counted per source address and per phase (0: before the change returned, 1: after)."""

    def __init__(self, srv: Server, hosts: list[int]) -> None:
        lab = srv.lab
        self.base = lab.peer_ip4.rsplit(".", 1)[0]
        self.addrs = [f"{self.base}.{h}" for h in hosts]
        for a in self.addrs:
            netlink.addr_add(lab.peer_if, f"{a}/24", netns=lab.netns)
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.rx.bind((lab.host_ip4, 0))
        self.rx.settimeout(0.2)
        self.port = self.rx.getsockname()[1]
        self.tx: list[socket.socket] = []
        for a in self.addrs:
            s = netlink.socket_in_netns(lab.netns, socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((a, 0))
            self.tx.append(s)
        self.host = lab.host_ip4
        self.phase = 0
        self.sent: Counter[tuple[str, int]] = Counter()
        self.got: Counter[tuple[str, int]] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.rx.recvfrom(256)
            except TimeoutError:
                continue
            addr, phase = data.decode().split()
            self.got[(addr, int(phase))] += 1

    def _send(self) -> None:
        while not self._stop.is_set():
            self.round()
            time.sleep(0.002)

    def round(self) -> None:
        phase = self.phase
        for a, s in zip(self.addrs, self.tx, strict=True):
            s.sendto(f"{a} {phase}".encode(), (self.host, self.port))
            self.sent[(a, phase)] += 1

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._receive, daemon=True)]
        self._threads[0].start()

    def stream(self) -> None:
        t = threading.Thread(target=self._send, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        time.sleep(0.3)  # the last datagrams in flight
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in [self.rx, *self.tx]:
            s.close()

    def arrived(self, hosts: range | list[int], phase: int | None = None) -> int:
        return sum(n for (a, p), n in self.got.items()
                   if int(a.rsplit(".", 1)[1]) in hosts and (phase is None or p == phase))

    def sent_from(self, hosts: range | list[int], phase: int | None = None) -> int:
        return sum(n for (a, p), n in self.sent.items()
                   if int(a.rsplit(".", 1)[1]) in hosts and (phase is None or p == phase))


def filler(n: int, offset: int) -> list[str]:
    """n distinct /32s and /28s outside the lab (203.0.113/24 style ranges of 10/8)."""
    out = []
    for i in range(n):
        k = offset + i
        out.append(f"10.{(k >> 12) & 0xFF}.{(k >> 4) & 0xFF}.{(k & 0xF) << 4}/28" if k % 7 == 0
                   else f"10.{(k >> 16) & 0xFF}.{(k >> 8) & 0xFF}.{k & 0xFF}")
    return sorted(set(out))


BOTH = range(10, 30)  # listed as /32 in both versions
COVER = range(32, 48)  # a /28 in the old version, hosts in the new one
OLD_ONLY = range(60, 70)
NEW_ONLY = range(70, 80)
CONTROL = [100]  # never listed


def test_a_replace_under_traffic_never_passes_an_address_of_both_versions(
    server: Server,
) -> None:
    base = server.lab.peer_ip4.rsplit(".", 1)[0]
    hosts = [*BOTH, *COVER, *OLD_ONLY, *NEW_ONLY, *CONTROL]
    old = [f"{base}.{h}" for h in [*BOTH, *OLD_ONLY]] + [f"{base}.32/28"] + filler(3000, 0)
    new = ([f"{base}.{h}" for h in [*BOTH, *COVER, *NEW_ONLY]]
           + filler(300, 2700) + filler(2700, 100_000))  # 300 kept, 2700 out, 2700 in
    probes = Probes(server, hosts)
    with server.client() as c:
        r = put(c, "feed", lines(old))
        assert r.status_code == 200, r.text
        ids = {x["src"]: x["id"] for x in c.get("/v1/rules", params={"source": "feed",
                                                                     "limit": 10_000}
                                                ).json()["rules"]}
        probes.start()
        probes.round()
        time.sleep(0.3)
        assert probes.arrived(CONTROL) == 1 and probes.arrived(NEW_ONLY) == len(NEW_ONLY)
        assert probes.arrived([*BOTH, *COVER, *OLD_ONLY]) == 0
        probes.stream()
        time.sleep(0.3)
        t0 = time.monotonic()
        r = put(c, "feed", lines(new))
        took = time.monotonic() - t0
        probes.phase = 1  # every datagram sent from now on was sent after the call returned
        assert r.status_code == 200, r.text
        change = r.json()
        time.sleep(0.5)
        probes.stop()
        assert (change["added"], change["removed"]) == (len(new) - 300 - len(BOTH),
                                                        len(old) - 300 - len(BOTH))
        after = {x["src"]: x["id"] for x in c.get("/v1/rules", params={"source": "feed",
                                                                       "limit": 10_000}
                                                  ).json()["rules"]}
        stats = {s["id"]: s["packets"] for s in c.get("/v1/stats").json()["rules"]}
    # the leak count: not one datagram from an address of both versions passed
    assert probes.sent_from([*BOTH, *COVER], 0) > 20 * len([*BOTH, *COVER]), probes.sent
    assert probes.arrived([*BOTH, *COVER]) == 0, probes.got
    # only in the new version: dropped once the call returned (not one arrival sent after)
    assert probes.sent_from(NEW_ONLY, 1) > 0
    assert probes.arrived(NEW_ONLY, 1) == 0, probes.got
    # only in the old version: passes afterwards; the control always did
    assert probes.arrived(OLD_ONLY, 1) > 0 and probes.arrived(CONTROL, 1) > 0
    # the addresses of both versions kept their rules (ids), which counted the traffic
    for h in BOTH:
        key = f"{base}.{h}/32"
        assert after[key] == ids[key]
        assert stats[after[key]] >= probes.sent_from([h]) * 0.9
    print(f"replace of {len(old)} -> {len(new)} entries took {took:.2f}s under traffic")


def _wait_log(srv: Server, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in srv.output():
        assert time.monotonic() < deadline, srv.output()[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["replace", "replace-committed"])
def test_killed_inside_a_replace_one_version_wins(server: Server, where: str) -> None:
    """SIGKILL before the COMMIT: the old version, entirely; after it (the old-only rules
    still in the maps): the new one, entirely. The start-up reconcile fixes the maps."""
    lab = server.lab
    peer = lab.peer_ip4
    old = [peer, "198.18.250.0/24", *filler(500, 0)]
    new = ["198.18.251.0/24", *filler(500, 50_000)]  # the peer only in the old version
    with server.client() as c:
        assert put(c, "feed", lines(old)).status_code == 200
        before = c.get("/v1/sources/feed").json()
        rows_before = c.get("/v1/rules", params={"source": "feed", "limit": 10_000}).json()
    assert udp_roundtrip(lab, count=5) == 0
    assert server.stop() == 0
    server.env = {"XDPFW_TEST_PAUSE": f"{where}=60"}
    server.start()
    errors: list[BaseException] = []

    def replace() -> None:
        try:
            with server.client() as c2:
                put(c2, "feed", lines(new))
        except httpx.HTTPError as exc:  # the server dies under the call
            errors.append(exc)

    t = threading.Thread(target=replace, daemon=True)
    t.start()
    _wait_log(server, f"test pause: {where} ")
    # Both versions are in the maps at this point: the peer is still dropped.
    assert udp_roundtrip(lab, count=5) == 0
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.proc = None
    t.join(10)
    assert errors, "the replace answered although the server was killed inside it"
    server.env = {}
    server.start()
    with server.client() as c:
        after = c.get("/v1/sources/feed").json()
        rows = c.get("/v1/rules", params={"source": "feed", "limit": 10_000}).json()
        health = c.get("/healthz").json()
        srcs = {r["src"] for r in rows["rules"]}
    if where == "replace":  # not committed: the old version
        assert after["rules"] == before["rules"] == len(old)
        assert after["updated_at"] == before["updated_at"]
        assert rows == rows_before
        assert udp_roundtrip(lab, count=5) == 0  # the old version drops the peer
    else:  # committed: the new version
        assert after["rules"] == len(new) and srcs == {
            n if "/" in n else f"{n}/32" for n in new}
        assert udp_roundtrip(lab, count=5) == 5  # the peer's old-only rule left the maps
    assert health["rules"] == after["rules"]  # the maps hold that version only
    assert health["capacity"]["rules"]["entries"] == after["rules"]
    # and the replace again, uninterrupted, gives the new version either way
    with server.client() as c:
        r = put(c, "feed", lines(new))
        assert r.status_code == 200 and r.json()["unchanged"] == (
            0 if where == "replace" else len(new))
    assert udp_roundtrip(lab, count=5) == 5


def test_a_v1_database_is_migrated_by_the_server(tmp_path: Path) -> None:
    with running_server(tmp_path, unique_pin_dir("srcv1"), start=False) as srv:
        srv.state_dir.mkdir(parents=True)
        db = sqlite3.connect(srv.state_dir / "rules.sqlite3")
        db.executescript(V1_SCHEMA)
        db.execute(
            "INSERT INTO rules (action, mode, src, comment, created_at) VALUES"
            " ('drop', 'enforce', ?, 'from v1', 1700000002.5)", (f"{srv.lab.peer_ip4}/32",)
        )
        db.commit()
        db.close()
        srv.start()
        assert udp_roundtrip(srv.lab, count=5) == 0  # the v1 rule is enforced
        with srv.client() as c:
            rules = c.get("/v1/rules").json()["rules"]
            assert [(r["src"], r["source"], r["comment"]) for r in rules][-1] == (
                f"{srv.lab.peer_ip4}/32", "api", "from v1")
            assert c.delete("/v1/rules", params={"src": srv.lab.peer_ip4}).json() == {
                "removed": 1}
        assert udp_roundtrip(srv.lab, count=5) == 5
        out = srv.output()
        assert "migrated" in out and f"schema version 1 to {SCHEMA_VERSION}" in out
        db = sqlite3.connect(srv.state_dir / "rules.sqlite3")
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.close()


def test_sources_are_independent_with_real_packets(server: Server) -> None:
    lab = server.lab
    peer = lab.peer_ip4
    with server.client() as c:
        assert put(c, "a", lines([peer, "198.18.252.1"])).status_code == 200
        assert put(c, "b", lines([f"{peer}/32"])).status_code == 200
        rid = c.get("/v1/sources/b").json()["page"]["rules"][0]["id"]
        assert c.get(f"/v1/rules/{rid}").json()["sources"] == ["a", "b"]
        assert udp_roundtrip(lab, count=5) == 0
        # the shared rule is one rule: its counters show in both sums
        sums = {s["name"]: s["packets"] for s in c.get("/v1/sources").json()}
        assert sums == {"a": 5, "b": 5}
        assert c.delete("/v1/sources/a").json() == {"removed": 2}
        assert udp_roundtrip(lab, count=5) == 0  # b still lists it
        assert put(c, "b", lines(["198.18.252.2"])).json()["removed"] == 1
        assert udp_roundtrip(lab, count=5) == 5  # its last holder let it go


def test_ttl_refresh_and_delete_by_value_with_the_cli(server: Server) -> None:
    lab = server.lab
    peer = lab.peer_ip4
    r = cli(server, "rule", "add", "--src", peer, "--ttl", "2s", "--source", "f2b")
    assert r.returncode == 0, r.stderr
    r = cli(server, "rule", "add", "--src", peer, "--ttl", "1h", "--source", "f2b")
    assert r.returncode == 0 and "already exists" in r.stderr and "source f2b" in r.stderr
    time.sleep(3)  # past the first TTL (the sweeper runs every 0.5 s)
    assert udp_roundtrip(lab, count=5) == 0  # extended: still dropped
    # a second holder; removing f2b's holding by value keeps the rule for it
    assert cli(server, "rule", "add", "--src", peer, "--source", "manual").returncode == 0
    r = cli(server, "rule", "rm", "--src", peer, "--source", "f2b")
    assert r.returncode == 0 and r.stdout.startswith("removed 1"), r.stdout + r.stderr
    assert udp_roundtrip(lab, count=5) == 0
    r = cli(server, "rule", "ls", "--source", "manual")
    assert r.returncode == 0 and f"{peer}/32" in r.stdout and "manual" in r.stdout
    r = cli(server, "rule", "rm", "--src", peer)
    assert r.returncode == 0 and r.stdout.startswith("removed 1")
    assert udp_roundtrip(lab, count=5) == 5
    r = cli(server, "rule", "rm", "--src", peer)
    assert r.returncode == 1 and r.stdout.startswith("removed 0")


def parsed(name: str) -> list[str]:
    return [e.cidr for e in importers.parse_blocklist(
        importers.lines_of((LISTS / name).read_text())).entries]


def test_real_lists_on_a_protected_service(tmp_path: Path) -> None:
    with running_server(tmp_path, unique_pin_dir("srclists"), start=False) as srv:
        srv.extra_args = [*BIG, "--protect", "198.18.0.0/15"]
        srv.start(timeout=120)
        lab = srv.lab
        level1, level2 = parsed("firehol_level1.netset"), parsed("firehol_level2.netset")
        assert "198.18.0.0/15" in level1 and "10.0.0.0/8" in level1
        # `xdpfw source replace` with the file as published: loads, names the overlap
        r = cli(srv, "source", "replace", "firehol_level1",
                str(LISTS / "firehol_level1.netset"))
        assert r.returncode == 0, r.stderr
        assert f"added {len(level1)}" in r.stdout and "overlaps    1 entries" in r.stdout
        assert "198.18.0.0/15" in r.stdout
        # the lab's own network is listed by FireHOL and protected: it still passes
        assert udp_roundtrip(lab, count=5) == 5
        with srv.client() as c:
            # the rest, each as its own source (text bodies as published)
            for name, f in (("firehol_level2", "firehol_level2.netset"),
                            ("spamhaus_drop", "spamhaus_drop.txt"),
                            ("spamhaus_edrop", "spamhaus_edrop.txt"),
                            ("spamhaus_dropv6", "spamhaus_dropv6.txt")):
                r = put(c, name, (LISTS / f).read_text())
                assert r.status_code == 200, r.text
                assert r.json()["added"] == len(parsed(f)) and r.json()["removed"] == 0
            sources = {s["name"]: s["rules"] for s in c.get("/v1/sources").json()}
            assert sources == {
                "firehol_level1": len(level1), "firehol_level2": len(level2),
                "spamhaus_drop": len(parsed("spamhaus_drop.txt")),
                "spamhaus_edrop": len(parsed("spamhaus_edrop.txt")),
                "spamhaus_dropv6": len(parsed("spamhaus_dropv6.txt")),
            }
            union = set(level1) | set(level2) | {
                *parsed("spamhaus_drop.txt"), *parsed("spamhaus_edrop.txt"),
                *parsed("spamhaus_dropv6.txt")}
            assert c.get("/healthz").json()["rules"] == len(union)  # shared entries: one rule
            shared = sorted(set(level1) & set(level2))
            assert shared  # the real lists overlap
            # level 2 gone: what level 1 also lists stays
            assert c.delete("/v1/sources/firehol_level2").json() == {"removed": len(level2)}
            rest = set(level1) | {*parsed("spamhaus_drop.txt"), *parsed("spamhaus_edrop.txt"),
                                  *parsed("spamhaus_dropv6.txt")}
            assert c.get("/healthz").json()["rules"] == len(rest)
            page = c.get("/v1/rules", params={"source": "firehol_level1", "limit": 10_000}
                         ).json()["rules"]
            assert {r["src"] for r in page} == set(level1)
        # export reads back: the same list again changes nothing
        r = cli(srv, "source", "export", "firehol_level1")
        assert r.returncode == 0 and len(r.stdout.splitlines()) == len(level1) + 1
        r2 = cli(srv, "import", "-", "--source", "firehol_level1", "--replace", stdin=r.stdout)
        assert r2.returncode == 0, r2.stderr
        assert f"unchanged {len(level1)}" in r2.stdout and "removed 0" in r2.stdout
        # plain `xdpfw import` of the list as published: loads (overlaps reported, not 409)
        r = cli(srv, "import", str(LISTS / "firehol_level1.netset"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "overlaps" in r.stdout and "198.18.0.0/15" in r.stdout
        assert udp_roundtrip(lab, count=5) == 5
