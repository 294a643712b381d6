"""End to end: a rate-limit rule added with the real CLI to the real server, real datagrams
through the veth lab, and the limited / banned counts and bans read back over the API and the
CLI (issue 16)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique_pin_dir
from tests.server import Server, running_server
from tests.test_e2e_cli import cli, ok
from tests.traffic import udp_roundtrip

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("floods"), unique_pin_dir("floods")) as srv:
        yield srv


def test_a_limit_rule_from_the_cli_limits_real_traffic_and_bans(server: Server) -> None:
    assert udp_roundtrip(server.lab, count=10) == 10
    out = ok(server, "rule", "add", "--src", server.lab.peer_ip4, "--proto", "udp",
             "--limit", "1/s", "--burst", "5", "--ban", "1h", "--json")
    rule = json.loads(out)
    assert rule["action"] == "limit"
    assert rule["limit"] == {"pps": 1, "burst": 5, "bps": None, "burst_bytes": None,
                             "per": "source", "ban_seconds": 3600}
    # 30 datagrams back to back: the burst passes, the sixth goes over and bans the source
    assert udp_roundtrip(server.lab, count=30) == 5
    assert udp_roundtrip(server.lab, count=5) == 0  # banned: nothing, however slow
    shown = json.loads(ok(server, "rule", "show", str(rule["id"]), "--json"))
    assert shown["counters"]["limit"] == {"passed": 5, "limited": 1, "banned": 29}
    text = ok(server, "rule", "show", str(rule["id"]))
    assert "limited" in text and "banned" in text and "limit 1/s burst 5" in text
    stats = ok(server, "stats")
    assert "LIMITED" in stats and "1 +29 banned" in stats
    with server.client() as c:
        bans = c.get("/v1/limits/banned").json()["bans"]
        assert [(b["rule_id"], b["source"]) for b in bans] == [(rule["id"], server.lab.peer_ip4)]
        assert 3500 < bans[0]["expires_in"] <= 3600
        assert c.get("/v1/stats").json()["totals"]["limited"] >= 30
    # the CLI lists the same ban and lifts it: the source gets its burst back
    listed = json.loads(ok(server, "ban", "ls", "--json"))["bans"]
    assert [(b["rule_id"], b["source"]) for b in listed] == [(rule["id"], server.lab.peer_ip4)]
    assert server.lab.peer_ip4 in ok(server, "ban", "ls")
    assert ok(server, "ban", "rm", "--source", server.lab.peer_ip4) == "lifted 1 ban\n"
    assert ok(server, "ban", "ls") == "no bans\n"
    assert udp_roundtrip(server.lab, count=3) == 3
    ok(server, "rule", "rm", str(rule["id"]))
    assert udp_roundtrip(server.lab, count=10) == 10


def test_bad_limit_flags_exit_2_with_the_flag_named(server: Server, tmp_path: Path) -> None:
    p = cli(server, "rule", "add", "--src", "198.18.250.1", "--limit", "fast")
    assert p.returncode == 2 and "--limit" in p.stderr
    p = cli(server, "rule", "add", "--proto", "udp", "--tcp-flags", "syn")
    assert p.returncode == 2 and "tcp_flags needs proto tcp" in p.stderr, p.stderr
    p = cli(server, "rule", "add", "--src", "198.18.250.1", "--limit", "0/s")
    assert p.returncode == 2 and "pps must be" in p.stderr, p.stderr
