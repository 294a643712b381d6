"""Per-rule counter indices, the counter readers and the IPv4 prefix hint, on the real program.

Each slot carries its rule's index into the per-CPU counter array (since ABI 2); the control
plane hands the indices out, zeroes one before reuse and reads them back from the slots when
it adopts pinned maps. The prefix hint lets an IPv4 frame skip a trie whose prefixes cannot
cover it; `entry_mismatches` checks its bits against the rules, the frames check the verdicts.
A counter read the kernel refuses leaves the datapath as KernelError (errno kept), which the
API answers with a 5xx and a JSON body.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from conftest import TEST_CAPS, unique_pin_dir

from xdpfw import abi
from xdpfw.compiler import Capacities
from xdpfw.datapath import COUNTER_QUARANTINE_S, Datapath, DatapathConfig, RuleCounters
from xdpfw.datapath import counters as dp_counters
from xdpfw.errors import CapacityExceeded, KernelError
from xdpfw.kernel import bpfsys, netlink
from xdpfw.rules import Rule, RuleSpec
from xdpfw.verify.frames import build_frame
from xdpfw.verify.harness import entry_mismatches

pytestmark = pytest.mark.bpf

XDP_DROP, XDP_PASS = 1, 2
NOT_A_MAP = (errno.EINVAL, errno.EBADF)  # what bpf(2) says to an fd that is no map


def rule(rule_id: int, **kwargs: str) -> Rule:
    return RuleSpec.parse(**kwargs).with_id(rule_id)


def frame(src: str, dst: str = "198.19.255.254") -> bytes:
    return build_frame(src=src, dst=dst, proto="udp", dport=53)


def hit(dp: Datapath, src: str, times: int = 1, dst: str = "198.19.255.254") -> int:
    retval = 0
    for _ in range(times):
        retval = bpfsys.prog_test_run(dp.prog_fd, frame(src, dst)).retval
    return retval


def tbl24_cells(dp: Datapath) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """The IPv4 prefix tbl24 cells of both directions as the kernel holds them (read with a
    batch lookup, not the mapping the writer uses): shape (2, 2^24), source first."""
    rows = abi.D248_TBL24_ROWS
    raw = [dp.map(abi.d248_maps(t)[0]).read_array(rows)
           for t in (abi.Table.SRC4_LPM, abi.Table.DST4_LPM)]
    return np.stack([np.frombuffer(r, dtype="<u4") for r in raw])


def plain(counters: dict[int, RuleCounters]) -> dict[int, tuple[int, int, float | None]]:
    """Counters with last_hit to the millisecond (wall-clock conversion jitters by ns)."""
    return {
        rid: (c.packets, c.bytes, None if c.last_hit is None else round(c.last_hit, 3))
        for rid, c in counters.items()
    }


@pytest.fixture
def small_dp() -> Iterator[Datapath]:
    """A program of its own with room for four rules, so indices must be reused."""
    caps = Capacities(max_rules=4, max_prefixes=16, max_sets=8)
    with Datapath.open(DatapathConfig(bpffs_dir=unique_pin_dir("ctr"), caps=caps)) as dp:
        yield dp


def test_a_reused_counter_index_starts_from_zero(small_dp: Datapath) -> None:
    dp = small_dp
    hosts = [f"198.18.0.{i}" for i in range(1, 5)]
    dp.add_rules([rule(i + 1, src=h) for i, h in enumerate(hosts)])
    for i, h in enumerate(hosts):
        assert hit(dp, h, times=i + 1) == XDP_DROP
    assert {r: c.packets for r, c in dp.rule_counters().items()} == {1: 1, 2: 2, 3: 3, 4: 4}

    dp.remove_rule(4)  # the busiest rule goes; its index is the only free one
    freed = time.monotonic()
    dp.add_rule(rule(9, src="198.18.0.9"))
    assert time.monotonic() - freed >= COUNTER_QUARANTINE_S * 0.9, "reused before quarantine"
    counters = dp.rule_counters()
    assert counters[9].packets == 0 and counters[9].last_hit is None
    assert hit(dp, "198.18.0.4") == XDP_PASS  # the removed rule no longer drops or counts
    assert hit(dp, "198.18.0.9", times=2) == XDP_DROP
    assert {r: c.packets for r, c in dp.rule_counters().items()} == {1: 1, 2: 2, 3: 3, 9: 2}
    assert entry_mismatches(dp) == []


def test_top_counters_rank_by_packets_then_id(dp: Datapath) -> None:
    rules = [rule(10 + i, src=f"198.18.1.{i}") for i in range(8)]
    dp.add_rules(rules)
    # packets per rule id: ties at 3 and at 0 must come out lowest id first
    plan = {10: 3, 11: 5, 12: 3, 13: 0, 14: 7, 15: 3, 16: 0, 17: 1}
    for rid, n in plan.items():
        hit(dp, f"198.18.1.{rid - 10}", times=n)
    want = sorted(plan.items(), key=lambda kv: (-kv[1], kv[0]))
    for n in range(1, len(plan) + 2):
        got = [(rid, c.packets) for rid, c in dp.top_counters(n)]
        assert got == want[:n], f"top {n}"
    assert [(r, c.packets) for r, c in dp.top_counters()] == want
    assert dp.top_counters(0) == []
    everything = dict(dp.top_counters())
    assert plain(dp.rule_counters()) == plain(everything)
    assert plain(dp.rule_counters([11, 13, 999])) == plain({11: everything[11], 13: everything[13]})
    assert everything[14].bytes == 7 * len(frame("198.18.1.4"))
    assert everything[14].last_hit is not None and everything[13].last_hit is None
    assert abs(everything[14].last_hit - time.time()) < 5  # coarse clock, converted to Unix time


def test_prefix_cells_follow_the_prefixes(dp: Datapath) -> None:
    # /15 spans two /16s; /18 sits inside one; a dst prefix uses the other half of the bitmap
    wide = rule(1, src="198.18.0.0/15")
    inner = rule(2, action="allow", src="198.18.64.0/18")
    to = rule(3, dst="198.19.128.0/17")
    dp.add_rules([inner])
    assert entry_mismatches(dp) == []
    assert hit(dp, "198.18.64.1") == XDP_PASS
    assert dp.rule_counters([2])[2].packets == 1  # the trie was walked: the allow was credited
    dp.add_rules([wide, to])
    assert entry_mismatches(dp) == []
    assert hit(dp, "198.19.3.3", dst="198.18.0.1") == XDP_DROP  # second /16 of the /15
    assert hit(dp, "198.18.64.1", dst="198.18.0.1") == XDP_PASS  # the allow carve-out wins
    assert hit(dp, "198.18.0.1", dst="198.19.200.1") == XDP_DROP  # src /15 (first /16)
    counts = {r: c.packets for r, c in dp.rule_counters().items()}
    assert counts == {1: 2, 2: 2, 3: 0}
    dp.remove_rules([1])
    assert entry_mismatches(dp) == []
    assert hit(dp, "198.19.3.3", dst="198.19.200.1") == XDP_DROP  # now the dst rule
    assert dp.rule_counters([3])[3].packets == 1
    dp.remove_rules([2, 3])
    assert entry_mismatches(dp) == []
    assert not tbl24_cells(dp).any(), "cells left after the last prefix"


def test_a_default_route_prefix_sets_every_bit(dp: Datapath) -> None:
    dp.add_rules([rule(1, src="0.0.0.0/0", proto="tcp"), rule(2, src="198.18.0.5")])
    assert entry_mismatches(dp) == []
    cells = tbl24_cells(dp)
    assert (cells[0] != 0).all()  # every /24 of the source table names the /0
    assert len(np.unique(cells[0])) == 1
    assert not cells[1].any()
    tcp = build_frame(src="198.19.7.7", dst="198.18.0.1", proto="tcp", dport=443)
    assert bpfsys.prog_test_run(dp.prog_fd, tcp).retval == XDP_DROP


def test_adoption_reads_indices_and_prefix_arrays_back() -> None:
    pin_dir = unique_pin_dir("adopt-ctr")
    cfg = DatapathConfig(bpffs_dir=pin_dir, caps=TEST_CAPS)
    first = Datapath.open(cfg)
    try:
        first.add_rules([rule(i, src=f"198.18.2.{i}") for i in range(1, 6)])
        first.add_rules([rule(20, src="198.19.0.0/20")])
        first.remove_rules([2, 3])  # leave holes among the indices
        hit(first, "198.18.2.5", times=3)
        hit(first, "198.19.0.9", times=2)
        before = first.rule_counters()
        first.close()  # pins stay: the kernel keeps filtering
        second = Datapath.open(cfg)
    except BaseException:
        first.close(cleanup=True)
        raise
    with second:
        assert second.adopted
        assert plain(second.rule_counters()) == plain(before)
        assert entry_mismatches(second) == []
        second.add_rules([rule(30 + i, src=f"198.18.3.{i}") for i in range(4)])
        assert entry_mismatches(second) == []  # new indices collide with no adopted one
        hit(second, "198.18.3.0")
        after = second.rule_counters()
        assert after[30].packets == 1 and after[5].packets == 3 and after[20].packets == 2


def test_counter_reads_agree_whether_few_or_many_rules_were_hit(
    dp: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few hit rules are read one by one, many in one batch: the same numbers either way."""
    dp.add_rules([rule(100 + i, src=f"198.18.4.{i}") for i in range(40)])
    for i in range(0, 40, 3):
        hit(dp, f"198.18.4.{i}", times=1 + i % 4)
    few = dp.top_counters()
    monkeypatch.setattr(dp_counters, "_FEW_HOT", 2)
    many = dp.top_counters()
    assert plain(dict(few)) == plain(dict(many))
    assert [r for r, _ in few] == [r for r, _ in many]
    assert sum(c.packets for _, c in many) == sum(1 + i % 4 for i in range(0, 40, 3))
    assert {r for r, c in many if c.last_hit is not None} == {100 + i for i in range(0, 40, 3)}


