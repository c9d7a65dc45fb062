"""What every network does with its non-image inputs: gamma and the conditioning scalar.

One home for the log-SNR input scaling (method.md §2.5), the sinusoidal timestep embedding
(§8.1 step 1, VDM's ``get_timestep_embedding``) and the checks on ``gamma`` / ``conditioning``
shared by ``ScoreUNet`` and ``MLP``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "normalized_gamma",
    "timestep_embedding",
    "gamma_embedding",
    "check_gamma_and_conditioning",
]


def normalized_gamma(gamma: Tensor, gamma_min: float, gamma_max: float) -> Tensor:
    """t_in = (gamma - gamma_min) / (gamma_max - gamma_min), in [0, 1] on the training range (§2.5).

    Shapes: gamma [B] -> [B]; float32 or wider (integer / half inputs are promoted to float32).
    """
    gamma = gamma.to(torch.promote_types(gamma.dtype, torch.float32))
    return (gamma - gamma_min) / (gamma_max - gamma_min)


def timestep_embedding(
    t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal embedding of ``scale * t``: [sin(scale t freq_j), cos(scale t freq_j)] (§8.1.1).

    freq_j = exp(-j ln(max_period) / (half - 1)), j = 0..half-1, half = dim // 2; an odd ``dim`` is
    zero-padded by one column. Shapes: t [B] -> [B, dim], in t's dtype (at least float32).
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape [B], got {tuple(t.shape)}")
    if dim < 4:
        # half - 1 must be positive for the frequency ladder to be defined
        raise ValueError(f"embedding dim must be >= 4, got {dim}")
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    half = dim // 2
    j = torch.arange(half, device=t.device, dtype=t.dtype)
    freqs = torch.exp(j * (-math.log(max_period) / (half - 1)))
    arg = (scale * t)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def gamma_embedding(
    gamma: Tensor, dim: int, gamma_min: float, gamma_max: float, scale: float = 1000.0
) -> Tensor:
    """The networks' gamma embedding: ``timestep_embedding(scale * t_in)``, t_in as in §2.5.

    ``scale``: 1000 in the paper (§8.1.1). Its fastest sinusoid turns scale / (gamma_max -
    gamma_min) radians per unit gamma (55 for VP), and those wiggles of the drift set the ODE
    solver's step (benchmarks/results/field_spectrum_digits_cpu.md). Shapes: gamma [B] -> [B, dim].
    """
    return timestep_embedding(normalized_gamma(gamma, gamma_min, gamma_max), dim, scale=scale)


def check_gamma_and_conditioning(z: Tensor, gamma: Tensor, conditioning: Tensor | None) -> None:
    """Raise ValueError unless gamma (and conditioning, when given) are tensors of shape [B]."""
    batch = z.shape[0] if z.ndim > 0 else None
    for name, value in (("gamma", gamma), ("conditioning", conditioning)):
        if value is None and name == "conditioning":
            continue
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{name} must be a tensor of shape [B] = [{batch}], got {type(value).__name__}"
            )
        if value.ndim != 1 or value.shape[0] != batch:
            raise ValueError(
                f"{name} must have shape [B] = [{batch}] (one value per example of z with shape "
                f"{tuple(z.shape)}), got {tuple(value.shape)}"
            )
