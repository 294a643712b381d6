"""Differential tests: the real XDP program against the reference model, on many rule sets.

Every frame goes through xdpfw.verify.harness.Differ: the program's verdict (BPF_PROG_TEST_RUN's
return value) must be the model's, XDP_ABORTED never occurs, the frame is not modified, and per
batch the per-rule counter deltas (packets and bytes, every rule) and the global counter deltas
equal the sums of the model's outcomes; a disagreeing batch is bisected to its first bad frame.

- property tests (Hypothesis, derandomized): random rule sets x random frames; rule churn as a
  state machine, with the maps compared to a fresh compile after every step;
- the seeded soak loop of xdpfw.verify.soak (rule sets of up to thousands of rules, churn) for
  volume;
- the regression corpus in tests/corpus/*.json, checked frame by frame, exactly.

The CI part checks well over 100k frames; `python -m xdpfw.verify.soak --frames 10000000` is the
long soak (docs/verification.md).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import unique_pin_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from xdpfw.abi import Table
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.rules import Network, Rule, RuleSpec
from xdpfw.verify import harness, model
from xdpfw.verify.frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    EXT_AH,
    EXT_DSTOPTS,
    EXT_FRAGMENT,
    EXT_HOPOPTS,
    EXT_ROUTING,
    ExtHeader,
    build_frame,
)
from xdpfw.verify.harness import MAX_FRAME, MIN_FRAME, Differ, Mismatch, Verdict
from xdpfw.verify.soak import SOAK_CAPS, RuleGen, fit, soak

pytestmark = pytest.mark.bpf

CORPUS = Path(__file__).parent / "corpus"
TALLY: Counter[str] = Counter()

# Hypothesis: reproducible in CI (same examples every run), no example database on disk.
CI = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_dp(request: pytest.FixtureRequest) -> Iterator[Datapath]:
    """A program loaded with the soak's capacities (thousands of nested prefixes fit)."""
    dp = Datapath.open(DatapathConfig(bpffs_dir=unique_pin_dir("diff"), caps=SOAK_CAPS))
    start = time.monotonic()
    try:
        yield dp
    finally:
        dp.close(cleanup=True)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None and TALLY["frames"]:
            with capture.global_and_fixture_disabled():
                reporter.write_line(
                    f"\ndifferential: {TALLY['frames']:,} frames checked against the model on "
                    f"{TALLY['rule_sets']:,} rule sets (+ {TALLY['churn']:,} rule adds/removes) in "
                    f"{time.monotonic() - start:.1f} s"
                )


@pytest.fixture
def differ(big_dp: Datapath) -> Iterator[Differ]:
    big_dp.remove_rules([r.id for r in big_dp.rules()])
    d = Differ(big_dp)
    yield d
    TALLY["frames"] += d.frames_checked
    big_dp.remove_rules([r.id for r in big_dp.rules()])


def _fail(differ: Differ, found: Sequence[Mismatch], *, minimize: bool = False) -> str:
    """The failure message. Hypothesis shrinks its own examples; seeded tests minimize."""
    first = found[0]
    if minimize and first.kind not in ("index", "unreproducible"):
        first = differ.minimize(first)
    return f"{len(found)} mismatch(es); the first{', minimized' if minimize else ''}:\n{first}"


def install(differ: Differ, rules: Sequence[Rule]) -> list[Rule]:
    """Install what fits; the datapath must refuse (changing nothing) what does not."""
    accepted, refused = fit(rules, differ.dp.caps)
    assert differ.replace(accepted), "the datapath refused rules the compiler accepts"
    for extra in refused[:2]:
        assert not differ.add([extra]), f"accepted {extra.describe()} beyond capacity"
    TALLY["rule_sets"] += 1
    return accepted


# --- strategies ---------------------------------------------------------------------------------

_T4 = int(ipaddress.IPv4Address("198.18.0.0"))
_T6 = int(ipaddress.IPv6Address("2001:db8::"))
_EDGE4 = [0, 1, 0xFFFFFFFF, 0x7F000001]
_EDGE6 = [0, 1, (1 << 128) - 1, int(ipaddress.IPv6Address("::ffff:198.18.0.1"))]
_PORTS = [0, 1, 22, 53, 80, 443, 1023, 1024, 65534, 65535]

