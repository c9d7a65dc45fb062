"""Divergence of a vector field: exact (chunked) or Hutchinson (method.md §5.2, §6.1).

``fn`` maps x [B, ...] -> out [B, ...] with each example depending only on itself. The divergence
returned is sum_i d out_i / d x_i per example, shape [B], in ``fn``'s output dtype.
Both estimators cost one forward pass plus vector-Jacobian products (reverse mode).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from idode import rng
from idode.choices import DIVERGENCES, PROBE_KINDS, Divergence, ProbeKind
from idode.rng import Generators

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "ExactDivergenceCost",
    "PROBE_KINDS",
    "ProbeKind",
    "exact_divergence",
    "first_order_input_gradients",
    "first_order_only",
    "hutchinson_divergence",
    "sample_probes",
    "warn_exact_cost",
]


_FIRST_ORDER_ONLY = threading.local()
EXACT_WARN_DIMS = 1024  # above this, exact divergence is said to cost what it costs, up front


class ExactDivergenceCost(UserWarning):
    """Exact divergence on many dimensions: d VJPs per network evaluation."""


def warn_exact_cost(num_dims: int, chunk_size: int = 16) -> None:
    """One warning before a solve with exact divergence on more than ``EXACT_WARN_DIMS`` dims."""
    if num_dims > EXACT_WARN_DIMS:
        warnings.warn(
            f"exact divergence on d = {num_dims} dimensions costs {num_dims} vector-Jacobian "
            f"products per network evaluation ({-(-num_dims // chunk_size)} batched passes of "
            f"{chunk_size}): about {num_dims}x the network work of divergence='rademacher' (one "
            f"VJP), {200 * num_dims:,} VJPs for an image at a typical 200 evaluations",
            ExactDivergenceCost,
            stacklevel=3,
        )


@contextlib.contextmanager
def first_order_input_gradients() -> Iterator[None]:
    """Promise that gradients w.r.t. the input inside this block are never differentiated again.

    The ODE likelihood needs one VJP per step, so a network may then use kernels without a double
    backward (the UNet's fused attention, about 2x faster) instead of twice-differentiable ones
    that the second-order loss needs. Networks ask ``first_order_only()``.
    """
    prev = getattr(_FIRST_ORDER_ONLY, "on", False)
    _FIRST_ORDER_ONLY.on = True
    try:
        yield
    finally:
        _FIRST_ORDER_ONLY.on = prev


def first_order_only() -> bool:
    """True inside ``first_order_input_gradients()`` (on this thread)."""
    return getattr(_FIRST_ORDER_ONLY, "on", False)


def sample_probes(
    shape: tuple[int, ...] | torch.Size,
    kind: ProbeKind = "rademacher",
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_dim: int = 0,
) -> Tensor:
    """Hutchinson probes u with E[u u^T] = I: Rademacher (+-1, the default) or standard Gaussian.

    ``generator`` may be one generator per example (along ``batch_dim``).
    """
    if kind == "rademacher":
        bits = rng.randint(2, shape, generator, batch_dim=batch_dim, device=device)
        return (2 * bits - 1).to(dtype)
    if kind == "gaussian":
        return rng.randn(shape, generator, batch_dim=batch_dim, device=device, dtype=dtype)
    raise ValueError(f"unknown probe kind {kind!r}; valid: {', '.join(map(repr, PROBE_KINDS))}")


def _leaf(x: Tensor) -> Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def hutchinson_divergence(
    fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor, *, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """(fn(x), u^T (d fn/d x) u) with probes u shaped like x ([B, ...]) or [P, B, ...] (averaged).

    With P probes the P vector-Jacobian products share one forward pass.
    """
    multi = probes.ndim == x.ndim + 1
    if probes.shape[int(multi) :] != x.shape:
        raise ValueError(
            f"probes must be shaped like x {tuple(x.shape)} or [P, *x.shape], got "
            f"{tuple(probes.shape)}"
        )
    with torch.enable_grad():
        x = _leaf(x)
        out = fn(x)
        u = probes.to(out.dtype)
        if multi:
            (vjp,) = torch.autograd.grad(
                out, x, u, create_graph=create_graph, is_grads_batched=True
            )
            div = (vjp * u.to(vjp.dtype)).flatten(2).sum(-1).mean(0)
        else:
            (vjp,) = torch.autograd.grad(out, x, u, create_graph=create_graph)
            div = (vjp * u.to(vjp.dtype)).flatten(1).sum(-1)
    return out, div.to(out.dtype)


def exact_divergence(
    fn: Callable[[Tensor], Tensor], x: Tensor, *, chunk_size: int = 16
) -> tuple[Tensor, Tensor]:
    """(fn(x), tr(d fn/d x)) with d vector-Jacobian products, ``chunk_size`` at a time.

    Memory grows with ``chunk_size`` (one batched backward per chunk); cost is d/chunk_size
    backward passes, so this is for tests and small data (digits: d = 64).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.enable_grad():
        x = _leaf(x)
        out = fn(x)
        b, d = x.shape[0], x[0].numel()
        div = torch.zeros(b, dtype=out.dtype, device=out.device)
        for start in range(0, d, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, d), device=x.device)
            basis = torch.zeros(len(idx), b, d, dtype=out.dtype, device=out.device)
            basis[torch.arange(len(idx), device=x.device), :, idx] = 1.0
            last = start + chunk_size >= d
            (vjp,) = torch.autograd.grad(
                out,
                x,
                basis.reshape(len(idx), *out.shape),
                retain_graph=not last,
                is_grads_batched=True,
            )
            # vjp[c, b, :] = row idx[c] of the Jacobian of example b; keep its diagonal entry
            div += vjp.reshape(len(idx), b, d)[torch.arange(len(idx)), :, idx].sum(0).to(div.dtype)
    return out, div
