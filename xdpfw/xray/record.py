"""A sampled frame: decoded from a ring buffer record, and as the JSON event of /v1/events.

The record is `struct xdpfw_sample_hdr` (bpf/xdpfw_abi.h, mirrored as abi.SampleHdr) followed
by cap_len bytes of the frame. Its time is bpf_ktime_get_ns(), CLOCK_MONOTONIC: `decode` adds
the offset of the wall clock (taken once per reader, `wall_offset_ns`).
"""

from __future__ import annotations

import base64
import ctypes
import time
from dataclasses import dataclass
from typing import Any

from xdpfw import abi

__all__ = [
    "VERDICTS",
    "Sample",
    "decode",
    "verdict_code",
    "wall_offset_ns",
]

# XDPFW_SAMPLED_* -> the name in events, comments and filters.
VERDICTS: dict[int, str] = {
    abi.SAMPLED_PASS: "pass",
    abi.SAMPLED_DROP: "drop",
    abi.SAMPLED_MONITOR: "monitor",
    abi.SAMPLED_LIMITED: "limited",
}
_HDR_SIZE = ctypes.sizeof(abi.SampleHdr)


def verdict_code(name: str) -> int:
    for code, text in VERDICTS.items():
        if text == name:
            return code
    raise ValueError(f"unknown verdict {name!r}: one of {', '.join(VERDICTS.values())}")


def wall_offset_ns() -> int:
    """Unix time minus CLOCK_MONOTONIC, in ns: added to a record's ktime it gives wall time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled frame."""

    rule: int  # the rule that decided it
    verdict: str  # pass | drop | monitor | limited
    ifindex: int
    time_ns: int  # Unix time, ns
    length: int  # bytes of the frame on the wire
    data: bytes  # its first bytes (len(data) <= length)
    ifname: str = ""

    def event(self) -> dict[str, Any]:
        """The JSON form (the `data` field of an SSE `sample` event)."""
        return {
            "rule": self.rule,
            "verdict": self.verdict,
            "ifindex": self.ifindex,
            "ifname": self.ifname,
            "time_ns": self.time_ns,
            "time": self.time_ns / 1e9,
            "len": self.length,
            "caplen": len(self.data),
            "data": base64.b64encode(self.data).decode(),
        }

    @classmethod
    def from_event(cls, ev: dict[str, Any]) -> Sample:
        """The inverse of `event` (what a client of /v1/events reads)."""
        return cls(
            rule=int(ev["rule"]),
            verdict=str(ev["verdict"]),
            ifindex=int(ev["ifindex"]),
            time_ns=int(ev["time_ns"]),
            length=int(ev["len"]),
            data=base64.b64decode(ev["data"]),
            ifname=str(ev.get("ifname") or ""),
        )


def decode(raw: bytes, offset_ns: int) -> Sample:
    """A ring record -> Sample. A record shorter than its header says raises ValueError."""
    if len(raw) < _HDR_SIZE:
        raise ValueError(f"sample record of {len(raw)} bytes, shorter than its header")
    hdr = abi.SampleHdr.from_buffer_copy(raw[:_HDR_SIZE])
    cap = int(hdr.cap_len)
    if _HDR_SIZE + cap > len(raw):
        raise ValueError(f"sample record of {len(raw)} bytes cannot hold cap_len {cap}")
    return Sample(
        rule=int(hdr.rule_id),
        verdict=VERDICTS.get(int(hdr.verdict), f"verdict-{int(hdr.verdict)}"),
        ifindex=int(hdr.ifindex),
        time_ns=int(hdr.ktime_ns) + offset_ns,
        length=int(hdr.frame_len),
        data=raw[_HDR_SIZE : _HDR_SIZE + cap],
    )
