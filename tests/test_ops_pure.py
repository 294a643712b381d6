"""Issue 15 below e2e: problem+json on every error path, roles, the config file, offline docs.

The real app, service and SQLite store over the stand-in datapath (tests/fakes.py), as in
tests/test_api_pure.py. What a server process proves (precedence on a real start, the unix
socket with real users, audit lines in a real log, sd_notify) is in tests/test_ops.py.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import PEER_UID
from api.errors import PROBLEM_JSON
from api.localsock import _PeerApp
from api.logs import JsonFormatter
from api.notify import notify
from api.service import FirewallService
from api.settings import ConfigError, Settings, get_settings
from api.store import Store
from tests.fakes import FakeDatapath
from xdpfw import errors
from xdpfw.cli.client import Client, ClientError, error_for
from xdpfw.cli.connection import api_url

pytestmark = pytest.mark.pure

ADMIN = "admin-token-0123456789"
READ = "read-token-0123456789ab"
PROTECTED = "198.18.255.0/24"
REPO = Path(__file__).resolve().parent.parent


class Env:
    def __init__(self, tmp: Path, listen: str) -> None:
        self.dp = FakeDatapath()
        self.store = Store(tmp / "rules.sqlite3")
        self.svc = FirewallService(self.dp, self.store, (PROTECTED,))
        self.svc.reconcile()
        self.settings = Settings(listen=listen, state_dir=tmp, max_body_bytes=4096)
        self.app = create_app(self.settings, self.svc, ADMIN, READ)

    def client(self, token: str | None) -> TestClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return TestClient(self.app, headers=headers, raise_server_exceptions=False)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, "0.0.0.0:8000")  # off loopback: reads need a token
    yield e
    e.store.close()


def assert_problem(r: httpx.Response, status: int, **members: object) -> dict[str, Any]:
    """An RFC 9457 problem: its content type, the four members, and the given extensions."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM_JSON, r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and (
        body["type"] == "about:blank" or body["type"].startswith("urn:xdpfw:problem:")
    )
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for key, value in members.items():
        assert body.get(key) == value, (key, body)
    return body


# -- RFC 9457 on every error path ----------------------------------------------------------------


