"""Rate-limit rules and TCP flags through the REST API, the store and the CLI parser (pure).

The real app, service and SQLite file over tests/fakes.py (its plans are the real
compiler's); what the kernel does with the rules is tests/test_limits_bpf.py and
tests/test_floods_kernel.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_api_pure import PROTECTED, Api, _api
from xdpfw.cli.parser import build_parser
from xdpfw.cli.rules import limit_body
from xdpfw.datapath import Ban, LimitCounters
from xdpfw.rules import Limit

pytestmark = pytest.mark.pure

SYN_LIMIT = {
    "action": "limit", "proto": "tcp", "dport": 80, "tcp_flags": "syn",
    "limit": {"pps": 100, "burst": 200, "ban_seconds": 600},
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = _api(tmp_path / "rules.sqlite3")
    yield a
    a.store.close()


def _detail(r: Any) -> str:
    assert r.status_code == 422, r.text
    return str(r.json()["detail"][0]["msg"])


def test_a_limit_rule_round_trips_and_reaches_the_datapath(api: Api) -> None:
    r = api.client.post("/v1/rules", json=SYN_LIMIT)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["action"] == "limit" and out["tcp_flags"] == "SYN,!ACK"
    assert out["limit"] == {"pps": 100, "burst": 200, "bps": None, "burst_bytes": None,
                            "per": "source", "ban_seconds": 600}
    rid = out["id"]
    assert api.dp.limits[rid] == Limit.parse(pps=100, burst=200, ban_seconds=600)
    # the same again: the same rule (200), not a second one
    again = api.client.post("/v1/rules", json=SYN_LIMIT)
    assert again.status_code == 200 and again.json()["id"] == rid
    # the same match with another budget: a conflict, not a silent duplicate
    other = {**SYN_LIMIT, "limit": {"pps": 5}}
    r = api.client.post("/v1/rules", json=other)
    assert r.status_code == 409 and "another limit" in r.text
    got = api.client.get(f"/v1/rules/{rid}").json()
    assert got["limit"]["pps"] == 100 and got["counters"]["limit"] == {
        "passed": 0, "limited": 0, "banned": 0,
    }


def test_limit_rules_survive_a_restart_with_their_budget(api: Api, tmp_path: Path) -> None:
    rid = api.client.post("/v1/rules", json=SYN_LIMIT).json()["id"]
    flags = api.client.post(
        "/v1/rules", json={"proto": "tcp", "tcp_flags": "RST", "src": "198.18.9.0/24"}
    ).json()["id"]
    api.store.close()
    again = _api(tmp_path / "rules.sqlite3")  # a new process: fresh maps, the same database
    try:
        assert again.dp.limits == {rid: Limit.parse(pps=100, burst=200, ban_seconds=600)}
        rules = {r.id: r for r in again.dp.rules()}
        assert str(rules[flags].tcp_flags) == "RST" and str(rules[rid].tcp_flags) == "SYN,!ACK"
        listed = again.client.get("/v1/rules").json()["rules"]
        assert [(r["id"], r["tcp_flags"]) for r in listed] == [(rid, "SYN,!ACK"), (flags, "RST")]
        # a second reconcile finds everything agreeing
        assert again.svc.reconcile() == {"adopted": 0, "added": 0, "removed": 0}
        # deleting the rule deletes its extras
        assert again.client.delete(f"/v1/rules/{rid}").status_code == 204
        assert again.store.limits() == {}
    finally:
        again.store.close()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"action": "limit", "src": "198.18.1.0/24"}, "needs"),
        ({"action": "limit", "src": "198.18.1.0/24", "limit": {}}, "needs a rate"),
        ({"action": "limit", "src": "198.18.1.0/24", "limit": {"pps": 0}}, "pps must be"),
        ({"action": "limit", "src": "198.18.1.0/24", "limit": {"bps": 0}}, "bps"),
        ({"action": "limit", "src": "198.18.1.0/24", "limit": {"pps": 5, "burst": 0}},
         "below one packet"),
        ({"action": "limit", "src": "198.18.1.0/24",
          "limit": {"bps": 5000, "burst_bytes": 100}}, "full frame"),
        ({"action": "limit", "src": "198.18.1.0/24",
          "limit": {"pps": 5, "per": "rule", "ban_seconds": 10}}, "per"),
        ({"src": "198.18.1.0/24", "limit": {"pps": 5}}, 'need \\"action\\": \\"limit\\"'),
        ({"proto": "udp", "tcp_flags": "syn"}, "tcp_flags needs proto tcp"),
        ({"src": "198.18.1.0/24", "tcp_flags": "syn"}, "tcp_flags needs proto tcp"),
        ({"proto": "tcp", "tcp_flags": "SYN,BOGUS"}, "not a TCP flag"),
        ({"proto": "tcp", "tcp_flags": "SYN,!SYN"}, "twice"),
        ({"action": "limit", "src": "198.18.1.0/24", "limit": {"pps": "5"}}, ""),
    ],
)
def test_bad_limit_and_flag_rules_answer_422(api: Api, body: dict[str, Any], words: str) -> None:
    r = api.client.post("/v1/rules", json=body)
    assert r.status_code == 422, r.text
    assert words in r.text
    assert api.client.get("/v1/rules").json()["rules"] == []


def test_a_limit_over_a_protected_prefix_needs_force(tmp_path: Path) -> None:
    api = _api(tmp_path / "p.sqlite3", protect=(PROTECTED,))
    try:
        body = {"action": "limit", "src": "198.18.255.0/25", "limit": {"pps": 10}}
        r = api.client.post("/v1/rules", json=body)
        assert r.status_code == 409 and "this limit rule" in r.text
        # monitor never drops: allowed; force adds it (protected sources stay allowed)
        assert api.client.post("/v1/rules", json={**body, "mode": "monitor"}).status_code == 201
        assert api.client.post("/v1/rules", json={**body, "force": True}).status_code == 201
    finally:
        api.store.close()


def test_stats_and_bans(api: Api) -> None:
    rid = api.client.post("/v1/rules", json=SYN_LIMIT).json()["id"]
    api.dp.hit(rid, 30, 1800)
    api.dp.limit_hits[rid] = LimitCounters(passed=10, limited=15, banned=5)
    stats = api.client.get("/v1/stats").json()
    assert "limited" in stats["totals"]
    [row] = [r for r in stats["rules"] if r["id"] == rid]
    assert row["limit"] == {"passed": 10, "limited": 15, "banned": 5}
    api.dp.banned = [Ban(rid, "198.18.7.7", 42.5), Ban(rid, "2001:db8::7", 9.0)]
    assert api.client.get("/v1/limits/banned").json() == {"bans": [
        {"rule_id": rid, "source": "198.18.7.7", "expires_in": 42.5},
        {"rule_id": rid, "source": "2001:db8::7", "expires_in": 9.0},
    ]}
    assert api.anon.delete("/v1/limits/banned").status_code == 401
    r = api.client.delete("/v1/limits/banned", params={"source": "2001:db8:0::7"})
    assert r.json() == {"unbanned": 1}
    assert [b["source"] for b in api.client.get("/v1/limits/banned").json()["bans"]] == [
        "198.18.7.7"
    ]
    assert api.client.delete("/v1/limits/banned", params={"source": "nope"}).status_code == 422
    assert api.client.delete("/v1/limits/banned").json() == {"unbanned": 1}


def test_cli_ban_ls_and_rm(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """`xdpfw ban ls` lists what GET /v1/limits/banned answers, `xdpfw ban rm` lifts through
    DELETE; rm without --source/--rule/--all is a usage error that lifts nothing."""
    from tests.test_api_pure import TOKEN
    from xdpfw.cli.client import Client, ClientError

    rid = api.client.post("/v1/rules", json=SYN_LIMIT).json()["id"]
    cli = Client("http://testserver", TOKEN, transport=api.client._transport)

    from xdpfw.cli.bans import cmd_ban_ls, cmd_ban_rm

    def ls(*argv: str) -> str:
        assert cmd_ban_ls(build_parser().parse_args(["ban", "ls", *argv]), cli) == 0
        return capsys.readouterr().out

    def rm(*argv: str) -> str:
        assert cmd_ban_rm(build_parser().parse_args(["ban", "rm", *argv]), cli) == 0
        return capsys.readouterr().out

    assert ls() == "no bans\n"
    api.dp.banned = [Ban(rid, "198.18.7.7", 42.5), Ban(rid, "2001:db8::7", 9.0)]
    lines = ls().splitlines()
    assert lines[0].split() == ["RULE", "SOURCE", "EXPIRES", "IN"]
    assert lines[1].split() == [str(rid), "198.18.7.7", "42.5s"] and "2001:db8::7" in lines[2]
    assert json.loads(ls("--json"))["bans"][1] == {
        "rule_id": rid, "source": "2001:db8::7", "expires_in": 9.0}
    with pytest.raises(ClientError) as info:
        rm()
    assert info.value.exit_code == 2 and len(api.dp.banned) == 2
    assert rm("--source", "2001:db8::7") == "lifted 1 ban\n"
    assert [b.source for b in api.dp.banned] == ["198.18.7.7"]
    assert rm("--all") == "lifted 1 ban\n" and api.dp.banned == []


# -- the CLI's flags ------------------------------------------------------------------------------


def _add(*argv: str) -> Any:
    return build_parser().parse_args(["rule", "add", *argv])


def test_cli_limit_flags_make_the_api_body() -> None:
    ns = _add("--proto", "tcp", "--dport", "80", "--limit", "100/s", "--burst", "200",
              "--per", "source", "--ban", "10m", "--tcp-flags", "syn")
    assert limit_body(ns) == {
        "action": "limit", "tcp_flags": "syn",
        "limit": {"pps": 100, "burst": 200, "per": "source", "ban_seconds": 600},
    }
    ns = _add("--src", "198.18.0.0/16", "--limit", "2mb/s", "--burst", "64kb", "--per", "rule")
    assert limit_body(ns) == {
        "action": "limit",
        "limit": {"bps": 2_000_000, "burst_bytes": 64_000, "per": "rule"},
    }
    assert limit_body(_add("--src", "198.18.0.1")) == {}
    assert limit_body(_add("--proto", "tcp", "--tcp-flags", "RST")) == {"tcp_flags": "RST"}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--limit", "fast"], "--limit"),
        (["--limit", "10/h"], "--limit"),
        (["--limit", "100/s", "--ban", "soon"], "--ban"),
        (["--burst", "5"], "--burst needs --limit"),
    ],
)
def test_cli_bad_limit_flags(argv: list[str], words: str) -> None:
    from xdpfw.errors import InvalidRule

    with pytest.raises(InvalidRule, match=words):
        limit_body(_add("--src", "198.18.0.1", *argv))


def test_stats_and_top_show_limited_and_banned() -> None:
    from xdpfw.cli import top
    from xdpfw.cli.client import RuleStat
    from xdpfw.cli.stats import TOTALS, limited_text

    row: RuleStat = {"id": 1, "packets": 9, "bytes": 9, "last_hit": None,
                     "limit": {"passed": 3, "limited": 4, "banned": 2}}
    assert limited_text(row) == "4 +2 banned"
    assert limited_text({**row, "limit": {"passed": 3, "limited": 4, "banned": 0}}) == "4"
    assert limited_text({**row, "limit": None}) == "-"
    assert "limited" in TOTALS and "limited" in top.TOP_LINE


def test_bulk_json_takes_limit_rules(api: Api) -> None:
    body = [SYN_LIMIT, {"src": "198.18.3.0/24"},
            {"action": "limit", "src": "198.18.4.0/24", "limit": {"bps": 100_000}}]
    r = api.client.post("/v1/rules/bulk", json=body)
    assert r.status_code == 201, r.text
    ids = r.json()["ids"]
    assert {rid: lim.pps or lim.bps for rid, lim in api.dp.limits.items()} == {
        ids[0]: 100, ids[2]: 100_000,
    }
    assert api.store.limits()[ids[2]].burst_bytes == 100_000
    bad = [SYN_LIMIT, {"action": "limit", "src": "198.18.5.0/24"}]
    r = api.client.post("/v1/rules/bulk", json=bad)
    assert r.status_code == 422 and "element 1" in r.text


def test_a_source_replace_keeps_limit_rules_budgets(api: Api) -> None:
    """A source may hold limit rules (PUT /v1/sources with a JSON array): their budgets reach
    the datapath and SQLite like a single add's; a kept rule with another budget is a 409."""
    body = [{"action": "limit", "src": "198.18.6.0/24", "limit": {"pps": 50}},
            {"src": "198.18.7.0/24"}]
    r = api.client.put("/v1/sources/floodwatch", json=body)
    assert r.status_code == 200, r.text
    (rid,) = [x["id"] for x in api.client.get("/v1/rules?source=floodwatch").json()["rules"]
              if x["action"] == "limit"]
    assert api.dp.limits[rid].pps == 50 and api.store.limits()[rid].pps == 50
    body[0]["limit"] = {"pps": 60}
    r = api.client.put("/v1/sources/floodwatch", json=body)
    assert r.status_code == 409, r.text
    assert api.dp.limits[rid].pps == 50


