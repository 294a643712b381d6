"""`xdpfw completion bash|zsh` and `xdpfw man`: generated from the parser, run in real bash,
and docs/xdpfw.8 kept current."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xdpfw.cli.completion import bash_script, commands, man_page
from xdpfw.cli.parser import build_parser, package_version

pytestmark = pytest.mark.pure

REPO = Path(__file__).resolve().parent.parent
XDPFW = str(Path(sys.executable).with_name("xdpfw"))
BASH = shutil.which("bash")


def _complete(script: Path, line: str) -> list[str]:
    """What bash offers for `line` (the cursor at its end), through the registered function."""
    words = line.split(" ")
    program = f"""
source {script}
spec=$(complete -p xdpfw) || exit 9
func=${{spec#*-F }}; func=${{func%% *}}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
"$func" xdpfw "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    proc = subprocess.run([str(BASH), "--norc", "-c", program], capture_output=True, text=True,
                          timeout=20, cwd=script.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_bash_completion_in_real_bash(tmp_path: Path) -> None:
    out = subprocess.run([XDPFW, "completion", "bash"], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    assert out == bash_script(build_parser())
    script = tmp_path / "xdpfw.bash"
    script.write_text(out)
    (tmp_path / "list.txt").write_text("198.18.0.1\n")
    spec = subprocess.run([str(BASH), "--norc", "-c", f"source {script}; complete -p xdpfw"],
                          capture_output=True, text=True, timeout=20)  # fmt: skip
    assert spec.stdout.strip() == "complete -F _xdpfw xdpfw"
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert _complete(script, "xdpfw ") == list(commands)  # every command, in the parser's order
    assert {"serve", "rule", "import", "completion", "man"} <= set(commands)
    assert _complete(script, "xdpfw ru") == ["rule"]
    assert _complete(script, "xdpfw rule ") == ["add", "rm", "ls", "show"]
    assert set(_complete(script, "xdpfw rule add --")) >= {"--src", "--dst", "--ttl", "--api"}
    assert _complete(script, "xdpfw rule add --proto ") == ["tcp", "udp", "icmp", "icmpv6"]
    assert _complete(script, "xdpfw rule add --proto u") == ["udp"]
    # an option's value is skipped when finding the command path
    assert _complete(script, "xdpfw --api http://h:1 rule ") == ["add", "rm", "ls", "show"]
    assert _complete(script, "xdpfw serve --xdp-mode n") == ["native"]
    assert _complete(script, "xdpfw serve --config li") == ["list.txt"]  # a file
    assert _complete(script, "xdpfw import li") == ["list.txt"]
    assert _complete(script, "xdpfw completion ") == ["bash", "zsh"]  # a positional's choices


def test_every_command_and_option_is_completed() -> None:
    script = bash_script(build_parser())
    for cmd in commands(build_parser()):
        for opt in cmd.options:
            assert opt in script, (cmd.path, opt)
        for name in cmd.subcommands:
            assert name in script


ZSH = shutil.which("zsh")


def test_zsh_script_uses_bashcompinit(tmp_path: Path) -> None:
    out = subprocess.run([XDPFW, "completion", "zsh"], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    assert out.startswith("#compdef xdpfw\n") and "bashcompinit" in out
    assert bash_script(build_parser()) in out
    if ZSH is None:
        pytest.skip("zsh is not installed")
    script = tmp_path / "_xdpfw"
    script.write_text(out)

    def offered(*words: str) -> list[str]:
        # COMP_WORDS/COMP_CWORD as bashcompinit sets them (0-based, under ksharrays).
        program = (
            f"autoload -U compinit && compinit -u -D; source {script}; "
            f"print -r -- $_comps[xdpfw]; setopt ksharrays; "
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
            '_xdpfw; print -l -- "${COMPREPLY[@]}"'
        )
        proc = subprocess.run([str(ZSH), "-f", "-c", program], capture_output=True, text=True,
                              timeout=20, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "_bash_complete -F _xdpfw"  # registered with zsh's completion
        return [w for w in lines[1:] if w]

    assert offered("xdpfw", "rule", "") == ["add", "rm", "ls", "show"]
    # zsh itself narrows the list to the typed prefix (compadd); the values are the choices
    assert offered("xdpfw", "rule", "add", "--proto", "") == ["tcp", "udp", "icmp", "icmpv6"]
    assert offered("xdpfw", "--api", "unix:/x", "rule", "") == ["add", "rm", "ls", "show"]


def test_man_page_is_current_and_renders() -> None:
    page = man_page(build_parser(), package_version())
    shipped = (REPO / "docs" / "xdpfw.8").read_text()
    assert shipped == page, "docs/xdpfw.8 is stale: run `xdpfw man > docs/xdpfw.8`"
    for cmd in commands(build_parser())[1:]:
        assert f".SS xdpfw {cmd.path}" in page, cmd.path
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    proc = subprocess.run([groff, "-man", "-ww", "-Tutf8", "docs/xdpfw.8"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    text = proc.stdout
    assert "xdpfw rule add" in text and "--max-rules" in text.replace("\u2010", "-")
