"""The house's rules, read off the code: imports run one way, from the top down, with no loops.

Every import counts, the ones inside functions too (hiding an import in a function does not
change the architecture). The layers, bottom to top (docs/ARCHITECTURE.md):

    ground     distillery/{runtime,rle,images,text}.py: process settings and shared formats
    teachers   node types (teachers/nodes/), graph, inputs, record loop, trace store
    students   model < data < serving < evaluation < training
    registry   MLflow: runs, plots, models, aliases, pull
    flows      Prefect flows and deployments; the Spec that composes every package's config
    top        distillery/cli.py, demo/, benchmarks/

A module may import its own layer or lower ones; the product (everything below the top) never
imports the demo; nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder at the root -> import name once installed (pyproject.toml's package-dir)
PACKAGES = {"distillery": "distillery", "teachers": "distillery.teachers", "students": "distillery.students",
            "registry": "distillery.registry", "flows": "distillery.flows", "demo": "distillery.demo",
            "benchmarks": "benchmarks"}
# module-name prefix -> rank (the longest prefix that matches decides); equal ranks may import each other
LAYERS = [
    ("distillery", 0, "ground"),
    ("distillery.teachers", 1, "teachers"),
    ("distillery.students", 2, "students"),
    ("distillery.students.model", 2.0, "students.model"),
    ("distillery.students.data", 2.1, "students.data"),
    ("distillery.students.serving", 2.2, "students.serving"),
    ("distillery.students.evaluation", 2.3, "students.evaluation"),
    ("distillery.students.training", 2.4, "students.training"),
    ("distillery.registry", 3, "registry"),
    ("distillery.flows", 4, "flows"),
    ("distillery.cli", 5, "top"),
    ("distillery.cli_train", 5, "top"),
    ("distillery.demo", 5, "top"),
    ("benchmarks", 5, "top"),
]


def modules() -> dict[str, Path]:
    """Every module of the project, by its import name."""
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def layer(module: str) -> tuple[float, str]:
    best = max((p for p in LAYERS if module == p[0] or module.startswith(p[0] + ".")), key=lambda p: len(p[0]))
    return best[1], best[2]


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the module pkg.sub when there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def loops(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_project_is_walked():
    g = graph()
    assert {"distillery.cli", "distillery.flows.spec", "distillery.teachers.graph", "distillery.rle",
            "distillery.students.model.student", "benchmarks.breakdown"} <= set(g)
    assert "distillery.teachers.graph" in g["distillery.flows.spec"]
    edges = sum(len(v) for v in g.values())
    print(f"{len(g)} modules, {edges} imports between them")


def test_no_import_loops():
    assert loops(graph()) == []


def test_imports_run_down_the_layers():
    wrong = []
    for module, deps in graph().items():
        rank, name = layer(module)
        for dep in deps:
            dep_rank, dep_name = layer(dep)
            if dep_rank > rank:
                wrong.append(f"{module} ({name}) imports {dep} ({dep_name})")
    assert wrong == []


def test_the_product_never_imports_the_demo_and_nothing_imports_the_cli():
    wrong = []
    for module, deps in graph().items():
        for dep in deps:
            if dep == "distillery.cli" or (dep.startswith("distillery.demo") and layer(module)[1] != "top"):
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_the_checker_sees_loops_and_upward_imports():
    """The rules above would fail on a loop and on an upward import (so a pass means something)."""
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("distillery.students.serving.onnx") == (2.2, "students.serving")
    assert layer("distillery.rle") == (0, "ground")
    assert layer("distillery.cli")[0] > layer("distillery.flows.distill")[0] > layer("distillery.registry.pull")[0]
