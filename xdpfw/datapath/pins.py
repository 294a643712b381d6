"""The pins under bpffs: what a complete set is, opening one (with the ABI check), making one.

A pin directory holds one pin per map and, last, the program pin (PROG_PIN): the program pin
marks a complete set. The compiling child pins what it loads in a staging directory next to
it; an upgrade builds the new set in `<dir>-upgrading` and swaps directories by renaming.
The ABI recorded in xdpfw_config must be this build's, or the pins are refused untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xdpfw import abi
from xdpfw.datapath.slots import U32
from xdpfw.datapath.translate import kernel_error
from xdpfw.errors import AbiMismatch, DatapathError
from xdpfw.kernel import bpfsys

if TYPE_CHECKING:
    from xdpfw.kernel.loader import LoadedProgram

__all__ = [
    "ABI4",
    "MAP_TYPES",
    "MAP_TYPES_ABI4",
    "PROG_PIN",
    "Abi4Config",
    "ensure_bpffs",
    "finish_interrupted_upgrade",
    "open_pins",
    "pid_alive",
    "pin_all",
    "pinned_abi",
    "remove_pin_dir",
    "remove_stale_staging",
    "retired_dir",
    "staging_dir",
    "unpin",
    "upgrading_dir",
    "wrap_maps",
]

PROG_PIN = "prog"

# Every map of the program: (key type, value type), the mirrors of bpf/xdpfw_abi.h.
MAP_TYPES: dict[str, tuple[type[Any], type[Any]]] = {
    "xdpfw_src4": (ctypes.c_uint32, abi.Entry),
    "xdpfw_dst4": (ctypes.c_uint32, abi.Entry),
    "xdpfw_src6": (abi.Addr6, abi.Entry),
    "xdpfw_dst6": (abi.Addr6, abi.Entry),
    # IPv4 prefixes: DIR-24-8 (issue 18, ABI 5)
    "xdpfw_src4_tbl24": (ctypes.c_uint32, abi.D248Row),
    "xdpfw_src4_tbl8": (ctypes.c_uint32, abi.D248Row),
    "xdpfw_src4_pfx": (ctypes.c_uint32, abi.PfxEntry),
    "xdpfw_dst4_tbl24": (ctypes.c_uint32, abi.D248Row),
    "xdpfw_dst4_tbl8": (ctypes.c_uint32, abi.D248Row),
    "xdpfw_dst4_pfx": (ctypes.c_uint32, abi.PfxEntry),
    "xdpfw_src6_lpm": (abi.Lpm6Key, abi.Entry),
    "xdpfw_dst6_lpm": (abi.Lpm6Key, abi.Entry),
    "xdpfw_any": (ctypes.c_uint32, abi.Entry),
    "xdpfw_sets": (ctypes.c_uint32, abi.Set),
    "xdpfw_rule_stats": (ctypes.c_uint32, abi.RuleStats),
    "xdpfw_rule_seen": (ctypes.c_uint32, ctypes.c_uint64),
    "xdpfw_stats": (ctypes.c_uint32, abi.GlobalStats),
    "xdpfw_config": (ctypes.c_uint32, abi.Config),
    # X-ray (issue 17); the ring buffer has neither key nor value (its size is max_entries)
    "xdpfw_sample_ctl": (ctypes.c_uint32, abi.SampleCtl),
    "xdpfw_sample_rules": (ctypes.c_uint32, abi.SampleRule),
    "xdpfw_sample_bucket": (ctypes.c_uint32, abi.SampleBucket),
    "xdpfw_sample_stats": (ctypes.c_uint32, abi.SampleStats),
    "xdpfw_samples": (ctypes.c_uint8 * 0, ctypes.c_uint8 * 0),
    # rate limits (issue 16)
    "xdpfw_limits": (ctypes.c_uint32, abi.Limit),
    "xdpfw_limit_stats": (ctypes.c_uint32, abi.LimitStats),
    "xdpfw_buckets": (abi.BucketKey, abi.Bucket),
    "xdpfw_bans": (abi.BucketKey, ctypes.c_uint64),
}



class Abi4Config(ctypes.Structure):
    """struct xdpfw_config as ABI 4 pinned it (no max_tbl8_groups): read by an upgrade only."""

    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("n_entries", ctypes.c_uint32 * abi.Table.MAX),
        ("max_rules", ctypes.c_uint32),
        ("max_prefixes", ctypes.c_uint32),
        ("max_sets", ctypes.c_uint32),
        ("build_id", ctypes.c_uint8 * 8),
    ]


ABI4 = 4  # the previous ABI, whose pins an upgrade adopts (rules in IPv4 tries, the /24 hint)
_ABI5_ONLY = {n for n in MAP_TYPES if n.endswith(abi.D248_PARTS)}
# The maps of an ABI 4 pin set: ABI 5's without the DIR-24-8 arrays, with the IPv4 tries and
# their hint; every struct but the config is the same.
MAP_TYPES_ABI4: dict[str, tuple[type[Any], type[Any]]] = {
    **{n: t for n, t in MAP_TYPES.items() if n not in _ABI5_ONLY},
    "xdpfw_src4_lpm": (abi.Lpm4Key, abi.Entry),
    "xdpfw_dst4_lpm": (abi.Lpm4Key, abi.Entry),
    "xdpfw_lpm4_hint": (ctypes.c_uint32, ctypes.c_uint64),
    "xdpfw_config": (ctypes.c_uint32, Abi4Config),
}

_Maps = dict[str, bpfsys.Map[Any, Any]]


def staging_dir(pin_dir: Path) -> Path:
    """Where the compiling child pins what it loaded (bpffs names may not contain dots)."""
    return pin_dir.with_name(f"{pin_dir.name}-loading-{os.getpid()}")


def remove_stale_staging(pin_dir: Path) -> list[Path]:
    """Remove the staging directories of compiles whose process is gone (killed mid-load):
    a program pinned only there filters nothing and would stay in bpffs forever."""
    removed: list[Path] = []
    parent, prefix = pin_dir.parent, f"{pin_dir.name}-loading-"
    if not parent.is_dir():
        return removed
    for d in parent.iterdir():
        pid = d.name[len(prefix) :]
        if not (d.name.startswith(prefix) and pid.isdigit() and d.is_dir()):
            continue
        if int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        remove_pin_dir(d)
        removed.append(d)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (the owner of a staging pin set, a lab)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def upgrading_dir(pin_dir: Path) -> Path:
    """Where an upgrade pins the new set before the swap (bpffs refuses ".new")."""
    return pin_dir.with_name(pin_dir.name + "-upgrading")


def retired_dir(pin_dir: Path) -> Path:
    """Where an upgrade moves the old set during the swap."""
    return pin_dir.with_name(pin_dir.name + "-retired")


def finish_interrupted_upgrade(pin_dir: Path) -> None:
    """Complete an upgrade that stopped between its two renames; refuse a half-removed set."""
    staging = upgrading_dir(pin_dir)
    if not pin_dir.exists() and (staging / PROG_PIN).exists():
        staging.rename(pin_dir)
    if (pin_dir / PROG_PIN).exists():
        return
    leftovers = sorted(p.name for p in pin_dir.iterdir()) if pin_dir.is_dir() else []
    if leftovers:
        raise AbiMismatch(
            f"{pin_dir} holds pins ({', '.join(leftovers)}) but no program pin: an earlier "
            f"instance was cleaned up half way. Remove them (`rm -r {pin_dir}`) and start "
            "again."
        )


def wrap_maps(loaded: LoadedProgram) -> _Maps:
    return {
        name: bpfsys.Map(fd, name, *MAP_TYPES[name]) for name, fd in loaded.map_fds.items()
    }


def pin_all(loaded: LoadedProgram, pin_dir: Path) -> list[Path]:
    """Pin maps, then the program: the program pin marks a complete set."""
    pin_dir.mkdir(parents=True, exist_ok=True)
    pinned: list[Path] = []
    try:
        for name, fd in loaded.map_fds.items():
            bpfsys.obj_pin(fd, str(pin_dir / name))
            pinned.append(pin_dir / name)
        bpfsys.obj_pin(loaded.prog_fd, str(pin_dir / PROG_PIN))
        pinned.append(pin_dir / PROG_PIN)
    except BaseException:
        for path in pinned:
            path.unlink(missing_ok=True)
        raise
    return pinned


def unpin(pin_dir: Path, names: list[str]) -> None:
    """Remove the program pin and these map pins, then the directory if it is empty."""
    for name in (PROG_PIN, *names):
        (pin_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        pin_dir.rmdir()


def remove_pin_dir(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _read_raw_config(fd: int, value_size: int) -> bytes:
    m: bpfsys.Map[Any, Any] = bpfsys.Map(
        os.dup(fd), "xdpfw_config", ctypes.c_uint32, ctypes.c_uint8 * value_size
    )
    try:
        val = m.lookup(U32.pack(0))
        return bytes(val) if val is not None else b""
    finally:
        m.close()


def pinned_abi(pin_dir: Path) -> int:
    """The ABI the pins in pin_dir speak: abi.ABI_VERSION, ABI4 (an upgrade adopts them) or
    another number (refused by open_pins); -1 when unreadable."""
    version, size = _pinned_abi(pin_dir)
    if version == ABI4 and size == ctypes.sizeof(Abi4Config):
        return ABI4
    if version == abi.ABI_VERSION and size != ctypes.sizeof(abi.Config):
        return -1
    return version


def _pinned_abi(pin_dir: Path) -> tuple[int, int]:
    """(ABI version, xdpfw_config value size) the pins record; version -1 when unreadable."""
    conf_fd = bpfsys.obj_get(str(pin_dir / "xdpfw_config"))
    try:
        info = bpfsys.map_info(conf_fd)
        raw = _read_raw_config(conf_fd, info.value_size)
    finally:
        os.close(conf_fd)
    version = U32.unpack_from(raw)[0] if len(raw) >= U32.size else -1
    return version, info.value_size


def open_pins(pin_dir: Path, abi4: bool = False) -> tuple[int, _Maps]:
    """(program fd, maps) of the complete pin set in pin_dir, whose ABI must be this build's
    (with abi4: ABI 4's, whose maps are opened with their ABI 4 layouts, for an upgrade)."""
    how_to_fix = (
        f"To migrate: save the rules you need (`xdpfw rule ls --json`), then either remove the "
        f"old pins (`xdpfw detach --cleanup --bpffs-dir {pin_dir}`, or `rm -r {pin_dir}` after "
        f"detaching the old program) and import them again, or use another --bpffs-dir."
    )
    maps: _Maps = {}
    try:
        version, conf_size = _pinned_abi(pin_dir)
        want = (ABI4, ctypes.sizeof(Abi4Config)) if abi4 else (
            abi.ABI_VERSION, ctypes.sizeof(abi.Config))
        if (version, conf_size) != want:
            raise AbiMismatch(
                f"pinned maps in {pin_dir} speak ABI version {version}; this build speaks ABI "
                f"version {abi.ABI_VERSION} and will not reuse them. " + how_to_fix
            )
        for name, (key_t, val_t) in (MAP_TYPES_ABI4 if abi4 else MAP_TYPES).items():
            try:
                maps[name] = bpfsys.Map.from_pin(str(pin_dir / name), key_t, val_t, name)
            except ValueError as exc:
                raise AbiMismatch(
                    f"pinned map {name} in {pin_dir} has another layout than ABI version "
                    f"{abi.ABI_VERSION}'s: {exc}. " + how_to_fix
                ) from exc
        prog_fd = bpfsys.obj_get(str(pin_dir / PROG_PIN))
    except OSError as exc:
        for m in maps.values():
            m.close()
        if exc.errno == errno.ENOENT:
            raise AbiMismatch(f"incomplete pins under {pin_dir}: {exc}. " + how_to_fix) from exc
        raise kernel_error(f"opening pins under {pin_dir}", exc) from exc
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return prog_fd, maps


def ensure_bpffs(path: Path) -> None:
    """The pin directory must be on a bpf filesystem."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    with open("/proc/mounts") as fh:
        mounts = [line.split()[1:3] for line in fh]
    best = max((m for m in mounts if str(probe).startswith(m[0])), key=lambda m: len(m[0]))
    if best[1] != "bpf":
        raise DatapathError(
            f"{path} is not on a bpf filesystem (it is on {best[0]}, type {best[1]}). Mount one: "
            f"`mount -t bpf bpf /sys/fs/bpf` (make setup does this), or pick --bpffs-dir on bpffs."
        )
