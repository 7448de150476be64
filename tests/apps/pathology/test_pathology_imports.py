"""The pathology modules import one way: no module imports another that (directly or through others)
imports it back, counting imports inside functions too (the lazy ones are where cycles hid:
pipeline.py <-> task.py, plots.py <-> wsi.py). And every module imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mambakit.apps.pathology as pkg

PACKAGE = "mambakit.apps.pathology"
ROOT = Path(pkg.__file__).parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")


def _imported_siblings(path: Path) -> set[str]:
    """Modules of this package that `path` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:                       # from .x import y / from . import x
                base = node.module
                names = [base] if base else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.startswith(PACKAGE + "."):
                names = [node.module[len(PACKAGE) + 1:]]
            elif node.level == 0 and node.module == PACKAGE:
                names = [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name[len(PACKAGE) + 1:] for a in node.names if a.name.startswith(PACKAGE + ".")]
        else:
            continue
        out.update(n.split(".")[0] for n in names if n)
    return out & set(MODULES)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    return {m: _imported_siblings(root / f"{m}.py") - {m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_parser_sees_lazy_and_absolute_imports(tmp_path):
    (tmp_path / "x.py").write_text("def f():\n    from .task import MILTask\n"
                                   "import mambakit.apps.pathology.wsi\n"
                                   "from mambakit.apps.pathology import plots\n"
                                   "from mambakit.apps.pathology.data import Bag\n")
    assert _imported_siblings(tmp_path / "x.py") == {"task", "wsi", "plots", "data"}


def test_pathology_modules_import_one_way():
    graph = import_graph()
    assert "inference" in graph["task"] and "task" in graph["pipeline"]      # the parser sees the lazy imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    assert not graph["plots"], f"plots.py only draws; it imports {graph['plots']}"


def test_pathology_imports_no_other_app():
    for m in MODULES:
        tree = ast.parse((ROOT / f"{m}.py").read_text())
        for node in ast.walk(tree):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in mods:
                if name.startswith("mambakit.apps.") and not name.startswith(PACKAGE):
                    pytest.fail(f"{m}.py imports another app: {name}")


@pytest.mark.slow      # one interpreter per module: torch is imported ~10 times
@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone_in_a_fresh_interpreter(module):
    out = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
