"""Typed run configuration: frozen dataclasses, one comment per knob.

A ``Config`` is saved as JSON into every run directory and every checkpoint; ``--set key=value``
overrides any field by its dotted path (``train.steps=2000``), with the value parsed to the
field's type. The named configs (the official hyperparameters, method.md §8.2, and small CPU
variants) are in ``idode.presets``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from idode.choices import (
    DatasetName,
    ImageNetVersion,
    NetKind,
    Parameterization,
    Precision,
    ProbeKind,
    ScheduleName,
    Split,
)
from idode.protocol import Protocol
from idode.validation import (
    InputError,
    check_choice,
    check_device,
    check_rtol,
    check_setting_type,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
]


class ConfigError(InputError):
    """A bad config value, an unknown key or an unknown preset."""


@dataclass(frozen=True)
class DataConfig:
    """Which images: the dataset, its files, and the held-out subsets used during training."""

    name: DatasetName = "digits"  # dataset: digits | mnist | cifar10 | imagenet32 | npz | folder
    root: str | None = None  # directory holding the dataset files (mnist IDX, cifar10, imagenet32)
    path: str | None = None  # the .npz file when name = "npz"; the image folder when "folder"
    version: ImageNetVersion = "new"  # imagenet32: "new" (Chrabaszcz et al. 2017) | "old" (VDM's)
    augment: bool = False  # VDM flips + rot90 with a conditioning flag (cifar10_aug, §8.3)
    max_train_examples: int | None = None  # use only the first N training images (None: all)
    eval_split: Split = "test"  # held-out split for evaluation during and after training
    eval_examples: int = 512  # held-out images for the periodic SDE bound during training
    ode_eval_examples: int = 64  # held-out images for the periodic ODE bits/dim during training


@dataclass(frozen=True)
class ModelConfig:
    """The network, the noise schedule and the parameterization."""

    net: NetKind = "unet"  # network: unet (VDM ScoreUNet) | mlp
    n_embd: int = 128  # UNet width n (sm_n_embd)
    n_layers: int = 32  # UNet depth L (sm_n_layer): L down + middle + L+1 up blocks
    with_attention: bool = False  # UNet attention after every block (cifar10_aug)
    dropout: float = 0.1  # dropout in the residual blocks (sm_pdrop)
    fourier_features: bool = True  # UNet input Fourier features sin/cos(2^f 2 pi z)
    fourier_levels: int | None = None  # f = log2(L/4), log2(L/2) for L levels (256: VDM's 6, 7);
    #                                    None: L = the dataset's number of grey levels
    activation_checkpointing: bool = False  # UNet: recompute activations in backward (less
    #                                           memory, more compute); not saved checkpoints
    mlp_hidden: int = 256  # MLP hidden width
    mlp_depth: int = 3  # MLP hidden layers
    schedule: ScheduleName = "VP"  # noise schedule: VP | SP
    gamma_min: float = -13.3  # gamma = log(sigma^2/alpha^2) at t = 0
    gamma_max: float = 5.0  # gamma at t = 1
    parameterization: Parameterization = "velocity"  # network predicts: velocity | eps | x0
    min_group_size: int = 4  # UNet GroupNorm: fewest channels per group (1: flax's 32 groups
    #                          at every width, set by `idode convert` for official checkpoints)
    net_gamma_min: float | None = None  # UNet's gamma input range when it differs from the
    net_gamma_max: float | None = None  # schedule's (VDM: learned ends); None: gamma_min/max
    time_embedding_scale: float = 1000.0  # the networks' gamma embedding sin/cos(scale t_in f_j)
    #                                       (§8.1.1: 1000); lower: a drift smoother in gamma
    precision: Precision = "fp32"  # the network's arithmetic in the training step: fp32 | tf32
    #                                (CUDA tensor cores) | bf16 (autocast); reported bits/dim
    #                                use fp32 (idode eval --precision); state stays float64
    compile: bool = False  # torch.compile the network (training and the likelihood's forward +
    #                        VJP; the solver stays eager; a compile failure falls back to eager)


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer, the objective, and the loop's schedule of logs, evaluations, checkpoints."""

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
    hutchinson: ProbeKind = "rademacher"  # second-order probe: rademacher | gaussian
    seed: int = 1  # seed of weights, data order and all training noise
    log_every: int = 50  # steps between metric lines (JSONL, TensorBoard)
    eval_every: int = 5_000  # steps between SDE-bound evaluations (0: never)
    ode_eval_every: int = 50_000  # steps between ODE bits/dim evaluations (0: never)
    checkpoint_every: int = 5_000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class EvalConfig(Protocol):
    """The evaluation section: the protocol (``idode.Protocol``: every setting that defines a
    bits/dim, its fields are this section's keys) and how it is run."""

    batch_size: int = 256  # rows per network call, refilled as solves end (not in the protocol)

    @property
    def protocol(self) -> Protocol:
        """The protocol alone (without the batch size)."""
        return Protocol.of(self)


