import math

import pytest
import torch
from problems import (
    CorrelatedGaussianOptimalNet,
    DiscreteOptimalNet,
    GaussianOptimalNet,
    InDtype,
    gaussian_log_density,
    marginal_variance,
    mvn_log_density,
)

import idode
from idode.parameterization import PARAMETERIZATIONS


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_log_likelihood_equals_closed_form_gaussian(schedule, param):
    """x0 ~ N(0, s2 I): with the optimal F the ODE gives exactly log N(z; 0, v(gamma_min) I)."""
    s2, d = 0.5, 6
    model = idode.DiffusionODE(GaussianOptimalNet(schedule, s2, param), schedule, param)
    v_min, v_max = (
        marginal_variance(schedule, schedule.gamma_min, s2),
        marginal_variance(schedule, schedule.gamma_max, s2),
    )
    z = torch.randn(5, d, dtype=torch.float64) * v_min.sqrt()
    ll = idode.log_likelihood(model, z, divergence="exact", rtol=1e-5, atol=1e-5)
    assert ll.logp.shape == (5,) and ll.logp.dtype == torch.float64 and isinstance(ll.nfe, int)
    exact = gaussian_log_density(z, v_min)
    # with the exact prior N(0, v_max I) in place of N(0, sigma_max^2 I)
    corrected = ll.delta_logp + gaussian_log_density(ll.z_end, v_max)
    assert ((corrected - exact).abs() / d).max() < 1e-3
    # the reported logp differs from the exact one by exactly the prior mismatch
    torch.testing.assert_close(
        ll.logp - corrected, ll.prior_logp - gaussian_log_density(ll.z_end, v_max)
    )
    torch.testing.assert_close(ll.prior_logp, gaussian_log_density(ll.z_end, schedule.sigma2_max))
    # tighter tolerance, tighter answer
    ll = idode.log_likelihood(model, z, divergence="exact", rtol=1e-9, atol=1e-9)
    corrected = ll.delta_logp + gaussian_log_density(ll.z_end, v_max)
    assert ((corrected - exact).abs() / d).max() < 1e-7


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_float32_network_under_the_float64_state(schedule, param):
    """The closed-form Gaussian likelihood with the network in float32: the state, the divergence
    accumulation and log p stay float64, and the error is that of float32 network outputs."""
    s2, d = 0.5, 6
    net = InDtype(GaussianOptimalNet(schedule, s2, param), torch.float32)
    model = idode.DiffusionODE(net, schedule, param)
    v_min = marginal_variance(schedule, schedule.gamma_min, s2)
    v_max = marginal_variance(schedule, schedule.gamma_max, s2)
    z = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = z * v_min.sqrt()
    ll = idode.log_likelihood(model, z, divergence="exact", rtol=1e-6, atol=1e-6)
    assert ll.logp.dtype == ll.delta_logp.dtype == ll.z_end.dtype == torch.float64
    corrected = ll.delta_logp + gaussian_log_density(ll.z_end, v_max)
    assert ((corrected - gaussian_log_density(z, v_min)).abs() / d).max() < 1e-3


def _correlated(schedule):
    d = 4
    a = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = 0.1 * a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64)
    net = CorrelatedGaussianOptimalNet(schedule, cov)
    return idode.DiffusionODE(net, schedule, "eps"), net, d


