"""The rule wire format: a rule as one int (its *code*), its entry key, and its rank.

The control plane keeps a million rules as ints, not objects, so the format of those ints is
a contract: this module names every field once (shift and width, like the kernel's
``GENMASK``/``FIELD_PREP``/``FIELD_GET``) and everyone else calls its functions.

A **code** is a rule's match, action and mode (not its id). Equal codes mean the same rule;
``key(code)`` names the lookup-table entry the rule lives in. From bit 0 up::

    0-15   PORT_HI    inclusive upper port          (only with HAS_PORTS)
    16-31  PORT_LO    lower port
    32     HAS_PORTS  the rule names a dport range
    33-40  PROTO      IP protocol number, 0 = any
    41-42  VERDICT    monitor 1, drop 2, allow 3
    43     LIMIT      a rate-limit rule (VERDICT says enforce: drop 2, or monitor 1)
    44-51  TCP_MASK   TCP flags the rule looks at (FIN 0x01 ... CWR 0x80; 0 = none)
    52-59  TCP_WANT   their required values (TCP_WANT & ~TCP_MASK == 0)
    60-    KEY        the entry key, below

VERDICT and LIMIT together (bits 41-43) are the slot's verdict byte, ``abi.VERDICT_*``:
monitor 1, drop 2, allow 3, limit-monitor 5 (LIMIT | monitor), limit 6 (LIMIT | drop).
``pack``/``unpack``/``verdict`` take and give that byte.

A **key** (``code >> KEY.shift``; 0 = the address-less table)::

    0-1    DIR        0 none, DIR_SRC, DIR_DST
    2      V6         IPv6 address
    3-10   PLEN       prefix length
    11-    ADDR       the network address (32 or 128 bits)

``key & TABLE_BITS`` (direction and family) with "exact or prefix" picks the table.

A **trie position** orders a trie's keys by address, then length (``ADDR << 8 | PLEN``), so
a prefix's descendants are one contiguous range of positions.

The **rank** is the 64-bit priority the data plane compares (bpf/xdpfw_abi.h, struct
xdpfw_slot), the rule contract's "most specific" order with the verdict class on top::

    0-28   ID_INV     RANK_ID_MASK - rule id + 1 (the lower id wins a tie; never 0)
    29-44  NARROW     PORT_SPAN (65536) - port range width, 0 = no ports
    45     PROTO_NAMED
    46-53  DST_PLEN
    54-61  SRC_PLEN
    62-63  VERDICT    the verdict *class* (`verdict_class`): allow 3 > drop 2 > limit 1 >
                      monitor 0 (drop and limit rules in monitor mode are both class 0)

TCP flags do not add specificity: two rules that differ only in their flags tie on
everything but the id. ID_INV is never 0, so no rank is 0 (0 marks an empty slot), not even
that of a monitor rule on 0.0.0.0/0 with the highest id.

Hot loops (bulk loads) bind a field's ``shift``/``bits`` to locals instead of calling the
accessors; they still never spell a number. tests/test_codes_format.py checks that the fields
tile their ints, that the functions invert each other, that the rank orders rules as the
contract says, and that the header's rank comment describes RANK_FIELDS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from xdpfw import abi

__all__ = [
    "ADDR",
    "ADDR_BITS_V4",
    "ADDR_BITS_V6",
    "CODE_FIELDS",
    "CODE_LOW",
    "DIR",
    "DIR_DST",
    "DIR_NONE",
    "DIR_SRC",
    "HAS_PORTS",
    "KEY",
    "KEY_FIELDS",
    "KEY_LOW",
    "LIMIT",
    "MAX_RULE_ID",
    "PLEN",
    "PORT_HI",
    "PORT_LO",
    "PORT_SPAN",
    "PROTO",
    "PROTO_PORTS",
    "RANK_DST_PLEN",
    "RANK_FIELDS",
    "RANK_ID",
    "RANK_NARROW",
    "RANK_PROTO",
    "RANK_SRC_PLEN",
    "RANK_VERDICT",
    "TABLE_BITS",
    "TCP_ACK",
    "TCP_FLAG_NAMES",
    "TCP_MASK",
    "TCP_SYN",
    "TCP_WANT",
    "TRIE_ADDR",
    "TRIE_PLEN",
    "V6",
    "VERDICT",
    "VERDICT_CLASS",
    "Field",
    "Unpacked",
    "code_of_key",
    "from_slot",
    "is_plain",
    "key",
    "key_addr",
    "key_bits",
    "key_dir",
    "key_is_exact",
    "key_is_prefix",
    "key_plen",
    "key_table",
    "key_v6",
    "net_code",
    "pack",
    "pack_key",
    "ports",
    "proto",
    "rank",
    "rank_columns",
    "rank_plens",
    "tcp_flags",
    "trie_key",
    "trie_position",
    "unpack",
    "verdict",
    "verdict_class",
    "verdict_columns",
]


@dataclass(frozen=True, slots=True)
class Field:
    """``width`` bits at ``shift``; width 0 is an open-ended top field (an address)."""

    name: str
    shift: int
    width: int
    # Derived once (hot loops read them): the unshifted mask (-1, all bits, for an open field)
    # and the field's bits in place (open fields: up to bit 255).
    bits: int = field(init=False, repr=False, compare=False)
    mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        width = self.width or 256 - self.shift
        object.__setattr__(self, "bits", (1 << self.width) - 1 if self.width else -1)
        object.__setattr__(self, "mask", ((1 << width) - 1) << self.shift)

    def get(self, value: int) -> int:
        return (value >> self.shift) & self.bits

    def put(self, v: int) -> int:
        if v < 0 or (self.width and v >> self.width):
            raise ValueError(f"{self.name}: {v} does not fit in {self.width} bits")
        return v << self.shift


# -- a code ------------------------------------------------------------------------------------
PORT_HI = Field("port_hi", 0, 16)
PORT_LO = Field("port_lo", 16, 16)
HAS_PORTS = Field("has_ports", 32, 1)
PROTO = Field("proto", 33, 8)
VERDICT = Field("verdict", 41, 2)
LIMIT = Field("limit", 43, 1)
TCP_MASK = Field("tcp_mask", 44, 8)
TCP_WANT = Field("tcp_want", 52, 8)
KEY = Field("key", 60, 0)
CODE_FIELDS = (PORT_HI, PORT_LO, HAS_PORTS, PROTO, VERDICT, LIMIT, TCP_MASK, TCP_WANT, KEY)
# VERDICT and LIMIT read together: the slot's verdict byte (abi.VERDICT_*).
_SLOT_VERDICT_BITS = (1 << (VERDICT.width + LIMIT.width)) - 1
assert LIMIT.shift == VERDICT.shift + VERDICT.width
assert abi.VERDICT_DROP | 1 << VERDICT.width == abi.VERDICT_LIMIT
assert abi.VERDICT_MONITOR | 1 << VERDICT.width == abi.VERDICT_LIMIT_MONITOR

# TCP flag bits (byte 13 of the TCP header, RFC 9293 + RFC 3168), by name.
TCP_FLAG_NAMES = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10,
                  "URG": 0x20, "ECE": 0x40, "CWR": 0x80}
TCP_SYN = TCP_FLAG_NAMES["SYN"]
TCP_ACK = TCP_FLAG_NAMES["ACK"]

# -- a key -------------------------------------------------------------------------------------
DIR = Field("dir", 0, 2)
V6 = Field("v6", 2, 1)
PLEN = Field("plen", 3, 8)
ADDR = Field("addr", 11, 0)
KEY_FIELDS = (DIR, V6, PLEN, ADDR)
TABLE_BITS = DIR.mask | V6.mask  # direction and family: with exact/prefix, the table

DIR_NONE = 0
DIR_SRC = 1
DIR_DST = 2

ADDR_BITS_V4 = 32  # address width per family: a prefix this long is a host (exact table)
ADDR_BITS_V6 = 128

# -- a trie position ---------------------------------------------------------------------------
TRIE_PLEN = Field("plen", 0, 8)
TRIE_ADDR = Field("addr", 8, 0)

# -- a rank (bpf/xdpfw_abi.h) ------------------------------------------------------------------
RANK_ID = Field("id_inv", 0, 29)
RANK_NARROW = Field("narrow", 29, 16)
RANK_PROTO = Field("proto_named", 45, 1)
RANK_DST_PLEN = Field("dst_plen", 46, 8)
RANK_SRC_PLEN = Field("src_plen", 54, 8)
RANK_VERDICT = Field("verdict", 62, 2)
RANK_FIELDS = (RANK_ID, RANK_NARROW, RANK_PROTO, RANK_DST_PLEN, RANK_SRC_PLEN, RANK_VERDICT)

# The rank's verdict class of each slot verdict: allow > drop > limit > monitor.
VERDICT_CLASS = {
    abi.VERDICT_ALLOW: 3,
    abi.VERDICT_DROP: 2,
    abi.VERDICT_LIMIT: 1,
    abi.VERDICT_MONITOR: 0,
    abi.VERDICT_LIMIT_MONITOR: 0,
}
_CLASS_OF = tuple(VERDICT_CLASS.get(v, 0) for v in range(_SLOT_VERDICT_BITS + 1))

MAX_RULE_ID = RANK_ID.bits
assert MAX_RULE_ID == abi.RANK_ID_MASK

PORT_SPAN = PORT_HI.bits + 1  # ports 0-65535: RANK_NARROW is PORT_SPAN - a range's width
# Everything but the key and the drop/allow/monitor verdict; zero: is_plain.
PROTO_PORTS = (
    PORT_HI.mask | PORT_LO.mask | HAS_PORTS.mask | PROTO.mask | LIMIT.mask | TCP_MASK.mask
    | TCP_WANT.mask
)


# -- keys --------------------------------------------------------------------------------------


def pack_key(addr: int, plen: int, *, v6: bool, direction: int) -> int:
    """The key of a network in a direction (DIR_SRC or DIR_DST)."""
    return (addr << ADDR.shift) | (plen << PLEN.shift) | (v6 << V6.shift) | direction


def key_dir(k: int) -> int:
    return k & DIR.bits


def key_v6(k: int) -> bool:
    return bool(k & V6.mask)


def key_plen(k: int) -> int:
    return (k >> PLEN.shift) & PLEN.bits


def key_addr(k: int) -> int:
    return k >> ADDR.shift


def key_table(k: int) -> int:
    """The key's ``TABLE_BITS`` (direction and family)."""
    return k & TABLE_BITS


