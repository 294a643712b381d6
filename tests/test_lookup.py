"""`GET /v1/lookup` / `xdpfw.lookup`: the data plane's verdict for a packet, from the compiler.

- bpf: on many random rule sets (xdpfw.verify.soak.RuleGen: nested prefixes, ports, protocols,
  allow/drop/monitor, crowded entries) and packets aimed at them, the lookup's verdict equals
  what the loaded program returns under BPF_PROG_TEST_RUN, and the credited rule is the one
  whose counters the program bumped (exactly one packet, on that rule only);
- pure: the same against the reference model (many more rule sets), every matching rule is
  listed, the "no dst / no proto" reading, bad questions, the route over the real service.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import PROTECT_BASE, FirewallService, NewRule
from api.settings import Settings
from api.store import Store
from tests.fakes import FakeDatapath
from xdpfw.compiler import RuleCompiler
from xdpfw.datapath import Datapath
from xdpfw.errors import InvalidRule
from xdpfw.lookup import Decision, lookup, parse_packet
from xdpfw.rules import Limit, Rule, RuleSpec
from xdpfw.verify import harness, model
from xdpfw.verify.frames import build_frame
from xdpfw.verify.soak import SOAK_CAPS, RuleGen, fit

_PROTOS = (6, 17, 1, 58, 47)


def _inside(rng: random.Random, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """An address in `net`, or now and then just outside it."""
    base = int(net.network_address)
    value = base + rng.randrange(net.num_addresses)
    if rng.random() < 0.15:
        value = (base - 1) % (1 << net.max_prefixlen) if rng.random() < 0.5 else (
            base + net.num_addresses) % (1 << net.max_prefixlen)
    cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    return str(cls(value))


def _random_address(rng: random.Random, version: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(0xC6120000 + rng.randrange(1 << 17)))
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) + rng.getrandbits(96)))


def packets(rng: random.Random, rules: list[Rule], n: int) -> Iterator[dict[str, Any]]:
    """(src, dst, proto, dport) aimed at the rules' networks, protocols and port edges."""
    ports = sorted({p for r in rules if r.dport is not None
                    for p in (r.dport.lo, r.dport.hi, max(0, r.dport.lo - 1),
                              min(65535, r.dport.hi + 1))} | {22, 80, 443})
    for _ in range(n):
        target = rng.choice(rules) if rules and rng.random() < 0.85 else None
        net = None if target is None else (target.src if target.src is not None else target.dst)
        version = net.version if net is not None else rng.choice((4, 6))
        src, dst = _random_address(rng, version), _random_address(rng, version)
        if net is not None and target is not None:
            if target.src is not None:
                src = _inside(rng, net)
            else:
                dst = _inside(rng, net)
        if net is not None and rng.random() < 0.3:  # the other side in a rule network too
            others = [r.src or r.dst for r in rules if (r.src or r.dst) is not None]
            other = rng.choice(others)
            if other is not None and other.version == version:
                if target is not None and target.src is not None:
                    dst = _inside(rng, other)
                else:
                    src = _inside(rng, other)
        proto = rng.choice(_PROTOS)
        if target is not None and target.proto is not None and rng.random() < 0.8:
            proto = target.proto.number
        if version == 4 and proto == 58:
            proto = 1
        if version == 6 and proto == 1:
            proto = 58
        dport = None
        if proto in (6, 17):
            dport = rng.choice(ports) if rng.random() < 0.8 else rng.randrange(65536)
        yield {"src": src, "dst": dst, "proto": proto, "dport": dport}


def frame_of(p: dict[str, Any]) -> bytes:
    dport = 80 if p["dport"] is None else p["dport"]
    return build_frame(src=p["src"], dst=p["dst"], proto=p["proto"], dport=dport)


def compiled(rules: list[Rule]) -> RuleCompiler:
    comp = RuleCompiler(SOAK_CAPS)
    comp.commit(comp.plan_add(rules))
    return comp


def rule_sets(seed: int, count: int, size: tuple[int, int]) -> Iterator[list[Rule]]:
    rng = random.Random(seed)
    gen = RuleGen(rng)
    for _ in range(count):
        rules, _ = fit(gen.rule_set(rng.randint(*size)), SOAK_CAPS)
        yield rules


# -- against the kernel --------------------------------------------------------------------------


@pytest.fixture
def dp(soak_dp: Datapath) -> Datapath:
    return soak_dp  # conftest's soak-capacity program, emptied around each test


