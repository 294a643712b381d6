"""Numbers, sizes, durations and times for people (tables); JSON output stays exact.

Pure functions, no I/O: the CLI's tables and `xdpfw top` use them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = [
    "ago",
    "bytes_",
    "count",
    "duration",
    "parse_duration",
    "parse_time",
    "rate",
    "until",
]

_SI = ["", "k", "M", "G", "T", "P", "E"]


def _scaled(value: float, base: float = 1000.0) -> tuple[float, int]:
    n = 0
    v = float(value)
    while abs(v) >= base and n < len(_SI) - 1:
        v /= base
        n += 1
    # 999.96k rounds to "1000.0k": carry into the next unit instead.
    if n < len(_SI) - 1 and round(abs(v), 1) >= base:
        v /= base
        n += 1
    return v, n


def count(value: float) -> str:
    """1234 -> '1.2k', 1234567 -> '1.2M'; exact below 1000 (integers stay integers)."""
    if abs(value) < 1000:
        return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
    v, n = _scaled(value)
    return f"{v:.1f}{_SI[n]}"


def bytes_(value: float) -> str:
    """Decimal units: 999 -> '999 B', 3_400_000_000 -> '3.4 GB'."""
    if abs(value) < 1000:
        return f"{int(value)} B"
    v, n = _scaled(value)
    return f"{v:.1f} {_SI[n]}B"


def rate(per_second: float | None, unit: str = "pps") -> str:
    """A rate, '-' when unknown: rate(1500) -> '1.5k pps', rate(2e6, 'B/s') -> '2.0 MB/s'."""
    if per_second is None:
        return "-"
    if unit == "B/s":
        return bytes_(per_second) + "/s"
    return f"{count(round(per_second, 1))} {unit}".rstrip()


def duration(seconds: float) -> str:
    """Two most significant units: 42 -> '42s', 3725 -> '1h 2m', 90061 -> '1d 1h'."""
    s = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts[:2])


_DURATION = re.compile(r"(\d+)\s*([smhdw])", re.I)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'30s', '10m', '2h', '1d', '1w', '1h30m' or plain seconds '600' -> seconds (> 0).

    Raises ValueError with a message a person can act on.
    """
    t = text.strip().lower()
    if t.isdigit():
        total = int(t)
    else:
        compact = t.replace(" ", "")
        parts = _DURATION.findall(compact)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != compact:
            raise ValueError(
                f"{text!r} is not a duration; use e.g. 30s, 10m, 2h, 1d, 1h30m or plain seconds"
            )
        total = sum(int(n) * _UNIT[u] for n, u in parts)
    if total <= 0:
        raise ValueError(f"{text!r}: a duration must be at least 1 second")
    return total


def parse_time(iso: str | None) -> datetime | None:
    """The API's ISO 8601 UTC times ('2024-05-01T12:00:00.000Z') -> aware datetime."""
    if not iso:
        return None
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def ago(iso: str | None, now: datetime | None = None) -> str:
    """'3s ago', '2h 5m ago'; '-' for never."""
    when = parse_time(iso)
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    return f"{duration((now - when).total_seconds())} ago"


def until(iso: str | None, now: datetime | None = None) -> str:
    """'in 9m 58s'; '-' for no expiry; 'now' once due."""
    when = parse_time(iso)
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    left = (when - now).total_seconds()
    return "now" if left <= 0 else f"in {duration(left)}"