v4_values = st.one_of(
    st.integers(_T4, _T4 + (1 << 17) - 1), st.integers(0, (1 << 32) - 1), st.sampled_from(_EDGE4)
)
v6_values = st.one_of(
    st.integers(_T6, _T6 + (1 << 96) - 1), st.integers(0, (1 << 128) - 1), st.sampled_from(_EDGE6)
)
anchors = st.one_of(st.tuples(st.just(4), v4_values), st.tuples(st.just(6), v6_values))
verdicts = st.sampled_from([("drop", "enforce"), ("drop", "monitor"), ("allow", "enforce")])
port_ranges = st.one_of(
    st.sampled_from(_PORTS).map(str),
    st.integers(0, 65535).map(str),
    st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(
        lambda t: f"{min(t)}-{max(t)}"
    ),
    st.tuples(st.sampled_from(_PORTS), st.sampled_from([1, 2, 10, 1000])).map(
        lambda t: f"{t[0]}-{min(65535, t[0] + t[1])}"
    ),
    st.just("0-65535"),
)


def _network(version: int, value: int, plen: int) -> Network:
    bits = 32 if version == 4 else 128
    masked = value >> (bits - plen) << (bits - plen) if plen else 0
    if version == 4:
        return ipaddress.IPv4Network((masked, plen))
    return ipaddress.IPv6Network((masked, plen))


def _net(rule: Rule) -> Network | None:
    return rule.src if rule.src is not None else rule.dst


def _inside(inner: Network, outer: Network) -> bool:
    """A longer prefix of the same family inside ``outer``."""
    shift = outer.max_prefixlen - outer.prefixlen
    return (inner.version == outer.version and inner.prefixlen > outer.prefixlen
            and int(inner.network_address) >> shift == int(outer.network_address) >> shift)


def _prefix_len(rule: Rule) -> int:
    """The rule's prefix length when it is a prefix shorter than a host route, else -1."""
    net = _net(rule)
    return net.prefixlen if net is not None and net.prefixlen < net.max_prefixlen else -1


