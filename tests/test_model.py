"""The reference model (xdpfw.verify.model) and the frame builder (verify.frames), no kernel.

Hand-written cases from the rule contract and from the parser in bpf/xdp_filter.c. The model is
the oracle of the differential tests, so these tests pin it down independently of the C.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import TypedDict

import pytest

from xdpfw import abi, codes
from xdpfw.rules import Rule, RuleSpec
from xdpfw.verify.frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ExtHeader,
    arp_frame,
    build_frame,
    internet_checksum,
    l3_offset,
    raw_ethertype_frame,
)
from xdpfw.verify.model import (
    Outcome,
    Parsed,
    evaluate,
    parse_frame,
    rule_matches,
    specificity,
    total_stats,
)

pytestmark = pytest.mark.pure


class Addrs(TypedDict):
    src: str
    dst: str


V4 = Addrs(src="10.1.2.3", dst="192.0.2.10")
V6 = Addrs(src="2001:db8:1::3", dst="2001:db8:2::10")


def rule(rule_id: int, **fields: object) -> Rule:
    return RuleSpec.parse(**fields).with_id(rule_id)  # type: ignore[arg-type]


def stats_of(outcome: Outcome, **expected: int) -> None:
    """Assert the outcome's counter increments: packets=1, bytes=len, the rest as given or 0."""
    names = {s.name.lower(): s for s in abi.Stat if s is not abi.Stat.MAX}
    want = {s: 0 for s in names.values()}
    want[abi.Stat.PACKETS] = 1
    want[abi.Stat.BYTES] = outcome.bytes
    for name, value in expected.items():
        want[names[name]] = value
    assert outcome.stats() == want


# --- independent checksum helpers (not the builder's own) -------------------------------


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def l4_checksum_ok(frame: bytes) -> bool:
    """Verify the UDP/TCP/ICMPv6 checksum of a frame without extension headers or options."""
    off = l3_offset(frame)
    if frame[off] >> 4 == 4:
        ihl = (frame[off] & 0xF) * 4
        total = struct.unpack_from("!H", frame, off + 2)[0]
        proto = frame[off + 9]
        seg = frame[off + ihl : off + total]
        pseudo = frame[off + 12 : off + 20] + bytes([0, proto]) + len(seg).to_bytes(2, "big")
    else:
        plen = struct.unpack_from("!H", frame, off + 4)[0]
        proto = frame[off + 6]
        seg = frame[off + 40 : off + 40 + plen]
        pseudo = frame[off + 8 : off + 40] + len(seg).to_bytes(4, "big") + bytes([0, 0, 0, proto])
    return ones_sum(pseudo + seg) == 0xFFFF


# --- the contract ------------------------------------------------------------------------


def test_allow_carve_out_inside_blocked_16() -> None:
    rules = [rule(1, src="10.1.0.0/16"), rule(2, action="allow", src="10.1.2.3")]
    carved = evaluate(rules, build_frame(**V4))
    assert (carved.action, carved.rule_id, carved.verdict) == ("pass", 2, abi.VERDICT_ALLOW)
    stats_of(carved, passed=1)
    blocked = evaluate(rules, build_frame(src="10.1.9.9", dst="192.0.2.10"))
    assert (blocked.action, blocked.rule_id, blocked.verdict) == ("drop", 1, abi.VERDICT_DROP)
    stats_of(blocked, dropped=1)


def test_allow_beats_a_more_specific_drop() -> None:
    rules = [
        rule(1, src="10.1.2.3", proto="udp", dport=80),
        rule(9, action="allow", dst="0.0.0.0/0"),
    ]
    out = evaluate(rules, build_frame(**V4))
    assert (out.action, out.rule_id) == ("pass", 9)


