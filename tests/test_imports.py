"""The import graph: every import of the project's files (module level and inside functions)
points one way — vlpeft ← tasks ← evaluation ← launch ← bench — with no cycle between files, and no
function-level import of a project module (the way a cycle used to be dodged). ``tasks`` may use
the pure leaf ``evaluation.scoring`` (task-free scoring), which imports nothing of the project;
``evaluation.metrics`` gathers the task files' metrics by name, above them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["vlpeft", "tasks", "evaluation", "launch", "bench"]
LEAF = "evaluation.scoring"


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = project_modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` or its closest enclosing project module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in child.names]
            for target in targets:
                resolved = _resolve(target)
                if resolved and resolved != module:
                    found.append((resolved, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_project_is_found():
    assert {"vlpeft.adapters.base", "tasks.vqa", LEAF, "launch.train", "bench.adapters"} <= set(
        MODULES
    )


def test_imports_point_down_the_layers():
    upward = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
        for m, edges in GRAPH.items()
        for target, line, _ in edges
        if layer(target) > layer(m) and not (target == LEAF and m.startswith("tasks"))
    ]
    assert not upward, "\n".join(upward)


def test_metrics_is_a_pure_leaf():
    assert GRAPH[LEAF] == []


def test_no_function_level_import_of_a_project_module():
    hidden = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} inside a function"
        for m, edges in GRAPH.items()
        for target, line, inside in edges
        if inside
    ]
    assert not hidden, "\n".join(hidden)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target, _, _ in GRAPH[module]:
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            walk(module)


SCRIPT = 'if __name__ == "__main__"'
# what another module may take from a command-line script: its entry points, never its helpers
ENTRY_POINTS = {"launch.train": {"train", "main"}, "launch.pretrain_text": {"pretrain", "main"}}


def scripts() -> set[str]:
    return {m for m in MODULES if m.startswith("launch.") and SCRIPT in MODULES[m].read_text()}


def test_no_launcher_borrows_another_launchers_helpers():
    """``launch.train`` and the other command lines are entry points: a module may call their
    ``train()`` / ``main()``, while the pieces they are made of live in modules by role
    (``launch.distributed``, ``engine``, ``checkpoints``, ``resume``, ``logger``, ``run``)."""
    found = scripts()
    assert {"launch.train", "launch.evaluate", "launch.reproduce"} <= found
    borrowed = []
    for module in MODULES:
        if not module.startswith(("launch.", "bench.")):
            continue
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in found:
                allowed = ENTRY_POINTS.get(node.module, {"main"})
                borrowed += [
                    f"{MODULES[module].relative_to(ROOT)}:{node.lineno} takes {alias.name} "
                    f"from the script {node.module}"
                    for alias in node.names
                    if alias.name not in allowed
                ]
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module == "launch":
                    names = [f"launch.{n}" for n in names]
                borrowed += [
                    f"{MODULES[module].relative_to(ROOT)}:{node.lineno} imports the script {n}"
                    for n in names
                    if n in found
                ]
    assert not borrowed, "\n".join(borrowed)
