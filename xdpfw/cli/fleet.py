"""`xdpfw fleet ls`: the nodes of a fleet (`xdpfw serve --etcd ...`, docs/fleet.md)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from xdpfw.cli.output import print_json, printable

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = ["FLEET_EPILOG", "cmd_fleet_ls"]

FLEET_EPILOG = """Every node that shares this node's etcd prefix: its labels, the etcd revision
it enforces, how far it is behind the store, and its last heartbeat (a node leaves the list
~10 s after its last one). Only on a node started with --etcd.

examples:
  xdpfw fleet ls
  xdpfw fleet ls --json | jq '.[] | select(.lag > 0) | .name'
"""


def cmd_fleet_ls(args: argparse.Namespace, api: Client) -> int:
    nodes = api.fleet_nodes()
    if args.json:
        print_json(nodes)
        return 0
    if not nodes:
        print("no nodes in the registry", file=sys.stderr)
        return 0
    now = time.time()
    rows = [("NODE", "HEALTH", "APPLIED", "LAG", "HEARTBEAT", "LABELS")]
    for n in nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"
        rows.append((
            printable(n["name"]), "ok" if n["healthy"] else "STALE",
            str(n["applied_revision"]), str(n["lag"]),
            f"{max(0.0, now - n['last_heartbeat']):.1f}s ago", printable(labels),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
