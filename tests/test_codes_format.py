"""The rule wire format (xdpfw/codes.py): its fields tile their ints, its functions invert each
other, the rank orders rules as the rule contract says, and the C header's rank comment agrees."""

from __future__ import annotations

import ipaddress
import re
from itertools import combinations, pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdpfw import abi, codes
from xdpfw.codes import Field
from xdpfw.rules import Action, Limit, Mode, PortRange, Proto, Rule, RuleSpec, TcpFlags

pytestmark = pytest.mark.pure

ABI_H = Path(__file__).resolve().parent.parent / "bpf" / "xdpfw_abi.h"


# -- the layouts -------------------------------------------------------------------------------


def _tiles(fields: tuple[Field, ...], *, open_top: bool) -> None:
    """Sorted by shift, each field starts where the one below ends, from bit 0, no overlap."""
    ordered = sorted(fields, key=lambda f: f.shift)
    assert ordered[0].shift == 0
    for below, above in pairwise(ordered):
        assert below.width > 0, f"{below.name}: only the top field may be open"
        assert above.shift == below.shift + below.width, (below.name, above.name)
    assert (ordered[-1].width == 0) is open_top
    for a, b in combinations(fields, 2):
        assert not a.mask & b.mask, (a.name, b.name)


def test_code_fields_tile_from_bit_0() -> None:
    _tiles(codes.CODE_FIELDS, open_top=True)
    assert codes.CODE_FIELDS[-1] is codes.KEY


def test_key_fields_tile_from_bit_0() -> None:
    _tiles(codes.KEY_FIELDS, open_top=True)
    assert codes.DIR.mask | codes.V6.mask == codes.TABLE_BITS
    assert {codes.DIR_NONE, codes.DIR_SRC, codes.DIR_DST} <= set(range(codes.DIR.bits + 1))


def test_trie_position_fields_tile_and_carry_a_whole_plen() -> None:
    _tiles((codes.TRIE_PLEN, codes.TRIE_ADDR), open_top=True)
    assert codes.TRIE_PLEN.width == codes.PLEN.width


def test_rank_fields_cover_bits_0_to_63_exactly() -> None:
    _tiles(codes.RANK_FIELDS, open_top=False)
    assert sum(f.width for f in codes.RANK_FIELDS) == 64
    union = 0
    for f in codes.RANK_FIELDS:
        union |= f.mask
    assert union == (1 << 64) - 1
    assert codes.RANK_ID.bits == codes.MAX_RULE_ID == abi.RANK_ID_MASK
    assert codes.RANK_NARROW.bits + 1 == codes.PORT_SPAN
    assert codes.RANK_VERDICT.width == codes.VERDICT.width
    assert codes.RANK_SRC_PLEN.width == codes.RANK_DST_PLEN.width == codes.PLEN.width


def test_field_put_get_and_overflow() -> None:
    f = Field("f", 5, 3)
    assert f.bits == 0b111 and f.mask == 0b111 << 5
    assert f.get(f.put(6) | 0b11111 | 1 << 8) == 6
    with pytest.raises(ValueError):
        f.put(8)
    with pytest.raises(ValueError):
        f.put(-1)
    top = Field("top", 4, 0)
    assert top.bits == -1 and top.get(top.put(1 << 200)) == 1 << 200


# -- the C header's rank comment ---------------------------------------------------------------

# Which RANK_* field each line of the comment in bpf/xdpfw_abi.h describes.
_RANK_WORDS = {
    "verdict class": codes.RANK_VERDICT,
    "source prefix length": codes.RANK_SRC_PLEN,
    "destination prefix length": codes.RANK_DST_PLEN,
    "protocol named": codes.RANK_PROTO,
    "port narrowness": codes.RANK_NARROW,
    "rule_id": codes.RANK_ID,
}


def test_abi_header_rank_comment_matches_rank_fields() -> None:
    text = ABI_H.read_text()
    lines = re.findall(r"^\s*\*\s+bits?\s+(\d+)(?:-(\d+))?\s+(.*)$", text, re.MULTILINE)
    found: dict[Field, tuple[int, int]] = {}
    for lo, hi, what in lines:
        matches = [f for words, f in _RANK_WORDS.items() if words in what]
        assert len(matches) == 1, f"which rank field is {what!r}?"
        found[matches[0]] = (int(lo), int(hi or lo))
    assert set(found) == set(codes.RANK_FIELDS), "the header must describe every rank field"
    for f, (lo, hi) in found.items():
        assert (lo, hi) == (f.shift, f.shift + f.width - 1), f.name
    # listed from the top bit down, as the data plane compares
    assert [f.shift for f in found] == sorted((f.shift for f in found), reverse=True)
    assert f"{codes.PORT_SPAN} - (port_hi - port_lo + 1)" in text
    mask = re.search(r"#define XDPFW_RANK_ID_MASK (0x[0-9a-fA-F]+)ULL", text)
    assert mask is not None and int(mask.group(1), 16) == codes.RANK_ID.bits


