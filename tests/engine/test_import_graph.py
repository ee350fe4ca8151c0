"""The package's import graph: no circles, and the layers the README's tree shows (public API -> engine ->
adapters / strategies -> vocabulary). Read from the source, so it holds for modules no test happens to import."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vtprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, top_level_only: bool) -> set[str]:
    """The vtprune modules ``name`` imports: at module level (``if TYPE_CHECKING:`` blocks included), or anywhere."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = ast.walk(tree) if not top_level_only else _module_level(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


def _module_level(body: list[ast.stmt]):
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):  # TYPE_CHECKING blocks, optional imports
            yield from _module_level(node.body)
            yield from _module_level(getattr(node, "orelse", []))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = {name: imports(name, top_level_only=True) for name in MODULES}
    assert "vtprune.engine.session" in graph["vtprune.engine.handle"]


def test_type_checking_imports_count():
    # The circle handle <-> input stage this test guards against ran through ``if TYPE_CHECKING:`` imports.
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .handle import PruneHandle\n")
    assert [node.module for node in _module_level(tree.body) if isinstance(node, ast.ImportFrom)] == [
        "typing",
        "handle",
    ]


def test_no_import_circles():
    graph = {name: imports(name, top_level_only=True) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def layer(name: str) -> str:
    """``vtprune.engine.handle`` -> ``engine``; the package itself -> ``root``."""
    return name.split(".")[1] if name.count(".") else "root"


#: What sits above the strategies: the machinery that runs them on a model, and what is built on that.
ABOVE_STRATEGIES = {"root", "api", "engine", "adapters", "harness", "viz", "vllm", "toyvlm", "synthetic", "cli"}


@pytest.mark.parametrize("name", [name for name in MODULES if layer(name) == "strategies"])
def test_strategies_know_no_engine_adapter_or_model_class(name):
    wrong = sorted(target for target in imports(name, top_level_only=False) if layer(target) in ABOVE_STRATEGIES)
    assert wrong == [], f"{name} imports {wrong}"
    assert "ForConditionalGeneration" not in MODULES[name].read_text()


@pytest.mark.parametrize("name", [name for name in MODULES if layer(name) == "vocabulary"])
def test_the_vocabulary_imports_only_itself_and_the_errors(name):
    wrong = sorted(
        target for target in imports(name, top_level_only=False) if layer(target) not in ("vocabulary", "errors")
    )
    assert wrong == [], f"{name} imports {wrong}"
    assert "ForConditionalGeneration" not in MODULES[name].read_text()


@pytest.mark.parametrize("name", [name for name in MODULES if layer(name) == "adapters"])
def test_adapters_import_no_strategy(name):
    wrong = sorted(target for target in imports(name, top_level_only=False) if layer(target) == "strategies")
    assert wrong == [], f"{name} imports {wrong}"
