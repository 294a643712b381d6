"""The local API socket (`--listen unix:PATH`): group-owned, mode 0660, no token needed.

Who may connect is decided by the file: the owner (the service's user) and the members of
`socket_group` (default `xdpfw`; it must exist: `groupadd --system xdpfw`, which
deploy/systemd/xdpfw.sysusers also does). A peer is named by its uid (SO_PEERCRED): the
protocol puts it into each request's ASGI scope (api/auth.py PEER_UID), where the token check
lets it through and the audit log records it.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import PEER_UID

__all__ = ["SocketError", "bind_unix", "peer_aware"]

_UCRED = struct.Struct("3i")  # pid, uid, gid


class SocketError(Exception):
    """The socket cannot be made; the message says why and what to do."""


def bind_unix(path: Path, group: str, backlog: int = 2048) -> socket.socket:
    """A listening AF_UNIX socket at `path`, owned by `group`, mode 0660.

    A stale socket (nothing listening) is replaced; a live one or a file that is not a socket
    is refused. The directory is made (0755) when missing."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketError(
            f"group {group!r} for the API socket {path} does not exist: create it "
            f"(`groupadd --system {group}`) and add the users who may use the API without a "
            "token, or set socket_group (XDPFW_SOCKET_GROUP)"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketError(f"{path} exists and is not a socket; remove it or pick another path")
        if _alive(path):
            raise SocketError(f"another process serves {path}: is xdpfw already running?")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # never reachable by others, not even between bind and chmod
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot serve the API on {path}: {exc.strerror or exc}") from exc
    return sock


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class _PeerApp:
    """The app of one unix-socket connection: every request carries the peer's uid."""

    def __init__(self, app: ASGIApp, uid: int) -> None:
        self.app = app
        self.uid = uid

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[PEER_UID] = self.uid
        await self.app(scope, receive, send)


def peer_aware(protocol: type[Any]) -> type[Any]:
    """`protocol` (uvicorn's H11Protocol or a subclass) naming unix-socket peers by uid."""

    class PeerAware(protocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                _pid, uid, _gid = _UCRED.unpack(raw)
                app = cast(ASGIApp, self.__dict__["app"])
                self.app = _PeerApp(app, uid)

    PeerAware.__name__ = protocol.__name__
    return PeerAware
