"""The training loop: first-order i-DODE training and second-order finetuning, resumable, DDP-ready.

One process per device; under ``torchrun`` each rank trains on its own shard with
DistributedDataParallel (NCCL on GPU, Gloo on CPU). Optimizer: AdamW(0.9, 0.99, eps 1e-8) with
decoupled weight decay on every parameter not named *bias, linear warm-up from 1e-8, EMA of the
weights after every optimizer step (method.md §8.2). The loss is the per-example objective of
``idode.losses`` averaged over the batch and divided by d ln 2 (bits/dim, §3.3).

Run safety (``idode.runguard``): a fresh start into an earlier run's folder is refused unless
``overwrite``; a resume falls back past a damaged newest checkpoint (saying so), drops the
metrics rows of the redone steps, and removes interrupted checkpoint writes; SIGINT / SIGTERM end
the current step, write a checkpoint and raise ``TrainingStopped``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from idode.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    find_checkpoint,
    load_checkpoint,
    load_newest_intact,
    save_checkpoint,
)
from idode.config import Config, ConfigError, config_differences, dumps
from idode.data import augment_batch, dataset_from_config, held_out_subset, make_loader
from idode.dequantization import bin_centers, nats_to_bits_per_dim
from idode.distributed import DistEnv, all_gather, broadcast, dist_env, progress_bar, setup
from idode.likelihood import elbo
from idode.losses import diffusion_loss_terms
from idode.model import build_model
from idode.parameterization import DiffusionODE
from idode.rng import example_generators, stream_seed
from idode.rundir import MetricsLog, jsonable
from idode.runguard import StopSignals, absolute_data_paths, prepare_run_dir, trim_metrics

__all__ = ["TrainingDiverged", "TrainingStopped", "TrainResult", "train", "DistEnv", "dist_env"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


class TrainingStopped(RuntimeError):
    """SIGINT or SIGTERM stopped training after writing a checkpoint; resume continues exactly."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}; "
            f"continue with --resume"
        )


