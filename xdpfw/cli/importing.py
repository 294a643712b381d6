"""`xdpfw import FILE|-`: validate a blocklist here, send it in chunks, report what loaded."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xdpfw.cli.output import err, print_json
from xdpfw.cli.rules import FLAGS

if TYPE_CHECKING:
    from xdpfw.cli.client import BulkResult, Client
    from xdpfw.importers import ParsedList

__all__ = ["IMPORT_EPILOG", "PROGRESS_MIN", "cmd_import", "read_input"]

IMPORT_EPILOG = """Formats (mixed freely): one address or CIDR per line; FireHOL .netset/.ipset;
Spamhaus DROP/EDROP text ("1.10.16.0/20 ; SBL256894") and JSON lines (drop_v4.json).
'#' and ';' start comments; blank lines are skipped. Every line is validated here first: bad
lines (e.g. a CIDR with host bits set) are reported with their line number and skipped, and
only valid entries are sent, in chunks (POST /v1/rules/bulk). Entries already present count
as duplicates, so re-running an import is safe.

exit codes: 0 every line loaded; 1 some lines were rejected (the rest loaded) or a chunk failed
  (earlier chunks stay loaded; the summary says how many); 2 nothing valid, or --strict with
  bad lines (nothing sent).

--source NAME: the rules are held by that source (several lists can share an entry; see
`xdpfw source`), and entries overlapping a --protect prefix are loaded and reported instead of
refusing the chunk. --replace (with --source): the source holds exactly this file afterwards,
sent as one call (all or nothing).

examples:
  xdpfw import blocklist.txt
  xdpfw import firehol_level1.netset --source firehol_level1 --replace
  xdpfw import firehol_level1.netset --comment firehol --ttl 1d
  curl -s https://www.spamhaus.org/drop/drop.txt | xdpfw import - --comment spamhaus-drop
  xdpfw import list.txt --dry-run                  # validate only
"""


PROGRESS_MIN = 10_000  # entries; smaller imports finish before a bar is worth drawing


def read_input(name: str) -> str:
    from xdpfw.cli.client import EXIT_USAGE, ClientError

    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {name}: {exc.strerror or exc}", EXIT_USAGE) from exc
    return raw.decode("utf-8", errors="replace")


def cmd_import(args: argparse.Namespace, api: Client) -> int:
    from xdpfw import importers
    from xdpfw.cli.client import EXIT_USAGE, ClientError
    from xdpfw.errors import InvalidRule
    from xdpfw.rules import RuleSpec
    from xdpfw.sources import DEFAULT_SOURCE

    name = "<stdin>" if args.file == "-" else args.file
    parsed = importers.parse_blocklist(importers.lines_of(read_input(args.file)))
    mode = "monitor" if args.monitor else "enforce"
    if parsed.entries:
        try:  # the options once, with a real entry, by the same code the API runs
            RuleSpec.parse(action=args.action, mode=mode, src=parsed.entries[0].network)
        except InvalidRule as exc:
            flag = FLAGS.get(exc.field, exc.field)
            raise ClientError(f"{flag}: {exc.problem}", EXIT_USAGE) from exc
    report = _ImportReport(name, parsed)
    for bad in parsed.rejected[: args.show_rejected]:
        err(args, f"{name}: {bad}")
    if len(parsed.rejected) > args.show_rejected:
        err(args, f"{name}: ... and {len(parsed.rejected) - args.show_rejected} more bad lines")
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
    if args.replace:
        return _replace(args, api, parsed, report, mode)

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
                    source=args.source or DEFAULT_SOURCE,  # a source load: overlaps reported
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


def _replace(
    args: argparse.Namespace, api: Client, parsed: ParsedList, report: _ImportReport, mode: str
) -> int:
    from xdpfw import importers
    from xdpfw.cli.client import EXIT_USAGE, ClientError
    from xdpfw.cli.sources import print_change, spinner

    if args.source is None:
        raise ClientError("--replace needs --source NAME (the source to replace)", EXIT_USAGE)
    n = len(parsed.entries)
    with spinner(f"replacing source {args.source} ({n} entries)", n):
        change = api.replace_source(
            args.source,
            importers.body(parsed.entries),
            action=args.action,
            mode=mode,
            comment=args.comment,
            ttl_seconds=args.ttl,
        )
    if args.json:
        print_json({"file": report.name, "entries": n, "rejected": len(parsed.rejected),
                    **change})
    else:
        p = parsed
        print(f"{report.name}: {p.format} list, {p.lines} lines, {n} unique entries")
        print_change(change)
        if p.rejected:
            print(f"  rejected    {len(p.rejected)} (not sent)")
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
        self.overlaps: list[str] = []
        self.overlap_count = 0

    def add(self, result: BulkResult, n: int) -> None:
        self.added += result["added"]
        self.server_dups += result["duplicates"]
        self.ids += result["ids"]
        self.duplicate_ids += result["duplicate_ids"]
        self.overlaps += result.get("overlaps", [])[: max(0, 100 - len(self.overlaps))]
        self.overlap_count += result.get("overlap_count", 0)
        self.sent += n

    def emit(self, as_json: bool, dry_run: bool = False, nothing_sent: str = "") -> None:
        p = self.parsed
        if as_json:
            print_json(
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
                    "overlaps": self.overlaps,
                    "overlap_count": self.overlap_count,
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
        if self.overlap_count:
            from xdpfw.cli.sources import print_overlaps

            print_overlaps(self.overlaps, self.overlap_count)
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
