"""Measured solver error of bits/dim: chosen jobs solved again at a converged reference.

The solver's own error report (the sum of local error estimates of log p, ``logp_error`` /
``solver_error_bpd``) is a *local* estimate: on trained models it underestimates the error of the
number users read by 10-40x. This module measures it instead:

- **The check.** A random subset of the (example, draw) jobs of an evaluation, chosen from the
  seed alone (``choose_check_jobs``: default max(8, 2 %) of the jobs), is solved again with the
  *same* dequantization noise and Hutchinson probe at a reference tolerance ``REFERENCE_FACTOR``
  = 100x tighter (rtol, atol and the log-density's tolerance), with the network in float64 (a
  copy made once), so float32 rounding in the network does not set the reference's floor. The
  difference per job, evaluated minus reference, in bits/dim, is the measured solver error.
  The reference runs dopri5 with the PI controller, and is itself checked on
  ``CONVERGENCE_JOBS`` jobs against a second method (``CONVERGENCE_METHOD``) at the same
  tolerances; their agreement is recorded (and a warning given when it is not well below the
  measured error).
- **Calibration** (``idode.calibration``) picks the cheapest tolerance of a ladder whose error
  on a few jobs, measured the same way, is within a target.

A job's error bounds its image's: an image's bits/dim is the mean (or the log-mean-exp) of its K
draws' bounds, so its error is at most its draws' largest. Overhead: each checked job costs
about 3-5x its evaluation NFE (``SolverErrorReport.nfe_overhead`` records it).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from idode import rng
from idode.augmented import augmented_field, eval_mode, gaussian_log_prob
from idode.continuous import draw_jobs
from idode.dequantization import nats_to_bits_per_dim
from idode.divergence import first_order_input_gradients
from idode.protocol import Protocol, solver_tolerances
from idode.solvers import Controller, Jobs, nfe_of_steps, solve_stream
from idode.tableaus import MethodName
from idode.validation import BiasedToleranceWarning, InputError

__all__ = [
    "REFERENCE_FACTOR",
    "SolverErrorReport",
    "SolverErrorWarning",
    "Tolerances",
    "check_arguments",
    "check_jobs",
    "check_rows",
    "choose_check_jobs",
    "float64_copy",
    "num_check_jobs",
    "solve_jobs",
    "summary_line",
]

CheckSize = int | float | None
DEFAULT_CHECK_MIN, DEFAULT_CHECK_FRACTION = 8, 0.02  # default check: max(8, 2 %) of the jobs
REFERENCE_FACTOR = 100.0  # the reference solves at tolerances this much tighter
# the reference's own check: a second method (Verner 6(5), PI controller, float64 network) at the
# reference's tolerances on a few jobs. Its error constants are not dopri5's, so agreement says
# both are converged to about that level, not that one solve repeated itself.
CONVERGENCE_METHOD, CONVERGENCE_JOBS = "vern6", 2
# float64 cannot deliver a relative accuracy much below ~1e-13 over thousands of steps; the
# references never go tighter than this (and record where they stopped)
REFERENCE_RTOL_FLOOR = 1e-12
# the reference agrees with the second method within max(this, 10 % of the measured error)
CONVERGED_BPD = 1e-5


def summary_line(solver_error: dict | None) -> str:
    """'solver error max 0.0012, mean 0.0004 bits/dim (8 jobs re-solved 100x tighter)'."""
    if not solver_error or not solver_error.get("checked"):
        return "solver error not measured (solver check off)"
    tail = ""
    eps = solver_error.get("max_solver_error")
    if eps is not None:
        tail = f"; target {eps:g} " + ("met" if solver_error["within_target"] else "EXCEEDED")
    return (
        f"solver error max {solver_error['max_abs_bpd']:.4f}, mean "
        f"{solver_error['mean_abs_bpd']:.4f} bits/dim ({solver_error['checked']} jobs re-solved "
        f"{REFERENCE_FACTOR:g}x tighter{tail})"
    )


class SolverErrorWarning(UserWarning):
    """A measured solver error above the target, or a reference that did not converge."""


@dataclass(frozen=True)
class Tolerances:
    """One error-control setting of the likelihood ODE (see ``likelihood.solver_tolerances``),
    with the embedded pair and step-size controller that solve it."""

    rtol: float
    atol: float
    tolerance: str = "logp"
    logp_atol: float | None = None  # nats; None: the protocol's default for d
    method: MethodName = "dopri5"
    controller: Controller = "i"

    @classmethod
    def of(cls, protocol: Protocol) -> Tolerances:
        """The error-control settings of a protocol."""
        return cls(protocol.rtol, protocol.atol, protocol.tolerance, protocol.logp_atol,
                   protocol.method)  # fmt: skip

    def resolved(self, num_dims: int) -> Tolerances:
        """The same setting with ``logp_atol`` made explicit (None under "paper")."""
        kw = self.solver_kwargs(num_dims)
        return replace(self, logp_atol=kw.get("last_atol"))

    def scaled(self, factor: float, num_dims: int) -> Tolerances:
        """Every tolerance divided by ``factor``, rtol and atol no lower than the float64 floor."""
        r = self.resolved(num_dims)
        logp = None if r.logp_atol is None else r.logp_atol / factor
        return replace(
            r,
            rtol=max(r.rtol / factor, REFERENCE_RTOL_FLOOR),
            atol=max(r.atol / factor, REFERENCE_RTOL_FLOOR),
            logp_atol=logp,
        )

    def reference(self, num_dims: int) -> Tolerances:
        """The reference of this setting: the same pair and controller ``REFERENCE_FACTOR``
        tighter (the PI controller was cheaper at 1e-7 on digits but less accurate per
        tolerance on the Gaussian problem of tests/test_certify.py: not a safe reference)."""
        return self.scaled(REFERENCE_FACTOR, num_dims)

    def solver_kwargs(self, num_dims: int) -> dict:
        with warnings.catch_warnings():  # the evaluation itself warned about a loose rtol
            warnings.simplefilter("ignore", BiasedToleranceWarning)
            kw = solver_tolerances(self.tolerance, self.rtol, self.atol, self.logp_atol, num_dims)
        return {**kw, "method": self.method, "controller": self.controller}


# --------------------------------------------------------------------------------------------------
# which jobs
# --------------------------------------------------------------------------------------------------


def num_check_jobs(num_jobs: int, check: CheckSize = None) -> int:
    """How many of ``num_jobs`` jobs the check re-solves.

    ``check``: None = max(8, 2 %); a count N >= 1 (an int, or a float of an integral value as
    ``Protocol.solver_check`` holds it) = N (at most all); a float in (0, 1) = that fraction
    (rounded up); 0 = none (the check is off).
    """
    if isinstance(check, bool) or not isinstance(check, int | float | None):
        raise InputError(
            f"solver_check must be a count, a fraction in (0, 1) or None, got {check!r}"
        )
    if check is None:
        m = max(DEFAULT_CHECK_MIN, math.ceil(DEFAULT_CHECK_FRACTION * num_jobs))
    elif 0 < check < 1:
        m = math.ceil(check * num_jobs)
    elif check == 0 or (check >= 1 and math.isfinite(check) and check == int(check)):
        m = int(check)
    else:
        raise InputError(
            f"solver_check={check} is neither a count nor a fraction in (0, 1); pass an integer "
            f"number of jobs (e.g. 8), a fraction (e.g. 0.02) or 0 (off)"
        )
    return min(m, num_jobs)


def check_arguments(max_solver_error: float | None, check: CheckSize) -> None:
    """InputError (a ValueError) for a target that is not a positive number or a bad check."""
    if max_solver_error is not None and not (
        isinstance(max_solver_error, int | float) and 0 < max_solver_error < math.inf
    ):
        raise InputError(f"max_solver_error must be a positive number of bits/dim (e.g. 0.002), "
                         f"got {max_solver_error!r}")  # fmt: skip
    num_check_jobs(1, check)


def choose_check_jobs(
    num_jobs: int, check: CheckSize = None, seed: int = 0, purpose: str = "solver_check"
) -> list[int]:
    """The jobs (sorted positions in 0..num_jobs-1) the check re-solves.

    Job j is (example j // K, draw j % K). The choice depends on (num_jobs, check, seed,
    purpose) alone, not on the batch size, the order of solves or the number of processes.
    """
    m = num_check_jobs(num_jobs, check)
    if m == 0:
        return []
    perm = torch.randperm(num_jobs, generator=rng.stream(seed, purpose))
    return sorted(perm[:m].tolist())


# --------------------------------------------------------------------------------------------------
# solving jobs again
# --------------------------------------------------------------------------------------------------


def float64_copy(model):
    """The model with its network in float64 (a copy; the model itself if it already is)."""
    if model.net_dtype in (None, torch.float64):
        return model
    return copy.deepcopy(model).to(torch.float64)


def stack_jobs(jobs: Sequence[Jobs]) -> Jobs:
    """Several ``Jobs`` groups as one."""
    aux = None if jobs[0].aux is None else torch.cat([j.aux for j in jobs])
    return Jobs(
        [k for j in jobs for k in j.keys],
        torch.cat([j.y0 for j in jobs]),
        torch.cat([j.t0 for j in jobs]),
        torch.cat([j.t1 for j in jobs]),
        aux,
    )


def solve_jobs(
    model,
    jobs: Jobs,
    divergence: str,
    shape: tuple[int, ...],
    tols: Tolerances,
    *,
    batch_size: int | None = None,
    net_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """log p_ODE (nats, [m] float64, CPU) and solver steps ([m]) of the jobs, in their order."""
    m, d = len(jobs.keys), math.prod(shape)
    order = {key: j for j, key in enumerate(jobs.keys)}
    pos = [0]

    def take(k: int) -> Jobs | None:
        s = pos[0]
        if s >= m:
            return None
        pos[0] = e = min(s + k, m)
        aux = None if jobs.aux is None else jobs.aux[s:e]
        return Jobs(jobs.keys[s:e], jobs.y0[s:e], jobs.t0[s:e], jobs.t1[s:e], aux)

    logp = torch.zeros(m, dtype=torch.float64)
    steps = torch.zeros(m, dtype=torch.long)
    field_ = augmented_field(model, divergence, shape, net_kwargs)
    var = model.schedule.sigma2_max
    with eval_mode(model), torch.no_grad(), first_order_input_gradients():
        kw = tols.solver_kwargs(d)
        for done in solve_stream(field_, take, batch_size=batch_size or m, **kw):
            z_end = done.y[:, :d].reshape(len(done.keys), *shape)
            lp = (gaussian_log_prob(z_end, var) + done.y[:, d]).cpu()
            idx = torch.tensor([order[k] for k in done.keys])
            logp[idx], steps[idx] = lp, done.steps.cpu()
    return logp, steps


# --------------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------------


@dataclass
class SolverErrorReport:
    """The measured solver error of an evaluation; ``as_dict`` is eval.json's "solver_error"."""

    jobs: list[dict]  # per checked job: example, draw, log p (eval, reference), diff_bpd, NFE
    reference: dict  # settings of the reference solve and its own convergence check
    eval_nfe: int  # the evaluation's NFE (sum over its jobs of 6 x steps + 2)
    check_nfe: int  # the check's NFE (references and convergence solves)
    seconds: float = 0.0
    max_solver_error: float | None = None

    @property
    def checked(self) -> int:
        return len(self.jobs)

    def _diffs(self) -> list[float]:
        return [j["diff_bpd"] for j in self.jobs]

    @property
    def max_abs_bpd(self) -> float | None:
        return max(map(abs, self._diffs())) if self.jobs else None

    def as_dict(self) -> dict:
        """The contract keys (checked, mean_abs_bpd, max_abs_bpd, mean_signed_bpd, reference)
        plus the per-job rows and the overhead."""
        diffs = self._diffs()
        n = len(diffs)
        return {
            "checked": n,
            "mean_abs_bpd": math.fsum(map(abs, diffs)) / n if n else None,
            "max_abs_bpd": self.max_abs_bpd,
            "mean_signed_bpd": math.fsum(diffs) / n if n else None,
            "reference": self.reference,
            "max_solver_error": self.max_solver_error,
            "within_target": None
            if self.max_solver_error is None or not n
            else self.max_abs_bpd <= self.max_solver_error,
            "eval_nfe": self.eval_nfe,
            "check_nfe": self.check_nfe,
            "nfe_overhead": self.check_nfe / self.eval_nfe if self.eval_nfe else None,
            "seconds": self.seconds,
            "jobs": self.jobs,
            "note": "per (example, draw) job: bits/dim of the evaluation's solve minus that of a "
            "reference solve with the same noise and probe (an image's error is at most its "
            "draws' largest); measured, not the solver's local estimate"
            if n
            else "no job was checked (solver_check=0): the solver error is not measured",
        }


