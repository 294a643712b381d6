"""Service soak: traffic plus one rule change per second against the real `xdpfw serve`.

    sudo .venv/bin/python scripts/soak_service.py --minutes 30

Runs on its own veth lab (198.18.0.0/15, removed at the end). Every second it adds or removes a
rule; every 10 s it checks that counters only grow, that every rule has exactly one counter
entry (and nothing else has one), and records the service's RSS. It fails (exit 1) on the first
violation, or when the RSS at the end exceeds the RSS after the first minute by more than
--rss-slack MB. Not part of CI (`make test`); a short run: --minutes 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import unique_pin_dir
from tests.server import running_server
from tests.traffic import udp_roundtrip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-slack", type=float, default=20.0, help="allowed RSS growth, MB")
    args = ap.parse_args()
    rng = Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    stop = threading.Event()
    sent = [0]

    with tempfile.TemporaryDirectory() as tmp, running_server(
        Path(tmp), unique_pin_dir("soak")
    ) as srv:
        lab = srv.lab
        assert srv.proc is not None
        pid = srv.proc.pid

        def traffic() -> None:
            while not stop.is_set():
                udp_roundtrip(lab, count=20, settle=0.01)
                sent[0] += 20

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        last: dict[int, int] = {}
        last_total = 0
        rss_base: float | None = None
        rss = 0.0
        changes = 0
        ids: list[int] = []
        started = time.monotonic()
        try:
            with srv.client() as c:
                # One rule that always matches the lab's traffic, so counters move.
                c.post("/v1/rules", json={"src": lab.peer_ip4, "mode": "monitor"})
                while time.monotonic() < deadline:
                    if ids and rng.random() < 0.5:
                        r = c.delete(f"/v1/rules/{ids.pop(rng.randrange(len(ids)))}")
                        ok = r.status_code == 204
                    else:
                        src = f"198.18.{rng.randrange(128, 256)}.{rng.randrange(256)}"
                        r = c.post("/v1/rules", json={"src": src})
                        ok = r.status_code in (200, 201)
                        if r.status_code == 201:
                            ids.append(r.json()["id"])
                    if not ok:
                        print(f"FAIL: {r.request.method} {r.request.url}: {r.status_code} {r.text}")
                        return 1
                    changes += 1
                    if changes % 10 == 0:
                        stats = c.get("/v1/stats").json()
                        rules = {x["id"] for x in c.get("/v1/rules?limit=10000").json()["rules"]}
                        now = {x["id"]: x["packets"] for x in stats["rules"]}
                        total = stats["totals"]["packets"]
                        if set(now) != rules:
                            print(f"FAIL: counter entries {len(now)} != rules {len(rules)}")
                            return 1
                        shrunk = [i for i in now if now[i] < last.get(i, 0)]
                        if shrunk or total < last_total:
                            print(f"FAIL: counters went down: rules {shrunk}, total {total}")
                            return 1
                        last, last_total = now, total
                        rss = rss_mb(pid)
                        if rss_base is None and time.monotonic() - started > 60:
                            rss_base = rss
                        print(
                            f"{time.monotonic() - started:7.0f}s changes={changes} "
                            f"rules={len(rules)} frames={total} sent={sent[0]} rss={rss:.1f}MB",
                            flush=True,
                        )
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - started) % 1.0))
        finally:
            stop.set()
            t.join(timeout=5)
        if rss_base is not None and rss - rss_base > args.rss_slack:
            print(f"FAIL: RSS grew from {rss_base:.1f} MB to {rss:.1f} MB")
            return 1
        print(f"OK: {changes} changes, {last_total} frames, RSS {rss:.1f} MB (base {rss_base})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
