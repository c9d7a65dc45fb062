"""Exact likelihood through the probability-flow ODE, bits/dim, and the SDE bound (ELBO).

Float64 boundary (method.md §11): the ODE state (z, l) and every log-density lives in float64; the
network runs in its own dtype inside ``DiffusionODE.predict`` and its output is cast back there.
|log p| is ~1e4 nats per CIFAR image and the prior and Delta log p partly cancel, so float32
accumulation would cost whole nats.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from idode import rng
from idode.dequantization import (
    DEQUANTIZATIONS,
    LOG_2PI,
    UNIFORM_GAMMA_START,
    Dequantization,
    bin_centers,
    bits_per_dim_from_nats,
    check_integer_data,
    decoder_log_prob,
)
from idode.divergence import (
    DIVERGENCES,
    Divergence,
    exact_divergence,
    first_order_input_gradients,
    hutchinson_divergence,
    sample_probes,
)
from idode.losses import check_model_input, diffusion_loss_terms
from idode.parameterization import DiffusionODE, check_choice
from idode.rng import Generators
from idode.solvers import SolverStats, nfe_of_steps, solve_ivp

__all__ = [
    "BPDResult",
    "ELBOResult",
    "LogLikelihoodResult",
    "bits_per_dim",
    "elbo",
    "elbo_bits_per_dim",
    "log_likelihood",
]

# Error control of the augmented state (z, l). "logp": the image part z keeps the RMS test with
# rtol/atol and the log-density l gets its own test |err_l| <= logp_atol + rtol |l| (nats), so the
# number users read is controlled whatever d is. "paper": one RMS over all d + 1 components, as
# the official code and torchode (l then weighs 1/(d + 1)); for comparisons with published numbers.
Tolerance = Literal["logp", "paper"]
TOLERANCES: tuple[str, ...] = get_args(Tolerance)
# default logp_atol per image = LOGP_ATOL_BPD * d ln 2 nats, a local-error budget in bits/dim.
# benchmarks/results/work_precision_digits_cpu.md: 1e-5 costs 10-40 % more NFE and gains little,
# because the image part's trajectory error, not l's local error, dominates |dbpd| there.
LOGP_ATOL_BPD = 1e-4


def solver_tolerances(
    tolerance: Tolerance, rtol: float, atol: float, logp_atol: float | None, num_dims: int
) -> dict:
    """Keyword arguments of ``solve_ivp``/``solve_stream`` for a tolerance protocol."""
    check_choice("tolerance", tolerance, TOLERANCES)
    if tolerance == "paper":
        if logp_atol is not None:
            raise ValueError('logp_atol has no effect with tolerance="paper"; drop one of them')
        return dict(rtol=rtol, atol=atol)
    if logp_atol is None:
        logp_atol = LOGP_ATOL_BPD * num_dims * math.log(2.0)
    if not logp_atol > 0:
        raise ValueError(f"logp_atol must be positive (nats), got {logp_atol}")
    return dict(rtol=rtol, atol=atol, last_rtol=rtol, last_atol=float(logp_atol))


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Evaluate with dropout off, then restore the module's previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def gaussian_log_prob(z: Tensor, variance: float) -> Tensor:
    """log N(z; 0, variance I), summed over all but the batch dim: [B]."""
    d = z[0].numel()
    return -0.5 * d * (LOG_2PI + math.log(variance)) - 0.5 * z.flatten(1).square().sum(1) / variance


def _probes(num_probes: int, shape: tuple, kind: str, generator: Generators, device) -> Tensor:
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if num_probes == 1:
        return sample_probes(shape, kind, generator=generator, device=device)
    return sample_probes(
        (num_probes, *shape), kind, generator=generator, device=device, batch_dim=1
    )


@dataclass
class LogLikelihoodResult:
    """log p of the model marginal at gamma_start, its parts, and the solver cost (float64)."""

    logp: Tensor  # [B] float64 nats: log p_{gamma_start}(z) = prior_logp + delta_logp
    prior_logp: Tensor  # [B] log N(z_end; 0, sigma_max^2 I)
    delta_logp: Tensor  # [B] int_{gamma_start}^{gamma_max} div h dgamma
    z_end: Tensor  # [B, ...] float64, the ODE state at gamma_max
    nfe: int  # batched network calls (each a forward + VJP on the rows still running)
    steps: Tensor  # [B] solver steps per example (independent of batch-mates)
    logp_error: Tensor  # [B] solver's estimate: sum of |local error of l| over its steps, nats
    rows: int  # network rows evaluated in all (= nfe_of_steps(steps).sum())


def log_likelihood(
    model: DiffusionODE,
    z: Tensor,
    divergence: Divergence = "exact",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    gamma_start: float | None = None,
    num_probes: int = 1,
    probes: Tensor | None = None,
    generator: Generators = None,
    exact_chunk_size: int = 16,
    net_kwargs: dict | None = None,
    tolerance: Tolerance = "logp",
    logp_atol: float | None = None,
) -> LogLikelihoodResult:
    """log-density of the model's marginal at ``gamma_start`` (default gamma_min) at z [B, ...].

    Integrates the augmented ODE d(z, l)/dgamma = (h, div h) forward from gamma_start to
    gamma_max with adaptive Dormand-Prince (per-example error control: rtol/atol on the RMS norm
    of z and ``logp_atol`` nats on l, or one RMS over (z, l) with ``tolerance="paper"``), and adds
    the prior N(0, sigma_max^2 I) (method.md §6.1). ``divergence`` is
    "exact" (d VJPs, chunked) or a Hutchinson estimate with ``num_probes`` probes per example,
    drawn once from ``generator`` and fixed for the whole solve (or pass ``probes``).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_model_input(z, "z", unit_range=False)
    s = model.schedule
    g0 = s.gamma_min if gamma_start is None else float(gamma_start)
    if not s.gamma_min - 1e-9 <= g0 < s.gamma_max:
        raise ValueError(
            f"gamma_start={g0} must lie in [gamma_min, gamma_max) = [{s.gamma_min}, {s.gamma_max})"
        )
    b, shape, d = z.shape[0], tuple(z.shape[1:]), z[0].numel()
    tols = solver_tolerances(tolerance, rtol, atol, logp_atol, d)
    if divergence != "exact" and probes is None:
        probes = _probes(num_probes, (b, *shape), divergence, generator, z.device)
    aux = None
    if probes is not None:  # per row: [B, ...] or, with several probes, [B, P, ...]
        aux = probes.transpose(0, 1) if probes.ndim == z.ndim + 1 else probes
    field_ = augmented_field(model, divergence, shape, net_kwargs, exact_chunk_size)
    y0 = torch.cat(
        [z.detach().to(torch.float64).flatten(1), z.new_zeros(b, 1, dtype=torch.float64)], 1
    )
    # one VJP per step, never differentiated again: the UNet may use its fused attention
    with eval_mode(model), torch.no_grad(), first_order_input_gradients():
        sol = solve_ivp(field_, y0, g0, s.gamma_max, aux=aux, **tols)
    z_end = sol.y[:, :d].reshape(b, *shape)
    delta = sol.y[:, d]
    prior = gaussian_log_prob(z_end, s.sigma2_max)
    return LogLikelihoodResult(
        prior + delta, prior, delta, z_end, sol.nfe, sol.steps, sol.last_error, sol.rows
    )


