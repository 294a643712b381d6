"""The argument parser of `xdpfw`: every command, its flags and examples; shell completion."""

from __future__ import annotations

import argparse
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from xdpfw.cli import humanize as hz
from xdpfw.cli.bans import BAN_LS_EPILOG, BAN_RM_EPILOG, cmd_ban_ls, cmd_ban_rm
from xdpfw.cli.capture import CAPTURE_EPILOG, add_capture_parser, cmd_capture
from xdpfw.cli.completion import cmd_completion, cmd_man
from xdpfw.cli.connection import Handler, add_client_options, client_command
from xdpfw.cli.importing import IMPORT_EPILOG, cmd_import
from xdpfw.cli.lookup import LOOKUP_EPILOG, cmd_lookup
from xdpfw.cli.rules import (
    RULE_ADD_EPILOG,
    RULE_LS_EPILOG,
    RULE_RM_EPILOG,
    RULE_SHOW_EPILOG,
    cmd_rule_add,
    cmd_rule_ls,
    cmd_rule_rm,
    cmd_rule_show,
    label_selector,
    node_list,
)
from xdpfw.cli.serve import DETACH_EPILOG, SERVE_EPILOG, cmd_detach, cmd_serve
from xdpfw.cli.sources import (
    SOURCE_EPILOG,
    SOURCE_EXPORT_EPILOG,
    SOURCE_LS_EPILOG,
    SOURCE_REPLACE_EPILOG,
    SOURCE_RM_EPILOG,
    SOURCE_SHOW_EPILOG,
    cmd_source_export,
    cmd_source_ls,
    cmd_source_replace,
    cmd_source_rm,
    cmd_source_show,
)
from xdpfw.cli.stats import STATS_EPILOG, cmd_stats
from xdpfw.cli.status import STATUS_EPILOG, cmd_status
from xdpfw.cli.top import TOP_EPILOG, cmd_top

__all__ = ["MAIN_EPILOG", "build_parser", "completion", "package_version"]

MAIN_EPILOG = """examples:
  xdpfw status                                  # is it up, where, how full
  xdpfw rule add --src 198.18.7.0/24 --ttl 2h --comment "abuse ticket 4711"
  xdpfw rule ls
  xdpfw import firehol_level1.netset --comment firehol
  xdpfw stats --top 10
  xdpfw lookup 203.0.113.9                      # blocked? by which rule?
  xdpfw top                                     # live; q quits
  xdpfw COMMAND --help                          # more examples per command

The connection options work before or after the command. The token is --token, else
XDPFW_TOKEN, else read from <state-dir>/token (/var/lib/xdpfw, or the demo's /run/xdpfw-demo).
Reads need no token when the API listens on loopback only; changes always do, so run them as
root (to read the token file) or pass the token.

exit codes: 0 ok; 1 the API refused or failed, or an import was partial; 2 invalid input;
  3 the service cannot be reached; 4 missing or wrong token.

shell completion: eval "$(xdpfw completion bash)" (zsh: xdpfw completion zsh); manual:
  xdpfw man | man -l -
"""


def package_version() -> str:
    """The installed xdpfw's version (package metadata), or "unknown" when not installed."""
    try:
        return metadata.version("xdpfw")
    except metadata.PackageNotFoundError:
        return "unknown"


def _ttl(text: str) -> int:
    try:
        return hz.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _sub(
    sub: Any, name: str, help: str, epilog: str, handler: Handler, cmd_name: str | None = None
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=client_command(handler), cmd_name=cmd_name or name)
    _CLIENT_PARSERS.append(p)
    return p


_CLIENT_PARSERS: list[argparse.ArgumentParser] = []


def _json_flag(p: argparse.ArgumentParser, what: str = "print the API's JSON, not a table") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _source_name(text: str) -> str:
    from xdpfw.sources import SOURCE_RE

    if SOURCE_RE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a source name: 1-64 of a-z 0-9 . _ -, starting with a letter or "
            "digit"
        )
    return text


def _source_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--source", type=_source_name, metavar="NAME", help=what)


