"""`xdpfw source ls|show|rm|replace|export`: named rule sources (xdpfw/sources.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from xdpfw.cli import humanize as hz
from xdpfw.cli.output import err, print_json, printable, rule_match, rule_verdict, table

if TYPE_CHECKING:
    from xdpfw.cli.client import Client, Rule, SourceChange

__all__ = [
    "SOURCE_EPILOG",
    "SOURCE_EXPORT_EPILOG",
    "SOURCE_LS_EPILOG",
    "SOURCE_REPLACE_EPILOG",
    "SOURCE_RM_EPILOG",
    "SOURCE_SHOW_EPILOG",
    "cmd_source_export",
    "cmd_source_ls",
    "cmd_source_replace",
    "cmd_source_rm",
    "cmd_source_show",
    "export_lines",
    "print_change",
    "spinner",
]

SOURCE_EPILOG = """A source is a named list of rules (firehol_level1, crowdsec, fail2ban.sshd;
hand-made rules are `api`). The same address in two sources is held by both: removing or
replacing one never unblocks what the other still lists.

examples:
  xdpfw source replace firehol_level1 firehol_level1.netset
  xdpfw source ls
  xdpfw source show firehol_level1
  xdpfw source export firehol_level1 > saved.netset
  xdpfw source rm firehol_level1
"""
SOURCE_LS_EPILOG = """examples:
  xdpfw source ls
  xdpfw source ls --json | jq '.[] | select(.packets > 0) | .name'
"""
SOURCE_SHOW_EPILOG = """Shows the source's totals and its rules (the first --limit).

examples:
  xdpfw source show firehol_level1
  xdpfw source show crowdsec --limit 20 --json
"""
SOURCE_RM_EPILOG = """Deletes the source: its rules leave the kernel unless another source
holds them too.

examples:
  xdpfw source rm firehol_level1
"""
SOURCE_REPLACE_EPILOG = """The whole membership of the source in one call (PUT /v1/sources/NAME):
entries absent from FILE are removed, new ones added, unchanged ones keep their rule id and
counters. An address in both versions is never passed meanwhile. Any bad line: nothing changes
(every bad line is named). Entries overlapping a --protect prefix are loaded (protection wins)
and reported.

examples:
  xdpfw source replace firehol_level1 firehol_level1.netset
  curl -s https://www.spamhaus.org/drop/drop.txt | xdpfw source replace spamhaus-drop -
  xdpfw source replace scanners scanners.txt --ttl 1d --comment "daily feed"
  xdpfw source replace eu-only eu.txt --selector zone=eu     # fleet: nodes labelled zone=eu
"""
SOURCE_EXPORT_EPILOG = """Prints the source's addresses, one CIDR per line, in a form that
`xdpfw import` and `xdpfw source replace` read back. Rules that are not plain source-address
rules (a port, a protocol, a dst) are written as comments.

examples:
  xdpfw source export firehol_level1 > firehol_level1.saved
  xdpfw source export old | xdpfw source replace new -
