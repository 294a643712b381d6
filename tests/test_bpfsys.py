"""Tests for xdpfw.kernel.bpfsys against the real kernel (root only)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from xdpfw.kernel import bpfsys
from xdpfw.kernel.bpfsys import (
    BPF_EXIST,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_NOEXIST,
    BpfError,
    Map,
)
from xdpfw.kernel.kheaders import ensure_kernel_headers

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) tests need root"),
]

BPFFS = "/sys/fs/bpf"


class Val(ctypes.Structure):
    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


class LpmKey(ctypes.Structure):
    _fields_ = (("prefixlen", ctypes.c_uint32), ("data", ctypes.c_uint8 * 4))


def lpm_key(prefix: str, plen: int) -> LpmKey:
    key = LpmKey(prefixlen=plen)
    for i, octet in enumerate(prefix.split(".")):
        key.data[i] = int(octet)
    return key


def _new_map(
    map_type: int,
    key_type: Any,
    value_type: Any,
    max_entries: int,
    flags: int = 0,
    name: str = "",
) -> Map[Any, Any]:
    fd = bpfsys.map_create(
        map_type,
        ctypes.sizeof(key_type),
        ctypes.sizeof(value_type),
        max_entries,
        flags,
        name,
    )
    return Map(fd, name, key_type, value_type)


@pytest.fixture
def hmap() -> Iterator[Map[ctypes.c_uint32, Val]]:
    with _new_map(BPF_MAP_TYPE_HASH, ctypes.c_uint32, Val, 16384, name="t_hash") as m:
        yield m


@pytest.fixture
def lpm() -> Iterator[Map[LpmKey, ctypes.c_uint32]]:
    with _new_map(
        BPF_MAP_TYPE_LPM_TRIE, LpmKey, ctypes.c_uint32, 64, BPF_F_NO_PREALLOC, "t_lpm"
    ) as m:
        yield m


def _bpffs_mounted() -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(
            len(parts) > 2 and parts[1] == BPFFS and parts[2] == "bpf"
            for parts in (line.split() for line in f)
        )


@pytest.fixture(scope="module")
def bpffs() -> str:
    if not _bpffs_mounted():
        # Left mounted afterwards: it is the standard location and other users may
        # have started pinning there in the meantime.
        subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)
    return BPFFS


@pytest.fixture(scope="module")
def xdp_drop_fd() -> Iterator[int]:
    ensure_kernel_headers()  # as xdpfw.kernel.loader does before bcc compiles anything
    bcc = pytest.importorskip("bcc")
    b = bcc.BPF(text=b"int f(struct xdp_md *c) { return XDP_DROP; }")
    try:
        fn = b.load_func(b"f", bcc.BPF.XDP)
        yield int(fn.fd)
    finally:
        b.cleanup()


# --- pure helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "count"), [("0", 1), ("0-1\n", 2), ("0,2-3", 3), ("0-3,8-11", 8)])
def test_parse_cpu_list(text: str, count: int) -> None:
    assert bpfsys._parse_cpu_list(text) == count


def test_possible_cpus_matches_sysfs() -> None:
    assert bpfsys.possible_cpus() >= (os.cpu_count() or 1)  # possible >= online


def test_cmd_values() -> None:
    assert int(bpfsys.Cmd.PROG_TEST_RUN) == 10
    assert int(bpfsys.Cmd.OBJ_GET_INFO_BY_FD) == 15
    assert int(bpfsys.Cmd.MAP_UPDATE_BATCH) == 26
    assert int(bpfsys.Cmd.ENABLE_STATS) == 32


def test_error_str_and_type() -> None:
    e = BpfError(errno.E2BIG, op="BPF_MAP_UPDATE_ELEM", target="xdpfw_src4")
    assert isinstance(e, OSError)
    assert e.errno == errno.E2BIG
    assert str(e) == "BPF_MAP_UPDATE_ELEM on xdpfw_src4: [Errno 7] Argument list too long"
    assert "ENOTSUPP" in str(BpfError(bpfsys.ENOTSUPP, op="X"))


# --- maps -------------------------------------------------------------------------------


def test_map_create_name_too_long() -> None:
    with pytest.raises(ValueError):
        bpfsys.map_create(BPF_MAP_TYPE_HASH, 4, 4, 1, name="x" * 16)


def test_map_info(lpm: Map[LpmKey, ctypes.c_uint32]) -> None:
    info = bpfsys.map_info(lpm.fd)
    assert info.type == BPF_MAP_TYPE_LPM_TRIE
    assert info.name == "t_lpm"
    assert (info.key_size, info.value_size, info.max_entries) == (8, 4, 64)
    assert info.map_flags == BPF_F_NO_PREALLOC
    assert info.id > 0
    assert info.id in set(bpfsys.map_ids())


def test_map_rejects_wrong_types() -> None:
    fd = bpfsys.map_create(BPF_MAP_TYPE_HASH, 4, 16, 4, name="t_types")
    try:
        with pytest.raises(ValueError, match="key_size"):
            Map(fd, "t_types", ctypes.c_uint64, Val)
        with pytest.raises(ValueError, match="per-CPU"):
            Map(fd, "t_types", ctypes.c_uint32, Val, percpu=True)
    finally:
        os.close(fd)


def test_roundtrip(hmap: Map[ctypes.c_uint32, Val]) -> None:
    key = ctypes.c_uint32(7)
    assert hmap.lookup(key) is None
    hmap.update(key, Val(packets=1, bytes=64))
    got = hmap.lookup(key)
    assert got is not None
    assert isinstance(got, Val)
    assert (got.packets, got.bytes) == (1, 64)
    # raw bytes are accepted for keys and values
    hmap.update((7).to_bytes(4, "little"), bytes(Val(packets=2, bytes=128)), BPF_EXIST)
    got = hmap.lookup(b"\x07\0\0\0")
    assert got is not None and got.packets == 2
    assert key in hmap
    with pytest.raises(BpfError) as ei:
        hmap.update(key, Val(), BPF_NOEXIST)
    assert ei.value.errno == errno.EEXIST
    assert "BPF_MAP_UPDATE_ELEM on t_hash" in str(ei.value)
    assert hmap.delete(key) is True
    assert hmap.delete(key) is False
    assert hmap.lookup(key) is None
    with pytest.raises(ValueError):
        hmap.lookup(b"\0\0")
    with pytest.raises(TypeError):
        hmap.lookup(ctypes.c_uint64(7))  # type: ignore[arg-type]


def test_full_map_error_message() -> None:
    with _new_map(BPF_MAP_TYPE_HASH, ctypes.c_uint32, ctypes.c_uint32, 2, name="t_full") as m:
        m.update(ctypes.c_uint32(1), ctypes.c_uint32(1))
        m.update(ctypes.c_uint32(2), ctypes.c_uint32(2))
        with pytest.raises(BpfError) as ei:
            m.update(ctypes.c_uint32(3), ctypes.c_uint32(3))
    assert ei.value.errno == errno.E2BIG
    assert str(ei.value) == "BPF_MAP_UPDATE_ELEM on t_full: [Errno 7] Argument list too long"


def test_keys_iteration(hmap: Map[ctypes.c_uint32, Val]) -> None:
    assert list(hmap.keys()) == []
    for i in range(100):
        hmap.update(ctypes.c_uint32(i * 3), Val(packets=i))
    keys = [k.value for k in hmap]
    assert sorted(keys) == [i * 3 for i in range(100)]
    assert {k.value: v.packets for k, v in hmap.items()} == {i * 3: i for i in range(100)}


def test_array_keys() -> None:
    with _new_map(BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, ctypes.c_uint64, 5, name="t_arr") as m:
        assert [k.value for k in m] == [0, 1, 2, 3, 4]
        m.update(ctypes.c_uint32(3), ctypes.c_uint64(99))
        assert [v.value for _, v in m.items()] == [0, 0, 0, 99, 0]


@pytest.mark.parametrize("map_type", [BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY])
def test_percpu(map_type: int) -> None:
    ncpus = bpfsys.possible_cpus()
    # a 4-byte value checks the 8-byte per-CPU stride
    with _new_map(map_type, ctypes.c_uint32, ctypes.c_uint32, 8, name="t_pcpu") as m:
        assert m.percpu and m.ncpus == ncpus
        key = ctypes.c_uint32(1)
        m.update(key, ctypes.c_uint32(5))
        got = m.lookup_percpu(key)
        assert got is not None
        assert [v.value for v in got] == [5] * ncpus
        m.update_percpu(key, [ctypes.c_uint32(100 + cpu) for cpu in range(ncpus)])
        got = m.lookup_percpu(key)
        assert got is not None
        assert [v.value for v in got] == [100 + cpu for cpu in range(ncpus)]
        assert dict((k.value, [v.value for v in vs]) for k, vs in m.items_percpu())[1] == [
            100 + cpu for cpu in range(ncpus)
        ]
        with pytest.raises(TypeError):
            m.lookup(key)
        with pytest.raises(ValueError):
            m.update_percpu(key, [ctypes.c_uint32(1)] * (ncpus + 1))
        # batch on per-CPU maps: a single value (replicated) or a per-CPU list
        m.update_batch(
            [ctypes.c_uint32(2), ctypes.c_uint32(3)],
            [ctypes.c_uint32(7), [ctypes.c_uint32(cpu) for cpu in range(ncpus)]],
        )
        got2 = m.lookup_percpu(ctypes.c_uint32(2))
        got3 = m.lookup_percpu(ctypes.c_uint32(3))
        assert got2 is not None and got3 is not None
        assert [v.value for v in got2] == [7] * ncpus
        assert [v.value for v in got3] == list(range(ncpus))
        if map_type == BPF_MAP_TYPE_PERCPU_HASH:
            assert m.lookup_percpu(ctypes.c_uint32(6)) is None


def test_update_batch_10000(hmap: Map[ctypes.c_uint32, Val]) -> None:
    n = 10000
    keys = [ctypes.c_uint32(i) for i in range(n)]
    values = [Val(packets=i, bytes=i * 1500) for i in range(n)]
    hmap.update_batch(keys, values)
    assert hmap._batch_ok.get(bpfsys.Cmd.MAP_UPDATE_BATCH) is True  # really batched
    got = {k.value: (v.packets, v.bytes) for k, v in hmap.items()}
    assert got == {i: (i, i * 1500) for i in range(n)}
    hmap.delete_batch(keys[: n // 2])
    assert sorted(k.value for k in hmap) == list(range(n // 2, n))
    # deleting a missing key stops the batch, like the kernel does
    with pytest.raises(BpfError) as ei:
        hmap.delete_batch([keys[-1], keys[0], keys[-2]])
    assert ei.value.errno == errno.ENOENT
    assert ei.value.applied == 1
    assert hmap.lookup(keys[-1]) is None
    assert hmap.lookup(keys[-2]) is not None


def test_update_batch_partial_failure() -> None:
    with _new_map(BPF_MAP_TYPE_HASH, ctypes.c_uint32, ctypes.c_uint32, 5, name="t_small") as m:
        keys = [ctypes.c_uint32(i) for i in range(8)]
        with pytest.raises(BpfError) as ei:
            m.update_batch(keys, [ctypes.c_uint32(i) for i in range(8)])
        e = ei.value
        assert e.errno == errno.E2BIG
        assert (e.applied, e.requested) == (5, 8)
        assert str(e).startswith("BPF_MAP_UPDATE_BATCH on t_small: [Errno 7]")
        assert "5 of 8" in str(e)
        assert sorted(k.value for k in m) == [0, 1, 2, 3, 4]


def test_update_batch_flags_go_per_element(hmap: Map[ctypes.c_uint32, Val]) -> None:
    # generic batch update only takes BPF_F_LOCK in elem_flags: BPF_NOEXIST goes per element
    hmap.update(ctypes.c_uint32(2), Val(packets=2))
    with pytest.raises(BpfError) as ei:
        hmap.update_batch([ctypes.c_uint32(i) for i in range(4)], [Val()] * 4, BPF_NOEXIST)
    assert ei.value.errno == errno.EEXIST
    assert ei.value.applied == 2
    assert sorted(k.value for k in hmap) == [0, 1, 2]


def test_update_batch_length_mismatch(hmap: Map[ctypes.c_uint32, Val]) -> None:
    with pytest.raises(ValueError):
        hmap.update_batch([ctypes.c_uint32(1)], [])


def _check_lpm(lpm: Map[LpmKey, ctypes.c_uint32]) -> None:
    prefixes = [("10.0.0.0", 8, 1), ("10.1.0.0", 16, 2), ("10.1.2.0", 24, 3), ("0.0.0.0", 0, 4)]
    lpm.update_batch(
        [lpm_key(p, n) for p, n, _ in prefixes],
        [ctypes.c_uint32(v) for _, _, v in prefixes],
    )

    def match(addr: str) -> int | None:
        v = lpm.lookup(lpm_key(addr, 32))
        return None if v is None else v.value

    assert match("10.1.2.3") == 3
    assert match("10.1.9.9") == 2
    assert match("10.200.0.1") == 1
    assert match("192.168.1.1") == 4
    assert {(bytes(k.data), k.prefixlen) for k in lpm} == {
        (bytes(int(o) for o in p.split(".")), n) for p, n, _ in prefixes
    }
    lpm.delete_batch([lpm_key("10.1.2.0", 24), lpm_key("0.0.0.0", 0)])
    assert match("10.1.2.3") == 2
    assert match("192.168.1.1") is None


def test_lpm_trie_batch(lpm: Map[LpmKey, ctypes.c_uint32]) -> None:
    # whatever the kernel supports (6.18 has generic batch ops on LPM tries, older
    # kernels answer ENOTSUPP), the result must be the same
    _check_lpm(lpm)


def test_lpm_trie_batch_fallback(
    lpm: Map[LpmKey, ctypes.c_uint32], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate a kernel without LPM batch support: ENOTSUPP, count untouched."""
    real = bpfsys._raw_bpf
    batch_calls: list[bpfsys.Cmd] = []

    def fake(cmd: bpfsys.Cmd, attr: ctypes.Structure) -> tuple[int, int]:
        if cmd in (bpfsys.Cmd.MAP_UPDATE_BATCH, bpfsys.Cmd.MAP_DELETE_BATCH):
            batch_calls.append(cmd)
            return -1, bpfsys.ENOTSUPP
        return real(cmd, attr)

    monkeypatch.setattr(bpfsys, "_raw_bpf", fake)
    _check_lpm(lpm)
    assert batch_calls == [bpfsys.Cmd.MAP_UPDATE_BATCH, bpfsys.Cmd.MAP_DELETE_BATCH]
    # ENOTSUPP is remembered per map: no second batch attempt
    lpm.update_batch([lpm_key("172.16.0.0", 12)], [ctypes.c_uint32(9)])
    assert len(batch_calls) == 2
    v = lpm.lookup(lpm_key("172.16.5.5", 32))
    assert v is not None and v.value == 9


