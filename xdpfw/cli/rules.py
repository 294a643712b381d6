"""`xdpfw rule add|rm|ls|show`: one rule at a time."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from xdpfw.cli import humanize as hz
from xdpfw.cli.output import err, print_json, printable, rule_match, rule_verdict

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = [
    "FLAGS",
    "RULE_ADD_EPILOG",
    "RULE_LS_EPILOG",
    "RULE_RM_EPILOG",
    "RULE_SHOW_EPILOG",
    "cmd_rule_add",
    "cmd_rule_ls",
    "cmd_rule_rm",
    "cmd_rule_show",
]

RULE_ADD_EPILOG = """Prints the new rule's id (the whole rule with --json). Adding a rule identical
in match, action and mode to an existing one adds nothing and prints the existing id.

examples:
  xdpfw rule add --src 198.18.7.0/24                       # drop a network
  xdpfw rule add --src 198.18.7.9 --ttl 10m --comment "scanner"
  xdpfw rule add --src 198.18.0.0/15 --proto udp --dport 1000-2000
  xdpfw rule add --dst 2001:db8::/32 --proto tcp --dport 22 --action allow
  xdpfw rule add --proto udp --dport 53 --monitor          # count, don't drop
  xdpfw rule add --src 198.18.7.9 --ttl 1h --source fail2ban.sshd   # again: new expiry
  xdpfw rule add --src 198.18.7.0/24 --sample 10           # and sample 1 in 10 (capture)
"""

RULE_RM_EPILOG = """By id, the rule goes whoever holds it. By value (--src/--dst), the rules whose
src (dst) is exactly that network go; with --source only that source's holding goes (a rule
another source holds stays enforced).

examples:
  xdpfw rule rm 12
  xdpfw rule rm 12 13 14
  xdpfw rule rm --src 198.18.7.9                     # unban by value
  xdpfw rule rm --src 198.18.7.9 --source fail2ban.sshd
  xdpfw rule ls --json | jq '.rules[] | select(.comment=="test") | .id' | xargs xdpfw rule rm
"""

RULE_LS_EPILOG = """examples:
  xdpfw rule ls
  xdpfw rule ls --source firehol_level1
  xdpfw rule ls --source firehol_level1 --format plain > saved.netset   # `import` reads it
  xdpfw rule ls --json | jq '.rules | length'
"""

RULE_SHOW_EPILOG = """Shows one rule with its counters (numbers humanised; exact with --json).

examples:
  xdpfw rule show 12
  xdpfw rule show 12 --json
"""

# The API's field names -> the flags a person typed, for 422 messages.
FLAGS = {
    "src": "--src",
    "dst": "--dst",
    "proto": "--proto",
    "dport": "--dport",
    "action": "--action",
    "mode": "--monitor",
    "comment": "--comment",
    "ttl_seconds": "--ttl",
    "source": "--source",
}


def cmd_rule_add(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import ClientError

    body: dict[str, object] = {"action": args.action}
    if args.monitor:
        body["mode"] = "monitor"
    for name in ("src", "dst", "proto", "dport"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.comment:
        body["comment"] = args.comment
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    if args.source is not None:
        body["source"] = args.source
    if getattr(args, "sample", None) is not None:  # X-ray
        body["sample"] = {"every": args.sample}
    try:
        rule, created = api.add_rule(body)
    except ClientError as exc:
        if exc.problems:
            text = "; ".join(f"{FLAGS.get(f, f)}: {m}" for f, m in exc.problems)
            raise ClientError(f"invalid rule: {text}", exc.exit_code, status=exc.status) from exc
        raise
    if not created:
        err(args, f"an identical rule already exists (id {rule['id']}); nothing added"
            f" (source {rule['source']} holds it, expires {rule['expires_at'] or 'never'})")
    if args.json:
        print_json(rule)
    else:
        print(rule["id"])
    return 0


def cmd_rule_rm(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import EXIT_USAGE, ClientError

    if args.src is not None or args.dst is not None:
        if args.ids:
            raise ClientError("give rule ids or --src/--dst, not both", EXIT_USAGE)
        n = api.delete_where(args.src, args.dst, args.source)
        what = " ".join(f"--{k} {v}" for k, v in (("src", args.src), ("dst", args.dst),
                                                   ("source", args.source)) if v)
        print(f"removed {n} ({what})")
        return 0 if n else 1
    if not args.ids:
        raise ClientError("give rule ids, or --src/--dst CIDR (by value)", EXIT_USAGE)
    if args.source is not None:
        raise ClientError("--source goes with --src/--dst (an id removes the rule from every "
                          "source)", EXIT_USAGE)
    removed: list[int] = []
    rc = 0
    for rid in args.ids:
        try:
            api.delete_rule(rid)
        except ClientError as exc:
            if exc.status != 404:
                if removed:
                    print("removed " + " ".join(map(str, removed)))
                raise
            err(args, exc.message)
            rc = 1
            continue
        removed.append(rid)
    if removed:
        print("removed " + " ".join(map(str, removed)))
    return rc


def cmd_rule_ls(args: argparse.Namespace, api: Client) -> int:
    rules = api.rules(source=args.source)
    if args.format == "plain":
        from xdpfw.cli.sources import export_lines

        for line in export_lines(rules):
            print(line)
        return 0
    if args.json:
        print_json({"rules": rules, "next_cursor": None})
        return 0
    if not rules:
        print("no rules (add one with `xdpfw rule add --src CIDR`)", file=sys.stderr)
        return 0
    rows = [
        [
            str(r["id"]),
            rule_verdict(r),
            r["src"] or "-",
            r["dst"] or "-",
            r["proto"] or "-",
            r["dport"] or "-",
            hz.until(r["expires_at"]),
            printable(",".join(r.get("sources", [r.get("source", "api")]))),
            r["comment"],
        ]
        for r in rules
    ]
    print(
        hz.table(
            ["ID", "ACTION", "SRC", "DST", "PROTO", "DPORT", "EXPIRES", "SOURCES", "COMMENT"],
            rows, right=(0,),
        )
    )
    return 0


def _exact(n: int, text: str) -> str:
    return text if text == str(n) else f"{text} ({n})"


def cmd_rule_show(args: argparse.Namespace, api: Client) -> int:
    rule = api.rule(args.id)
    if args.json:
        print_json(rule)
        return 0
    c = rule["counters"] or {"packets": 0, "bytes": 0, "last_hit": None}
    created = rule["created_at"]
    expires = rule["expires_at"]
    fields = [
        ("id", str(rule["id"])),
        ("action", rule_verdict(rule)),
        ("match", rule_match(rule)),
        ("comment", rule["comment"] or "-"),
        ("sources", ", ".join(rule.get("sources", [])) or "-"),
        ("created", f"{created} ({hz.ago(created)})"),
        ("expires", f"{expires} ({hz.until(expires)})" if expires else "never"),
        ("packets", _exact(c["packets"], hz.count(c["packets"]))),
        ("bytes", _exact(c["bytes"], hz.bytes_(c["bytes"]))),
        ("last hit", f"{c['last_hit']} ({hz.ago(c['last_hit'])})" if c["last_hit"] else "never"),
    ]
    for name, value in fields:
        print(f"{name:<10}{printable(value)}")
    return 0