def test_correlated_gaussian_exact_divergence(schedule):
    model, net, d = _correlated(schedule)
    z = torch.distributions.MultivariateNormal(
        torch.zeros(d, dtype=torch.float64), net.marginal_cov(schedule.gamma_min)
    ).sample((3,))
    ll = idode.log_likelihood(model, z, "exact", rtol=1e-7, atol=1e-7)
    corrected = ll.delta_logp + mvn_log_density(ll.z_end, net.marginal_cov(schedule.gamma_max))
    torch.testing.assert_close(
        corrected, mvn_log_density(z, net.marginal_cov(schedule.gamma_min)), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_exact_in_expectation(kind):
    schedule = idode.VPSchedule()
    model, net, d = _correlated(schedule)
    z0 = torch.distributions.MultivariateNormal(
        torch.zeros(d, dtype=torch.float64), net.marginal_cov(schedule.gamma_min)
    ).sample((1,))
    exact = idode.log_likelihood(model, z0, "exact", rtol=1e-6, atol=1e-6).logp
    n = 400  # the same point, a different fixed probe per copy
    gen = torch.Generator().manual_seed(5)
    hutch = idode.log_likelihood(model, z0.expand(n, d), kind, 1e-6, 1e-6, generator=gen).logp
    se = hutch.std().item() / math.sqrt(n)
    assert hutch.std() > 1e-3  # a full Jacobian: the estimator really has variance
    assert abs(hutch.mean().item() - exact.item()) < 4.5 * se
    # four probes per example average the estimate: about half the spread
    h4 = idode.log_likelihood(
        model, z0.expand(n, d), kind, 1e-6, 1e-6, num_probes=4, generator=gen
    ).logp
    assert h4.std() < 0.7 * hutch.std()
    assert abs(h4.mean().item() - exact.item()) < 4.5 * h4.std().item() / math.sqrt(n)


class _SmallNet(torch.nn.Module):
    """A random nonlinear network, so that different examples need different step sizes."""

    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(d + 1, 32, generator=g) / math.sqrt(d))
        self.w2 = torch.nn.Parameter(torch.randn(32, d, generator=g) / math.sqrt(32))

    def forward(self, z, gamma):
        h = torch.tanh(torch.cat([z, gamma[:, None] / 10], 1) @ self.w1)
        return z + 2 * h @ self.w2


def test_result_does_not_depend_on_batch_mates(schedule):
    d = 6
    # a float64 network: batched float32 calls round differently, enough to flip a borderline
    # step acceptance now and then (the result still agrees to the tolerance)
    model = idode.DiffusionODE(_SmallNet(d).double(), schedule, "velocity")
    x = torch.rand(1, d, dtype=torch.float64) * 1.6 - 0.8
    mates_a = torch.cat([x, torch.full((2, d), 0.9, dtype=torch.float64)])
    mates_b = torch.cat([torch.randn(5, d, dtype=torch.float64).clamp(-1, 1), x])
    to_bpd = lambda lp: -lp / (d * math.log(2))  # noqa: E731
    alone = idode.log_likelihood(model, x, "exact", rtol=1e-6, atol=1e-6)
    a = idode.log_likelihood(model, mates_a, "exact", rtol=1e-6, atol=1e-6)
    b = idode.log_likelihood(model, mates_b, "exact", rtol=1e-6, atol=1e-6)
    assert abs(to_bpd(a.logp[0] - alone.logp[0])) < 1e-4
    assert abs(to_bpd(b.logp[-1] - alone.logp[0])) < 1e-4
    assert a.steps[0] == alone.steps[0] == b.steps[-1]  # its own step-size sequence
    assert len(set(b.steps.tolist())) > 1  # while the batch-mates took other ones


PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])


def _discrete_model(schedule, probs=PROBS):
    net = DiscreteOptimalNet(schedule, probs)
    return idode.DiffusionODE(net, schedule, "x0"), net


@pytest.mark.parametrize("dequantization", ["truncated_normal", "variational"])
def test_bits_per_dim_of_the_exact_model_is_the_discrete_entropy(schedule, dequantization):
    """The model that is exactly P(k) (per dim i.i.d. on 4 levels) gets -log2 P(k)/d bits/dim."""
    model, net = _discrete_model(schedule)
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(PROBS, 2 * 48, replacement=True, generator=gen).reshape(48, 2)
    exact = -net.log_probs[x].sum(1) / (2 * math.log(2))
    res = idode.bits_per_dim(
        model,
        x,
        num_levels=4,
        dequantization=dequantization,
        divergence="exact",
        analytic_entropy=False,
        generator=gen,
    )
    # per example: up to the prior mismatch N(0, sigma_max^2) vs the exact terminal marginal
    assert (res.bpd - exact).abs().max() < 0.1
    assert abs((res.bpd - exact).mean().item()) < 0.01
    # and over the data it is the entropy H(P) = 1.846 bits per dim
    assert net.entropy_bits() == pytest.approx(1.8464, abs=1e-4)
    assert (res.bpd.mean() - exact.mean()).abs() < 0.01


