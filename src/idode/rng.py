"""Random draws from one generator or from one generator per example.

Evaluation wants an example's randomness (dequantization noise, Hutchinson probe) to depend only
on the example, not on its batch or on the process that evaluates it. Every sampler in idode that
takes ``generator=`` also accepts a sequence of generators, one per example along ``batch_dim``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Generators", "example_generators", "rand", "randint", "randn", "stream", "stream_seed"]

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


def stream_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed from (seed, purpose, index) by hashing: distinct triples, unrelated streams.

    A linear formula such as ``seed * 1_000_003 + index`` gives (0, 1_000_003) the stream of
    (1, 0); ImageNet-32 has 1.28M training images. BLAKE2b of the three values cannot collide
    that way.
    """
    key = f"{int(seed)}\x1f{purpose}\x1f{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def stream(
    seed: int, purpose: str, index: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of stream (seed, purpose, index), e.g. (eval seed, "dequantization", i)."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, purpose, index))
    return g


def example_generators(
    seed: int,
    indices: Sequence[int] | Tensor,
    device: torch.device | str = "cpu",
    purpose: str = "example",
) -> list[torch.Generator]:
    """One generator per example, from (seed, purpose, example index) alone."""
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    return [stream(seed, purpose, int(i), device) for i in indices]
