"""Self-healing (e2e): pins lost under a running program, attachments lost behind our back.

The real `xdpfw serve` on a veth lab with a drop rule for the lab's peer and real traffic:
the pins removed (`rm -rf`) and the service restarted adopt the running program with no
blocked packet passing; `xdpfw detach --cleanup` finds a program whose pins are gone; an
`xdp off`, or the interface deleted and created again, is repaired within 2 s and counted;
a program xdpfw did not attach is never replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_CAPS, unique_pin_dir
from tests.server import XDPFW, Server, running_server
from tests.traffic import udp_roundtrip
from xdpfw.kernel import bpfsys, netlink
from xdpfw.lab import VethLab, veth_lab

REPAIR_S = 2.0  # the promise: a lost attachment is back within this


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, unique_pin_dir("heal")) as srv:
        yield srv


@pytest.fixture(scope="module")
def healing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the watchdog tests (each leaves it attached and dropping the peer)."""
    with running_server(tmp_path_factory.mktemp("heal"), unique_pin_dir("watch")) as srv:
        yield srv


def _foreign_prog() -> int:
    """A tiny XDP_PASS program that is not xdpfw's (its fd)."""
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 2) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    return bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, insns, "not_xdpfw")


def _drop_peer(srv: Server) -> tuple[int, int]:
    """(prog id, rule id) after a drop rule for the lab's peer, checked with packets."""
    with srv.client() as c:
        prog_id = int(c.get("/healthz").json()["prog_id"])
        rid = int(c.post("/v1/rules", json={"src": srv.lab.peer_ip4}).json()["id"])
    assert udp_roundtrip(srv.lab, count=5) == 0
    return prog_id, rid