def augmented_field(
    model: DiffusionODE,
    divergence: Divergence,
    shape: tuple[int, ...],
    net_kwargs: dict | None = None,
    exact_chunk_size: int = 16,
):
    """f(t [b], y [b, d + 1], probes [b, ...] | [b, P, ...] | None) -> d(z, l)/dgamma [b, d + 1].

    The probability-flow drift h of z and div h (exact, or Hutchinson with the rows' probes).
    """
    kw = net_kwargs or {}
    d = math.prod(shape)

    def field_(t: Tensor, y: Tensor, probes: Tensor | None = None) -> Tensor:
        b = y.shape[0]
        x = y[:, :d].reshape(b, *shape)

        def h(x_: Tensor) -> Tensor:
            return model.drift(x_, t, **kw)

        if divergence == "exact":
            out, div = exact_divergence(h, x, chunk_size=exact_chunk_size)
        else:
            u = probes.transpose(0, 1) if probes.ndim == x.ndim + 1 else probes
            out, div = hutchinson_divergence(h, x, u)
        return torch.cat([out.detach().flatten(1), div.detach()[:, None]], dim=1)

    return field_


@dataclass
class BPDResult:
    """Bits/dim of integer data under a dequantization bound; per-example tensors are [B] / [B, K].

    Each example's numbers are those of solving it alone (per-example step control), up to float
    rounding of batched network calls.
    """

    bpd: Tensor  # the requested estimate (importance-weighted or mean of bounds)
    bpd_mean_of_bounds: Tensor  # mean over K of single-draw bounds
    bpd_importance_weighted: Tensor  # log (1/K) sum_k exp(bound_k), with the -log K
    nfe: int  # batched network calls (each a forward + VJP on up to batch_size rows)
    log_p_model: Tensor  # [B, K] log p_ODE(z_k) at gamma_start
    prior_logp: Tensor  # [B, K]
    delta_logp: Tensor  # [B, K]
    log_q: Tensor  # [B, K] per-draw log q(z_k | k)
    expected_log_q: Tensor  # [B] analytic E_q[log q]
    log_decoder: Tensor  # [B, K] log p(k | z_k) (zeros unless variational)
    steps: Tensor  # [B, K] solver steps
    nfe_per_example: Tensor  # [B] int64: nfe_of_steps(steps) summed over the K draws
    logp_error: Tensor  # [B, K] solver's error estimate of log p_ODE, nats (sum |local errors|)
    solver_error_bpd: Tensor  # [B] mean over draws of logp_error, in bits/dim
    rows: int  # network rows evaluated in all (= nfe_per_example.sum() with refilling)
    dequantization: str
    num_samples: int
    gamma_start: float
    num_dims: int
    settings: dict = field(default_factory=dict)
    # the measured solver error (idode.certify: checked, mean_abs_bpd, max_abs_bpd,
    # mean_signed_bpd, reference, per-job rows); None when the check is off
    solver_error: dict | None = None


