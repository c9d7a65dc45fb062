"""Analytic test problems: Gaussian data, whose optimal predictors and marginals are exact.

For x0 ~ N(0, s^2 I) the marginal at gamma is N(0, v(gamma) I) with v = alpha^2 s^2 + sigma^2, and
E[eps | x] = sigma x / v, E[x0 | x] = alpha s^2 x / v (method.md §11). All optimal predictors are
linear in x, so the probability-flow ODE transports N(0, v(gamma_min)) exactly to
N(0, v(gamma_max)).
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
    """The Bayes-optimal network for x0 ~ N(0, s2 I), any parameterization (a plain callable)."""

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


class CorrelatedGaussianOptimalNet:
    """Optimal eps-predictor for x0 ~ N(0, cov) on flat data [B, d]: eps_hat = sigma (alpha^2 cov +
    sigma^2 I)^{-1} x. Its Jacobian is a full matrix, so Hutchinson estimates have variance."""

    def __init__(self, schedule: Schedule, cov: Tensor) -> None:
        self.schedule, self.cov = schedule, cov.to(torch.float64)

    def marginal_cov(self, gamma: float) -> Tensor:
        g = torch.tensor(gamma, dtype=torch.float64)
        eye = torch.eye(self.cov.shape[0], dtype=torch.float64)
        return self.schedule.alpha2(g) * self.cov + self.schedule.sigma2(g) * eye

    def __call__(self, z: Tensor, gamma: Tensor) -> Tensor:
        s = self.schedule
        g = gamma.to(torch.float64)
        a2, s2 = s.alpha2(g)[:, None, None], s.sigma2(g)[:, None, None]
        eye = torch.eye(self.cov.shape[0], dtype=torch.float64)
        m = a2 * self.cov + s2 * eye  # [B, d, d]
        sol = torch.linalg.solve(m.to(z.dtype), z[..., None]).squeeze(-1)
        return s.sigma(g).to(z.dtype)[:, None] * sol


def mvn_log_density(z: Tensor, cov: Tensor) -> Tensor:
    dist = torch.distributions.MultivariateNormal(
        torch.zeros(cov.shape[0], dtype=torch.float64), cov
    )
    return dist.log_prob(z.to(torch.float64))


class DiscreteOptimalNet:
    """Optimal x0-predictor for discrete data: each dim i.i.d. on the L bin centres with probs P.

    E[x0 | z] = sum_k w_k(z) c_k with w_k proportional to P_k N(z; alpha c_k, sigma^2), per dim.
    The exact model of such data has discrete entropy H(P) per dim, a closed-form bits/dim target.
    """

    def __init__(self, schedule: Schedule, probs: Tensor) -> None:
        self.schedule = schedule
        self.log_probs = probs.to(torch.float64).log()
        self.num_levels = len(probs)
        k = torch.arange(self.num_levels, dtype=torch.float64)
        self.centers = (2 * k + 1) / self.num_levels - 1

    def __call__(self, z: Tensor, gamma: Tensor) -> Tensor:
        s = self.schedule
        g = gamma.to(torch.float64)
        shape = (-1,) + (1,) * (z.ndim - 1) + (1,)
        a, var = s.alpha(g).reshape(shape), s.sigma2(g).reshape(shape)
        zz = z.to(torch.float64)[..., None]
        logits = self.log_probs - 0.5 * (zz - a * self.centers).square() / var
        return (logits.softmax(-1) * self.centers).sum(-1).to(z.dtype)

    def entropy_bits(self) -> float:
        return float(-(self.log_probs.exp() * self.log_probs).sum() / math.log(2))


class InDtype(torch.nn.Module):
    """Run a callable network in ``dtype`` (a float32 network under the float64 ODE state)."""

    def __init__(self, fn, dtype: torch.dtype) -> None:
        super().__init__()
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype), requires_grad=False)

    def forward(self, z: Tensor, gamma: Tensor) -> Tensor:
        assert z.dtype == self.anchor.dtype and gamma.dtype == self.anchor.dtype
        return self.fn(z, gamma)
