"""The firewall service: the datapath and the database changed together, one change at a time.

Every mutation takes `self.lock`, and keeps one promise: after the call, whatever failed, the
database and the maps agree. Adds (and attaches) write the rows, then the maps, then COMMIT; a
map failure rolls the transaction back (the datapath has already undone its own partial work),
and a failed COMMIT (a full disk: StorageFull, HTTP 507) removes from the maps what the call
added before the error leaves (`_changing`). Removals (and detaches) COMMIT the delete first and
only then change the maps, so a full disk leaves the rule enforced with its counters; should
the maps then refuse, the rows are put back. Concurrent callers see some serial order of their
calls.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import filterfalse
from typing import TypeVar, overload

import numpy as np

from api.lookup import LookupAnswer
from api.lookup import lookup as lookup_packet
from api.ports import CounterArrays, DatapathPort
from api.store import (
    ANY_SOURCE,
    PROTECT_BASE,
    PROTECT_IDS,
    Rows,
    Store,
    StoredRule,
    is_protected_id,
)
from xdpfw import abi
from xdpfw import codes as wire  # the rule wire format ("codes" names the rules here)
from xdpfw.compiler import gc_paused, let_go
from xdpfw.datapath import Attachment, Ban, GlobalCounters, LimitCounters, RuleCounters
from xdpfw.errors import (
    InterfaceNotFound,
    InvalidRule,
    RuleConflict,
    RuleNotFound,
    SourceNotFound,
    XdpfwError,
)
from xdpfw.rules import (
    MAX_RULE_ID,
    Action,
    Limit,
    Network,
    Rule,
    RuleSpec,
    parse_network,
    rule_from_code,
)
from xdpfw.sources import DEFAULT_SOURCE, check_source
from xdpfw.xray.hub import Hub

API_RULE_ID = MAX_RULE_ID  # the last reserved id; protected prefixes count up from PROTECT_BASE

__all__ = [
    "API_RULE_ID",
    "LOOPBACK",
    "MAX_OVERLAPS",
    "PROTECT_BASE",
    "AddedRules",
    "BulkResult",
    "FirewallService",
    "Health",
    "InterfaceState",
    "NewCodes",
    "NewRule",
    "SourceChange",
    "SourceSummary",
    "api_allow_rule",
    "is_protected_id",
]

log = logging.getLogger("xdpfw.service")

# Verdicts that drop packets: a protected prefix refuses them (issue 16: limits drop too).
_DROPPING = (abi.VERDICT_DROP, abi.VERDICT_LIMIT)


@dataclass(frozen=True)
class NewRule:
    spec: RuleSpec
    comment: str = ""
    ttl_seconds: int | None = None
    force: bool = False
    source: str = DEFAULT_SOURCE  # the holder (xdpfw/sources.py)
    sample: int | None = None  # X-ray: sample 1 in `sample` frames of the rule


@dataclass(frozen=True)
class NewCodes:
    """Many rules with one comment, TTL and force, as codes (`RuleSpec.code()`): the fast
    form of a bulk load, which makes no RuleSpec per rule."""

    codes: Sequence[int]
    comment: str = ""
    ttl_seconds: int | None = None
    force: bool = False
    source: str = DEFAULT_SOURCE
    # A source load: entries overlapping a protected prefix are loaded anyway (protection
    # wins in the data plane) and reported, instead of refusing the batch (409).
    overlaps_ok: bool = False


MAX_OVERLAPS = 100  # overlapping entries named in one answer (`overlap_count` has them all)


class AddedRules(Sequence[StoredRule]):
    """The rules a bulk add made, as ids and codes; a StoredRule is built only when asked
    for (a million Rule objects cost seconds, and the bulk route needs only the ids)."""

    def __init__(
        self, ids: list[int], codes: list[int], comments: list[str], now: float,
        expiry: list[float | None], sources: list[str],
        limits: Mapping[int, Limit] | None = None,
    ) -> None:
        self.ids, self._codes, self._comments, self._now, self._expiry = (
            ids, codes, comments, now, expiry
        )
        self._sources = sources
        self._limits = limits or {}  # issue 16: the budgets of limit rules, by id

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> StoredRule: ...

    @overload
    def __getitem__(self, i: slice) -> list[StoredRule]: ...

    def __getitem__(self, i: int | slice) -> StoredRule | list[StoredRule]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        source = self._sources[i]
        rule = rule_from_code(self.ids[i], self._codes[i])
        return StoredRule(
            _with_limit(rule, self._limits.get(rule.id)), self._comments[i], self._now,
            self._expiry[i], source, (source,),
        )

    def __eq__(self, other: object) -> bool:  # as the list of StoredRules it stands for
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def release(self) -> None:
        """Free the columns a piece at a time (see compiler.let_go)."""
        let_go(self.ids, self._codes, self._comments, self._expiry, self._sources)


@dataclass(frozen=True)
class BulkResult:
    added: Sequence[StoredRule]
    duplicates: list[int]  # ids of existing identical rules (now held by this source too)
    overlaps: list[str] = field(default_factory=list)  # the first MAX_OVERLAPS, described
    overlap_count: int = 0

    @property
    def ids(self) -> list[int]:
        """The ids of the added rules, in input order."""
        if isinstance(self.added, AddedRules):
            return self.added.ids
        return [s.id for s in self.added]

    def release(self) -> None:
        """Free a big result in pieces, so the event loop keeps its turns."""
        if isinstance(self.added, AddedRules):
            self.added.release()
        elif isinstance(self.added, list):
            let_go(self.added)


@dataclass(frozen=True)
class SourceChange:
    """What a replace did: holdings added (new rules, or rules other sources held), removed
    (a rule leaves the kernel with its last holder), unchanged (rule id, counters kept)."""

    source: str
    added: int
    removed: int
    unchanged: int
    overlaps: list[str] = field(default_factory=list)
    overlap_count: int = 0


@dataclass(frozen=True)
class SourceSummary:
    """A source: its rules, and their counters summed (a rule shared with another source
    counts in both sums)."""

    name: str
    rules: int
    packets: int
    bytes: int
    last_hit: float | None
    updated_at: float


class _Overlaps:
    """Entries of a source load that overlap a protected prefix: counted, the first few
    described."""

    def __init__(self) -> None:
        self.count = 0
        self.shown: list[str] = []

    def note(self, code: int, problem: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_OVERLAPS:
            self.shown.append(f"{rule_from_code(1, code).describe()}: {problem}")


_PAUSE_ENV = "XDPFW_TEST_PAUSE"  # "replace=SECONDS" (inside a replace's transaction) or
# "replace-committed=SECONDS" (after its COMMIT, before the old-only rules leave the maps)


def _test_pause(where: str) -> None:
    """A test hook (tests/test_sources_e2e.py kills the server here): sleep at `where` when
    XDPFW_TEST_PAUSE names it. Unset in production: one getenv per replace."""
    spec = os.environ.get(_PAUSE_ENV, "")
    name, _, seconds = spec.partition("=")
    if name == where and seconds:
        log.warning("test pause: %s for %s s (%s)", where, seconds, _PAUSE_ENV)
        time.sleep(float(seconds))


class _CounterSums:
    """Counters summed per source, from one read of every rule's counters."""

    def __init__(self, svc: FirewallService) -> None:
        self._svc = svc
        ids, self._packets, self._bytes, self._last = svc.counter_arrays()
        self._order = np.argsort(ids, kind="stable")
        self._ids = ids[self._order]

    def of(self, name: str, held: Sequence[int], updated_at: float) -> SourceSummary:
        want = np.asarray(held, dtype=np.uint32)
        if not len(want) or not len(self._ids):
            return SourceSummary(name, len(held), 0, 0, None, updated_at)
        pos = np.minimum(np.searchsorted(self._ids, want), len(self._ids) - 1)
        pos = pos[self._ids[pos] == want]  # rules with counters (all, unless one is missing)
        sel = self._order[pos]
        packets = int(self._packets[sel].sum())
        nbytes = int(self._bytes[sel].sum())
        last_hit = None
        if len(sel) and int(self._last[sel].max()):
            rid = int(self._ids[pos[int(self._last[sel].argmax())]])
            c = self._svc.counters([rid]).get(rid)
            last_hit = c.last_hit if c is not None else None
        return SourceSummary(name, len(held), packets, nbytes, last_hit, updated_at)


