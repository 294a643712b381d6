"""The attachment watchdog: every wanted interface runs our program again within 2 s.

An interface that loses the program (`ip link set dev X xdp off` behind the service's back,
the interface deleted and created again, a driver reset) is re-attached on the next link
notification (netlink RTMGRP_LINK, xdpfw.kernel.netlink.LinkMonitor) or, should one be
missed, on the periodic check (`interval`, 1 s). Each repair is logged and counted
(`FirewallService.reattach_counts`, the metric xdpfw_reattach_total{interface}). A program
xdpfw did not attach found on the interface is never replaced: the interface stays degraded
(/healthz 503) and the reason is logged, once per change.
"""

from __future__ import annotations

import logging
import threading
import time

from api.service import FirewallService
from xdpfw.errors import ForeignProgram, InterfaceNotFound, XdpfwError
from xdpfw.kernel import netlink

__all__ = ["Watchdog"]

log = logging.getLogger("xdpfw.watchdog")


class Watchdog:
    """A thread that keeps the service's wanted interfaces attached (start / stop)."""

    def __init__(self, svc: FirewallService, interval: float = 1.0) -> None:
        self.svc = svc
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problem: dict[str, str] = {}  # interface -> the last reason it is not attached

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xdpfw-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        monitor: netlink.LinkMonitor | None = None
        try:
            monitor = netlink.LinkMonitor()
        except netlink.NetlinkOpError as exc:
            log.warning("no link notifications (%s): checking every %.1f s", exc, self.interval)
        try:
            next_check = 0.0
            while not self._stop.is_set():
                self.svc.watchdog_beat()
                wanted = self.svc.wanted_interfaces()
                now = time.monotonic()
                due = now >= next_check
                if not due and monitor is not None:
                    try:
                        events = monitor.wait(min(0.25, next_check - now))
                    except netlink.NetlinkOpError as exc:
                        log.warning("link notifications stopped (%s): checking every %.1f s",
                                    exc, self.interval)
                        monitor.close()
                        monitor = None
                        continue
                    due = any(ev.event == "lost" or ev.ifname in wanted for ev in events)
                elif not due:
                    self._stop.wait(min(0.25, next_check - now))
                    continue
                if due:
                    self.check(wanted)
                    next_check = time.monotonic() + self.interval
        finally:
            if monitor is not None:
                monitor.close()

    def check(self, wanted: dict[str, str] | None = None) -> None:
        """Re-attach every wanted interface that does not run our program now."""
        if wanted is None:
            wanted = self.svc.wanted_interfaces()
        if not wanted:
            return
        try:
            attached = {a.ifname for a in self.svc.attachments()}
        except XdpfwError as exc:
            log.warning("cannot list XDP attachments: %s", exc)
            return
        for name in wanted:
            if name in attached:
                self._problem.pop(name, None)
                continue
            try:
                att = self.svc.reattach(name)
            except (ForeignProgram, InterfaceNotFound) as exc:
                self._note(name, str(exc))
                continue
            except XdpfwError as exc:
                self._note(name, f"re-attaching failed: {exc}")
                continue
            if att is None:
                continue
            self._problem.pop(name, None)
            log.warning(
                "re-attached to %s (%s, prog id %d): the program had gone from it (repair %d)",
                name, att.mode, att.prog_id, self.svc.reattach_counts().get(name, 0),
            )

    def _note(self, name: str, reason: str) -> None:
        if self._problem.get(name) != reason:
            self._problem[name] = reason
            log.error("%s is not filtered: %s", name, reason)
