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
    "ELBO_PRIORS",
    "IMAGENET_VERSIONS",
    "NET_KINDS",
    "PARAMETERIZATIONS",
    "PRECISIONS",
    "PROBE_KINDS",
    "SOLVER_METHODS",
    "SPLITS",
    "SUBSETS",
    "TOLERANCES",
    "DatasetName",
    "Dequantization",
    "Divergence",
    "ElboPrior",
    "ImageNetVersion",
    "NetKind",
    "Parameterization",
    "Precision",
    "ProbeKind",
    "ScheduleName",
    "SolverMethod",
    "Split",
    "SubsetMode",
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

# idode.protocol: the ODE solver's error control of the augmented state (its comment there),
# the SDE bound's prior (N(0, sigma_max^2 I) as the ODE's, or N(0, I) as the official code)
Tolerance = Literal["logp", "paper"]
TOLERANCES: tuple[str, ...] = get_args(Tolerance)
ElboPrior = Literal["sigma_max", "unit"]
ELBO_PRIORS: tuple[str, ...] = get_args(ElboPrior)

# idode.solvers: the embedded Runge-Kutta pairs solve_ivp / solve_stream run
SolverMethod = Literal["dopri5"]
SOLVER_METHODS: tuple[str, ...] = get_args(SolverMethod)

# idode.nets: the networks make_net builds
NetKind = Literal["unet", "mlp"]
NET_KINDS: tuple[str, ...] = get_args(NetKind)

# idode.data: the datasets, their splits and the ImageNet32 file versions
DatasetName = Literal["digits", "mnist", "cifar10", "imagenet32", "npz", "folder"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
ImageNetVersion = Literal["new", "old"]
IMAGENET_VERSIONS: tuple[str, ...] = get_args(ImageNetVersion)
SubsetMode = Literal["first", "random"]  # which N examples --max-examples keeps
SUBSETS: tuple[str, ...] = get_args(SubsetMode)

# idode.precision: the network's arithmetic (fp16 is refused with its reason)
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
