"""The loaded XDP program against the reference model, frame by frame (BPF_PROG_TEST_RUN).

Every frame goes through `run_and_check`: the program's return value must be the model's action
(never XDP_ABORTED), the credited rule's counters must grow by exactly one packet and the frame's
length while every other rule's stay put, and the global counters must grow by exactly what
`Outcome.stats()` says. Most cases also pin the expected outcome explicitly, so a model and a
program that agree on a wrong answer still fail.

Rules only use 198.18.0.0/15 and 2001:db8::/32.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from xdpfw import abi
from xdpfw.abi import Stat, Table
from xdpfw.compiler import MAX_SLOTS
from xdpfw.datapath import Datapath
from xdpfw.datapath.pins import MAP_TYPES
from xdpfw.errors import CapacityExceeded, RuleConflict
from xdpfw.kernel import bpfsys
from xdpfw.rules import Rule, RuleSpec
from xdpfw.verify import model
from xdpfw.verify.frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    EXT_AH,
    EXT_DSTOPTS,
    EXT_FRAGMENT,
    EXT_HOPOPTS,
    EXT_ROUTING,
    ExtHeader,
    arp_frame,
    build_frame,
    l3_offset,
    raw_ethertype_frame,
)

pytestmark = pytest.mark.bpf

XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
RETVAL = {"pass": XDP_PASS, "drop": XDP_DROP}

H4 = "198.18.1.1"
H6 = "2001:db8::1"
OTHER4 = "198.19.0.1"
OTHER6 = "2001:db8:ffff::2"


def R(rule_id: int, **kwargs: Any) -> Rule:
    return RuleSpec.parse(**kwargs).with_id(rule_id)


def v4(src: str = H4, dst: str = OTHER4, proto: int | str = "udp", dport: int = 80,
       **kw: Any) -> bytes:
    return build_frame(src=src, dst=dst, proto=proto, dport=dport, **kw)


def v6(src: str = H6, dst: str = OTHER6, proto: int | str = "udp", dport: int = 80,
       **kw: Any) -> bytes:
    return build_frame(src=src, dst=dst, proto=proto, dport=dport, **kw)


def _globals(dp: Datapath) -> dict[Stat, int]:
    return dp.global_counters().by_stat()


def _repro(rules: Sequence[Rule], frame: bytes) -> str:
    listed = "; ".join(
        f"#{r.id} {r.action}/{r.mode} {r.describe()}" for r in sorted(rules, key=lambda r: r.id)
    )
    return f"\n  rules: {listed or '(none)'}\n  frame ({len(frame)} bytes): {frame.hex()}"


def run_and_check(
    dp: Datapath, rules: Iterable[Rule], frame: bytes, *, check_installed: bool = True
) -> model.Outcome:
    """Run ``frame`` through the loaded program; compare verdict and counters with the model."""
    rules = list(rules)
    if check_installed:
        assert {r.id: r for r in dp.rules()} == {r.id: r for r in rules}, "test bug: rule set"
    ids = [r.id for r in rules]
    before_rules = dp.rule_counters(ids)
    before = _globals(dp)
    run = bpfsys.prog_test_run(dp.prog_fd, frame)
    after_rules = dp.rule_counters(ids)
    after = _globals(dp)
    out = model.evaluate(rules, frame)
    repro = _repro(rules, frame)

    assert run.retval != XDP_ABORTED, "XDP_ABORTED" + repro
    assert run.retval == RETVAL[out.action], (
        f"program returned {run.retval}, model says {out.action} (rule {out.rule_id})" + repro
    )
    assert run.data_out == frame, "the program must not modify the frame" + repro
    assert set(before_rules) == set(after_rules) == set(ids), "rule counters missing" + repro
    got = {
        rid: (
            after_rules[rid].packets - before_rules[rid].packets,
            after_rules[rid].bytes - before_rules[rid].bytes,
        )
        for rid in ids
    }
    want = {rid: (1, len(frame)) if rid == out.rule_id else (0, 0) for rid in ids}
    assert got == want, (
        f"rule counter deltas {_nonzero(got)}, model credits rule {out.rule_id}" + repro
    )
    if out.rule_id is not None:
        assert after_rules[out.rule_id].last_hit is not None
    deltas = {stat: after[stat] - before[stat] for stat in before}
    assert deltas == out.stats(), (
        f"global counter deltas {_nonzero(deltas)} != model {_nonzero(out.stats())}" + repro
    )
    return out


def _nonzero(d: dict[Any, Any]) -> dict[Any, Any]:
    return {(k.name if isinstance(k, Stat) else k): v for k, v in d.items() if v not in (0, (0, 0))}


def expect(
    dp: Datapath,
    rules: Sequence[Rule],
    frame: bytes,
    action: str,
    rule_id: int | None,
    **stats: int,
) -> model.Outcome:
    """run_and_check, plus the outcome the contract demands (guards the model itself)."""
    out = run_and_check(dp, rules, frame)
    assert (out.action, out.rule_id) == (action, rule_id), _repro(rules, frame)
    for name, value in stats.items():
        assert out.stats()[Stat[name.upper()]] == value, f"{name}: {_repro(rules, frame)}"
    return out


def install(dp: Datapath, *rules: Rule) -> list[Rule]:
    dp.add_rules(list(rules))
    return list(rules)


# --- plain drops ----------------------------------------------------------------------------------


def test_no_rules_passes_everything(dp: Datapath) -> None:
    for frame in (v4(), v6(), v4(proto="tcp"), v6(proto="icmpv6"), arp_frame()):
        out = expect(dp, [], frame, "pass", None)
        assert out.verdict == abi.VERDICT_NONE


def test_exact_v4_and_v6_drop(dp: Datapath) -> None:
    rules = install(dp, R(1, src=H4), R(2, src=H6), R(3, dst="198.19.7.7"), R(4, dst=OTHER6))
    expect(dp, rules, v4(), "drop", 1, dropped=1)
    expect(dp, rules, v4(src="198.18.1.2"), "pass", None, passed=1)
    expect(dp, rules, v4(src="198.18.1.2", dst="198.19.7.7"), "drop", 3)
    expect(dp, rules, v6(), "drop", 2)
    expect(dp, rules, v6(src="2001:db8::2"), "drop", 4)  # dst is OTHER6
    expect(dp, rules, v6(src="2001:db8::2", dst="2001:db8::3"), "pass", None)
    # an IPv4 address never matches in IPv6 and vice versa
    expect(dp, rules, v6(src="::ffff:198.18.1.1", dst="2001:db8::3"), "pass", None)


def test_prefix_drops(dp: Datapath) -> None:
    rules = install(dp, R(1, src="198.18.0.0/16"), R(2, src="2001:db8:1::/48"))
    expect(dp, rules, v4(src="198.18.255.254"), "drop", 1)
    expect(dp, rules, v4(src="198.18.0.0"), "drop", 1)
    expect(dp, rules, v4(src="198.19.0.1"), "pass", None)
    expect(dp, rules, v6(src="2001:db8:1:ffff::1"), "drop", 2)
    expect(dp, rules, v6(src="2001:db8:1::"), "drop", 2)
    expect(dp, rules, v6(src="2001:db8:2::1"), "pass", None)
    expect(dp, rules, v6(src="2001:db8:0:ffff::1"), "pass", None)


def test_longest_prefix_is_credited(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, src="198.18.0.0/15"),
        R(2, src="198.18.0.0/16"),
        R(3, src="198.18.1.0/24"),
        R(4, src="198.18.1.1"),
        R(5, src="2001:db8::/32"),
        R(6, src="2001:db8::/48"),
        R(7, src="2001:db8::/64"),
        R(8, src=H6),
    )
    for src, rid in (("198.18.1.1", 4), ("198.18.1.2", 3), ("198.18.2.1", 2), ("198.19.0.1", 1)):
        expect(dp, rules, v4(src=src), "drop", rid)
    for src, rid in ((H6, 8), ("2001:db8::2", 7), ("2001:db8:0:1::1", 6), ("2001:db8:1::1", 5)):
        expect(dp, rules, v6(src=src), "drop", rid)


# --- nested prefixes: the compiled inheritance ----------------------------------------------------


def test_nested_prefixes_fall_back_to_the_covering_prefix(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, src="198.18.0.0/16"),  # address only, shorter
        R(2, src="198.18.1.0/24", proto="tcp", dport=80),  # port rule, longer
        R(3, src="198.18.1.128/25", proto="udp", dport="50-60"),
        R(4, action="allow", src="198.18.1.0/24", proto="tcp", dport=443),
    )
    # the /24 (and /25) entry is the trie's answer: its own rules miss, the /16's applies
    expect(dp, rules, v4(src="198.18.1.5", proto="udp", dport=53), "drop", 1)
    expect(dp, rules, v4(src="198.18.1.5", proto="tcp", dport=80), "drop", 2)
    expect(dp, rules, v4(src="198.18.1.5", proto="tcp", dport=443), "pass", 4)
    expect(dp, rules, v4(src="198.18.1.200", proto="udp", dport=53), "drop", 3)
    expect(dp, rules, v4(src="198.18.1.200", proto="udp", dport=61), "drop", 1)
    expect(dp, rules, v4(src="198.18.1.200", proto="tcp", dport=80), "drop", 2)
    expect(dp, rules, v4(src="198.18.1.200", proto="tcp", dport=443), "pass", 4)
    expect(dp, rules, v4(src="198.18.1.200", proto="icmp"), "drop", 1)
    expect(dp, rules, v4(src="198.19.1.200", proto="tcp", dport=80), "pass", None)


def test_nested_v6_and_dst_prefixes(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, mode="monitor", src="2001:db8::/32"),
        R(2, src="2001:db8:1::/48", proto="tcp", dport=22),
        R(3, src="2001:db8:1:2::/64", proto="udp", dport=53),
        R(4, src="2001:db8:1:2::5", proto="tcp", dport=23),
        R(5, dst="198.18.0.0/15", proto="udp"),
        R(6, dst="198.18.4.0/22", proto="tcp", dport="1-1023"),
        R(7, dst="198.18.5.0/24", proto="tcp", dport=8080),
    )
    expect(dp, rules, v6(src="2001:db8:1:2::5", proto="icmpv6"), "pass", 1, monitored=1)
    expect(dp, rules, v6(src="2001:db8:1:2::5", proto="tcp", dport=22), "drop", 2)
    expect(dp, rules, v6(src="2001:db8:1:2::5", proto="tcp", dport=23), "drop", 4)
    expect(dp, rules, v6(src="2001:db8:1:2::6", proto="tcp", dport=23), "pass", 1)
    expect(dp, rules, v6(src="2001:db8:1:2::6", proto="udp", dport=53), "drop", 3)
    expect(dp, rules, v6(src="2001:db8:1:3::6", proto="udp", dport=53), "pass", 1)
    expect(dp, rules, v4(dst="198.18.5.5", proto="udp", dport=9), "drop", 5)
    expect(dp, rules, v4(dst="198.18.5.5", proto="tcp", dport=22), "drop", 6)
    expect(dp, rules, v4(dst="198.18.5.5", proto="tcp", dport=8080), "drop", 7)
    expect(dp, rules, v4(dst="198.18.5.5", proto="tcp", dport=8081), "pass", None)
    expect(dp, rules, v4(dst="198.18.6.5", proto="tcp", dport=8080), "pass", None)


# --- allow carve-outs, monitor --------------------------------------------------------------------


def test_allow_carve_outs(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, src="198.18.0.0/16"),
        R(2, action="allow", src="198.18.7.0/24"),
        R(3, action="allow", src="198.18.9.9", proto="tcp", dport=22),
        R(4, src="2001:db8:5::/48"),
        R(5, action="allow", src="2001:db8:5:5::/64"),
    )
    expect(dp, rules, v4(src="198.18.7.7"), "pass", 2, passed=1)
    expect(dp, rules, v4(src="198.18.8.7"), "drop", 1)
    expect(dp, rules, v4(src="198.18.9.9", proto="tcp", dport=22), "pass", 3)
    expect(dp, rules, v4(src="198.18.9.9", proto="tcp", dport=23), "drop", 1)
    expect(dp, rules, v4(src="198.18.9.9", proto="udp", dport=22), "drop", 1)
    expect(dp, rules, v4(src="198.18.9.8", proto="tcp", dport=22), "drop", 1)
    expect(dp, rules, v6(src="2001:db8:5:5::1"), "pass", 5)
    expect(dp, rules, v6(src="2001:db8:5:6::1"), "drop", 4)


def test_monitor_only(dp: Datapath) -> None:
    rules = install(dp, R(1, mode="monitor", src="198.18.0.0/16"), R(2, mode="monitor", src=H6))
    expect(dp, rules, v4(), "pass", 1, passed=1, monitored=1)
    expect(dp, rules, v6(), "pass", 2, passed=1, monitored=1)
    expect(dp, rules, v4(src="198.19.0.5"), "pass", None, monitored=0)


def test_monitor_and_enforce_enforce_wins(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, mode="monitor", src=H4, proto="tcp", dport=80),  # more specific, monitor
        R(2, src="198.18.0.0/16"),  # enforce
        R(3, mode="monitor", proto="udp"),
    )
    expect(dp, rules, v4(proto="tcp", dport=80), "drop", 2, dropped=1, monitored=0)
    expect(dp, rules, v4(src="198.19.0.9", proto="udp"), "pass", 3, monitored=1)


def test_monitor_and_allow_allow_wins(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, mode="monitor", src=H4),
        R(2, action="allow", proto="udp", dport="0-65535"),
        R(3, mode="monitor", src=H6, proto="udp"),
    )
    expect(dp, rules, v4(), "pass", 2, monitored=0)
    expect(dp, rules, v4(proto="tcp"), "pass", 1, monitored=1)
    expect(dp, rules, v6(), "pass", 2, monitored=0)


# --- address-less rules, ties ---------------------------------------------------------------------


def test_addressless_rules_and_address_rules(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, proto="udp", dport=53),
        R(2, proto="tcp", dport="1000-2000"),
        R(3, proto="icmp"),
        R(4, action="allow", src=H4),
        R(5, src="198.18.0.0/16", proto="udp"),
        R(6, mode="monitor", dst="198.19.0.0/16", proto="tcp"),
        R(7, proto="icmpv6"),
        R(8, action="allow", proto="tcp", dport=1500),
    )
    expect(dp, rules, v4(dport=53), "pass", 4)
    expect(dp, rules, v4(src="198.18.2.2", dport=53), "drop", 5)
    expect(dp, rules, v4(src="198.19.9.9", dst="198.18.0.1", dport=53), "drop", 1)
    expect(dp, rules, v4(src="198.19.9.9", dst="198.18.0.1", proto="tcp", dport=1500), "pass", 8)
    expect(dp, rules, v4(src="198.19.9.9", dst="198.18.0.1", proto="tcp", dport=1200), "drop", 2)
    expect(dp, rules, v4(src="198.18.2.2", proto="tcp", dport=80), "pass", 6, monitored=1)
    expect(dp, rules, v4(src="198.18.2.2", proto="tcp", dport=1999), "drop", 2)
    expect(dp, rules, v4(src="198.18.2.2", proto="icmp"), "drop", 3)
    expect(dp, rules, v4(proto="icmp"), "pass", 4)
    expect(dp, rules, v6(proto="icmpv6"), "drop", 7)
    expect(dp, rules, v6(dport=53), "drop", 1)
    expect(dp, rules, v6(proto="tcp", dport=1000), "drop", 2)
    expect(dp, rules, v6(proto="tcp", dport=2001), "pass", None)
    # an ICMP (1) header inside IPv6 is protocol 1 all the same
    expect(dp, rules, v6(proto=1), "drop", 3)


def test_ties_are_broken_by_the_lowest_id(dp: Datapath) -> None:
    rules = install(
        dp,
        R(7, src="198.18.0.0/16", proto="tcp", dport="80-90"),
        R(4, src="198.18.0.0/16", proto="tcp", dport="85-95"),
        R(11, dst="0.0.0.0/0"),
        R(12, src="0.0.0.0/0"),
        R(21, src="::/0", proto="udp"),
        R(20, proto="udp"),
        R(30, dst="::/0", proto="tcp"),
        R(31, proto="tcp"),
    )
    expect(dp, rules, v4(proto="tcp", dport=87), "drop", 4)
    expect(dp, rules, v4(proto="tcp", dport=82), "drop", 7)
    expect(dp, rules, v4(proto="tcp", dport=92), "drop", 4)
    # src /0 and dst /0 rank the same: the lower id wins across tables
    expect(dp, rules, v4(src="198.19.0.1", proto="icmp"), "drop", 11)
    # the address-less table is looked up last, yet its lower id wins the tie
    expect(dp, rules, v6(), "drop", 20)
    expect(dp, rules, v6(proto="tcp"), "drop", 30)
    dp.remove_rules([11, 20, 30])
    rules = [r for r in rules if r.id not in (11, 20, 30)]
    expect(dp, rules, v4(src="198.19.0.1", proto="icmp"), "drop", 12)
    expect(dp, rules, v6(), "drop", 21)
    expect(dp, rules, v6(proto="tcp"), "drop", 31)


# --- L2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vlans",
    [
        [(ETH_P_8021Q, 10)],
        [(ETH_P_8021AD, 10)],
        [(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)],
        [(ETH_P_8021Q, 10), (ETH_P_8021Q, 4095)],
    ],
    ids=["dot1q", "dot1ad", "qinq", "q-in-q-8100"],
)
def test_vlan_and_qinq(dp: Datapath, vlans: list[tuple[int, int]]) -> None:
    rules = install(dp, R(1, src=H4, proto="tcp", dport=22), R(2, dst=OTHER6))
    expect(dp, rules, v4(proto="tcp", dport=22, vlans=vlans), "drop", 1)
    expect(dp, rules, v4(proto="tcp", dport=23, vlans=vlans), "pass", None)
    expect(dp, rules, v6(vlans=vlans, ext_headers=[ExtHeader(EXT_HOPOPTS)]), "drop", 2)


def test_third_vlan_tag_is_not_ip(dp: Datapath) -> None:
    rules = install(dp, R(1, src="0.0.0.0/0"), R(2, src="::/0"), R(3, proto="udp"))
    three = [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)]
    expect(dp, rules, v4(vlans=three), "pass", None, non_ip=1, malformed=0)
    expect(dp, rules, v6(vlans=three), "pass", None, non_ip=1)
    # two tags are looked through ("udp" names a protocol: it outranks src 0.0.0.0/0)
    expect(dp, rules, v4(vlans=three[:2]), "drop", 3)
    expect(dp, rules, v4(vlans=three[:2], proto="tcp"), "drop", 1)


def test_truncated_vlan_tag_is_malformed(dp: Datapath) -> None:
    rules = install(dp, R(1, src="0.0.0.0/0"))
    frame = v4(vlans=[(ETH_P_8021Q, 7)])
    for cut in range(14, 18):
        expect(dp, rules, frame[:cut], "pass", None, malformed=1, non_ip=0)
    qinq = v4(vlans=[(ETH_P_8021AD, 7), (ETH_P_8021Q, 8)])
    for cut in range(18, 22):
        expect(dp, rules, qinq[:cut], "pass", None, malformed=1)


def test_arp_and_other_ethertypes_pass(dp: Datapath) -> None:
    rules = install(
        dp, R(1, src="0.0.0.0/0"), R(2, dst="0.0.0.0/0"), R(3, src="::/0"), R(4, proto="icmp")
    )
    expect(dp, rules, v4(), "drop", 1)  # the /0 rules do drop IPv4
    expect(dp, rules, arp_frame(sender_ip=H4, target_ip=OTHER4), "pass", None, non_ip=1)
    arp_vlan = arp_frame(sender_ip=H4, target_ip=OTHER4, vlans=[(ETH_P_8021Q, 5)])
    expect(dp, rules, arp_vlan, "pass", None, non_ip=1)
    expect(dp, rules, raw_ethertype_frame(ETH_P_ARP), "pass", None, non_ip=1)
    expect(dp, rules, raw_ethertype_frame(0x88CC, bytes(46)), "pass", None, non_ip=1)  # LLDP
    expect(dp, rules, raw_ethertype_frame(0x0800 + 1, v4()[14:]), "pass", None, non_ip=1)


# --- IPv4 header ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ihl", range(6, 16))
def test_ipv4_options_are_skipped(dp: Datapath, ihl: int) -> None:
    rules = install(dp, R(1, src=H4, proto="tcp", dport=80), R(2, mode="monitor", src=H4))
    options = bytes([1]) * (4 * (ihl - 5))  # NOPs
    frame = v4(proto="tcp", dport=80, ip_options=options)
    assert frame[14] == 0x40 | ihl
    expect(dp, rules, frame, "drop", 1)
    expect(dp, rules, v4(proto="tcp", dport=81, ip_options=options), "pass", 2, monitored=1)
    # cut inside the options: the IP header is incomplete
    expect(dp, rules, frame[: 14 + 4 * ihl - 1], "pass", None, malformed=1)
    # cut right after the options: the TCP header is missing
    expect(dp, rules, frame[: 14 + 4 * ihl], "pass", 2, malformed=1, monitored=1)


def _with_byte(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1 :]


@pytest.mark.parametrize(
    ("version", "ihl"),
    [(4, 0), (4, 1), (4, 4), (0, 5), (5, 5), (6, 5), (15, 5), (6, 0)],
)
def test_bad_ipv4_header_is_malformed_even_when_src_is_blocked(
    dp: Datapath, version: int, ihl: int
) -> None:
    rules = install(dp, R(1, src=H4), R(2, src="0.0.0.0/0"), R(3, proto="udp"))
    frame = _with_byte(v4(), 14, version << 4 | ihl)
    expect(dp, rules, frame, "pass", None, malformed=1)
    expect(dp, rules, _with_byte(v4(vlans=[(ETH_P_8021Q, 3)]), 18, version << 4 | ihl),
           "pass", None, malformed=1)


def test_bad_ipv6_version_is_malformed(dp: Datapath) -> None:
    rules = install(dp, R(1, src=H6), R(2, proto="udp"))
    for version in (0, 4, 7, 15):
        frame = _with_byte(v6(), 14, version << 4)
        expect(dp, rules, frame, "pass", None, malformed=1)
    expect(dp, rules, v6(), "drop", 1)


def test_ipv4_header_cut_short(dp: Datapath) -> None:
    rules = install(dp, R(1, src=H4))
    frame = v4()
    for cut in range(14, 34):
        expect(dp, rules, frame[:cut], "pass", None, malformed=1)
    expect(dp, rules, frame[:34], "drop", 1, malformed=1)  # UDP header missing


# --- IPv6 extension headers -----------------------------------------------------------------------

_CHAINS = [
    [ExtHeader(EXT_HOPOPTS)],
    [ExtHeader(EXT_HOPOPTS, 16), ExtHeader(EXT_ROUTING, 24), ExtHeader(EXT_DSTOPTS),
     ExtHeader(EXT_AH, 12)],
    [ExtHeader(EXT_AH, 24), ExtHeader(EXT_DSTOPTS, 16)],
    [ExtHeader(EXT_HOPOPTS, 256), ExtHeader(EXT_AH, 12), ExtHeader(EXT_ROUTING, 2048)],
    [ExtHeader(EXT_AH, 1028), ExtHeader(EXT_DSTOPTS, 8)],
]


@pytest.mark.parametrize("chain", _CHAINS, ids=range(len(_CHAINS)))
def test_ipv6_extension_chains(dp: Datapath, chain: list[ExtHeader]) -> None:
    rules = install(
        dp,
        R(1, src=H6, proto="tcp", dport=443),
        R(2, src="2001:db8::/32", proto="udp", dport=53),
        R(3, mode="monitor", dst=OTHER6),
    )
    expect(dp, rules, v6(proto="tcp", dport=443, ext_headers=chain), "drop", 1)
    expect(dp, rules, v6(proto="udp", dport=53, ext_headers=chain), "drop", 2)
    expect(dp, rules, v6(proto="udp", dport=54, ext_headers=chain), "pass", 3, monitored=1)
    expect(dp, rules, v6(proto="tcp", dport=443, ext_headers=chain, vlans=[(ETH_P_8021Q, 9)]),
           "drop", 1)


def test_ipv6_unknown_next_header_is_the_upper_protocol(dp: Datapath) -> None:
    rules = install(dp, R(1, src=H6, proto="tcp"), R(2, mode="monitor", src=H6))
    # 135 (mobility) is not walked: it is the upper-layer protocol, no ports
    frame = v6(proto=135, ext_headers=[ExtHeader(EXT_HOPOPTS)], payload=bytes(8))
    expect(dp, rules, frame, "pass", 2, monitored=1, malformed=0)


def test_smallest_ah_header(dp: Datapath) -> None:
    """An AH with payload length 0 is 8 bytes ((0 + 2) * 4) to both parsers."""
    rules = install(dp, R(1, src=H6, proto="udp", dport=53), R(2, mode="monitor", src=H6))
    frame = _ah8(v6(dport=53, ext_headers=[ExtHeader(EXT_HOPOPTS), ExtHeader(EXT_DSTOPTS)]), 1)
    expect(dp, rules, frame, "drop", 1, malformed=0)
    expect(dp, rules, frame[:-1], "pass", 2, malformed=1, monitored=1)


def _ah8(frame: bytes, index: int) -> bytes:
    """Turn the 8-byte options header at chain position ``index`` into an 8-byte AH."""
    off = l3_offset(frame)
    at, pos = off + 6, off + 40  # the next-header byte pointing at the header, and the header
    for _ in range(index):
        at, pos = pos, pos + (frame[pos + 1] + 1) * 8
    assert frame[at] in (EXT_HOPOPTS, EXT_DSTOPTS) and frame[pos + 1] == 0
    return _with_byte(frame, at, EXT_AH)


def test_frames_builds_the_documented_minimal_ah() -> None:
    frame = v6(ext_headers=[ExtHeader(EXT_AH)])  # "AH: a multiple of 4, at least 8"
    assert frame[l3_offset(frame) + 40 + 1] == 0


def test_frames_builds_the_longest_options_header() -> None:
    frame = v6(ext_headers=[ExtHeader(EXT_HOPOPTS, 2048)])
    assert frame[l3_offset(frame) + 40 + 1] == 255


@pytest.mark.parametrize("filler", [EXT_DSTOPTS, EXT_HOPOPTS, EXT_AH, EXT_ROUTING])
def test_eight_extension_headers_parse_nine_are_malformed(dp: Datapath, filler: int) -> None:
    assert abi.MAX_IPV6_EXT == 8
    rules = install(dp, R(1, src=H6, proto="tcp", dport=22), R(2, src="2001:db8::/32"))
    eight = [ExtHeader(filler, 12 if filler == EXT_AH else 8)] * 8
    expect(dp, rules, v6(proto="tcp", dport=22, ext_headers=eight), "drop", 1, malformed=0)
    expect(dp, rules, v6(proto="tcp", dport=22, ext_headers=eight + eight[:1]),
           "pass", None, malformed=1)
    # a fragment header as the 8th is walked; as the 9th it is not reached
    seven = eight[:7]
    expect(dp, rules, v6(proto="tcp", dport=22, ext_headers=seven, more_fragments=True),
           "drop", 1, fragments=1, malformed=0)
    expect(dp, rules, v6(proto="tcp", dport=22, ext_headers=eight, more_fragments=True),
           "pass", None, fragments=0, malformed=1)
    # a non-first fragment header as the 8th ends the walk: no ports, address rules apply
    expect(dp, rules, v6(proto="tcp", ext_headers=seven, frag_offset=3, payload=bytes(16)),
           "drop", 2, fragments=1)
    expect(dp, rules, v6(proto="tcp", ext_headers=eight, frag_offset=3, payload=bytes(16)),
           "pass", None, fragments=0, malformed=1)


# --- fragments ------------------------------------------------------------------------------------

# A non-first fragment's payload that would read as TCP/UDP ports 1024 -> 80 if it were parsed.
_FAKE_PORTS = struct.pack("!HH", 1024, 80) + bytes(16)


def _fragments(fam: int, proto: str) -> tuple[bytes, bytes]:
    build = v4 if fam == 4 else v6
    first = build(proto=proto, dport=80, more_fragments=True)
    later = build(proto=proto, dport=80, frag_offset=185, payload=_FAKE_PORTS)
    return first, later


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_fragments(dp: Datapath, fam: int, proto: str) -> None:
    host = H4 if fam == 4 else H6
    net = "198.18.0.0/15" if fam == 4 else "2001:db8::/32"
    first, later = _fragments(fam, proto)

    rules = install(dp, R(1, src=host, proto=proto, dport=80))
    expect(dp, rules, first, "drop", 1, fragments=1)
    expect(dp, rules, later, "pass", None, fragments=1, malformed=0)
    dp.remove_rules([1])

    rules = install(dp, R(2, src=host, proto=proto))
    expect(dp, rules, first, "drop", 2, fragments=1)
    expect(dp, rules, later, "drop", 2, fragments=1)
    dp.remove_rules([2])

    rules = install(dp, R(3, src=net))
    expect(dp, rules, first, "drop", 3, fragments=1)
    expect(dp, rules, later, "drop", 3, fragments=1)
    dp.remove_rules([3])

    rules = install(
        dp,
        R(4, proto=proto, dport=80),
        R(5, mode="monitor", proto=proto),
        R(6, action="allow", dst="198.19.0.0/16" if fam == 4 else OTHER6, proto=proto,
          dport="0-65535"),
    )
    # the allow needs ports: it matches the first fragment only
    expect(dp, rules, first, "pass", 6, fragments=1)
    expect(dp, rules, later, "pass", 5, fragments=1, monitored=1)


def test_fragment_flags_and_offsets(dp: Datapath) -> None:
    rules = install(dp, R(1, src=H4, proto="udp", dport=80), R(2, mode="monitor", src=H4))
    # last fragment (offset, no MF), middle fragment, offset 1 (8 bytes), max offset
    for offset, mf in ((185, False), (185, True), (1, False), (0x1FFF, True)):
        frame = v4(frag_offset=offset, more_fragments=mf, payload=_FAKE_PORTS)
        expect(dp, rules, frame, "pass", 2, fragments=1, monitored=1)
        frame6 = v6(frag_offset=offset, more_fragments=mf, payload=_FAKE_PORTS)
        expect(dp, [*rules], frame6, "pass", None, fragments=1)
    # DF set, not a fragment
    df = bytearray(v4())
    df[20] |= 0x40
    expect(dp, rules, bytes(df), "drop", 1, fragments=0)
    # IPv6 atomic fragment (offset 0, no M): a fragment header, still parsed
    atomic = v6(ext_headers=[ExtHeader(EXT_FRAGMENT)])
    expect(dp, rules, atomic, "pass", None, fragments=1)
    # an IPv6 non-first fragment header cut short
    later = v6(frag_offset=9, payload=_FAKE_PORTS)
    off = l3_offset(later) + 40
    for cut in range(off, off + 8):
        expect(dp, rules, later[:cut], "pass", None, fragments=int(cut >= off + 4), malformed=1)


# --- truncated L4 headers -------------------------------------------------------------------------


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_truncated_l4_header(dp: Datapath, fam: int, proto: str) -> None:
    host, net = (H4, "198.18.0.0/16") if fam == 4 else (H6, "2001:db8::/48")
    if proto == "icmp" and fam == 6:
        proto = "icmpv6"
    port_rule = [R(1, src=host, proto=proto, dport=80)] if proto in ("tcp", "udp") else []
    rules = install(dp, *port_rule, R(2, mode="monitor", src=host, proto=proto), R(3, src=net))
    frame = (v4 if fam == 4 else v6)(proto=proto, dport=80, payload=b"x")
    l4 = l3_offset(frame) + (20 if fam == 4 else 40)
    need = {"tcp": 20, "udp": 8}.get(proto, 4)
    for cut in range(l4, l4 + need):
        # the address-only enforce drop applies; the port rule cannot
        expect(dp, rules, frame[:cut], "drop", 3, malformed=1)
    expect(dp, rules, frame[: l4 + need], "drop", 1 if port_rule else 3, malformed=0)
    dp.remove_rules([3])
    rules = [r for r in rules if r.id != 3]
    for cut in range(l4, l4 + need):
        expect(dp, rules, frame[:cut], "pass", 2, malformed=1, monitored=1)
    # as a first fragment too
    first = (v4 if fam == 4 else v6)(proto=proto, dport=80, more_fragments=True)
    l4 = l3_offset(first) + (20 if fam == 4 else 48)
    expect(dp, rules, first[: l4 + need - 1], "pass", 2, malformed=1, fragments=1)


def _sweep(dp: Datapath, rules: Sequence[Rule], frame: bytes) -> list[model.Outcome]:
    return [run_and_check(dp, rules, frame[:n]) for n in range(14, len(frame) + 1)]


def test_truncation_at_every_length_vlan_ipv6_ext_tcp(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, src=H6, proto="tcp", dport=443),
        R(2, mode="monitor", src="2001:db8::/32", proto="tcp"),
        R(3, action="allow", proto="tcp", dport=22),
        R(4, mode="monitor", dst=OTHER6, proto="icmpv6"),
    )
    chain = [ExtHeader(EXT_HOPOPTS), ExtHeader(EXT_ROUTING, 16), ExtHeader(EXT_DSTOPTS),
             ExtHeader(EXT_AH, 12)]
    vlans = [(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)]
    frame = v6(proto="tcp", dport=443, vlans=vlans, ext_headers=chain)
    outs = _sweep(dp, rules, frame)
    l4 = 14 + 8 + 40 + 8 + 16 + 8 + 12
    assert len(frame) == l4 + 20
    by_len = {14 + i: o for i, o in enumerate(outs)}
    assert by_len[len(frame)].rule_id == 1 and by_len[len(frame)].action == "drop"
    assert all(by_len[n].rule_id == 2 and by_len[n].malformed for n in range(l4, l4 + 20))
    assert all(by_len[n].rule_id is None and by_len[n].malformed for n in range(14, l4))
    # the same with a first-fragment header in the chain, and an allowed port
    frag = v6(proto="tcp", dport=22, vlans=vlans, ext_headers=chain, more_fragments=True)
    outs = _sweep(dp, rules, frag)
    assert outs[-1].rule_id == 3 and outs[-1].fragments == 1
    # ICMPv6 behind a single tag
    _sweep(dp, rules, v6(proto="icmpv6", vlans=vlans[1:], ext_headers=chain[:2]))


def test_truncation_at_every_length_ipv4(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, src="198.18.1.0/24", proto="udp", dport=53),
        R(2, mode="monitor", src="198.18.0.0/16"),
        R(3, proto="icmp"),
    )
    _sweep(dp, rules, v4(dport=53, vlans=[(ETH_P_8021Q, 1)], ip_options=bytes([1] * 12)))
    _sweep(dp, rules, v4(proto="tcp", vlans=[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)]))
    _sweep(dp, rules, v4(proto="icmp", more_fragments=True))


# --- capacity -------------------------------------------------------------------------------------


def _snapshot(dp: Datapath) -> dict[str, list[tuple[bytes, bytes]]]:
    snap: dict[str, list[tuple[bytes, bytes]]] = {}
    for name in MAP_TYPES:
        m = dp.map(name)
        if m.info.type == bpfsys.MapType.RINGBUF:
            continue  # X-ray's ring holds records in flight, no entries to compare
        if name.endswith(abi.D248_PARTS):  # DIR-24-8 arrays (tbl24: 2^20 rows): one blob
            snap[name] = [(b"", m.read_array(m.info.max_entries))]
        elif m.percpu:
            snap[name] = sorted(
                (bytes(k), b"".join(bytes(v) for v in vs)) for k, vs in m.items_percpu()
            )
        else:
            snap[name] = sorted((bytes(k), bytes(v)) for k, v in m.items())
    return snap


def test_capacity_exceeded_changes_nothing(dp: Datapath) -> None:
    assert MAX_SLOTS == 1 + abi.SET_SLOTS == 32
    net = "198.18.1.0/24"
    full = [R(i, src=net, proto="tcp", dport=1000 + i) for i in range(1, MAX_SLOTS + 1)]
    rules = install(dp, *full)
    # every slot works, down to the last one of the set
    expect(dp, rules, v4(proto="tcp", dport=1001), "drop", 1)
    expect(dp, rules, v4(proto="tcp", dport=1000 + MAX_SLOTS), "drop", MAX_SLOTS)
    expect(dp, rules, v4(proto="tcp", dport=1001 + MAX_SLOTS), "pass", None)
    run_and_check(dp, rules, v4(dport=1005))  # udp: nothing matches

    before = _snapshot(dp)
    attempts = [
        [R(100, src=net, proto="udp", dport=5)],  # one more on the same key
        [R(101, src="198.18.0.0/16", proto="udp")],  # a covering prefix: inherited slot
        [R(102, src="198.18.0.0/15")],
        # all or nothing: a valid rule elsewhere in the same batch is not added either
        [R(103, src="198.19.0.0/16"), R(104, src=net, proto="udp")],
    ]
    for batch in attempts:
        with pytest.raises(CapacityExceeded):
            dp.add_rules(batch)
        assert dp.rules() == sorted(rules, key=lambda r: r.id)
        assert _snapshot(dp) == before, f"maps changed after a refused {batch}"
        assert dp.table_usage()["xdpfw_sets"][0] == 1
    expect(dp, rules, v4(src="198.19.0.1", proto="tcp", dport=1001), "pass", None)
    expect(dp, rules, v4(proto="tcp", dport=1000 + MAX_SLOTS), "drop", MAX_SLOTS)

    # 16 on a /16 plus 16 on a /24 inside it is exactly full
    dp.remove_rules([r.id for r in rules])
    half = [R(200 + i, src="198.18.0.0/16", proto="udp", dport=i) for i in range(1, 17)]
    half += [R(300 + i, src=net, proto="udp", dport=100 + i) for i in range(1, 17)]
    rules = install(dp, *half)
    expect(dp, rules, v4(dport=16), "drop", 216)
    expect(dp, rules, v4(dport=116), "drop", 316)
    before = _snapshot(dp)
    with pytest.raises(CapacityExceeded):
        dp.add_rules([R(400, src="198.18.0.0/15", proto="udp", dport=7)])
    assert _snapshot(dp) == before
    # a longer prefix inside the /24 would inherit 16 + 16 slots besides its own
    usage = dp.table_usage()
    with pytest.raises(CapacityExceeded):
        dp.add_rules([R(401, src="198.18.1.0/25", proto="udp", dport=7)])
    assert _snapshot(dp) == before
    assert dp.table_usage() == usage
    # a sibling /24 inside the /16 still fits (16 inherited + 1)
    rules += install(dp, R(402, src="198.18.2.0/24", proto="udp", dport=7))
    expect(dp, rules, v4(src="198.18.2.1", dport=7), "drop", 402)
    expect(dp, rules, v4(src="198.18.2.1", dport=8), "drop", 208)


# --- removing a covering prefix -------------------------------------------------------------------


def _entry_rule_ids(dp: Datapath, table: Table, key: bytes) -> list[int] | None:
    for k, entry in dp.table(table).items():
        if bytes(k) == key:
            ids = [entry.first.rule_id]
            if entry.set_id:
                st = dp.map("xdpfw_sets").lookup(struct.pack("=I", entry.set_id))
                ids += [s.rule_id for s in st.slot if s.rank]
            return ids
    return None


def _lpm4(prefix: str, plen: int) -> bytes:
    return struct.pack("=I", plen) + bytes(int(o) for o in prefix.split("."))


def test_removing_a_covering_prefix_updates_longer_prefixes(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, src="198.18.0.0/16"),
        R(2, src="198.18.1.0/24", proto="tcp", dport=80),
        R(3, src="198.18.1.128/25", proto="udp", dport=53),
    )
    frame = v4(src="198.18.1.200", proto="icmp")
    k25, k24 = _lpm4("198.18.1.128", 25), _lpm4("198.18.1.0", 24)
    assert _entry_rule_ids(dp, Table.SRC4_LPM, k25) == [3, 2, 1]
    expect(dp, rules, frame, "drop", 1)
    dp.remove_rules([1])
    rules = rules[1:]
    assert _entry_rule_ids(dp, Table.SRC4_LPM, k25) == [3, 2]
    assert _entry_rule_ids(dp, Table.SRC4_LPM, k24) == [2]
    assert _entry_rule_ids(dp, Table.SRC4_LPM, _lpm4("198.18.0.0", 16)) is None
    expect(dp, rules, frame, "pass", None)
    expect(dp, rules, v4(src="198.18.1.200", proto="tcp", dport=80), "drop", 2)
    # adding the covering prefix back updates them again
    rules = install(dp, R(1, src="198.18.0.0/16")) + rules
    assert _entry_rule_ids(dp, Table.SRC4_LPM, k25) == [3, 2, 1]
    expect(dp, rules, frame, "drop", 1)
    # removing the middle prefix: the /25 keeps its own and the /16's slots
    dp.remove_rules([2])
    rules = [r for r in rules if r.id != 2]
    assert _entry_rule_ids(dp, Table.SRC4_LPM, k25) == [3, 1]
    expect(dp, rules, v4(src="198.18.1.200", proto="tcp", dport=80), "drop", 1)
    expect(dp, rules, v4(src="198.18.1.200", dport=53), "drop", 3)
    # and the last one: the /25's own rule alone
    dp.remove_rules([1])
    rules = [r for r in rules if r.id != 1]
    assert _entry_rule_ids(dp, Table.SRC4_LPM, k25) == [3]
    expect(dp, rules, frame, "pass", None)


def test_removing_a_covering_v6_dst_prefix(dp: Datapath) -> None:
    rules = install(
        dp,
        R(1, action="allow", dst="2001:db8::/32"),
        R(2, dst="2001:db8:1::/48"),
        R(3, dst="2001:db8:1:1::/64", proto="udp", dport=53),
    )
    frame = v6(dst="2001:db8:1:1::9", proto="tcp")
    expect(dp, rules, frame, "pass", 1)
    dp.remove_rules([1])
    rules = rules[1:]
    expect(dp, rules, frame, "drop", 2)
    dp.remove_rules([2])
    rules = rules[1:]
    expect(dp, rules, frame, "pass", None)
    expect(dp, rules, v6(dst="2001:db8:1:1::9", dport=53), "drop", 3)


def test_duplicate_rules_are_refused_and_change_nothing(dp: Datapath) -> None:
    rules = install(dp, R(1, src=H4))
    before = _snapshot(dp)
    with pytest.raises(RuleConflict):
        dp.add_rules([R(2, src=H4)])
    with pytest.raises(RuleConflict):
        dp.add_rules([R(1, src=H6)])
    assert _snapshot(dp) == before
    expect(dp, rules, v4(), "drop", 1)


# --- churn ----------------------------------------------------------------------------------------

_HOSTS4 = ["198.18.0.1", "198.18.0.2", "198.18.1.1", "198.18.1.130", "198.18.200.7",
           "198.19.0.1", "198.19.255.254", "198.19.128.0"]
_HOSTS6 = ["2001:db8::1", "2001:db8::2", "2001:db8:0:1::1", "2001:db8:1::1",
           "2001:db8:1:0:8000::1", "2001:db8:ffff::2", "2001:db8:abcd:ef01::5"]
_PLENS4 = [15, 16, 16, 20, 24, 24, 25, 28, 31, 32, 32]
_PLENS6 = [32, 33, 40, 48, 48, 56, 64, 64, 96, 127, 128, 128]
_PORTS = [22, 53, 80, 443, 1000, 1500, 65535]


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def network(self, fam: int) -> str:
        rng = self.rng
        host = rng.choice(_HOSTS4 if fam == 4 else _HOSTS6)
        plen = rng.choice(_PLENS4 if fam == 4 else _PLENS6)
        return ipaddress.ip_network(f"{host}/{plen}", strict=False).with_prefixlen

    def rule(self, rule_id: int) -> Rule:
        rng = self.rng
        while True:
            fam = rng.choice([4, 6])
            kw: dict[str, Any] = {}
            where = rng.random()
            if where < 0.5:
                kw["src"] = self.network(fam)
            elif where < 0.75:
                kw["dst"] = self.network(fam)
            protos = ["tcp", "udp", "icmp" if fam == 4 else "icmpv6"]
            if "src" not in kw and "dst" not in kw:
                protos.append("icmp" if fam == 6 else "icmpv6")
            if rng.random() < 0.7:
                kw["proto"] = rng.choice(protos)
            if kw.get("proto") in ("tcp", "udp") and rng.random() < 0.6:
                lo = rng.choice(_PORTS)
                hi = min(65535, lo + rng.choice([0, 0, 1, 10, 1000]))
                # a single port as an int, or as the string "lo-hi" now and then
                single = lo == hi and rng.random() < 0.9
                kw["dport"] = lo if single else f"{lo}-{hi}"
            if rng.random() < 0.05 and kw.get("proto") in ("tcp", "udp"):
                kw["dport"] = "0-65535"
            roll = rng.random()
            if roll < 0.2:
                kw["action"] = "allow"
            elif roll < 0.4:
                kw["mode"] = "monitor"
            if not kw or ("proto" not in kw and "src" not in kw and "dst" not in kw):
                continue
            return R(rule_id, **kw)

    def address(self, fam: int, rules: Sequence[Rule]) -> str:
        rng = self.rng
        nets = [n for r in rules for n in (r.src, r.dst) if n is not None and n.version == fam]
        if nets and rng.random() < 0.6:
            net = rng.choice(nets)
            offset = rng.randrange(net.num_addresses) if rng.random() < 0.5 else 0
            return str(net.network_address + offset)
        return rng.choice(_HOSTS4 if fam == 4 else _HOSTS6)

    def frame(self, rules: Sequence[Rule]) -> bytes:
        rng = self.rng
        fam = rng.choice([4, 6])
        kw: dict[str, Any] = {
            "src": self.address(fam, rules),
            "dst": self.address(fam, rules),
        }
        kw["proto"] = rng.choice(
            ["tcp", "tcp", "udp", "udp", "icmp" if fam == 4 else "icmpv6", 47, 1, 58]
        )
        ports = [p for r in rules if r.dport is not None for p in (r.dport.lo, r.dport.hi)]
        kw["dport"] = rng.choice(ports + _PORTS) if ports and rng.random() < 0.7 else rng.choice(
            [*_PORTS, rng.randrange(65536)]
        )
        roll = rng.random()
        if roll < 0.15:
            kw["vlans"] = [(rng.choice([ETH_P_8021Q, ETH_P_8021AD]), rng.randrange(4096))]
        elif roll < 0.25:
            kw["vlans"] = [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)]
        elif roll < 0.27:
            kw["vlans"] = [(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)]
        if fam == 4 and rng.random() < 0.1:
            kw["ip_options"] = bytes([1]) * rng.choice([4, 8, 40])
        if fam == 6 and rng.random() < 0.25:
            kw["ext_headers"] = [
                rng.choice(
                    [ExtHeader(EXT_HOPOPTS), ExtHeader(EXT_ROUTING, 16), ExtHeader(EXT_DSTOPTS),
                     ExtHeader(EXT_AH, 12)]
                )
                for _ in range(rng.choice([1, 2, 3, 8, 9]))
            ]
        roll = rng.random()
        if roll < 0.08:
            kw["more_fragments"] = True
        elif roll < 0.16:
            kw["frag_offset"] = rng.randrange(1, 0x2000)
            kw["more_fragments"] = rng.random() < 0.5
            kw["payload"] = _FAKE_PORTS
        frame = build_frame(**kw)
        roll = rng.random()
        if roll < 0.08:
            frame = frame[: rng.randrange(14, len(frame))]
        elif roll < 0.1:
            off = l3_offset(frame) if len(frame) > 22 else 14
            frame = _with_byte(frame, off, rng.randrange(256))
        return frame


def test_rule_churn_against_the_model(dp: Datapath) -> None:
    gen = _Gen(0x5EED)
    rng = gen.rng
    installed: dict[int, Rule] = {}
    next_id = 1
    frames = 0
    refused = 0
    seen: Counter[str] = Counter()
    deepest = 0
    for round_no in range(100):
        if installed and (rng.random() < 0.35 or len(installed) > 40):
            gone = rng.sample(sorted(installed), k=min(len(installed), rng.randint(1, 4)))
            dp.remove_rules(gone)
            for rid in gone:
                del installed[rid]
        else:
            batch = []
            for _ in range(rng.randint(1, 5)):
                batch.append(gen.rule(next_id))
                next_id += rng.randint(1, 3)
            keys = {r.match_key() for r in installed.values()}
            batch = [r for r in batch if r.match_key() not in keys]
            batch = list({r.match_key(): r for r in batch}.values())
            try:
                dp.add_rules(batch)
            except CapacityExceeded:
                refused += 1
                assert {r.id for r in dp.rules()} == set(installed)
            else:
                installed.update((r.id, r) for r in batch)
        assert {r.id: r for r in dp.rules()} == installed, f"round {round_no}"
        deepest = max([deepest, *(len(slots) for _, slots in dp.compiler.entries())])
        rules = list(installed.values())
        for _ in range(20):
            out = run_and_check(dp, rules, gen.frame(rules), check_installed=False)
            frames += 1
            seen[f"verdict{out.verdict}"] += 1
            seen.update(s.name for s, n in out.stats().items() if n and s is not Stat.BYTES)
    assert frames == 2000
    assert refused < 10
    # the generator does reach every outcome and builds entries with inherited sets
    for verdict in range(4):
        assert seen[f"verdict{verdict}"] >= 50, seen
    for stat in ("MALFORMED", "FRAGMENTS", "NON_IP"):
        assert seen[stat] >= 10, seen
    assert deepest >= 5
