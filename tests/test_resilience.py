"""Keep filtering through crashes, restarts, bad input and mistakes (e2e layer)."""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_CAPS, unique_pin_dir
from tests.server import Server, running_server
from tests.traffic import udp_roundtrip
from xdpfw import abi
from xdpfw.datapath.pins import MAP_TYPES
from xdpfw.kernel import bpfsys

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, unique_pin_dir("res")) as srv:
        yield srv


def dump_maps(pin_dir: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every map's raw contents (per-CPU counters excluded: traffic may move them)."""
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, (key_t, val_t) in MAP_TYPES.items():
        if name in ("xdpfw_stats", "xdpfw_rule_stats"):
            continue
        if name == "xdpfw_samples":  # X-ray's ring buffer: records in flight, no entries
            continue
        with bpfsys.Map.from_pin(str(pin_dir / name), key_t, val_t, name) as m:
            if name.endswith(abi.D248_PARTS):  # big arrays (tbl24: 2^20 rows): one blob
                out[name] = [(b"", m.read_array(m.info.max_entries))]
            else:
                out[name] = sorted(m.dump_raw())
    return out


def test_kill_9_keeps_dropping_and_restart_adopts(server: Server) -> None:
    """kill -9 while traffic flows: drops continue, counters count, restart adopts."""
    lab = server.lab
    with server.client() as c:
        prog_id = c.get("/healthz").json()["prog_id"]
        rid = c.post("/v1/rules", json={"src": lab.peer_ip4}).json()["id"]
        rules_before = c.get("/v1/rules").json()["rules"]

    stop = threading.Event()
    received: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            received.append(udp_roundtrip(lab, count=10, settle=0.05))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.3)
        assert server.proc is not None
        server.proc.kill()  # SIGKILL: no cleanup of any kind
        server.proc.wait()
        server.proc = None
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert received and sum(received) == 0, "a blocked source got through"
    out = subprocess.run(["ip", "-d", "link", "show", lab.host_if], capture_output=True,
                         text=True).stdout
    assert f"prog/xdp id {prog_id}" in out

    server.start()
    with server.client() as c:
        health = c.get("/healthz").json()
        assert health["prog_id"] == prog_id and health["adopted"]
        assert c.get("/v1/rules").json()["rules"] == rules_before
        sent = 10 * len(received)
        assert c.get(f"/v1/rules/{rid}").json()["counters"]["packets"] == sent


def test_abi_mismatch_refuses_and_keeps_pins(server: Server) -> None:
    with server.client() as c:
        c.post("/v1/rules", json={"src": "198.18.230.0/24"})
    server.stop()
    with bpfsys.Map.from_pin(
        str(server.bpffs_dir / "xdpfw_config"), ctypes.c_uint32, abi.Config, "cfg"
    ) as m:
        conf = m.lookup(ctypes.c_uint32(0))
        assert conf is not None
        conf.abi_version = 999
        m.update(ctypes.c_uint32(0), conf)
    before = dump_maps(server.bpffs_dir)
    with pytest.raises(RuntimeError) as err:
        server.start(timeout=30)
    assert "ABI version 999" in str(err.value)
    # which version the pins speak, which this build speaks, and where
    assert f"in {server.bpffs_dir} speak ABI version 999" in str(err.value)
    assert f"this build speaks ABI version {abi.ABI_VERSION}" in str(err.value)
    assert "--bpffs-dir" in str(err.value)  # says how to get out of it
    assert dump_maps(server.bpffs_dir) == before
    # Put it back so the fixture can clean up through the normal path.
    with bpfsys.Map.from_pin(
        str(server.bpffs_dir / "xdpfw_config"), ctypes.c_uint32, abi.Config, "cfg"
    ) as m:
        conf.abi_version = abi.ABI_VERSION
        m.update(ctypes.c_uint32(0), conf)


