"""The CrowdSec bouncer below e2e: Go durations, the stream (as recorded from the real LAPI,
tests/corpus/crowdsec/), decisions as rules, backoff, settings, and the bouncer's loop on the
real service and SQLite store (tests/fakes.py for the kernel) against a scripted LAPI.

tests/test_crowdsec_lapi.py proves the same with the real LAPI, server process and packets.
"""

from __future__ import annotations

import ipaddress
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.crowdsec import CrowdsecBouncer, KeyFileError, LapiClient, read_key_file
from api.service import FirewallService, NewRule
from api.settings import ConfigError, get_settings
from api.store import Store, StoredRule
from tests.fakes import FakeDatapath
from xdpfw.crowdsec import (
    SOURCE,
    Backoff,
    Ban,
    Decision,
    Ignored,
    StreamFormatError,
    latest_bans,
    map_decision,
    parse_go_duration,
    parse_stream,
)
from xdpfw.rules import RuleSpec

pytestmark = pytest.mark.pure

CORPUS = Path(__file__).parent / "corpus" / "crowdsec"


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CORPUS / name).read_text())
    return data


# -- Go durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3h59m56.9s", 4 * 3600 - 3.1),
        ("3h59m57.855202628s", 14397.855202628),
        ("29m57.855204651s", 1797.855204651),
        ("-395.597264ms", -0.395597264),
        ("-3m2s", -182.0),
        ("4h", 14400.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2us", 2e-6),
        ("2\u00b5s", 2e-6),
        ("7ns", 7e-9),
        ("0", 0.0),
        ("+5s", 5.0),
        (".5s", 0.5),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("text", ["", "-", "4", "4 h", "4hours", "h", "1d", "1h-5m", "s1"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_go_duration(text)


# -- the stream and the mapping ------------------------------------------------------------


def test_recorded_startup_stream_maps_to_bans() -> None:
    answer = parse_stream(recorded("stream-startup.json"))
    assert answer.deleted == []
    bans, ignored = latest_bans(answer.new)
    by_src = {b.src: b for b in bans}
    assert set(by_src) == {
        "198.51.100.7/32", "2001:db8::7/128", "198.51.100.0/24", "2001:db8:1::/48",
        "198.51.100.8/32",
    }  # fmt: skip
    # A Range with host bits names the network CrowdSec matches.
    assert by_src["198.51.100.0/24"].network == ipaddress.ip_network("198.51.100.0/24")
    # duration -> TTL (rounded up), scenario -> comment.
    assert by_src["198.51.100.7/32"].ttl == 14398
    assert by_src["198.51.100.7/32"].comment == "crowdsecurity/ssh-bf"
    assert by_src["2001:db8::7/128"].ttl == 1798
    assert by_src["198.51.100.8/32"].comment == "longer"
    # The captcha is not a drop: ignored, with its kind.
    assert [(d.value, why.kind) for d, why in ignored] == [("203.0.113.9", "type captcha")]


def test_recorded_delta_stream() -> None:
    answer = parse_stream(recorded("stream-delta.json"))
    assert [(d.value, d.id) for d in answer.deleted] == [
        ("198.51.100.7", 1), ("198.51.100.77/24", 3)
    ]  # fmt: skip
    assert all(d.duration < 0 for d in answer.deleted)
    assert [map_decision(d) for d in answer.new] == [
        Ban(ipaddress.ip_network("192.0.2.1/32"), 600, "manual 'ban' from 'xdpfw-test'")
    ]


def dec(value: str, *, scope: str = "Ip", kind: str = "ban", duration: float = 60.0,
        ident: int = 1, scenario: str = "s") -> Decision:  # fmt: skip
    return Decision(ident, "cscli", scenario, scope, kind, value, duration)


@pytest.mark.parametrize(
    ("decision", "kind"),
    [
        (dec("1.2.3.4", kind="captcha"), "type captcha"),
        (dec("1.2.3.4", kind="throttle"), "type throttle"),
        (dec("FR", scope="Country"), "scope Country"),
        (dec("AS1234", scope="AS"), "scope AS"),
        (dec("not-an-ip"), "bad value"),
        (dec("1.2.3.0/24"), "bad value"),  # an Ip scope with a range
        (dec("1.2.3.4", duration=float("nan")), "bad duration"),
        (dec("1.2.3.4", duration=-0.2), "expired"),
    ],
)
def test_decisions_that_make_no_rule(decision: Decision, kind: str) -> None:
    got = map_decision(decision)
    assert isinstance(got, Ignored) and got.kind == kind, got


def test_scopes_are_case_insensitive_and_mapped_v4_in_v6_is_v4() -> None:
    got = map_decision(dec("::ffff:198.51.100.9", scope="ip", kind="BAN", duration=0.2))
    assert got == Ban(ipaddress.ip_network("198.51.100.9/32"), 1, "s")
    got = map_decision(dec("2001:db8::1/64", scope="range"))
    assert isinstance(got, Ban) and got.src == "2001:db8::/64"


def test_longest_decision_per_network_wins() -> None:
    bans, _ = latest_bans([
        dec("10.0.0.1", duration=60, scenario="short"),
        dec("10.0.0.1", duration=3600, scenario="long", ident=2),
        dec("10.0.0.1", duration=120, scenario="middle", ident=3),
    ])  # fmt: skip
    assert bans == [Ban(ipaddress.ip_network("10.0.0.1/32"), 3600, "long")]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "expected a JSON object"),
        ({"new": {}}, "'new' must be a list or null"),
        ({"new": [1]}, r"new\[0\]: expected a decision object"),
        ({"deleted": [{"value": "1.2.3.4", "type": "ban"}]}, "without 'scope'"),
        ({"new": [{"value": 1, "scope": "Ip", "type": "ban"}]}, "must be strings"),
    ],
)
def test_malformed_streams(body: object, problem: str) -> None:
    with pytest.raises(StreamFormatError, match=problem):
        parse_stream(body)


