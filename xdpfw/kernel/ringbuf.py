"""The consumer side of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF), by mmap: no bcc, no libbpf.

Why not bcc's ring buffer API: the service never imports bcc (the program is compiled in a
child process, xdpfw/kernel/loader.py, to keep LLVM's ~180 MB out of it), and an adopted
program has no bcc module at all, only pinned maps. The protocol is small and stable
(kernel/bpf/ringbuf.c, tools/lib/bpf/ringbuf.c):

- page 0 of the map (read-write for us): the consumer position, a u64 we advance;
- page 1 (read-only): the producer position, a u64 the kernel advances;
- from page 2: the data area, mapped twice in a row, so a record that wraps reads in one
  piece. Each record is an 8-byte header (u32 length with the BUSY and DISCARD bits, u32
  page offset) and its data, the whole rounded up to 8 bytes.

Positions only grow; `pos & (size - 1)` is the offset in the data area. A record whose BUSY
bit is set is still being written: reading stops there until the next poll. Memory order:
the kernel publishes with release stores; on x86-64 (TSO) plain loads observe them in order.
epoll on the map fd says when data arrives (the kernel wakes the consumer once it caught up).
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from collections.abc import Callable

from xdpfw.kernel import bpfsys

__all__ = ["XRAY_MIN_KERNEL", "RingBuffer", "xray_supported"]

# X-ray's sampling needs bpf_xdp_load_bytes() (5.18) and the BPF atomics with fetch and
# compare-and-swap (5.12); older kernels get the program built without it (XDPFW_XRAY=0).
XRAY_MIN_KERNEL = (5, 18)


def xray_supported(release: str | None = None) -> bool:
    """Does this kernel (`uname -r`, or `release`) run the sampling part of the program?"""
    text = release if release is not None else os.uname().release
    parts: list[int] = []
    for piece in text.split("-")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            return False
        parts.append(int(digits))
    return tuple(parts) >= XRAY_MIN_KERNEL

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    """Read the records of a ring buffer map. Owns a duplicate of `fd`; one reader at a time."""

    def __init__(self, fd: int) -> None:
        info = bpfsys.map_info(fd)
        if info.type != bpfsys.MapType.RINGBUF:
            raise TypeError(f"map {info.name or info.id} is not a ring buffer (type {info.type})")
        self.size = info.max_entries  # bytes of the data area: a power of 2, pages
        self._fd = os.dup(fd)
        page = mmap.PAGESIZE
        try:
            rw = mmap.PROT_READ | mmap.PROT_WRITE
            self._cons = mmap.mmap(self._fd, page, mmap.MAP_SHARED, rw)
            self._prod = mmap.mmap(
                self._fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            os.close(self._fd)
            raise
        self._data = memoryview(self._prod)[page:]
        self._page = page
        self._mask = self.size - 1
        self._poll = select.epoll()
        self._poll.register(self._fd, select.EPOLLIN)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._poll.close()
        self._data.release()
        self._prod.close()
        self._cons.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pending(self) -> int:
        """Bytes between the consumer and the producer position."""
        prod: int = _U64.unpack_from(self._prod, 0)[0]
        cons: int = _U64.unpack_from(self._cons, 0)[0]
        return prod - cons

    def wait(self, timeout: float) -> bool:
        """Block until data may be there (or `timeout` seconds): True when there is some."""
        if self.pending():
            return True
        self._poll.poll(timeout)
        return self.pending() > 0

    def drain(self, handle: Callable[[bytes], None], limit: int = 1 << 30) -> int:
        """Hand every complete record (its data, a copy) to `handle`, oldest first, and free
        its room; at most `limit` records. Returns how many were handed."""
        cons = _U64.unpack_from(self._cons, 0)[0]
        prod = _U64.unpack_from(self._prod, 0)[0]
        n = 0
        try:
            while cons < prod and n < limit:
                off = cons & self._mask
                length = _U32.unpack_from(self._data, off)[0]
                if length & _BUSY:
                    break  # still being written
                size = length & ~(_BUSY | _DISCARD)
                if not length & _DISCARD:
                    start = off + _HDR
                    handle(bytes(self._data[start : start + size]))
                    n += 1
                cons += (size + _HDR + 7) & ~7
                prod = _U64.unpack_from(self._prod, 0)[0]
        finally:
            _U64.pack_into(self._cons, 0, cons)
        return n
