"""The Python mirror (xdpfw/abi.py) against the C contract (bpf/xdpfw_abi.h).

(a) every ``#define XDPFW_*`` of the header has its mirror, and every mirrored enum member has
    its define; (b) every map's ctypes key/value mirror has the layout of the types bcc
    generates when it compiles the program; (c) Rule.rank() follows the bit layout the header's
    comment documents.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import TEST_CAPS

from xdpfw import abi, codes
from xdpfw.compiler import Capacities
from xdpfw.datapath.pins import MAP_TYPES
from xdpfw.kernel import bpfsys
from xdpfw.kernel.loader import MAP_NAMES
from xdpfw.rules import MAX_RULE_ID, Limit, RuleSpec

HEADER_TEXT = abi.HEADER.read_text()
PROGRAM_TEXT = abi.PROGRAM.read_text()

# `#define XDPFW_NAME value` (value on the same line; the include guard has none).
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+XDPFW_(\w+)(?:[ \t]+([^\s/]+))?", re.M)


def _c_int(text: str) -> int:
    return int(re.sub(r"[uUlL]+$", "", text), 0)


def header_defines() -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name, value in _DEFINE.findall(HEADER_TEXT):
        assert name not in out or out[name] == (_c_int(value) if value else None), (
            f"XDPFW_{name} is defined twice with different values"
        )
        out[name] = _c_int(value) if value else None
    return out


def _mirror(name: str) -> int | None:
    """The Python value mirroring XDPFW_<name>, or None when there is no mirror."""
    caps = Capacities()
    scalars: dict[str, int] = {
        "ABI_VERSION": abi.ABI_VERSION,
        "MAX_VLAN": abi.MAX_VLAN,
        "MAX_IPV6_EXT": abi.MAX_IPV6_EXT,
        "SET_SLOTS": abi.SET_SLOTS,
        "HINT_WORDS": abi.HINT_WORDS,
        "HINT_SRC": abi.HINT_SRC,
        "HINT_DST": abi.HINT_DST,
        # DIR-24-8 (issue 18)
        "D248_ROW": abi.D248_ROW,
        "D248_TBL24_ROWS": abi.D248_TBL24_ROWS,
        "D248_GROUP": abi.D248_GROUP,
        "MAX_TBL8_GROUPS": caps.max_tbl8_groups,
        "RANK_ID_MASK": abi.RANK_ID_MASK,
        # Default capacities: the loader overrides them with -D, from Capacities.
        "MAX_RULES": caps.max_rules,
        "MAX_PREFIXES": caps.max_prefixes,
        "MAX_SETS": caps.max_sets,
        # rate limits (issue 16)
        "PER_SOURCE": abi.PER_SOURCE,
        "PER_RULE": abi.PER_RULE,
        "MAX_LIMITS": abi.MAX_LIMITS,
        "MAX_BUCKETS": abi.MAX_BUCKETS,
        "MAX_BANS": abi.MAX_BANS,
    }
    if name in scalars:
        return scalars[name]
    if name.startswith("VERDICT_"):
        value = getattr(abi, name, None)
        return value if isinstance(value, int) else None
    if name.startswith("STAT_"):
        member = abi.Stat.__members__.get(name.removeprefix("STAT_"))
        return None if member is None else int(member)
    if name.startswith("SSTAT_"):  # X-ray
        sstat = abi.SampleStat.__members__.get(name.removeprefix("SSTAT_"))
        return None if sstat is None else int(sstat)
    if name.startswith(("SAMPLE_", "SAMPLED_")):
        value = getattr(abi, name, None)
        return value if isinstance(value, int) else None
    if name.startswith("TBL_"):
        member = abi.Table.__members__.get(name.removeprefix("TBL_"))
        return None if member is None else int(member)
    return None


# --- (a) constants ------------------------------------------------------------------------


@pytest.mark.pure
def test_header_defines_are_found() -> None:
    defines = header_defines()
    # the parser sees the file: a few anchors
    assert defines["ABI_H"] is None  # include guard
    assert defines["ABI_VERSION"] == 5
    assert defines["RANK_ID_MASK"] == 0x1FFFFFFF
    assert len(defines) > 30


@pytest.mark.parametrize(
    "name", sorted(n for n, v in header_defines().items() if v is not None)
)
@pytest.mark.pure
def test_every_define_equals_its_mirror(name: str) -> None:
    value = header_defines()[name]
    mirror = _mirror(name)
    assert mirror is not None, f"XDPFW_{name} = {value} has no mirror in xdpfw/abi.py"
    assert mirror == value, f"XDPFW_{name}: header says {value}, xdpfw/abi.py says {mirror}"


@pytest.mark.pure
def test_every_verdict_mirror_has_a_define() -> None:
    defines = header_defines()
    verdicts = [n for n in dir(abi) if n.startswith("VERDICT_")]
    assert verdicts == [
        "VERDICT_ALLOW", "VERDICT_DROP", "VERDICT_LIMIT", "VERDICT_LIMIT_MONITOR",
        "VERDICT_MONITOR", "VERDICT_NONE",
    ]
    for name in verdicts:
        assert defines.get(name) == getattr(abi, name), f"abi.{name} has no matching define"


@pytest.mark.parametrize(
    ("enum", "prefix"), [(abi.Stat, "STAT_"), (abi.Table, "TBL_")], ids=["Stat", "Table"]
)
@pytest.mark.pure
def test_every_enum_member_has_a_define(enum: type[Any], prefix: str) -> None:
    defines = header_defines()
    for member in enum:
        key = prefix + member.name
        assert key in defines, f"abi.{enum.__name__}.{member.name} has no XDPFW_{key}"
        assert defines[key] == int(member), f"XDPFW_{key} != abi.{enum.__name__}.{member.name}"
    # and the other way round: no define without a member
    in_header = {n.removeprefix(prefix) for n in defines if n.startswith(prefix)}
    assert in_header == set(enum.__members__)


@pytest.mark.pure
def test_enums_are_dense_and_max_is_the_count() -> None:
    for enum in (abi.Stat, abi.Table):
        values = sorted(int(m) for m in enum if m.name != "MAX")
        assert values == list(range(int(enum.MAX)))


@pytest.mark.pure
def test_rule_id_mask_is_the_id_bit_field() -> None:
    assert abi.RANK_ID_MASK == (1 << 29) - 1
    assert MAX_RULE_ID == abi.RANK_ID_MASK


@pytest.mark.pure
def test_map_names_agree_with_the_program() -> None:
    """Every map declared in xdp_filter.c has a ctypes mirror and is loaded, and vice versa."""
    declared = set(
        re.findall(r"^BPF_F_TABLE\(\"\w+\",\s*[^,]+,\s*[^,]+,\s*(\w+)", PROGRAM_TEXT, re.M)
    )
    kinds = "LPM_TRIE|ARRAY|PERCPU_HASH|PERCPU_ARRAY|HASH|RINGBUF_OUTPUT"
    declared |= set(re.findall(rf"^BPF_(?:{kinds})\((\w+)", PROGRAM_TEXT, re.M))
    assert declared == set(MAP_TYPES) == set(MAP_NAMES)
    for table in abi.Table:
        if table.is_map:
            assert table.map_name in declared
        elif table is not abi.Table.MAX:  # IPv4 prefixes: DIR-24-8 arrays (ABI 5)
            assert table.map_name not in declared
            assert set(abi.d248_maps(table)) <= declared


# --- (b) struct layouts against bcc's generated types ----------------------------------------


@pytest.fixture(scope="module")
def bcc_types() -> dict[str, tuple[type[Any], type[Any]]]:
    from xdpfw.kernel import loader

    return loader.compile_types(TEST_CAPS)


_RINGBUF_MAPS = set(re.findall(r"^BPF_RINGBUF_OUTPUT\((\w+)", PROGRAM_TEXT, re.M))


def _percpu_maps() -> set[str]:
    return set(re.findall(r"^BPF_PERCPU_\w+\((\w+)", PROGRAM_TEXT, re.M))


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, ctypes.Structure | ctypes.Union)


def _is_array(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, ctypes.Array)


def _fields(tp: type[Any]) -> Iterator[tuple[str, type[Any], int, int]]:
    for f in tp._fields_:
        name, ftype = f[0], f[1]
        desc = getattr(tp, name)
        yield name, ftype, desc.offset, desc.size


def _is_padding(name: str) -> bool:
    return name == "pad" or name.startswith("__pad") or name.startswith("_pad")


def compare_layout(ours: Any, theirs: Any, path: str, report: Callable[[str], None]) -> None:
    """Recursively compare two ctypes types; report every difference."""
    if ctypes.sizeof(ours) != ctypes.sizeof(theirs):
        report(f"{path}: sizeof {ctypes.sizeof(ours)} (ours) != {ctypes.sizeof(theirs)} (bcc)")
    if _is_struct(ours) or _is_struct(theirs):
        if not (_is_struct(ours) and _is_struct(theirs)):
            report(f"{path}: {ours.__name__} vs {theirs.__name__}: one is not a struct")
            return
        # No alignment check: bcc declares every struct it decodes _pack_ = 1 ("struct_packed"
        # when the C struct has no implicit padding), so its alignment is 1; the offsets and
        # sizes compared below are what must agree.
        mine = {off: (n, t, sz) for n, t, off, sz in _fields(ours)}
        bccs = {off: (n, t, sz) for n, t, off, sz in _fields(theirs)}
        for off in sorted(mine.keys() | bccs.keys()):
            if off not in bccs:
                report(f"{path}.{mine[off][0]}: at offset {off} in ours only")
                continue
            if off not in mine:
                report(f"{path}.{bccs[off][0]}: at offset {off} in bcc's type only")
                continue
            (mname, mtype, msize), (bname, btype, bsize) = mine[off], bccs[off]
            if mname != bname and not (_is_padding(mname) and _is_padding(bname)):
                report(f"{path}+{off}: field named {mname!r} (ours) but {bname!r} (bcc)")
            if msize != bsize:
                report(f"{path}.{mname}: size {msize} (ours) != {bsize} (bcc)")
            compare_layout(mtype, btype, f"{path}.{mname}", report)
        return
    if _is_array(ours) or _is_array(theirs):
        if not (_is_array(ours) and _is_array(theirs)):
            report(f"{path}: one side is an array, the other is not")
            return
        if ours._length_ != theirs._length_:
            report(f"{path}: array length {ours._length_} != {theirs._length_}")
        compare_layout(ours._type_, theirs._type_, f"{path}[]", report)


@pytest.mark.bpf
@pytest.mark.parametrize("name", sorted(MAP_TYPES))
def test_map_types_match_bcc(name: str, bcc_types: dict[str, tuple[type[Any], type[Any]]]) -> None:
    our_key, our_val = MAP_TYPES[name]
    bcc_key, bcc_leaf = bcc_types[name]
    if name in _RINGBUF_MAPS:
        # bcc gives a ring buffer a nominal int key and leaf; the kernel's sizes are 0, which
        # test_loaded_maps_have_the_mirrored_sizes checks against the mirror instead.
        assert ctypes.sizeof(our_key) == ctypes.sizeof(our_val) == 0
        return
    if name in _percpu_maps():
        # bcc's per-CPU Leaf is an array of the element type, one per possible CPU
        assert _is_array(bcc_leaf), f"{name}: bcc's per-CPU Leaf is not an array"
        assert bcc_leaf._length_ == bpfsys.possible_cpus()
        assert ctypes.sizeof(bcc_leaf._type_) % 8 == 0
        bcc_leaf = bcc_leaf._type_
    problems: list[str] = []
    compare_layout(our_key, bcc_key, f"{name}.Key", problems.append)
    compare_layout(our_val, bcc_leaf, f"{name}.Leaf", problems.append)
    assert not problems, "\n".join(problems)


@pytest.mark.pure
def test_percpu_maps_are_the_counter_maps() -> None:
    assert _percpu_maps() == {
        "xdpfw_rule_stats", "xdpfw_stats", "xdpfw_sample_stats", "xdpfw_limit_stats"
    }


@pytest.mark.pure
def test_layout_comparison_reports_drift() -> None:
    """The comparer itself: a moved or resized field is reported."""

    class A(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint16), ("z", ctypes.c_uint16)]

    class B(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint32)]

    class C(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32), ("w", ctypes.c_uint16), ("z", ctypes.c_uint16)]

    problems: list[str] = []
    compare_layout(A, B, "A", problems.append)
    assert any("A.y: size 2" in p for p in problems)
    assert any("A.z: at offset 6 in ours only" in p for p in problems)
    problems.clear()
    compare_layout(A, C, "A", problems.append)
    assert problems == ["A+4: field named 'y' (ours) but 'w' (bcc)"]
    problems.clear()
    compare_layout(abi.Entry, abi.Entry, "E", problems.append)
    assert problems == []


@pytest.mark.bpf
def test_loaded_maps_have_the_mirrored_sizes(dp: Any) -> None:
    """The kernel's key/value sizes of the loaded program's maps equal the mirrors' sizeof."""
    for name, (key_t, val_t) in MAP_TYPES.items():
        info = dp.map(name).info
        assert info.key_size == ctypes.sizeof(key_t), name
        assert info.value_size == ctypes.sizeof(val_t), name


