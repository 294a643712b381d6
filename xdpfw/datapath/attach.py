"""Attaching the program to interfaces and finding where it is attached (netlink).

Never touches an XDP program xdpfw did not attach: a foreign one is reported with its id
and name. Netlink errors leave as InterfaceNotFound, ForeignProgram or KernelError.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdpfw.datapath.translate import kernel_door, kernel_error
from xdpfw.errors import ForeignProgram, InterfaceNotFound
from xdpfw.kernel import bpfsys, netlink

if TYPE_CHECKING:
    from xdpfw.datapath.recover import Orphan

__all__ = ["MODES", "Attachment", "attach", "attachments", "detach", "prog_name", "replace"]

MODES = ("auto", "native", "generic")


@dataclass(frozen=True)
class Attachment:
    ifname: str
    ifindex: int
    mode: str  # "native" | "generic"
    prog_id: int


def prog_name(prog_id: int) -> str:
    """The name of a loaded program, "" when it cannot be told."""
    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return bpfsys.prog_info(fd).name
    finally:
        os.close(fd)


def attach(
    ifname: str,
    prog_fd: int,
    prog_id: int,
    mode: str,
    orphan: Callable[[int], Orphan | None] | None = None,
) -> Attachment:
    """Attach to ifname (native where possible in auto mode). Idempotent for our program.

    A program already there is swapped for ours atomically (XDP_FLAGS_REPLACE) only when
    `orphan(its id)` returns it (an xdpfw program no instance owns); otherwise ForeignProgram.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be auto, native or generic, not {mode!r}")
    try:
        state = netlink.xdp_state(ifname)
        if state.prog_id and state.prog_id != prog_id:
            found = orphan(state.prog_id) if orphan is not None else None
            if found is None:
                raise ForeignProgram(ifname, state.prog_id, prog_name(state.prog_id))
            try:
                state = netlink.xdp_attach(ifname, prog_fd, "auto", expected_prog_fd=found.prog_fd)
            finally:
                found.close()
            return Attachment(ifname, state.ifindex, state.mode, state.prog_id)
        if state.prog_id == prog_id:
            return Attachment(ifname, state.ifindex, state.mode, state.prog_id)
        state = netlink.xdp_attach(ifname, prog_fd, mode)
    except netlink.NetlinkOpError as exc:
        if exc.errno == errno.ENODEV:
            raise InterfaceNotFound(ifname) from exc
        if exc.errno == errno.EBUSY:
            cur = netlink.xdp_state(ifname)
            raise ForeignProgram(ifname, cur.prog_id, prog_name(cur.prog_id)) from exc
        raise kernel_error(f"attach XDP to {ifname}", exc) from exc
    return Attachment(ifname, state.ifindex, state.mode, state.prog_id)


def detach(ifname: str, prog_id: int, prog_fd: int) -> None:
    """Detach our program from ifname; never touches a program we did not attach.

    The expected program is named by its fd, not its id: opening a program by id needs
    CAP_SYS_ADMIN, which the service does not have in its container.
    """
    try:
        state = netlink.xdp_state(ifname)
        if state.prog_id == 0:
            return
        if state.prog_id != prog_id:
            raise ForeignProgram(ifname, state.prog_id, prog_name(state.prog_id))
        netlink.xdp_detach(ifname, state.mode, expected_prog_fd=prog_fd)
    except netlink.NetlinkOpError as exc:
        if exc.errno == errno.ENODEV:
            raise InterfaceNotFound(ifname) from exc
        raise kernel_error(f"detach XDP from {ifname}", exc) from exc


def replace(att: Attachment, prog_fd: int, old_prog_fd: int) -> None:
    """Swap the program on an interface atomically (XDP_FLAGS_REPLACE)."""
    with kernel_door(f"replacing XDP on {att.ifname}"):
        netlink.xdp_attach(att.ifname, prog_fd, att.mode, expected_prog_fd=old_prog_fd)


def attachments(prog_id: int) -> list[Attachment]:
    """Interfaces (root namespace) where program prog_id is attached."""
    with kernel_door("finding XDP attachments"):
        found = netlink.xdp_find(prog_id)
    return [Attachment(s.ifname, s.ifindex, s.mode, s.prog_id) for s in found]
