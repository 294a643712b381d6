"""docs/architecture.md stays true: every path it names exists, every module is on the map."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
ROOMS = ("xdpfw", "api", "bpf", "tests", "bench", "deploy", "docs", "scripts")
PATH = re.compile(r"`((?:{})/[\w./-]*)`".format("|".join(ROOMS)))


def _named() -> set[str]:
    return set(PATH.findall(DOC.read_text()))


def test_every_path_it_names_exists() -> None:
    missing = sorted(p for p in _named() if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_module_is_on_the_map() -> None:
    named = {p.rstrip("/") for p in _named()}
    modules = sorted(
        str(f.relative_to(ROOT))
        for top in ("xdpfw", "api")
        for f in (ROOT / top).rglob("*.py")
        if f.name != "__init__.py" and "__pycache__" not in f.parts
    )
    unnamed = [m for m in modules if m not in named]
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"


def test_every_package_is_a_room() -> None:
    named = {p.rstrip("/") for p in _named()}
    packages = sorted(
        str(d.relative_to(ROOT))
        for top in ("xdpfw", "api")
        for d in [ROOT / top, *(ROOT / top).rglob("*")]
        if d.is_dir() and (d / "__init__.py").exists() and "__pycache__" not in d.parts
    )
    # a package is on the map when the folder or one of its modules is named
    unnamed = [
        p for p in packages if p not in named and not any(n.startswith(p + "/") for n in named)
    ]
    assert not unnamed, f"packages missing from docs/architecture.md: {unnamed}"


def test_the_readme_points_here() -> None:
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
