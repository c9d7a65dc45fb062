"""The layering of docs/architecture.md, enforced: imports point one way, toward the math.

Every module of the package must be in LAYERS (a new module means deciding its layer and
updating docs/architecture.md); a module may import idode modules of its own layer or below.
"""

import ast
import pathlib

import idode

LAYERS: dict[int, set[str]] = {
    0: {"rng", "validation", "stats"},  # leaf helpers: torch/numpy only
    1: {  # the method's math
        "schedules",
        "parameterization",
        "time_sampling",
        "losses",
        "divergence",
        "solvers",
        "dequantization",
        "likelihood",
        "continuous",
        "certify",
        "calibration",
        "sampler",
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
        "convert",
        "adapters",
    },
    3: {"distributed", "runguard", "train", "evaluate", "sampling"},  # the loops
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


def test_no_function_is_longer_than_about_100_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 105:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long
