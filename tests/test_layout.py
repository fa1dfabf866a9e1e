"""The package layout's two hard limits (docs/design.md): no import cycle among the package's
modules and no module over 700 lines; and no module imports another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "llm_dvfs"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every absolute llm_dvfs import, at any depth, outside
    ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_dvfs"):
            assert node.level == 0, f"{path}: relative import"
            names = [a.name for a in node.names]
            # `from llm_dvfs.x import y` where y is a module imports that module
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in mods]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in mods]))
            found.extend((s, []) for s in subs)
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("llm_dvfs"))
    return found


def test_no_module_over_700_lines():
    long = {m: n for m, p in _modules().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and "configs" not in m}
    assert long == {}


def test_no_import_cycle():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(p, mods) if t in mods and t != m and t != "llm_dvfs"}
             for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_names_imported_across_modules():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        for target, names in _imports(p, mods):
            bad += [f"{m} imports {target}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__") and n != "_core"]
    assert bad == []


def test_sweep_never_imports_analysis():
    mods = _modules()
    bad = [f"{m} -> {t}" for m, p in mods.items() if m.startswith("llm_dvfs.sweep")
           for t, _ in _imports(p, mods) if t.startswith(("llm_dvfs.analysis", "llm_dvfs.report"))]
    assert bad == []
