"""The Prometheus exposition of `GET /metrics`: every family, its labels, and what it costs.

Families (the README's "Prometheus and Grafana" lists them with examples):

- frames: `xdpfw_frames_total{verdict="pass"|"drop"}` is a partition (its `sum()` is every
  frame seen), `xdpfw_frames_flagged_total{flag}` counts frames that were also monitored,
  malformed, not IP or fragments (flags overlap: never sum them with the verdicts),
  `xdpfw_bytes_total`. Label values come from `abi.Stat`, the one list of counters.
- the program: `xdpfw_interface_attached{interface,mode}` (1/0 for every wanted interface,
  and 1 for one attached without being wanted), `xdpfw_reattach_total{interface}`,
  `xdpfw_program_id`, `xdpfw_build_info{version,abi,python,kernel}`.
- tables: `xdpfw_table_entries{table}`, `xdpfw_table_capacity{table}`.
- rules and sources (from the database, through a read-only connection of its own: WAL
  readers neither wait for the service's write lock nor block a writer; recomputed only when
  the database changed): `xdpfw_rules{action,mode,source}` (holdings: a rule two sources hold
  counts once in each), `xdpfw_rules_expiring{source}` (holdings with a TTL),
  `xdpfw_source_packets_total{source}`, `xdpfw_source_bytes_total{source}` (the sums
  `FirewallService.sources()` makes, from the holdings that connection reads and one read
  of the counter arrays; `SourceCounters` keeps them monotonic).
- per rule, the `XDPFW_METRICS_TOP_RULES` busiest rules only (default 100, 0: none; one
  series per rule and counter is 2M series at a million rules, not scrapeable):
  `xdpfw_rule_packets_total{rule_id}`, `xdpfw_rule_bytes_total{rule_id}`.
- the process: whatever prometheus_client's default registry holds (its process, platform and
  GC collectors, and any collector another part of the service registers there), plus the
  collectors added with `Exposition.register`, plus the families of the optional parts on
  app.state named in `PARTS` (`app.state.crowdsec.metrics()`: the bouncer's
  `xdpfw_crowdsec_*`, which deploy/prometheus/alerts.yml reads).
"""

from __future__ import annotations

import logging
import platform
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.ports import CounterArrays
from xdpfw import __version__, abi

if TYPE_CHECKING:
    from api.service import FirewallService

__all__ = [
    "DEFAULT_TOP_RULES",
    "FLAGS",
    "PARTS",
    "VERDICTS",
    "Exposition",
    "Part",
    "RuleSummary",
    "RuleSummaryReader",
    "SourceCounters",
    "busiest",
    "source_sums",
]

log = logging.getLogger("xdpfw.metrics")

# verdict label -> counter: the partition of every frame (passed + dropped = packets).
VERDICTS: dict[str, abi.Stat] = {"pass": abi.Stat.PASSED, "drop": abi.Stat.DROPPED}
# The flags: every other counter but the totals (packets is sum(xdpfw_frames_total), bytes has
# its own family). A frame may carry several, or none.
FLAGS: tuple[abi.Stat, ...] = tuple(
    s
    for s in abi.Stat.counters()
    if s not in (abi.Stat.PACKETS, abi.Stat.BYTES, *VERDICTS.values())
)
DEFAULT_TOP_RULES = 100


@dataclass(frozen=True)
class RuleSummary:
    """Holdings by (action, mode, source), those with an expiry by source, and the rule ids
    each source holds (sorted; every known source, also one that holds nothing)."""

    rules: dict[tuple[str, str, str], int]
    expiring: dict[str, int]
    held: dict[str, np.ndarray[Any, np.dtype[np.uint32]]]


# Schema v2 (api/store.py): a rule is held by sources (`holdings`), each holding with its own
# expiry; `sources` lists every source, also one whose holdings all went (and a holding's
# source is always listed there: api/store.py writes both in one transaction).
_BY_HOLDING = (
    "SELECT r.action, r.mode, h.source, COUNT(*), COUNT(h.expires_at)"
    " FROM holdings h JOIN rules r ON r.id = h.rule_id GROUP BY r.action, r.mode, h.source"
)
_HELD = "SELECT rule_id FROM holdings WHERE source=? ORDER BY rule_id"
_SOURCES = "SELECT name FROM sources"


