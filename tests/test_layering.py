"""The package's import graph, read with `ast` (module-level and function-level imports alike): no
cycles, and the library packages keep the layering of docs/architecture.md."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edgeslim": "edgeslim", "edgeslim.core": "edgeslim/core", "edgeslim.compress": "compress",
            "edgeslim.export": "export", "edgeslim.runtime": "runtime", "edgeslim.profiles": "profiles"}  # pyproject's package-dir
LIBRARIES = ("edgeslim.compress", "edgeslim.export", "edgeslim.runtime")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for file in sorted((ROOT / folder).glob("*.py")):
            out[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return out


def imported(name: str, file: Path, known: set[str]) -> dict[str, int]:
    """{edgeslim module: first line} of every import anywhere in `file` (inside functions too)."""
    found: dict[str, int] = {}
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module` too
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    mods = modules()
    return {name: imported(name, file, set(mods)) for name, file in mods.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan 1972), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from p.b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\n")
    known = {"p", "p.a", "p.b"}
    assert imported("p.a", pkg / "a.py", known) == {"p.b": 2}
    assert imported("p.b", pkg / "b.py", known) == {"p": 1, "p.a": 1}  # the package runs too
    assert cycles({"p.a": {"p.b": 2}, "p.b": {"p.a": 1}, "p": {}}) == [["p.a", "p.b"]]


def test_the_graph_covers_the_whole_package():
    edges = graph()
    assert {"edgeslim.sources", "edgeslim.artifact", "edgeslim.compress.base", "edgeslim.runtime.session"} <= set(edges)
    assert "edgeslim.artifact" in edges["edgeslim.sources"]  # a sanity check that edges are read


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    detail = [" ; ".join(f"{a} -> {b} (line {edges[a][b]})" for a in c for b in edges[a] if b in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


@pytest.mark.parametrize("package, forbidden", [
    ("edgeslim.compress", ("edgeslim.export", "edgeslim.runtime")),
    ("edgeslim.runtime", ("edgeslim.compress", "edgeslim.export")),
])
def test_library_layering(package, forbidden):
    bad = [f"{a} -> {b} (line {line})" for a, out in graph().items() if a.startswith(package + ".") or a == package
           for b, line in out.items() if b.startswith(forbidden)]
    assert not bad, f"{package} must import neither of {forbidden}: " + "; ".join(bad)


def outside(edges: dict[str, dict[str, int]], package: str, allowed: tuple[str, ...]) -> list[str]:
    """Each import from a module of `package` that lands outside `package` and `allowed`."""
    def inside(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)
    return [f"{a} -> {b} (line {line})" for a, out in edges.items() if inside(a, (package,))
            for b, line in out.items() if not inside(b, (package, *allowed))]


def test_core_imports_nothing_outside_itself():
    bad = outside(graph(), "edgeslim.core", ())
    assert not bad, "edgeslim.core must import only itself: " + "; ".join(bad)


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_import_core_and_not_the_application(package):
    bad = outside(graph(), package, ("edgeslim.core", *LIBRARIES))
    assert not bad, f"{package} may import edgeslim.core and the library packages, not the application: " + "; ".join(bad)


def test_the_rule_fails_on_leaves_kept_in_the_hub():
    """The layout before edgeslim/core/: compress imported the leaves from the application's folder."""
    old = {"edgeslim.compress.svd": {"edgeslim.errors": 3}, "edgeslim.errors": {}, "edgeslim.core.specs": {"edgeslim.cli": 9}}
    assert outside(old, "edgeslim.compress", ("edgeslim.core", *LIBRARIES)) == ["edgeslim.compress.svd -> edgeslim.errors (line 3)"]
    assert outside(old, "edgeslim.core", ()) == ["edgeslim.core.specs -> edgeslim.cli (line 9)"]
