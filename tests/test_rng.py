"""Per-example random streams: one hashed derivation of (seed, purpose, index)."""

import itertools

import torch

from idode import rng


def test_the_old_linear_derivation_collision_is_gone():
    # seed * 1_000_003 + index gave (0, 1_000_003) the stream of (1, 0)
    a = rng.stream(0, "dequantization", 1_000_003)
    b = rng.stream(1, "dequantization", 0)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_distinct_triples_give_distinct_seeds():
    seeds = range(4)
    purposes = ("dequantization", "elbo", "sample", "train")
    indices = (0, 1, 2, 1_000_003, 1_281_166, 2**40)
    triples = list(itertools.product(seeds, purposes, indices))
    values = {rng.stream_seed(*t) for t in triples}
    assert len(values) == len(triples)
    assert all(0 <= v < 2**63 for v in values)


def test_streams_are_reproducible_and_match_example_generators():
    g1 = rng.example_generators(7, [3, 5], purpose="elbo")
    g2 = [rng.stream(7, "elbo", 3), rng.stream(7, "elbo", 5)]
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    # the stream of an example does not depend on which other examples are drawn with it
    alone = rng.randn((1, 4), rng.example_generators(7, [5], purpose="elbo"))
    batched = rng.randn((2, 4), rng.example_generators(7, [3, 5], purpose="elbo"))
    assert torch.equal(alone[0], batched[1])
    # purposes separate streams of the same (seed, index)
    x = torch.rand(4, generator=rng.stream(7, "elbo", 3))
    y = torch.rand(4, generator=rng.stream(7, "dequantization", 3))
    assert not torch.equal(x, y)