@pytest.mark.bpf
def test_lookup_agrees_with_the_program(dp: Datapath) -> None:
    """Verdict and credited rule, frame by frame, on 40 random rule sets (2,000 packets)."""
    rng = random.Random(13)
    checked = {"drop": 0, "pass": 0, "monitor": 0, "credited": 0}
    for rules in rule_sets(1313, 40, (1, 120)):
        dp.remove_rules([r.id for r in dp.rules()])
        dp.add_rules(rules)
        for p in packets(rng, rules, 50):
            want = lookup(dp.compiler, parse_packet(p["src"], p["dst"], p["proto"], p["dport"]))
            frame = frame_of(p)
            before = dp.rule_counters()
            got = harness.run(dp.prog_fd, frame).verdict
            after = dp.rule_counters()
            bumped = {rid for rid in after if after[rid].packets != before[rid].packets}
            expected = harness.Verdict.DROP if want.verdict == "drop" else harness.Verdict.PASS
            where = f"packet {p}, rules {[r.describe() + f' #{r.id}' for r in rules]}"
            assert got == expected, f"program {got.name}, lookup {want.verdict}: {where}"
            assert bumped == ({want.rule_id} if want.rule_id is not None else set()), (
                f"program credited {bumped}, lookup {want.rule_id}: {where}"
            )
            if want.rule_id is not None:
                rid = want.rule_id
                assert after[rid].packets - before[rid].packets == 1
                assert after[rid].bytes - before[rid].bytes == len(frame)
                checked["credited"] += 1
            checked[want.verdict] += 1
    assert min(checked.values()) > 50, checked  # every verdict was exercised


# -- against the model (pure) ----------------------------------------------------------------------


def _model(rules: list[Rule], p: dict[str, Any]) -> model.Outcome:
    return model.evaluate(rules, frame_of(p))


@pytest.mark.pure
def test_lookup_agrees_with_the_model_and_lists_every_match() -> None:
    rng = random.Random(7)
    seen = 0
    for rules in rule_sets(77, 150, (1, 60)):
        comp = compiled(rules)
        for p in packets(rng, rules, 30):
            got = lookup(comp, parse_packet(p["src"], p["dst"], p["proto"], p["dport"]))
            out = _model(rules, p)
            assert got.rule_id == out.rule_id, (p, [r.describe() for r in rules])
            assert (got.verdict == "drop") == (out.action == "drop")
            assert (got.verdict == "monitor") == bool(out.monitored)
            parsed = model.parse_frame(frame_of(p))
            matching = {r.id for r in rules if model.rule_matches(r, parsed)}
            assert {m.rule_id for m in got.matches} == matching
            ranks = [m.rank for m in got.matches]
            assert ranks == sorted(ranks, reverse=True)
            seen += len(matching)
    assert seen > 1000


@pytest.mark.pure
def test_without_dst_or_proto_only_rules_naming_none_match() -> None:
    rng = random.Random(3)
    for rules in rule_sets(33, 60, (1, 40)):
        comp = compiled(rules)
        for p in packets(rng, rules, 10):
            got = lookup(comp, parse_packet(p["src"]))
            bare = [r for r in rules if r.dst is None and r.proto is None and r.dport is None]
            want = _model(bare, p)
            assert got.rule_id == want.rule_id
            assert {m.rule_id for m in got.matches} <= {r.id for r in bare}


def _decision(rules: list[Rule], **q: Any) -> Decision:
    return lookup(compiled(rules), parse_packet(**q))


@pytest.mark.pure
def test_examples_of_the_contract() -> None:
    r = [
        RuleSpec.parse(src="198.18.0.0/16").with_id(1),
        RuleSpec.parse(src="198.18.7.0/24", mode="monitor").with_id(2),
        RuleSpec.parse(src="198.18.7.9", action="allow", proto="tcp", dport=22).with_id(3),
        RuleSpec.parse(proto="udp", dport="53").with_id(4),
    ]
    d = _decision(r, src="198.18.7.9")
    assert (d.verdict, d.rule_id, [m.rule_id for m in d.matches]) == ("drop", 1, [1, 2])
    d = _decision(r, src="198.18.7.9", dst="198.19.0.1", proto="tcp", dport=22)
    assert (d.verdict, d.rule_id) == ("pass", 3)
    assert [m.table for m in d.matches] == ["xdpfw_src4", "xdpfw_src4_lpm", "xdpfw_src4_lpm"]
    d = _decision(r, src="198.19.0.1", proto="udp", dport=53)
    assert (d.verdict, d.rule_id, d.matches[0].table) == ("drop", 4, "xdpfw_any")
    d = _decision(r[1:2], src="198.18.7.1")
    assert (d.verdict, d.rule_id) == ("monitor", 2)
    d = _decision(r[1:2], src="::ffff:198.18.7.1")  # an IPv6 packet: the IPv6 tables
    assert (d.verdict, d.rule_id) == ("pass", None)
    d = _decision(r, src="2001:db8::1")
    assert (d.verdict, d.rule_id, d.matches) == ("pass", None, ())


