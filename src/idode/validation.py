"""The one home of input checks: each raises one clear error naming the problem and the fix.

``InputError`` (a ``ValueError``) marks a mistake in what the user passed; the command line prints
it as one line and exits with code 2. ``DatasetError`` is the same for a dataset file that holds
the wrong thing. Library checks of tensors keep the conventional ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

import math
import re
import typing
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "DatasetError",
    "InputError",
    "BiasedToleranceWarning",
    "ToleranceError",
    "check_choice",
    "check_device",
    "check_integer_data",
    "check_level_range",
    "check_model_input",
    "check_num_levels",
    "check_positive",
    "check_rtol",
    "check_setting_type",
    "is_integer_dtype",
]

T = TypeVar("T")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


class InputError(ValueError):
    """A bad value passed by the user; the message names the problem and the fix."""


class DatasetError(InputError):
    """A dataset file whose content is not integer images as documented in ``idode.data``."""


class ToleranceError(InputError):
    """An ODE tolerance float64 cannot deliver (the solve would never finish)."""


class BiasedToleranceWarning(UserWarning):
    """An ODE tolerance so loose that the solver's error biases the bits/dim."""


RTOL_MIN = 1e-13  # float64 keeps ~16 digits; a step's error test below ~1e-13 is never met
RTOL_BIASED = 1e-2  # at and above this the solver error is a visible part of bits/dim


def check_rtol(rtol: float, name: str = "rtol", *, error: type[Exception] = ToleranceError,
               warn_biased: bool = True) -> float:  # fmt: skip
    """Return ``rtol``; refuse one below ``RTOL_MIN`` (one line), warn at ``RTOL_BIASED`` and up.

    The one home of this judgement: the library's likelihoods, the config and the CLI reach it.
    """
    if not rtol >= RTOL_MIN:
        raise error(
            f"{name}={rtol:g} is below {RTOL_MIN:g}, which float64 arithmetic cannot deliver (the "
            f"solve would never finish); use {name} >= {RTOL_MIN:g} (1e-5 is the paper's)"
        )
    if warn_biased and rtol >= RTOL_BIASED:
        warnings.warn(
            f"{name}={rtol:g} >= {RTOL_BIASED:g}: the ODE solver's error biases the bits/dim; "
            f"use 1e-5 (the paper's) or less for numbers to report",
            BiasedToleranceWarning,
            stacklevel=3,
        )
    return rtol


def check_choice(
    name: str, value: T, valid: Sequence[str], *, error: type[Exception] = ValueError
) -> T:
    """Return ``value`` unless it is not one of ``valid``: then raise ``error`` listing them."""
    if value not in valid:
        raise error(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


def check_positive(name: str, value: Any, *, integer: bool = False) -> Any:
    """Return ``value`` if it is a finite number > 0 (an int if ``integer``), else InputError."""
    kind = "integer" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not value > 0 or value == float("inf"):
        raise InputError(f"{name} must be a positive {kind}, got {value!r}")
    return value


def check_device(spec: str, name: str = "device", *, error: type[Exception] | None = None) -> str:
    """Return ``spec`` if it reads auto, cpu, cuda or cuda:N (syntax only), else ``error``."""
    if not isinstance(spec, str) or not _DEVICE.fullmatch(spec):
        where = f" for {name}" if name else ""
        raise (error or InputError)(f"{spec!r} is not a device{where}; valid: {DEVICE_CHOICES}")
    return spec


def check_num_levels(num_levels: Any) -> int:
    """Return the number of grey levels L if it is an integer >= 2, else ValueError."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(
            f"num_levels must be an integer >= 2 (256 for 8-bit images), got {num_levels!r}"
        )
    return num_levels


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for torch's integer dtypes (uint8 ... int64), False for float, complex and bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _float_hint(x: Tensor, num_levels: int) -> str:
    """What to pass instead of a floating-point tensor, judged from its values."""
    top = num_levels - 1
    if not x.dtype.is_floating_point or x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return "pass the integer grey levels"
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 and lo >= -1 and hi <= 1:
        return "values in [-1, 1] look already scaled: use them as x directly, or pass the integers"
    if lo >= 0 and hi <= 1:
        return f"for values in [0, 1] multiply by num_levels - 1 = {top} and round: " + (
            f"x.mul({top}).round().long(), or pass the integers"
        )
    return "pass x.round().long() if it holds whole numbers, or the integers themselves"


def check_integer_data(x_int: Tensor, num_levels: int, name: str = "x_int") -> None:
    """Raise one clear error unless x_int is an integer tensor [B, ...] with values in [0, L)."""
    if not isinstance(x_int, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x_int).__name__}")
    check_num_levels(num_levels)
    if not is_integer_dtype(x_int.dtype):
        raise TypeError(
            f"{name} must hold integer grey levels in [0, {num_levels}) (e.g. torch.uint8 or "
            f"torch.int64), got {x_int.dtype}; {_float_hint(x_int, num_levels)}"
        )
    if x_int.ndim < 2:
        raise ValueError(f"{name} must be batched, shape [B, ...], got shape {tuple(x_int.shape)}")
    if x_int.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x_int.shape)})")
    check_level_range(x_int, num_levels, name)


def check_level_range(x_int: Tensor, num_levels: int, name: str = "x_int") -> None:
    """Raise one clear error unless the integer tensor's values lie in [0, num_levels)."""
    if x_int.numel() == 0 or (x_int.dtype == torch.uint8 and num_levels >= 256):
        return  # nothing to check: a uint8 cannot leave [0, 255]
    lo, hi = (int(v) for v in torch.aminmax(x_int))
    if lo < 0 or hi >= num_levels:
        raise ValueError(
            f"{name} has values in [{lo}, {hi}] but num_levels={num_levels} allows "
            f"[0, {num_levels - 1}]; pass the right num_levels (256 for 8-bit images, 17 for "
            f"scikit-learn digits)"
        )


def check_model_input(x: Tensor, name: str = "x", *, unit_range: bool = True) -> None:
    """One clear error for non-float, empty, non-finite or (if ``unit_range``) out-of-range data."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"{name} must be a floating-point tensor of data scaled to [-1, 1], got {got}; for "
            f"integer images use idode.bin_centers(x_int, num_levels)"
        )
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [B, ...], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if unit_range and float(x.abs().max()) > 1.0 + 1e-6:
        raise ValueError(
            f"{name} must lie in [-1, 1], got max |x| = {float(x.abs().max()):.4g}; scale the data "
            f"with idode.bin_centers"
        )


def check_setting_type(
    key: str, value: Any, hint: Any, error: type[Exception] = InputError
) -> type:
    """A setting typed ``hint`` (a plain type, or one with ``| None``): the right type (a bool is
    no int; an int passes for a float) and finite; returns the type without None."""
    allowed = typing.get_args(hint) or (hint,)
    base = next(a for a in allowed if a is not type(None))
    if value is None and type(None) in allowed:
        return base
    is_bool = isinstance(value, bool)
    ok = isinstance(value, base) and (base is bool or not is_bool)
    ok = ok or (base is float and isinstance(value, int) and not is_bool)
    if not ok:
        raise error(f"{key}={value!r} must be of type {base.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{key}={value!r} must be a finite number")
    return base
