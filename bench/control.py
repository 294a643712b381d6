"""Item 4: the control plane, through the real service, against `ipset restore` and `nft -f`.

A real `xdpfw serve` (default capacities) runs on an xdpfw.lab.veth_lab of its own (the way the
end-to-end tests run it), with its own state directory and pin directory, both removed at
the end. The list is the master list (exact hosts and prefixes); it is loaded with the real
CLI, `xdpfw import FILE` (chunks of 50,000 per POST /v1/rules/bulk, the CLI's default), first
the entries up to the latency stage (100k), where the latencies are taken, then the rest.
The same entries go to `ipset restore` (hash:net) and `nft -f` (a set with `flags interval`)
in our rx namespace; those texts are written before the clock starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.bulkpath import run_bulkpath
from bench.lab import SERVER_LAB_PREFIX, TrafficLab
from bench.lists import Entry, MasterList, entry_text
from bench.ours import pin_dir
from bench.profiles import Profile
from bench.rivals import IptablesIpset, NftSet
from bench.sysutil import log, proc_status_kib, run, stats
from xdpfw.compiler import Capacities
from xdpfw.lab import veth_lab

__all__ = ["run_control"]

XDPFW = str(Path(sys.executable).with_name("xdpfw"))
_ADOPT_RE = re.compile(r"(loaded|adopted) program id (\d+) with (\d+) rules")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `xdpfw serve` process (started and stopped by us, by pid)."""

    def __init__(self, iface: str, state_dir: Path, pins: Path, caps: Capacities) -> None:
        self.iface = iface
        self.state_dir = state_dir
        self.pins = pins
        self.caps = caps
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def start(self, timeout: float) -> float:
        """Start and wait for /healthz 200 (program attached); seconds from exec."""
        argv = [
            XDPFW, "serve", "--iface", self.iface, "--listen", f"127.0.0.1:{self.port}",
            "--state-dir", str(self.state_dir), "--bpffs-dir", str(self.pins),
            "--max-rules", str(self.caps.max_rules),
            "--max-prefixes", str(self.caps.max_prefixes),
            "--max-sets", str(self.caps.max_sets),
        ]  # fmt: skip
        with self.log.open("ab") as logf:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xdpfw serve exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"xdpfw serve not healthy after {timeout:.0f} s")

    def stop(self, timeout: float = 120) -> float:
        """SIGTERM (the program stays attached and pinned); seconds until the process exits."""
        if self.proc is None:
            return 0.0
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        return time.perf_counter() - t0

    def kill(self) -> None:
        """SIGKILL (a start-up still planning rules does not get to its signal handlers)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None

    def cpu_seconds(self) -> float:
        """user + system CPU time of the server process so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> dict[str, int]:
        assert self.proc is not None
        return {
            "rss_kib": proc_status_kib(self.proc.pid, "VmRSS"),
            "hwm_kib": proc_status_kib(self.proc.pid, "VmHWM"),
        }

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def rules_at_start(self) -> int | None:
        found = _ADOPT_RE.findall(self.log.read_text(errors="replace")) if self.log.exists() else []
        return int(found[-1][2]) if found else None


SOURCE = "bench"  # the source the list is imported into (and replaced in)


def _import(srv: Server, path: Path, chunk: int) -> dict[str, Any]:
    """`xdpfw import FILE --source bench` (the CLI), timed."""
    argv = [XDPFW, "--api", srv.url, f"--token={srv.token}", "--timeout", "900", "import",
            str(path), "--chunk", str(chunk), "--source", SOURCE, "--json"]
    t0 = time.perf_counter()
    proc = run(argv, timeout=3600, check=False)
    secs = time.perf_counter() - t0
    try:
        raw = json.loads(proc.stdout)
    except ValueError:
        raw = {"stdout": proc.stdout[-500:]}
    # the CLI lists every id it added: keep counts, not a million numbers
    summary = {k: len(v) if isinstance(v, list) else v for k, v in raw.items()}
    if proc.returncode != 0:
        raise RuntimeError(f"xdpfw import exited {proc.returncode}: {proc.stderr[-800:]}")
    return {"seconds": secs, "summary": summary}


