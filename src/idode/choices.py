"""Every option list of the configs and the public API: a ``Literal`` type and its tuple of names.

A leaf module (it imports nothing of idode), so that ``config.py`` types its fields and
``cli/parser.py`` lists its choices without importing the modules that implement the options.
Each option's home module re-exports its names (``idode.dequantization.Dequantization`` keeps
working); a new option value is added here, and implemented in the module named in its comment.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DATASETS",
    "DEQUANTIZATIONS",
    "DIVERGENCES",
    "IMAGENET_VERSIONS",
    "NET_KINDS",
    "PARAMETERIZATIONS",
    "PROBE_KINDS",
    "SPLITS",
    "TOLERANCES",
    "DatasetName",
    "Dequantization",
    "Divergence",
    "ImageNetVersion",
    "NetKind",
    "Parameterization",
    "Precision",
    "ProbeKind",
    "ScheduleName",
    "Split",
    "Tolerance",
]

# idode.schedules: the noise schedules (registered in schedules.SCHEDULES)
ScheduleName = Literal["VP", "SP"]

# idode.parameterization: what the network predicts
Parameterization = Literal["eps", "x0", "velocity"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)

# idode.divergence: Hutchinson probe distributions, and the divergence estimators
ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)
Divergence = Literal["exact", "rademacher", "gaussian"]  # exact, or Hutchinson with a probe kind
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

# idode.dequantization: the dequantization distributions q(z | k)
Dequantization = Literal["truncated_normal", "uniform", "variational"]
DEQUANTIZATIONS: tuple[str, ...] = get_args(Dequantization)

# idode.likelihood: the ODE solver's error control of the augmented state (its comment there)
Tolerance = Literal["logp", "paper"]
TOLERANCES: tuple[str, ...] = get_args(Tolerance)

# idode.nets: the networks make_net builds
NetKind = Literal["unet", "mlp"]
NET_KINDS: tuple[str, ...] = get_args(NetKind)

# idode.data: the datasets, their splits and the ImageNet32 file versions
DatasetName = Literal["digits", "mnist", "cifar10", "imagenet32", "npz"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
ImageNetVersion = Literal["new", "old"]
IMAGENET_VERSIONS: tuple[str, ...] = get_args(ImageNetVersion)

# idode.config: the network's arithmetic in training (fp16 is refused with its reason)
Precision = Literal["fp32", "bf16"]
