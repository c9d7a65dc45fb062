import torch

from idode.time_sampling import sample_gamma, sample_quantiles


def test_antithetic_quantiles_are_stratified():
    u = sample_quantiles(16, antithetic=True, generator=torch.Generator().manual_seed(3))
    assert u.min() >= 0 and u.max() < 1
    # one point in each of the 16 strata
    assert sorted((u * 16).floor().long().tolist()) == list(range(16))


def test_importance_sampling_has_density_alpha2_over_z(schedule):
    """The histogram of IS gammas matches alpha^2/Z, and alpha^2/p is the constant Z."""
    gs = sample_gamma(
        schedule,
        200_000,
        importance_sampling=True,
        antithetic=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert gs.gamma.min() >= schedule.gamma_min and gs.gamma.max() <= schedule.gamma_max
    torch.testing.assert_close(
        gs.alpha2_over_density, torch.full_like(gs.gamma, schedule.importance_normalizer)
    )
    edges = torch.linspace(schedule.gamma_min, schedule.gamma_max, 11, dtype=torch.float64)
    w = schedule.cumulative_weight(edges)
    expected = (w[1:] - w[:-1]) / schedule.importance_normalizer
    counts = torch.histc(gs.gamma, bins=10, min=schedule.gamma_min, max=schedule.gamma_max)
    torch.testing.assert_close(counts.double() / 200_000, expected, atol=4e-3, rtol=0)


def test_uniform_sampling_weight(schedule):
    gs = sample_gamma(schedule, 1000, importance_sampling=False)
    torch.testing.assert_close(
        gs.alpha2_over_density, schedule.gamma_range * schedule.alpha2(gs.gamma)
    )
