"""ODE sampling (method.md §6.2): integrate the probability-flow ODE from the prior to gamma_min.

The state runs in float64 (as in ``likelihood``); the network runs in its own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from idode import rng
from idode.augmented import eval_mode
from idode.dequantization import nearest_level
from idode.parameterization import DiffusionODE
from idode.rng import Generators
from idode.solvers import solve_ivp

__all__ = ["SampleResult", "ode_sample", "sample"]


@dataclass
class SampleResult:
    """ODE samples: decoded grey levels, the ODE end state and the solver's cost."""

    samples: Tensor  # [N, ...] int64 grey levels in [0, num_levels)
    z0: Tensor  # [N, ...] float64 ODE state at gamma_min
    nfe: int  # batched network evaluations (forward passes)


def ode_sample(
    model: DiffusionODE,
    num_samples: int = 16,
    shape: tuple[int, ...] = (3, 32, 32),
    *,
    num_levels: int = 256,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: Generators = None,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    net_kwargs: dict | None = None,
) -> SampleResult:
    """Integrate the ODE from x(gamma_max) = sigma_max * noise down to gamma_min and decode.

    noise: [N, ...] standard normal draws (default: drawn from ``generator``, one per example
    when it is a list). The decoder's argmax is the nearest bin centre to z0 / alpha_min.
    """
    s = model.schedule
    if device is None:
        params = list(model.parameters())
        device = params[0].device if params else "cpu"
    if noise is None:
        noise = rng.randn((num_samples, *shape), generator, device=device, dtype=torch.float64)
    n, shape = noise.shape[0], tuple(noise.shape[1:])
    kw = net_kwargs or {}

    def field_(t: Tensor, y: Tensor) -> Tensor:
        return model.drift(y.reshape(y.shape[0], *shape), t, **kw).flatten(1)  # rows running

    y0 = (math.sqrt(s.sigma2_max) * noise.to(torch.float64)).flatten(1)
    with eval_mode(model), torch.no_grad():
        sol = solve_ivp(field_, y0, s.gamma_max, s.gamma_min, rtol=rtol, atol=atol)
    z0 = sol.y.reshape(n, *shape)
    # the decoder's single division by alpha_min (method.md §6.4), then the nearest bin centre
    return SampleResult(nearest_level(z0 / s.alpha_min, num_levels), z0, sol.nfe)


def sample(
    model: DiffusionODE,
    num_samples: int = 16,
    shape: tuple[int, ...] = (3, 32, 32),
    *,
    num_levels: int = 256,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: Generators = None,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    net_kwargs: dict | None = None,
) -> Tensor:
    """ODE samples decoded to integer grey levels, [num_samples, *shape] int64."""
    return ode_sample(
        model,
        num_samples,
        shape,
        num_levels=num_levels,
        rtol=rtol,
        atol=atol,
        generator=generator,
        device=device,
        noise=noise,
        net_kwargs=net_kwargs,
    ).samples
