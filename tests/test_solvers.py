import math

import pytest
import torch

from idode.solvers import solve_ivp


def test_linear_decay_per_example_rates():
    k = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    y0 = torch.tensor([[1.0, -2.0]] * 3, dtype=torch.float64)
    res = solve_ivp(lambda t, y: -k[:, None] * y, y0, 0.0, 1.5, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.y, y0 * torch.exp(-1.5 * k)[:, None], rtol=1e-7, atol=1e-9)
    # per-example step control: the stiffer decay takes more steps
    assert res.steps[0] < res.steps[1] < res.steps[2]
    assert res.nfe >= int(res.nfe_per_example.max()) - 2


def test_time_dependent_backward_integration():
    # dy/dt = cos(t) y  =>  y(t1) = y(t0) exp(sin t1 - sin t0), integrated from 3 down to -1
    y0 = torch.ones(2, 1, dtype=torch.float64)
    res = solve_ivp(lambda t, y: torch.cos(t)[:, None] * y, y0, 3.0, -1.0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        res.y, y0 * math.exp(math.sin(-1.0) - math.sin(3.0)), rtol=1e-8, atol=0
    )


def test_result_does_not_depend_on_batch_mates():
    f = lambda t, y: torch.sin(3 * y) * (1 + t[:, None])  # noqa: E731
    y = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    alone = solve_ivp(f, y, 0.0, 2.0, rtol=1e-6, atol=1e-6).y
    mates = torch.cat([y, torch.tensor([[5.0, 9.0], [-40.0, 0.1]], dtype=torch.float64)])
    together = solve_ivp(f, mates, 0.0, 2.0, rtol=1e-6, atol=1e-6).y[:1]
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-14)


def test_failure_is_reported():
    with pytest.raises(RuntimeError, match="ODE solve failed"):
        solve_ivp(lambda t, y: y * float("nan"), torch.ones(2, 2, dtype=torch.float64), 0.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        solve_ivp(lambda t, y: y, torch.ones(2, 2), 0.0, 1.0, rtol=0.0)
