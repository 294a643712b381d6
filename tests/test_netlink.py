"""Kernel tests for xdpfw.kernel.netlink: namespaces, veth labs, real UDP, XDP attach/detach.

Everything runs on interfaces and namespaces created here (prefix "xfwt"), with
addresses from 198.18.0.0/15 and 2001:db8::/32, and is removed afterwards.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from xdpfw.kernel import netlink as nl

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, veth, XDP)"),
]

PREFIX = "xfwt"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _link_names() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link").splitlines()}


def _thread_ns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers() -> Iterator[None]:
    nl.cleanup_stale(PREFIX)  # leftovers of dead test runs only; parallel runs are kept
    yield
    mine = f"{PREFIX}-{os.getpid()}-"
    leaked = [ns for ns in nl.netns_list() if ns.startswith(mine)]
    for ns in leaked:
        nl.netns_remove(ns)
    assert not leaked, f"namespaces leaked by this test module: {leaked}"


@pytest.fixture
def lab() -> Iterator[nl.VethLab]:
    with nl.veth_lab(PREFIX) as lab:
        yield lab


def _udp_arrives(lab: nl.VethLab, family: int = socket.AF_INET, timeout: float = 2.0) -> bool:
    """Send one datagram from the lab namespace to the root namespace."""
    host_ip, peer_ip = (
        (lab.host_ip4, lab.peer_ip4) if family == socket.AF_INET else (lab.host_ip6, lab.peer_ip6)
    )
    with (
        socket.socket(family, socket.SOCK_DGRAM) as rx,
        nl.socket_in_netns(lab.netns, family, socket.SOCK_DGRAM) as tx,
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


# --------------------------------------------------------------------------
# labs, namespaces, sockets
# --------------------------------------------------------------------------


def test_lab_udp_ipv4(lab: nl.VethLab) -> None:
    assert _udp_arrives(lab, socket.AF_INET)


def test_lab_udp_ipv6(lab: nl.VethLab) -> None:
    assert _udp_arrives(lab, socket.AF_INET6)


def test_lab_shape(lab: nl.VethLab) -> None:
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
    with nl.veth_lab(PREFIX) as lab:
        assert lab.netns in _ip("netns", "list").split()
        assert lab.host_if in _link_names()
    assert lab.netns not in _ip("netns", "list").split()
    assert lab.host_if not in _link_names()
    assert lab.netns not in nl.netns_list()


def test_lab_cleans_up_when_body_raises() -> None:
    seen: list[nl.VethLab] = []
    with pytest.raises(RuntimeError, match="boom"), nl.veth_lab(PREFIX) as lab:
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
    with pytest.raises(nl.NetlinkOpError, match="injected"), nl.veth_lab(PREFIX):
        pytest.fail("the body must not run")
    assert calls >= 1
    assert _my_lab_resources() == set()


def test_parallel_labs_get_distinct_names_and_subnets() -> None:
    labs: list[nl.VethLab] = []
    errors: list[BaseException] = []
    release = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        try:
            with nl.veth_lab(PREFIX) as lab:
                with lock:
                    labs.append(lab)
                release.wait(10)
                assert _udp_arrives(lab)
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


def test_missing_things_raise_clear_errors() -> None:
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.ifindex("xfwtnope0")
    assert ei.value.errno == errno.ENODEV
    assert ei.value.op == "ifindex"
    assert "xfwtnope0" in str(ei.value)

    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.xdp_state("xfwtnope0")
    assert ei.value.errno == errno.ENODEV

    before = _thread_ns()
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.ifindex("lo", netns="xfwt-no-such-ns")
    assert ei.value.errno == errno.ENOENT
    assert "xfwt-no-such-ns" not in nl.netns_list()  # not created as a side effect
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.socket_in_netns("xfwt-no-such-ns", socket.AF_INET, socket.SOCK_DGRAM)
    assert ei.value.errno == errno.ENOENT
    assert _thread_ns() == before

    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.ifindex("a/b")
    assert ei.value.errno == errno.EINVAL

    # removals of missing things are no-ops
    nl.link_remove("xfwtnope0")
    nl.link_remove("xfwtnope0", netns="xfwt-no-such-ns")
    nl.netns_remove("xfwt-no-such-ns")


def test_error_is_picklable() -> None:
    err = nl.NetlinkOpError(errno.EBUSY, "xdp_attach", "busy")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.errno, copy.op, str(copy)) == (err.errno, err.op, str(err))


def test_netns_create_remove_and_thread_restored() -> None:
    name = f"{PREFIX}-{os.getpid()}-manual"
    before = _thread_ns()
    nl.netns_create(name)
    try:
        assert name in nl.netns_list()
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.netns_create(name)
        assert ei.value.errno == errno.EEXIST
        sock = nl.socket_in_netns(name, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            assert _thread_ns() == before
            # only "lo" (down) exists in there: nothing routable
            with pytest.raises(OSError):
                sock.connect(("198.18.0.1", 9))
        assert nl.ifindex("lo", name) == 1
    finally:
        nl.netns_remove(name)
    assert name not in nl.netns_list()
    assert _thread_ns() == before


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
        with nl.veth_lab(prefix) as lab:
            removed = nl.cleanup_stale(prefix)
            assert sorted(removed) == sorted([dead_ns, dead_veth])
            assert lab.netns in nl.netns_list()  # live owner (us): kept
            assert _udp_arrives(lab)
        assert nl.cleanup_stale(prefix) == []
    finally:
        nl.link_remove(dead_veth)
        nl.netns_remove(dead_ns)
    assert dead_ns not in nl.netns_list()
    assert dead_veth not in _link_names()


# --------------------------------------------------------------------------
# XDP
# --------------------------------------------------------------------------


class Progs:
    def __init__(self, bpf_cls: Any) -> None:
        text = b"""
        int pass_a(struct xdp_md *c) { return XDP_PASS; }
        int pass_b(struct xdp_md *c) { return XDP_PASS; }
        int drop_all(struct xdp_md *c) { return XDP_DROP; }
        """
        self.bpf = bpf_cls(text=text)
        self.pass_a: int = self.bpf.load_func(b"pass_a", bpf_cls.XDP).fd
        self.pass_b: int = self.bpf.load_func(b"pass_b", bpf_cls.XDP).fd
        self.drop: int = self.bpf.load_func(b"drop_all", bpf_cls.XDP).fd


@pytest.fixture(scope="module")
def progs() -> Iterator[Progs]:
    os.environ.setdefault("BCC_KERNEL_SOURCE", "/tmp/kh/merged")
    bcc = pytest.importorskip("bcc")
    p = Progs(bcc.BPF)
    yield p
    p.bpf.cleanup()


def test_xdp_state_fresh_veth(lab: nl.VethLab) -> None:
    st = nl.xdp_state(lab.host_if)
    assert st == nl.XdpState(lab.host_if, nl.ifindex(lab.host_if), 0, "none")
    assert nl.xdp_state(lab.peer_if, lab.netns).prog_id == 0
    nl.xdp_detach(lab.host_if, "auto")  # nothing attached: no-op
    nl.xdp_detach(lab.host_if, "native", expected_prog_id=12345)


def test_xdp_auto_takes_native_on_veth(lab: nl.VethLab, progs: Progs) -> None:
    st = nl.xdp_attach(lab.host_if, progs.pass_a, "auto")
    try:
        assert st.mode == "native"
        assert st.prog_id != 0
        assert nl.xdp_state(lab.host_if) == st
        # Native XDP on the receiving veth, no program on the peer: traffic still flows.
        assert _udp_arrives(lab, socket.AF_INET)
        assert _udp_arrives(lab, socket.AF_INET6)

        # Another program without an expected fd: refused, naming the attached id.
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.pass_b, "auto")
        assert ei.value.errno == errno.EBUSY
        assert str(st.prog_id) in str(ei.value)
        # Generic while native is attached: also EBUSY, nothing changes.
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.pass_b, "generic")
        assert ei.value.errno == errno.EBUSY
        assert nl.xdp_state(lab.host_if) == st

        # Detach with the wrong expected id: EBUSY and still attached.
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_detach(lab.host_if, "native", expected_prog_id=st.prog_id + 1000)
        assert ei.value.errno == errno.EBUSY
        assert nl.xdp_state(lab.host_if) == st
        # Detach in the wrong mode: EBUSY, still attached.
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_detach(lab.host_if, "generic")
        assert ei.value.errno == errno.EBUSY
        assert nl.xdp_state(lab.host_if) == st

        # Atomic replace with the right expected fd.
        st2 = nl.xdp_attach(lab.host_if, progs.pass_b, "auto", expected_prog_fd=progs.pass_a)
        assert st2.mode == "native"
        assert st2.prog_id not in (0, st.prog_id)
        # Replace with a stale expected fd: EBUSY, nothing replaced.
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.drop, "native", expected_prog_fd=progs.pass_a)
        assert ei.value.errno == errno.EBUSY
        assert nl.xdp_state(lab.host_if) == st2

        # The program really sits on the receive path: XDP_DROP stops the datagram.
        nl.xdp_attach(lab.host_if, progs.drop, "native", expected_prog_fd=progs.pass_b)
        assert not _udp_arrives(lab, timeout=0.5)
        st3 = nl.xdp_attach(lab.host_if, progs.pass_a, "native", expected_prog_fd=progs.drop)
        assert _udp_arrives(lab)

        nl.xdp_detach(lab.host_if, "native", expected_prog_id=st3.prog_id)
        assert nl.xdp_state(lab.host_if).prog_id == 0
        assert nl.xdp_state(lab.host_if).mode == "none"
        nl.xdp_detach(lab.host_if, "native", expected_prog_id=st3.prog_id)  # no-op now
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.pass_a, "native", expected_prog_fd=progs.pass_b)
        assert ei.value.errno == errno.ENOENT
    finally:
        nl.xdp_detach(lab.host_if, "auto")


def test_xdp_generic(lab: nl.VethLab, progs: Progs) -> None:
    st = nl.xdp_attach(lab.host_if, progs.pass_a, "generic")
    try:
        assert st.mode == "generic"
        assert st.prog_id != 0
        assert _udp_arrives(lab)
        assert _udp_arrives(lab, socket.AF_INET6)
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.pass_b, "native")
        assert ei.value.errno == errno.EBUSY
        # auto replace keeps the mode in use
        st2 = nl.xdp_attach(lab.host_if, progs.drop, "auto", expected_prog_fd=progs.pass_a)
        assert st2.mode == "generic"
        assert not _udp_arrives(lab, timeout=0.5)
        nl.xdp_detach(lab.host_if, "auto", expected_prog_id=st2.prog_id)
        assert nl.xdp_state(lab.host_if).mode == "none"
        assert _udp_arrives(lab)
    finally:
        nl.xdp_detach(lab.host_if, "auto")


def test_xdp_in_namespace_and_auto_fallback(lab: nl.VethLab, progs: Progs) -> None:
    # The peer end, addressed through its namespace.
    st = nl.xdp_attach(lab.peer_if, progs.pass_a, "auto", netns=lab.netns)
    assert (st.mode, st.ifname) == ("native", lab.peer_if)
    assert nl.xdp_state(lab.host_if).prog_id == 0
    assert _udp_arrives(lab)
    nl.xdp_detach(lab.peer_if, "native", netns=lab.netns, expected_prog_id=st.prog_id)
    assert nl.xdp_state(lab.peer_if, lab.netns).prog_id == 0

    # ifb has no native XDP: "native" is refused, "auto" falls back to generic.
    _ip("-n", lab.netns, "link", "add", "xfwtifb", "type", "ifb")
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.xdp_attach("xfwtifb", progs.pass_a, "native", netns=lab.netns)
    assert ei.value.errno == errno.EOPNOTSUPP
    st = nl.xdp_attach("xfwtifb", progs.pass_a, "auto", netns=lab.netns)
    assert st.mode == "generic" and st.prog_id != 0
    nl.xdp_detach("xfwtifb", "auto", netns=lab.netns)
    assert nl.xdp_state("xfwtifb", lab.netns).prog_id == 0


def test_xdp_attach_rejects_bad_input(lab: nl.VethLab) -> None:
    with pytest.raises(ValueError):
        nl.xdp_attach(lab.host_if, 0, "offload")
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.xdp_attach(lab.host_if, 999_999, "native")
    assert ei.value.errno == errno.EBADF
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.xdp_attach("xfwtnope0", 999_999, "auto")
    assert ei.value.errno == errno.ENODEV
    assert nl.xdp_state(lab.host_if).prog_id == 0