def _latencies(client: httpx.Client, method: str, url: str, n: int, **kw: Any) -> list[float]:
    out: list[float] = []
    for i in range(n):
        body = kw.get("json_fn")
        t0 = time.perf_counter()
        if body is not None:
            r = client.request(method, url, json=body(i))
        else:
            r = client.request(method, url)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    return out


def run_control(p: Profile, lab: TrafficLab, master: MasterList, res: dict[str, Any]) -> None:
    res4: dict[str, Any] = res.setdefault("4", {})
    total, stage = p.bulk_total, min(p.bulk_stage, p.bulk_total)
    n_pfx = total // 8
    res4["list"] = {"entries": total, "prefixes": n_pfx, "hosts": total - n_pfx}
    tmp = Path(tempfile.mkdtemp(prefix="xbn-cp-"))
    pins = pin_dir("srv")
    try:
        (tmp / "stage1.txt").write_text("\n".join(master.lines(stage)) + "\n")
        if total > stage:
            (tmp / "stage2.txt").write_text("\n".join(master.lines(total, stage)) + "\n")
        changed = changed_list(master.take(total))
        (tmp / "changed.txt").write_text("".join(entry_text(e) + "\n" for e in changed))
        _rivals_bulk(p, lab, master, res4)
        res4["bulk_path"] = run_bulkpath(p, master)
        with veth_lab(prefix=SERVER_LAB_PREFIX) as vlab:
            srv = Server(vlab.host_if, tmp / "state", pins, p.server_caps)
            try:
                _with_server(p, srv, tmp, stage, total, res4)
            finally:
                srv.stop()
                res4["server_log_tail"] = srv.tail(1500)
    finally:
        # The veth is gone (the program was detached with it); the pins are ours to remove.
        if pins.is_dir():
            for child in pins.iterdir():
                child.unlink()
            pins.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)


def changed_list(entries: list[Entry]) -> list[Entry]:
    """The list with 1% changed: every 100th entry out, as many new hosts in (10.0.0.0/8:
    outside every range of the master list, so nothing new overlaps)."""
    out = [e for i, e in enumerate(entries) if i % 100 != 99]
    base = 0x0A000000
    out.extend((base + i, 32) for i in range(len(entries) - len(out)))
    return out


def _rivals_bulk(p: Profile, lab: TrafficLab, master: MasterList, res4: dict[str, Any]) -> None:
    entries = master.take(p.bulk_total)
    name = f"xbn_{os.getpid()}_bulk"
    ipt = IptablesIpset(lab, name, entries, ifname="-", settype="hash:net")
    text = ipt.restore_text()
    log(f"item 4: ipset restore of {len(entries):,} entries")
    try:
        res4["ipset_restore_s"] = ipt.create_set(text)
        # The 1% replace as ipset users do it: restore the new version into a second set,
        # swap it in, destroy the old one (one `ipset restore`, text written beforehand).
        new = IptablesIpset(lab, f"{name}_n", changed_list(entries), ifname="-",
                            settype="hash:net")
        swap = new.restore_text() + f"swap {new.name} {name}\ndestroy {new.name}\n"
        log(f"item 4: ipset restore + swap of the 1%-changed {len(new.entries):,} entries")
        res4["ipset_replace_s"] = ipt.create_set(swap)
    finally:
        ipt.destroy()
    nft = NftSet(lab, name, entries, ifname=None, interval=True)
    script = nft.script()
    log(f"item 4: nft -f of {len(entries):,} entries")
    try:
        res4["nft_f_s"] = nft.create(script)
    finally:
        nft.delete()