def _scope_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--nodes/--selector (issue 19): a rule's or a source's scope in fleet mode."""
    fl = p.add_argument_group(f"fleet (serve --etcd): {what}; default every node")
    fl.add_argument("--nodes", type=node_list, metavar="NAME[,NAME...]",
                    help="only these nodes (their serve --node names)")
    fl.add_argument("--selector", type=label_selector, metavar="KEY=VALUE[,...]",
                    help="only nodes carrying all these labels (serve --node-label)")


def _fleet_commands(sub: Any) -> None:
    """`xdpfw fleet ls|rules` (issue 19, docs/fleet.md)."""
    from xdpfw.cli.fleet import FLEET_EPILOG, FLEET_RULES_EPILOG, cmd_fleet_ls, cmd_fleet_rules

    fleet = sub.add_parser(
        "fleet", help="the nodes of a fleet (serve --etcd)",
        description="The nodes of a fleet (serve --etcd).", epilog=FLEET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION")
    fsub.required = True
    p = _sub(fsub, "ls", "list the fleet's nodes: applied revision, lag, heartbeat",
             FLEET_EPILOG, cmd_fleet_ls, "fleet ls")
    _json_flag(p)
    p = _sub(fsub, "rules", "list the single rules in the fleet store, with their scope",
             FLEET_RULES_EPILOG, cmd_fleet_rules, "fleet rules")
    _source_flag(p, "only this source's rules")
    _json_flag(p)
    _fleet_protect_commands(fsub)


def _fleet_protect_commands(fsub: Any) -> None:
    """`xdpfw fleet protect ls|add|rm` (the fleet's protected prefixes, docs/fleet.md)."""
    from xdpfw.cli.fleet import (
        FLEET_PROTECT_EPILOG,
        cmd_fleet_protect_add,
        cmd_fleet_protect_ls,
        cmd_fleet_protect_rm,
        prefix_arg,
    )

    protect = fsub.add_parser(
        "protect", help="the fleet's protected prefixes (in etcd)",
        description="The fleet's protected prefixes (in etcd).", epilog=FLEET_PROTECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    psub = protect.add_subparsers(dest="protect_command", metavar="ACTION")
    psub.required = True
    p = _sub(psub, "ls", "list the fleet's protected prefixes and this node's own",
             FLEET_PROTECT_EPILOG, cmd_fleet_protect_ls, "fleet protect ls")
    _json_flag(p)
    for name, what, handler in (
        ("add", "protect a prefix on every node of the fleet", cmd_fleet_protect_add),
        ("rm", "take a prefix out of the fleet's protected prefixes", cmd_fleet_protect_rm),
    ):
        p = _sub(psub, name, what, FLEET_PROTECT_EPILOG, handler, f"fleet protect {name}")
        p.add_argument("prefix", type=prefix_arg, metavar="PREFIX",
                       help="a CIDR or an address")


def _source_commands(sub: Any) -> None:
    """`xdpfw source ...` (issue 13)."""
    source = sub.add_parser(
        "source",
        help="named rule sources: list, show, replace, export, remove",
        description="Named rule sources: list, show, replace, export, remove.",
        epilog=SOURCE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = source.add_subparsers(dest="source_command", metavar="ACTION")
    ssub.required = True
    p = _sub(ssub, "ls", "list the sources and their counters", SOURCE_LS_EPILOG,
             cmd_source_ls, "source ls")
    _json_flag(p)
    p = _sub(ssub, "show", "show a source and its rules", SOURCE_SHOW_EPILOG, cmd_source_show,
             "source show")
    p.add_argument("name", type=_source_name, metavar="NAME")
    p.add_argument("--limit", type=_positive_int, default=100, metavar="N",
                   help="rules to show (default 100)")
    _json_flag(p)
    p = _sub(ssub, "rm", "delete a source (its rules go unless another source holds them)",
             SOURCE_RM_EPILOG, cmd_source_rm, "source rm")
    p.add_argument("name", type=_source_name, metavar="NAME")
    p = _sub(ssub, "replace", "make a source hold exactly the entries of a list",
             SOURCE_REPLACE_EPILOG, cmd_source_replace, "source replace")
    p.add_argument("name", type=_source_name, metavar="NAME")
    p.add_argument("file", metavar="FILE|-", help="the list; - reads standard input")
    p.add_argument("--action", choices=["drop", "allow"], default="drop", help="default: drop")
    p.add_argument("--monitor", action="store_true", help="count matches but let them pass")
    p.add_argument("--ttl", type=_ttl, metavar="DURATION", help="expire after 30s, 10m, 2h, 1d")
    p.add_argument("--comment", default="", metavar="TEXT", help="comment for every rule")
    _scope_flags(p, "which nodes enforce the source")
    _json_flag(p)
    p = _sub(ssub, "export", "print a source as a list that import reads back",
             SOURCE_EXPORT_EPILOG, cmd_source_export, "source export")
    p.add_argument("name", type=_source_name, metavar="NAME")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpfw",
        description="XDP firewall driven live over a REST API.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"xdpfw {package_version()}")
    _CLIENT_PARSERS.clear()
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
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--bpffs-dir", type=Path, default=None)
    p.add_argument("--max-rules", type=int, default=None)
    p.add_argument("--max-prefixes", type=int, default=None)
    p.add_argument("--max-sets", type=int, default=None)
    p.add_argument(
        "--protect",
        action="append",
        metavar="CIDR",
        help="source prefix that can never be dropped, e.g. your management network "
        "(repeatable)",
    )
    # X-ray (issue 17)
    p.add_argument("--sample-max-pps", type=int, default=None, metavar="N",
                   help="cap on sampled frames per second, all rules (default 2000)")
    p.add_argument("--snaplen", type=int, default=None, metavar="BYTES",
                   help="bytes kept of each sampled frame (default 128, at most 2048)")
    p.add_argument(
        "--no-demo",
        action="store_true",
        help="with no interface, start unattached instead of on a demo lab",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="on stop, detach and remove the pins (default: keep filtering while down)",
    )
    # -- CrowdSec bouncer (README "CrowdSec"; api/crowdsec.py) --------------------------------
    cs = p.add_argument_group("CrowdSec bouncer (off unless --crowdsec-lapi is given)")
    cs.add_argument(
        "--crowdsec-lapi", metavar="URL", default=None,
        help="pull ban decisions from this CrowdSec Local API, e.g. http://127.0.0.1:8080",
    )  # fmt: skip
    cs.add_argument(
        "--crowdsec-key-file", metavar="FILE", type=Path, default=None,
        help="the bouncer key (`cscli bouncers add xdpfw -o raw`), one line",
    )  # fmt: skip
    cs.add_argument(
        "--crowdsec-interval", metavar="DURATION", default=None,
        help="poll for new and deleted decisions this often (default 10s)",
    )  # fmt: skip
    cs.add_argument(
        "--crowdsec-resync", metavar="DURATION", default=None,
        help="pull every decision again and replace source crowdsec this often (default 10m)",
    )  # fmt: skip
    # -- issue 15 (ops): config file, listeners, logs --
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=None,
        help="TOML settings (env XDPFW_CONFIG; default /etc/xdpfw/xdpfw.toml if it exists); "
        "flags and XDPFW_* variables override it",
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT|unix:PATH",
        default=None,
        help="the TCP listener (default 127.0.0.1:8000), and/or a unix socket its group's "
        "members use without a token (repeatable: one of each)",
    )
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="text lines (default) or one JSON object per line")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.add_argument("--access-log", action="store_true",
                   help="also log every request (uvicorn's access log; default off)")
    # -- end issue 15 --
    # -- fleet mode (docs/fleet.md) --
    g = p.add_argument_group("fleet (desired state in etcd; without --etcd: this host only)")
    g.add_argument("--etcd", metavar="URL[,URL...]", default=None,
                   help="etcd client URLs, e.g. http://10.0.0.5:2379 (env XDPFW_ETCD)")
    g.add_argument("--node", metavar="NAME", default=None,
                   help="this node's name in the fleet (default: the host name)")
    g.add_argument("--node-label", action="append", metavar="KEY=VALUE", default=None,
                   help="a label of this node (repeatable)")
    g.add_argument("--etcd-prefix", metavar="PATH", default=None, help="key prefix (/xdpfw)")
    g.add_argument("--etcd-ca", type=Path, default=None, metavar="FILE")
    g.add_argument("--etcd-cert", type=Path, default=None, metavar="FILE")
    g.add_argument("--etcd-key", type=Path, default=None, metavar="FILE")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "detach",
        help="detach the program from interfaces; --cleanup also removes every pin",
        description="Work on the kernel side directly (the service may be stopped). Detaches "
        "only xdpfw's own program; a program xdpfw did not attach is never touched.",
        epilog=DETACH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("iface", nargs="*", help="interfaces (default: every one running it)")
    p.add_argument("--bpffs-dir", type=Path, default=None, help="default /sys/fs/bpf/xdpfw")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the service's state dir (default /var/lib/xdpfw): --cleanup looks on the "
        "interfaces its database names for an xdpfw program whose pins are gone",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="detach everywhere and remove the program and map pins (rules in the database "
        "stay; the next `serve` loads them again); also detaches an xdpfw program whose pins "
        "were removed",
    )
    p.set_defaults(func=cmd_detach)

    p = _sub(sub, "status", "show service health, interfaces, program and capacity",
             STATUS_EPILOG, cmd_status)
    _json_flag(p, "print health and capacity as JSON")

    rule = sub.add_parser(
        "rule",
        help="add, remove, list and show rules",
        description="Add, remove, list and show rules.",
        epilog="examples:\n  xdpfw rule add --src 198.18.7.0/24\n  xdpfw rule ls\n"
        "  xdpfw rule show 12\n  xdpfw rule rm 12\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rsub = rule.add_subparsers(dest="rule_command", metavar="ACTION")
    rsub.required = True

    p = _sub(rsub, "add", "add a rule (enforced when this returns)", RULE_ADD_EPILOG,
             cmd_rule_add, "rule add")
    m = p.add_argument_group("match (at least one)")
    m.add_argument("--src", metavar="CIDR", help="source address or CIDR")
    m.add_argument("--dst", metavar="CIDR", help="destination address or CIDR")
    m.add_argument("--proto", choices=["tcp", "udp", "icmp", "icmpv6"], help="protocol")
    m.add_argument("--dport", metavar="N|LO-HI", help="destination port or range (tcp/udp)")
    p.add_argument("--action", choices=["drop", "allow"], default="drop", help="default: drop")
    p.add_argument("--monitor", action="store_true", help="count matches but let them pass")
    p.add_argument("--ttl", type=_ttl, metavar="DURATION", help="expire after 30s, 10m, 2h, 1d")
    p.add_argument("--comment", default="", metavar="TEXT", help="free text (max 256)")
    _source_flag(p, "the source that holds the rule (default: api)")
    p.add_argument("--sample", type=_positive_int, metavar="N",  # X-ray
                   help="sample 1 in N of the rule's frames (see `xdpfw capture`)")
    # -- issue 16: rate limits and TCP flags --
    m.add_argument("--tcp-flags", metavar="FLAGS",
                   help='"syn" (SYN set, ACK clear) or e.g. "SYN,!ACK", "RST" (with --proto tcp)')
    lim = p.add_argument_group("rate limit (makes the rule a limit rule)")
    lim.add_argument("--limit", metavar="RATE",
                     help="100/s (packets) or 2mb/s, 500kb/s, 9000b/s (bytes); per second")
    lim.add_argument("--burst", metavar="N",
                     help="packets (or bytes: 64kb) that may pass at once; default: one second")
    lim.add_argument("--per", choices=["source", "rule"],
                     help="a budget per source address (default) or one for the rule")
    lim.add_argument("--ban", metavar="DURATION",
                     help="drop a source that goes over for this long (30s, 10m, 1h)")
    _scope_flags(p, "which nodes enforce it")  # issue 19
    _json_flag(p, "print the new rule as JSON, not just its id")

    p = _sub(rsub, "rm", "remove rules by id, or by value (--src/--dst)", RULE_RM_EPILOG,
             cmd_rule_rm, "rule rm")
    p.add_argument("ids", nargs="*", type=_positive_int, metavar="ID")
    p.add_argument("--src", metavar="CIDR", help="remove the rules with exactly this src")
    p.add_argument("--dst", metavar="CIDR", help="remove the rules with exactly this dst")
    _source_flag(p, "with --src/--dst: only this source's holding goes")

    p = _sub(rsub, "ls", "list all rules", RULE_LS_EPILOG, cmd_rule_ls, "rule ls")
    _source_flag(p, "only the rules this source holds")
    p.add_argument("--format", choices=["table", "plain"], default="table",
                   help="plain: one CIDR per line, a list `xdpfw import` reads back")
    _json_flag(p, 'print the API\'s page shape {"rules": [...], "next_cursor": null}')

    p = _sub(rsub, "show", "show one rule and its counters", RULE_SHOW_EPILOG,
             cmd_rule_show, "rule show")
    p.add_argument("id", type=_positive_int, metavar="ID")
    _json_flag(p, "print the rule as JSON")

    p = _sub(sub, "import", "bulk load a blocklist file", IMPORT_EPILOG, cmd_import)
    p.add_argument("file", metavar="FILE|-", help="the list; - reads standard input")
    p.add_argument("--action", choices=["drop", "allow"], default="drop", help="default: drop")
    p.add_argument("--monitor", action="store_true", help="count matches but let them pass")
    p.add_argument("--ttl", type=_ttl, metavar="DURATION", help="expire after 30s, 10m, 2h, 1d")
    p.add_argument("--comment", default="", metavar="TEXT", help="comment for every rule")
    p.add_argument("--chunk", type=_positive_int, default=50_000, metavar="N",
                   help="entries per API call (default 50000; each call is all or nothing)")
    p.add_argument("--strict", action="store_true", help="send nothing if any line is bad")
    p.add_argument("--dry-run", action="store_true", help="validate and summarise; send nothing")
    p.add_argument("--show-rejected", type=int, default=20, metavar="N",
                   help="bad lines to describe on stderr (default 20; --json has them all)")
    _source_flag(p, "the source that holds the rules (default: api)")
    p.add_argument("--replace", action="store_true",
                   help="with --source: the source holds exactly this file afterwards")
    _json_flag(p, "print the summary as JSON")

    # -- lookup (issue 13) --
    p = _sub(sub, "lookup", "what the firewall does with a packet from ADDR, and which rules "
             "match it", LOOKUP_EPILOG, cmd_lookup)
    p.add_argument("addr", metavar="ADDR", help="the packet's source address")
    p.add_argument("--dst", metavar="ADDR", help="its destination address")
    p.add_argument("--proto", metavar="P", help="tcp, udp, icmp, icmpv6 or a protocol number")
    p.add_argument("--dport", type=int, metavar="N", help="its destination port (tcp/udp)")
    p.add_argument("--tcp-flags", metavar="FLAGS",
                   help='the TCP flags it has set, e.g. SYN or SYN,ACK (with --proto tcp)')
    _json_flag(p, "print the API's answer as JSON")
    _source_commands(sub)
    _fleet_commands(sub)

    # -- issue 16: bans of rate-limit rules --
    ban = sub.add_parser(
        "ban",
        help="list and lift the bans of rate-limit rules",
        description="List and lift the bans of rate-limit rules (sources dropped outright).",
        epilog="examples:\n  xdpfw ban ls\n  xdpfw ban rm --source 198.18.7.7\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bsub = ban.add_subparsers(dest="ban_command", metavar="ACTION")
    bsub.required = True
    p = _sub(bsub, "ls", "list the sources banned now, per rule", BAN_LS_EPILOG, cmd_ban_ls,
             "ban ls")
    _json_flag(p, 'print the API\'s shape {"bans": [...]}')
    p = _sub(bsub, "rm", "lift bans (the source's budget starts full again)", BAN_RM_EPILOG,
             cmd_ban_rm, "ban rm")
    p.add_argument("--source", metavar="ADDR", help="the bans of this address")
    p.add_argument("--rule", type=_positive_int, metavar="ID", help="the bans of this rule")
    p.add_argument("--all", action="store_true", help="every ban")

    p = _sub(sub, "stats", "per-rule counters and totals", STATS_EPILOG, cmd_stats)
    p.add_argument("--top", type=_positive_int, metavar="N", help="only the N busiest rules")
    p.add_argument("--interval", type=_positive_float, metavar="S",
                   help="sample twice, S seconds apart, to show rates")
    _json_flag(p)

    p = _sub(sub, "top", "live view of the busiest rules", TOP_EPILOG, cmd_top)
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--rows", type=_positive_int, metavar="N",
                   help="rules to show (default: what fits the terminal)")
    p.add_argument("-n", "--iterations", type=_positive_int, metavar="N",
                   help="exit after N refreshes")
    # X-ray (issue 17)
    p = _sub(sub, "capture", "write sampled frames as pcapng (or print them as JSON)",
             CAPTURE_EPILOG, cmd_capture)
    add_capture_parser(p, _positive_int, _positive_float)
    # -- issue 15 (ops): completion and the man page, generated from this parser --
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script generated from this command's parser.",
        epilog='examples:\n  eval "$(xdpfw completion bash)"\n'
        "  xdpfw completion bash > /etc/bash_completion.d/xdpfw\n"
        '  xdpfw completion zsh > "${fpath[1]}/_xdpfw"\n',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=cmd_completion)
    p = sub.add_parser(
        "man",
        help="print the xdpfw(8) manual page (roff)",
        description="Print the xdpfw(8) manual page, generated from this command's parser.",
        epilog="examples:\n  xdpfw man | man -l -\n"
        "  xdpfw man > /usr/local/share/man/man8/xdpfw.8\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_man)
    # -- end issue 15 --
    for client_parser in (parser, *_CLIENT_PARSERS):
        add_client_options(client_parser)
    return parser


def completion(parser: argparse.ArgumentParser) -> None:
    """Shell completion through argcomplete, when it is installed and the shell asks."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import importlib

    try:
        argcomplete = importlib.import_module("argcomplete")
    except ImportError:
        return
    argcomplete.autocomplete(parser)
