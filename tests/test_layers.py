"""The package's import structure: layers in one direction, no cycles, no private names
across modules. Every import of ``rt_lib`` counts, at module level or inside a function.

The layer order is ``rt_lib.LAYERS`` (documented in ``rt_lib/__init__.py``): a top-level
package or leaf module may import only from itself and from the ones before it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import rt_lib

PKG = Path(rt_lib.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path):
    """(target module, imported name or None, line) for every rt_lib import in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "rt_lib" or alias.name.startswith("rt_lib."):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module != "rt_lib" and not module.startswith("rt_lib."):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in MODULES:
                    yield sub, None, node.lineno
                else:
                    yield module, alias.name, node.lineno


IMPORTS = {name: list(_imports(name, path)) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    """The top-level entry a module belongs to (``rt_lib`` for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rt_lib"


def _rank(unit: str) -> int:
    if unit == "rt_lib":  # the package root: imports nothing, holds __version__ and the lazy API
        return -1
    if unit == "__main__":
        return len(rt_lib.LAYERS)
    return rt_lib.LAYERS.index(unit)


def _graph(key=lambda m: m):
    edges = defaultdict(set)
    for name, imports in IMPORTS.items():
        for target, _, _ in imports:
            if target in MODULES and key(target) != key(name):
                edges[key(name)].add(key(target))
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_every_top_level_entry_has_a_layer():
    entries = {p.stem for p in PKG.iterdir() if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    entries -= {"__init__", "__main__"}
    assert entries == set(rt_lib.LAYERS), "rt_lib.LAYERS must list every top-level package and module"
    assert len(rt_lib.LAYERS) <= 12


def test_every_package_says_its_job():
    for name, path in MODULES.items():
        if path.name == "__init__.py" or name.count(".") == 1:
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{name} has no docstring"


def test_no_import_against_the_layer_order():
    bad = [f"{name}:{line} imports {target} ({_unit(target)} is above {_unit(name)})"
           for name, imports in IMPORTS.items() for target, _, line in imports
           if _rank(_unit(target)) > _rank(_unit(name))]
    assert not bad, "\n".join(bad)


def test_the_root_imports_nothing():
    assert not IMPORTS["rt_lib"]


def test_no_cycle_between_modules():
    assert not _cycles(_graph())


def test_no_cycle_between_packages():
    assert not _cycles(_graph(_unit))


def test_no_private_name_imported_across_modules():
    bad = [f"{name}:{line} imports {target}.{imported}"
           for name, imports in IMPORTS.items() for target, imported, line in imports
           if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    assert not bad, "\n".join(bad)


def test_imports_resolve_to_modules():
    missing = sorted({target for imports in IMPORTS.values() for target, _, _ in imports if target not in MODULES})
    assert not missing