def test_longest_prefix_wins_crediting() -> None:
    rules = [rule(1, src="10.0.0.0/8"), rule(2, src="10.1.0.0/16"), rule(3, src="10.1.2.0/24")]
    for src, credited in (("10.1.2.3", 3), ("10.1.9.9", 2), ("10.9.9.9", 1)):
        out = evaluate(rules, build_frame(src=src, dst="192.0.2.10"))
        assert (out.action, out.rule_id) == ("drop", credited)
    assert evaluate(rules, build_frame(src="11.0.0.1", dst="192.0.2.10")).rule_id is None


def test_specificity_tie_breaks() -> None:
    frame = build_frame(**V4, proto="udp", dport=80)
    # a source prefix outranks any destination prefix
    assert evaluate([rule(1, dst="192.0.2.10"), rule(2, src="10.0.0.0/8")], frame).rule_id == 2
    # then proto named
    out = evaluate([rule(1, src="10.0.0.0/8"), rule(2, src="10.0.0.0/8", proto="udp")], frame)
    assert out.rule_id == 2
    # then the narrower port range
    narrow = [rule(1, proto="udp", dport="1-1000"), rule(2, proto="udp", dport="80-81")]
    assert evaluate(narrow, frame).rule_id == 2
    # a full port range is no narrower than no port at all: the lower id wins
    full = [rule(5, proto="udp", dport="0-65535"), rule(4, proto="udp")]
    assert evaluate(full, frame).rule_id == 4
    # then the lowest id
    assert evaluate([rule(7, proto="udp"), rule(3, proto="udp")], frame).rule_id == 3


def test_monitor_only_when_no_enforce_drop_matches() -> None:
    rules = [rule(1, mode="monitor", src="10.1.2.3"), rule(2, proto="udp")]
    dropped = evaluate(rules, build_frame(**V4, proto="udp"))
    assert (dropped.action, dropped.rule_id, dropped.verdict) == ("drop", 2, abi.VERDICT_DROP)
    stats_of(dropped, dropped=1)
    monitored = evaluate(rules, build_frame(**V4, proto="tcp"))
    assert (monitored.action, monitored.rule_id) == ("pass", 1)
    assert monitored.verdict == abi.VERDICT_MONITOR
    stats_of(monitored, passed=1, monitored=1)
    # an allow beats the monitor rule too: not monitored
    allowed = evaluate(
        [*rules, rule(3, action="allow", proto="tcp")], build_frame(**V4, proto="tcp")
    )
    assert (allowed.action, allowed.rule_id) == ("pass", 3)
    stats_of(allowed, passed=1)


def test_rule_families_and_addressless_rules() -> None:
    v6 = build_frame(**V6, proto="udp")
    assert evaluate([rule(1, src="0.0.0.0/0")], v6).rule_id is None
    assert evaluate([rule(1, src="::/0")], v6).rule_id == 1
    assert evaluate([rule(1, proto="udp")], v6).rule_id == 1
    assert evaluate([rule(1, proto="udp")], build_frame(**V4)).rule_id == 1
    assert evaluate([rule(1, dst="2001:db8:2::/48")], v6).rule_id == 1
    assert evaluate([rule(1, dst="2001:db8:3::/48")], v6).rule_id is None


@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_non_first_fragment_matches_proto_rules_not_dport_rules(addrs: Addrs) -> None:
    frame = build_frame(**addrs, proto="udp", dport=80, frag_offset=10, payload=b"x" * 16)
    p = parse_frame(frame)
    assert (p.status, p.proto, p.dport, p.fragment, p.l4_truncated) == ("ok", 17, None, True, False)
    out = evaluate([rule(1, proto="udp", dport=80)], frame)
    assert (out.action, out.rule_id) == ("pass", None)
    stats_of(out, passed=1, fragments=1)
    out = evaluate([rule(1, proto="udp", dport=80), rule(2, proto="udp")], frame)
    assert (out.action, out.rule_id) == ("drop", 2)
    stats_of(out, dropped=1, fragments=1)
    assert evaluate([rule(3, src=addrs["src"])], frame).rule_id == 3