def test_ids_that_share_a_home_index_get_their_own_and_survive_adoption() -> None:
    """Counter indices are direct-mapped from rule ids (1 + (id - 1) % max_rules); ids that
    collide are moved elsewhere, and adoption reads every index back from the slots."""
    caps = Capacities(max_rules=4, max_prefixes=16, max_sets=8)
    cfg = DatapathConfig(bpffs_dir=unique_pin_dir("home"), caps=caps)
    dp = Datapath.open(cfg)
    try:
        dp.add_rules([rule(1, src="198.18.5.1"), rule(5, src="198.18.5.5")])  # both home 1
        dp.add_rules([rule(13, src="198.18.5.13")])  # home 1 as well
        assert entry_mismatches(dp) == []
        for n, rid in enumerate((1, 5, 13), start=1):
            hit(dp, f"198.18.5.{rid}", times=n)
        assert {r: c.packets for r, c in dp.rule_counters().items()} == {1: 1, 5: 2, 13: 3}
        dp.close()
        dp = Datapath.open(cfg)
        assert {r: c.packets for r, c in dp.rule_counters().items()} == {1: 1, 5: 2, 13: 3}
        dp.remove_rules([5])
        dp.add_rules([rule(2, src="198.18.5.2"), rule(6, src="198.18.5.6")])
        assert entry_mismatches(dp) == []
        hit(dp, "198.18.5.6")
        assert {r: c.packets for r, c in dp.rule_counters().items()} == {1: 1, 2: 0, 6: 1, 13: 3}
    finally:
        dp.close(cleanup=True)


