"""Exact likelihood through the probability-flow ODE, bits/dim, and the SDE bound (ELBO).

Float64 boundary (method.md §11): the ODE state (z, l) and every log-density lives in float64; the
network runs in its own dtype inside ``DiffusionODE.predict`` and its output is cast back there.
|log p| is ~1e4 nats per CIFAR image and the prior and Delta log p partly cancel, so float32
accumulation would cost whole nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from idode import rng
from idode.augmented import (
    augmented_field,
    eval_mode,
    gaussian_log_prob,
    hutchinson_probes,
)
from idode.calibration import LibraryCheck
from idode.continuous import iter_bits_per_dim, stack_examples
from idode.dequantization import (
    Dequantization,
    bin_centers,
    bits_per_dim_from_nats,
    decoder_log_prob,
)
from idode.divergence import DIVERGENCES, Divergence, first_order_input_gradients
from idode.losses import diffusion_loss_terms
from idode.parameterization import DiffusionODE
from idode.protocol import (
    ELBO_PRIORS,
    ElboPrior,
    Protocol,
    Tolerance,
    solver_tolerances,
)
from idode.rng import Generators
from idode.solvers import SolverStats, nfe_of_steps, solve_ivp
from idode.validation import check_choice, check_integer_data, check_model_input

__all__ = [
    "BPDResult",
    "ELBOResult",
    "LogLikelihoodResult",
    "bits_per_dim",
    "elbo",
    "elbo_bits_per_dim",
    "log_likelihood",
]


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
        probes = hutchinson_probes(num_probes, (b, *shape), divergence, generator, z.device)
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
    settings: dict = field(default_factory=dict)  # the protocol's JSON form, logp_atol resolved
    protocol: Protocol = field(default_factory=Protocol)
    # the measured solver error (idode.certify: checked, mean_abs_bpd, max_abs_bpd,
    # mean_signed_bpd, reference, per-job rows); None when the check is off
    solver_error: dict | None = None


def bits_per_dim(
    model: DiffusionODE,
    x_int: Tensor,
    num_levels: int = 256,
    # the settings (defaults: Protocol's); or pass them all at once as protocol=
    dequantization: Dequantization = Protocol.dequantization,
    num_samples: int = Protocol.num_samples,
    divergence: Divergence = Protocol.divergence,
    rtol: float = Protocol.rtol,
    atol: float = Protocol.atol,
    *,
    importance_weighted: bool = Protocol.importance_weighted,
    analytic_entropy: bool = Protocol.analytic_entropy,
    num_probes: int = Protocol.num_probes,
    generator: Generators = None,
    uniform_gamma_start: float = Protocol.uniform_gamma_start,
    net_kwargs: dict | None = None,
    batch_size: int | None = None,
    tolerance: Tolerance = Protocol.tolerance,
    logp_atol: float | None = Protocol.logp_atol,
    max_solver_error: float | None = Protocol.max_solver_error,
    solver_check: float | None = Protocol.solver_check,
    protocol: Protocol | None = None,
) -> BPDResult:
    """ODE bits/dim of integer images x_int [B, ...] in [0, num_levels) (method.md §6-7).

    The settings are those of ``idode.Protocol`` (see its fields), given as keywords or as
    ``protocol=`` (then leave the keywords at their defaults). Each of the K = ``num_samples``
    dequantization draws gives a bound log p_ODE(z_k) + log p(k|z_k) - log q(z_k|k); the K solves
    share one Hutchinson probe. ``bpd_mean_of_bounds`` averages the K bounds (with the analytic
    E[log q] when ``analytic_entropy``, as the official code does); ``bpd_importance_weighted``
    is the IWAE bound logsumexp_k(bound_k) - log K. ``bpd`` is the latter if
    ``importance_weighted`` else the former.

    ``batch_size``: at most this many rows per network call; a row whose solve ends is given to
    the next (example, draw) at once (continuous batching). None: all B rows at once.
    ``generator``: one per example (``rng.example_generators``) for results independent of
    batching; None with ``protocol=`` given: the protocol's seeded streams of examples 0..B-1,
    None otherwise: torch's global generator. ``max_solver_error`` (bits/dim per image)
    calibrates the tolerances for it first (``settings["calibration"]``); ``solver_check`` jobs
    are solved again 100x tighter for ``res.solver_error`` (``idode.certify``; None: only with
    ``max_solver_error``, then max(8, 2 %) of the jobs).
    """
    given = {k: v for k, v in locals().items() if k in Protocol.field_names()}
    protocol, generator = _resolve(protocol, given, generator, x_int)
    _check_call(x_int, num_levels, batch_size)
    b, stats, examples = x_int.shape[0], SolverStats(), {}
    cert = LibraryCheck(protocol, x_int.shape)
    protocol = cert.calibrate(
        model, x_int, num_levels, batch_size=batch_size, net_kwargs=net_kwargs
    )
    stream = iter_bits_per_dim(
        model, x_int, num_levels, protocol, batch_size=batch_size, generator=generator,
        net_kwargs=net_kwargs, stats=stats, record=cert.record,
    )  # fmt: skip
    for group in stream:
        examples.update((e.index, e) for e in group)
    ex = [examples[i] for i in range(b)]
    res = _bpd_result(model, protocol, ex, stats, x_int, num_levels, batch_size)
    return cert.finish(model, res, batch_size, net_kwargs)


def _check_call(x_int: Tensor, num_levels: int, batch_size: int | None) -> None:
    check_integer_data(x_int, num_levels)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _bpd_result(model, protocol: Protocol, ex, stats, x_int, num_levels, batch_size) -> BPDResult:
    """The BPDResult of the finished examples ``ex`` of x_int (in order), terms as [B, K]."""
    d, dev = x_int[0].numel(), x_int.device
    lp, prior, delta, dec, lq, err, steps = (
        stack_examples(ex, k).to(dev)
        for k in ("log_p_model", "prior_logp", "delta_logp", "log_decoder", "log_q",
                  "logp_error", "steps")
    )  # fmt: skip
    elq = torch.tensor([e.expected_log_q for e in ex], dtype=torch.float64, device=dev)
    settings = {
        **protocol.to_json(), "logp_atol": protocol.solver_options(d).get("last_atol"),
        "num_levels": num_levels, "batch_size": batch_size, "schedule": model.schedule.name,
        "parameterization": model.parameterization,
    }  # fmt: skip
    return BPDResult(
        **protocol.bounds(lp, dec, lq, elq, d), nfe=stats.calls, log_p_model=lp,
        prior_logp=prior, delta_logp=delta, log_q=lq, expected_log_q=elq, log_decoder=dec,
        steps=steps, nfe_per_example=nfe_of_steps(steps).sum(1), logp_error=err,
        solver_error_bpd=bits_per_dim_from_nats(-err.mean(1), d), rows=stats.rows,
        dequantization=protocol.dequantization, num_samples=protocol.num_samples,
        gamma_start=float(ex[0].gamma_start), num_dims=d, settings=settings, protocol=protocol,
    )  # fmt: skip


def _resolve(
    protocol: Protocol | None, given: dict[str, Any], generator: Generators, x_int: Tensor
) -> tuple[Protocol, Generators]:
    """The protocol of a ``bits_per_dim`` call and its generator (see its docstring)."""
    if protocol is None:
        return Protocol(**given).validate(), generator
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be an idode.Protocol, got {type(protocol).__name__}")
    changed = sorted(k for k, v in given.items() if v != getattr(Protocol, k))
    if changed:
        raise ValueError(
            f"bits_per_dim got protocol= and the setting(s) {', '.join(changed)}: give the "
            f"settings in one place (protocol.replace({changed[0]}=...))"
        )
    protocol = Protocol.of(protocol).validate()
    if generator is None:
        generator = protocol.generators(range(x_int.shape[0]), x_int.device)
    return protocol, generator


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
    prior: ElboPrior = "sigma_max",
    generator: Generators = None,
    net_kwargs: dict | None = None,
) -> ELBOResult:
    """The SDE (VDM) bound: reconstruction + prior KL + diffusion term, dropout off.

    ``prior="sigma_max"`` uses the ODE's prior N(0, sigma_max^2 I); ``"unit"`` uses N(0, I) like the
    official code (method.md §10.4).
    """
    check_integer_data(x_int, num_levels)
    check_choice("prior", prior, ELBO_PRIORS)
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
    prior: ElboPrior = "sigma_max",
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
