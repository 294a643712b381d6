"""`xdpfw status`: health, interfaces, program and capacity, all from one GET /healthz."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from xdpfw.cli import humanize as hz
from xdpfw.cli.output import err, print_json, printable, table

if TYPE_CHECKING:
    from xdpfw.cli.client import Client, Health

__all__ = ["STATUS_EPILOG", "cmd_status", "status_text"]

STATUS_EPILOG = """Shows service health, the interfaces and their XDP mode (native/generic), the
program id, the rule count and how full each kernel table is. Exits 1 when the service is
degraded (an interface it should filter is not attached).

examples:
  xdpfw status
  xdpfw status --json | jq .capacity
  XDPFW_API=http://10.0.0.5:8000 xdpfw status
"""


def cmd_status(args: argparse.Namespace, api: Client) -> int:
    health = api.health()  # capacity included: /metrics (every rule's counters) is not read
    degraded = health["status"] != "ok"
    if args.json:
        print_json({"api": api.base_url, "health": health, "capacity": health["capacity"]})
    else:
        print(status_text(api.base_url, health))
    if degraded:
        down = [i["name"] for i in health["interfaces"] if not i["attached"]]
        why = f"not attached: {', '.join(down)}" if down else "no interface attached"
        err(
            args,
            f"service degraded ({why}); check the service log, then restart it or "
            "re-attach with POST /v1/interfaces",
        )
        return 1
    return 0


def status_text(url: str, health: Health) -> str:
    capacity = health["capacity"]
    lines = [
        printable(f"service     {health['status']}  ({url})"),
        f"program     id {health['prog_id']}"
        + ("  (adopted from a previous run)" if health["adopted"] else ""),
        f"rules       {health['rules']}",
        *_crowdsec_lines(health),
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
        lines.append(table(["INTERFACE", "ATTACHED", "XDP MODE", "PROG", "IFINDEX"], ifaces))
    else:
        lines.append("no interfaces (attach one with POST /v1/interfaces)")
    if capacity:
        order = sorted(capacity, key=lambda t: (t != "rules", t))
        rows = []
        for t in order:
            used, cap = capacity[t]["entries"], capacity[t]["capacity"]
            pct = f"{100 * used / cap:.1f}%" if cap else "-"
            rows.append([t.removeprefix("xdpfw_"), hz.count(used), hz.count(cap), pct])
        lines += ["", table(["TABLE", "USED", "CAPACITY", "USE"], rows, right=(1, 2, 3))]
    return "\n".join(lines)


def _crowdsec_lines(health: Health) -> list[str]:
    """The CrowdSec bouncer's line(s), when the service runs it."""
    cs = health.get("crowdsec")
    if not cs:
        return []
    lines = [
        printable(
            f"crowdsec    {cs['state']}  ({cs['lapi']})  last pull {cs['last_pull'] or 'none yet'}"
            f"; decisions applied {cs['applied']}, deleted {cs['deleted']}, "
            f"ignored {cs['ignored']}"
        )
    ]
    if cs["last_error"]:
        lines.append(printable(f"            {cs['last_error']}"))
    return lines
