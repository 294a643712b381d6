"""GIL stall finder: which C call keeps other threads (a /healthz probe) waiting.

Put this folder first on PYTHONPATH and set GILWATCH=1; every Python process started so (a
test run and the servers it starts) gets a watcher thread. The watcher re-arms
`faulthandler.dump_traceback_later` every 5 ms; when it cannot get the GIL back within
GILWATCH_MS (default 60), faulthandler's own C thread, which needs no GIL, writes every
thread's stack to /tmp/gilwatch.<pid>: the one not waiting is the one holding the GIL. Each
stall over 25 ms is logged too, as `GAP <unix time> <ms>`, to match a slow probe.

    GILWATCH=1 PYTHONPATH=scripts/gilwatch .venv/bin/python -m pytest -s \\
        tests/test_connections.py -k million
"""

import faulthandler
import os
import sys
import threading
import time

if os.environ.get("GILWATCH") == "1":
    _limit = float(os.environ.get("GILWATCH_MS", "60")) / 1000
    _out = open(f"/tmp/gilwatch.{os.getpid()}", "w")  # noqa: SIM115 (open for the process)
    _out.write(" ".join(sys.argv) + "\n")
    _out.flush()

    def _watch() -> None:
        while True:
            faulthandler.dump_traceback_later(_limit, repeat=False, file=_out)
            start = time.monotonic()
            time.sleep(0.005)
            gap = time.monotonic() - start
            faulthandler.cancel_dump_traceback_later()
            if gap > 0.025:
                _out.write(f"GAP {time.time():.3f} {gap * 1000:.0f}\n")
                _out.flush()

    threading.Thread(target=_watch, daemon=True, name="gilwatch").start()