def test_null_lists_are_empty() -> None:
    answer = parse_stream({"new": None, "deleted": None})
    assert answer.new == [] and answer.deleted == []


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(first=1.0, cap=8.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 1.0


def test_backoff_jitter_shortens_within_bounds() -> None:
    b = Backoff(first=2.0, cap=60.0, jitter=0.25, rng=random.Random(7))
    waits = [b.next() for _ in range(8)]
    for n, w in enumerate(waits):
        base = min(60.0, 2.0 * 2**n)
        assert 0.75 * base <= w <= base
    assert len(set(waits)) == len(waits)
    with pytest.raises(ValueError):
        Backoff(first=0)


# -- settings and the key file -------------------------------------------------------------


def test_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = tmp_path / "k"
    s = get_settings(crowdsec_lapi="http://127.0.0.1:8080/", crowdsec_key_file=key,
                     crowdsec_interval="1m30s")  # fmt: skip
    assert (s.crowdsec_lapi, s.crowdsec_key_file, s.crowdsec_interval) == (
        "http://127.0.0.1:8080", key, 90.0
    )
    assert s.crowdsec_resync == 600.0
    monkeypatch.setenv("XDPFW_CROWDSEC_LAPI", "https://lapi.example:8080")
    monkeypatch.setenv("XDPFW_CROWDSEC_KEY_FILE", str(key))
    monkeypatch.setenv("XDPFW_CROWDSEC_INTERVAL", "500ms")
    monkeypatch.setenv("XDPFW_CROWDSEC_RESYNC", "15")
    s = get_settings()
    assert (s.crowdsec_lapi, s.crowdsec_interval, s.crowdsec_resync) == (
        "https://lapi.example:8080", 0.5, 15.0
    )
    assert get_settings(crowdsec_interval="2s").crowdsec_interval == 2.0  # the flag wins


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"crowdsec_lapi": "http://127.0.0.1:8080"}, "needs --crowdsec-key-file"),
        ({"crowdsec_key_file": "/k"}, "needs --crowdsec-lapi"),
        ({"crowdsec_lapi": "127.0.0.1:8080", "crowdsec_key_file": "/k"}, "not a LAPI URL"),
        ({"crowdsec_interval": "10 seconds"}, "not a duration"),
        ({"crowdsec_interval": "0s"}, "greater than or equal to 0.1"),
    ],
)
def test_bad_settings(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):  # a ValidationError, named by key
        get_settings(**overrides)


