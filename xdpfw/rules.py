"""The rule model: what a rule is, how it is parsed and validated, and how rules are ranked.

A rule names at least one of src, dst, proto, dport. It matches a packet when every field it
names matches. The verdict for a packet (see xdpfw.model for the executable reference):

1. any matching allow rule -> PASS, credited to the most specific matching allow rule;
2. else any matching enforce drop rule -> DROP, credited to the most specific one;
3. else any matching monitor rule -> PASS ("monitored"), credited to the most specific one;
4. else PASS, credited to nobody.

"Most specific" is: longest src prefix, then longest dst prefix, then proto named, then the
narrower port range, then the lowest rule id. `rank()` encodes exactly that order, with the
verdict class on top, in one 64-bit integer that the data plane compares.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from xdpfw import abi
from xdpfw.errors import InvalidRule

__all__ = [
    "MAX_RULE_ID",
    "Action",
    "Mode",
    "Network",
    "PortRange",
    "Proto",
    "Rule",
    "RuleSpec",
    "parse_network",
    "parse_port_range",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_RULE_ID = int(abi.RANK_ID_MASK)


class Action(StrEnum):
    DROP = "drop"
    ALLOW = "allow"


class Mode(StrEnum):
    ENFORCE = "enforce"
    MONITOR = "monitor"


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "icmpv6"

    @property
    def number(self) -> int:
        return _PROTO_NUMBERS[self]

    @property
    def family(self) -> int | None:
        """4 or 6 when the protocol exists in one IP version only."""
        return {Proto.ICMP: 4, Proto.ICMPV6: 6}.get(self)


_PROTO_NUMBERS = {Proto.TCP: 6, Proto.UDP: 17, Proto.ICMP: 1, Proto.ICMPV6: 58}


@dataclass(frozen=True, order=True)
class PortRange:
    lo: int
    hi: int

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def parse_network(value: str | Network, field: str = "src") -> Network:
    """A CIDR or a bare address (meaning /32 or /128). Host bits must be zero."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise InvalidRule(field, f"expected an address or CIDR string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidRule(field, "empty address")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InvalidRule(field, f"{text!r} is not an IPv4/IPv6 address or CIDR") from exc
        raise InvalidRule(
            field, f"{text!r} has host bits set; did you mean {loose.with_prefixlen}?"
        ) from exc


