"""Typed run configuration: frozen dataclasses, one comment per knob, and the presets.

A ``Config`` is saved as JSON into every run directory and every checkpoint; ``--set key=value``
overrides any field by its dotted path (``train.steps=2000``), with the value parsed to the
field's type. Presets reproduce the official hyperparameters (method.md §8.2) and add small CPU
variants.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PRESETS",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
]


class ConfigError(ValueError):
    """A bad config value, an unknown key or an unknown preset."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # dataset: digits | mnist | cifar10 | imagenet32 | npz
    root: str | None = None  # directory holding the dataset files (mnist IDX, cifar10, imagenet32)
    path: str | None = None  # the .npz file when name = "npz"
    version: str = "new"  # imagenet32 version: "new" (Chrabaszcz et al. 2017) or "old" (VDM's)
    augment: bool = False  # VDM flips + rot90 with a conditioning flag (cifar10_aug, §8.3)
    max_train_examples: int | None = None  # use only the first N training images (None: all)
    eval_split: str = "test"  # held-out split for evaluation during and after training
    eval_examples: int = 512  # held-out images for the periodic SDE bound during training
    ode_eval_examples: int = 64  # held-out images for the periodic ODE bits/dim during training


@dataclass(frozen=True)
class ModelConfig:
    net: str = "unet"  # network: unet (VDM ScoreUNet) | mlp
    n_embd: int = 128  # UNet width n (sm_n_embd)
    n_layers: int = 32  # UNet depth L (sm_n_layer): L down + middle + L+1 up blocks
    with_attention: bool = False  # UNet attention after every block (cifar10_aug)
    dropout: float = 0.1  # dropout in the residual blocks (sm_pdrop)
    fourier_features: bool = True  # UNet input Fourier features sin/cos(2^f 2 pi z)
    fourier_levels: int | None = None  # f = log2(L/4), log2(L/2) for L levels (256: VDM's 6, 7);
    #                                    None: L = the dataset's number of grey levels
    checkpoint: bool = False  # UNet activation checkpointing (saves memory, costs compute)
    mlp_hidden: int = 256  # MLP hidden width
    mlp_depth: int = 3  # MLP hidden layers
    schedule: str = "VP"  # noise schedule: VP | SP
    gamma_min: float = -13.3  # gamma = log(sigma^2/alpha^2) at t = 0
    gamma_max: float = 5.0  # gamma at t = 1
    parameterization: str = "velocity"  # network predicts: velocity (i-DODE) | eps | x0
    min_group_size: int = 4  # UNet GroupNorm: fewest channels per group (1: flax's 32 groups
    #                          at every width, set by `idode convert` for official checkpoints)
    net_gamma_min: float | None = None  # UNet's gamma input range when it differs from the
    net_gamma_max: float | None = None  # schedule's (VDM: learned ends); None: gamma_min/max


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 6_000_000  # optimizer steps to train for (in total, counting resumed ones)
    batch_size: int = 128  # global batch per optimizer step, split over ranks and micro-steps
    grad_accum: int = 1  # micro-batches per optimizer step (steps count optimizer updates)
    lr: float = 2e-4  # AdamW learning rate after warm-up
    warmup_steps: int = 100  # linear warm-up from 1e-8 to lr
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # decoupled decay on every parameter not named *bias
    grad_clip: float | None = None  # clip the global gradient norm (None: no clipping, as in VDM)
    ema_decay: float = 0.9999  # EMA of the weights, updated after every optimizer step
    importance_sampling: bool = True  # gamma ~ alpha^2/Z (method.md §4); False: uniform
    antithetic: bool = True  # stratified times within each rank's batch (§3.4)
    second_order_weight: float = 0.0  # lambda_2 of the second-order term (0.1 to finetune, §5)
    hutchinson: str = "rademacher"  # second-order probe: rademacher | gaussian
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU only)
    compile: bool = False  # torch.compile the network
    seed: int = 1  # seed of weights, data order and all training noise
    log_every: int = 50  # steps between metric lines (JSONL, TensorBoard)
    eval_every: int = 5_000  # steps between SDE-bound evaluations (0: never)
    ode_eval_every: int = 50_000  # steps between ODE bits/dim evaluations (0: never)
    checkpoint_every: int = 5_000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class EvalConfig:
    dequantization: str = "truncated_normal"  # truncated_normal | uniform | variational
    num_samples: int = 1  # K dequantization draws per image
    importance_weighted: bool = False  # report the IW bound (with -log K) instead of the mean
    divergence: str = "rademacher"  # exact | rademacher | gaussian
    rtol: float = 1e-5  # ODE relative tolerance
    atol: float = 1e-5  # ODE absolute tolerance
    batch_size: int = 256  # images per ODE solve
    seed: int = 0  # seed of the per-example dequantization noise and probes