def test_serve_flags_reach_the_settings() -> None:
    from xdpfw.cli.parser import build_parser
    from xdpfw.cli.serve import _crowdsec_flags

    args = build_parser().parse_args([
        "serve", "--crowdsec-lapi", "http://127.0.0.1:8080", "--crowdsec-key-file", "/etc/k",
        "--crowdsec-interval", "3s", "--crowdsec-resync", "5m",
    ])  # fmt: skip
    s = get_settings(**_crowdsec_flags(args))
    assert (s.crowdsec_lapi, str(s.crowdsec_key_file), s.crowdsec_interval, s.crowdsec_resync) \
        == ("http://127.0.0.1:8080", "/etc/k", 3.0, 300.0)


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    with pytest.raises(KeyFileError, match=r"cannot read .*cscli bouncers add"):
        read_key_file(path)
    path.write_text("\n")
    with pytest.raises(KeyFileError, match="empty"):
        read_key_file(path)
    path.write_text("abc def\n")
    with pytest.raises(KeyFileError, match="several words"):
        read_key_file(path)
    path.write_text("3d113ce2f851da2fbbc87275b378e97a\n")
    path.chmod(0o600)
    assert read_key_file(path) == "3d113ce2f851da2fbbc87275b378e97a"


# -- the bouncer on the real service, against a scripted LAPI --------------------------------


