"""Rate-limit rules and TCP flag matches in the loaded program (BPF_PROG_TEST_RUN).

Budgets are checked with frames sent back to back against rates whose packet cost (1/pps) is
far longer than a run of the whole test, so which frames pass is not a matter of timing: a
burst of B passes, the rest are limited. The clocked differential check drives the model with
the kernel's clock (xdpfw.verify.clocked) over 100k frames at rates where budgets refill
during the run.
"""

from __future__ import annotations

import ctypes
import random
import time
from typing import Any

import pytest

from xdpfw import abi
from xdpfw.abi import Stat
from xdpfw.datapath import Datapath
from xdpfw.rules import Limit, Rule, RuleSpec
from xdpfw.verify.clocked import ClockedDiffer
from xdpfw.verify.frames import build_frame
from xdpfw.verify.harness import Verdict, run

pytestmark = pytest.mark.bpf

SRC_A, SRC_B, DST = "198.18.40.1", "198.18.40.2", "198.19.0.9"
SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01


def R(rule_id: int, **kw: Any) -> Rule:
    return RuleSpec.parse(**kw).with_id(rule_id)


def L(rule_id: int, limit: Limit, **kw: Any) -> Rule:
    return RuleSpec.parse(action="limit", limit=limit, **kw).with_id(rule_id)


def tcp(src: str = SRC_A, flags: int = SYN, dport: int = 80, **kw: Any) -> bytes:
    return build_frame(src=src, dst=DST, proto="tcp", dport=dport, tcp_flags=flags, **kw)


def udp(src: str = SRC_A, dport: int = 53, **kw: Any) -> bytes:
    return build_frame(src=src, dst=DST, proto="udp", dport=dport, **kw)


def verdicts(dp: Datapath, frames: list[bytes]) -> list[str]:
    return ["drop" if run(dp.prog_fd, f).verdict == Verdict.DROP else "pass" for f in frames]


def limit_counts(dp: Datapath, rule_id: int) -> tuple[int, int, int]:
    c = dp.limit_counters([rule_id])[rule_id]
    return c.passed, c.limited, c.banned


SLOW = Limit.parse(pps=1, burst=5)  # one packet a second: nothing refills during a test


def test_a_burst_passes_then_the_source_is_limited_and_another_source_is_not(dp: Datapath) -> None:
    dp.add_rules([L(1, SLOW, src="198.18.40.0/24")])
    g0 = dp.global_counters().by_stat()
    assert verdicts(dp, [udp(SRC_A)] * 9) == ["pass"] * 5 + ["drop"] * 4
    assert verdicts(dp, [udp(SRC_B)] * 6) == ["pass"] * 5 + ["drop"]
    assert limit_counts(dp, 1) == (10, 5, 0)
    g1 = dp.global_counters().by_stat()
    assert g1[Stat.LIMITED] - g0[Stat.LIMITED] == 5
    assert g1[Stat.DROPPED] - g0[Stat.DROPPED] == 5
    assert dp.rule_counters([1])[1].packets == 15  # every frame is credited to the rule
    # a source outside the rule is never counted
    assert verdicts(dp, [udp("198.18.41.1")] * 8) == ["pass"] * 8
    assert limit_counts(dp, 1) == (10, 5, 0)


def test_per_rule_is_one_budget_for_every_source(dp: Datapath) -> None:
    dp.add_rules([L(1, Limit.parse(pps=1, burst=4, per="rule"), proto="udp")])
    got = verdicts(dp, [udp(SRC_A), udp(SRC_B)] * 4)
    assert got == ["pass"] * 4 + ["drop"] * 4
    assert limit_counts(dp, 1) == (4, 4, 0)


def test_bytes_budget(dp: Datapath) -> None:
    frame = udp(payload=bytes(958))  # 1000 bytes
    assert len(frame) == 1000
    dp.add_rules([L(1, Limit.parse(bps=10, burst_bytes=3500), src=SRC_A)])
    # 10 B/s: a 1000-byte frame costs 100 s, the window is 350 s: three pass, not four
    assert verdicts(dp, [frame] * 5) == ["pass"] * 3 + ["drop"] * 2
    # both rates: a frame passes only if both budgets have room
    dp.remove_rules([1])
    dp.add_rules([L(2, Limit.parse(pps=1, burst=2, bps=10, burst_bytes=3500), src=SRC_A)])
    assert verdicts(dp, [frame] * 4) == ["pass"] * 2 + ["drop"] * 2


def test_a_ban_drops_outright_and_expires_on_time(dp: Datapath) -> None:
    dp.add_rules([L(1, Limit.parse(pps=1, burst=2, ban_seconds=1), src="198.18.40.0/24")])
    assert verdicts(dp, [udp(SRC_A)] * 5) == ["pass", "pass", "drop", "drop", "drop"]
    assert limit_counts(dp, 1) == (2, 1, 2)  # over once, then banned
    bans = dp.bans()
    assert [(b.rule_id, b.source) for b in bans] == [(1, SRC_A)]
    assert 0.5 < bans[0].expires_in <= 1.0
    assert verdicts(dp, [udp(SRC_B)]) == ["pass"]  # the ban is the source's, not the rule's
    time.sleep(1.05)
    assert dp.bans() == []
    # the ban is served; the budget (2 s of window, 1 s refilled) lets one through
    assert verdicts(dp, [udp(SRC_A)] * 3)[0] == "pass"


