"""The CLI's source commands against the real app and service (stand-in datapath, no root):
argument parsing, what each command sends, what it prints, and its exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_api_pure import PROTECTED, Api, _api
from xdpfw.cli.client import EXIT_ERROR, EXIT_USAGE, Client
from xdpfw.cli.main import build_parser

pytestmark = pytest.mark.pure

LIST = "# a feed\n198.18.60.0/24\n198.18.61.1\n198.18.255.7\n"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = _api(tmp_path / "rules.sqlite3", protect=(PROTECTED,))
    yield a
    a.store.close()


@pytest.fixture
def client(api: Api) -> Client:
    def forward(request: httpx.Request) -> httpx.Response:
        r = api.client.request(request.method, str(request.url.copy_with(scheme="http",
                                                                         host="testserver")),
                               content=request.content, headers=dict(request.headers))
        return httpx.Response(r.status_code, content=r.content, headers=r.headers)

    return Client("http://xdpfw.test", None, transport=httpx.MockTransport(forward))


def run(client: Client, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    handler = args.func.__closure__[0].cell_contents  # client_command(handler) -> handler
    return int(handler(args, client))


def test_replace_ls_show_export_rm(client: Client, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "feed.txt"
    f.write_text(LIST)
    assert run(client, "source", "replace", "feed", str(f), "--ttl", "1h", "--comment", "c") == 0
    out = capsys.readouterr().out
    assert "source feed: added 3, removed 0, unchanged 0" in out
    assert "overlaps    1 entries" in out and "198.18.255.0/24" in out
    f.write_text("198.18.61.1\n198.18.62.1\n")
    assert run(client, "source", "replace", "feed", str(f)) == 0
    assert "added 1, removed 2, unchanged 1" in capsys.readouterr().out
    assert run(client, "source", "ls") == 0
    out = capsys.readouterr().out
    assert "SOURCE" in out and "feed" in out
    assert run(client, "source", "show", "feed") == 0
    out = capsys.readouterr().out
    assert "rules     2" in out and "198.18.62.1" in out
    assert run(client, "source", "export", "feed") == 0
    assert capsys.readouterr().out.splitlines() == [
        "# xdpfw source feed: 2 rule(s)", "198.18.61.1/32", "198.18.62.1/32"]
    assert run(client, "rule", "ls", "--source", "feed", "--format", "plain") == 0
    assert capsys.readouterr().out.split() == ["198.18.61.1/32", "198.18.62.1/32"]
    assert run(client, "source", "rm", "feed") == 0
    assert "removed source feed (2 rule(s) released)" in capsys.readouterr().out
    assert run(client, "source", "ls") == 0
    assert "no sources" in capsys.readouterr().err


def test_errors(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    from xdpfw.cli.client import ClientError

    with pytest.raises(ClientError) as exc:
        run(client, "source", "show", "nosuch")
    assert exc.value.exit_code == EXIT_ERROR and "no source 'nosuch'" in exc.value.message
    with pytest.raises(ClientError) as exc:
        run(client, "source", "rm", "nosuch")
    assert "xdpfw source ls" in exc.value.message
    with pytest.raises(SystemExit):
        build_parser().parse_args(["source", "rm", "Bad Name"])
    assert "not a source name" in capsys.readouterr().err
    with pytest.raises(ClientError) as exc:
        run(client, "rule", "rm")
    assert exc.value.exit_code == EXIT_USAGE
    with pytest.raises(ClientError) as exc:
        run(client, "rule", "rm", "3", "--src", "198.18.1.1")
    assert exc.value.exit_code == EXIT_USAGE
    with pytest.raises(ClientError) as exc:
        run(client, "rule", "rm", "3", "--source", "feed")
    assert exc.value.exit_code == EXIT_USAGE


def test_rule_add_source_ttl_refresh_and_rm_by_value(
    client: Client, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(client, "rule", "add", "--src", "198.18.63.1", "--ttl", "1m",
               "--source", "f2b", "--json") == 0
    first = capsys.readouterr().out
    assert '"source": "f2b"' in first
    assert run(client, "rule", "add", "--src", "198.18.63.1", "--ttl", "1h",
               "--source", "f2b") == 0
    err = capsys.readouterr().err
    assert "already exists" in err and "source f2b holds it" in err
    assert run(client, "rule", "ls", "--source", "f2b") == 0
    assert "f2b" in capsys.readouterr().out
    assert run(client, "rule", "rm", "--src", "198.18.63.1", "--source", "f2b") == 0
    assert capsys.readouterr().out.startswith("removed 1 (--src 198.18.63.1 --source f2b)")
    assert run(client, "rule", "rm", "--src", "198.18.63.1") == 1  # nothing left to remove
    assert len(api.dp.compiler) == 1  # the protected prefix only


def test_import_with_a_source_and_replace(client: Client, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "l.netset"
    f.write_text(LIST)
    # a plain import loads a list with a protected overlap (reported, not refused)
    assert run(client, "import", str(f)) == 0
    out = capsys.readouterr().out
    assert "added       3" in out and "overlaps    1" in out
    assert run(client, "import", str(f), "--source", "l1", "--replace") == 0
    assert "added 3, removed 0, unchanged 0" in capsys.readouterr().out  # new holdings
    f.write_text("198.18.61.1\n")
    assert run(client, "import", str(f), "--source", "l1", "--replace", "--json") == 0
    out = capsys.readouterr().out
    assert '"removed": 2' in out and '"unchanged": 1' in out
    from xdpfw.cli.client import ClientError

    with pytest.raises(ClientError) as exc:
        run(client, "import", str(f), "--replace")
    assert exc.value.exit_code == EXIT_USAGE and "--source" in exc.value.message


def test_source_commands_have_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from xdpfw.cli.main import main

    for argv in (["source"], ["source", "ls"], ["source", "show"], ["source", "rm"],
                 ["source", "replace"], ["source", "export"], ["rule", "rm"], ["import"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out, argv
    a = build_parser().parse_args(["source", "ls", "--api", "http://a:1"])
    assert a.api == "http://a:1"  # the connection options work on source commands too
