"""End to end: the real `xdpfw` CLI (subprocesses) against one real server on a veth lab.

One module-scoped server (start-up costs seconds); every test leaves it without rules. Addresses
come from the lab's own /24 (traffic) or from 198.18.0.0/15 and 2001:db8::/32 outside it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import unique_pin_dir
from tests.server import XDPFW, Server, free_port, running_server
from tests.traffic import udp_roundtrip

pytestmark = pytest.mark.e2e

N = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("cli"), unique_pin_dir("cli")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_rules_left(server: Server) -> Iterator[None]:
    yield
    with server.client() as c:
        for r in c.get("/v1/rules", params={"limit": 10_000}).json()["rules"]:
            c.delete(f"/v1/rules/{r['id']}")


def env(server: Server, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("XDPFW_")}
    return {**base, "XDPFW_API": server.url, "TERM": "xterm-256color", **extra}


def cli(
    server: Server, *args: str, stdin: str | None = None, state_dir: Path | None = None,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    sd = str(state_dir or server.state_dir)
    return subprocess.run(
        [XDPFW, "--state-dir", sd, *args], input=stdin, capture_output=True, text=True,
        env=env(server, **extra_env), timeout=60,
    )


def ok(server: Server, *args: str, stdin: str | None = None) -> str:
    p = cli(server, *args, stdin=stdin)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def away_from_lab(server: Server) -> ipaddress.IPv4Network:
    """A /24 in 198.18.0.0/15 that is not the lab's, so no import touches the test traffic."""
    lab = ipaddress.ip_network(f"{server.lab.peer_ip4}/24", strict=False)
    for third in range(250, 0, -1):
        net = ipaddress.ip_network(f"198.18.{third}.0/24")
        if net != lab:
            return net
    raise AssertionError("no free /24")


def test_status(server: Server) -> None:
    out = ok(server, "status")
    assert re.search(r"^service\s+ok", out, re.M)
    assert server.lab.host_if in out and re.search(r"\b(native|generic)\b", out)
    health = json.loads(ok(server, "status", "--json"))
    assert health["health"]["status"] == "ok" and health["health"]["prog_id"] > 0
    assert f"program     id {health['health']['prog_id']}" in out
    assert health["capacity"]["rules"] == {"entries": 0, "capacity": 8192}
    assert re.search(r"^rules\s+0\s+8\.2k\s+0\.0%$", out, re.M)


def test_rule_lifecycle_with_real_traffic(server: Server) -> None:
    lab = server.lab
    assert udp_roundtrip(lab, count=N) == N
    rid = int(ok(server, "rule", "add", "--src", lab.peer_ip4, "--proto", "udp", "--dport",
                 "9999", "--comment", "cli e2e").strip())
    listed = ok(server, "rule", "ls")
    row = next(line for line in listed.splitlines() if line.split()[0] == str(rid))
    assert row.split()[:6] == [str(rid), "drop", f"{lab.peer_ip4}/32", "-", "udp", "9999"]
    assert row.endswith("cli e2e")
    page = json.loads(ok(server, "rule", "ls", "--json"))
    assert page["next_cursor"] is None and [r["id"] for r in page["rules"]] == [rid]
    assert page["rules"][0]["src"] == f"{lab.peer_ip4}/32"

    assert udp_roundtrip(lab, count=N) == 0
    stats = json.loads(ok(server, "stats", "--json"))
    assert [(r["id"], r["packets"]) for r in stats["rules"]] == [(rid, N)]
    assert stats["totals"]["dropped"] >= N
    frame = 14 + 20 + 8 + len(b"xdpfw-test 0")
    assert stats["rules"][0]["bytes"] >= N * frame
    table = ok(server, "stats")
    line = next(x for x in table.splitlines() if x.split()[:1] == [str(rid)])
    assert f"src {lab.peer_ip4}/32 udp dport 9999" in line and " drop " in line
    assert re.search(rf"\b{N}\b", line) and "ago" in line
    assert re.search(r"^dropped\s+\S+\s+-$", table, re.M)
    rated = json.loads(ok(server, "stats", "--json", "--interval", "0.2", "--top", "1"))
    assert rated["rules"][0]["packets"] == N and "rates" in rated

    shown = ok(server, "rule", "show", str(rid))
    assert re.search(rf"^packets\s+{N}$", shown, re.M) and "cli e2e" in shown
    one = json.loads(ok(server, "rule", "show", str(rid), "--json"))
    assert one["counters"]["packets"] == N

    assert ok(server, "rule", "rm", str(rid)).strip() == f"removed {rid}"
    assert udp_roundtrip(lab, count=N) == N
    again = cli(server, "rule", "rm", str(rid))
    assert again.returncode == 1 and f"no rule {rid}" in again.stderr
    assert "no rules" in cli(server, "rule", "ls").stderr


