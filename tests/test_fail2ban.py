"""fail2ban: deploy/fail2ban/action.d/xdpfw.conf driven by the real fail2ban-server (Debian 12's
fail2ban 1.0.2), against a real `xdpfw serve` on a veth lab, with real packets.

One fail2ban-server for the module, on a private config dir (a minimal fail2ban.conf and
jail.conf, Debian's own sshd filter, our action), its own socket, pidfile and log under a
tmp dir, in the foreground as our child; stopped (and killed if need be) in teardown.

* `set JAIL banip ADDR` drops ADDR's real datagrams, as a rule of source f2b-JAIL with a TTL
  of the jail's bantime (none for bantime = -1); `unbanip` passes them again.
* a jail reading a log file that receives maxretry failed sshd logins bans the address.
* `stop` flushes: every f2b-* source is gone, the address passes, and fail2ban logged no
  action error (the second removal of a gone source is not one).
* pure: the example jail.d/xdpfw.local parses with Debian's own jail.conf and resolves our
  action with the paths it names (`fail2ban-client -d`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_pin_dir
from tests.server import XDPFW, Server, running_server
from tests.traffic import udp_roundtrip

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "deploy" / "fail2ban" / "action.d" / "xdpfw.conf"
EXAMPLE = ROOT / "deploy" / "fail2ban" / "jail.d" / "xdpfw.local"
DEBIAN = Path("/etc/fail2ban")
F2B_SERVER = shutil.which("fail2ban-server")
F2B_CLIENT = shutil.which("fail2ban-client")

needs_fail2ban = pytest.mark.skipif(
    F2B_SERVER is None or F2B_CLIENT is None or not (DEBIAN / "filter.d" / "sshd.conf").exists(),
    reason="fail2ban missing (Debian `fail2ban`; `make setup` installs it)",
)
pytestmark = needs_fail2ban

JAIL = "sshd-lab"  # bans from its log file and from banip; bantime 10 minutes
PERM = "perm-lab"  # bantime = -1
BANTIME = 600
MAXRETRY = 3


def copy_filters(conf: Path) -> None:
    (conf / "filter.d").mkdir(parents=True)
    for name in ("sshd.conf", "common.conf"):
        shutil.copy(DEBIAN / "filter.d" / name, conf / "filter.d" / name)
    (conf / "action.d").mkdir()
    shutil.copy(ACTION, conf / "action.d" / "xdpfw.conf")


@dataclass
class Fail2ban:
    conf: Path
    sock: Path
    log: Path
    authlog: Path
    proc: subprocess.Popen[bytes]

    def client(self, *args: str, check: bool = True) -> str:
        assert F2B_CLIENT is not None
        r = subprocess.run([F2B_CLIENT, "-c", str(self.conf), "-s", str(self.sock), *args],
                           capture_output=True, text=True, timeout=30)
        if check:
            assert r.returncode == 0, f"fail2ban-client {args}: {r.stdout}{r.stderr}"
        return r.stdout

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.client("stop", check=False)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(tmp: Path, srv: Server) -> tuple[Path, Path, Path, Path]:
    conf = tmp / "conf"
    copy_filters(conf)
    sock, pid, log, authlog = tmp / "f2b.sock", tmp / "f2b.pid", tmp / "f2b.log", tmp / "auth.log"
    authlog.touch()
    (tmp / "perm.log").touch()
    (conf / "fail2ban.conf").write_text(f"""[Definition]
loglevel = INFO
logtarget = {log}
socket = {sock}
pidfile = {pid}
dbfile = :memory:
""")
    action = f'xdpfw[xdpfw="{XDPFW}", api="{srv.url}", state_dir="{srv.state_dir}"]'
    (conf / "jail.conf").write_text(f"""[DEFAULT]
backend = polling
ignoreip = 127.0.0.1/8 ::1
findtime = 10m
maxretry = {MAXRETRY}
action = {action}

[{JAIL}]
enabled = true
filter = sshd
logpath = {authlog}
bantime = {BANTIME}

