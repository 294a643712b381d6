"""The datapath's byte forms against their owners (pure layer): slots and entries against the
ctypes mirror in xdpfw/abi.py, slot and key decoding against xdpfw/codes.py."""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

import pytest

from xdpfw import abi, codes
from xdpfw.abi import Table
from xdpfw.compiler import TableKey, key_of
from xdpfw.datapath.keys import compact_key, decode_key, encode_key, table_key
from xdpfw.datapath.slots import ENTRY, ENTRY_SET_ID, SLOT, entry_bytes, read_slot, struct_of
from xdpfw.rules import RuleSpec

pytestmark = pytest.mark.pure

_SLOT_FIELDS = [f[0] for f in abi.Slot._fields_ if f[0] != "pad"]


def test_slot_and_entry_structs_have_the_mirrors_layout() -> None:
    assert SLOT.size == ctypes.sizeof(abi.Slot) and ENTRY.size == ctypes.sizeof(abi.Entry)
    values = [(i + 1) * 0x0101 & 0xFF for i in range(len(_SLOT_FIELDS))]
    values[0] = 0x1122334455667788  # rank
    values[_SLOT_FIELDS.index("counter")] = 0xA1B2C3D4
    slot = abi.Slot.from_buffer_copy(SLOT.pack(*values))
    assert [getattr(slot, f) for f in _SLOT_FIELDS] == values and not any(bytes(slot.pad))
    entry = abi.Entry.from_buffer_copy(ENTRY.pack(*values, 4242))
    assert [getattr(entry.first, f) for f in _SLOT_FIELDS] == values
    assert entry.set_id == 4242 and entry.pad == 0
    assert abi.Entry.set_id.offset == ENTRY_SET_ID


def test_struct_of_follows_offsets_and_skips_pad() -> None:
    class Odd(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint32), ("pad", ctypes.c_uint16)]

    s = struct_of(Odd)
    assert s.size == ctypes.sizeof(Odd) == 12
    odd = Odd.from_buffer_copy(s.pack(7, 0xDEADBEEF))
    assert (odd.a, odd.b, odd.pad) == (7, 0xDEADBEEF, 0)


def test_entry_bytes_carry_the_rules_rank_and_the_set() -> None:
    rule = RuleSpec.parse(src="198.18.0.0/15", proto="tcp", dport="80-90").with_id(77)
    entry = abi.Entry.from_buffer_copy(entry_bytes(rule, 5, 9))
    assert entry.first.rank == codes.rank(rule.code(), 77) and entry.first.rule_id == 77
    assert (entry.first.port_lo, entry.first.port_hi, entry.first.has_ports) == (80, 90, 1)
    assert (entry.first.counter, entry.set_id) == (5, 9)


def _random_key(rng: random.Random) -> int:
    if rng.random() < 0.1:
        return 0
    v6 = rng.random() < 0.5
    bits = 128 if v6 else 32
    plen = rng.choice([0, 1, 8, 16, 24, bits - 1, bits])
    addr = rng.getrandbits(bits) >> (bits - plen) << (bits - plen) if plen else 0
    return codes.pack_key(addr, plen, v6=v6, direction=rng.choice([codes.DIR_SRC, codes.DIR_DST]))


def test_read_slot_agrees_with_codes_from_slot() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        k = _random_key(rng)
        own = rng.random() < 0.6
        plen = codes.key_plen(k) if own and k else rng.randrange(129)
        src, dst = (plen, 0) if codes.key_dir(k) == codes.DIR_SRC else (0, plen)
        if not k and own:
            src = dst = 0
        r = (
            codes.RANK_VERDICT.put(rng.randrange(1, 4))
            | codes.RANK_SRC_PLEN.put(src)
            | codes.RANK_DST_PLEN.put(dst)
            | codes.RANK_ID.put(rng.randrange(1, abi.RANK_ID_MASK))
        )
        ports = None
        if rng.random() < 0.5:
            lo = rng.randrange(65536)
            ports = (lo, rng.randrange(lo, 65536))
        verdict = rng.choice([1, 2, 3, abi.VERDICT_LIMIT, abi.VERDICT_LIMIT_MONITOR])
        proto = rng.choice([0, 6, 17])
        tcp = None
        if proto == 6 and rng.random() < 0.5:
            mask = rng.randrange(1, 256)
            tcp = (mask, rng.randrange(256) & mask)
        mask, want_flags = tcp or (0, 0)
        raw = SLOT.pack(
            r, 42, *(ports or (0, 0)), proto, verdict, ports is not None, mask, 3, want_flags
        )
        want = codes.from_slot(k, r, verdict=verdict, proto=proto, ports=ports, tcp=tcp)
        assert read_slot(k, raw, 0) == (r, 42, -1 if want is None else want, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"src": "198.18.0.0/15"},
        {"dst": "198.18.7.9"},
        {"src": "2001:db8::/32"},
        {"dst": "2001:db8::1"},
        {"proto": "udp"},
    ],
)
def test_keys_round_trip(kwargs: dict[str, str]) -> None:
    rule = RuleSpec.parse(**kwargs).with_id(1)
    key = key_of(rule)
    raw = encode_key(key)
    assert decode_key(key.table, raw) == key
    k = compact_key(key.table, raw)
    assert k == codes.key(rule.code())
    assert table_key(key.table, k) == key


def test_the_any_table_is_element_zero() -> None:
    assert encode_key(TableKey(Table.ANY)) == bytes(4)
    assert compact_key(Table.ANY, bytes(4)) == 0


def test_stale_staging_of_a_killed_load_is_removed(tmp_path: Path) -> None:
    """A compile killed mid-load leaves `<pins>-loading-<pid>`; the next open removes it,
    and only it (a live process's staging and other directories stay)."""
    import subprocess

    from xdpfw.datapath import pins

    pin_dir = tmp_path / "xdpfw"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"xdpfw-loading-{dead.pid}"
    live = tmp_path / f"xdpfw-loading-{os.getppid()}"
    other = tmp_path / "xdpfw-other-loading-1"
    for d in (stale, live, other):
        d.mkdir()
        (d / "prog").write_text("")
    assert pins.remove_stale_staging(pin_dir) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
