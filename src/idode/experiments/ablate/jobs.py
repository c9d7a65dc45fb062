"""The ablation's jobs: module-level functions of picklable arguments that run in worker processes
(one thread each), their typed results, and the plan that cuts the grid into jobs.

Every evaluation draws its noise from per-example generators (``idode.rng.example_generators``)
seeded by the evaluation seed and the image's position in the held-out set, so all models see the
same noise on the same image and a result does not depend on the chunking or the workers.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from idode.experiments.ablate.grid import (
    FT1,
    FT2,
    RUNS,
    AblationSettings,
    finetune_run_config,
    run_config,
)
from idode.experiments.ablate.scheduler import Job
from idode.protocol import Protocol
from idode.stats import bootstrap, percentile_interval

__all__ = [
    "FinetuneOutcome",
    "OdeOutcome",
    "Ratio",
    "SamplerVariance",
    "TrainOutcome",
    "VarianceOutcome",
    "init_worker",
    "plan",
]


@dataclass
class TrainOutcome:
    """A training run: the per-image held-out SDE bound (bits/dim) after every segment."""

    steps: list[int]  # the step after each segment
    sde: np.ndarray  # [segments, n] float64
    train_s: float
    s_per_step: float
    train_loss: list[tuple[int, float]]  # (step, training loss in bits/dim)
    train_grad_norm: list[tuple[int, float]]
    final_metrics: dict[str, float]


@dataclass
class FinetuneOutcome:
    """A continuation from a checkpoint (second order if lambda_2 > 0), timed per step."""

    step: int
    extra_steps: int
    train_s: float
    s_per_step: float
    sde: np.ndarray  # [n] float64, held-out SDE bound of the EMA weights
    final_metrics: dict[str, float]


@dataclass
class OdeOutcome:
    """The per-draw terms (nats) of the ODE bounds of the images at ``positions``, [n, K] each,
    and the NFE an example needed alone per draw; ``collect`` makes bounds of them."""

    positions: np.ndarray  # [n] int
    log_p_model: np.ndarray  # [n, K] float64, log p_ODE(z_k)
    log_decoder: np.ndarray  # [n, K] float64, log p(k | z_k)
    log_q: np.ndarray  # [n, K] float64, log q(z_k | k)
    expected_log_q: np.ndarray  # [n] float64, E_q[log q]
    nfe: np.ndarray  # [n, K]
    num_dims: int
    batched_nfe: int = 0


@dataclass
class SamplerVariance:
    """Per-batch loss (bits/dim) and gradient statistics of one gamma sampler."""

    loss: list[float]
    grad_norm: list[float]
    loss_mean: float
    loss_var: float
    grad_norm_var: float
    grad_trace_var: float  # tr Cov(grad)


@dataclass
class Ratio:
    """A ratio with its paired-bootstrap 95% interval."""

    ratio: float
    ci95: list[float]


@dataclass
class VarianceOutcome:
    """Importance-sampled vs uniform gamma at fixed parameters (results.json's layout)."""

    num_params: int
    batches: int
    batch_size: int
    importance: SamplerVariance
    uniform: SamplerVariance
    ratio_uniform_over_importance: dict[str, Ratio] = field(default_factory=dict)
    loss_mean_uniform_minus_importance: dict[str, Any] = field(default_factory=dict)


def init_worker() -> None:
    """Worker process setup: one torch thread, no progress bars."""
    import torch

    torch.set_num_threads(1)
    os.environ["IDODE_NO_PROGRESS"] = "1"


def _eval_set(cfg) -> tuple[Any, int]:
    """The held-out images of the curves and of every ODE evaluation: subset(test, n, seed 0),
    the same images as the periodic evaluation of ``idode.train``."""
    from idode.data import held_out_subset

    ds = held_out_subset(cfg.data)
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


def job_train(cfg_dict: dict, run_dir: str, boundaries: list[int], curve: dict) -> TrainOutcome:
    """Train one run in segments; after each, the per-image held-out SDE bound of the EMA."""
    from idode.config import config_from_dict
    from idode.rundir import read_metrics
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
    return TrainOutcome(
        steps=steps,
        sde=np.stack(sde),
        train_s=train_s,
        s_per_step=train_s / max(done, 1),
        train_loss=m.get("train/loss_bpd", []),
        train_grad_norm=m.get("train/grad_norm", []),
        final_metrics=res.metrics if res is not None else {},
    )


def job_finetune(cfg_dict: dict, init_from: str, run_dir: str, curve: dict) -> FinetuneOutcome:
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
    return FinetuneOutcome(
        step=res.step,
        extra_steps=extra,
        train_s=wall,
        s_per_step=wall / max(extra, 1),
        sde=sde,
        final_metrics=res.metrics,
    )


def job_ode(checkpoint: str, positions: list[int], protocol: Protocol) -> OdeOutcome:
    """The per-draw terms of the ODE bounds of the images at ``positions`` of the evaluation set,
    under ``protocol`` (its seed's per-example streams: the same noise for every model)."""
    from idode.checkpoint import load_model
    from idode.likelihood import bits_per_dim
    from idode.solvers import nfe_of_steps

    model, ck = load_model(checkpoint)
    x, levels = _eval_set(ck.config)
    gens = protocol.generators(positions)
    r = bits_per_dim(model, x[positions], levels, protocol=protocol, generator=gens)
    return OdeOutcome(
        positions=np.asarray(positions),
        log_p_model=r.log_p_model.numpy(),
        log_decoder=r.log_decoder.numpy(),
        log_q=r.log_q.numpy(),
        expected_log_q=r.expected_log_q.numpy(),
        nfe=nfe_of_steps(r.steps).numpy(),  # per example and draw
        num_dims=r.num_dims,
        batched_nfe=r.nfe,
    )


def trace_cov(gram: np.ndarray, idx: np.ndarray) -> float:
    """tr Cov of the gradients indexed by ``idx`` (with repeats), from their Gram matrix."""
    n = len(idx)
    sub = gram[np.ix_(idx, idx)]
    return float((np.trace(sub) - sub.sum() / n) / (n - 1))


def _sampler_stats(model, params, x_all, levels, d, batches, seed, importance, antithetic, bs):
    """Per-batch loss [batches], gradient norms [batches] and the Gram matrix of the centred
    gradients [batches, batches] (float64) of one gamma sampler."""
    import torch

    from idode.dequantization import bin_centers, nats_to_bits_per_dim
    from idode.losses import diffusion_loss_terms
    from idode.rng import stream

    n_params = sum(p.numel() for p in params)
    losses, grads = np.empty(batches), torch.empty(batches, n_params)
    for m in range(batches):
        g = stream(seed, "variance_batch", m)
        x = bin_centers(x_all[torch.randperm(len(x_all), generator=g)[:bs]], levels)
        terms = diffusion_loss_terms(
            model, x, importance_sampling=importance, antithetic=antithetic, generator=g
        )
        loss = nats_to_bits_per_dim(terms.loss.mean(), d)  # the training loss in bits/dim
        grads[m] = torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])
        losses[m] = loss.detach().item()
    norms = grads.norm(dim=1).double().numpy()
    # Gram matrix of the centred gradients in float64, by column blocks (no cancellation)
    grads -= grads.mean(0, dtype=torch.float64).float()
    gram = np.zeros((batches, batches))
    for c in range(0, n_params, 16384):
        blk = grads[:, c : c + 16384].double()
        gram += (blk @ blk.T).numpy()
    return losses, norms, gram