def test_pins_of_the_previous_abi_are_refused_with_both_versions() -> None:
    """Pins recorded as ABI N-1 (e.g. ABI 2's 24-byte xdpfw_rule_stats): refused, untouched,
    and the error names both versions and how to migrate."""
    from xdpfw.datapath import Datapath, DatapathConfig
    from xdpfw.errors import AbiMismatch
    from xdpfw.rules import RuleSpec

    cfg = DatapathConfig(bpffs_dir=unique_pin_dir("abi"), caps=TEST_CAPS)
    dp = Datapath.open(cfg)
    try:
        dp.add_rule(RuleSpec.parse(src="198.18.231.0/24").with_id(1))
        conf = dp.map("xdpfw_config").lookup(ctypes.c_uint32(0))
        assert conf is not None
        conf.abi_version = abi.ABI_VERSION - 1
        dp.map("xdpfw_config").update(ctypes.c_uint32(0), conf)
        before = dump_maps(cfg.bpffs_dir)
        with pytest.raises(AbiMismatch) as err:
            Datapath.open(cfg).close()
        msg = str(err.value)
        assert f"pinned maps in {cfg.bpffs_dir} speak ABI version {abi.ABI_VERSION - 1}" in msg
        assert f"this build speaks ABI version {abi.ABI_VERSION}" in msg
        assert "To migrate" in msg and f"detach --cleanup --bpffs-dir {cfg.bpffs_dir}" in msg
        assert dump_maps(cfg.bpffs_dir) == before
    finally:
        dp.close(cleanup=True)
    assert not cfg.bpffs_dir.exists()


@pytest.mark.skipif(shutil.which("xdp-filter") is None, reason="xdp-tools not installed")
def test_foreign_xdp_program_is_left_alone(tmp_path: Path) -> None:
    with running_server(tmp_path, unique_pin_dir("foreign"), start=False) as srv:
        lab = srv.lab
        subprocess.run(["xdp-filter", "load", "-m", "skb", lab.host_if], check=True,
                       capture_output=True)
        try:
            before = subprocess.run(["ip", "-d", "link", "show", lab.host_if],
                                    capture_output=True, text=True).stdout
            assert "prog/xdp" in before
            with pytest.raises(RuntimeError) as err:
                srv.start(timeout=30)
            assert "did not attach" in str(err.value) and "program id" in str(err.value)
            after = subprocess.run(["ip", "-d", "link", "show", lab.host_if],
                                   capture_output=True, text=True).stdout
            assert after == before
        finally:
            subprocess.run(["xdp-filter", "unload", lab.host_if], capture_output=True)


def test_bulk_with_one_bad_line_leaves_maps_byte_identical(server: Server) -> None:
    with server.client() as c:
        c.post("/v1/rules/bulk", content="198.18.40.0/24\n198.18.41.7\n2001:db8:40::/48\n",
               headers={"content-type": "text/plain"})
        before = dump_maps(server.bpffs_dir)
        lines = [f"198.18.{42 + i // 250}.{i % 250 + 1}" for i in range(1000)]
        lines[537] = "198.18.300.1"
        r = c.post("/v1/rules/bulk", content="\n".join(lines),
                   headers={"content-type": "text/plain"})
        assert r.status_code == 422 and "538" in r.json()["errors"][0]["msg"]
        assert dump_maps(server.bpffs_dir) == before
        assert len(c.get("/v1/rules").json()["rules"]) == 3


def test_capacity_reached_is_clear_and_evicts_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path, unique_pin_dir("cap"), start=False) as srv:
        srv.extra_args = ["--max-rules", "64"]
        srv.start()
        with srv.client() as c:
            body = "\n".join(f"198.18.60.{i}" for i in range(1, 65))
            r = c.post("/v1/rules/bulk", content=body, headers={"content-type": "text/plain"})
            assert r.status_code == 201 and r.json()["added"] == 64
            r = c.post("/v1/rules", json={"src": "198.18.61.1"})
            assert r.status_code == 507
            assert r.json()["limit"] == 64 and "full" in r.json()["detail"]
            rules = c.get("/v1/rules?limit=1000").json()["rules"]
            assert len(rules) == 64
            # Still enforced: the first and the last rule.
            assert {rules[0]["src"], rules[-1]["src"]} == {"198.18.60.1/32", "198.18.60.64/32"}


