"""Bounded inputs, end to end: the real `xdpfw serve` process fed 200 MB bodies.

The token is checked and a body's size limited before the body is read (api/limits.py); a
text/plain bulk is parsed as it streams in, off the event loop, in memory bounded by its codes
(not by its size); 422s name at most 100 bad lines and never echo the input. The pure tests of
the same code are in tests/test_api_pure.py ("bounded inputs").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import unique_pin_dir
from tests.server import Server, running_server

pytestmark = pytest.mark.e2e

MB = 1 << 20
BULK_LIMIT = 64 * MB  # XDPFW_MAX_BULK_BYTES for this server (default 256 MiB)
# /healthz during a bulk: ~0.1-0.2 s when the machine is idle, 1 s seen under a loaded one;
# parsing on the event loop made it wait the whole parse (4.6 s for the JSON body below).
HEALTH_WAIT = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("limits")
    with running_server(tmp, unique_pin_dir("limits"), start=False) as srv:
        srv.env = {"XDPFW_MAX_BULK_BYTES": str(BULK_LIMIT)}
        srv.start()
        yield srv


class Source:
    """A body of `total` bytes made of `line` repeated, produced 1 MiB at a time (never held
    whole), counting what the server took before it answered."""

    def __init__(self, total: int, line: bytes = b"198.18.0.1\n") -> None:
        self.total = total
        self.piece = line * (MB // len(line))
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            piece = self.piece[: self.total - self.sent]
            self.sent += len(piece)
            yield piece


def _post(srv: Server, path: str, body: Source, *, token: bool, declared: bool,
          ctype: str = "text/plain") -> tuple[httpx.Response, float]:
    headers = {"content-type": ctype}
    if token:
        headers["authorization"] = f"Bearer {srv.token}"
    if declared:
        headers["content-length"] = str(body.total)
    t0 = time.monotonic()
    r = httpx.post(srv.url + path, content=iter(body), headers=headers, timeout=60)
    return r, time.monotonic() - t0


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _while_polling_health(
    srv: Server, ctype: str, body: Iterator[bytes]
) -> tuple[httpx.Response, list[float]]:
    """POST a bulk from a thread; meanwhile time GET /healthz from another client."""
    result: list[httpx.Response] = []

    def load() -> None:
        result.append(httpx.post(
            srv.url + "/v1/rules/bulk", content=body, timeout=120,
            headers={"content-type": ctype, "authorization": f"Bearer {srv.token}"}))

    worker = threading.Thread(target=load)
    worker.start()
    waits = []
    with httpx.Client(base_url=srv.url, timeout=30) as other:
        while worker.is_alive():
            t0 = time.monotonic()
            assert other.get("/healthz").status_code in (200, 503)
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)
    worker.join()
    return result[0], waits


def test_200mb_bodies_are_refused_within_a_second(server: Server) -> None:
    """Without a token: 401 before the body is read; with one: 413 on the declared length
    (single-rule route) or as soon as a chunked bulk passes its limit."""
    huge = 200 * MB
    r, took = _post(server, "/v1/rules", Source(huge), token=False, declared=True,
                    ctype="application/json")
    assert r.status_code == 401 and "missing bearer token" in r.json()["detail"], r.text
    assert took < 1.0, took
    assert r.headers["connection"] == "close"  # the rest is not read
    r, took = _post(server, "/v1/rules", Source(huge), token=True, declared=True,
                    ctype="application/json")
    assert r.status_code == 413, r.text
    assert r.json()["setting"] == "XDPFW_MAX_BODY_BYTES" and r.json()["limit"] == 64 * 1024
    assert took < 1.0, took
    body = Source(huge, b"#" * 1024)  # one long comment line: cheap to parse up to the limit
    r, took = _post(server, "/v1/rules/bulk", body, token=True, declared=False)
    assert r.status_code == 413, r.text
    assert r.json()["setting"] == "XDPFW_MAX_BULK_BYTES" and r.json()["limit"] == BULK_LIMIT
    assert body.sent < BULK_LIMIT + 32 * MB, body.sent  # refused as it passed, not at the end
    assert took < 5.0, took
    with server.client() as c:
        assert c.get("/v1/rules").json()["rules"] == []  # nothing was added


def test_big_text_bulk_is_parsed_off_the_loop_in_bounded_memory(server: Server) -> None:
    """40 MB of blocklist (1M lines, mostly comments, as FireHOL files are): other clients
    are answered meanwhile, and the server's peak RSS grows by less than the body."""
    assert server.proc is not None
    pid = server.proc.pid
    comments = Source(40 * MB, b"# FireHOL-style comment line for padding\n")
    addresses = [f"198.18.{i // 250}.{i % 250 + 1}\n".encode() for i in range(4000)]

    def body() -> Iterator[bytes]:
        yield b"".join(addresses)
        yield from comments

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status(pid)["VmRSS"]
    r, waits = _while_polling_health(server, "text/plain", body())
    assert r.status_code == 201, r.text
    assert r.json()["added"] == 4000
    assert len(waits) >= 5, waits  # the load took a while, health was asked meanwhile
    assert max(waits) < HEALTH_WAIT, max(waits)
    growth = _status(pid)["VmHWM"] - before
    print(f"40 MB text bulk: peak RSS growth {growth / MB:.1f} MB, health max {max(waits):.3f}s")
    assert growth < 40 * MB, growth / MB


def test_json_bulk_is_parsed_off_the_loop(server: Server) -> None:
    """A JSON bulk (bounded by XDPFW_MAX_BULK_JSON_BYTES) is parsed in a worker thread too."""
    one = b'{"src": "198.18.60.1", "comment": "same rule again"}'
    body = [b"[", one, *([b"," + one] * 150_000), b"]"]
    r, waits = _while_polling_health(server, "application/json", iter(body))
    assert r.status_code == 201, r.text[:300]
    assert r.json()["added"] == 1
    assert len(waits) >= 5, waits
    assert max(waits) < HEALTH_WAIT, max(waits)


def test_bad_bodies_answer_small_json_422s(server: Server) -> None:
    """20 MB of bad lines -> a 422 of a few KB naming the first 100 lines and the total;
    deep JSON and a lone surrogate -> a JSON 422, not a plain-text 500."""
    with server.client() as c:
        rules = c.get("/healthz").json()["rules"]
    bad = Source(20 * MB, b"not an address, line of the bad list\n")
    r, _ = _post(server, "/v1/rules/bulk", bad, token=True, declared=False)
    assert r.status_code == 422, r.text[:500]
    assert len(r.content) < 30_000, len(r.content)
    print(f"20 MB of bad lines: a 422 of {len(r.content)} bytes")
    msg = r.json()["errors"][0]["msg"]
    total = -(-bad.total // len(b"not an address, line of the bad list\n"))  # a last part line
    assert msg.startswith(f"nothing added; {total} invalid line(s): 1, 2, 3")
    assert "line 100: " in msg and "line 101: " not in msg and f"{total - 100} more" in msg
    with server.client() as c:
        deep = "[" * 100_000 + "]" * 100_000
        r = c.post("/v1/rules/bulk", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "nested too deeply" in r.json()["errors"][0]["msg"]
        r = c.post("/v1/rules", content='{"src": "198.18.9.1", "comment": "\\ud800"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "comment"]
        assert r.json()["errors"][0]["input"] == "\\ud800"
        assert c.get("/healthz").json()["rules"] == rules  # nothing was added
