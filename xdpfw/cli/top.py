"""`xdpfw top`: a live view of the busiest rules (rich), refreshed until q or Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from xdpfw.cli import humanize as hz
from xdpfw.cli.output import printable
from xdpfw.cli.stats import TOTAL_LABELS, Rates, RuleCache, Sample, limited_text

if TYPE_CHECKING:
    from rich.console import RenderableType

    from xdpfw.cli.client import Client, Health, Stats

__all__ = ["TOP_EPILOG", "TOP_LINE", "cmd_top"]

TOP_EPILOG = """A live view, like top(1): the busiest rules by current packet rate, and the
totals' rates. Keys: q (or Ctrl-C) quits.

examples:
  xdpfw top
  xdpfw top --interval 2 --rows 30
  xdpfw top -n 3 > snapshot.txt                    # 3 refreshes, then exit
"""

# The totals whose rates `top` shows after "in PPS B/s", in this order (names from TOTALS).
TOP_LINE = ("dropped", "passed", "monitored", "limited", "malformed", "non_ip")


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


def cmd_top(args: argparse.Namespace, api: Client) -> int:
    from rich.console import Console
    from rich.live import Live

    from xdpfw.cli.client import ClientError

    console = Console(highlight=False)
    cache = RuleCache(api)
    health = api.health()
    sample = Sample.take(api)  # a dead service fails here, before the screen is taken
    rates: Rates | None = None
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
                    new = Sample.take(api)
                except ClientError as exc:
                    problem = f"{exc.message} (retrying)"
                    continue
                rates = Rates.between(sample, new)
                sample = new
                problem = None
    except KeyboardInterrupt:
        return 0
    finally:
        if not console.is_terminal:
            console.line()  # the last frame, printed once at exit, ends its line


def _rank(stats: Stats, rates: Rates | None) -> list[Any]:
    """Busiest first: by current packet rate, then by total packets, then id."""
    pps = rates.pps if rates else {}
    return sorted(stats["rules"], key=lambda r: (-pps.get(r["id"], 0.0), -r["packets"], r["id"]))


def _top_view(
    url: str,
    health: Health,
    sample: Sample,
    rates: Rates | None,
    ranked: list[Any],
    cache: RuleCache,
    args: argparse.Namespace,
    problem: str | None,
) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ifaces = printable(", ".join(
        f"{i['name']} ({i['mode']})" if i["attached"] else f"{i['name']} (DETACHED)"
        for i in health["interfaces"]
    ))
    head = Text()
    head.append("xdpfw top", style="bold")
    head.append(f"  {printable(url)}  ")
    status = printable(str(health["status"]))
    head.append(status, style="green" if status == "ok" else "bold red")
    head.append(f"  prog {health['prog_id']}  {health['rules']} rules  {ifaces or 'no interfaces'}")
    head.append(f"  every {args.interval:g}s  q quits", style="dim")
    t = rates.totals if rates else {}

    def r(key: str, unit: str = "pps") -> str:
        return hz.rate(t.get(key), unit)

    line = Text(
        f"in {r('packets')} {r('bytes', 'B/s')}"
        + "".join(f"   {TOTAL_LABELS.get(k, k)} {r(k)}" for k in TOP_LINE)
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
        ("LIMITED", "right"),  # issue 16: a limit rule's limited (+ banned) frames
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
            Text(limited_text(row)),
        )
    parts: list[RenderableType] = [head, line]
    if problem:
        parts.append(Text(printable(problem), style="bold red"))
    parts.append(Text(""))
    parts.append(table if ranked else Text("no rules"))
    return Group(*parts)