@dataclass(frozen=True)
class Config:
    preset: str = "cifar10"  # the preset this config started from
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        _check_choice(
            "data.name", self.data.name, ("digits", "mnist", "cifar10", "imagenet32", "npz")
        )
        _check_choice("data.version", self.data.version, ("new", "old"))
        _check_choice("data.eval_split", self.data.eval_split, ("train", "test"))
        _check_choice("model.net", self.model.net, ("unet", "mlp"))
        _check_choice("model.schedule", self.model.schedule, ("VP", "SP"))
        _check_choice(
            "model.parameterization", self.model.parameterization, ("velocity", "eps", "x0")
        )
        _check_choice("train.hutchinson", self.train.hutchinson, ("rademacher", "gaussian"))
        if self.train.precision == "fp16":
            raise ConfigError(
                "train.precision='fp16' is not supported: the second-order term and the "
                "likelihood weights overflow in fp16; use 'bf16' (GPU) or 'fp32'"
            )
        _check_choice("train.precision", self.train.precision, ("fp32", "bf16"))
        _check_choice(
            "eval.dequantization",
            self.eval.dequantization,
            ("truncated_normal", "uniform", "variational"),
        )
        _check_choice("eval.divergence", self.eval.divergence, ("exact", "rademacher", "gaussian"))
        t = self.train
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.batch_size % t.grad_accum:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be divisible by train.grad_accum="
                f"{t.grad_accum}"
            )
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if t.second_order_weight < 0:
            raise ConfigError(
                f"train.second_order_weight must be >= 0, got {t.second_order_weight}"
            )
        if t.second_order_weight > 0 and self.model.parameterization != "velocity":
            raise ConfigError("train.second_order_weight > 0 needs model.parameterization=velocity")
        if self.model.gamma_min >= self.model.gamma_max:
            raise ConfigError("model.gamma_min must be < model.gamma_max")
        net_lo = (
            self.model.gamma_min if self.model.net_gamma_min is None else self.model.net_gamma_min
        )
        net_hi = (
            self.model.gamma_max if self.model.net_gamma_max is None else self.model.net_gamma_max
        )
        if net_lo >= net_hi:
            raise ConfigError("model.net_gamma_min must be < model.net_gamma_max")
        if self.model.min_group_size < 1:
            raise ConfigError(f"model.min_group_size must be >= 1, got {self.model.min_group_size}")
        if self.eval.num_samples < 1 or self.eval.batch_size < 1:
            raise ConfigError("eval.num_samples and eval.batch_size must be >= 1")
        if self.data.name == "npz" and not self.data.path:
            raise ConfigError("data.name=npz needs data.path=FILE.npz")
        return self


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


# --------------------------------------------------------------------------------------------------
# (de)serialisation and --set overrides
# --------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its dict, refusing unknown keys (a typo must not pass silently)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    top = {f.name: f for f in fields(Config)}
    for key, value in d.items():
        if key not in top:
            raise ConfigError(f"unknown config section {key!r}; valid: {', '.join(top)}")
        sub = _section_types().get(key)
        if sub is None:
            kwargs[key] = value
            continue
        valid = {f.name for f in fields(sub)}
        unknown = set(value) - valid
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(sorted(map(repr, unknown)))} in config section "
                f"{key!r}; valid: {', '.join(sorted(valid))}"
            )
        kwargs[key] = sub(**value)
    return Config(**kwargs).validate()