def test_unban_lifts_a_ban_and_refills_the_budget(dp: Datapath) -> None:
    dp.add_rules([L(1, Limit.parse(pps=1, burst=2, ban_seconds=600), src="198.18.40.0/24")])
    assert verdicts(dp, [udp(SRC_A)] * 4) == ["pass", "pass", "drop", "drop"]
    assert verdicts(dp, [udp(SRC_B)] * 3) == ["pass", "pass", "drop"]
    assert {b.source for b in dp.bans()} == {SRC_A, SRC_B}
    assert dp.unban(source=SRC_A) == 1
    assert [b.source for b in dp.bans()] == [SRC_B]
    assert verdicts(dp, [udp(SRC_A)] * 3) == ["pass", "pass", "drop"]
    assert dp.unban() == 2


def test_monitor_mode_counts_would_limit_and_never_drops(dp: Datapath) -> None:
    dp.add_rules([L(1, Limit.parse(pps=1, burst=3, ban_seconds=5), mode="monitor", src=SRC_A)])
    g0 = dp.global_counters().by_stat()
    assert verdicts(dp, [udp(SRC_A)] * 7) == ["pass"] * 7
    assert limit_counts(dp, 1) == (3, 4, 0)
    assert dp.bans() == []  # monitor never bans
    g1 = dp.global_counters().by_stat()
    assert g1[Stat.MONITORED] - g0[Stat.MONITORED] == 7
    assert g1[Stat.LIMITED] - g0[Stat.LIMITED] == 0


def test_precedence_allow_drop_limit_monitor(dp: Datapath) -> None:
    dp.add_rules([
        L(1, SLOW, src="198.18.0.0/15"),
        R(2, src="198.18.40.66"),  # enforce drop, more specific: beats the limit
        R(3, action="allow", src="198.18.40.77"),  # allow: never touches the budget
        R(4, mode="monitor", src="198.18.40.1"),  # monitor, more specific: the limit wins
    ])
    assert verdicts(dp, [udp("198.18.40.66")] * 2) == ["drop", "drop"]
    assert verdicts(dp, [udp("198.18.40.77")] * 7) == ["pass"] * 7
    assert limit_counts(dp, 1) == (0, 0, 0)
    assert verdicts(dp, [udp(SRC_A)] * 6) == ["pass"] * 5 + ["drop"]
    assert limit_counts(dp, 1) == (5, 1, 0)
    counts = dp.rule_counters([1, 2, 3, 4])
    assert [counts[i].packets for i in (1, 2, 3, 4)] == [6, 2, 7, 0]


def test_tcp_flags_match_syn_not_ack_and_never_a_fragment(dp: Datapath) -> None:
    dp.add_rules([R(1, proto="tcp", dport=80, tcp_flags="syn")])
    assert verdicts(dp, [tcp(flags=SYN), tcp(flags=SYN | ACK), tcp(flags=ACK),
                         tcp(flags=SYN, dport=81), udp(dport=80)]) == \
        ["drop", "pass", "pass", "pass", "pass"]
    # a non-first fragment has no TCP header: no flags, no match
    assert verdicts(dp, [tcp(frag_offset=3), tcp(more_fragments=True)]) == ["pass", "drop"]
    # a TCP header cut short: the flags are not read
    assert verdicts(dp, [tcp()[:-1]]) == ["pass"]
    dp.remove_rules([1])
    dp.add_rules([R(2, proto="tcp", tcp_flags="RST"), R(3, proto="tcp", tcp_flags="FIN,!ACK")])
    assert verdicts(dp, [tcp(flags=RST), tcp(flags=RST | ACK), tcp(flags=FIN),
                         tcp(flags=FIN | ACK), tcp(flags=SYN)]) == \
        ["drop", "drop", "drop", "pass", "pass"]
    # IPv6 too
    six = build_frame(src="2001:db8::5", dst="2001:db8::9", proto="tcp", tcp_flags=RST)
    assert verdicts(dp, [six]) == ["drop"]


def test_syn_flood_limit_per_source_to_a_port(dp: Datapath) -> None:
    dp.add_rules([L(1, Limit.parse(pps=1, burst=3), proto="tcp", dport=80, tcp_flags="syn")])
    flood = [tcp(SRC_A, flags=SYN)] * 10
    assert verdicts(dp, flood) == ["pass"] * 3 + ["drop"] * 7
    # established traffic of the same source, and SYNs of another one, are untouched
    assert verdicts(dp, [tcp(SRC_A, flags=ACK)] * 5) == ["pass"] * 5
    assert verdicts(dp, [tcp(SRC_B, flags=SYN)] * 3) == ["pass"] * 3


