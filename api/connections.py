"""Connections and file descriptors: idle clients cannot starve the API of sockets.

- `GuardedH11Protocol`: uvicorn's h11 protocol plus
  * a header timeout: a connection that has not sent a complete request head within
    `header_timeout` seconds of connecting (or of its last response) is closed, so one that
    opens and sends nothing (or a byte a minute) does not hold a descriptor for ever;
  * a connection cap: when a new connection brings the count to `limit_concurrency`, the
    oldest connection still waiting for a request head is closed (nginx drains idle keep-alive
    connections the same way). The count stays under the cap, the cap under the open-file
    limit, so accept() never fails and a fresh client always gets in.
- `raise_nofile()`: the soft RLIMIT_NOFILE up to the hard limit, at start-up.
- `connection_budget()`: how many connections fit under the limit beside what is open.
- `RateLimitFilter`: a storm of one message (asyncio's "socket.accept() out of system
  resource" is logged per accept attempt, thousands a second) becomes one line a second
  with a count of the lines it stood for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

__all__ = [
    "ACCEPT_BACKLOG",
    "STORM_LOGGERS",
    "GuardedH11Protocol",
    "RateLimitFilter",
    "connection_budget",
    "open_fds",
    "raise_nofile",
]

log = logging.getLogger("xdpfw.server")

# listen(2) backlog, and so the most connections asyncio accepts in one go before the
# protocol can close an idle one: the descriptor reserve covers a few such bursts.
ACCEPT_BACKLOG = 128
# Descriptors the service needs besides its connections and what is open at start: netlink
# sockets per request, SQLite journals, the threadpool's work, bcc.
_HEADROOM = 64
# The derived connection cap never exceeds this: a control API needs no more, and each
# connection costs memory.
_MAX_DEFAULT_CONNECTIONS = 4096
# Loggers that write a line per connection or per accept attempt.
STORM_LOGGERS = ("asyncio", "uvicorn.error")


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(open("/proc/sys/fs/nr_open").read())  # noqa: SIM115
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def open_fds() -> int:
    """Descriptors open in this process now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def connection_budget(nofile: int, in_use: int, backlog: int = ACCEPT_BACKLOG) -> int:
    """Connections that fit under `nofile` beside `in_use` descriptors, the headroom and
    three accept bursts (asyncio accepts up to `backlog` sockets before a protocol runs)."""
    return max(8, min(_MAX_DEFAULT_CONNECTIONS, nofile - in_use - _HEADROOM - 3 * backlog))


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header timeout and idle-connection eviction at the cap."""

    header_timeout: float = 10.0

    @classmethod
    def configured(cls, header_timeout: float) -> type[GuardedH11Protocol]:
        return cast(
            "type[GuardedH11Protocol]",
            type(cls.__name__, (cls,), {"header_timeout": header_timeout}),
        )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.waiting_since: float | None = None  # loop time it began waiting for a head
        self._head_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: object = None

    # -- waiting for a request head --------------------------------------------------------

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self.waiting_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_waiting(self) -> None:
        self.waiting_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.waiting_since is not None:
            self._close()

    def _close(self) -> None:
        self.waiting_since = None
        if not self.transport.is_closing():
            self.transport.close()

    def _saw_new_request(self) -> bool:
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:
            self._seen_cycle = cycle
            return True
        return False

    # -- the cap ---------------------------------------------------------------------------

    def _make_room(self) -> None:
        """At the cap, close the connection that has waited longest for a request head
        (this one, if every other is busy)."""
        limit = self.limit_concurrency
        if limit is None or len(self.connections) < limit:
            return
        open_now = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_now) < limit:
            return
        idle = [
            c for c in open_now
            if isinstance(c, GuardedH11Protocol) and c.waiting_since is not None
        ]  # fmt: skip
        for victim in sorted(idle, key=lambda c: cast(float, c.waiting_since))[
            : len(open_now) - limit + 1
        ]:
            victim._close()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_head()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._saw_new_request():
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            self._stop_waiting()
        elif not self._saw_new_request():  # not a pipelined request that started at once
            self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)


class RateLimitFilter(logging.Filter):
    """At most one record per message (its first line) and logger per `interval` seconds.

    The first record of a burst passes as it is; the next one to pass carries the number it
    stood for and the exception text instead of another traceback.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last passed, held)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            head = record.getMessage().split("\n", 1)[0]
        except Exception:  # a record that cannot format: let the handler report it
            return True
        key = (record.name, head)
        now = time.monotonic()
        with self._lock:
            last, held = self._state.get(key, (-1e9, 0))
            if now - last < self.interval:
                self._state[key] = (last, held + 1)
                return False
            if len(self._state) > 256:
                self._state.clear()
            self._state[key] = (now, 0)
        if held:
            exc = record.exc_info[1] if record.exc_info else None
            note = f" ({held} more like this in the last {now - last:.1f} s, not logged)"
            record.msg = head + (f": {exc}" if exc is not None else "") + note
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True
