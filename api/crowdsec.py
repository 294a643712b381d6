"""The CrowdSec bouncer inside `xdpfw serve`: LAPI decisions kept as rules of source `crowdsec`.

A thread pulls `GET /v1/decisions/stream?startup=true` (header `X-Api-Key`) once, then the
deltas every `interval` seconds. A full pull (`startup=true`) REPLACES the source `crowdsec`
(`FirewallService.replace_source`): decisions deleted while xdpfw was stopped or the LAPI was
away go, rules of other sources are never touched. One is made at start, every `resync`
seconds, and after any failure (a LAPI that was away, an apply that failed), because a stream
cursor that advanced past a lost answer would never repeat it. A delta removes the `deleted`
values from source `crowdsec` first (`remove_where(src=..., source="crowdsec")`), then adds the
`new` bans (`bulk_add`, TTL = the decision's duration, comment = its scenario); a re-sent ban
refreshes its TTL. The mapping (ban only; Ip and Range; IPv4 and IPv6) is `xdpfw/crowdsec.py`.

The LAPI going away changes nothing in the kernel: the rules stay (each until its own TTL), the
pulls are retried with backoff (1 s doubling to 60 s, or to 6 intervals if shorter), `/healthz`
says `crowdsec.state: "unreachable"` with the error, and `xdpfw_crowdsec_lapi_errors_total`
counts the failures.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from api.service import FirewallService, NewRule
from xdpfw import __version__
from xdpfw.crowdsec import (
    SOURCE,
    Backoff,
    Ban,
    Decision,
    Ignored,
    StreamAnswer,
    StreamFormatError,
    decision_network,
    latest_bans,
    parse_stream,
)
from xdpfw.errors import InvalidRule, RuleConflict, XdpfwError
from xdpfw.rules import RuleSpec

__all__ = [
    "CrowdsecBouncer",
    "CrowdsecStatus",
    "KeyFileError",
    "LapiClient",
    "LapiError",
    "read_key_file",
]

log = logging.getLogger("xdpfw.crowdsec")

STREAM_PATH = "/v1/decisions/stream"
MANY_DELETES = 256  # a delta deleting more than this is applied as a full pull (one replace)
SCOPES = "ip,range"  # the LAPI filters the stream to the scopes a firewall can enforce


class LapiError(Exception):
    """A pull failed: the LAPI is unreachable, refused the key, or answered no stream."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KeyFileError(Exception):
    """The bouncer key file is missing, unreadable or empty (the message says what to do)."""


def read_key_file(path: Path) -> str:
    """The bouncer API key (`cscli bouncers add NAME -o raw`) from its file."""
    try:
        text = path.read_text()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise KeyFileError(
            f"cannot read the CrowdSec bouncer key file {path}: {exc.strerror}; create it with "
            f"`cscli bouncers add xdpfw -o raw > {path} && chmod 600 {path}`"
        ) from exc
    key = text.strip()
    if not key or len(key.split()) != 1:
        raise KeyFileError(
            f"the CrowdSec bouncer key file {path} must hold one key (it is "
            f"{'empty' if not key else 'several words'}); write the output of "
            f"`cscli bouncers add xdpfw -o raw` into it"
        )
    if mode & 0o044:
        log.warning(
            "the CrowdSec bouncer key file %s is readable by group or others (mode %04o): "
            "chmod 600 %s", path, mode, path,
        )  # fmt: skip
    return key