def test_every_error_path_is_a_problem(env: Env) -> None:
    admin, read, anon = env.client(ADMIN), env.client(READ), env.client(None)
    wrong = env.client("not-the-token-at-all")
    # 404: an unknown path (plain HTTP: about:blank) and an unknown rule (a domain error)
    body = assert_problem(admin.get("/v1/nope"), 404, type="about:blank", title="Not Found")
    assert "/v1/nope" in body["detail"]
    assert_problem(admin.get("/v1/rules/777"), 404, error="RuleNotFound",
                   type="urn:xdpfw:problem:rule-not-found", title="Rule not found",
                   detail="no rule with id 777", instance="/v1/rules/777")
    # 405 with Allow
    r = admin.put("/v1/rules")
    assert_problem(r, 405, type="about:blank")
    assert r.headers["allow"] == "DELETE, GET, POST"  # DELETE: by value (?src=)
    # 401 / 403: before the body is read (middleware) and in the read dependency
    r = anon.post("/v1/rules", json={"src": "198.18.7.1"})
    assert_problem(r, 401, error="MissingToken")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_problem(anon.get("/v1/rules"), 401, error="MissingToken")
    assert_problem(wrong.post("/v1/rules", json={"src": "198.18.7.1"}), 403, error="WrongToken")
    assert_problem(wrong.get("/v1/stats"), 403, error="WrongToken")
    assert_problem(read.post("/v1/rules", json={"src": "198.18.7.1"}), 403,
                   error="ReadOnlyToken")
    # 409 with existing_id where it applies, and the protected prefix
    assert_problem(admin.post("/v1/rules", json={"src": PROTECTED}), 409, error="RuleConflict")
    # 413: declared and streamed
    big = b'{"src": "198.18.7.1", "comment": "' + b"x" * 5000 + b'"}'
    body = assert_problem(
        admin.post("/v1/rules", content=big, headers={"content-type": "application/json"}),
        413, error="BodyTooLarge", limit=4096, setting="XDPFW_MAX_BODY_BYTES",
    )  # fmt: skip
    assert "4096 bytes" in body["detail"]
    body = assert_problem(
        admin.post("/v1/rules", content=iter([big]), headers={"content-type": "application/json"}),
        413, error="BodyTooLarge", limit=4096,
    )  # fmt: skip
    # 422: FastAPI's validation and the domain's InvalidRule, both with errors[]
    for src, error in (("not-an-ip", "ValidationError"), ("198.18.7.1/24", "InvalidRule")):
        body = assert_problem(admin.post("/v1/rules", json={"src": src}), 422, error=error)
        assert body["errors"][0]["loc"] == ["body", "src"] and body["errors"][0]["msg"]
        assert body["detail"].startswith("invalid request: src: ")
    body = assert_problem(admin.get("/v1/rules?limit=0"), 422, error="ValidationError")
    assert body["errors"][0]["loc"] == ["query", "limit"]
    body = assert_problem(admin.post("/v1/rules", content=b"{",
                                     headers={"content-type": "application/json"}), 422)
    assert body["errors"]
    # 507 / 503 / 500 from the datapath, through the error table
    for exc, status, extra in (
        (errors.CapacityExceeded("xdpfw_src4", 10), 507, {"limit": 10}),
        (errors.DatapathError("broken"), 503, {}),
        (errors.KernelError("map update", 28, "No space left"), 500, {"errno": 28}),
    ):
        env.dp.fail_next = exc
        assert_problem(admin.post("/v1/rules", json={"src": "198.18.7.9"}), status,
                       error=type(exc).__name__, **extra)
    # a bug (not a domain error) is a problem too, never a bare text 500
    env.dp.fail_next = RuntimeError("bug")  # type: ignore[assignment]
    body = assert_problem(admin.post("/v1/rules", json={"src": "198.18.7.9"}), 500,
                          error="InternalError")
    assert "RuntimeError" in body["detail"]


def test_conflict_names_the_existing_rule(env: Env) -> None:
    env.dp.fail_next = errors.RuleConflict("clash", existing_id=3)
    body = assert_problem(env.client(ADMIN).post("/v1/rules", json={"src": "198.18.7.1"}), 409,
                          existing_id=3, detail="clash", type="urn:xdpfw:problem:rule-conflict")
    assert body["title"] == "Rule conflict"


def test_the_cli_reads_a_problem(env: Env) -> None:
    """The CLI's messages from the new shape: 422 fields from errors[], 409's existing rule."""
    r = env.client(ADMIN).post("/v1/rules", json={"src": "198.18.7.0/33"})
    err = error_for(r)
    assert err.exit_code == 2 and err.problems and err.problems[0][0] == "src"
    env.dp.fail_next = errors.RuleConflict("clash", existing_id=3)
    err = error_for(env.client(ADMIN).post("/v1/rules", json={"src": "198.18.7.1"}))
    assert err.message == "clash (existing rule 3) (HTTP 409)"
    err = error_for(env.client(READ).post("/v1/rules", json={"src": "198.18.7.1"}))
    assert err.exit_code == 4 and "read-only token" in err.message


def test_openapi_every_error_is_a_problem(env: Env) -> None:
    doc = env.client(None).get("/openapi.json").json()
    assert doc["components"]["schemas"]["Problem"]["required"] == [
        "title", "status", "detail"
    ]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    seen = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = {c for c in op["responses"] if c[0] in "45"}
            assert {"404", "405", "422", "500"} <= codes, (path, method)
            for code in codes:
                if path in ("/healthz", "/livez") and code == "503":
                    continue  # the probes answer their own body
                content = op["responses"][code]["content"]
                assert content == {PROBLEM_JSON: {"schema": {
                    "$ref": "#/components/schemas/Problem"}}}, (path, method, code)
                seen += 1
            if method != "get":
                assert {"401", "403"} <= codes, (path, method)
    assert seen > 40


# -- roles ---------------------------------------------------------------------------------------

READS = ("/v1/rules", "/v1/stats", "/v1/interfaces", "/metrics", "/v1/rules?limit=5")


