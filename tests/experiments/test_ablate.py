"""The ablation study: its statistics, settings, report, and the --quick grid end to end."""

import json
import math

import numpy as np
import pytest

from idode.cli import main
from idode.experiments.ablate import (
    CLAIMS,
    FIGURES,
    RUNS,
    ablation_settings,
    render_docs,
    render_results_md,
    run_ablation,
)
from idode.experiments.ablate.collect import first_draw_bpd, ode_bpd
from idode.experiments.ablate.grid import FT1, FT2, finetune_run_config, run_config
from idode.experiments.ablate.jobs import OdeOutcome, trace_cov
from idode.experiments.ablate.report import _diff, _pm
from idode.experiments.ablate.summary import paired_stat, stat
from idode.stats import verdict


def test_paired_summary_and_verdict():
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    b = a - 0.5 + 0.1 * rng.normal(size=400)  # b is lower by 0.5 on every example
    s = paired_stat(a, b)
    assert s["n"] == 400
    assert s["mean"] == pytest.approx(0.5, abs=0.03)
    # the paired interval is narrow although a and b vary a lot
    assert s["ci95"][1] - s["ci95"][0] < 0.05
    assert s["ci95"][0] == pytest.approx(s["mean"] - 1.959964 * s["stderr"])
    assert verdict(s["ci95"]) == "held"
    assert verdict([-0.2, -0.1]) == "did not hold"
    assert verdict([-0.1, 0.2]) == "inconclusive"
    assert verdict([1.1, 3.0], null=1.0) == "held"
    assert s["a_mean"] == pytest.approx(a.mean()) and s["b_mean"] == pytest.approx(b.mean())


def test_one_value_is_reported_without_an_interval():
    s = stat([1.25])
    assert s["mean"] == 1.25 and s["n"] == 1
    assert s["stderr"] is None and s["ci95"] is None and s["std"] is None
    assert list(s) == ["mean", "stderr", "ci95", "std", "n"]  # eval.json's layout too
    assert _pm(s) == "1.250 (n = 1: the interval needs n >= 2)"
    assert _diff(s) == "+1.250 (n = 1: the interval needs n >= 2)"
    two = stat([1.0, 2.0])  # sd = 1/sqrt(2), se = 1/2
    assert _pm(two) == f"1.500 ± {1.959964 * 0.5:.3f}"


def test_trace_cov_matches_numpy():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(30, 7)) + 3.0
    c = g - g.mean(0)
    idx = np.arange(30)
    want = np.trace(np.cov(g, rowvar=False))
    assert trace_cov(c @ c.T, idx) == pytest.approx(want)
    boot = rng.integers(0, 30, 30)
    assert trace_cov(c @ c.T, boot) == pytest.approx(np.trace(np.cov(g[boot].T)))


