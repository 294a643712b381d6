"""`FirewallService.lookup`: what the data plane does with a packet, and which rules say so.

The decision comes from `xdpfw.lookup` (the entries the program would look up, their slots,
the rank: the kernel's own steps over the compiler's state); this module adds what the
database knows about each matching rule (comment, times, the sources holding it) under the
service lock, so the
answer describes one state between two changes. The service's own allow rules (protected
prefixes, the API's port) are not in the database: they are reported with a comment saying
what they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.store import StoredRule, is_protected_id
from xdpfw import lookup as lookup_
from xdpfw.lookup import Decision, Packet
from xdpfw.rules import rule_from_code

if TYPE_CHECKING:
    from api.service import FirewallService

__all__ = ["LookupAnswer", "Match", "lookup"]


@dataclass(frozen=True)
class Match:
    """A matching rule as stored (or, for a reserved id, as the service holds it), and the
    kernel table whose entry held it."""

    stored: StoredRule
    table: str


@dataclass(frozen=True)
class LookupAnswer:
    packet: Packet
    decision: Decision
    matches: list[Match]  # best first: the credited rule leads

    @property
    def credited(self) -> Match | None:
        return self.matches[0] if self.decision.rule_id is not None else None


def _reserved_comment(svc: FirewallService, rule_id: int) -> str:
    if svc.api_rule is not None and rule_id == svc.api_rule.id:
        return "the API's own port (XDPFW_PROTECT_API)"
    if any(r.id == rule_id for r in svc.fleet_protected):
        return "fleet protected prefix (/v1/fleet/protected)"
    return "protected prefix (--protect)"


def lookup(
    svc: FirewallService,
    src: str,
    dst: str | None = None,
    proto: str | int | None = None,
    dport: int | None = None,
    tcp_flags: str | None = None,
) -> LookupAnswer:
    """The answer for a packet from `src` (to `dst`, protocol `proto`, port `dport`, TCP
    flags set `tcp_flags`); InvalidRule (422) naming a bad field."""
    packet = lookup_.parse_packet(src, dst, proto, dport, tcp_flags)
    with svc.lock:
        decision = lookup_.lookup(svc.dp.compiler, packet)
        matches = []
        for slot in decision.matches:  # a few rules (an entry holds at most MAX_SLOTS)
            s = None if is_protected_id(slot.rule_id) else svc.store.get(slot.rule_id)
            if s is None:  # a reserved rule (or one the maps hold and the database lacks)
                comment = (
                    _reserved_comment(svc, slot.rule_id)
                    if is_protected_id(slot.rule_id)
                    else "in the kernel maps, not in the database (reconciled at the next start)"
                )
                # no source holds the service's own rules
                s = StoredRule(rule_from_code(slot.rule_id, slot.code), comment, 0.0, None, "", ())
            matches.append(Match(s, slot.table))
    return LookupAnswer(packet, decision, matches)