@dataclass(frozen=True)
class InterfaceState:
    """A wanted (database) or actual (attached) interface; prog_id and ifindex 0 when not
    attached."""

    name: str
    attached: bool
    mode: str  # native|generic when attached, else the requested mode
    prog_id: int
    ifindex: int

    @classmethod
    def of(cls, a: Attachment) -> InterfaceState:
        return cls(a.ifname, True, a.mode, a.prog_id, a.ifindex)


@dataclass(frozen=True)
class Health:
    prog_id: int
    adopted: bool
    rules: int  # user rules (protected prefixes not counted)
    protected: list[str]
    interfaces: list[InterfaceState]
    capacity: dict[str, tuple[int, int]]  # table -> (entries, capacity)

    @property
    def ok(self) -> bool:
        """Every wanted interface runs our program (and there is at least one)."""
        return bool(self.interfaces) and all(i.attached for i in self.interfaces)


@dataclass(frozen=True)
class _Snapshot:
    """What /healthz reports from the service's own state, as of the end of a change."""

    rules: int
    capacity: dict[str, tuple[int, int]]
    interfaces: dict[str, str]  # wanted: name -> mode


class _PublishingLock:
    """The service's RLock; its outermost release first refreshes the health snapshot.

    Every change runs under the lock, so every change (whoever writes it) ends with a fresh
    snapshot, taken while the state it describes cannot move.
    """

    def __init__(self, publish: Callable[[], None]) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # only the owner touches it
        self._publish = publish

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._depth += 1
        return got

    def release(self) -> None:
        try:
            if self._depth == 1:
                self._publish()
        finally:
            self._depth -= 1
            self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


LOOPBACK = "lo"
LOOPBACK_REFUSED = (
    "xdpfw never filters the loopback interface: a drop rule there would cut the API and "
    "every local connection of this host; attach to the interfaces traffic arrives on"
)


def api_allow_rule(host: str, port: int) -> Rule | None:
    """The allow rule that keeps the API reachable: TCP to its listen address and port.

    A wildcard (0.0.0.0, ::) or a host name: any destination on that port. A loopback
    address: none (loopback traffic never crosses a filtered interface).
    """
    if host == "localhost":
        return None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None  # a name: whatever it resolves to
    if addr is not None and addr.is_loopback:
        return None
    dst = None if addr is None or addr.is_unspecified else addr.exploded
    spec = RuleSpec.parse(action=Action.ALLOW, dst=dst, proto="tcp", dport=port)
    return spec.with_id(API_RULE_ID)


def _with_limit(rule: Rule, limit: Limit | None) -> Rule:
    return rule if limit is None else dataclasses.replace(rule, limit=limit)


def _within(a: Network, b: Network) -> bool:
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False


_T = TypeVar("_T")
_PIECE = 1 << 16  # elements per C call in `_SourceDiff`


