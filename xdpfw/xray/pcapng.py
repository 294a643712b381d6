"""A pcapng writer (draft-ietf-opsawg-pcapng): what tcpdump -r, tshark and Wireshark read.

The file is one section: a Section Header Block, then an Interface Description Block per
interface (link type Ethernet, nanosecond timestamps: if_tsresol 9), then an Enhanced Packet
Block per sample, whose opt_comment says which rule decided the frame and how
("xdpfw rule 12 drop"). Every block is written whole and flushed, so a reader at the other
end of a pipe (`xdpfw capture -w - | tcpdump -r -`) sees each packet as it comes.
Little-endian throughout (the byte-order magic tells readers).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from xdpfw.xray.record import Sample

__all__ = ["LINKTYPE_ETHERNET", "PcapngWriter", "comment_of"]

LINKTYPE_ETHERNET = 1
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_TSRESOL = 2, 9
_EPB_FLAGS = 2
_EPB_INBOUND = 0b01  # direction bits 0-1: inbound (XDP sees received frames)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _options(*opts: bytes) -> bytes:
    return b"".join(opts) + struct.pack("<HH", _OPT_END, 0) if opts else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)  # type, length, body, length
    assert total % 4 == 0
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def comment_of(s: Sample) -> str:
    """The packet comment: the rule and the verdict, as tshark's frame.comment shows them."""
    return f"xdpfw rule {s.rule} {s.verdict}"


class PcapngWriter:
    """Write samples to `out` (a binary stream). Interfaces are described on first sight."""

    def __init__(self, out: BinaryIO, snaplen: int = 0, application: str = "xdpfw") -> None:
        self._out = out
        self._snaplen = snaplen
        self._ids: dict[tuple[int, str], int] = {}
        self.packets = 0
        self._write(
            _block(
                _SHB,
                struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)  # -1: section length unknown
                + _options(_option(_SHB_USERAPPL, application.encode())),
            )
        )

    def _write(self, block: bytes) -> None:
        self._out.write(block)
        self._out.flush()

    def interface(self, ifindex: int, name: str = "") -> int:
        """The pcapng interface id of (ifindex, name), described now if it is new."""
        key = (ifindex, name)
        found = self._ids.get(key)
        if found is not None:
            return found
        label = name or f"ifindex {ifindex}"
        self._write(
            _block(
                _IDB,
                struct.pack("<HHI", LINKTYPE_ETHERNET, 0, self._snaplen)
                + _options(_option(_IF_NAME, label.encode()), _option(_IF_TSRESOL, bytes([9]))),
            )
        )
        self._ids[key] = len(self._ids)
        return self._ids[key]

    def write(self, s: Sample) -> None:
        """One Enhanced Packet Block: the captured bytes, the frame's length, the comment."""
        if_id = self.interface(s.ifindex, s.ifname)
        ts = max(0, s.time_ns)
        body = (
            struct.pack("<IIIII", if_id, ts >> 32, ts & 0xFFFFFFFF, len(s.data), s.length)
            + _pad4(s.data)
            + _options(
                _option(_OPT_COMMENT, comment_of(s).encode()),
                _option(_EPB_FLAGS, struct.pack("<I", _EPB_INBOUND)),
            )
        )
        self._write(_block(_EPB, body))
        self.packets += 1