class Sender:
    """Datagrams from the blocked peer, all the time; `passed` counts those that got in."""

    def __init__(self, lab: VethLab) -> None:
        self.lab = lab
        self.rounds = 0
        self.passed = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.passed += udp_roundtrip(self.lab, count=5, settle=0.02)
                self.rounds += 1
            except netlink.NetlinkOpError:  # the lab is being rebuilt
                time.sleep(0.01)
            except OSError:
                time.sleep(0.01)

    def __enter__(self) -> Sender:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _wait_attached(ifname: str, prog_id: int, timeout: float) -> float:
    """Seconds until prog_id runs on ifname (netlink state); fails after timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if netlink.xdp_state(ifname).prog_id == prog_id:
                return time.monotonic() - t0
        except netlink.NetlinkOpError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"program {prog_id} not back on {ifname} within {timeout} s")


def _reattach_metric(srv: Server) -> int:
    with srv.client() as c:
        text = c.get("/metrics").text
    m = re.search(rf'^xdpfw_reattach_total{{interface="{srv.lab.host_if}"}} (\S+)$', text, re.M)
    assert m, text[-2000:]
    return int(float(m.group(1)))


# -- pins lost ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_pins_removed_then_restart_adopts_the_running_program_without_gap(
    server: Server,
) -> None:
    """rm -rf of the pin dir under a running service, then a restart: the program is
    recognised (name + xdpfw_config), re-pinned and adopted: same program, same rules,
    counters kept, and a sender running across it all never gets a blocked packet in."""
    lab = server.lab
    prog_id, rid = _drop_peer(server)
    with server.client() as c:
        rules_before = c.get("/v1/rules").json()["rules"]
    with Sender(lab) as sender:
        time.sleep(0.2)
        shutil.rmtree(server.bpffs_dir)
        assert not server.bpffs_dir.exists()
        time.sleep(0.2)
        server.stop()
        server.start()
        with server.client() as c:
            health = c.get("/healthz")
        time.sleep(0.3)
    assert sender.rounds > 3
    assert sender.passed == 0, f"{sender.passed} blocked packets passed"
    assert health.status_code == 200, health.text
    assert health.json()["prog_id"] == prog_id and health.json()["adopted"]
    assert "re-pinned and adopted" in server.output()
    assert (server.bpffs_dir / "prog").exists()
    with server.client() as c:
        assert c.get("/v1/rules").json()["rules"] == rules_before
        counted = c.get(f"/v1/rules/{rid}").json()["counters"]["packets"]
    assert counted >= 5 + 5 * sender.rounds  # the counters were the running program's
    assert netlink.xdp_state(lab.host_if).prog_id == prog_id
    assert udp_roundtrip(lab, count=5) == 0


@pytest.mark.e2e
def test_detach_cleanup_finds_the_program_whose_pins_are_gone(server: Server) -> None:
    """With the pins removed, `detach --cleanup` finds xdpfw's program on the interfaces the
    database names (or those given) and detaches it; another instance's pinned program and
    a foreign program are left alone."""
    lab = server.lab
    prog_id, _ = _drop_peer(server)
    server.stop()
    shutil.rmtree(server.bpffs_dir)
    other_dir = unique_pin_dir("heal-other")
    from xdpfw.datapath import Datapath, DatapathConfig

    foreign = _foreign_prog()
    with (
        veth_lab(prefix="xfw") as lab2,
        veth_lab(prefix="xfw") as lab3,
        Datapath.open(DatapathConfig(bpffs_dir=other_dir, caps=TEST_CAPS)) as other,
    ):
        other.attach(lab2.host_if)
        netlink.xdp_attach(lab3.host_if, foreign, "generic")
        foreign_id = bpfsys.prog_info(foreign).id
        try:
            r = subprocess.run(
                [XDPFW, "detach", "--cleanup", "--bpffs-dir", str(server.bpffs_dir),
                 lab2.host_if, lab3.host_if],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "detached from no interface" in r.stdout
            assert netlink.xdp_state(lab.host_if).prog_id == prog_id  # not asked for
            assert netlink.xdp_state(lab2.host_if).prog_id == other.prog_id
            assert netlink.xdp_state(lab3.host_if).prog_id == foreign_id

            r = subprocess.run(
                [XDPFW, "detach", "--cleanup", "--bpffs-dir", str(server.bpffs_dir),
                 "--state-dir", str(server.state_dir)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert f"{lab.host_if} (program id {prog_id}" in r.stdout
            assert netlink.xdp_state(lab.host_if).prog_id == 0
            assert udp_roundtrip(lab, count=5) == 5
            assert netlink.xdp_state(lab2.host_if).prog_id == other.prog_id
            assert netlink.xdp_state(lab3.host_if).prog_id == foreign_id
        finally:
            netlink.xdp_detach(lab3.host_if, "auto", expected_prog_fd=foreign)
            os.close(foreign)


# -- attachments repaired -------------------------------------------------------------------


@pytest.mark.e2e
def test_xdp_off_behind_our_back_is_repaired_within_2s_and_counted(healing: Server) -> None:
    server = healing
    lab = server.lab
    prog_id, _ = _drop_peer(server)
    before = _reattach_metric(server)
    netlink.xdp_detach(lab.host_if, "auto")  # what `ip link set dev X xdp off` does
    took = _wait_attached(lab.host_if, prog_id, REPAIR_S)
    assert udp_roundtrip(lab, count=10) == 0
    assert _reattach_metric(server) == before + 1
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/livez").json() == {"status": "alive"}
    assert f"re-attached to {lab.host_if}" in server.output()
    print(f"re-attached after xdp off in {took * 1000:.0f} ms")


@pytest.mark.e2e
def test_interface_deleted_and_created_again_is_reattached_within_2s(healing: Server) -> None:
    server = healing
    lab = server.lab
    prog_id, _ = _drop_peer(server)
    before = _reattach_metric(server)
    netlink.link_remove(lab.host_if)  # the peer in the namespace goes with it
    with server.client() as c:
        time.sleep(0.3)
        assert c.get("/healthz").status_code == 503
    _recreate(lab)
    took = _wait_attached(lab.host_if, prog_id, REPAIR_S)
    assert udp_roundtrip(lab, count=10) == 0
    assert _reattach_metric(server) == before + 1
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
    print(f"re-attached {took * 1000:.0f} ms after the new interface was configured")


@pytest.mark.e2e
def test_a_foreign_program_put_there_is_never_replaced(healing: Server) -> None:
    server = healing
    lab = server.lab
    _drop_peer(server)
    before = _reattach_metric(server)
    log_from = len(server.output())
    foreign = _foreign_prog()
    foreign_id = bpfsys.prog_info(foreign).id
    try:
        # Swapped atomically, so the watchdog cannot slip in between.
        ours = netlink.xdp_state(lab.host_if)
        fd = bpfsys.prog_get_fd_by_id(ours.prog_id)
        try:
            netlink.xdp_attach(lab.host_if, foreign, "auto", expected_prog_fd=fd)
        finally:
            os.close(fd)
        time.sleep(2 * REPAIR_S)
        assert netlink.xdp_state(lab.host_if).prog_id == foreign_id
        with server.client() as c:
            r = c.get("/healthz")
        assert r.status_code == 503
        assert _reattach_metric(server) == before
        out = server.output()[log_from:]
        assert f"{lab.host_if} is not filtered" in out and f"program id {foreign_id}" in out
        assert out.count(f"{lab.host_if} is not filtered") == 1  # said once, not every second
    finally:
        netlink.xdp_detach(lab.host_if, "auto", expected_prog_fd=foreign)
        os.close(foreign)
    # Gone again: now it is ours to repair.
    _wait_attached(lab.host_if, int(r.json()["prog_id"]), REPAIR_S)


def _recreate(lab: VethLab) -> None:
    """The lab's veth pair again, same names and addresses (new MACs)."""
    netlink.veth_create(lab.host_if, lab.peer_if, lab.netns, up=False)
    netlink.disable_ipv6_noise(lab.host_if)
    netlink.disable_ipv6_noise(lab.peer_if, lab.netns)
    netlink.addr_add(lab.host_if, f"{lab.host_ip4}/24")
    netlink.addr_add(lab.host_if, f"{lab.host_ip6}/64")
    netlink.addr_add(lab.peer_if, f"{lab.peer_ip4}/24", lab.netns)
    netlink.addr_add(lab.peer_if, f"{lab.peer_ip6}/64", lab.netns)
    netlink.link_up(lab.host_if)
    netlink.link_up(lab.peer_if, lab.netns)
    host_mac = netlink.link_mac(lab.host_if)
    peer_mac = netlink.link_mac(lab.peer_if, lab.netns)
    netlink.neigh_add(lab.host_if, lab.peer_ip4, peer_mac)
    netlink.neigh_add(lab.host_if, lab.peer_ip6, peer_mac)
    netlink.neigh_add(lab.peer_if, lab.host_ip4, host_mac, lab.netns)
    netlink.neigh_add(lab.peer_if, lab.host_ip6, host_mac, lab.netns)


