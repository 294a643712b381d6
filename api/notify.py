"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

The service sends READY=1 once the program is attached and the API is serving (so
`After=xdpfw.service` with `Type=notify` means "filtering"), and STOPPING=1 when it begins
to shut down. Without NOTIFY_SOCKET (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger("xdpfw.server")


def notify(state: str) -> bool:
    """Send `state` ("READY=1\\nSTATUS=...") to systemd; False when there is nobody to tell."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (NOTIFY_SOCKET=%s): %s", where, exc)
        return False
    return True
