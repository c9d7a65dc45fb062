"""Noise schedules in the gamma = log(sigma^2 / alpha^2) convention (method.md §1).

gamma is minus the log-SNR. Every quantity is written in a stable form: alpha^2 and sigma^2 are
sigmoids of -gamma and +gamma (never ``1 - sigmoid``), logs go through ``logsigmoid`` and
``softplus``.
The forward process is ``x_gamma = alpha * x0 + sigma * eps``.

Each schedule also owns the two schedule-specific pieces of the i-DODE method:
- the normalised-velocity coefficients ``(a, b)`` with ``F* = a * eps - b * x0`` (method.md §2.4);
- the cumulative likelihood weight ``W(gamma) = int_{gamma_min}^{gamma} alpha^2`` and its inverse,
  which define the importance-sampling proposal ``p(gamma) = alpha^2 / Z`` (method.md §4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from idode.choices import ScheduleName

__all__ = ["Schedule", "VPSchedule", "SPSchedule", "make_schedule"]


class Schedule:
    """Fixed-linear gamma(t) = gamma_min + (gamma_max - gamma_min) t, t in [0, 1]."""

    name: str = ""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        gamma_min, gamma_max = float(gamma_min), float(gamma_max)
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max)) or gamma_min >= gamma_max:
            raise ValueError(
                f"schedule needs finite gamma_min < gamma_max, got gamma_min={gamma_min}, "
                f"gamma_max={gamma_max}; the paper uses gamma_min=-13.3, gamma_max=5.0"
            )
        self.gamma_min = gamma_min
        self.gamma_max = gamma_max

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma_min={self.gamma_min}, gamma_max={self.gamma_max})"

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.gamma_min == other.gamma_min  # type: ignore[attr-defined]
            and self.gamma_max == other.gamma_max  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.gamma_min, self.gamma_max))

    # --- time <-> gamma (§1.1) -------------------------------------------------------------------
    @property
    def gamma_range(self) -> float:
        return self.gamma_max - self.gamma_min

    def gamma(self, t: Tensor) -> Tensor:
        return self.gamma_min + self.gamma_range * t

    def t_of_gamma(self, gamma: Tensor) -> Tensor:
        return (gamma - self.gamma_min) / self.gamma_range

    # --- marginal coefficients (subclasses) ------------------------------------------------------
    def log_alpha(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha2(self, gamma: Tensor) -> Tensor:
        return self.alpha(gamma).square()

    def sigma2(self, gamma: Tensor) -> Tensor:
        return self.sigma(gamma).square()

    def dlog_alpha_dgamma(self, gamma: Tensor) -> Tensor:
        """f(gamma) = d log(alpha)/d gamma, the forward SDE's drift coefficient in gamma-time."""
        raise NotImplementedError

    # --- i-DODE specifics ------------------------------------------------------------------------
    def velocity_coefficients(self, gamma: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(a, b) with the normalised velocity target F* = a * eps - b * x0 (method.md §2.4)."""
        raise NotImplementedError

    def velocity_det(self) -> float:
        """alpha * a + sigma * b, a constant for both schedules (1 for VP, 1/sqrt(2) for SP)."""
        raise NotImplementedError

    def cumulative_weight(self, gamma: Tensor) -> Tensor:
        """W(gamma) = int_{gamma_min}^{gamma} alpha^2 dgamma' (method.md §4)."""
        raise NotImplementedError

    def inverse_cumulative_weight(self, w: Tensor) -> Tensor:
        """gamma with W(gamma) = w, for w in [0, Z]."""
        raise NotImplementedError

    @property
    def importance_normalizer(self) -> float:
        """Z = int_{gamma_min}^{gamma_max} alpha^2 dgamma (13.293286 VP, 11.299108 SP)."""
        g = torch.tensor(self.gamma_max, dtype=torch.float64)
        return float(self.cumulative_weight(g))

    # --- endpoints, in float64 --------------------------------------------------------------------
    def _at(self, fn, gamma: float) -> float:
        return float(fn(torch.tensor(gamma, dtype=torch.float64)))

    @property
    def alpha_min(self) -> float:
        return self._at(self.alpha, self.gamma_min)

    @property
    def sigma_min(self) -> float:
        return self._at(self.sigma, self.gamma_min)

    @property
    def sigma2_max(self) -> float:
        """Variance of the ODE prior N(0, sigma_max^2 I) (0.993307 VP, 0.854038 SP)."""
        return self._at(self.sigma2, self.gamma_max)

    @property
    def alpha2_max(self) -> float:
        return self._at(self.alpha2, self.gamma_max)


class VPSchedule(Schedule):
    """Variance preserving: sigma^2 = sigmoid(gamma), alpha^2 = sigmoid(-gamma) (method.md §1.2)."""

    name = "VP"

    def log_alpha(self, gamma: Tensor) -> Tensor:
        return 0.5 * F.logsigmoid(-gamma)

    def log_sigma(self, gamma: Tensor) -> Tensor:
        return 0.5 * F.logsigmoid(gamma)

    def alpha2(self, gamma: Tensor) -> Tensor:
        return torch.sigmoid(-gamma)

    def sigma2(self, gamma: Tensor) -> Tensor:
        return torch.sigmoid(gamma)

    def alpha(self, gamma: Tensor) -> Tensor:
        return torch.sigmoid(-gamma).sqrt()

    def sigma(self, gamma: Tensor) -> Tensor:
        return torch.sigmoid(gamma).sqrt()

    def dlog_alpha_dgamma(self, gamma: Tensor) -> Tensor:
        return -0.5 * torch.sigmoid(gamma)

    def velocity_coefficients(self, gamma: Tensor) -> tuple[Tensor, Tensor]:
        # F* = alpha eps - sigma x0 (v-prediction)
        return self.alpha(gamma), self.sigma(gamma)

    def velocity_det(self) -> float:
        return 1.0

    def cumulative_weight(self, gamma: Tensor) -> Tensor:
        # int alpha^2 = int sigmoid(-g) dg = -softplus(-g)
        return F.softplus(-torch.as_tensor(self.gamma_min, dtype=gamma.dtype)) - F.softplus(-gamma)

    def inverse_cumulative_weight(self, w: Tensor) -> Tensor:
        # softplus(-gamma) = softplus(-gamma_min) - w  =>  gamma = -log(expm1(.)), stable (§4)
        s = F.softplus(-torch.as_tensor(self.gamma_min, dtype=w.dtype)) - w
        return -torch.log(torch.expm1(s))


class SPSchedule(Schedule):
    """Straight path: sigma = sigmoid(gamma/2), alpha = sigmoid(-gamma/2) = 1 - sigma (§1.3)."""

    name = "SP"

    def log_alpha(self, gamma: Tensor) -> Tensor:
        return F.logsigmoid(-0.5 * gamma)

    def log_sigma(self, gamma: Tensor) -> Tensor:
        return F.logsigmoid(0.5 * gamma)

    def alpha(self, gamma: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * gamma)

    def sigma(self, gamma: Tensor) -> Tensor:
        return torch.sigmoid(0.5 * gamma)

    def dlog_alpha_dgamma(self, gamma: Tensor) -> Tensor:
        return -0.5 * torch.sigmoid(0.5 * gamma)

    def velocity_coefficients(self, gamma: Tensor) -> tuple[float, float]:
        # F* = (eps - x0) / sqrt(2)
        return math.sqrt(0.5), math.sqrt(0.5)

    def velocity_det(self) -> float:
        return math.sqrt(0.5)

    def _c(self, gamma: Tensor) -> Tensor:
        # C(gamma) = log sigma - sigma; int alpha^2 dgamma = 2 C(gamma) + const (method.md §4)
        return self.log_sigma(gamma) - self.sigma(gamma)

    def cumulative_weight(self, gamma: Tensor) -> Tensor:
        g0 = torch.as_tensor(self.gamma_min, dtype=gamma.dtype)
        return 2.0 * (self._c(gamma) - self._c(g0))

    def inverse_cumulative_weight(self, w: Tensor) -> Tensor:
        # No elementary inverse: bisection in float64 over [gamma_min, gamma_max]. 64 halvings take
        # the bracket of width 18.3 below float64 resolution (the official code uses 100).
        dtype = w.dtype
        w64 = w.to(torch.float64)
        lo = torch.full_like(w64, self.gamma_min)
        hi = torch.full_like(w64, self.gamma_max)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self.cumulative_weight(mid) <= w64
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(dtype)


SCHEDULES: dict[str, type[Schedule]] = {"VP": VPSchedule, "SP": SPSchedule}


def make_schedule(name: ScheduleName, gamma_min: float = -13.3, gamma_max: float = 5.0) -> Schedule:
    """Build a schedule by name ("VP" or "SP")."""
    key = str(name).upper()
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES)}")
    return SCHEDULES[key](gamma_min=gamma_min, gamma_max=gamma_max)
