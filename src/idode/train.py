"""The training loop: first-order i-DODE training and second-order finetuning, resumable, DDP-ready.

One process per device; under ``torchrun`` each rank trains on its own shard with
DistributedDataParallel (NCCL on GPU, Gloo on CPU). Optimizer: AdamW(0.9, 0.99, eps 1e-8) with
decoupled weight decay on every parameter not named *bias, linear warm-up from 1e-8, EMA of the
weights after every optimizer step (method.md §8.2). The loss is the per-example objective of
``idode.losses`` averaged over the batch and divided by d ln 2 (bits/dim, §3.3).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idode.checkpoint import build_model, find_checkpoint, load_checkpoint, save_checkpoint
from idode.config import Config, ConfigError, dumps
from idode.data import augment_batch, load_dataset, make_loader, subset
from idode.dequantization import bin_centers
from idode.likelihood import bits_per_dim, elbo
from idode.losses import diffusion_loss_terms
from idode.parameterization import DiffusionODE
from idode.rng import example_generators

__all__ = ["TrainingDiverged", "TrainResult", "train", "DistEnv", "dist_env"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


# --------------------------------------------------------------------------------------------------
# distributed set-up
# --------------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def dist_env(device_kind: str) -> DistEnv:
    """Read torchrun's environment and start the process group (NCCL on GPU, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return env


def resolve_device(spec: str, env: DistEnv, key: str = "train.device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device (cuda means this rank's local GPU)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={spec!r} but CUDA is not available; use cpu")
        if spec == "cuda":
            spec = f"cuda:{env.local_rank}"
        torch.cuda.set_device(torch.device(spec))
    return torch.device(spec)


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


