"""Adaptive ODE integration on an injected vector field, one error control per row, with refilling.

The solver knows nothing of diffusion: ``f(t [b], y [b, n]) -> [b, n]`` (or ``f(t, y, aux)``
when the jobs carry per-row inputs such as a Hutchinson probe). Each row is an independent
Dormand-Prince 5(4) solve with its own time, step size, error control and FSAL stage, and the
controller is torchode's / scipy's RK45: error ratio = RMS over components of
err / (atol + rtol max(|y0|, |y1|)), accept when < 1, dt *= clip(0.9 ratio^(-1/5), 0.2, 10), and
the Hairer-Wanner initial step (two evaluations). A row's trajectory therefore does not depend on
its batch-mates.

Options (keywords; the defaults are the behaviour above): ``method`` another FSAL embedded pair of
``idode.tableaus`` (tsit5, bs3, vern6); ``controller="pi"`` the PI step-size controller
(Gustafsson; as Hairer's dopri5.f: dt *= 0.9 ratio^(-0.85/q) ratio_prev^(0.2/q) after an accepted
step, q = embedded order + 1; after a rejection as the I controller); ``norm="max"`` the largest
component's ratio instead of the RMS.

``solve_stream`` runs a serving loop: rows sit in different phases of their own solve (the two
starting evaluations, then the six new stages of each FSAL step), so every call of f evaluates one
point of every running row, and when a row's solve ends its row is handed to the next job. The
network does exactly the work the jobs need: rows evaluated = sum over jobs of
``nfe_of_steps(steps)``. The state never leaves the device; per call the host reads one small
status vector, and only on calls where some row completed a step.

Optionally the last component (a log-density) gets its own error test: the ratio is then
max(RMS over the other components, |err_last| / (last_atol + last_rtol max(|l0|, |l1|))).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from idode.choices import SOLVER_METHODS, SolverMethod
from idode.tableaus import METHODS, MethodName, Pair, get_pair

__all__ = [
    "CONTROLLERS",
    "Controller",
    "ERROR_NORMS",
    "ErrorNorm",
    "SOLVER_METHODS",
    "SolverMethod",
    "Finished",
    "Jobs",
    "SolveResult",
    "SolverStats",
    "nfe_of_steps",
    "solve_ivp",
    "solve_stream",
]

VectorField = Callable[..., Tensor]
# SOLVER_METHODS: the pairs an evaluation protocol may name (``Protocol.method``; dopri5 only so
# far: continuous batching counts NFE per step as dopri5's); METHODS: every pair solve_ivp and
# solve_stream can run (idode.tableaus), for the work-precision benchmark

Controller = Literal["i", "pi"]
CONTROLLERS: tuple[str, ...] = get_args(Controller)
ErrorNorm = Literal["rms", "max"]
ERROR_NORMS: tuple[str, ...] = get_args(ErrorNorm)
_SAFETY, _FACTOR_MIN, _FACTOR_MAX = 0.9, 0.2, 10.0
_PI_BETA1, _PI_BETA2 = 0.85, 0.2  # PI gains x q: Hairer's dopri5.f (beta = 0.04, alpha = 0.17)
# phases of a row: 0 = f(t0, y0); 1 = f at the Euler probe of the initial-step selection;
# 2..s = stages 1..s-1 of a step (stage 0 is the FSAL value of the previous step)
_FIRST_STAGE = 2
_RUNNING, _DONE, _FAILED = 0, 1, 2


def nfe_of_steps(steps: Tensor | int, method: MethodName = "dopri5") -> Tensor | int:
    """Evaluations one solve needs alone: per attempted step (accepted or rejected) the pair's
    stages - 1 (FSAL; 6 for Dopri5), + 2 for the initial-step selection."""
    return get_pair(method).evaluations_per_step * steps + 2


@dataclass
class SolveResult:
    """A batch solved by ``solve_ivp``; per-row tensors are [B]."""

    y: Tensor  # [B, n] state at t1
    nfe: int  # calls of f (each on the rows still running)
    steps: Tensor  # [B] attempted steps per row (accepted + rejected)
    last_error: Tensor  # [B] sum over accepted steps of |local error estimate| of the last comp.
    rows: int  # rows evaluated over all calls (= nfe_per_example.sum())
    method: str = "dopri5"  # the embedded pair

    @property
    def nfe_per_example(self) -> Tensor:
        """Evaluations a row needed alone: ``nfe_of_steps(steps, method)``."""
        return nfe_of_steps(self.steps, self.method)


@dataclass
class Jobs:
    """A group of independent initial value problems for ``solve_stream`` (m rows)."""

    keys: list[Hashable]  # m, returned with the results
    y0: Tensor  # [m, n] initial states (the integration dtype)
    t0: Tensor  # [m] start times
    t1: Tensor  # [m] end times
    aux: Tensor | None = None  # [m, ...] per-row inputs passed to f, or None


@dataclass
class Finished:
    """Rows whose solves ended in one call, in no particular order."""

    keys: list[Hashable]
    y: Tensor  # [m, n] state at t1 (on the device)
    steps: Tensor  # [m] attempted steps
    last_error: Tensor  # [m] see SolveResult.last_error


@dataclass
class SolverStats:
    """Work counters of a ``solve_stream`` run, updated in place."""

    calls: int = 0  # calls of f
    rows: int = 0  # rows evaluated, summed over calls
    max_rows: int = 0  # the largest batch of one call
    history: list[int] = field(default_factory=list)  # rows per call (only if record_history)
    record_history: bool = False


class _Tableau:
    """A pair's weights per phase: the input of phase p is y + dt (w[p] . k) at t + nodes[p] dt."""

    def __init__(self, pair: Pair, dtype: torch.dtype, device: torch.device) -> None:
        s = pair.stages
        w = torch.zeros(s + 1, s, dtype=torch.float64)
        w[1, 0] = 1.0  # the Euler probe y0 + dt0 f0
        for i in range(1, s):
            w[i + 1, :i] = torch.tensor(pair.a[i], dtype=torch.float64)
        nodes = torch.tensor((0.0, 1.0, *pair.c[1:]), dtype=torch.float64)
        slots = torch.tensor((0, 1, *range(1, s)))
        b = torch.tensor(pair.b, dtype=torch.float64)
        b_err = torch.tensor(pair.e, dtype=torch.float64)
        kw = dict(dtype=dtype, device=device)
        self.w, self.nodes = w.to(**kw), nodes.to(**kw)
        self.slots, self.b, self.b_err = slots.to(device), b.to(**kw), b_err.to(**kw)
        self.stages, self.last = s, s  # the phase that ends a step
        self.exponent = 1.0 / (pair.error_order + 1)


