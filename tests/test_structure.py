"""The shape of the code: no import cycle between modules of ``lesion/`` and ``pipelines/``, no function over
``MAX_LINES`` lines, no fingerprint computed from source code. Read with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lesion", "pipelines")
MAX_LINES = 80


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(tree: ast.AST, module: str, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere (function-level imports too), by absolute or relative import."""
    names = set()
    package = module.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level] + ([node.module] if node.module else [])) \
                if node.level else node.module
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    # a package's __init__ is not an edge of its own modules (``import lesion.data.shards`` runs lesion/__init__)
    return {n for n in names if n in known and n != module and n not in PACKAGES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as a path that returns to its first module (depth-first search, one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def functions() -> dict[str, ast.FunctionDef]:
    """``path:name`` (``path:Class.name`` for methods) -> node, for every function of the packages."""
    found = {}
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        item.qualified = f"{node.name}.{item.name}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[f"{rel}:{getattr(node, 'qualified', node.name)}"] = node
    return found


def test_no_import_cycles():
    known = modules()
    graph = {name: imported(ast.parse(path.read_text()), name, set(known)) for name, path in known.items()}
    assert graph["pipelines.workflow"] and graph["pipelines.train"]  # the walk sees imports at all
    assert not cycles(graph), "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles(graph))
    # the command line is the top: stages (``lesion run`` included) call each other's functions, never cli.main
    assert not [name for name, deps in graph.items() if "pipelines.cli" in deps]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    relative = ast.parse("from . import shards\nfrom ..rundir import RunDir\n")
    assert imported(relative, "lesion.data.splits", {"lesion.data.shards", "lesion.rundir"}) == {
        "lesion.data.shards", "lesion.rundir"}


def test_no_function_is_over_80_lines():
    lengths = {name: node.end_lineno - node.lineno + 1 for name, node in functions().items()}
    assert len(lengths) > 100  # the walk sees the functions
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, f"functions over {MAX_LINES} lines: {long}"


def _reads_source(node: ast.AST) -> bool:
    """Whether a function reads module source: ``__file__`` or ``inspect.getsource*``."""
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id == "__file__":
            return True
        if isinstance(child, ast.Attribute) and (child.attr == "__file__" or child.attr.startswith("getsource")):
            return True
    return False


def _hashes(node: ast.AST) -> bool:
    """Whether a function computes a hash or fingerprint."""
    for child in ast.walk(node):
        name = child.id if isinstance(child, ast.Name) else child.attr if isinstance(child, ast.Attribute) else ""
        if name in ("hashlib", "fingerprint", "sha256", "md5", "blake2b"):
            return True
    return False


def test_no_fingerprint_hashes_source_code():
    hashing = {name for name, node in functions().items() if _reads_source(node) and _hashes(node)}
    assert not hashing, f"functions hashing source code (use a version constant): {hashing}"


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    return hashlib.sha256(open(__file__, 'rb').read())\n", True),
    ("def f(m):\n    return fingerprint(inspect.getsource(m))\n", True),
    ("def f(m):\n    return fingerprint(m.VERSION)\n", False),
    ("def f():\n    return Path(__file__).parent / 'web'\n", False),
])
def test_the_source_hashing_check_tells_them_apart(source, expected):
    node = ast.parse(source).body[0]
    assert (_reads_source(node) and _hashes(node)) is expected
