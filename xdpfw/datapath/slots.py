"""Slots and entries as bytes: the byte layout comes from abi.Slot / abi.Entry, never a copy.

A lookup-table value (struct xdpfw_entry) is the entry's first slot plus the id of the rule
set holding the others (struct xdpfw_set: SET_SLOTS slots). Writing a million of them goes
through `struct`, not a ctypes object each, so `struct_of` derives a `struct.Struct` from the
ctypes mirror: the same fields at the same offsets, `pad` fields skipped. Reading a slot back
turns it into the rule's code with `codes.from_slot`.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import numpy as np

from xdpfw import abi, codes
from xdpfw.rules import Rule

__all__ = [
    "ENTRY",
    "ENTRY_DTYPE",
    "ENTRY_SET_ID",
    "SLOT",
    "U32",
    "entry_bytes",
    "entry_columns",
    "read_slot",
    "slot_bytes",
    "slot_fields",
    "struct_of",
]

_CHARS: dict[Any, str] = {
    ctypes.c_uint8: "B",
    ctypes.c_uint16: "H",
    ctypes.c_uint32: "I",
    ctypes.c_uint64: "Q",
}


def _format(ctype: type[ctypes.Structure], base: int) -> tuple[str, int]:
    """(struct format, end offset) of ctype's fields laid out from offset `base`."""
    out, at = [], base
    for name, ftype, *_ in ctype._fields_:
        off = base + getattr(ctype, name).offset
        out.append("x" * (off - at))  # implicit padding
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            fmt, at = _format(ftype, off)
            out.append(fmt)
            continue
        size = ctypes.sizeof(ftype)
        out.append("x" * size if name == "pad" else _CHARS[ftype])  # pad: a byte or an array
        at = off + size
    return "".join(out), at


def struct_of(ctype: type[ctypes.Structure]) -> struct.Struct:
    """A native-order struct.Struct of ctype's layout (nested structs flattened, `pad` skipped)."""
    fmt, end = _format(ctype, 0)
    fmt += "x" * (ctypes.sizeof(ctype) - end)
    s = struct.Struct("=" + fmt)
    assert s.size == ctypes.sizeof(ctype), (ctype.__name__, fmt)
    return s


# rank, rule_id, port_lo, port_hi, proto, verdict, has_ports, tcp_mask, counter, tcp_want
SLOT = struct_of(abi.Slot)
ENTRY = struct_of(abi.Entry)  # the first slot's fields, then set_id
ENTRY_SET_ID = abi.Entry.set_id.offset
U32 = struct.Struct("=I")  # an array index or a set id as a map key


def slot_fields(rule: Rule, counter: int) -> tuple[int, ...]:
    """The values of SLOT for a rule whose counter index is `counter`, in SLOT's order."""
    ports = rule.dport
    return (
        rule.rank(),
        rule.id,
        ports.lo if ports is not None else 0,
        ports.hi if ports is not None else 0,
        rule.proto.number if rule.proto is not None else 0,
        rule.verdict,
        1 if ports is not None else 0,
        rule.tcp_flags.mask if rule.tcp_flags is not None else 0,
        counter,
        rule.tcp_flags.want if rule.tcp_flags is not None else 0,
    )


def slot_bytes(rule: Rule, counter: int) -> bytes:
    """struct xdpfw_slot of a rule whose counter index is `counter`."""
    return SLOT.pack(*slot_fields(rule, counter))


def entry_bytes(first: Rule, counter: int, set_id: int) -> bytes:
    """struct xdpfw_entry: the first slot and the rule set of the rest (0 = none)."""
    return ENTRY.pack(*slot_fields(first, counter), set_id)


ENTRY_DTYPE = np.dtype(abi.Entry)  # the same layout for numpy (bulk writes)


