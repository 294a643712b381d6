"""Typed ctypes wrapper around the raw bpf(2) syscall.

This module is xdpfw's only door to raw bpf syscalls (bcc is used only to compile and
load the program).  It deliberately imports neither bcc nor pyroute2.

Layouts of ``union bpf_attr``, ``struct bpf_map_info`` and ``struct bpf_prog_info`` are
copied from ``include/uapi/linux/bpf.h``.  Each command gets its own small attr structure
holding only the members it needs; the kernel zero-fills whatever we do not pass.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import mmap
import os
import platform
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_LOCK",
    "BPF_F_MMAPABLE",
    "BPF_F_NO_PREALLOC",
    "BPF_MAP_TYPE_ARRAY",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_LPM_TRIE",
    "BPF_MAP_TYPE_LRU_HASH",
    "BPF_MAP_TYPE_LRU_PERCPU_HASH",
    "BPF_MAP_TYPE_PERCPU_ARRAY",
    "BPF_MAP_TYPE_PERCPU_HASH",
    "BPF_NOEXIST",
    "BPF_OBJ_NAME_LEN",
    "BPF_PROG_TYPE_XDP",
    "BPF_STATS_RUN_TIME",
    "ENOTSUPP",
    "BpfError",
    "Cmd",
    "Map",
    "MapInfo",
    "MapType",
    "ProgInfo",
    "TestRun",
    "enable_stats",
    "map_create",
    "map_get_fd_by_id",
    "map_ids",
    "map_info",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_get_fd_by_id",
    "prog_ids",
    "prog_info",
    "prog_load",
    "prog_test_run",
]


class Cmd(IntEnum):
    """``enum bpf_cmd`` (values checked against the uapi header)."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    RAW_TRACEPOINT_OPEN = 17
    BTF_LOAD = 18
    BTF_GET_FD_BY_ID = 19
    TASK_FD_QUERY = 20
    MAP_LOOKUP_AND_DELETE_ELEM = 21
    MAP_FREEZE = 22
    BTF_GET_NEXT_ID = 23
    MAP_LOOKUP_BATCH = 24
    MAP_LOOKUP_AND_DELETE_BATCH = 25
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    ENABLE_STATS = 32
    ITER_CREATE = 33
    LINK_DETACH = 34
    PROG_BIND_MAP = 35


