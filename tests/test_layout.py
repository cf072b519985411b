"""Meta-tests that keep the wiring honest: hooks documented and tested, no second path for built-ins,
no import circles, imports follow the data flow (datasette's test_plugin_hooks_* are the model)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from latentexplainer_plugin import hookspecs
from latentexplainer_plugin.plugins import KINDS, registry

PACKAGE = Path(__file__).resolve().parents[1] / "latentexplainer_plugin"
TESTS = Path(__file__).resolve().parent
DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if name.startswith("latentexplainer_") and callable(fn) and hasattr(fn, "latentexplainer_spec"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str) -> set[str]:
    """Package modules ``module`` imports (relative imports anywhere in the file, function-level included)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
            root = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(root + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{target}.{alias.name}"
                while name not in MODULES and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name != module:
                    found.add(name)
    return found


def test_there_are_hooks_to_check():
    assert len(HOOKS) >= 8, HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"`{hook}({params})`" in (DOCS / "plugins.md").read_text(), f"docs/plugins.md lacks `{hook}({params})`"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_that_implements_or_calls_it(hook):
    sources = [p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name]
    assert any(hook in s for s in sources), f"no test mentions {hook}"


def test_no_import_circles():
    graph = {m: _imports(m) for m in MODULES}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    # a package __init__ that re-exports its own submodules is not a circle of the data flow
    cycles = [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c)]
    assert cycles == []


#: Stages of the data flow (docs/DESIGN), upstream first. Infrastructure that wires everything
#: together (plugins, default_plugins, components, cli, the package __init__) is not a stage.
STAGES = [
    ("errors", "options", "types", "safe_io", "safe_load", "devices", "hub", "hookspecs", "redaction", "data"),
    ("models",),
    ("hooks",),
    ("directions",),
    ("adapters", "sae"),
    ("biases",),
    ("backends", "cache"),
    ("uncertainty", "evidence"),
    ("attribution", "ranking", "results", "plots"),
    ("store", "run", "report"),
    ("evaluation",),
    ("demo", "vlm"),
]
WIRING = ("plugins", "default_plugins", "components", "cli")


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in WIRING:
        return None
    for i, names in enumerate(STAGES):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module}: add its top-level name to a stage in STAGES (or to WIRING)")


#: The imports that run back up the data flow, each with its reason (at most 3).
KNOWN_BACK_IMPORTS = [
    # a prompt shows the traversal as a labelled grid, drawn by the same code as the report's strips
    ("latentexplainer_plugin.biases.base", "latentexplainer_plugin.report.strips"),
]


def test_imports_follow_the_data_flow():
    """An upstream stage may not import a downstream one, except for at most 3 documented cases."""
    back = sorted((m, t) for m in MODULES for t in _imports(m)
                  if _stage(m) is not None and _stage(t) is not None and _stage(t) > _stage(m))
    assert len(back) <= 3, "\n".join(f"{m} -> {t}" for m, t in back)
    assert back == sorted(KNOWN_BACK_IMPORTS), "\n".join(f"{m} -> {t}" for m, t in back)


BUILTIN_CLASSES = {"VAEAdapter", "GeneratorAdapter", "DDPMAdapter", "StableDiffusionAdapter", "OfflineBackend",
                   "OpenAICompatBackend", "HFBackend"}


def _builtin_names() -> set[str]:
    names = set()
    for kind in KINDS:
        entries = registry(kind).entries
        names |= {n for n, e in entries.items() if e.distribution == "latentexplainer-plugin"}
    return names


#: Comparisons that meet a built-in name by coincidence, with the reason.
NOT_COMPONENTS = {
    ("latentexplainer_plugin.adapters.diffusion", "generator"): "scheduler.step's torch `generator` keyword",
}


def test_no_builtin_component_name_in_a_conditional_outside_default_plugins():
    names = _builtin_names()
    assert {"vae", "ddpm", "offline", "openai", "pca", "add"} <= names
    found = []
    for module, path in MODULES.items():
        if ".default_plugins" in module:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    for v in values:
                        if isinstance(v, ast.Constant) and v.value in names and (module, v.value) not in NOT_COMPONENTS:
                            found.append(f"{module}:{node.lineno} compares with {v.value!r}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                for arg in ast.walk(node.args[1]) if len(node.args) > 1 else ():
                    if isinstance(arg, ast.Name) and arg.id in BUILTIN_CLASSES:
                        found.append(f"{module}:{node.lineno} isinstance(..., {arg.id})")
    assert found == []


def test_every_error_class_derives_from_the_common_base():
    from latentexplainer_plugin import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) >= 10
    assert all(issubclass(c, errors.LatentExplainerError) for c in classes)
    defined_elsewhere = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and re.search(r"Error$", node.name) and module != "latentexplainer_plugin.errors":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if not bases & ({c.__name__ for c in classes} | {"LatentExplainerError"}):
                    defined_elsewhere.append(f"{module}.{node.name}")
    assert defined_elsewhere == []
