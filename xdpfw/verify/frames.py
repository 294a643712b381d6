"""Ethernet frame builder for tests, benchmarks and the demo lab.

Pure Python, stdlib only. Every frame is built from the outside in: Ethernet, optional VLAN
tags, IPv4 (with options) or IPv6 (with extension headers), then TCP, UDP, ICMP/ICMPv6 or a
bare payload. Lengths and checksums are always filled in correctly (IPv4 header checksum,
UDP/TCP/ICMPv6 checksums over the proper pseudo-header), so a frame can be pushed through a
real veth to a real socket.

    build_frame(src="10.0.0.1", dst="10.0.0.2", proto="tcp", dport=22)
    build_frame(src="2001:db8::1", dst="2001:db8::2", ext_headers=[ExtHeader(0), ExtHeader(60)])
    build_frame(src="10.0.0.1", dst="10.0.0.2", vlans=[(0x88A8, 100), (0x8100, 200)])

Fragments: ``frag_offset`` (in 8-byte units) and ``more_fragments`` set the IPv4 header fields,
or add an IPv6 fragment header after ``ext_headers``. A non-first fragment (offset != 0)
carries no L4 header, only ``payload``. A first fragment carries the L4 header; its length
and checksum cover only what this frame holds.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ETH_HLEN",
    "ETH_P_8021AD",
    "ETH_P_8021Q",
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "EXT_AH",
    "EXT_DSTOPTS",
    "EXT_FRAGMENT",
    "EXT_HOPOPTS",
    "EXT_ROUTING",
    "IPPROTO_ICMP",
    "IPPROTO_ICMPV6",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "ExtHeader",
    "arp_frame",
    "build_frame",
    "internet_checksum",
    "l3_offset",
    "mac_bytes",
    "proto_number",
    "raw_ethertype_frame",
]

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

EXT_HOPOPTS = 0
EXT_ROUTING = 43
EXT_FRAGMENT = 44
EXT_AH = 51
EXT_DSTOPTS = 60

_VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)
_PROTO_NAMES = {
    "tcp": IPPROTO_TCP,
    "udp": IPPROTO_UDP,
    "icmp": IPPROTO_ICMP,
    "icmpv6": IPPROTO_ICMPV6,
}
_TTL = 64
_TCP_SYN = 0x02
_TCP_WINDOW = 64240
_ROUTING_TYPE = 253  # RFC 4727 experimental; with segments left 0 a receiver skips it
_AH_SPI = 0x100


@dataclass(frozen=True)
class ExtHeader:
    """One IPv6 extension header.

    kind: 0 hop-by-hop, 43 routing, 60 destination options, 51 AH, 44 fragment (any other
    number is encoded like an options header: hdrlen = length / 8 - 1).
    length: total bytes of the header, including its next-header and length bytes. Options
    headers and routing: a multiple of 8, at least 8 (options headers are filled with PadN
    options; a Linux receiver drops more than 7 bytes of padding in a row, so only the 8-byte
    ones get past XDP to a socket). AH: a multiple of 4, at least 8 (8 is the short form: SPI,
    no sequence number).
    Fragment: always 8.
    frag_offset (8-byte units), more_fragments, ident: fragment header fields (kind 44 only).
    """

    kind: int
    length: int = 8
    frag_offset: int = 0
    more_fragments: bool = False
    ident: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.kind <= 255:
            raise ValueError(f"extension header kind {self.kind} is not a byte")
        if self.kind == EXT_FRAGMENT:
            if self.length != 8:
                raise ValueError("a fragment header is 8 bytes long")
            if not 0 <= self.frag_offset <= 0x1FFF:
                raise ValueError(f"fragment offset {self.frag_offset} is out of range 0-8191")
            if not 0 <= self.ident <= 0xFFFFFFFF:
                raise ValueError(f"fragment ident {self.ident} is out of range")
        elif self.kind == EXT_AH:
            if self.length < 8 or self.length % 4 or self.length > (255 + 2) * 4:
                raise ValueError(f"AH length {self.length}: a multiple of 4, 8-1028")
        elif self.length < 8 or self.length % 8 or self.length > (255 + 1) * 8:
            raise ValueError(f"extension header length {self.length}: a multiple of 8, 8-2048")

    @property
    def is_non_first_fragment(self) -> bool:
        return self.kind == EXT_FRAGMENT and self.frag_offset != 0

    def encode(self, next_header: int) -> bytes:
        """The header's bytes, with ``next_header`` in its first byte."""
        if self.kind == EXT_FRAGMENT:
            frag = (self.frag_offset << 3) | (1 if self.more_fragments else 0)
            return struct.pack("!BBHI", next_header, 0, frag, self.ident)
        if self.kind == EXT_AH:
            hdrlen = self.length // 4 - 2
            if self.length == 8:
                # the short form (payload len 0): next header, payload len, reserved, SPI
                return struct.pack("!BBHI", next_header, hdrlen, 0, _AH_SPI)
            # next header, payload len, reserved, SPI, sequence number, ICV (zeros)
            head = struct.pack("!BBHII", next_header, hdrlen, 0, _AH_SPI, 1)
            return head + bytes(self.length - len(head))
        hdrlen = self.length // 8 - 1
        if self.kind == EXT_ROUTING:
            # routing type, segments left 0: a receiver ignores the header and goes on
            head = struct.pack("!BBBB", next_header, hdrlen, _ROUTING_TYPE, 0)
            return head + bytes(self.length - len(head))
        # hop-by-hop, destination options (and unknown kinds): PadN options fill it
        return struct.pack("!BB", next_header, hdrlen) + _padding(self.length - 2)


