"""Import layering, read from the source with `ast` (pure: nothing is imported or run).

- xdpfw never imports `api`, except `xdpfw/cli/serve.py`, inside `cmd_serve` (the function
  that starts the server), so the CLI's client commands and the library load without it.
- The CLI package never imports bcc (the kernel door is xdpfw/kernel/loader.py).
- bcc and pyroute2 are each imported by one door module (xdpfw/kernel/loader.py, netlink.py),
  in xdpfw, api and bench alike (bench prototypes compile through `loader.load_source`).
- xdpfw's modules have no import cycle (module-level imports; `if TYPE_CHECKING:` excluded).

Every import counts for the first two rules, function-level ones included.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xdpfw"

# (module, function) pairs allowed to import `api`: the one place that starts the server.
API_ALLOWED = {("xdpfw.cli.serve", "cmd_serve")}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (a submodule when `from pkg import submodule`)
    line: int
    function: str | None  # innermost enclosing function, None at module or class level
    type_only: bool  # under `if TYPE_CHECKING:`

    @property
    def at_import_time(self) -> bool:
        return self.function is None and not self.type_only

    def __str__(self) -> str:
        where = f" in {self.function}()" if self.function else ""
        return f"{self.module}:{self.line}{where} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.functions: list[str] = []
        self.type_only = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        fn = self.functions[-1] if self.functions else None
        self.found.append(Import(self.module, target, node.lineno, fn, self.type_only > 0))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_only += 1
            for child in node.body:
                self.visit(child)
            self.type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if _is_module(sub) else base, node)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    c = _Collector(module, is_package)
    c.visit(ast.parse(source))
    return c.found


def all_imports(package: Path = PACKAGE) -> list[Import]:
    out: list[Import] = []
    for path in sorted(package.rglob("*.py")):
        out += imports_of(path.read_text(), module_name(path), path.name == "__init__.py")
    return out


def _under(target: str, top: str) -> bool:
    return target == top or target.startswith(top + ".")


def api_offenders(found: list[Import]) -> list[str]:
    return [
        str(i) for i in found
        if _under(i.target, "api") and (i.module, i.function) not in API_ALLOWED
    ]


def cycles(found: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for i in found:
        graph.setdefault(i.module, set())
        if i.at_import_time and _under(i.target, "xdpfw") and i.target != i.module:
            graph[i.module].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# --- the rules -------------------------------------------------------------------------------


def test_xdpfw_imports_api_only_where_serve_starts_the_server() -> None:
    found = all_imports()
    assert api_offenders(found) == []
    # ... and the allowed place does exist (a rename must move API_ALLOWED with it).
    assert any(_under(i.target, "api") and i.module == "xdpfw.cli.serve" for i in found)


def test_cli_never_imports_bcc() -> None:
    offenders = [
        str(i) for i in all_imports()
        if _under(i.module, "xdpfw.cli") and _under(i.target, "bcc")
    ]
    assert offenders == []


# The narrow doors to the kernel (docs in /work/shared/STYLE.md): one module per library.
DOORS = {"bcc": "xdpfw.kernel.loader", "pyroute2": "xdpfw.kernel.netlink"}


@pytest.mark.parametrize("library", sorted(DOORS))
def test_one_door_per_kernel_library(library: str) -> None:
    found = all_imports() + all_imports(ROOT / "api") + all_imports(ROOT / "bench")
    users = {i.module for i in found if _under(i.target, library)}
    assert users == {DOORS[library]}


def test_no_import_cycles() -> None:
    assert cycles(all_imports()) == []


# --- the checker itself ----------------------------------------------------------------------


def test_checker_sees_function_level_and_relative_imports() -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from api.models import RuleOut\n"
        "def f():\n"
        "    import api.server\n"
        "def cmd_serve():\n"
        "    from api.settings import get_settings\n"
        "from . import humanize\n"
    )
    found = imports_of(src, "xdpfw.cli.serve")
    assert [str(i) for i in found if _under(i.target, "api")] == [
        "xdpfw.cli.serve:3 imports api.models",
        "xdpfw.cli.serve:5 in f() imports api.server",
        "xdpfw.cli.serve:7 in cmd_serve() imports api.settings",
    ]
    assert api_offenders(found) == [
        "xdpfw.cli.serve:3 imports api.models",
        "xdpfw.cli.serve:5 in f() imports api.server",
    ]
    assert found[-1].target == "xdpfw.cli.humanize" and found[-1].at_import_time
    assert found[1].type_only and not found[1].at_import_time


def test_checker_sees_a_cycle() -> None:
    found = [
        *imports_of("import xdpfw.b\n", "xdpfw.a"),
        *imports_of("import xdpfw.c\n", "xdpfw.b"),
        *imports_of("def f():\n    import xdpfw.a\n", "xdpfw.c"),  # lazy: no cycle
    ]
    assert cycles(found) == []
    found += imports_of("from xdpfw.a import thing\n", "xdpfw.c")
    assert cycles(found) == [["xdpfw.a", "xdpfw.b", "xdpfw.c"]]
