"""Kernel tests: real datagrams through a veth lab, filtered by the loaded XDP program.

Every test follows the same shape: traffic passes -> add rule(s) -> send N -> exactly the
expected number arrive and the credited rule's counters grow by exactly N packets and the
bytes of the N frames -> remove the rule(s) -> traffic passes again.

Rule counters are compared with ``==`` (only our datagrams can match our lab's addresses);
global counters with ``>=`` (background frames such as IPv6 MLD/ND may cross the veth too).

Everything runs on a veth lab created here (prefix "xfw", 198.18.0.0/15, 2001:db8::/32)
and is removed by the fixtures, also on failure.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.traffic import send_raw, udp_roundtrip
from xdpfw.datapath import Datapath, GlobalCounters
from xdpfw.kernel import netlink
from xdpfw.lab import VethLab, veth_lab
from xdpfw.rules import RuleSpec
from xdpfw.verify import frames

pytestmark = pytest.mark.kernel

N = 20
PORT = 9999  # the port udp_roundtrip sends to by default
OTHER_PORT = 9998
ETH_HLEN = 14
IP_HLEN = {4: 20, 6: 40}
UDP_HLEN = 8

Attached = tuple[Datapath, VethLab]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[VethLab]:
    with veth_lab(prefix="xfw") as lab:
        yield lab


@pytest.fixture
def attached(request: pytest.FixtureRequest, dp: Datapath, lab: VethLab) -> Iterator[Attached]:
    """dp's program on lab.host_if; mode from indirect parametrization, else "auto"."""
    mode = getattr(request, "param", "auto")
    try:
        att = dp.attach(lab.host_if, mode=mode)
        if mode != "auto":
            assert att.mode == mode, f"asked for {mode} XDP, got {att.mode}"
        yield dp, lab
    finally:
        dp.detach(lab.host_if)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def udp_frame_bytes(family: int, count: int = N) -> int:
    """Bytes XDP sees for udp_roundtrip's `count` datagrams: Ethernet + IP + UDP + payload.

    udp_roundtrip sends b"xdpfw-test %d" % i (i = 0..count-1), so payload lengths vary.
    """
    return sum(
        ETH_HLEN + IP_HLEN[family] + UDP_HLEN + len(b"xdpfw-test %d" % i) for i in range(count)
    )


def host_net(ip: str) -> str:
    return str(ipaddress.ip_network(ip))  # /32 or /128


def covering(ip: str, plen: int) -> str:
    return ipaddress.ip_interface(f"{ip}/{plen}").network.with_prefixlen


def counters(dp: Datapath, rule_id: int) -> tuple[int, int]:
    c = dp.rule_counters([rule_id]).get(rule_id)
    assert c is not None, f"rule {rule_id} has no counters"
    return c.packets, c.bytes


def delta(after: GlobalCounters, before: GlobalCounters, name: str) -> int:
    return int(getattr(after, name)) - int(getattr(before, name))