@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_first_fragment_has_ports(addrs: Addrs) -> None:
    frame = build_frame(**addrs, proto="udp", dport=80, more_fragments=True)
    p = parse_frame(frame)
    assert (p.status, p.dport, p.fragment) == ("ok", 80, True)
    out = evaluate([rule(1, proto="udp", dport=80)], frame)
    assert (out.action, out.rule_id) == ("drop", 1)
    stats_of(out, dropped=1, fragments=1)


def test_non_first_fragment_emits_no_l4_header() -> None:
    frame = build_frame(**V4, proto="tcp", frag_offset=3, payload=b"abc")
    assert len(frame) == 14 + 20 + 3
    assert frame[-3:] == b"abc"
    frame6 = build_frame(**V6, proto="tcp", frag_offset=3, payload=b"abc")
    assert len(frame6) == 14 + 40 + 8 + 3
    assert frame6[54] == 6  # the fragment header's next header is the upper layer


@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_truncated_tcp_header_is_malformed_but_proto_rules_apply(addrs: Addrs) -> None:
    full = build_frame(**addrs, proto="tcp", dport=22)
    ip_hlen = 20 if "." in addrs["src"] else 40
    frame = full[: 14 + ip_hlen + 19]
    p = parse_frame(frame)
    assert (p.status, p.proto, p.dport, p.l4_truncated) == ("ok", 6, None, True)
    port_rule = evaluate([rule(1, proto="tcp", dport=22)], frame)
    assert (port_rule.action, port_rule.rule_id) == ("pass", None)
    stats_of(port_rule, passed=1, malformed=1)
    proto_rule = evaluate([rule(1, proto="tcp", dport=22), rule(2, proto="tcp")], frame)
    assert (proto_rule.action, proto_rule.rule_id) == ("drop", 2)
    stats_of(proto_rule, dropped=1, malformed=1)
    assert evaluate([rule(3, src=addrs["src"])], frame).rule_id == 3
    # 20 bytes of TCP are enough
    assert parse_frame(full[: 14 + ip_hlen + 20]).dport == 22


def test_l4_minimum_lengths() -> None:
    udp = build_frame(**V4, proto="udp", dport=53)
    assert parse_frame(udp[:41]).l4_truncated
    assert parse_frame(udp[:42]).dport == 53
    icmp = build_frame(**V4, proto="icmp")
    assert parse_frame(icmp[:37]).l4_truncated
    p = parse_frame(icmp[:38])
    assert (p.l4_truncated, p.dport, p.proto) == (False, None, 1)
    icmp6 = build_frame(**V6, proto="icmpv6")
    assert parse_frame(icmp6[:57]).l4_truncated
    assert not parse_frame(icmp6[:58]).l4_truncated
    # other protocols are not read, so never truncated
    gre = build_frame(**V4, proto=47)
    p = parse_frame(gre)
    assert (p.status, p.proto, p.dport, p.l4_truncated) == ("ok", 47, None, False)


@pytest.mark.parametrize(
    "vlans",
    [[(ETH_P_8021Q, 10)], [(ETH_P_8021AD, 100), (ETH_P_8021Q, 200)], [(ETH_P_8021Q, 1)] * 2],
    ids=["dot1q", "qinq", "double-8100"],
)
def test_vlan_and_qinq_are_parsed(vlans: list[tuple[int, int]]) -> None:
    frame = build_frame(**V4, proto="tcp", dport=443, vlans=vlans)
    assert l3_offset(frame) == 14 + 4 * len(vlans)
    p = parse_frame(frame)
    assert (p.status, p.family, str(p.src), p.dport) == ("ok", 4, V4["src"], 443)
    assert evaluate([rule(1, proto="tcp", dport=443)], frame).action == "drop"


def test_third_vlan_tag_is_non_ip() -> None:
    vlans = [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)]
    frame = build_frame(**V4, vlans=vlans)
    assert l3_offset(frame) == 26
    assert parse_frame(frame).status == "non_ip"
    out = evaluate([rule(1, src=V4["src"]), rule(2, proto="udp")], frame)
    assert (out.action, out.rule_id) == ("pass", None)
    stats_of(out, passed=1, non_ip=1)