class LapiClient:
    """`GET /v1/decisions/stream` of one LAPI, as `StreamAnswer`s (httpx, synchronous)."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"X-Api-Key": key, "User-Agent": f"xdpfw-bouncer/{__version__}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def pull(self, startup: bool) -> StreamAnswer:
        """One pull: every active decision (`startup`), or what changed since the last pull."""
        params = {"startup": "true" if startup else "false", "scopes": SCOPES}
        try:
            r = self._http.get(STREAM_PATH, params=params)
        except httpx.TransportError as exc:
            raise LapiError(f"cannot reach the CrowdSec LAPI at {self.url}: {exc}") from exc
        if r.status_code == 403:
            raise LapiError(
                f"the CrowdSec LAPI at {self.url} refused the bouncer key (403 access "
                "forbidden): register a bouncer (`cscli bouncers add xdpfw -o raw`) and put its "
                "key in the --crowdsec-key-file",
                403,
            )
        if r.status_code != 200:
            raise LapiError(
                f"the CrowdSec LAPI at {self.url} answered {r.status_code} to {STREAM_PATH}: "
                f"{r.text[:200]!r}",
                r.status_code,
            )
        try:
            return parse_stream(r.json())
        except ValueError as exc:  # not JSON, or StreamFormatError
            what = exc if isinstance(exc, StreamFormatError) else "not JSON"
            raise LapiError(
                f"the CrowdSec LAPI at {self.url} answered no decision stream ({what}): is the "
                "URL the LAPI's (e.g. http://127.0.0.1:8080)?",
                r.status_code,
            ) from exc


State = Literal["starting", "ok", "unreachable", "failing"]


@dataclass(frozen=True)
class CrowdsecStatus:
    """What /healthz and /metrics report about the bouncer."""

    lapi: str
    state: State  # ok | starting (no pull yet) | unreachable (LAPI) | failing (applying)
    last_pull: float | None  # epoch of the last successful pull (delta or full)
    last_full_pull: float | None
    last_error: str | None  # the last failure, until the next success
    consecutive_errors: int
    lapi_errors: int  # pulls that failed, in all
    applied: int
    deleted: int
    ignored: int
    ignored_kinds: dict[str, int] = field(default_factory=dict)


class CrowdsecBouncer:
    """Keeps source `crowdsec` equal to the LAPI's ban decisions (start / stop / step)."""

    def __init__(
        self,
        svc: FirewallService,
        client: LapiClient,
        *,
        interval: float = 10.0,
        resync: float = 600.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.svc = svc
        self.client = client
        self.interval = interval
        self.resync = resync
        # 1 s doubling to 60 s, or to 6 intervals when that is shorter (a short interval asks
        # for a quick return once the LAPI is back).
        self.backoff = backoff or Backoff(
            first=min(1.0, interval), cap=max(min(60.0, 6 * interval), min(1.0, interval))
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the counters below, read by /healthz and /metrics
        self._full_due = True
        self._next_full = 0.0  # monotonic
        self._state: State = "starting"
        self._last_pull: float | None = None
        self._last_full: float | None = None
        self._last_error: str | None = None
        self._consecutive = 0
        self._lapi_errors = 0
        self._applied = 0
        self._deleted = 0
        self._ignored = 0
        self._ignored_kinds: dict[str, int] = {}
        self._ignored_ids: set[int] = set()  # ignored decisions already counted
        self._logged_kinds: set[str] = set()

    # -- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xdpfw-crowdsec", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.client.close()

    def _run(self) -> None:
        log.info(
            "CrowdSec bouncer: pulling decisions from %s every %g s (full resync every %g s)",
            self.client.url, self.interval, self.resync,
        )  # fmt: skip
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:  # never let the thread die: log, then resync from scratch
                log.exception("CrowdSec bouncer: unexpected error; resyncing")
                self._failed("failing", "unexpected error (see the log)")
                wait = self.backoff.next()
            self._stop.wait(wait)

    # -- one round -------------------------------------------------------------------------

    def step(self) -> float:
        """One pull and its apply; returns the seconds to wait before the next."""
        full = self._full_due or time.monotonic() >= self._next_full
        try:
            answer = self.client.pull(startup=full)
        except LapiError as exc:
            with self._lock:
                self._lapi_errors += 1
            self._failed("unreachable", str(exc))
            return self.backoff.next()
        try:
            if full:
                self._apply_full(answer)
            else:
                full = self._apply_delta(answer)
        except LapiError as exc:  # the full pull a big delta asked for
            with self._lock:
                self._lapi_errors += 1
            self._failed("unreachable", str(exc))
            return self.backoff.next()
        except XdpfwError as exc:  # a full table or disk: nothing half-done; resync next
            self._failed("failing", f"applying CrowdSec decisions failed: {exc}")
            return self.backoff.next()
        now = time.time()
        with self._lock:
            if self._consecutive:
                log.info("CrowdSec bouncer: the LAPI at %s answers again", self.client.url)
            self._state = "ok"
            self._last_pull = now
            if full:
                self._last_full = now
            self._last_error = None
            self._consecutive = 0
        if full:
            self._full_due = False
            self._next_full = time.monotonic() + self.resync
        self.backoff.reset()
        return self.interval

    def _failed(self, state: State, message: str) -> None:
        with self._lock:
            first = self._consecutive == 0
            self._consecutive += 1
            self._state = state
            self._last_error = message
            n = self._consecutive
        self._full_due = True
        # The first failure and then every 10th: a LAPI down for an hour logs a few lines.
        if first or n % 10 == 0:
            log.error(
                "CrowdSec bouncer: %s (failure %d in a row; the rules stay, retrying with "
                "backoff)", message, n,
            )  # fmt: skip

    def _apply_full(self, answer: StreamAnswer) -> None:
        bans, ignored = latest_bans(answer.new)
        self._note_ignored(ignored, full=True)
        change = self.svc.replace_source(SOURCE, [_new_rule(b) for b in bans])
        with self._lock:
            self._applied += change.added
            self._deleted += change.removed
        if change.overlap_count:
            log.warning(
                "CrowdSec bouncer: %d ban(s) overlap protected prefixes (protection wins): %s",
                change.overlap_count, "; ".join(change.overlaps[:5]),
            )  # fmt: skip
        log.info(
            "CrowdSec bouncer: full pull, %d ban(s): %d added, %d removed, %d unchanged",
            len(bans), change.added, change.removed, change.unchanged,
        )  # fmt: skip

    def _apply_delta(self, answer: StreamAnswer) -> bool:
        """Apply a delta; True when it was applied as a full pull instead."""
        if len(answer.deleted) > MANY_DELETES:  # one replace beats thousands of removes
            log.info(
                "CrowdSec bouncer: %d deletions in one delta: pulling every decision instead",
                len(answer.deleted),
            )
            self._apply_full(self.client.pull(startup=True))
            return True
        removed = 0
        for d in answer.deleted:  # first: a value deleted and banned again in one delta stays
            if d.type.lower() != "ban":
                continue  # a deleted captcha never made a rule: a ban of that value stays
            net = decision_network(d)
            if not isinstance(net, Ignored):
                removed += self.svc.remove_where(src=net.with_prefixlen, source=SOURCE)
        bans, ignored = latest_bans(answer.new)
        self._note_ignored(ignored, full=False)
        added, refused = self._add(bans) if bans else (0, [])
        if refused:
            self._note_ignored(refused, full=False)
        with self._lock:
            self._applied += added
            self._deleted += removed
        if removed or added or ignored:
            log.info(
                "CrowdSec bouncer: %d ban(s) applied, %d removed, %d ignored",
                added, removed, len(ignored) + len(refused),
            )  # fmt: skip
        return False

    def _add(self, bans: Sequence[Ban]) -> tuple[int, list[tuple[Decision, Ignored]]]:
        """All at once; should one be refused (the exact address of a protected prefix or of
        the API's allow rule), one by one, and the refused ones are ignored."""
        try:
            self.svc.bulk_add([_new_rule(b) for b in bans])
            return len(bans), []
        except (RuleConflict, InvalidRule):
            pass
        refused: list[tuple[Decision, Ignored]] = []
        for b in bans:
            try:
                self.svc.add(_new_rule(b))
            except (RuleConflict, InvalidRule) as exc:
                d = Decision(0, "", b.comment, "Range", "ban", b.src, float(b.ttl))
                refused.append((d, Ignored("refused", f"{b.src}: {exc}")))
        return len(bans) - len(refused), refused

    def _note_ignored(self, ignored: Sequence[tuple[Decision, Ignored]], *, full: bool) -> None:
        """Count each ignored decision once (a full pull repeats them), log each kind once."""
        fresh = [(d, i) for d, i in ignored if not d.id or d.id not in self._ignored_ids]
        if full:
            self._ignored_ids = {d.id for d, _ in ignored if d.id}
        else:
            self._ignored_ids.update(d.id for d, _ in ignored if d.id)
        with self._lock:
            for _, why in fresh:
                self._ignored += 1
                self._ignored_kinds[why.kind] = self._ignored_kinds.get(why.kind, 0) + 1
        for d, why in fresh:
            if why.kind not in self._logged_kinds:
                self._logged_kinds.add(why.kind)
                log.warning(
                    "CrowdSec bouncer: ignoring decisions of %s, e.g. %s (counted in "
                    "xdpfw_crowdsec_decisions_total{event=\"ignored\"}; said once per kind)",
                    why.kind, why.reason,
                )  # fmt: skip
            log.debug("CrowdSec bouncer: ignored decision %d: %s", d.id, why.reason)

    # -- reports ---------------------------------------------------------------------------

    def status(self) -> CrowdsecStatus:
        with self._lock:
            return CrowdsecStatus(
                lapi=self.client.url,
                state=self._state,
                last_pull=self._last_pull,
                last_full_pull=self._last_full,
                last_error=self._last_error,
                consecutive_errors=self._consecutive,
                lapi_errors=self._lapi_errors,
                applied=self._applied,
                deleted=self._deleted,
                ignored=self._ignored,
                ignored_kinds=dict(self._ignored_kinds),
            )

    def metrics(self) -> Iterator[Metric]:
        """The bouncer's Prometheus families (added to /metrics when the bouncer runs)."""
        st = self.status()
        decisions = CounterMetricFamily(
            "xdpfw_crowdsec_decisions",
            "CrowdSec decisions by what they did: applied (a ban became or refreshed a rule), "
            "deleted (a rule of source crowdsec removed), ignored (not a ban, or no address)",
            labels=["event"],
        )
        decisions.add_metric(["applied"], st.applied)
        decisions.add_metric(["deleted"], st.deleted)
        decisions.add_metric(["ignored"], st.ignored)
        yield decisions
        yield CounterMetricFamily(
            "xdpfw_crowdsec_lapi_errors", "Pulls from the CrowdSec LAPI that failed",
            value=st.lapi_errors,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "xdpfw_crowdsec_last_pull_timestamp_seconds",
            "When the last pull from the CrowdSec LAPI succeeded (0: none yet)",
            value=st.last_pull or 0.0,
        )
        yield GaugeMetricFamily(
            "xdpfw_crowdsec_up",
            "1 when the last pull from the CrowdSec LAPI succeeded and was applied, else 0",
            value=1.0 if st.state == "ok" else 0.0,
        )


def _new_rule(b: Ban) -> NewRule:
    # force: a ban over part of a protected prefix is loaded (the protection's allow outranks
    # it there) so it still drops the rest of its range.
    spec = RuleSpec.parse(src=b.network)
    return NewRule(spec, comment=b.comment, ttl_seconds=b.ttl, force=True, source=SOURCE)
