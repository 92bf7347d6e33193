"""The package imports downwards only, and nothing imports in a cycle.

The import graph is read from the source with ``ast`` (every ``import``
statement, inside functions too, except those under ``if TYPE_CHECKING:``),
so an import moved into a function to dodge a cycle is still seen. Every
module must be given a layer here: a new module is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "allocpolicy"

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS = [
    (
        "base",
        {
            "allocpolicy._atfork", "allocpolicy._checkout", "allocpolicy._errors", "allocpolicy._fastcalls",
            "allocpolicy._machine", "allocpolicy._sizes",
        },
    ),
    ("native", {"allocpolicy._native"}),
    ("core", {"allocpolicy._core", "allocpolicy._core.*"}),
    ("model", {"allocpolicy._inject_settings", "allocpolicy._offenders", "allocpolicy._policy"}),
    (
        "features",
        {
            "allocpolicy._config",
            "allocpolicy._configure",
            "allocpolicy._fallible",
            "allocpolicy._inject",
            "allocpolicy._inprocess",
            "allocpolicy._loops",
            "allocpolicy._modules",
            "allocpolicy._regions",
            "allocpolicy._scope",
            "allocpolicy._stats",
            "allocpolicy._stats_socket",
            "allocpolicy._budget_checks",
        },
    ),
    (
        "entry points",
        {
            "allocpolicy",
            "allocpolicy.__main__",
            "allocpolicy._cli",
            "allocpolicy._stats_client",
            "allocpolicy.pytest_plugin",
            # Public modules a program imports to export metrics; like the
            # pytest plugin, they build on the public namespace.
            "allocpolicy.metrics",
            "allocpolicy.metrics.*",
        },
    ),
    # On top: they build on the public namespace (allocpolicy itself), which
    # never imports them.
    ("integrations", {"allocpolicy.integrations", "allocpolicy.integrations.*"}),
]

#: What an integration may import from the package: the public namespace and the core.
INTEGRATION_MAY_IMPORT = {"allocpolicy", "allocpolicy._core", "allocpolicy._core.*"}


def _matches(module: str, patterns: set[str]) -> bool:
    return any(
        module == p or (p.endswith(".*") and module.startswith(p[:-1])) for p in patterns
    )


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if _matches(module, patterns):
            return index
    raise LookupError(module)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported allocpolicy module, line) for every import that runs."""
    out: list[tuple[str, int]] = []
    package = module if is_package else module.rpartition(".")[0]

    def resolve(level: int, name: str | None) -> str:
        if not level:
            return name or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                for stmt in child.orelse:  # the else branch does run
                    visit_stmt(stmt)
                continue
            visit_stmt(child)

    def visit_stmt(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # `from . import _native` imports a module; `from ._errors import X` a name.
                out.append((sub if sub in known else target, node.lineno))
        visit(node)

    visit(tree)
    ours = [(m, line) for m, line in out if m == "allocpolicy" or m.startswith("allocpolicy.")]
    return list(dict.fromkeys(ours))


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = package_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = [
            (target, line)
            for target, line in _imports(tree, name, path.name == "__init__.py", known)
            # A submodule importing its own package's __init__ only runs what
            # already ran (the package is imported first); not an edge.
            if not (target != "allocpolicy" and name.startswith(target + "."))
        ]
    return graph


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module
    (or a module importing itself), as a path of module names."""
    edges = {m: sorted({t for t, _ in targets if t in graph}) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in edges[v]:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return components


def test_every_module_has_a_layer():
    unplaced = []
    for name in package_modules():
        try:
            layer_of(name)
        except LookupError:
            unplaced.append(name)
    assert not unplaced, f"give these modules a layer in {__name__}.LAYERS: {unplaced}"


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_imports_go_downwards_only():
    upward = []
    for module, targets in import_graph().items():
        own = layer_of(module)
        for target, line in targets:
            if layer_of(target) > own:
                upward.append(
                    f"{module} (layer {LAYERS[own][0]!r}) line {line} imports {target} "
                    f"(layer {LAYERS[layer_of(target)][0]!r})"
                )
    assert not upward, "\n".join(upward)


def test_integrations_use_the_public_api_and_the_core_only():
    wrong = []
    for module, targets in import_graph().items():
        if not _matches(module, LAYERS[layer_of("allocpolicy.integrations")][1]):
            continue
        for target, line in targets:
            if not _matches(target, INTEGRATION_MAY_IMPORT | LAYERS[layer_of(module)][1]):
                wrong.append(f"{module} line {line} imports {target}")
    assert not wrong, "\n".join(wrong)


# The checks above must be able to fail: each gets a small package that breaks it.


def _graph_of(sources: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
    known = set(sources)
    return {
        name: _imports(ast.parse(text), name, False, known) for name, text in sources.items()
    }


def test_a_cycle_through_a_function_level_import_is_found():
    graph = _graph_of(
        {
            "allocpolicy._config": "from . import _native\ndef f():\n    from . import _modules\n",
            "allocpolicy._modules": "from . import _config\n",
            "allocpolicy._native": "",
        }
    )
    assert _cycles(graph) == [["allocpolicy._config", "allocpolicy._modules"]]


def test_type_checking_imports_are_not_edges():
    graph = _graph_of(
        {
            "allocpolicy._config": "if TYPE_CHECKING:\n    from ._policy import Policy\n",
            "allocpolicy._policy": "from . import _config\n",
        }
    )
    assert _cycles(graph) == []


@pytest.mark.parametrize(
    "module, target",
    [("allocpolicy._native", "allocpolicy._core.refusal"), ("allocpolicy._core.names", "allocpolicy._scope")],
)
def test_an_upward_import_is_a_higher_layer(module, target):
    assert layer_of(target) > layer_of(module)
