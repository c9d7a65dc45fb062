"""Adapters on Gaussian data: exact velocity fields and denoisers give closed-form likelihoods."""

import math

import numpy as np
import pytest
import torch
from adapter_problems import (
    as_column,
    gaussian_data,
    linear_path_coefficients,
    posterior_means,
    sample_marginal,
    truncated_flow_log_density,
    vp_coefficients,
)

import idode
import idode.adapters

SHAPE = (2, 2, 2)


def _torch(a):
    return torch.as_tensor(a, dtype=torch.float64)


class ExactFlowMatchingVelocity:
    """u(x_t, t) for Gaussian data on the linear path, written in flow-matching terms."""

    def __init__(self, mu, s2, data_time: int) -> None:
        self.mu, self.s2, self.data_time = _torch(mu), _torch(s2), data_time
        self.times: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.times.append(t)
        t = as_column(t, x)
        if self.data_time == 1:  # x_t = t x1 + (1 - t) eps, u = x1 - eps
            x1, eps = posterior_means(x, t, 1 - t, self.mu, self.s2)
            return x1 - eps
        x0, eps = posterior_means(x, 1 - t, t, self.mu, self.s2)  # x_t = (1 - t) x + t eps
        return eps - x0


@pytest.mark.parametrize("data_time", [1, 0])
def test_from_velocity_matches_the_closed_form_likelihood(data_time):
    mu, s2 = gaussian_data(SHAPE)
    u = ExactFlowMatchingVelocity(mu, s2, data_time)
    model = idode.adapters.from_velocity(u, data_time=data_time, gamma_min=-8.0, gamma_max=12.0)
    assert isinstance(model, idode.DiffusionODE) and model.schedule.name == "SP"
    # the start of the ODE in flow-matching time, and the path there
    t0 = 1.0 / (1.0 + math.exp(-4.0))  # data end: t = sigmoid(-gamma_min/2) for data_time=1
    t_start = t0 if data_time == 1 else 1.0 - t0
    a0, b0 = (t_start, 1 - t_start) if data_time == 1 else (1 - t_start, t_start)
    assert (a0, b0) == pytest.approx(linear_path_coefficients(-8.0))
    x = sample_marginal(mu, s2, a0, b0, n=4)
    ll = idode.log_likelihood(model, _torch(x), "exact", rtol=1e-9, atol=1e-9)
    start, end = linear_path_coefficients(-8.0), linear_path_coefficients(12.0)
    exact = truncated_flow_log_density(x, mu, s2, start, end, prior_var=end[1] ** 2)
    np.testing.assert_allclose(ll.logp.numpy(), exact, rtol=0, atol=1e-6)
    # the velocity field saw flow-matching times in (0, 1), one per example, data end first
    ts = torch.cat(u.times)
    assert ts.min() > 0 and ts.max() < 1 and u.times[0].shape == (4,)
    assert u.times[0][0].item() == pytest.approx(t_start)


def test_from_velocity_the_wrong_convention_is_a_different_model():
    """Reading a t=1-data field as t=0-data gives a far worse likelihood: the flag matters."""
    mu, s2 = gaussian_data(SHAPE)
    x = _torch(sample_marginal(mu, s2, *linear_path_coefficients(-8.0), n=4))
    kw = dict(gamma_min=-8.0, gamma_max=12.0)
    right = idode.adapters.from_velocity(ExactFlowMatchingVelocity(mu, s2, 1), **kw)
    wrong = idode.adapters.from_velocity(ExactFlowMatchingVelocity(mu, s2, 1), data_time=0, **kw)
    ll_right = idode.log_likelihood(right, x, "exact", rtol=1e-6, atol=1e-6).logp
    ll_wrong = idode.log_likelihood(wrong, x, "exact", rtol=1e-6, atol=1e-6).logp
    assert (ll_right - ll_wrong).min() > 5.0


def test_from_velocity_default_range_and_errors():
    model = idode.adapters.from_velocity(lambda x, t: x)
    # data end t = sigmoid(6.65) = 0.99871, noise end t = sigmoid(-10) = 4.54e-5
    assert model.schedule.alpha_min == pytest.approx(1 / (1 + math.exp(-6.65)))
    assert math.sqrt(model.schedule.alpha2_max) == pytest.approx(1 / (1 + math.exp(10.0)))
    with pytest.raises(ValueError, match="data_time must be 1"):
        idode.adapters.from_velocity(lambda x, t: x, data_time=2)
    with pytest.raises(TypeError, match="callable"):
        idode.adapters.from_velocity("not a function")


