"""A real etcd cluster (Debian's etcd-server 3.4) on loopback ports, for the fleet tests.

Each member gets free client and peer ports on 127.0.0.1 and a private data dir; the
cluster is killed and its dirs removed by `etcd_cluster()`'s exit, also on failure.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.server import free_port

__all__ = ["ETCD", "Cluster", "Member", "etcd_cluster"]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class Cluster:
    members: list[Member]
    token: str

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints(self) -> str:
        return ",".join(self.urls)

    def start(self, member: Member, new: bool = True) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [
            ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls",
            member.peer_url, "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "error",
        ]
        log = (member.data_dir.parent / f"{member.name}.log").open("ab")
        member.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, member: Member) -> None:
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(10)
        member.proc = None

    def stop_all(self) -> None:
        for m in self.members:
            self.kill(m)

    def start_all(self) -> None:
        for m in self.members:
            if m.proc is None:
                self.start(m)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a write commits (a leader is elected and a quorum answers)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is None:
                    continue
                try:
                    r = httpx.post(m.url + "/v3/kv/put", json={"key": "cmVhZHk=", "value": ""},
                                   timeout=2)
                    if r.status_code == 200:
                        return
                    last = r.text
                except httpx.HTTPError as exc:
                    last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"etcd cluster not ready in {timeout}s: {last}")

    def leader(self) -> Member:
        for m in self.members:
            if m.proc is None:
                continue
            try:
                st = httpx.post(m.url + "/v3/maintenance/status", json={}, timeout=2).json()
            except httpx.HTTPError:
                continue
            if st.get("leader") == st.get("header", {}).get("member_id"):
                return m
        raise RuntimeError("no leader")


@contextmanager
def etcd_cluster(tmp: Path, size: int = 3) -> Iterator[Cluster]:
    base = tmp / "etcd"
    base.mkdir(parents=True, exist_ok=True)
    members = [Member(f"m{i}", base / f"m{i}") for i in range(size)]
    cluster = Cluster(members, token=f"xfw-{time.monotonic_ns()}")
    try:
        cluster.start_all()
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)
