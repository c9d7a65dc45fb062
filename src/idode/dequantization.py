"""Discrete data <-> [-1, 1], and the dequantizations of method.md §7.

The scaling contract (one place for the whole package): an integer image k in {0, ..., L-1}^d maps
to the bin centres c(k) = (2k + 1)/L - 1 in [-1, 1]; each bin has width 2/L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from idode import rng
from idode.choices import DEQUANTIZATIONS, Dequantization
from idode.rng import Generators
from idode.schedules import Schedule
from idode.validation import (
    check_integer_data,
    check_level_range,
    check_num_levels,
    is_integer_dtype,
)

__all__ = [
    "DEQUANTIZATIONS",
    "Dequantized",
    "bin_centers",
    "bits_per_dim_from_nats",
    "nats_to_bits_per_dim",
    "decoder_log_prob",
    "dequantization_bounds",
    "dequantize",
    "sample_truncated_normal",
    "truncation_point",
    "uniform_log_q",
]


def bin_centers(
    x_int: Tensor, num_levels: int, dtype: torch.dtype = torch.float32, *, validate: bool = True
) -> Tensor:
    """c(k) = (2k + 1)/L - 1: integer grey levels [B, ...] to bin centres in [-1, 1] (§0).

    x_int must be an integer tensor with values in [0, num_levels); floats are refused with a hint
    (data in [0, 1]: multiply by L - 1 and round). ``validate=False`` skips the range check (one
    reduction and, on a GPU, one synchronisation) for data already checked, e.g. at load time.
    """
    if not isinstance(x_int, Tensor) or not is_integer_dtype(x_int.dtype):
        check_integer_data(x_int, num_levels)  # raises the TypeError with what to pass instead
    check_num_levels(num_levels)
    if validate:
        check_level_range(x_int, num_levels)
    return (2.0 * x_int.to(dtype) + 1.0) / num_levels - 1.0


def nearest_level(y: Tensor, num_levels: int) -> Tensor:
    """The inverse of ``bin_centers``: the grey level whose bin holds y [..] in [-1, 1] (int64)."""
    return torch.floor((y + 1.0) * num_levels / 2.0).clamp(0, num_levels - 1).long()


# --------------------------------------------------------------------------------------------------
# Dequantizations (method.md §7). Each turns k into a continuous starting point z for the ODE at
# gamma_start and gives log q(z | k), the density of that draw, so that
#     log P(k) >= E_q[ log p_ODE(z) + log p(k | z) - log q(z | k) ]
# (log p(k | z) = 0 when q's supports tile space, i.e. for uniform and truncated-normal).
# --------------------------------------------------------------------------------------------------

UNIFORM_GAMMA_START = -11.8  # the official code's start for uniform dequantization (method.md §7.1)
LOG_2PI = math.log(2.0 * math.pi)  # the one home of log 2 pi (Gaussian densities)


@dataclass
class Dequantized:
    """Dequantized data z at gamma_start with the terms of its bound (log q, decoder)."""

    z: Tensor  # [B, ...] float64 ODE starting point
    log_q: Tensor  # [B] float64, log q(z | k) of this draw
    expected_log_q: Tensor  # [B] float64, E_q[log q] (minus the entropy), the analytic form
    log_decoder: Tensor  # [B] float64, log p(k | z) (zeros unless "variational")
    gamma_start: float


def truncation_point(schedule: Schedule, num_levels: int) -> float:
    """tau = alpha_min / (L sigma_min): |sigma_min eps| <= alpha_min/L keeps z in its scaled bin."""
    g = torch.tensor(schedule.gamma_min, dtype=torch.float64)
    return float(torch.exp(schedule.log_alpha(g) - schedule.log_sigma(g))) / num_levels


def truncated_normal_log_mass(tau: float) -> float:
    """log Z_tau = log P(|N(0,1)| <= tau) = log1p(-erfc(tau/sqrt2)), accurate for large tau."""
    return math.log1p(-math.erfc(tau / math.sqrt(2.0)))


def truncated_normal_second_moment(tau: float) -> float:
    """E[eps^2] for eps ~ TN(0, 1; [-tau, tau]) = 1 - 2 tau phi(tau) / Z_tau."""
    phi = math.exp(-0.5 * tau * tau) / math.sqrt(2.0 * math.pi)
    return 1.0 - 2.0 * tau * phi / math.exp(truncated_normal_log_mass(tau))


def sample_truncated_normal(
    shape: tuple[int, ...] | torch.Size,
    tau: float,
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """eps ~ TN(0, 1; [-tau, tau]) by the inverse CDF in float64: sqrt2 erfinv(Z_tau (2U - 1))."""
    u = rng.rand(shape, generator, device=device, dtype=torch.float64)
    z_tau = math.erf(tau / math.sqrt(2.0))  # Z_tau = P(|N(0,1)| <= tau)
    eps = math.sqrt(2.0) * torch.erfinv(z_tau * (2.0 * u - 1.0))
    return eps.clamp(-tau, tau)  # only matters if Z_tau rounds to 1 and U hits 0 exactly


def decoder_log_prob(
    z: Tensor, x_int: Tensor, num_levels: int, schedule: Schedule, max_chunk: int = 1 << 22
) -> Tensor:
    """log p(k | z) of VDM's factorised discrete decoder at gamma_min, summed over dims: [B].

    p(k_i = j | z) = softmax_j(-1/2 e^{-gamma_min} (z_i / alpha_min - c(j))^2) over j < L. We
    divide by alpha_min once (the official code divides twice, method.md §10.3). Float64: the
    logits reach ~1e6 at gamma_min, so float32 would lose whole nats.
    """
    b = z.shape[0]
    y = (z.to(torch.float64) / schedule.alpha_min).reshape(-1)
    k = x_int.reshape(-1)
    levels = torch.arange(num_levels, device=z.device)
    centers = bin_centers(levels, num_levels, torch.float64, validate=False)
    prec = math.exp(-schedule.gamma_min)
    out = torch.empty_like(y)
    step = max(1, max_chunk // num_levels)
    for s in range(0, y.numel(), step):
        yc, kc = y[s : s + step], k[s : s + step]
        logits = -0.5 * prec * (yc[:, None] - centers[None, :]).square()
        out[s : s + step] = logits.gather(1, kc[:, None].long()).squeeze(1) - logits.logsumexp(1)
    return out.reshape(b, -1).sum(1)


def uniform_log_q(num_dims: int, num_levels: int) -> float:
    """log density of U(bin) in [-1, 1] space: each bin has width 2/L, so d log(L/2).

    For 8-bit data this is d * 7 ln 2: the "+7 bits/dim" of the uniform-dequantization BPD.
    """
    return num_dims * math.log(num_levels / 2.0)


def dequantize(
    kind: Dequantization,
    x_int: Tensor,
    num_levels: int,
    schedule: Schedule,
    *,
    generator: Generators = None,
    uniform_gamma_start: float = UNIFORM_GAMMA_START,
) -> Dequantized:
    """Draw one continuous z for each integer image, with its log q (method.md §7).

    Uniform dequantization starts the ODE at ``max(uniform_gamma_start, schedule.gamma_min)``.
    """
    if kind not in DEQUANTIZATIONS:
        raise ValueError(
            f"unknown dequantization {kind!r}; valid: {', '.join(map(repr, DEQUANTIZATIONS))}"
        )
    check_integer_data(x_int, num_levels)
    b, d = x_int.shape[0], x_int[0].numel()
    dev = x_int.device
    zeros = torch.zeros(b, dtype=torch.float64, device=dev)
    if kind == "uniform":
        # z = 2(k + U)/L - 1, U ~ U[0,1)^d, at gamma = -11.8, no alpha scaling (§7.1)
        u = rng.rand(x_int.shape, generator, device=dev, dtype=torch.float64)
        z = 2.0 * (x_int.to(torch.float64) + u) / num_levels - 1.0
        log_q = torch.full_like(zeros, uniform_log_q(d, num_levels))
        # a model whose ODE starts later than -11.8 (a DDPM's first timestep: -9.2) starts there
        g_start = max(float(uniform_gamma_start), schedule.gamma_min)
        return Dequantized(z, log_q, log_q.clone(), zeros, g_start)

    g0 = torch.tensor(schedule.gamma_min, dtype=torch.float64)
    alpha_min, log_sigma_min = schedule.alpha_min, float(schedule.log_sigma(g0))
    sigma_min = math.exp(log_sigma_min)
    centers = bin_centers(x_int, num_levels, torch.float64, validate=False)  # checked above
    if kind == "variational":
        # z_0 = alpha_min c(k) + sigma_min eps, eps ~ N(0, I), plus the discrete decoder (§7.2)
        eps = rng.randn(x_int.shape, generator, device=dev, dtype=torch.float64)
        log_norm, second_moment = 0.0, 1.0
    else:
        # eps ~ TN(0, 1; [-tau, tau]): z stays inside alpha_min x (bin of k) (§7.3)
        tau = truncation_point(schedule, num_levels)
        eps = sample_truncated_normal(x_int.shape, tau, generator=generator, device=dev)
        log_norm, second_moment = (
            truncated_normal_log_mass(tau),
            truncated_normal_second_moment(tau),
        )
    z = alpha_min * centers + sigma_min * eps
    # log q = sum_i [log phi(eps_i) - log Z_tau - log sigma_min]
    const = -d * (0.5 * LOG_2PI + log_sigma_min + log_norm)
    log_q = const - 0.5 * eps.square().flatten(1).sum(1)
    expected = torch.full_like(zeros, const - 0.5 * d * second_moment)
    log_dec = zeros
    if kind == "variational":
        log_dec = decoder_log_prob(z, x_int, num_levels, schedule)
    return Dequantized(z, log_q, expected, log_dec, schedule.gamma_min)


def bits_per_dim_from_nats(log_prob: Tensor, num_dims: int) -> Tensor:
    """BPD = -log P(k) / (d ln 2) for a bound log P(k) on the discrete data, in nats.

    This is the only conversion: every dequantization's scale sits in its log q (for uniform,
    d log(L/2), the "+7" of 8-bit data), so no offset is ever added afterwards (method.md §6.3).
    """
    return nats_to_bits_per_dim(-log_prob, num_dims)


def dequantization_bounds(
    log_p_model: Tensor,
    log_decoder: Tensor,
    log_q: Tensor,
    expected_log_q: Tensor,
    num_dims: int,
    analytic_entropy: bool = True,
) -> dict[str, Tensor]:
    """Bits/dim [...] of the K-draw bounds on log P(k), from per-draw terms [..., K] in nats.

    The one assembly of per-draw terms into bounds (``bits_per_dim``, ``idode eval`` and the
    ablation all use it). Draw k bounds log P(k) by log p_ODE(z_k) + log p(k | z_k) - log q(z_k | k)
    (method.md §7). ``bpd_mean_of_bounds`` averages the K bounds, with the analytic E_q[log q]
    ``expected_log_q`` [...] for each draw's log q when ``analytic_entropy`` (as the official
    code); ``bpd_importance_weighted`` is the IWAE bound logsumexp_k(bound_k) - log K, with the
    per-draw log q.
    """
    k = log_p_model.shape[-1]
    bound_sample = log_p_model + log_decoder - log_q  # [..., K]
    iw = torch.logsumexp(bound_sample, dim=-1) - math.log(k)
    lq_for_mean = expected_log_q[..., None] if analytic_entropy else log_q
    mean = (log_p_model + log_decoder - lq_for_mean).mean(dim=-1)
    return {
        "bpd_mean_of_bounds": bits_per_dim_from_nats(mean, num_dims),
        "bpd_importance_weighted": bits_per_dim_from_nats(iw, num_dims),
    }


def nats_to_bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """A per-image quantity in nats (a loss, a negative log-likelihood) in bits per dimension."""
    return nats / (num_dims * math.log(2.0))