[{PERM}]
enabled = true
filter = sshd
logpath = {tmp / "perm.log"}
bantime = -1
""")
    return conf, sock, log, authlog


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Fail2ban]]:
    tmp = tmp_path_factory.mktemp("f2b")
    with running_server(tmp, unique_pin_dir("f2b")) as srv:
        conf, sock, log, authlog = write_config(tmp, srv)
        assert F2B_SERVER is not None
        proc = subprocess.Popen(
            [F2B_SERVER, "-f", "-x", "-c", str(conf), "-s", str(sock), "-p",
             str(tmp / "f2b.pid"), "--logtarget", str(log)],
            stdout=subprocess.DEVNULL, stderr=(tmp / "f2b.err").open("wb"),
        )
        f2b = Fail2ban(conf, sock, log, authlog, proc)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp / "f2b.err").read_text() + f2b.output()
                if sock.exists() and "pong" in f2b.client("ping", check=False):
                    break
                assert time.monotonic() < deadline, "fail2ban-server did not come up"
                time.sleep(0.2)
            assert JAIL in f2b.client("status")
            yield srv, f2b
        finally:
            f2b.stop()
            assert not sock.exists() or proc.returncode is not None


def wait_for(what: str, cond: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def holdings(srv: Server, source: str) -> list[dict[str, Any]] | None:
    """The rules `source` holds, as it holds them; None when the source does not exist."""
    with srv.client() as c:
        r = c.get(f"/v1/sources/{source}")
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        rules: list[dict[str, Any]] = r.json()["page"]["rules"]
        return rules


def banned(srv: Server, source: str, addr: str) -> dict[str, Any] | None:
    for rule in holdings(srv, source) or []:
        if rule["src"] == f"{addr}/32" and rule["action"] == "drop":
            return rule
    return None


@pytest.mark.e2e
def test_banip_drops_real_packets_and_unbanip_passes_them(
    lab: tuple[Server, Fail2ban],
) -> None:
    srv, f2b = lab
    addr = srv.lab.peer_ip4
    assert udp_roundtrip(srv.lab, count=10) == 10
    f2b.client("set", JAIL, "banip", addr)
    wait_for("the ban rule", lambda: banned(srv, f"f2b-{JAIL}", addr) is not None)
    rule = banned(srv, f"f2b-{JAIL}", addr)
    assert rule is not None and rule["comment"] == f"fail2ban {JAIL}"
    assert rule["source"] == f"f2b-{JAIL}" and rule["expires_at"] is not None
    left = time.mktime(time.strptime(rule["expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - (
        time.mktime(time.gmtime()))
    assert BANTIME - 60 < left <= BANTIME + 1, left  # the TTL is the jail's bantime
    assert udp_roundtrip(srv.lab, count=10) == 0
    assert addr in f2b.client("status", JAIL)

    f2b.client("set", JAIL, "unbanip", addr)
    wait_for("the unban", lambda: banned(srv, f"f2b-{JAIL}", addr) is None)
    assert udp_roundtrip(srv.lab, count=10) == 10


@pytest.mark.e2e
def test_permanent_ban_has_no_ttl(lab: tuple[Server, Fail2ban]) -> None:
    srv, f2b = lab
    addr = "198.18.77.7"
    f2b.client("set", PERM, "banip", addr)
    wait_for("the permanent ban", lambda: banned(srv, f"f2b-{PERM}", addr) is not None)
    rule = banned(srv, f"f2b-{PERM}", addr)
    assert rule is not None and rule["expires_at"] is None

    # A rule already gone when fail2ban unbans (its TTL ended it, or a person removed it):
    # the unban succeeds quietly (test_stop_flushes_every_source finds no ERROR in the log).
    gone = "198.18.77.8"
    f2b.client("set", PERM, "banip", gone)
    wait_for("the second ban", lambda: banned(srv, f"f2b-{PERM}", gone) is not None)
    with srv.client() as c:
        r = c.request("DELETE", "/v1/rules", params={"src": gone, "source": f"f2b-{PERM}"})
        assert r.status_code == 200 and r.json()["removed"] == 1
    f2b.client("set", PERM, "unbanip", gone)
    wait_for("the unban", lambda: gone not in f2b.client("status", PERM))
    assert banned(srv, f"f2b-{PERM}", addr) is not None


def failed_logins(addr: str, n: int) -> str:
    stamp = time.strftime("%b %d %H:%M:%S")
    return "".join(
        f"{stamp} lab sshd[{4000 + i}]: Failed password for invalid user admin from {addr} "
        f"port {50000 + i} ssh2\n"
        for i in range(n)
    )


@pytest.mark.e2e
def test_failed_logins_in_the_log_ban_by_themselves(lab: tuple[Server, Fail2ban]) -> None:
    srv, f2b = lab
    addr = srv.lab.peer_ip4
    assert banned(srv, f"f2b-{JAIL}", addr) is None
    with f2b.authlog.open("a") as log:
        log.write(failed_logins(addr, MAXRETRY - 1))
    time.sleep(2.5)  # the polling backend reads the file every second
    assert banned(srv, f"f2b-{JAIL}", addr) is None  # below maxretry: no ban
    assert udp_roundtrip(srv.lab, count=5) == 5
    with f2b.authlog.open("a") as log:
        log.write(failed_logins(addr, 1))
    wait_for("the ban from the log", lambda: banned(srv, f"f2b-{JAIL}", addr) is not None)
    assert udp_roundtrip(srv.lab, count=10) == 0


@pytest.mark.e2e
def test_stop_flushes_every_source(lab: tuple[Server, Fail2ban]) -> None:
    """Runs last (file order): the jails hold bans from the tests above."""
    srv, f2b = lab
    addr = srv.lab.peer_ip4
    assert banned(srv, f"f2b-{JAIL}", addr) is not None
    assert holdings(srv, f"f2b-{PERM}")
    with srv.client() as c:  # a rule of another source, which fail2ban must not touch
        assert c.post("/v1/rules", json={"src": "198.18.66.6", "source": "ops"}).status_code == 201
    assert f2b.stop() == 0
    assert holdings(srv, f"f2b-{JAIL}") is None and holdings(srv, f"f2b-{PERM}") is None
    assert holdings(srv, "ops")
    assert udp_roundtrip(srv.lab, count=10) == 10
    log = f2b.output()
    assert "ERROR" not in log, log
    assert log.count("Jail '") and "Exiting Fail2ban" in log


@pytest.mark.pure
@pytest.mark.skipif(F2B_CLIENT is None, reason="fail2ban missing")
def test_example_jail_resolves_with_debians_jail_conf(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    copy_filters(conf)
    for name in ("jail.conf", "paths-common.conf", "paths-debian.conf", "fail2ban.conf"):
        shutil.copy(DEBIAN / name, conf / name)
    (conf / "jail.d").mkdir()
    shutil.copy(EXAMPLE, conf / "jail.d" / "xdpfw.local")
    (conf / "jail.d" / "zz-test.local").write_text("[sshd]\nbackend = polling\n"
                                                  f"logpath = {tmp_path / 'auth.log'}\n")
    (tmp_path / "auth.log").touch()
    assert F2B_CLIENT is not None
    r = subprocess.run([F2B_CLIENT, "-c", str(conf), "-d"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    dump = r.stdout
    assert "['add', 'sshd', 'polling']" in dump
    assert "['set', 'sshd', 'addaction', 'xdpfw']" in dump
    ban = next(line for line in dump.splitlines() if "'actionban'" in line)
    assert "/usr/local/bin/xdpfw" in ban and "http://127.0.0.1:8000" in ban
    assert '--source "f2b-sshd"' in ban and '--state-dir "/var/lib/xdpfw"' in ban
    # whole commands: fail2ban's config reader cuts a line at " ;" (its comment mark)
    for name in ("actionstop", "actionflush", "actionunban"):
        command = ban.split(f"['{name}', '", 1)[1].split("']", 1)[0]
        assert command.endswith("esac\\necho \"$out\" >&2\\nexit $rc"), (name, command)
    assert "['set', 'sshd', 'bantime', '1h']" in dump
