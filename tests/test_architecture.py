"""The import graph of permask's own modules, read from the source: no cycles, and no arrow
from a lower layer up (``graph``, ``sparse`` and ``data`` use no other layer; only the command
line and the experiment use the experiment). Imports under ``if TYPE_CHECKING:`` are
annotations, not dependencies, and do not count; imports inside functions do."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "permask"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The permask modules ``path`` imports (``from X import y`` counts as X, or X.y where that
    is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).rstrip(".")
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "permask"}


def import_graph() -> nx.DiGraph:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        for target in _imports(path, name) & files.keys():
            if target != name and not name.startswith(target + "."):  # a package's own __init__
                graph.add_edge(name, target)
    return graph


def test_the_import_graph_is_read():
    graph = import_graph()
    assert graph.has_edge("permask.experiment.pipeline", "permask.experiment.stages")
    assert graph.has_edge("permask.cli", "permask.experiment.config")  # a function-level import too


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "permask"


def test_no_arrow_points_up():
    below = {  # what each layer may import besides itself and permask's private helpers
        "graph": set(),
        "sparse": set(),
        "data": set(),
        "match": {"graph"},
        "permute": {"graph"},
        "rotate": {"graph"},
    }
    wrong = [
        (a, b)
        for a, b in import_graph().edges
        if _layer(a) in below
        and _layer(b) != _layer(a)
        and not _layer(b).startswith("_")
        and _layer(b) not in below[_layer(a)]
    ]
    assert not wrong, wrong
    users_of_experiment = {_layer(a) for a, b in import_graph().edges if _layer(b) == "experiment"}
    assert users_of_experiment <= {"experiment", "cli", "permask"}, users_of_experiment


def test_no_function_shadows_its_module():
    """``permask.merge`` is the function; its module is ``permask.merging``."""
    import importlib
    import types

    import permask

    for name in dir(permask):
        value = getattr(permask, name)
        if isinstance(value, types.FunctionType) and (PACKAGE / f"{name}.py").exists():
            module = importlib.import_module(f"permask.{name}")
            assert value is not module, name
            raise AssertionError(f"permask.{name} is a function that shadows its module")
