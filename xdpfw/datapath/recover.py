"""Recognising an xdpfw program by what it carries, not by its pins, and re-pinning it.

A program whose pins were removed (`rm -rf /sys/fs/bpf/xdpfw`) keeps running: the interface
holds it, and it holds its maps. It is recognised as xdpfw's by its name (abi.PROG_NAME) and
its config map (xdpfw_config: the ABI version and the build id the writer records), reached
through the program's map ids. An *orphan* is such a program that no pin on any bpf
filesystem names: no other instance owns it. Recovery re-pins the orphan's own program and
maps into the pin directory, so the ordinary adoption (pins.open_pins, the rules rebuilt from
the maps) takes over with no change on the interface at all: no gap, counters kept.

Opening a program or a map by id needs CAP_SYS_ADMIN (BPF_PROG_GET_FD_BY_ID); without it a
program cannot be told apart from a foreign one, and `Unrecognisable` says so and how to
recover.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from xdpfw import abi
from xdpfw.datapath.pins import MAP_TYPES, PROG_PIN
from xdpfw.datapath.slots import U32
from xdpfw.datapath.translate import kernel_error
from xdpfw.errors import AbiMismatch, DatapathError
from xdpfw.kernel import bpfsys, netlink

__all__ = [
    "Orphan",
    "Unrecognisable",
    "detach_orphans",
    "find_orphans",
    "is_orphan",
    "pinned_prog_ids",
    "recognise",
    "repin",
]

_NAME_LEN = bpfsys.BPF_OBJ_NAME_LEN - 1  # the kernel keeps the first 15 bytes of a name


class Unrecognisable(DatapathError):
    """A program cannot be opened by id (no CAP_SYS_ADMIN): ours or foreign, nobody can tell."""

    def __init__(self, ifname: str, prog_id: int, pin_dir: Path, exc: OSError) -> None:
        super().__init__(
            f"interface {ifname} runs XDP program id {prog_id} and nothing is pinned under "
            f"{pin_dir}: it may be xdpfw's own program whose pins were removed, but telling "
            f"needs CAP_SYS_ADMIN (opening a program by id: {os.strerror(exc.errno or 0)}), "
            f"which this process lacks, so nothing was changed. To recover without a gap in "
            f"filtering, run the same command once with CAP_SYS_ADMIN (as root, outside the "
            f"container): it recognises the program and re-pins it under {pin_dir}; then "
            f"start as before. Or check it with `bpftool prog show id {prog_id}`: if its name "
            f"is {abi.PROG_NAME}, `ip link set dev {ifname} xdp off` (filtering stops until "
            f"the service attaches again) and start again."
        )
        self.ifname = ifname
        self.prog_id = prog_id


@dataclass
class Orphan:
    """A running xdpfw program, opened by id: its fd, its maps' fds by name, its config."""

    prog_id: int
    prog_fd: int
    map_fds: dict[str, int] = field(default_factory=dict)
    abi_version: int = -1
    build_id: bytes = b""
    ifnames: list[str] = field(default_factory=list)  # where it was found attached

    def close(self) -> None:
        for fd in (self.prog_fd, *self.map_fds.values()):
            with suppress(OSError):
                os.close(fd)
        self.map_fds.clear()
        self.prog_fd = -1


def _config(fd: int) -> tuple[int, bytes] | None:
    """(ABI version, build id) of an xdpfw_config map, None if it has another layout."""
    info = bpfsys.map_info(fd)
    if info.value_size < U32.size or info.key_size != U32.size:
        return None
    m: bpfsys.Map[ctypes.c_uint32, ctypes.Array[ctypes.c_uint8]] = bpfsys.Map(
        os.dup(fd), "xdpfw_config", ctypes.c_uint32, ctypes.c_uint8 * info.value_size
    )
    try:
        raw = m.lookup_raw(U32.pack(0)) or b""
    finally:
        m.close()
    if len(raw) < U32.size:
        return None
    version = U32.unpack_from(raw)[0]
    if info.value_size != ctypes.sizeof(abi.Config):  # another ABI's layout: no build id
        return (-1 if version == abi.ABI_VERSION else version), b""
    return version, bytes(abi.Config.from_buffer_copy(raw).build_id)


def recognise(prog_id: int) -> Orphan | None:
    """The program as an Orphan if it is an xdpfw program (name and config map), else None.

    Raises OSError (EPERM without CAP_SYS_ADMIN, ENOENT when it is gone) from opening it.
    The caller closes the result. Not yet checked: whether a pin names it (`is_orphan`).
    """
    fd = bpfsys.prog_get_fd_by_id(prog_id)
    found = Orphan(prog_id, fd)
    try:
        info = bpfsys.prog_info(fd)
        if info.name != abi.PROG_NAME[:_NAME_LEN] or info.type != bpfsys.BPF_PROG_TYPE_XDP:
            found.close()
            return None
        short = {name[:_NAME_LEN]: name for name in MAP_TYPES}
        for map_id in info.map_ids:
            mfd = bpfsys.map_get_fd_by_id(map_id)
            name = short.get(bpfsys.map_info(mfd).name)
            if name is None or name in found.map_fds:
                os.close(mfd)
                continue
            found.map_fds[name] = mfd
        conf_fd = found.map_fds.get("xdpfw_config")
        conf = _config(conf_fd) if conf_fd is not None else None
        if conf is None:  # named like ours but carries no config map: not ours
            found.close()
            return None
        found.abi_version, found.build_id = conf
        return found
    except BaseException:
        found.close()
        raise


