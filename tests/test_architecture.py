"""The package map holds: no import cycles, dependencies point one way (docs/architecture.md).

Every ``.py`` under ``cair_export/``, ``runtime/cair_runtime/`` and ``scripts/`` is parsed with ``ast``
(nothing is imported), and its imports, at module level and inside functions alike, become edges of
a module graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cair_export": ROOT / "cair_export", "cair_runtime": ROOT / "runtime" / "cair_runtime",
            "scripts": ROOT / "scripts"}
# What the runtime never imports at module level: it installs with numpy and onnxruntime alone, so a
# serving host needs none of the exporter's stack (torch only inside the AOTInductor backend).
RUNTIME_FORBIDDEN = ("cair_export", "torch", "diffusers", "transformers", "onnx")
# The layers of the exporter: a module may import its own layer and the ones before it, never after.
# ``cair_export.assets`` (where shipped data lies) comes first: every layer may read it.
LAYERS = ("cair_export.assets", "cair_export.core", "cair_export.deploy", "cair_export.lab", "cair_export.cli")
# The runtime's own layers: serving sits on top of everything else in it, and the backends (which run
# one graph call) know nothing of the request path that drives them.
RUNTIME_TOP = "cair_runtime.serve"
BACKENDS = "cair_runtime.backends"
ABOVE_BACKENDS = ("cair_runtime.pipeline", "cair_runtime.text2image", "cair_runtime.serve", "cair_runtime.cli")


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(package, folder, path): path
            for package, folder in PACKAGES.items() for path in sorted(folder.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in the file; ``from a import b`` names a.b if a module."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found += [(target, id(node) in top_level) for target in targets]
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    modules = _modules()
    known = set(modules)
    raw = {name: _imports(name, path, known) for name, path in modules.items()}
    edges = {name: {target for target, _ in imports if target in known and target != name}
             for name, imports in raw.items()}
    return edges, raw


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    return next((i for i, prefix in enumerate(LAYERS) if _within(module, prefix)), None)


def test_the_graph_sees_the_packages():
    edges, _ = _graph()
    assert {"cair_export.cli", "cair_export.core.export", "cair_export.deploy.build", "cair_export.lab.demo",
            "cair_runtime.pipeline", "cair_runtime.serve.app", "scripts.bench"} <= set(edges)
    assert "cair_export.core.export" in edges["cair_export.cli"]  # function-level imports count
    assert "cair_export.core.export" in edges["scripts.bench_lora"]


def test_no_import_cycles():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_runtime_never_imports_the_exporter_or_heavy_libraries():
    _, raw = _graph()
    problems = []
    for module, imports in raw.items():
        if not module.startswith("cair_runtime"):
            continue
        for target, top_level in imports:
            root = target.split(".")[0]
            if root == "cair_export" or (top_level and root in RUNTIME_FORBIDDEN):
                problems.append(f"{module} imports {target}" + ("" if top_level else " (in a function)"))
    assert not problems, problems


def test_layers_point_one_way():
    """core <- deploy <- lab <- cli: a library module never imports a later layer, nor the CLI."""
    edges, _ = _graph()
    problems = []
    for module, targets in edges.items():
        own = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs > own:
                problems.append(f"{module} imports {target}")
    assert not problems, problems


def test_scripts_sit_on_top():
    """scripts/ may use the exporter and the runtime; nothing imports a script, not even another script
    (run as ``python scripts/x.py``, a sibling would import by its bare name)."""
    _, raw = _graph()
    names = {path.stem for path in PACKAGES["scripts"].glob("*.py")}
    problems = [f"{module} imports {target}" for module, imports in raw.items() for target, _ in imports
                if _within(target, "scripts") or (_within(module, "scripts") and target.split(".")[0] in names)]
    assert not problems, problems


def test_serve_sits_on_top_of_the_runtime():
    """Nothing else in cair_runtime imports cair_runtime.serve."""
    edges, _ = _graph()
    problems = [f"{module} imports {target}" for module, targets in edges.items()
                if _within(module, "cair_runtime") and not _within(module, RUNTIME_TOP)
                for target in targets if _within(target, RUNTIME_TOP)]
    assert not problems, problems


def test_backends_never_import_the_request_path():
    """cair_runtime.backends never imports the pipeline, text2image, serving or the CLI."""
    edges, _ = _graph()
    problems = [f"{module} imports {target}" for module, targets in edges.items() if _within(module, BACKENDS)
                for target in targets if any(_within(target, above) for above in ABOVE_BACKENDS)]
    assert not problems, problems


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
