"""Blocklists -> validated networks, for the CLI and the API, so every bad line can be named.

Accepted, in one pass (the formats mix freely; nothing depends on the file name):

- plain lists: one address or CIDR per line;
- FireHOL `.netset` / `.ipset`: `#` header lines, one address or CIDR per line;
- Spamhaus DROP/EDROP text: `;` header lines, entries like `1.10.16.0/20 ; SBL256894`;
- Spamhaus DROP JSON lines (`drop_v4.json`): `{"cidr": "1.10.16.0/20", "sblid": ...}`, the
  trailing `{"type": "metadata", ...}` line is skipped.

`#` and `;` start a comment anywhere on a line; blank lines are skipped. A bare address means
/32 or /128. A CIDR with host bits set is rejected (as the API would), with the line number and
the reason. Repeats of a network within the file are reported and sent once.

This is the one blocklist parser: the CLI (`xdpfw import`) parses files with `parse_blocklist`
and the API parses `text/plain` bulk bodies with `list_codes`, both through `scan`, so a line
is accepted, refused and numbered the same way on either side. Lines are split on "\\n" only
(`lines_of`; a trailing "\\r" is dropped): `str.splitlines` also splits on "\\r", "\\v", "\\f",
"\\x1c"-"\\x1e", "\\x85", "\\u2028" and "\\u2029", which would shift every line number after one.
"""

from __future__ import annotations

import codecs
import ipaddress
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from xdpfw import abi
from xdpfw.codes import DIR_SRC, net_code
from xdpfw.errors import InvalidRule
from xdpfw.rules import Network, RuleSpec, fast_ipv4, parse_network