_PADN_MAX = 2 + 255  # a PadN option: type, length byte, up to 255 zero bytes


def _padding(size: int) -> bytes:
    """``size`` bytes of options: PadN options of at most 257 bytes (Pad1 only for size 1)."""
    out = b""
    while size > 0:
        if size == 1:
            return out + b"\x00"  # Pad1
        chunk = min(size, _PADN_MAX)
        if size - chunk == 1:
            chunk -= 1  # leave two bytes, not one, for the last PadN
        out += struct.pack("!BB", 1, chunk - 2) + bytes(chunk - 2)
        size -= chunk
    return out


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement checksum of ``data`` (odd lengths padded with a zero)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    """A MAC address such as 02:00:00:00:00:01 (or with dashes) as 6 bytes."""
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError as exc:
        raise ValueError(f"{mac!r} is not a MAC address") from exc
    return raw


def proto_number(proto: int | str) -> int:
    """tcp/udp/icmp/icmpv6 (any case) or an IP protocol number 0-255."""
    if isinstance(proto, bool):
        raise ValueError("proto must be a name or a number")
    if isinstance(proto, int):
        if not 0 <= proto <= 255:
            raise ValueError(f"IP protocol {proto} is out of range 0-255")
        return proto
    try:
        return _PROTO_NAMES[str(proto).strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown protocol {proto!r}; use tcp|udp|icmp|icmpv6 or a number"
        ) from None


def _l2(eth_dst: str, eth_src: str, vlans: Sequence[tuple[int, int]], ethertype: int) -> bytes:
    out = mac_bytes(eth_dst) + mac_bytes(eth_src)
    for tpid, vid in vlans:
        if not 0 <= tpid <= 0xFFFF:
            raise ValueError(f"VLAN TPID {tpid:#x} is not 16 bits")
        if not 0 <= vid <= 0xFFF:
            raise ValueError(f"VLAN id {vid} is out of range 0-4095")
        out += struct.pack("!HH", tpid, vid)
    return out + struct.pack("!H", ethertype)


