"""The executable reference of the data plane: parser, rule semantics, counters.

This module is the oracle of the differential tests. It is written for clarity, not speed,
independently of bpf/xdp_filter.c, but it must agree with it bit for bit:

* `parse_frame` mirrors parse_eth / parse_ipv4 / parse_ipv6 / parse_l4, check for check and in
  the same order (the order decides which counters a broken frame bumps);
* `evaluate` applies the rule contract of xdpfw.rules directly (allow > enforce drop > limit >
  monitor, then most specific) instead of comparing precomputed ranks, and `Outcome` carries
  the global counter increments that finish() would make for the frame.

Rate limits make the verdict depend on time and on the frames before: `LimitState` is the
buckets and bans of the data plane, and `evaluate(..., limits=state, now=ns)` takes the clock
as an argument (the kernel's is bpf_ktime_get_ns, CLOCK_MONOTONIC).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from xdpfw import abi
from xdpfw.rules import Action, Mode, Rule, RuleSpec

__all__ = [
    "ETH_HLEN",
    "IPV6_EXT_KINDS",
    "Address",
    "BucketKey",
    "LimitState",
    "Outcome",
    "Parsed",
    "Status",
    "credit",
    "evaluate",
    "parse_frame",
    "rule_matches",
    "specificity",
    "total_stats",
]

Status = Literal["ok", "malformed", "non_ip"]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ETH_HLEN = 14
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8)
_VLAN_HLEN = 4

_IPV4_HLEN = 20
_IP_MF = 0x2000
_IP_OFFSET = 0x1FFF

_IPV6_HLEN = 40
_HOPOPTS, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
IPV6_EXT_KINDS = frozenset({_HOPOPTS, _ROUTING, _DSTOPTS, _AH, _FRAGMENT})
_FRAG_HLEN = 8

_TCP, _UDP, _ICMP, _ICMPV6 = 6, 17, 1, 58
# Bytes of the L4 header the data plane needs: TCP/UDP for the ports, ICMP for type+code+csum.
_L4_NEED = {_TCP: 20, _UDP: 8, _ICMP: 4, _ICMPV6: 4}


@dataclass(frozen=True)
class Parsed:
    """What the parser learnt about a frame (struct pkt plus the parser's return code).

    status: "ok" (rules apply), "malformed" (unparsable L2/L3: pass, no rule applies) or
    "non_ip" (pass). family/src/dst/proto/fragment hold what the parser had filled in when it
    stopped, exactly like the C: an IPv6 frame whose extension headers are broken still has
    family 6, its addresses and possibly fragment=True (finish() counts that fragment); a broken
    IPv4 header has nothing.
    dport: only when the TCP/UDP header was complete and the packet is not a non-first fragment.
    fragment: IPv4 MF or offset != 0; IPv6 any fragment header whose first 4 bytes were present.
    l4_truncated: the TCP/UDP/ICMP header was cut short (counted malformed; address and protocol
    rules still apply, port rules cannot).
    """

    status: Status
    length: int
    family: int | None = None
    src: Address | None = None
    dst: Address | None = None
    proto: int | None = None
    dport: int | None = None
    fragment: bool = False
    l4_truncated: bool = False
    tcp_flags: int | None = None  # byte 13 of a whole TCP header (issue 16)

    @property
    def malformed(self) -> bool:
        """What finish() counts in XDPFW_STAT_MALFORMED."""
        return self.status == "malformed" or self.l4_truncated


def _u16(frame: bytes, offset: int) -> int:
    value: int = struct.unpack_from("!H", frame, offset)[0]
    return value


def _parse_l4(frame: bytes, pos: int, proto: int) -> tuple[int | None, bool, int | None]:
    """parse_l4(): (dport, l4_truncated, tcp_flags) for the L4 header at ``pos``."""
    need = _L4_NEED.get(proto)
    if need is None:
        return None, False, None  # nothing we read
    if pos + need > len(frame):
        return None, True, None
    if proto == _TCP:
        return _u16(frame, pos + 2), False, frame[pos + 13]
    if proto == _UDP:
        return _u16(frame, pos + 2), False, None  # dest port at offset 2 in both headers
    return None, False, None


def _parse_ipv4(frame: bytes, pos: int) -> Parsed:
    end = len(frame)
    if pos + _IPV4_HLEN > end:
        return Parsed("malformed", end)
    version, ihl = frame[pos] >> 4, frame[pos] & 0x0F
    if version != 4 or ihl < 5:
        return Parsed("malformed", end)
    hlen = ihl * 4  # options are skipped, never interpreted
    if pos + hlen > end:
        return Parsed("malformed", end)
    proto = frame[pos + 9]
    src = ipaddress.IPv4Address(frame[pos + 12 : pos + 16])
    dst = ipaddress.IPv4Address(frame[pos + 16 : pos + 20])
    frag = _u16(frame, pos + 6)
    fragment = bool(frag & (_IP_MF | _IP_OFFSET))
    dport: int | None = None
    truncated = False
    flags: int | None = None
    if not frag & _IP_OFFSET:  # a non-first fragment carries no L4 header
        dport, truncated, flags = _parse_l4(frame, pos + hlen, proto)
    return Parsed("ok", end, 4, src, dst, proto, dport, fragment, truncated, flags)


def _parse_ipv6(frame: bytes, pos: int) -> Parsed:
    end = len(frame)
    if pos + _IPV6_HLEN > end:
        return Parsed("malformed", end)
    if frame[pos] >> 4 != 6:
        return Parsed("malformed", end)
    src = ipaddress.IPv6Address(frame[pos + 8 : pos + 24])
    dst = ipaddress.IPv6Address(frame[pos + 24 : pos + 40])
    nexthdr = frame[pos + 6]
    pos += _IPV6_HLEN
    fragment = False

    def broken() -> Parsed:
        return Parsed("malformed", end, 6, src, dst, None, None, fragment)

    for _ in range(abi.MAX_IPV6_EXT):
        if nexthdr not in IPV6_EXT_KINDS:
            break
        if pos + 4 > end:  # next header, length, and (fragment) offset
            return broken()
        if nexthdr == _FRAGMENT:
            length = _FRAG_HLEN
            fragment = True
            if _u16(frame, pos + 2) & 0xFFF8:
                # Non-first fragment: what follows is payload, not a header.
                if pos + length > end:
                    return broken()
                return Parsed("ok", end, 6, src, dst, frame[pos], None, True, False)
        elif nexthdr == _AH:
            length = (frame[pos + 1] + 2) * 4
        else:
            length = (frame[pos + 1] + 1) * 8
        if pos + length > end:
            return broken()
        nexthdr = frame[pos]
        pos += length
    else:
        # The bound is spent: a chain that goes on cannot be judged.
        if nexthdr in IPV6_EXT_KINDS:
            return broken()
    dport, truncated, flags = _parse_l4(frame, pos, nexthdr)
    return Parsed("ok", end, 6, src, dst, nexthdr, dport, fragment, truncated, flags)


def parse_frame(frame: bytes) -> Parsed:
    """Parse one Ethernet frame exactly like xdpfw_prog() does."""
    end = len(frame)
    if end < ETH_HLEN:
        return Parsed("malformed", end)
    pos = ETH_HLEN
    ethertype = _u16(frame, ETH_HLEN - 2)
    # Look through up to two tags (QinQ). A third tag is not IP to us.
    for _ in range(abi.MAX_VLAN):
        if ethertype not in _VLAN_TPIDS:
            break
        if pos + _VLAN_HLEN > end:
            return Parsed("malformed", end)
        ethertype = _u16(frame, pos + 2)
        pos += _VLAN_HLEN
    if ethertype == _ETH_P_IP:
        return _parse_ipv4(frame, pos)
    if ethertype == _ETH_P_IPV6:
        return _parse_ipv6(frame, pos)
    return Parsed("non_ip", end)


def rule_matches(rule: RuleSpec, p: Parsed) -> bool:
    """Whether every field the rule names matches the parsed packet.

    Only frames that parsed ("ok") are matched at all. An address matches only its own family
    (contained in the network); a rule without an address matches both families. proto
    compares the IP protocol number; dport needs the TCP/UDP header (so never a non-first
    fragment nor a truncated header) and a port in range.
    """
    if p.status != "ok":
        return False
    for net, addr in ((rule.src, p.src), (rule.dst, p.dst)):
        if net is None:
            continue
        if addr is None or addr.version != net.version or addr not in net:
            return False
    if rule.proto is not None and rule.proto.number != p.proto:
        return False
    flags = rule.tcp_flags
    if flags is not None and (p.tcp_flags is None or not flags.matches(p.tcp_flags)):
        return False  # flags need a whole TCP header: never a non-first fragment
    return not (rule.dport is not None and (p.dport is None or p.dport not in rule.dport))


def specificity(rule: Rule) -> tuple[int, int, int, int, int]:
    """The "most specific" order of the contract, ascending (the maximum wins).

    Longest src prefix, then longest dst prefix, then proto named, then the narrower port range
    (a full 0-65535 range is as wide as no port at all), then the lowest id.
    """
    return (
        rule.src.prefixlen if rule.src is not None else 0,
        rule.dst.prefixlen if rule.dst is not None else 0,
        1 if rule.proto is not None else 0,
        65536 - rule.dport.width if rule.dport is not None else 0,
        -rule.id,
    )


@dataclass(frozen=True)
class Outcome:
    """What the data plane does with one frame: the action, the credited rule, the counters.

    The counter fields are the increments finish() makes to xdpfw_stats for this frame; the
    credited rule's xdpfw_rule_stats gets packets += 1 and bytes += ``bytes``.
    """

    action: Literal["pass", "drop"]
    rule_id: int | None
    verdict: int
    bytes: int
    packets: int = 1
    passed: int = 0
    dropped: int = 0
    monitored: int = 0
    malformed: int = 0
    non_ip: int = 0
    fragments: int = 0
    limited: int = 0  # issue 16: dropped by a limit rule
    budget: str | None = None  # a limit rule's answer: "passed", "limited" or "banned"
    parsed: Parsed | None = field(default=None, compare=False)

    def stats(self) -> dict[abi.Stat, int]:
        """The increments indexed like GlobalStats.counter (every Stat but MAX); the counter
        fields above are named by ``abi.Stat.field`` (tests/test_contracts.py checks it)."""
        return {stat: getattr(self, stat.field) for stat in abi.Stat.counters()}


def total_stats(outcomes: Iterable[Outcome]) -> dict[abi.Stat, int]:
    """The global counters after the frames of ``outcomes`` (starting from zero)."""
    total: dict[abi.Stat, int] = dict.fromkeys(abi.Stat.counters(), 0)
    for outcome in outcomes:
        for stat, value in outcome.stats().items():
            total[stat] += value
    return total


def _verdict_class(rule: RuleSpec) -> int:
    if rule.action is Action.ALLOW:
        return abi.VERDICT_ALLOW
    if rule.action is Action.LIMIT:
        return abi.VERDICT_LIMIT_MONITOR if rule.mode is Mode.MONITOR else abi.VERDICT_LIMIT
    return abi.VERDICT_MONITOR if rule.mode is Mode.MONITOR else abi.VERDICT_DROP


# The classes in precedence order; within one, the most specific rule is credited.
_CLASSES = (
    (abi.VERDICT_ALLOW,),
    (abi.VERDICT_DROP,),
    (abi.VERDICT_LIMIT,),
    (abi.VERDICT_MONITOR, abi.VERDICT_LIMIT_MONITOR),
)

BucketKey = tuple[int, int, bytes]  # (rule id, family 4/6 or 0 per rule, address bytes)


@dataclass
class LimitState:
    """The data plane's rate-limit state: GCRA arrival times per bucket, bans (ns).

    `decide` is the C's limit_check() step for step (xdpfw_abi.h, rate limits); `peek`
    answers without changing anything (the harness asks it at two times).
    """

    buckets: dict[BucketKey, list[int]] = field(default_factory=dict)  # [pkt_tat, byte_tat]
    bans: dict[BucketKey, int] = field(default_factory=dict)

    @staticmethod
    def key(rule: RuleSpec, rule_id: int, p: Parsed) -> BucketKey:
        assert rule.limit is not None
        if rule.limit.per.value == "rule" or p.src is None:
            return (rule_id, 0, bytes(16))
        return (rule_id, p.src.version, p.src.packed.ljust(16, b"\0"))

    def peek(self, rule: Rule, p: Parsed, now: int) -> tuple[str, list[int] | None, int | None]:
        """(answer, new bucket or None, new ban end or None) at time ``now``, unapplied."""
        lim = rule.limit
        assert lim is not None
        k = self.key(rule, rule.id, p)
        enforce = rule.mode is Mode.ENFORCE
        if lim.ban_seconds and enforce:
            until = self.bans.get(k)
            if until is not None and until > now:
                return "banned", None, None
        tat = self.buckets.get(k, [0, 0])
        new = list(tat)
        ok = True
        if lim.pps:
            base = max(tat[0], now)
            new[0] = base + lim.pkt_cost_ns
            ok = new[0] - now <= lim.pkt_window_ns
        if ok and lim.bps:
            base = max(tat[1], now)
            new[1] = base + lim.byte_cost_ns(p.length)
            ok = new[1] - now <= lim.byte_window_ns
        if not ok:
            ban = now + lim.ban_ns if lim.ban_seconds and enforce else None
            return "limited", None, ban
        return "passed", new, None

    def decide(self, rule: Rule, p: Parsed, now: int) -> str:
        answer, bucket, ban = self.peek(rule, p, now)
        k = self.key(rule, rule.id, p)
        if answer != "banned" and ban is None and k in self.bans and self.bans[k] <= now:
            del self.bans[k]  # an expired ban: served, the budget decides again
        if bucket is not None:
            self.buckets[k] = bucket
        if ban is not None:
            self.bans[k] = ban
        return answer


def credit(rules: Iterable[Rule], p: Parsed) -> Rule | None:
    """The rule the contract credits for a parsed frame (None: no rule applies)."""
    if p.status != "ok":
        return None
    matching = [r for r in rules if rule_matches(r, p)]
    for klass in _CLASSES:
        candidates = [r for r in matching if _verdict_class(r) in klass]
        if candidates:
            return max(candidates, key=specificity)
    return None


def evaluate(
    rules: Iterable[Rule], frame: bytes, *, limits: LimitState | None = None, now: int = 0
) -> Outcome:
    """The data plane's answer for ``frame`` under ``rules``.

    A frame that did not parse passes, credited to nobody. Otherwise, among the matching
    rules: any allow -> pass, credited to the most specific allow; else any enforce drop ->
    drop, credited to the most specific one; else any enforce limit -> its budget at time
    ``now`` in ``limits`` decides (pass within it, drop over it or while banned), credited to
    the most specific one; else any monitor (drop or limit) -> pass ("monitored"), credited
    to the most specific one, a limit rule's budget still counted; else pass, to nobody.
    ``limits`` is updated; it is required when a limit rule is credited.
    """
    rules = list(rules)
    ids = [r.id for r in rules]
    if len(set(ids)) != len(ids):
        raise ValueError("rule ids must be unique")
    p = parse_frame(frame)
    credited = credit(rules, p)
    verdict = abi.VERDICT_NONE if credited is None else _verdict_class(credited)
    drop = verdict == abi.VERDICT_DROP
    budget = None
    if credited is not None and credited.action is Action.LIMIT:
        if limits is None:
            raise ValueError("a limit rule matched: evaluate needs limits= (a LimitState)")
        budget = limits.decide(credited, p, now)
        drop = verdict == abi.VERDICT_LIMIT and budget != "passed"
    return Outcome(
        action="drop" if drop else "pass",
        rule_id=None if credited is None else credited.id,
        verdict=verdict,
        bytes=len(frame),
        passed=0 if drop else 1,
        dropped=1 if drop else 0,
        monitored=1 if verdict in (abi.VERDICT_MONITOR, abi.VERDICT_LIMIT_MONITOR) else 0,
        malformed=1 if p.malformed else 0,
        non_ip=1 if p.status == "non_ip" else 0,
        fragments=1 if p.fragment else 0,
        limited=1 if drop and verdict == abi.VERDICT_LIMIT else 0,
        budget=budget,
        parsed=p,
    )
