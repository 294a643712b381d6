"""Fleet propagation (docs/fleet.md, docs/benchmarks.md): a rule added through node A's API is
enforced on nodes B and C - time from the API call to the first dropped packet on each node,
p50/p99, side by side with the same call on a single host (no etcd: enforced when it returns).

Real processes: a 3-member etcd 3.4 on loopback (tests/etcd_cluster.py), three `xdpfw serve`
nodes each on its own veth lab, one single-host `xdpfw serve`. Each node's probe sends a UDP
datagram from its lab's namespace and waits up to 20 ms for it; the first of 3 datagrams in a
row that never arrive marks the drop at its send time. The rule is `src 198.18.0.0/15` (every
lab's peer), deleted and re-added each round. Root; ~1-2 min.

`--sizes N` (after the rest): what a source of N entries costs the store and the wire: etcd's
db size (maintenance/status of every member: the largest) before, after loading it on A, after
replacing it with N other entries, and after a compaction to the head plus a defragment of
every member; and the bytes node B received from etcd for each load, over the watch and by
its other calls (the chunk reads), from its xdpfw_fleet_*_bytes_total counters.
Run: flock /work/tools/bench.lock .venv/bin/python -m bench.fleet_propagation [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from api.fleet.etcd import EtcdClient
from tests.conftest import unique_pin_dir
from tests.etcd_cluster import Cluster, etcd_cluster
from tests.server import Server, _remove_pins
from xdpfw.kernel import netlink
from xdpfw.lab import VethLab, veth_lab

RULE = {"src": "198.18.0.0/15", "comment": "bench"}


def first_drop(lab: VethLab, t0: float, stop: float, result: dict[str, float],
               name: str) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = netlink.socket_in_netns(lab.netns, socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((lab.host_ip4, 0))
    port = rx.getsockname()[1]
    rx.settimeout(0.02)
    tx.bind((lab.peer_ip4, 0))
    misses: list[float] = []
    try:
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            tx.sendto(b"probe", (lab.host_ip4, port))
            try:
                rx.recv(64)
                misses.clear()
            except TimeoutError:
                misses.append(sent)
                if len(misses) == 3:
                    result[name] = max(0.0, misses[0] - t0)
                    return
    finally:
        rx.close()
        tx.close()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def wait_pass(lab: VethLab) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = netlink.socket_in_netns(lab.netns, socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((lab.host_ip4, 0))
    rx.settimeout(0.05)
    tx.bind((lab.peer_ip4, 0))
    try:
        for _ in range(400):
            tx.sendto(b"x", (lab.host_ip4, rx.getsockname()[1]))
            try:
                rx.recv(64)
                return
            except TimeoutError:
                continue
        raise RuntimeError("traffic never passed again")
    finally:
        rx.close()
        tx.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--big", type=int, default=100_000,
                    help="entries of the source replaced once on A and on the single host")
    ap.add_argument("--sizes", type=int, default=0,
                    help="entries of the source whose etcd size and watch traffic are measured")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        cluster = stack.enter_context(etcd_cluster(tmp, 3))
        servers: list[Server] = []
        for i in range(4):
            lab = stack.enter_context(veth_lab(prefix="xfw"))
            pins = unique_pin_dir(f"bench{i}")
            fleet = ["--etcd", cluster.endpoints, "--node", f"n{i}"] if i < 3 else []
            # B (n1) alone holds the --sizes source (scoped to it), old and new list at once,
            # and big-b (scoped to it) besides big
            room = 2 * args.sizes if i == 1 else 0
            caps = ["--max-rules", str(max(8192, 3 * args.big + room + 8192))]
            srv = Server(lab=lab, state_dir=tmp / f"s{i}", bpffs_dir=pins,
                         extra_args=[*fleet, *caps])
            stack.callback(_remove_pins, pins)
            stack.callback(srv.stop)
            servers.append(srv)
        for srv in servers:
            srv.start()
        a, b, c, single = servers
        lat: dict[str, list[float]] = {"B": [], "C": [], "A": [], "single": []}
        for _ in range(args.rounds):
            for who, api, probes in (("fleet", a, {"A": a, "B": b, "C": c}),
                                     ("single", single, {"single": single})):
                result: dict[str, float] = {}
                with api.client() as cl:
                    t0 = time.perf_counter()
                    threads = [threading.Thread(target=first_drop, args=(
                        s.lab, t0, t0 + 5.0, result, name)) for name, s in probes.items()]
                    for t in threads:
                        t.start()
                    r = cl.post("/v1/rules", json=RULE)
                    assert r.status_code in (201, 202), r.text
                    for t in threads:
                        t.join()
                    for name in probes:
                        lat[name].append(result.get(name, 5.0))
                    # Remove it again (fleet: by id on A, once A has it) and wait for traffic.
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        rules = [x for x in cl.get("/v1/rules").json()["rules"]
                                 if x["src"] == RULE["src"]]
                        if rules:
                            cl.delete(f"/v1/rules/{rules[0]['id']}")
                            break
                        time.sleep(0.02)
                for s in probes.values():
                    wait_pass(s.lab)
                _ = who
        print(f"rounds: {args.rounds}")
        for name, xs in lat.items():
            print(f"{name:>7}: p50 {pct(xs, .5):7.1f} ms  p99 {pct(xs, .99):7.1f} ms  "
                  f"max {max(xs) * 1000:7.1f} ms")
        base = pct(lat["single"], .5)
        for name in ("A", "B", "C"):
            print(f"{name} / single (p50): {pct(lat[name], .5) / base:.1f}x")
        if args.big:
            big(args.big, a, b, c, single, cluster)
        if args.sizes:
            sizes(args.sizes, cluster, a, b)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pids(servers: list[Server], cluster: Cluster | None) -> dict[str, int]:
    out = {f"node {s.url}": s.proc.pid for s in servers if s.proc is not None}
    if cluster is not None:
        out.update({f"etcd {m.name}": m.proc.pid for m in cluster.members
                    if m.proc is not None})
    return out


def big(n: int, a: Server, b: Server, c: Server, single: Server,
        cluster: Cluster | None = None) -> None:
    """A source of n entries replaced on A: until A, B and C hold it, vs one host's PUT."""
    body = "".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n" for i in range(n))
    hdr = {"content-type": "text/plain"}
    with single.client() as cl:
        cpu0 = _cpu(single.proc.pid) if single.proc is not None else 0.0
        t0 = time.perf_counter()
        r = cl.put("/v1/sources/big", content=body, headers=hdr, timeout=300)
        one = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        cpu_one = (_cpu(single.proc.pid) if single.proc is not None else 0.0) - cpu0
    done: dict[str, float] = {}
    pids = _pids([a, b, c], cluster)
    before = {k: _cpu(p) for k, p in pids.items()}
    with a.client() as cl:
        t0 = time.perf_counter()
        r = cl.put("/v1/sources/big", content=body, headers=hdr, timeout=300)
        assert r.status_code == 200, r.text
        committed = time.perf_counter() - t0
        while len(done) < 3 and time.perf_counter() - t0 < 300:
            for name, s in (("A", a), ("B", b), ("C", c)):
                if name not in done:
                    with s.client() as sc:
                        src = sc.get("/v1/sources/big")
                    if src.status_code == 200 and src.json()["rules"] == n:
                        done[name] = time.perf_counter() - t0
            time.sleep(0.05)
    last = max(done.values()) if len(done) == 3 else float("nan")
    print(f"source of {n} entries: single host PUT {one:.2f} s; fleet: committed "
          f"{committed:.2f} s, " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(done.items()))
          + f"; all three / single host = {last / one:.2f}x")
    # Where the 2 cores went meanwhile: CPU seconds of each process (the bench's own polls
    # included in the nodes').
    used = {k: _cpu(p) - before[k] for k, p in pids.items()}
    print(f"  CPU seconds: single host {cpu_one:.2f}; " + ", ".join(
        f"{k.split(' ', 1)[0]} {v:.2f}" for k, v in used.items())
        + f"; fleet total {sum(used.values()):.2f} in {last:.2f} s")
    # The same size once more, scoped to B alone (other addresses: all new rules, as above):
    # what the fleet path costs one node when it is not sharing 2 cores with two others.
    other = "".join(f"11.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n" for i in range(n))
    with a.client() as cl:
        t0 = time.perf_counter()
        r = cl.put("/v1/sources/big-b?nodes=n1", content=other, headers=hdr, timeout=300)
        assert r.status_code == 200, r.text
    _wait_holds(b, "big-b", n, timeout=300, every=0.05)
    alone = time.perf_counter() - t0
    print(f"the same, scoped to B only: B holds it after {alone:.2f} s = {alone / one:.2f}x "
          "the single host")
    # Where a node's time went: its agent logs the read from etcd and the apply of each source.
    for name, s in (("A", a), ("B", b), ("C", c)):
        for line in s.log.read_text(errors="replace").splitlines():
            m = re.search(r"fleet: source (big\S*): .*\((read [0-9.]+ s, applied in [0-9.]+ s)\)",
                          line)
            if m:
                print(f"  {name} {m.group(1)}: {m.group(2)}")