def key_bits(k: int) -> int:
    """Address width of the key's family: 32 or 128."""
    return ADDR_BITS_V6 if k & V6.mask else ADDR_BITS_V4


def key_is_exact(k: int) -> bool:
    """A host (/32, /128): lives in a hash table, not a trie."""
    return k != 0 and key_plen(k) == key_bits(k)


def key_is_prefix(k: int) -> bool:
    """A shorter prefix: lives in an LPM trie."""
    return k != 0 and key_plen(k) != key_bits(k)


def trie_position(k: int) -> int:
    """The key's place in its trie's sorted list (address order, then length)."""
    return ((k >> ADDR.shift) << TRIE_ADDR.shift) | ((k >> PLEN.shift) & PLEN.bits)


def trie_key(position: int, table_bits: int) -> int:
    """The key back from a trie position and the trie's ``key & TABLE_BITS``."""
    return (
        ((position >> TRIE_ADDR.shift) << ADDR.shift)
        | ((position & TRIE_PLEN.bits) << PLEN.shift)
        | table_bits
    )


# -- codes -------------------------------------------------------------------------------------


class Unpacked(NamedTuple):
    key: int
    verdict: int
    proto: int
    ports: tuple[int, int] | None


def pack(
    k: int,
    verdict: int,
    proto: int = 0,
    ports: tuple[int, int] | None = None,
    tcp: tuple[int, int] | None = None,
) -> int:
    """The code of a rule: entry key, slot verdict (abi.VERDICT_*), protocol number (0 any),
    dport range, TCP flags as (mask, want)."""
    code = (k << KEY.shift) | (verdict << VERDICT.shift) | (proto << PROTO.shift)
    if ports is not None:
        code |= HAS_PORTS.mask | (ports[0] << PORT_LO.shift) | ports[1]
    if tcp is not None and tcp[0]:
        code |= (tcp[0] << TCP_MASK.shift) | (tcp[1] << TCP_WANT.shift)
    return code


