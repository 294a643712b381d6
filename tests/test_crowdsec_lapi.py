"""End to end with the real CrowdSec: Debian's LAPI (`crowdsec -no-cs`, private config, db and
port: tests/crowdsec_lapi.py), decisions driven with the real `cscli`, the real `xdpfw serve`
process pulling them every second, and real packets on a veth lab.

One LAPI and one server for the module (each starts in a few seconds); the tests run in
order and each leaves no decision behind it. Nothing keeps running afterwards: the fixtures
stop the LAPI and the server, and the last test checks no crowdsec process is left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import unique_pin_dir
from tests.crowdsec_lapi import Lapi, crowdsec_missing, private_lapi, system_crowdsec_pids
from tests.server import XDPFW, Server, running_server
from tests.traffic import no_leaked_labs, udp_arrives, udp_roundtrip

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(crowdsec_missing() is not None, reason=str(crowdsec_missing())),
]

INTERVAL = 1.0  # --crowdsec-interval of the server under test
WITHIN = INTERVAL + 2.5  # one poll, plus slack for a loaded 2-core machine
SCENARIO = "crowdsecurity/ssh-bf"


@pytest.fixture(scope="module")
def lapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lapi]:
    with private_lapi(tmp_path_factory.mktemp("lapi")) as lp:
        yield lp


@pytest.fixture(scope="module")
def server(lapi: Lapi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("xdpfw")
    key = tmp / "crowdsec.key"
    key.write_text(lapi.bouncer_key("xdpfw-e2e") + "\n")
    key.chmod(0o600)
    with no_leaked_labs("xfw"), running_server(tmp, unique_pin_dir("crowdsec"), start=False) as srv:
        srv.extra_args = [
            "--max-rules", "32768",
            "--crowdsec-lapi", lapi.url,
            "--crowdsec-key-file", str(key),
            "--crowdsec-interval", f"{INTERVAL:g}s",
        ]  # fmt: skip
        srv.start()
        yield srv


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def crowdsec_rules(c: httpx.Client) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        params: dict[str, str | int] = {"source": "crowdsec", "limit": 10_000}
        if cursor:
            params["cursor"] = cursor
        page = c.get("/v1/rules", params=params).json()
        out.update({r["src"]: r for r in page["rules"]})
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def crowdsec_health(c: httpx.Client) -> dict[str, Any]:
    block: dict[str, Any] = c.get("/healthz").json()["crowdsec"]
    return block


def metric(c: httpx.Client, sample: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


def rule_packets(c: httpx.Client, rule_id: int) -> int:
    rule = c.get(f"/v1/rules/{rule_id}").json()
    packets: int = rule["counters"]["packets"]
    return packets


def xdpfw(server: Server, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDPFW_")}
    p = subprocess.run(
        [XDPFW, "--api", server.url, "--state-dir", str(server.state_dir), *args],
        capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "200"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout


def v6_net(server: Server) -> str:
    return str(ipaddress.ip_interface(f"{server.lab.peer_ip6}/64").network)


def test_bans_drop_real_packets_within_one_interval_and_deletes_pass(
    lapi: Lapi, server: Server
) -> None:
    lab = server.lab
    with server.client() as c:
        wait_for("first pull", lambda: crowdsec_health(c)["state"] == "ok", 10)
        assert udp_arrives(lab) and udp_arrives(lab, family=10)

        lapi.add(ip=lab.peer_ip4, reason=SCENARIO)
        took = wait_for("the Ip ban", lambda: f"{lab.peer_ip4}/32" in crowdsec_rules(c), WITHIN)
        rule = crowdsec_rules(c)[f"{lab.peer_ip4}/32"]
        assert rule["action"] == "drop" and rule["comment"] == SCENARIO
        assert rule["sources"] == ["crowdsec"]
        expires = datetime.fromisoformat(rule["expires_at"]).timestamp()
        assert abs(expires - time.time() - 4 * 3600) < 60  # TTL = the decision's duration
        assert udp_roundtrip(lab, count=10) == 0  # real packets dropped...
        assert rule_packets(c, rule["id"]) == 10  # ...and credited to the rule, exactly
        assert udp_arrives(lab, family=10)  # IPv6 untouched
        # The README's "Verify" steps, through the real CLI.
        listed = xdpfw(server, "rule", "ls", "--source", "crowdsec")
        assert f"{lab.peer_ip4}/32" in listed and SCENARIO in listed
        assert f"{lab.peer_ip4}/32" in xdpfw(server, "source", "show", "crowdsec")
        assert f"crowdsec    ok  ({lapi.url})" in xdpfw(server, "status")

        lapi.add(range_=v6_net(server), duration="1h")
        wait_for("the IPv6 Range ban", lambda: not udp_arrives(lab, family=10, timeout=0.3),
                 WITHIN)  # fmt: skip
        lapi.add(ip="198.51.100.77", kind="captcha")
        wait_for("the captcha counted", lambda: crowdsec_health(c)["ignored"] >= 1, WITHIN)
        assert crowdsec_health(c)["ignored_kinds"] == {"type captcha": 1}
        assert "198.51.100.77/32" not in crowdsec_rules(c)

        t0 = time.monotonic()
        lapi.delete(ip=lab.peer_ip4)
        wait_for("the Ip unban", lambda: udp_arrives(lab, timeout=0.3), WITHIN)
        lapi.delete(range_=v6_net(server))
        wait_for("the Range unban", lambda: udp_arrives(lab, family=10, timeout=0.3), WITHIN)
        unban = time.monotonic() - t0
        assert crowdsec_rules(c) == {}
        assert udp_roundtrip(lab, count=10) == 10
        assert metric(c, 'xdpfw_crowdsec_decisions_total{event="applied"}') == 2
        assert metric(c, 'xdpfw_crowdsec_decisions_total{event="deleted"}') == 2
        assert metric(c, 'xdpfw_crowdsec_decisions_total{event="ignored"}') == 1
        assert metric(c, "xdpfw_crowdsec_up") == 1
        assert metric(c, "xdpfw_crowdsec_lapi_errors_total") == 0
        assert time.time() - metric(c, "xdpfw_crowdsec_last_pull_timestamp_seconds") < 5
        print(f"ban enforced {took:.2f} s after cscli returned; two unbans in {unban:.2f} s")
    lapi.cscli("decisions", "delete", "--type", "captcha")


def test_crowdsec_never_removes_other_sources_rules(lapi: Lapi, server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        r = c.post("/v1/rules", json={"src": lab.peer_ip4, "comment": "by hand"})
        assert r.status_code == 201, r.text
        mine = r.json()["id"]
        lapi.add(ip=lab.peer_ip4, reason=SCENARIO)
        wait_for("crowdsec holds it too",
                 lambda: c.get(f"/v1/rules/{mine}").json()["sources"] == ["api", "crowdsec"],
                 WITHIN)  # fmt: skip
        lapi.delete(ip=lab.peer_ip4)
        wait_for("crowdsec lets go", lambda: not crowdsec_rules(c), WITHIN)
        rule = c.get(f"/v1/rules/{mine}").json()
        assert rule["sources"] == ["api"] and rule["comment"] == "by hand"
        assert udp_roundtrip(lab, count=5) == 0  # the hand rule still drops
        assert c.delete(f"/v1/rules/{mine}").status_code == 204
        assert udp_roundtrip(lab, count=5) == 5


def test_lapi_killed_and_restarted_loses_nothing(lapi: Lapi, server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        lapi.add(ip=lab.peer_ip4, reason=SCENARIO)
        wait_for("the ban", lambda: not udp_arrives(lab, timeout=0.3), WITHIN)
        errors_before = metric(c, "xdpfw_crowdsec_lapi_errors_total")
        lapi.kill()
        wait_for("LAPI reported away", lambda: crowdsec_health(c)["state"] == "unreachable", 10)
        health = c.get("/healthz")
        assert health.status_code == 200  # filtering is fine; the block says what is wrong
        block = health.json()["crowdsec"]
        assert "cannot reach the CrowdSec LAPI" in block["last_error"]
        assert metric(c, "xdpfw_crowdsec_up") == 0
        assert metric(c, "xdpfw_crowdsec_lapi_errors_total") > errors_before
        assert f"{lab.peer_ip4}/32" in crowdsec_rules(c)  # kept while the LAPI is away
        assert udp_roundtrip(lab, count=5) == 0

        lapi.start()
        lapi.delete(ip=lab.peer_ip4)  # changes made right after the LAPI came back
        lapi.add(range_=v6_net(server), reason=SCENARIO)
        # The backoff (1 s doubling) plus the resync after an outage: within about 10 s.
        wait_for("the unban after the restart", lambda: udp_arrives(lab, timeout=0.3), 15)
        wait_for("the new ban after the restart",
                 lambda: not udp_arrives(lab, family=10, timeout=0.3), 15)  # fmt: skip
        block = crowdsec_health(c)
        assert block["state"] == "ok" and block["last_error"] is None
        assert set(crowdsec_rules(c)) == {v6_net(server)}
        assert metric(c, "xdpfw_crowdsec_up") == 1


def test_restart_resyncs_and_a_10k_startup_stream_loads_in_seconds(
    lapi: Lapi, server: Server
) -> None:
    lab = server.lab
    assert server.stop() == 0
    # While xdpfw is down: the IPv6 ban of the last test is deleted (the stream cursor never
    # says so to a bouncer that restarts), 10,000 decisions arrive, and one for the lab.
    lapi.delete(range_=v6_net(server))
    ips = [str(ipaddress.IPv4Address("100.64.0.0") + i) for i in range(10_000)]
    t0 = time.monotonic()
    lapi.import_ips(ips, reason="xdpfw-test/bulk")
    imported = time.monotonic() - t0
    lapi.add(ip=lab.peer_ip4, reason=SCENARIO)
    t0 = time.monotonic()
    server.start()
    up = time.monotonic() - t0
    with server.client() as c:
        took = wait_for("10,001 bans", lambda: len(crowdsec_rules(c)) == 10_001, 30)
        block = crowdsec_health(c)
        assert block["state"] == "ok" and block["applied"] == 10_001
        rules = crowdsec_rules(c)
        assert v6_net(server) not in rules  # deleted while we were away: gone
        assert rules["100.64.39.15/32"]["comment"] == "xdpfw-test/bulk"
        assert udp_roundtrip(lab, count=5) == 0
        assert udp_arrives(lab, family=10)
        src = c.get("/v1/sources/crowdsec").json()
        assert src["rules"] == 10_001
        print(f"cscli import of 10,000: {imported:.2f} s; server up in {up:.2f} s, then "
              f"10,001 rules enforced after {took:.2f} s more")  # fmt: skip
        assert took < 10, f"the 10,000-decision startup stream took {took:.1f} s to load"
        t0 = time.monotonic()
        lapi.delete_all()
        wait_for("every decision deleted", lambda: not crowdsec_rules(c), 30)
        print(f"10,001 deletions applied in {time.monotonic() - t0:.2f} s")
        assert udp_arrives(lab)


def test_nothing_of_crowdsec_runs_but_our_lapi(lapi: Lapi) -> None:
    assert lapi.proc is not None and lapi.proc.poll() is None
    assert system_crowdsec_pids() == []  # the Debian service was never started
    info = json.loads(lapi.cscli("bouncers", "list", "-o", "json"))
    assert [b["name"] for b in info] == ["xdpfw-e2e"]