def test_iw_bound_groups():
    """collect's bounds of the dequantization grid, against numpy on the per-draw terms."""
    rng = np.random.default_rng(2)
    n, k_max, d = 5, 16, 64
    lp, dec = rng.normal(-300, 5, (n, k_max)), rng.normal(-1, 0.1, (n, k_max))
    lq, elq = rng.normal(40, 2, (n, k_max)), rng.normal(40, 1, n)
    m = OdeOutcome(np.arange(n), lp, dec, lq, elq, np.zeros((n, k_max)), d)
    to_bpd = -1 / (d * math.log(2))
    for k in (1, 4, 16):
        b = (lp + dec - lq).reshape(n, k_max // k, k)
        top = b.max(2, keepdims=True)  # log mean exp, stably
        want = (top[..., 0] + np.log(np.exp(b - top).mean(2))) * to_bpd
        got = ode_bpd(m, group=k)["bpd_importance_weighted"]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    mean = (lp + dec - elq[:, None]).mean(1) * to_bpd  # analytic entropy
    np.testing.assert_allclose(ode_bpd(m)["bpd_mean_of_bounds"], mean, rtol=1e-12)
    np.testing.assert_allclose(first_draw_bpd(m), (lp + dec - elq[:, None])[:, 0] * to_bpd)
    # equal per-draw bounds: every IW bound equals them (the -log K cancels the sum)
    same = OdeOutcome(np.arange(2), np.full((2, 16), -100.0), np.zeros((2, 16)),
                      np.zeros((2, 16)), np.zeros(2), np.zeros((2, 16)), d)  # fmt: skip
    for k in (1, 4, 16):
        got = ode_bpd(same, group=k)["bpd_importance_weighted"]
        np.testing.assert_allclose(got, -100.0 * to_bpd, rtol=1e-14)


def test_settings():
    full = ablation_settings("digits")
    assert full.steps == 3000 and full.finetune_steps == 750 and full.rtol == 1e-5
    assert full.curve_examples == 300  # the whole digits test split
    s = ablation_settings("digits", steps=400)
    assert s.steps == 400 and s.finetune_steps == 100
    assert ablation_settings("mnist", quick=True).quick
    with pytest.raises(ValueError, match="unknown ablation preset"):
        ablation_settings("cifar10")
    cfg = run_config(full, "eps_uniform")
    assert cfg.model.parameterization == "eps" and not cfg.train.importance_sampling
    assert run_config(full, "velocity_is_sp").model.schedule == "SP"
    ft = finetune_run_config(full, 0.1)
    assert ft.train.steps == 3750 and ft.train.second_order_weight == 0.1


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    path = run_ablation("digits", out, quick=True, progress=False)
    return out, path


@pytest.mark.slow
def test_quick_grid(quick_run):
    out, path = quick_run
    assert path == out / "results.json"
    res = json.loads(path.read_text())
    for where, x in _numbers(res):
        assert math.isfinite(x), where
    s = res["settings"]
    assert s["quick"]
    # 1, 2, 5: every training run, with its learning curve and its final ODE bits/dim
    for name in RUNS:
        run = res["runs"][name]
        assert len(run["curve"]["steps"]) == s["segments"] == len(run["curve"]["mean"])
        assert run["curve"]["steps"][-1] == s["steps"]
        assert res["ode"][name]["bpd"]["n"] == s["ode_examples"]
        assert res["ode"][name]["nfe"]["mean"] >= 8  # at least one Dopri5 step
    for key in ("velocity_vs_eps_is", "velocity_vs_eps_uniform", "ode_eps_is_minus_velocity_is"):
        assert key in res["parameterization"]
    for label in ("init", "trained"):
        v = res["variance"][label]
        assert len(v["importance"]["loss"]) == s["variance_batches"]
        for k in ("loss_var", "grad_norm_var", "grad_trace_var"):
            r = v["ratio_uniform_over_importance"][k]
            assert r["ratio"] > 0 and 0 < r["ci95"][0] <= r["ci95"][1]
    # 3: second-order finetuning vs first-order continuation
    ft = res["finetune"]
    assert ft["extra_steps"] == s["finetune_steps"]
    assert res["ode"][FT2]["bpd"]["n"] == res["ode"][FT1]["bpd"]["n"]
    assert ft["cost_ratio_second_over_first"] > 0
    # 4: every dequantization and K
    entries = res["dequantization"]["entries"]
    for key in ("uniform", "variational", "tn_k1", "iw_k1", "iw_k4", "iw_k16"):
        assert entries[key]["bpd"]["n"] == s["deq_examples"]
    # IW with K draws costs K solves
    assert entries["iw_k16"]["nfe"]["mean"] > 10 * entries["iw_k1"]["nfe"]["mean"]
    # one line per claim, every claim with a verdict
    assert [c["id"] for c in res["claims"]] == list(CLAIMS)
    for c in res["claims"]:
        assert c["verdict"]
    # the report is generated from the JSON alone and names every claim and figure
    md = (out / "results.md").read_text()
    assert md == render_results_md(res, "figures")
    for cid in CLAIMS:
        assert f"**{cid} — " in md
    for name in FIGURES.values():
        assert (out / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in md
    assert res["meta"]["command"] in md
    assert (out / "per_example.json").is_file()


@pytest.mark.slow
def test_render_docs(quick_run, tmp_path):
    out, path = quick_run
    md_path = render_docs(path, tmp_path / "docs")
    assert md_path.read_text() == (out / "results.md").read_text()
    assert json.loads((tmp_path / "docs" / "results.json").read_text()) == json.loads(
        path.read_text()
    )
    for name in FIGURES.values():
        assert (tmp_path / "docs" / "figures" / name).is_file()
    # the command line re-renders in place
    assert main(["ablate", "--render", str(tmp_path / "docs" / "results.json")]) == 0
    assert (tmp_path / "docs" / "results.md").read_text() == md_path.read_text()


def test_cli_needs_out_or_render(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--quick"])
    assert e.value.code == 2  # argparse's usage error, like every other missing argument
    err = capsys.readouterr().err
    assert err.startswith("idode: error: one of the arguments --out --render is required")
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    usage = capsys.readouterr().out
    for flag in ("--preset", "--out", "--steps", "--quick", "--workers", "--render", "--docs"):
        assert flag in usage, flag