def test_read_token_reads_everything_and_changes_nothing(env: Env) -> None:
    admin, read = env.client(ADMIN), env.client(READ)
    rule = admin.post("/v1/rules", json={"src": "198.18.7.1"})
    assert rule.status_code == 201
    rid = rule.json()["id"]
    for path in (*READS, f"/v1/rules/{rid}"):
        assert read.get(path).status_code == 200, path
        assert_problem(env.client(None).get(path), 401)
    assert "interfaces" in read.get("/healthz").json()  # the detail the token unlocks
    assert "interfaces" not in env.client(None).get("/healthz").json()
    for method, path, kw in (
        ("POST", "/v1/rules", {"json": {"src": "198.18.7.2"}}),
        ("DELETE", f"/v1/rules/{rid}", {}),
        ("POST", "/v1/rules/bulk", {"content": b"198.18.7.3\n",
                                    "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/interfaces", {"json": {"name": "eth0"}}),
        ("DELETE", "/v1/interfaces/eth0", {}),
    ):
        assert_problem(read.request(method, path, **kw), 403, error="ReadOnlyToken")
    assert [r["id"] for r in admin.get("/v1/rules").json()["rules"]] == [rid]
    assert admin.delete(f"/v1/rules/{rid}").status_code == 204


def test_a_socket_peer_needs_no_token(env: Env) -> None:
    """api/localsock.py tags a unix-socket connection's requests with the peer's uid."""
    peer = TestClient(_PeerApp(env.app, 4242))
    r = peer.post("/v1/rules", json={"src": "198.18.7.4"})
    assert r.status_code == 201, r.text
    assert peer.get("/v1/rules").status_code == 200
    assert PEER_UID == "xdpfw.peer_uid"


# -- offline docs --------------------------------------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_only_local_assets(env: Env, page: str) -> None:
    c = env.client(None)
    r = c.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    refs = _Refs()
    refs.feed(r.text)
    # URLs in the page's script too (Swagger UI's url: '/openapi.json')
    urls = set(refs.urls) | set(re.findall(r"""url:\s*'([^']+)'""", r.text))
    assert urls and not re.search(r"https?://", r.text), urls
    for url in urls:
        assert url.startswith("/"), url
        got = c.get(url)
        assert got.status_code == 200 and len(got.content) > 1000, url
    assert any(u.endswith(".js") for u in urls)


# -- the config file -----------------------------------------------------------------------------


def _toml(tmp: Path, text: str) -> Path:
    path = tmp / "xdpfw.toml"
    path.write_text(text)
    return path


def test_config_precedence_flags_env_file_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(tmp_path, 'max_rules = 1000\nmax_prefixes = 1024\nmax_sets = 300\n'
                 'iface = ["eth1", "eth2"]\nlisten = ["127.0.0.1:9000", "unix:/run/x.sock"]\n')
    monkeypatch.setenv("XDPFW_MAX_RULES", "2000")
    monkeypatch.setenv("XDPFW_MAX_PREFIXES", "2048")
    s = get_settings(config=path, max_rules=8192)
    assert (s.max_rules, s.max_prefixes, s.max_sets, s.max_bulk_bytes) == (
        8192, 2048, 300, Settings.model_fields["max_bulk_bytes"].default)
    assert s.iface == ["eth1", "eth2"] and s.listen == "127.0.0.1:9000"
    assert s.socket == Path("/run/x.sock")
    monkeypatch.setenv("XDPFW_CONFIG", str(path))  # the variable names the file too
    assert get_settings().max_sets == 300


@pytest.mark.parametrize(("text", "says"), [
    ("max_rulez = 5\n", "unknown key 'max_rulez'"),
    ("max-rules = 5\n", "unknown key 'max-rules'"),
    ("max_rules = 0\n", "max_rules: Input should be greater than or equal to 1"),
    ('xdp_mode = "fast"\n', "xdp_mode: Input should be 'auto', 'native' or 'generic'"),
    ('iface = ["lo"]\n', "iface: Value error, xdpfw never filters the loopback"),
    ("max_rules = \n", "is not valid TOML"),
])
def test_config_errors_name_the_file_and_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        get_settings(config=path)
    assert str(path) in str(info.value) and says in str(info.value), str(info.value)


def test_env_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDPFW_MAX_SETS", "lots")
    with pytest.raises(ConfigError, match=r"max_sets \(flag --max-sets or XDPFW_MAX_SETS\)"):
        get_settings()
    with pytest.raises(ConfigError, match="does not exist"):
        get_settings(config=Path("/nonexistent/xdpfw.toml"))


def test_configuration_doc_lists_every_key_with_its_default() -> None:
    """docs/configuration.md is generated from the model (scripts/gen_config_doc.py)."""
    from scripts.gen_config_doc import render

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == render(), "docs/configuration.md is stale: run scripts/gen_config_doc.py"
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        assert f"| `{name}` |" in doc and f"XDPFW_{name.upper()}" in doc, name


# -- logs, sd_notify, the CLI's socket -----------------------------------------------------------


def test_json_log_lines_carry_level_and_fields() -> None:
    record = logging.LogRecord("xdpfw.audit", logging.WARNING, __file__, 1, "change %s", ("x",),
                               None)
    record.fields = {"who": "read", "status": 403}
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["msg"] == "change x"
    assert line["who"] == "read" and line["status"] == 403 and line["logger"] == "xdpfw.audit"


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(where))
        monkeypatch.setenv("NOTIFY_SOCKET", str(where))
        assert notify("READY=1\nSTATUS=x")
        assert sock.recv(4096) == b"READY=1\nSTATUS=x"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def test_cli_finds_the_socket(tmp_path: Path) -> None:
    where = tmp_path / "api.sock"
    assert api_url(None, {"XDPFW_SOCKET": str(where)}) == "http://127.0.0.1:8000"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(where))
        assert api_url(None, {"XDPFW_SOCKET": str(where)}) == f"unix:{where}"
        assert api_url(None, {"XDPFW_SOCKET": str(where), "XDPFW_API": "http://h:1"}) == (
            "http://h:1")
        assert api_url("http://x:2", {"XDPFW_SOCKET": str(where)}) == "http://x:2"
        # nobody listens: the CLI says it cannot reach the socket
        with pytest.raises(ClientError) as info, Client(f"unix:{where}") as c:
            c.health()
        assert info.value.exit_code == 3 and str(where) in info.value.message


