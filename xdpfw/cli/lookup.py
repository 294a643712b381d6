"""`xdpfw lookup ADDR`: what the firewall does with a packet from ADDR, and which rules say so."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from xdpfw.cli.output import print_json, printable, rule_match, rule_verdict

if TYPE_CHECKING:
    from xdpfw.cli.client import Client, Lookup

__all__ = ["LOOKUP_EPILOG", "cmd_lookup"]

LOOKUP_EPILOG = """The verdict is the data plane's (computed from the entries the XDP program looks
up, with its ranks): drop, pass, monitor (passed and counted), or limit (a rate-limit rule's
budget decides: passed within it, dropped over it). The credited rule is the one whose
counters the packet bumps; every matching rule is listed, best first.

Without --dst (or --proto) the packet is one whose destination (protocol) no rule names: only
rules that name none can match it; a TCP packet without --tcp-flags is one no TCP-flags rule
matches. Exit code 0 whatever the verdict.

examples:
  xdpfw lookup 203.0.113.9
  xdpfw lookup 203.0.113.9 --dst 198.51.100.1 --proto tcp --dport 22
  xdpfw lookup 203.0.113.9 --proto tcp --dport 80 --tcp-flags SYN    # a connection attempt
  xdpfw lookup 2001:db8::7 --json | jq -r .verdict
"""


def _packet(a: Lookup) -> str:
    p = a["packet"]
    text = p["src"]
    if p["dst"] is not None:
        text += f" -> {p['dst']}"
    if p["proto"] is not None:
        names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
        text += f" {names.get(p['proto'], 'proto ' + str(p['proto']))}"
    if p["dport"] is not None:
        text += f" dport {p['dport']}"
    if p.get("tcp_flags") is not None:
        text += f" flags {p['tcp_flags'] or 'none'}"
    return text


_FLAGS = {"src": "ADDR", "dst": "--dst", "proto": "--proto", "dport": "--dport",
          "tcp_flags": "--tcp-flags"}


def cmd_lookup(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import ClientError

    try:
        answer = api.lookup(args.addr, args.dst, args.proto, args.dport, args.tcp_flags)
    except ClientError as exc:
        if exc.problems:
            text = "; ".join(f"{_FLAGS.get(f, f)}: {m}" for f, m in exc.problems)
            raise ClientError(f"invalid question: {text}", exc.exit_code,
                              status=exc.status) from exc
        raise
    if args.json:
        print_json(answer)
        return 0
    print(f"{_packet(answer)}: {answer['verdict']}")
    rule = answer["rule"]
    if rule is None:
        print("  no rule matches")
        return 0
    note = f" ({printable(rule['comment'])})" if rule["comment"] else ""
    print(f"  credited: rule {rule['id']}, {rule_verdict(rule)} {rule_match(rule)}{note}")
    rows = [("ID", "VERDICT", "MATCH", "TABLE", "COMMENT")]
    for m in answer["matches"]:
        r = m["rule"]
        rows.append((str(r["id"]), rule_verdict(r), rule_match(r), m["table"],
                     printable(r["comment"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"  matching rules ({len(answer['matches'])}), best first:")
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
