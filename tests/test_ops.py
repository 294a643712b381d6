"""Issue 15 end to end: one real `xdpfw serve` started from a config file, env and flags.

One server (module scope, to keep the file lean) shows: the precedence of flags > env > file >
defaults on a real start; sd_notify READY=1 sent to a real AF_UNIX datagram socket once the
program is attached and serving, STOPPING=1 at the stop; the unix socket (group-owned, 0660)
used with no token by a real non-root member of its group and refused to a non-member (both
throwaway users, removed after); the read token generated 0640 and refused a write with 403;
one JSON audit line per change in the real log, with a level on every line.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import unique_pin_dir
from tests.server import XDPFW, Server, running_server

pytestmark = pytest.mark.e2e

PROTECTED = "198.18.255.0/24"


class OpsServer(Server):
    """The suite's server with argv of our own: capacities from the flags, env and file."""

    def argv(self) -> list[str]:
        return [
            XDPFW, "serve", "--iface", self.lab.host_if,
            "--listen", f"127.0.0.1:{self.port}",
            "--state-dir", str(self.state_dir), "--bpffs-dir", str(self.bpffs_dir),
            "--max-rules", "8192", "--protect", PROTECTED,
        ]  # fmt: skip


@dataclass
class Ops:
    srv: Server
    sock: Path
    notify: socket.socket
    ready: bytes
    member: str
    outsider: str
    group: str

    def lines(self) -> list[dict[str, Any]]:
        """The server's log, every line one JSON object (the test fails on any other)."""
        out = []
        for line in self.srv.output().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def audit(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["logger"] == "xdpfw.audit"]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    tag = uuid.uuid4().hex[:6]
    group, member, outsider = f"xfwg{tag}", f"xfwm{tag}", f"xfwo{tag}"
    run_dir = Path(f"/run/xfw-{tag}")  # traversable by the test users (tmp_path is not)
    tmp = tmp_path_factory.mktemp("ops")
    created: list[tuple[str, str]] = []
    try:
        _run("groupadd", group)
        created.append(("groupdel", group))
        for user, groups in ((member, group), (outsider, "")):
            _run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin",
                 *(["-G", groups] if groups else []), user)  # fmt: skip
            created.insert(0, ("userdel", user))
        run_dir.mkdir(mode=0o755)
        sock = run_dir / "api.sock"
        config = tmp / "xdpfw.toml"
        config.write_text(
            "# flags > env > file > defaults\n"
            "max_rules = 1000\nmax_prefixes = 1024\nmax_sets = 300\n"
            f'log_format = "json"\nsocket = "{sock}"\nsocket_group = "{group}"\n'
        )
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp / "notify.sock"))
        notify.settimeout(90)
        with running_server(tmp, unique_pin_dir("ops"), start=False) as base:
            srv = OpsServer(lab=base.lab, state_dir=base.state_dir, bpffs_dir=base.bpffs_dir)
            srv.env = {
                "XDPFW_CONFIG": str(config),
                "XDPFW_MAX_RULES": "2000",  # the flag wins
                "XDPFW_MAX_PREFIXES": "2048",  # wins over the file
                "NOTIFY_SOCKET": str(tmp / "notify.sock"),
            }
            try:
                srv.start()
                ready = notify.recv(4096)
                yield Ops(srv, sock, notify, ready, member, outsider, group)
            finally:
                srv.stop()
                notify.close()
    finally:
        for cmd, name in created:
            subprocess.run([cmd, name], capture_output=True, timeout=30)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_ready_once_attached_and_serving(ops: Ops) -> None:
    assert ops.ready.split(b"\n")[0] == b"READY=1"
    with ops.srv.client() as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert [i["name"] for i in health.json()["interfaces"]] == [ops.srv.lab.host_if]
    # the log shows the attachment before uvicorn's start
    msgs = [line["msg"] for line in ops.lines()]
    attached = next(i for i, m in enumerate(msgs) if m.startswith("attached to "))
    started = next(i for i, m in enumerate(msgs) if "Application startup complete" in m)
    assert attached < started


def test_precedence_on_a_real_start(ops: Ops) -> None:
    with ops.srv.client() as c:
        capacity = c.get("/healthz").json()["capacity"]
    assert capacity["rules"]["capacity"] == 8192  # flag > env (2000) > file (1000)
    # file (300; set 0 is reserved: 299 usable) > default (16384)
    assert capacity["xdpfw_sets"]["capacity"] == 299
    tries = {name: t["capacity"] for name, t in capacity.items() if name.endswith("_lpm")}
    assert tries and set(tries.values()) == {2048}, capacity  # env > file (1024)


def test_every_log_line_is_json_with_a_level(ops: Ops) -> None:
    lines = ops.lines()
    assert len(lines) > 5
    assert {line["level"] for line in lines} <= {"DEBUG", "INFO", "WARNING", "ERROR"}
    assert any(line["logger"].startswith("uvicorn") for line in lines)


