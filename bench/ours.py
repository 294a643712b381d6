"""xdpfw as the benchmark drives it: the Datapath directly (no API), in our namespaces.

The program is loaded with the default capacities (1,048,576 rules, 262,144 prefixes per
trie, 16,384 sets), which hold the 1M-entry list, and pinned under a unique directory that
is removed on exit. It is attached only to our rx interfaces (netlink in the rx namespace);
Datapath.close(cleanup=True) then unpins (it detaches only root-namespace attachments, and
we have none).
"""

from __future__ import annotations

import ipaddress
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from bench.lists import Entry
from bench.sysutil import log
from xdpfw.compiler import Capacities
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.kernel import netlink
from xdpfw.rules import PortRange, Proto, Rule

__all__ = ["FIXTURE_IDS", "Ours", "entry_rules", "pin_dir"]

# Rules per Datapath.add_rules call. The compiler's planning is quadratic in the prefixes of
# one call (see docs/benchmarks.md), so the bench adds in small calls: 5,000 rules per call
# load 100k mixed rules in ~5 s, 50,000 per call in ~30 s.
CHUNK = 5_000
FIXTURE_IDS = (1, 2, 3)
FIRST_LIST_ID = 16


def pin_dir(tag: str) -> Path:
    return Path(f"/sys/fs/bpf/xdpfw-bench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def entry_rules(entries: Sequence[Entry], first_id: int) -> list[Rule]:
    """Drop rules on the source networks of ``entries`` (ids first_id, first_id + 1, ...)."""
    net = ipaddress.IPv4Network
    return [Rule(id=first_id + i, src=net(e)) for i, e in enumerate(entries)]


class Ours:
    """The loaded program plus the list slice currently in it."""

    def __init__(self, caps: Capacities) -> None:
        self.pins = pin_dir("dp")
        self.dp = Datapath.open(DatapathConfig(bpffs_dir=self.pins, caps=caps))
        self.caps = caps
        self.n_list = 0  # list entries currently loaded (ids FIRST_LIST_ID ...)
        self.attached: tuple[str, str] | None = None  # (ifname, netns)

    def __enter__(self) -> Ours:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.detach()
        finally:
            self.dp.close(cleanup=True)

    @property
    def prog_fd(self) -> int:
        return self.dp.prog_fd

    @property
    def prog_id(self) -> int:
        return self.dp.prog_id

    # -- rules ---------------------------------------------------------------------------------

    def add_fixtures(self, v6_hit: str, port: int) -> None:
        """The rules the test-run frames hit that the list does not hold: an IPv6 host and a
        protocol+port rule (the IPv4 hit is the list's first host)."""
        self.dp.add_rules([
            Rule(id=FIXTURE_IDS[1], src=ipaddress.IPv6Network(v6_hit)),
            Rule(id=FIXTURE_IDS[2], proto=Proto.TCP, dport=PortRange(port, port)),
        ])

    def grow_list(self, entries: Sequence[Entry]) -> float:
        """Append list entries (the caller passes entries [n_list, n_list + k)); seconds."""
        t0 = time.perf_counter()
        rules = entry_rules(entries, FIRST_LIST_ID + self.n_list)
        for i in range(0, len(rules), CHUNK):
            self.dp.add_rules(rules[i : i + CHUNK])
        self.n_list += len(rules)
        return time.perf_counter() - t0

    def clear_list(self) -> None:
        ids = range(FIRST_LIST_ID, FIRST_LIST_ID + self.n_list)
        for i in range(0, len(ids), CHUNK):
            self.dp.remove_rules(ids[i : i + CHUNK])
        self.n_list = 0

    def drops(self) -> int:
        return self.dp.global_counters().dropped

    # -- attachment ----------------------------------------------------------------------------

    def attach(self, ifname: str, netns: str, mode: str) -> str:
        """Attach to our interface in our namespace; returns the mode the kernel took."""
        self.detach()
        state = netlink.xdp_attach(ifname, self.dp.prog_fd, mode, netns=netns)
        self.attached = (ifname, netns)
        if state.prog_id != self.dp.prog_id:
            raise RuntimeError(f"attach to {ifname}: program id {state.prog_id} is attached")
        return state.mode

    def detach(self) -> None:
        if self.attached is None:
            return
        ifname, netns = self.attached
        self.attached = None
        try:
            state = netlink.xdp_state(ifname, netns=netns)
        except netlink.NetlinkOpError as exc:
            log(f"detach: {ifname} is gone ({exc})")
            return
        if state.prog_id == self.dp.prog_id:
            netlink.xdp_detach(ifname, "auto", netns=netns, expected_prog_id=self.dp.prog_id)
