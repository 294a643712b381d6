"""From a results dict: the targets (met or not, with the numbers), Markdown tables, the plot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot", "targets"]

COMPARABLE = frozenset({"ipv4_hit", "ipv4_miss", "ipv6_hit", "port_hit"})
RIVALS = ("xdp-filter native", "xdp-filter skb", "nftables set", "iptables+ipset", "no filter")
OURS = ("xdpfw native", "xdpfw generic")


def _series(res: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [r for r in res.get("series", []) if key in r]


def _med(x: dict[str, Any]) -> float:
    return float(x["ns"]["median"])


def _best(x: dict[str, Any]) -> float:
    """Fastest of the runs: other work on the machine only ever adds time."""
    return float(x["ns"]["min"])


def _pps_best(c: dict[str, Any]) -> float:
    """Highest of the windows: other work on the machine only ever takes throughput away."""
    return float(c["pps"]["max"])


def item1_rows(res: dict[str, Any], points: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """One row per (list size, frame): xdpfw and xdp-filter medians and their ratio."""
    want = set(points) if points is not None else None
    rows = []
    for r in _series(res, "test_run"):
        if want is not None and r["rules"] not in want:
            continue
        tr = r["test_run"]
        for frame, ours in tr["xdpfw"].items():
            xf = tr["xdp-filter"][frame]
            empty = _best(tr["empty"][frame])
            o, x = _best(ours), _best(xf)
            if frame not in COMPARABLE:  # xdp-filter holds no prefixes: no ratio
                rows.append({
                    "rules": r["rules"], "xdp_filter_rules": r.get("xdp_filter_rules"),
                    "frame": frame, "xdpfw_ns": o, "xdp_filter_ns": None, "empty_ns": empty,
                    "ratio": None, "ratio_median": None, "ratio_net": None,
                    "verdicts_ok": bool(ours["verdict_ok"]),
                })
                continue
            rows.append({
                "rules": r["rules"],
                "xdp_filter_rules": r.get("xdp_filter_rules"),
                "frame": frame,
                "xdpfw_ns": o,
                "xdp_filter_ns": x,
                "empty_ns": empty,
                "ratio": o / x if x else None,
                "ratio_median": _med(ours) / _med(xf) if _med(xf) else None,
                "ratio_net": (o - empty) / (x - empty) if x > empty else None,
                "verdicts_ok": bool(ours["verdict_ok"] and xf["verdict_ok"]),
            })
    return rows


def _src(lv: dict[str, Any]) -> str:
    pp = lv.get("prefix_pool") or 0
    return f"{lv['pool']:,} hosts" + (f" + {pp} /24s" if pp else "")


def _live(res: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["rules"]: r["live"] for r in _series(res, "live")}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = res.get("config", {})
    out: list[dict[str, Any]] = []

    def add(tid: str, text: str, value: float | None, bar: str, met: bool | None,
            detail: str) -> None:
        out.append({"id": tid, "target": text, "value": value, "bar": bar, "met": met,
                    "detail": detail})

    rows = [r for r in item1_rows(res, cfg.get("rule_points")) if r["ratio"] is not None]
    if rows:
        worst = max(rows, key=lambda r: r["ratio"] or 0)
        add("1", "test-run ns/packet, xdpfw / xdp-filter, every rule count and frame",
            worst["ratio"], "<= 1.0", worst["ratio"] is not None and worst["ratio"] <= 1.0,
            f"worst: {worst['frame']} with {worst['rules']:,} rules "
            f"({worst['xdpfw_ns']:.0f} vs {worst['xdp_filter_ns']:.0f} ns; "
            f"ratio of medians {_fmt(worst['ratio_median'])})")
    live = _live(res)
    pts = sorted(set(cfg.get("live_points", [])) & set(live))
    if 1000 in live and pts and pts[-1] > 1000:
        big = pts[-1]
        a, b = live[1000]["ns_per_packet"], live[big]["ns_per_packet"]
        ratio = b / a if a and b else None
        meds = [live[n].get("ns_per_packet_stats", {}).get("median") for n in (1000, big)]
        medtxt = f"; ratio of medians {meds[1] / meds[0]:.2f}" if all(meds) else ""
        add("2", f"live ns/packet, xdpfw {big:,} / xdpfw 1,000 entries", ratio, "<= 1.5",
            ratio is not None and ratio <= 1.5,
            f"{b:.0f} vs {a:.0f} ns (sources: {_src(live[big])} vs {_src(live[1000])})"
            + medtxt)
    c3 = res.get("3", {}).get("contenders", {})
    if c3:
        ours = {k: _pps_best(c3[k]) for k in OURS if k in c3}
        rivals = {k: _pps_best(c3[k]) for k in RIVALS if k in c3}
        if ours and rivals:
            best_ours = max(ours, key=lambda k: ours[k])
            best_rival = max(rivals, key=lambda k: rivals[k])
            ratio = ours[best_ours] / rivals[best_rival]
            med = {k: c3[k]["pps"]["median"] for k in (best_ours, best_rival)}
            add("3", "drop pps, faster xdpfw mode / fastest rival", ratio, ">= 1.0",
                ratio >= 1.0,
                f"{best_ours} {ours[best_ours] / 1e3:.0f} kpps vs {best_rival} "
                f"{rivals[best_rival] / 1e3:.0f} kpps (medians: {med[best_ours] / 1e3:.0f} vs "
                f"{med[best_rival] / 1e3:.0f})")
    r4 = res.get("4", {})
    if "bulk_total_s" in r4 and "ipset_restore_s" in r4:
        ratio = r4["bulk_total_s"] / r4["ipset_restore_s"]
        add("4a", f"bulk load of {r4['list']['entries']:,} entries, xdpfw / ipset restore",
            ratio, "<= 0.5", ratio <= 0.5,
            f"{r4['bulk_total_s']:.1f} s vs {r4['ipset_restore_s']:.1f} s")
    if r4.get("replace_s") is not None and r4.get("ipset_replace_s"):
        ratio = r4["replace_s"] / r4["ipset_replace_s"]
        ch = r4.get("replace", {})
        add("4e", f"replace a {r4['list']['entries']:,}-entry source with 1% changed, "
            "xdpfw PUT / ipset restore + swap", ratio, "<= 0.1", ratio <= 0.1,
            f"{r4['replace_s']:.1f} s vs {r4['ipset_replace_s']:.1f} s "
            f"(+{ch.get('added', 0):,} -{ch.get('removed', 0):,} ={ch.get('unchanged', 0):,})")
    if r4.get("restart_s") is not None:
        add("4f", f"restart with {r4.get('rules_after_restart') or 0:,} pinned rules",
            r4["restart_s"], "<= 10 s", r4["restart_s"] <= 10, "exec -> healthy")
    if "add_ms" in r4:
        p99 = r4["add_ms"]["p99"]
        add("4b", f"single-rule add p99 ({r4.get('stage_rules', 0):,} rules)", p99, "<= 10 ms",
            p99 <= 10, f"p50 {r4['add_ms']['median']:.1f} ms")
    if "stats_top100_ms" in r4:
        med = r4["stats_top100_ms"]["median"]
        add("4c", f"/v1/stats?top=100 median ({r4.get('stage_rules', 0):,} rules)", med,
            "<= 20 ms", med <= 20, f"p99 {r4['stats_top100_ms']['p99']:.1f} ms")
    if "rss_full" in r4:
        mb = r4["rss_full"]["rss_kib"] / 1024
        add("4d", f"service RSS with {r4['list']['entries']:,} rules", mb, "<= 400 MB",
            mb <= 400, f"peak (VmHWM) {r4['rss_full']['hwm_kib'] / 1024:.0f} MB")
    return out


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    cfg = res.get("config", {})
    lines: list[str] = []
    ts = targets(res)
    if ts:
        lines += ["| target | value | bar | met | detail |", "|---|---|---|---|---|"]
        for t in ts:
            met = {True: "**met**", False: "**missed**", None: "n/a"}[t["met"]]
            lines.append(f"| ({t['id']}) {t['target']} | {_fmt(t['value'])} | {t['bar']} | "
                         f"{met} | {t['detail']} |")
        lines.append("")
    rows = item1_rows(res)
    if rows:
        lines += [
            "Item 1/5 - BPF_PROG_TEST_RUN, ns/packet, best of "
            f"{cfg.get('reps', '?')} runs of {cfg.get('repeat', '?'):,} repeats:",
            "",
            "| rules xdpfw | rules xdp-filter | frame | xdpfw | xdp-filter | ratio "
            "| ratio of medians | ratio minus empty prog |",
            "|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            xf = "(no prefixes)" if r["xdp_filter_ns"] is None else f"{r['xdp_filter_ns']:.0f}"
            lines.append(
                f"| {r['rules']:,} | {r['xdp_filter_rules']:,} | {r['frame']} | "
                f"{r['xdpfw_ns']:.0f} | {xf} | {_fmt(r['ratio'])} | "
                f"{_fmt(r['ratio_median'])} | {_fmt(r['ratio_net'])} |"
            )
        empties = [r["empty_ns"] for r in rows]
        lines += ["", f"Empty XDP program (harness overhead): {min(empties):.0f}-"
                  f"{max(empties):.0f} ns.", ""]
    abl = res.get("1", {}).get("ablation", [])
    if abl:
        lines += ["Where the time goes (test runs, best ns/packet; xdpfw's list empty but for "
                  "the rules named):", "", "| stage | program | ipv4_hit | ipv4_miss |",
                  "|---|---|---:|---:|"]
        for st in abl:
            for prog, frames in st["result"].items():
                hit = frames.get("ipv4_hit")
                miss = frames.get("ipv4_miss")
                h = _fmt(_best(hit) if hit else None, ".0f")
                m = _fmt(_best(miss) if miss else None, ".0f")
                lines.append(f"| {st['stage']} | {prog} | {h} | {m} |")
        lines.append("")
    live = _live(res)
    xfl = res.get("2", {}).get("xdp_filter")
    if live:
        lines += ["Item 2/5 - live traffic, run_time_ns / run_cnt of the attached program "
                  f"(native XDP), best and median of {cfg.get('live_rounds', 1)} windows of "
                  f"{cfg.get('live_window_s', '?')} s:", "",
                  "| program | list entries | distinct sources | ns/packet | median | rx kpps |",
                  "|---|---:|---:|---:|---:|---:|"]
        for who, n, lv in [*(("xdpfw", n, lv) for n, lv in sorted(live.items())),
                           *((("xdp-filter", xfl["rules"], xfl),) if xfl else ())]:
            med = lv.get("ns_per_packet_stats", {}).get("median")
            src = f"{lv['pool']:,}" + (f" + {lv['prefix_pool']} /24s" if lv.get("prefix_pool")
                                       else "")
            lines.append(f"| {who} | {n:,} | {src} | "
                         f"{_fmt(lv['ns_per_packet'], '.0f')} | {_fmt(med, '.0f')} | "
                         f"{lv['rx_pps'] / 1e3:.0f} |")
        lines.append("")
    r3 = res.get("3", {})
    if r3.get("contenders"):
        lst = r3["list"]
        lines += [f"Item 3 - drop throughput, {lst['hosts']:,} hosts in every filter, "
                  f"{lst['pool']:,} random sources, {cfg.get('rounds', '?')} rounds of "
                  f"{cfg.get('tput_window_s', '?')} s:", "",
                  "| contender | kpps dropped, best | median | min | dropped share |",
                  "|---|---:|---:|---:|---:|"]
        for name, c in sorted(r3["contenders"].items(), key=lambda kv: -_pps_best(kv[1])):
            pps = c["pps"]
            lines.append(f"| {name} | {pps['max'] / 1e3:.0f} | {pps['median'] / 1e3:.0f} | "
                         f"{pps['min'] / 1e3:.0f} | "
                         f"{c['dropped_share']['median'] * 100:.1f}% |")
        big = r3.get("xdpfw_at_max")
        if big:
            for mode in ("xdpfw native", "xdpfw generic"):
                if mode in big:
                    pps = big[mode]["pps"]
                    lines.append(f"| {mode}, {big['rules']:,} entries, sources {big['pool']:,} "
                                 f"hosts + {big.get('prefix_pool', 0)} /24s "
                                 f"| {pps['max'] / 1e3:.0f} | {pps['median'] / 1e3:.0f} | "
                                 f"{pps['min'] / 1e3:.0f} | "
                                 f"{big[mode]['dropped_share']['median'] * 100:.1f}% |")
        lines.append("")
    r4 = res.get("4", {})
    if "bulk_total_s" in r4:
        n = r4["list"]["entries"]
        lines += [f"Item 4 - control plane ({n:,} entries, {r4['list']['prefixes']:,} of them "
                  "prefixes):", "", "| measure | value |", "|---|---:|"]
        rows4 = [
            (f"xdpfw import (CLI -> POST /v1/rules/bulk), {n:,} entries",
             f"{r4['bulk_total_s']:.1f} s"),
            (f"ipset restore (hash:net), {n:,} entries", f"{r4['ipset_restore_s']:.1f} s"),
            (f"nft -f (interval set), {n:,} entries", f"{r4['nft_f_s']:.1f} s"),
            ("single add p50 / p99 (sequential)",
             f"{r4['add_ms']['median']:.1f} / {r4['add_ms']['p99']:.1f} ms"),
            ("single adds per second: 1 client / 4 clients",
             f"{r4['add_per_s_sequential']:.0f} / {r4['add_per_s_4_clients']:.0f}"),
            (f"/v1/stats?top=100 p50 / p99, {r4['stage_rules']:,} rules",
             f"{r4['stats_top100_ms']['median']:.1f} / {r4['stats_top100_ms']['p99']:.1f} ms"),
            (f"/metrics p50, {r4['stage_rules']:,} rules", f"{r4['metrics_ms']['median']:.0f} ms"),
            (f"/v1/stats?top=100 p50, {n:,} rules",
             f"{r4['stats_top100_ms_full']['median']:.0f} ms"),
            (f"/metrics, {n:,} rules", f"{r4['metrics_ms_full']['median'] / 1e3:.1f} s"),
            (f"service RSS (peak) with {n:,} rules",
             f"{r4['rss_full']['rss_kib'] / 1024:.0f} ({r4['rss_full']['hwm_kib'] / 1024:.0f}) MB"),
            ("service RSS, no rules", f"{r4['rss_empty']['rss_kib'] / 1024:.0f} MB"),
            ("start-up (exec -> compiled, attached, healthy)", f"{r4['startup_s']:.1f} s"),
        ]
        if r4.get("replace_s") is not None:
            rows4.append((f"PUT /v1/sources/bench, {n:,} entries, 1% changed",
                          f"{r4['replace_s']:.1f} s"))
        if r4.get("ipset_replace_s") is not None:
            rows4.append(("ipset restore of the changed set + swap + destroy",
                          f"{r4['ipset_replace_s']:.1f} s"))
        if "restart_s_stage" in r4:
            rows4.append((f"stop / restart with {r4.get('rules_after_restart_stage') or 0:,} "
                          "pinned rules", f"{r4['stop_s_stage']:.1f} / "
                          f"{r4['restart_s_stage']:.1f} s"))
        if r4.get("restart_s") is not None:
            rows4.append((f"stop / restart with {r4.get('rules_after_restart') or n:,} pinned "
                          "rules", f"{r4['stop_s']:.1f} / {r4['restart_s']:.1f} s"))
        elif r4.get("restart_timed_out"):
            rows4.append((f"stop / restart with all {n:,}+ rules pinned",
                          f"{r4['stop_s']:.1f} s / not healthy after "
                          f"{r4['restart_timeout_s']:.0f} s (killed after "
                          f"{r4.get('restart_cpu_s_at_timeout', 0):.0f} s of CPU)"))
        for b in r4.get("batches", []):
            rows4.append((f"Datapath.add_rules, one call of {b['rules']:,} rules "
                          f"({b['prefixes']:,} prefixes)", f"{b['seconds']:.1f} s"))
        sp = r4.get("service_profile", {})
        if "per_rule_us" in sp:
            rows4.append((f"FirewallService.bulk_add in-process, {sp['rules']:,} rules "
                          "(parse + plan + SQLite + maps)", f"{sp['per_rule_us']:.0f} us/rule"))
        for r in _series(res, "rule_counters"):
            rc = r["rule_counters"]
            if "top100_s" not in rc:  # results from before top_counters
                continue
            rows4.append((f"Datapath.top_counters(100), {rc['rules']:,} rules, {rc['hit']:,} of "
                          "them hit by traffic (in-process)", f"{rc['top100_s'] * 1e3:.1f} ms"))
        xfc = res.get("xdp_filter", {}).get("cli_add_s")
        if xfc and xfc.get("n"):
            rows4.append(("xdp-filter ip ADDR (one CLI call per address), median",
                          f"{xfc['median'] * 1e3:.1f} ms"))
        lines += [f"| {a} | {b} |" for a, b in rows4]
        lines.append("")
        bp = r4.get("bulk_path", {})
        if bp.get("steps_s"):
            base = r4.get("ipset_restore_s")
            lines += [f"The bulk path step by step, {bp['entries']:,} entries in one "
                      "FirewallService.bulk_add_codes call (in process):", "",
                      "| step | s | us/entry | x ipset restore |", "|---|---:|---:|---:|"]
            for step, secs in bp["steps_s"].items():
                ratio = f"{secs / base:.2f}" if base else "-"
                lines.append(f"| {step} | {secs:.2f} | {secs / bp['entries'] * 1e6:.2f} | "
                             f"{ratio} |")
            lines.append("")
            lines += ["SQLite, the same rows three ways (one transaction each):", "",
                      "| layout | s |", "|---|---:|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in bp.get("sqlite", {}).items()]
            pa = bp.get("paths", {})
            if "add_codes_s" in pa:
                lines += ["", f"| Datapath entry point, {pa['entries']:,} entries | s |",
                          "|---|---:|",
                          f"| add_rules (Rule objects, general planner) | "
                          f"{pa['add_rules_s']:.2f} |",
                          f"| add_codes (columns) | {pa['add_codes_s']:.2f} |"]
            lines.append("")
        top = sp.get("profile", {}).get("top_tottime", [])[:8]
        if top:
            lines += [f"cProfile of FirewallService.bulk_add ({sp['rules']:,} rules), by own "
                      "time:", "", "| function | calls | own s | cumulative s |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{t['func']}` | {t['calls']:,} | {t['tottime_s']:.2f} | "
                      f"{t['cumtime_s']:.2f} |" for t in top]
            lines.append("")
    perf3 = res.get("3", {}).get("perf") or {}
    perf_series = [(f"xdpfw native, {r['rules']:,} entries, {r['pool']:,} sources", r["perf"])
                   for r in _series(res, "perf")]
    if perf3 or perf_series:
        lines += ["perf (cpu-clock) under traffic, top symbols as a share of the sending and "
                  "filtering CPU's samples:", "", "| contender | top symbols |", "|---|---|"]
        for name, rows_ in [*perf3.items(), *perf_series]:
            syms = ", ".join(f"{x['sym']} {x['share'] * 100:.0f}%" for x in rows_[:6])
            lines.append(f"| {name} | {syms} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path:
    """The scale curve: test-run and live ns/packet against list size (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.6))
    rows = item1_rows(res)
    frames = sorted({r["frame"] for r in rows})
    for i, frame in enumerate(frames):
        fr = sorted((r for r in rows if r["frame"] == frame), key=lambda r: r["rules"])
        xs = [r["rules"] for r in fr]
        color = f"C{i}"
        ax1.plot(xs, [r["xdpfw_ns"] for r in fr], "o-", color=color, label=f"xdpfw {frame}")
        if frame in COMPARABLE:
            ax1.plot(xs, [r["xdp_filter_ns"] for r in fr], "x--", color=color, alpha=0.7,
                     label=f"xdp-filter {frame}")
    if rows:
        empty = sorted({r["rules"]: r["empty_ns"] for r in rows}.items())
        ax1.plot([a for a, _ in empty], [b for _, b in empty], ":", color="grey",
                 label="empty program (harness)")
    ax1.set_xscale("log")
    ax1.set_xlabel("entries in the list (xdp-filter: at most 10,000)")
    ax1.set_ylabel("ns per packet (BPF_PROG_TEST_RUN)")
    ax1.set_title("One frame repeated")
    ax1.set_ylim(bottom=0)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    live = _live(res)
    if live:
        xs = sorted(live)
        ax2.plot(xs, [live[x]["ns_per_packet"] for x in xs], "o-", label="xdpfw (native)")
        for x in xs:
            pp = live[x].get("prefix_pool") or 0
            ax2.annotate(f"{live[x]['pool']:,}" + (f"+{pp}/24" if pp else "") + " src",
                         (x, live[x]["ns_per_packet"]),
                         textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    xfl = res.get("2", {}).get("xdp_filter")
    if xfl and xfl.get("ns_per_packet"):
        ax2.plot([xfl["rules"]], [xfl["ns_per_packet"]], "s", color="C3",
                 label=f"xdp-filter, its maximum list ({xfl['pool']:,} src)")
    ax2.set_xscale("log")
    ax2.set_xlabel("entries in the list")
    ax2.set_ylabel("ns per packet (run_time_ns / run_cnt)")
    ax2.set_title("Live traffic, random sources from the list")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    m = res.get("machine", {})
    fig.suptitle(f"xdpfw scale curve - {m.get('cpu_model', '?')}, Linux {m.get('kernel', '?')}, "
                 f"{m.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
