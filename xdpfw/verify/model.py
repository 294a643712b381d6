"""The executable reference of the data plane: parser, rule semantics, counters.

This module is the oracle of the differential tests. It is written for clarity, not speed,
independently of bpf/xdp_filter.c, but it must agree with it bit for bit:

* `parse_frame` mirrors parse_eth / parse_ipv4 / parse_ipv6 / parse_l4, check for check and in
  the same order (the order decides which counters a broken frame bumps);
* `evaluate` applies the rule contract of xdpfw.rules directly (allow > enforce drop > monitor,
  then most specific) instead of comparing precomputed ranks, and `Outcome` carries the global
  counter increments that finish() would make for the frame.
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
    "Outcome",
    "Parsed",
    "Status",
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

    @property
    def malformed(self) -> bool:
        """What finish() counts in XDPFW_STAT_MALFORMED."""
        return self.status == "malformed" or self.l4_truncated


def _u16(frame: bytes, offset: int) -> int:
    value: int = struct.unpack_from("!H", frame, offset)[0]
    return value


def _parse_l4(frame: bytes, pos: int, proto: int) -> tuple[int | None, bool]:
    """parse_l4(): (dport, l4_truncated) for the L4 header at ``pos``."""
    need = _L4_NEED.get(proto)
    if need is None:
        return None, False  # nothing we read
    if pos + need > len(frame):
        return None, True
    if proto in (_TCP, _UDP):
        return _u16(frame, pos + 2), False  # dest port at offset 2 in both headers
    return None, False


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
    if not frag & _IP_OFFSET:  # a non-first fragment carries no L4 header
        dport, truncated = _parse_l4(frame, pos + hlen, proto)
    return Parsed("ok", end, 4, src, dst, proto, dport, fragment, truncated)


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
    dport, truncated = _parse_l4(frame, pos, nexthdr)
    return Parsed("ok", end, 6, src, dst, nexthdr, dport, fragment, truncated)


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
    return abi.VERDICT_MONITOR if rule.mode is Mode.MONITOR else abi.VERDICT_DROP


def evaluate(rules: Iterable[Rule], frame: bytes) -> Outcome:
    """The data plane's answer for ``frame`` under ``rules``.

    A frame that did not parse passes, credited to nobody. Otherwise, among the matching
    rules: any allow -> pass, credited to the most specific allow; else any enforce drop ->
    drop, credited to the most specific one; else any monitor -> pass ("monitored"), credited
    to the most specific one; else pass, credited to nobody.
    """
    rules = list(rules)
    ids = [r.id for r in rules]
    if len(set(ids)) != len(ids):
        raise ValueError("rule ids must be unique")
    p = parse_frame(frame)
    credited: Rule | None = None
    verdict = abi.VERDICT_NONE
    if p.status == "ok":
        matching = [r for r in rules if rule_matches(r, p)]
        for klass in (abi.VERDICT_ALLOW, abi.VERDICT_DROP, abi.VERDICT_MONITOR):
            candidates = [r for r in matching if _verdict_class(r) == klass]
            if candidates:
                credited = max(candidates, key=specificity)
                verdict = klass
                break
    drop = verdict == abi.VERDICT_DROP
    return Outcome(
        action="drop" if drop else "pass",
        rule_id=None if credited is None else credited.id,
        verdict=verdict,
        bytes=len(frame),
        passed=0 if drop else 1,
        dropped=1 if drop else 0,
        monitored=1 if verdict == abi.VERDICT_MONITOR else 0,
        malformed=1 if p.malformed else 0,
        non_ip=1 if p.status == "non_ip" else 0,
        fragments=1 if p.fragment else 0,
        parsed=p,
    )