def test_sigterm_then_restart_has_no_gap(server: Server) -> None:
    lab = server.lab
    with server.client() as c:
        c.post("/v1/rules", json={"src": lab.peer_ip6})
    assert server.stop(signal.SIGTERM) == 0
    assert udp_roundtrip(lab, family=6, count=10) == 0
    server.start()
    assert udp_roundtrip(lab, family=6, count=10) == 0


def test_protected_prefixes_cannot_be_dropped(tmp_path: Path) -> None:
    with running_server(tmp_path, unique_pin_dir("prot"), start=False) as srv:
        lab = srv.lab
        net = lab.peer_ip4.rsplit(".", 1)[0]
        srv.extra_args = ["--protect", f"{lab.peer_ip4}/32", "--protect", "2001:db8:ffff::/48"]
        srv.start()
        with srv.client() as c:
            assert c.get("/healthz").json()["protected"] == [
                f"{lab.peer_ip4}/32", "2001:db8:ffff::/48"]
            for body in ({"src": f"{net}.0/24"}, {"src": lab.peer_ip4},
                         {"proto": "udp", "dport": 9999}, {"src": "2001:db8:ffff:1::/64"}):
                r = c.post("/v1/rules", json=body)
                assert r.status_code == 409, (body, r.text)
                assert "protected prefix" in r.json()["detail"]
            r = c.post("/v1/rules/bulk", content=f"{net}.0/24\n",
                       headers={"content-type": "text/plain"})
            assert r.status_code == 409
            # Monitor and allow rules are fine, and so are other sources.
            assert c.post("/v1/rules", json={"src": f"{net}.0/24", "mode": "monitor"}
                          ).status_code == 201
            assert c.post("/v1/rules", json={"src": "198.18.255.0/24"}).status_code == 201
            # force adds it, but the data plane still lets the protected source through.
            r = c.post("/v1/rules", json={"src": f"{net}.0/24", "force": True})
            assert r.status_code == 201
            assert udp_roundtrip(lab, count=10) == 10
            stats = {x["id"]: x["packets"] for x in c.get("/v1/stats").json()["rules"]}
            assert stats[r.json()["id"]] == 0
            protected_ids = [rid for rid, n in stats.items() if n == 10]
            assert len(protected_ids) == 1 and protected_ids[0] > 1 << 28
            assert c.delete(f"/v1/rules/{protected_ids[0]}").status_code == 404
        # Restart without --protect: the protected allow rule goes, the forced drop applies.
        srv.stop()
        srv.extra_args = []
        srv.start()
        assert udp_roundtrip(lab, count=10) == 0


