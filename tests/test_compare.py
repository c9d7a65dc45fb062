"""``idode compare``: the paired difference of two evaluations of the same examples (issue 20).

A small MLP trained for 150 steps on digits against the same MLP after one step: the trained one
must be lower by far, with an interval that excludes 0; two evaluations of one checkpoint that
differ only in the noise seed must give an interval that contains 0. The interval itself is
``idode.stats.paired``, recomputed here from the per-example rows.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from idode.cli import main
from idode.compare import CompareError, compare, default_compare_dir
from idode.config import apply_overrides
from idode.evaluate import evaluate
from idode.presets import get_preset
from idode.stats import Z95
from idode.train import train

MLP = ["train.eval_every=0", "model.net=mlp", "model.mlp_hidden=64", "model.mlp_depth=2",
       "train.ema_decay=0.9", "train.batch_size=32", "train.lr=3e-3"]  # fmt: skip
FAST = dict(max_examples=16, rtol=1e-3, atol=1e-3, batch_size=16, device="cpu", progress=False)


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    """Evaluation folders: trained seed 0 and seed 1, untrained seed 0 (16 test digits each)."""
    root = tmp_path_factory.mktemp("compare")
    runs = {}
    for steps in (1, 150):
        cfg = apply_overrides(
            get_preset("digits_cpu"),
            [*MLP, f"train.steps={steps}", f"train.checkpoint_every={steps}"],
        )
        runs[steps] = train(cfg, root / f"run{steps}", progress=False).run_dir
    out = {}
    for name, steps, seed in (("trained", 150, 0), ("trained_seed1", 150, 1), ("untrained", 1, 0)):
        out[name] = root / name
        evaluate(runs[steps], out[name], seed=seed, **FAST)
    return out


def _bpd(folder):
    rows = [json.loads(line) for line in (folder / "per_example.jsonl").read_text().splitlines()]
    return np.array([r["bpd"] for r in rows])


def test_trained_vs_untrained_is_a_difference_whose_interval_excludes_0(evals, tmp_path):
    rep = compare(evals["trained"], evals["untrained"], tmp_path / "c")
    d = rep["metrics"]["bpd"]["a_minus_b"]
    # the paired interval, recomputed from the rows: mean +- Z95 sd / sqrt(n) of the differences
    diff = _bpd(evals["trained"]) - _bpd(evals["untrained"])
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert d["n"] == 16 and d["mean"] == pytest.approx(diff.mean(), abs=1e-12)
    assert d["ci95"] == pytest.approx([diff.mean() - Z95 * se, diff.mean() + Z95 * se])
    assert d["ci95"][1] < 0 and rep["metrics"]["bpd"]["verdict"] == "A lower"
    assert set(rep["metrics"]) == {"bpd", "elbo_bpd", "nfe"}
    for side in ("a", "b"):  # the solver error of each side, as its eval.json records it
        ev = json.loads(
            (evals["trained" if side == "a" else "untrained"] / "eval.json").read_text()
        )
        assert rep[side]["solver_error"] == ev["solver_error"] is not None
    text = (tmp_path / "c" / "report.md").read_text()
    assert "| bits/dim (ODE) |" in text and "A lower" in text and "## Solver error" in text
    assert "| max_abs_bpd |" in text and "| jobs |" not in text  # scalars; rows in the JSON
    assert "checkpoint_step" in text  # the settings that differ: the checkpoints
    assert (tmp_path / "c" / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["metrics"] == rep["metrics"]


def test_one_checkpoint_two_seeds_gives_an_interval_containing_0(evals, tmp_path):
    rep = compare(evals["trained"], evals["trained_seed1"], tmp_path / "c")
    lo, hi = rep["metrics"]["bpd"]["a_minus_b"]["ci95"]
    assert lo < 0 < hi and rep["metrics"]["bpd"]["verdict"] == "no difference"
    assert rep["settings_that_differ"]["seed"] == [0, 1]


def test_other_examples_are_refused_in_one_line(evals, tmp_path):
    # the same 16 test digits... and 16 others picked at random
    run = evals["trained"].parent / "run150"
    other = evaluate(run, tmp_path / "random", **FAST, subset="random")
    assert other["dataset"]["info"]["subset"]["indices"] != list(range(16))
    with pytest.raises(CompareError, match=r"evaluated different images .*same data, split"):
        compare(evals["trained"], tmp_path / "random", tmp_path / "c")
    # fewer examples of the same data: refused too (the shared ones cannot be shown equal)
    fewer = shutil.copytree(evals["trained"], tmp_path / "fewer")
    evaluate(run, fewer, **{**FAST, "max_examples": 8})
    with pytest.raises(CompareError, match=r"evaluated 16 examples and .*fewer 8"):
        compare(evals["trained"], fewer, tmp_path / "c")
    with pytest.raises(CompareError, match=r"no finished evaluation"):
        compare(evals["trained"], tmp_path / "nowhere", tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written for a refused comparison


def test_files_it_did_not_write_are_never_overwritten(evals, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    with pytest.raises(CompareError, match=r"holds report\.md that idode compare did not write"):
        compare(evals["trained"], evals["untrained"], out)
    assert (out / "report.md").read_text() == "my notes\n"
    # its own output it rewrites
    compare(evals["trained"], evals["untrained"], tmp_path / "again")
    compare(evals["trained"], evals["trained_seed1"], tmp_path / "again")
    assert "seed" in (tmp_path / "again" / "report.md").read_text()
    a, b = evals["trained"], evals["untrained"]
    assert default_compare_dir(a, b) == a.parent / f"compare_{a.name}_vs_{b.name}"


def test_the_command(evals, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", str(evals["trained"]), str(evals["untrained"]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bits/dim A - B = -") and lines[0].endswith("paired: A lower")
    assert lines[1] == f"report: {out / 'report.md'}"
    assert main(["compare", str(evals["trained"]), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idode: error: ") and err.count("\n") == 1