class MapType(IntEnum):
    """``enum bpf_map_type`` (leading members)."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31


BPF_MAP_TYPE_HASH = MapType.HASH
BPF_MAP_TYPE_ARRAY = MapType.ARRAY
BPF_MAP_TYPE_PERCPU_HASH = MapType.PERCPU_HASH
BPF_MAP_TYPE_PERCPU_ARRAY = MapType.PERCPU_ARRAY
BPF_MAP_TYPE_LRU_HASH = MapType.LRU_HASH
BPF_MAP_TYPE_LRU_PERCPU_HASH = MapType.LRU_PERCPU_HASH
BPF_MAP_TYPE_LPM_TRIE = MapType.LPM_TRIE

_PERCPU_TYPES = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)

# enum bpf_prog_type (the one xdpfw loads itself; bcc loads the real program).
BPF_PROG_TYPE_XDP = 6

# Update flags (BPF_MAP_UPDATE_ELEM / elem_flags).
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

# Map creation flags.
BPF_F_NO_PREALLOC = 1
BPF_F_MMAPABLE = 1 << 10

# enum bpf_stats_type
BPF_STATS_RUN_TIME = 0

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# Kernel-internal "operation not supported" (include/linux/errno.h); it leaks to user
# space from e.g. batch commands on map types without batch support.  Python's errno
# module does not know it.
ENOTSUPP = 524

_BATCH_UNSUPPORTED = frozenset({_errno.EINVAL, ENOTSUPP, _errno.EOPNOTSUPP})

# __NR_bpf by `platform.machine()` (lower-cased): the one table of xdpfw.
_SYS_BPF_BY_MACHINE = {
    "x86_64": 321,
    "amd64": 321,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "i386": 357,
    "i686": 357,
    "armv7l": 386,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


def _strerror(err: int) -> str:
    if err == ENOTSUPP:
        return "Operation not supported (ENOTSUPP)"
    return os.strerror(err)


class BpfError(OSError):
    """A failed bpf(2) call.

    ``errno``/``strerror`` follow :class:`OSError`; ``op`` names the command (e.g.
    ``BPF_MAP_UPDATE_ELEM``) and ``target`` the object (map name, pin path, fd...).
    For batch operations ``applied`` is how many elements were applied before the
    failure and ``requested`` how many were asked for (both ``None`` otherwise).
    """

    op: str
    target: str
    applied: int | None
    requested: int | None

    def __init__(
        self,
        errno: int,
        strerror: str | None = None,
        *,
        op: str = "",
        target: str = "",
        applied: int | None = None,
        requested: int | None = None,
    ) -> None:
        super().__init__(errno, _strerror(errno) if strerror is None else strerror)
        self.op = op
        self.target = target
        self.applied = applied
        self.requested = requested

    def __str__(self) -> str:
        text = f"[Errno {self.errno}] {self.strerror}"
        where = self.op
        if self.target:
            where = f"{where} on {self.target}" if where else self.target
        if where:
            text = f"{where}: {text}"
        if self.applied is not None:
            of = f" of {self.requested}" if self.requested is not None else ""
            text += f" ({self.applied}{of} elements applied)"
        return text


@functools.cache
def _sys_bpf_nr() -> int:
    machine = platform.machine().lower()
    try:
        return _SYS_BPF_BY_MACHINE[machine]
    except KeyError:
        raise OSError(_errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}") from None


def _raw_bpf(cmd: Cmd, attr: ctypes.Structure) -> tuple[int, int]:
    """Issue bpf(cmd, &attr, sizeof(attr)); returns (ret, errno)."""
    ret = int(_syscall(_sys_bpf_nr(), int(cmd), ctypes.addressof(attr), ctypes.sizeof(attr)))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def _bpf(cmd: Cmd, attr: ctypes.Structure, target: str = "") -> int:
    ret, err = _raw_bpf(cmd, attr)
    if ret < 0:
        raise BpfError(err, op=f"BPF_{cmd.name}", target=target)
    return ret


# --- union bpf_attr members -------------------------------------------------------------


class _MapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", _u32),
        ("btf_fd", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("map_extra", _u64),
    )


class _ElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", _u32),
        ("key", _u64),
        ("value", _u64),  # union with next_key
        ("flags", _u64),
    )


class _BatchAttr(ctypes.Structure):
    _fields_ = (
        ("in_batch", _u64),
        ("out_batch", _u64),
        ("keys", _u64),
        ("values", _u64),
        ("count", _u32),
        ("map_fd", _u32),
        ("elem_flags", _u64),
        ("flags", _u64),
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = (
        ("pathname", _u64),
        ("bpf_fd", _u32),
        ("file_flags", _u32),
    )


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = (
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    )


class _TestAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    )


class _IdAttr(ctypes.Structure):
    _fields_ = (
        ("start_id", _u32),  # union: prog_id / map_id / btf_id / link_id
        ("next_id", _u32),
        ("open_flags", _u32),
    )


class _InfoAttr(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", _u32),
        ("info_len", _u32),
        ("info", _u64),
    )


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = (("type", _u32),)


class _BpfMapInfo(ctypes.Structure):
    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("btf_id", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("_pad", _u32),
        ("map_extra", _u64),
    )


class _BpfProgInfo(ctypes.Structure):
    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", _u32),
        ("gpl_compatible", _u32),  # bitfield gpl_compatible:1 + 31 pad bits
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
        ("recursion_misses", _u64),
        ("verified_insns", _u32),
        ("attach_btf_obj_id", _u32),
        ("attach_btf_id", _u32),
        ("_pad", _u32),
    )


# --- helpers ----------------------------------------------------------------------------


def _parse_cpu_list(text: str) -> int:
    """Count CPUs in a kernel cpulist such as ``"0-1"`` or ``"0,2-3"``."""
    count = 0
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        count += (int(hi) - int(lo) + 1) if sep else 1
    if count <= 0:
        raise ValueError(f"cannot parse cpu list {text!r}")
    return count


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs (the per-CPU value count of per-CPU maps)."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        return _parse_cpu_list(f.read())


def _round_up8(n: int) -> int:
    return (n + 7) & ~7


def _cbuf(data: bytes) -> ctypes.Array[ctypes.c_char]:
    """A ctypes copy of ``data`` (at least one byte long, so it has an address)."""
    buf = ctypes.create_string_buffer(max(len(data), 1))
    ctypes.memmove(buf, data, len(data))
    return buf


def _decode_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


# --- object commands --------------------------------------------------------------------


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    name: str = "",
) -> int:
    """BPF_MAP_CREATE; returns the new map fd (O_CLOEXEC)."""
    raw_name = name.encode("ascii")
    if len(raw_name) >= BPF_OBJ_NAME_LEN:
        raise ValueError(f"map name {name!r} longer than {BPF_OBJ_NAME_LEN - 1} characters")
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
    )
    attr.map_name = raw_name
    return _bpf(Cmd.MAP_CREATE, attr, name or f"map type {map_type}")


def obj_pin(fd: int, path: str) -> None:
    """BPF_OBJ_PIN: pin the map/prog/link ``fd`` at ``path`` (on a bpffs)."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(cpath), bpf_fd=fd)
    _bpf(Cmd.OBJ_PIN, attr, path)