def test_program_upgrade_swaps_without_gap(server: Server) -> None:
    """A pinned program from another build is replaced atomically; rules and counters stay."""
    lab = server.lab
    with server.client() as c:
        old_id = c.get("/healthz").json()["prog_id"]
        rid = c.post("/v1/rules", json={"src": lab.peer_ip4}).json()["id"]
        c.post("/v1/rules", json={"src": "198.18.77.0/24", "proto": "tcp", "dport": "1-1024"})
        assert udp_roundtrip(lab, count=10) == 0
        rules_before = c.get("/v1/rules").json()["rules"]
    server.stop()
    # Pretend the pinned program came from another build.
    with bpfsys.Map.from_pin(
        str(server.bpffs_dir / "xdpfw_config"), ctypes.c_uint32, abi.Config, "cfg"
    ) as m:
        conf = m.lookup(ctypes.c_uint32(0))
        assert conf is not None
        conf.build_id[:] = b"oldbuild"
        m.update(ctypes.c_uint32(0), conf)

    stop = threading.Event()
    received: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            received.append(udp_roundtrip(lab, count=5, settle=0.05))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        server.start()
    finally:
        stop.set()
        t.join()
    assert sum(received) == 0, "blocked traffic passed during the upgrade"
    with server.client() as c:
        health = c.get("/healthz").json()
        assert health["prog_id"] != old_id and health["status"] == "ok"
        assert c.get("/v1/rules").json()["rules"] == rules_before
        counted = c.get(f"/v1/rules/{rid}").json()["counters"]["packets"]
        # Carried over: everything sent before the restart, and at most the few frames sent
        # in the instant between the counter copy and the swap are missing.
        assert counted >= 10 + 5 * len(received) - 10
        assert udp_roundtrip(lab, count=10) == 0
    out = subprocess.run(["ip", "-d", "link", "show", lab.host_if], capture_output=True,
                         text=True).stdout
    assert f"prog/xdp id {health['prog_id']}" in out
    assert not server.bpffs_dir.with_name(server.bpffs_dir.name + "-retired").exists()
    assert not server.bpffs_dir.with_name(server.bpffs_dir.name + "-upgrading").exists()


