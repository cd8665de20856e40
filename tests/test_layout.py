"""The package's import graph: no module imports another in a cycle (at module level or
inside functions), and no import goes "up" the layers docs/architecture.md draws."""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "hcx"

# Lower layers never import higher ones. A module's layer is that of its sub-package (or of
# itself, for top-level modules).
LAYERS = [
    {"errors", "files", "paths", "config", "resources"},
    {"tokenizer"},
    {"data"},
    {"engine"},
    # evaluation (models, metrics, judges, the code sandbox) sits below the training
    # stages: on-policy alignment scores its rollouts with them
    {"interop", "evaluation"},
    {"stages", "scorers"},
    {"serving"},
    {"ops"},
    {"commands", "cli", "api", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """hcx modules ``path`` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # the longest hcx module the name denotes (a module, or a name in one)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "hcx":
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files) | {"hcx"}
    return {m: imports(p, modules) - {m} for m, p in files.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{module}: no layer in tests/test_layout.py LAYERS; add its package")


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"modules importing each other in a cycle: {cycles}"


def test_no_import_goes_up_a_layer():
    g = graph()
    up = [f"{m} -> {d}" for m, deps in sorted(g.items()) for d in sorted(deps)
          if layer(d) > layer(m)]
    assert not up, "imports from a lower layer to a higher one:\n  " + "\n  ".join(up)


def test_no_private_names_imported_across_modules():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hcx"):
                bad += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
