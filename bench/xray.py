"""X-ray's per-packet cost: BPF_PROG_TEST_RUN, today's program (before X-ray) against this one.

    sudo .venv/bin/python -m bench.xray [--base REV] [--repeat N] [--reps N] [--out FILE]

Programs, each with the same one drop rule (src 198.18.0.1, a host entry) and the same caps:
- `base`: bpf/ of git revision REV (default: the merge base with main, the program before
  X-ray), compiled by bcc in a child process from `git show` copies;
- `off`: this program, no rule sampled (the flag is 0: one array read on a hit);
- `other`: this program, another rule sampled (the flag is on: a hash lookup on every hit);
- `capped`: this rule sampled with the cap exhausted (lookup, counter, token refused);
- `on`: this rule sampled, every frame written to the ring (the ring is drained between runs,
  and `repeat` stays below its capacity, so every run writes records).

Frames: an IPv4 hit, an IPv4 miss, an IPv6 miss. Each (frame, program) pair runs `reps` times,
programs interleaved, medians reported (the kernel's own per-run average: time the CPU spent
on other tasks of this shared machine is left out). The goal: `off` within 2 ns of `base`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.sysutil import stats
from xdpfw import abi
from xdpfw.compiler import Capacities
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.kernel import bpfsys
from xdpfw.rules import RuleSpec
from xdpfw.verify.frames import build_frame

__all__ = ["FRAMES", "main", "measure"]

ROOT = Path(__file__).resolve().parent.parent
CAPS = Capacities(max_rules=65536, max_prefixes=16384, max_sets=1024)
HIT, OTHER = "198.18.0.1", "198.18.0.2"
FRAMES = {
    "ipv4_hit": build_frame(src=HIT, dst="198.19.255.254", proto="udp", dport=9),
    "ipv4_miss": build_frame(src="198.51.100.7", dst="198.19.255.254", proto="udp", dport=9),
    "ipv6_miss": build_frame(src="2001:db8:1::5", dst="2001:db8:ffff::1", proto="udp", dport=9),
}

_CHILD = r"""
import os, sys
from pathlib import Path
from xdpfw.kernel import bpfsys
from xdpfw.kernel.loader import load_source
src, pin, *cflags = sys.argv[1:]
maps = ("xdpfw_src4", "xdpfw_config")
p = load_source(Path(src), "xdpfw_prog", cflags, maps)
assert set(p.map_fds) == set(maps), f"{src} lacks {set(maps) - set(p.map_fds)}"
os.makedirs(pin, exist_ok=True)
bpfsys.obj_pin(p.prog_fd, pin + "/prog")
for name, fd in p.map_fds.items():
    bpfsys.obj_pin(fd, pin + "/" + name)
