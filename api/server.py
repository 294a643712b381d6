"""`xdpfw serve`: open (or adopt) the datapath, reconcile with the database, serve the API.

On SIGTERM/SIGINT the API stops and the program and pins stay: the kernel keeps filtering
while the service is down, and the next start adopts them without a traffic gap.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from api.connections import (
    ACCEPT_BACKLOG,
    STORM_LOGGERS,
    GuardedH11Protocol,
    RateLimitFilter,
    connection_budget,
    open_fds,
    raise_nofile,
)
from api.settings import MIN_TOKEN_CHARS, Settings
from xdpfw.compiler import Capacities
from xdpfw.errors import InterfaceNotFound, XdpfwError
from xdpfw.lab import VethLab

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from api.crowdsec import CrowdsecBouncer
    from api.fleet.agent import FleetAgent
    from api.service import FirewallService
    from api.store import Store

__all__ = ["ServeError", "load_read_token", "load_token", "serve"]

log = logging.getLogger("xdpfw.server")


class ServeError(Exception):
    """The service cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class _TokenFile:
    """How one kind of token file is read, refused and generated."""

    name: str  # "token", "read token": "the {name} in {path}"
    what: str  # in messages: "the API token", "the read token"
    env: str  # the variable that overrides the file
    mode: int  # the mode a generated file gets
    refused: int  # permission bits that make an existing file unsafe
    unsafe: str  # why those bits are refused, and the fix ({path}, {mode})
    empty: str  # what to do with an empty file ({path})


_API_TOKEN = _TokenFile(
    "token", "the API token", "XDPFW_TOKEN", 0o600, 0o077,
    "token file {path} is accessible by group or others (mode {mode:04o}); anyone who reads "
    "it controls the firewall. Run: chmod 600 {path}",
    "token file {path} is empty; write a token into it (at least {min} characters, e.g. "
    "`openssl rand -hex 32 > {path}`) or delete it to have one generated on a loopback listener",
)
_READ_TOKEN = _TokenFile(
    "read token", "the read token", "XDPFW_READ_TOKEN", 0o640, 0o027,
    "read token file {path} is accessible by others or writable by its group (mode "
    "{mode:04o}); Run: chmod 640 {path}",
    "read token file {path} is empty; delete it to have one generated, or write a token of at "
    "least {min} characters into it",
)


def load_token(settings: Settings) -> str:
    """XDPFW_TOKEN, else <state-dir>/token, generated (0600) on first start on loopback.

    Off loopback the token needs MIN_TOKEN_CHARS characters. A token file readable or
    writable by group or others is refused (as ssh refuses such keys), and so is an empty one.
    """
    if settings.token:
        return _long_enough(settings, settings.token, "XDPFW_TOKEN")
    path = settings.token_file
    if path.exists():
        return _read_token_file(settings, path, _API_TOKEN)
    if not settings.loopback_only:
        raise ServeError(
            f"refusing to listen on {settings.listen} (not loopback) without a token: set "
            f"XDPFW_TOKEN or create {path} (mode 0600) first"
        )
    token = _generate(settings, path, _API_TOKEN)
    log.info("generated an API token in %s", path)
    return token


def load_read_token(settings: Settings) -> str:
    """XDPFW_READ_TOKEN, else <state-dir>/read-token, generated (0640) at the first start.

    The read token may read (GET, /metrics) and change nothing: give it to Prometheus and
    dashboards. Its file may be group-readable (chgrp it to the group that needs it), not
    world-accessible."""
    if settings.read_token:
        return _long_enough(settings, settings.read_token, "XDPFW_READ_TOKEN")
    path = settings.read_token_file
    if path.exists():
        return _read_token_file(settings, path, _READ_TOKEN)
    token = _generate(settings, path, _READ_TOKEN)
    log.info("generated a read-only API token in %s", path)
    return token


def _read_token_file(settings: Settings, path: Path, kind: _TokenFile) -> str:
    """The token in an existing file, refused when the file is unsafe, empty or too short."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & kind.refused:
        raise ServeError(kind.unsafe.format(path=path, mode=mode))
    token = path.read_text().strip()
    if not token:
        raise ServeError(kind.empty.format(path=path, min=MIN_TOKEN_CHARS))
    return _long_enough(settings, token, f"the {kind.name} in {path}")


def _generate(settings: Settings, path: Path, kind: _TokenFile) -> str:
    """A new random token written to `path` (created, never overwritten) with the kind's mode."""
    mode, what, env = kind.mode, kind.what, kind.env
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    while token.startswith("-"):  # `--token -abc` would read as an option on a command line
        token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    except OSError as exc:  # ENOSPC: leave no empty token file behind
        path.unlink(missing_ok=True)
        raise ServeError(
            f"cannot write {what} to {path}: {exc.strerror}; free space in "
            f"{settings.state_dir} (or set {env}) and start again"
        ) from exc
    return token


