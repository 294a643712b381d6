"""Datapath: the narrow face the service uses; the parts live in the modules beside it.

Opening (load or adopt, upgrade), lifetime and the lock are here; everything else is
delegated: pins.py (pin sets, the ABI check), attach.py (netlink), writer.py (plans into the
maps), sets.py and counters.py (allocators), d248.py (the IPv4 prefix arrays), adopt.py
(reading pinned maps back). Read paths translate kernel errors at this door (KernelError),
so callers never see an OSError or a netlink error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.compiler import Capacities, RuleCompiler, TableKey, gc_paused, let_go
from xdpfw.datapath import attach as attach_
from xdpfw.datapath import pins, recover
from xdpfw.datapath.adopt import Adopted, read_columns
from xdpfw.datapath.attach import Attachment
from xdpfw.datapath.counters import (
    CounterArrays,
    Counters,
    GlobalCounters,
    RuleCounters,
    as_counters,
    copy_global,
    read_global,
)
from xdpfw.datapath.d248 import PrefixTable, PrefixTables
from xdpfw.datapath.limits import Ban, LimitCounters, LimitMaps
from xdpfw.datapath.sampling import Sampling
from xdpfw.datapath.sets import SetAllocator
from xdpfw.datapath.slots import U32
from xdpfw.datapath.translate import kernel_door, kernel_error
from xdpfw.datapath.writer import PlanWriter
from xdpfw.errors import AbiMismatch, DatapathError, RuleNotFound
from xdpfw.kernel import bpfsys
from xdpfw.kernel.ringbuf import RingBuffer
from xdpfw.rules import Limit, Rule

__all__ = ["Datapath", "DatapathConfig"]

log = logging.getLogger("xdpfw.datapath")


@dataclass(frozen=True)
class DatapathConfig:
    bpffs_dir: Path = Path("/sys/fs/bpf/xdpfw")
    caps: Capacities = field(default_factory=Capacities)
    # Adopted pins from another build of the program: swap in this build's program (True) or
    # keep running the pinned one (False).
    upgrade: bool = True
    # Where to look for a running xdpfw program when nothing is pinned (the pins were
    # removed under it): such an orphan is re-pinned and adopted instead of loading anew.
    interfaces: tuple[str, ...] = ()


class Datapath:
    """The loaded (or adopted) program, its maps and the rules compiled into them."""

    def __init__(
        self,
        cfg: DatapathConfig,
        prog_fd: int,
        maps: dict[str, bpfsys.Map[Any, Any]],
        caps: Capacities,
        adopted: bool,
        abi4: bool = False,
    ) -> None:
        self.cfg = cfg
        self.caps = caps
        self.adopted = adopted
        self._prog_fd = prog_fd
        self._maps = maps
        self._lock = threading.RLock()
        self._attach_lock = threading.Lock()  # attachments change apart from rule writes
        self.prog_id = bpfsys.prog_info(prog_fd).id
        self.compiler = RuleCompiler(caps)
        self._sets = SetAllocator(caps.max_sets)
        self._counters = Counters(
            maps["xdpfw_rule_stats"], maps["xdpfw_rule_seen"], caps.max_rules, self._lock
        )
        # ABI 4 pins (read by an upgrade only) hold IPv4 prefixes in tries, not in arrays
        self._prefixes = (
            None if abi4 else PrefixTables(maps, caps.max_tbl8_groups, caps.max_prefixes)
        )
        self._writer = PlanWriter(
            maps, self.compiler, caps, self._sets, self._counters, self._prefixes
        )
        self._sampling = Sampling(maps)  # X-ray (issue 17)
        # rate limits (issue 16): each limit rule's budget, beside its code
        self._limit_maps = LimitMaps(maps)
        self._limits: dict[int, Limit] = {}
        self._closed = False
        self.upgraded_from: int | None = None  # program id replaced by an upgrade
        self.repinned: list[str] = []  # interfaces of an orphan re-pinned and adopted by open

    @property
    def build_id(self) -> bytes:
        """Which build of the program runs (recorded in xdpfw_config)."""
        return self._writer.build_id

    @build_id.setter
    def build_id(self, value: bytes) -> None:
        self._writer.build_id = value

    @property
    def prog_fd(self) -> int:
        return self._prog_fd

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: DatapathConfig | None = None) -> Datapath:
        """Adopt the pinned program and maps in cfg.bpffs_dir, or load and pin a new one."""
        cfg = cfg or DatapathConfig()
        pins.finish_interrupted_upgrade(cfg.bpffs_dir)
        for stale in pins.remove_stale_staging(cfg.bpffs_dir):
            log.warning("removed %s, left by a load that was killed", stale)
        if (cfg.bpffs_dir / pins.PROG_PIN).exists():
            return cls._adopt(cfg)
        repinned = cls._repin_orphan(cfg)
        if repinned:
            dp = cls._adopt(cfg)
            dp.repinned = repinned
            return dp
        return cls._load(cfg)

    @staticmethod
    def _repin_orphan(cfg: DatapathConfig) -> list[str]:
        """Nothing is pinned: re-pin an orphaned xdpfw program running on cfg.interfaces
        (see recover.py); the interfaces it runs on, [] when there is none."""
        if not cfg.interfaces:
            return []
        orphans = list(recover.find_orphans(cfg.interfaces, cfg.bpffs_dir))
        try:
            if not orphans:
                return []
            pins.ensure_bpffs(cfg.bpffs_dir)
            recover.repin(orphans[0], cfg.bpffs_dir)  # any others are swapped out by attach
            return list(orphans[0].ifnames)
        finally:
            for o in orphans:
                o.close()

    @classmethod
    def _load(cls, cfg: DatapathConfig) -> Datapath:
        from xdpfw.kernel import loader  # bcc is only imported when a program must be compiled

        pins.ensure_bpffs(cfg.bpffs_dir)
        loaded = loader.load_isolated(cfg.caps, pins.staging_dir(cfg.bpffs_dir))
        pinned: list[Path] = []
        try:
            dp = cls(cfg, loaded.prog_fd, pins.wrap_maps(loaded), cfg.caps, adopted=False)
            dp.build_id = loader.build_id(cfg.caps)
            dp._writer.write_config()
            pinned = pins.pin_all(loaded, cfg.bpffs_dir)
        except (OSError, DatapathError) as exc:
            for path in pinned:
                path.unlink(missing_ok=True)
            loaded.close()
            if isinstance(exc, DatapathError):
                raise
            raise kernel_error(f"pinning under {cfg.bpffs_dir}", exc) from exc
        return dp

    @classmethod
    def _adopt(cls, cfg: DatapathConfig) -> Datapath:
        if pins.pinned_abi(cfg.bpffs_dir) == pins.ABI4:
            return cls._upgrade_abi4(cfg)
        prog_fd, maps = pins.open_pins(cfg.bpffs_dir)
        conf = maps["xdpfw_config"].lookup(U32.pack(0))
        assert conf is not None
        caps = Capacities(conf.max_rules, conf.max_prefixes, conf.max_sets, conf.max_tbl8_groups)
        dp = cls(cfg, prog_fd, maps, caps, adopted=True)
        dp.build_id = bytes(conf.build_id)
        dp._rebuild_from_maps()
        if cfg.upgrade:
            from xdpfw.kernel import loader

            if dp.build_id != loader.build_id(caps):
                return dp._upgrade()
        return dp

    @classmethod
    def _upgrade_abi4(cls, cfg: DatapathConfig) -> Datapath:
        """Pins of ABI 4 (IPv4 prefixes in tries; what a running xdpfw of that release leaves,
        also after kill -9): read them as they are, then upgrade as for another build."""
        if not cfg.upgrade:
            raise AbiMismatch(
                f"pinned maps in {cfg.bpffs_dir} speak ABI version {pins.ABI4}; this build "
                f"speaks ABI version {abi.ABI_VERSION} and can only take them over by "
                "upgrading the program (start without --no-upgrade)"
            )
        prog_fd, maps = pins.open_pins(cfg.bpffs_dir, abi4=True)
        conf = maps["xdpfw_config"].lookup(U32.pack(0))
        assert conf is not None
        caps = dataclasses.replace(
            cfg.caps, max_rules=conf.max_rules, max_prefixes=conf.max_prefixes,
            max_sets=conf.max_sets,
        )
        old = cls(cfg, prog_fd, maps, caps, adopted=True, abi4=True)
        try:
            old.build_id = bytes(conf.build_id)
            old._rebuild_from_maps()
        except BaseException:
            old.close()
            raise
        return old._upgrade()

    def _rebuild_from_maps(self) -> None:
        """Take the rules and the compiled entries back from the lookup tables, unplanned
        (see adopt.py): nothing is planned again, and no Rule object is made."""
        found = Adopted(set_of=self._sets.of)
        with gc_paused(), kernel_door(f"reading the pinned maps in {self.cfg.bpffs_dir}"):
            repairs = self._prefixes.adopt() if self._prefixes is not None else []
            for repair in repairs:  # the arrays first: their keys are what is read
                log.warning("adopting the IPv4 prefix arrays: repaired %s", repair)
            batches, rest = read_columns(self._maps, found, self._writer.table)
            self.compiler.adopt(rest, batches)
            let_go(*(b.ids for b in batches), *(b.keys for b in batches),
                   *(b.codes for b in batches))
            ctr = found.counters
            if ctr.keys() != self.compiler.codes().keys() or 0 in ctr.values():
                missing = [rid for rid in self.compiler.rules if not ctr.get(rid)]
                raise DatapathError(
                    f"pinned slots carry no counter index for rules {missing[:5]}: the maps "
                    "were not written by this ABI"
                )
            self._counters.index.adopt_arrays(
                np.fromiter(ctr.keys(), dtype=np.uint32, count=len(ctr)),
                np.fromiter(ctr.values(), dtype=np.uint32, count=len(ctr)),
            )
            stored = self._limit_maps.read()
            self._limits = {rid: stored[rid] for rid in self.compiler.rules if rid in stored}
        self._sets.adopt(self._sets.of.values())

    def _upgrade(self) -> Datapath:
        """Swap in this build's program without a gap: same rules, counters carried over.

        The new program gets fresh maps filled from the adopted ones; every interface running
        the old program is switched atomically (XDP_FLAGS_REPLACE), so there is no moment with
        no program. Packets the old program counts between the counter copy and the swap (a few
        milliseconds) are not carried over. Then the new pins replace the old ones.
        """
        from xdpfw.kernel import loader

        pin_dir = self.cfg.bpffs_dir
        staging, retired = pins.upgrading_dir(pin_dir), pins.retired_dir(pin_dir)
        for leftover in (staging, retired):
            pins.remove_pin_dir(leftover)
        loaded = loader.load_isolated(self.caps, pins.staging_dir(pin_dir))
        try:
            new = Datapath(self.cfg, loaded.prog_fd, pins.wrap_maps(loaded), self.caps, True)
        except BaseException:
            loaded.close()
            raise
        try:
            new.build_id = loader.build_id(self.caps)
            new.add_rules(self.rules())
            with kernel_door("copying counters to the new program"):
                copy_global(self._maps["xdpfw_stats"], new._maps["xdpfw_stats"])
                new._counters.copy_from(self._counters)
                self._carry_limits_and_samples(new)
            pins.pin_all(loaded, staging)
            for att in self.attachments():
                attach_.replace(att, new.prog_fd, self.prog_fd)
            pin_dir.rename(retired)
            staging.rename(pin_dir)
        except BaseException:
            pins.remove_pin_dir(staging)
            new.close()
            raise
        pins.remove_pin_dir(retired)
        new.upgraded_from = self.prog_id
        self.close()
        return new

    def _carry_limits_and_samples(self, new: Datapath) -> None:
        """Rate-limit state and counters (budgets, bans, passed/limited/banned) and X-ray's
        settings, sampled rules and counters, into the program an upgrade swaps in: the same
        layouts in ABI 4 and 5."""
        for name in ("xdpfw_limit_stats", "xdpfw_sample_stats"):  # per CPU
            copy_global(self._maps[name], new._maps[name])
        for name in ("xdpfw_buckets", "xdpfw_bans"):
            dst = new._maps[name]
            for k, v in self._maps[name].dump_raw():
                dst.update(k, v)
        snaplen, cap = self._sampling.settings()
        if cap:
            new._sampling.configure(cap, snaplen)
        every = self._sampling.rules()
        if every:
            new._sampling.set(dict(every))

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> Datapath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(cleanup=True)

    def close(self, cleanup: bool = False) -> None:
        """Release fds. With cleanup, also detach everywhere we are attached and unpin."""
        if self._closed:
            return
        try:
            if cleanup:
                for att in self.attachments():
                    self.detach(att.ifname)
                pins.unpin(self.cfg.bpffs_dir, list(self._maps))
        finally:
            with self._lock:  # no reader holds a view of the mappings past this point
                self._closed = True
                if self._prefixes is not None:
                    self._prefixes.close()
                self._counters.close()
                for m in self._maps.values():
                    m.close()
                os.close(self._prog_fd)

    # -- attachment ----------------------------------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        """Attach to ifname (native where possible in auto mode). Idempotent for our program.

        An orphaned xdpfw program found there (no pin names it, see recover.py) is swapped
        for ours atomically; any other program is left alone (ForeignProgram). Does not wait
        for rule writes: the program fd does not change while the datapath is open.
        """
        with self._attach_lock:
            return attach_.attach(ifname, self._prog_fd, self.prog_id, mode, recover.is_orphan)

    def detach(self, ifname: str) -> None:
        """Detach our program from ifname; never touches a program we did not attach."""
        with self._attach_lock:
            attach_.detach(ifname, self.prog_id, self._prog_fd)

    def attachments(self) -> list[Attachment]:
        """Interfaces (root namespace) where our program is attached."""
        return attach_.attachments(self.prog_id)

    # -- rules ---------------------------------------------------------------------------------

    def rules(self) -> list[Rule]:
        with self._lock:
            rules = self.compiler.rules
            return [self._with_limit(rules[rid]) for rid in sorted(rules)]

    def get_rule(self, rule_id: int) -> Rule:
        rule = self.compiler.rules.get(rule_id)
        if rule is None:
            raise RuleNotFound(rule_id)
        return self._with_limit(rule)

    def _with_limit(self, rule: Rule) -> Rule:
        limit = self._limits.get(rule.id)
        return rule if limit is None else dataclasses.replace(rule, limit=limit)

    def add_rule(self, rule: Rule) -> None:
        self.add_rules([rule])

    def add_rules(self, rules: Sequence[Rule]) -> None:
        """Add rules, all or nothing. In the maps when this returns."""
        with self._lock:
            limited = [(r.id, r.limit) for r in rules if r.limit is not None]
            if limited:  # the budget first: a limit slot never lands without one
                with kernel_door("writing xdpfw_limits"):
                    self._limit_maps.install(limited)
            try:
                plan = self.compiler.plan_add(rules)
                self._writer.apply(plan)
            except BaseException:
                if limited:
                    with kernel_door("removing from xdpfw_limits"):
                        self._limit_maps.remove(rid for rid, _ in limited)
                raise
            self._limits.update(limited)
            let_go(plan.entries)  # a big plan freed in pieces (see let_go)

    def add_codes(self, rule_ids: Sequence[int], codes: Sequence[int]) -> None:
        """`add_rules` of rules given as ids and codes (`RuleSpec.code()`), all or nothing:
        the bulk path. New exact hosts are planned and written as columns (numpy, batched
        map writes, no Rule object); the rest as `add_rules` does. In the maps when this
        returns."""
        with self._lock:
            plan = self.compiler.plan_codes(rule_ids, codes)
            self._writer.apply(plan)
            let_go(plan.entries)

    def remove_rule(self, rule_id: int) -> Rule:
        return self.remove_rules([rule_id])[0]

    def remove_rules(self, rule_ids: Iterable[int]) -> list[Rule]:
        with self._lock:
            plan = self.compiler.plan_remove(rule_ids)
            self._writer.apply(plan)
            with kernel_door("removing sample entries"):  # X-ray: a removed rule is not sampled
                self._sampling.forget(r.id for r in plan.removed)
            gone = [r.id for r in plan.removed if r.id in self._limits]
            if gone:
                with kernel_door("removing from xdpfw_limits"):
                    self._limit_maps.remove(gone)
            removed = [self._with_limit(r) for r in plan.removed]
            for rid in gone:
                del self._limits[rid]
            return removed

    # -- counters ------------------------------------------------------------------------------

    def rule_counters(self, rule_ids: Iterable[int] | None = None) -> dict[int, RuleCounters]:
        """Per-rule counters: packets and bytes summed over CPUs, last hit as Unix time."""
        with kernel_door("reading xdpfw_rule_stats"):
            if rule_ids is None:
                return dict(as_counters(*self._counters.arrays()))
            return self._counters.read(rule_ids)

    def top_counters(self, n: int | None = None) -> list[tuple[int, RuleCounters]]:
        """Rules by packets, most first (ties: lower id first); the first n, or all."""
        with kernel_door("reading xdpfw_rule_stats"):
            return self._counters.top(n)

    def counter_arrays(self) -> CounterArrays:
        """(rule ids, packets, bytes, last hit ns) of every rule, summed over CPUs."""
        with kernel_door("reading xdpfw_rule_stats"):
            return self._counters.arrays()

    def global_counters(self) -> GlobalCounters:
        with kernel_door("reading xdpfw_stats"):
            return read_global(self._maps["xdpfw_stats"])

    def counter_index(self, rule_id: int) -> int | None:
        """The rule's index in xdpfw_rule_stats / xdpfw_rule_seen (verification, diagnostics)."""
        return self._counters.index.get(rule_id)

    def counter_indices_in_use(self) -> int:
        return int(np.count_nonzero(self._counters.index.view))

    def rule_set_ids(self) -> dict[TableKey, int]:
        """Entry -> the rule set (xdpfw_sets element) holding its other slots (diagnostics)."""
        with self._lock:
            return dict(self._sets.of)

    def table_usage(self) -> dict[str, tuple[int, int]]:
        """(entries, capacity) per lookup table, plus rules and sets."""
        counts = self.compiler.table_counts()
        usage = {
            t.map_name: (counts[t], self.caps.limit(t)) for t in Table if t is not Table.MAX
        }
        usage["rules"] = (len(self.compiler), self.caps.max_rules)
        usage["xdpfw_sets"] = (self.compiler.n_sets, self.caps.max_sets - 1)
        return usage

    # -- X-ray (issue 17): sampling, a map write ------------------------------------------------

    def sample_configure(self, max_pps: int, snaplen: int) -> None:
        """The global cap (samples per second, enforced in the kernel) and the snap length."""
        with self._lock, kernel_door("writing xdpfw_sample_ctl"):
            self._sampling.configure(max_pps, snaplen)

    def sample_set(self, every: dict[int, int | None]) -> None:
        """Sample these rules 1 in `every` frames (None: stop); unknown ids are refused."""
        with self._lock:
            for rid, n in every.items():
                if n and rid not in self.compiler.rules:
                    raise RuleNotFound(rid)
            with kernel_door("writing xdpfw_sample_rules"):
                self._sampling.set(every)

    def sample_rules(self) -> dict[int, int]:
        """rule id -> every, of each sampled rule (as the kernel's map holds them)."""
        return self._sampling.rules()

    def sample_settings(self) -> tuple[int, int]:
        """(snap length, cap per second) as configured."""
        return self._sampling.settings()

    def sample_stats(self) -> dict[str, int]:
        """Samples sent to the ring and lost (ring full, over the cap), summed over CPUs."""
        with kernel_door("reading xdpfw_sample_stats"):
            return self._sampling.stats()

    def sample_ring(self) -> RingBuffer:
        """A reader of the sample ring buffer (one reader at a time)."""
        with kernel_door("mapping xdpfw_samples"):
            return self._sampling.open_ring()
    # -- rate limits (issue 16) ------------------------------------------------------------------

    def rule_limits(self) -> dict[int, Limit]:
        """The budget of every limit rule in the maps."""
        with self._lock:
            return dict(self._limits)

    def limit_counters(self, rule_ids: Iterable[int] | None = None) -> dict[int, LimitCounters]:
        """Per limit rule: frames passed within the budget, limited and banned."""
        with kernel_door("reading xdpfw_limit_stats"):
            return self._limit_maps.counters(rule_ids)

    def bans(self) -> list[Ban]:
        """The (rule, source) pairs banned now."""
        with kernel_door("reading xdpfw_bans"):
            return self._limit_maps.bans()

    def unban(self, source: str | None = None, rule_id: int | None = None) -> int:
        """Lift bans (of a source, of a rule, or all); how many were lifted."""
        with self._lock, kernel_door("writing xdpfw_bans"):
            return self._limit_maps.unban(source, rule_id)

    def map(self, name: str) -> bpfsys.Map[Any, Any]:
        """A map by name (tests and diagnostics)."""
        return self._maps[name]

    def table(self, table: Table) -> bpfsys.Map[Any, Any] | PrefixTable:
        """What holds a table's entries: its map, or (IPv4 prefixes) the DIR-24-8 arrays shown
        as a map keyed like the trie (tests and diagnostics)."""
        return self._writer.table(table)
