"""Issue 18's prototype tables give the LPM trie's answers, so the designs the bench measures
(bench/lpm_designs.py) are correct designs, not just fast ones.

IPv4: random prefixes /8-/32 crowded into one /12 (so they nest, share /24s and force tbl8
groups), loaded into the DIR-24-8 program and into a kernel LPM trie (the oracle). Random
sources, most inside listed prefixes, go through the program (BPF_PROG_TEST_RUN, which
records the entry it found) and through a trie lookup; the answers must be identical, and the
builder's Python mirror must agree too. IPv6: the same for a hash per present prefix length
against an LPM trie, with /48s nested in /32s and /64s in /48s.
"""

from __future__ import annotations

import ctypes
import ipaddress
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from bench.lpm_designs import (
    Design,
    build_d248,
    d248_lookup,
    lenhash_tables,
    v6_defs,
    v6_longest,
    v6_prefixes,
)
from xdpfw.kernel import bpfsys
from xdpfw.verify.frames import build_frame

pytestmark = pytest.mark.bpf

BASE = 0x0A000000  # 10.0.0.0/12 holds every test prefix
SPAN = 1 << 20


def _trie(key_size: int, n: int) -> bpfsys.Map[Any, Any]:
    fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_LPM_TRIE, key_size, 4, n,
                           flags=bpfsys.BPF_F_NO_PREALLOC, name="xfw_t_oracle")
    return bpfsys.Map(fd, "xfw_t_oracle", ctypes.c_uint8 * key_size, ctypes.c_uint8 * 4)


def _oracle(trie: bpfsys.Map[Any, Any], key: bytes) -> int:
    raw = trie.lookup_raw(key)
    return 0 if raw is None else int(struct.unpack("<I", raw)[0])


@pytest.fixture(scope="module")
def d248_prog() -> Iterator[Design]:
    d = Design("d248", "D248", record=1, N_HOSTS=16, N_PREFIXES=4096,
               N_TBL8_ROWS=4096 * 16)
    yield d
    d.close()


def test_dir24_8_matches_the_lpm_trie(d248_prog: Design) -> None:
    rng = random.Random(1808)
    seen: set[tuple[int, int]] = set()
    prefixes: list[tuple[int, int]] = []
    while len(prefixes) < 3000:
        plen = rng.choice((8, 12, 16, 20, 22, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32, 32))
        addr = BASE + rng.randrange(SPAN) if plen > 12 else BASE
        net = addr & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF
        if (net, plen) not in seen:
            seen.add((net, plen))
            prefixes.append((net, plen))
    t = build_d248(prefixes)
    assert t.groups > 100  # the /25-/32 level is exercised, not just tbl24
    d248_prog.fill_d248(t, len(prefixes), 1)
    with _trie(8, len(prefixes)) as trie:
        trie.update_batch(
            [struct.pack("=I", plen) + struct.pack("!I", a) for a, plen in prefixes],
            [struct.pack("<I", i + 1) for i in range(len(prefixes))],
        )
        sources = [BASE + rng.randrange(SPAN) for _ in range(1500)]
        sources += [a + rng.randrange(1 << (32 - plen)) for a, plen in rng.sample(prefixes, 800)]
        sources += [rng.getrandbits(32) for _ in range(200)]  # mostly outside every prefix
        hits = 0
        for src in sources:
            want = _oracle(trie, struct.pack("=I", 32) + struct.pack("!I", src))
            assert d248_lookup(t, src) == want, hex(src)
            frame = build_frame(src=str(ipaddress.IPv4Address(src)), dst="198.19.255.254",
                                proto="udp", sport=1, dport=9)
            ret, got = d248_prog.run(frame)
            assert got == want, (hex(src), got, want)
            assert ret == (1 if want else 2)  # XDP_DROP on a match, XDP_PASS otherwise
            hits += bool(want)
        assert 1500 < hits < len(sources)


def test_hash_per_length_matches_the_lpm_trie() -> None:
    pfx = v6_prefixes(1500, seed=7)
    tables = lenhash_tables(pfx)
    assert sorted(tables) == [32, 48, 64]
    d = Design("v6_lenhash", "V6_LENHASH", record=1, N_PREFIXES=2048, **v6_defs(tables))
    try:
        d.fill_v6_lenhash(tables)
        with _trie(20, len(pfx)) as trie:
            trie.update_batch(
                [struct.pack("=I", plen) + struct.pack("!QQ", hi, 0) for hi, plen in pfx],
                [struct.pack("<I", i + 1) for i in range(len(pfx))],
            )
            rng = random.Random(64)
            his = [hi | (rng.getrandbits(64 - plen) if plen < 64 else 0)
                   for hi, plen in rng.sample(pfx, 700)]
            his += [(0x2A00 << 48) | rng.getrandbits(48) for _ in range(300)]
            nested = 0
            for hi in his:
                lo = rng.getrandbits(64)
                want = _oracle(trie, struct.pack("=I", 128) + struct.pack("!QQ", hi, lo))
                assert v6_longest(tables, hi)[1] == want
                src = str(ipaddress.IPv6Address((hi << 64) | lo))
                ret, got = d.run(build_frame(src=src, dst="2001:db8:ffff::1", proto="udp",
                                             sport=1, dport=9))
                assert got == want, (src, got, want)
                assert ret == (1 if want else 2)
                nested += bool(want) and pfx[want - 1][1] > 32
            assert nested > 100  # longer prefixes inside shorter ones were found first
    finally:
        d.close()
