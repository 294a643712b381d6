"""The CLI's pure parts: blocklist parsing, durations, humanised numbers, argument parsing, and
the mapping of API failures to messages and exit codes (httpx.MockTransport, no server)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from xdpfw import importers
from xdpfw.cli import humanize as hz
from xdpfw.cli import output
from xdpfw.cli.client import (
    EXIT_AUTH,
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Client,
    ClientError,
    Token,
    find_token,
    parse_table_usage,
)
from xdpfw.cli.main import build_parser, main

pytestmark = pytest.mark.pure

# --- importers -----------------------------------------------------------------------------

FIREHOL = """\
#
# firehol_level1
#
# ipv4 hash:net ipset
#
# Maintainer      : FireHOL
# List source URL : http://iplists.firehol.org/
#
198.18.10.0/24
198.18.11.7
198.18.12.0/23
"""

SPAMHAUS = """\
; Spamhaus DROP List 2024/01/01 - (c) 2024 The Spamhaus Project SLU
; https://www.spamhaus.org/drop/drop.txt
; Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT
198.18.16.0/20 ; SBL256894
2001:db8:1::/48 ; SBL123456

198.18.33.0/20 ; SBL999
"""

SPAMHAUS_JSON = (
    '{"cidr":"198.18.40.0/24","sblid":"SBL1","rir":"arin"}\n'
    '{"cidr":"2001:db8:2::/48","sblid":"SBL2","rir":"ripe"}\n'
    '{"type":"metadata","timestamp":1704067200,"size":2,"records":2}\n'
)


def nets(parsed: importers.ParsedList) -> list[str]:
    return [e.network.with_prefixlen for e in parsed.entries]


def test_plain_list_with_comments_blanks_and_bad_lines() -> None:
    text = (
        "\ufeff# my list\n"
        "198.18.1.1\n"
        "\n"
        "   198.18.2.0/24   # trailing note\n"
        "198.18.3.1/24\n"
        "not-an-address\n"
        "2001:db8::1\n"
        "198.18.1.1\n"
        "198.18.4.0/24\r\n"
        "198.18.5.1 198.18.5.2\n"
        "198.18.6.1-198.18.6.9\n"
    )
    p = importers.parse_blocklist(text.split("\n")[:-1])
    assert nets(p) == ["198.18.1.1/32", "198.18.2.0/24", "2001:db8::1/128", "198.18.4.0/24"]
    assert [e.lineno for e in p.entries] == [2, 4, 7, 9]
    assert [r.lineno for r in p.rejected] == [5, 6, 10, 11]
    host_bits, not_ip, two_words, rng = p.rejected
    assert "host bits set" in host_bits.reason and "198.18.3.0/24" in host_bits.reason
    assert "not an IPv4/IPv6 address" in not_ip.reason
    assert "one address or CIDR per line" in two_words.reason
    assert "ranges are not supported" in rng.reason
    assert str(host_bits).startswith("line 5: ")
    assert p.repeats == [(8, 2)]
    assert p.lines == 11
    assert p.format == "plain"


def test_firehol_netset() -> None:
    p = importers.parse_blocklist(FIREHOL.splitlines())
    assert nets(p) == ["198.18.10.0/24", "198.18.11.7/32", "198.18.12.0/23"]
    assert p.rejected == [] and p.format == "FireHOL"


def test_spamhaus_drop_text() -> None:
    p = importers.parse_blocklist(SPAMHAUS.splitlines())
    assert nets(p) == ["198.18.16.0/20", "2001:db8:1::/48"]
    assert [(r.lineno, r.text) for r in p.rejected] == [(7, "198.18.33.0/20 ; SBL999")]
    assert "did you mean 198.18.32.0/20" in p.rejected[0].reason
    assert p.format == "Spamhaus DROP"


def test_spamhaus_drop_json_lines() -> None:
    p = importers.parse_blocklist([*SPAMHAUS_JSON.splitlines(), '{"cidr": 5}', "{oops"])
    assert nets(p) == ["198.18.40.0/24", "2001:db8:2::/48"]
    assert [r.lineno for r in p.rejected] == [4, 5]
    assert "string" in p.rejected[0].reason and "JSON" in p.rejected[1].reason
    assert p.format == "Spamhaus DROP JSON"


def test_empty_and_comment_only() -> None:
    p = importers.parse_blocklist(["# nothing", "; here", "", "   "])
    assert p.entries == [] and p.rejected == [] and p.lines == 4


def test_chunks_and_body() -> None:
    p = importers.parse_blocklist([f"198.18.7.{i}" for i in range(1, 11)])
    parts = list(importers.chunks(p.entries, 4))
    assert [len(c) for c in parts] == [4, 4, 2]
    assert importers.body(parts[2]) == "198.18.7.9/32\n198.18.7.10/32\n"
    with pytest.raises(ValueError):
        list(importers.chunks(p.entries, 0))


def test_many_lines_fast_enough() -> None:
    net = ipaddress.ip_network("198.18.0.0/16")
    lines = [str(a) for _, a in zip(range(50_000), net.hosts(), strict=False)]
    p = importers.parse_blocklist(lines)
    assert len(p.entries) == 50_000 and not p.rejected


# --- durations and humanising --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("600", 600),
     ("1h30m", 5400), ("1h 30m", 5400), ("2H", 7200)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert hz.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "10x", "m", "-5", "1.5h", "10m junk"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        hz.parse_duration(text)


def test_humanise() -> None:
    assert [hz.count(n) for n in (0, 999, 1000, 1234, 1_234_567, 999_960, 3.5e12)] == [
        "0", "999", "1.0k", "1.2k", "1.2M", "1.0M", "3.5T"]
    assert [hz.bytes_(n) for n in (0, 999, 1500, 3_400_000_000)] == [
        "0 B", "999 B", "1.5 kB", "3.4 GB"]
    assert hz.rate(None) == "-"
    assert hz.rate(1500) == "1.5k pps"
    assert hz.rate(0.5) == "0.5 pps"
    assert hz.rate(2e6, "B/s") == "2.0 MB/s"
    assert hz.rate(12, "") == "12"
    assert [hz.duration(s) for s in (0, 42, 60, 3725, 90061)] == [
        "0s", "42s", "1m", "1h 2m", "1d 1h"]
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    past = (now - timedelta(seconds=125)).isoformat().replace("+00:00", "Z")
    future = (now + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    assert hz.ago(past, now) == "2m 5s ago"
    assert hz.ago(None, now) == "-"
    assert hz.until(future, now) == "in 2h"
    assert hz.until(past, now) == "now"
    assert hz.until(None, now) == "-"


def test_table() -> None:
    out = output.table(["ID", "NAME"], [["1", "a"], ["123", "bcd"]], right=(0,))
    assert out.splitlines() == [" ID  NAME", "  1  a", "123  bcd"]


# --- token discovery -----------------------------------------------------------------------


def test_find_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret\n")
    assert find_token("given", tmp_path, {}) == Token("given", "--token")
    assert find_token(None, tmp_path, {"XDPFW_TOKEN": "env"}) == Token("env", "XDPFW_TOKEN")
    assert find_token(None, tmp_path, {}) == Token("secret", str(tmp_path / "token"))
    env = {"XDPFW_STATE_DIR": str(tmp_path)}
    assert find_token(None, None, env).value == "secret"
    missing = find_token(None, tmp_path / "nope", {})
    assert missing.value is None and "does not exist" in missing.source


# --- errors: HTTP answers -> messages and exit codes ---------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def mock(handler: Handler, token: Token | None = None) -> Client:
    return Client("http://xdpfw.test", token, transport=httpx.MockTransport(handler))


def answer(status: int, body: object) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def fail(call: Callable[[], object]) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def test_connection_refused_says_how_to_start() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    err = fail(lambda: mock(refuse).rules())
    assert err.exit_code == EXIT_UNREACHABLE
    assert "cannot reach" in err.message and "Connection refused" in err.message
    assert "xdpfw serve --iface" in err.message and "sudo make run" in err.message


def test_timeout() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    err = fail(lambda: mock(slow).stats())
    assert err.exit_code == EXIT_UNREACHABLE and "did not answer" in err.message


def test_401_says_where_the_token_comes_from() -> None:
    detail = {"detail": "missing bearer token"}
    err = fail(lambda: mock(answer(401, detail), Token(None, "/x/token does not exist"))
               .delete_rule(3))
    assert err.exit_code == EXIT_AUTH and err.status == 401
    assert "/x/token does not exist" in err.message
    assert "--token" in err.message and "XDPFW_TOKEN" in err.message
    assert "<state-dir>/token" in err.message


def test_403_names_the_token_source() -> None:
    err = fail(lambda: mock(answer(403, {"detail": "wrong token"}), Token("t", "XDPFW_TOKEN"))
               .add_rule({"src": "198.18.0.1"}))
    assert err.exit_code == EXIT_AUTH and "XDPFW_TOKEN" in err.message
    assert "refused the token" in err.message


def test_422_lists_each_field_and_problem() -> None:
    body = {"detail": [
        {"loc": ["body", "src"], "msg": "'198.18.0.1/24' has host bits set", "type": "x"},
        {"loc": ["body", "ttl_seconds"], "msg": "Input should be >= 1", "type": "y"},
        {"loc": ["query", "limit"], "msg": "too big", "type": "z"},
        {"loc": ["body"], "msg": "nothing added; 2 invalid line(s)", "type": "v"},
    ]}
    err = fail(lambda: mock(answer(422, body)).add_rule({}))
    assert err.exit_code == EXIT_USAGE
    assert err.problems == [
        ("src", "'198.18.0.1/24' has host bits set"),
        ("ttl_seconds", "Input should be >= 1"),
        ("limit", "too big"),
        ("body", "nothing added; 2 invalid line(s)"),
    ]
    assert "src: '198.18.0.1/24' has host bits set" in err.message


def test_404_409_507_500() -> None:
    err = fail(lambda: mock(answer(404, {"detail": "no rule with id 7"})).rule(7))
    assert err.exit_code == EXIT_ERROR and err.message.startswith("no rule 7")
    err = fail(lambda: mock(answer(409, {"detail": "conflicts", "existing_id": 4}))
               .add_rule({"src": "198.18.0.1"}))
    assert "conflicts" in err.message and "existing rule 4" in err.message
    assert err.exit_code == EXIT_ERROR
    err = fail(lambda: mock(answer(507, {"detail": "rule table is full (limit 8)", "limit": 8}))
               .bulk_text("198.18.0.1\n"))
    assert "full (limit 8)" in err.message and "xdpfw rule rm" in err.message
    err = fail(lambda: mock(answer(500, {"detail": "bpf failed", "hint": "check dmesg"})).stats())
    assert "bpf failed" in err.message and "check dmesg" in err.message and "500" in err.message


def test_non_json_error_body() -> None:
    err = fail(lambda: mock(lambda r: httpx.Response(502, text="Bad Gateway")).stats())
    assert "Bad Gateway" in err.message and err.exit_code == EXIT_ERROR


def test_degraded_health_is_an_answer() -> None:
    body = {"status": "degraded", "prog_id": 3, "adopted": False, "rules": 0, "interfaces": []}
    assert mock(answer(503, body)).health()["status"] == "degraded"
    err = fail(lambda: mock(answer(503, {"detail": "datapath down"})).health())
    assert "datapath down" in err.message


def test_requests_carry_token_and_follow_pages() -> None:
    seen: list[httpx.Request] = []
    rule = {"id": 0, "action": "drop", "mode": "enforce", "src": None, "dst": None,
            "proto": "udp", "dport": None, "comment": "", "created_at": "", "expires_at": None,
            "counters": None}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        cursor = request.url.params.get("cursor")
        if cursor is None:
            return httpx.Response(200, json={"rules": [{**rule, "id": 1}], "next_cursor": "1"})
        return httpx.Response(200, json={"rules": [{**rule, "id": 2}], "next_cursor": None})

    rules = mock(handler, Token("sekrit", "--token")).rules(page_size=1)
    assert [r["id"] for r in rules] == [1, 2]
    assert all(r.headers["authorization"] == "Bearer sekrit" for r in seen)
    assert seen[1].url.params["cursor"] == "1"


def test_bulk_sends_text_and_query() -> None:
    got: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        got["ctype"] = request.headers["content-type"]
        got["params"] = dict(request.url.params)
        got["body"] = request.content.decode()
        return httpx.Response(201, json={"added": 1, "duplicates": 0, "ids": [5],
                                         "duplicate_ids": []})

    out = mock(handler).bulk_text("198.18.0.1/32\n", comment="c", ttl_seconds=60)
    assert out["ids"] == [5]
    assert got == {"ctype": "text/plain", "body": "198.18.0.1/32\n",
                   "params": {"action": "drop", "mode": "enforce", "comment": "c",
                              "ttl_seconds": "60"}}


def test_parse_table_usage() -> None:
    text = (
        '# HELP xdpfw_table_entries Entries in each table\n'
        '# TYPE xdpfw_table_entries gauge\n'
        'xdpfw_table_entries{table="rules"} 3.0\n'
        'xdpfw_table_entries{table="xdpfw_src4"} 2.0\n'
        'xdpfw_table_capacity{table="rules"} 8192.0\n'
        'xdpfw_table_capacity{table="xdpfw_src4"} 1.048576e+06\n'
        'xdpfw_rule_packets_total{rule_id="1"} 10.0\n'
    )
    assert parse_table_usage(text) == {"rules": (3, 8192), "xdpfw_src4": (2, 1048576)}


def test_bad_api_url() -> None:
    err = fail(lambda: Client("foo").stats())
    assert err.exit_code == EXIT_USAGE and "--api http://" in err.message


# --- the parser and main() without a server ------------------------------------------------


def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["rule", "add"], ["rule", "rm"], ["rule", "ls"], ["rule", "show"],
                 ["import"], ["stats"], ["top"], ["serve"], ["rule"], []):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out, argv


def test_connection_options_before_or_after_the_command() -> None:
    p = build_parser()
    a = p.parse_args(["--api", "http://a:1", "rule", "ls"])
    b = p.parse_args(["rule", "ls", "--api", "http://a:1", "--state-dir", "/s"])
    assert a.api == b.api == "http://a:1" and b.client_state_dir == Path("/s")
    assert not hasattr(p.parse_args(["rule", "ls"]), "api")


def test_serve_flags_unchanged() -> None:
    a = build_parser().parse_args(["serve", "--iface", "eth1", "--state-dir", "/x"])
    assert a.iface == ["eth1"] and a.state_dir == Path("/x") and a.listen is None
    with pytest.raises(SystemExit) as info:
        main(["--api", "http://x", "serve"])
    assert info.value.code == 2


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["rule", "add", "--ttl", "soon"], ["rule", "rm", "x"], ["stats", "--top", "0"],
                 ["rule", "add", "--proto", "sctp"], ["top", "--interval", "0"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    assert "duration" in capsys.readouterr().err


def test_unreachable_service_exit_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDPFW_API", raising=False)
    rc = main(["--api", "http://127.0.0.1:9", "status"])
    err = capsys.readouterr().err
    assert rc == EXIT_UNREACHABLE
    assert err.startswith("xdpfw status: cannot reach") and "xdpfw serve" in err


def test_import_validates_locally_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "list.txt"
    f.write_text("198.18.0.1\n198.18.0.1/24\n")
    # --dry-run and --strict never reach the (absent) API.
    assert main(["--api", "http://127.0.0.1:9", "import", str(f), "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "would add   1" in out and "line 2:" in err and "host bits" in err
    assert main(["--api", "http://127.0.0.1:9", "import", str(f), "--strict", "--json"]) == 2
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["rejected"][0]["line"] == 2 and summary["added"] == 0
    assert "--strict" in err
    assert main(["--api", "http://127.0.0.1:9", "import", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err
    f.write_text("198.18.0.1\n")
    rc = main(["--api", "http://127.0.0.1:9", "import", str(f), "--action", "allow",
               "--monitor"])
    assert rc == 2 and "--monitor" in capsys.readouterr().err


def test_client_commands_do_not_import_the_service() -> None:
    code = (
        "import sys; from xdpfw.cli.main import main\n"
        "main(['--api', 'http://127.0.0.1:9', 'rule', 'ls'])\n"
        "bad = [m for m in ('bcc', 'pyroute2', 'fastapi', 'uvicorn', 'api.server') "
        "if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]", out.stderr


def test_shell_completion_through_argcomplete(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete")
    out = tmp_path / "completions"
    line = "xdpfw rule add --proto "
    subprocess.run(
        [sys.executable, "-c", "import sys; from xdpfw.cli.main import main; sys.exit(main())"],
        env={**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n",
             "COMP_LINE": line, "COMP_POINT": str(len(line)), "COMP_TYPE": "9",
             "_ARGCOMPLETE_STDOUT_FILENAME": str(out)},
        capture_output=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.read_text().split("\n") == ["tcp", "udp", "icmp", "icmpv6"]


# --- --version and status -------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from xdpfw.cli import parser

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"xdpfw {metadata.version('xdpfw')}\n"

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(parser.metadata, "version", missing)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == "xdpfw unknown\n"


HEALTH = {
    "status": "ok", "prog_id": 7, "adopted": True, "rules": 3, "protected": ["10.0.0.0/8"],
    "interfaces": [
        {"name": "eth1", "attached": True, "mode": "native", "prog_id": 7, "ifindex": 4}
    ],
    "capacity": {
        "rules": {"entries": 3, "capacity": 8192},
        "xdpfw_src4": {"entries": 2, "capacity": 1048576},
    },
}


def test_status_reads_only_healthz(capsys: pytest.CaptureFixture[str]) -> None:
    from xdpfw.cli.status import cmd_status

    seen: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path != "/healthz":
            return httpx.Response(500, json={"detail": "status must read only /healthz"})
        return httpx.Response(200, json=HEALTH)

    args = build_parser().parse_args(["status"])
    assert cmd_status(args, mock(server)) == 0
    out = capsys.readouterr().out
    assert "program     id 7  (adopted from a previous run)" in out
    assert "rules       3" in out and "native" in out
    lines = out.splitlines()
    rules = next(i for i, line in enumerate(lines) if line.startswith("rules "))
    table = lines.index(next(line for line in lines if line.startswith("TABLE")))
    assert table > rules and lines[table + 1].split() == ["rules", "3", "8.2k", "0.0%"]
    assert lines[table + 2].split() == ["src4", "2", "1.0M", "0.0%"]
    args = build_parser().parse_args(["status", "--json"])
    assert cmd_status(args, mock(server)) == 0
    body = json.loads(capsys.readouterr().out)
    assert body == {"api": "http://xdpfw.test", "health": HEALTH, "capacity": HEALTH["capacity"]}
    assert seen == ["/healthz", "/healthz"]