def _ipv4_list(n: int, base: int) -> str:
    return "".join(f"{(base + i) >> 24 & 255}.{(base + i) >> 16 & 255}."
                   f"{(base + i) >> 8 & 255}.{(base + i) & 255}\n" for i in range(n))


def _db_size(etcd: list[EtcdClient]) -> tuple[int, int]:
    """(dbSize, dbSizeInUse) in bytes: the largest over the members."""
    stats = [e.status() for e in etcd]
    return (max(int(s.get("dbSize", 0)) for s in stats),
            max(int(s.get("dbSizeInUse", 0)) for s in stats))


def _bytes_in(node: Server) -> tuple[int, int]:
    """(watch bytes, other bytes) node has received from etcd so far."""
    with node.client() as cl:
        text = cl.get("/metrics").text
    def one(name: str) -> int:
        m = re.search(rf"^{name}_total{{[^}}]*}} ([0-9.e+]+)$", text, re.M)
        assert m, name
        return int(float(m.group(1)))
    return one("xdpfw_fleet_watch_bytes"), one("xdpfw_fleet_read_bytes")


def _wait_holds(node: Server, name: str, n: int, timeout: float = 600,
                every: float = 0.2) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with node.client() as cl:  # waits on the node's lock while it applies
                r = cl.get(f"/v1/sources/{name}", timeout=120)
        except httpx.TimeoutException:
            continue
        if r.status_code == 200 and r.json()["rules"] == n:
            return time.perf_counter() - t0
        time.sleep(every)
    raise RuntimeError(f"{name}: {n} entries never reached {node.url}")


