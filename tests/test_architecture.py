"""The layering docs/architecture.md draws, checked on the source: who may import whom, and no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llmbench", "harness", "backends", "own_engine")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (function-level imports count too)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for mod, path in files.items():
        # `from a.b import c` names module a.b.c when that exists, else the module a.b.
        edges[mod] = {n for n in imports(path) if n in files and n != mod}
    return edges


def test_no_module_imports_in_a_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"modules importing each other: {cycles}"


def test_layers():
    problems = []
    for mod, targets in graph().items():
        for t in targets:
            if mod.startswith("llmbench") and not t.startswith("llmbench"):
                problems.append(f"{mod} -> {t}: llmbench holds the neutral helpers and imports nothing of the others")
            if mod.startswith("own_engine") and not t.startswith(("own_engine", "llmbench")):
                problems.append(f"{mod} -> {t}: own_engine is a library that imports neither harness nor backends")
            if mod.startswith("harness.core") and not (t.startswith(("harness.core", "llmbench")) or t == "harness"):
                problems.append(f"{mod} -> {t}: the core imports nothing above it")
            if mod.startswith("backends") and t.startswith("harness") and not t.startswith("harness.core") \
                    and t != "harness":
                problems.append(f"{mod} -> {t}: backends import only harness.core of the harness")
    assert not problems, "\n".join(problems)


def test_no_two_classes_share_a_name():
    """One name, one class across the packages (private ones too): a reader, a grep or a traceback names one thing."""
    where: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ClassDef):
                    where.setdefault(node.name, []).append(f"{p.relative_to(ROOT)}:{node.lineno}")
    shared = {name: places for name, places in where.items() if len(places) > 1}
    assert not shared, f"classes sharing a name: {shared}"


def test_no_sys_path_edits_or_pythonpath_injection():
    offenders = []
    for pkg in (*PACKAGES, "tests", "benchmarks"):
        for p in (ROOT / pkg).rglob("*.py"):
            text = p.read_text()
            if p.name != "test_architecture.py" and ("sys.path.insert" in text or "PYTHONPATH=" in text):
                offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, f"sys.path edits or PYTHONPATH injection in: {offenders}"
