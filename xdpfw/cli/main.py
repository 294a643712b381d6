# PYTHON_ARGCOMPLETE_OK
"""The `xdpfw` command line.

`xdpfw serve` runs the service (datapath + REST API). Every other command is a client of the
REST API, so what a person does by hand goes through the same checks as automation:

    xdpfw status                      health, interfaces, XDP mode, program, capacity
    xdpfw rule add|rm|ls|show         one rule at a time
    xdpfw import FILE|-               bulk load a blocklist (plain, FireHOL, Spamhaus DROP)
    xdpfw stats                       per-rule counters and totals
    xdpfw top                         a live view of the busiest rules

Client commands import only httpx (and rich for `top` and progress bars), never the service's
modules (bcc, pyroute2, fastapi), so they start fast on any machine that can reach the API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from xdpfw.cli import humanize as hz

if TYPE_CHECKING:
    from rich.console import RenderableType

    from xdpfw.cli.client import BulkResult, Client, Health, Rule, Stats
    from xdpfw.importers import ParsedList

__all__ = ["build_parser", "main"]

SERVE_EPILOG = """examples:
  xdpfw serve --iface eth1                      # filter eth1, API on 127.0.0.1:8000
  xdpfw serve --iface eth1 --iface eth2 --xdp-mode generic
  xdpfw serve                                   # no interface: a demo namespace lab
  XDPFW_TOKEN=... xdpfw serve --iface eth1 --listen 0.0.0.0:8000

Every flag also has an XDPFW_* environment variable (XDPFW_IFACE=eth1,eth2, XDPFW_LISTEN,
XDPFW_STATE_DIR, XDPFW_BPFFS_DIR, XDPFW_XDP_MODE, XDPFW_TOKEN, XDPFW_MAX_RULES, ...).
"""


DETACH_EPILOG = """examples:
  xdpfw detach eth1                    # stop filtering eth1, keep the pins
  xdpfw detach --cleanup               # detach everywhere, remove /sys/fs/bpf/xdpfw
  xdpfw detach --cleanup --bpffs-dir /sys/fs/bpf/xdpfw-demo
"""


def _detach(args: argparse.Namespace) -> int:
    from xdpfw.datapath import PROG_PIN, Datapath, DatapathConfig
    from xdpfw.errors import XdpfwError

    pin_dir = args.bpffs_dir or Path(os.environ.get("XDPFW_BPFFS_DIR", "/sys/fs/bpf/xdpfw"))
    if not (pin_dir / PROG_PIN).exists():
        print(f"xdpfw detach: nothing pinned under {pin_dir}", file=sys.stderr)
        return 1
    try:
        dp = Datapath.open(DatapathConfig(bpffs_dir=pin_dir, upgrade=False))
    except XdpfwError as exc:
        print(f"xdpfw detach: {exc}", file=sys.stderr)
        return 1
    try:
        if args.cleanup:
            names = [a.ifname for a in dp.attachments()]
            dp.close(cleanup=True)
            print(f"detached from {', '.join(names) or 'no interface'}; removed {pin_dir}")
            return 0
        targets = args.iface or [a.ifname for a in dp.attachments()]
        for name in targets:
            dp.detach(name)
            print(f"detached from {name}")
        return 0
    except XdpfwError as exc:
        print(f"xdpfw detach: {exc}", file=sys.stderr)
        return 1
    finally:
        dp.close()


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from api.server import serve
    from api.settings import get_settings

    demo = False
    try:
        settings = get_settings(
            iface=args.iface or None,
            xdp_mode=args.xdp_mode,
            listen=args.listen,
            state_dir=args.state_dir,
            bpffs_dir=args.bpffs_dir,
            max_rules=args.max_rules,
            max_prefixes=args.max_prefixes,
            max_sets=args.max_sets,
            protect=args.protect or None,
        )
        if not settings.iface and not args.no_demo:
            from api.store import Store

            db = settings.db_file
            known = Store(db).interfaces() if db.exists() else {}
            if not known:
                demo = True
                settings = get_settings(
                    iface=[],
                    xdp_mode=args.xdp_mode,
                    listen=args.listen,
                    state_dir=args.state_dir or Path("/run/xdpfw-demo"),
                    bpffs_dir=args.bpffs_dir or Path("/sys/fs/bpf/xdpfw-demo"),
                    max_rules=args.max_rules or 65536,
                    max_prefixes=args.max_prefixes or 16384,
                    max_sets=args.max_sets or 1024,
                    protect=args.protect or None,
                )
    except ValidationError as exc:
        for err in exc.errors():
            print(f"xdpfw serve: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    return serve(settings, demo=demo, cleanup=args.cleanup)


# --- client commands -----------------------------------------------------------------------

MAIN_EPILOG = """examples:
  xdpfw status                                  # is it up, where, how full
  xdpfw rule add --src 198.18.7.0/24 --ttl 2h --comment "abuse ticket 4711"
  xdpfw rule ls
  xdpfw import firehol_level1.netset --comment firehol
  xdpfw stats --top 10
  xdpfw top                                     # live; q quits
  xdpfw COMMAND --help                          # more examples per command

