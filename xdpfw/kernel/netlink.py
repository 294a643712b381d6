"""Netlink plumbing: XDP attach/detach, interfaces, addresses, network namespaces.

This is the only module of xdpfw that imports pyroute2 (which ships no type
stubs, so everything coming from it is treated as ``Any``).  It never imports
bcc: programs are handed in as already loaded file descriptors.  The one bpf(2)
call it needs (an fd for the program an atomic detach expects) goes through
xdpfw.kernel.bpfsys.  The namespace/veth test lab built on these functions is
xdpfw.lab, not part of this module.

Every failure is raised as :class:`NetlinkOpError` carrying ``.errno`` (the
kernel's errno, e.g. ``errno.EBUSY``) and ``.op`` (which operation failed), so
callers can swallow exactly the errno they expect and nothing else.

Namespaces are entered per *thread* with ``setns(2)`` (never process wide) and
the original namespace is always restored, also on error.  pyroute2's own
``netns.pushns``/``popns`` are not used on purpose: they keep a process-global
stack (not thread safe) and save ``/proc/self/ns/net`` (the main thread's
namespace rather than the calling thread's).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import re
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from xdpfw.kernel import bpfsys

__all__ = [
    "IFNAMSIZ",
    "RTMGRP_LINK",
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_REPLACE",
    "XDP_FLAGS_SKB_MODE",
    "XDP_FLAGS_UPDATE_IF_NOEXIST",
    "LinkEvent",
    "LinkMonitor",
    "NetlinkOpError",
    "XdpState",
    "addr_add",
    "addr_list",
    "disable_ipv6_noise",
    "ifindex",
    "link_exists",
    "link_list",
    "link_mac",
    "link_remove",
    "link_up",
    "neigh_add",
    "netns_create",
    "netns_list",
    "netns_remove",
    "socket_in_netns",
    "veth_create",
    "xdp_attach",
    "xdp_detach",
    "xdp_find",
    "xdp_state",
]

XDP_FLAGS_UPDATE_IF_NOEXIST: Final = 1
XDP_FLAGS_SKB_MODE: Final = 2
XDP_FLAGS_DRV_MODE: Final = 4
_XDP_FLAGS_HW_MODE: Final = 8
XDP_FLAGS_REPLACE: Final = 16
RTMGRP_LINK: Final = 1  # rtnetlink multicast group of link (interface) changes

_MODE_FLAGS: Final[dict[str, int]] = {
    "native": XDP_FLAGS_DRV_MODE,
    "generic": XDP_FLAGS_SKB_MODE,
    "offload": _XDP_FLAGS_HW_MODE,
}
_ATTACH_MODES: Final = ("native", "generic", "auto")

# IFLA_XDP_ATTACHED values; pyroute2 0.9 decodes them to strings, older
# versions (and raw messages) give the integer.
_ATTACHED_NAMES: Final[dict[object, str]] = {
    0: "none",
    None: "none",
    1: "native",
    "xdp": "native",
    2: "generic",
    "xdpgeneric": "generic",
    3: "offload",
    "xdpoffload": "offload",
    4: "multi",
    "xdpmulti": "multi",
}

_IFA_F_NODAD: Final = 0x02
_NUD_PERMANENT: Final = 0x80
_CLONE_NEWNET: Final = 0x40000000
IFNAMSIZ: Final = 16  # interface names are at most IFNAMSIZ - 1 bytes
_NETNS_RUN_DIR: Final = "/var/run/netns"
_IPV6_NOISE_KNOBS: Final = ("accept_ra", "autoconf", "dad_transmits", "router_solicitations")


class NetlinkOpError(Exception):
    """A netlink / namespace operation failed.

    ``errno`` is the kernel errno (``errno.ENODEV``, ``errno.EBUSY``, ...),
    ``op`` names the operation (``"xdp_attach"``, ``"veth_create"``, ...).
    The message says what failed and what to do about it.
    """

    def __init__(self, errno: int, op: str, message: str) -> None:
        self.errno = errno
        self.op = op
        self.message = message
        code = _errno_name(errno)
        super().__init__(f"{op} failed: {message} (errno {code})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.op, self.message))


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


@dataclass(frozen=True)
class XdpState:
    """XDP attachment of one interface as reported by IFLA_XDP."""

    ifname: str
    ifindex: int
    prog_id: int  # 0 = nothing attached
    mode: str  # "none" | "native" | "generic" | "offload" | "multi"


# --------------------------------------------------------------------------
# helpers: names, namespaces, pyroute2 sockets, error wrapping
# --------------------------------------------------------------------------


def _where(netns: str | None) -> str:
    return "the root network namespace" if netns is None else f"network namespace {netns!r}"


def _check_ifname(name: str, op: str) -> None:
    if (
        not name
        or len(name.encode()) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:")
        or any(c.isspace() for c in name)
    ):
        raise NetlinkOpError(
            errno.EINVAL,
            op,
            f"invalid interface name {name!r}: use 1-15 characters without '/', ':' or whitespace",
        )


def _check_nsname(name: str, op: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise NetlinkOpError(
            errno.EINVAL, op, f"invalid network namespace name {name!r}: use a plain name"
        )


def _nl_error(exc: NetlinkError, op: str, what: str, hint: str = "") -> NetlinkOpError:
    code = int(exc.code)
    message = f"{what}: {os.strerror(code)}"
    if hint:
        message += f"; {hint}"
    return NetlinkOpError(code, op, message)


_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc


def _setns(fd: int) -> None:
    if _get_libc().setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextlib.contextmanager
def _entered_netns(name: str, op: str) -> Iterator[None]:
    """Move the *calling thread* into namespace ``name``; always move it back."""
    _check_nsname(name, op)
    try:
        target = os.open(os.path.join(_NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetlinkOpError(
            errno.ENOENT,
            op,
            f"network namespace {name!r} does not exist; create it first "
            "(netns_create) or check the name with `ip netns list`",
        ) from None
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except OSError as exc:
                raise NetlinkOpError(
                    exc.errno or errno.EPERM,
                    op,
                    f"cannot enter network namespace {name!r}: {exc.strerror}; "
                    "this needs CAP_SYS_ADMIN",
                ) from exc
            try:
                yield
            finally:
                try:
                    _setns(original)
                except OSError as exc:  # pragma: no cover - should never happen
                    raise NetlinkOpError(
                        exc.errno or errno.EPERM,
                        op,
                        f"cannot return from network namespace {name!r}: {exc.strerror}; "
                        "this thread is now in the wrong namespace, restart the process",
                    ) from exc
        finally:
            os.close(original)
    finally:
        os.close(target)


@contextlib.contextmanager
def _rtnl(netns: str | None, op: str) -> Iterator[Any]:
    """An IPRoute whose netlink socket lives in ``netns`` (None = current namespace).

    The socket is created while the thread is inside the namespace (no fork,
    unlike ``IPRoute(netns=...)``) and stays bound to it afterwards.
    """
    if netns is None:
        ipr = IPRoute()
    else:
        with _entered_netns(netns, op):
            ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _link_msg(ipr: Any, name: str, netns: str | None, op: str) -> Any:
    _check_ifname(name, op)
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            raise NetlinkOpError(
                errno.ENODEV,
                op,
                f"interface {name!r} does not exist in {_where(netns)}; "
                "check the name with `ip link`"
                + ("" if netns is None else f" (`ip -n {netns} link`)"),
            ) from None
        raise _nl_error(exc, op, f"cannot look up interface {name!r} in {_where(netns)}") from exc


def _index_of(ipr: Any, name: str, netns: str | None, op: str) -> int:
    return int(_link_msg(ipr, name, netns, op)["index"])


# --------------------------------------------------------------------------
# interfaces and XDP
# --------------------------------------------------------------------------


def ifindex(name: str, netns: str | None = None) -> int:
    """Interface index of ``name``; NetlinkOpError(ENODEV) if it does not exist."""
    op = "ifindex"
    with _rtnl(netns, op) as ipr:
        return _index_of(ipr, name, netns, op)


@dataclass(frozen=True)
class _XdpRaw:
    mode: str
    prog_id: int
    drv_id: int
    skb_id: int
    hw_id: int

    def id_in(self, mode: str) -> int:
        return {"native": self.drv_id, "generic": self.skb_id, "offload": self.hw_id}[mode]

    def attached_modes(self) -> list[str]:
        return [m for m in ("native", "generic", "offload") if self.id_in(m)]


def _xdp_raw(msg: Any) -> _XdpRaw:
    xdp = msg.get_attr("IFLA_XDP")

    def get(attr: str) -> Any:
        return None if xdp is None else xdp.get_attr(attr)

    attached = get("IFLA_XDP_ATTACHED")
    mode = _ATTACHED_NAMES.get(attached, "none" if not attached else "multi")
    prog_id = int(get("IFLA_XDP_PROG_ID") or 0)
    drv_id = int(get("IFLA_XDP_DRV_PROG_ID") or 0)
    skb_id = int(get("IFLA_XDP_SKB_PROG_ID") or 0)
    hw_id = int(get("IFLA_XDP_HW_PROG_ID") or 0)
    # Single-mode attachments only report IFLA_XDP_PROG_ID on some kernels.
    if mode == "native" and not drv_id:
        drv_id = prog_id
    elif mode == "generic" and not skb_id:
        skb_id = prog_id
    elif mode == "offload" and not hw_id:
        hw_id = prog_id
    if not prog_id:
        prog_id = drv_id or skb_id or hw_id
    return _XdpRaw(mode=mode, prog_id=prog_id, drv_id=drv_id, skb_id=skb_id, hw_id=hw_id)


def _read_xdp(ipr: Any, name: str, netns: str | None, op: str) -> tuple[int, _XdpRaw]:
    msg = _link_msg(ipr, name, netns, op)
    return int(msg["index"]), _xdp_raw(msg)


def _to_state(name: str, idx: int, raw: _XdpRaw) -> XdpState:
    return XdpState(ifname=name, ifindex=idx, prog_id=raw.prog_id, mode=raw.mode)


def xdp_state(name: str, netns: str | None = None) -> XdpState:
    """Which XDP program (if any) is attached to ``name`` and in which mode."""
    op = "xdp_state"
    with _rtnl(netns, op) as ipr:
        idx, raw = _read_xdp(ipr, name, netns, op)
        return _to_state(name, idx, raw)


def xdp_find(prog_id: int, netns: str | None = None) -> list[XdpState]:
    """Every interface in ``netns`` where program ``prog_id`` is attached (any mode)."""
    op = "xdp_find"
    out: list[XdpState] = []
    with _rtnl(netns, op) as ipr:
        try:
            links = ipr.get_links()
        except NetlinkError as exc:
            raise _nl_error(exc, op, f"cannot list interfaces in {_where(netns)}") from exc
        for msg in links:
            raw = _xdp_raw(msg)
            if prog_id and prog_id in (raw.prog_id, raw.drv_id, raw.skb_id, raw.hw_id):
                name = str(msg.get_attr("IFLA_IFNAME"))
                out.append(_to_state(name, int(msg["index"]), raw))
    return out


def _set_xdp(ipr: Any, idx: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    # pyroute2 0.9's `xdp_fd=` keyword only emits IFLA_XDP_FD (no flags), so
    # the nested attribute is spelled out.
    ipr.link("set", index=idx, IFLA_XDP={"attrs": attrs})


def _busy(op: str, name: str, netns: str | None, raw: _XdpRaw, detail: str) -> NetlinkOpError:
    return NetlinkOpError(
        errno.EBUSY,
        op,
        f"XDP program id {raw.prog_id} is attached to {name!r} in {_where(netns)} "
        f"(mode {raw.mode}); {detail}",
    )


def xdp_attach(
    name: str,
    prog_fd: int,
    mode: str,
    netns: str | None = None,
    expected_prog_fd: int | None = None,
) -> XdpState:
    """Attach the XDP program ``prog_fd`` to interface ``name``.

    ``mode``: "native" (driver), "generic" (skb) or "auto" (native, falling
    back to generic when the driver refuses with EOPNOTSUPP/EINVAL).

    Without ``expected_prog_fd`` the attach never replaces anything
    (XDP_FLAGS_UPDATE_IF_NOEXIST): if a program is already attached it raises
    NetlinkOpError(EBUSY) naming that program's id.  With ``expected_prog_fd``
    it atomically replaces that program (XDP_FLAGS_REPLACE +
    IFLA_XDP_EXPECTED_FD): EBUSY if a different program is attached, ENOENT if
    nothing is attached.  In "auto" mode a replace keeps the mode currently in
    use.  Returns the resulting state, whose ``mode`` says which mode took.
    """
    op = "xdp_attach"
    if mode not in _ATTACH_MODES:
        raise ValueError(f"xdp_attach mode must be one of {_ATTACH_MODES}, not {mode!r}")
    with _rtnl(netns, op) as ipr:
        idx, raw = _read_xdp(ipr, name, netns, op)
        if expected_prog_fd is None:
            _attach_new(ipr, idx, name, netns, prog_fd, mode, op)
        else:
            _attach_replace(ipr, idx, name, netns, prog_fd, mode, expected_prog_fd, raw, op)
        idx, raw = _read_xdp(ipr, name, netns, op)
        return _to_state(name, idx, raw)


def _attach_new(
    ipr: Any, idx: int, name: str, netns: str | None, prog_fd: int, mode: str, op: str
) -> None:
    tries = ["native", "generic"] if mode == "auto" else [mode]
    refused = ""
    for attempt in tries:
        flags = XDP_FLAGS_UPDATE_IF_NOEXIST | _MODE_FLAGS[attempt]
        try:
            _set_xdp(ipr, idx, prog_fd, flags)
            return
        except NetlinkError as exc:
            if exc.code in (errno.EBUSY, errno.EEXIST):
                # EBUSY: a program is attached in this mode; EEXIST: one is
                # attached in the other mode (native and generic exclude each other).
                _, raw = _read_xdp(ipr, name, netns, op)
                raise _busy(
                    op,
                    name,
                    netns,
                    raw,
                    "nothing was changed; detach it first or pass expected_prog_fd "
                    "to replace it atomically",
                ) from None
            if (
                attempt == "native"
                and mode == "auto"
                and exc.code in (errno.EOPNOTSUPP, errno.EINVAL)
            ):
                refused = f"native mode refused ({os.strerror(exc.code)}), "
                continue
            raise _nl_error(
                exc,
                op,
                f"{refused}attaching program fd {prog_fd} to {name!r} in {_where(netns)} "
                f"in {attempt} mode failed",
                "check that the fd is a loaded XDP program"
                + ("" if attempt == "generic" else " and that the driver supports native XDP")
                + " (the kernel log / `ip link` may say more)",
            ) from exc


def _attach_replace(
    ipr: Any,
    idx: int,
    name: str,
    netns: str | None,
    prog_fd: int,
    mode: str,
    expected_fd: int,
    raw: _XdpRaw,
    op: str,
) -> None:
    if mode == "auto":
        modes = raw.attached_modes()
        use = modes[0] if len(modes) == 1 else "native"
    else:
        use = mode
    try:
        _set_xdp(ipr, idx, prog_fd, XDP_FLAGS_REPLACE | _MODE_FLAGS[use], expected_fd)
    except NetlinkError as exc:
        if exc.code in (errno.EEXIST, errno.EBUSY):
            _, now = _read_xdp(ipr, name, netns, op)
            if now.prog_id == 0:
                raise NetlinkOpError(
                    errno.ENOENT,
                    op,
                    f"cannot replace the XDP program on {name!r} in {_where(netns)}: nothing "
                    "is attached any more; attach without expected_prog_fd instead",
                ) from None
            raise _busy(
                op,
                name,
                netns,
                now,
                f"it is not the expected program (fd {expected_fd}) in {use} mode, so "
                "nothing was replaced; re-read xdp_state and decide",
            ) from None
        raise _nl_error(
            exc,
            op,
            f"replacing the XDP program on {name!r} in {_where(netns)} with fd {prog_fd} "
            f"({use} mode) failed",
            "check that both fds are loaded XDP programs",
        ) from exc


def _expected_fd(prog_id: int, name: str, netns: str | None, op: str) -> int:
    """A new fd for program ``prog_id``, which an atomic detach names as the expected one.

    Never None: without the fd the detach could not be atomic, and a silent plain
    detach might remove a program swapped in meanwhile, so a failure raises.
    """
    try:
        return bpfsys.prog_get_fd_by_id(prog_id)
    except bpfsys.BpfError as exc:
        code = exc.errno or errno.EIO
        raise NetlinkOpError(
            code,
            op,
            f"cannot open XDP program id {prog_id} (BPF_PROG_GET_FD_BY_ID: {exc.strerror}) "
            f"to detach it atomically from {name!r} in {_where(netns)}, so nothing was "
            "detached; "
            + (
                "that needs CAP_SYS_ADMIN, or pass expected_prog_fd"
                if code == errno.EPERM
                else "the program may have been replaced or unloaded meanwhile; re-read "
                "xdp_state and decide"
            ),
        ) from exc
    except OSError as exc:  # no bpf(2) syscall number for this machine
        raise NetlinkOpError(
            exc.errno or errno.ENOSYS,
            op,
            f"cannot open XDP program id {prog_id} for an atomic detach from {name!r} in "
            f"{_where(netns)}: {exc}; nothing was detached",
        ) from exc


def xdp_detach(
    name: str,
    mode: str,
    netns: str | None = None,
    expected_prog_id: int | None = None,
    *,
    expected_prog_fd: int | None = None,
) -> None:
    """Detach the XDP program attached to ``name`` in ``mode``.

    ``mode``: "native", "generic" or "auto" (whatever mode is in use).  A no-op
    when nothing is attached.  With ``expected_prog_id`` it refuses
    (NetlinkOpError(EBUSY), nothing touched) if the attached program is a
    different one; the detach itself is then atomic (XDP_FLAGS_REPLACE with the
    expected program), so a program swapped in concurrently is never removed.
    Also EBUSY when a program is attached only in a mode other than ``mode``.

    The atomic detach needs an fd of the expected program: pass it as
    ``expected_prog_fd`` when you hold one (its id is then the expected id, and
    ``expected_prog_id`` may be left out); otherwise it is opened by id with
    BPF_PROG_GET_FD_BY_ID, which the kernel allows only with CAP_SYS_ADMIN.  If
    that fails the call raises NetlinkOpError (with the errno, naming the id) and
    detaches nothing: it never falls back to a non-atomic detach.
    """
    op = "xdp_detach"
    if mode not in _ATTACH_MODES:
        raise ValueError(f"xdp_detach mode must be one of {_ATTACH_MODES}, not {mode!r}")
    if expected_prog_fd is not None:
        fd_id = bpfsys.prog_info(expected_prog_fd).id
        if expected_prog_id is not None and expected_prog_id != fd_id:
            raise ValueError(
                f"expected_prog_fd {expected_prog_fd} is program id {fd_id}, "
                f"not expected_prog_id {expected_prog_id}"
            )
        expected_prog_id = fd_id
    with _rtnl(netns, op) as ipr:
        idx, raw = _read_xdp(ipr, name, netns, op)
        if raw.prog_id == 0 and not raw.attached_modes():
            return
        if mode == "auto":
            targets = raw.attached_modes()
            if expected_prog_id is not None:
                targets = [m for m in targets if raw.id_in(m) == expected_prog_id]
        else:
            targets = [mode] if raw.id_in(mode) else []
            if targets and expected_prog_id is not None and raw.id_in(mode) != expected_prog_id:
                targets = []
        if not targets:
            wanted = "program" if expected_prog_id is None else f"program id {expected_prog_id}"
            raise _busy(
                op,
                name,
                netns,
                raw,
                f"no {wanted} is attached in {mode} mode, so nothing was detached "
                "(a program we did not attach is never removed)",
            )
        if expected_prog_id is None or expected_prog_fd is not None:
            for target in targets:
                _detach_one(ipr, idx, name, netns, target, expected_prog_id, expected_prog_fd, op)
            return
        fd = _expected_fd(expected_prog_id, name, netns, op)
        try:
            for target in targets:
                _detach_one(ipr, idx, name, netns, target, expected_prog_id, fd, op)
        finally:
            os.close(fd)


def _detach_one(
    ipr: Any,
    idx: int,
    name: str,
    netns: str | None,
    mode: str,
    expected_prog_id: int | None,
    expected_fd: int | None,
    op: str,
) -> None:
    flags = _MODE_FLAGS[mode]
    try:
        if expected_fd is None:
            _set_xdp(ipr, idx, -1, flags)
        else:
            _set_xdp(ipr, idx, -1, flags | XDP_FLAGS_REPLACE, expected_fd)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST and expected_fd is not None:
            _, now = _read_xdp(ipr, name, netns, op)
            if now.id_in(mode) == 0:
                return  # detached meanwhile by someone else: nothing left to do
            raise _busy(
                op,
                name,
                netns,
                now,
                f"the program changed under us (expected id {expected_prog_id}), "
                "nothing was detached",
            ) from None
        raise _nl_error(
            exc, op, f"detaching the {mode} XDP program from {name!r} in {_where(netns)} failed"
        ) from exc


# --------------------------------------------------------------------------
# link events
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkEvent:
    """One RTMGRP_LINK notification: an interface appeared or changed ("new"), went
    ("del"), or some notifications were lost ("lost": the socket buffer overflowed, so
    re-read whatever state matters)."""

    event: str  # "new" | "del" | "lost"
    ifname: str
    ifindex: int
    prog_id: int  # the XDP program attached after the change (0: none)


class LinkMonitor:
    """Link notifications of the root namespace (or ``netns``), read with a timeout.

        with LinkMonitor() as mon:
            for ev in mon.wait(1.0):  # [] when nothing happened within a second
                ...

    A notification arrives for a link created or deleted, brought up or down, and for an
    XDP program attached or detached (``ip link set dev X xdp off``).
    """

    def __init__(self, netns: str | None = None) -> None:
        op = "link_monitor"
        self._netns = netns
        if netns is None:
            self._ipr: Any = IPRoute()
        else:
            with _entered_netns(netns, op):
                self._ipr = IPRoute()
        try:
            self._ipr.bind(groups=RTMGRP_LINK)
        except NetlinkError as exc:
            self._ipr.close()
            raise _nl_error(exc, op, f"cannot listen to link events in {_where(netns)}") from exc
        except OSError as exc:
            self._ipr.close()
            raise NetlinkOpError(
                exc.errno or errno.EIO, op, f"cannot listen to link events: {exc}"
            ) from exc

    def wait(self, timeout: float) -> list[LinkEvent]:
        """The notifications that arrive within ``timeout`` seconds ([] if none)."""
        try:
            ready, _, _ = select.select([self._ipr.fileno()], [], [], timeout)
            if not ready:
                return []
            msgs = self._ipr.get()
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return [LinkEvent("lost", "", 0, 0)]
            raise NetlinkOpError(
                exc.errno or errno.EIO, "link_monitor", f"reading link events failed: {exc}"
            ) from exc
        except NetlinkError as exc:
            if exc.code == errno.ENOBUFS:
                return [LinkEvent("lost", "", 0, 0)]
            raise _nl_error(exc, "link_monitor", "reading link events failed") from exc
        out: list[LinkEvent] = []
        for msg in msgs:
            kind = {"RTM_NEWLINK": "new", "RTM_DELLINK": "del"}.get(str(msg.get("event")))
            if kind is None:
                continue
            out.append(
                LinkEvent(
                    kind,
                    str(msg.get_attr("IFLA_IFNAME") or ""),
                    int(msg["index"]),
                    _xdp_raw(msg).prog_id,
                )
            )
        return out

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> LinkMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# namespaces, veths, addresses, neighbours
# --------------------------------------------------------------------------


def netns_create(name: str) -> None:
    """Create a named network namespace (like `ip netns add`); EEXIST if it exists."""
    op = "netns_create"
    _check_nsname(name, op)
    exists = NetlinkOpError(
        errno.EEXIST,
        op,
        f"network namespace {name!r} already exists; pick another name or remove it",
    )
    # Checked up front: pyroute2 0.9.7's netns.create() leaks its control
    # socketpair when the child fails (e.g. on an existing name).
    if os.path.lexists(os.path.join(_NETNS_RUN_DIR, name)):
        raise exists
    try:
        _pr_netns.create(name)
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        raise NetlinkOpError(
            exc.errno or errno.EIO,
            op,
            f"cannot create network namespace {name!r}: {exc}; this needs root "
            f"and a writable {_NETNS_RUN_DIR}",
        ) from exc


def netns_remove(name: str) -> None:
    """Remove a named network namespace; no error if it does not exist."""
    op = "netns_remove"
    _check_nsname(name, op)
    try:
        _pr_netns.remove(name)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NetlinkOpError(
            exc.errno or errno.EIO,
            op,
            f"cannot remove network namespace {name!r}: {exc}; try `ip netns del {name}`",
        ) from exc


def netns_list() -> list[str]:
    """Names of the named network namespaces (sorted)."""
    return sorted(str(n) for n in _pr_netns.listnetns())


def veth_create(
    host_name: str,
    peer_name: str,
    peer_netns: str | None,
    host_netns: str | None = None,
    *,
    up: bool = True,
) -> None:
    """Create a veth pair ``host_name`` (in ``host_netns``) <-> ``peer_name`` (in ``peer_netns``).

    Both ends are brought up unless ``up=False``.  The pair is created atomically
    (the peer is born directly in ``peer_netns``).
    """
    op = "veth_create"
    _check_ifname(host_name, op)
    _check_ifname(peer_name, op)
    peer: dict[str, Any] = {"ifname": peer_name}
    if peer_netns is not None:
        _check_nsname(peer_netns, op)
        if peer_netns not in netns_list():
            raise NetlinkOpError(
                errno.ENOENT,
                op,
                f"network namespace {peer_netns!r} does not exist; create it first",
            )
        peer["net_ns_fd"] = peer_netns
    with _rtnl(host_netns, op) as ipr:
        try:
            ipr.link("add", ifname=host_name, kind="veth", peer=peer)
        except NetlinkError as exc:
            raise _nl_error(
                exc,
                op,
                f"cannot create veth {host_name!r} in {_where(host_netns)} with peer "
                f"{peer_name!r} in {_where(peer_netns)}",
                "an interface with one of these names probably exists already; "
                "remove it (link_remove; lab leftovers: xdpfw.lab.cleanup_stale) "
                "or pick other names",
            ) from exc
    if up:
        link_up(host_name, host_netns)
        link_up(peer_name, host_netns if peer_netns is None else peer_netns)


def link_remove(name: str, netns: str | None = None) -> None:
    """Delete interface ``name``; no error if it (or the namespace) does not exist."""
    op = "link_remove"
    _check_ifname(name, op)
    if netns is not None and netns not in netns_list():
        return
    with _rtnl(netns, op) as ipr:
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return
            raise _nl_error(exc, op, f"cannot delete {name!r} in {_where(netns)}") from exc


def link_up(name: str, netns: str | None = None) -> None:
    """Set interface ``name`` administratively up."""
    op = "link_up"
    with _rtnl(netns, op) as ipr:
        idx = _index_of(ipr, name, netns, op)
        try:
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise _nl_error(exc, op, f"cannot bring {name!r} up in {_where(netns)}") from exc


def link_mac(name: str, netns: str | None = None) -> str:
    """MAC address of ``name`` as lower-case ``aa:bb:cc:dd:ee:ff``."""
    op = "link_mac"
    with _rtnl(netns, op) as ipr:
        mac = _link_msg(ipr, name, netns, op).get_attr("IFLA_ADDRESS")
    if not mac:
        raise NetlinkOpError(
            errno.EADDRNOTAVAIL, op, f"interface {name!r} in {_where(netns)} has no MAC address"
        )
    return str(mac).lower()


def link_exists(name: str, netns: str | None = None) -> bool:
    """Whether interface ``name`` exists in ``netns`` (other failures raise)."""
    try:
        ifindex(name, netns)
    except NetlinkOpError as exc:
        if exc.errno == errno.ENODEV:
            return False
        raise
    return True


def link_list(kind: str | None = None, netns: str | None = None) -> list[str]:
    """Names of the interfaces in ``netns``; with ``kind`` (e.g. "veth") only those of that kind."""
    op = "link_list"
    with _rtnl(netns, op) as ipr:
        try:
            links = ipr.get_links()
        except NetlinkError as exc:
            raise _nl_error(exc, op, f"cannot list interfaces in {_where(netns)}") from exc
    return [
        str(msg.get_attr("IFLA_IFNAME"))
        for msg in links
        if kind is None or _link_kind(msg) == kind
    ]


def _link_kind(msg: Any) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    if info is None:
        return None
    kind = info.get_attr("IFLA_INFO_KIND")
    return None if kind is None else str(kind)


def addr_list(netns: str | None = None) -> list[str]:
    """Every address configured in ``netns`` (IPv4 and IPv6, any interface), as text."""
    op = "addr_list"
    with _rtnl(netns, op) as ipr:
        try:
            msgs = ipr.get_addr()
        except NetlinkError as exc:
            raise _nl_error(exc, op, f"cannot list addresses in {_where(netns)}") from exc
    return [str(a) for a in (msg.get_attr("IFA_ADDRESS") for msg in msgs) if a]


def addr_add(name: str, cidr: str, netns: str | None = None) -> None:
    """Add address ``cidr`` (e.g. "198.18.0.1/24", "2001:db8::1/64") to ``name``.

    IPv6 addresses get IFA_F_NODAD so they are usable immediately.
    """
    op = "addr_add"
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise NetlinkOpError(errno.EINVAL, op, f"invalid address {cidr!r}: {exc}") from None
    kwargs: dict[str, Any] = {
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 6:
        kwargs["flags"] = _IFA_F_NODAD
    with _rtnl(netns, op) as ipr:
        idx = _index_of(ipr, name, netns, op)
        try:
            ipr.addr("add", index=idx, **kwargs)
        except NetlinkError as exc:
            raise _nl_error(
                exc,
                op,
                f"cannot add {cidr} to {name!r} in {_where(netns)}",
                "EEXIST means the address is already configured there",
            ) from exc


def neigh_add(name: str, ip: str, lladdr: str, netns: str | None = None) -> None:
    """Install (or replace) a permanent neighbour entry ``ip`` -> ``lladdr`` on ``name``."""
    op = "neigh_add"
    try:
        dst = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise NetlinkOpError(errno.EINVAL, op, f"invalid IP address {ip!r}: {exc}") from None
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", lladdr):
        raise NetlinkOpError(errno.EINVAL, op, f"invalid MAC address {lladdr!r}")
    with _rtnl(netns, op) as ipr:
        idx = _index_of(ipr, name, netns, op)
        try:
            ipr.neigh(
                "replace",
                ifindex=idx,
                dst=str(dst),
                lladdr=lladdr.lower(),
                state=_NUD_PERMANENT,
                family=socket.AF_INET6 if dst.version == 6 else socket.AF_INET,
            )
        except NetlinkError as exc:
            raise _nl_error(
                exc, op, f"cannot add neighbour {ip} -> {lladdr} on {name!r} in {_where(netns)}"
            ) from exc


def _write_ipv6_knobs(name: str, netns: str | None, op: str) -> None:
    base = "/proc/sys/net/ipv6/conf"
    if not os.path.isdir(base):
        return  # IPv6 disabled in this kernel / namespace: no noise to silence
    conf = os.path.join(base, name)
    if not os.path.isdir(conf):
        raise NetlinkOpError(
            errno.ENODEV,
            op,
            f"interface {name!r} does not exist in {_where(netns)} (no {conf}); check the name",
        )
    for knob in _IPV6_NOISE_KNOBS:
        path = os.path.join(conf, knob)
        try:
            with open(path, "w") as fh:
                fh.write("0\n")
        except OSError as exc:
            raise NetlinkOpError(
                exc.errno or errno.EIO, op, f"cannot write {path} in {_where(netns)}: {exc}"
            ) from exc


def disable_ipv6_noise(name: str, netns: str | None = None) -> None:
    """Silence IPv6 RA/autoconf/DAD/router solicitations on ``name``.

    Writes 0 to /proc/sys/net/ipv6/conf/<name>/{accept_ra,autoconf,dad_transmits,
    router_solicitations} inside ``netns`` (the calling thread enters the
    namespace, so /proc/sys/net reflects it, and always returns).
    """
    op = "disable_ipv6_noise"
    _check_ifname(name, op)
    if netns is None:
        _write_ipv6_knobs(name, netns, op)
    else:
        with _entered_netns(netns, op):
            _write_ipv6_knobs(name, netns, op)


def socket_in_netns(netns: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket created inside ``netns`` (it stays bound to that namespace).

    Only the calling thread switches namespace, and always switches back.
    """
    op = "socket_in_netns"
    with _entered_netns(netns, op):
        try:
            return socket.socket(family, type, proto)
        except OSError as exc:
            raise NetlinkOpError(
                exc.errno or errno.EIO, op, f"cannot create a socket in {_where(netns)}: {exc}"
            ) from exc