@pytest.mark.pure
@pytest.mark.parametrize(
    ("q", "field"),
    [
        ({"src": "198.18.0.0/24"}, "src"),
        ({"src": "nope"}, "src"),
        ({"src": "198.18.0.1", "dst": "2001:db8::1"}, "dst"),
        ({"src": "198.18.0.1", "proto": "gre"}, "proto"),
        ({"src": "198.18.0.1", "proto": "256"}, "proto"),
        ({"src": "198.18.0.1", "dport": 22}, "dport"),
        ({"src": "198.18.0.1", "proto": "icmp", "dport": 22}, "dport"),
        ({"src": "198.18.0.1", "proto": "tcp", "dport": 70000}, "dport"),
    ],
)
def test_bad_questions_name_the_field(q: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRule) as info:
        parse_packet(**q)
    assert info.value.field == field


# -- the route and the service (pure) --------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, FirewallService]]:
    store = Store(tmp_path / "rules.sqlite3")
    svc = FirewallService(FakeDatapath(), store, protect=("198.18.255.0/24",))
    svc.reconcile()
    app = create_app(Settings(listen="127.0.0.1:8000", state_dir=tmp_path), svc, "t0ken")
    yield TestClient(app, headers={"Authorization": "Bearer t0ken"}), svc
    store.close()


@pytest.mark.pure
def test_route_answers_with_the_stored_rules(client: tuple[TestClient, FirewallService]) -> None:
    c, svc = client
    wide, _ = svc.add(NewRule(RuleSpec.parse(src="198.18.0.0/16"), comment="feed", force=True))
    host, _ = svc.add(NewRule(RuleSpec.parse(src="198.18.9.1", mode="monitor"), comment="probe"))
    r = c.get("/v1/lookup", params={"src": "198.18.9.1", "dst": "198.19.0.1", "proto": "tcp",
                                    "dport": 443})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verdict"] == "drop" and body["rule_id"] == wide.id
    assert body["rule"]["comment"] == "feed" and body["rule"]["src"] == "198.18.0.0/16"
    assert [(m["rule"]["id"], m["table"]) for m in body["matches"]] == [
        (wide.id, "xdpfw_src4_lpm"), (host.id, "xdpfw_src4")]
    assert body["packet"] == {"src": "198.18.9.1", "dst": "198.19.0.1", "proto": 6, "dport": 443,
                              "tcp_flags": None}
    assert {"table": "xdpfw_src4", "network": "198.18.9.1/32"} in body["entries"]
    # a protected prefix is an allow rule above every drop: credited, with what it is
    body = c.get("/v1/lookup", params={"src": "198.18.255.7"}).json()
    assert body["verdict"] == "pass" and body["rule_id"] == PROTECT_BASE
    assert body["rule"]["comment"] == "protected prefix (--protect)"
    assert [m["rule"]["id"] for m in body["matches"]] == [PROTECT_BASE, wide.id]
    # every matching rule with the sources holding it
    svc.add(NewRule(RuleSpec.parse(src="198.18.9.1", mode="monitor"), source="feed-b"))
    body = c.get("/v1/lookup", params={"src": "198.18.9.1"}).json()
    assert [(m["rule"]["id"], m["rule"]["sources"]) for m in body["matches"]] == [
        (wide.id, ["api"]), (host.id, ["api", "feed-b"])]
    body = c.get("/v1/lookup", params={"src": "198.18.255.7"}).json()
    assert body["rule"]["sources"] == []  # the service's own rule: no source holds it
    # nothing matches
    body = c.get("/v1/lookup", params={"src": "203.0.113.9"}).json()
    assert body["verdict"] == "pass" and body["rule"] is None and body["matches"] == []
    # bad questions: 422 naming the field
    r = c.get("/v1/lookup", params={"src": "198.18.0.1", "dport": 22})
    assert r.status_code == 422 and "dport" in r.text
    assert c.get("/v1/lookup").status_code == 422


