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
        dropped = next(r.stdout for _, comment, r in results if "dropped" in comment)
        m = re.search(r"(\d+) packets transmitted", dropped)
        assert m, dropped
        sent = int(m.group(1))
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


# -- the demo text: `sudo` only where it is needed ----------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize(("sudo_user", "euid", "want_sudo"),
                         [(None, 0, False), ("alice", 0, True), (None, 1000, True)])
def test_demo_text_says_sudo_only_when_started_through_sudo_or_unprivileged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sudo_user: str | None, euid: int,
    want_sudo: bool,
) -> None:
    from api.server import _demo_text
    from api.settings import Settings
    from xdpfw.lab import VethLab

    if sudo_user is None:
        monkeypatch.delenv("SUDO_USER", raising=False)
    else:
        monkeypatch.setenv("SUDO_USER", sudo_user)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    lab = VethLab("xfw-demo-1-0", "xfw-demo1h0", "xfw-demo1p0", "198.18.9.1", "198.18.9.2",
                  "2001:db8:9::1", "2001:db8:9::2", "02:00:00:00:00:01", "02:00:00:00:00:02")
    commands = demo_commands(_demo_text(Settings(state_dir=tmp_path), lab))
    privileged = [c for c, _ in commands if "ip netns exec" in c or "token" in c]
    assert len(privileged) == 3, commands
    for cmd in privileged:
        assert ("sudo " in cmd) is want_sudo, cmd


# -- the README's set-up, targets and files -----------------------------------------------------


def _readme() -> str:
    return README.read_text()


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no section '## {heading}'"
    return m.group(1)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M))


@pytest.mark.pure
def test_setup_is_two_commands_that_work_as_root_and_say_how_with_sudo() -> None:
    setup = _section(_readme(), "Set-up")
    block = re.search(r"```sh\n(.*?)```", setup, re.S)
    assert block, "the set-up section has no command block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]  # as root: no sudo there
    assert "sudo make run" in setup and "sudo make test" in setup  # ...and for a sudo user
    makefile = (ROOT / "Makefile").read_text()
    calls = re.findall(r"^\t[@-]*\s*sudo\b.*|[;&|]\s*sudo\b.*", makefile, re.M)
    assert not calls, f"a make recipe calls sudo: {calls}"


@pytest.mark.pure
def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", _readme()))
    assert {"run", "test"} <= named
    missing = sorted(named - _make_targets())
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


def _tree_tops() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.name not in {".git", ".venv"}}


@pytest.mark.pure
def test_every_file_the_readme_names_exists() -> None:
    text = _readme()
    tops = _tree_tops() - {"README.md"}
    candidates = set(re.findall(r"`([^`\s]+)`", text))
    candidates |= {t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)}
    paths = set()
    for c in candidates:
        c = c.rstrip(".,:;")
        if "://" in c or any(ch in c for ch in "*<>$") or c.startswith("/"):
            continue
        if c.split("/", 1)[0] in tops and ("/" in c or (ROOT / c).is_file()):
            paths.add(c)
    # dotted module names; a file name inside a path (deploy/.../xdpfw.conf) is checked above
    modules = set(re.findall(r"(?<![/\w.-])((?:xdpfw|api)(?:\.\w+)+)\b", text))
    # Names shaped like modules that are not: files (/run/xdpfw/api.sock, xdpfw.toml, the
    # page docs/xdpfw.8, checked as a path above) and the audit logger's name.
    modules -= {"api.sock", "xdpfw.toml", "xdpfw.8", "xdpfw.audit"}
    assert {"scripts/setup.sh", "docs/deployment.md", ".ci/run"} <= paths, paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    missing += sorted(
        m for m in modules
        if not (ROOT / (m.replace(".", "/") + ".py")).exists()
        and not (ROOT / m.replace(".", "/")).is_dir()
    )
    assert not missing, f"README names files or modules that do not exist: {missing}"


