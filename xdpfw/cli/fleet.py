"""`xdpfw fleet ls|rules`: the nodes and the single rules of a fleet (`xdpfw serve --etcd ...`,
docs/fleet.md)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from xdpfw.cli.output import print_json, rule_match, rule_verdict, table

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = ["FLEET_EPILOG", "FLEET_RULES_EPILOG", "cmd_fleet_ls", "cmd_fleet_rules",
           "scope_text"]

FLEET_EPILOG = """Every node that shares this node's etcd prefix: its labels, the etcd revision
it enforces, how far it is behind the store, and its last heartbeat (a node leaves the list
~10 s after its last one). Only on a node started with --etcd.

examples:
  xdpfw fleet ls
  xdpfw fleet ls --json | jq '.[] | select(.lag > 0) | .name'
"""
FLEET_RULES_EPILOG = """The single rules in the fleet store (`xdpfw rule add` on any node), each
with its scope: the nodes that enforce it (`rule add --nodes/--selector`; `*`: every node).
HERE says whether the node asked enforces it. The entries of sources' lists are not listed
(`xdpfw source show NAME`).

examples:
  xdpfw fleet rules
  xdpfw fleet rules --source api --json | jq '.[] | select(.nodes != null)'
"""


def scope_text(nodes: list[str] | None, selector: dict[str, str] | None) -> str:
    """`edge-1,edge-2 rack=r1` ... `*` for every node."""
    parts = []
    if nodes is not None:
        parts.append(",".join(nodes))
    if selector is not None:
        parts.append(",".join(f"{k}={v}" for k, v in sorted(selector.items())))
    return " ".join(parts) or "*"


def cmd_fleet_ls(args: argparse.Namespace, api: Client) -> int:
    nodes = api.fleet_nodes()
    if args.json:
        print_json(nodes)
        return 0
    if not nodes:
        print("no nodes in the registry", file=sys.stderr)
        return 0
    now = time.time()
    rows = [
        [n["name"], "ok" if n["healthy"] else "STALE", str(n["applied_revision"]), str(n["lag"]),
         f"{max(0.0, now - n['last_heartbeat']):.1f}s ago",
         ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"]
        for n in nodes
    ]
    print(table(["NODE", "HEALTH", "APPLIED", "LAG", "HEARTBEAT", "LABELS"], rows))
    return 0


def cmd_fleet_rules(args: argparse.Namespace, api: Client) -> int:
    rules = api.fleet_rules(args.source)
    if args.json:
        print_json(rules)
        return 0
    if not rules:
        print("no single rules in the fleet store", file=sys.stderr)
        return 0
    rows = [
        [r["source"], rule_verdict(r), rule_match(r), scope_text(r["nodes"], r["selector"]),
         "yes" if r["here"] else "no", r["expires_at"] or "never", r["comment"]]
        for r in rules
    ]
    print(table(["SOURCE", "ACTION", "MATCH", "SCOPE", "HERE", "EXPIRES", "COMMENT"], rows))
    return 0