def _pieces(seq: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for i in range(0, len(seq), _PIECE):
        yield seq[i : i + _PIECE]


class _SourceDiff:
    """A uniform replace's set difference: which entries the source does not hold yet
    (`new`, in input order, repeats kept) and which held rules the new version lacks
    (`dropped`). A million entries cost three passes of set operations in C (one set of the
    held codes; a lookup of each entry in it; a discard of each entry from its copy) and no
    Python loop per entry; each C call takes a piece of `_PIECE`, since one over a million
    ints holds the GIL for longer than /healthz may wait."""

    def __init__(self, codes_of: Mapping[int, int], held_ids: Sequence[int],
                 codes: Sequence[int]) -> None:
        get = codes_of.get
        self.old: set[int | None] = set()  # None: a held rule the maps lack
        for piece in _pieces(held_ids):
            self.old.update(map(get, piece))
        self.new: list[int] = []
        gone = self.old.copy()
        for npiece in _pieces(codes):
            self.new.extend(filterfalse(self.old.__contains__, npiece))
            gone.difference_update(npiece)
        self._gone, self._held_ids, self._get = gone, held_ids, get

    def dropped(self, find: Callable[[int], int | None]) -> list[int]:
        """Ids (in id order) of the held rules whose code is not in the new version, or that
        are not in the maps at all."""
        out = [rid for code in self._gone if code is not None and (rid := find(code)) is not None]
        if None in self._gone:
            out.extend(rid for rid in self._held_ids if self._get(rid) is None)
        return sorted(out)


class FirewallService:
    """The face the routes use: rules, counters, interfaces and health. Routes never reach
    through it into the datapath (`self.dp`, a `DatapathPort`)."""

    def __init__(
        self,
        datapath: DatapathPort,
        store: Store,
        protect: Sequence[str] = (),
        api_listen: tuple[str, int] | None = None,
        fleet_protect: Sequence[str] = (),
    ) -> None:
        self.dp = datapath
        self.store = store
        if len(protect) > PROTECT_IDS - 1:
            raise InvalidRule("protect", f"at most {PROTECT_IDS - 1} protected prefixes")
        # Protected prefixes, two sets (the maps enforce the union): the node's own
        # (--protect: ids up from PROTECT_BASE, changed only by a restart) and the fleet's
        # (docs/fleet.md: ids down from API_RULE_ID - 1, changed by `set_fleet_protected`;
        # `fleet_protect` is the agent's cache, so a start-up reconcile keeps them).
        self.local_protected: list[Rule] = [
            RuleSpec.parse(action=Action.ALLOW, src=p).with_id(PROTECT_BASE + i)
            for i, p in enumerate(protect)
        ]
        self.fleet_protected: list[Rule] = self._fleet_rules(fleet_protect)
        # Interfaces: their own lock, so that the watchdog re-attaching one never waits on a
        # rule write (taken after `lock` where both are held); and the wanted set mirrored
        # from the database, so that the watchdog never reads the store outside `lock`.
        self._iface_lock = threading.Lock()
        self._wanted: dict[str, str] | None = None  # read from the store on first use
        self._reattached: dict[str, int] = {}
        self._watchdog_seen: float | None = None  # monotonic time of its last round
        # TCP to the API's own listen address and port, allowed above every drop rule, so no
        # rule can cut the control path (None: XDPFW_PROTECT_API=false, or loopback only).
        self.api_rule: Rule | None = api_allow_rule(*api_listen) if api_listen else None
        self._snapshot = _Snapshot(0, {}, {})
        self.lock = _PublishingLock(self._publish)
        self._publish()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.xray: Hub | None = None  # X-ray: the sample ring's reader (start_xray)

    # -- start-up ------------------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """Make the maps equal the database without touching rules that already agree.

        A new database (missing, empty, table-less, or made but never reconciled: see
        `Store.created`) next to maps that already hold rules (the database was lost) takes
        the maps' rules instead of wiping them: the kernel's state is not thrown away. A
        database that cannot be read raises StorageError before any map is touched.
        Rules are compared as codes (ints), so a million of them cost seconds and no objects.
        """
        with self.lock, gc_paused():
            self._reconcile_protected()
            in_maps = self.dp.compiler.codes()
            n_user = sum(1 for rid in in_maps if not is_protected_id(rid))
            if self.store.created and n_user and self.store.count() == 0:
                now = time.time()
                with self.store.transaction():
                    self.store.insert_codes(
                        ((rid, code, "adopted from pinned maps", now, None)
                         for rid, code in sorted(in_maps.items())
                         if not is_protected_id(rid)),
                        limits=self.dp.rule_limits(),  # issue 16: limit rules keep budgets
                    )
                    self.store.mark_reconciled()
                self.store.created = False
                log.warning("new database: adopted %d rules from the pinned maps", n_user)
                return {"adopted": n_user, "added": 0, "removed": 0}
            remove: list[int] = []
            add: list[Rule] = []
            agree = 0
            limits = self.store.limits()  # issue 16: a limit rule agrees only with its budget
            in_limits = self.dp.rule_limits() if limits else {}
            stored = dict(self.store.codes())
            if len(stored) == n_user and limits == in_limits and stored.items() <= in_maps.items():
                agree = n_user  # the usual start: every row agrees (compared in C, no loop)
                stored = {}
            for rid, code in stored.items():
                have = in_maps.get(rid)
                if have == code and in_limits.get(rid) == limits.get(rid):
                    agree += 1
                    continue
                if have is not None:
                    remove.append(rid)
                add.append(_with_limit(rule_from_code(rid, code), limits.get(rid)))
            del stored
            if agree + len(remove) < n_user:  # rules in the maps that the database lacks
                known = set(self.store.ids())
                remove.extend(
                    rid for rid in in_maps if rid not in known and not is_protected_id(rid)
                )
            if remove:
                self.dp.remove_rules(remove)
            if add:
                self.dp.add_rules(add)
            if self.store.created:
                with self.store.transaction():
                    self.store.mark_reconciled()
                self.store.created = False
            return {"adopted": 0, "added": len(add), "removed": len(remove)}

    @property
    def protected(self) -> list[Rule]:
        """Every protected prefix's allow rule: the node's own, then the fleet's."""
        return self.local_protected + self.fleet_protected

    def _fleet_rules(self, prefixes: Sequence[str]) -> list[Rule]:
        """Allow rules for the fleet's prefixes, the node's own left out (one rule each);
        a prefix the fleet protected already keeps its id (and its counters)."""
        local = {r.src for r in self.local_protected}
        have = {r.src: r for r in getattr(self, "fleet_protected", [])}
        nets: list[Network] = []
        for text in prefixes:
            net = parse_network(text, "protected")
            if net not in local and net not in nets:
                nets.append(net)
        if len(local) + len(nets) > PROTECT_IDS - 1:
            raise InvalidRule("protected", f"at most {PROTECT_IDS - 1} protected prefixes "
                              f"(this node's own {len(local)} included)")
        # ids in use: the node's own and every current fleet rule (a removed one's id is
        # not handed out again in the same change)
        used = {r.id for r in self.local_protected} | {r.id for r in have.values()}
        free = (rid for rid in range(API_RULE_ID - 1, PROTECT_BASE - 1, -1) if rid not in used)
        return [have[n] if n in have else
                RuleSpec.parse(action=Action.ALLOW, src=n.with_prefixlen).with_id(next(free))
                for n in nets]

    def set_fleet_protected(self, prefixes: Sequence[str]) -> list[str]:
        """Make the fleet's protected prefixes these (InvalidRule: a bad one, nothing
        changed). A new prefix's allow rule is in the maps before this returns, and before
        any rule applied after it; a prefix no longer listed loses its rule, unless it is
        also one of the node's own (--protect), which nothing but a restart removes; the
        API port's rule is never touched. The fleet's prefixes, as enforced."""
        with self.lock:
            want = self._fleet_rules(prefixes)
            before = {r.id: r for r in self.fleet_protected}
            new = [r for r in want if r.id not in before]
            gone = [r for rid, r in before.items() if rid not in {w.id for w in want}]
            for r in new:  # a user rule identical to a protected one would be a duplicate
                dup = self.dp.compiler.find_duplicate(r)
                if dup is not None and not is_protected_id(dup):
                    log.warning("protected rule (%s) replaces identical rule %d",
                                r.describe(), dup)
                    self._remove([dup])
            if new:
                self.dp.add_rules(new)
            self.fleet_protected = [*want, *gone]  # gone: enforced until the maps drop it
            if gone:
                self.dp.remove_rules([r.id for r in gone])
            self.fleet_protected = want
            for r in new:
                log.info("fleet: protected %s (rule %d)", r.describe(), r.id)
            for r in gone:
                log.warning("fleet: %s is no longer protected by the fleet: drop rules over "
                            "it apply again", r.describe())
            return [r.src.with_prefixlen for r in want if r.src is not None]

    @property
    def reserved(self) -> list[Rule]:
        """The service's own allow rules (protected prefixes, the API port): maps only."""
        return self.protected + ([self.api_rule] if self.api_rule is not None else [])

    def _reconcile_protected(self) -> None:
        """Protected prefixes as allow rules, first: the one thing that must never be missing."""
        self._warn_unprotected()
        rules = self.dp.compiler.rules
        have = {rid: rules[rid] for rid in range(PROTECT_BASE, MAX_RULE_ID + 1) if rid in rules}
        want = {r.id: r for r in self.reserved}
        stale = [rid for rid, r in have.items() if want.get(rid) != r]
        if stale:
            self.dp.remove_rules(stale)
        new = [r for rid, r in want.items() if have.get(rid) != r]
        # A user allow rule identical to a protected one would be a duplicate in the maps.
        clash = [r for r in new if self.dp.compiler.find_duplicate(r) is not None]
        for r in clash:
            dup = self.dp.compiler.find_duplicate(r)
            assert dup is not None
            log.warning("protected rule (%s) replaces identical rule %d", r.describe(), dup)
            self._remove([dup])
        if new:
            self.dp.add_rules(new)

    def _check_protected_code(self, code: int) -> None:
        problem = self._overlap(code)
        if problem is not None:
            raise RuleConflict(
                f"{problem}; protected sources are never dropped (they are allowed above "
                'every drop rule). Send "force": true to add it anyway.'
            )

    def _overlap(self, code: int) -> str | None:
        """How a drop (or limit) rule overlaps a protected prefix, or None."""
        if wire.verdict(code) not in _DROPPING or not self.protected:
            return None
        key = wire.key(code)
        direction = wire.key_dir(key)
        v6 = wire.key_v6(key)
        bits = wire.key_bits(key)
        plen = wire.key_plen(key)
        addr = wire.key_addr(key)
        for p in self.protected:
            net = p.src
            assert net is not None
            if direction != wire.DIR_SRC:  # no source named (no address, or a dst)
                if direction and (net.version == 6) != v6:
                    continue  # a dst of the other family never sees these sources
                hit = "names no source, so it matches every source, including"
            elif (net.version == 6) == v6 and (
                addr >> (bits - (m := min(plen, net.prefixlen)))
                == int(net.network_address) >> (bits - m)
            ):
                src = rule_from_code(1, code).src
                assert src is not None
                hit = f"source {src.with_prefixlen} overlaps"
            else:
                continue
            kind = "limit" if wire.verdict(code) == abi.VERDICT_LIMIT else "drop"
            return f"this {kind} rule {hit} the protected prefix {net.with_prefixlen}"
        return None

    def _warn_unprotected(self) -> None:
        """Say at start when prefixes protected last time are not now and drop rules hit them.

        A drop rule forced over a protected prefix did nothing while the prefix was protected;
        started without that --protect, it drops those sources now. The current prefixes are
        recorded for the next start.
        """
        now = [p.src for p in self.protected if p.src is not None]
        before = self.store.protected_prefixes()
        lost = []
        for text in before:
            try:
                net = parse_network(text, "protect")
            except InvalidRule:
                continue
            if not any(_within(net, n) for n in now):
                lost.append(net)
        if lost:
            hits = dict.fromkeys(lost, 0)
            for _, code in self.store.codes():
                if wire.verdict(code) not in _DROPPING:
                    continue
                rule = rule_from_code(1, code)
                for net in lost:
                    if rule.src is not None:
                        hit = rule.src.overlaps(net)  # another family: False
                    else:  # every source of the rule's family (both when it names none)
                        hit = rule.dst is None or rule.dst.version == net.version
                    hits[net] += hit
            for net, n in hits.items():
                if n:
                    log.warning(
                        "%s was protected at the last start and is not now (no --protect %s): "
                        "%d stored drop rule(s) now apply to it; protect it again or remove "
                        "them if that is not what you want",
                        net.with_prefixlen, net.with_prefixlen, n,
                    )
        texts = [n.with_prefixlen for n in now]
        if texts != before:
            try:
                with self.store.transaction():
                    self.store.set_protected_prefixes(texts)
            except sqlite3.Error as exc:  # a record for the next start: never fatal
                log.warning("could not record the protected prefixes in the database: %s", exc)

    # -- rules ---------------------------------------------------------------------------------

    def add(self, new: NewRule) -> tuple[StoredRule, bool]:
        """Add a rule held by `new.source`. An identical one (match, action, mode) is not made
        again: the source holds the existing one (a TTL given sets that holding's new expiry;
        without one, a holding the source has stays as it is) and it is returned,
        created=False."""
        with self.lock:  # the duplicate must not vanish before we read it back
            result = self.bulk_add([new])
            if result.added:
                return result.added[0], True
            existing = self.store.get(result.duplicates[0], new.source)
        assert existing is not None
        return existing, False

    def bulk_add(self, items: Sequence[NewRule]) -> BulkResult:
        """All or nothing. Duplicates of existing rules (or within the batch) make no new
        rule; each item's source holds the rule (a new holding, or its expiry refreshed)."""
        with self.lock:
            result = self._add_codes(
                [item.spec.code() for item in items],
                [item.comment for item in items],
                [item.ttl_seconds for item in items],
                [item.force for item in items],
                [item.source for item in items],
                limits=[item.spec.limit for item in items],
            )
            self._sample_added(items)  # X-ray
            return result

    def bulk_add_codes(self, batch: NewCodes) -> BulkResult:
        """`bulk_add` for rules given as codes, sharing one comment, TTL, force and source."""
        n = len(batch.codes)
        return self._add_codes(
            batch.codes, [batch.comment] * n, [batch.ttl_seconds] * n, [batch.force] * n,
            [batch.source] * n, lenient=batch.overlaps_ok,
        )

    def _add_codes(
        self,
        codes: Sequence[int],
        comments: Sequence[str],
        ttls: Sequence[int | None],
        forces: Sequence[bool],
        sources: Sequence[str],
        *,
        lenient: bool = False,
        limits: Sequence[Limit | None] | None = None,
    ) -> BulkResult:
        for name in set(sources):
            check_source(name)
        with self.lock, gc_paused():
            now = time.time()
            find = self.dp.compiler.find_code
            fresh: list[int] = []  # indexes into codes
            dups: list[int] = []  # ids of existing identical rules
            holds: list[tuple[int, int]] = []  # (index, existing id): holdings of existing rules
            again: list[tuple[int, int]] = []  # (index, position in fresh): repeats in the batch
            seen: dict[int, int] = {}  # code -> position in fresh
            overlaps = _Overlaps()
            for i, code in enumerate(codes):
                if not forces[i]:
                    problem = self._overlap(code)
                    if problem is not None:
                        if not lenient:
                            self._check_protected_code(code)
                        overlaps.note(code, problem)
                existing = find(code)
                if existing is not None and is_protected_id(existing):
                    what = "the API's own port" if existing == API_RULE_ID else "a protected prefix"
                    if lenient:
                        overlaps.note(code, f"it is {what}, allowed already: not added")
                        continue
                    raise RuleConflict(
                        f"{rule_from_code(1, code).describe()} is {what}: it is allowed already"
                    )
                if limits is not None and (lim := limits[i]) is not None:
                    self._check_limit_duplicate(existing, lim)
                if existing is not None:
                    dups.append(existing)
                    holds.append((i, existing))
                elif code in seen:
                    again.append((i, seen[code]))
                else:
                    seen[code] = len(fresh)
                    fresh.append(i)

            def expiry(i: int) -> float | None:
                ttl = ttls[i]
                return now + ttl if ttl else None

            with self._changing("an add") as undo:
                ids = self.store.next_ids(len(fresh))
                got = {} if limits is None else {
                    rid: lim for i, rid in zip(fresh, ids, strict=True)
                    if (lim := limits[i]) is not None
                }
                new_rows: dict[str, list[tuple[int, int, str, float, float | None]]] = {}
                for i, rid in zip(fresh, ids, strict=True):
                    new_rows.setdefault(sources[i], []).append(
                        (rid, codes[i], comments[i], now, expiry(i))
                    )
                for name, rows in new_rows.items():
                    mine = {rid: got[rid] for rid, *_ in rows if rid in got} if got else None
                    self.store.insert_codes(rows, name, mine)
                held: dict[str, list[tuple[int, str, float, float | None]]] = {}
                for i, rid in [*holds, *((i, ids[pos]) for i, pos in again)]:
                    held.setdefault(sources[i], []).append((rid, comments[i], now, expiry(i)))
                for name, hrows in held.items():
                    self.store.hold(name, hrows)
                    self.store.touch(name, now)
                new_codes = [codes[i] for i in fresh]
                if got:  # limit rules carry budgets: the path that writes xdpfw_limits
                    self.dp.add_rules([
                        _with_limit(rule_from_code(rid, code), got.get(rid))
                        for rid, code in zip(ids, new_codes, strict=True)
                    ])
                elif fresh:
                    self.dp.add_codes(ids, new_codes)  # the columnar bulk path (no Rule objects)
                if fresh:
                    undo.append(lambda: self.dp.remove_rules(ids))
            added = AddedRules(
                ids, new_codes, [comments[i] for i in fresh], now, [expiry(i) for i in fresh],
                [sources[i] for i in fresh], got,
            )
            dups.extend(ids[pos] for _, pos in again)
            return BulkResult(added, dups, overlaps.shown, overlaps.count)

    # -- rate limits (issue 16) ------------------------------------------------------------------

    def _check_limit_duplicate(self, existing: int | None, limit: Limit) -> None:
        """A limit rule whose match exists already with another budget is a conflict."""
        if existing is None:
            return
        have = self.dp.rule_limits().get(existing)
        if have is not None and have != limit:
            raise RuleConflict(
                f"rule {existing} has this match with another limit ({have}); remove it "
                "first to change the budget"
            )

    def limit_counters(self, rule_ids: Sequence[int] | None = None) -> dict[int, LimitCounters]:
        return self.dp.limit_counters(rule_ids)

    def bans(self) -> list[Ban]:
        with self.lock:
            return self.dp.bans()

    def unban(self, source: str | None = None, rule_id: int | None = None) -> int:
        with self.lock:
            return self.dp.unban(source, rule_id)

    @contextmanager
    def _changing(self, what: str) -> Iterator[list[Callable[[], object]]]:
        """A database transaction around map changes, COMMIT last. The body appends the undo
        of each map change it made; if anything fails after one (the COMMIT on a full disk),
        the undos run, newest first, before the error leaves: the maps are as they were."""
        undo: list[Callable[[], object]] = []
        try:
            with self.store.transaction():
                yield undo
        except BaseException as exc:
            for fn in reversed(undo):
                try:
                    fn()
                except Exception as again:  # both sides failed: only a restart reconciles
                    log.critical(
                        "could not undo the map change of %s after %s: %s; the maps and the "
                        "database disagree until the next start reconciles them", what, exc,
                        again,
                    )
            raise

    def remove(self, rule_ids: Sequence[int]) -> list[Rule]:
        """Remove rules by id, whoever holds them (every holding goes)."""
        with self.lock, gc_paused():
            for rid in rule_ids:
                if rid not in self.dp.compiler.rules or is_protected_id(rid):
                    raise RuleNotFound(rid)
            return self._remove(rule_ids)

    def _remove(self, rule_ids: Sequence[int]) -> list[Rule]:
        return self._release(ANY_SOURCE, rule_ids)[1]

    def _release(
        self, source: str | int, rule_ids: Sequence[int], *, forget: bool = False
    ) -> tuple[int, list[Rule]]:
        """`source` (ANY_SOURCE: every source) lets these rules go; a rule no source holds any
        more leaves the maps. (holdings removed, rules removed). `forget`: the source's own
        row goes too (it is deleted).

        The delete is committed first, the maps changed after: a full disk fails before
        the kernel is touched (the rule stays enforced, its counters kept). If the maps then
        refuse (the datapath undid its own part), the rows are put back as they were."""
        rows = self.store.rows(rule_ids)
        with self.store.transaction():
            n, orphans = self.store.release(source, rule_ids)
            if isinstance(source, str):
                if forget:
                    self.store.drop_source_row(source)
                else:
                    self.store.touch(source, time.time())
        return n, self._unmap(orphans, rows)

    def _unmap(self, orphans: Sequence[int], rows: Rows) -> list[Rule]:
        """Remove from the maps rules whose rows are deleted and committed; if the maps refuse,
        put `rows` back (the rules and holdings as they were before the change)."""
        if not orphans:
            return []
        try:
            return self.dp.remove_rules(orphans)
        except BaseException as exc:
            try:
                with self.store.transaction():
                    self.store.restore(rows)  # with their extras (issue 16)
            except Exception as again:  # both sides failed: only a restart reconciles
                log.critical(
                    "could not restore %d rule row(s) after the maps refused their removal "
                    "(%s): %s; the next start reconciles the maps with the database",
                    len(rows.rules), exc, again,
                )
            raise

    def get(self, rule_id: int) -> StoredRule:
        with self.lock:
            stored = self.store.get(rule_id)
        if stored is None:
            raise RuleNotFound(rule_id)
        return stored

    def page(self, after: int, limit: int, source: str | None = None) -> list[StoredRule]:
        """Rules in id order after `after`: every rule, or those `source` holds."""
        if source is not None:
            check_source(source)
        with self.lock:
            return self.store.page(after, limit, source)

    def expire_due(self, now: float | None = None) -> list[int]:
        """Remove the holdings whose TTL has passed; ids of the rules that left the maps
        (those no other source holds)."""
        with self.lock, gc_paused():
            due = [(s, rid) for s, rid in self.store.due(now) if rid in self.dp.compiler.rules]
            if not due:
                return []
            rows = self.store.rows(sorted({rid for _, rid in due}))
            with self.store.transaction():
                _, orphans = self.store.release_pairs(due)
            gone = [r.id for r in self._unmap(orphans, rows)]
            log.info("expired %d holding(s); %d rule(s) left the maps: %s", len(due), len(gone),
                     gone[:20])
            return sorted(gone)

    # -- sources (xdpfw/sources.py) ------------------------------------------------------------

    def replace_source(self, name: str, batch: NewCodes | Sequence[NewRule]) -> SourceChange:
        """Make `name` hold exactly these rules, as one change.

        Unchanged holdings stay (rule id, counters, last hit); rules new to the maps are added
        FIRST, the rules only the old version held removed after the COMMIT: an address in
        both versions is never passed, one only in the new version is dropped when this
        returns. Entries overlapping a protected prefix are loaded (protection wins in the
        data plane) and reported. All or nothing: a full table (507) or a full disk (507)
        leaves the source as it was; a kill before the COMMIT leaves the old version, after
        it the new one (the start-up reconcile makes the maps equal the database).
        """
        check_source(name)
        if isinstance(batch, NewCodes):
            codes: Sequence[int] = batch.codes
            uniform: tuple[str, int | None] | None = (batch.comment, batch.ttl_seconds)
            comments: Sequence[str] = ()
            ttls: Sequence[int | None] = ()
            limits: Sequence[Limit | None] = ()
        else:
            codes = [item.spec.code() for item in batch]
            comments = [item.comment for item in batch]
            ttls = [item.ttl_seconds for item in batch]
            limits = [item.spec.limit for item in batch]  # issue 16: budgets of limit rules
            uniform = None
        with self.lock, gc_paused():
            now = time.time()
            find = self.dp.compiler.find_code
            held_ids = self.store.held(name)
            fresh: list[int] = []  # indexes of entries that make new rules
            keep: dict[int, int] = {}  # existing rule id -> index of its entry
            seen: set[int] = set()
            overlaps = _Overlaps()
            # A uniform batch is a diff: the entries the source holds already (most of a
            # refresh) keep their holding as it is (`refresh` below gives them the new comment
            # and expiry in one statement), so only the others go through the per-entry checks.
            # Per-entry comments and TTLs (a list of NewRule) need every holding written anyway.
            diff = None
            old: set[int | None] = set()
            if uniform is not None:
                diff = _SourceDiff(self.dp.compiler.codes(), held_ids, codes)
                old = diff.old
                if not self.protected:  # with protected prefixes every entry is checked
                    codes = diff.new
            for i, code in enumerate(codes):
                if code in seen:
                    continue
                seen.add(code)
                problem = self._overlap(code)
                if code in old:  # held already (only with protected prefixes: see above)
                    if problem is not None:
                        overlaps.note(code, problem)
                    continue
                existing = find(code)
                if existing is not None and is_protected_id(existing):
                    what = "the API's own port" if existing == API_RULE_ID else "a protected prefix"
                    overlaps.note(code, f"it is {what}, allowed already: not added")
                    continue
                if problem is not None:
                    overlaps.note(code, problem)
                if limits and (lim := limits[i]) is not None:
                    self._check_limit_duplicate(existing, lim)
                if existing is None:
                    fresh.append(i)
                else:
                    keep[existing] = i
            if diff is not None:
                drop = diff.dropped(find)
                held: set[int] = set()  # on this path `keep` has no rule the source held
            else:
                held = set(held_ids)
                drop = sorted(held - keep.keys())
            unchanged = len(held_ids) - len(drop)

            def comment(i: int) -> str:
                return uniform[0] if uniform is not None else comments[i]

            def expiry(i: int) -> float | None:
                ttl = uniform[1] if uniform is not None else ttls[i]
                return now + ttl if ttl else None

            rows = self.store.rows(drop)
            with self._changing(f"a replace of source {name}") as undo:
                ids = self.store.next_ids(len(fresh))
                got = {
                    rid: lim for i, rid in zip(fresh, ids, strict=True)
                    if limits and (lim := limits[i]) is not None
                }
                self.store.insert_codes(
                    ((rid, codes[i], comment(i), now, expiry(i))
                     for i, rid in zip(fresh, ids, strict=True)),
                    name,
                    got or None,
                )
                if uniform is not None:  # one statement refreshes the kept holdings
                    self.store.hold(
                        name, ((rid, comment(i), now, expiry(i)) for rid, i in keep.items())
                    )
                    self.store.refresh(name, uniform[0], expiry(0))
                else:
                    self.store.hold(name, ((rid, comment(i), now, expiry(i))
                                           for rid, i in keep.items()), exact=True)
                _, orphans = self.store.release(name, drop) if drop else (0, [])
                self.store.touch(name, now)
                if got:  # limit rules carry budgets: the path that writes xdpfw_limits
                    self.dp.add_rules([
                        _with_limit(rule_from_code(rid, codes[i]), got.get(rid))
                        for i, rid in zip(fresh, ids, strict=True)
                    ])
                elif fresh:  # the columnar bulk path (no Rule objects)
                    self.dp.add_codes(ids, [codes[i] for i in fresh])
                if fresh:
                    undo.append(lambda: self.dp.remove_rules(ids))
                _test_pause("replace")
            _test_pause("replace-committed")  # committed; the old-only rules still in the maps
            self._unmap(orphans, rows)
            return SourceChange(
                name, len(fresh) + len(keep) - len(held & keep.keys()), len(drop), unchanged,
                overlaps.shown, overlaps.count,
            )

    def remove_where(
        self, src: str | None = None, dst: str | None = None, source: str | None = None
    ) -> int:
        """Delete by value: the holdings of the rules whose src (and/or dst) is exactly this
        network (any action, mode, proto, port), of `source` only when named. A rule leaves
        the kernel when its last holder goes. Returns the holdings removed (0: none matched)."""
        if src is None and dst is None:
            raise InvalidRule("src", "name the rules to remove by src, dst or both")
        src_text = parse_network(src, "src").with_prefixlen if src is not None else None
        dst_text = parse_network(dst, "dst").with_prefixlen if dst is not None else None
        if source is not None:
            check_source(source)
        with self.lock, gc_paused():
            ids = self.store.matching(src_text, dst_text, source)
            if not ids:
                return 0
            return self._release(source if source is not None else ANY_SOURCE, ids)[0]

    def sources_where(self, src: str | None = None, dst: str | None = None) -> set[str]:
        """The sources holding a rule that `remove_where(src, dst)` would match (fleet mode,
        issue 19: which lists a delete by value has to rewrite in etcd)."""
        src_text = parse_network(src, "src").with_prefixlen if src is not None else None
        dst_text = parse_network(dst, "dst").with_prefixlen if dst is not None else None
        if src_text is None and dst_text is None:
            raise InvalidRule("src", "name the rules to remove by src, dst or both")
        with self.lock:
            out: set[str] = set()
            for rid in self.store.matching(src_text, dst_text, None):
                stored = self.store.get(rid)
                if stored is not None:
                    out.update(stored.sources)
            return out

    def drop_source(self, name: str) -> int:
        """Delete a source: its holdings go (a rule another source holds stays). The holdings
        removed; SourceNotFound if there is no such source."""
        check_source(name)
        with self.lock, gc_paused():
            if self.store.source(name) is None:
                raise SourceNotFound(name)
            return self._release(name, self.store.held(name), forget=True)[0]

    def sources(self) -> list[SourceSummary]:
        with self.lock:
            rows = self.store.sources()
            held = {r.name: self.store.held(r.name) for r in rows}
        sums = _CounterSums(self)
        return [sums.of(r.name, held[r.name], r.updated_at) for r in rows]

    def source(self, name: str) -> SourceSummary:
        check_source(name)
        with self.lock:
            row = self.store.source(name)
            if row is None:
                raise SourceNotFound(name)
            held = self.store.held(name)
        return _CounterSums(self).of(name, held, row.updated_at)

    # -- lookup (api/lookup.py) -----------------------------------------------------------

    def lookup(
        self,
        src: str,
        dst: str | None = None,
        proto: str | int | None = None,
        dport: int | None = None,
        tcp_flags: str | None = None,
    ) -> LookupAnswer:
        """The verdict the data plane gives such a packet, the credited rule, every match."""
        return lookup_packet(self, src, dst, proto, dport, tcp_flags)

    # -- TTL sweeper ---------------------------------------------------------------------------

    def start_sweeper(self, interval: float) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.expire_due()
                except XdpfwError as exc:  # a full disk: nothing changed, retried next sweep
                    log.error("TTL sweep failed: %s", exc)
                except Exception:  # keep sweeping; the error is logged with its traceback
                    log.exception("TTL sweep failed")

        self._sweeper = threading.Thread(target=run, name="xdpfw-ttl", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)

    # -- counters and health ------------------------------------------------------------------

    def counters(self, rule_ids: Sequence[int] | None = None) -> dict[int, RuleCounters]:
        return self.dp.rule_counters(rule_ids)

    def top_counters(self, n: int | None = None) -> list[tuple[int, RuleCounters]]:
        """Rules by packets, most first (ties: lower id first); the first n, or all."""
        return self.dp.top_counters(n)

    def counter_arrays(self) -> CounterArrays:
        """(rule ids, packets, bytes, last hit ns) of every rule: /metrics without objects."""
        return self.dp.counter_arrays()

    def totals(self) -> GlobalCounters:
        return self.dp.global_counters()

    def table_usage(self) -> dict[str, tuple[int, int]]:
        """(entries, capacity) per kernel table, plus `rules` and `xdpfw_sets`."""
        return self.dp.table_usage()

    def health(self) -> Health:
        """Never waits on `self.lock`: counts and wanted interfaces come from the snapshot
        taken when the last change finished (a change in progress is not half counted), the
        attachments from netlink now."""
        snap = self._snapshot  # one reference: a consistent state between two changes
        return Health(
            prog_id=self.dp.prog_id,
            adopted=self.dp.adopted,
            rules=snap.rules,
            protected=[p.src.with_prefixlen for p in self.protected if p.src is not None],
            interfaces=self._merge_states(snap.interfaces),
            capacity=dict(snap.capacity),
        )

    def _publish(self) -> None:
        """Snapshot what health reports; called with the lock held, as each change ends."""
        try:
            self._snapshot = _Snapshot(
                rules=len(self.dp.compiler) - len(self.reserved),
                capacity=self.dp.table_usage(),
                interfaces=self.store.interfaces(),
            )
        except Exception:  # keep the last snapshot; the change itself has its own outcome
            log.exception("could not refresh the health snapshot")

    # -- interfaces ----------------------------------------------------------------------------

    def attach(self, name: str, mode: str) -> Attachment:
        """Row, attach, COMMIT; a failed COMMIT detaches again what this call attached."""
        if name == LOOPBACK:
            raise InvalidRule("name", LOOPBACK_REFUSED)
        with self.lock, self._iface_lock:
            before = {a.ifname for a in self.dp.attachments()}
            with self._changing(f"attaching {name}") as undo:
                self.store.set_interface(name, mode)
                att = self.dp.attach(name, mode)
                if name not in before:
                    undo.append(lambda: self.dp.detach(name))
            if self._wanted is not None:
                self._wanted[name] = mode
            return att

    def forget_loopback(self) -> bool:
        """Detach from `lo` if an earlier version attached there (and forget it): True if so."""
        with self.lock:
            wanted = LOOPBACK in self.store.interfaces()
            attached = LOOPBACK in {a.ifname for a in self.dp.attachments()}
            if not (wanted or attached):
                return False
            self.detach(LOOPBACK)
        log.warning("detached from lo (attached earlier): %s", LOOPBACK_REFUSED)
        return True

    def detach(self, name: str) -> None:
        """COMMIT the row's removal, then detach; if the detach fails, the row is put back."""
        with self.lock, self._iface_lock:
            wanted = self.store.interfaces()
            if name not in wanted and name not in {a.ifname for a in self.dp.attachments()}:
                raise InterfaceNotFound(name, "xdpfw is not attached to it")
            with self.store.transaction():
                self.store.drop_interface(name)
            try:
                self.dp.detach(name)
            except BaseException as exc:
                if name in wanted:
                    try:
                        with self.store.transaction():
                            self.store.set_interface(name, wanted[name])
                    except Exception as again:
                        log.critical(
                            "could not restore interface %s after its detach failed (%s): %s",
                            name, exc, again,
                        )
                raise
            if self._wanted is not None:
                self._wanted.pop(name, None)

    # -- self-healing (api/watchdog.py) --------------------------------------------------------

    def wanted_interfaces(self) -> dict[str, str]:
        """name -> mode of every interface the database says to filter. Never waits on a
        rule write (a mirror of the interfaces table, kept by attach/detach)."""
        wanted = self._wanted_now()
        with self._iface_lock:
            return dict(wanted)

    def _wanted_now(self) -> dict[str, str]:
        if self._wanted is None:  # once: the watchdog's first look, after start-up
            with self.lock, self._iface_lock:
                if self._wanted is None:
                    self._wanted = self.store.interfaces()
        return self._wanted

    def reattach(self, name: str) -> Attachment | None:
        """Attach our program again to a wanted interface that lost it; None when the
        interface is no longer wanted (detached meanwhile). Counted in `reattach_counts`.
        ForeignProgram / InterfaceNotFound leave as they are: nothing is replaced."""
        wanted = self._wanted_now()
        with self._iface_lock:
            mode = wanted.get(name)
            if mode is None:
                return None
            att = self.dp.attach(name, mode)
            self._reattached[name] = self._reattached.get(name, 0) + 1
            return att

    def watchdog_beat(self) -> None:
        """The watchdog is alive (it calls this every round)."""
        self._watchdog_seen = time.monotonic()

    def watchdog_age(self) -> float | None:
        """Seconds since the watchdog's last round; None when no watchdog runs."""
        seen = self._watchdog_seen
        return None if seen is None else time.monotonic() - seen

    def reattach_counts(self) -> dict[str, int]:
        """Repairs per interface since start (0 for a wanted interface never repaired)."""
        wanted = self._wanted_now()
        with self._iface_lock:
            return {n: self._reattached.get(n, 0) for n in sorted(wanted | self._reattached)}

    def interfaces(self) -> dict[str, str]:
        with self.lock:
            return self.store.interfaces()

    def attachments(self) -> list[Attachment]:
        """Interfaces where our program is attached now."""
        return self.dp.attachments()

    def interface_states(self) -> list[InterfaceState]:
        """Wanted interfaces (database) and actual attachments, merged, by name."""
        return self._merge_states(self.interfaces())

    def _merge_states(self, wanted: dict[str, str]) -> list[InterfaceState]:
        attached = {a.ifname: a for a in self.attachments()}
        out = [InterfaceState.of(a) for a in attached.values()]
        for name, mode in sorted(wanted.items()):
            if name not in attached:
                out.append(InterfaceState(name, False, mode, 0, 0))
        return sorted(out, key=lambda i: i.name)

    # -- X-ray (issue 17): sampled frames ------------------------------------------------------

    def start_xray(self, max_pps: int, snaplen: int) -> Hub:
        """The cap and snap length into the kernel, the stored sample settings into the maps
        (a map write: no reload), and the thread that reads the ring."""
        with self.lock:
            self.dp.sample_configure(max_pps, snaplen)
            want: dict[int, int | None] = dict(self.store.samples())
            rules = self.dp.compiler.rules
            want = {rid: n for rid, n in want.items() if rid in rules}
            for rid in self.dp.sample_rules():
                want.setdefault(rid, None)  # in the maps, not in the database
            if want:
                self.dp.sample_set(want)
        self.xray = Hub(self.dp.sample_ring, self.rule_sources)
        self.xray.start()
        return self.xray

    def stop_xray(self) -> None:
        if self.xray is not None:
            self.xray.stop()

    def rule_sources(self, rule_id: int) -> list[str]:
        """The sources holding a rule (the `source` filter of /v1/events)."""
        if is_protected_id(rule_id):
            return []
        with self.lock:  # the store is not thread-safe: the hub's thread asks
            stored = self.store.get(rule_id)
        if stored is None:
            return []
        held = getattr(stored, "sources", None)  # issue 13: a rule held by several sources
        if held:
            return [str(x) for x in held]
        return [str(getattr(stored, "source", "api"))]

    def set_sample(self, rule_id: int, every: int | None) -> None:
        """Sample a rule 1 in `every` frames (None: stop). Database and map together."""
        with self.lock:
            if rule_id not in self.dp.compiler.rules or is_protected_id(rule_id):
                raise RuleNotFound(rule_id)
            before = self.dp.sample_rules().get(rule_id)
            with self._changing("setting sampling") as undo:
                self.store.set_samples({rule_id: every})
                self.dp.sample_set({rule_id: every})
                undo.append(lambda: self.dp.sample_set({rule_id: before}))

    def sample_rules(self) -> dict[int, int]:
        """rule id -> every, of each sampled rule."""
        return self.dp.sample_rules()

    def sample_of(self, rule_id: int) -> int | None:
        """`every` of a sampled rule, None when it is not sampled."""
        return self.dp.sample_rules().get(rule_id)

    def sample_settings(self) -> tuple[int, int]:
        """(snap length, cap per second) in force."""
        return self.dp.sample_settings()

    def sample_stats(self) -> dict[str, int]:
        """sent, lost_ring, lost_cap (kernel) and lost_client (slow subscribers)."""
        out = dict(self.dp.sample_stats())
        out["lost_client"] = self.xray.lost_client if self.xray is not None else 0
        return out

    def sample_streams(self) -> int:
        """Open /v1/events streams."""
        return self.xray.subscribers if self.xray is not None else 0

    def _sample_added(self, items: Sequence[NewRule]) -> None:
        """The `sample` of rules just added (or found identical): with the lock held."""
        want = {}
        for item in items:
            if item.sample is not None:
                rid = self.dp.compiler.find_code(item.spec.code())
                if rid is not None and not is_protected_id(rid):
                    want[rid] = item.sample
        if want:
            with self._changing("setting sampling"):
                self.store.set_samples(dict(want))
                self.dp.sample_set(dict(want))
