"""Items 1, 2, 3 and 5: the data plane of xdpfw against xdp-filter, nftables, iptables+ipset.

One xdpfw program (Datapath, default capacities) and one xdp-filter live through the whole
run. Item 3 goes first, with the one list every contender can hold (10,000 hosts: the most
xdp-filter accepts). Then the list in xdpfw grows along the scale series (1 ... 1M entries of
the master list) and, at each size, the test-run cost (items 1, 5) and the live cost (items
2, 5) are measured; xdp-filter is measured at the same points with min(N, its maximum) hosts.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import progrun
from bench.lab import Pair, TrafficLab
from bench.lists import Entry, MasterList, pool_of
from bench.ours import CHUNK, Ours, entry_rules
from bench.profiles import Profile
from bench.rivals import IptablesIpset, NftSet, XdpFilter
from bench.sysutil import log, proc_status_kib, stats
from bench.traffic import live_prog_cost, perf_profile, throughput_window
from xdpfw.rules import Rule, RuleSpec

__all__ = ["run_dataplane"]


@contextlib.contextmanager
def _guard(res: dict[str, Any], stage: str) -> Iterator[None]:
    """Record a failed part in res["errors"] and go on with the rest."""
    try:
        yield
    except Exception as exc:
        import traceback

        log(f"{stage} failed: {exc!r}")
        res["errors"].append(
            {"stage": stage, "error": repr(exc), "traceback": traceback.format_exc()}
        )


@dataclass
class Contender:
    name: str
    pair: Pair
    setup: Callable[[], None]
    teardown: Callable[[], None]
    drops: Callable[[], int]


def run_dataplane(
    p: Profile,
    only: set[int],
    lab: TrafficLab,
    master: MasterList,
    res: dict[str, Any],
    perf: bool = False,
) -> None:
    t0 = time.perf_counter()
    log("loading xdpfw (bcc compile, default capacities)")
    with Ours(p.caps) as ours:
        res["setup"] = {
            "xdpfw_load_s": time.perf_counter() - t0,
            "xdpfw_rss_after_load_kib": proc_status_kib("self", "VmRSS"),
        }
        if 4 in only:
            log("item 4: the service's bulk add, in-process, plain and under cProfile")
            res.setdefault("4", {})["service_profile"] = _profile_service(ours, master, p)
            log("item 4: Datapath.add_rules of growing batches (one call each)")
            res["4"]["batches"] = _batches(ours, master, p)
        if not only & {1, 2, 3, 5}:
            return
        xf = XdpFilter(lab, lab.pairs["b"])
        empty_fd = progrun.empty_xdp_prog()
        try:
            _run(p, only, lab, master, res, ours, xf, empty_fd, perf)
        finally:
            os.close(empty_fd)
            xf.close()


def _run(
    p: Profile,
    only: set[int],
    lab: TrafficLab,
    master: MasterList,
    res: dict[str, Any],
    ours: Ours,
    xf: XdpFilter,
    empty_fd: int,
    perf: bool,
) -> None:
    log("loading xdp-filter (native) in the rx namespace")
    xf.load("native")
    xf.add_fixtures(progrun.V6_HIT, progrun.PORT)
    ours.add_fixtures(progrun.V6_HIT, progrun.PORT)
    xf_info = _xdp_filter_facts(p, xf, master)
    res["xdp_filter"] = xf_info
    xf_max = int(xf_info["capacity"]["max_entries"])

    if 1 in only or 5 in only:
        res.setdefault("1", {})["ablation"] = _ablation(p, ours, xf, empty_fd, master)
    if 3 in only:
        with _guard(res, "item 3"):
            res["3"] = _item3(p, lab, master, ours, xf, xf_max, perf)
    if 2 in only:
        with _guard(res, "item 2 (xdp-filter)"):
            res.setdefault("2", {})["xdp_filter"] = _xdp_filter_live(p, lab, master, xf, xf_max)

    test_points = set(p.rule_points if 1 in only else ()) | set(
        p.curve_points if 5 in only else ()
    )
    live_points = set(p.live_points if 2 in only else ()) | set(
        p.curve_points if 5 in only else ()
    )
    if 2 in only:
        live_points.add(xf_max if p.common_list >= xf_max else p.common_list)
    points = sorted(test_points | live_points)
    if not points:
        return
    fds = {"xdpfw": ours.prog_fd, "empty": empty_fd}
    series: list[dict[str, Any]] = []
    res["series"] = series
    pair = lab.pairs["a"]
    ours.attach(pair.rx_if, lab.rx_ns, "native")
    try:
        for n in points:
            add_s = ours.grow_list(master.take(n, ours.n_list))
            row: dict[str, Any] = {
                "rules": n,
                "grow_s": add_s,
                "rss_kib": proc_status_kib("self", "VmRSS"),
                "pool": MasterList.pool(n),
                "prefix_pool": MasterList.prefix_pool(n),
            }
            log(f"xdpfw holds {n:,} list entries (+{add_s:.1f}s)")
            if n in test_points:
                k = min(n, xf_max)
                xf.fill_ipv4(master.hosts_only(k))
                xfd = xf.prog_fd()
                try:
                    row["xdp_filter_rules"] = k
                    frames = dict(progrun.FRAMES)
                    if MasterList.prefix_pool(n):
                        frames["ipv4_prefix_hit"] = progrun.PREFIX_HIT_FRAME
                    row["test_run"] = progrun.measure(
                        {**fds, "xdp-filter": xfd}, frames, p.repeat, p.reps
                    )
                finally:
                    os.close(xfd)
            if n in live_points:
                row["live"] = live_prog_cost(
                    lab, pair, row["pool"], ours.prog_fd, p.warmup_s, p.live_window_s,
                    p.live_rounds, row["prefix_pool"],
                )
                if perf and n in (min(live_points), max(live_points)):
                    log(f"perf profile of xdpfw native with {n:,} entries")
                    row["perf"] = perf_profile(
                        lab, pair, row["pool"], p.warmup_s, p.live_window_s, row["prefix_pool"]
                    )
            if 4 in only and n >= 1000:  # after the traffic: the rules it hit have counts
                row["rule_counters"] = _rule_counters(ours, profiled=n == _nearest(
                    points, p.bulk_stage))
            series.append(row)
        if 3 in only and "3" in res:
            with _guard(res, "item 3 (xdpfw at the largest list)"):
                res["3"]["xdpfw_at_max"] = _ours_at_max(p, lab, ours, points[-1])
    finally:
        ours.detach()
    res["programs"] = {
        "xdpfw": progrun.prog_sizes(ours.prog_fd),
        "empty": progrun.prog_sizes(empty_fd),
    }
    fd = xf.prog_fd()
    try:
        res["programs"]["xdp-filter"] = progrun.prog_sizes(fd)
    finally:
        os.close(fd)


# --- xdp-filter facts ---------------------------------------------------------------------


def _xdp_filter_facts(p: Profile, xf: XdpFilter, master: MasterList) -> dict[str, Any]:
    """Its program, the largest list it accepts, and how fast its CLI adds addresses."""
    sample = master.hosts_only(min(p.cli_sample, len(master.hosts)))
    secs = xf.cli_sample(sample)
    fmt_ok = xf.check_format(sample[0])
    limit = xf.ipv4_max_entries()
    xf.fill_ipv4(master.hosts_only(min(limit, len(master.hosts))))
    return {
        "prog_name": xf.prog_name,
        "dispatcher": xf.dispatcher,
        "mode": xf.mode,
        "cli_add_s": stats(secs),
        "direct_fill_matches_cli": fmt_ok,
        "capacity": xf.capacity(),
    }


# --- ablation: what each part of xdpfw's program costs ------------------------------------


def _ablation(
    p: Profile, ours: Ours, xf: XdpFilter, empty_fd: int, master: MasterList
) -> list[dict[str, Any]]:
    """Test-run cost as tables become non-empty one by one (profiling without a PMU: this
    VM exposes no hardware counters, so `bpftool prog profile` and perf are unavailable)."""
    import ipaddress

    from xdpfw.rules import PortRange, Proto

    # The fixtures (IPv6 host, port rule) are in; take them out for the first stages.
    ours.dp.remove_rules([2, 3])
    host = Rule(id=4, src=ipaddress.IPv4Network(master.entry(0)))
    prefix = Rule(id=5, src=ipaddress.IPv4Network((0x0B000000, 24)))
    # In the hit frame's /24 (not covering it): the prefix hint sends that frame to the trie.
    near = Rule(id=6, src=ipaddress.IPv4Network((master.entry(0)[0] | 0x10, 28)))
    port = Rule(id=3, proto=Proto.TCP, dport=PortRange(progrun.PORT, progrun.PORT))
    v6 = Rule(id=2, src=ipaddress.IPv6Network(progrun.V6_HIT))
    frames = {k: progrun.FRAMES[k] for k in ("ipv4_hit", "ipv4_miss")}
    xf.fill_ipv4(master.hosts_only(1))
    stages: list[tuple[str, list[Rule]]] = [
        ("1 exact IPv4 host rule", [host]),
        ("+ 1 IPv4 prefix rule in another /24 (the hit reads a tbl24 cell: 0)", [prefix]),
        ("+ 1 IPv4 prefix rule in the hit's /24 (tbl24 cell, then its entry)", [near]),
        ("+ 1 tcp/22 rule (address-less table looked up)", [port]),
        ("+ 1 IPv6 host rule", [v6]),
    ]
    out: list[dict[str, Any]] = []
    refs = progrun.reference_progs(p.caps.max_rules)
    try:
        r = progrun.measure(
            {"empty": empty_fd, **refs}, {"ipv4_hit": frames["ipv4_hit"]}, p.repeat, p.reps
        )
        out.append({"stage": "reference programs", "result": r})
    finally:
        for fd in refs.values():
            os.close(fd)
    xfd = xf.prog_fd()
    try:
        for label, rules in stages:
            ours.dp.add_rules(rules)
            r = progrun.measure(
                {"xdpfw": ours.prog_fd, "xdp-filter": xfd, "empty": empty_fd},
                frames,
                p.repeat,
                p.reps,
            )
            out.append({"stage": label, "result": r})
    finally:
        os.close(xfd)
        ours.dp.remove_rules([4, 5, 6])
    return out


# --- item 3 -------------------------------------------------------------------------------


def _item3(
    p: Profile,
    lab: TrafficLab,
    master: MasterList,
    ours: Ours,
    xf: XdpFilter,
    xf_max: int,
    perf: bool,
) -> dict[str, Any]:
    size = min(p.common_list, xf_max)
    hosts = master.hosts_only(size)
    entries: list[Entry] = [(h, 32) for h in hosts]
    pool = pool_of(size)
    log(f"item 3: every contender holds the same {size:,} hosts; sources from {pool:,}")
    ours.grow_list(entries)
    xf.fill_ipv4(hosts)
    a, b = lab.pairs["a"], lab.pairs["b"]
    name = f"xbn_{os.getpid()}_t"
    nft = NftSet(lab, name, entries, ifname=a.rx_if, interval=False)
    ipt = IptablesIpset(lab, name, entries, ifname=a.rx_if, settype="hash:ip")

    def noop() -> None:
        pass

    def xf_mode(mode: str) -> Callable[[], None]:
        def go() -> None:
            if xf.mode != mode or not xf.loaded:
                xf.load(mode)

        return go

    contenders = [
        Contender("no filter", a, noop, noop, lab.udp_noports),
        Contender(
            "xdpfw native", a,
            lambda: _attach(ours, lab, a, "native"), ours.detach, ours.drops,
        ),
        Contender(
            "xdpfw generic", a,
            lambda: _attach(ours, lab, a, "generic"), ours.detach, ours.drops,
        ),
        Contender("xdp-filter native", b, xf_mode("native"), noop, xf.drops),
        Contender("xdp-filter skb", b, xf_mode("skb"), noop, xf.drops),
        Contender("nftables set", a, lambda: _void(nft.create()), nft.delete, nft.drops),
        Contender("iptables+ipset", a, ipt.add_rule, ipt.del_rule, ipt.drops),
    ]  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    try:
        ipt.create_set()
        for r in range(p.rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for c in order:
                with _contender(c):
                    runs[c.name].append(
                        throughput_window(lab, c.pair, pool, c.drops, p.warmup_s, p.tput_window_s)
                    )
            log(f"item 3 round {r + 1}/{p.rounds} done")
        if perf:
            profiles: dict[str, Any] = {}
            for c in contenders:
                log(f"item 3: perf profile of {c.name}")
                with _contender(c):
                    profiles[c.name] = perf_profile(
                        lab, c.pair, pool, p.warmup_s, p.tput_window_s
                    )
            res_perf = profiles
        else:
            res_perf = {}
    finally:
        with contextlib.suppress(Exception):
            nft.delete()
        ipt.destroy()
        xf.load("native")
        ours.clear_list()
    return {
        "list": {"hosts": size, "pool": pool, "nft_set": "hash (no interval flag)",
                 "ipset": "hash:ip"},
        "contenders": {name: _summary(rs) for name, rs in runs.items()},
        "perf": res_perf,
    }


def _attach(ours: Ours, lab: TrafficLab, pair: Pair, mode: str) -> None:
    took = ours.attach(pair.rx_if, lab.rx_ns, mode)
    if took != mode:
        raise RuntimeError(f"asked for {mode} XDP, the kernel attached {took}")


def _void(_: object) -> None:
    return None


@contextlib.contextmanager
def _contender(c: Contender) -> Iterator[None]:
    c.setup()
    try:
        yield
    finally:
        c.teardown()


def _summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pps": stats([r["pps"] for r in rs]),
        "rx_pps": stats([r["rx_pps"] for r in rs]),
        "dropped_share": stats([r["dropped_share"] for r in rs]),
        "rounds": rs,
    }


def _ours_at_max(p: Profile, lab: TrafficLab, ours: Ours, n: int) -> dict[str, Any]:
    """xdpfw's drop rate with the largest list of the series (not a rival comparison: no
    rival here holds that list; see item 4 for ipset and nft load times)."""
    a = lab.pairs["a"]
    pool, ppool = MasterList.pool(n), MasterList.prefix_pool(n)
    out: dict[str, Any] = {"rules": n, "pool": pool, "prefix_pool": ppool}
    for mode in ("native", "generic"):
        rs = []
        for _ in range(p.rounds):
            _attach(ours, lab, a, mode)
            try:
                rs.append(throughput_window(
                    lab, a, pool, ours.drops, p.warmup_s, p.tput_window_s, ppool
                ))
            finally:
                ours.detach()
        out[f"xdpfw {mode}"] = _summary(rs)
    ours.attach(a.rx_if, lab.rx_ns, "native")
    return out


def _xdp_filter_live(
    p: Profile, lab: TrafficLab, master: MasterList, xf: XdpFilter, xf_max: int
) -> dict[str, Any]:
    size = min(p.common_list, xf_max)
    xf.fill_ipv4(master.hosts_only(size))
    if xf.mode != "native":
        xf.load("native")
    fd = xf.prog_fd()
    try:
        live = live_prog_cost(
            lab, lab.pairs["b"], pool_of(size), fd, p.warmup_s, p.live_window_s, p.live_rounds
        )
    finally:
        os.close(fd)
    return {"rules": size, **live}


# --- the service's bulk path under cProfile (item 4's evidence) ---------------------------


def _remove_all(ours: Ours) -> None:
    ids = [r.id for r in ours.dp.rules()]
    for i in range(0, len(ids), CHUNK):
        ours.dp.remove_rules(ids[i : i + CHUNK])


def _nearest(points: list[int], want: int) -> int:
    return min(points, key=lambda n: (abs(n - want), n))


def _batches(ours: Ours, master: MasterList, p: Profile) -> list[dict[str, Any]]:
    """Datapath.add_rules of n mixed rules (n/8 prefixes) in one call, on an empty program:
    the compiler's planning cost against the batch size (then removed, in small calls)."""
    out = []
    for n in p.batch_points:
        rules = entry_rules(master.take(n), 1)
        t0 = time.perf_counter()
        ours.dp.add_rules(rules)
        secs = time.perf_counter() - t0
        out.append({"rules": n, "prefixes": n // 8, "seconds": secs})
        log(f"  one add_rules call of {n:,} rules: {secs:.1f} s")
        _remove_all(ours)
    return out


def _rule_counters(ours: Ours, profiled: bool) -> dict[str, Any]:
    """What GET /v1/stats?top=100 does below the web layer (Datapath.top_counters(100)),
    after the traffic of every list size so far: `hit` rules have counts to read and rank."""
    import statistics

    ids, _, _, last = ours.dp.counter_arrays()
    hit = int((last != 0).sum())
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ours.dp.top_counters(100)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"rules": len(ids), "hit": hit, "top100_s": statistics.median(times)}
    if profiled:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        ours.dp.top_counters(100)
        prof.disable()
        out["profile"] = _top(prof, time.perf_counter() - t0, n=10)
    return out


def _profile_service(ours: Ours, master: MasterList, p: Profile) -> dict[str, Any]:
    """FirewallService.bulk_add (the code behind POST /v1/rules/bulk) in-process on this
    Datapath, timed plainly and then under cProfile; the rules are removed afterwards."""
    from api.service import FirewallService, NewRule
    from api.store import Store

    lines = list(master.lines(p.profile_rules))
    out: dict[str, Any] = {"rules": len(lines)}
    for profiled in (False, True):
        with tempfile.TemporaryDirectory(prefix="xbn-prof-") as tmp:
            store = Store(Path(tmp) / "rules.sqlite3")
            try:
                prof = cProfile.Profile() if profiled else None
                t0 = time.perf_counter()
                if prof is not None:
                    prof.enable()
                items = [NewRule(RuleSpec.parse(src=line)) for line in lines]
                t1 = time.perf_counter()
                svc = FirewallService(ours.dp, store)
                svc.bulk_add(items)
                t2 = time.perf_counter()
                if prof is not None:
                    prof.disable()
                    out["profile"] = _top(prof, t2 - t0)
                else:
                    out["parse_s"] = t1 - t0
                    out["bulk_add_s"] = t2 - t1
                    out["per_rule_us"] = (t2 - t0) / len(lines) * 1e6
            finally:
                _remove_all(ours)
                store.close()
    return out


_KEY_FUNCS = (
    "parse",
    "bulk_add",
    "add_rules",
    "plan_add",
    "_apply",
    "_write_entries",
    "commit",
    "insert",
    "find_duplicate",
    "update_batch",
    "next_ids",
    "check_protected",
)


def _top(prof: cProfile.Profile, wall: float, n: int = 15) -> dict[str, Any]:
    st = pstats.Stats(prof)
    rows = []
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    for (file, line, func), (_cc, ncalls, tt, ct, _callers) in raw.items():
        short = f"{Path(file).parent.name}/{Path(file).name}:{line}({func})"
        rows.append({"func": short, "name": func, "calls": ncalls, "tottime_s": tt,
                     "cumtime_s": ct})
    by_tt = sorted(rows, key=lambda r: -r["tottime_s"])[:n]
    in_project = [
        r for r in rows
        if r["name"] in _KEY_FUNCS and ("xdpfw/" in r["func"] or "api/" in r["func"])
    ]
    by_ct = sorted(in_project, key=lambda r: -r["cumtime_s"])
    return {"wall_s_profiled": wall, "top_tottime": by_tt, "key_cumtime": by_ct}