def test_add_options_duplicates_and_json(server: Server) -> None:
    base = away_from_lab(server)
    before = datetime.now(UTC)
    rule = json.loads(ok(server, "rule", "add", "--src", str(base), "--ttl", "10m", "--json"))
    expires = datetime.fromisoformat(rule["expires_at"].replace("Z", "+00:00"))
    assert 595 <= (expires - before).total_seconds() <= 610
    assert rule["src"] == str(base) and rule["action"] == "drop" and rule["mode"] == "enforce"

    dup = cli(server, "rule", "add", "--src", str(base), "--comment", "again")
    assert dup.returncode == 0 and dup.stdout.strip() == str(rule["id"])
    assert "already exists" in dup.stderr

    mon = json.loads(ok(server, "rule", "add", "--dst", "2001:db8:77::/48", "--proto", "tcp",
                        "--dport", "1000-2000", "--monitor", "--json"))
    assert (mon["mode"], mon["dst"], mon["dport"]) == ("monitor", "2001:db8:77::/48", "1000-2000")
    allow = json.loads(ok(server, "rule", "add", "--src", str(base[7]), "--action", "allow",
                          "--json"))
    assert allow["action"] == "allow"
    listed = ok(server, "rule", "ls")
    assert "monitor" in listed and "allow" in listed and re.search(r"in (9m|10m)", listed)
    ids = [str(r["id"]) for r in (rule, mon, allow)]
    assert ok(server, "rule", "rm", *ids).strip() == "removed " + " ".join(ids)


def write(tmp: Path, name: str, text: str) -> Path:
    f = tmp / name
    f.write_text(text)
    return f