def _check_bpd_arguments(x_int, num_levels, dequantization, divergence, num_samples, batch_size):
    check_choice("dequantization", dequantization, DEQUANTIZATIONS)
    check_choice("divergence", divergence, DIVERGENCES)
    check_integer_data(x_int, num_levels)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def bits_per_dim(
    model: DiffusionODE,
    x_int: Tensor,
    num_levels: int = 256,
    dequantization: Dequantization = "truncated_normal",
    num_samples: int = 1,
    divergence: Divergence = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    importance_weighted: bool = False,
    analytic_entropy: bool = True,
    num_probes: int = 1,
    generator: Generators = None,
    uniform_gamma_start: float = UNIFORM_GAMMA_START,
    net_kwargs: dict | None = None,
    batch_size: int | None = None,
    tolerance: Tolerance = "logp",
    logp_atol: float | None = None,
    max_solver_error: float | None = None,
    solver_check: int | float | None = None,
) -> BPDResult:
    """ODE bits/dim of integer images x_int [B, ...] in [0, num_levels) (method.md §6-7).

    Each of the K = ``num_samples`` dequantization draws gives a bound
    log p_ODE(z_k) + log p(k|z_k) - log q(z_k|k); the K solves share one Hutchinson probe.
    ``bpd_mean_of_bounds`` averages the K bounds (with the analytic E[log q] when
    ``analytic_entropy``, as the official code does); ``bpd_importance_weighted`` is the IWAE bound
    logsumexp_k(bound_k) - log K with per-draw log q. ``bpd`` is the latter if
    ``importance_weighted`` else the former.

    ``batch_size``: at most this many rows per network call; a row whose solve ends is given to
    the next (example, draw) at once (continuous batching). None: all B rows at once. Pass one
    generator per example (``rng.example_generators``) for results independent of batching.
    ``tolerance``/``logp_atol``: error control, see ``TOLERANCES`` (``"paper"`` = one RMS norm).

    ``max_solver_error`` (bits/dim per image) calibrates rtol/atol/logp_atol for it first
    (``settings["calibration"]``); ``solver_check`` (a count or a fraction of the jobs; None:
    max(8, 2 %) with ``max_solver_error``, else 0) measures ``res.solver_error`` (``certify``).
    """
    from idode import calibration
    from idode.continuous import bpd_columns, iter_bits_per_dim, stack_examples

    _check_bpd_arguments(x_int, num_levels, dequantization, divergence, num_samples, batch_size)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    b, d = x_int.shape[0], x_int[0].numel()
    stats = SolverStats()
    examples = {}
    cert = calibration.LibraryCheck(max_solver_error, solver_check, x_int.shape, num_samples)
    if max_solver_error is not None:
        rtol, atol, logp_atol = cert.calibrate(
            model, x_int, num_levels, dequantization, divergence, rtol, atol, tolerance,
            logp_atol, num_probes=num_probes, batch_size=batch_size,
            uniform_gamma_start=uniform_gamma_start, net_kwargs=net_kwargs,
        )  # fmt: skip
    stream = iter_bits_per_dim(
        model, x_int, num_levels, dequantization, num_samples, divergence, rtol=rtol, atol=atol,
        tolerance=tolerance, logp_atol=logp_atol, batch_size=batch_size, num_probes=num_probes,
        generator=generator, uniform_gamma_start=uniform_gamma_start, net_kwargs=net_kwargs,
        stats=stats, record=cert.record,
    )  # fmt: skip
    for group in stream:
        examples.update((e.index, e) for e in group)
    ex, dev = [examples[i] for i in range(b)], x_int.device

    def stack(name: str) -> Tensor:
        return stack_examples(ex, name).to(dev)

    lp, dec, lq, err = (stack(k) for k in ("log_p_model", "log_decoder", "log_q", "logp_error"))
    elq = torch.tensor([e.expected_log_q for e in ex], dtype=torch.float64, device=dev)
    cols = bpd_columns(lp, dec, lq, elq, d, analytic_entropy)
    steps = stack("steps")
    settings = dict(
        num_levels=num_levels, dequantization=dequantization, num_samples=num_samples,
        divergence=divergence, num_probes=num_probes, rtol=rtol, atol=atol, tolerance=tolerance,
        logp_atol=solver_tolerances(tolerance, rtol, atol, logp_atol, d).get("last_atol"),
        batch_size=batch_size, importance_weighted=importance_weighted,
        analytic_entropy=analytic_entropy, schedule=model.schedule.name,
        parameterization=model.parameterization,
    )  # fmt: skip
    key = "bpd_importance_weighted" if importance_weighted else "bpd_mean_of_bounds"
    res = BPDResult(
        bpd=cols[key],
        nfe=stats.calls,
        log_p_model=lp,
        prior_logp=stack("prior_logp"),
        delta_logp=stack("delta_logp"),
        log_q=lq,
        expected_log_q=elq,
        log_decoder=dec,
        steps=steps,
        nfe_per_example=nfe_of_steps(steps).sum(1),
        logp_error=err,
        solver_error_bpd=bits_per_dim_from_nats(-err.mean(1), d),
        rows=stats.rows,
        dequantization=dequantization,
        num_samples=num_samples,
        gamma_start=float(ex[0].gamma_start),
        num_dims=d,
        settings=settings,
        **cols,
    )
    return cert.finish(model, res, divergence, tolerance, batch_size, net_kwargs)


