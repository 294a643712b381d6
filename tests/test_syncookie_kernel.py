"""SYN cookies answered in XDP (issue 16, the prototype bench/progs/syncookie.c) on real packets.

The lab (bench.syncookie.cookie_lab): a client namespace and a server namespace joined by a
veth pair; the server has net.ipv4.tcp_syncookies=2, real listening sockets on 198.18.x and
2001:db8::, and the prototype attached natively on its veth.

* A real connect() + data round trip completes on a cookie XDP sent: the program counts the
  answer, the stack's TcpExtSyncookiesSent does not move while its TcpExtSyncookiesRecv
  does (the stack validated our cookie), and the SYN-ACK the client received carries only
  the MSS option (the stack's own cookie SYN-ACK to Linux carries timestamps and window
  scaling). IPv4 and IPv6.
* With net.ipv4.tcp_timestamps=2 (the lab sets it) and the listener's window scale, the
  timestamp variant keeps window scaling and SACK: both ends agree on them and 4 MiB cross
  intact.
* The control that makes the design's condition visible: a listener the stack never put in
  cookie mode (no SYN let through) rejects the same kind of XDP cookie, and the client's
  connection is reset.
* A flood of spoofed SYNs from thousands of 198.18.0.0/15 (or 2001:db8::/32) sources is
  answered by XDP (the SYN-ACKs come back to the client's veth, checksums valid), the stack
  answers exactly the SYNs let through (one per second), no request socket is created, and
  a real client connects during the flood. (With tcp_syncookies=2 the stack itself never
  queues a request socket either; what XDP saves it is the work per SYN, visible in
  TcpExtSyncookiesSent.) IPv4 and IPv6.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Iterator

import pytest

from bench import syncookie as sc
from tests.traffic import no_leaked_labs

pytestmark = pytest.mark.kernel

PREFIX = "xfwc"
_ports = itertools.count(9301)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[sc.CookieProg, sc.CookieLab]]:
    with no_leaked_labs(PREFIX), sc.CookieProg() as prog, sc.cookie_lab(prog, PREFIX) as lab:
        yield prog, lab


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def connect_once(
    prog: sc.CookieProg, lab: sc.CookieLab, port: int, family: int
) -> tuple[bytes | BaseException, dict[str, int], dict[str, int], list[sc.Synack]]:
    """One client connection + round trip; (what came back or the error, program counter
    deltas, stack counter deltas, SYN-ACKs the client saw)."""
    n0, s0 = sc.netstat(lab.srv_ns), prog.stats()
    payload = b"through an XDP cookie %d" % port
    got: bytes | BaseException
    with sc.capture(lab) as cap:
        try:
            got = sc.roundtrip(lab, port, payload, family, timeout=2.0)
        except OSError as exc:
            got = exc
        synacks = sc.drain_synacks(cap, settle=0.1)
    return got, delta(prog.stats(), s0), delta(sc.netstat(lab.srv_ns), n0), synacks


@pytest.mark.parametrize("family", [4, 6])
def test_connect_completes_on_an_xdp_cookie(
    lab: tuple[sc.CookieProg, sc.CookieLab], family: int
) -> None:
    prog, lab_ = lab
    port = next(_ports)
    addr = lab_.srv_ip4 if family == 4 else lab_.srv_ip6
    cookie = "cookie4" if family == 4 else "cookie6"
    with sc.echo_server(lab_, port, family):
        prog.protect(addr, port, 60.0)
        # The first SYN goes to the stack, which answers with its own cookie (timestamps,
        # window scaling) and so enters cookie mode for two minutes.
        got, prog_d, stack_d, synacks = connect_once(prog, lab_, port, family)
        assert got == b"through an XDP cookie %d" % port
        assert prog_d.get("let_through") == 1 and cookie not in prog_d
        assert stack_d.get("TcpExtSyncookiesSent") == 1
        assert len(synacks) == 1 and len(synacks[0].options) > 4
        # The next one is answered by XDP; the stack only checks the cookie.
        got, prog_d, stack_d, synacks = connect_once(prog, lab_, port, family)
        assert got == b"through an XDP cookie %d" % port
        assert prog_d.get(cookie) == 1 and "let_through" not in prog_d
        assert "TcpExtSyncookiesSent" not in stack_d
        assert stack_d.get("TcpExtSyncookiesRecv") == 1
        assert "TcpExtSyncookiesFailed" not in stack_d
        assert len(synacks) == 1
        sa = synacks[0]
        assert sa.checksums_ok and sa.src == addr and sa.sport == port
        assert sa.options == bytes([2, 4]) + sa.mss.to_bytes(2, "big")  # type: ignore[union-attr]
        assert sa.window == 65535 - 65535 % (sa.mss or 1)
        assert sa.eth_src == lab_.srv_mac and sa.eth_dst == lab_.cli_mac
        prog.unprotect(addr, port)


@pytest.mark.parametrize("family", [4, 6])
def test_timestamp_cookies_keep_window_scaling_and_sack(
    lab: tuple[sc.CookieProg, sc.CookieLab], family: int
) -> None:
    """With tcp_timestamps=2 and the listener's window scale (learnt here from the stack's
    own SYN-ACK), XDP encodes SACK and the client's window scale in TSval, as the stack
    does: the connection the stack builds from the cookie has timestamps, SACK and window
    scaling on both ends, with matching scales, and carries 4 MiB intact."""
    prog, lab_ = lab
    port = next(_ports)
    addr = lab_.srv_ip4 if family == 4 else lab_.srv_ip6
    payload = os.urandom(4 << 20)
    digest = hashlib.sha256(payload).digest()
    with sc.echo_server(lab_, port, family, sink=True) as srv:
        prog.protect(addr, port, 60.0)
        with sc.capture(lab_) as cap:  # let through: the stack's answer shows its scale
            assert sc.bulk(lab_, port, b"x", family)[0] == hashlib.sha256(b"x").digest()
            stack_synacks = sc.drain_synacks(cap, settle=0.1)
        assert len(stack_synacks) == 1 and stack_synacks[0].wscale is not None
        wscale = stack_synacks[0].wscale
        prog.protect(addr, port, 60.0, let_first=False, wscale=wscale)
        s0 = prog.stats()
        with sc.capture(lab_) as cap:
            got, client = sc.bulk(lab_, port, payload, family)
            synacks = [a for a in sc.drain_synacks(cap, settle=0.1) if a.dport != port]
        prog.unprotect(addr, port)
    cookie = "cookie4" if family == 4 else "cookie6"
    assert prog.stats()[cookie] - s0[cookie] == 1
    assert got == digest
    assert len(synacks) == 1
    sa = synacks[0]
    assert sa.checksums_ok and sa.sack_perm and sa.wscale == wscale and sa.tsval is not None
    # TSval's low bits: the client's own scale (what its SYN offered) and SACK permitted.
    assert sa.tsval & 0xF == client.rcv_wscale and sa.tsval & 0x10
    server = srv.conns[-1]
    assert server.timestamps and server.sack and server.wscale
    assert client.timestamps and client.sack and client.wscale
    assert client.snd_wscale == server.rcv_wscale == wscale
    assert server.snd_wscale == client.rcv_wscale


def test_listener_not_in_cookie_mode_rejects_the_cookie(
    lab: tuple[sc.CookieProg, sc.CookieLab],
) -> None:
    prog, lab_ = lab
    port = next(_ports)
    with sc.echo_server(lab_, port):
        prog.protect(lab_.srv_ip4, port, 60.0, let_first=False)  # nothing let through
        got, prog_d, stack_d, _ = connect_once(prog, lab_, port, 4)
        prog.unprotect(lab_.srv_ip4, port)
        assert prog_d.get("cookie4") == 1
        # tcp_synq_no_recent_overflow(): the ACK is not even checked, the listener resets it.
        assert "TcpExtSyncookiesRecv" not in stack_d
        assert isinstance(got, ConnectionResetError) or got == b"", got
        # Unprotected, the same listener takes connections from the stack as usual.
        got, prog_d, _, _ = connect_once(prog, lab_, port, 4)
        assert got == b"through an XDP cookie %d" % port and "cookie4" not in prog_d


@pytest.mark.parametrize("family", [4, 6])
def test_spoofed_flood_is_answered_in_xdp(
    lab: tuple[sc.CookieProg, sc.CookieLab], family: int
) -> None:
    prog, lab_ = lab
    port = next(_ports)
    srv_ip, cli_ip = (lab_.srv_ip4, lab_.cli_ip4) if family == 4 else (lab_.srv_ip6, lab_.cli_ip6)
    cookie = "cookie4" if family == 4 else "cookie6"
    n, seconds = 6000, 2.5
    frames, sources = sc.flood_frames(lab_, n, port, family=family)
    assert len(sources) > 5000
    with sc.echo_server(lab_, port, family), sc.capture(lab_) as cap:
        prog.protect(srv_ip, port, 1.0)
        n0, s0 = sc.netstat(lab_.srv_ns), prog.stats()
        clients: list[bytes | BaseException] = []
        syn_recv: list[int] = []

        def during_flood() -> None:
            for _ in range(2):
                time.sleep(seconds / 3)
                syn_recv.append(sc.syn_recv_sockets(lab_.srv_ns))
                try:
                    clients.append(sc.roundtrip(lab_, port, b"during the flood", family))
                except OSError as exc:
                    clients.append(exc)

        t = threading.Thread(target=during_flood)
        t.start()
        took = sc.send_frames(lab_, frames, seconds)
        t.join(10)
        synacks = sc.drain_synacks(cap, settle=0.3)
        prog_d, stack_d = delta(prog.stats(), s0), delta(sc.netstat(lab_.srv_ns), n0)
        prog.unprotect(srv_ip, port)
    assert clients == [b"during the flood"] * 2
    assert syn_recv == [0, 0] and sc.syn_recv_sockets(lab_.srv_ns) == 0
    passed, answered = prog_d.get("let_through", 0), prog_d.get(cookie, 0)
    assert passed + answered == n + 2  # every SYN of the flood and of the two clients
    # One SYN per second (plus one at the start) reached the stack; it answered those only.
    assert 1 <= passed <= int(took) + 2, (passed, took)
    assert stack_d.get("TcpExtSyncookiesSent") == passed
    assert "TcpExtListenOverflows" not in stack_d and "TcpExtListenDrops" not in stack_d
    # Every SYN got exactly one SYN-ACK back at the client, to the source it came from:
    # XDP's, with complete checksums, or the stack's for the few let through, whose TCP
    # checksum veth leaves to offload (CHECKSUM_PARTIAL: the field holds the pseudo-header
    # sum only), which is how the capture tells them apart.
    assert len(synacks) == n + 2
    assert {s.dst for s in synacks} == sources | {cli_ip}
    assert all(s.sport == port and s.src == srv_ip for s in synacks)
    assert sum(s.checksums_ok for s in synacks) == answered