def sizes(n: int, cluster: Cluster, a: Server, b: Server) -> None:
    """etcd's size and B's traffic for a source of n entries: loaded, replaced, compacted.
    The source is scoped to B (n1): A and C see the same watch events but do not load it."""
    etcd = [EtcdClient([u]) for u in cluster.urls]
    hdr = {"content-type": "text/plain"}
    mib = 1 << 20
    try:
        rows = [("start", *_db_size(etcd), 0, 0)]
        for step, base in (("loaded", 0x0A000000), ("replaced", 0x0B000000)):
            w0, r0 = _bytes_in(b)
            with a.client() as cl:
                r = cl.put("/v1/sources/sizes?nodes=n1", content=_ipv4_list(n, base), headers=hdr,
                           timeout=600)
            assert r.status_code == 200, r.text
            _wait_holds(b, "sizes", n)
            time.sleep(3)  # two heartbeats' worth: their bytes are in every row alike
            w1, r1 = _bytes_in(b)
            rows.append((step, *_db_size(etcd), w1 - w0, r1 - r0))
        _, head = etcd[0].get(b"/")
        etcd[0].compact(head)
        for e in etcd:
            e.call("maintenance/defragment", {}, timeout=120)
        rows.append(("compacted + defragmented", *_db_size(etcd), 0, 0))
        print(f"source of {n} IPv4 entries (text list {len(_ipv4_list(n, 0)) / mib:.1f} MiB):")
        for step, size, used, watch, other in rows:
            print(f"  {step:<26} etcd db {size / mib:8.1f} MiB (in use {used / mib:8.1f} MiB)"
                  + (f"; node B received: watch {watch / 1024:.1f} KiB, other calls "
                     f"{other / mib:.1f} MiB" if watch or other else ""))
    finally:
        for e in etcd:
            e.close()


if __name__ == "__main__":
    main()