@pytest.mark.pure
def test_struct_sizes_are_what_the_header_implies() -> None:
    assert ctypes.sizeof(abi.Slot) == 32
    assert ctypes.sizeof(abi.Entry) == 40
    assert ctypes.sizeof(abi.Set) == 32 * abi.SET_SLOTS
    assert ctypes.sizeof(abi.Lpm4Key) == 8
    assert ctypes.sizeof(abi.Lpm6Key) == 20
    assert ctypes.sizeof(abi.RuleStats) == 16
    assert ctypes.sizeof(abi.GlobalStats) == 8 * abi.Stat.MAX
    assert ctypes.sizeof(abi.Config) == 4 * (5 + abi.Table.MAX) + 8  # + build_id[8]
    assert ctypes.sizeof(abi.D248Row) == 64  # one cache line
    assert ctypes.sizeof(abi.PfxKey) == 8
    assert ctypes.sizeof(abi.PfxEntry) == 48  # the entry, then its key
    assert ctypes.sizeof(abi.SampleCtl) == 24
    assert ctypes.sizeof(abi.SampleRule) == 16
    assert ctypes.sizeof(abi.SampleBucket) == 8
    assert ctypes.sizeof(abi.SampleStats) == 8 * abi.SampleStat.MAX
    assert ctypes.sizeof(abi.SampleHdr) == 24