# --------------------------------------------------------------------------------------------------
# SDE bound (method.md §6.4)
# --------------------------------------------------------------------------------------------------


@dataclass
class ELBOResult:
    """VDM continuous-time ELBO terms, [B] nats each, and the total in bits/dim."""

    bpd: Tensor
    reconstruction: Tensor  # -log p(k | z_0) with z_0 = alpha_min c(k) + sigma_min eps
    prior_kl: Tensor  # KL(q(z_1 | x) || prior)
    diffusion: Tensor  # one MC sample of (E2)


def elbo(
    model: DiffusionODE,
    x_int: Tensor,
    num_levels: int = 256,
    *,
    importance_sampling: bool = True,
    antithetic: bool = True,
    prior: Literal["sigma_max", "unit"] = "sigma_max",
    generator: Generators = None,
    net_kwargs: dict | None = None,
) -> ELBOResult:
    """The SDE (VDM) bound: reconstruction + prior KL + diffusion term, dropout off.

    ``prior="sigma_max"`` uses the ODE's prior N(0, sigma_max^2 I); ``"unit"`` uses N(0, I) like the
    official code (method.md §10.4).
    """
    check_integer_data(x_int, num_levels)
    check_choice("prior", prior, ("sigma_max", "unit"))
    s = model.schedule
    d = x_int[0].numel()
    x = bin_centers(
        x_int, num_levels, torch.float32 if model.net_dtype is None else model.net_dtype
    )
    # reconstruction at gamma_min, decoder of method.md §6.4 (a single division by alpha_min)
    eps0 = rng.randn(x_int.shape, generator, device=x_int.device, dtype=torch.float64)
    z0 = s.alpha_min * bin_centers(x_int, num_levels, torch.float64) + s.sigma_min * eps0
    recon = -decoder_log_prob(z0, x_int, num_levels, s)
    # KL(N(alpha_1 x, sigma_1^2) || N(0, v))
    #   = 1/2 sum [(alpha_1^2 x^2 + sigma_1^2)/v - 1 - log(sigma_1^2/v)]
    var = s.sigma2_max if prior == "sigma_max" else 1.0
    x64 = x.to(torch.float64).flatten(1)
    kl = 0.5 * (
        (s.alpha2_max * x64.square() + s.sigma2_max) / var - 1.0 - math.log(s.sigma2_max / var)
    ).sum(1)
    with eval_mode(model), torch.no_grad():
        diff = diffusion_loss_terms(
            model,
            x,
            importance_sampling=importance_sampling,
            antithetic=antithetic,
            generator=generator,
            net_kwargs=net_kwargs,
            validate=False,
        ).loss.to(torch.float64)
    total = recon + kl + diff
    return ELBOResult(bits_per_dim_from_nats(-total, d), recon, kl, diff)


def elbo_bits_per_dim(
    model: DiffusionODE,
    x_int: Tensor,
    num_levels: int = 256,
    *,
    importance_sampling: bool = True,
    antithetic: bool = True,
    prior: Literal["sigma_max", "unit"] = "sigma_max",
    generator: Generators = None,
    net_kwargs: dict | None = None,
) -> Tensor:
    """The SDE bound in bits/dim, [B] float64; the options are those of ``elbo``."""
    return elbo(
        model,
        x_int,
        num_levels,
        importance_sampling=importance_sampling,
        antithetic=antithetic,
        prior=prior,
        generator=generator,
        net_kwargs=net_kwargs,
    ).bpd