def raw_ethertype_frame(
    ethertype: int,
    payload: bytes = b"",
    *,
    eth_src: str = "02:00:00:00:00:01",
    eth_dst: str = "02:00:00:00:00:02",
    vlans: Sequence[tuple[int, int]] = (),
) -> bytes:
    """Ethernet header (plus optional VLAN tags) with any ethertype, then ``payload``."""
    if not 0 <= ethertype <= 0xFFFF:
        raise ValueError(f"ethertype {ethertype:#x} is not 16 bits")
    return _l2(eth_dst, eth_src, vlans, ethertype) + payload


def arp_frame(
    *,
    sender_ip: str = "10.0.0.1",
    target_ip: str = "10.0.0.2",
    eth_src: str = "02:00:00:00:00:01",
    eth_dst: str = "ff:ff:ff:ff:ff:ff",
    vlans: Sequence[tuple[int, int]] = (),
) -> bytes:
    """An ARP request "who has target_ip? tell sender_ip" from eth_src (42 bytes untagged)."""
    spa = ipaddress.IPv4Address(sender_ip).packed
    tpa = ipaddress.IPv4Address(target_ip).packed
    sha = mac_bytes(eth_src)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, oper 1 (request)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + sha + spa + bytes(6) + tpa
    return raw_ethertype_frame(ETH_P_ARP, arp, eth_src=eth_src, eth_dst=eth_dst, vlans=vlans)


def l3_offset(frame: bytes) -> int:
    """Offset of the L3 header: 14, plus 4 for every VLAN tag (0x8100/0x88a8) in front of it."""
    if len(frame) < ETH_HLEN:
        raise ValueError(f"a {len(frame)}-byte frame has no Ethernet header")
    pos = ETH_HLEN - 2  # the ethertype / TPID field
    while struct.unpack_from("!H", frame, pos)[0] in _VLAN_TPIDS:
        pos += 4
        if pos + 2 > len(frame):
            raise ValueError("frame ends inside a VLAN tag")
    return pos + 2


def _l4(
    proto: int,
    pseudo: bytes,
    sport: int,
    dport: int,
    icmp_type: int,
    payload: bytes,
    tcp_flags: int = _TCP_SYN,
) -> bytes:
    """The L4 header and payload; ``pseudo`` is the pseudo-header minus length and protocol."""

    def pseudo_sum(segment: bytes) -> bytes:
        if len(pseudo) == 8:  # IPv4: src, dst, zero, protocol, length (16 bits)
            return pseudo + struct.pack("!BBH", 0, proto, len(segment)) + segment
        # IPv6: src, dst, length (32 bits), 3 zero bytes, next header
        return pseudo + struct.pack("!I3xB", len(segment), proto) + segment

    if proto == IPPROTO_UDP:
        seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        csum = internet_checksum(pseudo_sum(seg)) or 0xFFFF  # 0 means "no checksum"
        return seg[:6] + struct.pack("!H", csum) + seg[8:]
    if proto == IPPROTO_TCP:
        # seq, ack, data offset 5 words, flags SYN, window, checksum, urgent pointer
        seg = (
            struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, tcp_flags, _TCP_WINDOW, 0, 0)
            + payload
        )
        csum = internet_checksum(pseudo_sum(seg))
        return seg[:16] + struct.pack("!H", csum) + seg[18:]
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        # echo: type, code, checksum, identifier (sport), sequence 1
        seg = struct.pack("!BBHHH", icmp_type, 0, 0, sport, 1) + payload
        data = pseudo_sum(seg) if proto == IPPROTO_ICMPV6 else seg
        csum = internet_checksum(data)
        return seg[:2] + struct.pack("!H", csum) + seg[4:]
    return payload


