"""Rate limits under live traffic on the veth lab (issue 16): xdpfw against nftables.

The lab is bench/lab.py's (two namespaces, veths with two queues); the frames come from
bench/pacer.py (trafgen's shaper sends in one-second clumps, see there), 60-byte UDP/IPv4 to
the rx address. Three parts, every contender measured in each round, the order rotated:

1. side by side: a source sending at 10x its limit (ABUSER, 100,000 pps into a per-source
   limit of 10,000 pps, burst 100) and a second source of the same rule under its limit
   (SECOND, 5,000 pps; the pacer sends 20 ABUSER frames per SECOND frame). Contenders: no
   filter; xdpfw (native and generic XDP) with the limit rule `src 198.18.0.0/24, limit
   10000/s burst 100, per source`; nftables with the same limit (bench/rivals.py NftMeter).
   What passed, per source, is counted behind the contender by NftSourceCounter (the same
   table for all). CPU: the receive path runs in softirq context on the sending CPU (native
   XDP in the veth's NAPI poll; generic XDP and nft's netdev ingress hook in the backlog),
   run at the sender's local_bh_enable, so two figures per window, both divided by the
   frames the rx interface received: (a) the sender's CPU time, exactly (the scheduler's
   runtime of the pacer and the ksoftirqd threads: with no CONFIG_IRQ_TIME_ACCOUNTING the
   softirq work is in it), which is the pacer's own constant cost (Python, AF_PACKET send,
   the veth transmit) plus the receive path; (b) the machine's softirq time from /proc/stat
   (all CPUs; tick-sampled at CONFIG_HZ=250, so noisy over short windows).
2. xdpfw's own cost, from the kernel's BPF run statistics (run_time_ns / run_cnt over the
   window; BPF_ENABLE_STATS held only inside those windows, never in part 1's): the program
   with the rules, for traffic that misses them, that a limit rule passes (a budget of
   10^9 pps), that a limit rule drops (over its budget), and part 1's mix; against the
   program with no rules, same traffic.
3. two CPUs on one source: two pacers pinned to CPU 0 and CPU 1, 50,000 pps each from
   ABUSER (qdisc bypass: queue n from CPU n; each veth queue's NAPI runs where it was
   scheduled, so each CPU runs the program for its own frames; the per-CPU counters of the
   rule show it). The normal build (one `lru_hash` bucket shared by the CPUs) against the
   bench-only XDPFW_PERCPU_BUCKETS build (`lru_percpu_hash`: a bucket per CPU): passed rate
   over the limit, and ns/packet from the run statistics.

Besides part 1, at full speed: trafgen from one source of the limited network as fast as one
CPU sends (bench/traffic.py), each contender's drop rate; 10^9 / frames per second is the
CPU time of a frame (sending included, the same for all): the item-3 method.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lab import Pair, TrafficLab
from bench.rivals import NftMeter, NftSourceCounter
from bench.sysutil import log, stats
from bench.traffic import throughput_window
from xdpfw.datapath import Datapath
from xdpfw.kernel import bpfsys, netlink
from xdpfw.rules import Limit, Rule, RuleSpec

__all__ = ["LIMIT_BURST", "LIMIT_PPS", "PROFILES", "LiveProfile", "live_rules", "run_live"]

REPO = Path(__file__).resolve().parent.parent
LIMIT_PPS, LIMIT_BURST = 10_000, 100
LIMITED_NET, WITHIN_NET = "198.18.0.0/24", "198.18.1.0/24"
ABUSER, SECOND = "198.18.0.1", "198.18.0.2"
WITHIN_SRC, MISS_SRC = "198.18.1.1", "198.18.2.1"
ABUSER_RATE, SECOND_RATE = 100_000, 5_000
ABUSER_SHARE = ABUSER_RATE // SECOND_RATE  # ABUSER frames per SECOND frame
PER_CPU_RATE = 50_000  # part 3: each of the two pacers
USER_HZ = os.sysconf("SC_CLK_TCK")
LIMIT_ID, WITHIN_ID = 101, 102  # apart from bench/floods.py's test-run rules (1-5)


@dataclass(frozen=True)
class LiveProfile:
    warmup_s: float
    window_s: float
    rounds: int
    tries: int  # a window whose sender was off its rate is measured again, this many at most


PROFILES = {"full": LiveProfile(1.0, 4.0, 3, 3), "quick": LiveProfile(0.2, 0.4, 1, 1)}


def live_rules() -> list[Rule]:
    """Rule LIMIT_ID limits every source of 198.18.0.0/24 to 10,000 pps (burst 100); rule
    WITHIN_ID gives 198.18.1.0/24 a budget that never runs out (the "within" case)."""
    return [
        RuleSpec.parse(
            action="limit", src=LIMITED_NET,
            limit=Limit.parse(pps=LIMIT_PPS, burst=LIMIT_BURST, per="source"),
        ).with_id(LIMIT_ID),
        RuleSpec.parse(
            action="limit", src=WITHIN_NET, limit=Limit.parse(pps=10**9, burst=10**9, per="source"),
        ).with_id(WITHIN_ID),
    ]


# -- frames and the sender ---------------------------------------------------------------------


def _csum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(pair: Pair, src: str) -> bytes:
    """60 bytes: Ethernet to the rx MAC, IPv4 (checksum filled: the stack checks it), UDP
    4000 -> 9 (no socket there), 18 zero bytes."""
    payload = bytes(18)
    udp = struct.pack("!HHHH", 4000, 9, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(pair.rx_ip))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    eth = bytes.fromhex(pair.rx_mac.replace(":", "")) + bytes.fromhex("020000000001") + b"\x08\x00"
    return eth + hdr + udp


@dataclass
class Sent:
    pids: list[int] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def pacers(
    lab: TrafficLab, pair: Pair, frames: list[bytes], rate: float, seconds: float,
    cpus: tuple[int | None, ...] = (None,),
) -> Iterator[Sent]:
    """One bench.pacer per entry of ``cpus`` (pinned there unless None), each sending
    ``frames`` in turn at ``rate`` for ``seconds``; what each sent is in the yielded Sent
    after the body."""
    hexes = [f.hex() for f in frames]
    procs: list[subprocess.Popen[str]] = []
    out = Sent()
    try:
        for cpu in cpus:
            argv = ["ip", "netns", "exec", lab.tx_ns, "timeout", "-k", "5", str(int(seconds) + 10),
                    sys.executable, "-m", "bench.pacer", "--dev", pair.tx_if, "--rate", str(rate),
                    "--seconds", str(seconds)]
            if cpu is not None:
                argv += ["--cpu", str(cpu)]
            procs.append(subprocess.Popen(
                [*argv, *hexes], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                err = p.stderr.read() if p.stderr else ""
                raise RuntimeError(f"pacer exited {p.wait(5)}: {err[-500:]}")
            out.pids.append(int(json.loads(line)["pid"]))
        yield out
        for p in procs:
            so, se = p.communicate(timeout=seconds + 20)
            if p.returncode != 0:
                raise RuntimeError(f"pacer exited {p.returncode}: {se[-500:]}")
            out.runs.append(json.loads(so.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


# -- what is read over a window ----------------------------------------------------------------


def softirq_system_ns() -> tuple[float, float]:
    """The machine's softirq and system time so far (all CPUs, /proc/stat), in ns."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()
    # cpu user nice system idle iowait irq softirq ...
    return int(f[7]) * 1e9 / USER_HZ, int(f[3]) * 1e9 / USER_HZ