def test_truncated_vlan_tag_is_malformed() -> None:
    frame = build_frame(**V4, vlans=[(ETH_P_8021Q, 5)])
    assert parse_frame(frame[:17]).status == "malformed"
    assert parse_frame(frame[:18]).status == "malformed"  # tag present, IPv4 header missing
    stats_of(evaluate([], frame[:17]), passed=1, malformed=1)


def test_arp_and_other_ethertypes_are_non_ip() -> None:
    arp = arp_frame(sender_ip="10.1.2.3", target_ip="10.1.2.4")
    assert len(arp) == 42
    assert parse_frame(arp) == Parsed("non_ip", 42)
    out = evaluate([rule(1, src="10.0.0.0/8")], arp)
    assert (out.action, out.rule_id) == ("pass", None)
    stats_of(out, passed=1, non_ip=1)
    assert parse_frame(raw_ethertype_frame(0x88CC, b"lldp")).status == "non_ip"
    # the ethertype alone decides: an empty "IPv4" frame is malformed, not non-IP
    assert parse_frame(raw_ethertype_frame(0x0800)).status == "malformed"
    assert parse_frame(raw_ethertype_frame(0x86DD)).status == "malformed"


def test_short_ethernet_is_malformed() -> None:
    for n in range(14):
        out = evaluate([rule(1, proto="udp")], bytes(n))
        assert out.parsed is not None and out.parsed.status == "malformed"
        stats_of(out, passed=1, malformed=1)
    assert out.bytes == 13


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_ihl_below_5_is_malformed_even_when_src_is_blocked(ihl: int) -> None:
    frame = bytearray(build_frame(**V4))
    frame[14] = 0x40 | ihl
    out = evaluate([rule(1, src=V4["src"]), rule(2, proto="udp")], bytes(frame))
    assert out.parsed is not None and out.parsed.status == "malformed"
    assert (out.action, out.rule_id) == ("pass", None)
    stats_of(out, passed=1, malformed=1)


def test_ipv4_header_checks() -> None:
    frame = build_frame(**V4, ip_options=b"\x01" * 8, more_fragments=True)
    wrong_version = bytearray(frame)
    wrong_version[14] = 0x67
    assert parse_frame(bytes(wrong_version)).status == "malformed"
    # 20 bytes are checked before version/ihl: a 19-byte header is malformed whatever it says
    assert parse_frame(frame[: 14 + 19]).status == "malformed"
    # ihl * 4 bytes must be present; a broken header is not counted as a fragment
    out = evaluate([], frame[: 14 + 27])
    assert out.parsed is not None and out.parsed.status == "malformed"
    stats_of(out, passed=1, malformed=1)
    assert parse_frame(frame[: 14 + 28]).status == "ok"


def test_ipv4_options_are_skipped() -> None:
    options = b"\x01" * 8  # NOPs: read at the wrong place they would give port 257
    frame = build_frame(**V4, proto="tcp", dport=443, ip_options=options)
    assert frame[14] == 0x47
    p = parse_frame(frame)
    assert (p.status, p.proto, p.dport) == ("ok", 6, 443)
    assert evaluate([rule(1, proto="tcp", dport=443)], frame).action == "drop"
    # the caller's options are padded to 4 bytes
    padded = build_frame(**V4, ip_options=b"\x94\x04\x00")
    assert padded[14] == 0x46
    assert parse_frame(padded).dport == 80


def test_ipv6_three_ext_headers_then_udp() -> None:
    chain = [ExtHeader(0, 8), ExtHeader(43, 24), ExtHeader(60, 16)]
    frame = build_frame(**V6, proto="udp", dport=5353, ext_headers=chain)
    off = l3_offset(frame)
    assert frame[off + 6] == 0
    assert struct.unpack_from("!H", frame, off + 4)[0] == 8 + 24 + 16 + 8
    p = parse_frame(frame)
    assert (p.status, p.family, p.proto, p.dport, p.fragment) == ("ok", 6, 17, 5353, False)
    assert evaluate([rule(1, proto="udp", dport=5353)], frame).action == "drop"


