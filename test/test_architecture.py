"""Dependency arrows: commands -> eval/train/ros -> data -> core -> nets, and no import cycles.

Every ``import`` statement counts, lazy ones inside functions included (a lazy import still ties
the modules together). The graph is read with :mod:`ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "osop_ros"

# layer of each sub-package; a module may import only from its own layer's package or lower layers
# (data = BOP I/O, meshes and scene synthesis, which evaluation and training both read)
LAYER = {"nets": 0, "core": 1, "data": 2, "eval": 3, "train": 3, "ros": 3, "commands": 4}
TOP_LEVEL = 4  # osop_ros/cli.py, osop_ros/demo.py


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the osop_ros modules it imports (module-level and lazy)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("osop_ros") and t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in LAYER:  # a sub-package's __init__
        return parts[1], LAYER[parts[1]]
    if len(parts) < 3:  # osop_ros, osop_ros.cli, osop_ros.demo
        return parts[-1], TOP_LEVEL
    return parts[1], LAYER[parts[1]]


def test_layers_point_one_way() -> None:
    bad = []
    for mod, deps in import_graph().items():
        pkg, lvl = _layer(mod)
        for d in deps:
            dpkg, dlvl = _layer(d)
            if d == "osop_ros":
                continue
            if dlvl > lvl or (dlvl == lvl and dpkg != pkg and lvl < TOP_LEVEL):
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports against the arrows:\n" + "\n".join(sorted(bad))


def test_nets_import_nothing_from_core() -> None:
    g = import_graph()
    assert not [(m, d) for m, ds in g.items() if m.startswith("osop_ros.nets") for d in ds if ".nets" not in d]


def test_no_import_cycles() -> None:
    g = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if d == "osop_ros":
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_oracles_live_with_eval() -> None:
    assert not (PKG / "core" / "oracle.py").exists()
    src = "\n".join(p.read_text() for p in (PKG / "core").glob("*.py"))
    assert "Oracle" not in src.replace("oracles", "")