def wait_for(pred: Callable[[], bool], timeout: float = 1.0) -> bool:
    """Poll pred until it holds or timeout passes (raw frames have no receiver to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def assert_passes(lab: VethLab, family: int = 4, dport: int = PORT) -> None:
    got = udp_roundtrip(lab, family=family, count=N, dport=dport)
    assert got == N, f"expected all {N} IPv{family} datagrams to port {dport}, got {got}"


def check_rule(
    dp: Datapath,
    lab: VethLab,
    rule_ids: list[int],
    *,
    family: int,
    dport: int = PORT,
    expect_arrive: int,
    credited: int,
) -> GlobalCounters:
    """Send N datagrams; check arrivals and that exactly `credited` got all N of them.

    Every other rule in `rule_ids` must not move. Returns the global counters delta base.
    """
    before = {rid: counters(dp, rid) for rid in rule_ids}
    g0 = dp.global_counters()
    got = udp_roundtrip(lab, family=family, count=N, dport=dport)
    g1 = dp.global_counters()
    after = {rid: counters(dp, rid) for rid in rule_ids}
    assert got == expect_arrive, f"IPv{family} port {dport}: {got} arrived, want {expect_arrive}"
    for rid in rule_ids:
        dpk = after[rid][0] - before[rid][0]
        dby = after[rid][1] - before[rid][1]
        if rid == credited:
            assert dpk == N, f"rule {rid}: packet delta {dpk}, want {N}"
            assert dby == udp_frame_bytes(family), (
                f"rule {rid}: byte delta {dby}, want {udp_frame_bytes(family)}"
            )
        else:
            assert (dpk, dby) == (0, 0), f"rule {rid} was credited ({dpk} pkts, {dby} bytes)"
    if expect_arrive == 0:
        assert delta(g1, g0, "dropped") >= N
    else:
        assert delta(g1, g0, "passed") >= N
    assert delta(g1, g0, "packets") >= N
    return g0


def drop_cycle(dp: Datapath, lab: VethLab, family: int, **match: Any) -> None:
    """passes -> add drop rule -> N dropped and credited -> remove -> passes."""
    assert_passes(lab, family)
    dp.add_rule(RuleSpec.parse(**match).with_id(1))
    check_rule(dp, lab, [1], family=family, expect_arrive=0, credited=1)
    dp.remove_rule(1)
    assert_passes(lab, family)


# --------------------------------------------------------------------------
# address rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("attached", ["native", "generic"], indirect=True)
def test_ipv4_exact_src_drop(attached: Attached) -> None:
    dp, lab = attached
    drop_cycle(dp, lab, 4, src=host_net(lab.peer_ip4))


def test_ipv4_cidr24_src_drop(attached: Attached) -> None:
    dp, lab = attached
    drop_cycle(dp, lab, 4, src=covering(lab.peer_ip4, 24))


def test_ipv6_exact_src_drop(attached: Attached) -> None:
    dp, lab = attached
    drop_cycle(dp, lab, 6, src=host_net(lab.peer_ip6))


def test_ipv6_prefix64_src_drop(attached: Attached) -> None:
    dp, lab = attached
    drop_cycle(dp, lab, 6, src=covering(lab.peer_ip6, 64))


@pytest.mark.parametrize("family", [4, 6])
def test_exact_dst_drop(attached: Attached, family: int) -> None:
    dp, lab = attached
    host = lab.host_ip4 if family == 4 else lab.host_ip6
    drop_cycle(dp, lab, family, dst=host_net(host))


@pytest.mark.parametrize("family,plen", [(4, 24), (6, 64)])
def test_prefix_dst_drop(attached: Attached, family: int, plen: int) -> None:
    dp, lab = attached
    host = lab.host_ip4 if family == 4 else lab.host_ip6
    drop_cycle(dp, lab, family, dst=covering(host, plen))


# --------------------------------------------------------------------------
# port rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_udp_dport_single_drop(attached: Attached, family: int) -> None:
    dp, lab = attached
    assert_passes(lab, family, PORT)
    assert_passes(lab, family, OTHER_PORT)
    dp.add_rule(RuleSpec.parse(proto="udp", dport=PORT).with_id(1))
    check_rule(dp, lab, [1], family=family, dport=PORT, expect_arrive=0, credited=1)
    # The other port is not matched: passes, credited to nobody.
    before = counters(dp, 1)
    assert_passes(lab, family, OTHER_PORT)
    assert counters(dp, 1) == before
    dp.remove_rule(1)
    assert_passes(lab, family, PORT)


def test_udp_dport_range_drop(attached: Attached) -> None:
    dp, lab = attached
    lo, hi = PORT - 10, PORT + 10
    for port in (lo, PORT, hi, hi + 1):
        assert_passes(lab, 4, port)
    dp.add_rule(RuleSpec.parse(src=lab.peer_ip4, proto="udp", dport=f"{lo}-{hi}").with_id(1))
    for port in (lo, PORT, hi):  # both ends are inclusive
        check_rule(dp, lab, [1], family=4, dport=port, expect_arrive=0, credited=1)
    before = counters(dp, 1)
    assert_passes(lab, 4, hi + 1)
    assert_passes(lab, 4, lo - 1)
    assert counters(dp, 1) == before
    dp.remove_rule(1)
    for port in (lo, PORT, hi):
        assert_passes(lab, 4, port)


# --------------------------------------------------------------------------
# allow, monitor, covering prefixes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("family,plen", [(4, 16), (6, 48)])
def test_allow_carve_out(attached: Attached, family: int, plen: int) -> None:
    dp, lab = attached
    peer = lab.peer_ip4 if family == 4 else lab.peer_ip6
    assert_passes(lab, family, PORT)
    assert_passes(lab, family, OTHER_PORT)
    dp.add_rules(
        [
            RuleSpec.parse(src=covering(peer, plen)).with_id(1),
            RuleSpec.parse(action="allow", src=peer, proto="udp", dport=PORT).with_id(2),
        ]
    )
    check_rule(dp, lab, [1, 2], family=family, dport=PORT, expect_arrive=N, credited=2)
    check_rule(dp, lab, [1, 2], family=family, dport=OTHER_PORT, expect_arrive=0, credited=1)
    dp.remove_rules([1, 2])
    assert_passes(lab, family, PORT)
    assert_passes(lab, family, OTHER_PORT)


@pytest.mark.parametrize("family", [4, 6])
def test_monitor_mode_passes_and_counts(attached: Attached, family: int) -> None:
    dp, lab = attached
    peer = lab.peer_ip4 if family == 4 else lab.peer_ip6
    assert_passes(lab, family)
    dp.add_rule(RuleSpec.parse(src=peer, mode="monitor").with_id(1))
    g0 = check_rule(dp, lab, [1], family=family, expect_arrive=N, credited=1)
    g1 = dp.global_counters()
    assert delta(g1, g0, "monitored") == N
    assert delta(g1, g0, "dropped") == 0
    dp.remove_rule(1)
    assert_passes(lab, family)


def test_remove_longer_prefix_keeps_covering_prefix(attached: Attached) -> None:
    dp, lab = attached
    assert_passes(lab, 4)
    dp.add_rules(
        [
            RuleSpec.parse(src=covering(lab.peer_ip4, 16)).with_id(1),
            RuleSpec.parse(src=covering(lab.peer_ip4, 24)).with_id(2),
        ]
    )
    check_rule(dp, lab, [1, 2], family=4, expect_arrive=0, credited=2)  # longest prefix
    dp.remove_rule(2)
    check_rule(dp, lab, [1], family=4, expect_arrive=0, credited=1)  # /16 still covers
    dp.remove_rule(1)
    assert_passes(lab, 4)


@pytest.mark.parametrize("family,outer,inner", [(4, 16, 24), (6, 48, 64)])
def test_remove_covering_prefix_restores_traffic(
    attached: Attached, family: int, outer: int, inner: int
) -> None:
    """The inner prefix's entry carries the covering drop; removing the drop must clear it."""
    dp, lab = attached
    peer = lab.peer_ip4 if family == 4 else lab.peer_ip6
    assert_passes(lab, family)
    dp.add_rules(
        [
            RuleSpec.parse(src=covering(peer, outer)).with_id(1),
            RuleSpec.parse(src=covering(peer, inner), mode="monitor").with_id(2),
        ]
    )
    # drop beats monitor, even from a shorter prefix
    check_rule(dp, lab, [1, 2], family=family, expect_arrive=0, credited=1)
    dp.remove_rule(1)
    g0 = check_rule(dp, lab, [2], family=family, expect_arrive=N, credited=2)
    assert delta(dp.global_counters(), g0, "monitored") == N
    dp.remove_rule(2)
    assert_passes(lab, family)


