"""The rivals, as a user would set them up from the Debian packages, in our rx namespace.

- xdp-filter (xdp-tools): `xdp-filter load -m native|skb <if>`; addresses with
  `xdp-filter ip <addr> -m src`, ports with `xdp-filter port`. Its maps are per-CPU hashes of
  10,000 entries (compiled in), so that is the largest list it accepts. Adding addresses one
  CLI call at a time is slow (the call is timed on a sample); the rest of a list is written
  straight into its pinned map in the exact format the CLI writes (checked against entries
  the CLI added).
- nftables: a netdev table with an ingress chain on our interface, `ip saddr @set counter
  drop`; the set is a plain hash of addresses, or `flags interval` when the list holds
  prefixes.
- iptables + ipset: `iptables -t raw -I PREROUTING -i <if> -m set --match-set S src -j DROP`
  with an ipset `hash:ip` (hosts) or `hash:net` (prefixes) set.

Every table, set and rule is named after our pid and removed on exit; all of them live in the
rx namespace, and the chains and rules match only our interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from typing import Any

from bench.lab import Pair, TrafficLab, detach_any
from bench.lists import Entry, addr_text, entry_text
from bench.sysutil import CommandError, log
from xdpfw.kernel import bpfsys, netlink

__all__ = ["IptablesIpset", "NftMeter", "NftSet", "NftSourceCounter", "XdpFilter"]

_U64 = ctypes.c_uint64
MAP_FLAG_SRC = 1 << 0  # xdp-filter common_kern_user.h
MAP_FLAG_DST = 1 << 1
MAP_FLAG_TCP = 1 << 2
XDP_DROP = 1


class _DataRec(ctypes.Structure):
    _fields_ = (("rx_packets", ctypes.c_uint64), ("rx_bytes", ctypes.c_uint64))


class XdpFilter:
    """xdp-filter (blocklist mode: unmatched packets pass) on ``pair``'s rx interface."""

    def __init__(self, lab: TrafficLab, pair: Pair) -> None:
        self.lab = lab
        self.pair = pair
        self.mode = ""
        self.prog_id = 0
        self.prog_name = ""
        self.loaded = False

    # -- load / unload -------------------------------------------------------------------------

    def load(self, mode: str) -> None:
        """mode: native | skb. Keeps the maps of an earlier load (pinned by name)."""
        if self.loaded:
            self.unload(keep_maps=True)
        self.lab.bpffs(["xdp-filter", "load", "-m", mode, self.pair.rx_if], timeout=60)
        self.loaded = True
        self.mode = mode
        state = netlink.xdp_state(self.pair.rx_if, netns=self.lab.rx_ns)
        self.prog_id = state.prog_id
        fd = bpfsys.prog_get_fd_by_id(self.prog_id)
        try:
            self.prog_name = bpfsys.prog_info(fd).name
        finally:
            os.close(fd)

    @property
    def dispatcher(self) -> bool:
        """True when libxdp attached its dispatcher (then that is what runs and is measured)."""
        return not self.prog_name.startswith("xdpfilt")

    def unload(self, keep_maps: bool) -> None:
        if not self.loaded:
            return
        self.loaded = False
        argv = ["xdp-filter", "unload", self.pair.rx_if]
        try:
            self.lab.bpffs([*argv, "--keep-maps"] if keep_maps else argv, timeout=60)
        finally:
            detach_any(self.pair.rx_if, self.lab.rx_ns)  # whatever the CLI left behind

    def close(self) -> None:
        try:
            self.unload(keep_maps=False)
        except CommandError as exc:
            log(f"xdp-filter unload: {exc}")
            detach_any(self.pair.rx_if, self.lab.rx_ns)

    def prog_fd(self) -> int:
        """A new fd for the attached program (the caller closes it)."""
        return bpfsys.prog_get_fd_by_id(self.prog_id)

    # -- rules ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _map(self, name: str, value: type[Any] = _U64) -> Iterator[bpfsys.Map[Any, Any]]:
        path = self.lab.holder_root / "sys/fs/bpf/xdp-filter" / name
        keys: dict[str, type[Any]] = {
            "filter_ipv4": ctypes.c_uint32,
            "filter_ipv6": ctypes.c_uint8 * 16,
            "filter_ports": ctypes.c_uint32,
            "xdp_stats_map": ctypes.c_uint32,
        }
        key = keys[name]
        m = bpfsys.Map.from_pin(str(path), key, value, name)
        try:
            yield m
        finally:
            m.close()

    def cli(self, *args: str) -> float:
        """One xdp-filter command; its wall time in seconds."""
        t0 = time.perf_counter()
        self.lab.bpffs(["xdp-filter", *args], timeout=30)
        return time.perf_counter() - t0

    def add_fixtures(self, v6_hit: str, port: int) -> None:
        self.cli("ip", v6_hit, "-m", "src")
        self.cli("port", str(port), "-p", "tcp", "-m", "dst")

    def cli_sample(self, hosts: Sequence[int]) -> list[float]:
        """Add hosts with the CLI, one call each (the way its docs add addresses)."""
        return [self.cli("ip", addr_text(h), "-m", "src") for h in hosts]

    def check_format(self, host: int) -> bool:
        """Does a CLI-added entry hold exactly the value we write directly?"""
        with self._map("filter_ipv4") as m:
            raw = m.lookup_raw(struct.pack("!I", host))
        if raw is None:
            return False
        want = struct.pack("=Q", MAP_FLAG_SRC)
        return all(raw[i : i + 8] == want for i in range(0, len(raw), 8))

    def fill_ipv4(self, hosts: Sequence[int]) -> int:
        """Make the IPv4 map hold exactly ``hosts`` (source mode); returns how many."""
        with self._map("filter_ipv4") as m:
            old = [bytes(k) for k in m]
            for i in range(0, len(old), 8192):
                m.delete_batch(old[i : i + 8192])
            keys = [struct.pack("!I", h) for h in hosts]
            val = struct.pack("=Q", MAP_FLAG_SRC)
            for i in range(0, len(keys), 8192):
                part = keys[i : i + 8192]
                m.update_batch(part, [val] * len(part))
            return len(keys)

    def ipv4_max_entries(self) -> int:
        with self._map("filter_ipv4") as m:
            return m.info.max_entries

    def capacity(self) -> dict[str, Any]:
        """max_entries of the IPv4 map, and what the kernel says to one entry more."""
        with self._map("filter_ipv4") as m:
            max_entries = m.info.max_entries
            n = sum(1 for _ in m)
            refused = ""
            if n >= max_entries:
                try:
                    m.update(struct.pack("!I", 0xCB007101), struct.pack("=Q", MAP_FLAG_SRC))
                except OSError as exc:
                    refused = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                else:
                    m.delete(struct.pack("!I", 0xCB007101))
                    refused = "accepted"
        return {"max_entries": max_entries, "entries": n, "one_more": refused}

    def drops(self) -> int:
        with self._map("xdp_stats_map", _DataRec) as m:
            per_cpu = m.lookup_percpu(ctypes.c_uint32(XDP_DROP)) or []
        return sum(int(v.rx_packets) for v in per_cpu)