def test_ipv6_ah_and_fragment_lengths() -> None:
    chain = [
        ExtHeader(51, 12),
        ExtHeader(44, frag_offset=0, more_fragments=True),
        ExtHeader(51, 24),
    ]
    frame = build_frame(**V6, proto="tcp", dport=179, ext_headers=chain)
    p = parse_frame(frame)
    assert (p.status, p.proto, p.dport, p.fragment) == ("ok", 6, 179, True)
    # an AH length byte of 1 means 12 bytes: cut one byte short of it
    assert parse_frame(frame[: 54 + 11]).status == "malformed"


def test_ipv6_ext_header_bound() -> None:
    eight = [ExtHeader(60, 8)] * 8
    ok = build_frame(**V6, proto="udp", dport=7, ext_headers=eight)
    p = parse_frame(ok)
    assert (p.status, p.dport) == ("ok", 7)
    nine = build_frame(**V6, proto="udp", dport=7, ext_headers=[*eight, ExtHeader(0, 8)])
    out = evaluate([rule(1, src=V6["src"]), rule(2, proto="udp")], nine)
    assert out.parsed is not None and out.parsed.status == "malformed"
    assert (out.action, out.rule_id) == ("pass", None)
    stats_of(out, passed=1, malformed=1)
    # a 9th header that is a non-first fragment is still beyond the bound
    frag9 = build_frame(**V6, proto="udp", ext_headers=eight, frag_offset=1)
    assert parse_frame(frag9).status == "malformed"
    assert parse_frame(frag9).fragment is False
    # ... but an 8th one is within it
    frag8 = build_frame(**V6, proto="udp", ext_headers=eight[:7], frag_offset=1)
    assert parse_frame(frag8).status == "ok"


def test_ipv6_non_first_fragment() -> None:
    chain = [ExtHeader(0, 8), ExtHeader(44, frag_offset=185, more_fragments=True)]
    frame = build_frame(**V6, proto="udp", dport=80, ext_headers=chain, payload=b"\0\0\0\x50")
    p = parse_frame(frame)
    assert (p.status, p.proto, p.dport, p.fragment, p.l4_truncated) == ("ok", 17, None, True, False)
    out = evaluate([rule(1, proto="udp", dport=80)], frame)
    stats_of(out, passed=1, fragments=1)
    # the next header of a non-first fragment is taken as the protocol, whatever it is
    tail = build_frame(**V6, proto=60, frag_offset=2, payload=bytes(8))
    assert parse_frame(tail).proto == 60
    # the whole 8-byte fragment header must be present
    assert parse_frame(frame[: 54 + 8 + 8]).status == "ok"
    cut = evaluate([rule(1, proto="udp")], frame[: 54 + 8 + 7])
    assert cut.parsed is not None and cut.parsed.status == "malformed"
    # the C sets `fragment` as soon as 4 bytes of a fragment header are there
    stats_of(cut, passed=1, malformed=1, fragments=1)
    cut4 = evaluate([], frame[: 54 + 8 + 3])
    stats_of(cut4, passed=1, malformed=1)


def test_ipv6_first_fragment_then_broken_header_counts_both() -> None:
    chain = [ExtHeader(44, more_fragments=True), ExtHeader(60, 16)]
    frame = build_frame(**V6, ext_headers=chain)
    out = evaluate([], frame[: 54 + 8 + 15])
    stats_of(out, passed=1, malformed=1, fragments=1)


def test_ipv6_version_checked() -> None:
    frame = bytearray(build_frame(**V6))
    frame[14] = 0x40
    assert parse_frame(bytes(frame)).status == "malformed"
    assert parse_frame(build_frame(**V6)[:53]).status == "malformed"