def test_detach_and_cleanup_remove_only_our_objects(server: Server) -> None:
    from tests.server import XDPFW
    from xdpfw.datapath import Datapath, DatapathConfig
    from xdpfw.kernel import netlink
    from xdpfw.lab import veth_lab

    lab = server.lab
    with server.client() as c:
        c.post("/v1/rules", json={"src": lab.peer_ip4})
    server.stop()
    other_dir = unique_pin_dir("other")
    with veth_lab(prefix="xfw") as other_lab, Datapath.open(
        DatapathConfig(bpffs_dir=other_dir, caps=TEST_CAPS)
    ) as other:
        other.attach(other_lab.host_if)
        r = subprocess.run([XDPFW, "detach", "--bpffs-dir", str(server.bpffs_dir), lab.host_if],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert netlink.xdp_state(lab.host_if).prog_id == 0
        assert (server.bpffs_dir / "prog").exists()  # plain detach keeps the pins
        assert udp_roundtrip(lab, count=5) == 5

        server.start()  # re-attaches from the database, same pinned program
        assert udp_roundtrip(lab, count=5) == 0
        server.stop()
        r = subprocess.run([XDPFW, "detach", "--cleanup", "--bpffs-dir", str(server.bpffs_dir)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not server.bpffs_dir.exists()
        assert netlink.xdp_state(lab.host_if).prog_id == 0
        # The other instance is untouched.
        assert netlink.xdp_state(other_lab.host_if).prog_id == other.prog_id
        assert (other_dir / "prog").exists()
        r = subprocess.run([XDPFW, "detach", "--bpffs-dir", str(server.bpffs_dir)],
                           capture_output=True, text=True)
        assert r.returncode == 1 and "nothing pinned" in r.stderr


def test_16_clients_x_500_changes_while_traffic_flows(server: Server) -> None:
    """Afterwards the database, the maps and GET /v1/rules agree exactly."""
    import sqlite3
    from random import Random

    from xdpfw.datapath import Datapath, DatapathConfig

    lab = server.lab
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            udp_roundtrip(lab, count=5, settle=0.02)

    def client(seed: int) -> None:
        try:
            run_client(seed)
        except Exception as exc:  # a dead thread must fail the test, not vanish
            errors.append(f"client {seed}: {exc!r}")

    def run_client(seed: int) -> None:
        rng = Random(seed)
        mine: list[int] = []
        with server.client() as c:
            for _ in range(500):
                if mine and rng.random() < 0.45:
                    rid = mine.pop(rng.randrange(len(mine)))
                    r = c.delete(f"/v1/rules/{rid}")
                    if r.status_code != 204:
                        errors.append(f"delete {rid}: {r.status_code} {r.text}")
                    continue
                plen = rng.choice([32, 32, 32, 24, 20, 16])
                addr = f"198.18.{rng.randrange(128, 256)}.{rng.randrange(256)}"
                net = f"{addr}/{plen}" if plen == 32 else str(
                    __import__("ipaddress").ip_network(f"{addr}/{plen}", strict=False))
                body: dict[str, object] = {"src": net, "action": rng.choice(["drop", "allow"])}
                if rng.random() < 0.3:
                    body |= {"proto": "udp", "dport": rng.randrange(1, 4)}
                r = c.post("/v1/rules", json=body)
                if r.status_code == 201:
                    mine.append(r.json()["id"])
                elif r.status_code not in (200, 507):
                    errors.append(f"add {body}: {r.status_code} {r.text}")

    tt = threading.Thread(target=traffic)
    tt.start()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        tt.join()
    assert not errors, (errors[:5], server.output()[-4000:])

    with server.client() as c:
        api = {r["id"]: (r["action"], r["src"], r["proto"], r["dport"])
               for r in c.get("/v1/rules?limit=10000").json()["rules"]}
    server.stop()
    db = sqlite3.connect(server.state_dir / "rules.sqlite3")
    stored = {row[0]: tuple(row[1:]) for row in db.execute(
        "SELECT id, action, src, proto, dport FROM rules")}
    db.close()
    dp = Datapath.open(DatapathConfig(bpffs_dir=server.bpffs_dir, upgrade=False))
    try:
        maps = {r.id: (r.action.value, r.src.with_prefixlen if r.src else None,
                       r.proto.value if r.proto else None,
                       str(r.dport) if r.dport else None) for r in dp.rules()}
        counters = set(dp.rule_counters())
    finally:
        dp.close()
    assert api == stored == maps
    assert counters == set(maps)


def test_vanished_interface_degrades_instead_of_failing(server: Server) -> None:
    """An interface attached earlier through the API that no longer exists: serve the rest."""
    from xdpfw.kernel import netlink

    with server.client() as c:
        rid = c.post("/v1/rules", json={"src": "198.18.99.0/24"}).json()["id"]
    server.stop()
    netlink.link_remove(server.lab.host_if)  # the peer in the namespace goes with it
    server.with_iface = False
    server.start()
    with server.client() as c:
        health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["interfaces"] == [
            {"name": server.lab.host_if, "attached": False, "mode": "auto", "prog_id": 0,
             "ifindex": 0}
        ]
        assert c.get(f"/v1/rules/{rid}").status_code == 200
    assert "does not exist now" in server.output()


# --- ABI 4 pins -> ABI 5 (issue 18: IPv4 prefixes moved from tries to DIR-24-8) ---------------

# The last release whose pins speak ABI 4: run from a `git archive` of it, it is the real
# xdpfw of that release (its compiler, its writer, its program), not a copy of its layouts.
ABI4_RELEASE = "1c119335adb126d1666df7d27c8d3714f95a224c"

_ABI4_CHILD = r'''
import json, os, signal, sys
from pathlib import Path
from xdpfw import abi
from xdpfw.compiler import Capacities
from xdpfw.datapath import Datapath, DatapathConfig
from xdpfw.kernel import bpfsys
from xdpfw.rules import Limit, RuleSpec
from xdpfw.verify.frames import build_frame

assert abi.ABI_VERSION == 4, abi.ABI_VERSION
pin_dir, ifname = Path(sys.argv[1]), sys.argv[2]
dp = Datapath.open(DatapathConfig(bpffs_dir=pin_dir, caps=Capacities(8192, 4096, 512)))
specs = [
    dict(src="198.18.0.0/15"), dict(src="198.18.7.0/24", proto="tcp", action="allow"),
    dict(src="198.18.7.64/26", proto="udp", dport="53"), dict(src="198.18.7.66/31"),
    dict(src="198.18.9.9"), dict(dst="198.19.200.0/22", proto="udp"),
    dict(dst="198.19.201.128/25"), dict(src="2001:db8:1::/48"), dict(src="10.0.0.0/8"),
    dict(src="198.19.5.5", proto="udp", dport="7"),
]
dp.add_rules([RuleSpec.parse(**s).with_id(i + 1) for i, s in enumerate(specs)])
lim = Limit(pps=5, burst=2)
dp.add_rules([RuleSpec.parse(src="198.19.64.0/20", action="limit", limit=lim).with_id(50)])
dp.sample_configure(1000, 256)
dp.sample_set({3: 1, 50: 2})
sends = {"198.18.7.66": 3, "198.18.1.1": 2, "198.19.64.9": 6, "10.9.9.9": 1}
for src, n in sends.items():
    for _ in range(n):
        bpfsys.prog_test_run(dp.prog_fd, build_frame(src=src, dst="198.19.201.200", proto="udp",
                                                     dport=53))
dp.attach(ifname)
print(json.dumps({"prog_id": dp.prog_id, "counters": {str(k): v.packets for k, v in
                  dp.rule_counters().items()}}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # kill -9: the pins and the attachment stay
'''


def test_abi4_pins_are_upgraded_with_rules_counters_limits_and_samples(tmp_path: Path) -> None:
    """What a running ABI 4 xdpfw leaves after kill -9 (pinned program and maps, attached):
    the ABI 5 build adopts it, carries every rule, counter, limit and sampling setting into
    the new program and swaps the attachment atomically; the DIR-24-8 arrays it fills are
    bit for bit what the prefixes imply, and the verdicts are the model's."""
    import json
    import os
    import sys

    from xdpfw.datapath import Datapath, DatapathConfig, pins
    from xdpfw.kernel import netlink
    from xdpfw.lab import veth_lab
    from xdpfw.rules import Limit
    from xdpfw.verify import harness
    from xdpfw.verify.soak import FrameGen

    repo = Path(__file__).resolve().parent.parent
    tree = tmp_path / "abi4"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", ABI4_RELEASE, "xdpfw", "bpf"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the ABI 4 release {ABI4_RELEASE[:12]} is not in this checkout's history")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    pin_dir = unique_pin_dir("abi4")
    with veth_lab(prefix="xfw") as lab:
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            child = subprocess.run(
                [sys.executable, "-c", _ABI4_CHILD, str(pin_dir), lab.host_if],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
            )
            assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
            old = json.loads(child.stdout.strip().splitlines()[-1])
            assert pins.pinned_abi(pin_dir) == pins.ABI4
            assert netlink.xdp_state(lab.host_if).prog_id == old["prog_id"]
            with Datapath.open(DatapathConfig(bpffs_dir=pin_dir, caps=TEST_CAPS)) as dp:
                assert dp.upgraded_from == old["prog_id"]
                assert pins.pinned_abi(pin_dir) == abi.ABI_VERSION
                # swapped in place (XDP_FLAGS_REPLACE): the interface runs the new program
                assert netlink.xdp_state(lab.host_if).prog_id == dp.prog_id
                rules = dp.rules()
                assert [r.id for r in rules] == [*range(1, 11), 50]
                assert dp.get_rule(50).limit == Limit(pps=5, burst=2)
                got = {str(k): v.packets for k, v in dp.rule_counters().items()}
                assert got == old["counters"]
                assert dp.sample_rules() == {3: 1, 50: 2}
                assert dp.sample_settings() == (256, 1000)
                assert harness.entry_mismatches(dp) == []  # d248 arrays bit for bit
                differ = harness.Differ(dp)
                gen = FrameGen(__import__("random").Random(4))
                gen.aim(differ.rules)
                found = differ.check(gen.frames(3000))
                assert not found, str(found[0])
                dp.detach(lab.host_if)
                dp.close(cleanup=True)
        finally:
            for leftover in (pin_dir, pins.retired_dir(pin_dir), pins.upgrading_dir(pin_dir)):
                pins.remove_pin_dir(leftover)
    assert not pin_dir.exists()