class NftSet:
    """A netdev table holding one set of the list, optionally with an ingress drop chain."""

    def __init__(
        self,
        lab: TrafficLab,
        name: str,
        entries: Sequence[Entry],
        *,
        ifname: str | None,
        interval: bool,
    ) -> None:
        self.lab = lab
        self.name = name
        self.entries = entries
        self.ifname = ifname
        self.interval = interval
        self.created = False

    def script(self) -> str:
        lines = [f"table netdev {self.name} {{", "  set blk {", "    type ipv4_addr"]
        if self.interval:
            lines.append("    flags interval")
        if self.entries:
            lines.append("    elements = {")
            for i in range(0, len(self.entries), 512):
                part = self.entries[i : i + 512]
                lines.append("      " + ", ".join(entry_text(e) for e in part) + ",")
            lines.append("    }")
        lines.append("  }")
        if self.ifname is not None:
            lines += [
                "  chain in {",
                f'    type filter hook ingress device "{self.ifname}" priority 0; policy accept;',
                "    ip saddr @blk counter drop",
                "  }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def create(self, script: str | None = None) -> float:
        """`nft -f` the table; returns its wall time in seconds."""
        text = script if script is not None else self.script()
        self.created = True
        t0 = time.perf_counter()
        self.lab.rx(["nft", "-f", "-"], input=text, timeout=900)
        return time.perf_counter() - t0

    def delete(self) -> None:
        if self.created:
            self.created = False
            self.lab.rx(["nft", "delete", "table", "netdev", self.name], timeout=300)

    def drops(self) -> int:
        return _nft_chain_drops(self.lab, self.name)


class IptablesIpset:
    """An ipset set of the list and, when wanted, one iptables raw PREROUTING drop rule."""

    def __init__(
        self,
        lab: TrafficLab,
        name: str,
        entries: Sequence[Entry],
        *,
        ifname: str,
        settype: str,
    ) -> None:
        self.lab = lab
        self.name = name
        self.entries = entries
        self.ifname = ifname
        self.settype = settype
        self.set_created = False
        self.rule_added = False

    def restore_text(self) -> str:
        size = max(1024, 1 << (len(self.entries) - 1).bit_length()) if self.entries else 1024
        head = (
            f"create {self.name} {self.settype} family inet hashsize {size} "
            f"maxelem {max(65536, 2 * len(self.entries))}\n"
        )
        return head + "".join(f"add {self.name} {entry_text(e)}\n" for e in self.entries)

    def create_set(self, text: str | None = None) -> float:
        """`ipset restore` the set; returns its wall time in seconds."""
        body = text if text is not None else self.restore_text()
        self.set_created = True
        t0 = time.perf_counter()
        self.lab.rx(["ipset", "restore"], input=body, timeout=900)
        return time.perf_counter() - t0

    def _rule(self) -> list[str]:
        return ["PREROUTING", "-i", self.ifname, "-m", "set", "--match-set", self.name, "src",
                "-j", "DROP"]

    def add_rule(self) -> None:
        self.rule_added = True
        self.lab.rx(["iptables", "-w", "-t", "raw", "-I", *self._rule()])

    def del_rule(self) -> None:
        if self.rule_added:
            self.rule_added = False
            self.lab.rx(["iptables", "-w", "-t", "raw", "-D", *self._rule()])

    def destroy(self) -> None:
        try:
            self.del_rule()
        finally:
            if self.set_created:
                self.set_created = False
                self.lab.rx(["ipset", "destroy", self.name], timeout=300)

    def drops(self) -> int:
        out = self.lab.rx(["iptables", "-w", "-t", "raw", "-nvxL", "PREROUTING"]).stdout
        pat = re.compile(rf"match-set {re.escape(self.name)} src")
        for line in out.splitlines():
            if pat.search(line):
                return int(line.split()[0])
        raise RuntimeError(f"no iptables rule for set {self.name}")


class NftMeter:
    """nftables' per-source rate limit as its docs write it: a netdev ingress chain on our
    interface with a dynamic set (what `meter` creates under the hood) keyed by the source,
    `update @set { ip saddr limit rate over N/second burst B packets } counter drop`; the rule
    matches ``src`` (a CIDR), as the xdpfw limit rule does."""

    def __init__(self, lab: TrafficLab, name: str, ifname: str, src: str, pps: int,
                 burst: int, size: int = 65536) -> None:
        self.lab = lab
        self.name = name
        self.ifname = ifname
        self.src = src
        self.pps = pps
        self.burst = burst
        self.size = size
        self.created = False

    def script(self) -> str:
        return "\n".join([
            f"table netdev {self.name} {{",
            f"  set perip {{ type ipv4_addr; size {self.size}; flags dynamic; }}",
            "  chain in {",
            f'    type filter hook ingress device "{self.ifname}" priority 0; policy accept;',
            f"    ip saddr {self.src} update @perip {{ ip saddr limit rate over "
            f"{self.pps}/second burst {self.burst} packets }} counter drop",
            "  }",
            "}",
        ]) + "\n"

    def create(self) -> None:
        self.created = True
        self.lab.rx(["nft", "-f", "-"], input=self.script(), timeout=60)

    def delete(self) -> None:
        if self.created:
            self.created = False
            self.lab.rx(["nft", "delete", "table", "netdev", self.name], timeout=60)

    def drops(self) -> int:
        return _nft_chain_drops(self.lab, self.name)


class NftSourceCounter:
    """Counters of what got past the filter, per source: an `ip` table whose prerouting chain
    (priority -300, before conntrack) counts each source given. It sits behind XDP and the
    netdev ingress hook, so it sees only what the contender let through; the same table is
    in place for every contender, so its cost is the same for all."""

    def __init__(self, lab: TrafficLab, name: str, sources: Sequence[str]) -> None:
        self.lab = lab
        self.name = name
        self.sources = list(sources)
        self.created = False

    def create(self) -> None:
        rules = "".join(f"    ip saddr {s} counter\n" for s in self.sources)
        text = (f"table ip {self.name} {{\n  chain pre {{\n"
                "    type filter hook prerouting priority -300; policy accept;\n"
                f"{rules}  }}\n}}\n")
        self.created = True
        self.lab.rx(["nft", "-f", "-"], input=text, timeout=60)

    def delete(self) -> None:
        if self.created:
            self.created = False
            self.lab.rx(["nft", "delete", "table", "ip", self.name], timeout=60)

    def counts(self) -> dict[str, int]:
        out = self.lab.rx(["nft", "-j", "list", "chain", "ip", self.name, "pre"]).stdout
        got: list[int] = []
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    got.append(int(expr["counter"]["packets"]))
        if len(got) != len(self.sources):
            raise RuntimeError(f"nft chain {self.name}/pre: {len(got)} counters")
        return dict(zip(self.sources, got, strict=True))


def _nft_chain_drops(lab: Any, table: str) -> int:
    """Packets counted by the drop rule's counter in chain `in` of netdev table `table`."""
    out = lab.rx(["nft", "-j", "list", "chain", "netdev", table, "in"]).stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise RuntimeError(f"no counter in nft chain {table}/in")