SAMPLES = [
    build_frame(**V4, proto="tcp", dport=22, ip_options=b"\x01\x01\x01\x00"),
    build_frame(**V4, proto="udp", vlans=[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)], payload=b"hi"),
    build_frame(**V4, proto="icmp", more_fragments=True),
    build_frame(
        **V6,
        proto="tcp",
        ext_headers=[ExtHeader(0, 16), ExtHeader(51, 12), ExtHeader(44, more_fragments=True)],
    ),
    build_frame(**V6, proto="udp", ext_headers=[ExtHeader(60, 8)] * 9),
    build_frame(**V6, proto="icmpv6", vlans=[(ETH_P_8021Q, 3)], frag_offset=7, payload=b"z"),
    arp_frame(),
]


@pytest.mark.parametrize("frame", SAMPLES, ids=range(len(SAMPLES)))
def test_truncation_at_every_offset(frame: bytes) -> None:
    rules = [rule(1, proto="udp"), rule(2, proto="tcp", dport=22), rule(3, src="10.0.0.0/8")]
    for n in range(len(frame) + 1):
        cut = frame[:n]
        p = parse_frame(cut)
        assert p.status in ("ok", "malformed", "non_ip")
        assert p.length == n
        if n < 14:
            assert p.status == "malformed"
        if p.status != "ok":
            assert p.dport is None and not p.l4_truncated
        if p.dport is not None:
            assert p.proto in (6, 17) and not p.l4_truncated
        out = evaluate(rules, cut)
        assert sum(out.stats()[s] for s in (abi.Stat.PASSED, abi.Stat.DROPPED)) == 1
        assert out.bytes == n


# --- crediting order: the model's key against Rule.rank() ------------------------------


def random_rule(rng: random.Random, rule_id: int) -> Rule:
    """A valid random rule whose addresses (if any) cover 10.0.0.x or 2001:db8::x, x < 16."""
    fields: dict[str, object] = {"action": rng.choice(["drop", "allow"])}
    if fields["action"] == "drop":
        fields["mode"] = rng.choice(["enforce", "monitor"])
    family = rng.choice([4, 6])
    where = rng.choice(["src", "dst", None])
    if where is not None:
        host: ipaddress.IPv4Network | ipaddress.IPv6Network
        if family == 4:
            host = ipaddress.IPv4Network(f"10.0.0.{rng.randint(0, 15)}/32")
        else:
            host = ipaddress.IPv6Network(f"2001:db8::{rng.randint(0, 15):x}/128")
        plen = rng.choice([host.max_prefixlen, host.max_prefixlen - rng.randint(0, 4)])
        plen = rng.choice([plen, rng.randint(0, host.max_prefixlen)])
        fields[where] = host.supernet(new_prefix=plen)
    proto = rng.choice([None, "tcp", "udp", "icmp" if family == 4 else "icmpv6"])
    if where is None and proto is None:
        proto = "tcp"
    if proto is not None:
        fields["proto"] = proto
    if proto in ("tcp", "udp") and rng.random() < 0.6:
        lo = rng.choice([0, 22, 80, 443, rng.randint(0, 65535)])
        hi = min(65535, lo + rng.choice([0, 1, 100, 65535]))
        fields["dport"] = f"{lo}-{hi}"
    return rule(rule_id, **fields)


def test_specificity_orders_like_rank_within_a_verdict_class() -> None:
    rng = random.Random(20240601)
    ids = rng.sample(range(1, abi.RANK_ID_MASK + 1), 3000)
    rules = [random_rule(rng, i) for i in ids]
    # collide on everything but the id now and then
    twins = rng.sample(sorted(set(range(1, 10**6)) - set(ids)), 200)
    rules += [r.spec().with_id(i) for r, i in zip(rules[:200], twins, strict=True)]
    for verdict in (abi.VERDICT_ALLOW, abi.VERDICT_DROP, abi.VERDICT_MONITOR):
        same = [r for r in rules if r.verdict == verdict]
        assert len(same) > 100
        assert sorted(same, key=specificity) == sorted(same, key=Rule.rank)
    by_key = sorted(rules, key=lambda r: (r.verdict, specificity(r)))
    assert by_key == sorted(rules, key=Rule.rank)


