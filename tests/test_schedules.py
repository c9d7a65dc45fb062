import math

import pytest
import torch

import idode
from idode.schedules import make_schedule

# float64 reference values of method.md §1.5 and §4
TABLE = {
    "VP": dict(
        alpha_min=0.99999916,
        sigma_min=1.294021e-3,
        alpha_max=0.081810,
        sigma_max=0.996648,
        sigma2_max=0.993307,
        Z=13.293286,
    ),
    "SP": dict(
        alpha_min=0.99870765,
        sigma_min=1.292350e-3,
        alpha_max=0.075858,
        sigma_max=0.924142,
        sigma2_max=0.854038,
        Z=11.299108,
    ),
}
QUANTILES = {
    "VP": {0.1: -11.971, 0.5: -6.652, 0.9: -1.031},
    "SP": {0.1: -12.166, 0.5: -7.566, 0.9: -1.946},
}


def test_reference_values(schedule):
    ref = TABLE[schedule.name]
    g = torch.tensor([schedule.gamma_min, schedule.gamma_max], dtype=torch.float64)
    a, s = schedule.alpha(g), schedule.sigma(g)
    assert a[0].item() == pytest.approx(ref["alpha_min"], rel=1e-7)
    assert s[0].item() == pytest.approx(ref["sigma_min"], rel=1e-6)
    assert a[1].item() == pytest.approx(ref["alpha_max"], rel=1e-4)
    assert s[1].item() == pytest.approx(ref["sigma_max"], rel=1e-6)
    assert schedule.sigma2_max == pytest.approx(ref["sigma2_max"], rel=1e-6)
    assert schedule.importance_normalizer == pytest.approx(ref["Z"], rel=1e-7)
    # gamma = log(sigma^2 / alpha^2) by definition
    torch.testing.assert_close(2 * (schedule.log_sigma(g) - schedule.log_alpha(g)), g)


def test_definition_identities(schedule):
    g = torch.linspace(-20, 10, 301, dtype=torch.float64)
    a, s = schedule.alpha(g), schedule.sigma(g)
    torch.testing.assert_close(schedule.alpha2(g), a * a)
    torch.testing.assert_close(schedule.sigma2(g), s * s)
    torch.testing.assert_close(schedule.log_alpha(g).exp(), a)
    torch.testing.assert_close(schedule.log_sigma(g).exp(), s)
    if schedule.name == "VP":
        torch.testing.assert_close(a * a + s * s, torch.ones_like(g))
    else:
        torch.testing.assert_close(a + s, torch.ones_like(g))


def test_dlog_alpha_matches_autograd(schedule):
    g = torch.linspace(-13.3, 5.0, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(schedule.log_alpha(g).sum(), g)
    torch.testing.assert_close(schedule.dlog_alpha_dgamma(g.detach()), grad)


def test_time_gamma_round_trip(schedule):
    t = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_of_gamma(schedule.gamma(t)), t)
    g = schedule.gamma(t)
    torch.testing.assert_close(schedule.gamma(schedule.t_of_gamma(g)), g)


@pytest.mark.parametrize("gamma", [-13.3, -20.0, -12.0, 4.9, 5.0, 12.0])
def test_float32_matches_float64_near_both_ends(schedule, gamma):
    g32, g64 = torch.tensor([gamma]), torch.tensor([gamma], dtype=torch.float64)
    for name in (
        "alpha",
        "sigma",
        "alpha2",
        "sigma2",
        "log_alpha",
        "log_sigma",
        "dlog_alpha_dgamma",
    ):
        v32, v64 = getattr(schedule, name)(g32), getattr(schedule, name)(g64)
        # relative accuracy, also for the tiny quantities (sigma at gamma_min, alpha at gamma_max)
        assert v32.dtype == torch.float32
        assert abs(v32.double().item() - v64.item()) <= 1e-6 * abs(v64.item()) + 1e-30, name


def test_importance_cdf_and_inverse(schedule):
    from scipy.integrate import quad

    f = lambda g: float(schedule.alpha2(torch.tensor(g, dtype=torch.float64)))  # noqa: E731
    for g in (-12.0, -5.0, 0.0, 4.0):
        w = schedule.cumulative_weight(torch.tensor(g, dtype=torch.float64)).item()
        assert w == pytest.approx(quad(f, schedule.gamma_min, g, epsabs=1e-12)[0], rel=1e-9)
    z = schedule.importance_normalizer
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    g = schedule.inverse_cumulative_weight(u * z)
    assert g[0].item() == pytest.approx(schedule.gamma_min, abs=1e-9)
    assert g[-1].item() == pytest.approx(schedule.gamma_max, abs=1e-9)
    for q, ref in QUANTILES[schedule.name].items():
        assert g[u.tolist().index(q)].item() == pytest.approx(ref, abs=1e-3)
    uu = torch.rand(500, dtype=torch.float64)
    torch.testing.assert_close(
        schedule.cumulative_weight(schedule.inverse_cumulative_weight(uu * z)) / z,
        uu,
        atol=1e-12,
        rtol=0,
    )


def test_sp_inverse_matches_lambert_w():
    from scipy.special import lambertw

    s = idode.SPSchedule()
    u = torch.rand(100, dtype=torch.float64)
    z = s.importance_normalizer
    sig_min = s.sigma_min
    # W(gamma) = 2[(log sigma - sigma) - (log sigma_min - sigma_min)] = Z u  <=>  -sigma e^{-sigma}
    # = -e^c, so sigma = -W0(-e^c) (method.md §4); then gamma = 2 log(sigma / (1 - sigma))
    c = (math.log(sig_min) - sig_min) + z * u / 2
    sigma = torch.from_numpy(-lambertw(-torch.exp(c).numpy(), 0).real)
    gamma_ref = 2 * torch.log(sigma / (1 - sigma))
    torch.testing.assert_close(s.inverse_cumulative_weight(u * z), gamma_ref, atol=1e-8, rtol=0)


def test_make_schedule_and_errors():
    assert make_schedule("vp") == idode.VPSchedule()
    assert make_schedule("SP", -10, 4) == idode.SPSchedule(-10, 4)
    with pytest.raises(ValueError, match="valid: \\['SP', 'VP'\\]"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        idode.VPSchedule(gamma_min=5.0, gamma_max=-13.3)