# --------------------------------------------------------------------------------------------------
# the pieces of a run
# --------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter whose name does not end in 'bias' (§8.2)."""
    t = cfg.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up from 1e-8 to lr over warmup_steps, then constant (method.md §8.2)."""
    t = cfg.train
    if t.warmup_steps <= 0:
        return t.lr
    return 1e-8 + (t.lr - 1e-8) * min(1.0, step / t.warmup_steps)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- ema + (1 - decay)(theta - ema), no bias correction (§8.2)."""
    ema_p = [p for p in ema.parameters()]
    cur_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    state = {"train": gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], gen: torch.Generator, device: torch.device) -> None:
    gen.set_state(state["train"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainResult:
    """What a call of ``train`` leaves: where, how far, the newest checkpoint, the last metrics."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float]  # the last logged training metrics and evaluations
    model: DiffusionODE | None = None  # this rank's trained model (raw weights), in memory
    ema: DiffusionODE | None = None  # this rank's EMA model


# --------------------------------------------------------------------------------------------------
# evaluation during training (EMA weights, the config's evaluation protocol)
# --------------------------------------------------------------------------------------------------


def periodic_eval(
    model: DiffusionODE,
    x_eval: Tensor,
    num_levels: int,
    cfg: Config,
    *,
    ode: bool,
    step: int,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """SDE bound on the held-out subset; ODE bits/dim (``cfg.eval``'s protocol) on its first images.

    Sharded: rank r takes images r, r + W, ...; every example draws its noise from its own
    stream, so the numbers do not depend on W. The one collective comes after the solves. The ODE
    numbers use the same streams as ``idode eval`` with the same seed.
    """
    env = env or DistEnv()
    ev = cfg.eval
    dev = next(model.parameters()).device
    x = x_eval.to(dev)
    mine = torch.arange(len(x))[env.rank :: env.world_size]
    sde: list[Tensor] = []
    for s in range(0, len(mine), ev.batch_size):
        j = mine[s : s + ev.batch_size]
        gens = example_generators(ev.seed, j, dev, purpose=f"periodic_elbo/{step}")
        sde.append(elbo(model, x[j], num_levels, antithetic=False, generator=gens).bpd.cpu())
    ode_bpd, ode_nfe, ode_err = torch.zeros(0), torch.zeros(0), torch.zeros(0)
    n_ode = min(cfg.data.ode_eval_examples, len(x))
    j = mine[mine < n_ode] if ode else mine[:0]
    if len(j):  # the batch function of ``idode eval``: same protocol, same streams
        from idode.evaluate import evaluate_stream

        stream = evaluate_stream(model, x, j.tolist(), dev, num_levels, ev, with_elbo=False)
        rows = [row for group in stream for row in group]
        ode_bpd = torch.tensor([r["bpd"] for r in rows], dtype=torch.float64)
        ode_nfe = torch.tensor([float(r["nfe"]) for r in rows], dtype=torch.float64)
        ode_err = _solver_check(model, x, rows, num_levels, ev, n_ode, dev)
    parts = all_gather((torch.cat(sde) if sde else torch.zeros(0), ode_bpd, ode_nfe, ode_err), env)
    out = {"eval/sde_bpd": float(torch.cat([p[0] for p in parts]).double().mean())}
    if ode:
        name = {"truncated_normal": "tn"}.get(ev.dequantization, ev.dequantization)
        out[f"eval/ode_bpd_{name}"] = float(torch.cat([p[1] for p in parts]).mean())
        out["eval/ode_nfe"] = float(torch.cat([p[2] for p in parts]).mean())
        err = torch.cat([p[3] for p in parts]).abs()
        if len(err):  # measured: jobs solved again 100x tighter (idode.certify)
            out["eval/ode_solver_error_max"] = float(err.max())
            out["eval/ode_solver_error_mean"] = float(err.mean())
    return out


def _solver_check(model, x, rows, num_levels, ev, num_examples: int, dev) -> Tensor:
    """This rank's share of the check of ``idode eval``'s default size: [m] eval - reference."""
    from idode.certify import Tolerances, check_rows

    tols = Tolerances(ev.rtol, ev.atol, ev.tolerance, ev.logp_atol)
    rep = check_rows(
        model, x, rows, num_levels, ev.dequantization, ev.num_samples, ev.divergence, tols,
        seed=ev.seed, num_examples=num_examples, batch_size=ev.batch_size, device=dev,
    )  # fmt: skip
    return torch.tensor([r["diff_bpd"] for r in rep.jobs], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# the run: set-up, one optimizer step, checkpoints, the loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one rank's training run holds."""

    cfg: Config
    run_dir: Path
    env: DistEnv
    device: torch.device
    dataset_info: dict
    shape: tuple[int, ...]
    num_levels: int
    x_eval: Tensor  # held-out integer images for the periodic evaluations
    loader: object
    model: DiffusionODE  # raw weights
    ema: DiffusionODE
    train_model: DiffusionODE  # the same parameters, run through DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # all training noise of this rank
    step: int = 0
    last_ckpt: Path | None = None
    stop: StopSignals | None = None  # SIGINT / SIGTERM seen by this rank
    stopping: int = 0  # the signal every rank agreed to stop on at the last step (0: none)


def _setup(cfg: Config, run_dir: Path, env: DistEnv, device: torch.device) -> _Run:
    """Data, model, EMA and optimizer of a fresh run (step 0) on a set-up process group."""
    t, dc = cfg.train, cfg.data
    if t.precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision=bf16 is for CUDA devices; use fp32 on the CPU")
    per_rank, rem = divmod(t.batch_size, env.world_size * t.grad_accum)
    if rem or per_rank < 1:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a positive multiple of world_size x "
            f"grad_accum = {env.world_size} x {t.grad_accum}"
        )
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    env.barrier()
    # data: integer images; the scaling to [-1, 1] is bin_centers, in one place
    train_ds = dataset_from_config(dc, "train", max_examples=dc.max_train_examples)
    eval_ds = held_out_subset(dc)
    loader = make_loader(
        train_ds,
        per_rank,
        shuffle=True,
        seed=t.seed,
        drop_last=True,
        rank=env.rank,
        world_size=env.world_size,
        infinite=True,
    )
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg, train_ds.shape, train_ds.num_levels).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(t.seed, "train", env.rank))
    torch.manual_seed(stream_seed(t.seed, "dropout", env.rank))  # a different stream per rank
    net: nn.Module = torch.compile(model.net) if t.compile else model.net
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(
        cfg,
        run_dir,
        env,
        device,
        {"name": train_ds.name, **jsonable(train_ds.info)},
        train_ds.shape,
        train_ds.num_levels,
        eval_ds.as_tensor(),
        loader,
        model,
        ema,
        DiffusionODE(net, model.schedule, model.parameterization),
        make_optimizer(model, cfg),
        gen,
    )


