import pytest
import torch

from idode import rng


def test_per_example_draws_depend_only_on_the_example():
    gens = rng.example_generators(3, [10, 11, 12])
    a = rng.randn((3, 4), gens)
    b = rng.randn((1, 4), rng.example_generators(3, [11]))
    torch.testing.assert_close(a[1:2], b)
    probes = rng.randint(2, (5, 3, 4), rng.example_generators(3, [10, 11, 12]), batch_dim=1)
    assert probes.shape == (5, 3, 4)
    with pytest.raises(ValueError, match="per-example generators for a batch of 2"):
        rng.rand((2, 4), gens)