def _with_server(
    p: Profile, srv: Server, tmp: Path, stage: int, total: int, res4: dict[str, Any]
) -> None:
    log("item 4: starting xdpfw serve (compile + attach)")
    res4["startup_s"] = srv.start(timeout=300)
    res4["rss_empty"] = srv.rss_kib()
    log(f"item 4: xdpfw import of {stage:,} entries")
    bulk = {"stage1": _import(srv, tmp / "stage1.txt", p.bulk_chunk)}
    res4["rss_stage"] = srv.rss_kib()
    with httpx.Client(
        base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=900
    ) as client:
        log(f"item 4: latencies with {stage:,} rules")
        res4["stage_rules"] = stage
        res4["stats_top100_ms"] = stats(
            _latencies(client, "GET", "/v1/stats?top=100", p.stats_samples)
        )
        res4["metrics_ms"] = stats(_latencies(client, "GET", "/metrics", p.metrics_samples))

        def v6(i: int) -> dict[str, str]:
            return {"src": f"2001:db8:aaaa::{i + 1:x}", "comment": "bench single add"}

        t0 = time.perf_counter()
        adds = _latencies(client, "POST", "/v1/rules", p.single_adds, json_fn=v6)
        seq_s = time.perf_counter() - t0
        res4["add_ms"] = stats(adds)
        res4["add_per_s_sequential"] = p.single_adds / seq_s

        def one(i: int) -> float:
            t = time.perf_counter()
            r = client.post("/v1/rules", json=v6(p.single_adds + i))
            r.raise_for_status()
            return (time.perf_counter() - t) * 1000

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            conc = list(pool.map(one, range(p.concurrent_adds)))
        res4["add_ms_4_clients"] = stats(conc)
        res4["add_per_s_4_clients"] = p.concurrent_adds / (time.perf_counter() - t0)

        log(f"item 4: restart with {stage:,} rules pinned")
        res4["stop_s_stage"] = srv.stop()
        res4["restart_s_stage"] = srv.start(timeout=1800)
        res4["rules_after_restart_stage"] = srv.rules_at_start()
        if total > stage:
            log(f"item 4: xdpfw import of the other {total - stage:,} entries")
            bulk["stage2"] = _import(srv, tmp / "stage2.txt", p.bulk_chunk)
        res4["bulk"] = bulk
        res4["bulk_total_s"] = sum(b["seconds"] for b in bulk.values())
        res4["rss_full"] = srv.rss_kib()
        log(f"item 4: latencies with {total:,} rules")
        res4["stats_top100_ms_full"] = stats(
            _latencies(client, "GET", "/v1/stats?top=100", max(3, p.stats_samples // 5))
        )
        res4["metrics_ms_full"] = stats(_latencies(client, "GET", "/metrics", 1))
    log(f"item 4: restart with every rule pinned (given {p.restart_timeout_s:.0f} s)")
    res4["stop_s"] = srv.stop()
    res4["restart_timeout_s"] = p.restart_timeout_s
    try:
        res4["restart_s"] = srv.start(timeout=p.restart_timeout_s)
    except TimeoutError as exc:
        log(f"item 4: {exc}")
        res4["restart_s"] = None
        res4["restart_timed_out"] = True
        res4["restart_cpu_s_at_timeout"] = srv.cpu_seconds()
        srv.kill()
        return
    res4["rules_after_restart"] = srv.rules_at_start()
    res4["rss_after_restart"] = srv.rss_kib()
    _replace(srv, tmp / "changed.txt", total, res4)


def _replace(srv: Server, path: Path, total: int, res4: dict[str, Any]) -> None:
    """PUT /v1/sources/bench with the 1%-changed list (read before the clock starts)."""
    body = path.read_bytes()
    log(f"item 4: PUT /v1/sources/{SOURCE} with 1% of {total:,} entries changed")
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"},
                      timeout=900) as client:
        t0 = time.perf_counter()
        r = client.put(f"/v1/sources/{SOURCE}", content=body,
                       headers={"content-type": "text/plain"})
        res4["replace_s"] = time.perf_counter() - t0
    r.raise_for_status()
    res4["replace"] = {k: v for k, v in r.json().items() if k != "overlaps"}
    res4["rss_after_replace"] = srv.rss_kib()