def _restore(run: _Run, ck: LoadedCheckpoint, resume: bool) -> None:
    """Weights, EMA, optimizer and step from ``ck``; with ``resume`` also data position and RNG."""
    if tuple(ck.data_shape) != tuple(run.shape) or ck.num_levels != run.num_levels:
        diff = config_differences(ck.config, run.cfg, ("data",))
        raise CheckpointError(
            f"checkpoint {ck.path} was trained on images {list(ck.data_shape)} with "
            f"{ck.num_levels} levels, but this run's data has {list(run.shape)} with "
            f"{run.num_levels}; "
            + (f"settings that differ: {'; '.join(diff)}; " if diff else "")
            + "use the checkpoint's dataset"
        )
    ck.load_into(run.model, "model", run.cfg)
    ck.load_into(run.ema, "ema", run.cfg)
    if resume or not ck.meta["extra"].get("converted_from"):
        ck.load_optimizer(run.optimizer)
    # else: a converted official checkpoint has no optimizer state: fresh AdamW moments
    run.step = ck.step
    if not resume:
        return
    if ck.world_size != run.env.world_size:
        raise ConfigError(
            f"{ck.path} was written by {ck.world_size} process(es) but this run has "
            f"{run.env.world_size}: resume with the same number of processes to reproduce the "
            f"interrupted run exactly, or continue with `idode finetune --from {ck.path} "
            f"--weight 0` on any number"
        )
    run.loader.load_state_dict(ck.loader_states[run.env.rank])
    _set_rng_state(ck.section(f"rng/rank{run.env.rank}"), run.gen, run.device)
    run.last_ckpt = ck.path


