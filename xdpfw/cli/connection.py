"""The connection options (--api, --token, --state-dir, --timeout) and the wrapper that turns
them into a Client for a command and its ClientError into a message and an exit code."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from xdpfw.cli.output import err

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = [
    "CLIENT_DESTS",
    "DEFAULT_SOCKET",
    "Handler",
    "add_client_options",
    "api_url",
    "client_command",
]

# The service's local socket (`xdpfw serve --listen unix:/run/xdpfw/api.sock`): the CLI uses it
# when no --api / XDPFW_API is given and this user may connect to it (a member of its group).
DEFAULT_SOCKET = Path("/run/xdpfw/api.sock")


CLIENT_DESTS = ("api", "token", "client_state_dir", "timeout")


def add_client_options(p: argparse.ArgumentParser) -> None:
    """Connection options; accepted before or after the command (SUPPRESS keeps either)."""
    g = p.add_argument_group("connection")
    g.add_argument(
        "--api",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="API base URL, or unix:PATH for the local socket (env XDPFW_API; default the "
        "socket /run/xdpfw/api.sock when it is there and usable, else http://127.0.0.1:8000)",
    )
    g.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="bearer token (env XDPFW_TOKEN; default read from <state-dir>/token)",
    )
    g.add_argument(
        "--state-dir",
        dest="client_state_dir",
        type=Path,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where the service keeps its token (env XDPFW_STATE_DIR; default /var/lib/xdpfw)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=argparse.SUPPRESS,
        help="seconds to wait for each API answer (default 10)",
    )


Handler = Callable[[argparse.Namespace, "Client"], int]


def client_command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: build the Client from the connection options, map errors to exits."""

    def run(args: argparse.Namespace) -> int:
        from xdpfw.cli.client import Client, ClientError, find_token

        url = api_url(getattr(args, "api", None))
        token = find_token(getattr(args, "token", None), getattr(args, "client_state_dir", None))
        try:
            with Client(url, token, timeout=getattr(args, "timeout", 10.0)) as api:
                return handler(args, api)
        except ClientError as exc:
            err(args, exc.message)
            return exc.exit_code

    return run


def api_url(explicit: str | None, env: dict[str, str] | None = None) -> str:
    """--api, else XDPFW_API, else the local socket (XDPFW_SOCKET or DEFAULT_SOCKET) when
    this user can connect to it, else http://127.0.0.1:8000."""
    import stat

    from xdpfw.cli.client import DEFAULT_API

    env = dict(os.environ) if env is None else env
    if explicit or env.get("XDPFW_API"):
        return explicit or env["XDPFW_API"]
    sock = Path(env["XDPFW_SOCKET"]) if env.get("XDPFW_SOCKET") else DEFAULT_SOCKET
    try:
        is_socket = stat.S_ISSOCK(sock.stat().st_mode)
    except OSError:
        return DEFAULT_API
    if is_socket and os.access(sock, os.R_OK | os.W_OK):
        return f"unix:{sock}"
    return DEFAULT_API
