import math

import pytest
import torch

from idode.divergence import exact_divergence, hutchinson_divergence, sample_probes


def _field(x):
    # a nonlinear field with a full Jacobian and a closed-form divergence
    a = torch.tensor([[0.5, 1.0, -2.0], [0.3, -1.0, 0.7], [2.0, 0.1, 0.4]], dtype=x.dtype)
    return torch.tanh(x) + x @ a.T


def _true_div(x):
    return (1 - torch.tanh(x) ** 2).sum(1) + (0.5 - 1.0 + 0.4)


@pytest.mark.parametrize("chunk", [1, 2, 16])
def test_exact_divergence(chunk):
    x = torch.randn(5, 3, dtype=torch.float64)
    out, div = exact_divergence(_field, x, chunk_size=chunk)
    torch.testing.assert_close(out, _field(x))
    torch.testing.assert_close(div, _true_div(x))


def test_exact_divergence_on_images():
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    w = torch.randn(18, 18, dtype=torch.float64)
    fn = lambda z: (z.flatten(1) @ w.T).reshape(z.shape)  # noqa: E731
    _, div = exact_divergence(fn, x, chunk_size=5)
    torch.testing.assert_close(div, torch.full((2,), torch.trace(w).item(), dtype=torch.float64))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    n = 40_000
    x = torch.randn(1, 3, dtype=torch.float64).expand(n, 3)
    u = sample_probes((n, 3), kind, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, div = hutchinson_divergence(_field, x, u)
    se = div.std().item() / math.sqrt(n)
    assert se > 1e-3  # the field has off-diagonal Jacobian entries, so there is variance to test
    assert abs(div.mean().item() - _true_div(x[:1]).item()) < 4.5 * se


def test_multiple_probes_average():
    x = torch.randn(4, 3, dtype=torch.float64)
    u = sample_probes((6, 4, 3), "gaussian", dtype=torch.float64)
    _, div = hutchinson_divergence(_field, x, u)
    singles = torch.stack([hutchinson_divergence(_field, x, u[i])[1] for i in range(6)])
    torch.testing.assert_close(div, singles.mean(0))


def test_probes():
    u = sample_probes((1000, 7), "rademacher")
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="valid: 'rademacher', 'gaussian'"):
        sample_probes((2, 2), "uniform")
    with pytest.raises(ValueError, match="shaped like x"):
        hutchinson_divergence(_field, torch.zeros(2, 3), torch.zeros(2, 4))
