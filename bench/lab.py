"""The traffic lab: two network namespaces of our own, joined by two veth pairs.

    tx namespace                       rx namespace (the filters live here)
    <tx_a> ------------------------> <rx_a>   xdpfw, nftables, iptables+ipset, no filter
    <tx_b> ------------------------> <rx_b>   xdp-filter (kept loaded for its test runs)

Nothing is created in the root namespace: no interface, address, route, rule or set. The
receiving interfaces carry a /32 address each and the rx namespace has no other route, so
the stack never answers a spoofed source (an ICMP error has no route to go out on).

xdp-filter pins its maps under a fixed directory of the first bpffs it finds. To keep its
pins away from the host's /sys/fs/bpf, a small holder process (`sleep`) lives in the rx
namespace with a private mount namespace and a private bpffs mounted on /sys/fs/bpf;
xdp-filter runs inside both namespaces via nsenter. The holder also gives us the rx
namespace's /proc/net (interface and UDP counters) without spawning anything.

Everything is named after our pid (``xbn-<pid>-rx``, ``xbn<pid-hex>ra``, ...), and removed on
exit, also after an error or Ctrl-C; `cleanup_stale` removes what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bench.sysutil import CommandError, log, run
from xdpfw import lab as veth_labs
from xdpfw.kernel import netlink
from xdpfw.lab import pid_alive

__all__ = [
    "HOLDER_LIFETIME_S",
    "SERVER_LAB_PREFIX",
    "Pair",
    "TrafficLab",
    "cleanup_stale",
    "detach_any",
]

SERVER_LAB_PREFIX = "xbs"  # xdpfw.lab.veth_lab prefix of item 4 (distinct from "xbn": see below)
HOLDER_LIFETIME_S = 3600  # the holder exits on its own after this, whatever happens to us
_NS_RE = re.compile(r"^xbn-(\d+)-(rx|tx)$")
_PIN_RE = re.compile(r"^xdpfw-bench-(?:[a-z]+-)?(\d+)-[0-9a-f]+$")
BPFFS = Path("/sys/fs/bpf")


@dataclass(frozen=True)
class Pair:
    name: str  # "a" or "b"
    rx_if: str
    tx_if: str
    rx_ip: str
    rx_mac: str


class TrafficLab:
    def __init__(self, queues: int = 1) -> None:
        """``queues``: rx/tx queues of every veth (bench/floods.py uses two, one per CPU: a
        sender pinned to CPU n with qdisc bypass transmits on queue n, whose NAPI then runs
        native XDP on CPU n)."""
        pid = os.getpid()
        self.queues = queues
        self.pid = pid
        self.rx_ns = f"xbn-{pid}-rx"
        self.tx_ns = f"xbn-{pid}-tx"
        self._names = {p: (f"xbn{pid:x}r{p}", f"xbn{pid:x}t{p}") for p in ("a", "b")}
        self._ips = {"a": "198.19.255.254", "b": "198.19.255.253"}
        self.pairs: dict[str, Pair] = {}
        self.holder: subprocess.Popen[bytes] | None = None
        self._created: list[str] = []

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> TrafficLab:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create(self) -> None:
        for ns in (self.rx_ns, self.tx_ns):
            run(["ip", "netns", "add", ns])
            self._created.append(ns)
        self.rx(["ip", "link", "set", "lo", "up"])
        for p, (rx_if, tx_if) in self._names.items():
            q = ["numtxqueues", str(self.queues), "numrxqueues", str(self.queues)]
            run(["ip", "link", "add", rx_if, "netns", self.rx_ns, *q, "type", "veth",
                 "peer", "name", tx_if, "netns", self.tx_ns, *q])
            self.rx(["ip", "addr", "add", f"{self._ips[p]}/32", "dev", rx_if])
            for ns, ifn in ((self.rx_ns, rx_if), (self.tx_ns, tx_if)):
                run(["ip", "-n", ns, "link", "set", ifn, "up"])
            out = run(["ip", "-n", self.rx_ns, "-o", "link", "show", rx_if]).stdout
            m = re.search(r"link/ether ([0-9a-f:]{17})", out)
            if not m:
                raise RuntimeError(f"no MAC address for {rx_if}: {out}")
            self.pairs[p] = Pair(p, rx_if, tx_if, self._ips[p], m.group(1))
        # Explicit, so the "no filter" baseline does not depend on the host's defaults: no
        # reverse-path filter (a spoofed source reaches UDP, which finds no socket).
        sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        sysctls += [f"net.ipv4.conf.{p.rx_if}.rp_filter=0" for p in self.pairs.values()]
        self.rx(["sysctl", "-q", "-w", *sysctls])
        self._start_holder()

    def _start_holder(self) -> None:
        script = f"mount -t bpf bpf {BPFFS} && exec sleep {HOLDER_LIFETIME_S}"
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.rx_ns, "unshare", "--mount", "--propagation",
             "private", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        mountinfo = Path(f"/proc/{self.holder.pid}/mountinfo")
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                err = self.holder.stderr.read().decode() if self.holder.stderr else ""
                raise RuntimeError(f"the bpffs holder exited {self.holder.returncode}: {err}")
            with contextlib.suppress(OSError):
                if any(
                    f" {BPFFS} " in line and " - bpf " in line
                    for line in mountinfo.read_text().splitlines()
                ):
                    return
            time.sleep(0.05)
        raise RuntimeError("the bpffs holder did not mount its private bpffs in 10 s")

    def close(self) -> None:
        """Detach whatever XDP program is on our interfaces, stop the holder, delete both
        namespaces (the veths go with them). Best effort; the first error is re-raised."""
        errors: list[BaseException] = []
        if self.rx_ns in self._created:
            for rx_if, _ in self._names.values():
                try:
                    detach_any(rx_if, self.rx_ns)
                except Exception as exc:
                    errors.append(exc)
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.send_signal(signal.SIGTERM)
                try:
                    self.holder.wait(5)
                except subprocess.TimeoutExpired:
                    self.holder.kill()
                    self.holder.wait(5)
            self.holder = None
        for ns in reversed(self._created):
            try:
                run(["ip", "netns", "del", ns], timeout=30)
            except Exception as exc:
                errors.append(exc)
        self._created.clear()
        if errors:
            raise errors[0]

    # -- running things ------------------------------------------------------------------------

    def rx(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command in the rx namespace."""
        return run(["ip", "netns", "exec", self.rx_ns, *argv], **kw)  # type: ignore[arg-type]

    def bpffs(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command in the rx namespace with the private bpffs (xdp-filter)."""
        assert self.holder is not None
        return run(
            ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv],
            **kw,  # type: ignore[arg-type]
        )

    @property
    def holder_root(self) -> Path:
        """The holder's view of the filesystem (its private bpffs is under sys/fs/bpf)."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root")

    # -- counters ------------------------------------------------------------------------------

    def rx_packets(self, ifname: str) -> int:
        """Frames the interface received (native XDP drops included), from /proc/net/dev."""
        assert self.holder is not None
        for line in Path(f"/proc/{self.holder.pid}/net/dev").read_text().splitlines():
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                return int(rest.split()[1])
        raise RuntimeError(f"{ifname} not in the rx namespace's /proc/net/dev")

    def udp_noports(self) -> int:
        """UDP datagrams the rx namespace's stack dropped for want of a socket."""
        assert self.holder is not None
        lines = [
            ln.split()
            for ln in Path(f"/proc/{self.holder.pid}/net/snmp").read_text().splitlines()
            if ln.startswith("Udp:")
        ]
        head, vals = lines[0], lines[1]
        return int(vals[head.index("NoPorts")])


def detach_any(ifname: str, netns: str) -> None:
    """Detach whatever XDP program is attached to our interface ``ifname`` in ``netns``."""
    try:
        state = netlink.xdp_state(ifname, netns=netns)
    except netlink.NetlinkOpError:
        return  # namespace or interface already gone
    if state.prog_id:
        netlink.xdp_detach(ifname, "auto", netns=netns, expected_prog_id=state.prog_id)


def cleanup_stale() -> list[str]:
    """Remove namespaces, bench pins and server labs left by bench runs that no longer live."""
    removed: list[str] = []
    try:
        names = run(["ip", "netns", "list"], check=False).stdout.split()
    except OSError:
        names = []
    for ns in names:
        m = _NS_RE.match(ns)
        if not m or pid_alive(int(m.group(1))):
            continue
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for p in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p), signal.SIGKILL)
        with contextlib.suppress(CommandError):
            run(["ip", "netns", "del", ns])
            removed.append(f"netns {ns}")
    if BPFFS.is_dir():
        for d in BPFFS.iterdir():
            m = _PIN_RE.match(d.name)
            if not m or pid_alive(int(m.group(1))) or not d.is_dir():
                continue
            for child in d.iterdir():
                child.unlink()
            d.rmdir()
            removed.append(f"pins {d}")
    # The control-plane item runs its server on an xdpfw.lab.veth_lab named with this prefix.
    removed += [f"lab {x}" for x in veth_labs.cleanup_stale(SERVER_LAB_PREFIX)]
    if removed:
        log(f"removed leftovers of earlier runs: {', '.join(removed)}")
    return removed