def test_evaluate_credits_the_highest_ranked_match() -> None:
    """What the data plane does (the best rank among matching slots) is what the model says."""
    rng = random.Random(7)
    verdicts = []
    for _ in range(500):
        rules = [random_rule(rng, i) for i in rng.sample(range(1, 5000), rng.randint(1, 12))]
        six = rng.random() < 0.5
        base = "2001:db8::" if six else "10.0.0."
        a, b = rng.sample(range(16), 2)
        frame = build_frame(
            src=f"{base}{a:x}" if six else f"{base}{a}",
            dst=f"{base}{b:x}" if six else f"{base}{b}",
            proto=rng.choice(["tcp", "udp", "icmpv6" if six else "icmp"]),
            dport=rng.choice([22, 80, 443, rng.randint(0, 65535)]),
            frag_offset=rng.choice([0, 0, 0, 1]),
        )
        p = parse_frame(frame)
        matching = [r for r in rules if rule_matches(r, p)]
        out = evaluate(rules, frame)
        if not matching:
            assert (out.rule_id, out.verdict, out.action) == (None, abi.VERDICT_NONE, "pass")
            continue
        best = max(matching, key=Rule.rank)
        verdicts.append(out.verdict)
        assert out.rule_id == best.id
        assert out.verdict == best.verdict
        assert codes.verdict_class(out.verdict) == best.rank() >> 62
        assert out.action == ("drop" if out.verdict == abi.VERDICT_DROP else "pass")
    for verdict in (abi.VERDICT_ALLOW, abi.VERDICT_DROP, abi.VERDICT_MONITOR):
        assert verdicts.count(verdict) > 30


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        evaluate([rule(1, proto="tcp"), rule(1, proto="udp")], build_frame(**V4))


def test_total_stats() -> None:
    frames = [build_frame(**V4), arp_frame(), bytes(3), build_frame(**V4, frag_offset=1)]
    total = total_stats(evaluate([rule(1, proto="udp")], f) for f in frames)
    assert total == {
        abi.Stat.PACKETS: 4,
        abi.Stat.PASSED: 2,
        abi.Stat.DROPPED: 2,
        abi.Stat.MONITORED: 0,
        abi.Stat.MALFORMED: 1,
        abi.Stat.NON_IP: 1,
        abi.Stat.FRAGMENTS: 1,
        abi.Stat.BYTES: sum(len(f) for f in frames),
        abi.Stat.LIMITED: 0,
    }


# --- the frame builder --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {**V4, "proto": "udp", "dport": 53},
        {**V4, "proto": "tcp", "dport": 22, "vlans": [(ETH_P_8021Q, 7)]},
        {**V4, "proto": "tcp", "dport": 8080, "ip_options": b"\x01\x01\x01\x01\x00"},
        {**V4, "proto": "icmp", "vlans": [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)]},
        {**V4, "proto": 47},
        {**V6, "proto": "udp", "dport": 443},
        {**V6, "proto": "tcp", "dport": 1, "ext_headers": [ExtHeader(0), ExtHeader(43, 16)]},
        {**V6, "proto": "udp", "dport": 65535, "vlans": [(ETH_P_8021Q, 4095)]},
        {**V6, "proto": "icmpv6", "ext_headers": [ExtHeader(60, 24), ExtHeader(51, 16)]},
    ],
)
def test_round_trip(kwargs: dict[str, object]) -> None:
    frame = build_frame(**kwargs)  # type: ignore[arg-type]
    p = parse_frame(frame)
    assert p.status == "ok"
    assert p.src == ipaddress.ip_address(str(kwargs["src"]))
    assert p.dst == ipaddress.ip_address(str(kwargs["dst"]))
    number = {"udp": 17, "tcp": 6, "icmp": 1, "icmpv6": 58}.get(str(kwargs["proto"]))
    assert p.proto == (number if number is not None else kwargs["proto"])
    assert p.dport == (kwargs.get("dport", 80) if p.proto in (6, 17) else None)
    assert not p.fragment and not p.l4_truncated
    assert p.length == len(frame)


