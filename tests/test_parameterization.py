import pytest
import torch
from problems import GaussianOptimalNet

import idode
from idode.parameterization import PARAMETERIZATIONS


def _batch(schedule, b=6, d=5):
    x0 = torch.rand(b, d, dtype=torch.float64) * 2 - 1
    eps = torch.randn(b, d, dtype=torch.float64)
    gamma = schedule.gamma(torch.rand(b, dtype=torch.float64))
    a, s = schedule.alpha(gamma)[:, None], schedule.sigma(gamma)[:, None]
    return x0, eps, gamma, a * x0 + s * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_round_trips_from_exact_targets(schedule, param, dtype):
    """eps -> F -> eps and x0 -> pred -> x0 for the exact targets of every parameterization."""
    x0, eps, gamma, z = (t.to(dtype) for t in _batch(schedule))
    model = idode.DiffusionODE(lambda z, g: z, schedule, param)
    pred = model.target(x0, eps, gamma)
    torch.testing.assert_close(model.eps_from(z, gamma, pred), eps)
    torch.testing.assert_close(model.x0_from(z, gamma, pred), x0)
    velocity = idode.DiffusionODE(lambda z, g: z, schedule, "velocity").target(x0, eps, gamma)
    torch.testing.assert_close(model.velocity_from(z, gamma, pred), velocity)


def test_velocity_targets_match_method(schedule):
    x0, eps, gamma, z = _batch(schedule)
    a, s = schedule.alpha(gamma)[:, None], schedule.sigma(gamma)[:, None]
    model = idode.DiffusionODE(lambda z, g: z, schedule, "velocity")
    F = model.target(x0, eps, gamma)
    if schedule.name == "VP":
        torch.testing.assert_close(F, a * eps - s * x0)
        torch.testing.assert_close(F, (eps - s * z) / a)  # the code's form
    else:
        torch.testing.assert_close(F, (eps - x0) / 2**0.5)
        torch.testing.assert_close(F, (eps - z) / a / 2**0.5)


def test_velocity_target_is_the_true_ode_velocity(schedule):
    """dx/dgamma = alpha' x0 + sigma' eps = (alpha sigma / (2 det)) F* (method.md §2.4)."""
    x0, eps, gamma, _ = _batch(schedule)
    g = gamma.clone().requires_grad_(True)
    x = schedule.alpha(g)[:, None] * x0 + schedule.sigma(g)[:, None] * eps
    dxdg = torch.stack(
        [torch.autograd.grad(x[:, j].sum(), g, retain_graph=True)[0] for j in range(x.shape[1])], 1
    )
    model = idode.DiffusionODE(lambda z, g: z, schedule, "velocity")
    F = model.target(x0, eps, gamma)
    coef = schedule.alpha(gamma) * schedule.sigma(gamma) / (2 * schedule.velocity_det())
    torch.testing.assert_close(dxdg, coef[:, None] * F)


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_drift_is_E1_and_same_for_all_parameterizations(schedule, param):
    """h = f x + (sigma/2) eps_hat; the optimal Gaussian nets give the same drift in all params."""
    _, _, gamma, z = _batch(schedule)
    model = idode.DiffusionODE(GaussianOptimalNet(schedule, 0.4, param), schedule, param)
    h = model.drift(z, gamma)
    f = schedule.dlog_alpha_dgamma(gamma)[:, None]
    torch.testing.assert_close(
        h, f * z + 0.5 * schedule.sigma(gamma)[:, None] * model.eps_hat(z, gamma)
    )
    ref = idode.DiffusionODE(GaussianOptimalNet(schedule, 0.4, "eps"), schedule, "eps")
    torch.testing.assert_close(h, ref.drift(z, gamma))


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, z, gamma):
        assert z.dtype == gamma.dtype == torch.float32  # the network sees its own dtype
        return self.lin(z)


def test_network_dtype_boundary():
    model = idode.DiffusionODE(_Linear(), idode.VPSchedule(), "velocity")
    assert model.net_dtype == torch.float32
    z = torch.randn(3, 4, dtype=torch.float64)
    out = model.predict(z, torch.zeros(3, dtype=torch.float64))
    assert out.dtype == torch.float64  # cast back at the one call site


def test_clear_errors():
    s = idode.VPSchedule()
    with pytest.raises(ValueError, match="valid: 'eps', 'x0', 'velocity'"):
        idode.DiffusionODE(lambda z, g: z, s, "score")
    with pytest.raises(TypeError, match="VPSchedule or idode.SPSchedule"):
        idode.DiffusionODE(lambda z, g: z, "VP")
    model = idode.DiffusionODE(lambda z, g: z[:, :2], s)
    with pytest.raises(ValueError, match="shaped like z"):
        model.predict(torch.zeros(3, 4), torch.zeros(3))
    model = idode.DiffusionODE(lambda z, g: z, s)
    with pytest.raises(ValueError, match=r"gamma must have shape \[B\]"):
        model.predict(torch.zeros(3, 4), torch.zeros(3, 1))