@st.composite
def rule_specs(draw: st.DrawFn, pool: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """RuleSpec.parse kwargs: src/dst (an anchor cut to any prefix length) or neither, a
    protocol, ports or a range, any verdict."""
    kw: dict[str, Any] = {}
    side = draw(st.sampled_from(["src", "src", "dst", "dst", None]))
    fam = None
    if side is not None:
        version, value = draw(st.sampled_from(pool))
        bits = 32 if version == 4 else 128
        plen = draw(st.one_of(st.just(bits), st.integers(0, bits), st.integers(bits - 8, bits)))
        kw[side] = _network(version, value, plen)
        fam = version
    protos = ["tcp", "udp"] + (["icmp", "icmpv6"] if fam is None else
                               ["icmp" if fam == 4 else "icmpv6"])
    proto = draw(st.sampled_from(protos) if fam is None else st.none() | st.sampled_from(protos))
    if proto is not None:
        kw["proto"] = proto
    if proto in ("tcp", "udp") and draw(st.booleans()):
        kw["dport"] = draw(port_ranges)
    kw["action"], kw["mode"] = draw(verdicts)
    return kw


@st.composite
def rule_sets(draw: st.DrawFn, max_rules: int = 40, max_anchors: int = 6) -> list[Rule]:
    """Rules 1..N around a few anchors: exact hosts, nested and overlapping prefixes, near
    duplicates (same key, other ports/verdicts), address-less rules."""
    pool = draw(st.lists(anchors, min_size=1, max_size=max_anchors))
    specs = draw(st.lists(rule_specs(pool), max_size=max_rules))
    out: list[Rule] = []
    seen: set[object] = set()
    for kw in specs:
        spec = RuleSpec.parse(**kw)
        if spec.match_key() not in seen:
            seen.add(spec.match_key())
            out.append(spec.with_id(len(out) + 1))
    return out


ext_headers = st.one_of(
    st.builds(ExtHeader, st.sampled_from([EXT_HOPOPTS, EXT_DSTOPTS, EXT_ROUTING]),
              st.one_of(st.integers(1, 3), st.integers(1, 256)).map(lambda u: 8 * u)),
    st.builds(ExtHeader, st.just(EXT_AH),
              st.one_of(st.integers(2, 4), st.integers(2, 257)).map(lambda u: 4 * u)),
    st.builds(ExtHeader, st.just(EXT_FRAGMENT), st.just(8),
              st.one_of(st.just(0), st.integers(1, 0x1FFF)), st.booleans()),
)


def _fit_chain(chain: list[ExtHeader], budget: int = 2400) -> list[ExtHeader]:
    out, used = [], 0
    for h in chain:
        if used + h.length > budget:
            h = ExtHeader(h.kind, 12 if h.kind == EXT_AH else 8, h.frag_offset, h.more_fragments)
        out.append(h)
        used += h.length
    return out


@st.composite
def near(draw: st.DrawFn, net: Network | None, version: int) -> str:
    """An address in ``net`` (first, last or any), maybe one bit away; or a random one."""
    bits = 32 if version == 4 else 128
    if net is None or net.version != version or draw(st.integers(0, 4)) == 0:
        value = draw(v4_values if version == 4 else v6_values)
    else:
        host = bits - net.prefixlen
        base = int(net.network_address)
        value = base | draw(st.one_of(st.just(0), st.just((1 << host) - 1),
                                      st.integers(0, (1 << host) - 1)))
        flip = draw(st.one_of(
            st.none(),
            st.sampled_from([i for i in (net.prefixlen - 1, net.prefixlen) if 0 <= i < bits]
                            or [0]),
            st.integers(0, bits - 1),
        ))
        if flip is not None:
            value ^= 1 << (bits - 1 - flip)
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


@st.composite
def frames_for(draw: st.DrawFn, rules: Sequence[Rule]) -> bytes:
    """A frame aimed at ``rules`` (their addresses +- one bit, their protocols and port
    boundaries) with VLAN/QinQ tags, IPv4 options, IPv6 extension chains (up to 10, so past the
    bound of 8), first/non-first fragments, then maybe cut short or with bits flipped."""
    target = draw(st.none() | st.sampled_from(list(rules))) if rules else None
    net = None if target is None else (target.src if target.src is not None else target.dst)
    version = net.version if net is not None else draw(st.sampled_from([4, 6]))
    on_src = target is not None and target.src is not None
    if net is not None:
        # often inside a longer prefix of the rule set: its entry must carry the target's slot
        inner = [n for r in rules if (n := _net(r)) is not None and _inside(n, net)]
        use_inner: bool = draw(st.booleans())
        if inner and use_inner:
            net = draw(st.sampled_from(inner))
    src = draw(near(net if on_src else None, version))
    dst = draw(near(None if on_src else net, version))
    rule_protos = sorted({r.proto.number for r in rules if r.proto is not None})
    aimed_proto = [target.proto.number] if target is not None and target.proto else []
    proto = draw(st.one_of(
        st.sampled_from(aimed_proto or [6, 17]),
        st.sampled_from([6, 17, 1, 58]),
        st.sampled_from(rule_protos or [6]),
        st.integers(0, 255),
    ))
    bounds = sorted({p for r in rules if r.dport is not None
                     for p in (r.dport.lo - 1, r.dport.lo, r.dport.hi, r.dport.hi + 1)
                     if 0 <= p <= 65535} | set(_PORTS))
    ports = target.dport if target is not None else None
    aimed_port = (st.integers(ports.lo, ports.hi) | st.sampled_from(
        [p for p in (ports.lo - 1, ports.lo, ports.hi, ports.hi + 1) if 0 <= p <= 65535])
        if ports is not None else st.sampled_from(bounds))
    kw: dict[str, Any] = {
        "src": src,
        "dst": dst,
        "proto": proto,
        "dport": draw(aimed_port | st.sampled_from(bounds) | st.integers(0, 65535)),
        "sport": draw(st.integers(0, 65535)),
        "vlans": draw(st.lists(st.tuples(st.sampled_from([ETH_P_8021Q, ETH_P_8021AD]),
                                         st.integers(0, 4095)), max_size=3)),
        "payload": draw(st.binary(max_size=24)),
    }
    frag = draw(st.sampled_from(["no", "no", "no", "first", "later"]))
    if version == 4:
        kw["ip_options"] = draw(st.just(b"") | st.binary(max_size=40))
    else:
        kw["ext_headers"] = _fit_chain(draw(st.just([]) | st.lists(ext_headers, max_size=10)))
    if not any(h.kind == EXT_FRAGMENT for h in kw.get("ext_headers", [])):
        if frag == "first":
            kw["more_fragments"] = True
        elif frag == "later":
            kw["frag_offset"] = draw(st.integers(1, 0x1FFF))
            kw["more_fragments"] = draw(st.booleans())
    frame = build_frame(**kw)
    mutation = draw(st.sampled_from(["none", "none", "none", "cut", "flip"]))
    if mutation == "cut" and len(frame) > MIN_FRAME:
        frame = frame[: draw(st.integers(MIN_FRAME, len(frame) - 1))]
    elif mutation == "flip":
        pos = draw(st.integers(0, min(len(frame), 100) - 1))
        frame = frame[:pos] + bytes([frame[pos] ^ (1 << draw(st.integers(0, 7)))]) + frame[pos + 1:]
    return frame[:MAX_FRAME]


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes behind a random, IP, IPv6 or VLAN ethertype."""
    ethertype = draw(st.sampled_from([0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806]) |
                     st.integers(0, 0xFFFF))
    return bytes(12) + ethertype.to_bytes(2, "big") + draw(st.binary(max_size=120))


@st.composite
def scenarios(draw: st.DrawFn, max_rules: int = 40) -> tuple[list[Rule], list[bytes]]:
    rules = draw(rule_sets(max_rules))
    frames = draw(st.lists(frames_for(rules) | garbage(), min_size=1, max_size=40))
    return rules, frames


def _sweep(frame: bytes) -> list[bytes]:
    return [frame[:n] for n in range(MIN_FRAME, len(frame) + 1)]


# --- the harness itself -------------------------------------------------------------------------


def test_run_returns_the_verdict_and_the_time_per_packet(dp: Datapath) -> None:
    frame = build_frame(src="198.18.1.1", dst="198.19.0.1", proto="tcp", dport=22)
    assert harness.run(dp.prog_fd, frame).verdict is Verdict.PASS
    dp.add_rules([RuleSpec.parse(src="198.18.1.1", proto="tcp").with_id(1)])
    before = dp.rule_counters()[1].packets
    res = harness.run(dp.prog_fd, frame, repeat=10_000)
    assert res.verdict is Verdict.DROP
    assert 0 < res.ns_per_packet < 100_000
    assert res.data_out == frame
    assert dp.rule_counters()[1].packets - before == 10_000
    for bad in (b"", bytes(MIN_FRAME - 1), bytes(MAX_FRAME + 1)):
        with pytest.raises(ValueError):
            harness.run(dp.prog_fd, bad)
    with pytest.raises(ValueError):
        harness.run(dp.prog_fd, frame, repeat=0)


def test_max_frame_is_what_the_program_sees(dp: Datapath) -> None:
    """MAX_FRAME bytes reach the program whole; beyond that BPF_PROG_TEST_RUN hands a program
    without multi-buffer support only the first MAX_FRAME bytes (so the harness refuses)."""
    from xdpfw.kernel import bpfsys

    for size, seen in ((MAX_FRAME, MAX_FRAME), (MAX_FRAME + 1, MAX_FRAME)):
        before = dp.global_counters().bytes
        bpfsys.prog_test_run(dp.prog_fd, bytes(size))
        assert dp.global_counters().bytes - before == seen


def test_differ_finds_a_planted_verdict_disagreement(differ: Differ) -> None:
    """A rule the Differ does not know about: the first frame it drops is reported."""
    rules = install(differ, [RuleSpec.parse(src="198.18.0.0/16", mode="monitor").with_id(1)])
    frames = [build_frame(src=f"198.18.0.{i}", dst="198.19.0.1") for i in range(1, 100)]
    assert differ.check(frames) == []
    differ.dp.add_rules([RuleSpec.parse(src="198.18.0.37").with_id(2)])  # behind its back
    found = differ.check(frames)
    assert [(m.kind, m.frame) for m in found][:1] == [("verdict", frames[36])]
    assert "198.18.0.0/16" in str(found[0]) and frames[36].hex() in str(found[0])
    assert found[0].reproducer()["rules"] == [harness.rule_to_dict(r) for r in rules]
    differ.dp.remove_rules([2])


def test_differ_bisects_a_counter_only_disagreement(differ: Differ) -> None:
    """A monitor rule behind its back changes counters, not verdicts: bisection finds the frame."""
    install(differ, [RuleSpec.parse(src="198.18.0.0/16", proto="udp").with_id(1)])
    frames = [build_frame(src=f"198.19.0.{i}", dst="198.20.0.1", proto="tcp")
              for i in range(1, 200)]
    differ.dp.add_rules([RuleSpec.parse(src="198.19.0.150", mode="monitor").with_id(2)])
    found = differ.check(frames)
    located = [m for m in found if m.kind == "rule_counters"]
    assert located and located[0].frame == frames[149], [m.kind for m in found]
    assert "{2: (1," in located[0].got
    assert any(m.kind == "stale_counters" for m in found)  # rule 2's counters are unexpected
    differ.dp.remove_rules([2])


def test_minimize_shrinks_the_rule_set(differ: Differ) -> None:
    rules = [RuleSpec.parse(src=f"198.18.{i}.0/24").with_id(i + 1) for i in range(40)]
    install(differ, rules)
    frame = build_frame(src="198.18.7.9", dst="198.19.0.1")
    differ.dp.add_rules([RuleSpec.parse(action="allow", src="198.18.7.9").with_id(1000)])
    found = differ.check([frame])
    assert found[0].kind == "verdict" and len(found[0].rules) == 40
    small = differ.minimize(found[0])
    assert small.kind == "verdict" and [r.id for r in small.rules] == [8], str(small)
    assert {r.id for r in differ.rules} == {r.id for r in rules}  # put back
    differ.dp.remove_rules([1000])


def test_entry_check_finds_a_stale_trie_entry(differ: Differ) -> None:
    install(differ, [RuleSpec.parse(src="198.18.0.0/16").with_id(1),
                     RuleSpec.parse(src="198.18.1.0/24", proto="tcp").with_id(2)])
    assert differ.check_entries() == []
    trie = differ.dp.table(Table.SRC4_LPM)  # the DIR-24-8 arrays, keyed as the trie was
    key = (24).to_bytes(4, "little") + bytes([198, 18, 1, 0])
    good = trie.lookup_raw(key)
    assert good is not None
    stray = (8).to_bytes(4, "little") + bytes([198, 0, 0, 0])
    trie.update(stray, good)  # a /8 entry nobody compiled
    trie.update(key, good[:12] + bytes(len(good) - 12))  # first slot's rule id zeroed
    try:
        problems = differ.check_entries()
        assert any(p.startswith("stale entry") for p in problems), problems
        assert any(p.startswith("wrong slots") for p in problems), problems
    finally:
        trie.delete(stray)
        trie.update(key, good)
    assert differ.check_entries() == []


def test_array_check_finds_wrong_cells(differ: Differ) -> None:
    """The bit-for-bit check of the DIR-24-8 arrays sees a cell that names nothing, a cell
    that names a stale entry, and a wrong cell inside a tbl8 group."""
    from xdpfw.datapath.d248 import PrefixTable

    install(differ, [RuleSpec.parse(src="198.18.0.0/16").with_id(1),
                     RuleSpec.parse(src="198.18.1.64/26", proto="tcp").with_id(2)])
    assert harness.d248_mismatches(differ.dp) == []
    pt = differ.dp.table(Table.SRC4_LPM)
    assert isinstance(pt, PrefixTable)
    inside = (198 << 16) | (18 << 8) | 7  # the /24 198.18.7.0: the /16's
    outside = (198 << 16) | (19 << 8) | 7
    grouped = (198 << 16) | (18 << 8) | 1
    g = int(pt.tbl24[grouped]) & 0x7FFF_FFFF
    for cells, at, value in ((pt.tbl24, inside, 0), (pt.tbl24, outside, int(pt.tbl24[inside])),
                             (pt.tbl8, g * 256 + 70, int(pt.tbl8[g * 256]))):
        old = int(cells[at])
        cells[at] = value
        try:
            assert harness.d248_mismatches(differ.dp), f"cell {at} = {value} not seen"
        finally:
            cells[at] = old
    stale = int(pt.tbl24[inside])
    pt.keys["live"][stale] = 0  # the entry the cells name is no longer the prefix's
    try:
        assert harness.d248_mismatches(differ.dp)
    finally:
        pt.keys["live"][stale] = 1
    assert harness.d248_mismatches(differ.dp) == []


@settings(CI, max_examples=100)
@given(rules=rule_sets(max_rules=200), frames=st.lists(frames_for([]) | garbage(), max_size=20))
def test_model_index_is_the_full_model(rules: list[Rule], frames: list[bytes]) -> None:
    """The test-side index hands the model every rule that can match (pure, no kernel)."""
    index = harness.ModelIndex(rules)
    nets = [n for r in rules[:30] if (n := _net(r)) is not None]
    aimed = [build_frame(src=str(n.network_address), dst=str(n.network_address), proto=6)
             for n in nets]
    for frame in frames + aimed:
        cands = index.candidates(model.parse_frame(frame))
        assert model.evaluate(cands, frame) == model.evaluate(rules, frame)


# --- properties ---------------------------------------------------------------------------------


@settings(CI, max_examples=150)
@given(scenario=scenarios())
def test_random_rules_random_frames(differ: Differ, scenario: tuple[list[Rule], list[bytes]]
                                    ) -> None:
    rules, frames = scenario
    install(differ, rules)
    assert differ.check_entries() == []
    frames = frames + _sweep(frames[0])
    found = differ.check(frames)
    assert not found, _fail(differ, found)


@settings(CI, max_examples=8)
@given(scenario=scenarios(max_rules=400), data=st.data())
def test_bigger_rule_sets(differ: Differ, scenario: tuple[list[Rule], list[bytes]],
                          data: st.DataObject) -> None:
    rules, frames = scenario
    rules = install(differ, rules)
    more = data.draw(st.lists(frames_for(rules), min_size=100, max_size=200))
    found = differ.check(frames + more)
    assert not found, _fail(differ, found)


def test_thousands_of_rules_with_covering_prefix_removal(differ: Differ) -> None:
    """3000 seeded rules, then the covering prefixes go one batch at a time."""
    import random

    from xdpfw.verify.soak import FrameGen

    rng = random.Random(0xD1FF)
    rgen, fgen = RuleGen(rng), FrameGen(rng, sweep=0.005)
    rules = install(differ, rgen.rule_set(3000))
    assert len(rules) > 2000
    assert differ.check_entries() == []
    for _ in range(4):
        fgen.aim(differ.rules)
        found = differ.check(fgen.frames(2500))
        assert not found, _fail(differ, found, minimize=True)
        shortest = sorted((r for r in differ.rules if _prefix_len(r) >= 0), key=_prefix_len)[:25]
        differ.remove(r.id for r in shortest)
        TALLY["churn"] += len(shortest)
        assert differ.check_entries() == []


def _prefix_heavy(rng: Any, n: int, first_id: int) -> list[Rule]:
    """n IPv4 rules that are mostly prefixes, nested in one another, half of them /25-/32
    (the second level of DIR-24-8), in both directions, some with protocols and ports."""
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    nets: list[tuple[int, int]] = []
    out: list[Rule] = []
    codes: set[int] = set()
    lens = [16, 18, 20, 21, 22, 23, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32]
    while len(out) < n:
        plen = rng.choice(lens)
        if nets and rng.random() < 0.7:  # inside (or around) an earlier one
            a, pl = rng.choice(nets)
            addr = a | rng.getrandbits(32 - pl) if pl < 32 else a
        else:
            addr = base | rng.getrandbits(17)
        addr &= ~((1 << (32 - plen)) - 1) & 0xFFFF_FFFF
        nets.append((addr, plen))
        net = f"{ipaddress.IPv4Address(addr)}/{plen}"
        spec: dict[str, str] = {"src" if rng.random() < 0.7 else "dst": net}
        if rng.random() < 0.15:
            spec["action"] = "allow"
        if rng.random() < 0.2:
            spec["proto"] = rng.choice(["tcp", "udp"])
            if rng.random() < 0.5:
                lo = rng.randrange(1, 60000)
                spec["dport"] = f"{lo}-{lo + rng.randrange(2000)}"
        rule = RuleSpec.parse(**spec).with_id(first_id + len(out))
        if rule.code() not in codes:  # no two identical rules
            codes.add(rule.code())
            out.append(rule)
    return out


def test_prefix_heavy_sets_and_the_arrays_bit_for_bit(differ: Differ) -> None:
    """Prefix-heavy rule sets (nesting, /25-/32) through plan steps of every kind: after each,
    the DIR-24-8 arrays read through their mappings are bit for bit what the compiled
    prefixes imply (harness.d248_mismatches inside check_entries), and 4,000 frames aimed at
    the prefixes agree with the model."""
    import random

    from xdpfw.verify.soak import FrameGen

    rng = random.Random(0x18D248)
    fgen = FrameGen(rng, sweep=0.002)
    rules = install(differ, _prefix_heavy(rng, 1500, 1))
    assert sum(1 for r in rules if _prefix_len(r) > 24) > 500
    next_id = 10_000
    for step in range(5):
        assert differ.check_entries() == [], f"step {step}"
        fgen.aim(differ.rules)
        found = differ.check(fgen.frames(4000))
        assert not found, _fail(differ, found, minimize=True)
        have = sorted(differ.rules, key=lambda r: r.id)
        if step == 0:  # the widest go: their cells fall back to what covers them
            gone = sorted(have, key=_prefix_len)[:40]
        elif step == 1:  # long prefixes go: tbl8 groups empty and are freed
            gone = [r for r in have if _prefix_len(r) > 24][::3]
        else:  # random churn
            gone = rng.sample(have, len(have) // 6)
        differ.remove(r.id for r in gone)
        more = [r for r in _prefix_heavy(rng, 300, next_id)
                if differ.dp.compiler.find_code(r.code()) is None]
        next_id += 300
        accepted, _ = fit([*differ.rules, *more], differ.dp.caps)
        differ.add([r for r in accepted if r.id >= 10_000 and r.id not in
                    {x.id for x in differ.rules}])
        TALLY["churn"] += len(gone) + len(more)
    assert differ.check_entries() == []


# --- churn --------------------------------------------------------------------------------------

# Nested addresses: every rule's network contains or is near the others'.
_CHURN_ANCHORS = [
    (4, int(ipaddress.IPv4Address("198.18.1.1"))),
    (4, int(ipaddress.IPv4Address("198.18.1.130"))),
    (4, int(ipaddress.IPv4Address("198.19.255.254"))),
    (6, int(ipaddress.IPv6Address("2001:db8:1:2::5"))),
    (6, int(ipaddress.IPv6Address("2001:db8:1:8000::1"))),
]


def _churn_machine(shared: Differ) -> type[RuleBasedStateMachine]:
    class Churn(RuleBasedStateMachine):
        """Adds, removes (covering prefixes especially) and frames, in any order."""

        def __init__(self) -> None:
            super().__init__()
            self.differ = shared
            self.differ.replace([])
            self.next_id = 1
            TALLY["rule_sets"] += 1

        @rule(specs=st.lists(rule_specs(_CHURN_ANCHORS), min_size=1, max_size=4))
        def add(self, specs: list[dict[str, Any]]) -> None:
            keys = {r.match_key() for r in self.differ.rules}
            batch = []
            for kw in specs:
                spec = RuleSpec.parse(**kw)
                if spec.match_key() not in keys:
                    keys.add(spec.match_key())
                    batch.append(spec.with_id(self.next_id))
                    self.next_id += 1
            self.differ.add(batch)  # a refusal is checked to change nothing
            TALLY["churn"] += 1

        @precondition(lambda self: bool(self.differ.rules))
        @rule(data=st.data())
        def remove(self, data: st.DataObject) -> None:
            ids = [r.id for r in self.differ.rules]
            gone = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True))
            self.differ.remove(gone)
            TALLY["churn"] += 1

        @precondition(lambda self: any(_prefix_len(r) >= 0 for r in self.differ.rules))
        @rule()
        def remove_shortest_prefix(self) -> None:
            lpm = [r for r in self.differ.rules if _prefix_len(r) >= 0]
            self.differ.remove([min(lpm, key=_prefix_len).id])
            TALLY["churn"] += 1

        @rule(data=st.data())
        def send(self, data: st.DataObject) -> None:
            frames = data.draw(st.lists(frames_for(self.differ.rules), min_size=1, max_size=40))
            found = self.differ.check(frames)
            assert not found, _fail(self.differ, found)

        @invariant()
        def maps_are_a_fresh_compile(self) -> None:
            assert self.differ.check_entries() == []

    return Churn


def test_rule_churn_state_machine(differ: Differ) -> None:
    run_state_machine_as_test(
        _churn_machine(differ),
        settings=settings(CI, max_examples=20, stateful_step_count=25),
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_seeded_soak_with_churn(differ: Differ, seed: int) -> None:
    """The loop of `python -m xdpfw.verify.soak`: 26k frames a seed, rule sets up to 3000 rules."""
    report = soak(differ, frames=26_000, seed=seed, max_rules=3000)
    TALLY["rule_sets"] += report.rule_sets
    TALLY["churn"] += report.rules_added + report.rules_removed
    assert report.ok, (
        f"{report.mismatch}\n{report.entry_problems}\nhistory: {report.history[-30:]}"
    )
    assert report.frames == 26_000 and report.rule_sets >= 5
    assert set(report.outcomes) == {"no rule", "monitored", "dropped", "allowed"}


# --- the regression corpus ----------------------------------------------------------------------


def _corpus_files() -> list[Any]:
    out = []
    for path in sorted(CORPUS.glob("*.json")):
        data = json.loads(path.read_text())
        marks = []
        if data.get("xfail"):
            marks.append(pytest.mark.xfail(strict=True, reason=data["xfail"]))
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def _check_frames(differ: Differ, frames: Sequence[str], expect: Sequence[Any] | None,
                  where: str) -> None:
    for i, hexed in enumerate(frames):
        frame = bytes.fromhex(hexed)
        bad = differ.check_frame(frame)
        assert bad is None, f"{where} frame {i}: {bad}"
        if expect is not None:
            out = differ.expect(frame)
            want = expect[i]
            assert [out.action, out.rule_id] == [want["action"], want["rule_id"]], (
                f"{where} frame {i}: the model now says {out.action}/{out.rule_id}, the corpus "
                f"pinned {want}"
            )


@pytest.mark.parametrize("path", _corpus_files())
def test_corpus(dp: Datapath, path: Path) -> None:
    """Each corpus file: install its rules, check every frame exactly (verdict, every rule's and
    the global counter deltas), pinned outcomes too; then its steps (churn) in order."""
    data = json.loads(path.read_text())
    assert {"name", "why", "rules", "frames"} <= set(data), f"{path.name}: missing keys"
    differ = Differ(dp)
    accepted = differ.add([harness.rule_from_dict(r) for r in data["rules"]])
    assert accepted, f"{path.name}: rules refused"
    _check_frames(differ, data["frames"], data.get("expect"), path.name)
    for n, step in enumerate(data.get("steps", [])):
        if "remove" in step:
            differ.remove(step["remove"])
        if "add" in step:
            assert differ.add([harness.rule_from_dict(r) for r in step["add"]])
        assert differ.check_entries() == [], f"{path.name} step {n}"
        _check_frames(differ, step.get("frames", []), step.get("expect"), f"{path.name} step {n}")
    TALLY["frames"] += differ.frames_checked
    TALLY["rule_sets"] += 1


def test_corpus_is_present() -> None:
    names = {p.stem for p in CORPUS.glob("*.json")}
    assert len(names) >= 10, names
