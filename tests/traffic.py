"""Real packets for kernel and e2e tests: sent from a lab namespace, counted in the root one.

The XDP program sits on the lab's root-namespace veth (`host_if`), so every datagram sent
from the namespace crosses it on ingress. A datagram that XDP passes reaches a UDP socket
bound in the root namespace; a dropped one does not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

from xdpfw.kernel import netlink
from xdpfw.lab import VethLab, cleanup_stale

__all__ = ["no_leaked_labs", "send_raw", "udp_arrives", "udp_roundtrip"]


@contextlib.contextmanager
def no_leaked_labs(prefix: str) -> Iterator[None]:
    """Around a test module: remove labs of dead runs first, then fail on (and remove) any
    namespace this process made under `prefix` and left behind."""
    cleanup_stale(prefix)  # leftovers of dead test runs only; parallel runs are kept
    yield
    mine = f"{prefix}-{os.getpid()}-"
    leaked = [ns for ns in netlink.netns_list() if ns.startswith(mine)]
    for ns in leaked:
        netlink.netns_remove(ns)
    assert not leaked, f"namespaces leaked by this test module: {leaked}"


def udp_roundtrip(
    lab: VethLab,
    *,
    family: int = 4,
    count: int = 10,
    dport: int = 9999,
    settle: float = 0.3,
) -> int:
    """Send `count` datagrams from the namespace to host_ip:dport; return how many arrived."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    host_ip = lab.host_ip4 if family == 4 else lab.host_ip6
    peer_ip = lab.peer_ip4 if family == 4 else lab.peer_ip6
    rx = socket.socket(af, socket.SOCK_DGRAM)
    tx = netlink.socket_in_netns(lab.netns, af, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind((host_ip, dport))
        tx.bind((peer_ip, 0))
        for i in range(count):
            tx.sendto(b"xdpfw-test %d" % i, (host_ip, dport))
        got = 0
        rx.settimeout(settle)
        deadline = time.monotonic() + settle + 0.5
        while got < count and time.monotonic() < deadline:
            try:
                rx.recv(2048)
            except TimeoutError:
                break
            got += 1
        return got
    finally:
        rx.close()
        tx.close()


def send_raw(lab: VethLab, frames: list[bytes]) -> None:
    """Send whole Ethernet frames out of the namespace's veth (AF_PACKET)."""
    s = netlink.socket_in_netns(lab.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind((lab.peer_if, 0))
        for f in frames:
            s.send(f)
    finally:
        s.close()


def udp_arrives(lab: VethLab, family: int = socket.AF_INET, timeout: float = 2.0) -> bool:
    """Send one datagram from the lab namespace to the root namespace; True if it arrived.

    Asserts that what arrived is what was sent, from the peer's address.
    """
    host_ip, peer_ip = (
        (lab.host_ip4, lab.peer_ip4) if family == socket.AF_INET else (lab.host_ip6, lab.peer_ip6)
    )
    with (
        socket.socket(family, socket.SOCK_DGRAM) as rx,
        netlink.socket_in_netns(lab.netns, family, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((host_ip, 0))
        rx.settimeout(timeout)
        tx.bind((peer_ip, 0))
        payload = os.urandom(16)
        tx.sendto(payload, (host_ip, rx.getsockname()[1]))
        try:
            data, src = rx.recvfrom(2048)
        except TimeoutError:
            return False
        assert data == payload
        assert src[0] == peer_ip
        return True