def test_lookup_reports_limit_rules(api: Api) -> None:
    """GET /v1/lookup names a rate-limit rule's verdict "limit" (its budget decides each
    packet); a drop rule still outranks it; a TCP-flags rule never matches (no flags given)."""
    c = api.client
    lim = c.post("/v1/rules", json={"action": "limit", "src": "198.18.8.0/24",
                                    "limit": {"pps": 10}}).json()["id"]
    c.post("/v1/rules", json=SYN_LIMIT)
    body = c.get("/v1/lookup", params={"src": "198.18.8.9", "dst": "198.19.0.1",
                                       "proto": "tcp", "dport": 80}).json()
    assert (body["verdict"], body["rule_id"]) == ("limit", lim)
    assert [m["rule"]["id"] for m in body["matches"]] == [lim]
    drop = c.post("/v1/rules", json={"src": "198.18.8.9"}).json()["id"]
    body = c.get("/v1/lookup", params={"src": "198.18.8.9"}).json()
    assert (body["verdict"], body["rule_id"]) == ("drop", drop)


def test_lookup_with_tcp_flags_credits_the_syn_limit(api: Api) -> None:
    """With `tcp_flags` the lookup matches TCP-flags rules: a SYN is the SYN limit's, a
    SYN-ACK is nobody's; the packet echoes the flags; bad flags are a 422 naming the field."""
    c = api.client
    syn = c.post("/v1/rules", json=SYN_LIMIT).json()["id"]
    q = {"src": "198.18.9.9", "proto": "tcp", "dport": 80}
    assert c.get("/v1/lookup", params=q).json()["rule_id"] is None  # flags unsaid
    body = c.get("/v1/lookup", params={**q, "tcp_flags": "SYN"}).json()
    assert (body["verdict"], body["rule_id"]) == ("limit", syn)
    assert body["packet"]["tcp_flags"] == "SYN"
    body = c.get("/v1/lookup", params={**q, "tcp_flags": "syn,ack"}).json()
    assert (body["verdict"], body["matches"]) == ("pass", [])
    for params, words in (({**q, "proto": "udp", "tcp_flags": "SYN"}, "needs proto tcp"),
                          ({**q, "tcp_flags": "!ACK"}, "no !FLAG")):
        r = c.get("/v1/lookup", params=params)
        assert r.status_code == 422 and words in r.text and "tcp_flags" in r.text, r.text


