"""The layering of portllm_cli, locked: imports only point down the arrows, and no module cycle exists.

    cli -> demo -> core (core/*, resolve.py, hub.py) -> spec -> patch -> io -> errors, portllm_cli

A module may import its own layer and any layer below it; nothing imports cli. Every import
counts, wherever it is written: at the top, inside a function (the lazy imports that keep
`--help` fast), under TYPE_CHECKING. The README's "How the code is laid out" says the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "portllm_cli"

# top to bottom; a module belongs to the first layer one of whose prefixes names it or a parent package
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("portllm_cli.cli", "portllm_cli.__main__")),
    ("demo", ("portllm_cli.demo",)),
    ("core", ("portllm_cli.core", "portllm_cli.resolve", "portllm_cli.hub")),
    ("spec", ("portllm_cli.spec",)),
    ("patch", ("portllm_cli.patch",)),
    ("io", ("portllm_cli.io",)),
    ("base", ("portllm_cli.errors",)),
]
ROOT = "portllm_cli"  # the package itself (__version__): importable from every layer


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _layer(module: str) -> int | None:
    if module == ROOT:
        return len(LAYERS)
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _imports(module: str, path: Path) -> set[str]:
    """portllm_cli modules ``module`` imports anywhere in its source (a name imported from a package
    counts as its submodule when one exists)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..io import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # portllm_cli.core.port.merge_weight -> portllm_cli.core.port
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] == ROOT and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_place_in_the_picture():
    lost = [m for m in MODULES if _layer(m) is None]
    assert not lost, f"place these modules in a layer (tests/test_layering.py LAYERS and the README): {lost}"


def test_imports_point_down_the_arrows():
    wrong = []
    for module, deps in GRAPH.items():
        here = _layer(module)
        for dep in sorted(deps):
            there = _layer(dep)
            if here is not None and there is not None and there < here:
                wrong.append(f"{module} ({LAYERS[here][0]}) imports {dep} ({LAYERS[there][0]})")
    assert not wrong, "imports against the arrows cli -> demo -> core -> spec -> patch -> io -> errors:\n" + "\n".join(wrong)


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import: any component of two or more modules
    (or a module importing itself) is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
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
            if len(comp) > 1 or v in GRAPH.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles among portllm_cli modules: {cycles}"


@pytest.mark.parametrize("source, bad", [
    ("from portllm_cli.cli.app import app\n", "portllm_cli.cli.app"),  # nothing imports cli
    ("def f():\n    from portllm_cli.core import port\n", "portllm_cli.core.port"),  # lazy imports count
    ("from ..core.evaluate import evaluate\n", "portllm_cli.core.evaluate"),  # so do relative ones
])
def test_the_check_sees_imports_anywhere(tmp_path, source, bad):
    """The checker itself: an io module importing upwards, in each spelling, is caught."""
    fake = tmp_path / "portllm_cli" / "io" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    deps = _imports("portllm_cli.io.fake", fake)
    assert bad in deps and _layer(bad) < _layer("portllm_cli.io.fake")
