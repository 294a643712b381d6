"""What every command prints the same way: errors on stderr, JSON, a rule's match and verdict."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from xdpfw.cli.client import FleetRule, Limit, Rule

__all__ = ["err", "print_json", "printable", "rule_match", "rule_verdict", "table"]

# C0 controls, DEL and C1 controls, plus the Unicode line and paragraph separators: what could
# move the cursor, recolour the terminal or start a new line inside a table cell.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = {
    c: _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS
}


def printable(text: str) -> str:
    """Text for a human table or line: control characters shown escaped (ESC as `\\x1b`, a
    newline as `\\n`), so a comment or any text from the API cannot forge output lines or
    drive the terminal. --json output is never passed through this."""
    return text.translate(_ESCAPES)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Plain aligned columns (greppable, like `ip` or `kubectl get`); `right` = right-aligned.
    Every listing of the CLI prints through this.

    Control characters in a cell are shown escaped (`printable`): one row, one line.
    """
    cols = len(headers)
    headers = [printable(h) for h in headers]
    rows = [[printable(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i in range(cols):
            widths[i] = max(widths[i], len(row[i]))
    out = []
    for row in [list(headers), *rows]:
        cells = [
            row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i]) for i in range(cols)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def err(args: argparse.Namespace, message: str) -> None:
    print(f"xdpfw {args.cmd_name}: {printable(message)}", file=sys.stderr)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def rule_verdict(rule: Rule | FleetRule) -> str:
    if rule["action"] == "allow":
        return "allow"
    if rule["action"] == "limit":  # issue 16
        return "limit (monitor)" if rule["mode"] == "monitor" else "limit"
    return "monitor" if rule["mode"] == "monitor" else "drop"


def rule_match(rule: Rule | FleetRule) -> str:
    parts = []
    if rule["src"]:
        parts.append(f"src {rule['src']}")
    if rule["dst"]:
        parts.append(f"dst {rule['dst']}")
    if rule["proto"]:
        parts.append(rule["proto"])
    if rule["dport"]:
        parts.append(f"dport {rule['dport']}")
    if rule.get("tcp_flags"):  # issue 16
        parts.append(f"flags {rule['tcp_flags']}")
    lim = cast("Limit | None", rule.get("limit"))  # a FleetRule has none
    if lim:
        rate = f"{lim['pps']}/s burst {lim['burst']}" if lim["pps"] else \
            f"{lim['bps']}B/s burst {lim['burst_bytes']}B"
        parts.append(f"limit {rate} per {lim['per']}")
        if lim["ban_seconds"]:
            parts.append(f"ban {lim['ban_seconds']}s")
    return printable(" ".join(parts) or "any")