def _long_enough(settings: Settings, token: str, source: str) -> str:
    if not settings.loopback_only and len(token) < MIN_TOKEN_CHARS:
        raise ServeError(
            f"{source} has {len(token)} character(s); listening on {settings.listen} (not "
            f"loopback) needs a token of at least {MIN_TOKEN_CHARS} characters that nobody "
            "can guess (e.g. `openssl rand -hex 32`)"
        )
    return token


def serve(settings: Settings, *, demo: bool = False, cleanup: bool = False) -> int:
    """Run the service until SIGTERM/SIGINT. Returns the process exit code."""

    from api import logs
    from api.app import create_app
    from api.service import FirewallService
    from api.store import Store
    from api.watchdog import Watchdog
    from xdpfw.datapath import Datapath, DatapathConfig

    logs.configure(settings)
    # A bulk load is one CPU-bound thread; /healthz and the event loop wait for the GIL at
    # each switch: 1 ms instead of the default 5 ms keeps a probe's answer in milliseconds.
    sys.setswitchinterval(0.001)
    before, after = raise_nofile()
    if after != before:
        log.info("raised the open file limit (RLIMIT_NOFILE) from %d to %d", before, after)
    from xdpfw.kernel import privileges

    report = privileges.check()
    for level, line in privileges.report_lines(report):
        log.log(level, "%s", line)
    try:
        token = load_token(settings)
        read_token = load_read_token(settings)
        if secrets.compare_digest(token.encode(), read_token.encode()):
            raise ServeError("the read token equals the admin token; give them different values")
    except (ServeError, OSError) as exc:
        print(f"xdpfw serve: {exc}", file=sys.stderr)
        return 2
    # -- CrowdSec bouncer: its key is read before anything is loaded (a typo fails fast) ---
    crowdsec_key: str | None = None
    if settings.crowdsec_lapi is not None and settings.crowdsec_key_file is not None:
        from api.crowdsec import KeyFileError, read_key_file

        try:
            crowdsec_key = read_key_file(settings.crowdsec_key_file)
        except KeyFileError as exc:
            print(f"xdpfw serve: {exc}", file=sys.stderr)
            return 2
    with ExitStack() as stack:
        lab_note = ""
        if demo:
            lab_note = stack.enter_context(_demo_lab(settings))
        caps = Capacities(settings.max_rules, settings.max_prefixes, settings.max_sets,
                          settings.max_tbl8_groups)
        try:
            # A full disk, a garbage file or a foreign schema: say so and exit; the pinned
            # program keeps filtering (nothing is detached or unpinned: cleanup is off).
            store = Store(settings.db_file)
        except XdpfwError as exc:
            print(f"xdpfw serve: {exc}", file=sys.stderr)
            return 1
        stack.callback(store.close)
        # Where a running program whose pins were removed may be found (and adopted).
        look_in = (*store.interfaces(), *settings.iface)
        try:
            dp = Datapath.open(
                DatapathConfig(bpffs_dir=settings.bpffs_dir, caps=caps, interfaces=look_in)
            )
        except XdpfwError as exc:
            print(f"xdpfw serve: {exc}", file=sys.stderr)
            return 1
        if dp.repinned:
            log.warning(
                "nothing was pinned under %s, but xdpfw program id %d runs on %s: re-pinned "
                "and adopted it (no gap in filtering)",
                settings.bpffs_dir, dp.prog_id, ", ".join(dp.repinned),
            )
        cleanup = cleanup or demo
        stack.callback(dp.close, cleanup=cleanup)
        if demo:
            stack.callback(_forget_interfaces, store)  # the lab goes away with the demo
        api_listen = (settings.host, settings.port) if settings.protect_api else None
        fleet_protect: list[str] = []
        if settings.etcd:  # the fleet's protected prefixes as cached: kept by the reconcile
            from api.fleet.agent import cached_protected

            fleet_protect = cached_protected(store)
        svc = FirewallService(dp, store, settings.protect, api_listen, fleet_protect)
        if not settings.protect_api:
            log.warning(
                "XDPFW_PROTECT_API=false: drop rules may cut off the API on %s; keep a way "
                "in that does not cross the filtered interfaces", settings.listen
            )
        if not settings.protect:
            log.warning(
                "no protected prefixes (--protect CIDR): nothing stops a drop rule from locking "
                "you out of this host; protect your management network"
            )
        try:
            summary = svc.reconcile()
            svc.forget_loopback()  # never filter lo, whatever an earlier version did
            svc.expire_due()
            stored = dict(store.interfaces())
            if demo and stored:  # the lab of an earlier demo is gone; this one is new
                with store.transaction():
                    for name in stored:
                        store.drop_interface(name)
                stored = {}
            wanted = stored | {name: settings.xdp_mode for name in settings.iface}
            for name, mode in wanted.items():
                try:
                    att = svc.attach(name, mode)
                except InterfaceNotFound:
                    if name in settings.iface:
                        raise  # asked for on this command line: a real error
                    # Attached earlier through the API, gone now (an unplugged NIC, a removed
                    # veth): keep serving the other interfaces; /healthz reports it degraded.
                    log.error("interface %s (attached earlier) does not exist now", name)
                    continue
                log.info("attached to %s (%s, prog id %d)", name, att.mode, att.prog_id)
        except XdpfwError as exc:
            print(f"xdpfw serve: {exc}", file=sys.stderr)
            return 1
        log.info(
            "%s program id %d with %d rules (reconcile: %s)",
            "adopted" if dp.adopted else "loaded",
            dp.prog_id,
            len(dp.compiler),
            summary,
        )
        if not wanted:
            log.warning("attached to no interface: add one with POST /v1/interfaces")
        try:  # X-ray: the cap and the stored sample settings, then the ring's reader
            svc.start_xray(settings.sample_max_pps, settings.sample_snaplen)
            stack.callback(svc.stop_xray)
        except XdpfwError as exc:
            print(f"xdpfw serve: {exc}", file=sys.stderr)
            return 1
        svc.start_sweeper(settings.ttl_interval)
        stack.callback(svc.stop)
        watchdog = Watchdog(svc)
        watchdog.start()
        stack.callback(watchdog.stop)
        fleet = _start_fleet(settings, svc)  # fleet mode (docs/fleet.md); None: one host
        if fleet is not None:
            stack.callback(fleet.stop)
        app = create_app(settings, svc, token, read_token, fleet)
        if crowdsec_key is not None:
            app.state.crowdsec = _start_crowdsec(stack, settings, svc, crowdsec_key)
        if lab_note:
            print(lab_note, flush=True)
        config = _uvicorn_config(settings, app)
        server = _notifying_server()(config)
        sockets = [config.bind_socket()]
        if settings.socket is not None:
            from api.localsock import SocketError, bind_unix

            try:
                sockets.append(bind_unix(settings.socket, settings.socket_group, ACCEPT_BACKLOG))
            except SocketError as exc:
                print(f"xdpfw serve: {exc}", file=sys.stderr)
                return 1
            stack.callback(settings.socket.unlink, missing_ok=True)
            log.info("API also on unix:%s (group %s, mode 0660; no token)", settings.socket,
                     settings.socket_group)  # fmt: skip
        stack.callback(_close_all, sockets)
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; turn that into an
        # exception so the ExitStack above unwinds (sweeper, database, demo lab) instead of
        # the default action killing the process mid-cleanup.
        previous = {sig: signal.signal(sig, _raise_stop) for sig in _STOP_SIGNALS}
        try:
            server.run(sockets=sockets)
        except _Stop:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if cleanup:
            log.info("stopped; detaching and removing the program and its pins")
        else:
            log.info("stopped; the program stays attached and filtering (pins in %s)",
                     settings.bpffs_dir)
        return 0 if server.started else 1
    return 0