@dataclass(frozen=True)
class Config:
    """A whole run: the preset it started from and its four sections."""

    preset: str = "cifar10"  # the preset this config started from
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Check every field (type, choice, range, combination); one ConfigError naming the knob."""
        for section in _section_types():
            _check_section(section, getattr(self, section))
        self.eval.validate("eval.", ConfigError)  # the protocol checks its own settings
        _check_ranges(self)
        _check_combinations(self)
        return self


_POSITIVE, _NONNEG, _UNIT = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: 0.0 <= v < 1.0)
# every numeric knob: (test, requirement); None passes where the field's type allows it
_RANGES: dict[str, tuple[Any, str]] = {
    "data.max_train_examples": (_POSITIVE, "a positive integer or None"),
    "data.eval_examples": (_POSITIVE, ">= 1"),
    "data.ode_eval_examples": (_NONNEG, ">= 0"),
    "model.n_embd": (_POSITIVE, ">= 1"),
    "model.n_layers": (_NONNEG, ">= 0 (0: the middle block and one up block)"),
    "model.dropout": (_UNIT, "in [0, 1)"),
    "model.fourier_levels": (lambda v: v >= 2, ">= 2 grey levels or None"),
    "model.mlp_hidden": (_POSITIVE, ">= 1"),
    "model.mlp_depth": (_POSITIVE, ">= 1"),
    "model.min_group_size": (_POSITIVE, ">= 1"),
    "model.time_embedding_scale": (_POSITIVE, "> 0 (the paper's: 1000)"),
    "train.steps": (_POSITIVE, ">= 1"),
    "train.batch_size": (_POSITIVE, ">= 1"),
    "train.grad_accum": (_POSITIVE, ">= 1"),
    "train.lr": (_POSITIVE, "> 0"),
    "train.warmup_steps": (_NONNEG, ">= 0"),
    "train.beta1": (_UNIT, "in [0, 1)"),
    "train.beta2": (_UNIT, "in [0, 1)"),
    "train.adam_eps": (_POSITIVE, "> 0"),
    "train.weight_decay": (_NONNEG, ">= 0"),
    "train.grad_clip": (_POSITIVE, "> 0 or None"),
    "train.ema_decay": (_UNIT, "in [0, 1)"),
    "train.second_order_weight": (_NONNEG, ">= 0"),
    "train.seed": (_NONNEG, ">= 0"),
    "train.log_every": (_POSITIVE, ">= 1"),
    "train.eval_every": (_NONNEG, ">= 0 (0: never)"),
    "train.ode_eval_every": (_NONNEG, ">= 0 (0: never)"),
    "train.checkpoint_every": (_POSITIVE, ">= 1"),
    "train.keep_checkpoints": (_POSITIVE, ">= 1"),
    "eval.batch_size": (_POSITIVE, ">= 1"),
}


def _check_section(section: str, obj: Any) -> None:
    """Type and Literal choice of each field (the choice lists are idode.choices' Literals)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        key, value = f"{section}.{name}", getattr(obj, name)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is Literal:
            if value == "fp16":
                raise ConfigError(
                    f"{key}='fp16' is not supported: the second-order term and the likelihood "
                    "weights overflow in fp16; use 'bf16', 'tf32' or 'fp32'"
                )
            check_choice(key, value, args, error=ConfigError)
            continue
        check_setting_type(key, value, hint, ConfigError)


def _check_ranges(cfg: Config) -> None:
    for key, (test, requirement) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not test(value):
            raise ConfigError(f"{key} must be {requirement}, got {value!r}")


def _check_combinations(cfg: Config) -> None:
    t, m = cfg.train, cfg.model
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}"
        )
    if t.second_order_weight > 0 and m.parameterization != "velocity":
        raise ConfigError("train.second_order_weight > 0 needs model.parameterization=velocity")
    if m.gamma_min >= m.gamma_max:
        raise ConfigError(f"model.gamma_min={m.gamma_min} must be < model.gamma_max={m.gamma_max}")
    net_lo = m.gamma_min if m.net_gamma_min is None else m.net_gamma_min
    net_hi = m.gamma_max if m.net_gamma_max is None else m.net_gamma_max
    if net_lo >= net_hi:
        raise ConfigError(
            f"the network's gamma range [{net_lo}, {net_hi}] is empty: set "
            f"model.net_gamma_min < model.net_gamma_max"
        )
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError("data.name=npz needs data.path=FILE.npz")
    if cfg.data.name == "folder" and not cfg.data.path:
        raise ConfigError("data.name=folder needs data.path=DIR (a folder of image files)")
    check_device(t.device, "train.device", error=ConfigError)
    check_rtol(cfg.eval.rtol, "eval.rtol", error=ConfigError, warn_biased=False)