@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
def test_ipv4_checksums_verify(proto: str) -> None:
    frame = build_frame(**V4, proto=proto, payload=b"hello", ip_options=b"\x07\x03\x04")
    off = l3_offset(frame)
    ihl = (frame[off] & 0xF) * 4
    assert ihl == 24
    assert ones_sum(frame[off : off + ihl]) == 0xFFFF
    assert internet_checksum(frame[off : off + ihl]) == 0
    total_len, ttl = struct.unpack_from("!H", frame, off + 2)[0], frame[off + 8]
    assert (total_len, ttl) == (len(frame) - off, 64)
    if proto == "icmp":
        assert frame[off + ihl] == 8
        assert ones_sum(frame[off + ihl :]) == 0xFFFF
    else:
        assert l4_checksum_ok(frame)
    if proto == "udp":
        assert struct.unpack_from("!H", frame, off + ihl + 4)[0] == 8 + 5
    if proto == "tcp":
        assert frame[off + ihl + 12] == 0x50 and frame[off + ihl + 13] == 0x02  # 20 bytes, SYN


@pytest.mark.parametrize("proto", ["udp", "tcp", "icmpv6"])
def test_ipv6_checksums_verify(proto: str) -> None:
    frame = build_frame(**V6, proto=proto, payload=b"odd")
    off = l3_offset(frame)
    assert struct.unpack_from("!H", frame, off + 4)[0] == len(frame) - off - 40
    assert frame[off + 7] == 64
    assert l4_checksum_ok(frame)
    if proto == "icmpv6":
        assert frame[off + 40] == 128


def test_udp_checksum_never_zero_and_odd_payloads() -> None:
    for i in range(300):
        frame = build_frame(**V4, sport=i, payload=bytes([i % 256]) * (i % 7))
        assert struct.unpack_from("!H", frame, 40)[0] != 0
        assert l4_checksum_ok(frame)


def test_builder_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        build_frame(src="10.0.0.1", dst="2001:db8::1")
    with pytest.raises(ValueError):
        build_frame(**V6, ip_options=b"\x01")
    with pytest.raises(ValueError):
        build_frame(**V4, ext_headers=[ExtHeader(0)])
    with pytest.raises(ValueError):
        build_frame(**V6, ext_headers=[ExtHeader(44)], frag_offset=1)
    with pytest.raises(ValueError):
        build_frame(**V4, proto="icmpv6")
    with pytest.raises(ValueError):
        build_frame(**V4, proto="sctp")
    with pytest.raises(ValueError):
        ExtHeader(0, 12)
    with pytest.raises(ValueError):
        ExtHeader(44, 16)
    with pytest.raises(ValueError):
        build_frame(**V4, vlans=[(ETH_P_8021Q, 4096)])


def test_arp_frame_layout() -> None:
    frame = arp_frame(sender_ip="192.0.2.1", target_ip="192.0.2.2", eth_src="02:aa:bb:cc:dd:ee")
    assert frame[:6] == b"\xff" * 6
    assert frame[12:14] == b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001080006040001")
    assert frame[22:28] == bytes.fromhex("02aabbccddee")
    assert frame[28:32] == bytes([192, 0, 2, 1])
    assert frame[38:42] == bytes([192, 0, 2, 2])


def test_l3_offset() -> None:
    assert l3_offset(build_frame(**V4)) == 14
    assert l3_offset(arp_frame(vlans=[(ETH_P_8021Q, 1)])) == 18
    with pytest.raises(ValueError):
        l3_offset(b"\0" * 13)