def test_truncated_normal_is_tighter_than_uniform_for_8_bit_data():
    """The exact model of 8-bit data: TN is nearly tight; uniform at gamma_min loses ~0.86 bit/dim
    (method.md §7.1) and at the code's gamma = -11.8 is still an upper bound on the entropy."""
    schedule = idode.VPSchedule()
    probs = torch.softmax(0.3 * torch.randn(256, generator=torch.Generator().manual_seed(0)), 0)
    model, net = _discrete_model(schedule, probs)
    gen = torch.Generator().manual_seed(1)
    x = torch.multinomial(probs, 2 * 32, replacement=True, generator=gen).reshape(32, 2)
    exact = -net.log_probs[x].sum(1) / (2 * math.log(2))

    def gap(dequantization, **kw):
        res = idode.bits_per_dim(
            model,
            x,
            256,
            dequantization,
            divergence="exact",
            analytic_entropy=False,
            generator=gen,
            **kw,
        )
        return (res.bpd - exact).mean().item()

    gap_tn = gap("truncated_normal")
    gap_un_min = gap("uniform", uniform_gamma_start=schedule.gamma_min)
    gap_un = gap("uniform")
    assert abs(gap_tn) < 0.03  # per-example noise of the prior mismatch, ~0.02 bit/dim
    assert 0.6 < gap_un_min < 1.1
    assert -0.03 < gap_un < 0.2


def test_k_sample_estimators():
    schedule = idode.SPSchedule()
    model, _ = _discrete_model(schedule)
    x = torch.multinomial(PROBS, 2 * 8, replacement=True).reshape(8, 2)
    res = idode.bits_per_dim(
        model,
        x,
        4,
        "truncated_normal",
        num_samples=4,
        divergence="exact",
        importance_weighted=True,
        analytic_entropy=False,
    )
    assert res.log_p_model.shape == (8, 4) and res.num_samples == 4
    bound = res.log_p_model + res.log_decoder - res.log_q
    iw = torch.logsumexp(bound, 1) - math.log(4)  # the correct -log K
    torch.testing.assert_close(res.bpd, -iw / (2 * math.log(2)))
    torch.testing.assert_close(res.bpd_mean_of_bounds, -bound.mean(1) / (2 * math.log(2)))
    assert (res.bpd_importance_weighted <= res.bpd_mean_of_bounds + 1e-12).all()  # Jensen
    # the analytic-entropy mean uses E[log q]
    res1 = idode.bits_per_dim(model, x, 4, "truncated_normal", num_samples=2, divergence="exact")
    expected = -(res1.log_p_model.mean(1) - res1.expected_log_q) / (2 * math.log(2))
    torch.testing.assert_close(res1.bpd, expected)


def test_elbo_of_the_exact_model_is_close_to_the_entropy(schedule):
    model, net = _discrete_model(schedule)
    gen = torch.Generator().manual_seed(3)
    x = torch.multinomial(PROBS, 2 * 20_000, replacement=True, generator=gen).reshape(-1, 2)
    out = idode.elbo(model, x, num_levels=4, generator=gen)
    exact = -net.log_probs[x].sum(1) / (2 * math.log(2))
    se = out.bpd.std().item() / math.sqrt(len(x))
    assert abs(out.bpd.mean().item() - exact.mean().item()) < 4.5 * se + 0.01
    assert (out.reconstruction >= 0).all() and (out.prior_kl >= 0).all()
    torch.testing.assert_close(
        out.bpd, (out.reconstruction + out.prior_kl + out.diffusion) / (2 * math.log(2))
    )


# alpha_1, sigma_1 at gamma_max written out from method.md §1.2-1.3, independently of schedules
ALPHA_SIGMA = {
    "VP": lambda g: (math.sqrt(1 / (1 + math.exp(g))), math.sqrt(1 / (1 + math.exp(-g)))),
    "SP": lambda g: (1 / (1 + math.exp(g / 2)), 1 / (1 + math.exp(-g / 2))),
}


