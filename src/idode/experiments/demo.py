"""``idode demo``: the whole method on a laptop CPU, on scikit-learn's digits (8x8, 17 levels).

Trains the ``digits_cpu`` preset (velocity parameterization, likelihood weighting, importance-
sampled gamma), evaluates test bits/dim through the ODE with all three dequantizations and the SDE
bound, draws samples, and writes ``report.md`` with a results table and figures.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import torch

from idode.stats import Z95

__all__ = ["run_demo", "DEMO_STEPS"]

DEMO_STEPS = 4000


def _fmt(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
) -> Path:
    """Train, evaluate and report; returns the path of report.md."""
    from idode.config import apply_overrides, get_preset
    from idode.data import load_dataset
    from idode.evaluate import evaluate
    from idode.rundir import write_json_atomic
    from idode.sampling import sample_to_files, save_image_grid
    from idode.train import train

    out = Path(out)
    t0 = time.time()
    steps = steps or (150 if quick else DEMO_STEPS)
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
    if quick:
        overrides += ["train.eval_every=50", "model.n_embd=16", "data.eval_examples=64"]
    cfg = apply_overrides(get_preset("digits_cpu"), overrides)
    max_examples = 24 if quick else None  # the whole 300-image test split otherwise

    print(f"[idode demo] training {cfg.preset} for {steps} steps into {out} ...", flush=True)
    if (out / "checkpoint").exists():
        from idode.checkpoint import load_checkpoint

        done = load_checkpoint(out).step
        res = train(cfg, out, resume=True, progress=progress) if done < steps else None
    else:
        res = train(cfg, out, progress=progress, overwrite=True)  # a run cut before its checkpoint
    t_train = time.time() - t0
    ckpt = out / "checkpoint"

    results = {}
    t1 = time.time()
    for deq in ("truncated_normal", "variational", "uniform"):
        print(f"[idode demo] evaluating test bits/dim, {deq} dequantization ...", flush=True)
        results[deq] = evaluate(
            ckpt,
            out / f"eval_{deq}",
            dequantization=deq,
            divergence="rademacher",
            # the paper's solver settings, fast on 2 cores; at 1e-5 a digit's bits/dim carries
            # a solver error of ~0.02 (the digits preset's 1e-7 protocol removes it, 5.5x NFE)
            rtol=1e-5,
            atol=1e-5,
            tolerance="paper",
            batch_size=cfg.eval.batch_size,
            max_examples=max_examples,
            with_elbo=deq == "truncated_normal",
            progress=progress,
            solver_check=3 if quick else None,  # the measured solver error; default max(8, 2 %)
        )
    t_eval = time.time() - t1

    print("[idode demo] sampling ...", flush=True)
    samples = sample_to_files(ckpt, out / "samples", 16 if quick else 64, progress=progress)
    test = load_dataset("digits", "test")
    save_image_grid(test.images[:64], test.num_levels, out / "real_digits.png", title="real")

    _figures(out, results)
    report = _report(cfg, results, samples, t_train, t_eval, time.time() - t0, quick, out)
    path = out / "report.md"
    path.write_text(report)
    write_json_atomic(
        out / "demo_results.json",
        {
            "results": results,
            "train_seconds": t_train,
            "eval_seconds": t_eval,
            "steps": steps,
            "quick": quick,
        },
    )
    print(f"[idode demo] done in {time.time() - t0:.0f} s. Report: {path.resolve()}", flush=True)
    del res
    return path


def _halfwidth(stat: dict) -> float:
    """Half the 95% interval of an eval.json summary (0 without one, n = 1)."""
    return 0.0 if stat["stderr"] is None else Z95 * stat["stderr"]


def _figures(out: Path, results: dict) -> None:
    """learning_curves.png and bpd_by_dequantization.png of the report."""
    from idode.experiments.figures import plot_bars, plot_learning_curves
    from idode.rundir import read_metrics

    metrics = read_metrics(out / "metrics.jsonl")
    entropy_ref = ("uniform over 17 levels (log2 17)", math.log2(17))
    plot_learning_curves(
        {
            "training loss (diffusion term)": metrics.get("train/loss_bpd", []),
            "held-out SDE bound (EMA)": metrics.get("eval/sde_bpd", []),
        },
        out / "learning_curves.png",
        title="digits: learning curves",
        reference=entropy_ref,
    )
    names = {
        "truncated_normal": "ODE, truncated normal",
        "variational": "ODE, variational",
        "uniform": "ODE, uniform (gamma=-11.8)",
    }
    labels, vals, errs = [], [], []
    for deq, r in results.items():
        labels.append(names[deq])
        vals.append(r["bpd"]["mean"])
        errs.append(_halfwidth(r["bpd"]))
    elbo = results["truncated_normal"]["elbo"]
    labels.append("SDE bound (ELBO)")
    vals.append(elbo["mean"])
    errs.append(_halfwidth(elbo))
    plot_bars(
        labels,
        vals,
        errs,
        out / "bpd_by_dequantization.png",
        title="digits test bits/dim (lower is better)",
        reference=entropy_ref,
    )


def _table_rows(results: dict) -> list[str]:
    """The results table: one row per ODE bound and one for the SDE bound."""
    tn, un, va = results["truncated_normal"], results["uniform"], results["variational"]
    elbo = tn["elbo"]
    rows = []
    for name, r, note in (
        ("ODE, truncated-normal dequantization (i-DODE)", tn, "training-free, starts at gamma_min"),
        ("ODE, variational (VDM decoder)", va, "training-free, with the discrete decoder"),
        ("ODE, uniform dequantization", un, "starts at gamma = -11.8 as in the paper's code"),
    ):
        b, se = r["bpd"], r["solver_error"]
        err = f"{_fmt(se['max_abs_bpd'], 4)} ({se['checked']})" if se["checked"] else "off"
        rows.append(
            f"| {name} | **{_fmt(b['mean'])}** | {_fmt(b['stderr'])} | "
            f"[{_fmt(b['ci95'][0])}, {_fmt(b['ci95'][1])}] | {err} | "
            f"{_fmt(r['nfe']['per_example_mean'], 0)} | {note} |"
        )
    rows.append(
        f"| SDE bound (VDM ELBO) | **{_fmt(elbo['mean'])}** | {_fmt(elbo['stderr'])} | "
        f"[{_fmt(elbo['ci95'][0])}, {_fmt(elbo['ci95'][1])}] | - | 1 | one MC sample of "
        f"gamma and eps per image |"
    )
    return rows


def _verdict(results: dict) -> str:
    """Whether truncated-normal beat uniform dequantization, with the 95% interval."""
    tn, un = results["truncated_normal"], results["uniform"]
    gap = un["bpd"]["mean"] - tn["bpd"]["mean"]
    gap_se = math.sqrt(un["bpd"]["stderr"] ** 2 + tn["bpd"]["stderr"] ** 2)
    if gap > Z95 * gap_se:
        return (
            f"**Truncated-normal dequantization gives a tighter bound than uniform "
            f"dequantization by {gap:.3f} bits/dim** (95% interval {gap - Z95 * gap_se:.3f}"
            f" .. {gap + Z95 * gap_se:.3f}), with no training: the paper's central "
            f"evaluation claim holds here."
        )
    else:
        return (
            f"Truncated-normal minus uniform = {-gap:.3f} +- {Z95 * gap_se:.3f} bits/dim "
            f"(95%): the paper's claim that truncated-normal is tighter does *not* hold "
            f"in this run."
        )


def _report(cfg, results, samples, t_train, t_eval, t_all, quick, out) -> str:
    """report.md: the results table, the verdict, figures and the setting."""
    n = results["truncated_normal"]["bpd"]["n"]
    rows = _table_rows(results)
    verdict = _verdict(results)
    from idode.dequantization import truncation_point
    from idode.schedules import make_schedule

    m = cfg.model
    tau = truncation_point(make_schedule(m.schedule, m.gamma_min, m.gamma_max), 17)
    quick_note = (
        "\n> This is a `--quick` smoke run: few steps, a tiny network, 24 test images. "
        "Run `idode demo` for the real numbers.\n"
        if quick
        else ""
    )
    return f"""# idode demo: i-DODE on scikit-learn digits
{quick_note}
A diffusion ODE trained for maximum likelihood on the 8x8 digits of scikit-learn (17 grey levels,
{n} test images), evaluated through the probability-flow ODE. Everything below was produced by
`idode demo` in {t_all / 60:.1f} minutes on {os.cpu_count()} CPU cores ({
        platform.processor() or platform.machine()
    }, torch {torch.__version__}): training {t_train / 60:.1f} min, evaluation
{t_eval / 60:.1f} min.

