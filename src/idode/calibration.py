"""The tolerance that meets a target accuracy: a ladder of tolerances against the reference.

``calibrate`` solves a few jobs at each rung of ``LADDER`` (loose to tight, each against its own
``certify.REFERENCE_FACTOR`` = 100x tighter reference with the network in float64) and picks the
first (cheapest) rung whose largest error is within max_solver_error / ``SAFETY_MARGIN``; the
post-hoc check (``idode.certify``) then measures the run itself. ``LibraryCheck`` is both, for
one ``likelihood.bits_per_dim`` call.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from idode import rng
from idode.certify import (
    REFERENCE_FACTOR,
    SolverErrorWarning,
    Tolerances,
    check_arguments,
    check_jobs,
    choose_check_jobs,
    float64_copy,
    solve_jobs,
    stack_jobs,
)
from idode.continuous import draw_jobs
from idode.dequantization import nats_to_bits_per_dim
from idode.protocol import Protocol
from idode.solvers import nfe_of_steps

__all__ = ["CALIBRATION_EXAMPLES", "LADDER", "SAFETY_MARGIN", "Calibration", "LibraryCheck",
           "calibrate"]  # fmt: skip

SAFETY_MARGIN = 2.0  # calibration picks a rung whose measured max error <= EPS / SAFETY_MARGIN
LADDER = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)  # rtol rungs, loose (cheap) to tight
CALIBRATION_EXAMPLES = 8


@dataclass
class Calibration:
    """The tolerance ``calibrate`` chose for a target accuracy, and the ladder it measured."""

    max_solver_error: float
    chosen: Tolerances
    met: bool  # whether the chosen rung's max error is within max_solver_error / margin
    ladder: list[dict] = field(default_factory=list)  # per rung tried: tolerances, NFE, errors
    jobs: int = 0  # calibration jobs (draw 0 of this many examples)
    nfe: int = 0  # the calibration's total NFE (rungs and their references)
    margin: float = SAFETY_MARGIN
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["note"] = (
            f"rtol rungs loose to tight; each rung's max |bits/dim - reference| over {self.jobs} "
            f"jobs (reference {REFERENCE_FACTOR:g}x tighter, network in float64); chosen: the "
            f"first rung with max <= max_solver_error / {self.margin:g}"
        )
        return out


def calibrate(
    model,
    x_int: Tensor,
    num_levels: int = 256,
    protocol: Protocol | None = None,
    *,
    max_solver_error: float | None = None,
    num_examples: int = CALIBRATION_EXAMPLES,
    ladder: Sequence[float] = LADDER,
    margin: float = SAFETY_MARGIN,
    batch_size: int | None = None,
    net_kwargs: dict | None = None,
    device: torch.device | str | None = None,
) -> Calibration:
    """The cheapest rung of ``ladder`` whose max error on a small subset is <= EPS / margin.

    x_int: [N, ...] integer images; ``protocol`` (default ``Protocol()``): the dequantization,
    divergence, seed and base tolerances; EPS: ``max_solver_error`` (default the protocol's).
    Draw 0 of ``num_examples`` images, chosen from the seed, with noise and probes from their
    own "calibration" streams (the user's generators are not touched). A rung r sets rtol = r
    and scales atol and logp_atol with it (their ratios to rtol in the protocol). Each rung is
    solved with ``model`` as the evaluation solves it (on ``device``, default x_int's) and
    compared with a reference 100x tighter (network in float64). Rungs are tried loose to tight
    and the first that passes is chosen; if none does, the tightest, with ``met=False`` and a
    warning.
    """
    protocol = Protocol() if protocol is None else Protocol.of(protocol)
    if max_solver_error is None:
        max_solver_error = protocol.max_solver_error
    seed, divergence = protocol.seed, protocol.divergence
    check_arguments(max_solver_error, None)
    tic, shape = time.perf_counter(), tuple(x_int.shape[1:])
    d, n = math.prod(shape), x_int.shape[0]
    idx = choose_check_jobs(n, min(num_examples, n), seed, purpose="calibration")  # not the check's
    dev = torch.device(device) if device is not None else x_int.device
    gens = rng.example_generators(seed, idx, dev, purpose="calibration")
    x = x_int[torch.tensor(idx)].to(dev)
    jobs = draw_jobs(model, x, num_levels, protocol.replace(num_samples=1), generator=gens)
    base = Tolerances.of(protocol).resolved(d)
    ref_model, kw = float64_copy(model), dict(batch_size=batch_size, net_kwargs=net_kwargs)
    table, nfe, chosen = [], 0, None
    for r in sorted(ladder, reverse=True):
        tols = base.scaled(base.rtol / r, d)
        lp, steps = solve_jobs(model, jobs, divergence, shape, tols, **kw)
        ref_lp, ref_steps = solve_jobs(ref_model, jobs, divergence, shape, tols.reference(d), **kw)
        err = nats_to_bits_per_dim((ref_lp - lp).abs(), d)
        own, ref = nfe_of_steps(steps, tols.method), nfe_of_steps(ref_steps, tols.method)
        nfe += int(own.sum() + ref.sum())
        ok = bool(err.max() <= max_solver_error / margin)
        table.append({**asdict(tols), "nfe_mean": float(own.double().mean()),
                      "max_abs_bpd": float(err.max()), "mean_abs_bpd": float(err.mean()),
                      "passed": ok})  # fmt: skip
        chosen = tols
        if ok:
            break
    met = table[-1]["passed"]
    if not met:
        warnings.warn(
            f"no tolerance down to rtol={chosen.rtol:g} keeps the solver error within "
            f"max_solver_error / {margin:g} = {max_solver_error / margin:.2g} bits/dim on the "
            f"calibration jobs (measured max {table[-1]['max_abs_bpd']:.2g}); using the "
            f"tightest. Raise max_solver_error or extend the ladder",
            SolverErrorWarning,
            stacklevel=2,
        )
    return Calibration(max_solver_error, chosen, met, table, len(idx), nfe, margin,
                       time.perf_counter() - tic)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the library's bits_per_dim
# --------------------------------------------------------------------------------------------------


class LibraryCheck:
    """Calibration and check of one ``likelihood.bits_per_dim`` call under ``protocol``.

    The checked jobs are ``choose_check_jobs(B * K, protocol.solver_check, seed=0)``, none when
    ``solver_check`` is None and there is no ``max_solver_error`` (the library checks on
    request; ``idode eval`` always does); their starts are recorded while the evaluation solves
    them (any generator), so the reference uses the same noise.
    """

    def __init__(self, protocol: Protocol, x_shape) -> None:
        check = protocol.solver_check
        if check is None and protocol.max_solver_error is None:
            check = 0
        self.protocol, self.shape, k = protocol, tuple(x_shape[1:]), protocol.num_samples
        keys = [(j // k, j % k) for j in choose_check_jobs(x_shape[0] * k, check, seed=0)]
        self.record = dict.fromkeys(keys) or None
        self.calibration: Calibration | None = None

    def calibrate(self, model, x_int, num_levels, **kw) -> Protocol:
        """The protocol with its tolerances calibrated for its ``max_solver_error`` (if any)."""
        p = self.protocol
        if p.max_solver_error is None:
            return p
        self.calibration = calibrate(model, x_int, num_levels, p, **kw)
        c = self.calibration.chosen
        self.protocol = p.replace(rtol=c.rtol, atol=c.atol, logp_atol=c.logp_atol)
        return self.protocol

    def finish(self, model, res, batch_size, net_kwargs):
        """``res`` (a BPDResult) with ``solver_error`` and the calibration in its settings."""
        if self.calibration is not None:
            res.settings["calibration"] = self.calibration.as_dict()
        if not self.record:
            return res
        keys = list(self.record)
        jobs = stack_jobs([self.record[key] for key in keys])
        i, k = (torch.tensor([key[c] for key in keys]) for c in range(2))
        lp, steps = res.log_p_model.cpu()[i, k], res.steps.cpu()[i, k]
        report = check_jobs(
            model, jobs, lp, steps, self.protocol.divergence, self.shape,
            Tolerances.of(self.protocol), eval_nfe=int(res.nfe_per_example.sum()),
            max_solver_error=self.protocol.max_solver_error, batch_size=batch_size,
            net_kwargs=net_kwargs,
        )  # fmt: skip
        res.solver_error = report.as_dict()
        return res