def unpack(code: int) -> Unpacked:
    """All of a code's fields but the TCP flags in one call (bulk loads unpack every rule)."""
    has_ports = code & HAS_PORTS.mask
    return _tuple_new(
        Unpacked,
        (
            code >> KEY.shift,
            (code >> VERDICT.shift) & _SLOT_VERDICT_BITS,
            (code >> PROTO.shift) & PROTO.bits,
            ((code >> PORT_LO.shift) & PORT_LO.bits, code & PORT_HI.bits) if has_ports else None,
        ),
    )


def tcp_flags(code: int) -> tuple[int, int] | None:
    """(mask, want) of a rule's TCP flag match; None when it names no flags."""
    mask = (code >> TCP_MASK.shift) & TCP_MASK.bits
    return (mask, (code >> TCP_WANT.shift) & TCP_WANT.bits) if mask else None


def verdict_class(verdict: int) -> int:
    """The rank's class of a slot verdict (allow 3, drop 2, limit 1, monitor 0)."""
    return _CLASS_OF[verdict]


_tuple_new = tuple.__new__


def key(code: int) -> int:
    return code >> KEY.shift


def code_of_key(k: int) -> int:
    """The key in its place in a code (the code's other fields zero)."""
    return k << KEY.shift


def verdict(code: int) -> int:
    """The slot verdict (abi.VERDICT_*, limit rules included)."""
    return (code >> VERDICT.shift) & _SLOT_VERDICT_BITS