def _optimizer_step(run: _Run, batches: Iterator[Tensor]) -> tuple[Tensor, float, float]:
    """One optimizer step over grad_accum micro-batches: ([loss, first, second] bits/dim, lr, |g|).

    Stops with TrainingDiverged before touching the weights if the loss is not finite.
    """
    t, env, dev = run.cfg.train, run.env, run.device
    lr = learning_rate(run.step, run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    d = math.prod(run.shape)
    stats = torch.zeros(3, device=dev)  # loss, first-order, second-order (bits/dim)
    for micro in range(t.grad_accum):
        x_int = next(batches).to(dev, non_blocking=True)
        kw = None
        if run.cfg.data.augment:
            x_int, cond = augment_batch(x_int, run.gen)
            kw = {"conditioning": cond.to(dev)}
        sync = not env.distributed or micro == t.grad_accum - 1
        with contextlib.nullcontext() if sync else run.train_model.net.no_sync():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                terms = diffusion_loss_terms(
                    run.train_model,
                    bin_centers(x_int, run.num_levels, validate=False),  # checked at load: no sync
                    importance_sampling=t.importance_sampling,
                    second_order_weight=t.second_order_weight,
                    antithetic=t.antithetic,
                    hutchinson=t.hutchinson,
                    generator=run.gen,
                    net_kwargs=kw,
                    validate=False,
                )
            loss = nats_to_bits_per_dim(terms.loss.float().mean(), d)
            (loss / t.grad_accum).backward()
        parts = (
            loss,
            nats_to_bits_per_dim(terms.first_order.float().mean(), d),
            nats_to_bits_per_dim(terms.second_order.float().mean(), d),
        )
        stats += torch.stack([p.detach() for p in parts])
    stats /= t.grad_accum
    signum = run.stop.received if run.stop is not None else 0
    run.stopping = signum
    if env.distributed:  # every rank learns whether any rank got a signal, in the same reduce
        flags = torch.cat([stats, torch.tensor([float(signum > 0)], device=dev)])
        torch.distributed.all_reduce(flags)
        stats = flags[:3] / env.world_size
        run.stopping = (signum or signal.SIGTERM) if float(flags[3]) > 0 else 0
    if not math.isfinite(float(stats[0])):
        where = str(run.last_ckpt) if run.last_ckpt else "none yet"
        raise TrainingDiverged(
            f"loss is {float(stats[0])} at step {run.step + 1}; stopped before updating the "
            f"weights. Last good checkpoint: {where} (resume with --resume after lowering "
            f"train.lr or setting train.grad_clip)"
        )
    max_norm = t.grad_clip if t.grad_clip is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm))
    run.optimizer.step()
    ema_update(run.ema, run.model, t.ema_decay)
    run.step += 1
    return stats, lr, grad_norm


def _checkpoint(run: _Run, metrics: dict[str, float]) -> Path | None:
    """Every rank's RNG and loader state gathered; rank 0 writes the checkpoint atomically."""
    states = all_gather((_rng_state(run.gen, run.device), run.loader.state_dict()), run.env)
    path = None
    if run.env.is_main:
        rng = {f"rank{r}/{k}": v for r, (s, _) in enumerate(states) for k, v in s.items()}
        path = save_checkpoint(
            run.run_dir,
            step=run.step,
            cfg=run.cfg,
            model=run.model,
            ema=run.ema,
            optimizer=run.optimizer,
            rng=rng,
            keep=run.cfg.train.keep_checkpoints,
            extra={
                "loader": [ls for _, ls in states],
                "data_shape": list(run.shape),
                "num_levels": run.num_levels,
                "world_size": run.env.world_size,
                "dataset": run.dataset_info,
                "metrics": metrics,
            },
        )
    run.env.barrier()
    return path


def _begin(
    cfg: Config, run_dir: Path, resume: bool, init_from, overwrite: bool
) -> tuple[_Run, LoadedCheckpoint | None]:
    """Check the run folder (rank 0), load the checkpoint to start from, set up the run."""
    env, device = setup(cfg.train.device)
    err = None
    if env.is_main:
        try:
            prepare_run_dir(run_dir, resume=resume, init_from=init_from, overwrite=overwrite)
        except ConfigError as e:
            err = e
    err = broadcast(err, env)  # every rank raises rank 0's verdict together
    if err is not None:
        raise err
    ck = None
    if resume:
        ck, refused = load_newest_intact(run_dir)
        for bad, why in refused if env.is_main else []:
            print(
                f"idode: warning: not resuming from {bad}: {why}\n"
                f"idode: warning: resuming from the newest intact checkpoint, {ck.path} "
                f"(step {ck.step})",
                file=sys.stderr,
                flush=True,
            )
    elif init_from is not None:
        ck = load_checkpoint(find_checkpoint(init_from))
    run = _setup(cfg, run_dir, env, device)
    if ck is not None:
        _restore(run, ck, resume)
    if resume and env.is_main:
        trim_metrics(run_dir, ck.step)  # the steps after the checkpoint are redone
    return run, ck


