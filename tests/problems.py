"""Analytic test problems: Gaussian data, whose optimal predictors and marginals are exact.

For x0 ~ N(0, s^2 I) the marginal at gamma is N(0, v(gamma) I) with v = alpha^2 s^2 + sigma^2, and
E[eps | x] = sigma x / v, E[x0 | x] = alpha s^2 x / v (method.md §11). All optimal predictors are
linear in x, so the probability-flow ODE transports N(0, v(gamma_min)) exactly to N(0, v(gamma_max)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from idode.parameterization import expand
from idode.schedules import Schedule


def marginal_variance(schedule: Schedule, gamma: Tensor | float, s2: float) -> Tensor:
    g = torch.as_tensor(gamma, dtype=torch.float64)
    return schedule.alpha2(g) * s2 + schedule.sigma2(g)


class GaussianOptimalNet:
    """The Bayes-optimal network for x0 ~ N(0, s2 I), for any parameterization (a plain callable)."""

    def __init__(self, schedule: Schedule, s2: float, parameterization: str) -> None:
        self.schedule, self.s2, self.parameterization = schedule, s2, parameterization

    def __call__(self, z: Tensor, gamma: Tensor) -> Tensor:
        s = self.schedule
        g = gamma.to(z.dtype)
        alpha, sigma = expand(s.alpha(g), z), expand(s.sigma(g), z)
        v = alpha**2 * self.s2 + sigma**2
        eps = sigma * z / v
        x0 = alpha * self.s2 * z / v
        if self.parameterization == "eps":
            return eps
        if self.parameterization == "x0":
            return x0
        a, b = s.velocity_coefficients(g)
        return expand(a, z) * eps - expand(b, z) * x0


def gaussian_log_density(z: Tensor, variance: Tensor | float) -> Tensor:
    """log N(z; 0, variance I) per example, float64."""
    z = z.to(torch.float64)
    d = z[0].numel()
    var = float(variance)
    return -0.5 * d * math.log(2 * math.pi * var) - 0.5 * z.flatten(1).square().sum(1) / var