def test_import_each_format(server: Server, tmp_path: Path) -> None:
    b = away_from_lab(server)
    a = str(b.network_address).rsplit(".", 1)[0]  # "198.18.X"
    plain = write(tmp_path, "plain.txt", (
        "# my blocklist\n"
        f"{a}.1\n"
        "\n"
        f"{a}.16/28   # a small net\n"
        f"{a}.17/28\n"              # line 5: host bits set
        "not-an-address\n"          # line 6
        "2001:db8:10::/48\n"
        f"{a}.1\n"                  # line 8: repeat of line 2
    ))
    firehol = write(tmp_path, "level1.netset", (
        "#\n# firehol_level1\n#\n# ipv4 hash:net ipset\n#\n# Maintainer : FireHOL\n#\n"
        f"{a}.32/28\n{a}.48\n{a}.64/27\n"
        f"{a}.96/26\n"              # line 11: host bits set (.64/26)
    ))
    spamhaus = write(tmp_path, "drop.txt", (
        "; Spamhaus DROP List 2024/01/01 - (c) 2024 The Spamhaus Project SLU\n"
        "; Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\n"
        f"{a}.128/27 ; SBL256894\n"
        "\n"
        "2001:db8:20::/48 ; SBL123456\n"
        f"{a}.300/32 ; SBL1\n"      # line 6: not an address
    ))
    spamhaus_json = write(tmp_path, "drop_v4.json", (
        f'{{"cidr":"{a}.160/27","sblid":"SBL9","rir":"arin"}}\n'
        '{"type":"metadata","timestamp":1704067200,"size":1,"records":1}\n'
    ))

    p = cli(server, "import", str(plain), "--comment", "plain", "--ttl", "1h")
    assert p.returncode == 1, p.stderr  # some lines were rejected, the rest loaded
    assert re.search(r"^\s+added\s+3$", p.stdout, re.M)
    assert re.search(r"^\s+duplicates\s+1 \(0 already present, 1 repeated", p.stdout, re.M)
    assert re.search(r"^\s+rejected\s+2 \(lines 5, 6\)$", p.stdout, re.M)
    assert "line 5:" in p.stderr and "host bits set" in p.stderr and "line 6:" in p.stderr

    p = cli(server, "import", str(firehol), "--json")
    assert p.returncode == 1
    summary = json.loads(p.stdout)
    assert summary["format"] == "FireHOL" and summary["added"] == 3
    assert [r["line"] for r in summary["rejected"]] == [11]
    assert "did you mean" in summary["rejected"][0]["reason"]

    p = cli(server, "import", "-", "--comment", "spamhaus", stdin=spamhaus.read_text())
    assert p.returncode == 1 and "Spamhaus DROP list" in p.stdout
    assert re.search(r"^\s+added\s+2$", p.stdout, re.M) and "line 6:" in p.stderr

    p = cli(server, "import", str(spamhaus_json), "--monitor")
    assert p.returncode == 0, p.stderr
    assert "Spamhaus DROP JSON" in p.stdout and re.search(r"^\s+added\s+1$", p.stdout, re.M)

    rules = {r["src"]: r for r in json.loads(ok(server, "rule", "ls", "--json"))["rules"]}
    assert set(rules) == {
        f"{a}.1/32", f"{a}.16/28", "2001:db8:10::/48",
        f"{a}.32/28", f"{a}.48/32", f"{a}.64/27",
        f"{a}.128/27", "2001:db8:20::/48", f"{a}.160/27",
    }
    assert rules[f"{a}.16/28"]["comment"] == "plain" and rules[f"{a}.16/28"]["expires_at"]
    assert rules[f"{a}.128/27"]["comment"] == "spamhaus"
    assert rules[f"{a}.160/27"]["mode"] == "monitor"

    # Importing again adds nothing: every entry is now a duplicate.
    again = json.loads(cli(server, "import", str(firehol), "--json").stdout)
    assert again["added"] == 0 and again["duplicates"] == 3
    assert sorted(again["duplicate_ids"]) == sorted(
        rules[s]["id"] for s in (f"{a}.32/28", f"{a}.48/32", f"{a}.64/27"))

    strict = cli(server, "import", str(plain), "--strict")
    assert strict.returncode == 2 and "nothing sent" in strict.stderr

    empty = cli(server, "import", "-", stdin="# only comments\n\n; here\n")
    assert empty.returncode == 2 and "no valid addresses" in empty.stderr


def test_import_in_chunks(server: Server) -> None:
    base = away_from_lab(server)
    hosts = [str(h) for h in list(base.hosts())[:250]]
    p = cli(server, "import", "-", "--chunk", "100", "--json", stdin="\n".join(hosts) + "\n")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["added"] == 250 and summary["complete"] and len(set(summary["ids"])) == 250
    assert json.loads(ok(server, "status", "--json"))["health"]["rules"] == 250


