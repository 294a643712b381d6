"""`xdpfw ban ls` / `xdpfw ban rm`: the sources rate-limit rules have banned (issue 16).

A ban is kernel state (xdpfw_bans), not a rule: a source that went over a limit rule with
`--ban` is dropped outright until the ban ends. `GET /v1/limits/banned` lists them and
`DELETE /v1/limits/banned` lifts them; these commands are their CLI.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from xdpfw.cli.output import print_json, table

if TYPE_CHECKING:
    from xdpfw.cli.client import Client

__all__ = ["BAN_LS_EPILOG", "BAN_RM_EPILOG", "cmd_ban_ls", "cmd_ban_rm"]

BAN_LS_EPILOG = """Each row is a (rule, source) pair the kernel drops outright, and the time left on
the ban. Bans end by themselves and do not survive a reload of the kernel maps.

examples:
  xdpfw ban ls
  xdpfw ban ls --json | jq -r '.bans[].source'
"""

BAN_RM_EPILOG = """The source's budget starts full again. Give --source, --rule or both; --all lifts
every ban. Prints how many bans were lifted.

examples:
  xdpfw ban rm --source 198.18.7.7
  xdpfw ban rm --rule 12
  xdpfw ban rm --all
"""


def cmd_ban_ls(args: argparse.Namespace, api: Client) -> int:
    bans = api.bans()
    if args.json:
        print_json(bans)
        return 0
    if not bans["bans"]:
        print("no bans")
        return 0
    rows = [[str(b["rule_id"]), b["source"], f"{b['expires_in']:.1f}s"] for b in bans["bans"]]
    print(table(["RULE", "SOURCE", "EXPIRES IN"], rows, right=(0, 2)))
    return 0


def cmd_ban_rm(args: argparse.Namespace, api: Client) -> int:
    from xdpfw.cli.client import EXIT_USAGE, ClientError

    if args.all == (args.source is not None or args.rule is not None):
        raise ClientError("give --source and/or --rule, or --all (not both)", EXIT_USAGE)
    n = api.unban(args.source, args.rule)["unbanned"]
    print(f"lifted {n} ban{'' if n == 1 else 's'}")
    return 0
