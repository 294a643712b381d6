"""Long differential soak: random rule sets, rule churn and random frames, program vs model.

    sudo .venv/bin/python -m xdpfw.verify.soak --frames 10000000         # ~10M frames, random seed
    sudo .venv/bin/python -m xdpfw.verify.soak --frames 300000 --seed 7  # replay a run exactly
    sudo .venv/bin/python -m xdpfw.verify.soak --frames 1000000 --rules 5000 --json

It loads its own copy of the program into a unique bpffs directory (removed on exit, also on
Ctrl-C / SIGTERM), then loops: build a random rule set (0 to --rules rules: exact hosts and
prefixes of every length, nested and overlapping, ports and ranges, allow/drop/monitor), then
alternate batches of random frames with rule churn (adds, removes, removal of covering
prefixes), checking every frame with xdpfw.verify.harness.Differ and the map contents with
harness.entry_mismatches. It stops at the first disagreement, prints a minimal reproducer (rules
+ frame hex, also as a tests/corpus/ entry) and exits 1. The same loop, with fixed seeds, is what
tests/test_differential.py runs in CI.

The generators here use only `random.Random` (no Hypothesis), so a run is a pure function of
its seed and --rules.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from xdpfw.compiler import Capacities, RuleCompiler
from xdpfw.errors import CapacityExceeded, XdpfwError
from xdpfw.rules import Network, Rule, RuleSpec
from xdpfw.verify.frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    EXT_AH,
    EXT_DSTOPTS,
    EXT_FRAGMENT,
    EXT_HOPOPTS,
    EXT_ROUTING,
    ExtHeader,
    arp_frame,
    build_frame,
    l3_offset,
    raw_ethertype_frame,
)
from xdpfw.verify.harness import MAX_FRAME, MIN_FRAME, Differ, Mismatch

__all__ = [
    "SOAK_CAPS",
    "FrameGen",
    "RuleGen",
    "SoakReport",
    "fit",
    "main",
    "soak",
]

# Big enough that thousands of random rules (many nested prefixes, hence many rule sets) fit.
SOAK_CAPS = Capacities(max_rules=65_536, max_prefixes=65_536, max_sets=16_384)

_TEST4 = ipaddress.IPv4Network("198.18.0.0/15")
_TEST6 = ipaddress.IPv6Network("2001:db8::/32")
_EDGE4 = [0, 1, 0x7F000001, 0xC0A80001, 0xFFFFFFFE, 0xFFFFFFFF]
_EDGE6 = [0, 1, int(ipaddress.IPv6Address("::ffff:198.18.0.1")), (1 << 128) - 1,
          int(ipaddress.IPv6Address("fe80::1")), int(ipaddress.IPv6Address("ff02::1"))]
_PORTS = [0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 32768, 65534, 65535]
_PROTOS = ["tcp", "udp", "icmp", "icmpv6"]
# IP protocol numbers frames carry besides tcp/udp/icmp/icmpv6: IPv6 extension header numbers as
# the upper protocol (the payload then reads as an extension header), GRE, SCTP, reserved.
_OTHER_PROTOS = [0, 2, 4, 41, 43, 44, 47, 50, 51, 59, 60, 132, 135, 253, 255]


def _addr(version: int, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _network(version: int, value: int, plen: int) -> Network:
    bits = 32 if version == 4 else 128
    masked = value >> (bits - plen) << (bits - plen) if plen else 0
    if version == 4:
        return ipaddress.IPv4Network((masked, plen))
    return ipaddress.IPv6Network((masked, plen))


def _contains(outer: Network, inner: Network) -> bool:
    """Whether ``inner`` (same family, longer) lies inside ``outer``."""
    shift = outer.max_prefixlen - outer.prefixlen
    return int(inner.network_address) >> shift == int(outer.network_address) >> shift


class RuleGen:
    """Random rules around a pool of anchor addresses, so prefixes nest and overlap.

    Each rule names a source (40%), a destination (35%) or no address; its network is an anchor
    cut to a prefix length that is a host route, 0 (/0), a near-host length or any length; it
    names a protocol and (tcp/udp) a port or a range now and then; it is an allow (20%), an
    enforced drop (55%) or a monitored drop (25%).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.anchors: list[tuple[int, int]] = []

    def new_anchors(self, n: int) -> None:
        rng = self.rng
        self.anchors = []
        for _ in range(max(1, n)):
            version = rng.choice((4, 6))
            roll = rng.random()
            if version == 4:
                if roll < 0.6:
                    value = int(_TEST4.network_address) + rng.randrange(_TEST4.num_addresses)
                elif roll < 0.9:
                    value = rng.getrandbits(32)
                else:
                    value = rng.choice(_EDGE4)
            elif roll < 0.6:
                value = int(_TEST6.network_address) + rng.getrandbits(96)
            elif roll < 0.9:
                value = rng.getrandbits(128)
            else:
                value = rng.choice(_EDGE6)
            self.anchors.append((version, value))

    def _plen(self, bits: int) -> int:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return bits
        if roll < 0.40:
            return 0
        if roll < 0.55:
            return bits - rng.randint(1, 8)
        return rng.randint(0, bits)

    def rule(self, rule_id: int, addressless: float = 0.25) -> Rule:
        """A random rule; ``addressless`` is the share of rules that name no address."""
        rng = self.rng
        if not self.anchors:
            self.new_anchors(4)
        while True:
            kw: dict[str, Any] = {}
            version, value = rng.choice(self.anchors)
            where = rng.random() * 0.75 / (1 - addressless)
            fam: int | None = None
            if where < 0.75:
                fam = version
                net = _network(version, value, self._plen(32 if version == 4 else 128))
                kw["src" if where < 0.4 else "dst"] = net
            protos = ["tcp", "udp", "icmp" if fam == 4 else "icmpv6"]
            if fam is None:
                protos = list(_PROTOS)
            if rng.random() < (0.6 if fam is not None else 1.0):
                kw["proto"] = rng.choice([*protos, "tcp", "udp"])
            if kw.get("proto") in ("tcp", "udp") and rng.random() < 0.55:
                kw["dport"] = self._ports()
            roll = rng.random()
            if roll < 0.2:
                kw["action"] = "allow"
            elif roll < 0.45:
                kw["mode"] = "monitor"
            if not any(k in kw for k in ("src", "dst", "proto")):
                continue
            return RuleSpec.parse(**kw).with_id(rule_id)

    def _ports(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            return str(rng.choice(_PORTS) if rng.random() < 0.7 else rng.randrange(65536))
        if roll < 0.5:
            return "0-65535"
        lo = rng.choice(_PORTS) if rng.random() < 0.5 else rng.randrange(65536)
        hi = min(65535, lo + rng.choice((1, 2, 9, 100, 1000, rng.randrange(65536))))
        return f"{lo}-{hi}"

    def crowd(self, first_id: int) -> list[Rule]:
        """Up to 34 port rules on one prefix and a prefix covering it: entries filled to (and
        past) the 32-slot limit, so the last slots of a rule set are exercised."""
        rng = self.rng
        version, value = rng.choice(self.anchors)
        bits = 32 if version == 4 else 128
        inner = rng.randint(bits - 12, bits)
        outer = rng.randint(max(0, inner - 16), inner)
        side = rng.choice(("src", "dst"))
        proto = rng.choice(("tcp", "udp"))
        base = rng.randrange(65000)
        out = []
        for i in range(rng.randint(20, 34)):
            plen = inner if rng.random() < 0.5 else outer
            kw: dict[str, Any] = {side: _network(version, value, plen), "proto": proto,
                                  "dport": base + i}
            roll = rng.random()
            if roll < 0.15:
                kw["action"] = "allow"
            elif roll < 0.3:
                kw["mode"] = "monitor"
            out.append(RuleSpec.parse(**kw).with_id(first_id + i))
        return out

    def rule_set(self, n: int, first_id: int = 1) -> list[Rule]:
        """About ``n`` rules (duplicates of a match dropped), ids from first_id upwards; now and
        then with a crowd (see `crowd`) among them."""
        self.new_anchors(max(2, n // 6))
        candidates: list[Rule] = []
        for i in range(n):
            # a handful of address-less rules, as in real rule sets (each one is looked at for
            # every frame by the model)
            candidates.append(self.rule(first_id, 0.25 if i < 48 else 0.01))
            if i == n // 2 and n >= 8 and self.rng.random() < 0.3:
                candidates.extend(self.crowd(first_id))
        out: list[Rule] = []
        seen: set[object] = set()
        for rule in candidates:
            if rule.match_key() not in seen:
                seen.add(rule.match_key())
                out.append(rule.spec().with_id(first_id + len(out)))
        return out


def fit(rules: Sequence[Rule], caps: Capacities) -> tuple[list[Rule], list[Rule]]:
    """Split rules into those that fit together (in order, as the compiler would accept them
    one by one) and those it would refuse with CapacityExceeded."""
    scratch = RuleCompiler(caps)
    accepted: list[Rule] = []
    refused: list[Rule] = []
    for start in range(0, len(rules), 64):
        chunk = list(rules[start : start + 64])
        try:  # usually a whole chunk fits: one plan instead of 64
            plan = scratch.plan_add(chunk)
        except CapacityExceeded:
            pass
        else:
            scratch.commit(plan)
            accepted += chunk
            continue
        for rule in chunk:
            try:
                plan = scratch.plan_add([rule])
            except CapacityExceeded:
                refused.append(rule)
                continue
            scratch.commit(plan)
            accepted.append(rule)
    return accepted, refused


class FrameGen:
    """Random frames aimed at a rule set: its addresses, their one-bit neighbours, its port
    boundaries; VLAN/QinQ, IPv4 options, IPv6 extension chains (valid and over-long), first and
    non-first fragments, truncation at random offsets (and now and then at every offset),
    flipped bits and plain garbage."""

    def __init__(self, rng: random.Random, sweep: float = 0.01) -> None:
        self.rng = rng
        self.sweep = sweep
        self._nets: dict[int, list[Network]] = {4: [], 6: []}
        self._rules: list[Rule] = []
        self._ports: list[int] = list(_PORTS)
        self._protos: list[int] = []

    def aim(self, rules: Sequence[Rule]) -> None:
        """Aim at these rules (call again after every change)."""
        self._rules = list(rules)
        self._nets = {4: [], 6: []}
        ports = set(_PORTS)
        for r in rules:
            net = r.src if r.src is not None else r.dst
            if net is not None:
                self._nets[net.version].append(net)
            if r.dport is not None:
                ports.update(
                    p for p in (r.dport.lo - 1, r.dport.lo, r.dport.hi, r.dport.hi + 1)
                    if 0 <= p <= 65535
                )
        self._ports = sorted(ports)
        self._protos = sorted({r.proto.number for r in rules if r.proto is not None})

    def _inside(self, net: Network) -> Network:
        """``net`` or, often, a longer prefix of the rule set inside it: such a frame hits the
        longer prefix's entry and must still find the covering prefix's inherited slots."""
        rng = self.rng
        if rng.random() < 0.5:
            nets = self._nets[net.version]
            for _ in range(6):
                other = rng.choice(nets)
                if other.prefixlen > net.prefixlen and _contains(net, other):
                    return other
        return net

    def _address(self, version: int, net: Network | None = None) -> str:
        """An address in ``net`` (or in a random network of the rule set), maybe one bit
        away; or a random one."""
        rng = self.rng
        nets = self._nets[version]
        bits = 32 if version == 4 else 128
        if net is not None or (nets and rng.random() < 0.8):
            net = net if net is not None else rng.choice(nets)
            base, plen = int(net.network_address), net.prefixlen
            host_bits = bits - plen
            roll = rng.random()
            if roll < 0.3 or not host_bits:
                value = base
            elif roll < 0.45:
                value = base | ((1 << host_bits) - 1)
            else:
                value = base | rng.getrandbits(host_bits)
            if rng.random() < 0.35:  # one bit away: just inside the prefix (a miss) or outside
                choices = [i for i in (plen - 1, plen) if 0 <= i < bits]
                i = rng.choice(choices) if choices and rng.random() < 0.7 else rng.randrange(bits)
                value ^= 1 << (bits - 1 - i)
            return str(_addr(version, value))
        roll = rng.random()
        if roll < 0.5:
            test = _TEST4 if version == 4 else _TEST6
            return str(test.network_address + rng.randrange(min(test.num_addresses, 1 << 64)))
        if roll < 0.9:
            return str(_addr(version, rng.getrandbits(bits)))
        return str(_addr(version, rng.choice(_EDGE4 if version == 4 else _EDGE6)))

    def _chain(self) -> list[ExtHeader]:
        rng = self.rng
        n = rng.choice((1, 1, 1, 2, 2, 3, 4, 6, 7, 8, 8, 9, 10))
        chain: list[ExtHeader] = []
        budget = 2400
        for _ in range(n):
            kind = rng.choice((EXT_HOPOPTS, EXT_ROUTING, EXT_DSTOPTS, EXT_AH, EXT_FRAGMENT))
            if kind == EXT_FRAGMENT:
                offset = 0 if rng.random() < 0.6 else rng.randrange(1, 0x2000)
                h = ExtHeader(EXT_FRAGMENT, 8, offset, rng.random() < 0.5, rng.getrandbits(32))
            elif kind == EXT_AH:
                units = rng.choice((2, 2, 3, 4, 6)) if rng.random() < 0.9 else rng.randint(2, 257)
                h = ExtHeader(EXT_AH, 4 * units)
            else:
                units = rng.choice((1, 1, 2, 3)) if rng.random() < 0.9 else rng.randint(1, 256)
                h = ExtHeader(kind, 8 * units)
            if h.length > budget:
                h = ExtHeader(kind, 12 if kind == EXT_AH else 8)
            budget -= h.length
            chain.append(h)
        return chain

    def _aimed(self, target: Rule) -> dict[str, Any]:
        """Addresses, protocol and port aimed at one rule (each now and then a near miss)."""
        rng = self.rng
        net = target.src if target.src is not None else target.dst
        version = net.version if net is not None else rng.choice((4, 6))
        mine = self._address(version, self._inside(net)) if net is not None else None
        other = self._address(version)
        src, dst = (mine, other) if target.src is not None else (other, mine or other)
        proto = target.proto.number if target.proto is not None else rng.choice((6, 17, 1, 58))
        if rng.random() < 0.1:
            proto = rng.choice((6, 17, 1, 58))
        ports = target.dport
        if ports is not None and rng.random() < 0.85:
            dport = rng.choice((ports.lo, ports.hi, rng.randint(ports.lo, ports.hi),
                                max(0, ports.lo - 1), min(65535, ports.hi + 1)))
        else:
            dport = rng.choice(self._ports)
        return {"src": src, "dst": dst, "proto": proto, "dport": dport}

    def _structured(self) -> bytes:
        rng = self.rng
        if self._rules and rng.random() < 0.6:
            kw = self._aimed(rng.choice(self._rules))
            version: int = ipaddress.ip_address(kw["src"]).version
        else:
            version = rng.choice((4, 6))
            if (self._nets[4] or self._nets[6]) and not self._nets[version] and rng.random() < 0.8:
                version = 10 - version
            kw = {"src": self._address(version), "dst": self._address(version)}
            rule_protos = self._protos
            roll = rng.random()
            if rule_protos and roll < 0.4:
                kw["proto"] = rng.choice(rule_protos)
            elif roll < 0.85:
                kw["proto"] = rng.choice((6, 17, 6, 17, 1, 58))
            else:
                kw["proto"] = (rng.choice(_OTHER_PROTOS) if rng.random() < 0.8
                               else rng.randrange(256))
            kw["dport"] = rng.choice(self._ports) if rng.random() < 0.7 else rng.randrange(65536)
        kw["sport"] = rng.randrange(65536)
        roll = rng.random()
        if roll < 0.12:
            kw["vlans"] = [(rng.choice((ETH_P_8021Q, ETH_P_8021AD)), rng.randrange(4096))]
        elif roll < 0.2:
            kw["vlans"] = [(ETH_P_8021AD, rng.randrange(4096)), (ETH_P_8021Q, rng.randrange(4096))]
        elif roll < 0.23:
            kw["vlans"] = [(rng.choice((ETH_P_8021Q, ETH_P_8021AD)), i) for i in range(3)]
        if version == 4 and rng.random() < 0.12:
            kw["ip_options"] = rng.randbytes(rng.randint(1, 40))
        has_frag = False
        if version == 6 and rng.random() < 0.3:
            chain = self._chain()
            has_frag = any(h.kind == EXT_FRAGMENT for h in chain)
            kw["ext_headers"] = chain
        roll = rng.random()
        if not has_frag and roll < 0.07:
            kw["more_fragments"] = True
        elif not has_frag and roll < 0.15:
            kw["frag_offset"] = rng.randrange(1, 0x2000)
            kw["more_fragments"] = rng.random() < 0.5
        if rng.random() < 0.3:
            kw["payload"] = rng.randbytes(rng.randint(1, 24))
        return build_frame(**kw)

    def _garbage(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.3:
            return arp_frame(vlans=[(ETH_P_8021Q, 1)] if rng.random() < 0.3 else [])
        body = rng.randbytes(rng.randint(0, 120))
        ethertype = rng.choice((ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, ETH_P_ARP,
                                rng.randrange(65536)))
        return raw_ethertype_frame(ethertype, body)

    def frame(self) -> bytes:
        """One frame (MIN_FRAME..MAX_FRAME bytes)."""
        rng = self.rng
        frame = self._garbage() if rng.random() < 0.03 else self._structured()
        roll = rng.random()
        if roll < 0.1 and len(frame) > MIN_FRAME:
            frame = frame[: rng.randrange(MIN_FRAME, len(frame))]
        elif roll < 0.16:
            buf = bytearray(frame)
            for _ in range(rng.choice((1, 1, 2, 3))):
                pos = rng.randrange(min(len(buf), 100))
                if rng.random() < 0.7:
                    buf[pos] ^= 1 << rng.randrange(8)
                else:
                    buf[pos] = rng.randrange(256)
            frame = bytes(buf)
        elif roll < 0.19:
            # the IP version/header-length byte: IPv4 ihl 0-15, a wrong version
            with contextlib.suppress(ValueError):
                at = l3_offset(frame)
                if at < len(frame):
                    value = rng.choice((0x40 | rng.randrange(16), rng.randrange(16) << 4 | 5,
                                        rng.randrange(256)))
                    frame = frame[:at] + bytes([value]) + frame[at + 1 :]
        return frame[:MAX_FRAME]

    def frames(self, n: int) -> Iterator[bytes]:
        """``n`` frames; a few are followed by all their truncations (counted in ``n``)."""
        made = 0
        while made < n:
            frame = self.frame()
            yield frame
            made += 1
            if self.rng.random() < self.sweep:
                for cut in range(MIN_FRAME, len(frame)):
                    if made >= n:
                        return
                    yield frame[:cut]
                    made += 1


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class SoakReport:
    seed: int
    frames: int = 0
    rule_sets: int = 0
    rules_added: int = 0
    rules_removed: int = 0
    refused_adds: int = 0
    largest_rule_set: int = 0
    entry_checks: int = 0
    elapsed_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    mismatch: Mismatch | None = None
    entry_problems: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # the churn since the last fresh rule set

    @property
    def ok(self) -> bool:
        return self.mismatch is None and not self.entry_problems

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "frames": self.frames,
            "rule_sets": self.rule_sets,
            "rules_added": self.rules_added,
            "rules_removed": self.rules_removed,
            "refused_adds": self.refused_adds,
            "largest_rule_set": self.largest_rule_set,
            "entry_checks": self.entry_checks,
            "elapsed_s": round(self.elapsed_s, 2),
            "frames_per_s": round(self.frames / self.elapsed_s) if self.elapsed_s else 0,
            "outcomes": dict(sorted(self.outcomes.items())),
            "mismatch": None if self.mismatch is None else str(self.mismatch),
            "entry_problems": self.entry_problems,
        }


_VERDICT_NAMES = {0: "no rule", 1: "monitored", 2: "dropped", 3: "allowed"}


def _set_size(rng: random.Random, max_rules: int) -> int:
    roll = rng.random()
    if roll < 0.25:
        return rng.randint(0, min(8, max_rules))
    if roll < 0.65:
        return rng.randint(0, min(64, max_rules))
    if roll < 0.9:
        return rng.randint(0, min(512, max_rules))
    return rng.randint(0, max_rules)


def soak(
    differ: Differ,
    *,
    frames: int,
    seed: int,
    max_rules: int = 3000,
    churn: bool = True,
    minimize: bool = True,
    progress: Callable[[SoakReport], None] | None = None,
) -> SoakReport:
    """The differential loop; stops at ``frames`` frames or the first disagreement."""
    rng = random.Random(seed)
    rgen, fgen = RuleGen(rng), FrameGen(rng)
    report = SoakReport(seed=seed)
    start = time.monotonic()
    last_progress = start
    base = differ.frames_checked

    def done() -> int:
        return differ.frames_checked - base

    while done() < frames:
        size = _set_size(rng, max_rules)
        wanted = rgen.rule_set(size)
        accepted, refused = fit(wanted, differ.dp.caps)
        if not differ.replace(accepted):
            report.entry_problems.append(
                f"the datapath refused a set of {len(accepted)} rules the compiler accepts"
            )
            break
        for rule in refused[:2]:  # the datapath must refuse them too, and change nothing
            if differ.add([rule]):
                report.entry_problems.append(
                    f"the datapath accepted {rule.describe()} (id {rule.id}) that the compiler "
                    "refused on its own"
                )
                break
        if report.entry_problems:
            break
        report.refused_adds += len(refused)
        report.rule_sets += 1
        report.rules_added += len(accepted)
        report.history = [f"fresh rule set of {len(accepted)} rules"]
        next_id = max((r.id for r in differ.rules), default=0) + 1
        fgen.aim(differ.rules)
        per_set = rng.randint(500, 3000) + 2 * len(accepted)
        steps = rng.randint(2, 8) if churn else 1
        for step in range(steps):
            n = min(per_set // steps + 1, frames - done())
            if n <= 0:
                break
            found = differ.check(fgen.frames(n))
            report.largest_rule_set = max(report.largest_rule_set, len(differ.rules))
            if found:
                mismatch = found[0]
                if minimize:
                    mismatch = differ.minimize(mismatch)
                report.mismatch = mismatch
                break
            if churn and step < steps - 1:
                next_id = _churn(differ, rgen, rng, next_id, report)
                fgen.aim(differ.rules)
                if len(differ.rules) <= 600 or rng.random() < 0.2:
                    report.entry_checks += 1
                    problems = differ.check_entries()
                    if problems:
                        report.entry_problems = problems
                        break
            now = time.monotonic()
            if progress is not None and now - last_progress >= 2.0:
                last_progress = now
                report.frames, report.elapsed_s = done(), now - start
                progress(report)
        if not report.ok:
            break
    report.frames = done()
    report.elapsed_s = time.monotonic() - start
    report.outcomes = {
        _VERDICT_NAMES.get(v, str(v)): n for v, n in sorted(differ.verdicts.items())
    }
    return report


def _plen(rule: Rule) -> int:
    net = rule.src if rule.src is not None else rule.dst
    return -1 if net is None else net.prefixlen


def _bits(rule: Rule) -> int:
    net = rule.src if rule.src is not None else rule.dst
    return 0 if net is None else net.max_prefixlen


def _churn(
    differ: Differ, rgen: RuleGen, rng: random.Random, next_id: int, report: SoakReport
) -> int:
    """One rule change: add a few, remove a few, or remove covering prefixes."""
    rules = list(differ.rules)
    roll = rng.random()
    if rules and roll < 0.25:
        # remove the shortest prefixes: their slots are inherited by longer ones (stale risk)
        lpm = [r for r in rules if 0 <= _plen(r) < _bits(r)]
        pool = sorted(lpm, key=_plen)[:8] or rules
        gone = rng.sample(pool, k=min(len(pool), rng.randint(1, 3)))
    elif rules and roll < 0.55:
        gone = rng.sample(rules, k=min(len(rules), rng.randint(1, 1 + len(rules) // 10)))
    else:
        gone = []
    if gone:
        differ.remove(r.id for r in gone)
        report.rules_removed += len(gone)
        report.history.append("remove " + ", ".join(f"#{r.id}" for r in gone))
        return next_id
    keys = {r.match_key() for r in rules}
    batch: list[Rule] = []
    for _ in range(rng.randint(1, 6)):
        rule = rgen.rule(next_id)
        if rule.match_key() not in keys:
            keys.add(rule.match_key())
            batch.append(rule)
            next_id += 1
    if differ.add(batch):
        report.rules_added += len(batch)
        report.history.append("add " + "; ".join(f"#{r.id} {r.describe()}" for r in batch))
        return next_id
    report.refused_adds += 1
    for rule in batch:  # all or nothing was refused: try them one by one
        if differ.add([rule]):
            report.rules_added += 1
            report.history.append(f"add #{rule.id} {rule.describe()}")
        else:
            report.refused_adds += 1
    return next_id


# --- the command --------------------------------------------------------------------------------


def _print_progress(report: SoakReport, total: int) -> None:
    rate = report.frames / report.elapsed_s if report.elapsed_s else 0.0
    eta = (total - report.frames) / rate if rate else 0.0
    print(
        f"soak: {report.frames:,}/{total:,} frames  {report.rule_sets} rule sets  "
        f"{rate:,.0f} frames/s  eta {eta:,.0f} s",
        file=sys.stderr,
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xdpfw.verify.soak",
        description="Differential soak of the XDP program against the reference model "
        "(needs root and bpffs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m xdpfw.verify.soak --frames 10000000\n"
        "  python -m xdpfw.verify.soak --frames 300000 --seed 42 --rules 500\n"
        "  python -m xdpfw.verify.soak --frames 1000000 --json --reproducer /tmp/repro.json\n",
    )
    p.add_argument("--frames", type=int, default=10_000_000, help="frames to check (10M)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--rules", type=int, default=3000, help="largest rule set (3000)")
    p.add_argument("--no-churn", action="store_true", help="no rule changes between batches")
    p.add_argument("--bpffs-dir", type=Path, default=None,
                   help="where to pin (default: a unique /sys/fs/bpf/xdpfw-soak-* directory)")
    p.add_argument("--reproducer", type=Path, default=None,
                   help="on a mismatch, write it here as a tests/corpus/ JSON file")
    p.add_argument("--json", action="store_true", help="final summary as JSON on stdout")
    return p


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.frames < 1 or args.rules < 0:
        print("soak: --frames must be >= 1 and --rules >= 0", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("soak: needs root (it loads a BPF program)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    pin_dir = args.bpffs_dir or Path(f"/sys/fs/bpf/xdpfw-soak-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    from xdpfw.datapath import Datapath, DatapathConfig

    signal.signal(signal.SIGTERM, _on_sigterm)
    print(f"soak: seed {seed}, {args.frames:,} frames, rule sets up to {args.rules} rules, "
          f"program pinned under {pin_dir}", file=sys.stderr, flush=True)
    try:
        dp = Datapath.open(DatapathConfig(bpffs_dir=pin_dir, caps=SOAK_CAPS))
    except XdpfwError as exc:
        print(f"soak: cannot load the program: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted while loading", file=sys.stderr)
        return 130
    interrupted = False
    try:
        try:
            report = soak(
                Differ(dp),
                frames=args.frames,
                seed=seed,
                max_rules=args.rules,
                churn=not args.no_churn,
                progress=lambda r: _print_progress(r, args.frames),
            )
        except KeyboardInterrupt:
            interrupted = True
            print("soak: interrupted", file=sys.stderr)
            return 130
    finally:
        dp.close(cleanup=True)
        if interrupted:
            print(f"soak: removed {pin_dir}", file=sys.stderr)
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"soak: {'OK' if report.ok else 'FAILED'}: {report.frames:,} frames, "
            f"{report.rule_sets} rule sets (largest {report.largest_rule_set} rules), "
            f"{report.rules_added} rules added, {report.rules_removed} removed, "
            f"{report.refused_adds} refused for capacity, {report.entry_checks} map checks, "
            f"{report.elapsed_s:.1f} s ({summary['frames_per_s']:,} frames/s), seed {seed}"
        )
        print("soak: model outcomes: " + ", ".join(f"{k} {v:,}" for k, v in
                                                   summary["outcomes"].items()))
    if report.mismatch is not None:
        print(f"soak: MISMATCH after {report.frames:,} frames (replay: --seed {seed} --rules "
              f"{args.rules}{' --no-churn' if args.no_churn else ''})\n{report.mismatch}\n"
              "  changes since the last fresh rule set:\n    "
              + "\n    ".join(report.history[-50:]), file=sys.stderr)
        if args.reproducer is not None:
            args.reproducer.write_text(json.dumps(
                report.mismatch.reproducer(f"soak-seed-{seed}"), indent=2) + "\n")
            print(f"soak: reproducer written to {args.reproducer}", file=sys.stderr)
        return 1
    if report.entry_problems:
        print("soak: MAP CONTENTS DISAGREE with a fresh compile of the rules (seed "
              f"{seed}):\n  " + "\n  ".join(report.entry_problems[:50]) + "\n  history:\n    "
              + "\n    ".join(report.history[-50:]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