def _check_tolerances(rtol, atol, last_rtol, last_atol) -> None:
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if (last_rtol is None) != (last_atol is None):
        raise ValueError("give both last_rtol and last_atol (the last component's test) or neither")
    if last_atol is not None and not (last_rtol >= 0 and last_atol > 0):
        raise ValueError(
            f"last_atol must be positive and last_rtol >= 0, got {last_atol}, {last_rtol}"
        )


class _Norm:
    """The error ratio: RMS (or max) of err/scale, or max(that over all but the last, last's
    own test)."""

    def __init__(self, rtol, atol, last_rtol, last_atol, kind: str = "rms") -> None:
        self.rtol, self.atol, self.last_rtol, self.last_atol = rtol, atol, last_rtol, last_atol
        self.reduce = _rms if kind == "rms" else _max_abs

    def __call__(self, err: Tensor, ref: Tensor) -> Tensor:
        """err, ref [b, n] -> [b]; ref = max(|y0|, |y1|) (or |y0| for the initial step)."""
        if self.last_atol is None:
            return self.reduce(err / (self.atol + self.rtol * ref))
        body = self.reduce(err[:, :-1] / (self.atol + self.rtol * ref[:, :-1]))
        last = err[:, -1].abs() / (self.last_atol + self.last_rtol * ref[:, -1])
        return torch.maximum(body, last)


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x / math.sqrt(x.shape[1]), ord=2, dim=1)  # as torchode


def _max_abs(x: Tensor) -> Tensor:
    return x.abs().amax(dim=1)