The connection options work before or after the command. The token is --token, else
XDPFW_TOKEN, else read from <state-dir>/token (/var/lib/xdpfw, or the demo's /run/xdpfw-demo).
Reads need no token when the API listens on loopback only; changes always do, so run them as
root (to read the token file) or pass the token.

exit codes: 0 ok; 1 the API refused or failed, or an import was partial; 2 invalid input;
  3 the service cannot be reached; 4 missing or wrong token.

shell completion (bash/zsh, needs argcomplete): eval "$(register-python-argcomplete xdpfw)"
"""

STATUS_EPILOG = """Shows service health, the interfaces and their XDP mode (native/generic), the
program id, the rule count and how full each kernel table is. Exits 1 when the service is
degraded (an interface it should filter is not attached).

examples:
  xdpfw status
  xdpfw status --json | jq .capacity
  XDPFW_API=http://10.0.0.5:8000 xdpfw status
"""

RULE_ADD_EPILOG = """Prints the new rule's id (the whole rule with --json). Adding a rule identical
in match, action and mode to an existing one adds nothing and prints the existing id.

examples:
  xdpfw rule add --src 198.18.7.0/24                       # drop a network
  xdpfw rule add --src 198.18.7.9 --ttl 10m --comment "scanner"
  xdpfw rule add --src 198.18.0.0/15 --proto udp --dport 1000-2000
  xdpfw rule add --dst 2001:db8::/32 --proto tcp --dport 22 --action allow
  xdpfw rule add --proto udp --dport 53 --monitor          # count, don't drop
"""

RULE_RM_EPILOG = """examples:
  xdpfw rule rm 12
  xdpfw rule rm 12 13 14
  xdpfw rule ls --json | jq '.rules[] | select(.comment=="test") | .id' | xargs xdpfw rule rm
"""

RULE_LS_EPILOG = """examples:
  xdpfw rule ls
  xdpfw rule ls --json | jq '.rules | length'
"""

RULE_SHOW_EPILOG = """Shows one rule with its counters (numbers humanised; exact with --json).

examples:
  xdpfw rule show 12
  xdpfw rule show 12 --json
"""

IMPORT_EPILOG = """Formats (mixed freely): one address or CIDR per line; FireHOL .netset/.ipset;
Spamhaus DROP/EDROP text ("1.10.16.0/20 ; SBL256894") and JSON lines (drop_v4.json).
'#' and ';' start comments; blank lines are skipped. Every line is validated here first: bad
lines (e.g. a CIDR with host bits set) are reported with their line number and skipped, and
only valid entries are sent, in chunks (POST /v1/rules/bulk). Entries already present count
as duplicates, so re-running an import is safe.

exit codes: 0 every line loaded; 1 some lines were rejected (the rest loaded) or a chunk failed
  (earlier chunks stay loaded; the summary says how many); 2 nothing valid, or --strict with
  bad lines (nothing sent).

examples:
  xdpfw import blocklist.txt
  xdpfw import firehol_level1.netset --comment firehol --ttl 1d
  curl -s https://www.spamhaus.org/drop/drop.txt | xdpfw import - --comment spamhaus-drop
  xdpfw import list.txt --dry-run                  # validate only
"""

STATS_EPILOG = """Counters are cumulative since the rule was added. RATE is "-" unless --interval S
is given: then the counters are read twice, S seconds apart, and RATE is packets per second
(--json then adds a "rates" object next to the API's own fields).

examples:
  xdpfw stats
  xdpfw stats --top 10 --interval 2
  xdpfw stats --json | jq .totals.dropped
"""

TOP_EPILOG = """A live view, like top(1): the busiest rules by current packet rate, and the
totals' rates. Keys: q (or Ctrl-C) quits.

examples:
  xdpfw top
  xdpfw top --interval 2 --rows 30
  xdpfw top -n 3 > snapshot.txt                    # 3 refreshes, then exit
"""

_CLIENT_DESTS = ("api", "token", "client_state_dir", "timeout")


def _add_client_options(p: argparse.ArgumentParser) -> None:
    """Connection options; accepted before or after the command (SUPPRESS keeps either)."""
    g = p.add_argument_group("connection")
    g.add_argument(
        "--api",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="API base URL (env XDPFW_API; default http://127.0.0.1:8000)",
    )
    g.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="bearer token (env XDPFW_TOKEN; default read from <state-dir>/token)",
    )
    g.add_argument(
        "--state-dir",
        dest="client_state_dir",
        type=Path,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where the service keeps its token (env XDPFW_STATE_DIR; default /var/lib/xdpfw)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=argparse.SUPPRESS,
        help="seconds to wait for each API answer (default 10)",
    )


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


Handler = Callable[[argparse.Namespace, "Client"], int]


def _client_command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: build the Client from the connection options, map errors to exits."""

    def run(args: argparse.Namespace) -> int:
        from xdpfw.cli.client import DEFAULT_API, Client, ClientError, find_token

        api_url = getattr(args, "api", None) or os.environ.get("XDPFW_API") or DEFAULT_API
        token = find_token(getattr(args, "token", None), getattr(args, "client_state_dir", None))
        try:
            with Client(api_url, token, timeout=getattr(args, "timeout", 10.0)) as api:
                return handler(args, api)
        except ClientError as exc:
            _err(args, exc.message)
            return exc.exit_code

    return run


def _err(args: argparse.Namespace, message: str) -> None:
    print(f"xdpfw {args.cmd_name}: {message}", file=sys.stderr)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def _verdict(rule: Rule) -> str:
    if rule["action"] == "allow":
        return "allow"
    return "monitor" if rule["mode"] == "monitor" else "drop"


def _match(rule: Rule) -> str:
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


# --- status --------------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import ClientError

    health = api.health()
    capacity: dict[str, tuple[int, int]] = {}
    cap_error = None
    try:
        capacity = api.table_usage()
    except ClientError as exc:
        cap_error = exc.message
    degraded = health["status"] != "ok"
    if args.json:
        _print_json(
            {
                "api": api.base_url,
                "health": health,
                "capacity": {t: {"entries": u, "capacity": c} for t, (u, c) in capacity.items()},
            }
        )
    else:
        print(_status_text(api.base_url, health, capacity))
    if cap_error is not None:
        _err(args, f"capacity unavailable: {cap_error}")
    if degraded:
        down = [i["name"] for i in health["interfaces"] if not i["attached"]]
        why = f"not attached: {', '.join(down)}" if down else "no interface attached"
        _err(
            args,
            f"service degraded ({why}); check the service log, then restart it or "
            "re-attach with POST /v1/interfaces",
        )
        return 1
    return 0


def _status_text(url: str, health: Health, capacity: dict[str, tuple[int, int]]) -> str:
    lines = [
        f"service     {health['status']}  ({url})",
        f"program     id {health['prog_id']}"
        + ("  (adopted from a previous run)" if health["adopted"] else ""),
        f"rules       {health['rules']}",
        "",
    ]
    ifaces = [
        [
            i["name"],
            "yes" if i["attached"] else "NO",
            i["mode"],
            str(i["prog_id"]) if i["prog_id"] else "-",
            str(i["ifindex"]) if i["ifindex"] else "-",
        ]
        for i in health["interfaces"]
    ]
    if ifaces:
        lines.append(hz.table(["INTERFACE", "ATTACHED", "XDP MODE", "PROG", "IFINDEX"], ifaces))
    else:
        lines.append("no interfaces (attach one with POST /v1/interfaces)")
    if capacity:
        order = sorted(capacity, key=lambda t: (t != "rules", t))
        rows = []
        for t in order:
            used, cap = capacity[t]
            pct = f"{100 * used / cap:.1f}%" if cap else "-"
            rows.append([t.removeprefix("xdpfw_"), hz.count(used), hz.count(cap), pct])
        lines += ["", hz.table(["TABLE", "USED", "CAPACITY", "USE"], rows, right=(1, 2, 3))]
    return "\n".join(lines)


# --- rule add/rm/ls/show -------------------------------------------------------------------

_FLAGS = {
    "src": "--src",
    "dst": "--dst",
    "proto": "--proto",
    "dport": "--dport",
    "action": "--action",
    "mode": "--monitor",
    "comment": "--comment",
    "ttl_seconds": "--ttl",
}


def _cmd_rule_add(args: argparse.Namespace, api: Client) -> int:
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
    try:
        rule, created = api.add_rule(body)
    except ClientError as exc:
        if exc.problems:
            text = "; ".join(f"{_FLAGS.get(f, f)}: {m}" for f, m in exc.problems)
            raise ClientError(f"invalid rule: {text}", exc.exit_code, status=exc.status) from exc
        raise
    if not created:
        _err(args, f"an identical rule already exists (id {rule['id']}); nothing added")
    if args.json:
        _print_json(rule)
    else:
        print(rule["id"])
    return 0


def _cmd_rule_rm(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import ClientError

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
            _err(args, exc.message)
            rc = 1
            continue
        removed.append(rid)
    if removed:
        print("removed " + " ".join(map(str, removed)))
    return rc


def _cmd_rule_ls(args: argparse.Namespace, api: Client) -> int:
    rules = api.rules()
    if args.json:
        _print_json({"rules": rules, "next_cursor": None})
        return 0
    if not rules:
        print("no rules (add one with `xdpfw rule add --src CIDR`)", file=sys.stderr)
        return 0
    rows = [
        [
            str(r["id"]),
            _verdict(r),
            r["src"] or "-",
            r["dst"] or "-",
            r["proto"] or "-",
            r["dport"] or "-",
            hz.until(r["expires_at"]),
            r["comment"],
        ]
        for r in rules
    ]
    print(
        hz.table(
            ["ID", "ACTION", "SRC", "DST", "PROTO", "DPORT", "EXPIRES", "COMMENT"], rows, right=(0,)
        )
    )
    return 0


def _exact(n: int, text: str) -> str:
    return text if text == str(n) else f"{text} ({n})"


def _cmd_rule_show(args: argparse.Namespace, api: Client) -> int:
    rule = api.rule(args.id)
    if args.json:
        _print_json(rule)
        return 0
    c = rule["counters"] or {"packets": 0, "bytes": 0, "last_hit": None}
    created = rule["created_at"]
    expires = rule["expires_at"]
    fields = [
        ("id", str(rule["id"])),
        ("action", _verdict(rule)),
        ("match", _match(rule)),
        ("comment", rule["comment"] or "-"),
        ("created", f"{created} ({hz.ago(created)})"),
        ("expires", f"{expires} ({hz.until(expires)})" if expires else "never"),
        ("packets", _exact(c["packets"], hz.count(c["packets"]))),
        ("bytes", _exact(c["bytes"], hz.bytes_(c["bytes"]))),
        ("last hit", f"{c['last_hit']} ({hz.ago(c['last_hit'])})" if c["last_hit"] else "never"),
    ]
    for name, value in fields:
        print(f"{name:<10}{value}")
    return 0


# --- import --------------------------------------------------------------------------------

PROGRESS_MIN = 10_000  # entries; smaller imports finish before a bar is worth drawing


def _read_input(name: str) -> str:
    from xdpfw.cli.client import EXIT_USAGE, ClientError

    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {name}: {exc.strerror or exc}", EXIT_USAGE) from exc
    return raw.decode("utf-8", errors="replace")


def _cmd_import(args: argparse.Namespace, api: Client) -> int:
    from xdpfw import importers
    from xdpfw.cli.client import EXIT_USAGE, ClientError
    from xdpfw.errors import InvalidRule
    from xdpfw.rules import RuleSpec

    name = "<stdin>" if args.file == "-" else args.file
    parsed = importers.parse_blocklist(importers.lines_of(_read_input(args.file)))
    mode = "monitor" if args.monitor else "enforce"
    if parsed.entries:
        try:  # the options once, with a real entry, by the same code the API runs
            RuleSpec.parse(action=args.action, mode=mode, src=parsed.entries[0].network)
        except InvalidRule as exc:
            flag = _FLAGS.get(exc.field, exc.field)
            raise ClientError(f"{flag}: {exc.problem}", EXIT_USAGE) from exc
    report = _ImportReport(name, parsed)
    for bad in parsed.rejected[: args.show_rejected]:
        _err(args, f"{name}: {bad}")
    if len(parsed.rejected) > args.show_rejected:
        _err(args, f"{name}: ... and {len(parsed.rejected) - args.show_rejected} more bad lines")
    if not parsed.entries:
        report.emit(args.json, nothing_sent="nothing to send")
        raise ClientError(f"{name}: no valid addresses to import", EXIT_USAGE)
    if parsed.rejected and args.strict:
        report.emit(args.json, nothing_sent="--strict: nothing sent")
        raise ClientError(
            f"{name}: {len(parsed.rejected)} bad line(s); nothing sent (--strict)", EXIT_USAGE
        )
    if args.dry_run:
        report.emit(args.json, dry_run=True)
        return 1 if parsed.rejected else 0

    batches = list(importers.chunks(parsed.entries, args.chunk))
    failure: ClientError | None = None
    with _progress(len(parsed.entries), show=_want_progress(len(parsed.entries))) as advance:
        for i, batch in enumerate(batches, 1):
            try:
                result = api.bulk_text(
                    importers.body(batch),
                    action=args.action,
                    mode=mode,
                    comment=args.comment,
                    ttl_seconds=args.ttl,
                )
            except ClientError as exc:
                failure = exc
                report.failed_chunk = (i, len(batches))
                break
            report.add(result, len(batch))
            advance(len(batch))
    report.emit(args.json)
    if failure is not None and report.failed_chunk is not None:
        i, n = report.failed_chunk
        left = len(parsed.entries) - report.sent
        if report.sent:
            note = (
                f"chunk {i} of {n} failed, so its entries and any after it ({left}) were not "
                f"added; the {report.sent} entries of chunks 1-{i - 1} stay loaded. Fix the "
                "problem and run the same import again (entries already present count as "
                "duplicates)"
            )
        else:
            note = "nothing was added"
        raise ClientError(f"{failure.message}; {note}", failure.exit_code or 1)
    return 1 if parsed.rejected else 0


@dataclass
class _ImportReport:
    name: str
    parsed: ParsedList
    added: int = 0
    server_dups: int = 0
    sent: int = 0
    failed_chunk: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.ids: list[int] = []
        self.duplicate_ids: list[int] = []

    def add(self, result: BulkResult, n: int) -> None:
        self.added += result["added"]
        self.server_dups += result["duplicates"]
        self.ids += result["ids"]
        self.duplicate_ids += result["duplicate_ids"]
        self.sent += n

    def emit(self, as_json: bool, dry_run: bool = False, nothing_sent: str = "") -> None:
        p = self.parsed
        if as_json:
            _print_json(
                {
                    "file": self.name,
                    "format": p.format,
                    "lines": p.lines,
                    "entries": len(p.entries),
                    "sent": self.sent,
                    "complete": self.sent == len(p.entries) and not dry_run,
                    "added": self.added,
                    "duplicates": self.server_dups + len(p.repeats),
                    "ids": self.ids,
                    "duplicate_ids": self.duplicate_ids,
                    "repeated_lines": [{"line": n, "first": f} for n, f in p.repeats],
                    "rejected": [
                        {"line": r.lineno, "text": r.text, "reason": r.reason} for r in p.rejected
                    ],
                }
            )
            return
        print(f"{self.name}: {p.format} list, {p.lines} lines, {len(p.entries)} unique entries")
        if dry_run:
            print(f"  would add   {len(p.entries)} (dry run: nothing sent)")
        elif nothing_sent:
            print(f"  added       0 ({nothing_sent})")
        else:
            print(f"  added       {self.added}")
            print(
                f"  duplicates  {self.server_dups + len(p.repeats)} ({self.server_dups} already "
                f"present, {len(p.repeats)} repeated in the file)"
            )
        rejected = p.rejected
        where = ", ".join(str(r.lineno) for r in rejected[:50])
        more = f", ... {len(rejected) - 50} more" if len(rejected) > 50 else ""
        label = "line" if len(rejected) == 1 else "lines"
        print(f"  rejected    {len(rejected)}" + (f" ({label} {where}{more})" if rejected else ""))
        if self.failed_chunk is not None:
            i, n = self.failed_chunk
            print(
                f"  INCOMPLETE  chunk {i} of {n} failed: {len(p.entries) - self.sent} of "
                f"{len(p.entries)} entries not loaded"
            )


def _want_progress(n: int) -> bool:
    return n >= PROGRESS_MIN and sys.stderr.isatty()


class _progress:
    """A rich progress bar on stderr, or nothing; yields advance(n)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total = total
        self.show = show
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("importing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task("import", total=self.total)
        bar = self._bar
        return lambda n: bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- stats and top -------------------------------------------------------------------------

_TOTALS = ("packets", "passed", "dropped", "monitored", "malformed", "non_ip", "fragments")


def _totals(stats: Stats) -> dict[str, int]:
    return cast(dict[str, int], dict(stats["totals"]))


@dataclass
class _Sample:
    t: float
    stats: Stats

    @staticmethod
    def take(api: Client, top: int | None = None) -> _Sample:
        stats = api.stats(top)
        return _Sample(time.monotonic(), stats)


@dataclass
class _Rates:
    """Per second between two samples; rules present in both only."""

    interval: float
    totals: dict[str, float]
    pps: dict[int, float]
    bps: dict[int, float]

    @staticmethod
    def between(a: _Sample, b: _Sample) -> _Rates:
        dt = max(b.t - a.t, 1e-6)
        ta, tb = _totals(a.stats), _totals(b.stats)
        totals = {k: max(0, tb[k] - ta[k]) / dt for k in ta}
        before = {r["id"]: r for r in a.stats["rules"]}
        pps: dict[int, float] = {}
        bps: dict[int, float] = {}
        for r in b.stats["rules"]:
            old = before.get(r["id"])
            if old is not None:
                pps[r["id"]] = max(0, r["packets"] - old["packets"]) / dt
                bps[r["id"]] = max(0, r["bytes"] - old["bytes"]) / dt
        return _Rates(dt, totals, pps, bps)


class _RuleCache:
    """Rule bodies by id for the stats/top tables (ids are never reused, so caching is safe)."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self.rules: dict[int, Rule | None] = {}

    def fetch(self, ids: Iterable[int], list_all_above: int = 50) -> None:
        from xdpfw.cli.client import ClientError

        missing = [i for i in ids if i not in self.rules]
        if len(missing) > list_all_above:
            found = {r["id"]: r for r in self.api.rules()}
            for i in missing:
                self.rules[i] = found.get(i)
            return
        for i in missing:
            try:
                self.rules[i] = self.api.rule(i)
            except ClientError as exc:
                if exc.status != 404:
                    raise
                self.rules[i] = None  # removed since the counters were read

    def match(self, rid: int) -> str:
        r = self.rules.get(rid)
        return _match(r) if r is not None else "(removed)"

    def verdict(self, rid: int) -> str:
        r = self.rules.get(rid)
        return _verdict(r) if r is not None else "-"


def _cmd_stats(args: argparse.Namespace, api: Client) -> int:
    rates: _Rates | None = None
    if args.interval is not None:
        first = _Sample.take(api)
        time.sleep(args.interval)
        second = _Sample.take(api)
        rates = _Rates.between(first, second)
        stats = second.stats
        if args.top is not None:
            stats = {"totals": stats["totals"], "rules": stats["rules"][: args.top]}
    else:
        stats = api.stats(args.top)
    if args.json:
        out: dict[str, object] = dict(stats)
        if rates is not None:
            out["rates"] = {
                "interval_s": round(rates.interval, 3),
                "totals": {f"{k}_per_s": round(v, 3) for k, v in rates.totals.items()},
                "rules": {
                    str(r["id"]): {
                        "packets_per_s": round(rates.pps.get(r["id"], 0.0), 3),
                        "bytes_per_s": round(rates.bps.get(r["id"], 0.0), 3),
                    }
                    for r in stats["rules"]
                },
            }
        _print_json(out)
        return 0
    cache = _RuleCache(api)
    cache.fetch(r["id"] for r in stats["rules"])
    rows = [
        [
            str(r["id"]),
            cache.match(r["id"]),
            cache.verdict(r["id"]),
            hz.count(r["packets"]),
            hz.bytes_(r["bytes"]),
            hz.rate(rates.pps.get(r["id"]) if rates else None),
            hz.ago(r["last_hit"]),
        ]
        for r in stats["rules"]
    ]
    if rows:
        print(
            hz.table(
                ["RULE", "MATCH", "ACTION", "PACKETS", "BYTES", "RATE", "LAST HIT"],
                rows,
                right=(0, 3, 4, 5),
            )
        )
    else:
        print("no rules")
    t = _totals(stats)
    total_rows = [
        [
            "frames" if k == "packets" else k.replace("non_ip", "non-IP"),
            hz.count(t[k]),
            hz.rate(rates.totals[k] if rates else None),
        ]
        for k in _TOTALS
    ]
    total_rows.append(
        ["bytes", hz.bytes_(t["bytes"]), hz.rate(rates.totals["bytes"], "B/s") if rates else "-"]
    )
    print()
    print(hz.table(["TOTALS", "COUNT", "RATE"], total_rows, right=(1, 2)))
    return 0


class _Keys:
    """Keystrokes from a terminal in cbreak mode, without blocking; restores it on exit.

    Ctrl-C still raises KeyboardInterrupt (cbreak keeps ISIG). Not a terminal: no keys.
    """

    def __init__(self, stream: TextIO) -> None:
        self.fd: int | None = None
        self.saved: list[Any] | None = None
        self.eof = False
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            return
        if os.isatty(fd):
            self.fd = fd

    def __enter__(self) -> _Keys:
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self, timeout: float) -> str:
        """Keys typed within `timeout` seconds ('' when none)."""
        if self.fd is None or self.eof:
            time.sleep(timeout)
            return ""
        import select

        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:
            self.eof = True
        return data.decode(errors="ignore")


def _cmd_top(args: argparse.Namespace, api: Client) -> int:
    from rich.console import Console
    from rich.live import Live

    from xdpfw.cli.client import ClientError

    console = Console(highlight=False)
    cache = _RuleCache(api)
    health = api.health()
    sample = _Sample.take(api)  # a dead service fails here, before the screen is taken
    rates: _Rates | None = None
    problem: str | None = None
    shown = 0
    try:
        with (
            _Keys(sys.stdin) as keys,
            Live(
                console=console,
                screen=console.is_terminal,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            while True:
                rows = args.rows or max(3, console.size.height - 8)
                ranked = _rank(sample.stats, rates)[:rows]
                try:
                    cache.fetch((r["id"] for r in ranked), list_all_above=rows + 1)
                except ClientError as exc:
                    problem = exc.message
                live.update(
                    _top_view(api.base_url, health, sample, rates, ranked, cache, args, problem),
                    refresh=True,
                )
                shown += 1
                if args.iterations and shown >= args.iterations:
                    return 0
                deadline = time.monotonic() + args.interval
                while (left := deadline - time.monotonic()) > 0:
                    if any(k in "qQ" for k in keys.read(left)):
                        return 0
                try:
                    health = api.health()
                    new = _Sample.take(api)
                except ClientError as exc:
                    problem = f"{exc.message} (retrying)"
                    continue
                rates = _Rates.between(sample, new)
                sample = new
                problem = None
    except KeyboardInterrupt:
        return 0
    finally:
        if not console.is_terminal:
            console.line()  # the last frame, printed once at exit, ends its line


def _rank(stats: Stats, rates: _Rates | None) -> list[Any]:
    """Busiest first: by current packet rate, then by total packets, then id."""
    pps = rates.pps if rates else {}
    return sorted(stats["rules"], key=lambda r: (-pps.get(r["id"], 0.0), -r["packets"], r["id"]))


def _top_view(
    url: str,
    health: Health,
    sample: _Sample,
    rates: _Rates | None,
    ranked: list[Any],
    cache: _RuleCache,
    args: argparse.Namespace,
    problem: str | None,
) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ifaces = ", ".join(
        f"{i['name']} ({i['mode']})" if i["attached"] else f"{i['name']} (DETACHED)"
        for i in health["interfaces"]
    )
    head = Text()
    head.append("xdpfw top", style="bold")
    head.append(f"  {url}  ")
    head.append(health["status"], style="green" if health["status"] == "ok" else "bold red")
    head.append(f"  prog {health['prog_id']}  {health['rules']} rules  {ifaces or 'no interfaces'}")
    head.append(f"  every {args.interval:g}s  q quits", style="dim")
    t = rates.totals if rates else {}

    def r(key: str, unit: str = "pps") -> str:
        return hz.rate(t.get(key), unit)

    line = Text(
        f"in {r('packets')} {r('bytes', 'B/s')}   dropped {r('dropped')}   "
        f"passed {r('passed')}   monitored {r('monitored')}   "
        f"malformed {r('malformed')}   non-IP {r('non_ip')}"
    )
    table = Table(box=None, header_style="bold reverse", expand=True, pad_edge=False)
    for name, justify in (
        ("RULE", "right"),
        ("MATCH", "left"),
        ("ACTION", "left"),
        ("PPS", "right"),
        ("BYTES/S", "right"),
        ("PACKETS", "right"),
        ("BYTES", "right"),
        ("LAST HIT", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in ranked:
        rid = row["id"]
        verdict = cache.verdict(rid)
        table.add_row(
            Text(str(rid)),
            Text(cache.match(rid)),
            Text(verdict, style={"drop": "red", "allow": "green"}.get(verdict, "yellow")),
            Text(hz.rate(rates.pps.get(rid) if rates else None, "")),
            Text(hz.rate(rates.bps.get(rid) if rates else None, "B/s")),
            Text(hz.count(row["packets"])),
            Text(hz.bytes_(row["bytes"])),
            Text(hz.ago(row["last_hit"])),
        )
    parts: list[RenderableType] = [head, line]
    if problem:
        parts.append(Text(problem, style="bold red"))
    parts.append(Text(""))
    parts.append(table if ranked else Text("no rules"))
    return Group(*parts)


# --- the parser ----------------------------------------------------------------------------


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
    p.set_defaults(func=_client_command(handler), cmd_name=cmd_name or name)
    _CLIENT_PARSERS.append(p)
    return p


_CLIENT_PARSERS: list[argparse.ArgumentParser] = []


def _json_flag(p: argparse.ArgumentParser, what: str = "print the API's JSON, not a table") -> None:
    p.add_argument("--json", action="store_true", help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpfw",
        description="XDP firewall driven live over a REST API.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument("--listen", metavar="HOST:PORT", default=None)
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
    p.set_defaults(func=_serve)

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
        "--cleanup",
        action="store_true",
        help="detach everywhere and remove the program and map pins (rules in the database "
        "stay; the next `serve` loads them again)",
    )
    p.set_defaults(func=_detach)

    p = _sub(sub, "status", "show service health, interfaces, program and capacity",
             STATUS_EPILOG, _cmd_status)
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
             _cmd_rule_add, "rule add")
    m = p.add_argument_group("match (at least one)")
    m.add_argument("--src", metavar="CIDR", help="source address or CIDR")
    m.add_argument("--dst", metavar="CIDR", help="destination address or CIDR")
    m.add_argument("--proto", choices=["tcp", "udp", "icmp", "icmpv6"], help="protocol")
    m.add_argument("--dport", metavar="N|LO-HI", help="destination port or range (tcp/udp)")
    p.add_argument("--action", choices=["drop", "allow"], default="drop", help="default: drop")
    p.add_argument("--monitor", action="store_true", help="count matches but let them pass")
    p.add_argument("--ttl", type=_ttl, metavar="DURATION", help="expire after 30s, 10m, 2h, 1d")
    p.add_argument("--comment", default="", metavar="TEXT", help="free text (max 256)")
    _json_flag(p, "print the new rule as JSON, not just its id")

    p = _sub(rsub, "rm", "remove rules by id", RULE_RM_EPILOG, _cmd_rule_rm, "rule rm")
    p.add_argument("ids", nargs="+", type=_positive_int, metavar="ID")

    p = _sub(rsub, "ls", "list all rules", RULE_LS_EPILOG, _cmd_rule_ls, "rule ls")
    _json_flag(p, 'print the API\'s page shape {"rules": [...], "next_cursor": null}')

    p = _sub(rsub, "show", "show one rule and its counters", RULE_SHOW_EPILOG,
             _cmd_rule_show, "rule show")
    p.add_argument("id", type=_positive_int, metavar="ID")
    _json_flag(p, "print the rule as JSON")

    p = _sub(sub, "import", "bulk load a blocklist file", IMPORT_EPILOG, _cmd_import)
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
    _json_flag(p, "print the summary as JSON")

    p = _sub(sub, "stats", "per-rule counters and totals", STATS_EPILOG, _cmd_stats)
    p.add_argument("--top", type=_positive_int, metavar="N", help="only the N busiest rules")
    p.add_argument("--interval", type=_positive_float, metavar="S",
                   help="sample twice, S seconds apart, to show rates")
    _json_flag(p)

    p = _sub(sub, "top", "live view of the busiest rules", TOP_EPILOG, _cmd_top)
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--rows", type=_positive_int, metavar="N",
                   help="rules to show (default: what fits the terminal)")
    p.add_argument("-n", "--iterations", type=_positive_int, metavar="N",
                   help="exit after N refreshes")
    for client_parser in (parser, *_CLIENT_PARSERS):
        _add_client_options(client_parser)
    return parser


def _completion(parser: argparse.ArgumentParser) -> None:
    """Shell completion through argcomplete, when it is installed and the shell asks."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import importlib

    try:
        argcomplete = importlib.import_module("argcomplete")
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _completion(parser)
    args = parser.parse_args(argv)
    if args.command == "serve" and any(hasattr(args, d) for d in _CLIENT_DESTS):
        parser.error(
            "--api/--token/--state-dir/--timeout before `serve` are client options; "
            "give serve its own flags after it (xdpfw serve --state-dir DIR ...)"
        )
    try:
        rc: int = args.func(args)
    except BrokenPipeError:
        # `xdpfw rule ls | head`: the reader left; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