def entry_columns(rule_ids: Any, low: Any, key_low: Any, counters: Any) -> bytes:
    """struct xdpfw_entry of many one-slot entries at once (no rule set), back to back:
    ``rule_ids``, ``low`` (code & codes.CODE_LOW), ``key_low`` (key & codes.KEY_LOW) and the
    counter indices as numpy columns. The same bytes as `entry_bytes` of each rule
    (tests/test_bulk.py checks it)."""
    u64 = np.uint64
    low = low.astype(u64, copy=False)
    out = np.zeros(len(rule_ids), dtype=ENTRY_DTYPE)
    first = out["first"]
    first["rank"] = codes.rank_columns(low, key_low, rule_ids)
    first["rule_id"] = rule_ids
    has_ports = (low >> u64(codes.HAS_PORTS.shift)) & u64(codes.HAS_PORTS.bits)
    first["port_lo"] = np.where(has_ports == u64(1), (low >> u64(codes.PORT_LO.shift))
                                & u64(codes.PORT_LO.bits), u64(0))
    first["port_hi"] = np.where(has_ports == u64(1), low & u64(codes.PORT_HI.bits), u64(0))
    first["proto"] = (low >> u64(codes.PROTO.shift)) & u64(codes.PROTO.bits)
    first["verdict"] = codes.verdict_columns(low)
    first["has_ports"] = has_ports
    first["tcp_mask"] = (low >> u64(codes.TCP_MASK.shift)) & u64(codes.TCP_MASK.bits)
    first["tcp_want"] = (low >> u64(codes.TCP_WANT.shift)) & u64(codes.TCP_WANT.bits)
    first["counter"] = counters
    return out.tobytes()


# codes.from_slot's fields, bound once: adoption reads every slot of a million-rule set.
_SRC_PLEN, _DST_PLEN = codes.RANK_SRC_PLEN.shift, codes.RANK_DST_PLEN.shift
_RANK_PLEN_BITS = codes.RANK_SRC_PLEN.bits
_KEY_PLEN, _KEY_PLEN_BITS = codes.PLEN.shift, codes.PLEN.bits
_DIR_BITS = codes.DIR.bits
_KEY, _VERDICT, _PROTO = codes.KEY.shift, codes.VERDICT.shift, codes.PROTO.shift
_HAS_PORTS, _PORT_LO = codes.HAS_PORTS.mask, codes.PORT_LO.shift
_TCP_MASK, _TCP_WANT = codes.TCP_MASK.shift, codes.TCP_WANT.shift


def read_slot(k: int, raw: bytes, off: int) -> tuple[int, int, int, int]:
    """(rank, rule id, code, counter index) of the slot at raw[off:] in the entry with compact
    key `k`; code -1 when the slot is inherited from a covering prefix, rank 0 = unused.

    `codes.from_slot` with its fields bound to locals (tests/test_datapath_pure.py checks
    the two agree): the rank's prefix length tells the entry's own rule from a covering one.
    """
    r, rule_id, lo, hi, proto, verdict, has_ports, tcp_mask, counter, tcp_want = (
        SLOT.unpack_from(raw, off)
    )
    if not r:
        return r, rule_id, -1, counter
    src_len = (r >> _SRC_PLEN) & _RANK_PLEN_BITS
    dst_len = (r >> _DST_PLEN) & _RANK_PLEN_BITS
    direction = k & _DIR_BITS
    if direction == codes.DIR_NONE:
        if src_len or dst_len:
            return r, rule_id, -1, counter
    elif (src_len if direction == codes.DIR_SRC else dst_len) != (k >> _KEY_PLEN) & _KEY_PLEN_BITS:
        return r, rule_id, -1, counter
    code = (k << _KEY) | (verdict << _VERDICT) | (proto << _PROTO)
    if has_ports:
        code |= _HAS_PORTS | (lo << _PORT_LO) | hi
    if tcp_mask:
        code |= (tcp_mask << _TCP_MASK) | (tcp_want << _TCP_WANT)
    return r, rule_id, code, counter
