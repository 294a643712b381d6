"""Kernel tests for xdpfw.kernel.netlink: namespaces, sockets, errors, XDP attach/detach.

Everything runs on interfaces and namespaces created here (prefix "xfwt", labs of
xdpfw.lab, whose own tests are in test_lab.py), with addresses from 198.18.0.0/15 and
2001:db8::/32, and is removed afterwards.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.traffic import no_leaked_labs, udp_arrives
from xdpfw.kernel import netlink as nl
from xdpfw.kernel.kheaders import ensure_kernel_headers
from xdpfw.lab import VethLab, veth_lab

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, veth, XDP)"),
]

PREFIX = "xfwt"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _thread_ns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers() -> Iterator[None]:
    with no_leaked_labs(PREFIX):
        yield


@pytest.fixture
def lab() -> Iterator[VethLab]:
    with veth_lab(PREFIX) as lab:
        yield lab


# --------------------------------------------------------------------------
# namespaces, sockets, errors
# --------------------------------------------------------------------------


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
    ensure_kernel_headers()  # as xdpfw.kernel.loader does before bcc compiles anything
    bcc = pytest.importorskip("bcc")
    p = Progs(bcc.BPF)
    yield p
    p.bpf.cleanup()


def test_xdp_state_fresh_veth(lab: VethLab) -> None:
    st = nl.xdp_state(lab.host_if)
    assert st == nl.XdpState(lab.host_if, nl.ifindex(lab.host_if), 0, "none")
    assert nl.xdp_state(lab.peer_if, lab.netns).prog_id == 0
    nl.xdp_detach(lab.host_if, "auto")  # nothing attached: no-op
    nl.xdp_detach(lab.host_if, "native", expected_prog_id=12345)


def test_xdp_auto_takes_native_on_veth(lab: VethLab, progs: Progs) -> None:
    st = nl.xdp_attach(lab.host_if, progs.pass_a, "auto")
    try:
        assert st.mode == "native"
        assert st.prog_id != 0
        assert nl.xdp_state(lab.host_if) == st
        # Native XDP on the receiving veth, no program on the peer: traffic still flows.
        assert udp_arrives(lab, socket.AF_INET)
        assert udp_arrives(lab, socket.AF_INET6)

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
        assert not udp_arrives(lab, timeout=0.5)
        st3 = nl.xdp_attach(lab.host_if, progs.pass_a, "native", expected_prog_fd=progs.drop)
        assert udp_arrives(lab)

        nl.xdp_detach(lab.host_if, "native", expected_prog_id=st3.prog_id)
        assert nl.xdp_state(lab.host_if).prog_id == 0
        assert nl.xdp_state(lab.host_if).mode == "none"
        nl.xdp_detach(lab.host_if, "native", expected_prog_id=st3.prog_id)  # no-op now
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.pass_a, "native", expected_prog_fd=progs.pass_b)
        assert ei.value.errno == errno.ENOENT
    finally:
        nl.xdp_detach(lab.host_if, "auto")


def test_xdp_generic(lab: VethLab, progs: Progs) -> None:
    st = nl.xdp_attach(lab.host_if, progs.pass_a, "generic")
    try:
        assert st.mode == "generic"
        assert st.prog_id != 0
        assert udp_arrives(lab)
        assert udp_arrives(lab, socket.AF_INET6)
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_attach(lab.host_if, progs.pass_b, "native")
        assert ei.value.errno == errno.EBUSY
        # auto replace keeps the mode in use
        st2 = nl.xdp_attach(lab.host_if, progs.drop, "auto", expected_prog_fd=progs.pass_a)
        assert st2.mode == "generic"
        assert not udp_arrives(lab, timeout=0.5)
        nl.xdp_detach(lab.host_if, "auto", expected_prog_id=st2.prog_id)
        assert nl.xdp_state(lab.host_if).mode == "none"
        assert udp_arrives(lab)
    finally:
        nl.xdp_detach(lab.host_if, "auto")


def test_xdp_in_namespace_and_auto_fallback(lab: VethLab, progs: Progs) -> None:
    # The peer end, addressed through its namespace.
    st = nl.xdp_attach(lab.peer_if, progs.pass_a, "auto", netns=lab.netns)
    assert (st.mode, st.ifname) == ("native", lab.peer_if)
    assert nl.xdp_state(lab.host_if).prog_id == 0
    assert udp_arrives(lab)
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


def test_xdp_attach_rejects_bad_input(lab: VethLab) -> None:
    with pytest.raises(ValueError):
        nl.xdp_attach(lab.host_if, 0, "offload")
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.xdp_attach(lab.host_if, 999_999, "native")
    assert ei.value.errno == errno.EBADF
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl.xdp_attach("xfwtnope0", 999_999, "auto")
    assert ei.value.errno == errno.ENODEV
    assert nl.xdp_state(lab.host_if).prog_id == 0


def test_expected_fd_of_a_missing_program_raises() -> None:
    # The atomic detach's fd lookup: never None, never a silent plain detach.
    missing = 0xFFFFFFF0  # no program has this id
    with pytest.raises(nl.NetlinkOpError) as ei:
        nl._expected_fd(missing, "xfwtnope0", None, "xdp_detach")
    assert ei.value.errno == errno.ENOENT
    assert ei.value.op == "xdp_detach"
    assert str(missing) in str(ei.value) and "ENOENT" in str(ei.value)
    assert "nothing was detached" in str(ei.value)


def test_xdp_detach_never_drops_the_replace_flag(
    lab: VethLab, progs: Progs, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = nl.xdp_attach(lab.host_if, progs.pass_a, "native")
    try:

        def vanished(prog_id: int) -> int:
            raise nl.bpfsys.BpfError(errno.ENOENT, op="BPF_PROG_GET_FD_BY_ID")

        # The program's fd cannot be had (as if it were unloaded between the state read
        # and the detach): the detach refuses, naming the id and errno, and touches nothing.
        with monkeypatch.context() as m:
            m.setattr(nl.bpfsys, "prog_get_fd_by_id", vanished)
            with pytest.raises(nl.NetlinkOpError) as ei:
                nl.xdp_detach(lab.host_if, "native", expected_prog_id=st.prog_id)
        assert ei.value.errno == errno.ENOENT
        assert f"XDP program id {st.prog_id}" in str(ei.value)
        assert nl.xdp_state(lab.host_if) == st

        # With the fd in hand no lookup is needed, and the id is checked from the fd.
        with pytest.raises(ValueError):
            nl.xdp_detach(
                lab.host_if, "native", expected_prog_id=st.prog_id + 1,
                expected_prog_fd=progs.pass_a,
            )
        with pytest.raises(nl.NetlinkOpError) as ei:
            nl.xdp_detach(lab.host_if, "native", expected_prog_fd=progs.pass_b)
        assert ei.value.errno == errno.EBUSY
        assert nl.xdp_state(lab.host_if) == st
        nl.xdp_detach(lab.host_if, "native", expected_prog_fd=progs.pass_a)
        assert nl.xdp_state(lab.host_if).prog_id == 0
    finally:
        nl.xdp_detach(lab.host_if, "auto")


_CHILD_WITHOUT_SYS_ADMIN = r"""
import struct, sys
from xdpfw.kernel import bpfsys, netlink as nl