def train(
    cfg: Config,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train (or finetune) per ``cfg`` into ``run_dir``.

    resume: continue from ``run_dir``'s newest intact checkpoint (weights, EMA, optimizer, step,
        RNG and data position), reproducing the uninterrupted run; a damaged newer checkpoint is
        named on stderr and skipped.
    init_from: start from another run's checkpoint, restoring weights, EMA, optimizer and step
        (second-order finetuning, method.md §5.3).
    stop_after: end after this many optimizer steps in this call (checkpointing there), as if
        the run were interrupted; for tests and time-boxed jobs.
    overwrite: a fresh start (no ``resume``) into a folder holding an earlier run deletes that
        run's files (checkpoints, metrics, TensorBoard, config) instead of refusing.

    SIGINT / SIGTERM (in the main thread) end the current step, write a checkpoint and raise
    ``TrainingStopped``; a second signal acts at once. ``data.root`` and ``data.path`` are
    stored absolute.
    """
    cfg = absolute_data_paths(cfg.validate())
    run, ck = _begin(cfg, Path(run_dir), resume, init_from, overwrite)
    t, env = cfg.train, run.env
    if env.is_main:
        (run.run_dir / "config.json").write_text(dumps(cfg) + "\n")
    log = MetricsLog(run.run_dir, env.is_main, purge_step=ck.step + 1 if resume else None)
    bar = progress_bar(t.steps, "train", env=env, initial=run.step, enabled=progress)
    last: dict[str, float] = {}
    end = t.steps if stop_after is None else min(t.steps, run.step + stop_after)
    batches = iter(run.loader)
    tic, tic_step = time.perf_counter(), run.step
    run.model.train()
    run.stop = StopSignals(announce=env.is_main)
    try:
        with run.stop.active():
            while run.step < end:
                stats, lr, grad_norm = _optimizer_step(run, batches)
                step = run.step
                if not env.distributed:  # one process: a signal during this step counts too
                    run.stopping = run.stop.received
                if step % t.log_every == 0 or step == end or run.stopping:
                    now = time.perf_counter()
                    rate, tic, tic_step = (step - tic_step) / max(now - tic, 1e-9), now, step
                    names = ("train/loss_bpd", "train/first_order_bpd", "train/second_order_bpd")
                    last = dict(zip(names, stats.tolist(), strict=True))
                    last.update(
                        {"train/grad_norm": grad_norm, "train/lr": lr, "train/steps_per_s": rate}
                    )
                    log.write(step, **last)
                    if bar is not None:
                        bar.set_postfix(loss_bpd=f"{last['train/loss_bpd']:.3f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                ev_sde = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
                ev_ode = t.ode_eval_every > 0 and (step % t.ode_eval_every == 0 or step == t.steps)
                if (ev_sde or ev_ode) and not run.stopping:  # a stop skips to the checkpoint
                    ev = periodic_eval(
                        run.ema, run.x_eval, run.num_levels, cfg, ode=ev_ode, step=step, env=env
                    )
                    last.update(ev)
                    log.write(step, **ev)
                    if not env.distributed:  # a signal during a long evaluation stops here
                        run.stopping = run.stop.received
                if step % t.checkpoint_every == 0 or step == end or run.stopping:
                    run.last_ckpt = _checkpoint(run, last) or run.last_ckpt
                if run.stopping and run.step < end:
                    raise TrainingStopped(run.stopping, run.step, run.last_ckpt)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return TrainResult(run.run_dir, run.step, run.last_ckpt, last, run.model, run.ema)


def finetune_config(cfg: Config, from_step: int, extra_steps: int, weight: float = 0.1) -> Config:
    """The config of second-order finetuning: lambda_2 on, ``extra_steps`` more steps (§5.3)."""
    return replace(
        cfg, train=replace(cfg.train, second_order_weight=weight, steps=from_step + extra_steps)
    ).validate()