def check_jobs(
    model,
    jobs: Jobs,
    eval_log_p: Tensor,
    eval_steps: Tensor,
    divergence: str,
    shape: tuple[int, ...],
    tols: Tolerances,
    *,
    eval_nfe: int,
    max_solver_error: float | None = None,
    batch_size: int | None = None,
    net_kwargs: dict | None = None,
    reference_model=None,
    warn: bool = True,
) -> SolverErrorReport:
    """Re-solve ``jobs`` (keys (example, draw), the evaluation's starts) at the reference.

    eval_log_p, eval_steps: [m] the evaluation's log p_ODE (nats) and steps of the same jobs;
    eval_nfe: the evaluation's total NFE (for the overhead). Warns (``SolverErrorWarning``) when
    the measured max exceeds ``max_solver_error`` or the reference did not converge.
    """
    tic, d = time.perf_counter(), math.prod(shape)
    ref_model = reference_model if reference_model is not None else float64_copy(model)
    ref_tols = tols.reference(d)
    kw = dict(batch_size=batch_size, net_kwargs=net_kwargs)
    ref_lp, ref_steps = solve_jobs(ref_model, jobs, divergence, shape, ref_tols, **kw)
    diff = nats_to_bits_per_dim(ref_lp - eval_log_p.double().cpu(), d)  # eval - reference bpd
    rows = [
        {"index": int(key[0]), "draw": int(key[1]), "log_p_nats": float(e),
         "reference_log_p_nats": float(r), "diff_bpd": float(x),
         "nfe": int(nfe_of_steps(s, tols.method)),
         "reference_nfe": int(nfe_of_steps(rs, tols.method))}
        for key, e, r, x, s, rs in zip(jobs.keys, eval_log_p.tolist(), ref_lp.tolist(),
                                       diff.tolist(), eval_steps.tolist(), ref_steps.tolist(),
                                       strict=True)
    ]  # fmt: skip
    check_nfe = int(nfe_of_steps(ref_steps, ref_tols.method).sum())
    conv, conv_nfe = _convergence(ref_model, jobs, ref_lp, divergence, shape, ref_tols, kw)
    reference = {
        **asdict(ref_tols),
        "factor": REFERENCE_FACTOR,
        "network_dtype": str(ref_model.net_dtype or torch.float64).removeprefix("torch."),
        "convergence": conv,
    }
    report = SolverErrorReport(
        rows, reference, int(eval_nfe), check_nfe + conv_nfe, time.perf_counter() - tic,
        max_solver_error,
    )  # fmt: skip
    if warn:
        warn_report(report)
    return report


