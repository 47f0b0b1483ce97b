"""The package's layers, read from the source with `ast` (nothing is imported):

    cli → api → serving → registry / engine / metrics → core          train → core

- a module imports its own layer and the layers below it, never one above, and never a sibling
  (registry, engine and metrics do not import each other);
- core, registry, engine and serving import no web code; core, registry and train import no vLLM;
- train imports only `alter_serve.core` from alter_serve, and alter_serve never imports train;
  benchmarks may import anything, and nothing imports benchmarks;
- no import cycle between modules (imports inside functions and under TYPE_CHECKING count too).

The checks are functions of an import graph, so the last tests run them on small fake graphs: a
checker that cannot fail checks nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alter_serve", "train", "benchmarks")

# alter_serve's layers, lowest first. A layer is a subpackage or a top-level module (`LAYER_OF`).
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"core"}),
    frozenset({"registry", "engine", "metrics"}),
    frozenset({"serving"}),
    frozenset({"api"}),
    frozenset({"cli"}),
)
# Top-level modules of alter_serve, by layer: the server's settings are read by the service; the
# admin command line and the demo setup are command-line code.
LAYER_OF = {"config": "serving", "admin_cli": "cli", "demo_setup": "cli"}
WEB = frozenset({"fastapi", "starlette", "uvicorn", "python_multipart"})
NO_WEB = frozenset({"core", "registry", "engine", "serving", "train"})
NO_VLLM = frozenset({"core", "registry", "train"})
RANK = {layer: rank for rank, layers in enumerate(LAYERS) for layer in layers}


# ---- the graph ----------------------------------------------------------------------------------
def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of PACKAGES by dotted name (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """The dotted names `module` imports, relative imports made absolute; `from X import a` gives
    `X.a` (the caller takes the longest prefix that is a module: `X.a` when a is a module, else X)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(files: Mapping[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module → the modules of PACKAGES it imports, module → the top-level packages outside them)."""
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imported_names(module, path)
        internal[module] = {_owning_module(n, files) for n in names if n.split(".")[0] in PACKAGES} - {module, None}
        external[module] = {n.split(".")[0] for n in names if n.split(".")[0] not in PACKAGES}
    return internal, external


def _owning_module(name: str, files: Mapping[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module (`X.a` is X's attribute a when a is no module)."""
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


# ---- the checks ---------------------------------------------------------------------------------
def layer(module: str) -> str | None:
    """alter_serve's layer of `module` ('train' and 'benchmarks' for those packages; None for the
    alter_serve package itself)."""
    parts = module.split(".")
    if parts[0] != "alter_serve":
        return parts[0]
    if len(parts) == 1:
        return None
    return LAYER_OF.get(parts[1], parts[1])


def layer_problems(internal: Mapping[str, Iterable[str]], external: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import that breaks the rules of the module docstring, as 'importer → imported: why'."""
    problems = []
    for importer in set(internal) | set(external):
        mine = layer(importer)
        for target in internal.get(importer, ()):
            theirs = layer(target)
            why = _internal_rule(mine, theirs, target)
            if why:
                problems.append(f"{importer} → {target}: {why}")
        for package in external.get(importer, ()):
            if mine in NO_WEB and package in WEB:
                problems.append(f"{importer} → {package}: {mine} imports no web code")
            if mine in NO_VLLM and package == "vllm":
                problems.append(f"{importer} → {package}: {mine} imports no vLLM")
    return sorted(problems)


def _internal_rule(mine: str | None, theirs: str | None, target: str) -> str | None:
    if mine is None or theirs is None or mine == theirs or mine == "benchmarks":
        return None
    if theirs == "benchmarks":
        return "nothing imports benchmarks"
    unknown = next((x for x in (mine, theirs) if x not in RANK and x != "train"), None)
    if unknown is not None:
        return f"{unknown} is in no layer: add it to LAYERS or LAYER_OF"
    if mine == "train":
        return None if theirs == "core" else "train imports only alter_serve.core"
    if theirs == "train":
        return "alter_serve never imports train"
    if RANK[theirs] == RANK[mine]:
        return f"{mine} and {theirs} are sibling layers"
    if RANK[theirs] > RANK[mine]:
        return f"{mine} is below {theirs}"
    return None


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module, or
    a module that imports itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return found


# ---- the package ----------------------------------------------------------------------------------
def test_the_package_keeps_its_layers():
    internal, external = import_graph(module_files())
    assert layer_problems(internal, external) == []


def test_no_module_is_in_an_import_cycle():
    internal, _ = import_graph(module_files())
    assert cycles(internal) == []


def test_the_graph_sees_the_known_edges():
    """The graph is read right: relative, absolute, `from . import module` and function-level imports."""
    internal, external = import_graph(module_files())
    assert "alter_serve.serving.routing" in internal["alter_serve.serving.service"]  # from .routing import Router
    assert "alter_serve.metrics" in internal["alter_serve.serving.service"]  # from .. import metrics
    assert "alter_serve.api.app" in internal["alter_serve.cli"]  # imported inside a function
    assert any("alter_serve.core.bundle" in targets for module, targets in internal.items()
               if module.startswith("train."))  # absolute
    assert "fastapi" in external["alter_serve.api.app"] and "vllm" in external["alter_serve.engine.vllm_engine"]


# ---- the checker itself ---------------------------------------------------------------------------
def test_an_upward_import_a_sibling_import_and_the_rooms_are_each_a_problem():
    internal = {
        "alter_serve.serving.service": {"alter_serve.api.app"},  # serving → api: upward
        "alter_serve.registry.store": {"alter_serve.engine.adapters"},  # registry → engine: siblings
        "alter_serve.core.views": {"alter_serve.core.bundle"},  # within a layer: fine
        "alter_serve.limits": {"alter_serve.registry"},  # a module of no layer
        "alter_serve.api.app": {"alter_serve.serving.service", "alter_serve.core.views"},  # down: fine
        "train.cli": {"alter_serve.registry"},  # train → registry
        "alter_serve.cli": {"train.cli", "benchmarks.serve_bench"},  # serve → train, and benchmarks
        "benchmarks.serve_bench": {"alter_serve.api.app", "train.cli"},  # benchmarks: anything
    }
    external = {"alter_serve.core.views": {"fastapi", "torch"}, "alter_serve.serving.routing": {"starlette"},
                "train.cli": {"vllm"}, "alter_serve.api.app": {"fastapi", "vllm"}}
    assert layer_problems(internal, external) == [
        "alter_serve.cli → benchmarks.serve_bench: nothing imports benchmarks",
        "alter_serve.cli → train.cli: alter_serve never imports train",
        "alter_serve.core.views → fastapi: core imports no web code",
        "alter_serve.limits → alter_serve.registry: limits is in no layer: add it to LAYERS or LAYER_OF",
        "alter_serve.registry.store → alter_serve.engine.adapters: registry and engine are sibling layers",
        "alter_serve.serving.routing → starlette: serving imports no web code",
        "alter_serve.serving.service → alter_serve.api.app: serving is below api",
        "train.cli → alter_serve.registry: train imports only alter_serve.core",
        "train.cli → vllm: train imports no vLLM",
    ]


def test_a_cycle_is_found_whatever_its_length():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules(tmp_path):
    package = tmp_path / "alter_serve"
    (package / "serving").mkdir(parents=True)
    for name in ("__init__.py", "metrics.py", "serving/__init__.py", "serving/routing.py"):
        (package / name).write_text("")
    (package / "serving" / "service.py").write_text(
        "from . import routing\nfrom .. import metrics\nfrom ..serving.routing import Router\n"
        "def later():\n    import fastapi.responses\n")
    (package / "serving" / "__init__.py").write_text("from .service import AlterService\n")
    files = {m: p for m, p in module_files(tmp_path).items()}
    internal, external = import_graph(files)
    assert internal["alter_serve.serving.service"] == {"alter_serve.serving.routing", "alter_serve.metrics"}
    assert internal["alter_serve.serving"] == {"alter_serve.serving.service"}
    assert external["alter_serve.serving.service"] == {"fastapi"}
    assert layer_problems(internal, external) == [
        "alter_serve.serving.service → fastapi: serving imports no web code"]