## Results (test split, bits/dim, lower is better)

| bound | bits/dim | std. error | 95% interval | solver error, max (jobs) | NFE / image | note |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Solver error: the largest |difference| in bits/dim between the evaluation's solve and a solve
100x tighter (network in float64, same noise and probe) over that many randomly chosen images;
it is not part of the 95% interval, which is the sampling error of the test images.

Reference: a model that ignores the data and spreads mass uniformly over the 17 levels scores
log2(17) = {math.log2(17):.3f} bits/dim.

{verdict}

Why the gap is this large on digits: the model is trained on x_gamma = alpha x0 + sigma eps for
gamma >= gamma_min = {m.gamma_min}, i.e. on Gaussian bumps of width sigma_min = 1.3e-3 around the 17
bin centres (bins are 2/17 = 0.118 wide). Uniform dequantization asks for the density at points
spread over the whole bin, where the model has put almost no mass; the truncated-normal
dequantization draws exactly the noise the model was trained on (here the truncation point
tau = {tau:.1f} standard deviations is so far out that it is a plain Gaussian). With 256 grey levels
the bins are 15 times narrower, tau = 3.02, and the gap shrinks accordingly; that is also why the
official code starts uniform dequantization later, at gamma = -11.8, where the model's density
within a bin is flatter.

