import math

import numpy as np
import pytest
import torch

from idode.solvers import Jobs, SolverStats, nfe_of_steps, solve_ivp, solve_stream

DTYPES = [torch.float64, torch.float32]


def _torchode(f, y0, t0, t1, rtol, atol):
    """The same problem through torchode's Dopri5 + IntegralController (the former solver)."""
    import torchode

    b = y0.shape[0]
    term = torchode.ODETerm(f, with_stats=False)
    solver = torchode.AutoDiffAdjoint(
        torchode.Dopri5(term=term), torchode.IntegralController(atol=atol, rtol=rtol, term=term)
    )
    times = [torch.full((b,), t, dtype=y0.dtype) for t in (t0, t1)]
    sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_start=times[0], t_end=times[1]))
    return sol.ys[:, -1], sol.stats["n_steps"]


def _scipy(f_np, y0, t0, t1, rtol, atol):
    from scipy.integrate import solve_ivp as scipy_solve

    sol = scipy_solve(f_np, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
    assert sol.success
    return sol.y[:, -1], sol.nfev


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_decay_against_exact_torchode_and_scipy(dtype):
    rates = [0.5, 2.0, 8.0]
    y0 = torch.tensor([[1.0, -2.0]] * 3, dtype=dtype)
    # each row carries its own rate as a constant third component, so rows can leave the batch
    y0 = torch.cat([y0, torch.tensor(rates, dtype=dtype)[:, None]], 1)

    def f(t, y):
        return torch.cat([-y[:, 2:] * y[:, :2], torch.zeros_like(y[:, 2:])], 1)

    tol = 1e-9 if dtype == torch.float64 else 1e-5
    res = solve_ivp(f, y0, 0.0, 1.5, rtol=tol, atol=tol)
    exact = y0[:, :2] * torch.exp(-1.5 * y0[:, 2:])
    torch.testing.assert_close(res.y[:, :2], exact, rtol=1e3 * tol, atol=1e3 * tol)
    assert res.steps[0] < res.steps[1] < res.steps[2]  # per-row control: stiffer = more steps
    assert res.rows == int(res.nfe_per_example.sum())  # finished rows are not evaluated again
    assert res.nfe == int(res.nfe_per_example.max())  # the calls: the slowest row's NFE
    # the same controller as torchode: the same steps and answer per row
    y_ref, steps_ref = _torchode(f, y0, 0.0, 1.5, tol, tol)
    assert res.steps.tolist() == steps_ref.tolist()
    torch.testing.assert_close(res.y, y_ref, rtol=0, atol=50 * torch.finfo(dtype).eps)
    # and as scipy's RK45 row by row (its controller also never grows dt right after a rejection)
    for i, r in enumerate(rates):
        y_sp, nfev = _scipy(lambda t, y, r=r: -r * y, [1.0, -2.0], 0.0, 1.5, tol, tol)
        np.testing.assert_allclose(
            res.y[i, :2].double().numpy(), y_sp, rtol=1e3 * tol, atol=1e3 * tol
        )
        assert abs(int(res.nfe_per_example[i]) - nfev) <= 0.1 * nfev + 12


@pytest.mark.parametrize("dtype", DTYPES)
def test_time_dependent_backward_integration(dtype):
    # dy/dt = cos(t) y  =>  y(t1) = y(t0) exp(sin t1 - sin t0), integrated from 3 down to -1
    y0 = torch.ones(2, 1, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    res = solve_ivp(lambda t, y: torch.cos(t)[:, None] * y, y0, 3.0, -1.0, rtol=tol, atol=tol)
    exact = math.exp(math.sin(-1.0) - math.sin(3.0))
    torch.testing.assert_close(res.y, y0 * exact, rtol=1e2 * tol, atol=0)
    y_sp, nfev = _scipy(lambda t, y: np.cos(t) * y, [1.0], 3.0, -1.0, tol, tol)
    assert abs(float(res.y[0, 0]) - y_sp[0]) < 1e2 * tol
    assert abs(int(res.nfe_per_example[0]) - nfev) <= 0.1 * nfev + 12


def test_result_does_not_depend_on_batch_mates():
    f = lambda t, y: torch.sin(3 * y) * (1 + t[:, None])  # noqa: E731
    y = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    alone = solve_ivp(f, y, 0.0, 2.0, rtol=1e-6, atol=1e-6)
    mates = torch.cat([y, torch.tensor([[5.0, 9.0], [-40.0, 0.1]], dtype=torch.float64)])
    together = solve_ivp(f, mates, 0.0, 2.0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone.y, together.y[:1], rtol=0, atol=1e-14)
    assert alone.steps[0] == together.steps[0]


def _decay_jobs(rates: list[float], stats: SolverStats | None = None, y_start: float = 1.0):
    """take(m) over jobs dy/dt = -r y, y(0) = y_start, key = job number; aux = the rate.

    Records in ``stats.history``-time (calls so far) when the last job was handed out.
    """
    pos = [0]

    def take(m):
        lo = pos[0]
        hi = min(lo + m, len(rates))
        if lo >= hi:
            return None
        pos[0] = hi
        if hi == len(rates) and stats is not None:
            take.last_admitted_at = stats.calls
        r = torch.tensor(rates[lo:hi], dtype=torch.float64)
        y0 = torch.full((hi - lo, 1), y_start, dtype=torch.float64)
        return Jobs(list(range(lo, hi)), y0, torch.zeros(hi - lo), 2.0 * torch.ones(hi - lo), r)

    return take


def test_stream_refills_rows_and_matches_solving_alone():
    rates = [0.3, 4.0, 1.0, 9.0, 0.1, 2.5, 6.0, 0.7, 3.3]
    f = lambda t, y, r: -r[:, None] * y  # noqa: E731
    stats = SolverStats(record_history=True)
    got = {}
    take = _decay_jobs(rates, stats)
    for done in solve_stream(f, take, batch_size=3, rtol=1e-8, atol=1e-8, stats=stats):
        for j, key in enumerate(done.keys):
            got[key] = (float(done.y[j, 0]), int(done.steps[j]))
    assert sorted(got) == list(range(len(rates)))
    assert max(stats.history) == 3 and stats.max_rows == 3
    # the work is exactly what the jobs need: no call evaluates a finished row
    assert stats.rows == sum(nfe_of_steps(s) for _, s in got.values())
    # the batch stayed full until the queue ran dry, then shrank as rows ended
    assert set(stats.history[: take.last_admitted_at + 1]) == {3}
    assert stats.history == sorted(stats.history, reverse=True)
    for i, r in enumerate(rates):
        alone = solve_ivp(lambda t, y, r=r: -r * y, torch.ones(1, 1, dtype=torch.float64),
                          0.0, 2.0, rtol=1e-8, atol=1e-8)  # fmt: skip
        assert got[i][1] == int(alone.steps[0])
        assert abs(got[i][0] - float(alone.y[0, 0])) < 1e-15
        assert abs(got[i][0] - math.exp(-2.0 * r)) < 1e-7


def test_separate_test_for_the_last_component():
    # 200 decaying components and a "log-density" l' = 300 cos(4t): with one RMS norm the last
    # component weighs 1/201 and its error is barely controlled; its own test bounds it directly
    d = 200
    y0 = torch.cat([torch.linspace(0.5, 1.5, d)[None], torch.zeros(1, 1)], 1).double()

    def f(t, y):
        return torch.cat([-3.0 * y[:, :d], 300.0 * torch.cos(4.0 * t)[:, None]], 1)

    exact = 300.0 * math.sin(8.0) / 4.0
    rms = solve_ivp(f, y0, 0.0, 2.0, rtol=1e-4, atol=1e-4)
    own = solve_ivp(f, y0, 0.0, 2.0, rtol=1e-4, atol=1e-4, last_rtol=0.0, last_atol=1e-6)
    err_rms, err_own = abs(float(rms.y[0, d]) - exact), abs(float(own.y[0, d]) - exact)
    assert err_rms > 1e-3 and err_own < 1e-5
    assert own.steps[0] > rms.steps[0]
    # the recorded estimate (sum of |local error estimates|) bounds the true error here
    assert err_own <= float(own.last_error[0]) < 1e-3
    assert err_rms <= float(rms.last_error[0])
    torch.testing.assert_close(own.y[:, :d], y0[:, :d] * math.exp(-6.0), rtol=1e-4, atol=0)


def test_failure_and_bad_input_are_reported():
    with pytest.raises(RuntimeError, match="ODE solve failed"):
        solve_ivp(lambda t, y: y * float("nan"), torch.ones(2, 2, dtype=torch.float64), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        solve_ivp(lambda t, y: -y, torch.ones(2, 2, dtype=torch.float64), 0.0, 100.0, max_steps=3)
    with pytest.raises(ValueError, match="positive"):
        solve_ivp(lambda t, y: y, torch.ones(2, 2), 0.0, 1.0, rtol=0.0)
    with pytest.raises(ValueError, match="both last_rtol and last_atol"):
        solve_ivp(lambda t, y: y, torch.ones(2, 2), 0.0, 1.0, last_atol=1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        next(solve_stream(lambda t, y: y, _decay_jobs([1.0]), batch_size=0))
