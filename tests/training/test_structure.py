"""The shape of the code, checked: the import graph of zoo/, kernels/, benchmarks/ and train.py
(built with `ast`, nothing imported) has no cycle; no project module imports train; a
function-local import of a project module says why in a comment; no file passes ~500 lines;
and no family name is compared as a string outside zoo/registry.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("zoo", "kernels", "benchmarks")
PROJECT = set(PACKAGES) | {"train"}
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    mods = {"train": ROOT / "train.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an imported name resolves to (the longest known prefix)."""
    if name.split(".")[0] not in PROJECT:
        return None
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path):
    """(target module, line, top level?) for every project import in a file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}".strip(".")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _target(name)
            if target and target != module:
                yield target, node.lineno, id(node) in top or _guarded_top(tree, node)


def _guarded_top(tree, node) -> bool:
    """An import inside a module-level `try:` / `if TYPE_CHECKING:` counts as module level."""
    for stmt in tree.body:
        if isinstance(stmt, (ast.Try, ast.If)) and any(n is node for n in ast.walk(stmt)):
            return True
    return False


GRAPH = {m: sorted({t for t, _, _ in _imports(m, p)}) for m, p in MODULES.items()}


def _parents(module: str):
    """A module's import also runs its packages' __init__: zoo.hf.rules needs zoo.hf and zoo."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


def test_the_project_is_found():
    assert {"train", "zoo", "zoo.registry", "zoo.training.loop", "kernels", "benchmarks.plan"} <= set(MODULES)


def test_no_import_cycles():
    edges = {m: set(GRAPH[m]) | {p for t in GRAPH[m] for p in _parents(t) if p != m and not m.startswith(p + ".")}
             for m in GRAPH}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_train():
    importers = [m for m, targets in GRAPH.items() if "train" in targets]
    assert importers == [], importers


def test_local_project_imports_say_why():
    bare = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, lineno, top in _imports(module, path):
            if not top and "local import:" not in lines[lineno - 1]:
                bare.append(f"{path.relative_to(ROOT)}:{lineno} imports {target}")
    assert bare == [], "function-local imports of project modules without a '# local import: why' comment:\n" + \
        "\n".join(bare)


def test_no_file_is_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == [], long


def test_train_py_is_a_thin_entry_point():
    assert len((ROOT / "train.py").read_text().splitlines()) <= 60


FAMILY_COMPARE = re.compile(r"""(family\s*(==|!=|in|not in)\s*\(?["']"""
                            r"""|["'](gpt2|llama|moe|bert|t5)["']\s*(==|!=)\s*\w*\.?family)""")


@pytest.mark.parametrize("module", [m for m in MODULES if m != "zoo.registry"])
def test_no_family_string_comparisons_outside_the_registry(module):
    text = MODULES[module].read_text()
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if FAMILY_COMPARE.search(line)]
    assert hits == [], hits
