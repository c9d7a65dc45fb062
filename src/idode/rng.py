"""Random draws from one generator or from one generator per example.

Evaluation wants an example's randomness (dequantization noise, Hutchinson probe) to depend only
on the example, not on its batch or on the process that evaluates it. Every sampler in idode that
takes ``generator=`` also accepts a sequence of generators, one per example along ``batch_dim``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Generators", "rand", "randn", "randint", "example_generators"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(
    fn: Callable[..., Tensor], shape: tuple[int, ...], generator: Generators, batch_dim: int, **kw
) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, **kw)
    if len(generator) != shape[batch_dim]:
        raise ValueError(
            f"got {len(generator)} per-example generators for a batch of {shape[batch_dim]}"
        )
    # dims before batch_dim (e.g. several probes) are drawn per example too
    per = shape[:batch_dim] + shape[batch_dim + 1 :]
    return torch.stack([fn(per, generator=g, **kw) for g in generator], dim=batch_dim)


def rand(shape, generator: Generators = None, *, batch_dim: int = 0, **kw) -> Tensor:
    return _draw(torch.rand, tuple(shape), generator, batch_dim, **kw)


def randn(shape, generator: Generators = None, *, batch_dim: int = 0, **kw) -> Tensor:
    return _draw(torch.randn, tuple(shape), generator, batch_dim, **kw)


def randint(high: int, shape, generator: Generators = None, *, batch_dim: int = 0, **kw) -> Tensor:
    return _draw(
        lambda s, **k: torch.randint(0, high, s, **k), tuple(shape), generator, batch_dim, **kw
    )


def example_generators(
    seed: int, indices: Sequence[int] | Tensor, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per example, seeded from (seed, example index) alone."""
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        gens.append(g)
    return gens