def _convergence(ref_model, jobs, ref_lp, divergence, shape, ref_tols, kw) -> tuple[dict, int]:
    """The reference against a second method at the same tolerances on its first few jobs."""
    m = min(CONVERGENCE_JOBS, len(jobs.keys))
    if m == 0:
        return {"jobs": 0}, 0
    d = math.prod(shape)
    sub = Jobs(jobs.keys[:m], jobs.y0[:m], jobs.t0[:m], jobs.t1[:m],
               None if jobs.aux is None else jobs.aux[:m])  # fmt: skip
    second = replace(ref_tols, method=CONVERGENCE_METHOD)
    lp, steps = solve_jobs(ref_model, sub, divergence, shape, second, **kw)
    gap = nats_to_bits_per_dim((lp - ref_lp[:m]).abs(), d).max().item()
    nfe = int(nfe_of_steps(steps, second.method).sum())
    return {"jobs": m, **asdict(second), "max_abs_diff_bpd": gap, "nfe": nfe}, nfe


def warn_report(report: SolverErrorReport) -> None:
    """A ``SolverErrorWarning`` for a check above its target or an unconverged reference."""
    if not report.jobs:
        return
    worst, eps = report.max_abs_bpd, report.max_solver_error
    if eps is not None and worst > eps:
        warnings.warn(
            f"measured solver error {worst:.2g} bits/dim (max over {report.checked} checked jobs) "
            f"exceeds max_solver_error={eps:g}; tighten rtol/atol (or calibrate on more "
            f"examples) and evaluate again",
            SolverErrorWarning,
            stacklevel=3,
        )
    gap = report.reference["convergence"].get("max_abs_diff_bpd", 0.0)
    if gap > max(CONVERGED_BPD, 0.1 * worst):
        warnings.warn(
            f"the reference solve and a second method ({CONVERGENCE_METHOD}) at its tolerances "
            f"differ by {gap:.2g} bits/dim, not well below the measured error {worst:.2g}: the "
            f"measured error is uncertain by that much",
            SolverErrorWarning,
            stacklevel=3,
        )