def _start_fleet(settings: Settings, svc: FirewallService) -> FleetAgent | None:
    """With --etcd: the agent that watches etcd and applies it here (it starts from the
    local cache and the pins whether or not etcd answers)."""
    if not settings.etcd:
        return None
    from api.fleet.agent import FleetAgent, FleetConfig

    node = settings.node or socket.gethostname().split(".")[0].lower()
    agent = FleetAgent(FleetConfig(
        endpoints=settings.etcd, node=node, prefix=settings.etcd_prefix,
        labels=settings.node_labels, ca=settings.etcd_ca, cert=settings.etcd_cert,
        key=settings.etcd_key,
    ), svc)
    agent.start()
    log.info("fleet mode: node %s, etcd %s, prefix %s, resuming from revision %d", node,
             ",".join(settings.etcd), settings.etcd_prefix, agent.applied)
    return agent


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _notifying_server() -> type[uvicorn.Server]:
    import uvicorn

    from api.notify import notify

    class NotifyingServer(uvicorn.Server):
        """uvicorn telling systemd READY=1 once serving (the program is attached by then)
        and STOPPING=1 when it begins to stop (api/notify.py)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                notify("READY=1\nSTATUS=filtering; API serving")

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            notify("STOPPING=1")
            await super().shutdown(sockets)

    return NotifyingServer


def _NotifyingServer(config: uvicorn.Config) -> uvicorn.Server:
    return _notifying_server()(config)


def _uvicorn_config(settings: Settings, app: FastAPI) -> uvicorn.Config:
    """uvicorn with the connection limits of docs/guarantees.md ("Connections and file
    descriptors"), and per-attempt log storms cut to a line a second."""
    import uvicorn

    from api.localsock import peer_aware

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    in_use = open_fds()
    budget = connection_budget(nofile, in_use)
    limit = settings.limit_concurrency or budget
    if limit > budget:
        log.warning(
            "limit_concurrency %d exceeds what fits under the open file limit %d (%d open, "
            "about %d connections fit): raise LimitNOFILE / ulimit -n, or lower it",
            limit, nofile, in_use, budget,
        )  # fmt: skip
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # api/logs.py formats every line, uvicorn's included
        access_log=settings.access_log,
        http=peer_aware(GuardedH11Protocol.configured(settings.header_timeout)),
        limit_concurrency=limit,
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
        backlog=ACCEPT_BACKLOG,
    )
    storm = RateLimitFilter(1.0)
    for name in STORM_LOGGERS:  # after uvicorn.Config, which (re)configures its loggers
        logging.getLogger(name).addFilter(storm)
    log.info(
        "connections: at most %d (open file limit %d, %d open); request heads within %g s, "
        "idle keep-alive %g s",
        limit, nofile, in_use, settings.header_timeout, settings.keep_alive_timeout,
    )  # fmt: skip
    return config