class RuleSummaryReader:
    """Reads rules and holdings from the database file through a read-only connection.

    SQLite in WAL mode lets a reader see the last committed state while a writer works, so a
    scrape during a million-rule load neither waits for the service's lock nor slows the
    load. The database is read again only when `PRAGMA data_version` says another connection
    committed since the last scrape.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._version: int | None = None
        self._ino = 0
        self._failed: type[BaseException] | None = None
        self._last = RuleSummary({}, {}, {})

    def _connect(self) -> sqlite3.Connection:
        ino = self.path.stat().st_ino  # the file moved aside and made again: reopen
        if self._db is not None and ino != self._ino:
            self._db.close()
            self._db, self._version = None, None
        if self._db is None:
            self._db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=5
            )
            self._ino = ino
        return self._db

    def read(self) -> RuleSummary:
        """The counts as of the last commit; on a database error, the last counts read
        (logged once per kind of error: the service's own requests report the database)."""
        with self._lock:
            try:
                return self._read()
            except (OSError, sqlite3.Error) as exc:
                if type(exc) is not self._failed:
                    log.warning("/metrics: cannot read rules from %s (%s); the rule and "
                                "source families show the last counts read", self.path, exc)
                self._failed = type(exc)
                if self._db is not None:
                    self._db.close()
                self._db, self._version = None, None
                return self._last

    def _read(self) -> RuleSummary:
        db = self._connect()
        version = int(db.execute("PRAGMA data_version").fetchone()[0])
        if version == self._version:
            return self._last
        db.execute("BEGIN")  # one snapshot for every read
        try:
            rows = db.execute(_BY_HOLDING).fetchall()
            names = [n for (n,) in db.execute(_SOURCES)]
            held = {name: self._held(db, name) for name in names}
        finally:
            db.execute("COMMIT")
        rules: dict[tuple[str, str, str], int] = {}
        expiring: dict[str, int] = dict.fromkeys(names, 0)
        for action, mode, source, n, with_ttl in rows:
            rules[(action, mode, source)] = n
            expiring[source] = expiring.get(source, 0) + with_ttl
        self._last, self._version, self._failed = RuleSummary(rules, expiring, held), version, None
        return self._last

    @staticmethod
    def _held(db: sqlite3.Connection, name: str) -> np.ndarray[Any, np.dtype[np.uint32]]:
        """One source's rule ids, in id order (the primary key's order: no sort)."""
        cur = db.execute(_HELD, (name,))
        return np.fromiter((rid for (rid,) in cur), dtype=np.uint32)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def source_sums(
    held: dict[str, np.ndarray[Any, np.dtype[np.uint32]]], arrays: CounterArrays
) -> list[tuple[str, int, int]]:
    """(source, packets, bytes): the counters of each source's rules summed, as
    `FirewallService.sources()` sums them (a rule two sources hold counts in both)."""
    ids, packets, nbytes, _ = arrays
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    out = []
    for name, want in sorted(held.items()):
        if not len(want) or not len(sorted_ids):
            out.append((name, 0, 0))
            continue
        pos = np.minimum(np.searchsorted(sorted_ids, want), len(sorted_ids) - 1)
        sel = order[pos[sorted_ids[pos] == want]]
        out.append((name, int(packets[sel].sum()), int(nbytes[sel].sum())))
    return out


class SourceCounters:
    """Per-source packets and bytes as Prometheus counters: they never go down.

    A source's raw total is the sum of its rules' counters now, so it falls when a rule
    leaves (its counts leave with it). A counter that falls reads as a restart to
    Prometheus, whose `rate()` would then count the whole remaining total again as new
    traffic. So each scrape adds only the rise since the previous one: a fall adds
    nothing (the traffic of the source's other rules between those two scrapes is lost,
    never invented), and the series restarts from the raw total only when the service
    restarts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: dict[str, tuple[int, int]] = {}
        self._out: dict[str, tuple[int, int]] = {}

    def update(self, raw: Iterable[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
        """(source, packets, bytes) now -> {source: (packets, bytes)} to expose."""
        with self._lock:
            out: dict[str, tuple[int, int]] = {}
            raw_now: dict[str, tuple[int, int]] = {}
            for name, packets, nbytes in raw:
                raw_now[name] = (packets, nbytes)
                if name in self._out:
                    (rp, rb), (op, ob) = self._raw[name], self._out[name]
                    out[name] = (op + max(0, packets - rp), ob + max(0, nbytes - rb))
                else:
                    out[name] = (packets, nbytes)
            self._raw, self._out = raw_now, out
            return dict(out)


class _Default(Collector):
    """prometheus_client's default registry: process_*, python_*, and what others add."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class _Collector(Collector):
    def __init__(self, svc: FirewallService, sources: SourceCounters) -> None:
        self.svc = svc
        self.source_counters = sources
        self._summary: RuleSummaryReader | None = None

    @property
    def summary(self) -> RuleSummaryReader | None:
        """The database's reader, opened at the first scrape (None: no database file)."""
        if self._summary is None and self.svc.store.path.exists():
            self._summary = RuleSummaryReader(self.svc.store.path)
        return self._summary

    def collect(self) -> Iterator[Metric]:
        yield from self.frames()
        yield from self.program()
        yield from self.tables()
        yield from self.rules()

    def frames(self) -> Iterator[Metric]:
        counters = self.svc.totals().by_stat()
        frames = CounterMetricFamily(
            "xdpfw_frames",
            "Frames seen by the XDP program, by verdict (a partition: sum() is every frame)",
            labels=["verdict"],
        )
        for verdict, stat in VERDICTS.items():
            frames.add_metric([verdict], counters[stat])
        yield frames
        flagged = CounterMetricFamily(
            "xdpfw_frames_flagged",
            "Frames that were also monitored, malformed, not IP or fragments (flags overlap "
            "each other and the verdicts: do not add them up)",
            labels=["flag"],
        )
        for stat in FLAGS:
            flagged.add_metric([stat.field], counters[stat])
        yield flagged
        yield CounterMetricFamily(
            "xdpfw_bytes", "Bytes of all frames seen", value=counters[abi.Stat.BYTES]
        )

    def program(self) -> Iterator[Metric]:
        attached = GaugeMetricFamily(
            "xdpfw_interface_attached",
            "1 when the program filters the interface, 0 when a wanted interface lost it "
            "(mode: native or generic when attached, else the mode asked for)",
            labels=["interface", "mode"],
        )
        health = self.svc.health()
        for state in health.interfaces:
            attached.add_metric([state.name, state.mode], 1 if state.attached else 0)
        yield attached
        reattached = CounterMetricFamily(
            "xdpfw_reattach",
            "Times the watchdog attached the program again to an interface that lost it",
            labels=["interface"],
        )
        for name, n in self.svc.reattach_counts().items():
            reattached.add_metric([name], n)
        yield reattached
        # X-ray: sampled frames, sent and lost by reason
        samples = CounterMetricFamily(
            "xdpfw_samples",
            "Sampled frames of sampled rules, by outcome (sent to the ring, or lost: ring "
            "full, over the cap, a slow stream)",
            labels=["outcome"],
        )
        for outcome, n in self.svc.sample_stats().items():
            samples.add_metric([outcome], n)
        yield samples
        yield GaugeMetricFamily(
            "xdpfw_program_id", "Kernel id of the XDP program in use", value=health.prog_id
        )
        info = GaugeMetricFamily(
            "xdpfw_build_info",
            "Always 1: the xdpfw version, its kernel ABI version, Python and the kernel",
            labels=["version", "abi", "python", "kernel"],
        )
        info.add_metric(
            [__version__, str(abi.ABI_VERSION), platform.python_version(), platform.release()], 1
        )
        yield info

    def tables(self) -> Iterator[Metric]:
        usage = GaugeMetricFamily(
            "xdpfw_table_entries", "Entries in each table", labels=["table"]
        )
        cap = GaugeMetricFamily("xdpfw_table_capacity", "Capacity of each table", labels=["table"])
        for name, (used, limit) in self.svc.table_usage().items():
            usage.add_metric([name], used)
            cap.add_metric([name], limit)
        yield usage
        yield cap

    def rules(self) -> Iterator[Metric]:
        reader = self.summary
        if reader is None:
            return
        summary = reader.read()
        rules = GaugeMetricFamily(
            "xdpfw_rules",
            "Rules by action, mode and source (a rule two sources hold counts in each; "
            "the kernel's count is xdpfw_table_entries{table=\"rules\"})",
            labels=["action", "mode", "source"],
        )
        for (action, mode, source), n in sorted(summary.rules.items()):
            rules.add_metric([action, mode, source], n)
        yield rules
        expiring = GaugeMetricFamily(
            "xdpfw_rules_expiring", "Rules of each source that have a TTL", labels=["source"]
        )
        for source, n in sorted(summary.expiring.items()):
            expiring.add_metric([source], n)
        yield expiring
        sums = source_sums(summary.held, self.svc.counter_arrays())
        exposed = self.source_counters.update(sums)
        packets = CounterMetricFamily(
            "xdpfw_source_packets",
            "Packets credited to the rules of a source (a rule two sources hold credits both)",
            labels=["source"],
        )
        nbytes = CounterMetricFamily(
            "xdpfw_source_bytes", "Bytes credited to the rules of a source", labels=["source"]
        )
        for name, (p, b) in sorted(exposed.items()):
            packets.add_metric([name], p)
            nbytes.add_metric([name], b)
        yield packets
        yield nbytes


class _Registry(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


class Part(Protocol):
    """An optional part of the service with Prometheus families of its own."""

    def metrics(self) -> Iterable[Metric]: ...


class _Part(Collector):
    def __init__(self, part: Part) -> None:
        self.part = part

    def collect(self) -> Iterator[Metric]:
        yield from self.part.metrics()


# The attributes of app.state that hold optional parts of the service with families of their
# own (`metrics()`): the CrowdSec bouncer (api/crowdsec.py, issue 14) when it runs; the fleet
# agent (api/fleet/agent.py, issue 19: xdpfw_fleet_*) in fleet mode.
PARTS = ("crowdsec", "fleet")


class Exposition:
    """What `GET /metrics` answers for one service (one per app)."""

    def __init__(self, svc: FirewallService, top_rules: int = DEFAULT_TOP_RULES) -> None:
        self.svc = svc
        self.top_rules = top_rules
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(svc, SourceCounters()))
        self.registry.register(_Default())

    def register(self, collector: Collector) -> None:
        """Add a collector of another part of the service (a bouncer's counters...)."""
        self.registry.register(collector)

    def render(self, parts: Iterable[Part | None] = ()) -> bytes:
        """The exposition; `parts`: objects of optional parts of the service running in this
        process (app.state.crowdsec...), each with a `metrics()` yielding its families."""
        registry = self.registry
        extra = [p for p in parts if p is not None]
        if extra:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Registry(self.registry))
            for part in extra:
                registry.register(_Part(part))
        return generate_latest(registry) + self.rule_text()

    def rule_text(self) -> bytes:
        """The busiest `top_rules` rules' counters (most packets first, ties: lower id
        first, as /v1/stats ranks them), in the text format prometheus-client writes,
        straight from the counter arrays: no object per rule, whatever N is."""
        if self.top_rules <= 0:
            return b""
        ids, packets, nbytes, _ = self.svc.counter_arrays()
        pick = busiest(ids, packets, self.top_rules)
        labels = [f'{{rule_id="{rid}"}} ' for rid in ids[pick].tolist()]
        out = []
        for name, doc, values in (
            ("xdpfw_rule_packets_total", "Packets credited to a rule (the busiest rules)",
             packets),
            ("xdpfw_rule_bytes_total", "Bytes credited to a rule (the busiest rules)", nbytes),
        ):
            out.append(f"# HELP {name} {doc}\n# TYPE {name} counter\n")
            out.extend(
                f"{name}{label}{float(v)!r}\n"
                for label, v in zip(labels, values[pick].tolist(), strict=True)
            )
        return "".join(out).encode()


def busiest(
    ids: np.ndarray[Any, np.dtype[np.uint32]], packets: np.ndarray[Any, np.dtype[np.uint64]],
    n: int,
) -> np.ndarray[Any, np.dtype[np.intp]]:
    """Indices of the n rules with the most packets, ties broken by the lower id, in that
    order. A partition first, so a million rules cost no full sort for n = 100."""
    down = ~packets  # uint64: ascending ~packets is descending packets
    if n < len(ids):
        cut = np.partition(down, n - 1)[n - 1]
        cand = np.flatnonzero(down <= cut)  # every rule tied with the n-th one stays in
    else:
        cand = np.arange(len(ids))
    order = cand[np.lexsort((ids[cand], down[cand]))]
    return order[:n]