# --------------------------------------------------------------------------------------------------
# (de)serialisation and --set overrides
# --------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# keys renamed or moved since config.json files were first written (old "section.key" -> new):
# old files still load, and --set accepts the old name
RENAMED_KEYS: dict[str, str] = {
    "model.checkpoint": "model.activation_checkpointing",
    "train.precision": "model.precision",
    "train.compile": "model.compile",
}


def _migrate(d: dict) -> dict:
    """``d`` with every key of RENAMED_KEYS under its new name (both names: one error)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in RENAMED_KEYS.items():
        (osec, oname), (nsec, nname) = old.split("."), new.split(".")
        if isinstance(out.get(osec), dict) and oname in out[osec]:
            target = out.setdefault(nsec, {})
            if not isinstance(target, dict):
                continue
            if nname in target:
                raise ConfigError(
                    f"the config has both {old!r} and its new name {new!r}; keep only {new!r}"
                )
            target[nname] = out[osec].pop(oname)
    return out


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its dict, refusing unknown keys (a typo must not pass silently).

    Keys of older files are read under their new names (``RENAMED_KEYS``).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
    d = _migrate(d)
    kwargs: dict[str, Any] = {}
    top = {f.name: f for f in fields(Config)}
    for key, value in d.items():
        if key not in top:
            raise ConfigError(f"unknown config section {key!r}; valid: {', '.join(top)}")
        sub = _section_types().get(key)
        if sub is None:
            kwargs[key] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a JSON object, got {value!r}")
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


def _parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parse a --set string to the field's type (int, float, bool, str, a Literal, or Optional)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return raw  # Config.validate names the valid choices
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if typing.get_origin(base) is Literal:
            return raw
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
        key = RENAMED_KEYS.get(key.strip(), key.strip())
        if "." not in key:
            raise ConfigError(
                f"--set key {key!r} needs a section: one of {', '.join(sections)} "
                f"(e.g. train.{key})"
            )
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(sections)}")
        sub_fields = typing.get_type_hints(sections[section])
        if name not in sub_fields:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys in {section!r}: "
                f"{', '.join(sorted(sub_fields))}"
            )
        value = _parse_value(raw.strip(), sub_fields[name], key)
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
    return cfg.validate()


def config_differences(saved: Config, now: Config, sections=("model", "data")) -> list[str]:
    """'section.key (checkpoint A, now B)' for every setting of ``sections`` that differs."""
    a, b = config_to_dict(saved), config_to_dict(now)
    return [
        f"{sec}.{k} (checkpoint {a[sec].get(k)!r}, now {b[sec].get(k)!r})"
        for sec in sections
        for k in sorted(set(a[sec]) | set(b[sec]))
        if a[sec].get(k) != b[sec].get(k)
    ]


def dumps(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=False)
