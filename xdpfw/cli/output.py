"""What every command prints the same way: errors on stderr, JSON, a rule's match and verdict."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xdpfw.cli.client import Rule

__all__ = ["err", "print_json", "rule_match", "rule_verdict"]


def err(args: argparse.Namespace, message: str) -> None:
    print(f"xdpfw {args.cmd_name}: {message}", file=sys.stderr)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def rule_verdict(rule: Rule) -> str:
    if rule["action"] == "allow":
        return "allow"
    return "monitor" if rule["mode"] == "monitor" else "drop"


def rule_match(rule: Rule) -> str:
    parts = []
    if rule["src"]:
        parts.append(f"src {rule['src']}")
    if rule["dst"]:
        parts.append(f"dst {rule['dst']}")
    if rule["proto"]:
        parts.append(rule["proto"])
    if rule["dport"]:
        parts.append(f"dport {rule['dport']}")
    return " ".join(parts) or "any"
