"""Evaluation during training: the SDE bound and the ODE bits/dim of the held-out subset.

The ODE numbers come from ``idode eval``'s batch function (``evaluate.evaluate_stream``) under
the run's ``eval`` protocol, so they equal what ``idode eval`` reports for the same images.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from idode.certify import check_rows
from idode.config import Config
from idode.distributed import DistEnv, all_gather
from idode.evaluate import evaluate_stream
from idode.likelihood import elbo
from idode.parameterization import DiffusionODE
from idode.rng import example_generators

__all__ = ["periodic_eval"]


def periodic_eval(
    model: DiffusionODE,
    x_eval: Tensor,
    num_levels: int,
    cfg: Config,
    *,
    ode: bool,
    step: int,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """SDE bound on the held-out subset; ODE bits/dim (``cfg.eval``'s protocol) on its first images.

    Sharded: rank r takes images r, r + W, ...; every example draws its noise from its own
    stream, so the numbers do not depend on W, nor on the rows per call (at most the training
    micro-batch, so that evaluating needs no more memory than training). The one collective
    comes after the solves. The ODE numbers use the same streams as ``idode eval`` with the
    same seed.
    """
    env = env or DistEnv()
    # rows per call: at most the training micro-batch, known to fit (eval.batch_size: idode eval)
    per_rank = cfg.train.batch_size // (env.world_size * cfg.train.grad_accum)
    ev = replace(cfg.eval, batch_size=max(1, min(cfg.eval.batch_size, per_rank)))
    dev = next(model.parameters()).device
    x = x_eval.to(dev)
    mine = torch.arange(len(x))[env.rank :: env.world_size]
    sde: list[Tensor] = []
    for s in range(0, len(mine), ev.batch_size):
        j = mine[s : s + ev.batch_size]
        gens = example_generators(ev.seed, j, dev, purpose=f"periodic_elbo/{step}")
        sde.append(elbo(model, x[j], num_levels, **ev.elbo_options(), generator=gens).bpd.cpu())
    ode_bpd, ode_nfe, ode_err = torch.zeros(0), torch.zeros(0), torch.zeros(0)
    n_ode = min(cfg.data.ode_eval_examples, len(x))
    j = mine[mine < n_ode] if ode else mine[:0]
    if len(j):  # the batch function of ``idode eval``: same protocol, same streams
        stream = evaluate_stream(
            model, x, j.tolist(), dev, num_levels, ev.protocol, False, batch_size=ev.batch_size
        )
        rows = [row for group in stream for row in group]
        ode_bpd = torch.tensor([r["bpd"] for r in rows], dtype=torch.float64)
        ode_nfe = torch.tensor([float(r["nfe"]) for r in rows], dtype=torch.float64)
        # measured (idode.certify): this rank's share of the jobs `idode eval` would check
        rep = check_rows(model, x, rows, num_levels, ev.protocol, num_examples=n_ode,
                         batch_size=ev.batch_size, device=dev)  # fmt: skip
        ode_err = torch.tensor([r["diff_bpd"] for r in rep.jobs], dtype=torch.float64)
    parts = all_gather((torch.cat(sde) if sde else torch.zeros(0), ode_bpd, ode_nfe, ode_err), env)
    out = {"eval/sde_bpd": float(torch.cat([p[0] for p in parts]).double().mean())}
    if ode:
        name = {"truncated_normal": "tn"}.get(ev.dequantization, ev.dequantization)
        out[f"eval/ode_bpd_{name}"] = float(torch.cat([p[1] for p in parts]).mean())
        out["eval/ode_nfe"] = float(torch.cat([p[2] for p in parts]).mean())
        err = torch.cat([p[3] for p in parts]).abs()
        if len(err):  # jobs solved again 100x tighter; not calibrated here (max_solver_error)
            out["eval/ode_solver_error_max"] = float(err.max())
            out["eval/ode_solver_error_mean"] = float(err.mean())
    return out
