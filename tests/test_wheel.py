"""The wheel: built from this tree, installed in a fresh venv, run from outside the repo.

`xdpfw serve` compiles bpf/xdp_filter.c at start, so the wheel must carry the C program
(setup.py maps bpf/ to the package data xdpfw/_bpf) and xdpfw.abi must find it there, not
next to a checkout that an installed copy does not have.

Offline and honest about it: the wheel is built with `--no-build-isolation` (the project
venv's setuptools) and installed with `--no-deps --no-index`. Its dependencies (fastapi,
pyroute2, ...) cannot be downloaded here, so a .pth file in the fresh venv puts the project
venv's site-packages on its path (after the fresh venv's own, before the system's). That
directory holds the editable install's finder too, but as a plain path entry its .pth files
are not run, so `import xdpfw` can only find the installed wheel; the test checks that it
does. What is proven is what the wheel brings (package, C program, entry point, version),
not that pip can resolve the dependencies from an index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
# What a source distribution of the project holds: enough to build the wheel.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "xdpfw", "api", "bpf")

CHECK = """
import sys
from pathlib import Path
import xdpfw
from xdpfw import abi
prefix = Path(sys.prefix).resolve()
assert Path(xdpfw.__file__).resolve().is_relative_to(prefix), xdpfw.__file__
assert abi.BPF_DIR.resolve().is_relative_to(prefix), abi.BPF_DIR
assert abi.PROGRAM.is_file() and abi.HEADER.is_file()
print(abi.PROGRAM)
print(abi.HEADER)
print(xdpfw.__version__)
"""


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_wheel_ships_the_program_and_runs_outside_the_repo(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}

    # Build from a copy, so the tree gets no build/ or egg-info and parallel runs don't meet.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], tmp_path, env)
    (wheel,) = dist.glob("xdpfw-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
         tmp_path, env)
    py = venv / "bin" / "python"
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], tmp_path, env)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp_path, env).strip())
    (site / "xdpfw-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    program, header, version = _run([py, "-c", CHECK], tmp_path, env).split()
    assert Path(program).read_bytes() == (REPO / "bpf" / "xdp_filter.c").read_bytes()
    assert Path(header).read_bytes() == (REPO / "bpf" / "xdpfw_abi.h").read_bytes()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version == project["version"]

    out = _run([venv / "bin" / "xdpfw", "--help"], tmp_path, env)
    assert "serve" in out
