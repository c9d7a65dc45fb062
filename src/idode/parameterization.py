"""Network output <-> eps / x0 / velocity, and the probability-flow ODE drift (method.md §2).

All three parameterizations are written through one linear map. With x = alpha x0 + sigma eps and
the velocity target F* = a eps - b x0 (a, b from the schedule, det = alpha a + sigma b):

    eps = (b x + alpha F) / det,        x0 = (a x - sigma F) / det.

VP (a, b) = (alpha, sigma), det = 1: eps = alpha F + sigma x, x0 = alpha x - sigma F.
SP (a, b) = (1/sqrt2, 1/sqrt2), det = 1/sqrt2: eps = sqrt2 alpha F + x, x0 = x - sqrt2 sigma F.

The drift in gamma-time is h = f x + (sigma/2) eps_hat (E1), f = d log alpha / d gamma. For the
velocity parameterization it reduces exactly to h = (alpha sigma / (2 det)) F, which is what we
evaluate (no cancellation between the two terms of E1).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from idode.choices import PARAMETERIZATIONS, Parameterization
from idode.divergence import first_order_only
from idode.precision import PRECISIONS, Precision, precision_scope
from idode.schedules import Schedule
from idode.validation import check_choice

__all__ = ["Parameterization", "PARAMETERIZATIONS", "DiffusionODE", "expand"]

Net = Callable[[Tensor, Tensor], Tensor]


def expand(coef: Tensor | float, like: Tensor) -> Tensor | float:
    """Broadcast a per-example coefficient [B] against a batch [B, ...]."""
    if isinstance(coef, Tensor) and coef.ndim == 1:
        return coef.reshape(-1, *([1] * (like.ndim - 1)))
    return coef


class DiffusionODE(nn.Module):
    """A network plus a schedule plus a parameterization: everything the method needs.

    Args:
        net: callable ``net(z, gamma) -> Tensor`` shaped like ``z``; ``gamma`` has shape [B].
        schedule: ``VPSchedule`` or ``SPSchedule``.
        parameterization: what the network predicts: "eps", "x0" or "velocity" (i-DODE).
        precision: the network's arithmetic, "fp32" | "tf32" | "bf16" (``idode.precision``).
        compile: run the network through ``torch.compile`` (the solver and the VJP call stay
            eager); a compile failure falls back to eager with one warning.

    The network runs in its own dtype (that of its first floating parameter, else the input's);
    inputs are cast to it and outputs cast back to the caller's dtype at one call site, ``predict``.
    """

    def __init__(
        self,
        net: Net,
        schedule: Schedule,
        parameterization: Parameterization = "velocity",
        *,
        precision: Precision = "fp32",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable as net(z, gamma), got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be an idode.VPSchedule or idode.SPSchedule, got "
                f"{type(schedule).__name__}"
            )
        self.net = net
        self.schedule = schedule
        self.parameterization = check_choice(
            "parameterization", parameterization, PARAMETERIZATIONS
        )
        self.precision: Precision = check_choice("precision", precision, PRECISIONS)
        self.net_compile = bool(compile) and isinstance(net, nn.Module)
        self._compiled: Net | None = None  # built at the first call; not a submodule, not saved

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, parameterization={self.parameterization!r}, "
            f"precision={self.precision!r}, compile={self.net_compile}"
        )

    def __getstate__(self) -> dict:
        # deepcopy / pickle: the compiled wrapper is rebuilt on demand, never copied
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_compiled": None}

    def precision_scope(self, device: torch.device | str, *, autocast: bool = True):
        """The network's precision policy on ``device`` (``autocast=False`` around a VJP)."""
        device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
        return precision_scope(self.precision, device_type, autocast=autocast)

    def _call_net(self, z: Tensor, gamma: Tensor, net_kwargs: dict) -> Tensor:
        """The network (compiled when asked), under the precision policy."""
        with self.precision_scope(z.device):
            if not self.net_compile:
                return self.net(z, gamma, **net_kwargs)
            if self._compiled is None:  # a plain attribute: no "_compiled." keys in state_dict
                object.__setattr__(self, "_compiled", torch.compile(self.net))
            try:
                with self._frozen_for_vjp():
                    return self._compiled(z, gamma, **net_kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
                out = self.net(z, gamma, **net_kwargs)  # a genuine input error raises here
                self.net_compile, self._compiled = False, None
                warnings.warn(
                    f"torch.compile of the network failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); running it eagerly",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return out

    @contextlib.contextmanager
    def _frozen_for_vjp(self) -> Iterator[None]:
        """Inside the likelihood (``first_order_only``) no parameter gradient is ever asked for:
        a compiled backward would compute them anyway (eager autograd prunes them), so the
        compiled network sees its parameters frozen there (restored after the call)."""
        params = []
        if first_order_only() and torch.is_grad_enabled() and isinstance(self.net, nn.Module):
            params = [p for p in self.net.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @property
    def net_dtype(self) -> torch.dtype | None:
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                if p.dtype.is_floating_point:
                    return p.dtype
        return None

    # --- the single call site of the network ------------------------------------------------------
    def predict(self, z: Tensor, gamma: Tensor, **net_kwargs) -> Tensor:
        """Raw network output (eps_hat, x0_hat or F_hat, by ``parameterization``), in z's dtype."""
        if gamma.ndim != 1 or gamma.shape[0] != z.shape[0]:
            raise ValueError(
                f"gamma must have shape [B] = [{z.shape[0]}] (one log-SNR per example), got "
                f"{tuple(gamma.shape)}"
            )
        dtype = self.net_dtype or z.dtype
        out = self._call_net(z.to(dtype), gamma.to(dtype), net_kwargs)
        if not isinstance(out, Tensor) or out.shape != z.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the network must return a tensor shaped like z {tuple(z.shape)}, got {got}; "
                f"check that net(z, gamma) maps [B, ...] -> [B, ...]"
            )
        return out.to(z.dtype)

    forward = predict

    # --- conversions (method.md §2.2-2.4) ------------------------------------------------------
    def _coefs(self, z: Tensor, gamma: Tensor):
        s = self.schedule
        g = gamma.to(z.dtype)
        alpha, sigma = expand(s.alpha(g), z), expand(s.sigma(g), z)
        a, b = s.velocity_coefficients(g)
        return alpha, sigma, expand(a, z), expand(b, z), s.velocity_det()

    def eps_from(self, z: Tensor, gamma: Tensor, pred: Tensor) -> Tensor:
        """eps_hat from a raw prediction of this model's parameterization."""
        alpha, sigma, a, b, det = self._coefs(z, gamma)
        if self.parameterization == "eps":
            return pred
        if self.parameterization == "x0":
            return (z - alpha * pred) / sigma
        return (b * z + alpha * pred) / det

    def x0_from(self, z: Tensor, gamma: Tensor, pred: Tensor) -> Tensor:
        """x0_hat from a raw prediction."""
        alpha, sigma, a, b, det = self._coefs(z, gamma)
        if self.parameterization == "eps":
            return (z - sigma * pred) / alpha
        if self.parameterization == "x0":
            return pred
        return (a * z - sigma * pred) / det

    def velocity_from(self, z: Tensor, gamma: Tensor, pred: Tensor) -> Tensor:
        """Normalised velocity F_hat = a eps_hat - b x0_hat from a raw prediction."""
        if self.parameterization == "velocity":
            return pred
        _, _, a, b, _ = self._coefs(z, gamma)
        return a * self.eps_from(z, gamma, pred) - b * self.x0_from(z, gamma, pred)

    def target(self, x0: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
        """Regression target of this parameterization for x_gamma = alpha x0 + sigma eps."""
        if self.parameterization == "eps":
            return eps
        if self.parameterization == "x0":
            return x0
        a, b = self.schedule.velocity_coefficients(gamma.to(x0.dtype))
        return expand(a, x0) * eps - expand(b, x0) * x0

    def eps_hat(self, z: Tensor, gamma: Tensor) -> Tensor:
        return self.eps_from(z, gamma, self.predict(z, gamma))

    def x0_hat(self, z: Tensor, gamma: Tensor) -> Tensor:
        return self.x0_from(z, gamma, self.predict(z, gamma))

    def velocity_hat(self, z: Tensor, gamma: Tensor) -> Tensor:
        return self.velocity_from(z, gamma, self.predict(z, gamma))

    # --- probability-flow ODE in gamma-time (method.md §2.1, E1) ----------------------------------
    def drift(self, z: Tensor, gamma: Tensor, **net_kwargs) -> Tensor:
        """h(z, gamma) = dz/dgamma of the probability-flow ODE, in z's dtype."""
        return self.drift_from(z, gamma, self.predict(z, gamma, **net_kwargs))

    def drift_from(self, z: Tensor, gamma: Tensor, pred: Tensor) -> Tensor:
        """The drift from a raw network prediction."""
        alpha, sigma, _, _, det = self._coefs(z, gamma)
        if self.parameterization == "velocity":
            return alpha * sigma / (2.0 * det) * pred
        f = expand(self.schedule.dlog_alpha_dgamma(gamma.to(z.dtype)), z)
        if self.parameterization == "x0":
            # f x + (x - alpha x0_hat)/2 (method.md §2.3)
            return (f + 0.5) * z - 0.5 * alpha * pred
        return f * z + 0.5 * sigma * pred
