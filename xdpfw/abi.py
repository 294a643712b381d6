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
    "D248_GROUP",
    "D248_PARTS",
    "D248_ROW",
    "D248_TBL24_ROWS",
    "HEADER",
    "HINT_DST",
    "HINT_SRC",
    "HINT_WORDS",
    "MAX_BANS",
    "MAX_BUCKETS",
    "MAX_IPV6_EXT",
    "MAX_LIMITS",
    "MAX_TBL8_GROUPS",
    "MAX_VLAN",
    "PER_RULE",
    "PER_SOURCE",
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
    "VERDICT_LIMIT",
    "VERDICT_LIMIT_MONITOR",
    "VERDICT_MONITOR",
    "VERDICT_NONE",
    "Addr6",
    "Bucket",
    "BucketKey",
    "Config",
    "D248Row",
    "Entry",
    "GlobalStats",
    "Limit",
    "LimitStats",
    "Lpm4Key",
    "Lpm6Key",
    "PfxEntry",
    "PfxKey",
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
    "d248_maps",
    "pfx_entries",
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

ABI_VERSION = 5
MAX_VLAN = 2
MAX_IPV6_EXT = 8
SET_SLOTS = 31
HINT_WORDS = 262144  # retired with ABI 5 (the /24 hint of ABI 4's IPv4 tries): placeholders
HINT_SRC = 0
HINT_DST = 1

# -- IPv4 prefixes: DIR-24-8 (issue 18), see xdpfw_abi.h --
D248_ROW = 16  # cells per array element
D248_TBL24_ROWS = 1048576  # 2^24 cells
D248_GROUP = 0x80000000  # cell flag: a tbl8 group
MAX_TBL8_GROUPS = 16384  # default tbl8 groups per direction
RANK_ID_MASK = 0x1FFFFFFF

VERDICT_NONE = 0
VERDICT_MONITOR = 1
VERDICT_DROP = 2
VERDICT_ALLOW = 3
VERDICT_LIMIT_MONITOR = 5
VERDICT_LIMIT = 6

# -- rate limits (issue 16) --
PER_SOURCE = 0
PER_RULE = 1
MAX_LIMITS = 4096
MAX_BUCKETS = 131072
MAX_BANS = 65536


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
    LIMITED = 8
    MAX = 9

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
    SRC4_LPM = 4  # IPv4 prefixes: DIR-24-8 arrays since ABI 5 (the name is the table's)
    DST4_LPM = 5
    SRC6_LPM = 6
    DST6_LPM = 7
    ANY = 8
    MAX = 9

    @property
    def map_name(self) -> str:
        """The table's name (the map's name, but for the IPv4 prefix tables, which are the
        DIR-24-8 arrays of `d248_maps` since ABI 5)."""
        return "xdpfw_" + self.name.lower()

    @property
    def is_map(self) -> bool:
        """Whether one map of this name holds the table (all but the IPv4 prefix tables)."""
        return self not in (Table.SRC4_LPM, Table.DST4_LPM, Table.MAX)


D248_PARTS = ("tbl24", "tbl8", "pfx")


def d248_maps(table: Table) -> tuple[str, str, str]:
    """The DIR-24-8 arrays of an IPv4 prefix table: (tbl24, tbl8, pfx)."""
    base = {Table.SRC4_LPM: "xdpfw_src4", Table.DST4_LPM: "xdpfw_dst4"}[table]
    return (f"{base}_tbl24", f"{base}_tbl8", f"{base}_pfx")


class Slot(ctypes.Structure):
    _fields_ = [
        ("rank", ctypes.c_uint64),
        ("rule_id", ctypes.c_uint32),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("has_ports", ctypes.c_uint8),
        ("tcp_mask", ctypes.c_uint8),
        ("counter", ctypes.c_uint32),
        ("tcp_want", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
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
        ("max_tbl8_groups", ctypes.c_uint32),
        ("build_id", ctypes.c_uint8 * 8),
    ]


class D248Row(ctypes.Structure):
    _fields_ = [("cell", ctypes.c_uint32 * D248_ROW)]


class PfxKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 4),
        ("plen", ctypes.c_uint8),
        ("live", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class PfxEntry(ctypes.Structure):
    _fields_ = [("entry", Entry), ("key", PfxKey)]


def pfx_entries(max_prefixes: int) -> int:
    """Elements of each xdpfw_*4_pfx array (XDPFW_PFX_ENTRIES)."""
    return 2 * max_prefixes + 1


# --- X-ray (issue 17): sampled frames through the ring buffer xdpfw_samples ----------------

SAMPLE_RING_BYTES = 1048576  # default size of xdpfw_samples
SAMPLE_SNAP_SMALL = 128  # record sizes: the smallest holding snaplen bytes is reserved
SAMPLE_SNAP_MEDIUM = 512
SAMPLE_SNAP_MAX = 2048  # the largest snap length
SAMPLE_MAX_RULES = 65536  # rules sampled at once (entries of xdpfw_sample_rules)

SAMPLED_PASS = 1  # SampleHdr.verdict: an allow rule (or a limit rule within budget) passed it
SAMPLED_DROP = 2  # a drop rule (enforce) dropped it
SAMPLED_MONITOR = 3  # a monitor-mode rule (drop or limit) passed and counted it
SAMPLED_LIMITED = 4  # a limit rule dropped it (over the budget, or banned)


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


# -- rate limits (issue 16) --------------------------------------------------------------------


class Limit(ctypes.Structure):
    _fields_ = [
        ("pkt_cost_ns", ctypes.c_uint64),
        ("pkt_window_ns", ctypes.c_uint64),
        ("byte_rate", ctypes.c_uint64),
        ("byte_window_ns", ctypes.c_uint64),
        ("ban_ns", ctypes.c_uint64),
        ("per", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class BucketKey(ctypes.Structure):
    _fields_ = [
        ("rule_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class Bucket(ctypes.Structure):
    _fields_ = [("pkt_tat", ctypes.c_uint64), ("byte_tat", ctypes.c_uint64)]


class LimitStats(ctypes.Structure):
    _fields_ = [
        ("passed", ctypes.c_uint64),
        ("limited", ctypes.c_uint64),
        ("banned", ctypes.c_uint64),
    ]
