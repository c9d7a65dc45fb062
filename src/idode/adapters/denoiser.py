"""k-diffusion / EDM denoisers D(x, sigma) in variance-exploding coordinates as a VP model.

A VE denoiser sees x = x0 + sigma_VE eps and returns an estimate of x0. idode's VP state with the
same signal-to-noise ratio is z = alpha x0 + sigma eps = alpha x with sigma / alpha = sigma_VE, so
(method.md §1.2, gamma = log(sigma^2 / alpha^2))

    sigma_VE = exp(gamma / 2),   x = z / alpha,   x0_hat(z, gamma) = D(x, sigma_VE),

an "x0" parameterization on VP [2 log sigma_min, 2 log sigma_max]. The two ODEs are the same flow:
z(gamma) = alpha(gamma) x(sigma_VE(gamma)), and the VE prior N(0, sigma_max^2) is the VP prior
N(0, alpha_max^2 sigma_max^2) = N(0, sigmoid(gamma_max)). So log p_VE(x) = log p_VP(alpha_min x)
+ d log alpha_min, and idode's dequantization at gamma_min puts
z / alpha_min = c(k) + sigma_min eps, exactly the VE data plus VE noise sigma_min: bits/dim are of
the data in the denoiser's own scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from idode.parameterization import DiffusionODE, expand
from idode.schedules import VPSchedule

__all__ = ["DenoiserNet", "from_denoiser"]

Denoiser = Callable[..., Tensor]


class DenoiserNet(nn.Module):
    """``net(z, gamma) = D(z / alpha, exp(gamma / 2))``: x0_hat of a VE denoiser, from VP inputs."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        if isinstance(denoiser, nn.Module):
            self.denoiser = denoiser
        else:  # a plain function: keep it out of the module tree
            self.__dict__["denoiser"] = denoiser

    def forward(self, z: Tensor, gamma: Tensor, **net_kwargs) -> Tensor:
        # 1/alpha = exp(-log alpha) = exp(-logsigmoid(-gamma)/2), stable for any gamma
        inv_alpha = expand((-0.5 * F.logsigmoid(-gamma)).exp(), z)
        sigma_ve = (0.5 * gamma).exp()  # [B]
        return self.denoiser(z * inv_alpha, sigma_ve, **net_kwargs)


def from_denoiser(
    denoiser: Denoiser, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> DiffusionODE:
    """A VE denoiser ``denoiser(x [B, ...], sigma [B]) -> x0_hat`` as a VP ``DiffusionODE``.

    For k-diffusion's wrapped models (``K.layers.Denoiser``, ``K.external.*Denoiser``) and EDM's
    preconditioned networks (``EDMPrecond(x, sigma)``). The ODE runs over sigma_VE in
    [sigma_min, sigma_max] (gamma = 2 log sigma_VE); data are in the denoiser's scale ([-1, 1]).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as D(x, sigma), got {type(denoiser)}")
    lo, hi = float(sigma_min), float(sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
        raise ValueError(
            f"from_denoiser needs finite 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max} (EDM and k-diffusion use 0.002 and 80)"
        )
    schedule = VPSchedule(gamma_min=2.0 * math.log(lo), gamma_max=2.0 * math.log(hi))
    return DiffusionODE(DenoiserNet(denoiser), schedule, parameterization="x0")
