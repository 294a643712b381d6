"""Veth labs: a veth pair between the root namespace and a fresh namespace, fully configured.

Names carry the owner's pid (namespace ``<prefix>-<pid>-<n>``, interfaces
``<prefix><pid hex>h<n>`` in the root namespace and ``<prefix><pid hex>p<n>`` inside), so
:func:`cleanup_stale` can tell leftovers of dead processes from labs still in use.
Addresses come from 198.18.0.0/15 and 2001:db8::/32, one /24 and /64 per lab.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from xdpfw.datapath.pins import pid_alive
from xdpfw.kernel import netlink

__all__ = ["VethLab", "cleanup_stale", "pid_alive", "veth_lab"]

_lab_counter = itertools.count()
_lab_lock = threading.Lock()
_SUBNETS: Final = 512  # 198.18.0.0/15 = 512 x /24
_NET4: Final = ipaddress.ip_network("198.18.0.0/15")
_NET6: Final = ipaddress.ip_network("2001:db8::/32")


@dataclass(frozen=True)
class VethLab:
    """A veth pair: ``host_if`` in the root namespace, ``peer_if`` in ``netns``."""

    netns: str
    host_if: str
    peer_if: str
    host_ip4: str
    peer_ip4: str
    host_ip6: str
    peer_ip6: str
    host_mac: str
    peer_mac: str


def _lab_names(prefix: str, pid: int, n: int) -> tuple[str, str, str]:
    return f"{prefix}-{pid}-{n}", f"{prefix}{pid:x}h{n}", f"{prefix}{pid:x}p{n}"


def _used_lab_subnets() -> set[int]:
    used: set[int] = set()
    for text in netlink.addr_list():
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if addr.version == 4 and addr in _NET4:
            used.add((int(addr) - int(_NET4.network_address)) >> 8)
        elif addr.version == 6 and addr in _NET6:
            y = (int(addr) >> 80) & 0xFFFF
            if y < _SUBNETS:
                used.add(y)
    return used


def _lab_addresses(y: int) -> tuple[str, str, str, str]:
    base4 = f"198.{18 + y // 256}.{y % 256}"
    base6 = f"2001:db8:{y:x}"
    return f"{base4}.1", f"{base4}.2", f"{base6}::1", f"{base6}::2"


@contextlib.contextmanager
def veth_lab(prefix: str = "xfw") -> Iterator[VethLab]:
    """A veth pair between the root namespace and a fresh namespace, fully configured.

    ``host_if`` (root namespace, where the service and its XDP program live)
    has ``host_ip4``/24 and ``host_ip6``/64; ``peer_if`` (inside ``netns``, the
    traffic source) has ``peer_ip4``/``peer_ip6``.  Both sides get permanent
    neighbour entries (no ARP/NDP needed) and have IPv6 RA/DAD noise disabled.
    Subnets 198.18.0.0/15 and 2001:db8::/32 are chosen so concurrent labs (also
    of other processes) do not collide.  Everything is removed on exit, also
    when the body raises or creation failed half way.
    """
    pid = os.getpid()
    with _lab_lock:
        existing = set(netlink.netns_list())
        while True:
            n = next(_lab_counter)
            ns, host_if, peer_if = _lab_names(prefix, pid, n)
            if len(host_if.encode()) >= netlink.IFNAMSIZ:
                raise ValueError(f"veth_lab prefix {prefix!r} is too long for interface names")
            if ns not in existing and not netlink.link_exists(host_if):
                break
    created_ns = created_veth = False

    def cleanup() -> list[BaseException]:
        errors: list[BaseException] = []
        if created_veth:
            try:
                netlink.link_remove(host_if)  # takes peer_if with it
            except Exception as exc:
                errors.append(exc)
        if created_ns:
            try:
                netlink.netns_remove(ns)
            except Exception as exc:
                errors.append(exc)
        return errors

    try:
        netlink.netns_create(ns)
        created_ns = True
        with _lab_lock:
            used = _used_lab_subnets()
            start = hash((pid, n)) % _SUBNETS
            candidates = ((start + i) % _SUBNETS for i in range(_SUBNETS))
            y = next((c for c in candidates if c not in used), None)
            if y is None:
                raise netlink.NetlinkOpError(
                    errno.EADDRINUSE,
                    "veth_lab",
                    "all 512 lab subnets of 198.18.0.0/15 are in use; run cleanup_stale()",
                )
            host4, peer4, host6, peer6 = _lab_addresses(y)
            netlink.veth_create(host_if, peer_if, ns, up=False)
            created_veth = True
            # Silence IPv6 before the links come up, then address them.
            netlink.disable_ipv6_noise(host_if)
            netlink.disable_ipv6_noise(peer_if, ns)
            netlink.addr_add(host_if, f"{host4}/24")
            netlink.addr_add(host_if, f"{host6}/64")
            netlink.addr_add(peer_if, f"{peer4}/24", ns)
            netlink.addr_add(peer_if, f"{peer6}/64", ns)
        netlink.link_up(host_if)
        netlink.link_up(peer_if, ns)
        netlink.link_up("lo", ns)
        host_mac = netlink.link_mac(host_if)
        peer_mac = netlink.link_mac(peer_if, ns)
        netlink.neigh_add(host_if, peer4, peer_mac)
        netlink.neigh_add(host_if, peer6, peer_mac)
        netlink.neigh_add(peer_if, host4, host_mac, ns)
        netlink.neigh_add(peer_if, host6, host_mac, ns)
        lab = VethLab(
            netns=ns,
            host_if=host_if,
            peer_if=peer_if,
            host_ip4=host4,
            peer_ip4=peer4,
            host_ip6=host6,
            peer_ip6=peer6,
            host_mac=host_mac,
            peer_mac=peer_mac,
        )
        yield lab
    except BaseException as exc:
        for err in cleanup():
            exc.add_note(f"veth_lab cleanup also failed: {err}")
        raise
    else:
        errors = cleanup()
        if errors:
            raise errors[0]


def _owner_pid(prefix: str, name: str, kind: str) -> int | None:
    rest = name[len(prefix) :]
    if kind == "netns":
        m = re.fullmatch(r"-(\d+)-\d+", rest)
        return int(m.group(1)) if m else None
    m = re.fullmatch(r"([0-9a-f]+)[hp]\d+", rest)
    return int(m.group(1), 16) if m else None


def cleanup_stale(prefix: str, *, keep_live: bool = True) -> list[str]:
    """Remove namespaces and root-namespace veths whose name starts with ``prefix``.

    Meant for a test session start.  With ``keep_live`` (default) resources of
    a veth_lab whose owning process is still alive (e.g. a parallel pytest
    worker, or this very process) are left alone; names that carry no owner
    pid are always removed.  Returns the removed names.
    """
    if not prefix:
        raise ValueError("cleanup_stale needs a non-empty prefix")

    def stale(name: str, kind: str) -> bool:
        if not name.startswith(prefix):
            return False
        pid = _owner_pid(prefix, name, kind) if keep_live else None
        return pid is None or not pid_alive(pid)

    removed: list[str] = []
    for name in netlink.link_list(kind="veth"):
        if stale(name, "veth"):
            netlink.link_remove(name)
            removed.append(name)
    for ns in netlink.netns_list():
        if stale(ns, "netns"):
            netlink.netns_remove(ns)
            removed.append(ns)
    return removed