class MetricsLog:
    """Metrics as JSON lines (``metrics.jsonl``) and TensorBoard scalars (``tb/``), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but keep training without it
                self.tb = None

    def write(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float]  # the last logged training metrics and evaluations
    model: DiffusionODE | None = None  # this rank's trained model (raw weights), in memory
    ema: DiffusionODE | None = None  # this rank's EMA model


# --------------------------------------------------------------------------------------------------
# evaluation during training (rank 0, EMA weights)
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
    """SDE bound on the held-out subset; ODE bits/dim (truncated normal) on its first images.

    Sharded: rank r takes images r, r + W, ...; every example draws its noise from its own
    generator, so the numbers do not depend on W. The one collective comes after the solves.
    """
    env = env or DistEnv()
    dev = next(model.parameters()).device
    x = x_eval.to(dev)
    idx = torch.arange(len(x))
    mine = idx[env.rank :: env.world_size]
    b = cfg.eval.batch_size
    sde: list[Tensor] = []
    for s in range(0, len(mine), b):
        j = mine[s : s + b]
        gens = example_generators(cfg.eval.seed + 7919 * step, j, dev)
        sde.append(elbo(model, x[j], num_levels, antithetic=False, generator=gens).bpd.cpu())
    ode_bpd, ode_nfe = [], []
    if ode:
        j = mine[mine < min(cfg.data.ode_eval_examples, len(x))]
        if len(j):
            res = bits_per_dim(
                model,
                x[j],
                num_levels,
                "truncated_normal",
                1,
                cfg.eval.divergence,
                cfg.eval.rtol,
                cfg.eval.atol,
                generator=example_generators(cfg.eval.seed, j, dev),
            )
            ode_bpd, ode_nfe = res.bpd.cpu(), (6 * res.steps.sum(1) + 2).cpu().double()
    local = (torch.cat(sde) if sde else torch.zeros(0), ode_bpd, ode_nfe)
    parts = [local]
    if env.distributed:
        parts = [None] * env.world_size
        torch.distributed.all_gather_object(parts, local)
    out = {"eval/sde_bpd": float(torch.cat([p[0] for p in parts]).double().mean())}
    if ode:
        out["eval/ode_bpd_tn"] = float(torch.cat([torch.as_tensor(p[1]) for p in parts]).mean())
        out["eval/ode_nfe"] = float(torch.cat([torch.as_tensor(p[2]) for p in parts]).mean())
    return out


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def train(
    cfg: Config,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or finetune) per ``cfg`` into ``run_dir``.

    resume: continue from ``run_dir``'s newest checkpoint (weights, EMA, optimizer, step, RNG and
        data position), reproducing the uninterrupted run.
    init_from: start from another run's checkpoint, restoring weights, EMA, optimizer and step
        (second-order finetuning, method.md §5.3).
    stop_after: end after this many optimizer steps in this call (checkpointing there), as if
        the run were interrupted; for tests and time-boxed jobs.
    """
    cfg = cfg.validate()
    run_dir = Path(run_dir)
    dev_kind = (
        "cuda"
        if cfg.train.device.startswith("cuda")
        or (cfg.train.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    env = dist_env(dev_kind)
    device = resolve_device(cfg.train.device, env)
    t = cfg.train
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
    dc = cfg.data
    train_ds = load_dataset(
        dc.name,
        "train",
        dc.root,
        version=dc.version,
        path=dc.path,
        max_examples=dc.max_train_examples,
    )
    eval_ds = load_dataset(dc.name, dc.eval_split, dc.root, version=dc.version, path=dc.path)
    eval_ds = subset(eval_ds, min(dc.eval_examples, len(eval_ds)), seed=0)
    shape, num_levels, d = train_ds.shape, train_ds.num_levels, train_ds.num_dims
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

    # model, EMA, optimizer
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg, shape, num_levels).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed * 1_000_003 + env.rank)
    torch.manual_seed(t.seed * 7919 + env.rank)  # dropout: a different stream per rank
    step = 0

    source = None
    if resume:
        source = find_checkpoint(run_dir)
    elif init_from is not None:
        source = find_checkpoint(init_from)
    if source is not None:
        ck = load_checkpoint(source)
        ck.load_into(model, "model")
        ck.load_into(ema, "ema")
        if resume or not ck.meta["extra"].get("converted_from"):
            ck.load_optimizer(optimizer)
        # else: a converted official checkpoint has no optimizer state: fresh AdamW moments
        step = ck.step
        if resume:
            saved_world = int(ck.meta["extra"].get("world_size", 1))
            if saved_world != env.world_size:
                raise ConfigError(
                    f"{ck.path} was written by {saved_world} process(es) but this run has "
                    f"{env.world_size}: resume with the same number of processes to reproduce the "
                    f"interrupted run exactly, or continue with `idode finetune --from {ck.path} "
                    f"--weight 0` on any number"
                )
            loader.load_state_dict(ck.meta["extra"]["loader"][env.rank])
            _set_rng_state(ck.section(f"rng/rank{env.rank}"), gen, device)
    last_ckpt: Path | None = source if resume else None

    # the module that runs the network: DDP and/or torch.compile wrap the same parameters
    net: nn.Module = model.net
    if t.compile:
        net = torch.compile(net)
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = DiffusionODE(net, model.schedule, model.parameterization)

    if env.is_main:
        (run_dir / "config.json").write_text(dumps(cfg) + "\n")
    log = MetricsLog(run_dir, env.is_main)
    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=t.steps,
            initial=step,
            desc="train",
            dynamic_ncols=True,
            disable=os.environ.get("IDODE_NO_PROGRESS") == "1",
        )

    bf16 = t.precision == "bf16"
    x_eval = eval_ds.as_tensor()
    ln2d = d * math.log(2.0)
    last: dict[str, float] = {}
    end = t.steps if stop_after is None else min(t.steps, step + stop_after)
    it = iter(loader)
    tic, tic_step = time.perf_counter(), step

    def checkpoint_now() -> Path | None:
        rng_all = _rng_state(gen, device)
        loader_state = loader.state_dict()
        if env.distributed:
            states: list[Any] = [None] * env.world_size
            torch.distributed.all_gather_object(states, (rng_all, loader_state))
        else:
            states = [(rng_all, loader_state)]
        path = None
        if env.is_main:
            rng = {f"rank{r}/{k}": v for r, (s, _) in enumerate(states) for k, v in s.items()}
            path = save_checkpoint(
                run_dir,
                step=step,
                cfg=cfg,
                model=model,
                ema=ema,
                optimizer=optimizer,
                rng=rng,
                extra={
                    "loader": [ls for _, ls in states],
                    "data_shape": list(shape),
                    "num_levels": num_levels,
                    "world_size": env.world_size,
                    "dataset": {"name": train_ds.name, **_jsonable(train_ds.info)},
                    "metrics": last,
                },
                keep=t.keep_checkpoints,
            )
        env.barrier()
        return path

    model.train()
    try:
        while step < end:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            stats = torch.zeros(3, device=device)  # loss, first-order, second-order (bits/dim)
            for micro in range(t.grad_accum):
                x_int = next(it).to(device, non_blocking=True)
                kw = None
                if dc.augment:
                    x_int, cond = augment_batch(x_int, gen)
                    kw = {"conditioning": cond.to(device)}
                x = bin_centers(x_int, num_levels)
                sync = not env.distributed or micro == t.grad_accum - 1
                ctx = net.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        terms = diffusion_loss_terms(
                            train_model,
                            x,
                            importance_sampling=t.importance_sampling,
                            second_order_weight=t.second_order_weight,
                            antithetic=t.antithetic,
                            hutchinson=t.hutchinson,
                            generator=gen,
                            net_kwargs=kw,
                            validate=False,
                        )
                    loss = terms.loss.float().mean() / ln2d
                    (loss / t.grad_accum).backward()
                stats += torch.stack(
                    [
                        loss.detach(),
                        terms.first_order.detach().float().mean() / ln2d,
                        terms.second_order.detach().float().mean() / ln2d,
                    ]
                )
            stats /= t.grad_accum
            if env.distributed:
                torch.distributed.all_reduce(stats)
                stats /= env.world_size
            loss_value = float(stats[0])
            if not math.isfinite(loss_value):
                where = str(last_ckpt) if last_ckpt else "none yet"
                raise TrainingDiverged(
                    f"loss is {loss_value} at step {step + 1}; stopped before updating the "
                    f"weights. Last good checkpoint: {where} (resume with --resume after lowering "
                    f"train.lr or setting train.grad_clip)"
                )
            max_norm = t.grad_clip if t.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            optimizer.step()
            ema_update(ema, model, t.ema_decay)
            step += 1

            if step % t.log_every == 0 or step == end:
                now = time.perf_counter()
                rate = (step - tic_step) / max(now - tic, 1e-9)
                tic, tic_step = now, step
                last = {
                    "train/loss_bpd": loss_value,
                    "train/first_order_bpd": float(stats[1]),
                    "train/second_order_bpd": float(stats[2]),
                    "train/grad_norm": grad_norm,
                    "train/lr": lr,
                    "train/steps_per_s": rate,
                }
                log.write(step, **last)
            if bar is not None:
                bar.update(1)
                if step % t.log_every == 0 or step == end:
                    bar.set_postfix(
                        loss_bpd=f"{loss_value:.3f}",
                        it_s=f"{last.get('train/steps_per_s', 0):.1f}",
                        refresh=False,
                    )
            want_sde = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
            want_ode = t.ode_eval_every > 0 and (step % t.ode_eval_every == 0 or step == t.steps)
            if want_sde or want_ode:
                ev = periodic_eval(ema, x_eval, num_levels, cfg, ode=want_ode, step=step, env=env)
                last.update(ev)
                log.write(step, **ev)
                if bar is not None:
                    bar.set_postfix(
                        loss_bpd=f"{loss_value:.3f}",
                        sde_bpd=f"{ev['eval/sde_bpd']:.3f}",
                        refresh=False,
                    )
            if step % t.checkpoint_every == 0 or step == end:
                last_ckpt = checkpoint_now() or last_ckpt
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return TrainResult(run_dir, step, last_ckpt, last, model, ema)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def finetune_config(cfg: Config, from_step: int, extra_steps: int, weight: float = 0.1) -> Config:
    """The config of second-order finetuning: lambda_2 on, ``extra_steps`` more steps (§5.3)."""
    return replace(
        cfg, train=replace(cfg.train, second_order_weight=weight, steps=from_step + extra_steps)
    ).validate()
