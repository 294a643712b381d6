"""The README reads true on a fresh machine.

* e2e: the demo (`xdpfw serve` with no interface) prints a walk-through; every command line it
  prints is run as printed, in a shell, and must do what its comment promises (the first ping
  passes, the rule is added, the second ping is dropped by XDP and counted, the stats show it);
  Ctrl-C must then remove the lab, the program and its pins.
* pure: every `make` target the README names exists, every file it names exists, the docs
  agree on one minimum kernel, the set-up installs what the service, the demo and the tests
  use (and no more for `make run`), on any Debian architecture, and puts `xdpfw` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import unique_pin_dir
from tests.server import XDPFW, free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SETUP = ROOT / "scripts" / "setup.sh"


# -- the demo's printed commands, run as printed ------------------------------------------------


def demo_commands(text: str) -> list[tuple[str, str]]:
    """(command, comment) for each command line of the demo text (continuations joined)."""
    block = text.split("In another terminal:", 1)[1].split("Ctrl-C", 1)[0]
    commands: list[tuple[str, str]] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = pending + line
        pending = ""
        cmd, _, comment = line.partition("  # ")
        commands.append((cmd.strip(), comment.strip()))
    assert not pending, f"a continuation line ends the demo text: {pending!r}"
    return commands


class _Reader(threading.Thread):
    """Collects a process's output while it runs (the demo text is printed, then it serves)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.chunks: list[bytes] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.chunks.append(line)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.e2e
def test_demo_prints_commands_that_work_as_printed(tmp_path: Path) -> None:
    port = free_port()
    pins = unique_pin_dir("readme-demo")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}  # root, as in the README
    argv = [XDPFW, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
            "--bpffs-dir", str(pins), "--max-rules", "4096", "--max-prefixes", "1024",
            "--max-sets", "256"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    reader = _Reader(proc)
    reader.start()
    lab_if = ""
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops the demo" not in reader.text:
            assert proc.poll() is None, f"the demo exited {proc.returncode}:\n{reader.text}"
            assert time.monotonic() < deadline, f"no demo text after 90 s:\n{reader.text}"
            time.sleep(0.2)
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, reader.text
                time.sleep(0.2)
        assert health.status_code == 200, health.text
        lab_if = health.json()["interfaces"][0]["name"]
        text = reader.text
        commands = demo_commands(text)
        assert len(commands) >= 4, text

        shell_vars: list[str] = []  # NAME=... lines, re-run before each later command
        results: list[tuple[str, str, subprocess.CompletedProcess[str]]] = []
        used: set[str] = set()
        for cmd, comment in commands:
            script = "\n".join([*shell_vars, cmd])
            r = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                               timeout=60, env=env)
            results.append((cmd, comment, r))
            used.update(_programs(cmd))
            if re.fullmatch(r"[A-Z_]+=\S.*", cmd):
                shell_vars.append(cmd)
            failed = f"{cmd!r} ({comment}) exited {r.returncode}:\n{r.stdout}{r.stderr}"
            if "dropped" in comment:
                # ping's own exit status for "no reply": 1 (2 would be an error).
                assert r.returncode == 1, failed
                assert re.search(r"\b(\d+) packets transmitted, 0 received", r.stdout), failed
            else:
                assert r.returncode == 0, failed
            if "passes" in comment:
                assert re.search(r"(\d+) packets transmitted, \1 received", r.stdout), failed

        # What the drop promised happened, and was counted: the rule the printed curl added
        # holds exactly the dropped echo requests, and the printed stats line shows them.
        added = next(json.loads(r.stdout) for c, _, r in results if "/v1/rules" in c)
        sent = int(next(re.search(r"(\d+) packets transmitted", r.stdout).group(1)  # type: ignore[union-attr]
                        for _, comment, r in results if "dropped" in comment))
        stats = json.loads(next(r.stdout for c, _, r in results if "/v1/stats" in c))
        assert stats["totals"]["dropped"] == sent, stats
        assert [(s["id"], s["packets"]) for s in stats["rules"]] == [(added["id"], sent)], stats

        # Every program the lines use comes from a package `make run` installs (or one that
        # every Debian system has: Essential, like coreutils for `cat`).
        run_pkgs = set(setup_packages("run"))
        for prog in sorted(used - {"sudo"}):
            pkg = _package_of(prog)
            assert pkg in run_pkgs or _essential(pkg), (prog, pkg, sorted(run_pkgs))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the demo says
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(timeout=5)
        if pins.exists():  # only after a failure: do not leave pins behind
            from tests.server import _remove_pins

            _remove_pins(pins)
    assert rc == 0, reader.text
    # Ctrl-C removed the lab (namespace and veth), the program and its pins.
    assert not pins.exists(), reader.text
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab_if and lab_if not in links
    assert not any(ns.startswith(f"xfw-demo-{proc.pid}-") for ns in _netns_names())


def _programs(cmd: str) -> set[str]:
    """The programs a printed line runs: first word, after `sudo`, `ip netns exec NS`, `$(`."""
    progs: set[str] = set()
    for part in re.split(r"\$\(|\||;|&&", cmd):
        words = part.split()
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words and words[0] == "sudo":
            progs.add("sudo")
            words = words[1:]
        if words[:3] == ["ip", "netns", "exec"] and len(words) > 4:
            progs.add("ip")
            words = words[4:]
        if words:
            progs.add(words[0])
    return progs


def _package_of(prog: str) -> str:
    path = shutil.which(prog)
    assert path, f"{prog} is not installed"
    real = os.path.realpath(path)
    for candidate in dict.fromkeys([path, real, "/usr" + real if not real.startswith("/usr/")
                                    else real.removeprefix("/usr")]):
        r = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":", 1)[0].split(",")[0].strip()
    raise AssertionError(f"no Debian package owns {path} ({real})")


def _essential(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Essential}", pkg], capture_output=True,
                       text=True)
    return r.stdout.strip() == "yes"


def setup_packages(profile: str, arch: str | None = None) -> list[str]:
    """The Debian packages `scripts/setup.sh` installs for PROFILE (run or test)."""
    env = dict(os.environ)
    if arch is not None:
        fake = Path(env.get("TMPDIR", "/tmp")) / f"xdpfw-fake-dpkg-{os.getpid()}-{arch}"
        fake.mkdir(exist_ok=True)
        dpkg = fake / "dpkg"
        dpkg.write_text(f'#!/bin/sh\n[ "$1" = --print-architecture ] && echo {arch} && exit 0\n'
                        'exec /usr/bin/dpkg "$@"\n')
        dpkg.chmod(0o755)
        env["PATH"] = f"{fake}:{env['PATH']}"
    r = subprocess.run(["bash", str(SETUP), "--print-packages", profile], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()