# -- pack / unpack -----------------------------------------------------------------------------


@st.composite
def _keys(draw: st.DrawFn) -> int:
    direction = draw(st.sampled_from((codes.DIR_NONE, codes.DIR_SRC, codes.DIR_DST)))
    if direction == codes.DIR_NONE:
        return 0
    v6 = draw(st.booleans())
    bits = codes.ADDR_BITS_V6 if v6 else codes.ADDR_BITS_V4
    plen = draw(st.integers(0, bits))
    addr = draw(st.integers(0, (1 << bits) - 1)) >> (bits - plen) << (bits - plen)
    return codes.pack_key(addr, plen, v6=v6, direction=direction)


_VERDICTS = st.sampled_from(
    (abi.VERDICT_MONITOR, abi.VERDICT_DROP, abi.VERDICT_ALLOW, abi.VERDICT_LIMIT,
     abi.VERDICT_LIMIT_MONITOR)
)
_PORTS = st.none() | st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(
    lambda p: (min(p), max(p))
)


@given(_keys(), _VERDICTS, st.integers(0, 255), _PORTS)
def test_pack_unpack_round_trip(
    k: int, verdict: int, proto: int, ports: tuple[int, int] | None
) -> None:
    code = codes.pack(k, verdict, proto, ports)
    assert codes.unpack(code) == (k, verdict, proto, ports)
    assert (codes.key(code), codes.verdict(code), codes.proto(code), codes.ports(code)) == (
        k,
        verdict,
        proto,
        ports,
    )
    assert codes.code_of_key(codes.key(code)) == code & codes.KEY.mask
    limit = verdict in (abi.VERDICT_LIMIT, abi.VERDICT_LIMIT_MONITOR)
    assert codes.is_plain(code) == (proto == 0 and ports is None and not limit)
    if codes.is_plain(code) and k:
        net = codes.net_code(
            codes.key_addr(k),
            codes.key_plen(k),
            v6=codes.key_v6(k),
            direction=codes.key_dir(k),
            verdict=verdict,
        )
        assert net == code


@given(_keys(), _VERDICTS, st.integers(1, 255), st.integers(0, 255))
def test_tcp_flags_round_trip_and_leave_the_rest(
    k: int, verdict: int, mask: int, want: int
) -> None:
    want &= mask
    code = codes.pack(k, verdict, 6, None, (mask, want))
    assert codes.tcp_flags(code) == (mask, want)
    assert codes.unpack(code) == (k, verdict, 6, None)
    assert not codes.is_plain(code)
    assert codes.tcp_flags(codes.pack(k, verdict, 6)) is None


@given(_keys())
def test_key_accessors_and_trie_position_round_trip(k: int) -> None:
    if not k:
        assert not codes.key_is_exact(k) and not codes.key_is_prefix(k)
        return
    back = codes.pack_key(
        codes.key_addr(k), codes.key_plen(k), v6=codes.key_v6(k), direction=codes.key_dir(k)
    )
    assert back == k
    assert codes.key_table(k) == k & codes.TABLE_BITS
    assert codes.key_bits(k) == (codes.ADDR_BITS_V6 if codes.key_v6(k) else codes.ADDR_BITS_V4)
    assert codes.key_is_exact(k) != codes.key_is_prefix(k)
    assert codes.key_is_exact(k) == (codes.key_plen(k) == codes.key_bits(k))
    assert codes.trie_key(codes.trie_position(k), codes.key_table(k)) == k


@given(st.lists(_keys().filter(bool), min_size=2, max_size=20))
def test_trie_positions_sort_by_address_then_length(keys: list[int]) -> None:
    by_position = sorted(keys, key=codes.trie_position)
    assert [(codes.key_addr(k), codes.key_plen(k)) for k in by_position] == sorted(
        (codes.key_addr(k), codes.key_plen(k)) for k in keys
    )


# -- the rank is the rule contract's order -----------------------------------------------------


_CLASS = {  # README: allow beats drop beats limit beats monitor
    (Action.ALLOW, Mode.ENFORCE): 3,
    (Action.DROP, Mode.ENFORCE): 2,
    (Action.LIMIT, Mode.ENFORCE): 1,
    (Action.DROP, Mode.MONITOR): 0,
    (Action.LIMIT, Mode.MONITOR): 0,
}


