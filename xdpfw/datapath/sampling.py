"""X-ray's maps: which rules are sampled, the cap, the lost counts, and the ring of records.

Every change here is a map write, never a program reload: an entry of xdpfw_sample_rules
(rule id -> 1 in `every`), and the single xdpfw_sample_ctl element (how many rules are
sampled, 0 = the program skips sampling altogether; the snap length; the cap as the token
bucket's interval and burst). The ring buffer xdpfw_samples is read by
xdpfw.kernel.ringbuf.RingBuffer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from xdpfw import abi
from xdpfw.datapath.slots import U32
from xdpfw.errors import CapacityExceeded, DatapathError, InvalidRule
from xdpfw.kernel import bpfsys
from xdpfw.kernel.ringbuf import XRAY_MIN_KERNEL, RingBuffer, xray_supported

__all__ = ["BURST_SECONDS", "MAX_EVERY", "Sampling", "check_every", "check_snaplen"]

BURST_SECONDS = 0.1  # the bucket holds a tenth of a second of samples (at least one)
MAX_EVERY = 1 << 31


def check_every(every: object) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= MAX_EVERY:
        raise InvalidRule(
            "sample.every", f"must be an integer from 1 (every frame) to {MAX_EVERY}, got {every!r}"
        )
    return every


def check_snaplen(snaplen: int) -> int:
    if not 1 <= snaplen <= abi.SAMPLE_SNAP_MAX:
        raise ValueError(f"snap length must be 1..{abi.SAMPLE_SNAP_MAX} bytes, got {snaplen}")
    return snaplen


class Sampling:
    """The sampling maps of one program (the datapath's lock serialises writers)."""

    def __init__(self, maps: Mapping[str, bpfsys.Map[Any, Any]]) -> None:
        self._ctl = maps["xdpfw_sample_ctl"]
        self._bucket = maps["xdpfw_sample_bucket"]
        self._rules_map = maps["xdpfw_sample_rules"]
        self._stats = maps["xdpfw_sample_stats"]
        self._ring_map = maps["xdpfw_samples"]
        self._lock = threading.Lock()
        ctl = self._ctl.lookup(U32.pack(0))
        self._conf = (ctl.snaplen, ctl.interval_ns, ctl.burst_ns) if ctl else (0, 0, 0)
        self._every: dict[int, int] = {
            int(k.value): int(v.every) for k, v in self._rules_map.items()
        }

    def configure(self, max_pps: int, snaplen: int) -> None:
        """The cap (samples per second over all rules and CPUs) and the bytes kept per frame."""
        if not 1 <= max_pps <= 10_000_000:
            raise ValueError(f"sample cap must be 1..10000000 per second, got {max_pps}")
        check_snaplen(snaplen)
        interval = 1_000_000_000 // max_pps
        burst = max(interval, int(interval * max_pps * BURST_SECONDS))
        with self._lock:
            changed = self._conf[1:] != (interval, burst)
            self._conf = (snaplen, interval, burst)
            self._write_ctl()
            if changed:  # a new cap starts with a full bucket, not the old cap's debt
                self._bucket.update(U32.pack(0), abi.SampleBucket(tat=0))

    def _write_ctl(self) -> None:
        snaplen, interval, burst = self._conf
        ctl = abi.SampleCtl(
            rules=len(self._every) if interval else 0,
            snaplen=snaplen,
            interval_ns=interval,
            burst_ns=burst,
        )
        self._ctl.update(U32.pack(0), ctl)

    def set(self, every: Mapping[int, int | None]) -> None:
        """Sample these rules 1 in `every` (None: stop sampling the rule). Each entry written
        starts its own count again."""
        if any(every.values()) and not xray_supported():
            need = ".".join(map(str, XRAY_MIN_KERNEL))
            raise DatapathError(
                f"sampling (X-ray) needs Linux {need} or newer (bpf_xdp_load_bytes, BPF "
                f"atomics); this kernel is {os.uname().release}, so the program was built "
                "without it. Rules work as before; upgrade the kernel to sample them"
            )
        with self._lock:
            grow = sum(1 for rid, n in every.items() if n and rid not in self._every)
            if len(self._every) + grow > abi.SAMPLE_MAX_RULES:
                raise CapacityExceeded(
                    "xdpfw_sample_rules (the sampled rules)",
                    abi.SAMPLE_MAX_RULES,
                    'stop sampling some rules first ("sample": null)',
                )
            try:
                for rid, n in every.items():
                    if n:
                        self._rules_map.update(U32.pack(rid), abi.SampleRule(every=check_every(n)))
                        self._every[rid] = n
                    elif self._every.pop(rid, None) is not None:
                        self._rules_map.delete(U32.pack(rid))
            finally:
                self._write_ctl()  # the flag follows what the map holds, also after a failure

    def forget(self, rule_ids: Iterable[int]) -> None:
        """Rules that left the maps are sampled no more."""
        gone = {rid: None for rid in rule_ids if rid in self._every}
        if gone:
            self.set(gone)

    def rules(self) -> dict[int, int]:
        """rule id -> every, of each sampled rule."""
        with self._lock:
            return dict(self._every)

    def settings(self) -> tuple[int, int]:
        """(snap length, cap per second) as written; (0, 0) before `configure`."""
        snaplen, interval, _ = self._conf
        return snaplen, (1_000_000_000 // interval if interval else 0)

    def stats(self) -> dict[str, int]:
        """sent, lost_ring, lost_cap: summed over the CPUs."""
        per_cpu = self._stats.lookup_percpu(U32.pack(0)) or []
        return {
            s.field: sum(int(c.counter[s]) for c in per_cpu) for s in abi.SampleStat.counters()
        }

    def open_ring(self) -> RingBuffer:
        """A reader of xdpfw_samples (one at a time: records go to the first who reads them)."""
        return RingBuffer(self._ring_map.fd)