class ExactEDMDenoiser(torch.nn.Module):
    """D(x, sigma) = E[x0 | x0 + sigma eps] for Gaussian data, in VE coordinates (EDM's form)."""

    def __init__(self, mu, s2) -> None:
        super().__init__()
        self.mu, self.s2 = _torch(mu), _torch(s2)
        self.sigmas: list[torch.Tensor] = []

    def forward(self, x, sigma):
        self.sigmas.append(sigma)
        sigma = as_column(sigma, x)
        return self.mu + self.s2 / (self.s2 + sigma**2) * (x - self.mu)


def test_from_denoiser_matches_the_closed_form_ve_likelihood():
    """log p_VE(x) = log p_VP(alpha_min x) + d log alpha_min equals the VE model's closed form."""
    mu, s2 = gaussian_data(SHAPE)
    den = ExactEDMDenoiser(mu, s2)
    sigma_min, sigma_max = 0.002, 80.0
    model = idode.adapters.from_denoiser(den, sigma_min, sigma_max)
    assert model.schedule.gamma_min == pytest.approx(2 * math.log(sigma_min))
    assert model.schedule.gamma_max == pytest.approx(2 * math.log(sigma_max))
    x = sample_marginal(mu, s2, 1.0, sigma_min, n=4)  # VE data + VE noise at sigma_min
    alpha_min = model.schedule.alpha_min
    d = x[0].size
    ll = idode.log_likelihood(model, alpha_min * _torch(x), "exact", rtol=1e-9, atol=1e-9)
    ll_ve = ll.logp + d * math.log(alpha_min)
    # VE: x(sigma) = x0 + sigma eps, prior N(0, sigma_max^2), path coefficients (1, sigma)
    exact = truncated_flow_log_density(
        x, mu, s2, (1.0, sigma_min), (1.0, sigma_max), prior_var=sigma_max**2
    )
    np.testing.assert_allclose(ll_ve.numpy(), exact, rtol=0, atol=1e-6)
    # the denoiser was called with VE sigmas in [sigma_min, sigma_max], first sigma_min
    sig = torch.cat(den.sigmas)
    assert den.sigmas[0][0].item() == pytest.approx(sigma_min)
    assert sig.min() >= sigma_min * (1 - 1e-9) and sig.max() <= sigma_max * (1 + 1e-9)


def test_from_denoiser_bits_per_dim_of_the_exact_discrete_model_is_the_entropy():
    """An exact denoiser of i.i.d. 4-level data: bits/dim of the data ~= the entropy H(P)."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    centers = (2 * torch.arange(4, dtype=torch.float64) + 1) / 4 - 1

    def denoiser(x, sigma):  # E[x0 | x0 + sigma eps], x0 on the bin centres
        s = as_column(sigma, x)[..., None]
        logits = probs.log() - 0.5 * (x[..., None] - centers).square() / s**2
        return (logits.softmax(-1) * centers).sum(-1)

    model = idode.adapters.from_denoiser(denoiser, sigma_min=0.01, sigma_max=80.0)
    gen = torch.Generator().manual_seed(0)
    k = torch.multinomial(probs, 2 * 32, replacement=True, generator=gen).reshape(32, 2)
    res = idode.bits_per_dim(
        model, k, num_levels=4, divergence="exact", analytic_entropy=False, generator=gen
    )
    exact = -probs.log()[k].sum(1) / (2 * math.log(2))
    assert (res.bpd - exact).abs().max() < 0.05
    assert abs((res.bpd - exact).mean().item()) < 0.01


def test_from_denoiser_errors():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        idode.adapters.from_denoiser(lambda x, s: x, sigma_min=80.0, sigma_max=0.002)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        idode.adapters.from_denoiser(lambda x, s: x, sigma_min=0.0)


def test_vp_coefficients_helper_agrees_with_idode():
    """The tests' numpy VP formulas are the schedule's (guards the references themselves)."""
    s = idode.VPSchedule()
    for g in (-9.0, 0.3, 7.0):
        a, b = vp_coefficients(g)
        assert a == pytest.approx(float(s.alpha(torch.tensor(g, dtype=torch.float64))))
        assert b == pytest.approx(float(s.sigma(torch.tensor(g, dtype=torch.float64))))