_PORT_RANGES = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(
    lambda p: PortRange(min(p), max(p))
)


@st.composite
def _rules(draw: st.DrawFn) -> Rule:
    """Rules around one address, so that two of them often tie on a prefix length."""
    action, mode = draw(st.sampled_from(list(_CLASS)))
    v6 = draw(st.booleans())
    host = ipaddress.ip_network("2001:db8::1/128" if v6 else "198.18.0.1/32")
    lengths = st.integers(0, host.max_prefixlen)
    net = draw(st.none() | lengths.map(lambda plen: host.supernet(new_prefix=plen)))
    protos = st.sampled_from((Proto.TCP, Proto.UDP, Proto.ICMPV6 if v6 else Proto.ICMP))
    proto = draw(protos if net is None else st.none() | protos)
    ports = draw(st.none() | _PORT_RANGES) if proto in (Proto.TCP, Proto.UDP) else None
    src, dst = (net, None) if draw(st.booleans()) else (None, net)
    tcp_texts = st.none() | st.sampled_from(("syn", "RST", "FIN,!ACK"))
    flags = draw(tcp_texts) if proto is Proto.TCP else None
    limit = Limit.parse(pps=draw(st.integers(1, 10**6))) if action is Action.LIMIT else None
    spec = RuleSpec(
        action=action, mode=mode, src=src, dst=dst, proto=proto, dport=ports,
        tcp_flags=None if flags is None else TcpFlags.parse(flags), limit=limit,
    )
    spec.validate()
    return spec.with_id(draw(st.integers(1, codes.MAX_RULE_ID)))


def _contract_order(r: Rule) -> tuple[int, int, int, bool, int, int]:
    """The README's "most specific" order, the verdict class first: bigger wins."""
    return (
        _CLASS[(r.action, r.mode)],
        r.src.prefixlen if r.src is not None else 0,
        r.dst.prefixlen if r.dst is not None else 0,
        r.proto is not None,
        -(r.dport.width if r.dport is not None else 65536),  # no ports: the widest range
        -r.id,
    )


@given(_rules(), _rules())
def test_rank_orders_rules_as_the_contract_says(a: Rule, b: Rule) -> None:
    ra, rb = codes.rank(a.code(), a.id), codes.rank(b.code(), b.id)
    assert ra == a.rank() and rb == b.rank()
    assert 0 < ra < 1 << 64
    oa, ob = _contract_order(a), _contract_order(b)
    assert (ra > rb) == (oa > ob)
    assert (ra == rb) == (oa == ob)
    assert codes.rank_plens(ra) == (
        a.src.prefixlen if a.src is not None else 0,
        a.dst.prefixlen if a.dst is not None else 0,
    )


# -- slots back to codes -----------------------------------------------------------------------


def _slot_code(entry_key: int, r: Rule) -> int | None:
    ports = None if r.dport is None else (r.dport.lo, r.dport.hi)
    proto = r.proto.number if r.proto is not None else 0
    tcp = None if r.tcp_flags is None else (r.tcp_flags.mask, r.tcp_flags.want)
    return codes.from_slot(
        entry_key, r.rank(), verdict=r.verdict, proto=proto, ports=ports, tcp=tcp
    )


@given(_rules())
def test_from_slot_round_trips_a_rules_own_slot(r: Rule) -> None:
    assert _slot_code(codes.key(r.code()), r) == r.code()


@given(_rules(), st.data())
def test_from_slot_is_none_for_an_inherited_slot(inner: Rule, data: st.DataObject) -> None:
    """A covering shorter prefix's rule, found in the longer prefix's entry, is inherited."""
    net = inner.src if inner.src is not None else inner.dst
    if net is None or net.prefixlen == 0:
        return
    plen = data.draw(st.integers(0, net.prefixlen - 1))
    outer_net = net.supernet(new_prefix=plen)
    action = data.draw(st.sampled_from(("drop", "allow")))
    src, dst = (outer_net, None) if inner.src is not None else (None, outer_net)
    outer = RuleSpec.parse(action=action, src=src, dst=dst).with_id(data.draw(st.integers(1, 9)))
    k = codes.key(inner.code())
    assert _slot_code(k, outer) is None
    assert _slot_code(k, inner) == inner.code()
    # an address-less rule's entry holds only address-less rules; a network's slot there is not
    if inner.proto is not None:
        anywhere = RuleSpec.parse(proto=inner.proto).with_id(1)
        assert _slot_code(0, anywhere) == anywhere.code()
        assert _slot_code(0, inner) is None
