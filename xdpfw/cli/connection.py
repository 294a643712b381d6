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

__all__ = ["CLIENT_DESTS", "Handler", "add_client_options", "client_command"]


CLIENT_DESTS = ("api", "token", "client_state_dir", "timeout")


def add_client_options(p: argparse.ArgumentParser) -> None:
    """Connection options; accepted before or after the command (SUPPRESS keeps either)."""
    g = p.add_argument_group("connection")
    g.add_argument(
        "--api",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="API base URL (env XDPFW_API; default http://127.0.0.1:8000)",
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
        from xdpfw.cli.client import DEFAULT_API, Client, ClientError, find_token

        api_url = getattr(args, "api", None) or os.environ.get("XDPFW_API") or DEFAULT_API
        token = find_token(getattr(args, "token", None), getattr(args, "client_state_dir", None))
        try:
            with Client(api_url, token, timeout=getattr(args, "timeout", 10.0)) as api:
                return handler(args, api)
        except ClientError as exc:
            err(args, exc.message)
            return exc.exit_code

    return run