def test_array_delete_batch_falls_back() -> None:
    # array maps have batch update but no batch delete (ENOTSUPP); the per-element
    # fallback then surfaces the array's own EINVAL
    with _new_map(BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, ctypes.c_uint32, 4, name="t_arr2") as m:
        m.update_batch([ctypes.c_uint32(i) for i in range(4)], [ctypes.c_uint32(9)] * 4)
        assert [v.value for _, v in m.items()] == [9] * 4
        with pytest.raises(BpfError) as ei:
            m.delete_batch([ctypes.c_uint32(0)])
        assert ei.value.errno == errno.EINVAL
        assert ei.value.op == "BPF_MAP_DELETE_ELEM"
        assert ei.value.applied == 0
        assert m._batch_ok[bpfsys.Cmd.MAP_DELETE_BATCH] is False


# --- pinning ----------------------------------------------------------------------------


def test_pin_and_get(bpffs: str, hmap: Map[ctypes.c_uint32, Val]) -> None:
    path = os.path.join(bpffs, f"xdpfw_test_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    hmap.update(ctypes.c_uint32(1), Val(packets=11))
    bpfsys.obj_pin(hmap.fd, path)
    try:
        fd = bpfsys.obj_get(path)
        try:
            assert fd != hmap.fd
            assert bpfsys.map_info(fd).id == bpfsys.map_info(hmap.fd).id
        finally:
            os.close(fd)
        with Map.from_pin(path, ctypes.c_uint32, Val) as again:
            got = again.lookup(ctypes.c_uint32(1))
            assert got is not None and got.packets == 11
        with pytest.raises(BpfError) as ei:
            bpfsys.obj_pin(hmap.fd, path)
        assert ei.value.errno == errno.EEXIST
    finally:
        os.unlink(path)
    with pytest.raises(BpfError) as ei:
        bpfsys.obj_get(path)
    assert ei.value.errno == errno.ENOENT
    assert path in str(ei.value)


def test_map_get_fd_by_id(hmap: Map[ctypes.c_uint32, Val]) -> None:
    map_id = bpfsys.map_info(hmap.fd).id
    fd = bpfsys.map_get_fd_by_id(map_id)
    try:
        assert bpfsys.map_info(fd).name == "t_hash"
    finally:
        os.close(fd)
    with pytest.raises(BpfError) as ei:
        bpfsys.map_get_fd_by_id(0xFFFFFFF0)
    assert ei.value.errno == errno.ENOENT


# --- programs ---------------------------------------------------------------------------


def test_prog_test_run(xdp_drop_fd: int) -> None:
    frame = bytes(range(64))
    run = bpfsys.prog_test_run(xdp_drop_fd, frame, repeat=1000)
    assert run.retval == 1  # XDP_DROP
    assert run.duration_ns >= 0
    assert run.data_out == frame


def test_prog_test_run_short_frame(xdp_drop_fd: int) -> None:
    with pytest.raises(BpfError) as ei:
        bpfsys.prog_test_run(xdp_drop_fd, b"\0" * 10)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.op == "BPF_PROG_TEST_RUN"


def test_prog_info_and_stats(xdp_drop_fd: int) -> None:
    info = bpfsys.prog_info(xdp_drop_fd)
    assert info.type == 6  # BPF_PROG_TYPE_XDP
    assert info.name == "f"
    assert len(info.tag) == 16 and int(info.tag, 16) != 0
    assert info.id in set(bpfsys.prog_ids())
    fd = bpfsys.prog_get_fd_by_id(info.id)
    try:
        assert bpfsys.prog_info(fd).tag == info.tag
    finally:
        os.close(fd)

    stats_fd = bpfsys.enable_stats()
    try:
        bpfsys.prog_test_run(xdp_drop_fd, bytes(64), repeat=100)
        after = bpfsys.prog_info(xdp_drop_fd)
    finally:
        os.close(stats_fd)
    assert after.run_cnt >= info.run_cnt + 100
    assert after.run_time_ns >= info.run_time_ns


def _insn(code: int, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, 0, 0, imm)  # dst = src = r0, no offset


def test_prog_load_raw_instructions() -> None:
    insns = _insn(0xB7, imm=2) + _insn(0x95)  # r0 = XDP_PASS; exit
    fd = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, insns, "t_pass")
    try:
        info = bpfsys.prog_info(fd)
        assert (info.type, info.name) == (bpfsys.BPF_PROG_TYPE_XDP, "t_pass")
        assert info.gpl_compatible
        assert bpfsys.prog_test_run(fd, bytes(64)).retval == 2
    finally:
        os.close(fd)


def test_prog_load_refusals() -> None:
    with pytest.raises(BpfError) as ei:  # exit without setting r0: the verifier says no
        bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, _insn(0x95), "t_bad")
    assert ei.value.errno == errno.EACCES
    assert ei.value.op == "BPF_PROG_LOAD" and "t_bad" in str(ei.value)
    with pytest.raises(ValueError):
        bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, _insn(0x95)[:5])
    with pytest.raises(ValueError):
        bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, _insn(0x95), "x" * 16)


def test_nothing_left_pinned(bpffs: str) -> None:
    assert not [n for n in os.listdir(bpffs) if n.startswith(f"xdpfw_test_{os.getpid()}_")]


def test_closed_map_raises() -> None:
    m = _new_map(BPF_MAP_TYPE_HASH, ctypes.c_uint32, ctypes.c_uint32, 1, name="t_closed")
    m.close()
    m.close()  # idempotent
    with pytest.raises(ValueError):
        m.lookup(ctypes.c_uint32(0))
