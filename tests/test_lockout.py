"""Issue 20, items 9-13: the service never cuts its own control path, IPv4-mapped addresses
mean IPv4, drop rules without a source respect protected prefixes, tokens are kept safe, and
the CLI's human output cannot be forged by what it prints.

Pure tests drive the real service and app over the stand-in datapath (tests/fakes.py); the
bpf test runs the loaded program (BPF_PROG_TEST_RUN); the e2e tests run `xdpfw serve` on a
veth lab and send real packets from the lab namespace.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from api.server import ServeError, load_token
from api.service import API_RULE_ID, FirewallService, api_allow_rule
from api.settings import MIN_TOKEN_CHARS, Settings
from api.store import Store
from tests.conftest import unique_pin_dir
from tests.fakes import FakeDatapath
from tests.server import XDPFW, Server, _remove_pins, free_port
from tests.traffic import udp_roundtrip
from xdpfw import errors, importers
from xdpfw.cli.main import build_parser
from xdpfw.cli.output import printable
from xdpfw.cli.stats import TOTALS
from xdpfw.kernel import netlink
from xdpfw.lab import VethLab, veth_lab
from xdpfw.rules import RuleSpec, parse_network

TOKEN = "lockout-test-token-0123456789"
PROTECTED = "198.18.255.0/24"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def service(
    tmp: Path,
    *,
    listen: str = "127.0.0.1:8000",
    protect: tuple[str, ...] = (),
    api_listen: tuple[str, int] | None = None,
    dp: FakeDatapath | None = None,
) -> Iterator[tuple[TestClient, FirewallService, FakeDatapath]]:
    dp = dp or FakeDatapath(interfaces={"eth0", "eth1", "lo"})
    store = Store(tmp / "rules.sqlite3")
    try:
        svc = FirewallService(dp, store, protect, api_listen)
        svc.reconcile()
        app = create_app(Settings(listen=listen, state_dir=tmp), svc, TOKEN)
        yield TestClient(app), svc, dp
    finally:
        store.close()


# -- 9: never cut the control path -------------------------------------------------------------


@pytest.mark.pure
def test_lo_is_refused_by_the_api_and_at_start(tmp_path: Path) -> None:
    with service(tmp_path) as (c, svc, dp):
        r = c.post("/v1/interfaces", json={"name": "lo"}, headers=AUTH)
        assert r.status_code == 422, r.text
        msg = r.json()["errors"][0]["msg"]
        assert "loopback" in msg and "cut the API" in msg
        assert "lo" not in dp.attached and svc.interfaces() == {}
        assert c.post("/v1/interfaces", json={"name": "eth1"}, headers=AUTH).status_code == 201
    with pytest.raises(ValidationError, match="never filters the loopback interface"):
        Settings(iface=["eth1", "lo"])
    # attached to lo by an earlier version: detached and forgotten at start
    with service(tmp_path / "old") as (c, svc, dp):
        dp.attach("lo")
        with svc.store.transaction():
            svc.store.set_interface("lo", "auto")
        assert svc.forget_loopback() is True
        assert "lo" not in dp.attached and svc.interfaces() == {}
        assert svc.forget_loopback() is False


@pytest.mark.pure
def test_the_api_port_is_allowed_above_every_drop(tmp_path: Path) -> None:
    rule = api_allow_rule("198.18.6.1", 8443)
    assert rule is not None and rule.id == API_RULE_ID
    assert (rule.action, rule.describe()) == ("allow", "dst 198.18.6.1/32 tcp dport 8443")
    v6 = api_allow_rule("2001:db8::1", 80)
    assert v6 is not None and v6.describe() == "dst 2001:db8::1/128 tcp dport 80"
    for wildcard in ("0.0.0.0", "::", "api.example"):
        any_dst = api_allow_rule(wildcard, 8000)
        assert any_dst is not None and any_dst.describe() == "tcp dport 8000", wildcard
    assert api_allow_rule("127.0.0.1", 8000) is None  # loopback never crosses a filter
    assert api_allow_rule("localhost", 8000) is None

    with service(tmp_path, listen="198.18.6.1:8443", protect=(PROTECTED,),
                 api_listen=("198.18.6.1", 8443)) as (c, _, dp):
        assert dp.compiler.rules[API_RULE_ID] == rule
        r = c.post("/v1/rules", json={"src": "0.0.0.0/0", "force": True}, headers=AUTH)
        assert r.status_code == 201, r.text
        assert API_RULE_ID in dp.compiler.rules  # still allowed above the drop
        assert c.delete(f"/v1/rules/{API_RULE_ID}", headers=AUTH).status_code == 404
        same = {"action": "allow", "dst": "198.18.6.1", "proto": "tcp", "dport": 8443}
        r = c.post("/v1/rules", json=same, headers=AUTH)
        assert r.status_code == 409 and "is the API's own port" in r.json()["detail"]
        listed = c.get("/v1/rules", headers=AUTH).json()["rules"]
        assert [x["src"] for x in listed] == ["0.0.0.0/0"]
        health = c.get("/healthz", headers=AUTH).json()
        assert health["rules"] == 1 and health["protected"] == [PROTECTED]
    # XDPFW_PROTECT_API=false: the service gets no listen address, installs no such rule
    assert Settings().protect_api is True
    os.environ["XDPFW_PROTECT_API"] = "false"
    try:
        assert Settings().protect_api is False
    finally:
        del os.environ["XDPFW_PROTECT_API"]
    with service(tmp_path / "off") as (_, _, dp):
        assert API_RULE_ID not in dp.compiler.rules


# -- 10: IPv4-mapped IPv6 addresses -------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("::ffff:198.18.6.1", "198.18.6.1/32"),
        ("::ffff:198.18.6.0/120", "198.18.6.0/24"),
        ("::FFFF:c612:601", "198.18.6.1/32"),
        ("0:0:0:0:0:ffff:198.18.6.1/128", "198.18.6.1/32"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),  # not mapped: unchanged
        ("::/0", "::/0"),
    ],
)
def test_mapped_addresses_become_ipv4(text: str, want: str) -> None:
    assert parse_network(text).with_prefixlen == want
    assert RuleSpec.parse(dst=text).describe() == f"dst {want}"


@pytest.mark.pure
def test_mapped_prefixes_refused_with_why() -> None:
    with pytest.raises(errors.InvalidRule, match="shorter than /96") as info:
        parse_network("::ffff:198.18.6.0/95")
    assert "not IPv4-mapped" in info.value.problem
    with pytest.raises(errors.InvalidRule, match=r"did you mean 198\.18\.6\.0/24"):
        parse_network("::ffff:198.18.6.1/120")
    # an IPv6-only protocol with what is an IPv4 address
    with pytest.raises(errors.InvalidRule, match="IPv6 protocol"):
        RuleSpec.parse(src="::ffff:198.18.6.1", proto="icmpv6")


@pytest.mark.pure
def test_mapped_addresses_in_lists_settings_and_the_api(tmp_path: Path) -> None:
    parsed = importers.parse_blocklist(["::ffff:198.18.6.1", "198.18.6.1", "::ffff:198.18.7.0/120"])
    assert [e.cidr for e in parsed.entries] == ["198.18.6.1/32", "198.18.7.0/24"]
    assert parsed.repeats == [(2, 1)]
    bad = importers.parse_blocklist(["::ffff:198.18.6.0/90"])
    assert "shorter than /96" in bad.rejected[0].reason
    assert Settings(protect=["::ffff:198.18.6.0/120"]).protect == ["198.18.6.0/24"]

    with service(tmp_path, protect=("::ffff:198.18.255.0/120",)) as (c, _, _):
        assert c.get("/healthz").json()["protected"] == [PROTECTED]
        r = c.post("/v1/rules", json={"src": "::ffff:198.18.6.1"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["src"] == "198.18.6.1/32", r.text
        same = c.post("/v1/rules", json={"src": "198.18.6.1"}, headers=AUTH)
        assert same.json()["id"] == r.json()["id"]  # the same rule, not a second one
        r = c.post("/v1/rules", json={"dst": "::ffff:198.18.7.0/120", "force": True},
                   headers=AUTH)
        assert r.status_code == 201 and r.json()["dst"] == "198.18.7.0/24", r.text
        r = c.post("/v1/rules", json={"src": "::ffff:198.18.6.0/95"}, headers=AUTH)
        assert r.status_code == 422 and "shorter than /96" in r.text
        r = c.post("/v1/rules/bulk", content="::ffff:198.18.8.9\n", headers={
            **AUTH, "content-type": "text/plain"})
        assert r.status_code == 201, r.text
        srcs = [x["src"] for x in c.get("/v1/rules").json()["rules"]]
        assert srcs == ["198.18.6.1/32", None, "198.18.8.9/32"]


@pytest.mark.bpf
def test_a_mapped_rule_drops_the_ipv4_frame(dp: Any) -> None:
    from xdpfw.kernel import bpfsys
    from xdpfw.verify.frames import build_frame

    frame = build_frame(src="198.18.6.1", dst="198.19.0.1", proto="udp", dport=80)
    assert bpfsys.prog_test_run(dp.prog_fd, frame).retval == 2  # XDP_PASS
    rule = RuleSpec.parse(src="::ffff:198.18.6.1").with_id(7)
    dp.add_rules([rule])
    before = dp.rule_counters([7])[7].packets
    assert bpfsys.prog_test_run(dp.prog_fd, frame).retval == 1  # XDP_DROP
    assert dp.rule_counters([7])[7].packets == before + 1


# -- 11: drop rules without a source, and protections dropped at restart ------------------------


@pytest.mark.pure
def test_a_dst_drop_needs_force_over_protected_prefixes(tmp_path: Path) -> None:
    with service(tmp_path, protect=(PROTECTED,)) as (c, _, _):
        for body in ({"dst": "0.0.0.0/0"}, {"dst": "198.18.6.0/24", "proto": "udp"}):
            r = c.post("/v1/rules", json=body, headers=AUTH)
            assert r.status_code == 409, r.text
            assert "matches every source, including the protected prefix " + PROTECTED in (
                r.json()["detail"])
        assert c.post("/v1/rules/bulk", json=[{"dst": "0.0.0.0/0"}], headers=AUTH
                      ).status_code == 409
        assert c.get("/v1/rules").json()["rules"] == []
        # an IPv6 destination never sees the (IPv4) protected sources
        assert c.post("/v1/rules", json={"dst": "2001:db8::/32"}, headers=AUTH
                      ).status_code == 201
        # allow and monitor rules never drop; force adds it
        assert c.post("/v1/rules", json={"dst": "0.0.0.0/0", "mode": "monitor"},
                      headers=AUTH).status_code == 201
        r = c.post("/v1/rules", json={"dst": "0.0.0.0/0", "force": True}, headers=AUTH)
        assert r.status_code == 201, r.text


@pytest.mark.pure
def test_a_protection_dropped_at_restart_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dp = FakeDatapath()
    with service(tmp_path, protect=(PROTECTED, "2001:db8:ff::/48"), dp=dp) as (c, svc, _):
        for body in ({"src": "198.18.0.0/16"}, {"dst": "198.19.0.1"}, {"src": "198.18.255.9"},
                     {"src": "2001:db8::/32"}):
            r = c.post("/v1/rules", json={**body, "force": True}, headers=AUTH)
            assert r.status_code == 201, r.text
        c.post("/v1/rules", json={"src": "198.18.255.0/25", "action": "allow"}, headers=AUTH)
        c.post("/v1/rules", json={"src": "198.18.1.0/24"}, headers=AUTH)  # overlaps nothing
        assert svc.store.protected_prefixes() == [PROTECTED, "2001:db8:ff::/48"]
    with (
        caplog.at_level(logging.WARNING, "xdpfw.service"),
        service(tmp_path, protect=("198.18.255.0/28",), dp=dp) as (_, svc, _),
    ):
        assert svc.store.protected_prefixes() == ["198.18.255.0/28"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, [r.getMessage() for r in warned]
    text = "\n".join(r.getMessage() for r in warned)
    assert f"{PROTECTED} was protected at the last start and is not now" in text
    assert "3 stored drop rule(s) now apply to it" in text  # /16, the dst rule, the /32
    assert "2001:db8:ff::/48 was protected" in text and "1 stored drop rule(s)" in text
    caplog.clear()
    with (  # the same protection as last time: nothing to say
        caplog.at_level(logging.WARNING, "xdpfw.service"),
        service(tmp_path, protect=("198.18.255.0/28",), dp=dp),
    ):
        pass
    assert not [r for r in caplog.records if "was protected" in r.getMessage()]


# -- 12: token hygiene ----------------------------------------------------------------------------


def _settings(tmp: Path, listen: str = "198.18.6.1:8000", **kw: Any) -> Settings:
    return Settings(listen=listen, state_dir=tmp, **kw)


@pytest.mark.pure
def test_load_token_refuses_weak_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDPFW_TOKEN", raising=False)
    with pytest.raises(ServeError, match=f"needs a token of at least {MIN_TOKEN_CHARS}"):
        load_token(_settings(tmp_path, token="x"))
    assert load_token(_settings(tmp_path, token="x" * MIN_TOKEN_CHARS)) == "x" * MIN_TOKEN_CHARS
    assert load_token(_settings(tmp_path, "127.0.0.1:8000", token="x")) == "x"  # loopback

    path = tmp_path / "token"
    path.write_text("   \n\t\n")
    path.chmod(0o600)
    with pytest.raises(ServeError, match="is empty") as info:
        load_token(_settings(tmp_path, "127.0.0.1:8000"))
    assert str(path) in str(info.value) and "File exists" not in str(info.value)

    path.write_text(TOKEN + "\n")
    for mode in (0o666, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(ServeError, match=f"Run: chmod 600 {path}") as info:
            load_token(_settings(tmp_path))
        assert f"mode {mode:04o}" in str(info.value)
    path.chmod(0o600)
    assert load_token(_settings(tmp_path)) == TOKEN
    path.write_text("short\n")
    with pytest.raises(ServeError, match=f"the token in {path} has 5 character"):
        load_token(_settings(tmp_path))
    path.unlink()
    generated = load_token(_settings(tmp_path, "127.0.0.1:8000"))  # the first loopback start
    assert len(generated) >= 40 and (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.pure
def test_health_detail_needs_the_token_off_loopback(tmp_path: Path) -> None:
    with service(tmp_path, listen="198.18.6.1:8000", protect=(PROTECTED,)) as (c, _, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.get("/healthz", headers=headers)
            assert r.status_code == 503  # no interface: degraded, and still says so
            body = r.json()
            assert body["status"] == "degraded" and "protected" not in body, body
            assert PROTECTED not in r.text and "interfaces" not in body
            assert "capacity" not in body
        r = c.get("/healthz", headers=AUTH)
        assert r.json()["protected"] == [PROTECTED] and "capacity" in r.json()
    with service(tmp_path / "lo", protect=(PROTECTED,)) as (c, _, _):
        assert c.get("/healthz").json()["protected"] == [PROTECTED]  # loopback: all shown


@pytest.mark.pure
def test_cli_status_says_the_detail_needs_the_token() -> None:
    from xdpfw.cli.client import EXIT_AUTH, ClientError

    hidden = {"status": "ok", "detail": "send the token"}
    with pytest.raises(ClientError) as info:
        _cli(lambda r: httpx.Response(200, json=hidden)).health()
    assert info.value.exit_code == EXIT_AUTH and "without its token" in info.value.message


# -- 13: the CLI's human output, and 405 answers ---------------------------------------------------

FORGED = "ok\x1b[2K\r\n999  drop     0.0.0.0/0\x9b31m\x7f\u2028"


def _rule(rid: int, comment: str, src: str = "198.18.6.1/32") -> dict[str, Any]:
    return {"id": rid, "action": "drop", "mode": "enforce", "src": src, "dst": None,
            "proto": None, "dport": None, "comment": comment,
            "created_at": "2026-01-01T00:00:00.000Z", "expires_at": None,
            "counters": {"packets": 1, "bytes": 60, "last_hit": None}}


def _cli(handler: Any) -> Any:
    from xdpfw.cli.client import Client

    return Client("http://xdpfw.test", None, transport=httpx.MockTransport(handler))


@pytest.mark.pure
def test_printable_escapes_every_control_character() -> None:
    assert printable("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    assert printable(FORGED) == r"ok\x1b[2K\r\n999  drop     0.0.0.0/0\x9b31m\x7f\u2028"
    for c in [*range(0x20), *range(0x7F, 0xA0)]:
        out = printable(chr(c))
        assert out.startswith("\\") and out.isprintable(), hex(c)


@pytest.mark.pure
def test_comments_cannot_forge_cli_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from xdpfw.cli.rules import cmd_rule_ls, cmd_rule_show
    from xdpfw.cli.stats import cmd_stats

    rules = [_rule(1, FORGED), _rule(2, "fine", src="198.18.\x1b[31m7.0/24")]

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/rules":
            return httpx.Response(200, json={"rules": rules, "next_cursor": None})
        if request.url.path == "/v1/rules/1":
            return httpx.Response(200, json=rules[0])
        if request.url.path == "/v1/rules/2":
            return httpx.Response(200, json=rules[1])
        totals = dict.fromkeys(TOTALS, 0)
        return httpx.Response(200, json={"totals": totals, "rules": [
            {"id": 2, "packets": 1, "bytes": 60, "last_hit": None}]})

    parser = build_parser()
    assert cmd_rule_ls(parser.parse_args(["rule", "ls"]), _cli(server)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out and "\r" not in out
    assert len(out.splitlines()) == 3  # the header and one line per rule
    assert r"ok\x1b[2K\r\n999  drop" in out and r"198.18.\x1b[31m7.0/24" in out
    assert cmd_rule_show(parser.parse_args(["rule", "show", "1"]), _cli(server)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and r"comment   ok\x1b[2K\r\n999" in out
    assert cmd_stats(parser.parse_args(["stats"]), _cli(server)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and r"src 198.18.\x1b[31m7.0/24" in out
    # --json stays exact
    assert cmd_rule_ls(parser.parse_args(["rule", "ls", "--json"]), _cli(server)) == 0
    assert json.loads(capsys.readouterr().out)["rules"][0]["comment"] == FORGED


@pytest.mark.pure
def test_top_escapes_what_it_shows() -> None:
    from rich.console import Console

    from xdpfw.cli.stats import RuleCache, Sample
    from xdpfw.cli.top import _top_view

    cache = RuleCache(_cli(lambda r: httpx.Response(500)))
    cache.rules[1] = _rule(1, "x", src="198.18.\x1b[2J6.1/32")  # type: ignore[assignment]
    health = {"status": "ok", "prog_id": 1, "rules": 1, "interfaces": [
        {"name": "eth\x1b[31m1", "attached": True, "mode": "native"}]}
    sample = Sample(0.0, {"totals": {}, "rules": [  # type: ignore[typeddict-item]
        {"id": 1, "packets": 1, "bytes": 60, "last_hit": None}]})
    args = build_parser().parse_args(["top"])
    view = _top_view("http://x", health, sample, None, sample.stats["rules"], cache,  # type: ignore[arg-type]
                     args, "oops\n\x1b[H")
    console = Console(width=200, force_terminal=False, color_system=None, record=True)
    console.print(view)
    out = console.export_text()
    assert "\x1b" not in out
    assert r"198.18.\x1b[2J6.1/32" in out and r"eth\x1b[31m1" in out and r"oops\n\x1b[H" in out


@pytest.mark.pure
def test_405_names_the_allowed_methods(tmp_path: Path) -> None:
    with service(tmp_path) as (c, _, _):
        for method, path, allow in (
            ("PUT", "/v1/rules", "DELETE, GET, POST"),
            ("PATCH", "/v1/rules/1", "DELETE, GET"),
            ("DELETE", "/healthz", "GET"),
            ("POST", "/v1/interfaces/eth0", "DELETE"),
            ("POST", "/v1/stats", "GET"),
        ):
            r = c.request(method, path, headers=AUTH)
            assert r.status_code == 405, (method, path)
            assert r.headers.get("allow") == allow, (method, path, r.headers)


# -- e2e: the real server -----------------------------------------------------------------------


class LabServer(Server):
    """A server listening on the lab's host address (not loopback), so the peer reaches it."""

    @property
    def url(self) -> str:
        return f"http://{self.lab.host_ip4}:{self.port}"

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--listen") + 1] = f"{self.lab.host_ip4}:{self.port}"
        return argv


