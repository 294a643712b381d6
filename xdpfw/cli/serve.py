"""`xdpfw serve` (start the service) and `xdpfw detach` (work on the pins directly).

The one module of the CLI that may import `api`, and only inside cmd_serve, so that client
commands never load the service (fastapi, bcc, pyroute2); tests/test_layers.py checks it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from xdpfw.errors import XdpfwError

__all__ = ["DETACH_EPILOG", "SERVE_EPILOG", "cmd_detach", "cmd_serve"]

SERVE_EPILOG = """examples:
  xdpfw serve --iface eth1                      # filter eth1, API on 127.0.0.1:8000
  xdpfw serve --iface eth1 --iface eth2 --xdp-mode generic
  xdpfw serve                                   # no interface: a demo namespace lab
  XDPFW_TOKEN=... xdpfw serve --iface eth1 --listen 0.0.0.0:8000

Every flag also has an XDPFW_* environment variable (XDPFW_IFACE=eth1,eth2, XDPFW_LISTEN,
XDPFW_STATE_DIR, XDPFW_BPFFS_DIR, XDPFW_XDP_MODE, XDPFW_TOKEN, XDPFW_MAX_RULES, ...).

CrowdSec (a bouncer inside the service; README "CrowdSec"):
  cscli bouncers add xdpfw -o raw > /etc/xdpfw/crowdsec.key && chmod 600 /etc/xdpfw/crowdsec.key
  xdpfw serve --iface eth1 --crowdsec-lapi http://127.0.0.1:8080 \\
      --crowdsec-key-file /etc/xdpfw/crowdsec.key --crowdsec-interval 10s
"""


DETACH_EPILOG = """examples:
  xdpfw detach eth1                    # stop filtering eth1, keep the pins
  xdpfw detach --cleanup               # detach everywhere, remove /sys/fs/bpf/xdpfw
  xdpfw detach --cleanup --bpffs-dir /sys/fs/bpf/xdpfw-demo
  xdpfw detach --cleanup --state-dir /var/lib/xdpfw   # pins lost: the database's interfaces
"""


def cmd_detach(args: argparse.Namespace) -> int:
    from xdpfw.datapath import PROG_PIN, Datapath, DatapathConfig
    from xdpfw.errors import XdpfwError

    pin_dir = args.bpffs_dir or Path(os.environ.get("XDPFW_BPFFS_DIR", "/sys/fs/bpf/xdpfw"))
    if not (pin_dir / PROG_PIN).exists():
        if args.cleanup:
            return _cleanup_orphans(args, pin_dir, [], pinned=False)
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
            return _cleanup_orphans(args, pin_dir, names, pinned=True)
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


def _cleanup_orphans(
    args: argparse.Namespace, pin_dir: Path, names: list[str], pinned: bool
) -> int:
    """The rest of `detach --cleanup`: an xdpfw program whose pins were removed (no pin on
    any bpffs names it) is detached too, from the interfaces given, else those the
    service's database names, else (when nothing was pinned) every interface. Programs
    another instance has pinned and foreign programs are never touched."""
    from xdpfw.datapath.recover import Unrecognisable, detach_orphans
    from xdpfw.errors import XdpfwError
    from xdpfw.kernel import netlink

    where = list(args.iface) or _database_interfaces(args)
    if not where and not pinned:  # nothing to go by: look everywhere
        where = netlink.link_list()
    unknown: list[Unrecognisable] = []
    try:
        orphans = detach_orphans(where, pin_dir, unknown)
    except XdpfwError as exc:
        print(f"xdpfw detach: {exc}", file=sys.stderr)
        return 1
    for left in unknown:
        print(f"xdpfw detach: left alone: {left}", file=sys.stderr)
    names += [f"{name} (program id {prog_id}, whose pins were gone)" for name, prog_id in orphans]
    removed = f"removed {pin_dir}" if pinned else f"nothing was pinned under {pin_dir}"
    print(f"detached from {', '.join(names) or 'no interface'}; {removed}")
    return 1 if unknown else 0


def _database_interfaces(args: argparse.Namespace) -> list[str]:
    """The interfaces table of the service's database, [] when there is none."""
    import sqlite3

    state = args.state_dir or Path(os.environ.get("XDPFW_STATE_DIR", "/var/lib/xdpfw"))
    db = state / "rules.sqlite3"
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return [str(row[0]) for row in con.execute("SELECT name FROM interfaces")]
        finally:
            con.close()
    except sqlite3.Error:
        return []


def _fleet_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The fleet flags given (docs/fleet.md); absent ones come from XDPFW_* or defaults."""
    return {
        "etcd": getattr(args, "etcd", None),
        "node": getattr(args, "node", None),
        "node_labels": getattr(args, "node_label", None),
        "etcd_prefix": getattr(args, "etcd_prefix", None),
        "etcd_ca": getattr(args, "etcd_ca", None),
        "etcd_cert": getattr(args, "etcd_cert", None),
        "etcd_key": getattr(args, "etcd_key", None),
    }



def _ops_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of issue 15 (config file, listeners, logs) as settings overrides."""
    listen = getattr(args, "listen", None)
    return {
        "config": getattr(args, "config", None),
        "listen": ",".join(listen) if isinstance(listen, list) else listen,
        "log_format": getattr(args, "log_format", None),
        "log_level": getattr(args, "log_level", None),
        "access_log": True if getattr(args, "access_log", False) else None,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from api.server import serve
    from api.settings import ConfigError, get_settings

    demo = False
    ops = _ops_flags(args)
    try:
        settings = get_settings(
            **ops,
            iface=args.iface or None,
            xdp_mode=args.xdp_mode,
            state_dir=args.state_dir,
            bpffs_dir=args.bpffs_dir,
            max_rules=args.max_rules,
            max_prefixes=args.max_prefixes,
            max_sets=args.max_sets,
            protect=args.protect or None,
            **_crowdsec_flags(args),
            sample_max_pps=args.sample_max_pps,
            sample_snaplen=args.snaplen,
            **_fleet_flags(args),
        )
        if not settings.iface and not args.no_demo:
            from api.store import Store

            db = settings.db_file
            known: dict[str, str] = {}
            if db.exists():
                try:
                    store = Store(db)
                except XdpfwError as exc:  # a full disk or a corrupt file: say so, no trace
                    print(f"xdpfw serve: {exc}", file=sys.stderr)
                    return 1
                known = store.interfaces()
                store.close()
            if not known:
                demo = True
                settings = get_settings(
                    **ops,
                    iface=[],
                    xdp_mode=args.xdp_mode,
                    state_dir=args.state_dir or Path("/run/xdpfw-demo"),
                    bpffs_dir=args.bpffs_dir or Path("/sys/fs/bpf/xdpfw-demo"),
                    max_rules=args.max_rules or 65536,
                    max_prefixes=args.max_prefixes or 16384,
                    max_sets=args.max_sets or 1024,
                    protect=args.protect or None,
                    **_crowdsec_flags(args),
                    sample_max_pps=args.sample_max_pps,
                    sample_snaplen=args.snaplen,
                )
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"xdpfw serve: {line}", file=sys.stderr)
        return 2
    return serve(settings, demo=demo, cleanup=args.cleanup)


def _crowdsec_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The CrowdSec bouncer's flags as settings (None: the XDPFW_CROWDSEC_* variable or the
    default)."""
    return {
        "crowdsec_lapi": args.crowdsec_lapi,
        "crowdsec_key_file": args.crowdsec_key_file,
        "crowdsec_interval": args.crowdsec_interval,
        "crowdsec_resync": args.crowdsec_resync,
    }