def build_frame(
    *,
    src: str,
    dst: str,
    proto: int | str = "udp",
    sport: int = 1024,
    dport: int = 80,
    vlans: Sequence[tuple[int, int]] = (),
    ip_options: bytes = b"",
    ext_headers: Sequence[ExtHeader] = (),
    frag_offset: int = 0,
    more_fragments: bool = False,
    payload: bytes = b"",
    eth_src: str = "02:00:00:00:00:01",
    eth_dst: str = "02:00:00:00:00:02",
    icmp_type: int | None = None,
    ident: int = 1,
    tcp_flags: int = _TCP_SYN,
) -> bytes:
    """One IPv4 or IPv6 frame (the family follows the addresses; both must agree).

    proto: tcp (20-byte header, SYN), udp (8 bytes), icmp/icmpv6 (echo header, 8 bytes) or a
    number; other numbers carry ``payload`` right after the IP header(s).
    vlans: (tpid, vid) tags, outermost first. ip_options: IPv4 only, zero-padded to 4 bytes.
    ext_headers: IPv6 only, in order. frag_offset (8-byte units) / more_fragments: IPv4 header
    fields, or (IPv6) a fragment header appended after ext_headers; for IPv6, give fragment
    fields either here or as an ExtHeader(44), not both.
    icmp_type: default echo request (8 for ICMP, 128 for ICMPv6). ident: IPv4 identification
    and IPv6 fragment identification. tcp_flags: byte 13 of the TCP header (default SYN).
    """
    s = ipaddress.ip_address(src)
    d = ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"src {src} and dst {dst} are not the same IP version")
    number = proto_number(proto)
    if isinstance(proto, str):
        named = proto.strip().lower()
        if (named == "icmp" and s.version == 6) or (named == "icmpv6" and s.version == 4):
            raise ValueError(f"{named} does not go in IPv{s.version}; pass the number to force it")
    for name, port in (("sport", sport), ("dport", dport)):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} {port} is out of range 0-65535")
    if not 0 <= frag_offset <= 0x1FFF:
        raise ValueError(f"frag_offset {frag_offset} is out of range 0-8191")
    if icmp_type is None:
        icmp_type = 128 if number == IPPROTO_ICMPV6 else 8
    if not 0 <= icmp_type <= 255:
        raise ValueError(f"icmp_type {icmp_type} is out of range 0-255")

    if isinstance(s, ipaddress.IPv4Address):
        if ext_headers:
            raise ValueError("ext_headers are IPv6 only")
        if len(ip_options) > 40:
            raise ValueError("IPv4 options are at most 40 bytes")
        options = ip_options + bytes(-len(ip_options) % 4)
        pseudo = s.packed + d.packed
        l4 = (
            payload if frag_offset
            else _l4(number, pseudo, sport, dport, icmp_type, payload, tcp_flags)
        )
        ihl = 5 + len(options) // 4
        frag = (0x2000 if more_fragments else 0) | frag_offset
        header = (
            struct.pack(
                "!BBHHHBBH4s4s",
                (4 << 4) | ihl,
                0,
                ihl * 4 + len(l4),
                ident & 0xFFFF,
                frag,
                _TTL,
                number,
                0,
                s.packed,
                d.packed,
            )
            + options
        )
        csum = internet_checksum(header)
        header = header[:10] + struct.pack("!H", csum) + header[12:]
        return _l2(eth_dst, eth_src, vlans, ETH_P_IP) + header + l4

    if ip_options:
        raise ValueError("ip_options are IPv4 only")
    chain = list(ext_headers)
    if frag_offset or more_fragments:
        if any(h.kind == EXT_FRAGMENT for h in chain):
            raise ValueError("give IPv6 fragment fields in ExtHeader(44) or as arguments, not both")
        chain.append(ExtHeader(EXT_FRAGMENT, 8, frag_offset, more_fragments, ident))
    non_first = any(h.is_non_first_fragment for h in chain)
    pseudo = s.packed + d.packed
    l4 = payload if non_first else _l4(number, pseudo, sport, dport, icmp_type, payload, tcp_flags)
    kinds = [h.kind for h in chain] + [number]  # kinds[i + 1] follows chain[i]
    ext = b"".join(h.encode(kinds[i + 1]) for i, h in enumerate(chain))
    first = kinds[0]
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(ext) + len(l4), first, _TTL, s.packed, d.packed
    )
    return _l2(eth_dst, eth_src, vlans, ETH_P_IPV6) + header + ext + l4
