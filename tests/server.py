"""A real `xdpfw serve` process for end-to-end tests, on a veth lab, with its own dirs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from xdpfw.lab import VethLab, veth_lab

__all__ = ["Server", "free_port", "running_server"]

XDPFW = str(Path(sys.executable).with_name("xdpfw"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    lab: VethLab
    state_dir: Path
    bpffs_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    with_iface: bool = True  # pass --iface lab.host_if (False: rely on the database)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.log"

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def argv(self) -> list[str]:
        return [
            XDPFW,
            "serve",
            *(["--iface", self.lab.host_if] if self.with_iface else ["--no-demo"]),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(self.state_dir),
            "--bpffs-dir",
            str(self.bpffs_dir),
            "--max-rules",
            "8192",
            "--max-prefixes",
            "4096",
            "--max-sets",
            "512",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, **self.env}
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xdpfw serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/healthz", timeout=1)
                if r.status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"xdpfw serve did not come up in {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, token: str | None = "default") -> httpx.Client:
        headers = {}
        if token == "default":
            token = self.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def _remove_pins(bpffs_dir: Path) -> None:
    """Adopt whatever the server left pinned and remove it (detach included)."""
    if not (bpffs_dir / "prog").exists():
        for p in bpffs_dir.glob("*"):
            p.unlink()
        if bpffs_dir.exists():
            bpffs_dir.rmdir()
        return
    from xdpfw.datapath import Datapath, DatapathConfig

    Datapath.open(DatapathConfig(bpffs_dir=bpffs_dir)).close(cleanup=True)


@contextmanager
def running_server(tmp: Path, bpffs_dir: Path, start: bool = True) -> Iterator[Server]:
    with veth_lab(prefix="xfw") as lab:
        srv = Server(lab=lab, state_dir=tmp / "state", bpffs_dir=bpffs_dir)
        try:
            if start:
                srv.start()
            yield srv
        finally:
            srv.stop()
            _remove_pins(bpffs_dir)