@pytest.mark.pure
def test_readme_has_troubleshooting_upgrade_and_uninstall() -> None:
    text = _readme()
    trouble = _section(text, "Troubleshooting")
    for needle in ("xdpfw status", "409", "xdpgeneric", "native", "generic",
                   "xdpfw.kernel.kheaders", "journalctl"):
        assert needle in trouble, needle
    upgrade = _section(text, "Upgrade")
    anchor = re.search(r"\]\(#([\w-]+)\)", upgrade)
    assert anchor, "the upgrade section points to nothing"
    headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", text, re.M)}
    assert anchor.group(1) in headings and anchor.group(1).startswith("safety")
    uninstall = _section(text, "Uninstall")
    for needle in ("xdpfw detach --cleanup", "/var/lib/xdpfw", "/usr/local/bin/xdpfw",
                   "make clean"):
        assert needle in uninstall, needle
    assert "/usr/local/bin/xdpfw" in _section(text, "Set-up")
    assert "rm -rf $(VENV)" in (ROOT / "Makefile").read_text()  # what `make clean` promises


# -- rules: what a rule can name ----------------------------------------------------------------


@pytest.mark.pure
def test_readme_says_what_a_rule_can_name_and_no_or_for_and_advice() -> None:
    from xdpfw.errors import InvalidRule
    from xdpfw.rules import RuleSpec

    rules = " ".join(_section(_readme(), "Rules").split())
    assert "add two rules" not in rules  # two rules are OR, not the pair
    assert "at most one address" in rules and "not supported yet" in rules
    with pytest.raises(InvalidRule):  # ...which is what the model says
        RuleSpec.parse(src="198.18.0.1", dst="198.18.0.2")


# -- one minimum kernel, for the product ----------------------------------------------------------

KERNEL_MIN = re.compile(
    r"(?i)\b(?:linux|kernel)\b(?:\s+(?:must\s+be|is|of))?\s+(\d+\.\d+)\s*(?:or|and)\s+(?:newer|later)"
)
KERNEL_DOCS = ("README.md", "docs/deployment.md", "deploy/kubernetes/README.md")