def _bpf_mounts() -> list[Path]:
    with open("/proc/mounts") as fh:
        return [Path(p[1]) for p in (line.split() for line in fh) if p[2] == "bpf"]


def pinned_prog_ids(roots: Iterable[Path] | None = None) -> set[int]:
    """Ids of the programs pinned as PROG_PIN anywhere on the bpf filesystems (or `roots`)."""
    ids: set[int] = set()
    for root in roots if roots is not None else _bpf_mounts():
        for dirpath, _dirs, files in os.walk(root):
            if PROG_PIN not in files:
                continue
            try:
                fd = bpfsys.obj_get(os.path.join(dirpath, PROG_PIN))
            except OSError:
                continue
            try:
                ids.add(bpfsys.prog_info(fd).id)
            except OSError:
                pass  # a map pinned as "prog" by someone else
            finally:
                os.close(fd)
    return ids


def is_orphan(prog_id: int) -> Orphan | None:
    """The program if it is xdpfw's and no pin names it (no instance owns it), else None.

    None also when it cannot be opened by id (no CAP_SYS_ADMIN, or gone): unknown programs
    are left alone.
    """
    try:
        found = recognise(prog_id)
    except OSError:
        return None
    if found is not None and prog_id in pinned_prog_ids():
        found.close()
        return None
    return found


def find_orphans(
    ifnames: Iterable[str], pin_dir: Path, unknown: list[Unrecognisable] | None = None
) -> Iterator[Orphan]:
    """Orphaned xdpfw programs attached to these interfaces (missing ones are skipped), one
    Orphan per program with every interface it was found on. A program that cannot be opened
    by id for want of CAP_SYS_ADMIN raises Unrecognisable, or is added to `unknown`."""
    seen: dict[int, Orphan | None] = {}
    pinned: set[int] | None = None
    for name in dict.fromkeys(ifnames):
        try:
            state = netlink.xdp_state(name)
        except netlink.NetlinkOpError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL):
                continue
            raise kernel_error(f"reading the XDP state of {name}", exc) from exc
        if not state.prog_id:
            continue
        if state.prog_id not in seen:
            try:
                found = recognise(state.prog_id)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES) and unknown is not None:
                    unknown.append(Unrecognisable(name, state.prog_id, pin_dir, exc))
                    seen[state.prog_id] = None
                    continue
                if exc.errno in (errno.EPERM, errno.EACCES):
                    for o in seen.values():
                        if o is not None:
                            o.close()
                    raise Unrecognisable(name, state.prog_id, pin_dir, exc) from exc
                found = None  # gone meanwhile
            if found is not None:
                pinned = pinned_prog_ids() if pinned is None else pinned
                if found.prog_id in pinned:  # another instance's program
                    found.close()
                    found = None
            seen[state.prog_id] = found
        orphan = seen[state.prog_id]
        if orphan is not None:
            orphan.ifnames.append(name)
    for orphan in seen.values():
        if orphan is not None:
            yield orphan


def repin(orphan: Orphan, pin_dir: Path) -> None:
    """Pin the orphan's maps, then its program, under pin_dir (the program pin last: it marks
    a complete set). Refuses (AbiMismatch) an orphan of another ABI, or missing maps."""
    where = ", ".join(orphan.ifnames) or "no interface"
    fix = (
        f"Save its rules if you need them, then `ip link set dev IFACE xdp off` on {where} "
        f"(filtering stops until the service attaches again) and start again."
    )
    if orphan.abi_version != abi.ABI_VERSION:
        raise AbiMismatch(
            f"XDP program id {orphan.prog_id} on {where} is an xdpfw program whose pins are "
            f"gone, of ABI version {orphan.abi_version}; this build speaks ABI version "
            f"{abi.ABI_VERSION} and cannot adopt it. " + fix
        )
    missing = sorted(set(MAP_TYPES) - set(orphan.map_fds))
    if missing:
        raise AbiMismatch(
            f"XDP program id {orphan.prog_id} on {where} is named {abi.PROG_NAME} but lacks "
            f"the maps {', '.join(missing)}; it cannot be adopted. " + fix
        )
    pinned: list[Path] = []
    try:
        pin_dir.mkdir(parents=True, exist_ok=True)
        for name, fd in orphan.map_fds.items():
            bpfsys.obj_pin(fd, str(pin_dir / name))
            pinned.append(pin_dir / name)
        bpfsys.obj_pin(orphan.prog_fd, str(pin_dir / PROG_PIN))
    except OSError as exc:
        for path in pinned:
            path.unlink(missing_ok=True)
        raise kernel_error(f"re-pinning program id {orphan.prog_id} under {pin_dir}", exc) from exc


def detach_orphans(
    ifnames: Iterable[str], pin_dir: Path, unknown: list[Unrecognisable] | None = None
) -> list[tuple[str, int]]:
    """Detach every orphaned xdpfw program from these interfaces, atomically (only if it is
    still the one attached). Returns (interface, program id) of each detach."""
    done: list[tuple[str, int]] = []
    for orphan in find_orphans(ifnames, pin_dir, unknown):
        try:
            for name in orphan.ifnames:
                try:
                    netlink.xdp_detach(name, "auto", expected_prog_fd=orphan.prog_fd)
                except netlink.NetlinkOpError as exc:
                    raise kernel_error(f"detaching program id {orphan.prog_id} from {name}",
                                       exc) from exc
                done.append((name, orphan.prog_id))
        finally:
            orphan.close()
    return done
