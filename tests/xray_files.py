"""Reading captures back with the real tools (tests of X-ray): tcpdump and tshark."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

__all__ = ["TSHARK", "tcpdump_frames", "tshark_comments"]

TSHARK = shutil.which("tshark")


def tcpdump_frames(pcapng: Path) -> list[tuple[bytes, int]]:
    """(captured bytes, original length) of every packet, as the real tcpdump reads the file:
    `tcpdump -r FILE -w OUT` rewrites it as classic pcap, parsed here."""
    out = pcapng.with_suffix(".tcpdump.pcap")
    p = subprocess.run(["tcpdump", "-r", str(pcapng), "-w", str(out)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return classic_pcap(out.read_bytes())


def classic_pcap(raw: bytes) -> list[tuple[bytes, int]]:
    magic = struct.unpack_from("<I", raw)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
    off, frames = 24, []
    while off < len(raw):
        _, _, incl, orig = struct.unpack_from("<IIII", raw, off)
        off += 16
        frames.append((raw[off : off + incl], orig))
        off += incl
    return frames


def tshark_comments(pcapng: Path) -> list[str]:
    """frame.comment of every packet, as the real tshark reads the file."""
    assert TSHARK is not None
    p = subprocess.run(
        [TSHARK, "-r", str(pcapng), "-T", "fields", "-e", "frame.comment"],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()
