"""Kernel tests for xdpfw.lab: veth labs (shape, real UDP, cleanup on every path, parallel
labs) and cleanup_stale.

Everything is named with the prefix "xfwt" (or one of this process's own), with addresses
from 198.18.0.0/15 and 2001:db8::/32, and is removed afterwards.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.traffic import no_leaked_labs, udp_arrives
from xdpfw.kernel import netlink as nl
from xdpfw.lab import VethLab, cleanup_stale, veth_lab

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, veth)"),
]

PREFIX = "xfwt"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _link_names() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link").splitlines()}


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers() -> Iterator[None]:
    with no_leaked_labs(PREFIX):
        yield


@pytest.fixture
def lab() -> Iterator[VethLab]:
    with veth_lab(PREFIX) as lab:
        yield lab


def test_lab_udp_ipv4(lab: VethLab) -> None:
    assert udp_arrives(lab, socket.AF_INET)


def test_lab_udp_ipv6(lab: VethLab) -> None:
    assert udp_arrives(lab, socket.AF_INET6)


def test_lab_shape(lab: VethLab) -> None:
    assert lab.netns in nl.netns_list()
    assert len(lab.host_if) <= 15 and len(lab.peer_if) <= 15
    assert lab.host_if.startswith(PREFIX) and lab.netns.startswith(PREFIX)
    assert nl.link_mac(lab.host_if) == lab.host_mac
    assert nl.link_mac(lab.peer_if, lab.netns) == lab.peer_mac
    assert nl.ifindex(lab.peer_if, lab.netns) > 0
    # the peer lives only in the namespace
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.ifindex(lab.peer_if)
    assert ei.value.errno == errno.ENODEV
    neigh = _ip("neigh", "show", "dev", lab.host_if)
    assert f"{lab.peer_ip4} lladdr {lab.peer_mac} PERMANENT" in neigh
    assert f"{lab.peer_ip6} lladdr {lab.peer_mac} PERMANENT" in neigh
    peer_neigh = _ip("-n", lab.netns, "neigh", "show", "dev", lab.peer_if)
    assert f"{lab.host_ip4} lladdr {lab.host_mac} PERMANENT" in peer_neigh
    assert "nodad" in _ip("-n", lab.netns, "-6", "addr", "show", "dev", lab.peer_if)
    for knob in ("accept_ra", "autoconf", "dad_transmits", "router_solicitations"):
        with open(f"/proc/sys/net/ipv6/conf/{lab.host_if}/{knob}") as fh:
            assert fh.read().strip() == "0"
        out = _ip(
            "netns", "exec", lab.netns, "cat", f"/proc/sys/net/ipv6/conf/{lab.peer_if}/{knob}"
        )
        assert out.strip() == "0"


def test_lab_cleans_up() -> None:
    with veth_lab(PREFIX) as lab:
        assert lab.netns in _ip("netns", "list").split()
        assert lab.host_if in _link_names()
    assert lab.netns not in _ip("netns", "list").split()
    assert lab.host_if not in _link_names()
    assert lab.netns not in nl.netns_list()


def test_lab_cleans_up_when_body_raises() -> None:
    seen: list[VethLab] = []
    with pytest.raises(RuntimeError, match="boom"), veth_lab(PREFIX) as lab:
        seen.append(lab)
        raise RuntimeError("boom")
    (lab,) = seen
    assert lab.netns not in _ip("netns", "list").split()
    assert lab.host_if not in _link_names()


def _my_lab_resources() -> set[str]:
    """Namespaces and root-namespace veths of veth_lab(PREFIX) in this process."""
    ns_prefix, if_prefix = f"{PREFIX}-{os.getpid()}-", f"{PREFIX}{os.getpid():x}h"
    return {n for n in nl.netns_list() if n.startswith(ns_prefix)} | {
        n for n in _link_names() if n.startswith(if_prefix)
    }


@pytest.mark.parametrize("fail_in", ["veth_create", "addr_add", "neigh_add"])
def test_lab_cleans_up_when_creation_fails_half_way(
    monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    assert _my_lab_resources() == set()
    real = getattr(nl, fail_in)
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2 or fail_in == "veth_create":
            raise nl.NetlinkOpError(errno.EIO, fail_in, "injected failure")
        real(*args, **kwargs)

    monkeypatch.setattr(nl, fail_in, flaky)
    with pytest.raises(nl.NetlinkOpError, match="injected"), veth_lab(PREFIX):
        pytest.fail("the body must not run")
    assert calls >= 1
    assert _my_lab_resources() == set()


def test_parallel_labs_get_distinct_names_and_subnets() -> None:
    labs: list[VethLab] = []
    errors: list[BaseException] = []
    release = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        try:
            with veth_lab(PREFIX) as lab:
                with lock:
                    labs.append(lab)
                release.wait(10)
                assert udp_arrives(lab)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    while len(labs) + len(errors) < 3 and any(t.is_alive() for t in threads):
        threading.Event().wait(0.05)
    release.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len({lab.netns for lab in labs}) == 3
    assert len({lab.host_if for lab in labs}) == 3
    assert len({lab.host_ip4 for lab in labs}) == 3
    assert len({lab.host_ip6 for lab in labs}) == 3
    assert not any(lab.netns in nl.netns_list() for lab in labs)


def test_cleanup_stale_removes_dead_owners_only() -> None:
    # A prefix of our own, so parallel runs of this module do not interfere.
    prefix = f"xs{os.getpid() % 100000}"
    dead_pid = 4194303  # the highest possible pid: practically never alive
    assert not os.path.exists(f"/proc/{dead_pid}")
    dead_ns = f"{prefix}-{dead_pid}-0"
    dead_veth = f"{prefix}{dead_pid:x}h0"
    nl.netns_create(dead_ns)
    try:
        nl.veth_create(dead_veth, "xfwtpeer", dead_ns)
        with veth_lab(prefix) as lab:
            removed = cleanup_stale(prefix)
            assert sorted(removed) == sorted([dead_ns, dead_veth])
            assert lab.netns in nl.netns_list()  # live owner (us): kept
            assert udp_arrives(lab)
        assert cleanup_stale(prefix) == []
    finally:
        nl.link_remove(dead_veth)
        nl.netns_remove(dead_ns)
    assert dead_ns not in nl.netns_list()
    assert dead_veth not in _link_names()
