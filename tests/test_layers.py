"""The one-way house of DESIGN.md, checked on the source: every import statement in mambakit/ (at module level
or inside a function, relative ones resolved) points down `kernels <- core <- {engine, data, zoo} <- apps <-
cli`, no app imports another app, and the modules of one app import each other without circles."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mambakit"

# Layer of each top-level part of the package; the package itself and mambakit.runtime are the bottom.
LAYERS = {"mambakit": 0, "runtime": 0, "kernels": 1, "core": 2, "engine": 3, "data": 3, "zoo": 3, "apps": 4,
          "cli": 5, "__main__": 5}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; `from X import name` counts as X.name when
    X.name is a module of the package (`from mambakit import apps`), else as X."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else target))
    return [(line, name) for line, name in dict.fromkeys(found) if name == "mambakit" or name.startswith("mambakit.")]


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mambakit"


def _app_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "apps" else None


def _violation(importer: str, imported: str) -> str | None:
    if imported == "mambakit" and importer != "mambakit":
        return None   # the package itself (__version__) is the bottom layer
    mine, theirs = LAYERS[_part(importer)], LAYERS[_part(imported)]
    if theirs > mine:
        return f"layer {_part(importer)} ({mine}) imports layer {_part(imported)} ({theirs})"
    if mine == LAYERS["apps"] and theirs == mine:
        app, other = _app_of(importer), _app_of(imported)
        if app is None and other is not None:
            return "app discovery imports an app's module (apps come in through entry points)"
        if app is not None and other != app:
            return "an app imports another app" if other else "an app imports the app discovery"
    return None


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_checker_sees_what_it_must():
    """The rules on made-up edges, so the real check below cannot pass by seeing nothing."""
    assert _violation("mambakit.core.mamba", "mambakit.engine.trainer")
    assert _violation("mambakit.data.registry", "mambakit.apps")
    assert _violation("mambakit.zoo.registry", "mambakit.apps.vision.app")
    assert _violation("mambakit.kernels.cpu_scan", "mambakit.core.scan")
    assert _violation("mambakit.apps.vision.task", "mambakit.apps.timeseries.data")
    assert _violation("mambakit.apps.vision.task", "mambakit.apps")
    assert _violation("mambakit.engine.app", "mambakit.cli")
    assert _violation("mambakit.runtime", "mambakit.kernels")
    for ok in [("mambakit.core.mamba", "mambakit.kernels.reference"), ("mambakit.zoo.pretrained", "mambakit.data"),
               ("mambakit.engine.trainer", "mambakit.zoo"), ("mambakit.apps.vision.task", "mambakit.apps.vision.data"),
               ("mambakit.apps", "mambakit.engine.app"), ("mambakit.cli", "mambakit.apps"),
               ("mambakit.kernels.cpu_scan", "mambakit.runtime"), ("mambakit.engine.app", "mambakit")]:
        assert _violation(*ok) is None, ok
    # Relative imports resolve against the file's package.
    names = [name for _, name in _imports(PACKAGE / "apps" / "timeseries" / "app.py")]
    assert "mambakit.apps.timeseries.config" in names and "mambakit.engine.app" in names
    names = [name for _, name in _imports(PACKAGE / "cli.py")]
    assert "mambakit.apps" in names and "mambakit.runtime" in names


def _wrong_edges() -> list[tuple[str, str, str]]:
    wrong = []
    for path in _sources():
        importer = _module_name(path)
        for line, imported in _imports(path):
            why = _violation(importer, imported)
            if why:
                wrong.append((importer, imported, f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} -> "
                                                  f"{imported}: {why}"))
    return wrong


def test_imports_point_down_the_layers():
    sources = _sources()
    assert len(sources) > 50 and {_part(_module_name(p)) for p in sources} >= set(LAYERS) - {"mambakit"}
    wrong = [text for _, _, text in _wrong_edges()]
    assert not wrong, "imports against kernels <- core <- {engine, data, zoo} <- apps <- cli:\n" + "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in list(edges):
        if node not in index:
            visit(node)
    return groups


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _app_edges(app: str) -> dict[str, set[str]]:
    prefix = f"mambakit.apps.{app}"
    edges = {}
    for path in sorted((PACKAGE / "apps" / app).rglob("*.py")):
        importer = _module_name(path)
        # An import of the app's package (its __init__) is not an edge between two of its modules.
        edges[importer] = {name for _, name in _imports(path)
                           if name.startswith(prefix + ".") and name != importer}
    return edges


APPS = sorted(p.name for p in (PACKAGE / "apps").iterdir() if (p / "__init__.py").is_file())


@pytest.mark.parametrize("app", APPS)
def test_no_import_circles_inside_an_app(app):
    circles = _cycles(_app_edges(app))
    assert not circles, f"modules of {app} that import each other in a circle: {circles}"
