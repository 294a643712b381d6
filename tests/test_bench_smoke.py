"""The benchmark's smoke run: every item, tiny sizes, so `bench/` does not rot.

`python -m bench --smoke` runs the same code paths as the full run (xdpfw and xdp-filter test
runs, live traffic from trafgen, every throughput contender, the real server with the CLI
import, ipset restore and nft -f, the plot) with 10-200 rules, 1,000 repetitions and 0.3 s
of traffic. The check is on the shape and sanity of the results, never on speeds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

TOOLS = ("xdp-filter", "trafgen", "nft", "ipset", "iptables", "nsenter", "unshare")
CONTENDERS = {
    "no filter",
    "xdpfw native",
    "xdpfw generic",
    "xdp-filter native",
    "xdp-filter skb",
    "nftables set",
    "iptables+ipset",
}
FRAMES = {"ipv4_hit", "ipv4_miss", "ipv6_hit", "port_hit"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"benchmark tools missing: {', '.join(missing)} (make setup installs them)")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.exists(), f"no results (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    res: dict[str, object] = json.loads(out.read_text())
    assert proc.returncode == 0, f"rc {proc.returncode}, errors {res.get('errors')}\n{proc.stderr}"
    assert "| target |" in proc.stdout  # the Markdown table was printed
    res["_plot"] = str(out.with_suffix(".png"))
    return res


def test_results_shape(smoke: dict[str, object]) -> None:
    res = smoke
    assert res["profile"] == "smoke"
    assert res["errors"] == []
    machine = res["machine"]
    assert isinstance(machine, dict)
    assert machine["kernel"] and machine["cpu_model"]
    assert Path(str(res["_plot"])).stat().st_size > 10_000


def test_item1_test_runs(smoke: dict[str, object]) -> None:
    series = smoke["series"]
    assert isinstance(series, list)
    runs = [r for r in series if "test_run" in r]
    assert [r["rules"] for r in runs] == [1, 10]
    for r in runs:
        tr = r["test_run"]
        assert set(tr) == {"xdpfw", "xdp-filter", "empty"}
        for prog in ("xdpfw", "xdp-filter"):
            assert set(tr[prog]) >= FRAMES
            for frame, v in tr[prog].items():
                assert v["verdict_ok"], (prog, frame, v)
                assert 1 <= v["ns"]["median"] < 100_000
    ablation = smoke["1"]["ablation"]  # type: ignore[index]
    assert ablation[0]["stage"] == "reference programs"
    assert set(ablation[0]["result"]) == {
        "empty",
        "ktime_get_boot_ns",
        "ktime_get_coarse_ns",
        "percpu_hash_lookup",
        "percpu_array_lookup",
    }


def test_item2_live(smoke: dict[str, object]) -> None:
    live = [r["live"] for r in smoke["series"] if "live" in r]  # type: ignore[union-attr]
    assert live
    for lv in live:
        assert lv["packets"] > 0 and lv["ns_per_packet"] > 0
    xf = smoke["2"]["xdp_filter"]  # type: ignore[index]
    assert xf["packets"] > 0 and xf["ns_per_packet"] > 0


def test_item3_throughput(smoke: dict[str, object]) -> None:
    r3 = smoke["3"]
    assert isinstance(r3, dict)
    assert set(r3["contenders"]) == CONTENDERS
    for name, c in r3["contenders"].items():
        assert c["pps"]["median"] > 0, name
        # every frame that arrived was dropped by the contender (the stack, for no filter)
        assert 0.9 <= c["dropped_share"]["median"] <= 1.1, (name, c["dropped_share"])


def test_item4_control_plane(smoke: dict[str, object]) -> None:
    r4 = smoke["4"]
    assert isinstance(r4, dict)
    assert r4["bulk"]["stage1"]["summary"]
    for key in ("ipset_restore_s", "nft_f_s", "bulk_total_s", "startup_s", "restart_s"):
        assert r4[key] > 0, key
    assert r4["add_ms"]["n"] == 5 and r4["add_ms"]["p99"] > 0
    assert r4["stats_top100_ms"]["median"] > 0
    assert r4["rss_full"]["rss_kib"] > 0
    # everything added (bulk 200, singles 5 + 4) is adopted back after the restart
    assert r4["rules_after_restart"] == 209
    assert r4["service_profile"]["profile"]["key_cumtime"]
    # issue 13: the 1% replace of the source against ipset's restore + swap, the cost table
    n = r4["list"]["entries"]
    assert r4["replace"]["added"] == r4["replace"]["removed"] == n // 100
    assert r4["replace"]["unchanged"] == n - n // 100
    assert r4["replace_s"] > 0 and r4["ipset_replace_s"] > 0
    steps = r4["bulk_path"]["steps_s"]
    assert steps["FirewallService.bulk_add_codes (total)"] > 0
    assert r4["bulk_path"]["rules_loaded"] == n
    # the 1% replace in process (item 4e's cost table): a diff of n // 100 each way
    rep = r4["bulk_path"]["replace"]
    assert (rep["added"], rep["removed"], rep["unchanged"]) == (n // 100, n // 100, n - n // 100)
    assert rep["steps_s"]["FirewallService.replace_source (total)"] > 0


def test_targets_listed(smoke: dict[str, object]) -> None:
    ids = {t["id"] for t in smoke["targets"]}  # type: ignore[union-attr]
    assert {"1", "3", "4a", "4b", "4c", "4d", "4e", "4f"} <= ids


def test_floods_quick(tmp_path: Path) -> None:
    """`python -m bench.floods --quick` (issue 16): the test runs, the random-source flood
    and every live part on the veth lab with short windows. Shape and the limit's own
    arithmetic only (the abuser held near its budget, per-CPU buckets passing about twice
    the shared one), never speeds."""
    if shutil.which("trafgen") is None or shutil.which("nft") is None:
        pytest.skip("trafgen and nft are needed (make setup installs them)")
    out = tmp_path / "floods.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.floods", "--quick", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| contender |" in proc.stdout and "| buckets |" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res["cost"]["frames"]) == {"miss", "within", "over", "banned", "drop"}
    assert 0.5 <= res["flood"]["passed_over_allowed"] <= 2.0
    live = res["live"]
    contenders = {"no filter", "xdpfw native", "xdpfw generic", "nftables"}
    assert set(live["side_by_side"]) == set(live["full_speed"]) == contenders
    for name, s in live["side_by_side"].items():
        m = s["median"]
        assert m["rx_pps"] > 0 and m["sender_cpu_ns_per_packet"] > 0, name
        if name != "no filter":  # every limiter holds the abuser near 10,000 pps
            assert 0.5 <= m["abuser_passed_over_limit"] <= 1.5, (name, m)
    for name, s in live["full_speed"].items():
        assert s["median"]["pps"] > 0, name
    assert set(live["cost"]) == {"miss", "within", "over", "mix"}
    for case, row in live["cost"].items():
        assert row["no rules"]["median"] > 0 and row["limit rules"]["median"] > 0, case
    shared, percpu = (live["two_cpus"][k]["median"] for k in ("shared", "per-CPU"))
    assert shared["cpus_running"] == percpu["cpus_running"] == 2
    assert percpu["passed_pps"] > 1.3 * shared["passed_pps"]
