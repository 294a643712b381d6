"""The rule model: what a rule is, how it is parsed and validated, and how rules are ranked.

A rule names at least one of src, dst, proto, dport. It matches a packet when every field it
names matches. The verdict for a packet (see xdpfw.verify.model for the executable reference):

1. any matching allow rule -> PASS, credited to the most specific matching allow rule;
2. else any matching enforce drop rule -> DROP, credited to the most specific one;
3. else any matching enforce limit rule -> its budget decides: PASS within it, DROP over it
   ("limited"; a ban set by going over drops outright until it ends), credited to the most
   specific limit rule;
4. else any matching monitor rule (drop or limit in monitor mode) -> PASS ("monitored"),
   credited to the most specific one (a limit rule counts "would limit" over its budget);
5. else PASS, credited to nobody.

A rule may also match TCP flags (`TcpFlags`: "syn" is SYN set and ACK clear); flags need a
whole TCP header, so they never match a non-first fragment, and add no specificity.

"Most specific" is: longest src prefix, then longest dst prefix, then proto named, then the
narrower port range, then the lowest rule id. `rank()` encodes exactly that order, with the
verdict class on top, in one 64-bit integer that the data plane compares.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from xdpfw import abi, codes
from xdpfw.errors import InvalidRule

__all__ = [
    "MAX_RULE_ID",
    "MIN_BURST_BYTES",
    "Action",
    "Limit",
    "Mode",
    "Network",
    "Per",
    "PortRange",
    "Proto",
    "Rule",
    "RuleSpec",
    "TcpFlags",
    "code_from_texts",
    "code_texts",
    "fast_ipv4",
    "parse_network",
    "parse_port_range",
    "parse_src_code",
    "rule_from_code",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_RULE_ID = codes.MAX_RULE_ID

# A rule's spec as one int, its "code" (RuleSpec.code()), is what the compiler and the service
# keep per rule instead of objects; its layout is xdpfw.codes'.


class Action(StrEnum):
    DROP = "drop"
    ALLOW = "allow"
    LIMIT = "limit"


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
    """A CIDR or a bare address (meaning /32 or /128). Host bits must be zero.

    An IPv4-mapped IPv6 address or prefix in text (`::ffff:198.18.6.1`, `::ffff:198.18.6.0/120`)
    becomes the IPv4 network it stands for (`198.18.6.1/32`, `198.18.6.0/24`): the program
    sees IPv4 packets as IPv4, so the IPv6 spelling would never match anything. A mapped
    prefix shorter than /96 also covers IPv6 space that is not mapped, and is refused.
    """
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value  # a network object is taken as is (the verifier probes mapped IPv6 ones)
    if not isinstance(value, str):
        raise InvalidRule(field, f"expected an address or CIDR string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidRule(field, "empty address")
    if ":" in text:
        mapped = _parse_mapped(text, field)
        if mapped is not None:
            return mapped
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InvalidRule(field, f"{text!r} is not an IPv4/IPv6 address or CIDR") from exc
        raise InvalidRule(
            field, f"{text!r} has host bits set; did you mean {loose.with_prefixlen}?"
        ) from exc
    if isinstance(net, ipaddress.IPv6Network):
        return _unmapped(net)
    return net


def _parse_mapped(text: str, field: str) -> Network | None:
    """`::ffff:a.b.c.d[/n]` -> the IPv4 network; None when the text is not a mapped address."""
    addr_text, slash, plen_text = text.partition("/")
    try:
        addr = ipaddress.IPv6Address(addr_text)
    except ValueError:
        return None
    v4 = addr.ipv4_mapped
    if v4 is None:
        return None
    plen = 128
    if slash:
        if not (plen_text.isascii() and plen_text.isdigit()) or int(plen_text) > 128:
            return None  # the general parser says what is wrong
        plen = int(plen_text)
    if plen < 96:
        raise InvalidRule(
            field,
            f"{text!r} is an IPv4-mapped IPv6 prefix shorter than /96: it also covers IPv6 "
            "addresses that are not IPv4-mapped, and IPv4 packets never carry IPv6 addresses; "
            "write the IPv4 network (e.g. 198.18.6.0/24) and any IPv6 one as separate rules",
        )
    try:
        return ipaddress.IPv4Network((v4, plen - 96), strict=True)
    except ValueError as exc:
        loose = ipaddress.IPv4Network((v4, plen - 96), strict=False)
        raise InvalidRule(
            field,
            f"{text!r} (IPv4 {v4}/{plen - 96}) has host bits set; "
            f"did you mean {loose.with_prefixlen}?",
        ) from exc


def _unmapped(net: ipaddress.IPv6Network) -> Network:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it stands for."""
    v4 = net.network_address.ipv4_mapped if net.prefixlen >= 96 else None
    return net if v4 is None else ipaddress.IPv4Network((v4, net.prefixlen - 96))


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
    # -- rate limits and TCP flags (issue 16) --
    tcp_flags: TcpFlags | None = None
    limit: Limit | None = None  # exactly for Action.LIMIT; not part of the code
    # Memoised code (see `code()`; slots keep rules small: no per-object __dict__).
    _code: int = field(default=-1, init=False, repr=False, compare=False)

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
        tcp_flags: str | TcpFlags | None = None,
        limit: Limit | None = None,
    ) -> RuleSpec:
        """Validate raw values; raise InvalidRule naming the field and the problem."""
        act = _enum(Action, action, "action")
        mod = _enum(Mode, mode, "mode")
        s = parse_network(src, "src") if src is not None else None
        d = parse_network(dst, "dst") if dst is not None else None
        p = _enum(Proto, proto, "proto") if proto is not None else None
        ports = parse_port_range(dport, "dport") if dport is not None else None
        flags = TcpFlags.parse(tcp_flags) if isinstance(tcp_flags, str) else tcp_flags
        spec = cls(
            action=act, mode=mod, src=s, dst=d, proto=p, dport=ports, tcp_flags=flags, limit=limit
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.src is None and self.dst is None and self.proto is None and self.dport is None:
            raise InvalidRule("rule", "a rule must name at least one of src, dst, proto, dport")
        if self.src is not None and self.dst is not None:
            raise InvalidRule(
                "dst",
                "a rule may name src or dst, not both (two rules would match either address, "
                "not the pair; matching a pair is not supported)",
            )
        if self.dport is not None and self.proto not in (Proto.TCP, Proto.UDP):
            raise InvalidRule("dport", "dport needs proto tcp or udp")
        if self.action is Action.ALLOW and self.mode is Mode.MONITOR:
            raise InvalidRule(
                "mode", "monitor applies to drop rules and limit rules only (allow never drops)"
            )
        if self.tcp_flags is not None and self.proto is not Proto.TCP:
            raise InvalidRule("tcp_flags", "tcp_flags needs proto tcp")
        if self.action is Action.LIMIT and self.limit is None:
            raise InvalidRule(
                "limit", 'a limit rule needs "limit": {"pps": N} and/or {"bps": N}'
            )
        if self.action is not Action.LIMIT and self.limit is not None:
            raise InvalidRule("limit", 'limit parameters need "action": "limit"')
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
        if self.action is Action.LIMIT:
            return abi.VERDICT_LIMIT_MONITOR if self.mode is Mode.MONITOR else abi.VERDICT_LIMIT
        return abi.VERDICT_MONITOR if self.mode is Mode.MONITOR else abi.VERDICT_DROP

    def match_key(self) -> int:
        """Identity of a rule's match, action and mode (for duplicate detection): its code."""
        return self.code()

    def code(self) -> int:
        """The whole spec as one int (layout in xdpfw.codes): compact, hashed in C."""
        code = self._code
        if code < 0:
            net, direction = (
                (self.src, codes.DIR_SRC) if self.src is not None else (self.dst, codes.DIR_DST)
            )
            key = 0
            if net is not None:
                key = codes.pack_key(
                    int(net.network_address),
                    net.prefixlen,
                    v6=net.version == 6,
                    direction=direction,
                )
            ports = self.dport
            code = codes.pack(
                key,
                self.verdict,
                self.proto.number if self.proto is not None else 0,
                None if ports is None else (ports.lo, ports.hi),
                None if self.tcp_flags is None else (self.tcp_flags.mask, self.tcp_flags.want),
            )
            object.__setattr__(self, "_code", code)
        return code

    def with_id(self, rule_id: int) -> Rule:
        return Rule(
            id=rule_id,
            action=self.action,
            mode=self.mode,
            src=self.src,
            dst=self.dst,
            proto=self.proto,
            dport=self.dport,
            tcp_flags=self.tcp_flags,
            limit=self.limit,
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
        if self.tcp_flags is not None:
            parts.append(f"flags {self.tcp_flags}")
        if self.limit is not None:
            parts.append(f"limit {self.limit}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Rule(RuleSpec):
    """A rule with its id (1 .. MAX_RULE_ID; lower ids win ties)."""

    id: int = 0
    _rank: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.id <= MAX_RULE_ID:
            raise InvalidRule("id", f"rule id {self.id} is out of range 1-{MAX_RULE_ID}")

    def spec(self) -> RuleSpec:
        return RuleSpec(
            self.action, self.mode, self.src, self.dst, self.proto, self.dport,
            self.tcp_flags, self.limit,
        )

    def rank(self) -> int:
        """The 64-bit priority the data plane compares (layout in bpf/xdpfw_abi.h)."""
        rank = self._rank
        if not rank:
            rank = codes.rank(self.code(), self.id)
            object.__setattr__(self, "_rank", rank)
        return rank


E = TypeVar("E", bound=StrEnum)


# -- rate limits and TCP flags (issue 16) ------------------------------------------------------

# Smallest burst_bytes: one whole untagged Ethernet frame at MTU 1500 (so it can ever pass).
MIN_BURST_BYTES = 1514
_MAX_PPS = 10**9  # the packet cost is 10^9 // pps ns: at least 1
_MAX_BPS = 10**12
_MAX_BURST = 10**9
_MAX_BAN = 86400 * 365
_NS = 10**9


class Per(StrEnum):
    SOURCE = "source"
    RULE = "rule"


@dataclass(frozen=True, slots=True)
class TcpFlags:
    """A TCP flag match: (flags & mask) == want (flag bits as in the TCP header)."""

    mask: int
    want: int

    @classmethod
    def parse(cls, text: str) -> TcpFlags:
        """ "syn" (lower case: SYN set, ACK clear, a connection attempt) or a list like
        "SYN,!ACK", "RST", "FIN,ACK" (names in any case): each flag named must be set, each
        "!flag" clear, the others are ignored; so "SYN" alone is SYN set, ACK either way."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRule("tcp_flags", 'expected "syn" or flags like "SYN,!ACK"')
        if text.strip() == "syn":
            return cls(codes.TCP_SYN | codes.TCP_ACK, codes.TCP_SYN)
        mask = want = 0
        for part in text.split(","):
            word = part.strip().upper()
            neg = word.startswith("!")
            name = word[1:].strip() if neg else word
            bit = codes.TCP_FLAG_NAMES.get(name)
            if bit is None:
                names = ", ".join(codes.TCP_FLAG_NAMES)
                raise InvalidRule(
                    "tcp_flags", f"{part.strip()!r} is not a TCP flag (one of {names}, or !FLAG)"
                )
            if mask & bit:
                raise InvalidRule("tcp_flags", f"{name} is named twice")
            mask |= bit
            want |= 0 if neg else bit
        return cls(mask, want)

    def matches(self, flags: int) -> bool:
        return flags & self.mask == self.want

    def __str__(self) -> str:
        if (self.mask, self.want) == (codes.TCP_SYN | codes.TCP_ACK, codes.TCP_SYN):
            return "SYN,!ACK"
        out = []
        for name, bit in codes.TCP_FLAG_NAMES.items():
            if self.mask & bit:
                out.append(name if self.want & bit else "!" + name)
        return ",".join(out)


@dataclass(frozen=True, slots=True)
class Limit:
    """A limit rule's budget: packets and/or bytes per second, each with its burst, per
    source address or for the whole rule, and an optional ban after going over.

    The data plane's arithmetic is exact integers (bpf/xdpfw_abi.h, rate limits): a packet
    costs `pkt_cost_ns` = 10^9 // pps, the burst window is burst * pkt_cost_ns.
    """

    pps: int | None = None
    burst: int | None = None
    bps: int | None = None
    burst_bytes: int | None = None
    per: Per = Per.SOURCE
    ban_seconds: int = 0

    @classmethod
    def parse(
        cls,
        *,
        pps: int | None = None,
        burst: int | None = None,
        bps: int | None = None,
        burst_bytes: int | None = None,
        per: str | Per = Per.SOURCE,
        ban_seconds: int | None = None,
    ) -> Limit:
        """Validate; a missing burst is one second's worth of the rate."""
        for name, v in (("pps", pps), ("burst", burst), ("bps", bps),
                        ("burst_bytes", burst_bytes), ("ban_seconds", ban_seconds)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise InvalidRule(f"limit.{name}", "expected a whole number")
        if pps is None and bps is None:
            raise InvalidRule("limit", 'a limit needs a rate: "pps" and/or "bps"')
        if pps is not None and not 1 <= pps <= _MAX_PPS:
            raise InvalidRule("limit.pps", f"pps must be 1-{_MAX_PPS} (0 would drop everything:"
                              " use a drop rule)")
        if bps is not None and not 1 <= bps <= _MAX_BPS:
            raise InvalidRule("limit.bps", f"bps (bytes per second) must be 1-{_MAX_BPS}")
        if burst is not None and pps is None:
            raise InvalidRule("limit.burst", "burst goes with pps (burst_bytes with bps)")
        if burst_bytes is not None and bps is None:
            raise InvalidRule("limit.burst_bytes", "burst_bytes goes with bps")
        if pps is not None:
            burst = pps if burst is None else burst
            if not 1 <= burst <= _MAX_BURST:
                raise InvalidRule("limit.burst", f"burst must be 1-{_MAX_BURST} packets "
                                  "(below one packet nothing would pass)")
        if bps is not None:
            burst_bytes = max(bps, MIN_BURST_BYTES) if burst_bytes is None else burst_bytes
            if not MIN_BURST_BYTES <= burst_bytes <= _MAX_BPS:
                raise InvalidRule(
                    "limit.burst_bytes",
                    f"burst_bytes must be {MIN_BURST_BYTES}-{_MAX_BPS} (below one full frame "
                    "a full-size packet would never pass)",
                )
        p = _enum(Per, per, "limit.per")
        ban = 0 if ban_seconds is None else ban_seconds
        if not 0 <= ban <= _MAX_BAN:
            raise InvalidRule("limit.ban_seconds", f"ban_seconds must be 0-{_MAX_BAN}")
        if ban and p is Per.RULE:
            raise InvalidRule(
                "limit.ban_seconds",
                'a ban is per source: it needs "per": "source" (a per-rule ban would drop '
                "every source)",
            )
        return cls(pps, burst, bps, burst_bytes, p, ban)

    # -- the data plane's parameters (struct xdpfw_limit) --
    @property
    def pkt_cost_ns(self) -> int:
        return _NS // self.pps if self.pps else 0

    @property
    def pkt_window_ns(self) -> int:
        return (self.burst or 0) * self.pkt_cost_ns

    @property
    def byte_window_ns(self) -> int:
        return (self.burst_bytes or 0) * _NS // self.bps if self.bps else 0

    def byte_cost_ns(self, length: int) -> int:
        return length * _NS // self.bps if self.bps else 0

    @property
    def ban_ns(self) -> int:
        return self.ban_seconds * _NS

    def to_dict(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        if self.pps is not None:
            out["pps"] = self.pps
            out["burst"] = self.burst or 0
        if self.bps is not None:
            out["bps"] = self.bps
            out["burst_bytes"] = self.burst_bytes or 0
        out["per"] = self.per.value
        out["ban_seconds"] = self.ban_seconds
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Limit:
        def num(name: str) -> int | None:
            v = data.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidRule(f"limit.{name}", "expected a whole number")
            return v

        per = data.get("per", Per.SOURCE)
        return cls.parse(
            pps=num("pps"), burst=num("burst"), bps=num("bps"),
            burst_bytes=num("burst_bytes"), per=per if isinstance(per, str) else "?",
            ban_seconds=num("ban_seconds"),
        )

    def __str__(self) -> str:
        parts = []
        if self.pps is not None:
            parts.append(f"{self.pps}/s burst {self.burst}")
        if self.bps is not None:
            parts.append(f"{self.bps}B/s burst {self.burst_bytes}B")
        parts.append(f"per {self.per}")
        if self.ban_seconds:
            parts.append(f"ban {self.ban_seconds}s")
        return " ".join(parts)


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


# -- codes: rules as ints ----------------------------------------------------------------------

_VERDICT_ACTION_MODE = {
    abi.VERDICT_ALLOW: (Action.ALLOW, Mode.ENFORCE),
    abi.VERDICT_DROP: (Action.DROP, Mode.ENFORCE),
    abi.VERDICT_MONITOR: (Action.DROP, Mode.MONITOR),
    abi.VERDICT_LIMIT: (Action.LIMIT, Mode.ENFORCE),
    abi.VERDICT_LIMIT_MONITOR: (Action.LIMIT, Mode.MONITOR),
}
_VERDICT_OF_TEXT = {
    ("drop", "enforce"): abi.VERDICT_DROP,
    ("drop", "monitor"): abi.VERDICT_MONITOR,
    ("allow", "enforce"): abi.VERDICT_ALLOW,
}
_VERDICT_TEXTS = {v: (a.value, m.value) for v, (a, m) in _VERDICT_ACTION_MODE.items()}
_PROTO_BY_NUMBER = {p.number: p for p in Proto}
_inet_ntoa = socket.inet_ntoa
_net_code = codes.net_code
_unpack = codes.unpack
# Bulk loads (a million rules) make rules and texts from codes: they read these fields inline.
_KEY_SHIFT, _ADDR_SHIFT, _V6_MASK = codes.KEY.shift, codes.ADDR.shift, codes.V6.mask
_PLEN_SHIFT, _PLEN_BITS = codes.PLEN.shift, codes.PLEN.bits
_DIR_BITS, _DIR_SRC, _DIR_DST = codes.DIR.bits, codes.DIR_SRC, codes.DIR_DST
_VERDICT_SHIFT, _VERDICT_BITS = codes.VERDICT.shift, codes.VERDICT.bits | codes.LIMIT.mask >> (
    codes.VERDICT.shift
)
_TABLE_BITS, _SRC4 = codes.TABLE_BITS, codes.pack_key(0, 0, v6=False, direction=codes.DIR_SRC)
_PROTO_PORTS = codes.PROTO_PORTS
_TCP_BITS = codes.TCP_MASK.mask
_V4_BYTES = codes.ADDR_BITS_V4 // 8


def _code_network(key: int) -> Network:
    addr, plen = key >> _ADDR_SHIFT, (key >> _PLEN_SHIFT) & _PLEN_BITS
    if key & _V6_MASK:
        return ipaddress.IPv6Network((addr, plen))
    return ipaddress.IPv4Network((addr, plen))


def rule_from_code(rule_id: int, code: int) -> Rule:
    """The Rule a code stands for (the code must come from `RuleSpec.code()`).

    Bulk loads make one per rule, so this fills the slots directly instead of going through
    the dataclass __init__ (the same object, about half the time).
    """
    if not 1 <= rule_id <= MAX_RULE_ID:
        raise InvalidRule("id", f"rule id {rule_id} is out of range 1-{MAX_RULE_ID}")
    key, verdict, proto, ports = _unpack(code)
    direction = key & _DIR_BITS
    net = _code_network(key) if direction else None
    action, mode = _VERDICT_ACTION_MODE[verdict]
    rule = _new(Rule)
    _set(rule, "action", action)
    _set(rule, "mode", mode)
    _set(rule, "src", net if direction == _DIR_SRC else None)
    _set(rule, "dst", net if direction == _DIR_DST else None)
    _set(rule, "proto", _PROTO_BY_NUMBER.get(proto))
    _set(rule, "dport", None if ports is None else PortRange(*ports))
    flags = codes.tcp_flags(code) if code & _TCP_BITS else None
    _set(rule, "tcp_flags", None if flags is None else TcpFlags(*flags))
    _set(rule, "limit", None)  # limit parameters live beside the code (Datapath, store)
    _set(rule, "_code", code)
    _set(rule, "id", rule_id)
    _set(rule, "_rank", 0)
    return rule


_new = object.__new__
_set = object.__setattr__


def _network_text(key: int) -> str:
    if key & _V6_MASK:
        return _code_network(key).with_prefixlen
    return _ipv4_text(key)


def _ipv4_text(key: int) -> str:
    addr = (key >> _ADDR_SHIFT).to_bytes(_V4_BYTES, "big")
    return f"{_inet_ntoa(addr)}/{(key >> _PLEN_SHIFT) & _PLEN_BITS}"


def code_texts(
    code: int,
) -> tuple[str, str, str | None, str | None, str | None, str | None]:
    """(action, mode, src, dst, proto, dport) as the database and the API spell them.

    A code's TCP flags are not among them: `code_tcp_flags` spells them.
    """
    key = code >> _KEY_SHIFT
    action, mode = _VERDICT_TEXTS[(code >> _VERDICT_SHIFT) & _VERDICT_BITS]
    if key & _TABLE_BITS == _SRC4 and not code & _PROTO_PORTS:  # an IPv4 blocklist entry
        addr = _inet_ntoa((key >> _ADDR_SHIFT).to_bytes(_V4_BYTES, "big"))
        src = f"{addr}/{(key >> _PLEN_SHIFT) & _PLEN_BITS}"
        return action, mode, src, None, None, None
    _, _, number, ports = _unpack(code)
    direction = key & _DIR_BITS
    net = _network_text(key) if direction else None
    proto = _PROTO_BY_NUMBER.get(number)
    dport = None
    if ports is not None:
        lo, hi = ports
        dport = str(lo) if lo == hi else f"{lo}-{hi}"
    return (
        action,
        mode,
        net if direction == _DIR_SRC else None,
        net if direction == _DIR_DST else None,
        proto.value if proto is not None else None,
        dport,
    )


def fast_ipv4(text: str) -> tuple[int, int] | None:
    """(address, prefix length) of a plain, valid IPv4 address or CIDR; None: ask ipaddress.

    None for anything unusual (IPv6, a netmask, host bits set, a malformed text): the slow
    path then gives the same answer or the same error as before.
    """
    addr_text, slash, plen_text = text.partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET, addr_text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    plen = 32
    if slash:
        if not (0 < len(plen_text) <= 2 and plen_text.isascii() and plen_text.isdigit()):
            return None
        plen = int(plen_text)
        if plen > 32:
            return None
    addr = int.from_bytes(packed, "big")
    if addr & ((1 << (32 - plen)) - 1):
        return None
    return addr, plen


def parse_src_code(text: str, verdict: int) -> int:
    """The code of a source-network rule, from text; raises InvalidRule like parse_network."""
    fast = fast_ipv4(text.strip())
    if fast is not None:
        return _net_code(fast[0], fast[1], v6=False, direction=codes.DIR_SRC, verdict=verdict)
    net = parse_network(text, "src")
    return _net_code(
        int(net.network_address),
        net.prefixlen,
        v6=net.version == 6,
        direction=codes.DIR_SRC,
        verdict=verdict,
    )


def code_from_texts(
    action: str,
    mode: str,
    src: str | None,
    dst: str | None,
    proto: str | None,
    dport: str | None,
    tcp_flags: str | None = None,
    limit: Limit | None = None,
) -> int:
    """The code of a rule spelled as in the database; raises InvalidRule for a bad one."""
    if tcp_flags is not None or limit is not None or action == Action.LIMIT:
        return RuleSpec.parse(
            action=action, mode=mode, src=src, dst=dst, proto=proto, dport=dport,
            tcp_flags=tcp_flags, limit=limit,
        ).code()
    if dst is None and proto is None and dport is None and src is not None:
        verdict = _VERDICT_OF_TEXT.get((action, mode))
        fast = fast_ipv4(src) if verdict is not None else None
        if fast is not None:
            assert verdict is not None
            return _net_code(fast[0], fast[1], v6=False, direction=codes.DIR_SRC, verdict=verdict)
    return RuleSpec.parse(
        action=action, mode=mode, src=src, dst=dst, proto=proto, dport=dport
    ).code()
