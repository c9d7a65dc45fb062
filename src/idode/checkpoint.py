"""Models from configs, and checkpoints on disk: safetensors for tensors, JSON for the rest.

A checkpoint is a directory ``RUN/checkpoints/step_00001000/`` holding ``state.safetensors``
(weights, EMA weights, optimizer moments, RNG states) and ``meta.json`` (config, step, optimizer
hyperparameters, data-loader position, metrics). It is written into a temporary directory and
renamed into place, so a crash never leaves a half-written checkpoint; ``RUN/checkpoint`` is a
symlink to the newest one, replaced atomically. No pickled code is ever stored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idode.config import Config, ConfigError, config_from_dict, config_to_dict
from idode.parameterization import DiffusionODE
from idode.schedules import make_schedule

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "build_model",
    "find_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

FORMAT_VERSION = 1
STATE_FILE, META_FILE = "state.safetensors", "meta.json"


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint."""


def build_model(cfg: Config, data_shape: tuple[int, ...], num_levels: int = 256) -> DiffusionODE:
    """The DiffusionODE (network + schedule + parameterization) a config describes."""
    from idode.nets import make_net

    m = cfg.model
    if m.net == "unet":
        # Fourier periods of 2 bins and 1 bin of the data's grey levels (VDM: 2^6, 2^7 for 256)
        levels = m.fourier_levels or num_levels
        net = make_net(
            "unet",
            data_shape,
            n_embd=m.n_embd,
            n_layers=m.n_layers,
            with_attention=m.with_attention,
            dropout=m.dropout,
            with_fourier_features=m.fourier_features,
            fourier_freqs=(math.log2(levels / 4), math.log2(levels / 2)),
            gamma_min=m.gamma_min if m.net_gamma_min is None else m.net_gamma_min,
            gamma_max=m.gamma_max if m.net_gamma_max is None else m.net_gamma_max,
            checkpoint=m.checkpoint,
            min_group_size=m.min_group_size,
        )
    else:
        net = make_net(
            "mlp",
            data_shape,
            hidden=m.mlp_hidden,
            depth=m.mlp_depth,
            dropout=m.dropout,
            gamma_min=m.gamma_min if m.net_gamma_min is None else m.net_gamma_min,
            gamma_max=m.gamma_max if m.net_gamma_max is None else m.net_gamma_max,
        )
    schedule = make_schedule(m.schedule, m.gamma_min, m.gamma_max)
    return DiffusionODE(net, schedule, m.parameterization)


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    cfg: Config,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; point ``run_dir/checkpoint`` at it; prune old ones."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for prefix, mod in (("model", model), ("ema", ema)):
        if mod is not None:
            for k, v in mod.state_dict().items():
                tensors[f"{prefix}/{k}"] = v.detach().cpu().contiguous()
    optim_meta = None
    if optimizer is not None:
        t, optim_meta = _optimizer_tensors(optimizer)
        tensors.update(t)
    for k, v in (rng or {}).items():
        tensors[f"rng/{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config": config_to_dict(cfg),
        "optimizer": optim_meta,
        "extra": extra or {},
    }
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:08d}_", dir=ckpt_root))
    try:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": "idode", "step": str(step)})
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends there)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link, tmp_link = run_dir / "checkpoint", run_dir / ".checkpoint.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(Path("checkpoints") / final.name, tmp_link)
    os.replace(tmp_link, link)
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a checkpoint directory, a run directory (its newest checkpoint) or a state file."""
    p = Path(path)
    if p.is_file() and p.name in (STATE_FILE, META_FILE):
        p = p.parent
    if (p / META_FILE).is_file() and (p / STATE_FILE).is_file():
        return p.resolve() if p.is_symlink() else p
    if (p / "checkpoint").exists():
        return find_checkpoint(p / "checkpoint")
    steps = sorted(q for q in (p / "checkpoints").glob("step_*") if (q / META_FILE).is_file())
    if steps:
        return steps[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} does not exist")
    raise CheckpointError(
        f"no checkpoint in {p}: expected {p}/{META_FILE} and {p}/{STATE_FILE}, or a run directory "
        f"with checkpoints/step_*/ (written by `idode train`)"
    )


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    config: Config
    tensors: dict[str, Tensor]
    meta: dict

    def section(self, prefix: str) -> dict[str, Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}

    def load_into(self, module: nn.Module, prefix: str) -> None:
        sd = self.section(prefix)
        if not sd:
            raise CheckpointError(f"checkpoint {self.path} holds no '{prefix}' weights")
        try:
            module.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model ({prefix} weights): {e}"
            ) from None

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        om = self.meta.get("optimizer")
        if om is None:
            raise CheckpointError(f"checkpoint {self.path} holds no optimizer state")
        state: dict[int, dict[str, Any]] = {}
        for k, v in self.section("optim").items():
            pid, name = k.split("/", 1)
            state.setdefault(int(pid), {})[name] = v
        for k, v in om["scalars"].items():
            pid, name = k.split("/", 1)
            state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": om["param_groups"]})


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a checkpoint (paths as in ``find_checkpoint``); one clear error if it is corrupt."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    try:
        with open(ckpt / META_FILE) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {ckpt / META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt / META_FILE} is not an idode checkpoint of format {FORMAT_VERSION}"
        )
    try:
        tensors = load_file(str(ckpt / STATE_FILE))
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"corrupt checkpoint tensors {ckpt / STATE_FILE}: {e}") from None
    try:
        cfg = config_from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has an invalid config: {e}") from None
    return LoadedCheckpoint(ckpt, int(meta["step"]), cfg, tensors, meta)


def load_model(
    path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[DiffusionODE, LoadedCheckpoint]:
    """The model of a checkpoint with its EMA (default) or raw weights, in eval mode.

    Refuses ``ema=True`` for a checkpoint without EMA weights rather than silently using others.
    """
    ck = load_checkpoint(path)
    shape = tuple(ck.meta["extra"].get("data_shape") or ())
    if not shape:
        raise CheckpointError(f"checkpoint {ck.path} does not record the data shape")
    model = build_model(ck.config, shape, int(ck.meta["extra"].get("num_levels", 256)))
    ck.load_into(model, "ema" if ema else "model")
    return model.to(device).eval(), ck