@dataclass
class ScriptedLapi:
    """Answers /v1/decisions/stream from a queue; records each request's startup flag."""

    answers: list[Callable[[], httpx.Response]] = field(default_factory=list)
    startups: list[bool] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/decisions/stream"
        assert request.url.params["scopes"] == "ip,range"
        self.startups.append(request.url.params["startup"] == "true")
        self.keys.append(request.headers["x-api-key"])
        if not self.answers:
            return httpx.Response(200, json={"new": None, "deleted": None})
        return self.answers.pop(0)()

    def stream(self, new: list[dict[str, Any]] | None = None,
               deleted: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        self.answers.append(lambda: httpx.Response(200, json={"new": new, "deleted": deleted}))

    def down(self) -> None:
        def refuse() -> httpx.Response:
            raise httpx.ConnectError("[Errno 111] Connection refused")

        self.answers.append(refuse)


def d(value: str, ident: int, *, scope: str = "Ip", kind: str = "ban", duration: str = "4h",
      scenario: str = "crowdsecurity/ssh-bf") -> dict[str, Any]:  # fmt: skip
    return {"id": ident, "origin": "crowdsec", "scenario": scenario, "scope": scope,
            "type": kind, "value": value, "duration": duration}  # fmt: skip


@dataclass
class Rig:
    svc: FirewallService
    store: Store
    lapi: ScriptedLapi
    bouncer: CrowdsecBouncer

    def held(self, source: str = SOURCE) -> dict[str, StoredRule]:
        rows = self.svc.page(0, 100_000, source)
        return {r.rule.src.with_prefixlen: r for r in rows if r.rule.src is not None}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    store = Store(tmp_path / "rules.sqlite3")
    svc = FirewallService(FakeDatapath(), store, ("192.0.2.0/24",))
    svc.reconcile()
    lapi = ScriptedLapi()
    client = LapiClient("http://lapi.test:8080/", "the-key",
                        transport=httpx.MockTransport(lapi.handler))  # fmt: skip
    bouncer = CrowdsecBouncer(svc, client, interval=10, resync=600,
                              backoff=Backoff(first=1, cap=8, jitter=0))  # fmt: skip
    yield Rig(svc, store, lapi, bouncer)
    client.close()
    store.close()


def test_startup_then_deltas(rig: Rig) -> None:
    rig.lapi.stream(new=recorded("stream-startup.json")["new"])
    assert rig.bouncer.step() == 10  # the interval
    held = rig.held()
    assert set(held) == {"198.51.100.7/32", "2001:db8::7/128", "198.51.100.0/24",
                         "2001:db8:1::/48", "198.51.100.8/32"}  # fmt: skip
    r = held["198.51.100.7/32"]
    assert r.rule.action == "drop" and r.comment == "crowdsecurity/ssh-bf"
    assert r.expires_at is not None and r.expires_at - time.time() == pytest.approx(14398, abs=5)
    rig.lapi.stream(**recorded("stream-delta.json"))
    rig.bouncer.step()
    held = rig.held()
    assert set(held) == {"2001:db8::7/128", "2001:db8:1::/48", "198.51.100.8/32",
                         "192.0.2.1/32"}  # fmt: skip
    # 192.0.2.1 is inside the protected 192.0.2.0/24: loaded anyway (protection wins there).
    assert "192.0.2.1/32" in held and held["192.0.2.1/32"].expires_at is not None
    assert rig.lapi.startups == [True, False]
    assert rig.lapi.keys == ["the-key", "the-key"]
    st = rig.bouncer.status()
    assert (st.state, st.applied, st.deleted, st.ignored) == ("ok", 6, 2, 1)
    assert st.ignored_kinds == {"type captcha": 1}
    assert st.last_pull is not None and st.last_full_pull is not None


def test_crowdsec_never_touches_other_sources(rig: Rig) -> None:
    mine = rig.svc.add(NewRule(RuleSpec.parse(src="198.51.100.7"), comment="by hand"))[0]
    other = rig.svc.add(NewRule(RuleSpec.parse(src="203.0.113.50"), source="firehol"))[0]
    rig.lapi.stream(new=[d("198.51.100.7", 1), d("203.0.113.60", 2)])
    rig.bouncer.step()
    assert rig.svc.get(mine.id).sources == ("api", SOURCE)
    rig.lapi.stream(deleted=[d("198.51.100.7", 1, duration="-1s"),
                             d("203.0.113.50", 9, duration="-1s")])  # fmt: skip
    rig.bouncer.step()
    assert rig.svc.get(mine.id).sources == ("api",)  # crowdsec let go, the hand rule stays
    assert rig.svc.get(other.id).sources == ("firehol",)  # never crowdsec's to delete
    assert set(rig.held()) == {"203.0.113.60/32"}
    # A full pull replaces source crowdsec only.
    rig.bouncer._full_due = True
    rig.lapi.stream(new=[d("203.0.113.61", 3)])
    rig.bouncer.step()
    assert set(rig.held()) == {"203.0.113.61/32"}
    assert rig.svc.get(mine.id).comment == "by hand"
    assert set(rig.held("firehol")) == {"203.0.113.50/32"}


def test_lapi_away_keeps_rules_backs_off_and_resyncs(rig: Rig) -> None:
    rig.lapi.stream(new=[d("198.51.100.1", 1), d("198.51.100.2", 2)])
    rig.bouncer.step()
    for _ in range(4):
        rig.lapi.down()
    waits = [rig.bouncer.step() for _ in range(4)]
    assert waits == [1, 2, 4, 8]  # backoff, capped
    st = rig.bouncer.status()
    assert st.state == "unreachable" and st.consecutive_errors == 4 and st.lapi_errors == 4
    assert st.last_error is not None and "cannot reach the CrowdSec LAPI at " \
        "http://lapi.test:8080" in st.last_error  # fmt: skip
    assert set(rig.held()) == {"198.51.100.1/32", "198.51.100.2/32"}  # nothing lost
    # Back: a full pull (the cursor may have moved past answers we never got). .2 was
    # deleted meanwhile, .3 added: the replace makes the source equal to the LAPI.
    rig.lapi.stream(new=[d("198.51.100.1", 1), d("198.51.100.3", 3)])
    assert rig.bouncer.step() == 10
    assert rig.lapi.startups == [True, False, True, True, True, True]
    assert set(rig.held()) == {"198.51.100.1/32", "198.51.100.3/32"}
    st = rig.bouncer.status()
    assert (st.state, st.consecutive_errors, st.last_error, st.lapi_errors) == ("ok", 0, None, 4)
    assert rig.bouncer.step() == 10 and rig.lapi.startups[-1] is False  # deltas again


def test_periodic_full_resync(rig: Rig) -> None:
    rig.bouncer.resync = 0.2
    rig.lapi.stream(new=[d("198.51.100.1", 1)])
    rig.bouncer.step()
    rig.bouncer.step()
    time.sleep(0.25)
    rig.lapi.stream(new=[d("198.51.100.9", 9)])  # the full list: .1 went while unseen
    rig.bouncer.step()
    assert rig.lapi.startups == [True, False, True]
    assert set(rig.held()) == {"198.51.100.9/32"}


def test_refused_key_and_garbage_are_clear_errors(rig: Rig) -> None:
    rig.lapi.answers.append(lambda: httpx.Response(403, json={"message": "access forbidden"}))
    rig.bouncer.step()
    err = rig.bouncer.status().last_error or ""
    assert "refused the bouncer key (403" in err and "cscli bouncers add" in err
    rig.lapi.answers.append(lambda: httpx.Response(200, text="<html>hello</html>"))
    rig.bouncer.step()
    assert "answered no decision stream (not JSON)" in (rig.bouncer.status().last_error or "")
    rig.lapi.answers.append(lambda: httpx.Response(500, text="db locked"))
    rig.bouncer.step()
    assert "answered 500" in (rig.bouncer.status().last_error or "")
    assert rig.bouncer.status().lapi_errors == 3


def test_ignored_decisions_count_once_and_log_once_per_kind(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    new = [d("198.51.100.1", 1, kind="captcha"), d("198.51.100.2", 2, kind="captcha"),
           d("FR", 3, scope="Country"), d("198.51.100.3", 4)]  # fmt: skip
    rig.bouncer.resync = 0.0  # every pull a full one: the same ignored decisions again
    with caplog.at_level("WARNING", logger="xdpfw.crowdsec"):
        for _ in range(3):
            rig.lapi.stream(new=new)
            rig.bouncer.step()
    st = rig.bouncer.status()
    assert st.ignored == 3 and st.ignored_kinds == {"type captcha": 2, "scope Country": 1}
    said = [r.getMessage() for r in caplog.records if "ignoring decisions" in r.getMessage()]
    assert len(said) == 2, said
    assert set(rig.held()) == {"198.51.100.3/32"}


def test_ban_over_a_protected_prefix_is_loaded_protection_wins(rig: Rig) -> None:
    """A ban covering a protected prefix still drops the rest of its range; inside the
    protected prefix the protection's allow rule outranks it (never a failed delta)."""
    rig.lapi.stream(new=[d("198.51.100.1", 1)])
    rig.bouncer.step()
    rig.lapi.stream(new=[d("192.0.0.0/16", 2, scope="Range"), d("192.0.2.0/24", 3,
                         scope="Range"), d("198.51.100.4", 4)])  # fmt: skip
    rig.bouncer.step()
    assert set(rig.held()) == {"198.51.100.1/32", "198.51.100.4/32", "192.0.0.0/16",
                               "192.0.2.0/24"}  # fmt: skip
    protected = [r for r in rig.svc.protected if r.src is not None]
    assert [(r.src.with_prefixlen, r.action) for r in protected if r.src] == [
        ("192.0.2.0/24", "allow")
    ]
    st = rig.bouncer.status()
    assert st.state == "ok" and st.applied == 4 and st.ignored == 0


def test_a_deleted_captcha_leaves_the_ban_of_that_value(rig: Rig) -> None:
    rig.lapi.stream(new=[d("198.51.100.1", 1), d("198.51.100.1", 2, kind="captcha")])
    rig.bouncer.step()
    rig.lapi.stream(deleted=[d("198.51.100.1", 2, kind="captcha", duration="-1s")])
    rig.bouncer.step()
    assert set(rig.held()) == {"198.51.100.1/32"}
    assert rig.bouncer.status().deleted == 0


def test_many_deletions_apply_as_one_full_pull(rig: Rig) -> None:
    rig.lapi.stream(new=[d(f"10.0.{i // 256}.{i % 256}", i + 1) for i in range(400)])
    rig.bouncer.step()
    assert len(rig.held()) == 400
    rig.lapi.stream(deleted=[d(f"10.0.{i // 256}.{i % 256}", i + 1, duration="-1s")
                             for i in range(300)])  # fmt: skip
    rig.lapi.stream(new=[d(f"10.0.{i // 256}.{i % 256}", i + 1) for i in range(300, 400)])
    rig.bouncer.step()
    assert rig.lapi.startups == [True, False, True]  # the delta, then a full pull at once
    assert len(rig.held()) == 100
    st = rig.bouncer.status()
    assert (st.applied, st.deleted, st.last_full_pull) == (400, 300, st.last_pull)


def test_a_rebanned_value_refreshes_its_ttl(rig: Rig) -> None:
    rig.lapi.stream(new=[d("198.51.100.1", 1, duration="10m")])
    rig.bouncer.step()
    first = rig.held()["198.51.100.1/32"].expires_at
    rig.lapi.stream(deleted=[d("198.51.100.1", 1, duration="-1s")],
                    new=[d("198.51.100.1", 2, duration="4h")])  # fmt: skip
    rig.bouncer.step()
    again = rig.held()["198.51.100.1/32"].expires_at
    assert first is not None and again is not None and again - first > 3 * 3600


def test_metrics_families(rig: Rig) -> None:
    rig.lapi.stream(new=[d("198.51.100.1", 1), d("198.51.100.2", 2, kind="captcha")])
    rig.bouncer.step()
    rig.lapi.down()
    rig.bouncer.step()
    got = {(s.name, tuple(s.labels.items())): s.value
           for fam in rig.bouncer.metrics() for s in fam.samples}  # fmt: skip
    assert got[("xdpfw_crowdsec_decisions_total", (("event", "applied"),))] == 1
    assert got[("xdpfw_crowdsec_decisions_total", (("event", "deleted"),))] == 0
    assert got[("xdpfw_crowdsec_decisions_total", (("event", "ignored"),))] == 1
    assert got[("xdpfw_crowdsec_lapi_errors_total", ())] == 1
    assert got[("xdpfw_crowdsec_up", ())] == 0
    assert got[("xdpfw_crowdsec_last_pull_timestamp_seconds", ())] == pytest.approx(
        time.time(), abs=30
    )


def test_thread_starts_and_stops(rig: Rig) -> None:
    rig.bouncer.interval = 0.05
    rig.lapi.stream(new=[d("198.51.100.1", 1)])
    rig.bouncer.start()
    try:
        deadline = time.monotonic() + 5
        while len(rig.lapi.startups) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        rig.bouncer.stop()
    assert rig.lapi.startups[:3] == [True, False, False]
    assert set(rig.held()) == {"198.51.100.1/32"}
    n = len(rig.lapi.startups)
    time.sleep(0.15)
    assert len(rig.lapi.startups) == n  # stopped: no more pulls
    assert rig.bouncer.client._http.is_closed  # and its client is closed


def test_healthz_and_metrics_report_the_bouncer(rig: Rig, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    app = create_app(Settings(state_dir=tmp_path), rig.svc, "t0ken")
    with TestClient(app) as c:
        assert c.get("/healthz").json()["crowdsec"] is None  # no bouncer: no block
        app.state.crowdsec = rig.bouncer
        assert c.get("/healthz").json()["crowdsec"]["state"] == "starting"
        rig.lapi.stream(new=[d("198.51.100.1", 1)])
        rig.bouncer.step()
        rig.lapi.down()
        rig.bouncer.step()
        r = c.get("/healthz")
        cs = r.json()["crowdsec"]
        assert r.status_code == 503  # no interface attached: the filter's state, not the LAPI's
        assert cs["lapi"] == "http://lapi.test:8080" and cs["state"] == "unreachable"
        assert cs["consecutive_errors"] == 1 and cs["applied"] == 1
        assert cs["last_pull"].endswith("Z") and "Connection refused" in cs["last_error"]
        text = c.get("/metrics").text
        assert 'xdpfw_crowdsec_decisions_total{event="applied"} 1.0' in text
        assert "xdpfw_crowdsec_lapi_errors_total 1.0" in text
        assert "xdpfw_crowdsec_up 0.0" in text


def test_xdpfw_status_shows_the_bouncer(rig: Rig) -> None:
    from xdpfw.cli.client import Health
    from xdpfw.cli.status import status_text

    health: Health = {
        "status": "ok", "prog_id": 7, "adopted": False, "rules": 3, "protected": [],
        "interfaces": [], "capacity": {}, "crowdsec": None,
    }  # fmt: skip
    assert "crowdsec" not in status_text("http://x", health)
    health["crowdsec"] = {
        "lapi": "http://127.0.0.1:8080", "state": "unreachable",
        "last_pull": "2026-12-01T23:00:00.000Z", "last_full_pull": None,
        "last_error": "cannot reach the CrowdSec LAPI at http://127.0.0.1:8080: refused",
        "consecutive_errors": 3, "lapi_errors": 3, "applied": 5, "deleted": 1, "ignored": 2,
        "ignored_kinds": {"type captcha": 2},
    }  # fmt: skip
    text = status_text("http://x", health)
    assert "crowdsec    unreachable  (http://127.0.0.1:8080)  last pull 2026-12-01T23:00:00" in text
    assert "applied 5, deleted 1, ignored 2" in text and "cannot reach the CrowdSec LAPI" in text


def test_setup_installs_crowdsec_offline_for_tests_only() -> None:
    """crowdsec is a test package; its offline credentials file is written before apt-get
    installs it, and only when it is missing (the postinst fails offline without it)."""
    from tests.test_readme import SETUP, setup_packages

    assert "crowdsec" in setup_packages("test") and "crowdsec" not in setup_packages("run")
    script = SETUP.read_text()
    call = script.index('crowdsec_offline_credentials "${missing[@]}"')
    assert script.index("crowdsec_offline_credentials() {") < call < script.index(
        "apt-get -q -y"
    )
    body = script[script.index("crowdsec_offline_credentials() {"):call]
    assert '[[ ! -s "$creds" ]]' in body and "online_api_credentials.yaml" in body
    # Under systemd, the package's own service (which it starts) is stopped after the install.
    assert script.index("apt-get -q -y") < script.index('partner_daemons_off "${missing[@]}"')
    assert "PARTNER_DAEMONS=(crowdsec " in script
    assert 'systemctl disable --now "$daemon"' in script


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--crowdsec-lapi", "http://127.0.0.1:9"], "needs --crowdsec-key-file"),
        (["--crowdsec-lapi", "http://127.0.0.1:9", "--crowdsec-key-file", "{tmp}/none"],
         "cannot read the CrowdSec bouncer key file"),
    ],
)
def test_serve_refuses_a_bad_crowdsec_setup_before_loading_anything(
    flags: list[str], problem: str, tmp_path: Path
) -> None:
    """A typo in the bouncer's flags ends `xdpfw serve` at once (exit 2, one clear line),
    before any program is loaded or interface touched."""
    import subprocess
    import sys

    xdpfw = str(Path(sys.executable).with_name("xdpfw"))
    argv = [xdpfw, "serve", "--no-demo", "--state-dir", str(tmp_path / "state"),
            "--bpffs-dir", str(tmp_path / "no-bpffs"),
            *(f.format(tmp=tmp_path) for f in flags)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert problem in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "no-bpffs").exists()


@pytest.mark.parametrize(("interval", "waits"), [
    (10.0, [1, 2, 4, 8, 16, 32, 60, 60]),
    (1.0, [1, 2, 4, 6, 6]),
    (0.5, [0.5, 1, 2, 3, 3]),
])  # fmt: skip
def test_default_backoff_follows_the_interval(
    rig: Rig, interval: float, waits: list[float]
) -> None:
    bouncer = CrowdsecBouncer(rig.svc, rig.bouncer.client, interval=interval)
    bouncer.backoff.jitter = 0.0
    assert [bouncer.backoff.next() for _ in waits] == waits
