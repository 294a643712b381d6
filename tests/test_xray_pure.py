"""X-ray without root: the pcapng writer read back by the real tcpdump and tshark, the ring
record decoder, the sample setting through the real API and SQLite, and the event stream
(a real uvicorn server over the stand-in datapath) captured by the real `xdpfw capture`.
"""

from __future__ import annotations

import base64
import ctypes
import io
import json
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.service import FirewallService
from api.settings import Settings
from api.store import Store
from tests.fakes import FakeDatapath
from tests.server import XDPFW, free_port
from tests.xray_files import TSHARK, tcpdump_frames, tshark_comments
from xdpfw import abi
from xdpfw.verify.frames import build_frame
from xdpfw.xray.pcapng import PcapngWriter
from xdpfw.xray.record import Sample, decode

pytestmark = pytest.mark.pure

TOKEN = "x-ray-test-token-0123"


def record(rule: int, verdict: int, frame: bytes, ifindex: int = 7, ktime: int = 5_000,
           snap: int = 2048) -> bytes:
    """A ring record as the program writes it (header, then the first bytes)."""
    data = frame[:snap]
    hdr = abi.SampleHdr(ktime_ns=ktime, rule_id=rule, ifindex=ifindex, frame_len=len(frame),
                        cap_len=len(data), verdict=verdict)
    room = 128 if len(data) <= 128 else 512 if len(data) <= 512 else 2048
    return bytes(hdr) + data + b"\0" * (room - len(data))  # the reserved size is fixed


FRAMES = [
    build_frame(src="198.18.0.1", dst="198.19.0.1", proto="udp", dport=53),
    build_frame(src="2001:db8::1", dst="2001:db8::2", proto="tcp", dport=22),
    build_frame(src="198.18.0.2", dst="198.19.0.1", vlans=[(0x8100, 5)]),
    build_frame(src="198.18.0.3", dst="198.19.0.1", frag_offset=4, payload=b"f" * 30),
    build_frame(src="198.18.0.4", dst="198.19.0.1", payload=b"q" * 1000),  # odd lengths pad
]


def test_decode_a_record() -> None:
    raw = record(9, abi.SAMPLED_MONITOR, FRAMES[0], ifindex=3, ktime=1_000)
    s = decode(raw, offset_ns=1_700_000_000_000_000_000)
    assert s == Sample(9, "monitor", 3, 1_700_000_000_000_001_000, len(FRAMES[0]), FRAMES[0])
    assert Sample.from_event(s.event()) == s
    with pytest.raises(ValueError, match="shorter than its header"):
        decode(raw[:10], 0)
    bad = bytearray(raw)
    struct.pack_into("<H", bad, 20, 4000)  # cap_len beyond the record
    with pytest.raises(ValueError, match="cannot hold"):
        decode(bytes(bad), 0)
    assert ctypes.sizeof(abi.SampleHdr) == 24


def test_pcapng_is_read_by_tcpdump_and_tshark(tmp_path: Path) -> None:
    path = tmp_path / "x.pcapng"
    samples = [
        Sample(rule=10 + i, verdict=("drop", "pass", "monitor")[i % 3], ifindex=2 + i % 2,
               time_ns=1_764_000_000_123_456_789 + i, length=len(f), data=f[:600],
               ifname=f"eth{i % 2}")
        for i, f in enumerate(FRAMES)
    ]
    with path.open("wb") as fh:
        w = PcapngWriter(fh, snaplen=600)
        for s in samples:
            w.write(s)
    assert w.packets == len(samples)
    assert tcpdump_frames(path) == [(s.data, s.length) for s in samples]
    if TSHARK is None:
        pytest.skip("tshark is not installed (scripts/setup.sh test installs it)")
    assert tshark_comments(path) == [f"xdpfw rule {s.rule} {s.verdict}" for s in samples]
    p = subprocess.run([TSHARK, "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
                        "-e", "frame.time_epoch"], capture_output=True, text=True, timeout=60)
    rows = [line.split("\t") for line in p.stdout.splitlines()]
    assert [r[0] for r in rows] == [s.ifname for s in samples]
    assert rows[0][1].startswith("1764000000.123456789")  # nanosecond timestamps