@pytest.mark.pure
def test_the_docs_agree_on_one_minimum_kernel_and_say_why() -> None:
    found: dict[str, set[str]] = {}
    docs = {*KERNEL_DOCS, *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
            *(str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*.md"))}
    for name in sorted(docs):
        values = set(KERNEL_MIN.findall((ROOT / name).read_text()))
        if values:
            found[name] = values
    for name in KERNEL_DOCS:
        assert name in found, f"{name} does not state the minimum kernel"
    values = set().union(*found.values())
    assert values == {"5.11"}, f"the docs disagree on the minimum kernel: {found}"
    for name in ("README.md", "docs/deployment.md"):
        text = (ROOT / name).read_text()
        assert "bpf_ktime_get_coarse_ns" in text and "BPF_F_MMAPABLE" in text, name
    # The product, not the machine the docs were written on.
    readme = _readme()
    assert not re.search(r"6\.18 here|this VM|this machine", readme)
    kernel = re.search(r"^## Kernel\n(.*?)(?=^## )", (ROOT / "docs/deployment.md").read_text(),
                       re.M | re.S)
    assert kernel and "6.18" not in kernel.group(1)


# -- what each set-up profile installs ---------------------------------------------------------

TEST_ONLY = {
    "xdp-tools", "bpftool", "netsniff-ng", "nftables", "ipset", "iptables", "tcpdump", "tshark"
}


@pytest.mark.pure
def test_make_run_sets_up_only_the_service_and_the_demo() -> None:
    run, test = setup_packages("run"), setup_packages("test")
    assert {"python3-bpfcc", "python3-venv", "iproute2", "iputils-ping", "curl"} <= set(run)
    assert not TEST_ONLY & set(run), run
    assert set(run) <= set(test) and set(test) >= TEST_ONLY
    makefile = (ROOT / "Makefile").read_text()
    recipe = {t: re.search(rf"^{t}:(.*)$", makefile, re.M) for t in ("run", "test", "bench")}
    assert recipe["run"] and recipe["run"].group(1).split() == ["setup-run"]
    for t in ("test", "bench"):
        assert recipe[t] and recipe[t].group(1).split() == ["setup"]
    assert re.search(r"^setup:\n\tbash scripts/setup.sh test$", makefile, re.M)
    assert re.search(r"^setup-run:\n\tbash scripts/setup.sh run$", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.pure
@pytest.mark.parametrize("arch", ["amd64", "arm64", "ppc64el"])
def test_headers_package_follows_the_architecture(arch: str) -> None:
    for profile in ("run", "test"):
        pkgs = setup_packages(profile, arch=arch)
        assert [p for p in pkgs if p.startswith("linux-headers-")] == [f"linux-headers-{arch}"]
    assert '"linux-headers-$(dpkg --print-architecture)"' in (ROOT / "Dockerfile").read_text()


@pytest.mark.pure
def test_headers_package_matches_what_kheaders_looks_for() -> None:
    from xdpfw.kernel import kheaders

    heads = [p for p in setup_packages("run") if p.startswith("linux-headers-")]
    assert heads == [kheaders.headers_package()]


@pytest.mark.e2e
def test_make_test_installs_every_tool_the_tests_and_benchmarks_run() -> None:
    from bench.cli import TOOLS

    test_pkgs = set(setup_packages("test"))
    for prog in sorted({*TOOLS, "xdp-filter", "bpftool", "ping", "curl", "ip", "setpriv",
                        "tcpdump", "tshark"}):  # X-ray's tests read captures with both
        pkg = _package_of(prog)  # fails when a tool is missing after `make setup`
        assert pkg in test_pkgs or _essential(pkg), (prog, pkg)


# -- `xdpfw` on PATH ----------------------------------------------------------------------------

LINK = ROOT / "scripts" / "path-link.sh"


def _link(target: Path, link: Path) -> str:
    r = subprocess.run(["bash", str(LINK), str(target), str(link)], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.pure
def test_path_link_is_made_once_and_never_clobbers(tmp_path: Path) -> None:
    target = tmp_path / "co" / ".venv" / "bin" / "xdpfw"
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\n")
    bindir = tmp_path / "bin"
    link = bindir / "xdpfw"

    out = _link(target, link)
    assert os.readlink(link) == str(target) and "on PATH" in out
    before = link.lstat()
    out = _link(target, link)  # idempotent: the same link, untouched
    assert "present" in out and link.lstat().st_ino == before.st_ino
    assert sorted(p.name for p in bindir.iterdir()) == ["xdpfw"]  # no temporary left over

    link.unlink()
    link.write_text("someone else's xdpfw\n")  # a different file: warn, keep it
    out = _link(target, link)
    assert "WARNING" in out and link.read_text() == "someone else's xdpfw\n"

    link.unlink()
    other = tmp_path / "other" / ".venv" / "bin" / "xdpfw"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    link.symlink_to(other)  # another live checkout's command: warn, keep it
    out = _link(target, link)
    assert "WARNING" in out and os.readlink(link) == str(other)

    other.unlink()  # that checkout is gone: its dangling link is re-pointed to this one
    out = _link(target, link)
    assert os.readlink(link) == str(target) and "no longer exists" in out


@pytest.mark.e2e
def test_setup_twice_installs_nothing_the_second_time(tmp_path: Path) -> None:
    env = {**os.environ, "XDPFW_BIN_DIR": str(tmp_path / "bin")}
    outs = []
    for _ in range(2):
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(SETUP), "test"], capture_output=True, text=True,
                           env=env, timeout=600, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append((r.stdout, time.monotonic() - t0))
    second, took = outs[1]
    assert "debian packages present" in second and "python dependencies up to date" in second
    assert "xdpfw -> " in second and "present" in second, second
    for word in ("installing", "pip install", "creating", "recreating", "mounting"):
        assert word not in second, second
    assert took < 30, f"a set-up with nothing to do took {took:.1f} s"
    assert os.readlink(tmp_path / "bin" / "xdpfw") == str(ROOT / ".venv" / "bin" / "xdpfw")
