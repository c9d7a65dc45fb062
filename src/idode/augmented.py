"""The augmented probability-flow ODE d(z, l)/dgamma = (h(z, gamma), div h): its vector field,
the Hutchinson probes it carries, and the prior log-density at its end (method.md §6.1).

``likelihood.log_likelihood`` solves it for one batch; ``continuous`` streams (example, draw)
jobs through it. Float64 boundary: the state (z, l) is float64; the network runs in its own
dtype inside ``DiffusionODE.predict``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from idode.dequantization import LOG_2PI
from idode.divergence import (
    Divergence,
    exact_divergence,
    hutchinson_divergence,
    sample_probes,
    warn_exact_cost,
)
from idode.parameterization import DiffusionODE
from idode.rng import Generators

__all__ = ["augmented_field", "eval_mode", "gaussian_log_prob", "hutchinson_probes"]


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Evaluate with dropout off, then restore the module's previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def gaussian_log_prob(z: Tensor, variance: float) -> Tensor:
    """log N(z; 0, variance I), summed over all but the batch dim: [B]."""
    d = z[0].numel()
    return -0.5 * d * (LOG_2PI + math.log(variance)) - 0.5 * z.flatten(1).square().sum(1) / variance


def hutchinson_probes(
    num_probes: int, shape: tuple, kind: str, generator: Generators, device
) -> Tensor:
    """Probes of ``shape`` [B, ...] (one probe) or [P, B, ...] (P = ``num_probes`` > 1)."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if num_probes == 1:
        return sample_probes(shape, kind, generator=generator, device=device)
    return sample_probes(
        (num_probes, *shape), kind, generator=generator, device=device, batch_dim=1
    )


def augmented_field(
    model: DiffusionODE,
    divergence: Divergence,
    shape: tuple[int, ...],
    net_kwargs: dict | None = None,
    exact_chunk_size: int = 16,
):
    """f(t [b], y [b, d + 1], probes [b, ...] | [b, P, ...] | None) -> d(z, l)/dgamma [b, d + 1].

    The probability-flow drift h of z and div h (exact, or Hutchinson with the rows' probes).
    """
    kw = net_kwargs or {}
    d = math.prod(shape)
    if divergence == "exact":
        warn_exact_cost(d, exact_chunk_size)  # before the solve starts

    def field_(t: Tensor, y: Tensor, probes: Tensor | None = None) -> Tensor:
        b = y.shape[0]
        x = y[:, :d].reshape(b, *shape)

        def h(x_: Tensor) -> Tensor:
            return model.drift(x_, t, **kw)

        # the network's TF32 switches for the VJP too (predict autocasts the forward itself)
        with model.precision_scope(x.device, autocast=False):
            if divergence == "exact":
                out, div = exact_divergence(h, x, chunk_size=exact_chunk_size)
            else:
                u = probes.transpose(0, 1) if probes.ndim == x.ndim + 1 else probes
                out, div = hutchinson_divergence(h, x, u)
        return torch.cat([out.detach().flatten(1), div.detach()[:, None]], dim=1)

    return field_