# --- (c) the rank bit layout ---------------------------------------------------------------

_RANK_LINE = re.compile(r"^\s*\*\s+bits?\s+(\d+)(?:-(\d+))?\s+(.+?)\s*$", re.M)
_RANK_FIELDS = {
    "verdict class": "verdict",
    "source prefix length": "src_len",
    "destination prefix length": "dst_len",
    "protocol named": "proto",
    "port narrowness": "narrow",
    "XDPFW_RANK_ID_MASK - rule_id": "id",
}


def rank_layout() -> dict[str, tuple[int, int]]:
    """field -> (low bit, width), from the comment above XDPFW_RANK_ID_MASK."""
    block = HEADER_TEXT[: HEADER_TEXT.index("#define XDPFW_RANK_ID_MASK")]
    block = block[block.rindex("/*") :]
    out: dict[str, tuple[int, int]] = {}
    for lo, hi, desc in _RANK_LINE.findall(block):
        field = next((f for key, f in _RANK_FIELDS.items() if desc.startswith(key)), None)
        assert field is not None, f"unknown rank field in the header comment: {desc!r}"
        low, high = int(lo), int(hi or lo)
        out[field] = (low, high - low + 1)
    return out


def _decode(rank: int, layout: dict[str, tuple[int, int]]) -> dict[str, int]:
    return {f: (rank >> lo) & ((1 << width) - 1) for f, (lo, width) in layout.items()}


