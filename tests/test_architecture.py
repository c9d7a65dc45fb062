"""The layering of docs/architecture.md, enforced: imports point one way, toward the math.

Every module of the package must be in LAYERS (a new module means deciding its layer and
updating docs/architecture.md); a module may import idode modules of its own layer or below.
Within a layer there is no cycle either, counting every import: the ones inside functions and
under ``TYPE_CHECKING`` too (such an import still makes the two modules depend on each other).
"""

import ast
import pathlib
import re
import sys
from collections.abc import Iterator

import pytest

import idode

LAYERS: dict[int, set[str]] = {
    0: {"rng", "validation", "stats", "choices", "precision"},  # leaf helpers: torch/numpy only
    1: {  # the method's math
        "schedules",
        "parameterization",
        "time_sampling",
        "losses",
        "divergence",
        "tableaus",
        "solvers",
        "dequantization",
        "protocol",
        "augmented",
        "continuous",
        "certify",
        "calibration",
        "likelihood",
        "ode_sampling",
    },
    2: {  # models, data, configs and file formats
        "nets",
        "config",
        "presets",
        "model",
        "data",
        "imagefiles",
        "loader",
        "checkpoint",
        "rundir",
        "evalfiles",
        "evalexports",
        "evalinputs",
        "convert",
        "adapters",
    },
    3: {  # the loops
        "distributed",
        "runguard",
        "evaluate",
        "periodic",
        "train",
        "write_samples",
        "compare",
    },
    4: {"cli", "experiments", "__main__", "__init__"},  # the command line and the studies
}
LAYER_OF = {name: k for k, names in LAYERS.items() for name in names}
ROOT = pathlib.Path(idode.__file__).parent


def _top(module: str) -> str:
    """idode.nets.unet -> nets; idode -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "idode":
                found |= {a.name for a in node.names}
            elif node.module.startswith("idode."):
                found.add(_top(node.module))
        elif isinstance(node, ast.Import):
            found |= {_top(a.name) for a in node.names if a.name.startswith("idode.")}
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        owner = rel.parts[0].removesuffix(".py")
        if owner not in LAYER_OF:
            problems.append(f"{rel}: not in LAYERS (add it here and to docs/architecture.md)")
            continue
        for target in _imports(path) - {owner}:
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[owner]:
                problems.append(
                    f"{rel} (layer {LAYER_OF[owner]}) imports idode.{target} "
                    f"(layer {LAYER_OF[target]})"
                )
    assert not problems, "\n".join(problems)


def test_no_source_file_is_longer_than_about_500_lines():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 530  # "about 500"
    ]
    assert not long, long


# --------------------------------------------------------------------------------------------------
# Function length.
# --------------------------------------------------------------------------------------------------

LONG_FUNCTIONS_BEING_REWRITTEN: set[str] = set()  # none: every function is within the limit


def test_no_function_is_longer_than_about_80_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(ROOT)}:{node.name}"
                if n > 80 and where not in LONG_FUNCTIONS_BEING_REWRITTEN:
                    long.append(f"{where} (line {node.lineno}): {n} lines")
    assert not long, long


# --------------------------------------------------------------------------------------------------
# No import cycles. The graph's nodes are the package's modules by dotted name; a package's
# __init__.py is the package's own node (idode.nets), distinct from its submodules
# (idode.nets.unet). An edge goes to the most specific module an import names: `from idode.nets
# import unet` and `import idode.nets.unet` -> idode.nets.unet; `from idode.nets import make_net`
# -> idode.nets; `from idode import presets` -> idode.presets, `from idode import bits_per_dim` ->
# idode. The parent packages Python runs first on the way to a submodule are not edges (every
# submodule would otherwise be in a cycle with an __init__ that imports it); an explicit import
# of the package's __init__ from inside it is one. Only idode -> idode imports count; imports
# inside functions and under TYPE_CHECKING count like the others.
# --------------------------------------------------------------------------------------------------

CYCLES_BEING_REMOVED: list[set[str]] = []  # none: no cycle is allowed


def _module_paths(root: pathlib.Path) -> dict[str, pathlib.Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = ("idode", *path.relative_to(root).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _named(node: ast.AST, mods: dict[str, pathlib.Path]) -> Iterator[str]:
    """The idode modules an import statement names (the most specific existing one)."""

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    if isinstance(node, ast.Import):
        yield from (known(a.name) for a in node.names if a.name.split(".")[0] == "idode")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module.split(".")[0] == "idode":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                yield sub if sub in mods else known(node.module)


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """module -> the idode modules it imports anywhere in its file (functions, TYPE_CHECKING)."""
    mods = _module_paths(root)
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        graph[name] = {t for node in ast.walk(tree) for t in _named(node, mods)} - {name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def test_strongly_connected_finds_hidden_and_long_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    comps = sorted(map(sorted, strongly_connected(g)))
    assert comps == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]


def test_import_graph_sees_function_local_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "idode"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from idode.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from idode.b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import idode.a\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from idode.sub import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from idode import a\nfrom idode.sub import other\n")
    (pkg / "sub" / "other.py").write_text("import torch\n")
    g = import_graph(pkg)
    assert g["idode"] == {"idode.a"} and g["idode.a"] == {"idode.b"} and g["idode.b"] == {"idode.a"}
    assert g["idode.sub"] == {"idode.sub.leaf"}
    assert g["idode.sub.leaf"] == {"idode.a", "idode.sub.other"} and g["idode.sub.other"] == set()
    assert [c for c in strongly_connected(g) if len(c) > 1] == [{"idode.a", "idode.b"}]


def test_no_import_cycles_counting_imports_inside_functions_and_type_checking():
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    unexpected = [sorted(c) for c in cycles if c not in CYCLES_BEING_REMOVED]
    assert not unexpected, f"import cycles (move the shared piece down): {unexpected}"


# --------------------------------------------------------------------------------------------------
# Runtime dependencies: exactly what the package imports (test-only references go to extras)
# --------------------------------------------------------------------------------------------------

# a distribution whose import name differs from its name (tensorboard is reached through torch)
_IMPORTED_AS = {
    "scikit-learn": "sklearn",
    "tensorboard": "torch.utils.tensorboard",
    "pillow": "PIL",
}


def test_runtime_dependencies_are_exactly_what_the_package_imports():
    tomllib = pytest.importorskip("tomllib")
    pyproject = ROOT.parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    project = tomllib.loads(pyproject.read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {
            _IMPORTED_AS.get(n, n) for n in (re.split(r"[<>=!~;\[ ]", r)[0] for r in requirements)
        }

    runtime = names(project["dependencies"])
    optional = names(project["optional-dependencies"]["adapters"])
    imported = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
    third_party = {
        m for m in imported if m.split(".")[0] not in sys.stdlib_module_names | {"idode"}
    }
    unused = {d for d in runtime if not any(m == d or m.startswith(d + ".") for m in imported)}
    assert not unused, f"runtime dependencies the package never imports: {sorted(unused)}"
    tops = {d.split(".")[0] for d in runtime | optional}
    undeclared = {m for m in third_party if m.split(".")[0] not in tops}
    assert not undeclared, f"imported but not declared: {sorted(undeclared)}"
