"""Small process and system helpers: bounded subprocesses, the machine description, stats.

Every external command runs with a timeout; a command that fails raises CommandError with
its stderr, so a broken rival shows up as a readable error in the results, not a hang.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "CommandError",
    "Stats",
    "log",
    "machine",
    "proc_status_kib",
    "run",
    "sigterm_as_interrupt",
    "stats",
]

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the results table)."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], rc: int, stderr: str) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.stderr = stderr
        super().__init__(f"`{' '.join(argv)}` exited {rc}: {stderr.strip()[-800:]}")


def run(
    argv: Sequence[str],
    *,
    input: str | bytes | None = None,
    timeout: float = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (text mode), bounded by ``timeout`` seconds."""
    data = input.decode() if isinstance(input, bytes) else input
    proc = subprocess.run(
        list(argv),
        input=data,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env is not None else None,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc


class Stats(dict[str, float]):
    """median, p99, min, max, mean, spread (max-min over median) and n of some samples."""


def stats(samples: Sequence[float]) -> Stats:
    if not samples:
        return Stats(n=0)
    xs = sorted(samples)
    med = statistics.median(xs)
    p99 = xs[min(len(xs) - 1, max(0, round(0.99 * (len(xs) - 1))))]
    return Stats(
        n=len(xs),
        median=med,
        p99=p99,
        min=xs[0],
        max=xs[-1],
        mean=statistics.fmean(xs),
        spread=(xs[-1] - xs[0]) / med if med else 0.0,
    )


def proc_status_kib(pid: int | str, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def _first_line(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        p = run(argv, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if out else ""


def _dpkg_version(pkg: str) -> str:
    if shutil.which("dpkg-query") is None:
        return ""
    p = run(["dpkg-query", "-W", "-f=${Version}", pkg], check=False, timeout=10)
    return p.stdout.strip() if p.returncode == 0 else ""


def _lscpu() -> dict[str, str]:
    if shutil.which("lscpu") is None:
        return {}
    out: dict[str, str] = {}
    for line in run(["lscpu"], check=False).stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on (for the results file and docs/benchmarks.md)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    lscpu = _lscpu()
    try:
        bpf_stats = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    except OSError:
        bpf_stats = "?"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "arch": platform.machine(),
        "cpu_model": model.group(1).strip() if model else "?",
        "cpus": os.cpu_count(),
        "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "hypervisor": lscpu.get("Hypervisor vendor", "none"),
        "l2": lscpu.get("L2 cache", "?"),
        "l3": lscpu.get("L3 cache", "?"),
        "python": platform.python_version(),
        "kernel_bpf_stats_enabled_at_start": bpf_stats,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "tools": {
            "xdp-tools": _dpkg_version("xdp-tools"),
            "libxdp": _dpkg_version("libxdp1"),
            "nftables": _first_line(["nft", "--version"]),
            "ipset": _first_line(["ipset", "--version"]),
            "iptables": _first_line(["iptables", "--version"]),
            "trafgen": _first_line(["trafgen", "--version"]),
            "bpftool": _first_line(["bpftool", "version"]),
            "bcc": _dpkg_version("python3-bpfcc"),
        },
    }


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every finally block runs."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
