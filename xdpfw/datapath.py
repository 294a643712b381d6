"""The typed datapath object: load or adopt the program, attach it, change rules, read counters.

    with Datapath.open(DatapathConfig(bpffs_dir=Path("/sys/fs/bpf/xdpfw"))) as dp:
        dp.attach("veth0", mode="auto")
        dp.add_rule(RuleSpec.parse(src="198.18.0.0/15").with_id(1))
        print(dp.rule_counters())

`open` adopts the pinned program and maps when they exist (the ABI recorded in the config map
must match; the rules are read back from the maps) and otherwise loads and pins a fresh program.
Either way the kernel keeps filtering when the process exits: only `close(cleanup=True)`
detaches and unpins. Rule changes are map updates, never a program reload, and a change is in
the maps when the call returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.compiler import (
    EXACT_TABLES,
    LPM_TABLES,
    Capacities,
    Plan,
    RuleCompiler,
    TableKey,
    gc_paused,
)
from xdpfw.errors import (
    AbiMismatch,
    CapacityExceeded,
    DatapathError,
    ForeignProgram,
    InterfaceNotFound,
    KernelError,
    RuleNotFound,
)
from xdpfw.kernel import bpfsys, netlink
from xdpfw.rules import CODE_SHIFT, DIR_DST, DIR_SRC, Rule

if TYPE_CHECKING:
    from xdpfw.kernel.loader import LoadedProgram

__all__ = [
    "Attachment",
    "Datapath",
    "DatapathConfig",
    "GlobalCounters",
    "RuleCounters",
    "decode_key",
    "encode_key",
]

PROG_PIN = "prog"
SET_QUARANTINE_S = 0.2  # a freed rule set is not rewritten while a packet may still read it
# The same for a freed counter index: a packet that read the old slot may still credit it.
COUNTER_QUARANTINE_S = SET_QUARANTINE_S
_HINT_TRIES = {Table.SRC4_LPM: 0, Table.DST4_LPM: 1}  # xdpfw_lpm4_hint halves
_FEW_HOT = 2048  # up to this many hit rules, counters are read one by one, not in one batch

_MAP_TYPES: dict[str, tuple[type[Any], type[Any]]] = {
    "xdpfw_src4": (ctypes.c_uint32, abi.Entry),
    "xdpfw_dst4": (ctypes.c_uint32, abi.Entry),
    "xdpfw_src6": (abi.Addr6, abi.Entry),
    "xdpfw_dst6": (abi.Addr6, abi.Entry),
    "xdpfw_src4_lpm": (abi.Lpm4Key, abi.Entry),
    "xdpfw_dst4_lpm": (abi.Lpm4Key, abi.Entry),
    "xdpfw_src6_lpm": (abi.Lpm6Key, abi.Entry),
    "xdpfw_dst6_lpm": (abi.Lpm6Key, abi.Entry),
    "xdpfw_any": (ctypes.c_uint32, abi.Entry),
    "xdpfw_sets": (ctypes.c_uint32, abi.Set),
    "xdpfw_rule_stats": (ctypes.c_uint32, abi.RuleStats),
    "xdpfw_rule_seen": (ctypes.c_uint32, ctypes.c_uint64),
    "xdpfw_lpm4_hint": (ctypes.c_uint32, ctypes.c_uint64),
    "xdpfw_stats": (ctypes.c_uint32, abi.GlobalStats),
    "xdpfw_config": (ctypes.c_uint32, abi.Config),
}

_U32 = ctypes.c_uint32
_U32_BYTES = struct.Struct("=I")


@dataclass(frozen=True)
class DatapathConfig:
    bpffs_dir: Path = Path("/sys/fs/bpf/xdpfw")
    caps: Capacities = field(default_factory=Capacities)
    # Adopted pins from another build of the program: swap in this build's program (True) or
    # keep running the pinned one (False).
    upgrade: bool = True


@dataclass(frozen=True)
class Attachment:
    ifname: str
    ifindex: int
    mode: str  # "native" | "generic"
    prog_id: int


@dataclass(frozen=True)
class RuleCounters:
    packets: int
    bytes: int
    last_hit: float | None  # Unix time of the last credited packet


@dataclass(frozen=True)
class GlobalCounters:
    packets: int
    passed: int
    dropped: int
    monitored: int
    malformed: int
    non_ip: int
    fragments: int
    bytes: int

    def by_stat(self) -> dict[abi.Stat, int]:
        """The same numbers keyed by XDPFW_STAT_* (what the model and the harness compare)."""
        return {stat: getattr(self, stat.name.lower()) for stat in abi.Stat if stat < abi.Stat.MAX}


def _kernel(op: str, exc: OSError) -> KernelError:
    return KernelError(op, exc.errno or 0, os.strerror(exc.errno or 0) + f" ({exc})")


def encode_key(key: TableKey) -> bytes:
    if key.table is Table.ANY:
        return struct.pack("=I", 0)
    if key.table in LPM_TABLES:
        return struct.pack("=I", key.plen) + key.addr
    return key.addr


def decode_key(table: Table, raw: bytes) -> TableKey:
    if table is Table.ANY:
        return TableKey(Table.ANY)
    if table in LPM_TABLES:
        (plen,) = struct.unpack_from("=I", raw)
        return TableKey(table, bytes(raw[4:]), plen)
    return TableKey(table, bytes(raw), len(raw) * 8)


_SLOT = struct.Struct("=QIHHBBBxI")  # struct xdpfw_slot
_ENTRY_TAIL = struct.Struct("=II")  # set_id, pad
assert _SLOT.size == ctypes.sizeof(abi.Slot)
assert _SLOT.size + _ENTRY_TAIL.size == ctypes.sizeof(abi.Entry)


def _slot_bytes(rule: Rule, counter: int) -> bytes:
    ports = rule.dport
    return _SLOT.pack(
        rule.rank(),
        rule.id,
        ports.lo if ports is not None else 0,
        ports.hi if ports is not None else 0,
        rule.proto.number if rule.proto is not None else 0,
        rule.verdict,
        1 if ports is not None else 0,
        counter,
    )


def _entry_bytes(first: Rule, counter: int, set_id: int) -> bytes:
    return _slot_bytes(first, counter) + _ENTRY_TAIL.pack(set_id, 0)


def _span(key: TableKey, bits: int) -> tuple[int, int]:
    """The /`bits` networks an IPv4 trie key covers or lies in: [lo, hi)."""
    first = int.from_bytes(key.addr, "big") >> (32 - bits)
    return first, first + (1 << (bits - key.plen) if key.plen < bits else 1)


def _set_bits(words: np.ndarray[Any, np.dtype[np.uint64]], lo: int, hi: int) -> None:
    """Set bits lo .. hi-1 of a little-endian bit array held in 64-bit words."""
    while lo < hi:
        word, bit = divmod(lo, 64)
        if bit == 0 and hi - lo >= 64:
            n = (hi - lo) // 64
            words[word : word + n] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
            lo += n * 64
            continue
        top = min(hi - word * 64, 64)
        words[word] |= np.uint64(((1 << (top - bit)) - 1) << bit)
        lo = word * 64 + top


def _mono_offset() -> float:
    """Unix time minus CLOCK_MONOTONIC, to turn bpf_ktime_get_coarse_ns() into wall time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def _as_counters(
    ids: np.ndarray[Any, np.dtype[np.uint32]],
    packets: np.ndarray[Any, np.dtype[np.uint64]],
    nbytes: np.ndarray[Any, np.dtype[np.uint64]],
    last: np.ndarray[Any, np.dtype[np.uint64]],
) -> list[tuple[int, RuleCounters]]:
    """Counter arrays (see Datapath.counter_arrays) as (rule id, RuleCounters), in order."""
    offset = _mono_offset()
    return [
        (rid, RuleCounters(p, b, offset + t / 1e9 if t else None))
        for rid, p, b, t in zip(
            ids.tolist(), packets.tolist(), nbytes.tolist(), last.tolist(), strict=True
        )
    ]


