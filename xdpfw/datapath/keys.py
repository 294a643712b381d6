"""Map keys as bytes: a TableKey or a compact key (xdpfw.codes) to a lookup table's key and back.

An exact table (xdpfw_src4 ...) is keyed by the address (big-endian), a trie by
struct bpf_lpm_trie_key (prefix length in host order, then the address), the address-less
table xdpfw_any by element 0.
"""

from __future__ import annotations

import numpy as np

from xdpfw import codes
from xdpfw.abi import Table
from xdpfw.compiler import LPM_TABLES, HostBatch, TableKey
from xdpfw.datapath.slots import U32

__all__ = [
    "LPM4_KEY",
    "SRC_TABLES",
    "batch_keys",
    "compact_key",
    "decode_key",
    "encode_key",
    "table_key",
]

SRC_TABLES = frozenset({Table.SRC4, Table.SRC6, Table.SRC4_LPM, Table.SRC6_LPM})
_ANY_KEY = U32.pack(0)


def encode_key(key: TableKey) -> bytes:
    """The map key of a table entry."""
    if key.table is Table.ANY:
        return _ANY_KEY
    if key.table in LPM_TABLES:
        return U32.pack(key.plen) + key.addr
    return key.addr


def decode_key(table: Table, raw: bytes) -> TableKey:
    """The table entry of a map key."""
    if table is Table.ANY:
        return TableKey(Table.ANY)
    if table in LPM_TABLES:
        (plen,) = U32.unpack_from(raw)
        return TableKey(table, bytes(raw[U32.size :]), plen)
    return TableKey(table, bytes(raw), len(raw) * 8)


def compact_key(table: Table, raw: bytes) -> int:
    """The compact key (codes.pack_key) of a map key; 0 for the address-less table."""
    if table is Table.ANY:
        return 0
    if table in LPM_TABLES:
        (plen,) = U32.unpack_from(raw)
        addr = raw[U32.size :]
    else:
        addr, plen = raw, len(raw) * 8
    direction = codes.DIR_SRC if table in SRC_TABLES else codes.DIR_DST
    return codes.pack_key(
        int.from_bytes(addr, "big"), plen, v6=len(addr) == 16, direction=direction
    )


def table_key(table: Table, k: int) -> TableKey:
    """The TableKey of compact key `k` in `table`."""
    if table is Table.ANY:
        return TableKey(Table.ANY)
    width = 16 if codes.key_v6(k) else 4
    return TableKey(table, codes.key_addr(k).to_bytes(width, "big"), codes.key_plen(k))


# struct bpf_lpm_trie_key for IPv4: the prefix length in host order, then the address.
LPM4_KEY = np.dtype([("plen", "=u4"), ("addr", ">u4")])
_V4_EXACT = frozenset({Table.SRC4, Table.DST4})


def batch_keys(batch: HostBatch) -> bytes:
    """The map keys of a column batch's entries, back to back (`encode_key` of each)."""
    shift = codes.ADDR.shift
    if batch.table in _V4_EXACT:
        return np.fromiter((k >> shift for k in batch.keys), ">u4", len(batch.keys)).tobytes()
    if batch.table in LPM_TABLES and not any(codes.key_v6(k) for k in batch.keys[:1]):
        out = np.zeros(len(batch.keys), dtype=LPM4_KEY)
        out["plen"] = (batch.key_low >> np.uint64(codes.PLEN.shift)) & np.uint64(codes.PLEN.bits)
        out["addr"] = np.fromiter((k >> shift for k in batch.keys), ">u4", len(batch.keys))
        return out.tobytes()
    return b"".join(encode_key(table_key(batch.table, k)) for k in batch.keys)
