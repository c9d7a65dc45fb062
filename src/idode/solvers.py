"""Adaptive ODE integration on an injected vector field, one error control per row, with refilling.

The solver knows nothing of diffusion: ``f(t [b], y [b, n]) -> [b, n]`` (or ``f(t, y, aux)``
when the jobs carry per-row inputs such as a Hutchinson probe). Each row is an independent
Dormand-Prince 5(4) solve with its own time, step size, error control and FSAL stage, and the
controller is torchode's / scipy's RK45: error ratio = RMS over components of
err / (atol + rtol max(|y0|, |y1|)), accept when < 1, dt *= clip(0.9 ratio^(-1/5), 0.2, 10), and
the Hairer-Wanner initial step (two evaluations). A row's trajectory therefore does not depend on
its batch-mates.

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

import torch
from torch import Tensor

from idode.choices import SOLVER_METHODS, SolverMethod

__all__ = [
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
# the embedded Runge-Kutta pairs a solve can use (``Protocol.method``); a new pair adds its name

# Dormand-Prince 5(4) tableau (as torchode / scipy RK45): nodes, stages, 5th-order weights, error.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B_LOW = (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
_SAFETY, _FACTOR_MIN, _FACTOR_MAX, _ORDER = 0.9, 0.2, 10.0, 5
# phases of a row: 0 = f(t0, y0); 1 = f at the Euler probe of the initial-step selection;
# 2..7 = stages 1..6 of a Dopri5 step (stage 0 is the FSAL value of the previous step)
_FIRST_STAGE, _LAST = 2, 7
_RUNNING, _DONE, _FAILED = 0, 1, 2


def nfe_of_steps(steps: Tensor | int) -> Tensor | int:
    """Evaluations one solve needs alone: 6 per Dopri5 step (FSAL), attempted or rejected, + 2."""
    return 6 * steps + 2


@dataclass
class SolveResult:
    """A batch solved by ``solve_ivp``; per-row tensors are [B]."""

    y: Tensor  # [B, n] state at t1
    nfe: int  # calls of f (each on the rows still running)
    steps: Tensor  # [B] attempted steps per row (accepted + rejected)
    last_error: Tensor  # [B] sum over accepted steps of |local error estimate| of the last comp.
    rows: int  # rows evaluated over all calls (= nfe_per_example.sum())

    @property
    def nfe_per_example(self) -> Tensor:
        """Evaluations a row needed alone: ``nfe_of_steps(steps)``."""
        return nfe_of_steps(self.steps)


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
    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        w = torch.zeros(8, 7, dtype=torch.float64)
        w[1, 0] = 1.0  # the Euler probe y0 + dt0 f0
        for i in range(1, 7):
            w[i + 1, :i] = torch.tensor(_A[i], dtype=torch.float64)
        nodes = torch.tensor((0.0, 1.0, *_C[1:]), dtype=torch.float64)
        slots = torch.tensor((0, 1, 1, 2, 3, 4, 5, 6))
        b = torch.tensor(_B, dtype=torch.float64)
        b_err = b - torch.tensor(_B_LOW, dtype=torch.float64)
        kw = dict(dtype=dtype, device=device)
        self.w, self.nodes = w.to(**kw), nodes.to(**kw)
        self.slots, self.b, self.b_err = slots.to(device), b.to(**kw), b_err.to(**kw)


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
    """The error ratio: RMS of err/scale, or max(RMS over all but the last, last's own test)."""

    def __init__(self, rtol, atol, last_rtol, last_atol) -> None:
        self.rtol, self.atol, self.last_rtol, self.last_atol = rtol, atol, last_rtol, last_atol

    def __call__(self, err: Tensor, ref: Tensor) -> Tensor:
        """err, ref [b, n] -> [b]; ref = max(|y0|, |y1|) (or |y0| for the initial step)."""
        if self.last_atol is None:
            return _rms(err / (self.atol + self.rtol * ref))
        body = _rms(err[:, :-1] / (self.atol + self.rtol * ref[:, :-1]))
        last = err[:, -1].abs() / (self.last_atol + self.last_rtol * ref[:, -1])
        return torch.maximum(body, last)


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x / math.sqrt(x.shape[1]), ord=2, dim=1)  # as torchode


class _Rows:
    """The per-row solver state of the running batch (all on the device)."""

    def __init__(self, jobs: Jobs) -> None:
        m, n = jobs.y0.shape
        dev, dt_ = jobs.y0.device, jobs.y0.dtype
        self.keys = list(jobs.keys)
        self.y = jobs.y0.clone()
        self.t = jobs.t0.to(dev, dt_).clone()
        self.t1 = jobs.t1.to(dev, dt_).clone()
        self.dt = torch.zeros(m, dtype=dt_, device=dev)
        self.k = torch.zeros(7, m, n, dtype=dt_, device=dev)
        self.phase = torch.zeros(m, dtype=torch.long, device=dev)
        self.steps = torch.zeros(m, dtype=torch.long, device=dev)
        self.err = torch.zeros(m, dtype=dt_, device=dev)
        self.aux = None if jobs.aux is None else jobs.aux.clone()
        self.host_phase = [0] * m  # phases advance deterministically: the host mirrors them

    _TENSORS = ("y", "t", "t1", "dt", "phase", "steps", "err", "aux")

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
        if self.aux is not None:
            self.aux[idx] = jobs.aux
        for s, key in zip(slots, jobs.keys, strict=True):
            self.keys[s], self.host_phase[s] = key, 0

    def append(self, jobs: Jobs) -> None:
        new = _Rows(jobs)
        for name in self._TENSORS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, torch.cat([v, getattr(new, name)]))
        self.k = torch.cat([self.k, new.k], dim=1)
        self.keys += new.keys
        self.host_phase += new.host_phase


