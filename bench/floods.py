"""Rate-limit rules (issue 16): what a limit rule costs per packet, whether a random-source
flood can wash one real abuser's budget out of the LRU, and (bench/floods_live.py) the same
limit under live traffic on the veth lab against nftables, and on two CPUs.

    sudo flock /work/tools/bench.lock .venv/bin/python -m bench.floods   # ~7 minutes
    sudo .venv/bin/python -m bench.floods --quick    # ~30 s (tests/test_bench_smoke.py)
    .venv/bin/python -m bench.floods --report bench/results/floods.json   # the tables again

The full run writes bench/results/floods.json. Under BPF_PROG_TEST_RUN, three programs are
loaded side by side: "plain" has no rules, "limits" holds the rules below, "percpu" the same
rules in the XDPFW_PERCPU_BUCKETS build;
every (frame, program) pair is measured `reps` times with `repeat` runs each, interleaved, and
the median of the kernel's own per-run average is reported (bench/progrun.py's method).

Frames (IPv4 UDP, 64 bytes, sources per case):
  miss     a source no rule names (the limit rules exist, the frame touches no bucket)
  within   a limit rule whose budget never runs out (10^9 pps): a bucket read and write
  over     a limit rule over its budget (1 pps): the bucket is read, the frame dropped
  banned   a limit rule with a ban in force: the ban is read, the frame dropped
  drop     an enforce drop rule (the cost of a plain blocklist hit, for comparison)

The flood: one abuser (a per-source limit of 100 pps, burst 10) sends one frame in every
`mix`, between frames from random sources of 11.0.0.0/8 (16M addresses: each new source
takes a bucket, so the LRU map of XDPFW_MAX_BUCKETS buckets churns). The abuser's passed
count is compared with what its budget allows over the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

from bench.floods_live import live_rules, report_live, run_live
from bench.sysutil import machine, stats
from xdpfw import abi
from xdpfw.compiler import Capacities
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.kernel import bpfsys
from xdpfw.rules import Limit, RuleSpec
from xdpfw.verify.frames import build_frame

__all__ = ["main", "run"]

RESULTS = Path(__file__).resolve().parent / "results" / "floods.json"
CAPS = Capacities(max_rules=8192, max_prefixes=4096, max_sets=512)
DST = "198.19.255.254"
SOURCES = {
    "miss": "10.9.9.9",
    "within": "10.1.0.1",
    "over": "10.2.0.1",
    "banned": "10.3.0.1",
    "drop": "10.4.0.1",
}
ABUSER = "11.0.0.1"
ABUSER_PPS, ABUSER_BURST = 100, 10
XDP_DROP, XDP_PASS = 1, 2


def _rules() -> list[Any]:
    def lim(rid: int, net: str, limit: Limit) -> Any:
        return RuleSpec.parse(action="limit", src=net, limit=limit).with_id(rid)

    return [
        lim(1, "10.1.0.0/16", Limit.parse(pps=10**9, burst=10**9)),
        lim(2, "10.2.0.0/16", Limit.parse(pps=1, burst=1)),
        lim(3, "10.3.0.0/16", Limit.parse(pps=1, burst=1, ban_seconds=3600)),
        RuleSpec.parse(src="10.4.0.0/16").with_id(4),
        lim(5, "11.0.0.0/8", Limit.parse(pps=ABUSER_PPS, burst=ABUSER_BURST)),
    ]


def _frame(src: str) -> bytes:
    return build_frame(src=src, dst=DST, proto="udp", dport=53, payload=bytes(22))


def _open(tag: str) -> Datapath:
    pins = Path(f"/sys/fs/bpf/xdpfw-bench-floods-{tag}-{os.getpid()}")
    return Datapath.open(DatapathConfig(bpffs_dir=pins, caps=CAPS))


def _open_percpu() -> Datapath:
    """The same program built with per-CPU buckets (loader variant XDPFW_PERCPU_BUCKETS),
    loaded but not pinned: only this benchmark uses it."""
    from xdpfw.datapath import pins
    from xdpfw.kernel import loader

    loaded = loader.load(CAPS, ("XDPFW_PERCPU_BUCKETS",))
    cfg = DatapathConfig(bpffs_dir=Path(f"/sys/fs/bpf/xdpfw-bench-floods-percpu-{os.getpid()}"),
                         caps=CAPS)
    dp = Datapath(cfg, loaded.prog_fd, pins.wrap_maps(loaded), CAPS, adopted=False)
    dp._writer.write_config()
    return dp


def cost(progs: dict[str, Datapath], repeat: int, reps: int) -> dict[str, Any]:
    frames = {k: _frame(v) for k, v in SOURCES.items()}
    # put the "over" and "banned" sources into their state first
    for pname, dp in progs.items():
        if pname == "plain":
            continue
        for name in ("over", "banned"):
            for _ in range(3):
                bpfsys.prog_test_run(dp.prog_fd, frames[name], 1)
    runs: dict[str, dict[str, list[float]]] = {p: {f: [] for f in frames} for p in progs}
    verdicts: dict[str, dict[str, int]] = {p: {} for p in progs if p != "plain"}
    for _ in range(reps):
        for fname, frame in frames.items():
            for pname, dp in progs.items():
                r = bpfsys.prog_test_run(dp.prog_fd, frame, repeat)
                runs[pname][fname].append(float(r.duration_ns))
                if pname != "plain":
                    verdicts[pname][fname] = r.retval
    want = {"miss": XDP_PASS, "within": XDP_PASS, "over": XDP_DROP, "banned": XDP_DROP,
            "drop": XDP_DROP}
    for pname, got in verdicts.items():
        assert got == want, (pname, got)
    limits = progs["limits"]
    c = limits.limit_counters()
    out: dict[str, Any] = {"repeat": repeat, "reps": reps, "frames": {}}
    for fname in frames:
        p, lim = stats(runs["plain"][fname]), stats(runs["limits"][fname])
        out["frames"][fname] = {
            "plain_ns": p, "limits_ns": lim,
            "extra_ns": round(lim["median"] - p["median"], 1),
        }
        if "percpu" in runs:
            out["frames"][fname]["percpu_ns"] = stats(runs["percpu"][fname])
    out["counters"] = {rid: vars(v) for rid, v in c.items()}
    return out


def flood(limits: Datapath, seconds: float, mix: int) -> dict[str, Any]:
    tpl = _frame("11.255.255.255")
    src_off = 14 + 12
    abuser = _frame(ABUSER)
    rng = random.Random(16)
    fd = limits.prog_fd
    sent = passed = others = 0
    t0 = time.monotonic()
    first = last = None
    n = 0
    while time.monotonic() - t0 < seconds:
        for _ in range(mix - 1):
            addr = struct.pack("!I", (11 << 24) | rng.randrange(1, 1 << 24))
            bpfsys.prog_test_run(fd, tpl[:src_off] + addr + tpl[src_off + 4 :], 1)
            others += 1
        t = time.monotonic()
        r = bpfsys.prog_test_run(fd, abuser, 1)
        first = t if first is None else first
        last = t
        sent += 1
        passed += r.retval == XDP_PASS
        n += mix
    span = (last or t0) - (first or t0)
    allowed = ABUSER_BURST + ABUSER_PPS * span
    buckets = sum(1 for _ in limits.map("xdpfw_buckets"))
    return {
        "seconds": round(span, 3),
        "frames": n,
        "random_sources": others,
        "abuser_sent": sent,
        "abuser_sent_pps": round(sent / span, 1) if span else 0,
        "abuser_passed": passed,
        "abuser_allowed": round(allowed, 1),
        "passed_over_allowed": round(passed / allowed, 3) if allowed else 0,
        "buckets_live": buckets,
        "bucket_capacity": abi.MAX_BUCKETS,
    }


def run(quick: bool = False) -> dict[str, Any]:
    plain, limits = _open("plain"), _open("limits")
    percpu = None
    try:
        percpu = _open_percpu()
        limits.add_rules(_rules() + live_rules())
        percpu.add_rules(_rules() + live_rules())
        progs = {"plain": plain, "limits": limits, "percpu": percpu}
        res: dict[str, Any] = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "kernel": os.uname().release,
            "machine": machine(),
            "cost": cost(progs, repeat=20_000 if quick else 200_000, reps=3 if quick else 7),
            "live": run_live("quick" if quick else "full", plain, limits, percpu),
            "flood": flood(limits, seconds=0.5 if quick else 6.0, mix=100),
        }
    finally:
        plain.close(cleanup=True)
        limits.close(cleanup=True)
        if percpu is not None:
            percpu.close()
    return res


def report(res: dict[str, Any]) -> str:
    lines = [
        "| frame | no rules (ns) | limit rules, shared buckets (ns) | extra (ns) |"
        " per-CPU buckets (ns) |",
        "|---|---|---|---|---|",
    ]
    for name, f in res["cost"]["frames"].items():
        pc = f.get("percpu_ns", {}).get("median")
        lines.append(f"| {name} | {f['plain_ns']['median']:.1f} | {f['limits_ns']['median']:.1f}"
                     f" | {f['extra_ns']:+.1f} | {'-' if pc is None else f'{pc:.1f}'} |")
    fl = res["flood"]
    lines += [
        "",
        f"flood: {fl['frames']:,} frames in {fl['seconds']} s, {fl['random_sources']:,} from "
        f"random sources; the abuser sent {fl['abuser_sent']} ({fl['abuser_sent_pps']} pps), "
        f"passed {fl['abuser_passed']} of {fl['abuser_allowed']} allowed "
        f"(ratio {fl['passed_over_allowed']}); {fl['buckets_live']:,} buckets live "
        f"(capacity {fl['bucket_capacity']:,})",
    ]
    if "live" in res:
        lines += ["", report_live(res["live"])]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floods", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", type=Path, metavar="FILE", help="print the tables of a results file")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    res = run(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
