"""The command: run the selected items, write the results JSON, print the Markdown tables."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.profiles import PROFILES, Profile
from bench.sysutil import log, machine, sigterm_as_interrupt

__all__ = ["main"]

SCHEMA = 1
REPO = Path(__file__).resolve().parent.parent
DOCS_PLOT = REPO / "docs" / "bench-scale.png"
TOOLS = ("ip", "nsenter", "unshare", "xdp-filter", "trafgen", "nft", "ipset", "iptables")

EPILOG = """examples:
  sudo make bench                                  # the full run (about 20 minutes)
  .venv/bin/python -m bench --quick                # minutes, smaller sizes
  .venv/bin/python -m bench --only 1,5 --out /tmp/r.json
  .venv/bin/python -m bench --report bench/results/full.json   # tables (and plot) again
  .venv/bin/python -m bench --cleanup              # remove what a killed run left behind

Everything it creates (namespaces, veths, XDP attachments, pins, nft tables, ipsets,
iptables rules, a server process) is named after its pid and removed on exit, Ctrl-C
included. Traffic never leaves its own namespaces.
"""


def _only(text: str) -> set[int]:
    try:
        items = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 1,2,3") from None
    if not items or not items <= {1, 2, 3, 4, 5}:
        raise argparse.ArgumentTypeError(f"{text!r}: items are 1-5")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark xdpfw against xdp-filter, nftables, iptables+ipset and no filter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the test suite)")
    p.add_argument("--only", type=_only, default={1, 2, 3, 4, 5}, metavar="1,2,3,4,5",
                   help="items to run (default all)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="results JSON (default bench/results/<profile>-<time>.json)")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help=f"scale curve (default {DOCS_PLOT.relative_to(REPO)} for the full run, "
                        "next to the results otherwise)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--perf", action="store_true",
                   help="also sample the kernel with perf (cpu-clock) under traffic (items 2, 3)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="print the tables of an existing results file (with --plot: plot it)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove leftovers of killed runs, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench import report

    if args.report is not None:
        res = json.loads(args.report.read_text())
        print(report.markdown(res))
        if args.plot is not None:
            print(f"plot: {report.plot(res, args.plot)}", file=sys.stderr)
        return 0
    if os.geteuid() != 0:
        print("python -m bench: needs root (namespaces, XDP, bpf)", file=sys.stderr)
        return 2
    missing = [t for t in (*TOOLS, *(["perf"] if args.perf else [])) if shutil.which(t) is None]
    if missing:
        print(f"python -m bench: missing {', '.join(missing)}; run `make setup` "
              "(scripts/setup.sh installs xdp-tools, netsniff-ng, nftables, ipset, iptables)",
              file=sys.stderr)
        return 2
    from bench.lab import cleanup_stale

    cleanup_stale()
    if args.cleanup:
        return 0
    prof = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or REPO / "bench" / "results" / f"{prof.name}-{stamp}.json"
    plot_path: Path | None = None
    if not args.no_plot:
        plot_path = args.plot or (DOCS_PLOT if prof.name == "full" else out.with_suffix(".png"))
    res = _run(prof, args.only, argv if argv is not None else sys.argv[1:], out, args.perf)
    res["targets"] = report.targets(res)
    if plot_path is not None and res.get("series"):
        try:
            res["plot"] = str(report.plot(res, plot_path))
        except Exception as exc:  # a plot must not lose the numbers
            res["errors"].append({"stage": "plot", "error": repr(exc)})
    _write(out, res)
    print(report.markdown(res))
    for err in res["errors"]:
        print(f"error in {err['stage']}: {err['error']}", file=sys.stderr)
    log(f"results: {out} ({res['duration_s']:.0f} s)")
    if res.get("interrupted"):
        return 130
    return 1 if res["errors"] else 0


def _write(out: Path, res: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    tmp.replace(out)


def _run(
    prof: Profile, only: set[int], argv: list[str], out: Path, perf: bool
) -> dict[str, Any]:
    from bench.control import run_control
    from bench.dataplane import run_dataplane
    from bench.lab import TrafficLab
    from bench.lists import MasterList

    t0 = time.monotonic()
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "profile": prof.name,
        "items": sorted(only),
        "command": "python -m bench " + shlex.join(argv),
        "machine": machine(),
        "config": prof.as_dict(),
        "errors": [],
        "timings_s": {},
    }
    log(f"profile {prof.name}, items {sorted(only)}, results to {out}")
    try:
        with sigterm_as_interrupt():
            t = time.monotonic()
            size = max(prof.max_rules, prof.bulk_total if 4 in only else 0, 12_000)
            master = MasterList(size)
            res["list"] = {"master_entries": size, "seed": master.seed}
            res["timings_s"]["list"] = time.monotonic() - t
            with TrafficLab() as lab:

                def dataplane() -> None:
                    run_dataplane(prof, only, lab, master, res, perf)

                def control() -> None:
                    if 4 in only:
                        run_control(prof, lab, master, res)

                stages: tuple[tuple[str, Callable[[], None]], ...] = (
                    ("dataplane", dataplane),
                    ("control", control),
                )
                for stage, fn in stages:
                    t = time.monotonic()
                    try:
                        fn()
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as exc:
                        log(f"{stage} failed: {exc!r}")
                        res["errors"].append({"stage": stage, "error": repr(exc),
                                              "traceback": traceback.format_exc()})
                    res["timings_s"][stage] = time.monotonic() - t
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'Ctrl-C'}): everything was cleaned up; partial results kept")
        res["interrupted"] = True
    res["duration_s"] = time.monotonic() - t0
    res["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return res