def test_a_change_refused_half_way_leaves_no_counter_index_behind() -> None:
    """A multi-rule entry rewritten needs a fresh rule set while the old one is in use: with
    a single set that fails in the datapath (CapacityExceeded, not a kernel error), after the
    counter indices were handed out. Nothing may stay allocated, and the maps stay as they were."""
    caps = Capacities(max_rules=8, max_prefixes=16, max_sets=2)
    with Datapath.open(DatapathConfig(bpffs_dir=unique_pin_dir("refuse"), caps=caps)) as dp:
        dp.add_rules([rule(1, src="198.18.6.1", proto="tcp"), rule(2, src="198.18.6.1")])
        assert entry_mismatches(dp) == []
        with pytest.raises(CapacityExceeded):
            dp.add_rules([rule(3, src="198.18.6.1", proto="udp")])
        assert sorted(r.id for r in dp.rules()) == [1, 2]
        assert entry_mismatches(dp) == []  # also: exactly two counter indices in use
        assert dp.counter_index(3) is None
        dp.remove_rules([1])
        dp.add_rules([rule(3, src="198.18.6.1", proto="udp")])  # the retry works
        assert entry_mismatches(dp) == []
        assert hit(dp, "198.18.6.1") == XDP_DROP
        assert {r: c.packets for r, c in dp.rule_counters().items()} == {2: 0, 3: 1}