@pytest.mark.pure
def test_rank_layout_comment_tiles_64_bits() -> None:
    layout = rank_layout()
    assert set(layout) == set(_RANK_FIELDS.values())
    bits = sorted(b for lo, w in layout.values() for b in range(lo, lo + w))
    assert bits == list(range(64)), "the documented fields must tile bits 0-63 exactly once"
    assert layout["id"] == (0, abi.RANK_ID_MASK.bit_length())
    assert layout["verdict"] == (62, 2)
    # wide enough for what goes in
    assert 1 << layout["src_len"][1] > 128
    assert 1 << layout["dst_len"][1] > 128
    assert 1 << layout["narrow"][1] == 65536


_RANK_CASES: list[tuple[dict[str, Any], int, dict[str, int]]] = [
    (
        {"src": "198.18.0.0/15"},
        7,
        {"verdict": 2, "src_len": 15, "dst_len": 0, "proto": 0, "narrow": 0},
    ),
    (
        {"action": "allow", "src": "2001:db8::1", "proto": "tcp", "dport": 22},
        1,
        {"verdict": 3, "src_len": 128, "dst_len": 0, "proto": 1, "narrow": 65535},
    ),
    (
        {"mode": "monitor", "dst": "2001:db8:1::/48", "proto": "udp", "dport": "1000-2000"},
        123456,
        {"verdict": 0, "src_len": 0, "dst_len": 48, "proto": 1, "narrow": 65536 - 1001},
    ),
    (
        {"proto": "udp", "dport": "0-65535"},
        MAX_RULE_ID,
        {"verdict": 2, "src_len": 0, "dst_len": 0, "proto": 1, "narrow": 0},
    ),
    (
        {"dst": "198.19.255.255", "proto": "icmp"},
        42,
        {"verdict": 2, "src_len": 0, "dst_len": 32, "proto": 1, "narrow": 0},
    ),
    (
        {"action": "allow", "src": "0.0.0.0/0"},
        2,
        {"verdict": 3, "src_len": 0, "dst_len": 0, "proto": 0, "narrow": 0},
    ),
    # rate limits (issue 16): class 1 between drop and monitor; monitor-mode limits are class 0
    (
        {"action": "limit", "src": "198.18.0.0/16", "proto": "tcp", "dport": 80,
         "tcp_flags": "syn", "limit": Limit.parse(pps=10)},
        77,
        {"verdict": 1, "src_len": 16, "dst_len": 0, "proto": 1, "narrow": 65535},
    ),
    (
        {"action": "limit", "mode": "monitor", "src": "0.0.0.0/0", "limit": Limit.parse(bps=9000)},
        MAX_RULE_ID,
        {"verdict": 0, "src_len": 0, "dst_len": 0, "proto": 0, "narrow": 0},
    ),
]


