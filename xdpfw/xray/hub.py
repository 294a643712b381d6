"""The service side of X-ray: one thread reads the sample ring and hands each sample to every
subscriber whose filter it passes (the SSE streams of /v1/events).

The ring is always drained (a sample nobody listens to is dropped here, not left to fill the
ring and be counted as lost in the kernel). Each subscriber has a bounded queue; a subscriber
too slow to keep up loses the samples that do not fit, counted in `lost_client` (and in its own
`lost`, which its stream reports), so one slow client never holds the others back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from xdpfw.xray.record import Sample, decode, wall_offset_ns

__all__ = ["SOURCES_TTL", "Filter", "Hub", "SampleSource", "Subscriber"]

SOURCES_TTL = 5.0

log = logging.getLogger("xdpfw.xray")


class SampleSource(Protocol):
    """A ring buffer reader (xdpfw.kernel.ringbuf.RingBuffer, or the tests' stand-in)."""

    def wait(self, timeout: float) -> bool: ...

    def drain(self, handle: Callable[[bytes], None], limit: int = ...) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Filter:
    """Which samples a subscriber wants; None = any. `rules` are rule ids (a source's rules
    are resolved to ids when the stream starts and again as they change: `sources_of`)."""

    rules: frozenset[int] | None = None
    verdict: str | None = None
    source: str | None = None

    def matches(self, s: Sample, sources_of: Callable[[int], Iterable[str]]) -> bool:
        if self.rules is not None and s.rule not in self.rules:
            return False
        if self.verdict is not None and s.verdict != self.verdict:
            return False
        return self.source is None or self.source in sources_of(s.rule)


@dataclass(eq=False)
class Subscriber:
    """One stream's queue, fed from the hub's thread, read on the stream's event loop."""

    want: Filter
    loop: asyncio.AbstractEventLoop
    size: int = 4096
    queue: asyncio.Queue[Sample] = field(init=False)
    lost: int = 0

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.size)

    def offer(self, s: Sample) -> bool:
        """From the hub's thread: queue s, or count it lost when the queue is full."""
        if self.queue.qsize() >= self.size:
            self.lost += 1
            return False
        self.loop.call_soon_threadsafe(self._put, s)
        return True

    def _put(self, s: Sample) -> None:
        try:
            self.queue.put_nowait(s)
        except asyncio.QueueFull:
            self.lost += 1


class Hub:
    """Reads a SampleSource in a thread and fans samples out to subscribers."""

    def __init__(
        self,
        open_source: Callable[[], SampleSource],
        sources_of: Callable[[int], Iterable[str]] = lambda _rule: (),
        poll: float = 0.2,
    ) -> None:
        self._open = open_source
        self.sources_of = sources_of
        self._poll = poll
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._names: dict[int, str] = {}
        self._held: dict[int, tuple[float, frozenset[str]]] = {}  # rule -> (when, sources)
        self._offset = wall_offset_ns()
        self.received = 0  # samples read from the ring
        self.delivered = 0  # queued to a subscriber (one sample, several subscribers: several)
        self.lost_client = 0  # did not fit a slow subscriber's queue
        self.bad = 0  # records that did not decode

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> None:
        source = self._open()  # fails here, at start-up, not in the thread
        self._thread = threading.Thread(target=self._run, args=(source,), name="xdpfw-xray",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, source: SampleSource) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if source.wait(self._poll):
                        self._offset = wall_offset_ns()  # follows wall clock steps (NTP)
                        source.drain(self._handle)
                except Exception:  # keep reading: a bad record must not end the stream
                    log.exception("reading the sample ring failed")
                    self._stop.wait(1.0)
        finally:
            source.close()

    # -- fan-out ---------------------------------------------------------------------------

    def ifname(self, ifindex: int) -> str:
        name = self._names.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                name = ""
            self._names[ifindex] = name
        return name

    def _handle(self, raw: bytes) -> None:
        try:
            s = decode(raw, self._offset)
        except ValueError:
            self.bad += 1
            return
        self.received += 1
        with self._lock:
            subs = list(self._subs)
        if not subs:
            return
        s = Sample(s.rule, s.verdict, s.ifindex, s.time_ns, s.length, s.data,
                   self.ifname(s.ifindex))
        for sub in subs:
            if sub.want.matches(s, self._sources):
                if sub.offer(s):
                    self.delivered += 1
                else:
                    self.lost_client += 1

    def _sources(self, rule: int) -> frozenset[str]:
        """The sources holding a rule, asked again after SOURCES_TTL seconds (a source filter
        costs one look-up per rule and interval, not one per sample)."""
        now = time.monotonic()
        hit = self._held.get(rule)
        if hit is None or now - hit[0] > SOURCES_TTL:
            if len(self._held) > 65536:
                self._held.clear()
            hit = (now, frozenset(self.sources_of(rule)))
            self._held[rule] = hit
        return hit[1]

    def subscribe(self, want: Filter, loop: asyncio.AbstractEventLoop,
                  size: int = 4096) -> Subscriber:
        sub = Subscriber(want, loop, size)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def names_now(self) -> dict[int, str]:
        """ifindex -> name of every interface seen so far (the stream's hello lists them)."""
        return dict(self._names)
