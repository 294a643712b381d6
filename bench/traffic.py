"""Live traffic: trafgen in the tx namespace at full speed, random sources from the list.

One trafgen process (`--cpus 1`, TX_RING, qdisc bypass) sends 60-byte UDP/IPv4 frames to the
rx interface's address with a source drawn at random, per frame, from a power-of-two block at
the start of 198.18.0.0/15 (all of it blocked by the loaded list). trafgen fills in the IPv4
checksum of every frame. It is started with `--no-sock-mem --notouch-irq` so it changes no
sysctl and no IRQ affinity, under `timeout` so it can never outlive its window by much.

A veth delivers the frame to the receiving side on the sending CPU (native XDP: the veth's
NAPI; otherwise the backlog, processed in the sender's softirq), so one trafgen process is
one CPU sending *and* filtering: packets per second measure the receive-side cost per frame
on top of a constant sending cost. Counters are read over a window after a warm-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.lab import Pair, TrafficLab
from bench.lists import PFX_POOL_MAX, POOL_MAX, PREFIX_EVERY
from bench.sysutil import run, stats
from xdpfw.kernel import bpfsys

__all__ = [
    "live_prog_cost",
    "perf_profile",
    "throughput_window",
    "trafgen",
    "trafgen_config",
]

FRAME_PAYLOAD = 18  # 14 + 20 + 8 + 18 = 60 bytes, the shortest Ethernet frame without FCS


def _frame(pair: Pair, base: str, rnd: str) -> str:
    return (
        f"{{ eth(da={pair.rx_mac}), ipv4(sa={base}, da={pair.rx_ip}, ttl=64{rnd}), "
        f"udp(sp=4000, dp=9), fill(0x00, {FRAME_PAYLOAD}) }}\n"
    )


def trafgen_config(pair: Pair, pool: int, prefix_pool: int = 0) -> str:
    """UDP frames from 198.18.0.0 + random(pool); with prefix_pool, every eighth frame (the
    list's share of prefixes) comes from a random address of 198.19.0.0/24 ... the
    prefix_pool-th /24 instead. Both pools are powers of two."""
    for name, n, top in (("pool", pool, POOL_MAX), ("prefix_pool", prefix_pool, PFX_POOL_MAX)):
        if (n and (n & (n - 1) or n > top)) or (name == "pool" and n < 1):
            raise ValueError(f"{name} {n} is not a power of two <= {top}")
    if pool == 1:
        rnd = ""
    elif pool <= 256:
        rnd = f", sa[3]=drnd(0, {pool - 1})"
    else:
        rnd = f", sa[2:2]=drnd(0, {pool - 1})"
    if not prefix_pool:
        return _frame(pair, "198.18.0.0", rnd)
    host = _frame(pair, "198.18.0.0", rnd)
    pfx_rnd = ", sa[3]=drnd()" + ("" if prefix_pool == 1 else f", sa[2]=drnd(0, {prefix_pool - 1})")
    return host * (PREFIX_EVERY - 1) + _frame(pair, "198.19.0.0", pfx_rnd)


@contextlib.contextmanager
def trafgen(
    lab: TrafficLab, pair: Pair, pool: int, max_s: float, prefix_pool: int = 0
) -> Iterator[None]:
    """trafgen running for the body; killed at the end (and by `timeout` after max_s)."""
    with tempfile.NamedTemporaryFile("w", prefix="xbn-trafgen-", suffix=".cfg") as cfg:
        cfg.write(trafgen_config(pair, pool, prefix_pool))
        cfg.flush()
        argv = [
            "ip", "netns", "exec", lab.tx_ns,
            "timeout", "-s", "INT", "-k", "5", str(int(max_s) + 5),
            "trafgen", "--no-sock-mem", "--notouch-irq", "--cpus", "1", "--num", "0",
            "--dev", pair.tx_if, "--conf", cfg.name,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            time.sleep(0.05)
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"trafgen exited {proc.returncode}: {err[-500:]}")
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # timeout forwards it to trafgen
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


def _stamped(read: Callable[[], int]) -> tuple[int, float]:
    """A counter and the moment it was read (midpoint: some reads spawn a command)."""
    a = time.monotonic()
    value = read()
    return value, (a + time.monotonic()) / 2


def throughput_window(
    lab: TrafficLab,
    pair: Pair,
    pool: int,
    drops: Callable[[], int],
    warmup: float,
    window: float,
    prefix_pool: int = 0,
) -> dict[str, Any]:
    """Frames per second the contender dropped, frames per second into the rx interface."""

    def rx() -> int:
        return lab.rx_packets(pair.rx_if)

    with trafgen(lab, pair, pool, warmup + window + 5, prefix_pool):
        time.sleep(warmup)
        rx0, tr0 = _stamped(rx)
        d0, td0 = _stamped(drops)
        time.sleep(window)
        rx1, tr1 = _stamped(rx)
        d1, td1 = _stamped(drops)
    return {
        "pps": (d1 - d0) / (td1 - td0),
        "rx_pps": (rx1 - rx0) / (tr1 - tr0),
        "dropped_share": (d1 - d0) / (rx1 - rx0) if rx1 > rx0 else 0.0,
        "seconds": td1 - td0,
    }


def perf_profile(
    lab: TrafficLab,
    pair: Pair,
    pool: int,
    warmup: float,
    seconds: float,
    prefix_pool: int = 0,
    top: int = 25,
) -> list[dict[str, Any]]:
    """Where the sending-and-filtering CPU time goes while trafgen runs: `perf record -e
    cpu-clock -a` (a software clock: this VM has no PMU), top symbols as shares of the samples
    of trafgen and the ksoftirqd threads (this shared machine runs other work too)."""
    comms = ",".join(["trafgen", *(f"ksoftirqd/{i}" for i in range(os.cpu_count() or 1))])
    with tempfile.TemporaryDirectory(prefix="xbn-perf-") as tmp:
        data = f"{tmp}/perf.data"
        with trafgen(lab, pair, pool, warmup + seconds + 10, prefix_pool):
            time.sleep(warmup)
            run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-a", "-o", data,
                 "--", "sleep", str(seconds)], timeout=seconds + 60)
        out = run(["perf", "report", "-i", data, "--stdio", "--no-children", "--comms", comms,
                   "--percentage", "relative", "--sort", "sym", "--percent-limit", "0.5"],
                  timeout=120).stdout
    rows: list[dict[str, Any]] = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].endswith("%") and parts[1].startswith("["):
            rows.append({"share": float(parts[0][:-1]) / 100, "sym": parts[2].strip()})
    return rows[:top]


def live_prog_cost(
    lab: TrafficLab,
    pair: Pair,
    pool: int,
    prog_fd: int,
    warmup: float,
    window: float,
    rounds: int = 1,
    prefix_pool: int = 0,
) -> dict[str, Any]:
    """run_time_ns / run_cnt of the attached program under traffic, over ``rounds`` windows
    (BPF_ENABLE_STATS is held only inside a window, so item 3 never runs with stats on).
    ns_per_packet is the best window (other work on this machine only ever adds time)."""
    windows: list[dict[str, Any]] = []
    with trafgen(lab, pair, pool, warmup + rounds * (window + 0.2) + 5, prefix_pool):
        time.sleep(warmup)
        for _ in range(rounds):
            stats_fd = bpfsys.enable_stats()
            try:
                a = bpfsys.prog_info(prog_fd)
                rx0, t0 = lab.rx_packets(pair.rx_if), time.monotonic()
                time.sleep(window)
                b = bpfsys.prog_info(prog_fd)
                rx1, t1 = lab.rx_packets(pair.rx_if), time.monotonic()
            finally:
                os.close(stats_fd)
            runs = b.run_cnt - a.run_cnt
            windows.append({
                "ns_per_packet": (b.run_time_ns - a.run_time_ns) / runs if runs else None,
                "packets": runs,
                "rx_pps": (rx1 - rx0) / (t1 - t0),
            })
            time.sleep(0.1)
    costs = [w["ns_per_packet"] for w in windows if w["ns_per_packet"] is not None]
    return {
        "ns_per_packet": min(costs) if costs else None,
        "ns_per_packet_stats": stats(costs),
        "packets": sum(w["packets"] for w in windows),
        "rx_pps": max(w["rx_pps"] for w in windows),
        "pool": pool,
        "prefix_pool": prefix_pool,
        "windows": windows,
    }