def _section_types() -> dict[str, type]:
    return {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _parse_value(raw: str, annotation: Any, key: str) -> Any:
    """Parse a --set string to the field's declared type (int, float, bool, str, or Optional)."""
    hints = annotation
    if isinstance(hints, str):
        hints = eval(hints, {"int": int, "float": float, "str": str, "bool": bool})  # noqa: S307
    args = typing.get_args(hints)
    optional = type(None) in args or (isinstance(hints, types.UnionType) and type(None) in args)
    base = next((a for a in args if a is not type(None)), hints) if args else hints
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int:
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                value = float(raw)  # accept 1e5
                if not value.is_integer():
                    raise
                return int(value)
        if base is float:
            return float(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected {getattr(base, '__name__', base)}") from None


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``section.key=value`` strings; unknown keys get an error listing the valid ones."""
    sections = _section_types()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. train.steps=1000)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise ConfigError(
                f"--set key {key!r} needs a section: one of {', '.join(sections)} "
                f"(e.g. train.{key})"
            )
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(sections)}")
        sub_fields = {f.name: f for f in fields(sections[section])}
        if name not in sub_fields:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys in {section!r}: "
                f"{', '.join(sorted(sub_fields))}"
            )
        value = _parse_value(raw.strip(), sub_fields[name].type, key)
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
    return cfg.validate()


def dumps(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# presets (method.md §8.2; the CPU presets are ours)
# --------------------------------------------------------------------------------------------------


def _cifar10() -> Config:
    return Config(
        preset="cifar10",
        data=DataConfig(name="cifar10"),
        model=ModelConfig(n_embd=128, n_layers=32, dropout=0.1),
        train=TrainConfig(steps=6_000_000, batch_size=128),
        eval=EvalConfig(batch_size=256, num_samples=1),
    )


def _presets() -> dict[str, Config]:
    c = _cifar10()
    p: dict[str, Config] = {"cifar10": c}
    p["cifar10_aug"] = replace(
        c,
        preset="cifar10_aug",
        data=replace(c.data, augment=True),
        model=replace(c.model, n_embd=256, with_attention=True, dropout=0.05),
        train=replace(c.train, steps=10_000_000, batch_size=1024),
        eval=replace(c.eval, batch_size=128, num_samples=20, importance_weighted=True),
    )
    p["imagenet32"] = replace(
        c,
        preset="imagenet32",
        data=replace(c.data, name="imagenet32", version="new"),
        model=replace(c.model, n_embd=256),
        train=replace(c.train, steps=2_000_000, batch_size=128),
        eval=replace(c.eval, batch_size=512),
    )
    p["imagenet32_old"] = replace(
        p["imagenet32"],
        preset="imagenet32_old",
        data=replace(p["imagenet32"].data, version="old"),
        train=replace(p["imagenet32"].train, batch_size=512),
    )
    # digits and MNIST: the paper's recipe (lr 2e-4, EMA 0.9999, dropout 0.1) with a UNet sized
    # for 8x8 / 28x28 images, for a GPU; the *_cpu presets shrink it for 2 CPU cores
    p["digits"] = Config(
        preset="digits",
        data=DataConfig(name="digits", eval_examples=300, ode_eval_examples=64),
        model=ModelConfig(n_embd=64, n_layers=8, dropout=0.1),
        train=TrainConfig(
            steps=200_000,
            batch_size=128,
            eval_every=5000,
            ode_eval_every=20_000,
            checkpoint_every=5000,
        ),
        eval=EvalConfig(batch_size=300),
    )
    p["digits_cpu"] = Config(
        preset="digits_cpu",
        data=DataConfig(name="digits", eval_examples=300, ode_eval_examples=64),
        model=ModelConfig(n_embd=32, n_layers=2, dropout=0.1),
        train=TrainConfig(
            steps=3000,
            batch_size=64,
            lr=2e-3,
            warmup_steps=100,
            ema_decay=0.995,
            log_every=25,
            eval_every=500,
            ode_eval_every=0,
            checkpoint_every=1000,
        ),
        eval=EvalConfig(batch_size=300),
    )
    p["mnist"] = Config(
        preset="mnist",
        data=DataConfig(name="mnist", eval_examples=1000, ode_eval_examples=64),
        model=ModelConfig(n_embd=128, n_layers=8, dropout=0.1),
        train=TrainConfig(
            steps=400_000,
            batch_size=128,
            eval_every=5000,
            ode_eval_every=20_000,
            checkpoint_every=5000,
        ),
        eval=EvalConfig(batch_size=250),
    )
    p["mnist_cpu"] = Config(
        preset="mnist_cpu",
        data=DataConfig(name="mnist", eval_examples=500, ode_eval_examples=32),
        model=ModelConfig(n_embd=32, n_layers=2, dropout=0.1),
        train=TrainConfig(
            steps=5000,
            batch_size=64,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.999,
            log_every=25,
            eval_every=500,
            ode_eval_every=0,
            checkpoint_every=1000,
        ),
        eval=EvalConfig(batch_size=100),
    )
    p["cifar10_cpu"] = replace(
        c,
        preset="cifar10_cpu",
        model=replace(c.model, n_embd=32, n_layers=2),
        train=replace(
            c.train,
            steps=2000,
            batch_size=32,
            lr=1e-3,
            ema_decay=0.999,
            log_every=25,
            eval_every=500,
            ode_eval_every=0,
            checkpoint_every=500,
        ),
        data=replace(c.data, eval_examples=128, ode_eval_examples=16),
        eval=replace(c.eval, batch_size=32),
    )
    return p


PRESETS: dict[str, Config] = _presets()


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name].validate()
