"""`xdpfw fleet ls|rules|protect`: the nodes, the single rules and the protected prefixes
of a fleet (`xdpfw serve --etcd ...`, docs/fleet.md)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from xdpfw.cli.output import print_json, rule_match, rule_verdict, table

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = ["FLEET_EPILOG", "FLEET_PROTECT_EPILOG", "FLEET_RULES_EPILOG", "cmd_fleet_ls",
           "cmd_fleet_protect_add", "cmd_fleet_protect_ls", "cmd_fleet_protect_rm",
           "cmd_fleet_rules", "prefix_arg", "scope_text"]

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
FLEET_PROTECT_EPILOG = """The fleet's protected prefixes (in etcd): every node allows them
above every drop rule, together with its own (`serve --protect`, which the fleet's list
never takes away). `add`/`rm` change the list in one etcd transaction and answer once the
node asked enforces it.

examples:
  xdpfw fleet protect ls
  xdpfw fleet protect add 198.18.7.0/24
  xdpfw fleet protect rm 198.18.7.0/24
  xdpfw fleet protect ls --json | jq -r '.prefixes[]'
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


def prefix_arg(text: str) -> str:
    """A PREFIX argument: a CIDR or an address, normalised (198.18.7.1 -> 198.18.7.1/32)."""
    from xdpfw.errors import InvalidRule
    from xdpfw.rules import parse_network

    try:
        return parse_network(text, "prefix").with_prefixlen
    except InvalidRule as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_fleet_protect_ls(args: argparse.Namespace, api: Client) -> int:
    p = api.fleet_protected()
    if args.json:
        print_json(p)
        return 0
    if p["stale"]:
        print("the fleet store is unreachable: this node's cached list", file=sys.stderr)
    fleet = set(p["prefixes"])
    rows = [[net, "fleet", "yes" if net in p["enforced"] or net in p["local"] else "no"]
            for net in p["prefixes"]]
    rows += [[net, "local" + (" + fleet" if net in fleet else ""), "yes"]
             for net in p["local"]]
    if not rows:
        print("no protected prefixes (neither the fleet's nor this node's --protect)",
              file=sys.stderr)
        return 0
    print(table(["PREFIX", "FROM", "ENFORCED"], rows))
    return 0


def _change_protected(api: Client, change: Callable[[list[str]], list[str]]) -> int:
    """Read the list, change it, write it if it is still the one read (else read again)."""
    for _ in range(8):
        p = api.fleet_protected()
        if p["stale"]:
            print("xdpfw: the fleet store is unreachable: nothing was changed; retry when etcd "
                  "is back", file=sys.stderr)
            return 1
        prefixes = change(list(p["prefixes"]))
        if prefixes == p["prefixes"]:
            return 0
        done = api.set_fleet_protected(prefixes, p["revision"])
        if done is not None:
            print(f"fleet protected prefixes at revision {done['revision']}: "
                  f"{', '.join(done['prefixes']) or 'none'}")
            return 0
    print("xdpfw: the fleet's protected prefixes kept changing under this write; retry",
          file=sys.stderr)
    return 1


def cmd_fleet_protect_add(args: argparse.Namespace, api: Client) -> int:
    net: str = args.prefix
    return _change_protected(api, lambda ps: ps if net in ps else [*ps, net])


def cmd_fleet_protect_rm(args: argparse.Namespace, api: Client) -> int:
    net: str = args.prefix
    p = api.fleet_protected()
    if net not in p["prefixes"] and not p["stale"]:
        print(f"xdpfw: {net} is not in the fleet's protected prefixes", file=sys.stderr)
        return 1
    if net in p["local"]:
        print(f"note: {net} stays protected on this node (its own --protect)", file=sys.stderr)
    return _change_protected(api, lambda ps: [x for x in ps if x != net])