def test_global_counters_drop_and_pass(attached: Attached) -> None:
    dp, lab = attached
    g0 = dp.global_counters()
    assert_passes(lab, 4)
    g1 = dp.global_counters()
    assert delta(g1, g0, "passed") >= N
    dp.add_rule(RuleSpec.parse(src=lab.peer_ip4).with_id(1))
    assert udp_roundtrip(lab, family=4, count=N) == 0
    g2 = dp.global_counters()
    assert delta(g2, g1, "dropped") >= N
    assert delta(g2, g1, "packets") >= N
    assert delta(g2, g1, "bytes") >= udp_frame_bytes(4)
    dp.remove_rule(1)
    assert_passes(lab, 4)
    g3 = dp.global_counters()
    assert delta(g3, g2, "passed") >= N


# --------------------------------------------------------------------------
# raw frames
# --------------------------------------------------------------------------


def vlan_frames(lab: VethLab) -> list[bytes]:
    return [
        frames.build_frame(
            src=lab.peer_ip4,
            dst=lab.host_ip4,
            proto="udp",
            dport=PORT,
            vlans=[(frames.ETH_P_8021Q, 100)],
            payload=b"vlan %02d" % i,
            eth_src=lab.peer_mac,
            eth_dst=lab.host_mac,
        )
        for i in range(N)
    ]