![bits/dim by dequantization](bpd_by_dequantization.png)

## Learning curves

Training loss (the likelihood-weighted diffusion term, importance-sampled gamma, in bits/dim) and
the SDE bound on held-out digits with the EMA weights.

![learning curves](learning_curves.png)

## Samples (probability-flow ODE, rtol = atol = 1e-5) next to real test digits

| ODE samples ({samples.get("nfe", "?")} network evaluations) | real digits |
|---|---|
| ![samples](samples.png) | ![real](real_digits.png) |

## Setting

- Network: VDM ScoreUNet, width {m.n_embd}, {m.n_layers} blocks per side, dropout {m.dropout},
  Fourier features {"on" if m.fourier_features else "off"}; {m.schedule} schedule,
  gamma in [{m.gamma_min}, {m.gamma_max}], `{m.parameterization}` parameterization.
- Training: {cfg.train.steps} AdamW steps, batch {cfg.train.batch_size}, lr {cfg.train.lr},
  EMA {cfg.train.ema_decay}, importance-sampled gamma: {cfg.train.importance_sampling},
  antithetic: {cfg.train.antithetic}.
- Evaluation: EMA weights, RK45 (Dormand-Prince, per-example error control) at
  rtol = atol = 1e-5, one Rademacher probe per image, one dequantization draw per image (mean of
  bounds with the analytic entropy).
- Files: `checkpoint/` (safetensors + JSON), `metrics.jsonl`, `tb/` (TensorBoard),
  `eval_*/eval.json` and `per_example.jsonl`, `samples.npz`, `demo_results.json`.
- Reproduce: `idode demo --out {out}`; re-evaluate with e.g.
  `idode eval --checkpoint {out}/checkpoint --dequantization uniform`.
"""