def test_errors_doc_names_every_error() -> None:
    from api.errors import STATUS

    doc = (REPO / "docs" / "errors.md").read_text()
    for cls, status in STATUS:
        name = f"`{cls.__name__}`"
        assert any(line.startswith(f"| {status} |") and name in line
                   for line in doc.splitlines()), (cls.__name__, status)
    for name in ("MissingToken", "WrongToken", "ReadOnlyToken", "BodyTooLarge", "ValidationError"):
        assert f"`{name}`" in doc, name


def test_systemd_unit_is_notify_with_the_socket() -> None:
    unit = (REPO / "deploy" / "systemd" / "xdpfw.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "RuntimeDirectory=xdpfw",
                 "Environment=XDPFW_SOCKET=/run/xdpfw/api.sock"):
        assert f"\n{line}\n" in unit, line


def test_bind_unix_mode_group_stale_and_missing_group(tmp_path: Path) -> None:
    import grp
    import os
    import stat as st

    from api.localsock import SocketError, bind_unix

    group = grp.getgrgid(os.getegid()).gr_name
    where = tmp_path / "run" / "api.sock"
    with pytest.raises(SocketError, match=r"group 'xfw-no-such-group' .* does not exist: create"):
        bind_unix(where, "xfw-no-such-group")
    sock = bind_unix(where, group)
    try:
        info = where.stat()
        assert st.S_ISSOCK(info.st_mode) and st.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getegid()
        with pytest.raises(SocketError, match="another process serves"):
            bind_unix(where, group)  # a live socket is never taken over
    finally:
        sock.close()
    bind_unix(where, group).close()  # a stale one (nobody listening) is replaced
    where.unlink()
    where.write_text("not a socket")
    with pytest.raises(SocketError, match="is not a socket"):
        bind_unix(where, group)