@contextmanager
def lab_server(tmp: Path, *args: str) -> Iterator[LabServer]:
    bpffs = unique_pin_dir("lockout")
    with veth_lab(prefix="xfl") as lab:
        srv = LabServer(lab=lab, state_dir=tmp / "state", bpffs_dir=bpffs,
                        env={"XDPFW_TOKEN": TOKEN}, extra_args=list(args))
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()
            _remove_pins(bpffs)


def _tcp_from_peer(lab: VethLab, port: int, request: bytes | None, timeout: float = 1.5) -> bytes:
    """Connect from the lab namespace to host_ip4:port; b"" when the SYN is dropped."""
    s = netlink.socket_in_netns(lab.netns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect((lab.host_ip4, port))
        except (TimeoutError, OSError):
            return b""
        if request is None:
            return b"connected"
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data
    finally:
        s.close()


@pytest.mark.e2e
def test_a_drop_all_rule_never_cuts_the_api(tmp_path: Path) -> None:
    """The API listens on the lab's host address; a forced 0.0.0.0/0 drop leaves TCP to it
    from the peer namespace working and drops the rest. Restarted without the --protect the
    drop was forced over, the server says so; with XDPFW_PROTECT_API=false, it warns, and the
    drop then cuts the API (what the protection prevents)."""
    protect = "198.18.250.0/24"  # not the lab's: only the record of it matters here
    with lab_server(tmp_path, "--protect", protect) as srv:
        lab = srv.lab
        get = (f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Connection: close\r\n\r\n").encode()
        assert b'"status":"ok"' in _tcp_from_peer(lab, srv.port, get)
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=10) as c:
            r = c.post("/v1/rules", json={"src": "0.0.0.0/0"})
            assert r.status_code == 409  # it covers the protected prefix
            r = c.post("/v1/rules", json={"src": "0.0.0.0/0", "force": True})
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            # the API answers the peer through the drop-all rule ...
            answer = _tcp_from_peer(lab, srv.port, get)
            assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer, answer
            # ... while UDP, and TCP to any other port, are dropped
            assert udp_roundtrip(lab, count=5) == 0
            with socket.socket() as other:
                other.bind((lab.host_ip4, 0))
                other.listen()
                assert _tcp_from_peer(lab, other.getsockname()[1], None) == b""
        srv.stop()
        out = srv.output()
        assert "was protected at the last start" not in out
        assert "XDPFW_PROTECT_API=false" not in out

        srv.extra_args = []
        srv.env["XDPFW_PROTECT_API"] = "false"
        srv.start()
        out = srv.output()
        assert (f"{protect} was protected at the last start and is not now (no --protect "
                f"{protect}): 1 stored drop rule(s) now apply to it") in out, out
        assert "XDPFW_PROTECT_API=false: drop rules may cut off the API" in out, out
        assert _tcp_from_peer(lab, srv.port, None) == b""  # unprotected: cut off
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=10) as c:
            assert c.delete(f"/v1/rules/{rid}").status_code == 204
        assert b'"status":"ok"' in _tcp_from_peer(lab, srv.port, get)
        assert udp_roundtrip(lab, count=5) == 5


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("case", "want"),
    [
        ("short-env", f"XDPFW_TOKEN has 1 character(s); listening on 198.18.6.1:{{port}} "
                      f"(not loopback) needs a token of at least {MIN_TOKEN_CHARS}"),
        ("0666-file", "is accessible by group or others (mode 0666)"),
        ("blank-file", "is empty; write a token into it"),
        ("iface-lo", "never filters the loopback interface (lo)"),
    ],
)
def test_start_up_refusals(tmp_path: Path, case: str, want: str) -> None:
    port = free_port()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDPFW_")}
    listen = f"198.18.6.1:{port}"
    if case == "short-env":
        env["XDPFW_TOKEN"] = "x"
    elif case == "0666-file":
        (state / "token").write_text(TOKEN)
        (state / "token").chmod(0o666)
        want += f"; anyone who reads it controls the firewall. Run: chmod 600 {state / 'token'}"
    elif case == "blank-file":
        (state / "token").write_text("  \n")
        (state / "token").chmod(0o600)
        listen = f"127.0.0.1:{port}"
    argv = [XDPFW, "serve", "--listen", listen, "--state-dir", str(state),
            "--bpffs-dir", str(unique_pin_dir("refused"))]
    argv += ["--iface", "lo"] if case == "iface-lo" else ["--iface", "nosuch0"]
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    finally:
        _remove_pins(Path(argv[argv.index("--bpffs-dir") + 1]))
    assert p.returncode != 0
    assert want.format(port=port) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
