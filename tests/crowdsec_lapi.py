"""A private CrowdSec Local API for tests: Debian's `crowdsec -no-cs` on its own config dir.

`private_lapi(dir)` copies /etc/crowdsec/config.yaml and points everything at `dir`: its own
sqlite database and data dir, a free loopback port, no online API (CAPI), no Prometheus
listener, the machine credentials `cscli decisions add` uses in `dir`. It starts the LAPI,
registers a machine, and always stops the process again (SIGTERM, then SIGKILL). The
package's own service is never started (`system_crowdsec_pids` finds one should it run).
`scripts/setup.sh test` installs the package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.server import free_port

__all__ = [
    "CROWDSEC", "CSCLI", "Lapi", "crowdsec_missing", "private_lapi", "system_crowdsec_pids"
]

CROWDSEC = shutil.which("crowdsec") or "/usr/bin/crowdsec"
CSCLI = shutil.which("cscli") or "/usr/bin/cscli"
SYSTEM_CONFIG = Path("/etc/crowdsec/config.yaml")


def crowdsec_missing() -> str | None:
    """Why the real LAPI cannot run here (None: it can)."""
    for path in (CROWDSEC, CSCLI, str(SYSTEM_CONFIG)):
        if not Path(path).exists():
            return f"{path} is missing: run `make setup` (scripts/setup.sh installs crowdsec)"
    return None


@dataclass
class Lapi:
    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "lapi.out"

    # -- set-up ---------------------------------------------------------------------------

    def write_config(self) -> None:
        d = self.dir
        (d / "data").mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = yaml.safe_load(SYSTEM_CONFIG.read_text())
        cfg["common"].update(daemonize=False, log_media="file", log_dir=str(d), log_level="info")
        cfg["config_paths"].update(
            config_dir=str(d),
            data_dir=str(d / "data"),
            simulation_path=str(d / "simulation.yaml"),
            notification_dir=str(d / "notifications"),
        )
        cfg["db_config"] = {
            "type": "sqlite",
            "db_path": str(d / "data" / "crowdsec.db"),
            "use_wal": True,
            "log_level": "info",
        }
        cfg["api"]["client"]["credentials_path"] = str(d / "local_api_credentials.yaml")
        server = cfg["api"]["server"]
        server.update(
            listen_uri=f"127.0.0.1:{self.port}",
            profiles_path=str(d / "profiles.yaml"),
            console_path=str(d / "console.yaml"),
        )
        server.pop("online_client", None)  # no Central API: nothing leaves this machine
        cfg.get("prometheus", {})["enabled"] = False
        cfg.pop("plugin_config", None)
        for name in ("profiles.yaml", "simulation.yaml"):
            shutil.copy(SYSTEM_CONFIG.parent / name, d / name)
        self.config.write_text(yaml.safe_dump(cfg))
        creds = d / "local_api_credentials.yaml"
        self.cscli("machines", "add", "xdpfw-test", "--auto", "-f", str(creds))

    # -- the process ----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the LAPI runs already"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [CROWDSEC, "-c", str(self.config), "-no-cs"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crowdsec exited {self.proc.returncode}:\n{self.output()}")
            try:
                httpx.get(self.url + "/v1/decisions/stream", timeout=0.5)
                return  # any answer (403 without a key): it listens
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"the LAPI did not listen on {self.url} in {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the LAPI goes away without a goodbye."""
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- cscli ----------------------------------------------------------------------------

    def cscli(self, *args: str) -> str:
        r = subprocess.run(
            [CSCLI, "-c", str(self.config), *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"cscli {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r.stdout

    def bouncer_key(self, name: str) -> str:
        return self.cscli("bouncers", "add", name, "-o", "raw").strip()

    def add(
        self, *, ip: str | None = None, range_: str | None = None, duration: str = "4h",
        kind: str = "ban", reason: str | None = None,
    ) -> None:  # fmt: skip
        target = ["--ip", ip] if ip is not None else ["--range", str(range_)]
        extra = ["--reason", reason] if reason else []
        self.cscli("decisions", "add", *target, "--duration", duration, "--type", kind, *extra)

    def delete(self, *, ip: str | None = None, range_: str | None = None) -> None:
        target = ["--ip", ip] if ip is not None else ["--range", str(range_)]
        self.cscli("decisions", "delete", *target)

    def delete_all(self) -> None:
        self.cscli("decisions", "delete", "--all")

    def import_ips(self, ips: list[str], reason: str, duration: str = "4h") -> None:
        """Many decisions at once (`cscli decisions import`, about 1 s for 10,000)."""
        path = self.dir / "import.json"
        rows = [{"duration": duration, "scope": "ip", "type": "ban", "value": ip,
                 "reason": reason, "origin": "xdpfw-test"} for ip in ips]  # fmt: skip
        path.write_text(json.dumps(rows))
        self.cscli("decisions", "import", "-i", str(path))


@contextmanager
def private_lapi(directory: Path) -> Iterator[Lapi]:
    """A running private LAPI; stopped (and its process reaped) whatever happens."""
    lapi = Lapi(directory)
    try:
        lapi.write_config()
        lapi.start()
        yield lapi
    finally:
        lapi.stop()
        assert not _lapis_of(directory), f"a crowdsec of {directory} still runs"


def _lapis_of(directory: Path) -> list[int]:
    """Pids of crowdsec processes started on this private config (none after stop)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"crowdsec") and str(directory).encode() in b" ".join(argv):
            try:
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if state != "Z":
                found.append(int(proc.name))
    return found


def system_crowdsec_pids() -> list[int]:
    """crowdsec processes on the system config (the Debian service): the tests start none."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == "crowdsec" and (
            b"-c" not in argv or b"/etc/crowdsec/config.yaml" in argv
        ):
            out.append(int(proc.name))
    return out
