"""The package's import structure: no module imports another in a circle (imports inside functions count), and no
module imports another module's underscore name. Read from the source with ``ast``, so it also sees imports that
only run when a function is called."""

from __future__ import annotations

import ast
from pathlib import Path

import graftune

SRC = Path(graftune.__file__).resolve().parent.parent
PACKAGE = "graftune"


def _modules() -> dict[str, Path]:
    mods = {}
    for file in (SRC / PACKAGE).rglob("*.py"):
        name = ".".join(file.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = file
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in (``graftune.run.log.RunLog`` -> ``graftune.run.log``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports anywhere in its file; and every cross-module private import."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for module, file in mods.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
                owner = _resolve(base, mods)
                private += [f"{module} imports {owner}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") and not alias.name.startswith("__") and owner
                            and owner != module]
            else:
                continue
            for target in targets:
                found = _resolve(target, mods)
                if found and found != module:
                    edges[module].add(found)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root, targets in edges.items():
        if root in index:
            continue
        work = [(root, iter(sorted(targets)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_another_in_a_circle():
    mods = _modules()
    assert len(mods) > 50  # the whole package was read
    edges, _ = _imports(mods)
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_name():
    _, private = _imports(_modules())
    assert private == []


def test_the_checker_sees_cycles_and_private_imports(tmp_path):
    # the checks above could pass by seeing nothing: on a made-up package they must find both faults
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg import a\n\nfrom pkg.c import _hidden\n")
    (pkg / "c.py").write_text("_hidden = 1\n")
    mods = {".".join(f.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): f
            for f in pkg.rglob("*.py")}
    edges, private = _imports(mods)
    assert _cycles(edges) == [["pkg.a", "pkg.b"]]
    assert private == ["pkg.b imports pkg.c._hidden"]


#: ARCHITECTURE.md's layers, top (imports anything below) to bottom; a module's layer is its first name under
#: graftune (``graftune.run.log`` -> ``run``). config sits above what it validates (methods, precision, tasks).
LAYERS = {"cli": 10, "__main__": 10, "serve": 9, "registry": 9, "runs": 8, "evaluate": 8, "onnx_export": 8,
          "demo": 8, "strategies": 7, "recipes": 6, "run": 5, "config": 4.5, "speed": 4, "io": 3, "core": 2,
          "methods": 2, "tasks": 1, "zoo": 1, "nets": 1, "data": 0, "errors": -1}
#: the upward imports that exist, each for a reason (a new one fails the test below until it is justified here)
UPWARD = {
    ("graftune.strategies.compare", "graftune.evaluate"),  # compare scores saved runs as `graftune eval` does
    ("graftune.strategies.robustness", "graftune.evaluate"),  # robustness reads --data as eval does
    ("graftune.zoo", "graftune.core.targets"),  # the model family of a loaded base
}


def test_imports_run_down_the_layers():
    """Every import (inside functions too) points down ARCHITECTURE.md's layers, or is one of the few known
    upward ones; a module outside the table fails too, so that it gets a layer."""
    mods = _modules()
    edges, _ = _imports(mods)
    unplaced = sorted({m.split(".")[1] for m in mods if "." in m} - set(LAYERS))
    assert not unplaced, f"modules without a layer: {unplaced}; add them to LAYERS"
    upward = sorted((a, b) for a, targets in edges.items() for b in targets
                    if "." in a and "." in b and LAYERS[b.split(".")[1]] > LAYERS[a.split(".")[1]])
    assert set(upward) <= UPWARD, f"imports up the layers: {sorted(set(upward) - UPWARD)}"
