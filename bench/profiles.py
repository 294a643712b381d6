"""Run sizes: full (the published run), quick (minutes), smoke (seconds, the test suite)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from xdpfw.compiler import Capacities

__all__ = ["PROFILES", "Profile"]

XDP_FILTER_MAX = 10_000  # its filter_ipv4/6 maps' max_entries (checked at run time)


@dataclass(frozen=True)
class Profile:
    name: str
    rule_points: tuple[int, ...]  # item 1: test runs at these list sizes
    live_points: tuple[int, ...]  # item 2: live cost at these list sizes
    curve_points: tuple[int, ...]  # item 5: both, at these sizes
    repeat: int  # BPF_PROG_TEST_RUN repeat
    reps: int  # test runs per (program, frame), median reported
    warmup_s: float
    live_window_s: float
    live_rounds: int  # item 2: windows per list size, the best reported
    tput_window_s: float
    rounds: int  # item 3 rounds
    common_list: int  # item 3: every contender holds this many hosts
    bulk_total: int  # item 4: list size loaded through the API and the rivals' tools
    bulk_stage: int  # item 4: latencies measured with this many rules
    bulk_chunk: int  # item 4: entries per API call (the CLI's default chunk)
    single_adds: int
    concurrent_adds: int
    stats_samples: int
    metrics_samples: int
    cli_sample: int  # xdp-filter `ip` calls timed
    profile_rules: int  # cProfile of the service's bulk add (one CLI chunk)
    bulk_compare: int  # item 4: Datapath.add_rules vs add_codes on this many entries
    batch_points: tuple[int, ...]  # Datapath.add_rules of this many mixed rules in one call
    restart_timeout_s: float  # the restart with every rule pinned is given this long
    caps: Capacities
    server_caps: Capacities

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["caps"] = asdict(self.caps)
        d["server_caps"] = asdict(self.server_caps)
        return d

    @property
    def max_rules(self) -> int:
        return max(self.rule_points + self.live_points + self.curve_points)


_DEFAULT = Capacities()  # 1,048,576 rules, 262,144 prefixes per trie, 16,384 sets
_SMALL = Capacities(max_rules=8192, max_prefixes=4096, max_sets=512)

PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        rule_points=(1, 1_000, 100_000, 1_000_000),
        live_points=(1_000, 1_000_000),
        curve_points=(1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
        repeat=1_000_000,
        reps=7,
        warmup_s=0.5,
        live_window_s=1.0,
        live_rounds=5,
        tput_window_s=1.5,
        rounds=9,
        common_list=XDP_FILTER_MAX,
        bulk_total=1_000_000,
        bulk_stage=100_000,
        bulk_chunk=50_000,
        single_adds=1000,
        concurrent_adds=400,
        stats_samples=20,
        metrics_samples=5,
        cli_sample=100,
        profile_rules=20_000,
        bulk_compare=100_000,
        batch_points=(5_000, 10_000, 20_000, 40_000),
        restart_timeout_s=180,
        caps=_DEFAULT,
        server_caps=_DEFAULT,
    ),
    "quick": Profile(
        name="quick",
        rule_points=(1, 1_000, 100_000),
        live_points=(1_000, 100_000),
        curve_points=(1, 100, 10_000, 100_000),
        repeat=200_000,
        reps=3,
        warmup_s=0.3,
        live_window_s=0.7,
        live_rounds=3,
        tput_window_s=1.0,
        rounds=5,
        common_list=XDP_FILTER_MAX,
        bulk_total=100_000,
        bulk_stage=20_000,
        bulk_chunk=50_000,
        single_adds=200,
        concurrent_adds=100,
        stats_samples=10,
        metrics_samples=3,
        cli_sample=20,
        profile_rules=20_000,
        bulk_compare=50_000,
        batch_points=(2_500, 5_000, 10_000),
        restart_timeout_s=300,
        caps=_DEFAULT,
        server_caps=_DEFAULT,
    ),
    "smoke": Profile(
        name="smoke",
        rule_points=(1, 10),
        live_points=(1, 10),
        curve_points=(1, 10),
        repeat=1000,
        reps=1,
        warmup_s=0.1,
        live_window_s=0.3,
        live_rounds=1,
        tput_window_s=0.3,
        rounds=1,
        common_list=10,
        bulk_total=200,
        bulk_stage=100,
        bulk_chunk=100,
        single_adds=5,
        concurrent_adds=4,
        stats_samples=3,
        metrics_samples=2,
        cli_sample=2,
        profile_rules=200,
        bulk_compare=200,
        batch_points=(10, 20),
        restart_timeout_s=120,
        caps=_SMALL,
        server_caps=_SMALL,
    ),
}