def job_variance(
    cfg_dict: dict, checkpoint: str | None, batches: int, seed: int, boot: int
) -> VarianceOutcome:
    """Per-batch loss and gradient with importance-sampled and with uniform gamma, at fixed
    parameters (raw weights, dropout off), on the same data batches and the same quantiles."""
    import torch

    from idode.checkpoint import load_model
    from idode.config import config_from_dict
    from idode.data import dataset_from_config
    from idode.experiments.ablate.summary import stat
    from idode.model import build_model

    cfg = config_from_dict(cfg_dict)
    dc = cfg.data
    ds = dataset_from_config(dc, "train")
    x_all, levels = ds.as_tensor(), ds.num_levels
    if checkpoint is None:
        torch.manual_seed(cfg.train.seed)  # the initial weights of every training run
        model = build_model(cfg, ds.shape, levels)
    else:
        model, _ = load_model(checkpoint, ema=False)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    bs = cfg.train.batch_size
    data, per = {}, {}
    for label, importance in (("importance", True), ("uniform", False)):
        args = (levels, ds.num_dims, batches, seed, importance, cfg.train.antithetic, bs)
        losses, norms, gram = _sampler_stats(model, params, x_all, *args)
        data[label] = (losses, norms, gram)
        per[label] = SamplerVariance(
            loss=losses.tolist(),
            grad_norm=norms.tolist(),
            loss_mean=float(losses.mean()),
            loss_var=float(losses.var(ddof=1)),
            grad_norm_var=float(norms.var(ddof=1)),
            grad_trace_var=float(trace_cov(gram, np.arange(batches))),
        )
    (lu, nu, gu), (li, ni, gi) = data["uniform"], data["importance"]

    def ratios(idx: np.ndarray) -> tuple[float, float, float]:
        return (
            lu[idx].var(ddof=1) / li[idx].var(ddof=1),
            nu[idx].var(ddof=1) / ni[idx].var(ddof=1),
            trace_cov(gu, idx) / trace_cov(gi, idx),
        )

    # a paired bootstrap over batches: the same resampled batches for both samplers
    boots = bootstrap(ratios, batches, boot, seed)
    u, i = per["uniform"], per["importance"]
    point = {
        "loss_var": u.loss_var / i.loss_var,
        "grad_norm_var": u.grad_norm_var / i.grad_norm_var,
        "grad_trace_var": u.grad_trace_var / i.grad_trace_var,
    }
    return VarianceOutcome(
        num_params=sum(p.numel() for p in params),
        batches=batches,
        batch_size=bs,
        importance=i,
        uniform=u,
        ratio_uniform_over_importance={
            k: Ratio(ratio=v, ci95=list(percentile_interval(boots[:, c])))
            for c, (k, v) in enumerate(point.items())
        },
        loss_mean_uniform_minus_importance=stat(lu - li),
    )


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def plan(settings: AblationSettings, out: Path) -> list[Job]:
    """The grid as jobs: training runs, finetuning, variance, ODE chunks, dequantization chunks."""
    from idode.config import config_to_dict

    runs_dir = out / "runs"
    s = settings
    curve = {"draws": s.curve_draws, "seed": s.seed + 1, "batch": 500}
    bounds = [round(s.steps * (i + 1) / s.segments) for i in range(s.segments)]
    jobs: list[Job] = []
    for name in RUNS:
        cfg = config_to_dict(run_config(s, name))
        # velocity_is is on the critical path (finetuning, variance, dequantization wait for it)
        cost = s.steps * (0.2 if name == "velocity_is" else 0.1)
        args = (cfg, str(runs_dir / name), bounds, curve)
        jobs.append(Job(f"train/{name}", job_train, args, (), cost, "train", name))
    ft_curve = {**curve, "from_step": s.steps}
    base_ckpt = str(runs_dir / "velocity_is")
    base = ("train/velocity_is",)
    for name, weight, per_step in ((FT2, s.second_order_weight, 0.25), (FT1, 0.0, 0.1)):
        cfg = config_to_dict(finetune_run_config(s, weight))
        args = (cfg, base_ckpt, str(runs_dir / name), ft_curve)
        cost = per_step * s.finetune_steps
        jobs.append(Job(f"finetune/{name}", job_finetune, args, base, cost, "finetune", name))
    vis_cfg = config_to_dict(run_config(s, "velocity_is"))
    for label, ckpt, deps in (("init", None, ()), ("trained", base_ckpt, base)):
        args = (vis_cfg, ckpt, s.variance_batches, s.seed + 2, s.bootstrap)
        cost = 0.3 * s.variance_batches
        jobs.append(Job(f"variance/{label}", job_variance, args, deps, cost, "variance", label))
    for name in [*RUNS, FT2, FT1]:
        dep = f"train/{name}" if name in RUNS else f"finetune/{name}"
        for pos in _chunks(s.ode_examples, s.ode_chunk):
            args = (str(runs_dir / name), pos, s.protocol("truncated_normal", 1))
            cost = 0.25 * len(pos)
            jobs.append(Job(f"ode/{name}/{pos[0]}", job_ode, args, (dep,), cost, "ode", name))
    for deq, k in (("uniform", 1), ("variational", 1), ("truncated_normal", s.k_max)):
        for pos in _chunks(s.deq_examples, s.deq_chunk):
            args = (base_ckpt, pos, s.protocol(deq, k))
            cost = 0.3 * len(pos) * k
            key = f"deq/{deq}/{pos[0]}"
            jobs.append(Job(key, job_ode, args, base, cost, "dequantization", deq))
    return jobs
