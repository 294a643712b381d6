"""Flood defences with real packets on a veth lab (issue 16's "done when").

* a source sending at 10x its per-source limit gets the limit (plus the burst) through,
  within 10%, while a second source of the same rule, under its own limit, loses nothing;
* a ban drops the source outright and ends on time (within 0.3 s of ban_seconds);
* a SYN flood from one source, limited by a `tcp_flags: syn` rule on the port, does not stop
  another source from connecting to a real listening socket.

Datagrams are counted where they arrive (a UDP socket in the root namespace, by source
address); the rule's passed/limited counters must agree with what arrived.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.traffic import no_leaked_labs, send_raw
from xdpfw.datapath import Datapath
from xdpfw.kernel import netlink
from xdpfw.lab import VethLab, veth_lab
from xdpfw.rules import Limit, RuleSpec
from xdpfw.verify.frames import build_frame

pytestmark = pytest.mark.kernel

PORT = 9977


@pytest.fixture(scope="module", autouse=True)
def _no_leaks() -> Iterator[None]:
    with no_leaked_labs("xfwf"):
        yield


@pytest.fixture
def lab(dp: Datapath) -> Iterator[tuple[Datapath, VethLab, str]]:
    """dp attached to a fresh lab whose namespace has a second source address."""
    with veth_lab(prefix="xfwf") as lab:
        second = lab.peer_ip4.rsplit(".", 1)[0] + ".3"
        netlink.addr_add(lab.peer_if, f"{second}/24", lab.netns)
        netlink.neigh_add(lab.host_if, second, netlink.link_mac(lab.peer_if, lab.netns))
        dp.attach(lab.host_if)
        try:
            yield dp, lab, second
        finally:
            dp.detach(lab.host_if)


@contextlib.contextmanager
def receiver(lab: VethLab, port: int = PORT) -> Iterator[socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind((lab.host_ip4, port))
        rx.setblocking(False)
        yield rx
    finally:
        rx.close()


def drain(rx: socket.socket, got: Counter[str], settle: float = 0.3) -> None:
    """Count what has arrived, by source; wait up to `settle` s for stragglers."""
    deadline = time.monotonic() + settle
    while True:
        try:
            _, (src, _port) = rx.recvfrom(2048)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)
            continue
        got[src] += 1


def sender(lab: VethLab, src: str) -> socket.socket:
    tx = netlink.socket_in_netns(lab.netns, socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((src, 0))
    return tx


def test_a_source_at_10x_its_limit_gets_the_limit_and_another_source_nothing_less(
    lab: tuple[Datapath, VethLab, str],
) -> None:
    dp, lab_, second = lab
    pps, burst = 200, 20
    net = lab_.peer_ip4.rsplit(".", 1)[0] + ".0/24"
    dp.add_rules([RuleSpec.parse(action="limit", src=net, proto="udp", dport=PORT,
                                 limit=Limit.parse(pps=pps, burst=burst)).with_id(1)])
    got: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    with receiver(lab_) as rx, sender(lab_, lab_.peer_ip4) as a, sender(lab_, second) as b:
        duration, rate_a, rate_b = 1.5, 10 * pps, pps // 2
        start = time.monotonic()
        first = last = start
        i = 0
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            # source A at 10x its limit, source B at half of its own
            due_a = int((now - start) * rate_a) + 1
            while sent["a"] < due_a:
                a.sendto(b"a", (lab_.host_ip4, PORT))
                sent["a"] += 1
                last = time.monotonic()
            if sent["b"] < int((now - start) * rate_b) + 1:
                b.sendto(b"b", (lab_.host_ip4, PORT))
                sent["b"] += 1
            i += 1
            if i % 64 == 0:
                drain(rx, got, settle=0)
            time.sleep(0.0002)
        drain(rx, got)
    span = last - first
    expected = burst + pps * span  # GCRA: the burst at once, then one packet per 1/pps
    passed_a = got[lab_.peer_ip4]
    assert sent["a"] >= 9 * pps * span, f"the sender managed only {sent['a']} in {span:.2f} s"
    assert abs(passed_a - expected) <= 0.1 * expected, (passed_a, expected, sent)
    assert got[second] == sent["b"], "the second source, under its limit, lost packets"
    c = dp.limit_counters([1])[1]
    assert c.passed == passed_a + sent["b"]
    assert c.limited == sent["a"] - passed_a
    assert c.banned == 0


def test_a_ban_drops_outright_and_ends_on_time(lab: tuple[Datapath, VethLab, str]) -> None:
    dp, lab_, second = lab
    ban = 2
    net = lab_.peer_ip4.rsplit(".", 1)[0] + ".0/24"
    dp.add_rules([RuleSpec.parse(action="limit", src=net, proto="udp", dport=PORT,
                                 limit=Limit.parse(pps=50, burst=5, ban_seconds=ban)).with_id(1)])
    got: Counter[str] = Counter()
    with receiver(lab_) as rx, sender(lab_, lab_.peer_ip4) as a, sender(lab_, second) as b:
        for _ in range(40):
            a.sendto(b"x", (lab_.host_ip4, PORT))
        drain(rx, got, settle=0.1)
        assert got[lab_.peer_ip4] == 5
        [ban_] = dp.bans()
        assert ban_.source == lab_.peer_ip4 and ban_.rule_id == 1
        ends = time.monotonic() + ban_.expires_in
        assert ban - 0.5 < ban_.expires_in <= ban
        # the other source is not banned
        b.sendto(b"y", (lab_.host_ip4, PORT))
        # during the ban, slow traffic (well under the rate) is still dropped
        while time.monotonic() < ends - 0.3:
            a.sendto(b"z", (lab_.host_ip4, PORT))
            time.sleep(0.1)
        drain(rx, got, settle=0.1)
        assert got[lab_.peer_ip4] == 5 and got[second] == 1
        # probe every 20 ms: the first datagram through is within 0.3 s after the ban's end
        while True:
            a.sendto(b"p", (lab_.host_ip4, PORT))
            time.sleep(0.02)
            drain(rx, got, settle=0)
            if got[lab_.peer_ip4] > 5:
                through = time.monotonic()
                break
            assert time.monotonic() < ends + 1.0, "the ban did not end"
    assert ends - 0.05 <= through <= ends + 0.3, (through - ends)
    assert dp.bans() == []
    c = dp.limit_counters([1])[1]
    assert c.limited == 1 and c.banned >= 35


def test_a_syn_flood_is_limited_and_another_source_still_connects(
    lab: tuple[Datapath, VethLab, str],
) -> None:
    dp, lab_, second = lab
    dp.add_rules([RuleSpec.parse(action="limit", proto="tcp", dport=PORT, tcp_flags="syn",
                                 limit=Limit.parse(pps=20, burst=10)).with_id(1)])
    host_mac = netlink.link_mac(lab_.host_if)
    peer_mac = netlink.link_mac(lab_.peer_if, lab_.netns)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((lab_.host_ip4, PORT))
        srv.listen(64)
        # 2000 SYNs from the first address, each from another port
        flood = [
            build_frame(src=lab_.peer_ip4, dst=lab_.host_ip4, proto="tcp", sport=20000 + i,
                        dport=PORT, eth_src=peer_mac, eth_dst=host_mac)
            for i in range(2000)
        ]
        send_raw(lab_, flood)
        c = dp.limit_counters([1])[1]
        assert c.passed <= 10 + 20 * 2 and c.limited >= 2000 - c.passed - 5
        # the second address connects (its SYN has a budget of its own), and data flows
        cli = netlink.socket_in_netns(lab_.netns, socket.AF_INET, socket.SOCK_STREAM)
        with cli:
            cli.bind((second, 0))
            cli.settimeout(3)
            cli.connect((lab_.host_ip4, PORT))
            srv.settimeout(3)
            conn, (who, _) = srv.accept()
            with conn:
                assert who == second
                cli.sendall(b"hello" * 100)  # ACK segments: not matched by the SYN rule
                data = b""
                while len(data) < 500:
                    data += conn.recv(4096)
    after = dp.limit_counters([1])[1]
    assert after.passed >= c.passed + 1
