"""Blocklist files -> validated networks, client-side, so every bad line can be named.

Accepted, in one pass (the formats mix freely; nothing depends on the file name):

- plain lists: one address or CIDR per line;
- FireHOL `.netset` / `.ipset`: `#` header lines, one address or CIDR per line;
- Spamhaus DROP/EDROP text: `;` header lines, entries like `1.10.16.0/20 ; SBL256894`;
- Spamhaus DROP JSON lines (`drop_v4.json`): `{"cidr": "1.10.16.0/20", "sblid": ...}`, the
  trailing `{"type": "metadata", ...}` line is skipped.

`#` and `;` start a comment anywhere on a line; blank lines are skipped. A bare address means
/32 or /128. A CIDR with host bits set is rejected (as the API would), with the line number and
the reason. Repeats of a network within the file are reported and sent once.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from xdpfw.errors import InvalidRule
from xdpfw.rules import Network, fast_ipv4, parse_network

__all__ = [
    "Entry",
    "ParsedList",
    "Rejected",
    "body",
    "chunks",
    "entry_text",
    "parse_blocklist",
]


class Entry(NamedTuple):
    """A valid line: its number and its network in canonical CIDR text (what is sent)."""

    lineno: int
    cidr: str

    @property
    def network(self) -> Network:
        return ipaddress.ip_network(self.cidr)


@dataclass(frozen=True)
class Rejected:
    lineno: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.reason}"


@dataclass
class ParsedList:
    """The outcome of parsing one file. `entries` are unique, in file order."""

    entries: list[Entry] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    repeats: list[tuple[int, int]] = field(default_factory=list)  # (line, first line)
    lines: int = 0
    kinds: set[str] = field(default_factory=set)

    @property
    def format(self) -> str:
        """What the file looked like, for the summary ('plain' when nothing else showed)."""
        names = [k for k in ("FireHOL", "Spamhaus DROP", "Spamhaus DROP JSON") if k in self.kinds]
        return " + ".join(names) or "plain"


def entry_text(line: str) -> tuple[str | None, str | None]:
    """One line -> (address text or None when the line has none, a rejection reason or None).

    JSON lines yield their `cidr`; otherwise everything after `#` or `;` is a comment.
    """
    stripped = line.strip().lstrip("\ufeff")
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError as exc:
            return None, f"not valid JSON: {exc}"
        if not isinstance(obj, dict):
            return None, "a JSON line must be an object with a 'cidr' field"
        if "cidr" not in obj:
            # Spamhaus ends its JSON files with {"type": "metadata", ...}.
            return None, None if obj.get("type") == "metadata" else "no 'cidr' field"
        cidr = obj["cidr"]
        if not isinstance(cidr, str):
            return None, "'cidr' must be a string"
        return cidr.strip(), None
    text = stripped
    for mark in ("#", ";"):
        text = text.split(mark, 1)[0]
    text = text.strip()
    if not text:
        return None, None
    words = text.split()
    if len(words) > 1:
        return None, (
            f"expected one address or CIDR per line, got {len(words)} words "
            f"({text[:60]!r}); put notes after '#' or ';'"
        )
    if _is_range(text):
        return None, f"{text!r}: address ranges are not supported; list CIDRs instead"
    return text, None


def _is_range(text: str) -> bool:
    lo, sep, hi = text.partition("-")
    if not sep:
        return False
    try:
        ipaddress.ip_address(lo.strip())
        ipaddress.ip_address(hi.strip())
    except ValueError:
        return False
    return True


def _note_kind(line: str, kinds: set[str]) -> None:
    s = line.lstrip("\ufeff").lstrip()
    if s.startswith("#") and "firehol" in s.lower():
        kinds.add("FireHOL")
    elif (s.startswith(";") and "spamhaus" in s.lower()) or (";" in s and "SBL" in s):
        kinds.add("Spamhaus DROP")
    elif s.startswith("{") and "sblid" in s:
        kinds.add("Spamhaus DROP JSON")


def parse_blocklist(lines: Iterable[str]) -> ParsedList:
    """Parse a blocklist; never raises for bad content (bad lines land in `rejected`)."""
    out = ParsedList()
    first: dict[str, int] = {}
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        # Most lines are a bare IPv4 address or CIDR: no comment, no format hint, and no
        # ipaddress object needed to check and spell them.
        text = line.strip()
        fast = fast_ipv4(text)
        if fast is None:
            if lineno <= 200:
                _note_kind(line, out.kinds)
            found, reason = entry_text(line)
            if reason is not None:
                out.rejected.append(Rejected(lineno, line.strip(), reason))
                continue
            if found is None:
                continue
            text = found
            fast = fast_ipv4(text)
        if fast is not None:
            addr, _, plen = text.partition("/")
            if not plen:
                cidr = text + "/32"
            elif plen == str(fast[1]):
                cidr = text
            else:  # a prefix length with a leading zero
                cidr = f"{addr}/{fast[1]}"
        else:
            try:
                cidr = parse_network(text, "src").with_prefixlen
            except InvalidRule as exc:
                out.rejected.append(Rejected(lineno, line.strip(), exc.problem))
                continue
        seen = first.get(cidr)
        if seen is not None:
            out.repeats.append((lineno, seen))
            continue
        first[cidr] = lineno
        out.entries.append(Entry(lineno, cidr))
    out.lines = lineno
    return out


def chunks(entries: Sequence[Entry], size: int) -> Iterator[Sequence[Entry]]:
    """Consecutive slices of at most `size` entries."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


def body(entries: Iterable[Entry]) -> str:
    """A text/plain body for POST /v1/rules/bulk: one canonical CIDR per line."""
    return "".join(e.cidr + "\n" for e in entries)
