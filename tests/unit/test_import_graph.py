"""The import graph of services/, clients/, dev/ and bench/ has no cycle.

Every import counts, including those inside functions (a deferred import hides a circle; it does not
remove it). Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = {
    "services": ROOT / "services",
    "igw": ROOT / "clients" / "igw",
    "igw_dev": ROOT / "dev" / "igw_dev",
    "bench": ROOT / "bench",
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for prefix, top in TREES.items():
        for path in top.rglob("*.py"):
            if "_pb2" in path.name or ".litellm-venv" in path.parts:  # (a gitignored venv under bench/)
                continue
            parts = [prefix, *path.relative_to(top).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the first-party modules it imports."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:
                        graph[mod].add(f"{base}.{alias.name}")
                    elif base in mods:
                        graph[mod].add(base)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_circle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_covers_the_router_and_its_providers() -> None:
    graph = import_graph()
    assert "services.router.providers.registry" in graph["services.router.service"]
    assert "services.router.providers.openai" in graph["services.router.providers.registry"]


def test_the_graph_covers_the_dev_package_and_the_cli_verbs_that_reach_it() -> None:
    graph = import_graph()
    assert "igw_dev.up" in graph["services.cli.commands_dev"]
    assert "igw_dev.pki.layout" in graph["igw_dev.pki"]
    assert "services.common.pki" in graph["igw_dev.pki.spiffe"]


def test_services_clients_dev_and_bench_import_no_cycle() -> None:
    assert cycles(import_graph()) == []
