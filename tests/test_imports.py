"""The dependency direction of DESIGN.md, read from the source: the model core knows no method, and no
import cycle exists anywhere in the package (imports inside functions count; `if TYPE_CHECKING:` ones,
which never run, do not)."""

from __future__ import annotations

import ast
from pathlib import Path

import llamalab

SRC = Path(llamalab.__file__).parent
# What the model core may import: itself, the user-facing errors, the native kernels, the KV-cache protocol.
MODEL_MAY_IMPORT = ("llamalab.model", "llamalab.errors", "llamalab.kernels", "llamalab.kv.base")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The llamalab modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import sub` imports the submodule `pkg.sub`; `from mod import name`, the module.
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("llamalab"):
                found.add(name)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = list(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): runtime_imports(p, modules) for p in paths}


def test_the_model_core_imports_no_method_loader_or_engine():
    bad = {
        (m, d)
        for m, deps in import_graph().items()
        if m.startswith("llamalab.model.") or m == "llamalab.model"
        for d in deps
        if not d.startswith(MODEL_MAY_IMPORT)
    }
    assert not bad, sorted(bad)


def test_no_import_cycle():
    graph = import_graph()
    # A package imports its own modules from __init__; count only edges between distinct modules.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