def _as(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "XDPFW_SOCKET": ""}
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), XDPFW, *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_socket_is_group_owned_and_needs_no_token_for_members(ops: Ops) -> None:
    st = ops.sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert grp.getgrgid(st.st_gid).gr_name == ops.group
    uid = pwd.getpwnam(ops.member).pw_uid
    r = _as(ops.member, "rule", "add", "--src", "198.18.61.0/24", "--api", f"unix:{ops.sock}",
            "--comment", "from the socket", "--json")
    assert r.returncode == 0, r.stderr
    rule = json.loads(r.stdout)
    assert rule["src"] == "198.18.61.0/24"
    # the default socket path: XDPFW_SOCKET points the CLI at it, no --api
    r = subprocess.run(
        ["runuser", "-u", ops.member, "--", "env", f"XDPFW_SOCKET={ops.sock}", XDPFW,
         "rule", "rm", str(rule["id"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = next(a for a in ops.audit() if a["method"] == "POST" and a.get("ids") == [rule["id"]])
    assert line["who"] == f"uid:{uid}" and line["status"] == 201 and line["level"] == "INFO"
    gone = next(a for a in ops.audit() if a["method"] == "DELETE" and a["ids"] == [rule["id"]])
    assert gone["who"] == f"uid:{uid}" and gone["status"] == 204
    # a user outside the group: the file permissions refuse the connection
    r = _as(ops.outsider, "rule", "add", "--src", "198.18.62.0/24", "--api", f"unix:{ops.sock}")
    assert r.returncode == 3 and "Permission denied" in r.stderr, (r.returncode, r.stderr)
    with ops.srv.client() as c:
        assert not [x for x in c.get("/v1/rules").json()["rules"]
                    if x["src"] == "198.18.62.0/24"]  # fmt: skip


def test_read_token_file_and_403(ops: Ops) -> None:
    path = ops.srv.state_dir / "read-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    read = path.read_text().strip()
    assert len(read) >= 32 and read != ops.srv.token
    with ops.srv.client(read) as c:
        assert c.get("/v1/rules").status_code == 200
        assert c.get("/metrics").status_code == 200
        r = c.post("/v1/rules", json={"src": "198.18.63.1"})
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["error"] == "ReadOnlyToken"
    line = next(a for a in ops.audit() if a["status"] == 403)
    assert line["who"] == "read" and line["level"] == "WARNING"
    assert line["error"] == "ReadOnlyToken" and line["path"] == "/v1/rules"


def test_audit_line_per_change(ops: Ops) -> None:
    before = len(ops.audit())
    with ops.srv.client() as c:
        one = c.post("/v1/rules", json={"src": "198.18.64.1"}).json()
        bulk = c.post("/v1/rules/bulk", content=b"198.18.65.1\n198.18.65.2\n198.18.65.3\n",
                      headers={"content-type": "text/plain"})
        assert bulk.status_code == 201, bulk.text
        assert c.delete(f"/v1/rules/{one['id']}").status_code == 204
        bad = c.post("/v1/rules", json={"src": PROTECTED})
        assert bad.status_code == 409
        c.get("/v1/rules")  # reads are not audited
    lines = ops.audit()[before:]
    assert [(a["method"], a["status"]) for a in lines] == [
        ("POST", 201), ("POST", 201), ("DELETE", 204), ("POST", 409)
    ], lines
    add, load, rm, refused = lines
    assert add["who"] == "admin" and add["ids"] == [one["id"]] and add["count"] == 1
    assert load["path"] == "/v1/rules/bulk" and load["count"] == 3
    assert load["ids"] == bulk.json()["ids"]
    assert rm["ids"] == [one["id"]]
    assert refused["level"] == "WARNING" and refused["error"] == "RuleConflict"
    assert all(a["msg"].startswith("change who=admin ") for a in lines)


def test_problem_json_from_the_real_server(ops: Ops) -> None:
    with ops.srv.client() as c, httpx.Client(base_url=ops.srv.url) as anon:
        for r, status in (
            (c.get("/v1/rules/999999"), 404),
            (c.get("/nowhere"), 404),
            (c.patch("/v1/rules"), 405),
            (anon.post("/v1/rules", json={"src": "198.18.66.1"}), 401),
            (c.post("/v1/rules", content=b"x" * 70_000,
                    headers={"content-type": "application/json"}), 413),
            (c.post("/v1/rules", json={"src": "bad"}), 422),
        ):
            assert r.status_code == status
            assert r.headers["content-type"] == "application/problem+json", r.headers
            body = r.json()
            assert body["status"] == status and body["title"] and body["detail"], body


def test_zz_stop_says_stopping(ops: Ops) -> None:
    """Last (the server stops here): STOPPING=1 on the notify socket, and a clean exit."""
    assert ops.srv.stop() == 0
    got = ops.notify.recv(4096)
    assert got == b"STOPPING=1"
    assert not ops.sock.exists()  # the socket file went with the service


def test_config_error_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('max_rules = 10\nlisten_on = "0.0.0.0:1"\n')
    r = subprocess.run([XDPFW, "serve", "--config", str(bad), "--no-demo"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "XDPFW_CONFIG": ""})  # fmt: skip
    assert r.returncode == 2
    assert f"xdpfw serve: config file {bad}: unknown key 'listen_on'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
