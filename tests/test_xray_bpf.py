"""X-ray on the real program (BPF_PROG_TEST_RUN): what a sampled rule puts into the ring.

Frames of several kinds (IPv4, IPv6, VLAN-tagged, fragments) decided by sampled rules come
out of the ring buffer (read by mmap, xdpfw/kernel/ringbuf.py) with their bytes intact and the
right rule, verdict and length; `every: N` keeps exactly 1 in N; the kernel's token bucket
holds the cap under a flood and counts the rest as lost; with nothing sampled, nothing is
written; turning sampling on and off is a map write on the running program.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from xdpfw.datapath import Datapath
from xdpfw.kernel import bpfsys
from xdpfw.rules import RuleSpec
from xdpfw.verify.frames import build_frame
from xdpfw.xray.record import Sample, decode, wall_offset_ns

pytestmark = pytest.mark.bpf

XDP_DROP, XDP_PASS = 1, 2


@pytest.fixture
def xdp(dp: Datapath) -> Iterator[Datapath]:
    """The session program with an empty ring, a generous cap and snaplen 2048."""
    dp.sample_configure(100_000, 2048)
    with dp.sample_ring() as ring:
        ring.drain(lambda _raw: None)
    yield dp
    dp.sample_set({rid: None for rid in dp.sample_rules()})
    dp.sample_configure(100_000, 128)


def drain(dp: Datapath) -> list[Sample]:
    out: list[Sample] = []
    off = wall_offset_ns()
    with dp.sample_ring() as ring:
        ring.drain(lambda raw: out.append(decode(raw, off)))
    return out


def run(dp: Datapath, frame: bytes, repeat: int = 1) -> int:
    return bpfsys.prog_test_run(dp.prog_fd, frame, repeat=repeat).retval


def test_nothing_sampled_writes_nothing(xdp: Datapath) -> None:
    xdp.add_rules([RuleSpec.parse(src="198.18.1.0/24").with_id(1)])
    before = xdp.sample_stats()
    assert run(xdp, build_frame(src="198.18.1.7", dst="198.19.0.1"), repeat=50) == XDP_DROP
    assert drain(xdp) == []
    assert xdp.sample_stats() == before
    assert xdp.rule_counters([1])[1].packets == 50


def test_frames_of_every_kind_come_out_whole(xdp: Datapath) -> None:
    xdp.add_rules([
        RuleSpec.parse(src="198.18.2.0/24").with_id(11),
        RuleSpec.parse(src="2001:db8:2::/64").with_id(12),
        RuleSpec.parse(src="198.18.3.9", mode="monitor").with_id(13),
        RuleSpec.parse(action="allow", src="198.18.4.4").with_id(14),
    ])
    xdp.sample_set({11: 1, 12: 1, 13: 1, 14: 1})
    frames = [
        (build_frame(src="198.18.2.1", dst="198.19.0.1", proto="udp", dport=53), 11, "drop"),
        (build_frame(src="2001:db8:2::5", dst="2001:db8:ff::1", proto="tcp", dport=443), 12,
         "drop"),
        (build_frame(src="198.18.2.2", dst="198.19.0.1", vlans=[(0x8100, 7)], proto="udp"), 11,
         "drop"),
        (build_frame(src="198.18.2.3", dst="198.19.0.1", vlans=[(0x88A8, 1), (0x8100, 2)],
                     proto="tcp"), 11, "drop"),
        (build_frame(src="198.18.2.4", dst="198.19.0.1", proto="udp", frag_offset=8,
                     payload=b"x" * 40), 11, "drop"),
        (build_frame(src="2001:db8:2::6", dst="2001:db8:ff::1", proto="udp", frag_offset=0,
                     more_fragments=True, payload=b"y" * 64), 12, "drop"),
        (build_frame(src="198.18.3.9", dst="198.19.0.1", proto="icmp"), 13, "monitor"),
        (build_frame(src="198.18.4.4", dst="198.19.0.1", proto="udp",
                     payload=b"z" * 1200), 14, "pass"),
    ]
    t0 = time.time()
    for frame, _, verdict in frames:
        assert run(xdp, frame) == (XDP_DROP if verdict == "drop" else XDP_PASS)
    got = drain(xdp)
    assert [(s.data, s.length, s.rule, s.verdict) for s in got] == [
        (f, len(f), rid, v) for f, rid, v in frames
    ]
    for s in got:
        assert abs(s.time_ns / 1e9 - t0) < 5  # CLOCK_MONOTONIC turned into wall time
        assert s.ifindex == 1  # BPF_PROG_TEST_RUN runs on lo


def test_snaplen_keeps_the_first_bytes_and_the_length(xdp: Datapath) -> None:
    xdp.add_rules([RuleSpec.parse(src="198.18.5.0/24").with_id(21)])
    xdp.sample_set({21: 1})
    frame = build_frame(src="198.18.5.1", dst="198.19.0.1", proto="udp", payload=b"p" * 700)
    for snaplen, kept in ((128, 128), (300, 300), (2048, len(frame))):
        xdp.sample_configure(100_000, snaplen)
        run(xdp, frame)
        (s,) = drain(xdp)
        assert (s.data, s.length) == (frame[:kept], len(frame))


def test_every_n_samples_one_in_n(xdp: Datapath) -> None:
    xdp.add_rules([RuleSpec.parse(src="198.18.6.0/24").with_id(31)])
    frame = build_frame(src="198.18.6.1", dst="198.19.0.1")
    xdp.sample_set({31: 5})
    run(xdp, frame, repeat=100)
    assert len(drain(xdp)) == 20
    xdp.sample_set({31: 7})  # a new entry starts its own count
    run(xdp, frame, repeat=50)
    assert len(drain(xdp)) == 8  # frames 0, 7, ..., 49
    xdp.sample_set({31: None})  # off again: a map write, the program runs on
    run(xdp, frame, repeat=50)
    assert drain(xdp) == []
    assert xdp.sample_rules() == {}


def test_the_cap_holds_under_a_flood(xdp: Datapath) -> None:
    cap = 1000
    xdp.add_rules([RuleSpec.parse(src="198.18.7.0/24").with_id(41)])
    xdp.sample_set({41: 1})
    xdp.sample_configure(cap, 128)
    before = xdp.sample_stats()
    frames = 300_000
    t0 = time.monotonic()
    run(xdp, build_frame(src="198.18.7.1", dst="198.19.0.1"), repeat=frames)
    elapsed = time.monotonic() - t0
    got = drain(xdp)
    after = xdp.sample_stats()
    sent = after["sent"] - before["sent"]
    lost_cap = after["lost_cap"] - before["lost_cap"]
    burst = cap // 10  # BURST_SECONDS of tokens
    assert len(got) == sent
    assert sent <= burst + cap * elapsed + 1, (sent, elapsed)
    assert sent >= min(burst, frames)  # the bucket starts full
    assert sent + lost_cap + (after["lost_ring"] - before["lost_ring"]) == frames
    assert lost_cap > frames // 2


def test_removing_a_rule_stops_its_sampling(xdp: Datapath) -> None:
    xdp.add_rules([RuleSpec.parse(src="198.18.8.0/24").with_id(51)])
    xdp.sample_set({51: 1})
    xdp.remove_rules([51])
    assert xdp.sample_rules() == {}
    assert xdp.map("xdpfw_sample_ctl").lookup(b"\0\0\0\0").rules == 0


def test_kernels_before_5_18_get_the_program_without_sampling(
    monkeypatch: pytest.MonkeyPatch, xdp: Datapath
) -> None:
    """The loader builds with XDPFW_XRAY=0 there: same maps (same ABI), no sampling code,
    and the kernel still verifies and runs it."""
    from conftest import TEST_CAPS

    from xdpfw.kernel import loader

    monkeypatch.setattr(loader, "xray_supported", lambda: False)
    assert "-DXDPFW_XRAY=0" in loader.cflags(TEST_CAPS)
    assert loader.build_id(TEST_CAPS) != xdp.build_id  # never adopted as the other build
    lean = loader.load(TEST_CAPS)
    try:
        assert set(lean.map_fds) == set(loader.MAP_NAMES)
        frame = build_frame(src="198.18.9.1", dst="198.19.0.1")
        assert bpfsys.prog_test_run(lean.prog_fd, frame).retval == XDP_PASS
        full = bpfsys.prog_info(xdp.prog_fd).xlated_prog_len
        assert bpfsys.prog_info(lean.prog_fd).xlated_prog_len < full
    finally:
        lean.close()
