"""`xdpfw rule add|rm|ls|show`: one rule at a time."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, cast

from xdpfw.cli import humanize as hz
from xdpfw.cli.output import err, print_json, printable, rule_match, rule_verdict, table
from xdpfw.errors import InvalidRule

if TYPE_CHECKING:
    from xdpfw.cli.client import Client, FleetWrite, RuleCounters

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
    "label_selector",
    "limit_body",
    "node_list",
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
  xdpfw rule add --proto tcp --dport 80 --tcp-flags syn --limit 100/s --burst 200 \
      --per source --ban 10m                               # SYN flood: 100 SYN/s per source
  xdpfw rule add --src 198.18.0.0/16 --limit 2mb/s --per rule   # 2 MB/s for the network
  xdpfw rule add --src 198.18.7.9 --nodes edge-1,edge-2    # fleet: only these nodes
  xdpfw rule add --src 198.18.7.9 --selector rack=r1       # fleet: nodes labelled rack=r1
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
    "tcp_flags": "--tcp-flags",
    "limit": "--limit",
}

# -- issue 16: --limit RATE, --burst, --per, --ban, --tcp-flags -> the API's fields --

_BYTE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def _bytes(text: str, flag: str) -> int:
    t = text.strip().lower()
    for unit in sorted(_BYTE_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].isdigit():
            return int(t[: -len(unit)]) * _BYTE_UNITS[unit]
    raise InvalidRule(flag, f"{text!r} is not a size (e.g. 1514b, 64kb, 2mb)")


def limit_body(args: argparse.Namespace) -> dict[str, object]:
    """The rate-limit and TCP-flag fields of a rule add body (empty when none was given)."""
    body: dict[str, object] = {}
    if args.tcp_flags is not None:
        body["tcp_flags"] = args.tcp_flags
    if args.limit is None:
        for flag, value in (("--burst", args.burst), ("--per", args.per), ("--ban", args.ban)):
            if value is not None:
                raise InvalidRule(flag, f"{flag} needs --limit RATE")
        return body
    rate, slash, unit = args.limit.strip().lower().partition("/")
    if slash and unit not in ("s", "sec"):
        raise InvalidRule("--limit", f"{args.limit!r}: the rate is per second (100/s, 2mb/s)")
    limit: dict[str, object] = {}
    if rate.isdigit():
        limit["pps"] = int(rate)
        if args.burst is not None:
            if not args.burst.strip().isdigit():
                raise InvalidRule("--burst", f"{args.burst!r}: a packet limit's burst is packets")
            limit["burst"] = int(args.burst)
    else:
        try:
            limit["bps"] = _bytes(rate, "--limit")
        except InvalidRule:
            raise InvalidRule(
                "--limit", f"{args.limit!r} is not a rate (100/s packets, 2mb/s bytes)"
            ) from None
        if args.burst is not None:
            limit["burst_bytes"] = _bytes(args.burst, "--burst")
    if args.per is not None:
        limit["per"] = args.per
    if args.ban is not None:
        try:
            limit["ban_seconds"] = hz.parse_duration(args.ban)
        except ValueError as exc:
            raise InvalidRule("--ban", str(exc)) from exc
    body["action"] = "limit"
    body["limit"] = limit
    return body



def cmd_rule_add(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import EXIT_USAGE, ClientError

    body: dict[str, object] = {"action": args.action}
    if args.monitor:
        body["mode"] = "monitor"
    for name in ("src", "dst", "proto", "dport"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    try:
        body.update(limit_body(args))  # issue 16
    except InvalidRule as exc:
        raise ClientError(f"invalid rule: {exc}", EXIT_USAGE) from exc
    if args.comment:
        body["comment"] = args.comment
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    if args.source is not None:
        body["source"] = args.source
    if getattr(args, "sample", None) is not None:  # X-ray
        body["sample"] = {"every": args.sample}
    if getattr(args, "nodes", None) is not None:  # issue 19: fleet mode
        body["nodes"] = args.nodes
    if getattr(args, "selector", None) is not None:
        body["selector"] = args.selector
    try:
        answer, created = api.add_rule(body)
    except ClientError as exc:
        if exc.problems:
            text = "; ".join(f"{FLAGS.get(f, f)}: {m}" for f, m in exc.problems)
            raise ClientError(f"invalid rule: {text}", exc.exit_code, status=exc.status) from exc
        raise
    if "revision" in answer:  # fleet mode, a rule scoped to other nodes: not enforced here
        write = cast("FleetWrite", answer)
        if args.json:
            print_json(write)
        else:
            print(f"committed at revision {write['revision']}: {write['detail']}")
        return 0
    rule = answer
    if not created:
        err(args, f"an identical rule already exists (id {rule['id']}); nothing added"
            f" (source {rule['source']} holds it, expires {rule['expires_at'] or 'never'})")
    if args.json:
        print_json(rule)
    else:
        print(rule["id"])
    return 0


def node_list(text: str) -> list[str]:
    """`--nodes edge-1,edge-2`: node names (the source-name alphabet, as `serve --node`)."""
    from xdpfw.sources import SOURCE_RE

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if SOURCE_RE.fullmatch(n) is None]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: node names, comma separated (a-z 0-9 . _ -, as serve --node)")
    return names


def label_selector(text: str) -> dict[str, str]:
    """`--selector rack=r1,zone=eu`: labels a node must all carry (serve --node-label)."""
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: a selector is KEY=VALUE[,KEY=VALUE]")
        out[k.strip()] = v.strip()
    return out


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
        table(
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
    none: RuleCounters = {"packets": 0, "bytes": 0, "last_hit": None, "limit": None}
    c = rule["counters"] or none
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
    lc = c.get("limit")  # issue 16: a limit rule's budget answers
    if lc:
        fields += [("passed", hz.count(lc["passed"])), ("limited", hz.count(lc["limited"])),
                   ("banned", hz.count(lc["banned"]))]
    for name, value in fields:
        print(f"{name:<10}{printable(value)}")
    return 0
