"""Issue 18: a bulk load into the Datapath, run by the ABI 5 build and by ABI 4's release alike.

``Datapath.add_codes`` of the first N entries of the master list (the bulk path of
``/v1/rules/bulk`` and ``PUT /v1/sources``, without the service and SQLite), removing a tenth,
and opening the pins again (adoption, no upgrade). The same file runs under ABI 4: put a
``git archive 1c119335 xdpfw bpf bench`` tree first on PYTHONPATH. Prints one JSON line.

    git archive 1c119335 xdpfw bpf bench | tar -x -C /tmp/abi4
    flock /work/tools/bench.lock sh -c '.venv/bin/python -m bench.d248_load 1000000; \\
        PYTHONPATH=/tmp/abi4 .venv/bin/python bench/d248_load.py 1000000'
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.lists import MasterList
from xdpfw import abi
from xdpfw.compiler import Capacities
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.importers import ListReader

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    n = int((argv or sys.argv[1:] or ["1000000"])[0])
    master = MasterList(n)
    reader = ListReader()
    reader.feed(("\n".join(master.lines(n)) + "\n").encode())
    codes = reader.finish()
    kw: dict[str, int] = {"max_rules": max(n + 1024, 1 << 16), "max_prefixes": max(n // 4, 1 << 14)}
    if abi.ABI_VERSION >= 5:
        kw["max_tbl8_groups"] = 65536  # the master list's random /26 and /28
    caps = Capacities(**kw)
    pin = Path(f"/sys/fs/bpf/xdpfw-test-load-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    out: dict[str, Any] = {"abi": abi.ABI_VERSION, "entries": n,
                           "load": Path("/proc/loadavg").read_text().split()[:3]}
    t = time.perf_counter()
    dp = Datapath.open(DatapathConfig(bpffs_dir=pin, caps=caps))
    try:
        out["open_s"] = time.perf_counter() - t
        ids = list(range(1, len(codes) + 1))
        t = time.perf_counter()
        dp.add_codes(ids, codes)
        out["add_codes_s"] = time.perf_counter() - t
        out["rules"] = len(dp.compiler)
        t = time.perf_counter()
        dp.remove_rules(ids[: n // 10])
        out["remove_10pct_s"] = time.perf_counter() - t
        dp.close()
        t = time.perf_counter()
        dp = Datapath.open(DatapathConfig(bpffs_dir=pin, caps=caps, upgrade=False))
        out["adopt_s"] = time.perf_counter() - t
    finally:
        dp.close(cleanup=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
