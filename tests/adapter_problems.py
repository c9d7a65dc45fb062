"""Closed-form references for the adapter tests, written independently of idode (numpy/torch).

Gaussian data x ~ N(mu, diag(s2)) on any path x_t = a x + b eps has the marginal
N(a mu, a^2 s2 + b^2) and a probability-flow map that is affine per dimension:
x(t) - a(t) mu = sqrt(v(t) / v(t0)) (x(t0) - a(t0) mu), v = a^2 s2 + b^2. So the log-density the
truncated ODE model assigns (integrate to the noise end, score the end point under the Gaussian
prior) is closed form: log N(x_end; 0, prior_var) + 1/2 sum log(v_end / v_0).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def vp_coefficients(gamma: float) -> tuple[float, float]:
    """(alpha, sigma) with alpha^2 = 1/(1 + e^gamma), sigma^2 = e^gamma/(1 + e^gamma)."""
    return math.sqrt(1.0 / (1.0 + math.exp(gamma))), math.sqrt(1.0 / (1.0 + math.exp(-gamma)))


def linear_path_coefficients(gamma: float) -> tuple[float, float]:
    """(alpha, sigma) of the linear path alpha + sigma = 1 with sigma/alpha = e^{gamma/2}."""
    sigma = 1.0 / (1.0 + math.exp(-gamma / 2.0))
    return 1.0 - sigma, sigma


def truncated_flow_log_density(
    x0: np.ndarray, mu: np.ndarray, s2: np.ndarray, start: tuple, end: tuple, prior_var: float
) -> np.ndarray:
    """log-density [B] of the ODE model at x0 [B, ...]: path coefficients (a, b) at the start and
    the end of the integration, prior N(0, prior_var I) at the end."""
    (a0, b0), (a1, b1) = start, end
    v0, v1 = a0**2 * s2 + b0**2, a1**2 * s2 + b1**2
    x_end = a1 * mu + np.sqrt(v1 / v0) * (x0 - a0 * mu)
    x_end = x_end.reshape(len(x0), -1)
    d = x_end.shape[1]
    prior = -0.5 * d * math.log(2 * math.pi * prior_var) - 0.5 * (x_end**2).sum(1) / prior_var
    return prior + 0.5 * np.log(v1 / v0).sum()


def gaussian_data(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and variance of a Gaussian data distribution on [-1, 1]-ish images."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, shape), rng.uniform(0.05, 0.3, shape)


def sample_marginal(mu, s2, a: float, b: float, n: int, seed: int = 1) -> np.ndarray:
    """n draws of a x + b eps, x ~ N(mu, s2)."""
    rng = np.random.default_rng(seed)
    x = mu + np.sqrt(s2) * rng.standard_normal((n, *mu.shape))
    return a * x + b * rng.standard_normal((n, *mu.shape))


def posterior_means(x_t, t_a, t_b, mu, s2):
    """E[x | x_t] and E[eps | x_t] for x_t = a x + b eps (a, b per example, broadcast)."""
    v = t_a**2 * s2 + t_b**2
    r = x_t - t_a * mu
    return mu + t_a * s2 / v * r, t_b / v * r


def as_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def tiny_diffusers_unet(out_channels: int = 1, size: int = 8) -> torch.nn.Module:
    """A two-level diffusers UNet2DModel on one grey channel, seeded (needs diffusers)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