def _ksoftirqd() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(d.name))
    return pids


KSOFTIRQD = _ksoftirqd()


def run_ns(pids: list[int]) -> float:
    """CPU time the tasks ran, exactly (the scheduler's sum_exec_runtime, /proc/PID/schedstat).
    This kernel has no CONFIG_IRQ_TIME_ACCOUNTING, so softirq work done on a task's behalf
    (at its local_bh_enable after transmitting) is in its time."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return float(total)


def _percpu_rule(dp: Datapath, rule_id: int) -> list[tuple[int, int]]:
    vals = dp.map("xdpfw_limit_stats").lookup_percpu(ctypes.c_uint32(rule_id)) or []
    return [(int(v.passed), int(v.limited)) for v in vals]


@contextlib.contextmanager
def attached(dp: Datapath, lab: TrafficLab, pair: Pair, mode: str = "native") -> Iterator[None]:
    state = netlink.xdp_attach(pair.rx_if, dp.prog_fd, mode, netns=lab.rx_ns)
    if state.mode != mode:
        netlink.xdp_detach(pair.rx_if, "auto", netns=lab.rx_ns)
        raise RuntimeError(f"asked for {mode} XDP on {pair.rx_if}, got {state.mode}")
    try:
        yield
    finally:
        netlink.xdp_detach(pair.rx_if, "auto", netns=lab.rx_ns, expected_prog_id=state.prog_id)


class _Stats:
    """BPF run statistics of one program over a window (enabled only inside it)."""

    def __init__(self, prog_fd: int) -> None:
        self.fd = prog_fd
        self.stats_fd = -1
        self.a = self.b = None

    def __enter__(self) -> _Stats:
        self.stats_fd = bpfsys.enable_stats()
        self.a = bpfsys.prog_info(self.fd)  # type: ignore[assignment]
        return self

    def stop(self) -> None:
        self.b = bpfsys.prog_info(self.fd)  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        os.close(self.stats_fd)

    def result(self) -> dict[str, Any]:
        assert self.a is not None and self.b is not None
        runs = self.b.run_cnt - self.a.run_cnt
        ns = (self.b.run_time_ns - self.a.run_time_ns) / runs if runs else None
        return {"ns_per_packet": ns, "runs": runs}


# -- part 1: side by side ----------------------------------------------------------------------

STEADY = 0.03  # a window whose arrivals are off the target rate by more is measured again


def _steady(measure: Callable[[], dict[str, Any]], ok: Callable[[dict[str, Any]], bool],
            tries: int) -> dict[str, Any]:
    """``measure()`` until ``ok`` (the sender kept its rate: it skips what a stall of more
    than 10 ms left overdue, see bench/pacer.py), at most ``tries`` times; the last result,
    with how many it took."""
    for n in range(1, tries + 1):
        res = measure()
        res["tries"] = n
        res["steady"] = ok(res)
        if res["steady"]:
            break
        skipped = sum(s.get("skipped", 0) for s in res["sent"])
        log(f"floods live: the sender was stalled ({skipped:,} frames skipped)"
            + (", again" if n < tries else ""))
    return res


def _on_rate(target: float) -> Callable[[dict[str, Any]], bool]:
    return lambda r: abs(r["rx_pps"] / target - 1) <= STEADY


def _side_window(lab: TrafficLab, pair: Pair, p: LiveProfile, counter: NftSourceCounter,
                 drops: Callable[[], int] | None) -> dict[str, Any]:
    frames = [udp_frame(pair, ABUSER)] * ABUSER_SHARE + [udp_frame(pair, SECOND)]
    rate = ABUSER_RATE + SECOND_RATE
    with pacers(lab, pair, frames, rate, p.warmup_s + p.window_s + 0.5) as sent:
        time.sleep(p.warmup_s)
        tasks = sent.pids + KSOFTIRQD
        c0, tc0 = _stamped(counter.counts)
        d0 = drops() if drops else 0
        rx0, t0 = _stamped(lambda: lab.rx_packets(pair.rx_if))
        (si0, sy0), cpu0 = softirq_system_ns(), run_ns(tasks)
        time.sleep(p.window_s)
        cpu1, (si1, sy1) = run_ns(tasks), softirq_system_ns()
        rx1, t1 = _stamped(lambda: lab.rx_packets(pair.rx_if))
        d1 = drops() if drops else 0
        c1, tc1 = _stamped(counter.counts)
    # Arrivals are rates over the rx counter's interval, passed frames over the nft counters'
    # (each read stamped at its midpoint: an nft listing takes tens of ms).
    dt, dtc = t1 - t0, tc1 - tc0
    rx = rx1 - rx0
    share = ABUSER_SHARE / (ABUSER_SHARE + 1)
    arrived_a, arrived_b = rx * share / dt, rx * (1 - share) / dt
    passed_a = (c1[ABUSER] - c0[ABUSER]) / dtc
    passed_b = (c1[SECOND] - c0[SECOND]) / dtc
    over = arrived_a - LIMIT_PPS
    return {
        "seconds": round(dt, 3),
        "rx_pps": rx / dt,
        "sent": sent.runs,
        "abuser_pps": arrived_a,
        "abuser_passed_pps": passed_a,
        "abuser_passed_over_limit": passed_a / LIMIT_PPS,
        "over_limit_dropped_share": (arrived_a - passed_a) / over if over > 0 else None,
        "second_pps": arrived_b,
        "second_passed_share": passed_b / arrived_b if arrived_b else None,
        "contender_drops_pps": (d1 - d0) / dt,
        "sender_cpu_ns_per_packet": (cpu1 - cpu0) / rx if rx else None,
        "softirq_ns_per_packet": (si1 - si0) / rx if rx else None,
        "system_ns_per_packet": (sy1 - sy0) / rx if rx else None,
    }


def _stamped(read: Callable[[], Any]) -> tuple[Any, float]:
    a = time.monotonic()
    value = read()
    return value, (a + time.monotonic()) / 2


def _side_by_side(lab: TrafficLab, pair: Pair, p: LiveProfile, limits: Datapath,
                  ) -> dict[str, Any]:
    """Each window through _steady (same target for all)."""
    counter = NftSourceCounter(lab, f"xbncnt{os.getpid()}", [ABUSER, SECOND])
    nft = NftMeter(lab, f"xbnlim{os.getpid()}", pair.rx_if, LIMITED_NET, LIMIT_PPS, LIMIT_BURST)
    names = ["no filter", "xdpfw native", "xdpfw generic", "nftables"]

    def xdp_drops() -> int:
        return limits.limit_counters([LIMIT_ID])[LIMIT_ID].limited

    on_rate = _on_rate(ABUSER_RATE + SECOND_RATE)

    def steady(drops: Callable[[], int] | None) -> dict[str, Any]:
        return _steady(lambda: _side_window(lab, pair, p, counter, drops), on_rate, p.tries)

    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    counter.create()
    try:
        for r in range(p.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                log(f"floods live: side by side, {name}, round {r + 1}/{p.rounds}")
                if name == "no filter":
                    out[name].append(steady(None))
                elif name.startswith("xdpfw"):
                    with attached(limits, lab, pair, name.split()[1]):
                        out[name].append(steady(xdp_drops))
                else:
                    nft.create()
                    try:
                        out[name].append(steady(nft.drops))
                    finally:
                        nft.delete()
    finally:
        nft.delete()
        counter.delete()
    return {name: _summary(ws) for name, ws in out.items()}


def _summary(ws: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in ws[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    med = {k: stats([w[k] for w in ws if w.get(k) is not None]) for k in keys}
    return {"median": {k: v.get("median") for k, v in med.items()}, "stats": med,
            "unsteady_windows": sum(1 for w in ws if not w.get("steady", True)),
            "retried_windows": sum(1 for w in ws if w.get("tries", 1) > 1), "windows": ws}


def _full_speed(lab: TrafficLab, pair: Pair, p: LiveProfile, limits: Datapath) -> dict[str, Any]:
    """trafgen at full speed from one source of the limited network (198.18.0.0, over its
    budget all the time): frames per second each contender takes in and drops, one CPU
    sending and filtering (bench/traffic.py's item-3 method), so 10^9 / rx_pps is the CPU
    time of a frame, sending included (the same for all)."""
    nft = NftMeter(lab, f"xbnsat{os.getpid()}", pair.rx_if, LIMITED_NET, LIMIT_PPS, LIMIT_BURST)
    names = ["no filter", "xdpfw native", "xdpfw generic", "nftables"]
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}

    def xdp_drops() -> int:
        return limits.limit_counters([LIMIT_ID])[LIMIT_ID].limited

    def window(drops: Callable[[], int]) -> dict[str, Any]:
        res = throughput_window(lab, pair, 1, drops, p.warmup_s, p.window_s)
        res["ns_per_frame"] = 1e9 / res["rx_pps"] if res["rx_pps"] else None
        return res

    try:
        for r in range(p.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                log(f"floods live: full speed, {name}, round {r + 1}/{p.rounds}")
                if name == "no filter":
                    out[name].append(window(lab.udp_noports))
                elif name.startswith("xdpfw"):
                    with attached(limits, lab, pair, name.split()[1]):
                        out[name].append(window(xdp_drops))
                else:
                    nft.create()
                    try:
                        out[name].append(window(nft.drops))
                    finally:
                        nft.delete()
    finally:
        nft.delete()
    return {name: _summary(ws) for name, ws in out.items()}


# -- part 2: xdpfw's own cost, run statistics --------------------------------------------------


def _cost_window(lab: TrafficLab, pair: Pair, p: LiveProfile, dp: Datapath,
                 frames: list[bytes], rate: float) -> dict[str, Any]:
    with attached(dp, lab, pair), pacers(lab, pair, frames, rate,
                                         p.warmup_s + p.window_s + 0.5):
        time.sleep(p.warmup_s)
        with _Stats(dp.prog_fd) as st:
            time.sleep(p.window_s)
            st.stop()
    return st.result()


def _cost(lab: TrafficLab, pair: Pair, p: LiveProfile, plain: Datapath,
          limits: Datapath) -> dict[str, Any]:
    cases = {
        "miss": ([udp_frame(pair, MISS_SRC)], ABUSER_RATE),
        "within": ([udp_frame(pair, WITHIN_SRC)], ABUSER_RATE),
        "over": ([udp_frame(pair, ABUSER)], ABUSER_RATE),
        "mix": ([udp_frame(pair, ABUSER)] * ABUSER_SHARE + [udp_frame(pair, SECOND)],
                ABUSER_RATE + SECOND_RATE),
    }
    progs = {"no rules": plain, "limit rules": limits}
    runs: dict[str, dict[str, list[float]]] = {c: {n: [] for n in progs} for c in cases}
    for r in range(p.rounds):
        for case, (frames, rate) in cases.items():
            order = list(progs) if r % 2 == 0 else list(progs)[::-1]
            for name in order:
                log(f"floods live: cost, {case}, {name}, round {r + 1}/{p.rounds}")
                res = _cost_window(lab, pair, p, progs[name], frames, rate)
                if res["ns_per_packet"] is not None:
                    runs[case][name].append(res["ns_per_packet"])
    out: dict[str, Any] = {}
    for case, by in runs.items():
        s = {n: stats(v) for n, v in by.items()}
        row: dict[str, Any] = {n: v for n, v in s.items()}
        if s["no rules"].get("median") and s["limit rules"].get("median"):
            row["extra_ns"] = s["limit rules"]["median"] - s["no rules"]["median"]
        out[case] = row
    return out


# -- part 3: two CPUs, one source --------------------------------------------------------------


def _two_cpu_window(lab: TrafficLab, pair: Pair, p: LiveProfile, dp: Datapath) -> dict[str, Any]:
    frames = [udp_frame(pair, ABUSER)]
    with attached(dp, lab, pair), pacers(lab, pair, frames, PER_CPU_RATE,
                                         p.warmup_s + p.window_s + 0.5, cpus=(0, 1)) as sent:
        time.sleep(p.warmup_s)
        c0, t0 = _percpu_rule(dp, LIMIT_ID), time.monotonic()
        with _Stats(dp.prog_fd) as st:
            time.sleep(p.window_s)
            st.stop()
        c1, t1 = _percpu_rule(dp, LIMIT_ID), time.monotonic()
    dt = t1 - t0
    per_cpu = [{"passed_pps": (b[0] - a[0]) / dt, "limited_pps": (b[1] - a[1]) / dt}
               for a, b in zip(c0, c1, strict=True)]
    arrived = sorted((c["passed_pps"] + c["limited_pps"] for c in per_cpu), reverse=True)
    passed = sum(c["passed_pps"] for c in per_cpu)
    return {
        "seconds": round(dt, 3),
        "sent": sent.runs,
        "per_cpu": per_cpu,
        "cpus_running": sum(1 for c in per_cpu if c["passed_pps"] + c["limited_pps"] > 1000),
        "arrived_per_cpu": arrived[:2],
        "passed_pps": passed,
        "passed_over_limit": passed / LIMIT_PPS,
        **st.result(),
    }


def _two_cpus(lab: TrafficLab, pair: Pair, p: LiveProfile, limits: Datapath,
              percpu: Datapath) -> dict[str, Any]:
    builds = {"shared": limits, "per-CPU": percpu}
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in builds}
    for r in range(p.rounds):
        order = list(builds) if r % 2 == 0 else list(builds)[::-1]
        for name in order:
            log(f"floods live: two CPUs, {name} buckets, round {r + 1}/{p.rounds}")
            out[name].append(_steady(
                lambda: _two_cpu_window(lab, pair, p, builds[name]),  # noqa: B023 (called now)
                lambda r: min(r["arrived_per_cpu"]) >= PER_CPU_RATE * (1 - STEADY), p.tries))
    return {name: _summary(ws) for name, ws in out.items()}


def run_live(profile: str, plain: Datapath, limits: Datapath, percpu: Datapath) -> dict[str, Any]:
    """The three parts on one lab; ``limits`` and ``percpu`` hold live_rules()."""
    p = PROFILES[profile]
    with TrafficLab(queues=2) as lab:
        pair = lab.pairs["a"]
        t0 = time.monotonic()
        res: dict[str, Any] = {
            "profile": profile,
            "limit": {"pps": LIMIT_PPS, "burst": LIMIT_BURST, "net": LIMITED_NET},
            "rates": {"abuser": ABUSER_RATE, "second": SECOND_RATE, "per_cpu": PER_CPU_RATE},
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
            "user_hz": USER_HZ,
        }
        res["side_by_side"] = _side_by_side(lab, pair, p, limits)
        res["full_speed"] = _full_speed(lab, pair, p, limits)
        res["cost"] = _cost(lab, pair, p, plain, limits)
        res["two_cpus"] = _two_cpus(lab, pair, p, limits, percpu)
        res["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def report_live(res: dict[str, Any]) -> str:
    """Markdown tables of run_live's results (medians over the rounds)."""

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    sb = res["side_by_side"]
    lines = [
        "| contender | arrived pps | abuser passed pps (x limit) | over-limit dropped |"
        " second source passed | sender CPU ns/pkt | softirq ns/pkt (ticks) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in sb.items():
        m = s["median"]
        lines.append(
            f"| {name} | {f(m['rx_pps'], ',.0f')} | {f(m['abuser_passed_pps'], ',.0f')}"
            f" ({f(m['abuser_passed_over_limit'], '.3f')}x) |"
            f" {f(m['over_limit_dropped_share'], '.2%')} | {f(m['second_passed_share'], '.2%')} |"
            f" {f(m['sender_cpu_ns_per_packet'], ',.0f')} |"
            f" {f(m['softirq_ns_per_packet'], ',.0f')} |"
        )
    if "full_speed" in res:
        lines += ["", "| contender, full speed | frames in (pps) | dropped (pps) | ns/frame |",
                  "|---|---:|---:|---:|"]
        for name, s in res["full_speed"].items():
            m = s["median"]
            lines.append(f"| {name} | {f(m['rx_pps'], ',.0f')} | {f(m['pps'], ',.0f')} |"
                         f" {f(m['ns_per_frame'], ',.0f')} |")
    lines += ["", "| traffic | no rules (ns/pkt) | limit rules (ns/pkt) | extra (ns) |",
              "|---|---:|---:|---:|"]
    for case, row in res["cost"].items():
        lines.append(f"| {case} | {f(row['no rules'].get('median'), '.0f')} |"
                     f" {f(row['limit rules'].get('median'), '.0f')} |"
                     f" {f(row.get('extra_ns'), '+.0f')} |")
    lines += ["", "| buckets | passed pps (x limit) | per CPU passed pps | CPUs running |"
              " ns/pkt |", "|---|---:|---|---:|---:|"]
    for name, s in res["two_cpus"].items():
        m = s["median"]
        per_cpu = " / ".join(f"{c['passed_pps']:,.0f}" for c in s["windows"][-1]["per_cpu"])
        lines.append(f"| {name} | {f(m['passed_pps'], ',.0f')}"
                     f" ({f(m['passed_over_limit'], '.3f')}x) | {per_cpu} (last round) |"
                     f" {f(m['cpus_running'], '.0f')} | {f(m['ns_per_packet'], '.0f')} |")
    return "\n".join(lines)