class _Rows:
    """The per-row solver state of the running batch (all on the device)."""

    def __init__(self, jobs: Jobs, stages: int) -> None:
        m, n = jobs.y0.shape
        dev, dt_ = jobs.y0.device, jobs.y0.dtype
        self.keys = list(jobs.keys)
        self.y = jobs.y0.clone()
        self.t = jobs.t0.to(dev, dt_).clone()
        self.t1 = jobs.t1.to(dev, dt_).clone()
        self.dt = torch.zeros(m, dtype=dt_, device=dev)
        self.k = torch.zeros(stages, m, n, dtype=dt_, device=dev)
        self.phase = torch.zeros(m, dtype=torch.long, device=dev)
        self.steps = torch.zeros(m, dtype=torch.long, device=dev)
        self.err = torch.zeros(m, dtype=dt_, device=dev)
        self.prev = torch.ones(m, dtype=dt_, device=dev)  # last accepted error ratio (PI)
        self.aux = None if jobs.aux is None else jobs.aux.clone()
        self.host_phase = [0] * m  # phases advance deterministically: the host mirrors them

    _TENSORS = ("y", "t", "t1", "dt", "phase", "steps", "err", "prev", "aux")

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.y.device)
        for name in self._TENSORS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.index_select(0, idx))
        self.k = self.k.index_select(1, idx)
        self.keys = [self.keys[i] for i in keep]
        self.host_phase = [self.host_phase[i] for i in keep]

    def put(self, slots: list[int], jobs: Jobs) -> None:
        """Start ``jobs`` in rows ``slots`` (overwriting finished rows)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.y.device)
        self.y[idx] = jobs.y0
        self.t[idx] = jobs.t0.to(self.t)
        self.t1[idx] = jobs.t1.to(self.t)
        for name in ("dt", "phase", "steps", "err"):
            getattr(self, name)[idx] = 0
        self.prev[idx] = 1
        if self.aux is not None:
            self.aux[idx] = jobs.aux
        for s, key in zip(slots, jobs.keys, strict=True):
            self.keys[s], self.host_phase[s] = key, 0

    def append(self, jobs: Jobs) -> None:
        new = _Rows(jobs, self.k.shape[0])
        for name in self._TENSORS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, torch.cat([v, getattr(new, name)]))
        self.k = torch.cat([self.k, new.k], dim=1)
        self.keys += new.keys
        self.host_phase += new.host_phase


def _advance(
    r: _Rows, out: Tensor, tab: _Tableau, norm: _Norm, max_steps: int, starting: bool, pi: bool
) -> Tensor:
    """Store f's output, finish the phases that end here; the rows' status [b] (int8).

    ``starting``: some row is in phase 0 or 1 (else the initial-step block is skipped).
    """
    ph = r.phase
    r.k[tab.slots[ph], torch.arange(len(ph), device=ph.device)] = out
    direction = torch.sign(r.t1 - r.t)
    dt = r.dt
    if starting:
        dt = _initial_step(r, norm, direction, tab.exponent)
    # the last phase done: a step, accepted or rejected
    y1 = r.y + torch.einsum("b,s,sbn->bn", r.dt, tab.b, r.k)
    err = torch.einsum("b,s,sbn->bn", r.dt, tab.b_err, r.k)
    ratio = torch.clamp(norm(err, torch.maximum(r.y.abs(), y1.abs())), min=1e-38)
    factor = _SAFETY * ratio ** (-tab.exponent)
    stepping = ph == tab.last
    accept = stepping & (ratio < 1.0)
    if pi:  # accepted: the PI law; rejected: the I law (factor < 0.9 then)
        gain = ratio ** (-_PI_BETA1 * tab.exponent) * r.prev ** (_PI_BETA2 * tab.exponent)
        factor = torch.where(accept, _SAFETY * gain, factor)
        r.prev = torch.where(accept, torch.clamp(ratio, min=1e-4), r.prev)
    factor = torch.clamp(factor, _FACTOR_MIN, _FACTOR_MAX)
    t_new = torch.where(accept, r.t + r.dt, r.t)
    r.y = torch.where(accept[:, None], y1, r.y)
    r.k[0] = torch.where(accept[:, None], r.k[tab.stages - 1], r.k[0])  # FSAL
    r.err = torch.where(accept, r.err + err[:, -1].abs(), r.err)
    r.steps = r.steps + stepping.long()
    running = direction * (t_new - r.t1) < 0
    dt = torch.where(stepping & running, r.dt * factor, dt)
    lo, hi = torch.minimum(t_new, r.t1) - t_new, torch.maximum(t_new, r.t1) - t_new
    r.dt = torch.minimum(torch.maximum(dt, lo), hi)  # never step past t1
    r.t = t_new
    r.phase = torch.where(ph == tab.last, torch.full_like(ph, _FIRST_STAGE), ph + 1)
    bad = stepping & (~torch.isfinite(ratio) | (r.steps >= max_steps) & running)
    status = torch.where(stepping & ~running, _DONE, _RUNNING)
    return torch.where(bad, _FAILED, status).to(torch.int8)


def _initial_step(r: _Rows, norm: _Norm, direction: Tensor, exponent: float) -> Tensor:
    """dt after phases 0 and 1 (Hairer-Wanner II.4 as torchode / scipy); other rows keep theirs."""
    # phase 0 done: first guess dt0 from |y0| and |f0|
    ref0 = r.y.abs()
    d0, d1 = norm(r.y, ref0), norm(r.k[0], ref0)
    dt0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    dt0 = torch.minimum(dt0, (r.t1 - r.t).abs())
    # phase 1 done: refine with the second derivative estimate from the Euler probe
    h0 = r.dt.abs()
    d2 = torch.where(h0 == 0, torch.inf, norm(r.k[1] - r.k[0], ref0) / h0)
    dmax = torch.maximum(d1, d2)
    dt1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** exponent)
    dt_init = direction * torch.minimum(100 * h0, dt1)
    dt = torch.where(r.phase == 0, direction * dt0, r.dt)
    return torch.where(r.phase == 1, dt_init, dt)


def solve_stream(
    f: VectorField,
    take: Callable[[int], Jobs | None],
    *,
    batch_size: int,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    last_rtol: float | None = None,
    last_atol: float | None = None,
    max_steps: int = 100_000,
    stats: SolverStats | None = None,
    method: MethodName = "dopri5",
    controller: Controller = "i",
    norm: ErrorNorm = "rms",
) -> Iterator[Finished]:
    """Solve a stream of jobs with at most ``batch_size`` rows per call of f, refilling rows.

    ``take(m)`` returns 1..m new jobs (``Jobs``), or None when there are no more; it is called
    whenever rows are free. f is called as f(t [b], y [b, n]) or, when the jobs carry ``aux``,
    f(t, y, aux [b, ...]). Yields ``Finished`` groups as rows end; a row's result does not
    depend on which jobs share its calls. ``method`` / ``controller`` / ``norm``: see the module
    doc (``METHODS``, ``CONTROLLERS``, ``ERROR_NORMS``).
    """
    _check_tolerances(rtol, atol, last_rtol, last_atol)
    _check_options(method, controller, norm)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    stats = stats if stats is not None else SolverStats()
    norm_ = _Norm(rtol, atol, last_rtol, last_atol, norm)
    source = _Source(take)
    first = source(batch_size)
    if first is None:
        return
    tab = _Tableau(get_pair(method), first.y0.dtype, first.y0.device)
    rows = _Rows(first, tab.stages)
    while len(rows.keys) < batch_size and (more := source(batch_size - len(rows.keys))):
        rows.append(more)
    while rows.keys:
        ph = rows.phase
        y_in = torch.addcmul(
            rows.y, rows.dt[:, None], torch.einsum("bj,jbn->bn", tab.w[ph], rows.k)
        )
        t_in = torch.addcmul(rows.t, tab.nodes[ph], rows.dt)
        out = f(t_in, y_in) if rows.aux is None else f(t_in, y_in, rows.aux)
        b = len(rows.keys)
        stats.calls, stats.rows, stats.max_rows = (
            stats.calls + 1,
            stats.rows + b,
            max(stats.max_rows, b),
        )
        if stats.record_history:
            stats.history.append(b)
        starting = any(p < _FIRST_STAGE for p in rows.host_phase)
        pi = controller == "pi"
        status = _advance(rows, out.to(rows.y.dtype), tab, norm_, max_steps, starting, pi)
        last = tab.last
        could_end = any(p == last for p in rows.host_phase)
        rows.host_phase = [_FIRST_STAGE if p == last else p + 1 for p in rows.host_phase]
        if not could_end:
            continue
        flags = status.tolist()  # the one host read of this call
        if any(s == _FAILED for s in flags):
            _raise_failure(rows, flags, rtol, atol, max_steps)
        ended = [i for i, s in enumerate(flags) if s == _DONE]
        if not ended:
            continue
        idx = torch.tensor(ended, dtype=torch.long, device=rows.y.device)
        yield Finished(
            [rows.keys[i] for i in ended],
            rows.y.index_select(0, idx),
            rows.steps.index_select(0, idx),
            rows.err.index_select(0, idx),
        )
        free = ended
        while free and (new := source(len(free))) is not None:
            rows.put(free[: len(new.keys)], new)
            free = free[len(new.keys) :]
        if free:  # no job left for these rows: drop them, so no call evaluates an idle row
            gone = set(free)
            rows.select([i for i in range(len(rows.keys)) if i not in gone])


def _check_options(method, controller, norm) -> None:
    for name, value, valid in (
        ("method", method, METHODS),
        ("controller", controller, CONTROLLERS),
        ("norm", norm, ERROR_NORMS),
    ):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


class _Source:
    """``take`` with checks; None for ever once it returned None."""

    def __init__(self, take: Callable[[int], Jobs | None]) -> None:
        self.take, self.done = take, False

    def __call__(self, m: int) -> Jobs | None:
        if self.done:
            return None
        jobs = self.take(m)
        if jobs is None or len(jobs.keys) == 0:
            self.done = True
            return None
        _check_jobs(jobs)
        if len(jobs.keys) > m:
            raise ValueError(f"take({m}) returned {len(jobs.keys)} jobs; at most {m} allowed")
        return jobs


def _check_jobs(jobs: Jobs) -> None:
    if jobs.y0.ndim != 2:
        raise ValueError(f"y0 must be [m, n], got shape {tuple(jobs.y0.shape)}")
    m = jobs.y0.shape[0]
    if len(jobs.keys) != m or jobs.t0.shape != (m,) or jobs.t1.shape != (m,):
        raise ValueError(
            f"a Jobs group needs m keys and t0, t1 of shape [m]; got {len(jobs.keys)} keys, "
            f"y0 {tuple(jobs.y0.shape)}, t0 {tuple(jobs.t0.shape)}, t1 {tuple(jobs.t1.shape)}"
        )
    if jobs.aux is not None and jobs.aux.shape[0] != m:
        raise ValueError(f"aux must have {m} rows, got shape {tuple(jobs.aux.shape)}")


def _raise_failure(rows: _Rows, flags: list[int], rtol, atol, max_steps) -> None:
    bad = [rows.keys[i] for i, s in enumerate(flags) if s == _FAILED]
    raise RuntimeError(
        f"ODE solve failed for {len(bad)} row(s) (keys {bad[:5]}): a non-finite error estimate "
        f"or max_steps={max_steps} reached. Check the model for NaN/inf outputs, or loosen "
        f"rtol/atol (now {rtol}, {atol})."
    )


def solve_ivp(
    f: VectorField,
    y0: Tensor,
    t0: float | Tensor,
    t1: float | Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    last_rtol: float | None = None,
    last_atol: float | None = None,
    max_steps: int = 100_000,
    aux: Tensor | None = None,
    method: MethodName = "dopri5",
    controller: Controller = "i",
    norm: ErrorNorm = "rms",
) -> SolveResult:
    """Integrate dy/dt = f(t, y) from t0 to t1 with an adaptive embedded pair, one control per row.

    Args:
        f: vector field; called with t [b] (y's dtype) and y [b, n] for the b rows still running
            (and their ``aux`` rows when given: f(t, y, aux)).
        y0: [B, n] initial state; its dtype is the integration dtype (use float64 for likelihoods).
        t0, t1: start and end times, scalars or [B].
        rtol, atol: per-row tolerances on the RMS norm of the local error.
        last_rtol, last_atol: a separate test for the last component (see the module doc).
        method, controller, norm: the pair (default Dormand-Prince 5(4)), "i" or "pi" step-size
            control, "rms" or "max" over components (see the module doc).
    """
    if y0.ndim != 2:
        raise ValueError(f"y0 must be [B, n], got shape {tuple(y0.shape)}")
    b = y0.shape[0]

    def as_times(t: float | Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=y0.dtype, device=y0.device)
        return t.expand(b).contiguous() if t.ndim == 0 else t

    pending = [Jobs(list(range(b)), y0, as_times(t0), as_times(t1), aux)]
    stats = SolverStats()
    y, steps = torch.empty_like(y0), torch.zeros(b, dtype=torch.long, device=y0.device)
    err = torch.zeros(b, dtype=y0.dtype, device=y0.device)
    for done in solve_stream(
        f,
        lambda m: pending.pop() if pending else None,
        batch_size=b,
        rtol=rtol,
        atol=atol,
        last_rtol=last_rtol,
        last_atol=last_atol,
        max_steps=max_steps,
        stats=stats,
        method=method,
        controller=controller,
        norm=norm,
    ):
        idx = torch.tensor(done.keys, dtype=torch.long, device=y0.device)
        y[idx], steps[idx], err[idx] = done.y, done.steps, done.last_error
    return SolveResult(
        y=y, nfe=stats.calls, steps=steps, last_error=err, rows=stats.rows, method=method
    )
