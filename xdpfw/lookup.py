"""What the data plane does with a packet, answered from the compiler's state.

`lookup(compiler, packet)` follows bpf/xdp_filter.c step by step, on the entries the compiler
has written (not on the rule list, so a planning fault would show here as it shows in the
kernel): for each of the packet's addresses, the exact-host entry of its family and
direction and the longest prefix of its trie that holds an entry (an LPM lookup; that entry
also carries the slots of every shorter prefix covering it), then the address-less entry.
Each entry's slots are sorted by rank, and a slot matches when its protocol is 0 or the
packet's and its port range (if any) holds the packet's destination port; the matching slot
with the highest rank over all the entries is credited and gives the verdict (allow: pass,
drop: drop, monitor: pass and counted as monitored; none: pass).

The /24 hint and the per-table counts only let the kernel skip lookups that would find
nothing, so they do not change the answer and are not consulted.

Every matching slot of those entries is reported too (best first): that is every rule that
matches the packet, since a rule lives in exactly one entry and a covering prefix's rules are
copied into each longer prefix's entry.

A question without `dst` (or without `proto`) describes a packet whose destination (protocol)
no rule names: only rules that name no destination (protocol) can match it. Likewise a TCP
question without `tcp_flags` (the flags set in the packet, e.g. "SYN" or "SYN,ACK") matches
no TCP-flags rule; with them, a flags rule matches as in the kernel (each flag it names set
or clear as it says).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from xdpfw import abi
from xdpfw.abi import Table
from xdpfw.codes import (
    ADDR_BITS_V4,
    ADDR_BITS_V6,
    DIR_DST,
    DIR_SRC,
    HAS_PORTS,
    PORT_HI,
    PORT_LO,
    PROTO,
    TCP_FLAG_NAMES,
    TCP_MASK,
    TCP_WANT,
    VERDICT,
    code_of_key,
    pack_key,
    rank,
)
from xdpfw.codes import verdict as slot_verdict
from xdpfw.compiler import table_of, trie_of
from xdpfw.errors import InvalidRule
from xdpfw.rules import Proto, rule_from_code

__all__ = [
    "Decision", "Entries", "Packet", "Slot", "Verdict", "lookup", "parse_packet", "tcp_flags_text",
]

Verdict = Literal["drop", "pass", "monitor", "limit"]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_VERDICT_NAME: dict[int, Verdict] = {
    abi.VERDICT_NONE: "pass",
    abi.VERDICT_ALLOW: "pass",
    abi.VERDICT_DROP: "drop",
    abi.VERDICT_MONITOR: "monitor",
    abi.VERDICT_LIMIT: "limit",  # issue 16: the budget decides (the lookup has no clock)
    abi.VERDICT_LIMIT_MONITOR: "monitor",
}
_PROTO_BY_NAME = {p.value: p.number for p in Proto}
_PORT_PROTOS = (Proto.TCP.number, Proto.UDP.number)


class Entries(Protocol):
    """What a lookup reads (xdpfw.compiler.RuleCompiler has it)."""

    def codes(self) -> Mapping[int, int]: ...

    def has_entry(self, k: int) -> bool: ...

    def slots(self, k: int) -> tuple[int, ...]: ...

    def prefix_lengths(self, table: Table) -> list[int]: ...


@dataclass(frozen=True)
class Packet:
    """The packet asked about: addresses of one family, protocol number, destination port."""

    src: Address
    dst: Address | None = None
    proto: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None  # issue 16: the flags set (FIN 0x01 ... CWR 0x80); None: unsaid


def tcp_flags_text(flags: int) -> str:
    """The names of the flags set, "SYN,ACK" (empty: none)."""
    return ",".join(n for n, bit in TCP_FLAG_NAMES.items() if flags & bit)


def _packet_flags(text: str) -> int:
    """A packet's flags: the names of those set, e.g. "SYN" or "syn,ack" (any case, comma
    separated); "none" for a segment with none set."""
    words = [w.strip().upper() for w in text.split(",")]
    if words == ["NONE"]:
        return 0
    flags = 0
    for w in words:
        if w.startswith("!"):
            raise InvalidRule("tcp_flags", f"{w!r}: name the flags the packet has set (no !FLAG)")
        bit = TCP_FLAG_NAMES.get(w)
        if bit is None:
            raise InvalidRule("tcp_flags", f"{w!r} is not a TCP flag (one of "
                              f"{', '.join(TCP_FLAG_NAMES)}, or none)")
        flags |= bit
    return flags


@dataclass(frozen=True)
class Slot:
    """A matching slot: the rule, its code and rank, and the table whose entry held it."""

    rule_id: int
    code: int
    rank: int
    table: str


@dataclass(frozen=True)
class Decision:
    """The data plane's answer: verdict, credited rule (None: nobody), every matching rule
    (best first: the credited one leads) and the entries looked up (map name, network)."""

    verdict: Verdict
    rule_id: int | None
    matches: tuple[Slot, ...]
    looked_up: tuple[tuple[str, str], ...]


def _address(text: str, field: str) -> Address:
    try:
        # An IPv4-mapped IPv6 address stays IPv6: a packet carrying one is an IPv6 packet to
        # the program (looked up in the IPv6 tables), whatever a rule spelt that way became.
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidRule(field, f"{text!r} is not an IPv4 or IPv6 address") from None


def parse_packet(
    src: str,
    dst: str | None = None,
    proto: str | int | None = None,
    dport: int | None = None,
    tcp_flags: str | None = None,
) -> Packet:
    """Validate a question; InvalidRule naming the field otherwise."""
    s = _address(src, "src")
    d = _address(dst, "dst") if dst is not None else None
    if d is not None and d.version != s.version:
        raise InvalidRule(
            "dst", f"src is IPv{s.version} and dst IPv{d.version}: one packet, one family"
        )
    number: int | None = None
    if isinstance(proto, str):
        text = proto.strip().lower()
        if text in _PROTO_BY_NAME:
            number = _PROTO_BY_NAME[text]
        elif text.isascii() and text.isdigit() and int(text) <= 255:
            number = int(text)
        else:
            raise InvalidRule(
                "proto", f"{proto!r}: expected tcp, udp, icmp, icmpv6 or a number 0-255"
            )
    elif proto is not None:
        if isinstance(proto, bool) or not 0 <= proto <= 255:
            raise InvalidRule("proto", f"{proto!r}: expected a protocol number 0-255")
        number = proto
    if dport is not None:
        if isinstance(dport, bool) or not 0 <= dport <= 65535:
            raise InvalidRule("dport", f"port {dport} is out of range 0-65535")
        if number not in _PORT_PROTOS:
            raise InvalidRule("dport", "dport needs proto tcp or udp (only they carry ports)")
    flags = None
    if tcp_flags is not None:
        if number != Proto.TCP.number:
            raise InvalidRule("tcp_flags", "tcp_flags needs proto tcp")
        flags = _packet_flags(tcp_flags)
    return Packet(s, d, number, dport, flags)


def _slot_matches(code: int, proto: int | None, dport: int | None, flags: int | None) -> bool:
    if code & TCP_MASK.mask:  # a TCP-flags rule: only a question naming the flags matches
        mask = (code >> TCP_MASK.shift) & TCP_MASK.bits
        if flags is None or flags & mask != (code >> TCP_WANT.shift) & TCP_WANT.bits:
            return False
    want = (code >> PROTO.shift) & PROTO.bits
    if want and want != proto:
        return False
    if code & HAS_PORTS.mask:
        if dport is None:
            return False
        return ((code >> PORT_LO.shift) & PORT_LO.bits) <= dport <= (code & PORT_HI.bits)
    return True


def _entry_keys(compiler: Entries, addr: Address, direction: int) -> list[int]:
    """The keys of the entries the program finds for this address: its exact host entry
    and the longest prefix of its trie (both when both exist, as the program looks up both)."""
    v6 = addr.version == 6
    bits = ADDR_BITS_V6 if v6 else ADDR_BITS_V4
    value = int(addr)
    out = []
    host = pack_key(value, bits, v6=v6, direction=direction)
    if compiler.has_entry(host):
        out.append(host)
    for plen in compiler.prefix_lengths(trie_of(host)):  # longest first
        k = pack_key(value >> (bits - plen) << (bits - plen) if plen else 0, plen,
                     v6=v6, direction=direction)
        if compiler.has_entry(k):
            out.append(k)
            break
    return out


def lookup(compiler: Entries, packet: Packet) -> Decision:
    """The verdict and credited rule the program gives `packet` (see the module docstring)."""
    keys = _entry_keys(compiler, packet.src, DIR_SRC)
    if packet.dst is not None:
        keys += _entry_keys(compiler, packet.dst, DIR_DST)
    if compiler.has_entry(0):
        keys.append(0)
    codes = compiler.codes()
    found: dict[int, Slot] = {}
    looked: list[tuple[str, str]] = []
    for k in keys:
        table = table_of(k)
        looked.append((table.map_name, _net_text(k)))
        for rid in compiler.slots(k):
            code = codes[rid]
            if rid not in found and _slot_matches(code, packet.proto, packet.dport,
                                                     packet.tcp_flags):
                found[rid] = Slot(rid, code, rank(code, rid), table.map_name)
    matches = tuple(sorted(found.values(), key=lambda s: -s.rank))
    if not matches:
        return Decision("pass", None, (), tuple(looked))
    best = matches[0]
    return Decision(
        _VERDICT_NAME[slot_verdict(best.code)], best.rule_id, matches,
        tuple(looked),
    )


def _net_text(k: int) -> str:
    if not k:
        return "*"
    rule = rule_from_code(1, code_of_key(k) | (abi.VERDICT_DROP << VERDICT.shift))
    net = rule.src if rule.src is not None else rule.dst
    assert net is not None
    return net.with_prefixlen