@contextmanager
def broken_fd(m: bpfsys.Map[Any, Any]) -> Iterator[None]:
    """For a while, the map's fd number names /dev/null: bpf(2) refuses it (EINVAL: not a map;
    EBADF on older kernels)."""
    saved = os.dup(m.fd)
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        os.dup2(null, m.fd, inheritable=False)
        yield
    finally:
        os.dup2(saved, m.fd, inheritable=False)
        os.close(saved)
        os.close(null)


def test_read_paths_raise_kernel_error_with_the_errno(
    dp: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the kernel refuses to a counter read or an attachment lookup is a KernelError
    (never a bare OSError / NetlinkOpError); the datapath works again once the kernel does."""
    dp.add_rules([rule(1, src="198.18.7.1"), rule(2, src="198.18.7.2")])
    hit(dp, "198.18.7.1", times=2)
    reads: list[tuple[str, Callable[[], object]]] = [
        ("xdpfw_rule_stats", dp.rule_counters),
        ("xdpfw_rule_stats", lambda: dp.rule_counters([1, 2])),
        ("xdpfw_rule_stats", dp.top_counters),
        ("xdpfw_rule_stats", lambda: dp.top_counters(1)),
        ("xdpfw_rule_stats", dp.counter_arrays),
        ("xdpfw_stats", dp.global_counters),
    ]
    for name, read in reads:
        with broken_fd(dp.map(name)), pytest.raises(KernelError) as err:
            read()
        cause = err.value.__cause__
        assert isinstance(cause, bpfsys.BpfError) and cause.errno in NOT_A_MAP
        assert err.value.errno == cause.errno and name in err.value.op
    assert dp.rule_counters([1])[1].packets == 2
    assert dp.global_counters().packets >= 2

    def refused(prog_id: int, netns: str | None = None) -> list[netlink.XdpState]:
        raise netlink.NetlinkOpError(errno.EPERM, "xdp_find", "not allowed")

    monkeypatch.setattr(netlink, "xdp_find", refused)
    with pytest.raises(KernelError) as err:
        dp.attachments()
    assert err.value.errno == errno.EPERM and "attachments" in err.value.op
    monkeypatch.undo()
    assert dp.attachments() == []


def test_a_kernel_error_is_a_5xx_with_its_errno_in_the_api(dp: Datapath) -> None:
    """api/errors.py's table maps the KernelError of a refused read to 500, errno in the body."""
    import httpx
    from fastapi import FastAPI

    from api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return {"packets": dp.global_counters().packets}

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/stats")

    with broken_fd(dp.map("xdpfw_stats")):
        r = asyncio.run(get())
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "KernelError" and body["errno"] in NOT_A_MAP
    assert "xdpfw_stats" in body["detail"]
    assert asyncio.run(get()).status_code == 200
