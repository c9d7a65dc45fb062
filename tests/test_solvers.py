import math

import numpy as np
import pytest
import torch

from idode.solvers import Jobs, SolverStats, nfe_of_steps, solve_ivp, solve_stream
from idode.tableaus import METHODS, get_pair

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


# --------------------------------------------------------------------------------------------------
# the embedded pairs, the PI controller and the max norm
# --------------------------------------------------------------------------------------------------


def _riccati(t, y):
    """y' = -2 t y^2, y(0) = 1: y = 1 / (1 + t^2)."""
    return -2.0 * t * y * y


# (f, y0, t1, exact y(t1)): scalar problems with a closed form
_PROBLEMS = {
    "riccati": (_riccati, 1.0, 2.0, 1.0 / 5.0),
    "tan": (lambda t, y: 1.0 + y * y, 0.0, 1.4, math.tan(1.4)),
}


def _fixed_steps(pair, weights, problem: str, n: int) -> float:
    """Error at t1 of n equal steps propagating y + h (weights . k), written from the tableau
    alone (an independent reading of a, b, e)."""
    f, y, t1, exact = _PROBLEMS[problem]
    h = t1 / n
    for i in range(n):
        k = []
        for s in range(pair.stages):
            ys = y + h * sum(a * kj for a, kj in zip(pair.a[s], k, strict=True))
            k.append(f(i * h + pair.c[s] * h, ys))
        y = y + h * sum(w * kj for w, kj in zip(weights, k, strict=True))
    return abs(y - exact)


@pytest.mark.parametrize("name", METHODS)
def test_pair_orders_of_convergence(name):
    pair = get_pair(name)
    # consistency: c_i = sum_j a_ij, b sums to 1, the error weights to 0, the last row is b (FSAL)
    for i, (c, row) in enumerate(zip(pair.c, pair.a, strict=True)):
        assert len(row) == i and abs(c - sum(row)) < 1e-12
    assert abs(sum(pair.b) - 1) < 1e-14 and abs(sum(pair.e)) < 1e-14
    assert pair.a[-1] == pair.b[:-1] and pair.c[-1] == 1.0
    # halving h divides the error by 2^order (b), and by 2^error_order propagating b - e; the
    # step counts are where each pair is asymptotic and above float64 rounding
    low = [b - e for b, e in zip(pair.b, pair.e, strict=True)]
    problem, n = {"bs3": ("tan", 128), "dopri5": ("riccati", 64), "tsit5": ("riccati", 64),
                  "vern6": ("tan", 64)}[name]  # fmt: skip
    for weights, order in ((pair.b, pair.order), (low, pair.error_order)):
        e1, e2 = (_fixed_steps(pair, weights, problem, m) for m in (n, 2 * n))
        assert abs(math.log2(e1 / e2) - order) < 0.5, (order, math.log2(e1 / e2))


@pytest.mark.parametrize("name", METHODS)
def test_error_estimate_of_one_step_has_the_embedded_order(name):
    # a step's error estimate h (e . k) ~ C h^(error_order + 1)
    pair = get_pair(name)

    def one_step_estimate(h):
        k = []
        for s in range(pair.stages):
            ys = 1.0 + h * sum(a * kj for a, kj in zip(pair.a[s], k, strict=True))
            k.append(_riccati(0.3 + pair.c[s] * h, ys))
        return abs(h * sum(e * kj for e, kj in zip(pair.e, k, strict=True)))

    h = 0.025 if name == "vern6" else 0.1  # asymptotic from there on
    r = one_step_estimate(h) / one_step_estimate(h / 2)
    assert abs(math.log2(r) - (pair.error_order + 1)) < 0.35


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("controller", ["i", "pi"])
def test_every_pair_and_controller_reaches_the_exact_answer(name, controller):
    y0 = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    t1 = 3.0
    tol = 1e-8

    def f(t, y):
        return -2.0 * t[:, None] * y * y

    res = solve_ivp(f, y0, 0.0, t1, rtol=tol, atol=tol, method=name, controller=controller)
    exact = y0 / (1.0 + y0 * t1 * t1)
    torch.testing.assert_close(res.y, exact, rtol=0, atol=200 * tol)
    assert res.rows == int(res.nfe_per_example.sum())
    per_step = get_pair(name).evaluations_per_step
    assert res.nfe_per_example.tolist() == [per_step * int(s) + 2 for s in res.steps]
    assert res.nfe_per_example.tolist() == [nfe_of_steps(int(s), name) for s in res.steps]


def test_pi_controller_same_answer_and_fewer_rejections_on_an_oscillation():
    # y' = A y with a lightly damped rotation: an I controller oscillates between accepting and
    # rejecting; the PI controller (same tolerances) smooths the step sizes
    w = 20.0

    def f(t, y):
        return torch.stack([-0.1 * y[:, 0] + w * y[:, 1], -w * y[:, 0] - 0.1 * y[:, 1]], 1)

    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t1 = 5.0
    exact = math.exp(-0.1 * t1) * torch.tensor([[math.cos(w * t1), -math.sin(w * t1)]])
    for tol in (1e-6, 1e-9):
        i_ctl = solve_ivp(f, y0, 0.0, t1, rtol=tol, atol=tol)
        pi_ctl = solve_ivp(f, y0, 0.0, t1, rtol=tol, atol=tol, controller="pi")
        for res in (i_ctl, pi_ctl):
            torch.testing.assert_close(res.y, exact.double(), rtol=0, atol=1e3 * tol)
        # same accuracy class: the two answers agree to the tolerance's order
        assert float((i_ctl.y - pi_ctl.y).abs().max()) < 1e3 * tol
        assert int(pi_ctl.steps[0]) <= 1.15 * int(i_ctl.steps[0])


def test_max_norm_is_stricter_than_rms():
    # one component moves, 99 sit still: the RMS divides its error by 10, the max norm does not
    y0 = torch.cat([torch.ones(1, 1), torch.zeros(1, 99)], 1).double()

    def f(t, y):
        return torch.cat([torch.cos(5 * t)[:, None], torch.zeros_like(y[:, 1:])], 1)

    rms = solve_ivp(f, y0, 0.0, 4.0, rtol=1e-6, atol=1e-6)
    mx = solve_ivp(f, y0, 0.0, 4.0, rtol=1e-6, atol=1e-6, norm="max")
    exact = 1.0 + math.sin(20.0) / 5.0
    assert abs(float(mx.y[0, 0]) - exact) < abs(float(rms.y[0, 0]) - exact)
    assert int(mx.steps[0]) > int(rms.steps[0])


def test_unknown_method_controller_norm_are_refused():
    y0 = torch.ones(1, 1, dtype=torch.float64)
    for kw, name in (({"method": "rk4"}, "method"), ({"controller": "pid"}, "controller"),
                     ({"norm": "l1"}, "norm")):  # fmt: skip
        with pytest.raises(ValueError, match=f"unknown {name}"):
            solve_ivp(lambda t, y: -y, y0, 0.0, 1.0, **kw)
