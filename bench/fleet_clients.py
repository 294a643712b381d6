"""The etcd client choice of fleet mode (docs/fleet.md, "The client"), measured side by side
in one run on one 1-member etcd 3.4 on loopback:

- put latency (sequential puts, p50/p99),
- watch latency (from a put's start to its event in a watcher of the same process),
- watch reliability: the member is killed and restarted under the watcher; does the watch
  raise (so the caller can resume from its revision), resume, or go silent?

Clients: ours (api/fleet/etcd.py, httpx on the v3 JSON gateway), `etcd3gw` (requests on the
same gateway), `etcd3` (gRPC). The last two are optional: a client not installed is reported
as such. Run: .venv/bin/python -m bench.fleet_clients [--puts N]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.fleet.etcd import EtcdClient
from tests.etcd_cluster import Cluster, etcd_cluster


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


class Probe:
    """One client under test: put(key, value), and a watch of a prefix calling on_event."""

    name = ""

    def put(self, key: str, value: str) -> None:
        raise NotImplementedError

    def watch(self, prefix: str, on_event: Callable[[str], None],
              on_end: Callable[[str], None]) -> None:
        raise NotImplementedError


class Ours(Probe):
    name = "xdpfw (httpx, JSON gateway)"

    def __init__(self, url: str) -> None:
        self.c = EtcdClient([url])
        self.stop = threading.Event()

    def put(self, key: str, value: str) -> None:
        self.c.put(key.encode(), value.encode())

    def watch(self, prefix: str, on_event: Callable[[str], None],
              on_end: Callable[[str], None]) -> None:
        def run() -> None:
            rev = self.c.get(b"/")[1]
            while not self.stop.is_set():  # what the agent does: resume from the revision
                try:
                    for r, events in self.c.watch(prefix.encode(), rev + 1, self.stop):
                        for e in events:
                            on_event(e.kv.key.decode())
                        rev = max(rev, r)
                except Exception as exc:
                    on_end(f"raised {type(exc).__name__}, resumed")
                    time.sleep(0.2)
        threading.Thread(target=run, daemon=True).start()


class Gw(Probe):
    name = "etcd3gw (requests, JSON gateway)"

    def __init__(self, url: str) -> None:
        import etcd3gw  # type: ignore[import-not-found, import-untyped, unused-ignore]

        host, port = url.removeprefix("http://").split(":")
        self.c = etcd3gw.client(host=host, port=int(port), api_path="/v3/")

    def put(self, key: str, value: str) -> None:
        self.c.put(key, value)

    def watch(self, prefix: str, on_event: Callable[[str], None],
              on_end: Callable[[str], None]) -> None:
        def run() -> None:
            try:
                events, _cancel = self.c.watch_prefix(prefix)
                for e in events:
                    on_event(e["kv"]["key"].decode())
                on_end("iterator ended")
            except Exception as exc:
                on_end(f"raised {type(exc).__name__}")
        threading.Thread(target=run, daemon=True).start()


class Grpc(Probe):
    name = "etcd3 (gRPC)"

    def __init__(self, url: str) -> None:
        import etcd3  # type: ignore[import-not-found, import-untyped, unused-ignore]

        host, port = url.removeprefix("http://").split(":")
        self.c = etcd3.client(host=host, port=int(port))

    def put(self, key: str, value: str) -> None:
        self.c.put(key, value)

    def watch(self, prefix: str, on_event: Callable[[str], None],
              on_end: Callable[[str], None]) -> None:
        def cb(resp: Any) -> None:
            if isinstance(resp, Exception):
                on_end(f"callback got {type(resp).__name__}")
                return
            for e in resp.events:
                on_event(e.key.decode())
        self.c.add_watch_prefix_callback(prefix, cb)


def measure(probe: Probe, cluster: Cluster, puts: int) -> dict[str, str]:
    seen: dict[str, float] = {}
    ends: list[str] = []
    cv = threading.Condition()

    def on_event(key: str) -> None:
        with cv:
            seen.setdefault(key, time.perf_counter())
            cv.notify_all()

    def on_end(why: str) -> None:
        ends.append(why)

    tag = probe.name.split()[0]
    probe.watch(f"/b/{tag}/", on_event, on_end)
    time.sleep(0.5)
    lat: list[float] = []
    wlat: list[float] = []
    for i in range(puts):
        key = f"/b/{tag}/{i}"
        t0 = time.perf_counter()
        probe.put(key, "x" * 64)
        lat.append(time.perf_counter() - t0)
        with cv:
            cv.wait_for(lambda key=key: key in seen, 2.0)  # type: ignore[misc]
        if key in seen:
            wlat.append(seen[key] - t0)
    # Reliability: kill and restart the member under the watcher.
    m = cluster.members[0]
    cluster.kill(m)
    time.sleep(0.5)
    cluster.start(m)
    cluster.wait_ready()
    after = f"/b/{tag}/after"
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and after not in seen:
        with contextlib.suppress(Exception):  # refused while the member restarts
            probe.put(after, "y")
        time.sleep(0.3)
    return {
        "client": probe.name,
        "put p50/p99 ms": f"{pct(lat, .5):.2f} / {pct(lat, .99):.2f}",
        "watch p50/p99 ms": (f"{pct(wlat, .5):.2f} / {pct(wlat, .99):.2f}" if wlat
                             else "no events"),
        "events seen": f"{len(wlat)}/{puts}",
        "after a member restart": ("events again" if after in seen else "SILENT (no event)")
        + (f"; watch {ends[0]}" if ends else "; watch neither ended nor raised"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puts", type=int, default=300)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, etcd_cluster(Path(tmp), 1) as cluster:
        url = cluster.urls[0]
        for make in (Ours, Gw, Grpc):
            try:
                probe = make(url)
            except ImportError as exc:
                rows.append({"client": make.name, "note": f"not installed ({exc.name})"})
                continue
            except TypeError as exc:  # etcd3 0.12's generated code vs protobuf >= 4
                rows.append({"client": make.name, "note": f"does not import: {exc}"[:160]})
                continue
            rows.append(measure(probe, cluster, args.puts))
    for r in rows:
        print(" | ".join(f"{k}: {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
