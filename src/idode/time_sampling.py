"""Sampling gamma for the Monte-Carlo diffusion loss (method.md §3.4, §4).

Quantiles u in [0, 1) are drawn antithetically (stratified: u_i = (u0 + i/B) mod 1, one u0 per batch
or per shard) or i.i.d.; they are mapped to gamma either uniformly on [gamma_min, gamma_max] or by
the inverse CDF of the importance proposal p(gamma) = alpha^2 / Z.

``GammaSample.alpha2_over_density`` is alpha^2(gamma) / p(gamma), so that a likelihood weight
written as w(gamma) = alpha^2 * w_tilde(gamma) becomes w / p = w_tilde * alpha2_over_density with
the alpha^2 cancelled analytically, not numerically: under importance sampling it is the constant Z
(method.md §11: "do not also multiply by alpha^2").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from idode import rng
from idode.rng import Generators
from idode.schedules import Schedule

__all__ = ["GammaSample", "sample_quantiles", "sample_gamma"]


@dataclass
class GammaSample:
    """Sampled log-SNR-type times gamma [B] with their weights alpha^2/p (method.md §4)."""

    gamma: Tensor  # [B], in the dtype requested
    alpha2_over_density: Tensor  # [B] float64: alpha^2(gamma) / p(gamma)  (= Z under IS)
    importance: bool


def sample_quantiles(
    batch_size: int,
    *,
    antithetic: bool = True,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """u in [0, 1)^B; stratified with one shared offset when ``antithetic`` (method.md §3.4).

    With one generator per example the draws are i.i.d. (antithetic couples the batch, so it
    needs a single generator).
    """
    if antithetic and not (generator is None or isinstance(generator, torch.Generator)):
        raise ValueError(
            "antithetic time sampling couples the batch: pass one generator, "
            "or antithetic=False with per-example generators"
        )
    if antithetic:
        u0 = torch.rand((), generator=generator, device=device, dtype=dtype)
        offsets = torch.arange(batch_size, device=device, dtype=dtype) / batch_size
        return torch.remainder(u0 + offsets, 1.0)
    return rng.rand((batch_size,), generator, device=device, dtype=dtype)


def sample_gamma(
    schedule: Schedule,
    batch_size: int,
    *,
    importance_sampling: bool = True,
    antithetic: bool = True,
    generator: Generators = None,
    device: torch.device | str | None = None,
) -> GammaSample:
    """Draw one gamma per example and its importance weight (computed in float64)."""
    u = sample_quantiles(batch_size, antithetic=antithetic, generator=generator, device=device)
    if importance_sampling:
        z = schedule.importance_normalizer
        gamma = schedule.inverse_cumulative_weight(u * z)
        # keep gamma inside the interval even at the last ulp of the inverse CDF
        gamma = gamma.clamp(schedule.gamma_min, schedule.gamma_max)
        weight = torch.full_like(gamma, z)
    else:
        gamma = schedule.gamma(u)
        weight = schedule.gamma_range * schedule.alpha2(gamma)
    return GammaSample(gamma=gamma, alpha2_over_density=weight, importance=importance_sampling)
