"""The package's layers, read from its source: every `vipo_trl` import (module level or inside a function) is an edge;
there must be no cycle between modules, and each layer imports only the layers below it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vipo_trl"

# Which top-level parts of vipo_trl each part may import (besides itself). `testing` builds tiny models for tests
# and users; nothing in the library imports it.
ALLOWED = {
    "utils": set(),
    "losses": {"utils"},
    "data": {"utils"},
    "models": {"utils"},
    "trainer": {"utils", "losses", "data", "models"},
    "eval": {"utils", "data", "models", "trainer", "default"},
    "default": {"utils", "losses", "data", "models", "trainer"},
    "cli": {"utils", "losses", "data", "models", "trainer", "eval", "default", "__init__"},
    "testing": {"utils", "models", "data"},
    "__init__": {"utils", "losses", "trainer"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the vipo_trl modules `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vipo_trl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vipo_trl"):
                continue
            for alias in node.names:  # `from .x import y` imports the module y when y is one
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_path(candidate) else target)
    return found


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {m for m in imports_of(path) if module_path(m)} - {module_name(path)}
    return edges


def part(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "__init__"
    return "utils" if parts[1] == "_version" else parts[1]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # A package's __init__ importing its own submodules is how packages are built, not a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_correctly():
    edges = graph()
    # Known edges, one of each kind: relative, from-package-import-submodule, absolute, inside a function.
    assert "vipo_trl.losses.registry" in edges["vipo_trl.losses.dpo"]
    assert "vipo_trl.trainer.poly_dpo_config" in edges["vipo_trl.trainer.poly_dpo_trainer"]
    assert "vipo_trl.trainer" in edges["vipo_trl.default"]  # run_default imports the trainer lazily
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(graph()) is None


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        if part(module) == layer
        for target in targets
        if part(target) != layer and part(target) not in ALLOWED[layer]
    )
    assert not wrong, wrong