def _start_crowdsec(
    stack: ExitStack, settings: Settings, svc: FirewallService, key: str
) -> CrowdsecBouncer:
    """The CrowdSec bouncer thread (api/crowdsec.py), stopped when the service stops."""
    from api.crowdsec import CrowdsecBouncer, LapiClient

    assert settings.crowdsec_lapi is not None
    client = LapiClient(settings.crowdsec_lapi, key)
    bouncer = CrowdsecBouncer(
        svc, client, interval=settings.crowdsec_interval, resync=settings.crowdsec_resync
    )
    bouncer.start()
    stack.callback(bouncer.stop)
    return bouncer


def _forget_interfaces(store: Store) -> None:
    try:
        with store.transaction():
            for name in store.interfaces():
                store.drop_interface(name)
    except XdpfwError as exc:  # a full disk at exit: the next demo forgets them at start
        log.error("could not forget the demo's interfaces: %s", exc)


class _Stop(Exception):
    pass


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


@contextmanager
def _demo_lab(settings: Settings) -> Iterator[str]:
    """A namespace with a veth pair to filter, so a first run touches no real NIC."""
    from xdpfw import lab

    stale = lab.cleanup_stale("xfw-demo")
    if stale:
        log.info("removed a stale demo lab: %s", ", ".join(stale))
    with lab.veth_lab(prefix="xfw-demo") as vl:
        settings.iface[:] = [vl.host_if]
        yield _demo_text(settings, vl)


def _demo_text(settings: Settings, vl: VethLab) -> str:
    """The walk-through the demo prints; tests/test_readme.py runs each line as printed.

    The lines need root (`ip netns exec`, the token file): they say `sudo` only when the demo
    itself was started through sudo or without root, so a root shell with no sudo can paste
    them as they are.
    """
    sudo = "sudo " if os.environ.get("SUDO_USER") or os.geteuid() != 0 else ""
    ns = vl.netns
    host_ip = vl.host_ip4
    peer_ip = vl.peer_ip4
    api = f"http://{settings.listen}"
    token = Path(settings.token_file)
    return f"""
xdpfw demo lab: namespace {ns} ({peer_ip}) talks to {vl.host_if} ({host_ip}),
where the XDP program is attached. In another terminal:

  {sudo}ip netns exec {ns} ping -c 3 {host_ip}          # passes
  TOKEN=$({sudo}cat {token})
  curl -sS --fail-with-body -H "Authorization: Bearer $TOKEN" \\
       -H 'content-type: application/json' -d '{{"src": "{peer_ip}"}}' {api}/v1/rules
  {sudo}ip netns exec {ns} ping -c 3 -W 1 {host_ip}     # dropped by XDP
  curl -sS --fail-with-body {api}/v1/stats             # the drop counters

Ctrl-C stops the demo and removes the lab, the program and its pins.
"""
