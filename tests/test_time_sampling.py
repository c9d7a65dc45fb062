from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from idode.time_sampling import sample_gamma, sample_quantiles


def test_antithetic_quantiles_are_stratified():
    u = sample_quantiles(16, antithetic=True, generator=torch.Generator().manual_seed(3))
    assert u.min() >= 0 and u.max() < 1
    # one point in each of the 16 strata
    assert sorted((u * 16).floor().long().tolist()) == list(range(16))


# alpha^2(gamma) written out from method.md §1.2-1.3, independently of idode.schedules
ALPHA2 = {
    "VP": lambda g: 1.0 / (1.0 + np.exp(g)),  # sigmoid(-gamma)
    "SP": lambda g: (1.0 / (1.0 + np.exp(g / 2.0))) ** 2,  # sigmoid(-gamma/2)^2
}


def _alpha2_integral(schedule, f, lo: float, hi: float) -> float:
    """int_lo^hi alpha^2(gamma) f(gamma) dgamma by adaptive quadrature."""
    a2 = ALPHA2[schedule.name]
    return quad(lambda g: a2(g) * f(g), lo, hi, epsabs=0.0, epsrel=1e-11, limit=200)[0]


def _iid_gammas(schedule, n: int, importance_sampling: bool):
    generator = torch.Generator().manual_seed(0)
    return sample_gamma(
        schedule, n, importance_sampling=importance_sampling, antithetic=False, generator=generator
    )


@pytest.mark.parametrize("importance_sampling", [True, False])
def test_weighted_gammas_integrate_alpha2_times_any_function(schedule, importance_sampling):
    """alpha^2/p is the importance weight of the drawn gammas: for any f,
    E_p[f(gamma) alpha^2/p] = int alpha^2 f dgamma (here against quadrature, within 4.5 SE)."""
    n = 200_000
    gs = _iid_gammas(schedule, n, importance_sampling)
    g = gs.gamma.double().numpy()
    assert g.min() >= schedule.gamma_min and g.max() <= schedule.gamma_max
    w = gs.alpha2_over_density.numpy()
    lo, hi = schedule.gamma_min, schedule.gamma_max
    for f in (lambda x: np.ones_like(x), np.cos, lambda x: (x - lo) ** 2 / (hi - lo) ** 2):
        values = f(g) * w
        exact = _alpha2_integral(schedule, f, lo, hi)
        se = values.std() / np.sqrt(n)
        assert abs(values.mean() - exact) < 4.5 * se + 1e-9 * abs(exact), (f, exact)
    if importance_sampling:  # the constant Z = int alpha^2 (13.293286 VP, 11.299108 SP)
        np.testing.assert_allclose(w, _alpha2_integral(schedule, np.ones_like, lo, hi), rtol=1e-9)


def test_importance_sampled_gammas_have_density_alpha2_over_z(schedule):
    """The histogram of IS gammas matches alpha^2/Z, both integrated by quadrature."""
    n = 200_000
    gs = _iid_gammas(schedule, n, importance_sampling=True)
    edges = np.linspace(schedule.gamma_min, schedule.gamma_max, 11)
    mass = np.array([_alpha2_integral(schedule, np.ones_like, a, b) for a, b in pairwise(edges)])
    counts, _ = np.histogram(gs.gamma.double().numpy(), bins=edges)
    p = mass / mass.sum()
    np.testing.assert_array_less(np.abs(counts / n - p), 4.5 * np.sqrt(p * (1 - p) / n))