def obj_get(path: str) -> int:
    """BPF_OBJ_GET: open a pinned object; returns a new fd (BpfError ENOENT if absent)."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(cpath))
    return _bpf(Cmd.OBJ_GET, attr, path)


def prog_load(prog_type: int, insns: bytes, name: str = "", license: str = "GPL") -> int:
    """BPF_PROG_LOAD of raw instructions (8 bytes each, ``struct bpf_insn``); returns the fd.

    For small hand-assembled programs (the benchmarks' reference programs); the
    firewall itself is compiled and loaded by bcc (xdpfw.kernel.loader).  No
    verifier log is requested: a refusal surfaces as BpfError with the errno.
    """
    if not insns or len(insns) % 8:
        raise ValueError(f"{len(insns)} bytes of instructions: not a whole number of bpf_insn")
    raw_name = name.encode("ascii")
    if len(raw_name) >= BPF_OBJ_NAME_LEN:
        raise ValueError(f"program name {name!r} longer than {BPF_OBJ_NAME_LEN - 1} characters")
    ibuf = _cbuf(insns)
    lic = ctypes.create_string_buffer(license.encode("ascii"))
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(ibuf),
        license=ctypes.addressof(lic),
    )
    attr.prog_name = raw_name
    return _bpf(Cmd.PROG_LOAD, attr, name or f"prog type {prog_type}")


def prog_get_fd_by_id(prog_id: int) -> int:
    """BPF_PROG_GET_FD_BY_ID; returns a new fd (the kernel wants CAP_SYS_ADMIN for it)."""
    return _bpf(Cmd.PROG_GET_FD_BY_ID, _IdAttr(start_id=prog_id), f"prog id {prog_id}")


def map_get_fd_by_id(map_id: int) -> int:
    """BPF_MAP_GET_FD_BY_ID; returns a new fd."""
    return _bpf(Cmd.MAP_GET_FD_BY_ID, _IdAttr(start_id=map_id), f"map id {map_id}")


def _ids(cmd: Cmd) -> Iterator[int]:
    current = 0
    while True:
        attr = _IdAttr(start_id=current)
        ret, err = _raw_bpf(cmd, attr)
        if ret < 0:
            if err == _errno.ENOENT:
                return
            raise BpfError(err, op=f"BPF_{cmd.name}", target=f"after id {current}")
        current = int(attr.next_id)
        yield current


def prog_ids() -> Iterator[int]:
    """IDs of all loaded programs (BPF_PROG_GET_NEXT_ID)."""
    return _ids(Cmd.PROG_GET_NEXT_ID)


def map_ids() -> Iterator[int]:
    """IDs of all maps (BPF_MAP_GET_NEXT_ID)."""
    return _ids(Cmd.MAP_GET_NEXT_ID)


def _get_info(fd: int, info: ctypes.Structure, what: str) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, f"{what} fd {fd}")


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a map fd."""
    info = _BpfMapInfo()
    _get_info(fd, info, "map")
    return MapInfo(
        type=int(info.type),
        id=int(info.id),
        key_size=int(info.key_size),
        value_size=int(info.value_size),
        max_entries=int(info.max_entries),
        map_flags=int(info.map_flags),
        name=_decode_name(bytes(info.name)),
    )


@dataclass(frozen=True, slots=True)
class ProgInfo:
    type: int
    id: int
    tag: str  # hex, as bpftool shows it
    name: str
    run_time_ns: int  # cumulative; only advances while stats are enabled
    run_cnt: int
    jited_prog_len: int = 0
    xlated_prog_len: int = 0
    load_time_ns: int = 0  # since boot
    created_by_uid: int = 0
    gpl_compatible: bool = False
    recursion_misses: int = 0
    verified_insns: int = 0
    map_ids: tuple[int, ...] = ()


def prog_info(fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program fd (including the ids of the maps it uses)."""
    info = _BpfProgInfo()
    _get_info(fd, info, "prog")
    ids: tuple[int, ...] = ()
    nr = int(info.nr_map_ids)
    if nr:
        buf = (_u32 * nr)()
        info2 = _BpfProgInfo(nr_map_ids=nr, map_ids=ctypes.addressof(buf))
        _get_info(fd, info2, "prog")
        ids = tuple(int(x) for x in buf[: min(nr, int(info2.nr_map_ids))])
    return ProgInfo(
        type=int(info.type),
        id=int(info.id),
        tag=bytes(info.tag).hex(),
        name=_decode_name(bytes(info.name)),
        run_time_ns=int(info.run_time_ns),
        run_cnt=int(info.run_cnt),
        jited_prog_len=int(info.jited_prog_len),
        xlated_prog_len=int(info.xlated_prog_len),
        load_time_ns=int(info.load_time),
        created_by_uid=int(info.created_by_uid),
        gpl_compatible=bool(int(info.gpl_compatible) & 1),
        recursion_misses=int(info.recursion_misses),
        verified_insns=int(info.verified_insns),
        map_ids=ids,
    )


@dataclass(frozen=True, slots=True)
class TestRun:
    __test__ = False  # not a pytest test class

    retval: int
    duration_ns: int  # average per repetition, as reported by the kernel
    data_out: bytes


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> TestRun:
    """BPF_PROG_TEST_RUN with ``data`` as the packet, ``repeat`` times.

    For XDP the kernel wants at least 14 bytes (an Ethernet header); shorter input
    surfaces as ``BpfError(EINVAL)``.
    """
    if not 0 <= repeat <= 0xFFFFFFFF:
        raise ValueError(f"repeat out of range: {repeat}")
    data_in = _cbuf(data)
    out_size = len(data) + 256  # XDP programs may grow the packet
    data_out = ctypes.create_string_buffer(out_size)
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
    )
    _bpf(Cmd.PROG_TEST_RUN, attr, f"prog fd {prog_fd}")
    size = min(int(attr.data_size_out), out_size)
    return TestRun(
        retval=int(attr.retval),
        duration_ns=int(attr.duration),
        data_out=data_out.raw[:size],
    )


def enable_stats(stats_type: int = BPF_STATS_RUN_TIME) -> int:
    """BPF_ENABLE_STATS; run_time_ns/run_cnt are collected until the returned fd closes."""
    return _bpf(Cmd.ENABLE_STATS, _EnableStatsAttr(type=stats_type), "run-time stats")


# --- maps -------------------------------------------------------------------------------

K = TypeVar("K", bound="ctypes.Structure | ctypes._SimpleCData[Any] | ctypes.Array[Any]")
V = TypeVar("V", bound="ctypes.Structure | ctypes._SimpleCData[Any] | ctypes.Array[Any]")

_Raw = bytes | bytearray | memoryview


class Map(Generic[K, V]):
    """A BPF map fd with typed keys and values.

    Keys and values may be passed as instances of the declared ctypes types or as raw
    bytes of the right size; lookups return instances of the declared types.  The map
    owns ``fd`` and closes it in :meth:`close` / on leaving a ``with`` block.

    ``percpu`` defaults to what the kernel says about the map type; an explicit value
    that contradicts the kernel raises ``ValueError`` (a wrong guess would make the
    kernel write past our value buffer).
    """

    def __init__(
        self,
        fd: int,
        name: str,
        key_type: type[K],
        value_type: type[V],
        percpu: bool | None = None,
    ) -> None:
        info = map_info(fd)
        self._fd = fd
        self.name = name or info.name or f"map#{info.id}"
        self.key_type = key_type
        self.value_type = value_type
        self.info = info
        if ctypes.sizeof(key_type) != info.key_size:
            raise ValueError(
                f"{self.name}: sizeof({key_type.__name__}) = {ctypes.sizeof(key_type)}"
                f" but the map's key_size is {info.key_size}"
            )
        if ctypes.sizeof(value_type) != info.value_size:
            raise ValueError(
                f"{self.name}: sizeof({value_type.__name__}) = {ctypes.sizeof(value_type)}"
                f" but the map's value_size is {info.value_size}"
            )
        kernel_percpu = info.type in _PERCPU_TYPES
        if percpu is not None and percpu != kernel_percpu:
            raise ValueError(
                f"{self.name}: percpu={percpu} but the map type {info.type} is"
                f"{'' if kernel_percpu else ' not'} per-CPU"
            )
        self.percpu = kernel_percpu
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.ncpus = possible_cpus() if self.percpu else 1
        self._stride = _round_up8(info.value_size) if self.percpu else info.value_size
        # size of one element's value as the syscalls see it
        self._vsize = self._stride * self.ncpus
        self._batch_ok: dict[Cmd, bool] = {}

    @classmethod
    def from_pin(
        cls,
        path: str,
        key_type: type[K],
        value_type: type[V],
        name: str = "",
    ) -> Map[K, V]:
        """Open a map pinned at ``path``."""
        fd = obj_get(path)
        try:
            return cls(fd, name or path, key_type, value_type)
        except BaseException:
            os.close(fd)
            raise

    # -- plumbing --

    @property
    def stride(self) -> int:
        """Bytes from one CPU's value to the next in a per-CPU value as the syscalls see it
        (the value size rounded up to 8); the value size on other maps."""
        return self._stride

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"map {self.name} is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Map({self.name!r}, fd={self._fd}, key={self.key_type.__name__},"
            f" value={self.value_type.__name__}, percpu={self.percpu})"
        )

    def _key_bytes(self, key: K | _Raw) -> bytes:
        if isinstance(key, bytes | bytearray | memoryview):
            raw = bytes(key)
        elif isinstance(key, self.key_type):
            raw = ctypes.string_at(ctypes.addressof(key), ctypes.sizeof(key))
        else:
            raise TypeError(
                f"{self.name}: key must be {self.key_type.__name__} or bytes,"
                f" not {type(key).__name__}"
            )
        if len(raw) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(raw)} bytes, expected {self.key_size}")
        return raw

    def _one_value_bytes(self, value: V | _Raw) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
        elif isinstance(value, self.value_type):
            raw = ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))
        else:
            raise TypeError(
                f"{self.name}: value must be {self.value_type.__name__} or bytes,"
                f" not {type(value).__name__}"
            )
        if len(raw) != self.value_size:
            raise ValueError(f"{self.name}: value is {len(raw)} bytes, expected {self.value_size}")
        return raw

    def _mk_value(self, raw: bytes, offset: int = 0) -> V:
        return cast(V, self.value_type.from_buffer_copy(raw, offset))

    def _value_blob(self, value: V | _Raw | Sequence[V | _Raw]) -> bytes:
        """The syscall-side value: one value, or ncpus padded values for per-CPU maps."""
        if not self.percpu:
            if isinstance(value, list | tuple):
                raise TypeError(f"{self.name}: a per-CPU value list given to a plain map")
            return self._one_value_bytes(value)  # type: ignore[arg-type]
        if isinstance(value, list | tuple):
            if len(value) != self.ncpus:
                raise ValueError(
                    f"{self.name}: {len(value)} per-CPU values given, {self.ncpus} CPUs possible"
                )
            parts = [self._one_value_bytes(v) for v in value]
        else:
            parts = [self._one_value_bytes(value)] * self.ncpus  # type: ignore[arg-type]
        pad = b"\0" * (self._stride - self.value_size)
        return b"".join(p + pad for p in parts)

    def _elem(self, cmd: Cmd, key: bytes | None, value_addr: int, flags: int) -> tuple[int, int]:
        kbuf = _cbuf(key) if key is not None else None
        attr = _ElemAttr(
            map_fd=self.fd,
            key=ctypes.addressof(kbuf) if kbuf is not None else 0,
            value=value_addr,
            flags=flags,
        )
        return _raw_bpf(cmd, attr)

    def _check(self, cmd: Cmd, ret: int, err: int) -> None:
        if ret < 0:
            raise BpfError(err, op=f"BPF_{cmd.name}", target=self.name)

    def _lookup_raw(self, key: K | _Raw) -> bytes | None:
        vbuf = ctypes.create_string_buffer(self._vsize)
        ret, err = self._elem(Cmd.MAP_LOOKUP_ELEM, self._key_bytes(key), ctypes.addressof(vbuf), 0)
        if ret < 0 and err == _errno.ENOENT:
            return None
        self._check(Cmd.MAP_LOOKUP_ELEM, ret, err)
        return vbuf.raw

    def lookup_raw(self, key: K | _Raw) -> bytes | None:
        """The value as the kernel returns it (per-CPU maps: every CPU's slot), or None."""
        return self._lookup_raw(key)

    # -- element API --

    def lookup(self, key: K | _Raw) -> V | None:
        """The value at ``key``, or None if absent (use lookup_percpu on per-CPU maps)."""
        if self.percpu:
            raise TypeError(f"{self.name} is a per-CPU map: use lookup_percpu()")
        raw = self._lookup_raw(key)
        return None if raw is None else self._mk_value(raw)

    def lookup_percpu(self, key: K | _Raw) -> list[V] | None:
        """One value per possible CPU, or None if ``key`` is absent."""
        if not self.percpu:
            raise TypeError(f"{self.name} is not a per-CPU map: use lookup()")
        raw = self._lookup_raw(key)
        if raw is None:
            return None
        return [self._mk_value(raw, cpu * self._stride) for cpu in range(self.ncpus)]

    def update(self, key: K | _Raw, value: V | _Raw, flags: int = BPF_ANY) -> None:
        """Set ``key`` to ``value`` (on per-CPU maps: the same value on every CPU)."""
        self._update_blob(self._key_bytes(key), self._value_blob(value), flags)

    def update_percpu(
        self, key: K | _Raw, values: Sequence[V | _Raw], flags: int = BPF_ANY
    ) -> None:
        """Set one value per possible CPU."""
        if not self.percpu:
            raise TypeError(f"{self.name} is not a per-CPU map: use update()")
        self._update_blob(self._key_bytes(key), self._value_blob(list(values)), flags)

    def _update_blob(self, key: bytes, value: bytes, flags: int) -> None:
        vbuf = _cbuf(value)
        ret, err = self._elem(Cmd.MAP_UPDATE_ELEM, key, ctypes.addressof(vbuf), flags)
        self._check(Cmd.MAP_UPDATE_ELEM, ret, err)

    def delete(self, key: K | _Raw) -> bool:
        """Delete ``key``; False if it was not there."""
        return self._delete_raw(self._key_bytes(key))

    def _delete_raw(self, key: bytes) -> bool:
        ret, err = self._elem(Cmd.MAP_DELETE_ELEM, key, 0, 0)
        if ret < 0 and err == _errno.ENOENT:
            return False
        self._check(Cmd.MAP_DELETE_ELEM, ret, err)
        return True

    def __contains__(self, key: object) -> bool:
        return self._lookup_raw(key) is not None  # type: ignore[arg-type]

    def keys(self) -> Iterator[K]:
        """All keys, via BPF_MAP_GET_NEXT_KEY starting from a NULL key.

        On hash maps, deleting the current key while iterating restarts the walk from
        the beginning (kernel behaviour), so collect keys first if you delete.
        """
        nbuf = ctypes.create_string_buffer(self.key_size)
        current: bytes | None = None
        while True:
            ret, err = self._elem(Cmd.MAP_GET_NEXT_KEY, current, ctypes.addressof(nbuf), 0)
            if ret < 0 and err == _errno.ENOENT:
                return
            self._check(Cmd.MAP_GET_NEXT_KEY, ret, err)
            current = nbuf.raw
            yield cast(K, self.key_type.from_buffer_copy(current))

    def __iter__(self) -> Iterator[K]:
        return self.keys()

    def items(self) -> Iterator[tuple[K, V]]:
        """(key, value) pairs; keys that vanish mid-walk are skipped."""
        if self.percpu:
            raise TypeError(f"{self.name} is a per-CPU map: use items_percpu()")
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def items_percpu(self) -> Iterator[tuple[K, list[V]]]:
        """(key, per-CPU values) pairs of a per-CPU map."""
        for key in self.keys():
            values = self.lookup_percpu(key)
            if values is not None:
                yield key, values

    # -- batch API --

    def dump_raw(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) as raw bytes, read with BPF_MAP_LOOKUP_BATCH `chunk` at a time.

        For per-CPU maps the value holds one 8-byte aligned slot per possible CPU. Falls back
        to GET_NEXT_KEY + LOOKUP where the map type has no batch lookup. Not a snapshot: a
        map changed meanwhile may be seen partly before and partly after the change.
        """
        ksize, vsize = self.key_size, self._vsize
        for kraw, vraw, n in self.dump_chunks(chunk):
            for i in range(n):
                yield kraw[i * ksize : (i + 1) * ksize], vraw[i * vsize : (i + 1) * vsize]

    def dump_columns(self, chunk: int = 65536) -> tuple[bytes, bytes, int]:
        """`dump_raw` as two buffers, (keys back to back, values back to back, count): what
        a columnar reader hands to numpy, with no bytes object per element."""
        ks, vs, total = [], [], 0
        for kraw, vraw, n in self.dump_chunks(chunk):
            ks.append(kraw[: n * self.key_size])
            vs.append(vraw[: n * self._vsize])
            total += n
        return b"".join(ks), b"".join(vs), total

    def dump_chunks(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
        """The map's elements a batch at a time: (keys, values, n), the first n of each."""
        if not self._batch_ok.get(Cmd.MAP_LOOKUP_BATCH, True):
            for k, v in self._dump_each():
                yield k, v, 1
            return
        ksize, vsize = self.key_size, self._vsize
        tok_size = max(ksize, 8)
        tokens = [ctypes.create_string_buffer(tok_size), ctypes.create_string_buffer(tok_size)]
        kbuf = ctypes.create_string_buffer(ksize * chunk)
        vbuf = ctypes.create_string_buffer(vsize * chunk)
        first = True
        while True:
            attr = _BatchAttr(
                in_batch=0 if first else ctypes.addressof(tokens[0]),
                out_batch=ctypes.addressof(tokens[1]),
                keys=ctypes.addressof(kbuf),
                values=ctypes.addressof(vbuf),
                count=chunk,
                map_fd=self.fd,
            )
            ret, err = _raw_bpf(Cmd.MAP_LOOKUP_BATCH, attr)
            if ret < 0 and err != _errno.ENOENT:
                if first and err in _BATCH_UNSUPPORTED:
                    self._batch_ok[Cmd.MAP_LOOKUP_BATCH] = False
                    for k, v in self._dump_each():
                        yield k, v, 1
                    return
                raise BpfError(err, op="BPF_MAP_LOOKUP_BATCH", target=self.name)
            n = int(attr.count)
            if n:
                yield kbuf.raw[: n * ksize], vbuf.raw[: n * vsize], n
            if ret < 0:  # ENOENT: that was the last batch
                return
            first = False
            tokens.reverse()

    def read_array(self, count: int, chunk: int = 65536, start: int = 0) -> bytes:
        """Raw values of elements start .. count-1 of an array map, in index order.

        BPF_MAP_LOOKUP_BATCH from the start, `chunk` elements per call. Per-CPU values hold
        one 8-byte aligned slot per possible CPU, as in dump_raw. Not a snapshot.
        """
        if self.info.type not in (MapType.ARRAY, MapType.PERCPU_ARRAY):
            raise TypeError(f"{self.name}: read_array needs an array map")
        count = min(count, self.info.max_entries)
        if count <= start:
            return b""
        out: list[bytes] = []
        tokens = [ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)]
        if start:  # the batch resumes after the key in in_batch
            tokens[0].raw = struct.pack("=I", start - 1).ljust(8, b"\0")
        n = min(chunk, count - start)
        kbuf = ctypes.create_string_buffer(self.key_size * n)
        vbuf = ctypes.create_string_buffer(self._vsize * n)
        done = start
        while done < count:
            want = min(n, count - done)
            attr = _BatchAttr(
                in_batch=0 if done == 0 else ctypes.addressof(tokens[0]),
                out_batch=ctypes.addressof(tokens[1]),
                keys=ctypes.addressof(kbuf),
                values=ctypes.addressof(vbuf),
                count=want,
                map_fd=self.fd,
            )
            ret, err = _raw_bpf(Cmd.MAP_LOOKUP_BATCH, attr)
            if ret < 0 and err != _errno.ENOENT:
                raise BpfError(err, op="BPF_MAP_LOOKUP_BATCH", target=self.name)
            got = int(attr.count)
            out.append(ctypes.string_at(vbuf, got * self._vsize))
            done += got
            if ret < 0 or got == 0:
                break
            tokens.reverse()
        return b"".join(out)

    def mmap_array(self) -> mmap.mmap:
        """A shared, writable mapping of a BPF_F_MMAPABLE array's values (element i at
        i * value_size). Stores to it are what the programs read: no syscall per update."""
        if self.info.type != MapType.ARRAY or not self.info.map_flags & BPF_F_MMAPABLE:
            raise TypeError(f"{self.name}: not a memory-mappable array")
        size = self.value_size * self.info.max_entries
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        return mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def update_array(self, indices: Sequence[int] | Any, value: bytes) -> None:
        """Set elements `indices` (ints, or a numpy integer array) of an array map to the
        same raw value (all CPUs)."""
        if not len(indices):
            return
        blob = self._value_blob(value)
        step = 65536
        for i in range(0, len(indices), step):
            part = indices[i : i + step]
            packed = (
                part.astype("=u4").tobytes() if hasattr(part, "astype")
                else struct.pack(f"={len(part)}I", *part)
            )
            kbuf = _cbuf(packed)
            vbuf = _cbuf(blob * len(part))
            if not self._batch(Cmd.MAP_UPDATE_BATCH, kbuf, vbuf, len(part), BPF_ANY):
                for k in part:
                    self._update_blob(struct.pack("=I", k), blob, BPF_ANY)

    def _dump_each(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            raw = self._lookup_raw(key)
            if raw is not None:
                yield bytes(key), raw

    def update_batch(
        self,
        keys: Sequence[K | _Raw],
        values: Sequence[V | _Raw | Sequence[V | _Raw]],
        flags: int = BPF_ANY,
    ) -> None:
        """Update many elements with one BPF_MAP_UPDATE_BATCH.

        Falls back to per-element updates when the map type has no batch support.  On
        a failure part-way, raises BpfError with ``.applied`` elements applied (those
        are the first ``.applied`` of ``keys``).  On per-CPU maps each value is either
        one value (replicated to all CPUs) or a list with one value per CPU.
        """
        if len(keys) != len(values):
            raise ValueError(f"{self.name}: {len(keys)} keys but {len(values)} values")
        kraw = [self._key_bytes(k) for k in keys]
        vraw = [self._value_blob(v) for v in values]
        if not kraw:
            return
        if flags & ~BPF_F_LOCK or not self._batch_ok.get(Cmd.MAP_UPDATE_BATCH, True):
            # generic_map_update_batch() accepts only BPF_F_LOCK in elem_flags, so
            # BPF_NOEXIST / BPF_EXIST have to go element by element.
            self._update_each(kraw, vraw, flags)
            return
        kbuf = _cbuf(b"".join(kraw))
        vbuf = _cbuf(b"".join(vraw))
        if self._batch(Cmd.MAP_UPDATE_BATCH, kbuf, vbuf, len(kraw), flags):
            return
        self._update_each(kraw, vraw, flags)

    def update_batch_raw(
        self, keys: bytes, values: bytes, count: int, *, step: int = 65536
    ) -> None:
        """`update_batch` of `count` elements given as two packed buffers (keys back to back,
        values back to back: what a columnar writer builds with numpy), `step` elements per
        BPF_MAP_UPDATE_BATCH (per element where the map type has no batch support, as LPM
        tries on kernels before 6.x). Plain (not per-CPU) maps. On a failure part-way,
        BpfError with ``.applied`` = the elements applied (the first ones)."""
        ks, vs = self.key_size, self.value_size
        if self.percpu:
            raise TypeError(f"{self.name}: update_batch_raw takes plain maps only")
        if len(keys) != count * ks or len(values) != count * vs:
            raise ValueError(
                f"{self.name}: {len(keys)} key / {len(values)} value bytes for {count} elements"
            )
        done = 0
        kview, vview = memoryview(keys), memoryview(values)
        try:
            while done < count:
                n = min(step, count - done)
                kpart = kview[done * ks : (done + n) * ks]
                vpart = vview[done * vs : (done + n) * vs]
                if not self._batch_ok.get(Cmd.MAP_UPDATE_BATCH, True) or not self._batch(
                    Cmd.MAP_UPDATE_BATCH, _cbuf(bytes(kpart)), _cbuf(bytes(vpart)), n, BPF_ANY
                ):
                    self._update_each(
                        [bytes(kpart[i * ks : (i + 1) * ks]) for i in range(n)],
                        [bytes(vpart[i * vs : (i + 1) * vs]) for i in range(n)],
                        BPF_ANY,
                    )
                done += n
        except BpfError as exc:
            exc.applied = done + (exc.applied or 0)
            exc.requested = count
            raise

    def delete_batch(self, keys: Sequence[K | _Raw]) -> None:
        """Delete many elements with one BPF_MAP_DELETE_BATCH (per-element fallback).

        Like the kernel, a missing key stops the batch: BpfError(ENOENT) with
        ``.applied`` = number of keys deleted before it.
        """
        kraw = [self._key_bytes(k) for k in keys]
        if not kraw:
            return
        if self._batch_ok.get(Cmd.MAP_DELETE_BATCH, True):
            kbuf = _cbuf(b"".join(kraw))
            if self._batch(Cmd.MAP_DELETE_BATCH, kbuf, None, len(kraw), 0):
                return
        for i, key in enumerate(kraw):
            ret, err = self._elem(Cmd.MAP_DELETE_ELEM, key, 0, 0)
            if ret < 0:
                raise BpfError(
                    err,
                    op="BPF_MAP_DELETE_ELEM",
                    target=self.name,
                    applied=i,
                    requested=len(kraw),
                )

    def _batch(
        self,
        cmd: Cmd,
        kbuf: ctypes.Array[ctypes.c_char],
        vbuf: ctypes.Array[ctypes.c_char] | None,
        count: int,
        flags: int,
    ) -> bool:
        """Run a batch command; True if done, False if the caller should fall back."""
        attr = _BatchAttr(
            keys=ctypes.addressof(kbuf),
            values=ctypes.addressof(vbuf) if vbuf is not None else 0,
            count=count,
            map_fd=self.fd,
            elem_flags=flags,
        )
        ret, err = _raw_bpf(cmd, attr)
        if ret >= 0:
            self._batch_ok[cmd] = True
            return True
        done = int(attr.count)
        # The kernel writes back count only once it starts processing elements; an
        # untouched count means nothing was applied.
        if done >= count:
            done = 0
        if err in _BATCH_UNSUPPORTED and done == 0:
            if err != _errno.EINVAL:  # definitive: no batch ops for this map type
                self._batch_ok[cmd] = False
            return False
        raise BpfError(err, op=f"BPF_{cmd.name}", target=self.name, applied=done, requested=count)

    def _update_each(self, kraw: list[bytes], vraw: list[bytes], flags: int) -> None:
        for i, (key, value) in enumerate(zip(kraw, vraw, strict=True)):
            vbuf = _cbuf(value)
            ret, err = self._elem(Cmd.MAP_UPDATE_ELEM, key, ctypes.addressof(vbuf), flags)
            if ret < 0:
                raise BpfError(
                    err,
                    op="BPF_MAP_UPDATE_ELEM",
                    target=self.name,
                    applied=i,
                    requested=len(kraw),
                )