ifname = sys.argv[1]
insns = struct.pack("<BBhi", 0xB7, 0, 0, 2) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # XDP_PASS
fd = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, insns, "xfwt_pass")
st = nl.xdp_attach(ifname, fd, "native")
try:
    nl.xdp_detach(ifname, "native", expected_prog_id=st.prog_id)
    print("detached by id")
except nl.NetlinkOpError as exc:
    print("refused", exc.errno, f"id {st.prog_id}" in str(exc))
print("still attached", nl.xdp_state(ifname).prog_id == st.prog_id)
nl.xdp_detach(ifname, "native", expected_prog_fd=fd)
print("after", nl.xdp_state(ifname).prog_id)
"""


def test_xdp_detach_without_cap_sys_admin(lab: VethLab) -> None:
    # What the container has (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): BPF_PROG_GET_FD_BY_ID
    # wants CAP_SYS_ADMIN, so a detach by id is refused (EPERM, nothing detached) while a
    # detach with the program's fd, as Datapath does it, works and stays atomic.
    try:
        argv = ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c"]
        proc = subprocess.run(
            [*argv, _CHILD_WITHOUT_SYS_ADMIN, lab.host_if],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            f"refused {errno.EPERM} True",
            "still attached True",
            "after 0",
        ]
    finally:
        nl.xdp_detach(lab.host_if, "auto")
