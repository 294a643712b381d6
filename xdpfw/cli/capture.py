"""`xdpfw capture`: sampled frames from /v1/events, written as pcapng (or printed as JSON).

The pcapng is written here, on the client (xdpfw/xray/pcapng.py), from the stream's events:
one interface block per interface the stream's hello names (more as frames from others
arrive), one packet block per sample with "xdpfw rule ID VERDICT" as its comment. `-w -`
writes to standard output, flushed packet by packet, for `| tcpdump -r -` or `| tshark -r -`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from xdpfw.cli.output import err
from xdpfw.xray.pcapng import PcapngWriter
from xdpfw.xray.record import Sample

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = ["CAPTURE_EPILOG", "add_capture_parser", "cmd_capture"]

CAPTURE_EPILOG = """Only rules that carry a sample setting are sampled: give one with --sample-rule
(or `"sample": {"every": N}` in the rule's JSON). The service caps sampled frames per second
(--sample-max-pps of `xdpfw serve`); what the cap, a full ring or a slow reader lost is
counted in `xdpfw stats` and /metrics. Stops after -c frames, --seconds, or Ctrl-C.

examples:
  xdpfw capture --rule 12 --sample-rule 12 -c 100 -w drops.pcapng
  xdpfw capture --verdict drop --seconds 30 -w - | tcpdump -nr -
  xdpfw capture --source crowdsec --json | jq .rule
  tshark -r drops.pcapng -T fields -e frame.comment
"""


def add_capture_parser(
    p: argparse.ArgumentParser,
    positive_int: Callable[[str], int],
    positive_float: Callable[[str], float],
) -> None:
    p.add_argument("--rule", type=positive_int, action="append", metavar="ID",
                   help="only this rule's frames (repeatable)")
    p.add_argument("--source", metavar="NAME", help="only frames of rules held by this source")
    p.add_argument("--verdict", choices=["drop", "pass", "monitor", "limited"],
                   help="only frames with this verdict")
    p.add_argument("-c", "--count", type=positive_int, metavar="N", help="stop after N frames")
    p.add_argument("--seconds", type=positive_float, metavar="S", help="stop after S seconds")
    p.add_argument("-w", "--write", metavar="FILE|-", help="pcapng file; - is standard output")
    p.add_argument("--json", action="store_true", help="print one JSON event per line instead")
    p.add_argument("--sample-rule", type=positive_int, action="append", metavar="ID",
                   help="turn sampling on for this rule first (1 in --every; it stays on)")
    p.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="with --sample-rule: sample 1 in N frames (default 1)")


def cmd_capture(args: argparse.Namespace, api: Client) -> int:
    if not args.json and not args.write:
        err(args, "say where the frames go: -w FILE.pcapng, -w - (standard output), or --json")
        return 2
    if args.json and args.write == "-":
        err(args, "--json and -w - both write to standard output: pick one (or -w FILE)")
        return 2
    for rid in args.sample_rule or ():
        api.set_sample(rid, args.every)
    params: dict[str, str | int | list[int]] = {}
    if args.rule:
        params["rule"] = list(args.rule)
    if args.source:
        params["source"] = args.source
    if args.verdict:
        params["verdict"] = args.verdict
    out: BinaryIO | None = None
    close = False
    if args.write == "-":
        out = sys.stdout.buffer
    elif args.write:
        try:
            out = Path(args.write).open("wb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            err(args, f"cannot write {args.write}: {exc.strerror}")
            return 1
        close = True
    try:
        n = _capture(args, api, params, out)
    except KeyboardInterrupt:
        n = -1
    except BrokenPipeError:  # the reader (tcpdump -c, head) is done
        return 0
    finally:
        if close and out is not None:
            out.close()
    if args.write and args.write != "-" and n >= 0:
        print(f"{n} frame(s) written to {args.write}", file=sys.stderr)
    return 0


def _capture(
    args: argparse.Namespace, api: Client, params: dict[str, Any], out: BinaryIO | None
) -> int:
    deadline = time.monotonic() + args.seconds if args.seconds else None
    writer: PcapngWriter | None = None
    n = 0
    if args.count is not None and n >= args.count:
        return n
    for event, data in api.events(params):
        if deadline is not None and time.monotonic() >= deadline:
            break
        if event == "hello":
            if out is not None:
                writer = PcapngWriter(out, int(data.get("snaplen") or 0))
                for itf in data.get("interfaces") or []:
                    writer.interface(int(itf["ifindex"]), str(itf["name"]))
            continue
        if event != "sample":
            continue
        if args.json:
            print(json.dumps(data, separators=(",", ":")), flush=True)
        if writer is not None:
            writer.write(Sample.from_event(data))
        n += 1
        if args.count is not None and n >= args.count:
            break
    return n