def test_a_pcapng_of_no_packets_is_still_valid(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcapng"
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    w.interface(4, "eth9")
    path.write_bytes(buf.getvalue())
    assert tcpdump_frames(path) == []


# --- the API, the store and the stream over the stand-in datapath ---------------------------


class Live:
    def __init__(self, tmp: Path) -> None:
        self.dp = FakeDatapath()
        self.store = Store(tmp / "rules.sqlite3")
        self.svc = FirewallService(self.dp, self.store)
        self.svc.reconcile()
        self.svc.start_xray(500, 256)
        self.port = free_port()
        app = create_app(Settings(listen=f"127.0.0.1:{self.port}", state_dir=tmp), self.svc,
                         TOKEN)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.url,
                                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.svc.stop_xray()
        self.store.close()

    def wait_streams(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.http.get("/v1/stats").json()["samples"]["streams"] < n:
            assert time.monotonic() < deadline, "the stream did not subscribe"
            time.sleep(0.02)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    lv = Live(tmp_path)
    yield lv
    lv.close()


def test_sample_setting_is_stored_and_shown(live: Live, tmp_path: Path) -> None:
    c = live.http
    r = c.post("/v1/rules", json={"src": "198.18.1.0/24", "sample": {"every": 4}})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert r.json()["sample"] == {"every": 4}
    assert live.dp.sampled == {rid: 4}
    plain = c.post("/v1/rules", json={"src": "198.18.2.0/24"}).json()
    assert plain["sample"] is None
    assert c.put(f"/v1/rules/{plain['id']}/sample", json={"every": 1}).json() == {"every": 1}
    assert c.get(f"/v1/rules/{plain['id']}").json()["sample"] == {"every": 1}
    assert [x["sample"] for x in c.get("/v1/rules").json()["rules"]] == [
        {"every": 4}, {"every": 1}
    ]
    assert c.delete(f"/v1/rules/{plain['id']}/sample").status_code == 204
    assert c.get(f"/v1/rules/{plain['id']}/sample").json() is None
    assert live.dp.sampled == {rid: 4}
    # refusals say what is wrong
    assert c.put("/v1/rules/999/sample", json={"every": 1}).status_code == 404
    r = c.put(f"/v1/rules/{rid}/sample", json={"every": 0})
    assert r.status_code == 422 and "every" in r.text
    assert c.put(f"/v1/rules/{rid}/sample", json={"every": 2},
                 headers={"Authorization": ""}).status_code == 401
    # the database keeps it: a new service on the same file samples the rule again
    assert live.store.samples() == {rid: 4}
    dp2 = FakeDatapath()
    store2 = Store(tmp_path / "rules.sqlite3")
    svc2 = FirewallService(dp2, store2)
    svc2.reconcile()
    svc2.start_xray(100, 128)
    try:
        assert dp2.sampled == {rid: 4}
        assert dp2.sample_conf == (128, 100)
    finally:
        svc2.stop_xray()
        store2.close()
    # a removed rule is sampled no more, and its row goes
    assert c.delete(f"/v1/rules/{rid}").status_code == 204
    assert live.dp.sampled == {} and live.store.samples() == {}


def _events(live: Live, params: str, want: int) -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = []
    with live.http.stream("GET", f"/v1/events?{params}") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
                if len(out) == want:
                    break
    return out


def test_event_stream_filters_and_carries_the_bytes(live: Live) -> None:
    got: list[list[tuple[str, dict[str, object]]]] = []
    t = threading.Thread(target=lambda: got.append(_events(live, "verdict=drop&rule=5", 3)))
    t.start()
    live.wait_streams(1)
    live.dp.ring.inject(record(5, abi.SAMPLED_DROP, FRAMES[0]))
    live.dp.ring.inject(record(6, abi.SAMPLED_DROP, FRAMES[1]))  # another rule
    live.dp.ring.inject(record(5, abi.SAMPLED_MONITOR, FRAMES[2]))  # another verdict
    live.dp.ring.inject(record(5, abi.SAMPLED_DROP, FRAMES[4]))
    t.join(10)
    (events,) = got
    assert [e for e, _ in events] == ["hello", "sample", "sample"]
    hello = events[0][1]
    assert hello["snaplen"] == 256 and hello["max_pps"] == 500
    samples = [Sample.from_event(d) for _, d in events[1:]]
    assert [(s.rule, s.verdict, s.data) for s in samples] == [
        (5, "drop", FRAMES[0]), (5, "drop", FRAMES[4])
    ]
    assert base64.b64decode(str(events[1][1]["data"])) == FRAMES[0]
    live.wait_streams(0)  # the stream's queue leaves with its client


def test_capture_cli_writes_pcapng_that_tcpdump_reads(live: Live, tmp_path: Path) -> None:
    out = tmp_path / "cap.pcapng"
    proc = subprocess.Popen(
        [XDPFW, "capture", "--api", live.url, "--token", TOKEN, "--rule", "3", "-c", "4",
         "-w", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        live.wait_streams(1)
        for i, f in enumerate(FRAMES):
            live.dp.ring.inject(record(3, abi.SAMPLED_DROP, f, ktime=1000 + i))
        live.dp.ring.inject(record(4, abi.SAMPLED_DROP, FRAMES[0]))
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "4 frame(s) written" in err
    assert tcpdump_frames(out) == [(f, len(f)) for f in FRAMES[:4]]
    if TSHARK is not None:
        assert tshark_comments(out) == ["xdpfw rule 3 drop"] * 4


def test_capture_cli_json_and_usage_errors(live: Live) -> None:
    proc = subprocess.Popen(
        [XDPFW, "capture", "--api", live.url, "--token", TOKEN, "--json", "-c", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        live.wait_streams(1)
        live.dp.ring.inject(record(8, abi.SAMPLED_PASS, FRAMES[1]))
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    ev = json.loads(out)
    assert (ev["rule"], ev["verdict"], ev["len"]) == (8, "pass", len(FRAMES[1]))
    p = subprocess.run([XDPFW, "capture", "--api", live.url, "--token", TOKEN],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 2 and "-w FILE.pcapng" in p.stderr
    p = subprocess.run([XDPFW, "capture", "--api", live.url, "--json", "-w", "-"],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 2 and "pick one" in p.stderr
    p = subprocess.run([XDPFW, "capture", "--api", live.url, "--token", TOKEN, "--json",
                        "--sample-rule", "77"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 1 and "no rule 77" in p.stderr


def test_stats_and_metrics_show_the_lost_samples(live: Live) -> None:
    live.dp.sample_counts.update(sent=10, lost_ring=2, lost_cap=30)
    s = live.http.get("/v1/stats").json()["samples"]
    assert s == {"sent": 10, "lost_ring": 2, "lost_cap": 30, "lost_client": 0,
                 "max_pps": 500, "snaplen": 256, "streams": 0}
    text = live.http.get("/metrics").text
    for outcome, n in (("sent", 10), ("lost_ring", 2), ("lost_cap", 30), ("lost_client", 0)):
        assert f'xdpfw_samples_total{{outcome="{outcome}"}} {float(n)}' in text
    p = subprocess.run([XDPFW, "stats", "--api", live.url, "--token", TOKEN],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    assert "samples: 10 sent; lost: 30 over the cap (500/s), 2 ring full, 0 slow reader" in p.stdout


def test_event_stream_source_filter(live: Live) -> None:
    """`source=` keeps the samples of rules that source holds (every rule is the API's until
    sources are stored per rule); a sample of a rule no source holds is left out."""
    rid = live.http.post("/v1/rules", json={"src": "198.18.9.0/24"}).json()["id"]
    got: list[list[tuple[str, dict[str, object]]]] = []
    t = threading.Thread(target=lambda: got.append(_events(live, "source=api", 2)))
    t.start()
    live.wait_streams(1)
    live.dp.ring.inject(record(999, abi.SAMPLED_DROP, FRAMES[0]))  # no such rule
    live.dp.ring.inject(record(rid, abi.SAMPLED_DROP, FRAMES[3]))
    t.join(10)
    (events,) = got
    assert [(e, d.get("rule")) for e, d in events] == [("hello", None), ("sample", rid)]
    assert live.http.get("/v1/events?source=Bad!").status_code == 422


def test_which_kernels_run_xray() -> None:
    from xdpfw.kernel.ringbuf import xray_supported

    for release, ok in (("5.11.0-1-amd64", False), ("5.17.15", False), ("5.18.0", True),
                        ("6.1.0-57-amd64", True), ("6.18.44-fc-v669", True), ("junk", False)):
        assert xray_supported(release) is ok, release


def test_sampling_on_an_old_kernel_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from xdpfw.datapath import sampling
    from xdpfw.errors import DatapathError

    class Empty:
        def lookup(self, key: object) -> None:
            return None

        def items(self) -> list[object]:
            return []

        def update(self, key: object, value: object) -> None:
            self.written = value

    maps = dict.fromkeys(("xdpfw_sample_ctl", "xdpfw_sample_rules", "xdpfw_sample_bucket",
                          "xdpfw_sample_stats", "xdpfw_samples"), Empty())
    s = sampling.Sampling(maps)  # type: ignore[arg-type]
    monkeypatch.setattr(sampling, "xray_supported", lambda: False)
    with pytest.raises(DatapathError, match=r"needs Linux 5\.18 or newer"):
        s.set({1: 1})
    s.set({1: None})  # turning it off is always fine