def parse_port_range(value: int | str | PortRange, field: str = "dport") -> PortRange:
    """22, "22" or "1000-2000" (inclusive); ports 0-65535."""
    if isinstance(value, PortRange):
        lo, hi = value.lo, value.hi
    elif isinstance(value, bool):
        raise InvalidRule(field, "expected a port number or a range lo-hi")
    elif isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str):
        text = value.strip()
        parts = text.split("-")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise InvalidRule(
                field, f"{text!r} is not a port or a range lo-hi (e.g. 22, 1000-2000)"
            )
        lo = int(parts[0])
        hi = int(parts[-1])
    else:
        raise InvalidRule(field, "expected a port number or a range lo-hi")
    for port in (lo, hi):
        if not 0 <= port <= 65535:
            raise InvalidRule(field, f"port {port} is out of range 0-65535")
    if lo > hi:
        raise InvalidRule(field, f"range {lo}-{hi} is empty (lo > hi)")
    return PortRange(lo, hi)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A validated rule without an id: what a caller asks for."""

    action: Action = Action.DROP
    mode: Mode = Mode.ENFORCE
    src: Network | None = None
    dst: Network | None = None
    proto: Proto | None = None
    dport: PortRange | None = None
    # Memoised match key (slots keep a million rules small; no per-object __dict__).
    _mk: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def parse(
        cls,
        *,
        action: str | Action = Action.DROP,
        mode: str | Mode = Mode.ENFORCE,
        src: str | Network | None = None,
        dst: str | Network | None = None,
        proto: str | Proto | None = None,
        dport: int | str | PortRange | None = None,
    ) -> RuleSpec:
        """Validate raw values; raise InvalidRule naming the field and the problem."""
        act = _enum(Action, action, "action")
        mod = _enum(Mode, mode, "mode")
        s = parse_network(src, "src") if src is not None else None
        d = parse_network(dst, "dst") if dst is not None else None
        p = _enum(Proto, proto, "proto") if proto is not None else None
        ports = parse_port_range(dport, "dport") if dport is not None else None
        spec = cls(action=act, mode=mod, src=s, dst=d, proto=p, dport=ports)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.src is None and self.dst is None and self.proto is None and self.dport is None:
            raise InvalidRule("rule", "a rule must name at least one of src, dst, proto, dport")
        if self.src is not None and self.dst is not None:
            raise InvalidRule(
                "dst",
                "a rule may name src or dst, not both; add two rules instead",
            )
        if self.dport is not None and self.proto not in (Proto.TCP, Proto.UDP):
            raise InvalidRule("dport", "dport needs proto tcp or udp")
        if self.action is Action.ALLOW and self.mode is Mode.MONITOR:
            raise InvalidRule("mode", "monitor applies to drop rules only (allow never drops)")
        fam = self.family
        if fam is not None and self.proto is not None and self.proto.family not in (None, fam):
            raise InvalidRule(
                "proto",
                f"{self.proto} is an IPv{self.proto.family} protocol but the address is IPv{fam}",
            )

    @property
    def family(self) -> int | None:
        net = self.src if self.src is not None else self.dst
        return None if net is None else net.version

    @property
    def verdict(self) -> int:
        if self.action is Action.ALLOW:
            return abi.VERDICT_ALLOW
        return abi.VERDICT_MONITOR if self.mode is Mode.MONITOR else abi.VERDICT_DROP

    def match_key(self) -> bytes:
        """Identity of a rule's match, action and mode (for duplicate detection).

        Compact bytes rather than a tuple of ipaddress objects: bulk loads hash millions of
        these, and bytes hash in C and take a few dozen bytes each.
        """
        mk = self._mk
        if mk is None:
            ports = self.dport
            mk = (
                bytes((self.verdict, self.proto.number if self.proto is not None else 0))
                + _net_key(self.src)
                + _net_key(self.dst)
                + (b"" if ports is None else struct.pack("!HH", ports.lo, ports.hi))
            )
            object.__setattr__(self, "_mk", mk)
        return mk

    def with_id(self, rule_id: int) -> Rule:
        return Rule(
            id=rule_id,
            action=self.action,
            mode=self.mode,
            src=self.src,
            dst=self.dst,
            proto=self.proto,
            dport=self.dport,
        )

    def describe(self) -> str:
        parts = []
        if self.src is not None:
            parts.append(f"src {self.src.with_prefixlen}")
        if self.dst is not None:
            parts.append(f"dst {self.dst.with_prefixlen}")
        if self.proto is not None:
            parts.append(str(self.proto))
        if self.dport is not None:
            parts.append(f"dport {self.dport}")
        return " ".join(parts)


def _net_key(net: Network | None) -> bytes:
    if net is None:
        return b"\0"
    return bytes((net.version, net.prefixlen)) + net.network_address.packed


@dataclass(frozen=True, slots=True)
class Rule(RuleSpec):
    """A rule with its id (1 .. MAX_RULE_ID; lower ids win ties)."""

    id: int = 0
    _rank: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.id <= MAX_RULE_ID:
            raise InvalidRule("id", f"rule id {self.id} is out of range 1-{MAX_RULE_ID}")

    def spec(self) -> RuleSpec:
        return RuleSpec(self.action, self.mode, self.src, self.dst, self.proto, self.dport)

    def rank(self) -> int:
        """The 64-bit priority the data plane compares (layout in bpf/xdpfw_abi.h)."""
        rank = self._rank
        if not rank:
            narrow = 0 if self.dport is None else 65536 - self.dport.width
            rank = (
                (self.verdict << 62)
                | ((self.src.prefixlen if self.src is not None else 0) << 54)
                | ((self.dst.prefixlen if self.dst is not None else 0) << 46)
                | ((1 if self.proto is not None else 0) << 45)
                | (narrow << 29)
                | (abi.RANK_ID_MASK - self.id)
            )
            object.__setattr__(self, "_rank", rank)
        return rank


E = TypeVar("E", bound=StrEnum)


def _enum(kind: type[E], value: object, field: str) -> E:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.strip().lower())
        except ValueError:
            pass
    allowed = "|".join(m.value for m in kind)
    raise InvalidRule(field, f"{value!r} is not one of {allowed}")
