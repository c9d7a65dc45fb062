"""Flow-matching velocity fields on the linear path as a ``DiffusionODE`` on idode's SP schedule.

The linear (rectified-flow / conditional-OT) path in facebookresearch/flow_matching's convention
(t = 0 noise, t = 1 data) is x_t = t x1 + (1 - t) eps with velocity u = d x_t / dt = x1 - eps. It
*is* idode's straight-path schedule (method.md §1.3): alpha = t = sigmoid(-gamma/2),
sigma = 1 - t = sigmoid(gamma/2), so gamma = 2 log((1 - t) / t) and the state needs no rescaling
(z = x_t). idode's SP velocity is F = (eps - x0)/sqrt2, hence

    t = sigmoid(-gamma / 2),   F_hat(z, gamma) = -u(z, t) / sqrt2,

and idode's drift alpha sigma F / (2 det) = -alpha sigma u / 2 = u dt/dgamma, the same flow.
The other convention (t = 0 data, t = 1 noise: x_t = (1 - t) x + t eps, v = eps - x) has
t = sigmoid(gamma/2) and F = v / sqrt2. The exact path reaches pure noise and pure data only at
gamma = +-inf; idode integrates over [gamma_min, gamma_max] with the prior N(0, sigma_max^2 I).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from idode.parameterization import DiffusionODE
from idode.schedules import SPSchedule

__all__ = ["VelocityNet", "from_velocity"]

VelocityFn = Callable[..., Tensor]
DataTime = Literal[1, 0]
_SQRT_HALF = math.sqrt(0.5)


class VelocityNet(nn.Module):
    """``net(z, gamma)``: idode's SP velocity F_hat from a flow-matching velocity u(x_t, t)."""

    def __init__(self, velocity_fn: VelocityFn, data_time: DataTime = 1) -> None:
        super().__init__()
        if isinstance(velocity_fn, nn.Module):
            self.velocity_fn = velocity_fn
        else:  # a plain function: keep it out of the module tree
            self.__dict__["velocity_fn"] = velocity_fn
        self.data_time = data_time

    def forward(self, z: Tensor, gamma: Tensor, **net_kwargs) -> Tensor:
        if self.data_time == 1:  # t = alpha: u = x1 - eps = -sqrt2 F
            return -_SQRT_HALF * self.velocity_fn(z, torch.sigmoid(-0.5 * gamma), **net_kwargs)
        # t = sigma: v = eps - x0 = sqrt2 F
        return _SQRT_HALF * self.velocity_fn(z, torch.sigmoid(0.5 * gamma), **net_kwargs)


def from_velocity(
    velocity_fn: VelocityFn,
    *,
    data_time: DataTime = 1,
    gamma_min: float = -13.3,
    gamma_max: float = 20.0,
) -> DiffusionODE:
    """A linear-path velocity field ``velocity_fn(x [B, ...], t [B]) -> u`` as a ``DiffusionODE``.

    ``data_time=1``: flow_matching's convention x_t = t x1 + (1 - t) eps (t = 0 noise, t = 1 data);
    ``data_time=0``: x_t = (1 - t) x + t eps. The ODE spans gamma in [gamma_min, gamma_max] on
    idode's SP schedule, i.e. data-end t = sigmoid(-gamma_min/2) (0.9987 by default) and noise-end
    t = sigmoid(-gamma_max/2) (4.5e-5) for ``data_time=1``.
    """
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable as u(x, t), got {type(velocity_fn)}")
    if data_time not in (0, 1) or isinstance(data_time, bool):
        raise ValueError(
            f"data_time must be 1 (t = 1 is data, flow_matching's convention) or 0 (t = 0 is "
            f"data), got {data_time!r}"
        )
    schedule = SPSchedule(gamma_min=gamma_min, gamma_max=gamma_max)
    return DiffusionODE(VelocityNet(velocity_fn, data_time), schedule, parameterization="velocity")