class _CounterIndex:
    """Rule id -> index into xdpfw_rule_stats and xdpfw_rule_seen (1 .. size).

    Direct-mapped, so a million rules cost no Python object each: a rule's index is its
    "home" 1 + (id - 1) % size whenever that is free, and only the others (the home was
    taken or is in quarantine) are remembered in a dict. `owner` is the reverse map (0 =
    free). A freed index is held back for COUNTER_QUARANTINE_S, since a packet that read the
    old slot may still credit it; an index is zeroed by the caller before it is handed out.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.owner = array("I", bytes(4 * (size + 1)))
        self.view: np.ndarray[Any, np.dtype[np.uint32]] = np.frombuffer(
            self.owner, dtype=np.uint32
        )
        self.moved: dict[int, int] = {}
        self._held = bytearray(size + 1)
        self._quarantine: deque[tuple[int, float]] = deque()
        self._spare: deque[int] = deque()  # free indices found by the last scan
        self._scan = 1
        self.high = 1  # indices from here on were never handed out

    def get(self, rule_id: int) -> int | None:
        home = 1 + (rule_id - 1) % self.size
        if self.owner[home] == rule_id:
            return home
        return self.moved.get(rule_id)

    def __getitem__(self, rule_id: int) -> int:
        idx = self.get(rule_id)
        if idx is None:
            raise KeyError(rule_id)
        return idx

    def alloc(self, rule_ids: Iterable[int]) -> list[int]:
        now = time.monotonic()
        while self._quarantine and now - self._quarantine[0][1] >= COUNTER_QUARANTINE_S:
            self._held[self._quarantine.popleft()[0]] = 0
        out: list[int] = []
        try:
            for rid in rule_ids:
                home = 1 + (rid - 1) % self.size
                if self.get(rid) is not None:  # callers never ask twice; do not leak if they do
                    raise DatapathError(f"rule {rid} already has a counter index")
                if not self.owner[home] and not self._held[home]:
                    idx = home
                else:
                    idx = self._any_free()
                    self.moved[rid] = idx
                self.owner[idx] = rid
                self.high = max(self.high, idx + 1)
                out.append(idx)
        except BaseException:
            self.release(self.owner[i] for i in out)
            raise
        return out

    def _any_free(self) -> int:
        while self._spare:
            idx = self._spare.popleft()
            if not self.owner[idx] and not self._held[idx]:
                return idx
        held = np.frombuffer(self._held, dtype=np.uint8)
        for _ in range(2):  # from where the last scan stopped, then from the start
            while self._scan <= self.size:
                end = min(self._scan + 65536, self.size + 1)
                window = slice(self._scan, end)
                free = np.flatnonzero((self.view[window] == 0) & (held[window] == 0))
                start, self._scan = self._scan, end
                if len(free):
                    self._spare.extend((free + start).tolist())
                    return self._spare.popleft()
            self._scan = 1
        if not self._quarantine:  # the compiler's capacity check makes this unreachable
            raise CapacityExceeded("xdpfw_rule_stats", self.size, "raise --max-rules")
        idx, freed = self._quarantine.popleft()  # all in use or held: wait for the oldest
        time.sleep(max(0.0, COUNTER_QUARANTINE_S - (time.monotonic() - freed)))
        self._held[idx] = 0
        return idx

    def release(self, rule_ids: Iterable[int]) -> list[int]:
        now = time.monotonic()
        out = []
        for rid in rule_ids:
            idx = self.get(rid)
            if idx is None:
                continue
            self.owner[idx] = 0
            self.moved.pop(rid, None)
            self._held[idx] = 1
            self._quarantine.append((idx, now))
            out.append(idx)
        return out

    def adopt(self, pairs: dict[int, int]) -> None:
        """Take (rule id -> index) as read back from the slots of adopted maps."""
        for rid, idx in pairs.items():
            if not 1 <= idx <= self.size or self.owner[idx]:
                raise DatapathError(
                    f"pinned slots give rule {rid} counter index {idx}, which is out of range "
                    f"1-{self.size} or also rule {self.owner[idx] if idx <= self.size else '-'}'s"
                )
            self.owner[idx] = rid
            if idx != 1 + (rid - 1) % self.size:
                self.moved[rid] = idx
            self.high = max(self.high, idx + 1)


class Datapath:
    """The loaded (or adopted) program, its maps and the rules compiled into them."""

    def __init__(
        self,
        cfg: DatapathConfig,
        prog_fd: int,
        maps: dict[str, bpfsys.Map[Any, Any]],
        caps: Capacities,
        adopted: bool,
    ) -> None:
        self.cfg = cfg
        self.caps = caps
        self.adopted = adopted
        self._prog_fd = prog_fd
        self._maps = maps
        self._lock = threading.RLock()
        self.prog_id = bpfsys.prog_info(prog_fd).id
        self.compiler = RuleCompiler(caps)
        self._set_of: dict[TableKey, int] = {}
        self._next_set = 1
        self._free_sets: deque[tuple[int, float]] = deque()
        # Counter indices (elements of xdpfw_rule_stats and xdpfw_rule_seen) of the rules.
        self._ctrs = _CounterIndex(caps.max_rules)
        # Last hit per counter index (xdpfw_rule_seen, memory-mapped): 0 = no packet yet.
        self._seen_mem = maps["xdpfw_rule_seen"].mmap_array()
        self._seen: np.ndarray[Any, np.dtype[np.uint64]] = np.frombuffer(
            self._seen_mem, dtype=np.uint64, count=caps.max_rules + 1
        )
        # IPv4 prefix hint (the map itself, memory-mapped: trie x 2^18 words of 64 /24s), and
        # the trie keys behind it: per /16, how many keys of length <= 16 cover it, and the
        # longer keys inside it (address << 6 | length).
        self._hint_mem = maps["xdpfw_lpm4_hint"].mmap_array()
        self._hint: np.ndarray[Any, np.dtype[np.uint64]] = np.frombuffer(
            self._hint_mem, dtype=np.uint64, count=2 * abi.HINT_WORDS
        ).reshape(2, abi.HINT_WORDS)
        self._cover = np.zeros((2, 1 << 16), dtype=np.int32)
        self._inner: tuple[dict[int, set[int]], dict[int, set[int]]] = ({}, {})
        self._closed = False
        self.build_id = b""
        self.upgraded_from: int | None = None  # program id replaced by an upgrade

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: DatapathConfig | None = None) -> Datapath:
        """Adopt the pinned program and maps in cfg.bpffs_dir, or load and pin a new one."""
        cfg = cfg or DatapathConfig()
        pin_dir = cfg.bpffs_dir
        staging = pin_dir.with_name(pin_dir.name + "-upgrading")
        if not pin_dir.exists() and (staging / PROG_PIN).exists():
            staging.rename(pin_dir)  # an upgrade stopped between its two renames
        if (pin_dir / PROG_PIN).exists():
            return cls._adopt(cfg)
        leftovers = sorted(p.name for p in pin_dir.iterdir()) if pin_dir.is_dir() else []
        if leftovers:
            raise AbiMismatch(
                f"{pin_dir} holds pins ({', '.join(leftovers)}) but no program pin: an earlier "
                f"instance was cleaned up half way. Remove them (`rm -r {pin_dir}`) and start "
                "again."
            )
        return cls._load(cfg)

    @classmethod
    def _load(cls, cfg: DatapathConfig) -> Datapath:
        from xdpfw.kernel import loader  # bcc is only imported when a program must be compiled

        _ensure_bpffs(cfg.bpffs_dir)
        loaded = loader.load_isolated(cfg.caps, _staging(cfg.bpffs_dir))
        pinned: list[Path] = []
        try:
            maps = _wrap_maps(loaded)
            dp = cls(cfg, loaded.prog_fd, maps, cfg.caps, adopted=False)
            dp.build_id = loader.build_id(cfg.caps)
            dp._write_config()
            pinned = _pin_all(loaded, cfg.bpffs_dir)
        except OSError as exc:
            for path in pinned:
                path.unlink(missing_ok=True)
            loaded.close()
            raise _kernel(f"pinning under {cfg.bpffs_dir}", exc) from exc
        return dp

    @classmethod
    def _adopt(cls, cfg: DatapathConfig) -> Datapath:
        pin_dir = cfg.bpffs_dir
        how_to_fix = (
            f"Export the rules you need, then either remove the old pins (`xdpfw detach "
            f"--cleanup --bpffs-dir {pin_dir}`, or `rm -r {pin_dir}` after detaching the old "
            f"program) or use another --bpffs-dir."
        )
        maps: dict[str, bpfsys.Map[Any, Any]] = {}
        prog_fd = -1
        try:
            conf_fd = bpfsys.obj_get(str(pin_dir / "xdpfw_config"))
            try:
                info = bpfsys.map_info(conf_fd)
                raw = _read_raw_config(conf_fd, info.value_size)
            finally:
                os.close(conf_fd)
            version = struct.unpack_from("=I", raw)[0] if len(raw) >= 4 else -1
            if version != abi.ABI_VERSION or info.value_size != ctypes.sizeof(abi.Config):
                raise AbiMismatch(
                    f"pinned maps under {pin_dir} were made by xdpfw ABI version {version}; "
                    f"this build speaks ABI version {abi.ABI_VERSION} and will not reuse them. "
                    + how_to_fix
                )
            for name, (key_t, val_t) in _MAP_TYPES.items():
                try:
                    maps[name] = bpfsys.Map.from_pin(str(pin_dir / name), key_t, val_t, name)
                except ValueError as exc:
                    raise AbiMismatch(f"pinned map {name} has another layout: {exc}. "
                                      + how_to_fix) from exc
            prog_fd = bpfsys.obj_get(str(pin_dir / PROG_PIN))
        except OSError as exc:
            for m in maps.values():
                m.close()
            if exc.errno == errno.ENOENT:
                raise AbiMismatch(
                    f"incomplete pins under {pin_dir}: {exc}. " + how_to_fix
                ) from exc
            raise _kernel(f"opening pins under {pin_dir}", exc) from exc
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        conf = maps["xdpfw_config"].lookup(_U32(0))
        assert conf is not None
        caps = Capacities(conf.max_rules, conf.max_prefixes, conf.max_sets)
        dp = cls(cfg, prog_fd, maps, caps, adopted=True)
        dp.build_id = bytes(conf.build_id)
        dp._rebuild_from_maps()
        if cfg.upgrade:
            from xdpfw.kernel import loader

            if dp.build_id != loader.build_id(caps):
                return dp._upgrade()
        return dp

    def _upgrade(self) -> Datapath:
        """Swap in this build's program without a gap: same rules, counters carried over.

        The new program gets fresh maps filled from the adopted ones; every interface running
        the old program is switched atomically (XDP_FLAGS_REPLACE), so there is no moment with
        no program. Packets the old program counts between the counter copy and the swap (a few
        milliseconds) are not carried over. Then the new pins replace the old ones.
        """
        from xdpfw.kernel import loader

        pin_dir = self.cfg.bpffs_dir
        # bpffs refuses names with a dot, hence no ".new"/".old".
        staging = pin_dir.with_name(pin_dir.name + "-upgrading")
        retired = pin_dir.with_name(pin_dir.name + "-retired")
        for leftover in (staging, retired):
            _remove_pin_dir(leftover)
        loaded = loader.load_isolated(self.caps, _staging(pin_dir))
        try:
            new = Datapath(self.cfg, loaded.prog_fd, _wrap_maps(loaded), self.caps, adopted=True)
        except BaseException:
            loaded.close()
            raise
        try:
            new.build_id = loader.build_id(self.caps)
            new.add_rules(self.rules())
            new._copy_counters_from(self)
            _pin_all(loaded, staging)
            for att in self.attachments():
                try:
                    netlink.xdp_attach(
                        att.ifname, new.prog_fd, att.mode, expected_prog_fd=self.prog_fd
                    )
                except netlink.NetlinkOpError as exc:
                    op = f"replacing XDP on {att.ifname}"
                    raise KernelError(op, exc.errno, str(exc)) from exc
            pin_dir.rename(retired)
            staging.rename(pin_dir)
        except BaseException:
            _remove_pin_dir(staging)
            new.close()
            raise
        _remove_pin_dir(retired)
        new.upgraded_from = self.prog_id
        self.close()
        return new

    def _copy_counters_from(self, old: Datapath) -> None:
        """Global counters as they are; rule counters from each rule's old index to its new."""
        src, dst = old._maps["xdpfw_stats"], self._maps["xdpfw_stats"]
        stride = (dst.value_size + 7) // 8 * 8
        for k, v in src.dump_raw():
            dst.update(k, [v[c * stride : c * stride + dst.value_size] for c in range(dst.ncpus)])
        src, dst = old._maps["xdpfw_rule_stats"], self._maps["xdpfw_rule_stats"]
        stride = (src.value_size + 7) // 8 * 8
        blob = src.read_array(old._ctrs.high)
        size = stride * src.ncpus
        keys: list[ctypes.c_uint32] = []
        values: list[bytes] = []
        for old_idx in np.flatnonzero(old._ctrs.view[: old._ctrs.high]).tolist():
            new_idx = self._ctrs.get(old._ctrs.owner[old_idx])
            if new_idx is not None and old_idx * size < len(blob):
                keys.append(_U32(new_idx))
                values.append(blob[old_idx * size : (old_idx + 1) * size])
                self._seen[new_idx] = old._seen[old_idx]
        for i in range(0, len(keys), 8192):
            dst.update_batch(
                keys[i : i + 8192],
                [[v[c * stride : c * stride + dst.value_size] for c in range(dst.ncpus)]
                 for v in values[i : i + 8192]],
            )

    def _rebuild_from_maps(self) -> None:
        """Take the rules and the compiled entries back from the lookup tables, unplanned.

        The maps hold exactly what the compiler wrote, so the compiler adopts them as they are
        (see `_adopted_entries`); nothing is planned again, and no Rule object is made.
        """
        used_sets: set[int] = set()
        counters: dict[int, int] = {}
        trie_keys: list[tuple[int, TableKey, int]] = []
        with gc_paused():
            self.compiler.adopt(self._adopted_entries(used_sets, counters, trie_keys))
            self._adopt_counters_and_hint(counters, trie_keys)
        self._next_set = max(used_sets, default=0) + 1
        now = time.monotonic() - SET_QUARANTINE_S
        self._free_sets.extend(
            (i, now) for i in range(1, self._next_set) if i not in used_sets
        )

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
                for name in (PROG_PIN, *self._maps):
                    (self.cfg.bpffs_dir / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.cfg.bpffs_dir.rmdir()
        finally:
            with self._lock:  # no reader holds a view of the mappings past this point
                self._closed = True
                self._hint = np.zeros((2, 0), dtype=np.uint64)
                self._seen = np.zeros(0, dtype=np.uint64)
                for mem in (self._hint_mem, self._seen_mem):
                    with contextlib.suppress(BufferError):  # a view escaped: GC unmaps it
                        mem.close()
                for m in self._maps.values():
                    m.close()
                os.close(self._prog_fd)

    @property
    def prog_fd(self) -> int:
        return self._prog_fd

    # -- attachment ----------------------------------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        """Attach to ifname (native where possible in auto mode). Idempotent for our program."""
        if mode not in ("auto", "native", "generic"):
            raise ValueError(f"mode must be auto, native or generic, not {mode!r}")
        with self._lock:
            try:
                state = netlink.xdp_state(ifname)
                if state.prog_id and state.prog_id != self.prog_id:
                    raise ForeignProgram(ifname, state.prog_id, _prog_name(state.prog_id))
                if state.prog_id == self.prog_id:
                    return Attachment(ifname, state.ifindex, state.mode, state.prog_id)
                state = netlink.xdp_attach(ifname, self._prog_fd, mode)
            except netlink.NetlinkOpError as exc:
                if exc.errno == errno.ENODEV:
                    raise InterfaceNotFound(ifname) from exc
                if exc.errno == errno.EBUSY:
                    cur = netlink.xdp_state(ifname)
                    raise ForeignProgram(ifname, cur.prog_id, _prog_name(cur.prog_id)) from exc
                raise KernelError(f"attach XDP to {ifname}", exc.errno, str(exc)) from exc
            return Attachment(ifname, state.ifindex, state.mode, state.prog_id)

    def detach(self, ifname: str) -> None:
        """Detach our program from ifname; never touches a program we did not attach."""
        with self._lock:
            try:
                state = netlink.xdp_state(ifname)
                if state.prog_id == 0:
                    return
                if state.prog_id != self.prog_id:
                    raise ForeignProgram(ifname, state.prog_id, _prog_name(state.prog_id))
                netlink.xdp_detach(ifname, state.mode, expected_prog_fd=self._prog_fd)
            except netlink.NetlinkOpError as exc:
                if exc.errno == errno.ENODEV:
                    raise InterfaceNotFound(ifname) from exc
                raise KernelError(f"detach XDP from {ifname}", exc.errno, str(exc)) from exc

    def attachments(self) -> list[Attachment]:
        """Interfaces (root namespace) where our program is attached."""
        return [
            Attachment(s.ifname, s.ifindex, s.mode, s.prog_id)
            for s in netlink.xdp_find(self.prog_id)
        ]

    # -- rules ---------------------------------------------------------------------------------

    def rules(self) -> list[Rule]:
        with self._lock:
            rules = self.compiler.rules
            return [rules[rid] for rid in sorted(rules)]

    def get_rule(self, rule_id: int) -> Rule:
        rule = self.compiler.rules.get(rule_id)
        if rule is None:
            raise RuleNotFound(rule_id)
        return rule

    def add_rule(self, rule: Rule) -> None:
        self.add_rules([rule])

    def add_rules(self, rules: Sequence[Rule]) -> None:
        """Add rules, all or nothing. In the maps when this returns."""
        with self._lock:
            plan = self.compiler.plan_add(rules)
            self._apply(plan)

    def remove_rule(self, rule_id: int) -> Rule:
        return self.remove_rules([rule_id])[0]

    def remove_rules(self, rule_ids: Iterable[int]) -> list[Rule]:
        with self._lock:
            plan = self.compiler.plan_remove(rule_ids)
            self._apply(plan)
            return plan.removed

    def _apply(self, plan: Plan) -> None:
        old_entries = {k: self.compiler.compiled(k) for k in plan.entries}
        old_sets = {k: self._set_of.get(k, 0) for k in plan.entries}
        new_sets: dict[TableKey, int] = {}
        # New rules get zeroed counter indices before any slot points at them.
        ctrs = self._ctrs.alloc(r.id for r in plan.added)
        hint = self._hint_changes(plan, old_entries)
        try:
            self._zero_counters(ctrs)
            for trie, key, delta in hint:  # a prefix may appear: widen the hint first
                if delta > 0:
                    _set_bits(self._hint[trie], *_span(key, 24))
            self._write_entries(plan.entries, new_sets)
            self.compiler.commit(plan)
        except BaseException as exc:  # CapacityExceeded from _alloc_set, too
            self._rollback(old_entries, old_sets, new_sets)
            self._ctrs.release(r.id for r in plan.added)
            self._hint_redo(hint)  # back to what the committed keys need
            if not isinstance(exc, OSError):
                raise
            if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise CapacityExceeded(
                    "a kernel map", self.caps.max_rules, f"the kernel said: {exc}"
                ) from exc
            raise _kernel("updating rule maps", exc) from exc
        # Committed. The hint first (nothing below may leave it narrower than the tries),
        # then publish the counts and retire what is no longer referenced.
        if hint:  # the entries are in (or gone): record the keys, narrow the hint
            self._hint_account(hint)
            self._hint_redo(hint)
        self._ctrs.release(r.id for r in plan.removed)
        for key in plan.entries:
            old = old_sets.get(key, 0)
            if key in new_sets:
                self._set_of[key] = new_sets[key]
            elif not plan.entries[key] or len(plan.entries[key]) == 1:
                self._set_of.pop(key, None)
            if old and self._set_of.get(key) != old:
                self._release_set(old)
        self._write_config()

    def _write_entries(
        self, entries: dict[TableKey, tuple[Rule, ...]], new_sets: dict[TableKey, int]
    ) -> None:
        sets = self._maps["xdpfw_sets"]
        ctr = self._ctrs
        updates: dict[Table, tuple[list[bytes], list[bytes]]] = {}
        deletes: dict[Table, list[bytes]] = {}
        for key, slots in entries.items():
            if not slots:
                deletes.setdefault(key.table, []).append(encode_key(key))
                continue
            set_id = 0
            if len(slots) > 1:
                set_id = self._alloc_set()
                new_sets[key] = set_id
                rest = b"".join(_slot_bytes(r, ctr[r.id]) for r in slots[1:])
                sets.update(_U32(set_id), rest.ljust(ctypes.sizeof(abi.Set), b"\0"))
            ks, vs = updates.setdefault(key.table, ([], []))
            ks.append(encode_key(key))
            vs.append(_entry_bytes(slots[0], ctr[slots[0].id], set_id))
        for table, (ks, vs) in updates.items():
            self._maps[table.map_name].update_batch(ks, vs)
        for table, dks in deletes.items():
            self._maps[table.map_name].delete_batch(dks)

    def _rollback(
        self,
        old_entries: dict[TableKey, tuple[Rule, ...]],
        old_sets: dict[TableKey, int],
        new_sets: dict[TableKey, int],
    ) -> None:
        """Best effort: put back the entries a failed change may have touched."""
        for key, slots in old_entries.items():
            m = self._maps[key.table.map_name]
            try:
                if slots:
                    first = slots[0]
                    m.update(
                        encode_key(key),
                        _entry_bytes(first, self._ctrs[first.id], old_sets.get(key, 0)),
                    )
                else:
                    m.delete(encode_key(key))
            except OSError:
                pass
        for set_id in new_sets.values():
            self._release_set(set_id)

    # -- counter indices and the IPv4 prefix hint ---------------------------------------------

    def _zero_counters(self, indices: Sequence[int]) -> None:
        self._maps["xdpfw_rule_stats"].update_array(indices, bytes(ctypes.sizeof(abi.RuleStats)))
        self._seen[indices] = 0

    def _hint_changes(
        self, plan: Plan, old_entries: dict[TableKey, tuple[Rule, ...]]
    ) -> list[tuple[int, TableKey, int]]:
        """(trie, key, +1 or -1) for each IPv4 trie entry `plan` creates or deletes."""
        out = []
        for key, slots in plan.entries.items():
            trie = _HINT_TRIES.get(key.table)
            if trie is not None and bool(slots) != bool(old_entries[key]):
                out.append((trie, key, 1 if slots else -1))
        return out

    def _hint_account(self, changes: Iterable[tuple[int, TableKey, int]]) -> None:
        for trie, key, delta in changes:
            if key.plen <= 16:
                lo, hi = _span(key, 16)
                self._cover[trie, lo:hi] += delta
                continue
            addr = int.from_bytes(key.addr, "big")
            block = self._inner[trie].setdefault(addr >> 16, set())
            if delta > 0:
                block.add(addr << 6 | key.plen)
            else:
                block.discard(addr << 6 | key.plen)
                if not block:
                    del self._inner[trie][addr >> 16]

    def _hint_redo(self, changes: Iterable[tuple[int, TableKey, int]]) -> None:
        """Rewrite the hint words of every /16 the changed keys touch, from the recorded keys:
        each /16 once, however many of the changed keys lie in it."""
        spans: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        for trie, key, _ in changes:
            spans[trie].append(_span(key, 16))
        for trie, ranges in enumerate(spans):
            ranges.sort()
            merged: list[list[int]] = []
            for lo, hi in ranges:
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            for lo, hi in merged:
                self._hint_redo_range(trie, lo, hi)

    def _hint_redo_range(self, trie: int, lo: int, hi: int, widen_only: bool = False) -> None:
        """Recompute the words of /16s lo .. hi-1 of one trie; store only those that differ.
        With widen_only, set missing bits but clear none (another process may be adding)."""
        cover = self._cover[trie, lo:hi] > 0
        fresh = np.where(np.repeat(cover, 4), np.uint64(0xFFFF_FFFF_FFFF_FFFF), np.uint64(0))
        inner = self._inner[trie]
        blocks = range(lo, hi) if hi - lo <= len(inner) else sorted(inner)
        for block in blocks:
            keys = inner.get(block)
            if not keys or not lo <= block < hi or cover[block - lo]:
                continue
            part = fresh[(block - lo) * 4 : (block - lo + 1) * 4]  # a view: 256 /24s
            for packed in keys:
                plen = packed & 63
                first = (packed >> 14) & 0xFF  # the key's first /24 inside the /16
                _set_bits(part, first, first + (1 << (24 - plen) if plen < 24 else 1))
        words = self._hint[trie, lo * 4 : hi * 4]
        if widen_only:
            fresh |= words
        changed = np.flatnonzero(words != fresh)
        words[changed] = fresh[changed]

    def _adopt_counters_and_hint(
        self, owner: dict[int, int], trie_keys: list[tuple[int, TableKey, int]]
    ) -> None:
        """Counter indices and prefix-hint keys of adopted maps, as `_adopted_entries` read
        them from the slots and the IPv4 tries."""
        missing = [rid for rid in self.compiler.rules if not owner.get(rid)]
        if missing:
            raise DatapathError(
                f"pinned slots carry no counter index for rules {missing[:5]}: the maps were "
                "not written by this ABI"
            )
        self._ctrs.adopt({rid: owner[rid] for rid in self.compiler.rules})
        self._hint_account(trie_keys)
        for trie in (0, 1):  # adoption may run beside a live service (`xdpfw detach`)
            self._hint_redo_range(trie, 0, 1 << 16, widen_only=True)

    def _alloc_set(self) -> int:
        if self._free_sets and time.monotonic() - self._free_sets[0][1] >= SET_QUARANTINE_S:
            return self._free_sets.popleft()[0]
        if self._next_set < self.caps.max_sets:
            self._next_set += 1
            return self._next_set - 1
        if self._free_sets:  # every set is in use or quarantined: wait out the quarantine
            set_id, freed = self._free_sets.popleft()
            time.sleep(max(0.0, SET_QUARANTINE_S - (time.monotonic() - freed)))
            return set_id
        raise CapacityExceeded("xdpfw_sets", self.caps.max_sets - 1, "raise --max-sets")

    def _release_set(self, set_id: int) -> None:
        self._free_sets.append((set_id, time.monotonic()))

    def _write_config(self) -> None:
        conf = abi.Config()
        conf.abi_version = abi.ABI_VERSION
        for i, n in enumerate(self.compiler.table_counts()):
            conf.n_entries[i] = n
        conf.max_rules = self.caps.max_rules
        conf.max_prefixes = self.caps.max_prefixes
        conf.max_sets = self.caps.max_sets
        conf.build_id[:] = self.build_id.ljust(8, b"\0")[:8]
        try:
            self._maps["xdpfw_config"].update(_U32(0), conf)
        except OSError as exc:
            raise _kernel("writing xdpfw_config", exc) from exc

    # -- counters ------------------------------------------------------------------------------

    def rule_counters(self, rule_ids: Iterable[int] | None = None) -> dict[int, RuleCounters]:
        """Per-rule counters: packets and bytes summed over CPUs, last hit as Unix time."""
        if rule_ids is None:
            return dict(_as_counters(*self.counter_arrays()))
        stats = self._maps["xdpfw_rule_stats"]
        unpack = struct.Struct("=" + "QQ" * stats.ncpus).unpack  # xdpfw_rule_stats per CPU
        offset = _mono_offset()
        out: dict[int, RuleCounters] = {}
        for rid in rule_ids:
            idx = self._ctrs.get(rid)
            if idx is None:
                continue
            t = int(self._seen[idx])
            if not t:
                out[rid] = RuleCounters(0, 0, None)
                continue
            raw = stats.lookup_raw(_U32_BYTES.pack(idx))
            if raw is None:
                continue
            vals = unpack(raw)
            out[rid] = RuleCounters(sum(vals[0::2]), sum(vals[1::2]), offset + t / 1e9)
        return out

    def counter_index(self, rule_id: int) -> int | None:
        """The rule's index in xdpfw_rule_stats / xdpfw_rule_seen (verification, diagnostics)."""
        return self._ctrs.get(rule_id)

    def counter_indices_in_use(self) -> int:
        return int(np.count_nonzero(self._ctrs.view))

    def top_counters(self, n: int | None = None) -> list[tuple[int, RuleCounters]]:
        """Rules by packets, most first (ties: lower id first); the first n, or all.

        Vectorised over the counter array, so the cost is one batch read and a partition,
        not a Python object per rule.
        """
        ids, packets, nbytes, last = self.counter_arrays()
        if n is not None and n < len(ids):
            if n <= 0:
                return []
            cut = len(ids) - n
            threshold = np.partition(packets, cut)[cut]  # the n-th largest count
            above = np.flatnonzero(packets > threshold)
            tied = np.flatnonzero(packets == threshold)
            want = n - len(above)
            if len(tied) > want:
                tied = tied[np.argpartition(ids[tied], want - 1)[:want]]
            sel = np.concatenate((above, tied))
        else:
            sel = np.arange(len(ids))
        sel = sel[np.lexsort((ids[sel], ~packets[sel]))]
        return _as_counters(ids[sel], packets[sel], nbytes[sel], last[sel])

    def counter_arrays(
        self,
    ) -> tuple[
        np.ndarray[Any, np.dtype[np.uint32]],
        np.ndarray[Any, np.dtype[np.uint64]],
        np.ndarray[Any, np.dtype[np.uint64]],
        np.ndarray[Any, np.dtype[np.uint64]],
    ]:
        """(rule ids, packets, bytes, last hit ns) of every rule, summed over CPUs.

        Only rules hit since they got their index (last hit != 0) have their per-CPU counters
        read: one element at a time when they are few, else in batches of 65,536 elements
        (only the hit rows of each kept). The lock covers the copy of who owns which index,
        not the reads: a rule change meanwhile only shifts which packets a reader sees.
        """
        stats = self._maps["xdpfw_rule_stats"]
        with self._lock:
            top = self._ctrs.high
            owners = self._ctrs.view[:top].copy()
            live = np.flatnonzero(owners)
            last = self._seen[live].copy()
        hot = live[last != 0]
        packets = np.zeros(len(live), dtype=np.uint64)
        nbytes = np.zeros(len(live), dtype=np.uint64)
        if len(hot):
            width = stats.ncpus * 2  # u64s per element: packets and bytes per CPU
            if len(hot) <= _FEW_HOT:
                blob = b"".join(
                    stats.lookup_raw(_U32_BYTES.pack(int(i))) or bytes(width * 8) for i in hot
                )
                rows = np.frombuffer(blob, dtype="<u8").reshape(-1, stats.ncpus, 2)
            else:
                step = 65536
                parts = []
                for lo in range(int(hot[0]) // step * step, int(hot[-1]) + 1, step):
                    want = hot[(hot >= lo) & (hot < lo + step)]
                    if not len(want):
                        continue
                    hi = int(want[-1]) + 1
                    chunk = np.frombuffer(stats.read_array(hi, start=lo), dtype="<u8")
                    parts.append(chunk.reshape(-1, stats.ncpus, 2)[want - lo])
                rows = np.concatenate(parts)
            where = last != 0
            packets[where] = rows[:, :, 0].sum(axis=1, dtype=np.uint64)
            nbytes[where] = rows[:, :, 1].sum(axis=1, dtype=np.uint64)
        return owners[live], packets, nbytes, last

    def global_counters(self) -> GlobalCounters:
        per_cpu = self._maps["xdpfw_stats"].lookup_percpu(_U32(0)) or []
        tot = [sum(c.counter[i] for c in per_cpu) for i in range(abi.Stat.MAX)]
        return GlobalCounters(
            packets=tot[abi.Stat.PACKETS],
            passed=tot[abi.Stat.PASSED],
            dropped=tot[abi.Stat.DROPPED],
            monitored=tot[abi.Stat.MONITORED],
            malformed=tot[abi.Stat.MALFORMED],
            non_ip=tot[abi.Stat.NON_IP],
            fragments=tot[abi.Stat.FRAGMENTS],
            bytes=tot[abi.Stat.BYTES],
        )

    def table_usage(self) -> dict[str, tuple[int, int]]:
        """(entries, capacity) per lookup table, plus rules and sets."""
        counts = self.compiler.table_counts()
        usage = {
            t.map_name: (counts[t], self.caps.limit(t)) for t in Table if t is not Table.MAX
        }
        usage["rules"] = (len(self.compiler), self.caps.max_rules)
        usage["xdpfw_sets"] = (self.compiler.n_sets, self.caps.max_sets - 1)
        return usage

    def map(self, name: str) -> bpfsys.Map[Any, Any]:
        """A map by name (tests and diagnostics)."""
        return self._maps[name]

    # -- adopting ------------------------------------------------------------------------------

    def _adopted_entries(
        self,
        used_sets: set[int],
        counters: dict[int, int],
        trie_keys: list[tuple[int, TableKey, int]],
    ) -> Iterator[tuple[Table, int, list[tuple[int, int]]]]:
        """Every lookup-table entry as (table, compact key, slots) for `RuleCompiler.adopt`.

        A slot is (rule id, code) when the rule is the entry's own, (rule id, -1) when it is
        inherited from a covering prefix. Records each entry's set in `_set_of`/`used_sets`,
        each rule's counter index in `counters` and each IPv4 trie key in `trie_keys`.
        """
        sets = self._maps["xdpfw_sets"]
        slot_size = _SLOT.size
        for table in Table:
            if table is Table.MAX:
                continue
            lpm = table in LPM_TABLES
            is_src = table in (Table.SRC4, Table.SRC6, Table.SRC4_LPM, Table.SRC6_LPM)
            direction = DIR_SRC if is_src else DIR_DST
            for raw_key, raw in self._maps[table.map_name].dump_raw():
                if table is Table.ANY:
                    k, plen = 0, 0
                else:
                    addr = raw_key[4:] if lpm else raw_key
                    plen = _U32_BYTES.unpack_from(raw_key)[0] if lpm else len(addr) * 8
                    k = (
                        (int.from_bytes(addr, "big") << 11)
                        | (plen << 3)
                        | ((len(addr) == 16) << 2)
                        | direction
                    )
                set_id = _ENTRY_TAIL.unpack_from(raw, slot_size)[0]
                found = [_adopted_slot(k, plen, is_src, raw, 0)]
                if set_id:
                    self._set_of[_decode_adopted_key(table, k)] = set_id
                    used_sets.add(set_id)
                    rest = sets.lookup_raw(_U32_BYTES.pack(set_id)) or b""
                    for off in range(0, len(rest) - slot_size + 1, slot_size):
                        if _SLOT.unpack_from(rest, off)[0]:  # rank 0: an unused slot
                            found.append(_adopted_slot(k, plen, is_src, rest, off))
                if table in _HINT_TRIES:
                    trie_keys.append((_HINT_TRIES[table], _decode_adopted_key(table, k), 1))
                slots = []
                for rule_id, code, counter in found:
                    counters[rule_id] = counter
                    slots.append((rule_id, code))
                yield table, k, slots


def _wrap_maps(loaded: LoadedProgram) -> dict[str, bpfsys.Map[Any, Any]]:
    maps: dict[str, bpfsys.Map[Any, Any]] = {}
    for name, fd in loaded.map_fds.items():
        key_t, val_t = _MAP_TYPES[name]
        maps[name] = bpfsys.Map(fd, name, key_t, val_t)
    return maps


def _pin_all(loaded: LoadedProgram, pin_dir: Path) -> list[Path]:
    """Pin maps, then the program: the program pin marks a complete set."""
    pin_dir.mkdir(parents=True, exist_ok=True)
    pinned: list[Path] = []
    try:
        for name, fd in loaded.map_fds.items():
            bpfsys.obj_pin(fd, str(pin_dir / name))
            pinned.append(pin_dir / name)
        bpfsys.obj_pin(loaded.prog_fd, str(pin_dir / PROG_PIN))
        pinned.append(pin_dir / PROG_PIN)
    except BaseException:
        for path in pinned:
            path.unlink(missing_ok=True)
        raise
    return pinned


def _staging(pin_dir: Path) -> Path:
    """Where the compiling child pins what it loaded (bpffs names may not contain dots)."""
    return pin_dir.with_name(f"{pin_dir.name}-loading-{os.getpid()}")


def _remove_pin_dir(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _read_raw_config(fd: int, value_size: int) -> bytes:
    m: bpfsys.Map[Any, Any] = bpfsys.Map(
        os.dup(fd), "xdpfw_config", ctypes.c_uint32, ctypes.c_uint8 * value_size
    )
    try:
        val = m.lookup(_U32(0))
        return bytes(val) if val is not None else b""
    finally:
        m.close()


def _prog_name(prog_id: int) -> str:
    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return bpfsys.prog_info(fd).name
    finally:
        os.close(fd)


def _ensure_bpffs(path: Path) -> None:
    """The pin directory must be on a bpf filesystem."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if os.statvfs(probe).f_fsid == 0:
        pass
    with open("/proc/mounts") as fh:
        mounts = [line.split()[1:3] for line in fh]
    best = max((m for m in mounts if str(probe).startswith(m[0])), key=lambda m: len(m[0]))
    if best[1] != "bpf":
        raise DatapathError(
            f"{path} is not on a bpf filesystem (it is on {best[0]}, type {best[1]}). Mount one: "
            f"`mount -t bpf bpf /sys/fs/bpf` (make setup does this), or pick --bpffs-dir on bpffs."
        )


# -- adopting pinned maps (helpers of Datapath._adopted_entries) -----------------------------


def _adopted_slot(
    k: int, plen: int, is_src: bool, raw: bytes, off: int
) -> tuple[int, int, int]:
    """(rule id, code, counter index) of the slot at raw[off:]; code -1 when inherited."""
    rank, rule_id, lo, hi, proto, verdict, has_ports, counter = _SLOT.unpack_from(raw, off)
    src_len = (rank >> 54) & 0xFF
    dst_len = (rank >> 46) & 0xFF
    if k == 0:
        if src_len or dst_len:
            return rule_id, -1, counter
    elif (is_src and src_len != plen) or (not is_src and dst_len != plen):
        return rule_id, -1, counter
    code = (k << CODE_SHIFT) | (verdict << 41) | (proto << 33)
    if has_ports:
        code |= (1 << 32) | (lo << 16) | hi
    return rule_id, code, counter


def _decode_adopted_key(table: Table, k: int) -> TableKey:
    if table is Table.ANY:
        return TableKey(Table.ANY)
    return TableKey(table, (k >> 11).to_bytes(16 if k & 4 else 4, "big"), (k >> 3) & 0xFF)


__all__ += ["EXACT_TABLES"]
