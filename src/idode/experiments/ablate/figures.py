"""The figures of the ablation report, drawn from a loaded results.json alone."""

from __future__ import annotations

import os
from pathlib import Path

from idode.experiments.ablate.grid import DEQ_LABELS, FT1, FT2, RUN_LABELS
from idode.experiments.figures import new_figure, plot_bars, plot_learning_curves, save_figure
from idode.stats import Z95

__all__ = ["FIGURES", "make_figures"]


def _halfwidth(stat: dict) -> float:
    """Half the 95% interval of a results.json summary (0 when it has none, n = 1)."""
    return 0.0 if stat["stderr"] is None else Z95 * stat["stderr"]


FIGURES = {
    "learning_curves": "learning_curves.png",
    "curve_differences": "curve_differences.png",
    "train_loss": "train_loss.png",
    "ode_bpd": "ode_bpd.png",
    "variance": "variance.png",
    "finetune": "finetune.png",
    "dequantization": "dequantization.png",
}


def make_figures(results: dict, fig_dir: str | os.PathLike) -> list[Path]:
    """Every figure of the report, drawn from ``results`` (a loaded results.json)."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    paths = []
    curves = {
        RUN_LABELS[n]: list(zip(r["curve"]["steps"], r["curve"]["mean"], strict=True))
        for n, r in runs.items()
    }
    paths.append(
        plot_learning_curves(
            curves,
            fig_dir / FIGURES["learning_curves"],
            title="held-out SDE bound (EMA weights), same seed and data order",
        )
    )
    paths.append(
        plot_learning_curves(
            {RUN_LABELS[n]: [tuple(p) for p in r["train_loss"]] for n, r in runs.items()},
            fig_dir / FIGURES["train_loss"],
            title="training loss (one batch per point)",
        )
    )
    paths.append(_plot_differences(results, fig_dir / FIGURES["curve_differences"]))
    ode = results["ode"]
    names = list(ode)
    paths.append(
        plot_bars(
            names,
            [ode[n]["bpd"]["mean"] for n in names],
            [_halfwidth(ode[n]["bpd"]) for n in names],
            fig_dir / FIGURES["ode_bpd"],
            title="test ODE bits/dim (truncated normal, K=1), 95% intervals",
        )
    )
    paths.append(_plot_variance(results, fig_dir / FIGURES["variance"]))
    paths.append(_plot_finetune(results, fig_dir / FIGURES["finetune"]))
    deq = results["dequantization"]["entries"]
    keys = [k for k in deq if k != "tn_k1_first_draw"]
    paths.append(
        plot_bars(
            [DEQ_LABELS.get(k, k) for k in keys],
            [deq[k]["bpd"]["mean"] for k in keys],
            [_halfwidth(deq[k]["bpd"]) for k in keys],
            fig_dir / FIGURES["dequantization"],
            title="dequantization bounds on velocity_is (lower is tighter)",
        )
    )
    return paths


def _plot_differences(results: dict, path: Path) -> Path:
    fig, ax = new_figure()
    pairs = [
        (results["parameterization"]["velocity_vs_eps_is"], "eps_is - velocity_is"),
        (results["parameterization"]["velocity_vs_eps_uniform"], "eps_unif - velocity_unif"),
        (results["time_sampling"]["velocity_is_vs_uniform"], "velocity_unif - velocity_is"),
        (results["time_sampling"]["eps_is_vs_uniform"], "eps_unif - eps_is"),
        (results["schedule"]["vp_vs_sp"], "SP - VP (velocity_is)"),
    ]
    for cmp_, label in pairs:
        xs = cmp_["steps"]
        m = [p["mean"] for p in cmp_["per_step"]]
        lo = [p["mean"] - _halfwidth(p) for p in cmp_["per_step"]]
        hi = [p["mean"] + _halfwidth(p) for p in cmp_["per_step"]]
        (line,) = ax.plot(xs, m, marker="o", ms=3, label=label)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("paired difference of SDE bound (bits/dim)")
    ax.set_title("> 0: the second run of each pair is better (95% bands)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_variance(results: dict, path: Path) -> Path:
    fig, ax = new_figure()
    kinds = [
        ("loss_var", "per-batch loss"),
        ("grad_norm_var", "grad norm"),
        ("grad_trace_var", "tr Cov(grad)"),
    ]
    width = 0.38
    for i, label in enumerate(("init", "trained")):
        ratios = results["variance"][label]["ratio_uniform_over_importance"]
        xs = [k + (i - 0.5) * width for k in range(len(kinds))]
        vals = [ratios[k]["ratio"] for k, _ in kinds]
        lo = [ratios[k]["ratio"] - ratios[k]["ci95"][0] for k, _ in kinds]
        hi = [ratios[k]["ci95"][1] - ratios[k]["ratio"] for k, _ in kinds]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=4, label=f"{label} weights")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(kinds)), [n for _, n in kinds])
    ax.set_ylabel("variance ratio uniform / IS (log scale)")
    ax.set_title("> 1: importance sampling has the lower variance (95% bootstrap)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_finetune(results: dict, path: Path) -> Path:
    ode = results["ode"]
    names = [("velocity_is", "base"), (FT1, "+ first order"), (FT2, "+ second order")]
    fig, axes = new_figure(2, figsize=(8.0, 3.6))
    for ax, key, ylabel in ((axes[0], "bpd", "ODE bits/dim (TN)"), (axes[1], "nfe", "NFE / image")):
        vals = [ode[n][key]["mean"] for n, _ in names]
        errs = [_halfwidth(ode[n][key]) for n, _ in names]
        ax.bar(range(3), vals, yerr=errs, capsize=4, color=["#999999", "#4C72B0", "#DD8452"])
        ax.set_xticks(range(3), [lab for _, lab in names], fontsize=8)
        ax.set_ylabel(ylabel)
        lo = min(v - e for v, e in zip(vals, errs, strict=True))
        hi = max(v + e for v, e in zip(vals, errs, strict=True))
        pad = 0.5 * (hi - lo) + 1e-9
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{results['finetune']['extra_steps']} extra steps from step "
        f"{results['finetune']['from_step']} (95% intervals)",
        fontsize=9,
    )
    return save_figure(fig, path)