"""

SPINNER_MIN = 10_000  # entries; a smaller load answers before an indicator is worth drawing


@contextmanager
def spinner(text: str, n: int) -> Iterator[None]:
    """An indicator on stderr while one long call runs (only on a terminal)."""
    if n < SPINNER_MIN or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


def print_change(change: SourceChange, show: int = 20) -> None:
    print(
        f"source {change['source']}: added {change['added']}, removed {change['removed']}, "
        f"unchanged {change['unchanged']}"
    )
    print_overlaps(change["overlaps"], change["overlap_count"], show)


def print_overlaps(overlaps: list[str], count: int, show: int = 20) -> None:
    if not count:
        return
    print(f"  overlaps    {count} entries overlap protected prefixes (loaded; protection wins)")
    for text in overlaps[:show]:
        print(f"    {printable(text)}")
    if count > min(show, len(overlaps)):
        print(f"    ... {count - min(show, len(overlaps))} more")


def cmd_source_ls(args: argparse.Namespace, api: Client) -> int:
    sources = api.sources()
    if args.json:
        print_json(sources)
        return 0
    if not sources:
        print("no sources (load one with `xdpfw source replace NAME FILE`)", file=sys.stderr)
        return 0
    rows = [
        [printable(s["name"]), str(s["rules"]), hz.count(s["packets"]), hz.bytes_(s["bytes"]),
         hz.ago(s["last_hit"]) if s["last_hit"] else "never", hz.ago(s["updated_at"])]
        for s in sources
    ]
    print(table(["SOURCE", "RULES", "PACKETS", "BYTES", "LAST HIT", "UPDATED"], rows,
                   right=(1, 2, 3)))
    return 0


def cmd_source_show(args: argparse.Namespace, api: Client) -> int:
    detail = api.source(args.name, limit=args.limit)
    if args.json:
        print_json(detail)
        return 0
    print(f"source    {printable(detail['name'])}")
    print(f"rules     {detail['rules']}")
    print(f"packets   {hz.count(detail['packets'])}")
    print(f"bytes     {hz.bytes_(detail['bytes'])}")
    print(f"last hit  {detail['last_hit'] or 'never'}")
    print(f"updated   {detail['updated_at']} ({hz.ago(detail['updated_at'])})")
    rules = detail["page"]["rules"]
    if rules:
        print()
        print(_rule_table(rules))
        if detail["page"]["next_cursor"] is not None:
            print(f"... the first {len(rules)} of {detail['rules']} (--limit; "
                  f"`xdpfw rule ls --source {detail['name']}` lists all)")
    return 0


def _rule_table(rules: list[Rule]) -> str:
    rows = [
        [str(r["id"]), rule_verdict(r), rule_match(r), hz.until(r["expires_at"]),
         printable(",".join(r["sources"])), printable(r["comment"])]
        for r in rules
    ]
    return table(["ID", "ACTION", "MATCH", "EXPIRES", "SOURCES", "COMMENT"], rows,
                    right=(0,))


def cmd_source_rm(args: argparse.Namespace, api: Client) -> int:
    n = api.delete_source(args.name)
    print(f"removed source {args.name} ({n} rule(s) released)")
    return 0


def cmd_source_replace(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.importing import read_input

    text = read_input(args.file)
    lines = text.count("\n")
    with spinner(f"replacing source {args.name} ({lines} lines)", lines):
        change = api.replace_source(
            args.name,
            text,
            action=args.action,
            mode="monitor" if args.monitor else "enforce",
            comment=args.comment,
            ttl_seconds=args.ttl,
            nodes=getattr(args, "nodes", None),  # issue 19: fleet mode
            selector=getattr(args, "selector", None),
        )
    if args.json:
        print_json(change)
    else:
        print_change(change)
    return 0


def export_lines(rules: list[Rule]) -> Iterator[str]:
    """Rules as a plain list: source-address rules as CIDRs, anything else as a comment."""
    for r in rules:
        if r["src"] and not (r["dst"] or r["proto"] or r["dport"]):
            yield r["src"]
        else:
            yield f"# rule {r['id']} ({rule_verdict(r)} {rule_match(r)}): not a plain address"


def cmd_source_export(args: argparse.Namespace, api: Client) -> int:
    rules = api.rules(source=args.name)
    if not rules:
        api.source(args.name, limit=1)  # a 404 for an unknown source, not an empty list
    out = sys.stdout
    out.write(f"# xdpfw source {args.name}: {len(rules)} rule(s)\n")
    for line in export_lines(rules):
        out.write(line + "\n")
    skipped = sum(1 for r in rules if not r["src"] or r["dst"] or r["proto"] or r["dport"])
    if skipped:
        err(args, f"{skipped} rule(s) are not plain address rules: written as comments")
    return 0
