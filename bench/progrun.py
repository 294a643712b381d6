"""Per-packet program cost with BPF_PROG_TEST_RUN: the same frames through every program.

`duration` is the kernel's own average over ``repeat`` runs of one frame (it leaves out time
the CPU spent elsewhere, e.g. on other tasks of this shared machine). Each (frame, program)
pair is measured ``reps`` times, programs interleaved, and the median is reported.

An empty XDP program (`return XDP_PASS`, loaded here with two raw instructions) measures the
test harness itself (the loop, local_bh_disable/enable, the timer), which is in every number.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.lists import PFX_POOL_BASE, POOL_BASE, addr_text
from bench.sysutil import Stats, stats
from xdpfw.kernel import bpfsys
from xdpfw.verify.frames import build_frame

__all__ = [
    "EXPECTED",
    "FRAMES",
    "PORT",
    "PREFIX_HIT_FRAME",
    "RX_IP",
    "V6_HIT",
    "empty_xdp_prog",
    "measure",
    "prog_sizes",
]

XDP_DROP, XDP_PASS = 1, 2
RX_IP = "198.19.255.254"
V4_HIT = addr_text(POOL_BASE)  # the list's first host
V4_MISS = "198.51.100.7"  # TEST-NET-2: in no list
V6_HIT = "2001:db8:ffff::5"
PORT = 22

FRAMES: dict[str, bytes] = {
    "ipv4_hit": build_frame(src=V4_HIT, dst=RX_IP, proto="udp", sport=4000, dport=9),
    "ipv4_miss": build_frame(src=V4_MISS, dst=RX_IP, proto="udp", sport=4000, dport=9),
    "ipv6_hit": build_frame(src=V6_HIT, dst="2001:db8:ffff::1", proto="udp", sport=4000, dport=9),
    "port_hit": build_frame(src=V4_MISS, dst=RX_IP, proto="tcp", sport=4000, dport=PORT),
}
EXPECTED = {"ipv4_hit": XDP_DROP, "ipv4_miss": XDP_PASS, "ipv6_hit": XDP_DROP, "port_hit": XDP_DROP}
# xdpfw only: a source inside the list's first prefix (198.19.0.0/24). xdp-filter holds no
# prefixes, so to it this frame is a miss; it is not part of the ratios.
PREFIX_HIT_FRAME = build_frame(
    src=addr_text(PFX_POOL_BASE + 1), dst=RX_IP, proto="udp", sport=4000, dport=9
)
EXPECTED_BY_PROG = {"xdp-filter": {"ipv4_prefix_hit": XDP_PASS}}


@dataclass
class Sample:
    ns: Stats
    retval: int


def measure(
    fds: Mapping[str, int],
    frames: Mapping[str, bytes],
    repeat: int,
    reps: int,
) -> dict[str, dict[str, Any]]:
    """{program: {frame: {"ns": stats, "retval": r, "verdict_ok": bool}}}, interleaved."""
    runs: dict[str, dict[str, list[float]]] = {p: {f: [] for f in frames} for p in fds}
    rets: dict[str, dict[str, int]] = {p: {} for p in fds}
    for _ in range(reps):
        for fname, frame in frames.items():
            for pname, fd in fds.items():
                r = bpfsys.prog_test_run(fd, frame, repeat)
                runs[pname][fname].append(float(r.duration_ns))
                rets[pname][fname] = r.retval
    out: dict[str, dict[str, Any]] = {}
    for pname in fds:
        out[pname] = {}
        for fname in frames:
            ret = rets[pname][fname]
            want = EXPECTED_BY_PROG.get(pname, {}).get(fname, EXPECTED.get(fname, XDP_DROP))
            out[pname][fname] = {
                "ns": stats(runs[pname][fname]),
                "retval": ret,
                "verdict_ok": pname not in ("xdpfw", "xdp-filter") or want == ret,
            }
    return out


def prog_sizes(fd: int) -> dict[str, Any]:
    info = bpfsys.prog_info(fd)
    return {
        "id": info.id,
        "name": info.name,
        "xlated_bytes": info.xlated_prog_len,
        "jited_bytes": info.jited_prog_len,
        "verified_insns": info.verified_insns,
        "maps": len(info.map_ids),
    }


# --- reference programs: the harness alone, one helper call, one map lookup ---------------

_BPF_FUNC_MAP_LOOKUP_ELEM = 1
_BPF_FUNC_KTIME_GET_BOOT_NS = 125
_BPF_FUNC_KTIME_GET_COARSE_NS = 160
_BPF_PSEUDO_MAP_FD = 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_RET_PASS = _insn(0xB7, 0, imm=XDP_PASS) + _insn(0x95)  # r0 = XDP_PASS; exit


def _load_xdp(insns: bytes, name: str) -> int:
    return bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, insns, name)


def empty_xdp_prog() -> int:
    """`return XDP_PASS` (not attached, not pinned): the test-run harness alone."""
    return _load_xdp(_RET_PASS, "xbn_empty")


def reference_progs(max_entries: int) -> dict[str, int]:
    """Programs costing one piece of crediting a rule, on top of the harness: the clock
    reads (bpf_ktime_get_boot_ns(), which ABI 1 used for last-hit, and the
    bpf_ktime_get_coarse_ns() xdpfw uses now) and one lookup of key 1 in a per-CPU map of
    ``max_entries``: a preallocated hash (ABI 1's xdpfw_rule_stats) and an array (ABI 2's)."""
    out = {
        "ktime_get_boot_ns": _load_xdp(
            _insn(0x85, imm=_BPF_FUNC_KTIME_GET_BOOT_NS) + _RET_PASS, "xbn_ktime"
        ),
        "ktime_get_coarse_ns": _load_xdp(
            _insn(0x85, imm=_BPF_FUNC_KTIME_GET_COARSE_NS) + _RET_PASS, "xbn_coarse"
        ),
    }
    for kind, map_type in (
        ("percpu_hash_lookup", bpfsys.BPF_MAP_TYPE_PERCPU_HASH),
        ("percpu_array_lookup", bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY),
    ):
        mfd = bpfsys.map_create(map_type, 4, 24, max_entries + 1, name="xbn_ref")
        try:
            m: bpfsys.Map[Any, Any] = bpfsys.Map(
                os.dup(mfd), "xbn_ref", ctypes.c_uint32, ctypes.c_uint8 * 24
            )
            with m:
                m.update(struct.pack("=I", 1), bytes(24))
            insns = (
                _insn(0x18, dst=1, src=_BPF_PSEUDO_MAP_FD, imm=mfd) + _insn(0)  # r1 = map
                + _insn(0x62, dst=10, off=-4, imm=1)  # *(u32 *)(r10 - 4) = 1
                + _insn(0xBF, dst=2, src=10)  # r2 = r10
                + _insn(0x07, dst=2, imm=-4)  # r2 += -4
                + _insn(0x85, imm=_BPF_FUNC_MAP_LOOKUP_ELEM)
                + _RET_PASS
            )
            out[kind] = _load_xdp(insns, "xbn_lookup")
        finally:
            os.close(mfd)  # the program holds the map
    return out


def medians(result: Mapping[str, Mapping[str, Any]], prog: str) -> dict[str, float]:
    return {f: float(v["ns"]["median"]) for f, v in result[prog].items()}


def frame_names() -> Sequence[str]:
    return list(FRAMES)
