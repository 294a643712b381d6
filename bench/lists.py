"""The blocklists every contender is loaded with: one deterministic master list, sliced.

The master list is a mix of exact IPv4 hosts and prefixes, seven hosts then one prefix,
repeated, so the first N entries of it (``take(n)``) always hold N // 8 prefixes and the rest
hosts, at every size. Entries never overlap (no host lies inside a listed prefix, no prefix
inside another), so every tool (xdpfw, ipset, nftables) holds exactly the same set and no
tool gets to merge or skip anything.

Benchmark traffic may only use 198.18.0.0/15, so the entries it hits live there:

- the hosts come first from 198.18.0.0/16 in address order, then from 128.0.0.0/2 at random
  (map keys only, never on the wire);
- the first 256 prefixes are 198.19.0.0/24, 198.19.1.0/24, ... in order; the others (/20 to
  /28, mostly /24) are laid out without overlap over 11.0.0.0-126.255.255.255 and
  192.0.0.0-223.255.255.255 (minus 198.18.0.0/15) and then shuffled, so a small list's
  prefixes are spread like a large list's and a trie lookup of a 198.x source walks as deep
  as it would in a real list.

Live traffic draws its sources from the entries the first N entries hold (``pools(n)``): a
power-of-two block of the hosts at 198.18.0.0 (65,536 at most) and, one frame in eight like
the list's mix, a power-of-two block of the /24s at 198.19.0.0 (256 at most).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "PFX_POOL_BASE",
    "PFX_POOL_MAX",
    "POOL_BASE",
    "POOL_MAX",
    "Entry",
    "MasterList",
    "addr_text",
    "entry_text",
    "pool_network",
    "pool_of",
]

POOL_BASE = 0xC6120000  # 198.18.0.0: hosts traffic may come from
POOL_MAX = 1 << 16  # 198.18.0.0/16
PFX_POOL_BASE = 0xC6130000  # 198.19.0.0: /24 prefixes traffic may come from
PFX_POOL_MAX = 256  # 198.19.0.0/16 as /24s
_HOST_LO, _HOST_HI = 0x80000000, 0xC0000000  # 128.0.0.0/2: random hosts, keys only
# random prefixes: 11.0.0.0-126.255.255.255 and 192.0.0.0-223.255.255.255 minus 198.18/15
_PFX_RANGES = ((0x0B000000, 0x7F000000), (0xC0000000, 0xC6120000), (0xC6140000, 0xE0000000))
_PFX_LENGTHS = (20, 22, 24, 24, 24, 26, 28)
PREFIX_EVERY = 8  # every 8th entry is a prefix

Entry = tuple[int, int]  # (IPv4 address as an int, prefix length)


def addr_text(addr: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", addr))


def entry_text(entry: Entry) -> str:
    addr, plen = entry
    return addr_text(addr) if plen == 32 else f"{addr_text(addr)}/{plen}"


@dataclass
class MasterList:
    """The first ``size`` entries of the master list (generated once, seeded)."""

    size: int
    seed: int = 20240901
    hosts: list[int] = field(init=False, repr=False)
    prefixes: list[Entry] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        n_pfx = self.size // PREFIX_EVERY
        n_host = self.size - n_pfx
        pooled = min(n_host, POOL_MAX)
        self.hosts = list(range(POOL_BASE, POOL_BASE + pooled))
        if n_host > pooled:
            self.hosts.extend(rng.sample(range(_HOST_LO, _HOST_HI), n_host - pooled))
        pooled_pfx = min(n_pfx, PFX_POOL_MAX)
        self.prefixes = [(PFX_POOL_BASE + (i << 8), 24) for i in range(pooled_pfx)]
        rest: list[Entry] = []
        ranges = iter(_PFX_RANGES)
        lo, hi = next(ranges)
        cursor = lo
        # spread the gaps so the prefixes fill the ranges whatever their number
        span = sum(b - a for a, b in _PFX_RANGES)
        gap = max(1, int(1.8 * span / max(1, n_pfx - pooled_pfx)) - 4096)
        while len(rest) < n_pfx - pooled_pfx:
            plen = rng.choice(_PFX_LENGTHS)
            size = 1 << (32 - plen)
            start = (cursor + size - 1) // size * size
            if start + size > hi:
                lo, hi = next(ranges)  # StopIteration: more prefixes than the ranges hold
                cursor = lo
                continue
            rest.append((start, plen))
            cursor = start + size + rng.randrange(gap)
        rng.shuffle(rest)
        self.prefixes.extend(rest)

    def entry(self, i: int) -> Entry:
        if i % PREFIX_EVERY == PREFIX_EVERY - 1:
            return self.prefixes[i // PREFIX_EVERY]
        return self.hosts[i - i // PREFIX_EVERY], 32

    def take(self, stop: int, start: int = 0) -> list[Entry]:
        """Entries [start, stop) of the master list."""
        if stop > self.size:
            raise ValueError(f"asked for {stop} entries of a {self.size}-entry list")
        return [self.entry(i) for i in range(start, stop)]

    def lines(self, stop: int, start: int = 0) -> Iterator[str]:
        for e in self.take(stop, start):
            yield entry_text(e)

    def hosts_only(self, n: int) -> list[int]:
        """The first n hosts (for tools that hold no prefixes: xdp-filter)."""
        if n > len(self.hosts):
            raise ValueError(f"asked for {n} hosts of {len(self.hosts)}")
        return self.hosts[:n]

    @staticmethod
    def hosts_in(n: int) -> int:
        """How many of the first n entries are hosts."""
        return n - n // PREFIX_EVERY

    @classmethod
    def pool(cls, n: int) -> int:
        """Hosts at 198.18.0.0 upwards, all in the first n entries (a power of two)."""
        return pool_of(min(cls.hosts_in(n), POOL_MAX))

    @staticmethod
    def prefix_pool(n: int) -> int:
        """/24s at 198.19.0.0 upwards, all in the first n entries (a power of two, or 0)."""
        k = min(n // PREFIX_EVERY, PFX_POOL_MAX)
        return 0 if k == 0 else 1 << (k.bit_length() - 1)


def pool_of(n_hosts: int) -> int:
    """The largest power of two <= n_hosts (at least 1), at most POOL_MAX."""
    n = max(1, min(n_hosts, POOL_MAX))
    return 1 << (n.bit_length() - 1)


def pool_network(pool: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((POOL_BASE, 32 - (pool.bit_length() - 1)))
