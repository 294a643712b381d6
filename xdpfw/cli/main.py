# PYTHON_ARGCOMPLETE_OK
"""The `xdpfw` command line (entry point `xdpfw.cli.main:main`).

`xdpfw serve` runs the service (datapath + REST API). Every other command is a client of the
REST API, so what a person does by hand goes through the same checks as automation:

    xdpfw status                      health, interfaces, XDP mode, program, capacity
    xdpfw rule add|rm|ls|show         one rule at a time
    xdpfw import FILE|-               bulk load a blocklist (plain, FireHOL, Spamhaus DROP)
    xdpfw stats                       per-rule counters and totals
    xdpfw top                         a live view of the busiest rules

Client commands import only httpx (and rich for `top` and progress bars), never the service's
modules (bcc, pyroute2, fastapi), so they start fast on any machine that can reach the API.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from xdpfw.cli.connection import CLIENT_DESTS
from xdpfw.cli.parser import build_parser, completion

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    completion(parser)
    args = parser.parse_args(argv)
    if args.command == "serve" and any(hasattr(args, d) for d in CLIENT_DESTS):
        parser.error(
            "--api/--token/--state-dir/--timeout before `serve` are client options; "
            "give serve its own flags after it (xdpfw serve --state-dir DIR ...)"
        )
    try:
        rc: int = args.func(args)
    except BrokenPipeError:
        # `xdpfw rule ls | head`: the reader left; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