def check_rows(
    model,
    x_all: Tensor,
    rows: Sequence[dict],
    num_levels: int,
    protocol: Protocol,
    *,
    num_examples: int | None = None,
    ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    warn: bool = True,
) -> SolverErrorReport:
    """The check of an evaluation under ``protocol`` from its per-example rows
    (``idode.evaluate``'s format).

    x_all: [N, ...] the split's integer images; rows: the rows (keys "index",
    "log_p_model_nats", "steps_per_draw", "nfe") of the examples to check among; num_examples:
    the evaluation's N (default len(rows)); ids: the example index (a row's "index", which
    seeds its noise) of each image of x_all (default its position). The jobs are positions
    ``choose_check_jobs(N * K, protocol.solver_check, protocol.seed)`` whose example is in
    ``rows`` (a shard checks its share); their noise and probes are drawn again from the
    per-example "dequantization" streams of the seed on ``device`` (default x_all's; it must be
    the evaluation's device type).
    """
    n, k, eps = num_examples or len(rows), protocol.num_samples, protocol.max_solver_error
    ids = list(range(len(x_all))) if ids is None else [int(i) for i in ids]
    by_index = {int(r["index"]): r for r in rows}
    chosen = choose_check_jobs(n * k, protocol.solver_check, protocol.seed)
    picked = [(j // k, j % k) for j in chosen if ids[j // k] in by_index]  # (position, draw)
    keys = [(ids[p], d) for p, d in picked]
    eval_nfe = sum(int(r["nfe"]) for r in rows)
    if not keys:
        return SolverErrorReport([], {}, eval_nfe, 0, max_solver_error=eps)
    positions = sorted({p for p, _ in picked})
    dev = torch.device(device) if device is not None else x_all.device
    gens = protocol.generators([ids[p] for p in positions], dev)
    x = x_all[torch.tensor(positions)].to(dev)
    drawn = draw_jobs(model, x, num_levels, protocol, generator=gens)
    jobs = select_jobs(drawn, [(positions.index(p), d) for p, d in picked])
    jobs.keys = keys
    lp = torch.tensor([by_index[i]["log_p_model_nats"][d] for i, d in keys], dtype=torch.float64)
    steps = torch.tensor([by_index[i]["steps_per_draw"][d] for i, d in keys])
    return check_jobs(
        model, jobs, lp, steps, protocol.divergence, tuple(x_all.shape[1:]),
        Tolerances.of(protocol), eval_nfe=eval_nfe, max_solver_error=eps,
        batch_size=batch_size, warn=warn,
    )  # fmt: skip


def select_jobs(jobs: Jobs, keys: Sequence) -> Jobs:
    """The rows of ``jobs`` with these keys, in this order."""
    pos = {key: j for j, key in enumerate(jobs.keys)}
    idx = torch.tensor([pos[key] for key in keys], device=jobs.y0.device)
    aux = None if jobs.aux is None else jobs.aux[idx]
    return Jobs(list(keys), jobs.y0[idx], jobs.t0[idx], jobs.t1[idx], aux)
