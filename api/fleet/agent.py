"""The fleet agent of one node: watch the desired state in etcd, apply it through the
service, keep this node in the registry (a lease heartbeat). docs/fleet.md.

Applying goes through the same service paths the REST API uses (`replace_source`,
`drop_source`): a change of a source is a diff, so rules enforced before and after are never
passed. The applied revision is a meta row of the local SQLite cache: a restart resumes the
watch from it; a revision compacted away in etcd makes a full resync (every source replaced
by its etcd version, the fleet sources etcd no longer has dropped) - again a diff, no window.
The fleet's protected prefixes (P/desired/protected) are applied first in a batch and in a
resync (`FirewallService.set_fleet_protected`), and cached in SQLite too (`cached_protected`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from api.fleet.etcd import KV, Compacted, EtcdClient, EtcdError, EtcdUnavailable
from api.fleet.state import (
    Desired,
    Layout,
    Writer,
    decode_source,
    in_scope,
    protected_prefixes,
)
from api.service import FirewallService, NewCodes, NewRule
from api.store import Store, StoredRule
from xdpfw.errors import SourceNotFound, XdpfwError
from xdpfw.rules import rule_from_code

__all__ = ["FleetAgent", "FleetConfig", "NodeInfo", "cached_protected"]

log = logging.getLogger("xdpfw.fleet")


def cached_protected(store: Store) -> list[str]:
    """The fleet's protected prefixes as this node last applied them (its SQLite cache):
    `xdpfw serve --etcd` hands them to the service before the start-up reconcile, so a
    restart (etcd reachable or not) never lets them go unprotected."""
    try:
        return protected_prefixes((store.fleet_meta("protected") or "").encode())
    except ValueError:
        return []


@dataclass(frozen=True)
class FleetConfig:
    endpoints: Sequence[str]
    node: str
    prefix: str = "/xdpfw"
    labels: dict[str, str] = field(default_factory=dict)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    lease_ttl: int = 10  # s: a node not heard of for this long leaves the registry
    heartbeat: float = 2.0  # s between keepalives (and registry updates)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    applied_revision: int
    lag: int
    last_heartbeat: float
    healthy: bool
    store_reachable: bool
    resyncs: int


class FleetAgent:
    def __init__(self, config: FleetConfig, svc: FirewallService) -> None:
        self.config = config
        self.svc = svc
        self.layout = Layout(config.prefix)
        self.etcd = EtcdClient(config.endpoints, ca=config.ca, cert=config.cert, key=config.key)
        self.writer = Writer(self.etcd, self.layout, config.node)
        with svc.lock:
            self.applied = int(svc.store.fleet_meta("revision") or 0)
            self.managed: set[str] = set(json.loads(svc.store.fleet_meta("sources") or "[]"))
            # the cache: protected with etcd down too (no change when the service has them)
            svc.set_fleet_protected(cached_protected(svc.store))
        self.head = self.applied  # the newest change seen in the store (P/head)
        self.resyncs = 0
        self.failed: dict[str, str] = {}  # sources this node could not apply: why
        self.reachable = False
        self.down_since: float | None = time.time()
        self.last_error: str | None = None
        self.started_at = time.time()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lease = 0
        self.read_seconds = 0.0  # the last source read from etcd took this long (the log)

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._watch_loop, "fleet-watch"), (self._beat_loop, "fleet-beat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.etcd.abort_watches()
        for t in self._threads:
            t.join(10)
        if self._lease:
            with contextlib.suppress(EtcdError):  # leave the registry now, not in lease_ttl s
                self.etcd.revoke(self._lease)
        self.etcd.close()

    # -- state seen by the routes ---------------------------------------------------------------

    def wait_applied(self, revision: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.applied >= revision, timeout)

    def _up(self) -> None:
        if not self.reachable:
            log.info("fleet store reachable (%s)", ",".join(self.config.endpoints))
        self.reachable = True
        self.down_since = None

    def _down(self, exc: BaseException) -> None:
        if self.reachable or self.last_error is None:
            log.warning("fleet store unreachable: %s; enforcing the cached state (revision %d)",
                        exc, self.applied)
        self.reachable = False
        if self.down_since is None:
            self.down_since = time.time()
        self.last_error = str(exc)

    @property
    def lag(self) -> int:
        return max(0, self.head - self.applied)

    def _set_applied(self, revision: int) -> None:
        with self.svc.lock:
            self.svc.store.set_fleet_meta("revision", str(revision))
            self.svc.store.set_fleet_meta("sources", json.dumps(sorted(self.managed)))
        with self._cond:
            self.applied = max(self.applied, revision)
            self.head = max(self.head, revision)
            self._cond.notify_all()

    # -- watch and apply -----------------------------------------------------------------------

    def _watch_loop(self) -> None:
        pause = 0.1  # after an error only: a watch that ended quietly is re-opened at once
        resync = self.applied == 0
        while not self._stop.is_set():
            try:
                if resync:
                    self.resync()
                    resync = False
                for rev, events in self.etcd.watch(self.layout.desired, self.applied + 1,
                                                   self._stop):
                    self._up()
                    # The protected prefixes first: a new one is allowed before any rule of
                    # the same batch could drop it.
                    mine = [e for e in events if e.kv.key == self.layout.protected]
                    if mine:
                        self.apply_protected(None if mine[-1].kind == "DELETE"
                                             else mine[-1].kv.value)
                    names = sorted({n for e in events
                                    if (n := self.layout.source_of(e.kv.key)) is not None})
                    for name in names:
                        self.apply_source(name, rev)
                    self._set_applied(rev)
                self._up()  # the watch ends after a quiet while, its member checked
                self.retry_failed()
                pause = 0.1
                continue
            except Compacted as exc:
                log.warning("fleet: revision %d is compacted in etcd (%s): full resync",
                            self.applied + 1, exc)
                resync = True
                continue
            except EtcdUnavailable as exc:
                self._down(exc)
            except (EtcdError, XdpfwError, ValueError) as exc:
                log.error("fleet: applying the store's state failed: %s; retrying", exc)
                self.last_error = str(exc)
                resync = True
            self._stop.wait(pause)
            pause = min(pause * 2, 2.0)

    def apply_protected(self, value: bytes | None) -> None:
        """The fleet's protected prefixes (P/desired/protected) enforced here and cached; a
        list this node cannot take (a bad prefix written straight into etcd) is logged and
        the node keeps the list it had."""
        try:
            prefixes = protected_prefixes(value)
            self.svc.set_fleet_protected(prefixes)
        except (ValueError, XdpfwError) as exc:
            log.error("fleet: the protected prefixes in etcd cannot be applied: %s; keeping "
                      "the ones this node had", exc)
            self.last_error = str(exc)
            return
        with self.svc.lock:  # the fleet's whole list, also those this node has as its own
            self.svc.store.set_fleet_meta("protected", json.dumps(prefixes))

    def protected_cache(self) -> list[str]:
        """The fleet's protected prefixes as this node last applied them (etcd down)."""
        with self.svc.lock:
            return cached_protected(self.svc.store)

    def _read_source(self, name: str, revision: int) -> Desired | None:
        L = self.layout
        manifests, _ = self.etcd.range(L.manifest(name), revision=revision)
        rules, _ = self.etcd.prefix(L.rules(name), revision=revision)
        chunks: list[KV] = []
        if manifests:
            gen = json.loads(manifests[0].value)["gen"]
            chunks, _ = self.etcd.prefix(L.chunks(name, gen), revision=revision)
        return decode_source(name, manifests[0] if manifests else None, chunks, rules)

    def apply_source(self, name: str, revision: int) -> None:
        t0 = time.perf_counter()
        desired = self._read_source(name, revision)
        self.read_seconds = time.perf_counter() - t0
        self._apply(name, desired)

    def _apply(self, name: str, desired: Desired | None) -> None:
        """Apply one source; a source this node cannot take (a full table, a bad entry) is
        logged, listed in `failed` (GET /v1/fleet) and retried, and blocks no other."""
        try:
            self._apply_one(name, desired)
        except XdpfwError as exc:
            if self.failed.get(name) != str(exc):
                log.error("fleet: source %s cannot be applied on this node: %s", name, exc)
            self.failed[name] = str(exc)
        else:
            self.failed.pop(name, None)

    def retry_failed(self) -> None:
        for name in sorted(self.failed):
            self.apply_source(name, 0)

    def _apply_one(self, name: str, desired: Desired | None) -> None:
        node, labels = self.config.node, self.config.labels
        if desired is not None and not desired.applies_to(node, labels):
            desired = None  # scoped to other nodes: not here (dropped if it was)
        if desired is not None:
            mine = desired.for_node(node, labels)  # single rules scoped to others left out
            desired = None if desired.codes and not mine.codes else mine
        if desired is None:
            self.managed.discard(name)
            try:
                n = self.svc.drop_source(name)
                log.info("fleet: source %s deleted (%d holding(s))", name, n)
            except SourceNotFound:
                pass
            return
        self.managed.add(name)
        batch: NewCodes | list[NewRule]
        if desired.uniform is not None:
            batch = NewCodes(desired.codes, desired.uniform[0], desired.uniform[1], True, name,
                             overlaps_ok=True)
        else:
            batch = [
                NewRule(rule_from_code(1, c), cm, ttl, True, name)
                for c, cm, ttl in zip(desired.codes, desired.comments, desired.ttls, strict=True)
            ]
        t0 = time.perf_counter()
        change = self.svc.replace_source(name, batch)
        log.info("fleet: source %s: +%d -%d =%d (read %.3f s, applied in %.3f s)", name,
                 change.added, change.removed, change.unchanged, self.read_seconds,
                 time.perf_counter() - t0)

    def resync(self) -> None:
        """Make every fleet source equal its etcd version, at one revision."""
        L = self.layout
        kvs, rev = self.etcd.prefix(L.desired)
        self._up()
        manifests: dict[str, KV] = {}
        rules: dict[str, list[KV]] = {}
        self.apply_protected(next((kv.value for kv in kvs if kv.key == L.protected), None))
        for kv in kvs:
            name = L.source_of(kv.key)
            if name is None:
                continue
            if kv.key == L.manifest(name):
                manifests[name] = kv
            else:
                rules.setdefault(name, []).append(kv)
        present = set(manifests) | set(rules)
        for name in sorted(present):
            chunks: list[KV] = []
            if name in manifests:
                gen = json.loads(manifests[name].value)["gen"]
                chunks, _ = self.etcd.prefix(L.chunks(name, gen), revision=rev)
            self._apply(name, decode_source(name, manifests.get(name), chunks,
                                            rules.get(name, [])))
        for name in sorted(self.managed - present):
            self._apply(name, None)
        self.resyncs += 1
        log.info("fleet: full resync at revision %d: %d source(s)", rev, len(present))
        self._set_applied(rev)

    def lists_to_read(self, local: set[str]) -> Callable[[str, KV], bool]:
        """For a delete by value or id (Writer.remove_matching): which sources' lists may
        hold a match - those this node holds a match of (`local`), those scoped to other
        nodes (this node cannot know), and those changed since this node applied them."""
        node, labels = self.config.node, self.config.labels

        def read(name: str, manifest: KV) -> bool:
            if name in local or manifest.mod_revision > self.applied:
                return True
            m = json.loads(manifest.value)
            return not in_scope((m.get("nodes"), m.get("selector")), node, labels)

        return read

    def in_scope(self, nodes: Sequence[str] | None, selector: dict[str, str] | None) -> bool:
        return in_scope((None if nodes is None else list(nodes), selector), self.config.node,
                        self.config.labels)

    def rule_of(self, source: str, code: int) -> StoredRule | None:
        """The rule this node enforces for `code`, as `source` holds it (None: not here)."""
        with self.svc.lock:
            rid = self.svc.dp.compiler.find_code(code)
            return None if rid is None else self.svc.store.get(rid, source)

    def metrics(self) -> Iterator[Metric]:
        """The fleet's families on /metrics (api/metrics.py PARTS)."""
        node = [self.config.node]
        for name, doc, value, kind in (
            ("xdpfw_fleet_applied_revision", "The etcd revision this node enforces.",
             self.applied, GaugeMetricFamily),
            ("xdpfw_fleet_lag_revisions", "Revisions of desired state not yet applied here.",
             self.lag, GaugeMetricFamily),
            ("xdpfw_fleet_store_up", "1 while the fleet store (etcd) answers.",
             int(self.reachable), GaugeMetricFamily),
            ("xdpfw_fleet_failed_sources", "Sources this node cannot apply (retried).",
             len(self.failed), GaugeMetricFamily),
            ("xdpfw_fleet_resyncs", "Full resyncs since start (compaction, first start).",
             self.resyncs, CounterMetricFamily),
            ("xdpfw_fleet_watch_bytes", "Bytes received from etcd over the watch.",
             self.etcd.watch_bytes, CounterMetricFamily),
            ("xdpfw_fleet_read_bytes", "Bytes received from etcd by other calls (reads of "
             "the chunks of a changed source, writes, heartbeats).",
             self.etcd.call_bytes, CounterMetricFamily),
        ):
            family = kind(name, doc, labels=["node"])
            family.add_metric(node, value)
            yield family

    # -- registry ------------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        return {
            "name": self.config.node, "labels": self.config.labels,
            "applied_revision": self.applied, "heartbeat": time.time(),
            "started_at": self.started_at, "resyncs": self.resyncs,
        }

    def beat(self) -> None:
        c = self.config
        if self._lease and self.etcd.keepalive(self._lease) <= 0:
            self._lease = 0  # expired while we were away: a new one
        if not self._lease:
            self._lease = self.etcd.grant(c.lease_ttl)
        self.etcd.put(self.layout.node(c.node), json.dumps(self._record()).encode(), self._lease)
        head, _ = self.etcd.get(self.layout.head)
        if head is not None:
            with self._cond:
                self.head = max(self.head, head.mod_revision)

    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                self._up()
            except EtcdUnavailable as exc:
                self._down(exc)
            except EtcdError as exc:
                log.warning("fleet: heartbeat: %s", exc)
            self._stop.wait(self.config.heartbeat)

    def nodes(self) -> list[NodeInfo]:
        kvs, _ = self.etcd.prefix(self.layout.nodes)
        head, _ = self.etcd.get(self.layout.head)
        head_rev = head.mod_revision if head is not None else 0
        now = time.time()
        out = []
        for kv in kvs:
            r = json.loads(kv.value)
            applied = int(r.get("applied_revision", 0))
            age = now - float(r.get("heartbeat", 0))
            lag = max(0, head_rev - applied)
            out.append(NodeInfo(
                name=r["name"], labels=r.get("labels", {}), applied_revision=applied,
                lag=lag, last_heartbeat=float(r.get("heartbeat", 0)),
                healthy=age < 3 * self.config.heartbeat + 1,
                store_reachable=True, resyncs=int(r.get("resyncs", 0)),
            ))
        return sorted(out, key=lambda n: n.name)