def test_removing_a_limit_rule_clears_its_state(dp: Datapath) -> None:
    dp.add_rules([L(7, Limit.parse(pps=1, burst=1, ban_seconds=60), src=SRC_A)])
    assert dp.rules()[0].limit == Limit.parse(pps=1, burst=1, ban_seconds=60)
    assert verdicts(dp, [udp(SRC_A)] * 3) == ["pass", "drop", "drop"]
    assert dp.bans()
    removed = dp.remove_rules([7])
    assert removed[0].limit is not None
    assert dp.bans() == [] and dp.limit_counters() == {}
    key = ctypes.c_uint32(7)
    assert dp.map("xdpfw_limits").lookup(key) is None
    assert not [k for k in dp.map("xdpfw_buckets") if k.rule_id == 7]
    # a new rule with the same id starts clean
    dp.add_rules([L(7, Limit.parse(pps=1, burst=1), src=SRC_A)])
    assert verdicts(dp, [udp(SRC_A)] * 2) == ["pass", "drop"]


def test_limit_parameters_in_the_map_are_the_contract(dp: Datapath) -> None:
    lim = Limit.parse(pps=3, burst=7, bps=1000, burst_bytes=4000, ban_seconds=9)
    dp.add_rules([L(9, lim, src=SRC_A)])
    v = dp.map("xdpfw_limits").lookup(ctypes.c_uint32(9))
    assert (v.pkt_cost_ns, v.pkt_window_ns) == (333_333_333, 7 * 333_333_333)
    assert (v.byte_rate, v.byte_window_ns, v.ban_ns) == (1000, 4_000_000_000, 9 * 10**9)
    assert v.per == abi.PER_SOURCE


def test_clocked_differential_100k_frames(dp: Datapath) -> None:
    """Program and model agree frame by frame on 100k frames, budgets refilling meanwhile."""
    rules = [
        # rates well below what each source sends even on a loaded machine (a few thousand
        # frames a second in all), so every rule is over its budget part of the time
        L(1, Limit.parse(pps=400, burst=4), src="198.18.40.0/24"),
        L(2, Limit.parse(pps=200, burst=3, ban_seconds=1), src="198.18.41.0/24"),
        L(3, Limit.parse(bps=40_000, burst_bytes=3000, per="rule"), dst="198.19.7.0/24"),
        L(4, Limit.parse(pps=300, burst=2), mode="monitor", src="198.18.42.0/24"),
        L(5, Limit.parse(pps=500, burst=5, bps=90_000, burst_bytes=4000),
          proto="tcp", dport=80, tcp_flags="syn"),
        R(6, src="198.18.40.9"),  # drop beats the limit
        R(7, action="allow", src="198.18.41.9"),  # allow beats the limit
        R(8, mode="monitor", src="198.18.40.0/26"),  # a limit beats monitor
        R(9, proto="tcp", dport=81, tcp_flags="RST"),
    ]
    dp.add_rules(rules)
    rng = random.Random(16)
    sources = [f"198.18.{n}.{h}" for n in (40, 41, 42, 43) for h in (1, 2, 9, 70)]

    def frame() -> bytes:
        src = rng.choice(sources)
        dst = rng.choice([DST, "198.19.7.5"])
        kind = rng.random()
        if kind < 0.4:
            return tcp(src, flags=rng.choice([SYN, SYN, ACK, RST, SYN | ACK]),
                       dport=rng.choice([80, 80, 81]), frag_offset=rng.choice([0] * 9 + [2]))
        return build_frame(src=src, dst=dst, proto="udp", dport=53,
                           payload=bytes(rng.choice([0, 200, 1000])))

    pool = [frame() for _ in range(3000)]  # distinct frames, sent in random order
    differ = ClockedDiffer(dp)
    rep = differ.check(rng.choice(pool) for _ in range(100_000))
    assert rep.mismatches == [], rep.mismatches
    assert rep.frames == 100_000
    # the check exercised every answer, mostly unambiguously
    assert rep.answers["passed"] > 500 and rep.answers["limited"] > 1000
    assert rep.answers["banned"] > 100
    assert rep.ambiguous < rep.limit_frames // 20


def test_a_restarted_service_adopts_the_limits_from_the_pins(dp: Datapath) -> None:
    from xdpfw.datapath import DatapathConfig

    lim = Limit.parse(pps=100, burst=7, bps=5000, burst_bytes=9000, ban_seconds=30)
    dp.add_rules([L(3, lim, src=SRC_A), L(4, Limit.parse(pps=3, per="rule"), proto="udp")])
    assert verdicts(dp, [udp(SRC_A)] * 2) == ["pass", "pass"]
    again = Datapath.open(DatapathConfig(bpffs_dir=dp.cfg.bpffs_dir, caps=dp.caps,
                                         upgrade=False))
    try:
        assert again.adopted
        assert again.rule_limits() == {3: lim, 4: Limit.parse(pps=3, per="rule")}
        assert again.limit_counters([3])[3].passed == 2
    finally:
        again.close()
