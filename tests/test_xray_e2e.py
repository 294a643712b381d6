"""X-ray end to end: the real `xdpfw serve` on a veth lab, real frames, the real `xdpfw
capture` piped into the real tcpdump (and tshark reading the same file).

Frames of several kinds (IPv4, IPv6, 802.1Q and QinQ, IPv4 and IPv6 fragments) that sampled
drop rules match are sent into the lab; exactly those frames, bytes intact, come out of
`xdpfw capture -w - | tcpdump -r -`, each with its rule and verdict in the packet comment.
Under a trafgen flood the kernel's cap holds (samples per second <= --sample-max-pps, plus the
bucket's burst) and the rest is counted as lost_cap in /v1/stats and /metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unique_pin_dir
from tests.server import XDPFW, Server, running_server
from tests.traffic import send_raw
from tests.xray_files import TSHARK, classic_pcap, tshark_comments
from xdpfw.verify.frames import build_frame

pytestmark = pytest.mark.e2e

CAP = 200  # --sample-max-pps of the test server
BURST = CAP // 10  # the bucket's depth (BURST_SECONDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("xray"), unique_pin_dir("xray"),
                        start=False) as srv:
        srv.extra_args = ["--sample-max-pps", str(CAP), "--snaplen", "2048"]
        srv.start()
        yield srv


def env(server: Server) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("XDPFW_")}
    return {**base, "XDPFW_API": server.url, "XDPFW_TOKEN": server.token}


def add_rule(server: Server, **body: object) -> int:
    with server.client() as c:
        r = c.post("/v1/rules", json=body)
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


def samples(server: Server) -> dict[str, int]:
    with server.client() as c:
        return dict(c.get("/v1/stats").json()["samples"])


def wait_streams(server: Server, n: int, proc: subprocess.Popen[str],
                 timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while samples(server)["streams"] < n:
        if proc.poll() is not None:
            raise AssertionError(f"xdpfw capture exited {proc.returncode}: {proc.stderr!r}"
                                 + (proc.stderr.read() if proc.stderr else ""))
        assert time.monotonic() < deadline, "xdpfw capture did not open its stream"
        time.sleep(0.05)


def test_capture_piped_into_tcpdump_shows_exactly_the_frames(server: Server,
                                                              tmp_path: Path) -> None:
    lab = server.lab
    v4 = add_rule(server, src="198.18.77.0/24", sample={"every": 1})
    v6 = add_rule(server, src="2001:db8:77::/64", sample={"every": 1})
    noise = add_rule(server, src="198.18.78.0/24")  # not sampled: its frames stay out

    def frame(src: str, dst: str, **kw: object) -> bytes:
        return build_frame(src=src, dst=dst, eth_src=lab.peer_mac, eth_dst=lab.host_mac,
                           **kw)  # type: ignore[arg-type]

    want = [
        (frame("198.18.77.1", "198.19.0.1", proto="udp", dport=53, payload=b"a" * 20), v4),
        (frame("2001:db8:77::1", "2001:db8:ff::1", proto="tcp", dport=443), v6),
        (frame("198.18.77.2", "198.19.0.1", vlans=[(0x8100, 42)], proto="udp"), v4),
        (frame("198.18.77.3", "198.19.0.1", vlans=[(0x88A8, 7), (0x8100, 8)]), v4),
        (frame("198.18.77.4", "198.19.0.1", proto="udp", frag_offset=16,
               payload=b"b" * 48), v4),
        (frame("2001:db8:77::2", "2001:db8:ff::1", proto="udp", more_fragments=True,
               payload=b"c" * 300), v6),
        (frame("198.18.77.5", "198.19.0.1", proto="udp", payload=b"d" * 1400), v4),
    ]
    cap = tmp_path / "cap.pcapng"
    out = tmp_path / "tcpdump.pcap"
    pipeline = (
        f"{XDPFW} capture --rule {v4} --rule {v6} --verdict drop -c {len(want)} -w - "
        f"| tee {cap} | tcpdump -r - -w {out}"
    )
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", pipeline], env=env(server),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_streams(server, 1, proc)
        send_raw(lab, [frame("198.18.78.1", "198.19.0.1")])  # dropped, not sampled
        send_raw(lab, [f for f, _ in want])
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    got = classic_pcap(out.read_bytes())
    assert got == [(f, len(f)) for f, _ in want]
    if TSHARK is not None:
        assert tshark_comments(cap) == [f"xdpfw rule {rid} drop" for _, rid in want]
        p = subprocess.run([TSHARK, "-r", str(cap), "-T", "fields", "-e", "frame.interface_name"],
                           capture_output=True, text=True, timeout=60)
        assert set(p.stdout.split()) == {lab.host_if}
    with server.client() as c:  # and the frames were dropped, each counted once
        assert c.get(f"/v1/rules/{v4}").json()["counters"]["packets"] == 5
        assert c.get(f"/v1/rules/{v6}").json()["counters"]["packets"] == 2
        assert c.get(f"/v1/rules/{noise}").json()["counters"]["packets"] == 1
        for rid in (v4, v6, noise):
            c.delete(f"/v1/rules/{rid}")


def test_the_cap_holds_under_a_trafgen_flood(server: Server) -> None:
    lab = server.lab
    rid = add_rule(server, src="198.18.79.0/24", sample={"every": 1})
    before = samples(server)
    capture = subprocess.Popen(
        [XDPFW, "capture", "--rule", str(rid), "--json", "--seconds", "6"], env=env(server),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    flood_s = 3.0
    with tempfile.NamedTemporaryFile("w", prefix="xfw-trafgen-", suffix=".cfg") as cfg:
        cfg.write(f"{{ eth(da={lab.host_mac}), ipv4(sa=198.18.79.1, da=198.19.0.1, ttl=64, "
                  "sa[3]=drnd()), udp(sp=4000, dp=9), fill(0x00, 18) }\n")
        cfg.flush()
        wait_streams(server, 1, capture)
        t0 = time.monotonic()
        flood = subprocess.run(
            ["ip", "netns", "exec", lab.netns, "timeout", "-s", "INT", str(flood_s),
             "trafgen", "--no-sock-mem", "--notouch-irq", "--cpus", "1", "--num", "0",
             "--dev", lab.peer_if, "--conf", cfg.name],
            capture_output=True, text=True, timeout=30,
        )
        elapsed = time.monotonic() - t0
    assert flood.returncode in (0, 124, 130), flood.stderr[-500:]
    out, err = capture.communicate(timeout=30)
    assert capture.returncode == 0, err
    after = samples(server)
    with server.client() as c:
        matched = c.get(f"/v1/rules/{rid}").json()["counters"]["packets"]
        metrics = c.get("/metrics").text
        c.delete(f"/v1/rules/{rid}")
    sent = after["sent"] - before["sent"]
    lost_cap = after["lost_cap"] - before["lost_cap"]
    lost_ring = after["lost_ring"] - before["lost_ring"]
    events = [json.loads(line) for line in out.splitlines()]
    assert matched > 20 * CAP, f"the flood was too thin to test the cap: {matched} frames"
    assert sent <= BURST + CAP * elapsed + 1, (sent, elapsed)
    assert sent >= CAP * flood_s * 0.5  # the cap is a cap, not a trickle
    assert sent + lost_cap + lost_ring == matched  # every frame the rule decided is counted
    assert lost_cap >= matched - sent - lost_ring > 0
    assert len(events) == sent  # the stream kept up with what the kernel let through
    # no one-second window holds more than the cap plus the bucket's depth
    times = sorted(e["time_ns"] for e in events)
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - 1_000_000_000:
            j += 1
        assert i - j + 1 <= CAP + BURST + 1
    # /metrics was read after the flood ended: the same totals as /v1/stats
    exposed = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^xdpfw_samples_total\{outcome="(\w+)"\} (\S+)$', metrics, re.M)
    }
    assert {k: exposed[k] for k in ("sent", "lost_cap", "lost_ring")} == {
        k: float(after[k]) for k in ("sent", "lost_cap", "lost_ring")
    }
    stats = subprocess.run([XDPFW, "stats"], env=env(server), capture_output=True, text=True,
                           timeout=30)
    assert "over the cap (200/s)" in stats.stdout, stats.stdout