def test_elbo_unit_prior_is_the_kl_to_a_standard_normal(schedule):
    """prior="unit": KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)) by torch.distributions, and the
    rest of the bound unchanged (the same draws give the same reconstruction and diffusion)."""
    model, _ = _discrete_model(schedule)
    x = torch.multinomial(PROBS, 2 * 10, replacement=True).reshape(10, 2)
    unit = idode.elbo(model, x, 4, prior="unit", generator=torch.Generator().manual_seed(5))
    wide = idode.elbo(model, x, 4, generator=torch.Generator().manual_seed(5))
    alpha1, sigma1 = ALPHA_SIGMA[schedule.name](schedule.gamma_max)
    centers = (2 * x.double() + 1) / 4 - 1  # c(k) = (2k + 1)/L - 1
    q = torch.distributions.Normal(alpha1 * centers, sigma1)
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(unit.prior_kl, kl, rtol=1e-6, atol=1e-9)
    kl_wide = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, sigma1)).sum(1)
    torch.testing.assert_close(wide.prior_kl, kl_wide, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(unit.reconstruction, wide.reconstruction)
    torch.testing.assert_close(unit.diffusion, wide.diffusion)
    torch.testing.assert_close(unit.bpd - wide.bpd, (kl - kl_wide) / (2 * math.log(2)))


def test_sampling_reproduces_the_discrete_distribution(schedule):
    model, _ = _discrete_model(schedule)
    gen = torch.Generator().manual_seed(4)
    k = idode.sample(model, num_samples=2000, shape=(1,), num_levels=4, generator=gen)
    assert k.dtype == torch.int64 and k.shape == (2000, 1)
    freq = torch.bincount(k.flatten(), minlength=4).double() / 2000
    torch.testing.assert_close(freq, PROBS.double(), atol=0.035, rtol=0)


def test_clear_errors():
    schedule = idode.VPSchedule()
    model, _ = _discrete_model(schedule)
    with pytest.raises(TypeError, match="integer grey levels"):
        idode.bits_per_dim(model, torch.rand(2, 3), 256)
    with pytest.raises(ValueError, match=r"values in \[0, 300\].*num_levels=256"):
        idode.bits_per_dim(model, torch.tensor([[0, 300]]), 256)
    with pytest.raises(ValueError, match="valid: 'truncated_normal', 'uniform', 'variational'"):
        idode.bits_per_dim(model, torch.zeros(1, 2, dtype=torch.long), 4, dequantization="tn")
    with pytest.raises(ValueError, match="valid: 'exact', 'rademacher', 'gaussian'"):
        idode.log_likelihood(model, torch.zeros(1, 2), divergence="skilling")
    with pytest.raises(ValueError, match="NaN"):
        idode.log_likelihood(model, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="gamma_start"):
        idode.log_likelihood(model, torch.zeros(1, 2), gamma_start=6.0)
    with pytest.raises(ValueError, match="num_samples"):
        idode.bits_per_dim(model, torch.zeros(1, 2, dtype=torch.long), 4, num_samples=0)


def test_bits_per_dim_with_per_example_generators_ignores_batching():
    """Sharded evaluation relies on this: one generator per example index, any batch split."""
    from idode.rng import example_generators

    d = 6
    model = idode.DiffusionODE(_SmallNet(d), idode.VPSchedule(), "velocity")
    x = torch.randint(0, 256, (5, d))
    idx = torch.arange(5)
    full = idode.bits_per_dim(
        model, x, 256, num_samples=2, rtol=1e-6, atol=1e-6, generator=example_generators(7, idx)
    )
    parts = [
        idode.bits_per_dim(
            model,
            x[sl],
            256,
            num_samples=2,
            rtol=1e-6,
            atol=1e-6,
            generator=example_generators(7, idx[sl]),
        )
        for sl in (slice(0, 2), slice(2, 5))
    ]
    torch.testing.assert_close(torch.cat([p.bpd for p in parts]), full.bpd, rtol=0, atol=1e-4)
    other_seed = idode.bits_per_dim(
        model, x, 256, num_samples=2, rtol=1e-6, atol=1e-6, generator=example_generators(8, idx)
    )
    assert (other_seed.bpd - full.bpd).abs().max() > 1e-4


@pytest.mark.parametrize("importance_weighted", [False, True])
def test_continuous_batching_equals_solving_each_example_alone(importance_weighted):
    """Rows are refilled as solves end; every example still gets its own result."""
    from idode.rng import example_generators

    d, n = 6, 7
    # a float64 network, so batched calls round like single ones and the comparison is exact
    model = idode.DiffusionODE(_SmallNet(d).double(), idode.VPSchedule(), "velocity")
    x = torch.randint(0, 256, (n, d), generator=torch.Generator().manual_seed(3))
    kw = dict(num_samples=2, rtol=1e-6, atol=1e-6, importance_weighted=importance_weighted)
    gens = lambda idx: example_generators(11, idx)  # noqa: E731
    alone = [
        idode.bits_per_dim(model, x[i : i + 1], 256, generator=gens([i]), **kw) for i in range(n)
    ]
    bpd_alone = torch.cat([r.bpd for r in alone])
    steps_alone = torch.cat([r.steps for r in alone])
    for batch_size in (3, 5, None):
        res = idode.bits_per_dim(
            model, x, 256, generator=gens(range(n)), batch_size=batch_size, **kw
        )
        assert (res.bpd - bpd_alone).abs().max() <= 1e-6
        # the K-sample bounds from the per-draw terms (method.md §7)
        bound = res.log_p_model + res.log_decoder - res.log_q
        iw = torch.logsumexp(bound, 1) - math.log(2)
        mean = (res.log_p_model + res.log_decoder - res.expected_log_q[:, None]).mean(1)
        want = iw if importance_weighted else mean
        torch.testing.assert_close(res.bpd, -want / (d * math.log(2)))
        assert res.steps.shape == (n, 2)
        assert torch.equal(res.steps, steps_alone)
        assert res.nfe_per_example.dtype == torch.int64
        assert res.nfe_per_example.tolist() == (6 * res.steps + 2).sum(1).tolist()
        # the network evaluated exactly the rows the examples needed
        assert res.rows == int(res.nfe_per_example.sum())
        assert res.logp_error.shape == (n, 2) and (res.logp_error > 0).all()
    assert len(set(steps_alone.flatten().tolist())) > 1  # examples really differ in cost


def test_log_density_tolerance_bounds_the_bits_per_dim_error():
    """With tolerance="logp" the log-density's own test bounds its error where one RMS norm over
    d + 1 components does not. The exact model of Gaussian data maps z to z sqrt(v_max / v_min),
    so Delta log p has a closed form."""
    s2, d = 0.5, 48
    schedule = idode.VPSchedule()
    model = idode.DiffusionODE(GaussianOptimalNet(schedule, s2, "eps"), schedule, "eps")
    v_min, v_max = (
        marginal_variance(schedule, g, s2) for g in (schedule.gamma_min, schedule.gamma_max)
    )
    z = torch.randn(4, d, dtype=torch.float64) * v_min.sqrt()
    delta = gaussian_log_density(z, v_min) - gaussian_log_density(z * (v_max / v_min).sqrt(), v_max)

    def err_bpd(**kw):
        ll = idode.log_likelihood(model, z, "exact", 1e-4, 1e-4, **kw)
        return ((ll.delta_logp - delta).abs() / (d * math.log(2))).max().item(), ll

    paper, _ = err_bpd(tolerance="paper")
    own, ll = err_bpd(tolerance="logp", logp_atol=1e-4)
    assert own < 1e-4 < paper
    assert ll.rows == int((6 * ll.steps + 2).sum())
    # the recorded estimate is of the size of the true error, not orders below it
    assert (ll.logp_error / (d * math.log(2))).max() > own
    with pytest.raises(ValueError, match="tolerance"):
        idode.log_likelihood(model, z, tolerance="tight")
    with pytest.raises(ValueError, match="logp_atol"):
        idode.log_likelihood(model, z, tolerance="paper", logp_atol=1e-3)
