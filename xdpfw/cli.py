"""The `xdpfw` command line.

`xdpfw serve` runs the service (datapath + REST API). Every other command is a client of the
REST API, so what a person does by hand goes through the same checks as automation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

SERVE_EPILOG = """examples:
  xdpfw serve --iface eth1                      # filter eth1, API on 127.0.0.1:8000
  xdpfw serve --iface eth1 --iface eth2 --xdp-mode generic
  xdpfw serve                                   # no interface: a demo namespace lab
  XDPFW_TOKEN=... xdpfw serve --iface eth1 --listen 0.0.0.0:8000

Every flag also has an XDPFW_* environment variable (XDPFW_IFACE=eth1,eth2, XDPFW_LISTEN,
XDPFW_STATE_DIR, XDPFW_BPFFS_DIR, XDPFW_XDP_MODE, XDPFW_TOKEN, XDPFW_MAX_RULES, ...).
"""


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from api.server import serve
    from api.settings import get_settings

    demo = False
    try:
        settings = get_settings(
            iface=args.iface or None,
            xdp_mode=args.xdp_mode,
            listen=args.listen,
            state_dir=args.state_dir,
            bpffs_dir=args.bpffs_dir,
            max_rules=args.max_rules,
            max_prefixes=args.max_prefixes,
            max_sets=args.max_sets,
        )
        if not settings.iface and not args.no_demo:
            from api.store import Store

            db = settings.db_file
            known = Store(db).interfaces() if db.exists() else {}
            if not known:
                demo = True
                settings = get_settings(
                    iface=[],
                    xdp_mode=args.xdp_mode,
                    listen=args.listen,
                    state_dir=args.state_dir or Path("/run/xdpfw-demo"),
                    bpffs_dir=args.bpffs_dir or Path("/sys/fs/bpf/xdpfw-demo"),
                    max_rules=args.max_rules or 65536,
                    max_prefixes=args.max_prefixes or 16384,
                    max_sets=args.max_sets or 1024,
                )
    except ValidationError as exc:
        for err in exc.errors():
            print(f"xdpfw serve: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    return serve(settings, demo=demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpfw",
        description="XDP firewall driven live over a REST API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "serve",
        help="run the firewall service (datapath + REST API)",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--iface", action="append", metavar="NAME", help="interface (repeatable)")
    p.add_argument("--xdp-mode", choices=["auto", "native", "generic"], default=None)
    p.add_argument("--listen", metavar="HOST:PORT", default=None)
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--bpffs-dir", type=Path, default=None)
    p.add_argument("--max-rules", type=int, default=None)
    p.add_argument("--max-prefixes", type=int, default=None)
    p.add_argument("--max-sets", type=int, default=None)
    p.add_argument(
        "--no-demo",
        action="store_true",
        help="with no interface, start unattached instead of on a demo lab",
    )
    p.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