@pytest.mark.pure
def test_livez_says_when_the_watchdog_stopped(tmp_path: Path) -> None:
    """/livez (the liveness probe): 200 while the watchdog runs rounds, 503 once it has not
    run for LIVE_WITHIN_S; no token needed."""
    from api.routes.health import LIVE_WITHIN_S
    from tests.test_api_pure import _api

    a = _api(tmp_path / "rules.sqlite3")
    try:
        assert a.anon.get("/livez").json() == {"status": "alive"}  # no watchdog: nothing to say
        a.svc.watchdog_beat()
        assert a.anon.get("/livez").status_code == 200
        a.svc._watchdog_seen = time.monotonic() - LIVE_WITHIN_S - 1
        r = a.anon.get("/livez")
        assert r.status_code == 503 and "watchdog last ran" in r.json()["detail"]
    finally:
        a.store.close()


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_without_cap_sys_admin_lost_pins_are_refused_clearly(server: Server) -> None:
    """The container's capabilities (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) cannot open a
    program by id, so a running program with no pins cannot be told from a foreign one: the
    start refuses, says what happened and how to recover, and changes nothing."""
    lab = server.lab
    prog_id, _ = _drop_peer(server)
    server.stop()
    shutil.rmtree(server.bpffs_dir)
    spec = "-all,+bpf,+net_admin,+perfmon"
    proc = subprocess.run(
        ["setpriv", "--reuid=0", f"--inh-caps={spec}", f"--bounding-set={spec}", "--",
         *server.argv()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert f"interface {lab.host_if} runs XDP program id {prog_id}" in err
    assert "needs CAP_SYS_ADMIN" in err and "nothing was changed" in err
    assert f"bpftool prog show id {prog_id}" in err and f"ip link set dev {lab.host_if}" in err
    assert "Traceback" not in err
    assert netlink.xdp_state(lab.host_if).prog_id == prog_id
    assert not (server.bpffs_dir / "prog").exists()  # no second program loaded
    assert udp_roundtrip(lab, count=5) == 0
    # The way out it names: once with CAP_SYS_ADMIN (here: root) re-pins and adopts.
    server.start()
    with server.client() as c:
        assert c.get("/healthz").json()["prog_id"] == prog_id