def _advance(
    r: _Rows, out: Tensor, tab: _Tableau, norm: _Norm, max_steps: int, starting: bool
) -> Tensor:
    """Store f's output, finish the phases that end here; the rows' status [b] (int8).

    ``starting``: some row is in phase 0 or 1 (else the initial-step block is skipped).
    """
    ph = r.phase
    r.k[tab.slots[ph], torch.arange(len(ph), device=ph.device)] = out
    direction = torch.sign(r.t1 - r.t)
    dt = r.dt
    if starting:
        dt = _initial_step(r, norm, direction)
    # phase 7 done: a Dopri5 step, accepted or rejected
    y1 = r.y + torch.einsum("b,s,sbn->bn", r.dt, tab.b, r.k)
    err = torch.einsum("b,s,sbn->bn", r.dt, tab.b_err, r.k)
    ratio = torch.clamp(norm(err, torch.maximum(r.y.abs(), y1.abs())), min=1e-38)
    factor = torch.clamp(_SAFETY * ratio ** (-1.0 / _ORDER), _FACTOR_MIN, _FACTOR_MAX)
    stepping = ph == _LAST
    accept = stepping & (ratio < 1.0)
    t_new = torch.where(accept, r.t + r.dt, r.t)
    r.y = torch.where(accept[:, None], y1, r.y)
    r.k[0] = torch.where(accept[:, None], r.k[6], r.k[0])  # FSAL
    r.err = torch.where(accept, r.err + err[:, -1].abs(), r.err)
    r.steps = r.steps + stepping.long()
    running = direction * (t_new - r.t1) < 0
    dt = torch.where(stepping & running, r.dt * factor, dt)
    lo, hi = torch.minimum(t_new, r.t1) - t_new, torch.maximum(t_new, r.t1) - t_new
    r.dt = torch.minimum(torch.maximum(dt, lo), hi)  # never step past t1
    r.t = t_new
    r.phase = torch.where(ph == _LAST, torch.full_like(ph, _FIRST_STAGE), ph + 1)
    bad = stepping & (~torch.isfinite(ratio) | (r.steps >= max_steps) & running)
    status = torch.where(stepping & ~running, _DONE, _RUNNING)
    return torch.where(bad, _FAILED, status).to(torch.int8)


def _initial_step(r: _Rows, norm: _Norm, direction: Tensor) -> Tensor:
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
    dt1 = torch.where(
        dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1.0 / _ORDER)
    )
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
) -> Iterator[Finished]:
    """Solve a stream of jobs with at most ``batch_size`` rows per call of f, refilling rows.

    ``take(m)`` returns 1..m new jobs (``Jobs``), or None when there are no more; it is called
    whenever rows are free. f is called as f(t [b], y [b, n]) or, when the jobs carry ``aux``,
    f(t, y, aux [b, ...]). Yields ``Finished`` groups as rows end; a row's result does not
    depend on which jobs share its calls.
    """
    _check_tolerances(rtol, atol, last_rtol, last_atol)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    stats = stats if stats is not None else SolverStats()
    norm = _Norm(rtol, atol, last_rtol, last_atol)
    source = _Source(take)
    first = source(batch_size)
    if first is None:
        return
    tab = _Tableau(first.y0.dtype, first.y0.device)
    rows = _Rows(first)
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
        status = _advance(rows, out.to(rows.y.dtype), tab, norm, max_steps, starting)
        could_end = any(p == _LAST for p in rows.host_phase)
        rows.host_phase = [_FIRST_STAGE if p == _LAST else p + 1 for p in rows.host_phase]
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
) -> SolveResult:
    """Integrate dy/dt = f(t, y) from t0 to t1 with adaptive Dormand-Prince, one control per row.

    Args:
        f: vector field; called with t [b] (y's dtype) and y [b, n] for the b rows still running
            (and their ``aux`` rows when given: f(t, y, aux)).
        y0: [B, n] initial state; its dtype is the integration dtype (use float64 for likelihoods).
        t0, t1: start and end times, scalars or [B].
        rtol, atol: per-row tolerances on the RMS norm of the local error.
        last_rtol, last_atol: a separate test for the last component (see the module doc).
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
    ):
        idx = torch.tensor(done.keys, dtype=torch.long, device=y0.device)
        y[idx], steps[idx], err[idx] = done.y, done.steps, done.last_error
    return SolveResult(y=y, nfe=stats.calls, steps=steps, last_error=err, rows=stats.rows)
