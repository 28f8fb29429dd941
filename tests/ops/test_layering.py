"""The layers hold: imports go down only (flows -> tasks stages -> the core), the core (``runtime``,
``store``, ``config``) imports no stage package, and no module imports itself through others. Every
import counts, those inside functions too: a lazy import still ties the two modules together."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"flows": "refinery.flows", "tasks": "refinery.tasks"}
CORE = ("refinery.tasks.runtime", "refinery.tasks.store", "refinery.tasks.config")
ENGINE = "refinery.tasks.engine"
# what the engine may build on besides itself: the shared training helpers below every trainer
ENGINE_BASE = ("refinery.tasks.config", "refinery.tasks.train.config", "refinery.tasks.train.common",
               "refinery.tasks.train.checkpoint", "refinery.tasks.train.metrics", "refinery.tasks.train.fsdp",
               "refinery.tasks.train.distributed",
               "refinery.tasks.extras")   # the optional-dependency guard: imports nothing of refinery


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (``refinery.tasks.ingest`` is its __init__)."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imported(node: ast.AST, here: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:   # relative: from the module's package, up level-1 more
            pkg = here.split(".") if is_package else here.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        return [f"{base}.{a.name}" for a in node.names] + [base]
    return []


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a import b``: the module ``a.b`` when it
    is one, else ``a``)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = _imported(node, name, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom) and names:
                subs = [n for n in names[:-1] if n in files]
                deps.update(subs or [names[-1]])
            else:
                deps.update(names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_tasks_never_import_flows():
    bad = sorted(f"{m} -> {d}" for m, deps in import_graph().items() if m.startswith("refinery.tasks")
                 for d in deps if d.startswith("refinery.flows"))
    assert not bad, bad


def test_the_core_imports_no_stage_package():
    stage_packages = {m for m, p in module_files().items() if p.name == "__init__.py" and m.count(".") == 2
                      and m.startswith("refinery.tasks.")}
    bad = sorted(f"{m} -> {d}" for m, deps in import_graph().items() if m in CORE for d in deps
                 if any(d == p or d.startswith(p + ".") for p in stage_packages))
    assert not bad, bad


def test_the_engine_imports_no_trainer():
    """The training engine sits below every trainer: it imports itself and the shared helpers only."""
    graph = import_graph()
    assert any(m.startswith(ENGINE + ".") for m in graph)
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m == ENGINE or m.startswith(ENGINE + ".")
                 for d in deps if not (d == ENGINE or d.startswith(ENGINE + ".") or d in ENGINE_BASE))
    assert not bad, bad


def test_only_the_engine_steps_an_optimizer():
    """One loop: ``optimizer.step()`` (any spelling of an optimizer) appears in the engine only."""
    import re

    pattern = re.compile(r"\b\w*optim\w*\.step\(\)", re.I)
    hits = sorted(f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "tasks").rglob("*.py")
                  if "engine" not in p.relative_to(ROOT / "tasks").parts
                  for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line))
    assert not hits, hits
    engine = "\n".join(p.read_text() for p in (ROOT / "tasks" / "engine").glob("*.py"))
    assert pattern.search(engine)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_see_what_they_look_for():
    """The graph finds lazy and relative imports, and the cycle finder finds a cycle."""
    graph = import_graph()
    assert "refinery.tasks.runtime" in graph["refinery.tasks.store"] or \
        "refinery.tasks.store" in graph["refinery.tasks.runtime"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