__all__ = [
    "Entry",
    "ListReader",
    "ParsedList",
    "Rejected",
    "Scan",
    "bad_summary",
    "body",
    "chunks",
    "entry_text",
    "lines_of",
    "list_codes",
    "parse_blocklist",
    "scan",
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


def lines_of(text: str) -> list[str]:
    """The lines of a text as every xdpfw parser numbers them: split on "\\n" only."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclass
class Scan:
    """Every address line of a list, repeats included, in line order: its number and its
    network, either in canonical CIDR text (`cidrs`, for sending) or, when a verdict was given,
    as the code of a source rule with that verdict (`codes`, for the service)."""

    verdict: int | None
    linenos: list[int] = field(default_factory=list)
    cidrs: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    lines: int = 0
    kinds: set[str] = field(default_factory=set)


def scan(lines: Iterable[str], verdict: int | None = None, *, start: int = 1) -> Scan:
    """Parse a list line by line; never raises for bad content (bad lines land in `rejected`).

    Numbering: the first line is `start` (1; later pieces of a text go on from where the last
    one ended); pass `lines_of(text)` for a text.
    """
    out = Scan(verdict)
    add_line, add_cidr, add_code = out.linenos.append, out.cidrs.append, out.codes.append
    lineno = start - 1
    for lineno, raw in enumerate(lines, start):
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
            if verdict is not None:
                add_code(net_code(fast[0], fast[1], v6=False, direction=DIR_SRC, verdict=verdict))
            else:
                addr, _, plen = text.partition("/")
                if not plen:
                    add_cidr(text + "/32")
                elif plen == str(fast[1]):
                    add_cidr(text)
                else:  # a prefix length with a leading zero
                    add_cidr(f"{addr}/{fast[1]}")
        else:
            try:
                net = parse_network(text, "src")
            except InvalidRule as exc:
                out.rejected.append(Rejected(lineno, line.strip(), exc.problem))
                continue
            if verdict is not None:
                add_code(
                    net_code(
                        int(net.network_address),
                        net.prefixlen,
                        v6=net.version == 6,
                        direction=DIR_SRC,
                        verdict=verdict,
                    )
                )
            else:
                add_cidr(net.with_prefixlen)
        add_line(lineno)
    out.lines = lineno
    return out


def parse_blocklist(lines: Iterable[str]) -> ParsedList:
    """Parse a blocklist; never raises for bad content (bad lines land in `rejected`)."""
    found = scan(lines)
    out = ParsedList(rejected=found.rejected, lines=found.lines, kinds=found.kinds)
    first: dict[str, int] = {}
    new = tuple.__new__  # Entry(lineno, cidr) without NamedTuple's Python-level __new__
    for lineno, cidr in zip(found.linenos, found.cidrs, strict=True):
        seen = first.get(cidr)
        if seen is not None:
            out.repeats.append((lineno, seen))
            continue
        first[cidr] = lineno
        out.entries.append(new(Entry, (lineno, cidr)))
    return out


_ANY_SOURCE = "0.0.0.0/0"  # checks an action and mode on their own


def list_codes(text: str, action: str = "drop", mode: str = "enforce") -> list[int]:
    """A bulk body -> the code of a source rule per address line, repeats included, in line
    order (the service reports repeats as duplicates).

    Raises InvalidRule (field "body") naming the bad lines (see `bad_summary`), or when no line
    has an address. An action and mode that cannot go together make every address line bad.
    """
    reader = ListReader(action, mode)
    reader.feed_lines(lines_of(text))
    return reader.finish()


class ListReader:
    """`list_codes` for a body that arrives in pieces: `feed` the bytes as they come (split
    anywhere, inside a line or a UTF-8 character), then `finish`. The same lines, numbers,
    codes and errors as `list_codes` on the whole text, in bounded memory: the codes (none once
    a line is bad), the first `show` bad lines, and the piece being parsed."""

    def __init__(self, action: str = "drop", mode: str = "enforce", show: int = 100) -> None:
        try:
            self._verdict = RuleSpec.parse(action=action, mode=mode, src=_ANY_SOURCE).verdict
            self._problem: str | None = None
        except InvalidRule as exc:
            self._verdict, self._problem = abi.VERDICT_DROP, exc.problem
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._tail: list[str] = []  # the line begun and not ended yet
        self._show = show
        self.lines = 0
        self.codes: list[int] = []
        self.bad: list[tuple[int, str]] = []  # the first `show`
        self.bad_total = 0

    def feed(self, data: bytes, *, final: bool = False) -> None:
        """Parse every line that `data` ends; keep the rest for the next piece."""
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            line = self.lines + 1 + bytes(exc.object[: exc.start]).count(b"\n")
            raise InvalidRule("body", f"not UTF-8 text: line {line}: {exc.reason}") from exc
        if "\n" not in text:
            if text:
                self._tail.append(text)
        else:
            self._tail.append(text)
            lines = "".join(self._tail).split("\n")
            last = lines.pop()
            self._tail = [last] if last else []
            self.feed_lines(lines)
        if final and self._tail:
            self.feed_lines(["".join(self._tail)])
            self._tail = []

    def feed_lines(self, lines: Sequence[str]) -> None:
        """The next lines, without their "\n"."""
        found = scan(lines, self._verdict, start=self.lines + 1)
        self.lines += len(lines)
        bad = [(r.lineno, r.reason) for r in found.rejected]
        if self._problem is not None:
            bad = sorted(bad + [(n, self._problem) for n in found.linenos])
        if bad:
            self.bad_total += len(bad)
            self.bad.extend(bad[: max(0, self._show - len(self.bad))])
            self.codes = []  # nothing will be added: keep no codes
        elif not self.bad_total:
            self.codes.extend(found.codes)

    def finish(self) -> list[int]:
        """The codes; InvalidRule naming the bad lines, or when no line has an address."""
        self.feed(b"", final=True)
        if self.bad_total:
            raise InvalidRule(
                "body", bad_summary("line", self.bad, self._show, total=self.bad_total)
            )
        if not self.codes:
            raise InvalidRule("body", "no addresses in the body")
        return self.codes


MAX_PROBLEM = 200  # characters of one line's problem in a summary (problems quote the line)


def bad_summary(
    what: str, bad: Sequence[tuple[int, str]], show: int = 100, *, total: int | None = None
) -> str:
    """How many lines (or elements) were bad, the numbers of the first `show` of them and
    their problems (each cut to MAX_PROBLEM characters). `total` when `bad` holds only the
    first ones."""
    total = len(bad) if total is None else total
    where = ", ".join(str(n) for n, _ in bad[:show])
    detail = "; ".join(f"{what} {n}: {_cut(problem)}" for n, problem in bad[:show])
    more = f"; ... {total - show} more" if total > show else ""
    if total > show:
        where += ", ..."
    return f"nothing added; {total} invalid {what}(s): {where} -- {detail}{more}"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM else text[:MAX_PROBLEM] + "..."


def chunks(entries: Sequence[Entry], size: int) -> Iterator[Sequence[Entry]]:
    """Consecutive slices of at most `size` entries."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


def body(entries: Iterable[Entry]) -> str:
    """A text/plain body for POST /v1/rules/bulk: one canonical CIDR per line."""
    return "".join(e.cidr + "\n" for e in entries)
