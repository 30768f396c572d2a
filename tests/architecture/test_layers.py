"""The package's shape: the import contract holds and would catch a layer broken, no cycles, small files, and
imports inside functions only where an optional dependency or import time needs them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "modify"
#: What a comment on an import inside a function must say (on its line or the line above its group).
REASONS = ("optional dependency", "import time")

if shutil.which("lint-imports") is None:
    pytest.skip("import-linter is not installed (pip install -e '.[dev]')", allow_module_level=True)


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run(
        ["lint-imports", "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "checkout"
    shutil.copytree(PACKAGE, copy / "modify", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_the_contract_holds() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("routing/forward.py", "import modify.generate.cache", "Layers"),
        ("routing/state.py", "from modify.api import convert", "Layers"),
        ("train/loop.py", "from modify.calibrate import planning", "independent"),
        ("passes/capture_block.py", "import modify.routing.state", "Layers"),
    ],
)
def test_the_contract_fails_on_an_upward_import(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The same contract, on a copy of the package with one import that breaks it (routing → generate first)."""
    copy = _copy(tmp_path)
    path = copy / "modify" / module
    source = path.read_text()
    head = source.index("\nimport ") if "\nimport " in source else source.index("\nfrom ")
    path.write_text(source[:head] + f"\n{line}  # noqa" + source[head:])
    result = _lint(copy)
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout.split("Broken contracts")[-1]


def test_no_import_cycles() -> None:
    """Between any two modules, package ``__init__`` files included, and imports inside functions included."""
    graph = grimp.build_graph("modify", cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert not cycles, cycles


def test_no_file_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def _imports_in_functions(path: Path) -> list[tuple[int, ast.stmt]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    found.append((sub.lineno, sub))
    return found


def _explained(lines: list[str], node: ast.stmt) -> bool:
    """A comment naming the reason on the import's own lines, or above the run of imports (and ``try:``) it is in."""
    own = " ".join(lines[node.lineno - 1 : node.end_lineno])
    if any(reason in own for reason in REASONS):
        return True
    i = node.lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if any(reason in text for reason in REASONS):
            return True
        if not (text.startswith(("import ", "from ", "try:", ")", "#")) or text.endswith(",") or text == ""):
            return False
        i -= 1
    return False


def test_imports_inside_functions_say_why() -> None:
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for lineno, node in _imports_in_functions(path):
            if not _explained(lines, node):
                unexplained.append(f"{path.relative_to(ROOT)}:{lineno}: {lines[lineno - 1].strip()}")
    assert not unexplained, "\n".join(unexplained)