def test_error_exits(server: Server, tmp_path: Path) -> None:
    # No service at that address: exit 3, and how to start it.
    p = cli(server, "--api", f"http://127.0.0.1:{free_port()}", "rule", "ls")
    assert p.returncode == 3 and p.stdout == ""
    assert "cannot reach" in p.stderr and "xdpfw serve --iface" in p.stderr
    # A wrong token: exit 4, naming where it came from.
    p = cli(server, "rule", "add", "--src", "198.18.0.9", "--token", "wrong")
    assert p.returncode == 4 and "refused the token from --token" in p.stderr
    p = cli(server, "rule", "add", "--src", "198.18.0.9", XDPFW_TOKEN="wrong")
    assert p.returncode == 4 and "XDPFW_TOKEN" in p.stderr
    # No token at all (empty state dir): exit 4, saying where it looked.
    p = cli(server, "rule", "add", "--src", "198.18.0.9", state_dir=tmp_path)
    assert p.returncode == 4
    assert f"{tmp_path}/token does not exist" in p.stderr and "--token" in p.stderr
    # Reads on a loopback listener need no token.
    assert cli(server, "rule", "ls", state_dir=tmp_path).returncode == 0
    # 422: the flag and the problem.
    p = cli(server, "rule", "add", "--src", "198.18.0.9/24")
    assert p.returncode == 2
    assert "--src: '198.18.0.9/24' has host bits set; did you mean 198.18.0.0/24?" in p.stderr
    p = cli(server, "rule", "add", "--dport", "22")
    assert p.returncode == 2 and "--dport: dport needs proto tcp or udp" in p.stderr
    p = cli(server, "rule", "add", "--comment", "no match")
    assert p.returncode == 2 and "at least one of src, dst, proto, dport" in p.stderr
    # 404.
    p = cli(server, "rule", "show", "999999")
    assert p.returncode == 1 and "no rule 999999" in p.stderr
    assert json.loads(ok(server, "rule", "ls", "--json"))["rules"] == []


# --- top in a pseudo-terminal --------------------------------------------------------------

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")


class Pty:
    """`xdpfw top` on a pseudo-terminal of 30x120; .screen is what it printed, escapes removed."""

    def __init__(self, argv: list[str], environ: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, env=environ,
            start_new_session=True,
        )
        self.raw = b""

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def read_until(self, pred: re.Pattern[str], count: int = 1, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while len(pred.findall(self.screen)) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pred.pattern!r}:\n{self.screen[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
        return self.screen

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    break
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def traffic(server: Server) -> Iterator[None]:
    """UDP from the lab's namespace, continuously, while the test runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            udp_roundtrip(server.lab, count=20, settle=0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(5)


def test_top_shows_the_busy_rule_and_quits_on_q(server: Server, traffic: None) -> None:
    lab = server.lab
    rid = ok(server, "rule", "add", "--src", lab.peer_ip4, "--comment", "top").strip()
    quiet = ok(server, "rule", "add", "--src", "2001:db8:99::/48").strip()
    argv = [XDPFW, "--state-dir", str(server.state_dir), "top", "--interval", "0.4"]
    tty = Pty(argv, env(server))
    try:
        header = re.compile(r"xdpfw top\s+" + re.escape(server.url))
        tty.read_until(header, count=3)  # three refreshes
        # The busy rule is ranked first, with a packet rate (not "-") once two samples exist.
        busy = re.compile(rf"^\s*{rid}\s+src {re.escape(lab.peer_ip4)}/32\s+drop\s+\d[\d.]*k?\s",
                          re.M)
        screen = tty.read_until(busy)
        # Frames start with the header; only a frame followed by another one is complete.
        screen = tty.read_until(header, count=len(header.findall(screen)) + 1)
        last = next(f for f in reversed(screen.split("xdpfw top")[:-1]) if busy.search(f))
        assert re.search(rf"^\s*{quiet}\s+src 2001:db8:99::/48\s+drop\s", last, re.M)
        assert last.index(f"src {lab.peer_ip4}/32") < last.index("src 2001:db8:99::/48")
        assert re.search(r"dropped \d[\d.]*k? pps", last), last
        tty.send(b"q")
        assert tty.wait() == 0
        after = termios.tcgetattr(tty.slave)
        assert after[3] & termios.ECHO and after[3] & termios.ICANON  # terminal restored
        assert after[3] == tty.before[3]
    finally:
        tty.close()


def test_top_exits_cleanly_on_ctrl_c(server: Server) -> None:
    argv = [XDPFW, "--state-dir", str(server.state_dir), "top", "--interval", "0.3"]
    tty = Pty(argv, env(server))
    try:
        tty.read_until(re.compile(r"xdpfw top"), count=2)
        tty.proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        assert tty.wait() == 0
        assert termios.tcgetattr(tty.slave)[3] == tty.before[3]
    finally:
        tty.close()
