"""Per-example diffusion objectives, in nats, summed over dimensions (method.md §3, §4, §5).

Every parameterization and time sampling estimates the same quantity, the VDM diffusion term

    L_diff = 1/2 int_{gamma_min}^{gamma_max} E || eps - eps_hat(x_gamma, gamma) ||^2 dgamma     (E2)

written as int w(gamma) E||target - pred||^2 dgamma with, per parameterization,
    eps:      w = 1/2                    (||eps - eps_hat||^2)
    x0:       w = e^{-gamma}/2           (||eps - eps_hat||^2 = alpha^2/sigma^2 ||x0 - x0_hat||^2)
    velocity: w = alpha^2 / (2 det^2)    (||eps - eps_hat||^2 = alpha^2/det^2 ||F* - F_hat||^2)
and Monte-Carlo weight w(gamma)/p(gamma) for gamma ~ p (uniform, or the proposal alpha^2/Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from idode import rng
from idode.divergence import PROBE_KINDS, ProbeKind, hutchinson_divergence, sample_probes
from idode.parameterization import DiffusionODE, expand
from idode.rng import Generators
from idode.time_sampling import sample_gamma
from idode.validation import check_choice, check_model_input

__all__ = ["LossTerms", "diffusion_loss", "diffusion_loss_terms", "weight_over_alpha2"]


@dataclass
class LossTerms:
    """Per-example terms, all [B] nats (``loss = first_order + second_order``)."""

    loss: Tensor
    first_order: Tensor  # the likelihood-weighted diffusion term (E2), one MC sample
    second_order: Tensor  # lambda_2 * w * r^2 / d (zeros when lambda_2 = 0)
    residual: Tensor | None  # r of method.md §5.2 (None when lambda_2 = 0)
    gamma: Tensor  # the sampled gamma (float64)
    mse: Tensor  # sum over dims of (target - pred)^2 in the parameterization's own space


def weight_over_alpha2(model: DiffusionODE, gamma: Tensor) -> Tensor:
    """w(gamma) / alpha^2(gamma) for the model's parameterization (see the module docstring)."""
    s = model.schedule
    if model.parameterization == "velocity":
        return torch.full_like(gamma, 0.5 / s.velocity_det() ** 2)
    if model.parameterization == "x0":
        return 0.5 / s.sigma2(gamma)  # w = alpha^2 / (2 sigma^2)
    return 0.5 / s.alpha2(gamma)  # eps: w = 1/2


def diffusion_loss_terms(
    model: DiffusionODE,
    x: Tensor,
    *,
    importance_sampling: bool = True,
    second_order_weight: float = 0.0,
    antithetic: bool = True,
    hutchinson: ProbeKind = "rademacher",
    generator: Generators = None,
    gamma: Tensor | None = None,
    eps: Tensor | None = None,
    net_kwargs: dict | None = None,
    validate: bool = True,
) -> LossTerms:
    """One Monte-Carlo sample of the i-DODE objective per example; see ``diffusion_loss``.

    ``gamma`` [B] and ``eps`` [B, ...] may be given to fix the randomness (then ``gamma`` is taken
    as drawn from the sampler selected by ``importance_sampling``).
    """
    if validate:
        check_model_input(x)
    check_choice("hutchinson probe", hutchinson, PROBE_KINDS)
    second_order_weight = float(second_order_weight)
    if second_order_weight < 0:
        raise ValueError(f"second_order_weight must be >= 0, got {second_order_weight}")
    second = second_order_weight > 0
    if second and model.parameterization != "velocity":
        raise ValueError(
            "the error-bounded second-order objective (method.md §5) is defined for the "
            f"velocity parameterization; got parameterization={model.parameterization!r}"
        )
    s = model.schedule
    b, d = x.shape[0], x[0].numel()

    # time: one gamma per example and its importance weight alpha^2/p (float64, method.md §3.4, §4)
    if gamma is None:
        gs = sample_gamma(
            s,
            b,
            importance_sampling=importance_sampling,
            antithetic=antithetic,
            generator=generator,
            device=x.device,
        )
        gamma64, alpha2_over_p = gs.gamma, gs.alpha2_over_density
    else:
        gamma64 = gamma.to(device=x.device, dtype=torch.float64)
        if importance_sampling:
            alpha2_over_p = torch.full_like(gamma64, s.importance_normalizer)
        else:
            alpha2_over_p = s.gamma_range * s.alpha2(gamma64)
    mc_weight = (weight_over_alpha2(model, gamma64) * alpha2_over_p).to(x.dtype)  # w / p

    if eps is None:
        eps = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    g = gamma64.to(x.dtype)
    alpha, sigma = expand(s.alpha(g), x), expand(s.sigma(g), x)
    z = alpha * x + sigma * eps
    target = model.target(x, eps, g)
    kw = net_kwargs or {}

    if not second:
        pred = model.predict(z, g, **kw)
        mse = (target - pred).square().flatten(1).sum(1)
        first = mc_weight * mse
        zeros = torch.zeros_like(first)
        return LossTerms(first, first, zeros, None, gamma64, mse)

    # second order (method.md §5.2): one probe per example, double backward through div_hat
    u = sample_probes(x.shape, hutchinson, generator=generator, device=x.device, dtype=x.dtype)
    pred, div = hutchinson_divergence(
        lambda z_: model.predict(z_, g, **kw), z, u, create_graph=torch.is_grad_enabled()
    )
    mse = (target - pred).square().flatten(1).sum(1)
    first = mc_weight * mse
    a, _ = s.velocity_coefficients(g)
    # sigma div F - a d + (alpha/det) sg(mse): zero conditional mean at the optimum (§5.1)
    residual = s.sigma(g) * div - a * d + s.alpha(g) / s.velocity_det() * mse.detach()
    second_term = mc_weight * second_order_weight * residual.square() / d
    return LossTerms(first + second_term, first, second_term, residual, gamma64, mse)


def diffusion_loss(
    model: DiffusionODE,
    x: Tensor,
    importance_sampling: bool = True,
    second_order_weight: float = 0.0,
    *,
    antithetic: bool = True,
    hutchinson: ProbeKind = "rademacher",
    generator: Generators = None,
    net_kwargs: dict | None = None,
    validate: bool = True,
) -> Tensor:
    """The i-DODE training objective, per example, in nats: shape [B].

    x: float [B, ...] in [-1, 1] (bin centres). First order: the likelihood-weighted diffusion
    term (E2) with antithetic, optionally importance-sampled gamma (method.md §3-4). With
    ``second_order_weight`` lambda_2 > 0 (0.1 in the paper's finetuning) the error-bounded
    second-order term lambda_2 w r^2 / d is added (§5). Divide the batch mean by d ln 2 for
    bits/dim.
    """
    return diffusion_loss_terms(
        model,
        x,
        importance_sampling=importance_sampling,
        second_order_weight=second_order_weight,
        antithetic=antithetic,
        hutchinson=hutchinson,
        generator=generator,
        net_kwargs=net_kwargs,
        validate=validate,
    ).loss