def proto(code: int) -> int:
    return (code >> PROTO.shift) & PROTO.bits


def ports(code: int) -> tuple[int, int] | None:
    if not code & HAS_PORTS.mask:
        return None
    return (code >> PORT_LO.shift) & PORT_LO.bits, code & PORT_HI.bits


def is_plain(code: int) -> bool:
    """A network and a verdict only (no protocol or ports): a blocklist entry."""
    return not code & PROTO_PORTS


def net_code(addr: int, plen: int, *, v6: bool, direction: int, verdict: int) -> int:
    """The code of a rule naming only a network (a blocklist entry; once per line of a list)."""
    k = (addr << ADDR.shift) | (plen << PLEN.shift) | (v6 << V6.shift) | direction  # pack_key
    return (k << KEY.shift) | (verdict << VERDICT.shift)


# -- ranks -------------------------------------------------------------------------------------


def rank(code: int, rule_id: int) -> int:
    """The data plane's priority of the rule with this code and id (layout above)."""
    k = code >> KEY.shift
    plen = (k >> PLEN.shift) & PLEN.bits
    direction = k & DIR.bits
    narrow = 0
    if code & HAS_PORTS.mask:
        lo = (code >> PORT_LO.shift) & PORT_LO.bits
        hi = code & PORT_HI.bits
        narrow = PORT_SPAN - (hi - lo + 1)
    return (
        (_CLASS_OF[(code >> VERDICT.shift) & _SLOT_VERDICT_BITS] << RANK_VERDICT.shift)
        | ((plen if direction == DIR_SRC else 0) << RANK_SRC_PLEN.shift)
        | ((plen if direction == DIR_DST else 0) << RANK_DST_PLEN.shift)
        | ((1 if code & PROTO.mask else 0) << RANK_PROTO.shift)
        | (narrow << RANK_NARROW.shift)
        | (RANK_ID.bits - rule_id + 1)
    )