"""


def _merge_base() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
                          capture_output=True, text=True, check=True).stdout.strip()


def load_base(rev: str, work: Path) -> int:
    """bpf/ of `rev`, compiled and loaded with one drop rule on HIT; its program fd."""
    src = work / "src"
    src.mkdir()
    for name in ("xdp_filter.c", "xdpfw_abi.h"):
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:bpf/{name}"],
                              capture_output=True, check=True).stdout
        (src / name).write_bytes(blob)
    pin = Path("/sys/fs/bpf") / f"xdpfw-bench-xray-{os.getpid()}"
    flags = [f"-I{src}", f"-DXDPFW_MAX_RULES={CAPS.max_rules}",
             f"-DXDPFW_MAX_PREFIXES={CAPS.max_prefixes}", f"-DXDPFW_MAX_SETS={CAPS.max_sets}",
             "-Wno-unused-function"]
    subprocess.run([sys.executable, "-c", _CHILD, str(src / "xdp_filter.c"), str(pin), *flags],
                   check=True, cwd=ROOT)
    try:
        prog = bpfsys.obj_get(str(pin / "prog"))
        with bpfsys.Map.from_pin(str(pin / "xdpfw_src4"), ctypes.c_uint32, abi.Entry) as src4, \
                bpfsys.Map.from_pin(str(pin / "xdpfw_config"), ctypes.c_uint32,
                                    abi.Config) as conf:
            # The slot, entry and config layouts are the same in both ABIs (X-ray added maps).
            rule = RuleSpec.parse(src=HIT).with_id(1)
            slot = abi.Slot(rank=rule.rank(), rule_id=1, verdict=abi.VERDICT_DROP, counter=1)
            addr = int.from_bytes(bytes(map(int, HIT.split("."))), "little")
            src4.update(ctypes.c_uint32(addr), abi.Entry(first=slot))
            c = abi.Config(abi_version=3, max_rules=CAPS.max_rules,
                           max_prefixes=CAPS.max_prefixes, max_sets=CAPS.max_sets)
            c.n_entries[abi.Table.SRC4] = 1
            conf.update(ctypes.c_uint32(0), c)
    finally:
        for p in pin.glob("*"):
            p.unlink()
        pin.rmdir()
    return prog


def measure(repeat: int, reps: int, base_rev: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xdpfw-bench-xray-") as tmp:
        base_fd = load_base(base_rev, Path(tmp))
    pin = Path("/sys/fs/bpf") / f"xdpfw-bench-xray-new-{os.getpid()}"
    dp = Datapath.open(DatapathConfig(bpffs_dir=pin, caps=CAPS))
    try:
        dp.add_rules([RuleSpec.parse(src=HIT).with_id(1), RuleSpec.parse(src=OTHER).with_id(2)])
        ring = dp.sample_ring()

        def sampling(every: dict[int, int | None],
                     max_pps: int | None = None) -> Callable[[], None]:
            def setup() -> None:
                dp.sample_set(every)
                if max_pps is not None:
                    dp.sample_configure(max_pps, 128)
            return setup

        # every mode: (setup, drain the ring after each run)
        modes: dict[str, tuple[Callable[[], None], bool]] = {
            "base": (lambda: None, False),
            "off": (sampling({1: None, 2: None}), False),
            "other": (sampling({1: None, 2: 1}, 10_000_000), False),
            "capped": (sampling({1: 1, 2: None}, 1), False),
            "on": (sampling({1: 1, 2: None}, 10_000_000), True),
        }
        runs: dict[str, dict[str, list[float]]] = {m: {f: [] for f in FRAMES} for m in modes}
        rets: dict[str, dict[str, int]] = {m: {} for m in modes}

        def run(mode: str, fd: int, fname: str, drain: bool) -> None:
            n = min(repeat, 4000) if drain else repeat  # below the ring's capacity
            r = bpfsys.prog_test_run(fd, FRAMES[fname], n)
            if drain:
                ring.drain(lambda _raw: None)
            runs[mode][fname].append(float(r.duration_ns))
            rets[mode][fname] = r.retval

        # A map write (the setup of a mode) between two runs slows the next run down (caches,
        # RCU): each mode is set up once per round and warmed up before it is measured, and
        # `base` is measured inside the `off` block, interleaved with it frame by frame.
        for _ in range(reps):
            for mode, (setup, drain) in modes.items():
                if mode == "base":
                    continue
                setup()
                for frame in FRAMES.values():
                    bpfsys.prog_test_run(dp.prog_fd, frame, repeat)
                    bpfsys.prog_test_run(base_fd, frame, repeat)
                if drain:
                    ring.drain(lambda _raw: None)
                for fname in FRAMES:
                    if mode == "off":
                        run("base", base_fd, fname, False)
                    run(mode, dp.prog_fd, fname, drain)
        ring.close()
        out: dict[str, Any] = {"repeat": repeat, "reps": reps, "base": base_rev, "programs": {}}
        for mode in modes:
            out["programs"][mode] = {
                f: {"ns": dict(stats(runs[mode][f])), "retval": rets[mode][f]}
                for f in FRAMES
            }
        med = {m: {f: out["programs"][m][f]["ns"]["median"] for f in FRAMES} for m in modes}
        out["delta_ns_vs_base"] = {
            m: {f: round(med[m][f] - med["base"][f], 2) for f in FRAMES} for m in modes
            if m != "base"
        }
        out["ratio_vs_base"] = {
            m: {f: round(med[m][f] / med["base"][f], 3) for f in FRAMES} for m in modes
            if m != "base"
        }
        # `off` and `base` ran back to back in every round: the median of those pairs' deltas
        out["paired_delta_ns_off"] = {
            f: stats([o - b for o, b in zip(runs["off"][f], runs["base"][f], strict=True)])
            for f in FRAMES
        }
        out["sample_stats"] = dp.sample_stats()
        return out
    finally:
        dp.close(cleanup=True)
        os.close(base_fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.xray", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="git revision of the program before X-ray")
    ap.add_argument("--repeat", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "xray.json")
    args = ap.parse_args(argv)
    res = measure(args.repeat, args.reps, args.base or _merge_base())
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"delta_ns_vs_base": res["delta_ns_vs_base"],
                      "paired_delta_ns_off": res["paired_delta_ns_off"],
                      "ratio_vs_base": res["ratio_vs_base"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