@pytest.mark.pure
def test_cli_lookup_prints_the_verdict_and_the_rules(
    client: tuple[TestClient, FirewallService], capsys: pytest.CaptureFixture[str]
) -> None:
    from xdpfw.cli.client import Client, ClientError
    from xdpfw.cli.main import build_parser

    c, svc = client
    wide, _ = svc.add(NewRule(RuleSpec.parse(src="198.18.7.0/24"), comment="feed"))
    allow, _ = svc.add(NewRule(RuleSpec.parse(src="198.18.7.9", action="allow", proto="tcp",
                                              dport=22), comment="admin"))
    api = Client("http://testserver", "t0ken", transport=c._transport)

    def run(*argv: str) -> str:
        args = build_parser().parse_args(["lookup", *argv])
        from xdpfw.cli.lookup import cmd_lookup

        assert cmd_lookup(args, api) == 0
        return capsys.readouterr().out

    out = run("198.18.7.9", "--dst", "198.19.0.1", "--proto", "tcp", "--dport", "22")
    assert out.splitlines()[0] == "198.18.7.9 -> 198.19.0.1 tcp dport 22: pass"
    assert f"credited: rule {allow.id}, allow src 198.18.7.9/32 tcp dport 22 (admin)" in out
    assert f"{wide.id}" in out and "xdpfw_src4_lpm" in out and "feed" in out
    out = run("198.18.7.9")
    assert out.splitlines()[0] == "198.18.7.9: drop" and f"rule {wide.id}," in out
    assert "admin" not in out  # a tcp/22 rule does not match a packet of no named protocol
    assert run("203.0.113.9").splitlines() == ["203.0.113.9: pass", "  no rule matches"]
    body = json.loads(run("198.18.7.1", "--json"))
    assert body["verdict"] == "drop" and body["rule"]["id"] == wide.id
    with pytest.raises(ClientError) as info:
        run("198.18.7.1", "--proto", "gre")
    assert "--proto" in info.value.message and info.value.exit_code == 2
    # issue 16: --tcp-flags, and a SYN-limit rule credited for a SYN only
    syn, _ = svc.add(NewRule(RuleSpec.parse(
        src="203.0.113.0/24", action="limit", proto="tcp", dport=80, tcp_flags="syn",
        limit=Limit.parse(pps=5))))
    out = run("203.0.113.9", "--proto", "tcp", "--dport", "80", "--tcp-flags", "SYN")
    assert out.splitlines()[0] == "203.0.113.9 tcp dport 80 flags SYN: limit"
    assert f"credited: rule {syn.id}, limit " in out
    out = run("203.0.113.9", "--proto", "tcp", "--dport", "80", "--tcp-flags", "SYN,ACK")
    assert out.splitlines() == ["203.0.113.9 tcp dport 80 flags SYN,ACK: pass", "  no rule matches"]
    with pytest.raises(ClientError) as info:
        run("203.0.113.9", "--proto", "udp", "--tcp-flags", "SYN")
    assert "--tcp-flags" in info.value.message and info.value.exit_code == 2


@pytest.mark.pure
def test_tcp_flags_in_the_question_match_flag_rules_as_the_model_does() -> None:
    """Issue 16: a question naming the packet's TCP flags matches TCP-flags rules exactly as
    the model matches a frame carrying them, for all 256 flag bytes; without flags no flags
    rule matches (the earlier reading)."""
    lim = Limit.parse(pps=10)
    rules = [
        RuleSpec.parse(action="limit", proto="tcp", dport=80, tcp_flags="syn", limit=lim
                       ).with_id(1),
        RuleSpec.parse(proto="tcp", dport=80, tcp_flags="RST").with_id(2),
        RuleSpec.parse(src="198.18.4.0/24", proto="tcp", tcp_flags="FIN,!ACK").with_id(3),
        RuleSpec.parse(src="198.18.4.0/24", proto="tcp", dport=80, mode="monitor").with_id(4),
    ]
    comp = compiled(rules)
    names = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
    for flags in range(256):
        text = ",".join(n for i, n in enumerate(names) if flags >> i & 1) or "none"
        got = lookup(comp, parse_packet("198.18.4.7", "198.19.0.1", "tcp", 80, text))
        frame = build_frame(src="198.18.4.7", dst="198.19.0.1", proto="tcp", dport=80,
                            tcp_flags=flags)
        out = model.evaluate(rules, frame, limits=model.LimitState())
        assert got.rule_id == out.rule_id, (text, got, out)
        parsed = model.parse_frame(frame)
        assert {m.rule_id for m in got.matches} == {
            r.id for r in rules if model.rule_matches(r, parsed)}, text
    syn = lookup(comp, parse_packet("198.18.4.7", "198.19.0.1", "tcp", 80, "syn"))
    assert (syn.verdict, syn.rule_id) == ("limit", 1)
    unsaid = lookup(comp, parse_packet("198.18.4.7", "198.19.0.1", "tcp", 80))
    assert (unsaid.verdict, unsaid.rule_id) == ("monitor", 4)
    for proto, text, words in (("udp", "SYN", "needs proto tcp"), ("tcp", "!ACK", "no !FLAG"),
                               ("tcp", "SYN,BOGUS", "not a TCP flag")):
        with pytest.raises(InvalidRule, match=words):
            parse_packet("198.18.4.7", None, proto, 80, text)
