"""The package's shape, measured from its source: the layers, no import loop, small files."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantsearch"
# Each layer may import only from the layers after it (cli -> report/export/search -> ...).
LAYERS = {
    "quantization": set(),
    "tasks": {"quantization"},
    "pipeline": {"quantization", "tasks"},
    "search": {"pipeline", "quantization", "tasks"},
    "report": {"search", "pipeline", "quantization", "tasks"},
    "export": {"report", "search", "pipeline", "quantization", "tasks"},
}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str, modules: set[str]) -> Iterator[str]:
    """Every quantsearch module imported anywhere in ``tree`` (functions included), except
    under ``if TYPE_CHECKING:``, which never runs; ``package`` anchors relative imports."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _imports(child, package, modules)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # "from package import submodule" imports the submodule, else the module.
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in modules else base
        yield from _imports(node, package, modules)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = set(_imports(tree, package, set(files))) & set(files) - {module}
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_module_imports_itself_back_through_others() -> None:
    # A package's __init__ imports its private modules: one of them importing its own
    # package back is a loop too.
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, targets in _graph().items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in targets:
            other = _layer(target)
            if other is not None and other != layer and other not in LAYERS[layer]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_package_reads_another_packages_private_modules() -> None:
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            package, _, name = target.rpartition(".")
            # quantsearch's own private modules (_paths, _malloc) serve every package.
            private = name.startswith("_") and package != "quantsearch"
            if private and not (module == package or module.startswith(f"{package}.")):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_source_file_is_over_500_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"


def test_the_graph_sees_imports_inside_functions() -> None:
    tree = ast.parse("def f():\n    from quantsearch.pipeline import adapt, _build\n")
    modules = {"quantsearch.pipeline", "quantsearch.pipeline._build"}
    assert set(_imports(tree, "quantsearch", modules)) == modules
