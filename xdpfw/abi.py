"""Python mirror of bpf/xdpfw_abi.h: constants and ctypes layouts, defined once here.

tests/test_abi.py checks every constant against the header and every struct against the
types bcc generates when it compiles the program, so a drift fails the suite, not a packet.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from importlib import resources
from pathlib import Path

__all__ = [
    "ABI_VERSION",
    "BPF_DIR",
    "HEADER",
    "HINT_DST",
    "HINT_SRC",
    "HINT_WORDS",
    "MAX_IPV6_EXT",
    "MAX_VLAN",
    "PROGRAM",
    "PROG_NAME",
    "RANK_ID_MASK",
    "SAMPLED_DROP",
    "SAMPLED_LIMITED",
    "SAMPLED_MONITOR",
    "SAMPLED_PASS",
    "SAMPLE_MAX_RULES",
    "SAMPLE_RING_BYTES",
    "SAMPLE_SNAP_MAX",
    "SAMPLE_SNAP_MEDIUM",
    "SAMPLE_SNAP_SMALL",
    "SET_SLOTS",
    "VERDICT_ALLOW",
    "VERDICT_DROP",
    "VERDICT_MONITOR",
    "VERDICT_NONE",
    "Addr6",
    "Config",
    "Entry",
    "GlobalStats",
    "Lpm4Key",
    "Lpm6Key",
    "RuleStats",
    "SampleBucket",
    "SampleCtl",
    "SampleHdr",
    "SampleRule",
    "SampleStat",
    "SampleStats",
    "Set",
    "Slot",
    "Stat",
    "Table",
]


def _find_bpf_dir() -> Path:
    """Where bpf/xdp_filter.c and bpf/xdpfw_abi.h are.

    An installed wheel ships them as the package data xdpfw/_bpf (setup.py maps it onto the
    repository's bpf/); a checkout, also one installed in editable mode, has bpf/ next to
    the package. A zipped install has no real file for bcc to compile, so it is not looked in.
    """
    shipped = resources.files("xdpfw").joinpath("_bpf")
    if isinstance(shipped, Path) and shipped.joinpath("xdp_filter.c").is_file():
        return shipped
    return Path(__file__).resolve().parent.parent / "bpf"


BPF_DIR = _find_bpf_dir()
HEADER = BPF_DIR / "xdpfw_abi.h"
PROGRAM = BPF_DIR / "xdp_filter.c"
PROG_NAME = "xdpfw_prog"

ABI_VERSION = 4
MAX_VLAN = 2
MAX_IPV6_EXT = 8
SET_SLOTS = 31
HINT_WORDS = 262144
HINT_SRC = 0  # which half of xdpfw_lpm4_hint: the source trie's
HINT_DST = 1  # the destination trie's
RANK_ID_MASK = 0x1FFFFFFF

VERDICT_NONE = 0
VERDICT_MONITOR = 1
VERDICT_DROP = 2
VERDICT_ALLOW = 3


class Stat(IntEnum):
    """Index into GlobalStats.counter (XDPFW_STAT_*)."""

    PACKETS = 0
    PASSED = 1
    DROPPED = 2
    MONITORED = 3
    MALFORMED = 4
    NON_IP = 5
    FRAGMENTS = 6
    BYTES = 7
    MAX = 8

    @property
    def field(self) -> str:
        """The counter's name everywhere above the ABI: Python attributes, the JSON of
        /v1/stats "totals", the `outcome` label of /metrics (packets, non_ip, ...)."""
        return self.name.lower()

    @classmethod
    def counters(cls) -> tuple[Stat, ...]:
        """Every counter in index order (every member but MAX): the one list of them."""
        return tuple(s for s in cls if s is not cls.MAX)


class Table(IntEnum):
    """Lookup tables (XDPFW_TBL_*); the value is the index in Config.n_entries."""

    SRC4 = 0
    DST4 = 1
    SRC6 = 2
    DST6 = 3
    SRC4_LPM = 4
    DST4_LPM = 5
    SRC6_LPM = 6
    DST6_LPM = 7
    ANY = 8
    MAX = 9

    @property
    def map_name(self) -> str:
        return "xdpfw_" + self.name.lower()


class Slot(ctypes.Structure):
    _fields_ = [
        ("rank", ctypes.c_uint64),
        ("rule_id", ctypes.c_uint32),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("has_ports", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("counter", ctypes.c_uint32),
    ]


class Entry(ctypes.Structure):
    _fields_ = [("first", Slot), ("set_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Set(ctypes.Structure):
    _fields_ = [("slot", Slot * SET_SLOTS)]


class Lpm4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class Lpm6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class Addr6(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16)]


class RuleStats(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class GlobalStats(ctypes.Structure):
    _fields_ = [("counter", ctypes.c_uint64 * Stat.MAX)]


class Config(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("n_entries", ctypes.c_uint32 * Table.MAX),
        ("max_rules", ctypes.c_uint32),
        ("max_prefixes", ctypes.c_uint32),
        ("max_sets", ctypes.c_uint32),
        ("build_id", ctypes.c_uint8 * 8),
    ]


# --- X-ray (issue 17): sampled frames through the ring buffer xdpfw_samples ----------------

SAMPLE_RING_BYTES = 1048576  # default size of xdpfw_samples
SAMPLE_SNAP_SMALL = 128  # record sizes: the smallest holding snaplen bytes is reserved
SAMPLE_SNAP_MEDIUM = 512
SAMPLE_SNAP_MAX = 2048  # the largest snap length
SAMPLE_MAX_RULES = 65536  # rules sampled at once (entries of xdpfw_sample_rules)

SAMPLED_PASS = 1  # SampleHdr.verdict: an allow rule passed the frame
SAMPLED_DROP = 2  # a drop rule (enforce) dropped it
SAMPLED_MONITOR = 3  # a drop rule in monitor mode passed and counted it
SAMPLED_LIMITED = 4  # reserved for rate-limit rules (issue 16)


class SampleStat(IntEnum):
    """Index into SampleStats.counter (XDPFW_SSTAT_*)."""

    SENT = 0
    LOST_RING = 1
    LOST_CAP = 2
    MAX = 3

    @property
    def field(self) -> str:
        """sent, lost_ring, lost_cap: the names in /v1/stats and /metrics."""
        return self.name.lower()

    @classmethod
    def counters(cls) -> tuple[SampleStat, ...]:
        return tuple(s for s in cls if s is not cls.MAX)


class SampleCtl(ctypes.Structure):
    _fields_ = [
        ("rules", ctypes.c_uint32),
        ("snaplen", ctypes.c_uint32),
        ("interval_ns", ctypes.c_uint64),
        ("burst_ns", ctypes.c_uint64),
    ]


class SampleRule(ctypes.Structure):
    _fields_ = [
        ("every", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("matched", ctypes.c_uint64),
    ]


class SampleBucket(ctypes.Structure):
    _fields_ = [("tat", ctypes.c_uint64)]


class SampleStats(ctypes.Structure):
    _fields_ = [("counter", ctypes.c_uint64 * SampleStat.MAX)]


class SampleHdr(ctypes.Structure):
    _fields_ = [
        ("ktime_ns", ctypes.c_uint64),
        ("rule_id", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("frame_len", ctypes.c_uint32),
        ("cap_len", ctypes.c_uint16),
        ("verdict", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]
