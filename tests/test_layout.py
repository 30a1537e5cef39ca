"""The package's layers: every module imports in a fresh interpreter, the import graph has no cycle, and no
module imports from a layer above its own (method/, models/, engine/ least of all)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cigma_ray"

# Lowest first; a module may import from its own layer and the layers below it. The first word of a module's
# name under cigma_ray/ says its layer.
LAYERS = [
    {"method"},  # pure math
    {"config", "progress"},  # config keys; progress bars
    {"models", "data"},  # adapters and model surgery; image sources
    {"engine"},  # one replica's fast path
    {"rundir"},  # the run directory: storage, manifest, a run opened for reading
    {"pipeline"},  # stages, units, the worker, the in-process executor
    {"distributed"},  # Ray: replica actors and the executor that drives them
    {"evaluation", "plan"},  # eval sets, experiments, auto-K, inspection; the cost model of a scan
    {"reports"},  # text, figures, the HTML page
    {"export", "kuberay", "bench", "demo"},  # what the commands do, beyond the layers above
    {"commands"},  # one module per command, shared options
    {"cli", "__main__"},  # parse, dispatch, exit codes
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    """cigma_ray's modules by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The cigma_ray modules an import statement loads (the most specific known ones), wherever it stands."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("cigma_ray"):
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the cigma_ray modules it imports, at module level or inside functions, with the packages
    each import also runs (a package's __init__ runs before its modules)."""
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, is_package, node, known):
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):  # the target and every package above it
                        prefix = ".".join(parts[:i])
                        if prefix in known and not (name == prefix or name.startswith(prefix + ".")):
                            edges.add(prefix)
        graph[name] = edges - {name}
    return graph


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else -1  # cigma_ray itself holds only the version


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_imports_in_a_fresh_interpreter():
    names = [m for m in modules() if m != "cigma_ray.__main__"]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) is None] == []


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("low", ["method", "models", "engine"])
def test_core_layers_import_nothing_from_above(low):
    graph = import_graph()
    upward = {m: sorted(t for t in targets if layer(t) > LAYER_OF[low])
              for m, targets in graph.items() if m.split(".")[1:2] == [low]}
    assert {m: t for m, t in upward.items() if t} == {}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = {m: sorted(t for t in targets if layer(t) > layer(m)) for m, targets in import_graph().items()}
    assert {m: t for m, t in upward.items() if t} == {}


def test_a_cycle_and_an_upward_import_would_be_found():
    """The checks above can fail: a made-up graph with a cycle, and a made-up upward import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("cigma_ray.engine.scan") < layer("cigma_ray.pipeline.units")
    node = ast.parse("from ..pipeline.units import Job").body[0]
    assert resolve("cigma_ray.engine.scan", False, node, set(modules())) == {"cigma_ray.pipeline.units"}


def test_ray_code_loads_units_and_worker_without_the_stages():
    code = ("import sys, cigma_ray.distributed\n"
            "assert 'cigma_ray.pipeline.worker' in sys.modules\n"
            "assert 'cigma_ray.pipeline.stages' not in sys.modules, 'distributed/ loaded the stages'\n"
            "from cigma_ray.pipeline import Pipeline\n"
            "assert 'cigma_ray.pipeline.stages' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
