"""Architecture rules for the ``indexer`` package: no import cycles, no module over 400 lines, no function over 60.

Imports are read with ``ast``, not by importing: module-level imports, lazy ones inside functions and those under
``if TYPE_CHECKING:`` all count (a cycle hidden in a function or in type hints is still a cycle: the two modules
cannot be understood, or split, apart). An edge goes to the
module imported (``from indexer.a import b`` goes to ``indexer.a.b`` when that is a module, else to ``indexer.a``);
a submodule has no implicit edge to its parent packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "indexer"
ROOT = PACKAGE.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

Graph = Mapping[str, Iterable[str]]


# ---------------------------------------------------------------------------------------------- the import graph
def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """{dotted name: path} for every module of the package (a package is its ``__init__.py``)."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, ``if TYPE_CHECKING:`` blocks included."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    for child in ast.iter_child_nodes(node):
        yield from import_nodes(child)


def from_base(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module of ``from <base> import ...`` written in module ``current``."""
    if node.level == 0:
        return node.module or ""
    package = current if is_package else current.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def nearest_known(name: str, known: set[str]) -> str | None:
    """``name``, or its closest enclosing module that exists (``indexer.x.Name`` -> ``indexer.x``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(tree: ast.AST, current: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``current`` (parsed as ``tree``) imports, itself excluded."""
    targets: set[str] = set()
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        else:
            base = from_base(node, current, is_package)
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    found = {nearest_known(target, known) for target in targets}
    return {name for name in found if name is not None and name != current}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


# ---------------------------------------------------------------------------------------------- cycles
def reachable(graph: Graph, start: str) -> set[str]:
    """Nodes reachable from ``start`` by one edge or more (``start`` is among them only if it is on a cycle)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The components with a cycle in them (sorted members), by mutual reachability (iterative DFS per node)."""
    reach = {node: reachable(graph, node) for node in graph}
    on_cycles = [node for node in graph if node in reach[node]]
    components = {frozenset(m for m in reach[node] if node in reach.get(m, ())) for node in on_cycles}
    return sorted(sorted(component) for component in components)


def shortest_cycle(graph: Graph, start: str, within: set[str]) -> list[str]:
    """A shortest cycle ``[start, ..., start]`` through nodes of ``within`` (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if nxt in within and nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise ValueError(f"{start} is on no cycle")


def describe_cycles(graph: Graph) -> list[str]:
    """Each distinct shortest cycle through each module on a cycle, as ``a -> b -> a``."""
    cycles: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        for node in component:
            loop = shortest_cycle(graph, node, set(component))[:-1]
            first = loop.index(min(loop))  # one rotation per cycle, whichever member it was found from
            cycles.add(tuple(loop[first:] + loop[:first]))
    return [" -> ".join([*loop, loop[0]]) for loop in sorted(cycles)]


# ---------------------------------------------------------------------------------------------- sizes
def functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines from ``def`` to the last line, decorators excluded) of every function under node."""
    for child in ast.iter_child_nodes(node):
        name = prefix
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}."
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield name[:-1], child.end_lineno - child.lineno + 1
        yield from functions(child, name)


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------------------------- tests
def test_cycle_finder_finds_a_three_cycle_and_nothing_in_a_dag():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert describe_cycles(graph) == ["a -> b -> c -> a"]
    dag = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}
    assert strongly_connected(dag) == [] and describe_cycles(dag) == []
    two_loops = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert describe_cycles(two_loops) == ["a -> b -> a", "a -> c -> a"]


def test_import_edges_count_lazy_and_type_checking_imports_and_resolve_relative_ones():
    known = {"indexer", "indexer.a", "indexer.a.b", "indexer.c", "indexer.d", "indexer.e", "indexer.f"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from . import b\n"                       # submodule of this package
        "from ..c import Name\n"                  # a name: the edge goes to the module
        "if TYPE_CHECKING:\n    import indexer.d\n"
        "else:\n    import indexer.e\n"
        "def f():\n    from indexer import f\n"   # lazy, and a submodule named in a from-import
    )
    assert imported_modules(ast.parse(source), "indexer.a", True, known) == {
        "indexer.a.b", "indexer.c", "indexer.d", "indexer.e", "indexer.f"}
    assert imported_modules(ast.parse("from . import x\nfrom .a import b"), "indexer.c", False, known) == {
        "indexer", "indexer.a.b"}


def test_no_import_cycles_in_indexer():
    graph = import_graph()
    assert sum(len(targets) for targets in graph.values()) > len(graph) / 2, "the import graph is (almost) empty"
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles in indexer/:\n" + "\n".join(cycles)


def test_no_module_over_400_lines():
    sizes = {relative(path): len(path.read_text().splitlines()) for path in package_modules().values()}
    over = [f"{path}: {n}" for path, n in sorted(sizes.items()) if n > MAX_MODULE_LINES]
    assert not over, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(over)


def test_no_function_over_60_lines():
    over = [f"{relative(path)}:{name}: {n}" for path in package_modules().values()
            for name, n in functions(ast.parse(path.read_text(), str(path))) if n > MAX_FUNCTION_LINES]
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(over)


# ------------------------------------------------------------------------------------- the store owns its tables
RAW_TXN_CALLS = {"get", "put", "delete", "cursor", "drop", "stat", "replace", "pop"}


def raw_store_access(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, what) for each place that reaches into LMDB itself: ``<x>.db``/``<x>.env``, or a call of
    ``txn.get/put/delete/cursor/...`` (a transaction is only handed to the store's own methods)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("db", "env"):
            yield node.lineno, f".{node.attr}"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id in ("txn", "t")
              and node.func.attr in RAW_TXN_CALLS):
            yield node.lineno, f"{node.func.value.id}.{node.func.attr}()"


def test_raw_store_access_finder_finds_tables_env_and_transaction_calls():
    src = ("a = store.db['word']\nb = self.store.env.info()\nc = txn.cursor(db=x)\nd = t.get(k)\n"
           "e = store.get_meta('x', txn=txn)\nf = words.get(1)\n")
    assert [what for _, what in sorted(raw_store_access(ast.parse(src)))] == [".db", ".env", "txn.cursor()", "t.get()"]


def test_no_module_outside_store_touches_lmdb_tables():
    store_package = PACKAGE / "store"
    found = [f"{relative(path)}:{line}: {what}" for path in package_modules().values()
             if store_package not in path.parents
             for line, what in raw_store_access(ast.parse(path.read_text(), str(path)))]
    assert not found, "only indexer/store/ reads or writes store.db (use the store's methods):\n" + "\n".join(found)