def test_vlan_tagged_frame_dropped_by_src(attached: Attached) -> None:
    dp, lab = attached
    tagged = vlan_frames(lab)
    assert all(len(f) == ETH_HLEN + 4 + 20 + UDP_HLEN + 7 for f in tagged)
    total = sum(len(f) for f in tagged)

    # Without rules the tagged frames pass XDP (the stack then discards them: no VLAN dev).
    g0 = dp.global_counters()
    send_raw(lab, tagged)
    assert wait_for(lambda: delta(dp.global_counters(), g0, "passed") >= N)

    dp.add_rule(RuleSpec.parse(src=lab.peer_ip4).with_id(1))
    # sanity: the rule works for untagged traffic
    check_rule(dp, lab, [1], family=4, expect_arrive=0, credited=1)

    p0, b0 = counters(dp, 1)
    g1 = dp.global_counters()
    send_raw(lab, tagged)
    assert wait_for(lambda: counters(dp, 1)[0] - p0 >= N), "tagged frames not credited"
    time.sleep(0.05)  # nothing more may arrive
    p1, b1 = counters(dp, 1)
    assert p1 - p0 == N
    assert b1 - b0 == total
    assert delta(dp.global_counters(), g1, "dropped") >= N

    dp.remove_rule(1)
    g2 = dp.global_counters()
    send_raw(lab, tagged)
    assert wait_for(lambda: delta(dp.global_counters(), g2, "passed") >= N)
    assert_passes(lab, 4)


def test_arp_from_blocked_source_passes(attached: Attached) -> None:
    dp, lab = attached
    arp = frames.arp_frame(
        sender_ip=lab.peer_ip4,
        target_ip=lab.host_ip4,
        eth_src=lab.peer_mac,
        eth_dst=lab.host_mac,
    )
    assert len(arp) == 42
    dp.add_rule(RuleSpec.parse(src=lab.peer_ip4).with_id(1))
    check_rule(dp, lab, [1], family=4, expect_arrive=0, credited=1)  # the block is live

    before = counters(dp, 1)
    g0 = dp.global_counters()
    send_raw(lab, [arp] * N)
    assert wait_for(lambda: delta(dp.global_counters(), g0, "non_ip") >= N), "ARP not seen"
    g1 = dp.global_counters()
    assert delta(g1, g0, "passed") >= N
    assert delta(g1, g0, "packets") >= N
    assert counters(dp, 1) == before, "an ARP frame was credited to an IP rule"

    dp.remove_rule(1)
    assert_passes(lab, 4)


def test_one_program_on_two_interfaces(dp: Datapath) -> None:
    """Several interfaces at once: one program, one rule set, counters summed over both."""
    with veth_lab(prefix="xfw") as a, veth_lab(prefix="xfw") as b:
        att_a = dp.attach(a.host_if, "native")
        att_b = dp.attach(b.host_if, "generic")
        try:
            assert att_a.prog_id == att_b.prog_id == dp.prog_id
            assert {x.ifname for x in dp.attachments()} >= {a.host_if, b.host_if}
            assert dp.attach(a.host_if, "native") == att_a  # idempotent for our own program
            rule = RuleSpec.parse(src="198.18.0.0/15").with_id(1)
            dp.add_rule(rule)
            assert udp_roundtrip(a, count=N, dport=PORT) == 0
            assert udp_roundtrip(b, count=N, dport=PORT) == 0
            assert dp.rule_counters([1])[1].packets == 2 * N
            dp.remove_rule(1)
            assert udp_roundtrip(a, count=N, dport=PORT) == N
            assert udp_roundtrip(b, count=N, dport=PORT) == N
        finally:
            dp.detach(a.host_if)
            dp.detach(b.host_if)
        assert netlink.xdp_state(a.host_if).prog_id == 0
        assert netlink.xdp_state(b.host_if).prog_id == 0