@pytest.mark.pure
@pytest.mark.parametrize(("kwargs", "rule_id", "expected"), _RANK_CASES)
def test_rank_fields_follow_the_header_comment(
    kwargs: dict[str, Any], rule_id: int, expected: dict[str, int]
) -> None:
    layout = rank_layout()
    rule = RuleSpec.parse(**kwargs).with_id(rule_id)
    rank = rule.rank()
    assert 0 < rank < 1 << 64
    fields = _decode(rank, layout)
    assert fields == {**expected, "id": abi.RANK_ID_MASK - rule_id + 1}
    assert fields["verdict"] == codes.verdict_class(rule.verdict)


@pytest.mark.pure
def test_rank_orders_like_the_contract() -> None:
    def rank(rule_id: int, **kwargs: Any) -> int:
        return RuleSpec.parse(**kwargs).with_id(rule_id).rank()

    # verdict class first: a /0 allow beats a /128 exact enforce drop with ports
    assert rank(9, action="allow", src="0.0.0.0/0") > rank(
        1, src="2001:db8::1", proto="tcp", dport=22
    )
    assert rank(9, src="198.18.0.0/15") > rank(1, mode="monitor", src="198.18.0.1")
    # then src length, then dst length, then proto, then narrowness, then the lowest id
    assert rank(9, src="198.18.0.0/16") > rank(1, src="198.18.0.0/15", proto="tcp", dport=1)
    assert rank(9, src="198.18.0.0/16") > rank(1, dst="198.18.0.1")
    assert rank(9, dst="198.18.0.0/24") > rank(1, dst="198.18.0.0/16", proto="udp", dport=5)
    assert rank(9, proto="udp") > rank(1, dst="0.0.0.0/0")
    assert rank(9, proto="udp", dport="10-11") > rank(1, proto="udp", dport="10-12")
    assert rank(1, proto="udp") > rank(2, proto="udp")
    assert rank(1, proto="udp", dport="0-65535") > rank(2, proto="udp")
    # allow > enforce drop > limit > monitor, whatever the specificity (issue 16)
    lim = Limit.parse(pps=5)
    assert rank(9, src="0.0.0.0/0") > rank(1, action="limit", src="198.18.0.1", limit=lim)
    assert rank(9, action="limit", src="0.0.0.0/0", limit=lim) > rank(
        1, mode="monitor", src="198.18.0.1", proto="tcp", dport=1
    )
    assert rank(9, action="limit", src="0.0.0.0/0", limit=lim) > rank(
        1, action="limit", mode="monitor", src="198.18.0.1", limit=lim
    )
