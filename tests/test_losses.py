import math

import pytest
import torch
from problems import GaussianOptimalNet

import idode
from idode.losses import diffusion_loss_terms
from idode.parameterization import PARAMETERIZATIONS

D, S2_DATA, S2_NET = 4, 0.6, 0.3


def _quadrature_l_diff(schedule):
    """1/2 int E||eps - eps_hat||^2 dgamma for Gaussian data and the (wrong-variance) linear net."""
    from scipy.integrate import quad

    def integrand(g):
        g = torch.tensor(g, dtype=torch.float64)
        a, s = schedule.alpha(g), schedule.sigma(g)
        c = s / (a * a * S2_NET + s * s)  # eps_hat = c x, x = a x0 + s eps
        return float(0.5 * D * ((1 - c * s) ** 2 + c * c * a * a * S2_DATA))

    return quad(integrand, schedule.gamma_min, schedule.gamma_max, limit=200, epsabs=1e-10)[0]


@pytest.mark.parametrize("importance_sampling", [False, True])
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_every_estimator_matches_quadrature_of_the_diffusion_term(
    schedule, param, importance_sampling
):
    exact = _quadrature_l_diff(schedule)
    model = idode.DiffusionODE(GaussianOptimalNet(schedule, S2_NET, param), schedule, param)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, D, dtype=torch.float64, generator=g) * math.sqrt(S2_DATA)
    loss = idode.diffusion_loss(
        model, x, importance_sampling=importance_sampling, generator=g, validate=False
    )
    assert loss.shape == (200_000,)
    se = loss.std().item() / math.sqrt(len(loss))
    assert abs(loss.mean().item() - exact) < 4.5 * se, (loss.mean().item(), exact, se)


def test_velocity_loss_constants_of_the_official_code(schedule):
    """VP IS: Z/2 * mse; SP IS: Z * mse; no IS: 18.3 * alpha^2 * mse * (1/2 VP, 1 SP) (§3.2)."""
    net = GaussianOptimalNet(schedule, S2_NET, "velocity")
    model = idode.DiffusionODE(net, schedule, "velocity")
    x = torch.rand(64, D, dtype=torch.float64) * 2 - 1
    c = 0.5 if schedule.name == "VP" else 1.0
    for is_ in (True, False):
        t = diffusion_loss_terms(model, x, importance_sampling=is_)
        w = schedule.importance_normalizer if is_ else 18.3 * schedule.alpha2(t.gamma)
        torch.testing.assert_close(t.loss, c * w * t.mse)


def test_eps_loss_is_plain_vdm_loss():
    s = idode.VPSchedule()
    model = idode.DiffusionODE(GaussianOptimalNet(s, S2_NET, "eps"), s, "eps")
    x = torch.rand(32, D, dtype=torch.float64) * 2 - 1
    t = diffusion_loss_terms(model, x, importance_sampling=False)
    torch.testing.assert_close(t.loss, 0.5 * 18.3 * t.mse)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_second_order_residual_has_zero_conditional_mean_at_the_optimum(schedule, probe):
    """E[r | x_gamma] = 0 for the optimal F (method.md §5.1); a wrong F gives a non-zero mean."""
    n, d, s2 = 100_000, 3, 0.5
    gen = torch.Generator().manual_seed(2)
    for gamma_value in (-8.0, -2.0, 1.0):
        gamma = torch.full((n,), gamma_value, dtype=torch.float64)
        a, s = schedule.alpha(gamma[:1]).item(), schedule.sigma(gamma[:1]).item()
        v = a * a * s2 + s * s
        z = torch.randn(1, d, dtype=torch.float64, generator=gen).expand(n, d) * math.sqrt(v)
        # eps | z ~ N(s z / v, a^2 s2 / v); x0 = (z - s eps)/a
        eps = s * z / v + math.sqrt(a * a * s2 / v) * torch.randn(
            n, d, dtype=torch.float64, generator=gen
        )
        x0 = (z - s * eps) / a
        means = {}
        optimal = GaussianOptimalNet(schedule, s2, "velocity")
        for shift in (0.0, 5.0):  # F_opt, and F_opt + 5 z whose divergence is off by 5 d
            net = lambda z_, g_, c=shift, f=optimal: f(z_, g_) + c * z_  # noqa: E731
            model = idode.DiffusionODE(net, schedule)
            t = diffusion_loss_terms(
                model,
                x0,
                second_order_weight=0.1,
                gamma=gamma,
                eps=eps,
                hutchinson=probe,
                generator=gen,
                validate=False,
            )
            r = t.residual
            means[shift] = (r.mean().item(), r.std().item() / math.sqrt(n))
        m, se = means[0.0]
        assert abs(m) < 4.5 * se + 1e-9, (gamma_value, m, se)
        m_bad, se_bad = means[5.0]
        assert abs(m_bad) > 10 * se_bad, (gamma_value, m_bad, se_bad)


def test_second_order_term_formula_and_double_backward(schedule):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z, gamma):
            return z + self.net(z) * torch.sigmoid(gamma)[:, None]

    model = idode.DiffusionODE(Net(), schedule, "velocity")
    x = torch.rand(8, D) * 2 - 1
    t = diffusion_loss_terms(model, x, second_order_weight=0.1)
    z = schedule.importance_normalizer * (0.5 if schedule.name == "VP" else 1.0)
    torch.testing.assert_close(t.second_order, (z * 0.1 * t.residual.square() / D).float())
    torch.testing.assert_close(t.loss, t.first_order + t.second_order)
    # the second-order term reaches the parameters through div_hat (a double backward)
    # (the last bias does not move the divergence, hence allow_unused)
    grads = torch.autograd.grad(
        t.second_order.sum(), list(model.parameters()), allow_unused=True, retain_graph=True
    )
    grads = [g for g in grads if g is not None]
    assert len(grads) == 3 and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # the first-order term keeps its gradient through the (non-detached) prediction
    grads = torch.autograd.grad(t.first_order.sum(), list(model.parameters()))
    assert sum(g.abs().sum() for g in grads) > 0


def test_loss_input_errors():
    s = idode.VPSchedule()
    model = idode.DiffusionODE(lambda z, g: z, s, "velocity")
    with pytest.raises(TypeError, match="floating-point"):
        idode.diffusion_loss(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        idode.diffusion_loss(model, torch.full((2, 3), 3.0))
    with pytest.raises(ValueError, match="NaN"):
        idode.diffusion_loss(model, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="valid: 'rademacher', 'gaussian'"):
        idode.diffusion_loss(model, torch.zeros(2, 3), hutchinson="sphere")
    eps_model = idode.DiffusionODE(lambda z, g: z, s, "eps")
    with pytest.raises(ValueError, match="velocity parameterization"):
        idode.diffusion_loss(eps_model, torch.zeros(2, 3), second_order_weight=0.1)