# -- columns (bulk loads) -------------------------------------------------------------------------
# A code is wider than 64 bits (its key holds the address), but everything below the key's
# address fits: LOW_BITS (the code's own fields) and the key's DIR, V6 and PLEN. Bulk paths
# split each code once into those columns and let numpy do the arithmetic.

CODE_LOW = (1 << KEY.shift) - 1  # code & CODE_LOW: ports, protocol, verdict
KEY_LOW = (1 << ADDR.shift) - 1  # key & KEY_LOW: direction, family, prefix length


def rank_columns(low: Any, key_low: Any, rule_ids: Any) -> Any:
    """`rank` over numpy columns: ``low`` = code & CODE_LOW (uint64), ``key_low`` = key &
    KEY_LOW, ``rule_ids``; returns the ranks (uint64). tests/test_bulk.py checks it equals
    `rank` element by element."""
    import numpy as np

    u64 = np.uint64
    low = low.astype(u64, copy=False)
    kl = key_low.astype(u64, copy=False)
    plen = (kl >> u64(PLEN.shift)) & u64(PLEN.bits)
    direction = kl & u64(DIR.bits)
    zero = u64(0)
    has_ports = (low >> u64(HAS_PORTS.shift)) & u64(HAS_PORTS.bits)
    lo = (low >> u64(PORT_LO.shift)) & u64(PORT_LO.bits)
    hi = low & u64(PORT_HI.bits)
    narrow = np.where(has_ports == u64(1), u64(PORT_SPAN) - (hi - lo + u64(1)), zero)
    proto_named = (((low >> u64(PROTO.shift)) & u64(PROTO.bits)) != zero).astype(u64)
    classes = np.array(_CLASS_OF, dtype=u64)  # slot verdict -> rank class (allow 3 ... 0)
    verdict = (low >> u64(VERDICT.shift)) & u64(_SLOT_VERDICT_BITS)
    out: Any = (
        (classes[verdict.astype(np.intp)] << u64(RANK_VERDICT.shift))
        | (np.where(direction == u64(DIR_SRC), plen, zero) << u64(RANK_SRC_PLEN.shift))
        | (np.where(direction == u64(DIR_DST), plen, zero) << u64(RANK_DST_PLEN.shift))
        | (proto_named << u64(RANK_PROTO.shift))
        | (narrow << u64(RANK_NARROW.shift))
        | (u64(RANK_ID.bits) - rule_ids.astype(u64, copy=False) + u64(1))
    )
    return out


def verdict_columns(low: Any) -> Any:
    """`verdict` (the slot's verdict byte: VERDICT with LIMIT) over a numpy column of
    code & CODE_LOW."""
    import numpy as np

    return (low.astype(np.uint64, copy=False) >> np.uint64(VERDICT.shift)) & np.uint64(
        _SLOT_VERDICT_BITS
    )


def rank_plens(r: int) -> tuple[int, int]:
    """(source, destination) prefix lengths a rank carries."""
    return RANK_SRC_PLEN.get(r), RANK_DST_PLEN.get(r)


def from_slot(
    k: int,
    r: int,
    *,
    verdict: int,
    proto: int,
    ports: tuple[int, int] | None,
    tcp: tuple[int, int] | None = None,
) -> int | None:
    """The code of a slot found in the entry with key ``k``; None when the slot is inherited.

    A trie entry also carries the slots of the shorter prefixes that cover it; the rank's
    prefix length tells a slot of the entry's own rule from one of a covering rule.
    """
    src_len, dst_len = rank_plens(r)
    direction = k & DIR.bits
    if direction == DIR_NONE:
        if src_len or dst_len:
            return None
    else:
        own = src_len if direction == DIR_SRC else dst_len
        if own != key_plen(k):
            return None
    return pack(k, verdict, proto, ports, tcp)