def test_a_lost_database_adopts_limit_rules_with_their_budgets(tmp_path: Path) -> None:
    from tests.fakes import FakeDatapath
    from xdpfw.rules import RuleSpec

    dp = FakeDatapath()
    lim = Limit.parse(pps=7, burst=9, ban_seconds=60)
    dp.add_rules([
        RuleSpec.parse(action="limit", src="198.18.6.0/24", proto="tcp", tcp_flags="syn",
                       limit=lim).with_id(12),
    ])
    api = _api(tmp_path / "new.sqlite3", dp)  # a new database next to maps holding rules
    try:
        [rule] = api.client.get("/v1/rules").json()["rules"]
        assert (rule["id"], rule["tcp_flags"], rule["limit"]["pps"]) == (12, "SYN,!ACK", 7)
        assert api.store.limits() == {12: lim}
    finally:
        api.store.close()


def test_tcp_flag_texts() -> None:
    from xdpfw.rules import TcpFlags

    syn = TcpFlags.parse("syn")
    assert (syn.mask, syn.want) == (0x12, 0x02) and str(syn) == "SYN,!ACK"
    assert TcpFlags.parse("SYN,!ACK") == syn == TcpFlags.parse(" syn,!ack ")
    only = TcpFlags.parse("SYN")
    assert (only.mask, only.want) == (0x02, 0x02) and str(only) == "SYN"
    assert TcpFlags.parse(str(TcpFlags.parse("FIN,!ACK,cwr"))) == TcpFlags.parse("CWR,FIN,!ACK")
