"""Smoke tests: the report figures are written as real PNG files."""

import json
from pathlib import Path

from idode.experiments.ablate import FIGURES, make_figures
from idode.experiments.figures import plot_bars, plot_learning_curves

PNG = b"\x89PNG\r\n\x1a\n"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_learning_curves_and_bars(tmp_path):
    p = plot_learning_curves(
        {"a": [(1, 3.0), (2, 2.5), (3, 2.2)], "empty": []},
        tmp_path / "curves.png",
        title="t",
        reference=("uniform", 4.0),
    )
    assert p == tmp_path / "curves.png" and _is_png(p)
    p = plot_bars(["x", "y"], [1.0, 2.0], [0.1, 0.2], tmp_path / "bars.png", reference=("r", 1.5))
    assert _is_png(p)
    assert _is_png(plot_bars(["x"], [1.0], None, tmp_path / "bars_no_err.png"))


def test_ablation_figures_from_the_committed_results(tmp_path):
    results = json.loads((DOCS / "results.json").read_text())
    paths = make_figures(results, tmp_path / "figures")
    assert sorted(p.name for p in paths) == sorted(FIGURES.values())
    for p in paths:
        assert _is_png(p), p
