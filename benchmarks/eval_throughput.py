"""Likelihood-evaluation throughput: continuous batching vs fixed batches vs flat batch solvers.

Prints, per model, dequantization and batch size, a markdown table with one row per path:

  fixed (before)      idode before continuous batching: torchode Dopri5 with per-example step
                      control on fixed batches of B examples; a batch runs until its slowest
                      example ends and finished rows keep being evaluated.
  continuous          ``idode.bits_per_dim(batch_size=B)``: a row whose solve ends takes the next
                      (example, draw) at once; with ``tolerance="paper"`` (the error control of the
                      fixed path, so the difference is batching alone) and the default ``"logp"``.
  scipy flat          score_sde_pytorch / official i-DODE: ``scipy.integrate.solve_ivp(RK45)`` on
                      one flat float64 vector per batch (one step size and norm for the batch).
  torchdiffeq         ``torchdiffeq.odeint(dopri5)`` on the [B, d + 1] batch (one step size).

Every path integrates the same ODE from the same points: each example's Hutchinson probe and
dequantization noise come from its own generator (``rng.example_generators``), drawn in the same
order (probe, then draw) on every path. Columns: images/s; network rows evaluated per image
(each row is one forward + VJP of one example); the sum over examples of their own NFE
(``solvers.nfe_of_steps``) per image; their ratio; the predicted wall time
sum NFE x (time of one forward + VJP row, measured on full batches of B) against the measured
one; mean bits/dim and the largest per-image |bpd - reference|, the reference being a tight
continuous solve (``--ref-tol``).

``--work-precision`` prints instead NFE per image vs |bpd - reference| for the error-control
protocols (``tolerance="paper"`` at several rtol = atol; ``"logp"`` at several rtol = atol and
log-density budgets), the table the defaults were chosen from.

Models: ``digits``, the demo preset trained for 1500 steps (trained into
``runs/eval_throughput/digits1500`` if absent, a few minutes on one core), on the digits test
split (8x8, 17 levels); ``cifar``, an untrained ScoreUNet on synthetic 32x32x3 8-bit images
(``benchmarks/likelihood.py``'s fixture, zero-initialised layers re-drawn).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import idode
from idode.augmented import augmented_field, eval_mode, gaussian_log_prob
from idode.augmented import hutchinson_probes as _probes
from idode.continuous import bpd_columns
from idode.dequantization import dequantize
from idode.divergence import first_order_input_gradients
from idode.nets import count_parameters
from idode.rng import example_generators
from idode.solvers import nfe_of_steps

ROOT = Path(__file__).resolve().parent.parent
DIGITS_RUN = ROOT / "runs" / "eval_throughput" / "digits1500"
PATHS = ("fixed", "continuous-paper", "continuous", "scipy", "torchdiffeq")


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@dataclass
class Fixture:
    name: str
    model: idode.DiffusionODE
    x: Tensor  # [N, ...] integer images
    num_levels: int
    about: str


def digits_fixture(n: int, steps: int = 1500) -> Fixture:
    from idode.checkpoint import load_model
    from idode.data import load_dataset

    if not (DIGITS_RUN / "checkpoint").exists():
        from idode.config import apply_overrides
        from idode.presets import get_preset
        from idode.train import train

        print(f"training the digits model ({steps} steps) into {DIGITS_RUN} ...", file=sys.stderr)
        over = [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
        over.append(f"train.eval_every={steps}")
        train(apply_overrides(get_preset("digits_cpu"), over), DIGITS_RUN, progress=False)
    model, ck = load_model(DIGITS_RUN / "checkpoint")
    ds = load_dataset("digits", "test")
    x = ds.as_tensor()[:n]
    about = (
        f"digits_cpu preset trained {ck.step} steps ({count_parameters(model.net):,} params, "
        f"EMA), digits test split, first {len(x)} images, d = {x[0].numel()}"
    )
    return Fixture("digits", model, x, ds.num_levels, about)


def cifar_fixture(n: int, width: int, layers: int) -> Fixture:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from likelihood import build_model, make_images

    model = build_model(width, layers, 0.3, 0, torch.device("cpu"))
    x = make_images(n, 1)
    about = (
        f"untrained ScoreUNet n_embd={width}, n_layers={layers} "
        f"({count_parameters(model.net):,} params, re-drawn zero layers, conv_out x0.3), "
        f"{n} synthetic 32x32x3 8-bit images, d = 3072"
    )
    return Fixture("cifar", model, x, 256, about)


# --------------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------------


@dataclass
class PathRun:
    bpd: Tensor  # [N] float64
    rows: int  # network rows evaluated
    sum_nfe: int | None  # sum over examples of their own NFE (None: one shared step size)
    wall: float


def _draws(fx: Fixture, idx: list[int], deq: str, seed: int):
    """The probe and dequantization of examples idx, drawn as ``bits_per_dim`` draws them."""
    gens = example_generators(seed, idx)
    shape = tuple(fx.x.shape[1:])
    u = _probes(1, (len(idx), *shape), "rademacher", gens, "cpu")
    dq = dequantize(deq, fx.x[idx], fx.num_levels, fx.model.schedule, generator=gens)
    return u, dq


def _bpd(fx: Fixture, dq, logp: Tensor) -> Tensor:
    cols = bpd_columns(
        logp[:, None], dq.log_decoder[:, None], dq.log_q[:, None], dq.expected_log_q,
        fx.x[0].numel(),
    )  # fmt: skip
    return cols["bpd_mean_of_bounds"]


def run_continuous(fx, deq, batch, rtol, atol, seed, tolerance="logp", logp_atol=None):
    t0 = time.perf_counter()
    res = idode.bits_per_dim(
        fx.model, fx.x, fx.num_levels, deq, rtol=rtol, atol=atol, batch_size=batch,
        generator=example_generators(seed, range(len(fx.x))), tolerance=tolerance,
        logp_atol=logp_atol,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    return PathRun(res.bpd, res.rows, int(res.nfe_per_example.sum()), wall)


def _torchode_solve(f, y0, t0, t1, rtol, atol):
    """idode's solver before continuous batching: torchode, every row evaluated every call."""
    import torchode

    b = y0.shape[0]
    calls = [0]

    def counted(t, y):
        calls[0] += 1
        return f(t, y)

    term = torchode.ODETerm(counted, with_stats=False)
    solver = torchode.AutoDiffAdjoint(
        torchode.Dopri5(term=term), torchode.IntegralController(atol=atol, rtol=rtol, term=term)
    )
    times = [torch.full((b,), t, dtype=y0.dtype) for t in (t0, t1)]
    sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_start=times[0], t_end=times[1]))
    if bool((sol.status != 0).any()):
        raise RuntimeError("torchode solve failed")
    return sol.ys[:, -1], calls[0], sol.stats["n_steps"]


def _batch_paths(fx, deq, batch, rtol, atol, seed, solver: str) -> PathRun:
    """fixed / scipy / torchdiffeq: the examples in fixed batches of ``batch``."""
    n, shape, d = len(fx.x), tuple(fx.x.shape[1:]), fx.x[0].numel()
    s = fx.model.schedule
    bpds, rows, sum_nfe, wall = [], 0, 0, 0.0
    for lo in range(0, n, batch):
        idx = list(range(lo, min(lo + batch, n)))
        u, dq = _draws(fx, idx, deq, seed)
        field = augmented_field(fx.model, "rademacher", shape)
        m = len(idx)
        y0 = torch.cat([dq.z.flatten(1), torch.zeros(m, 1, dtype=torch.float64)], 1)
        t0 = time.perf_counter()
        with eval_mode(fx.model), torch.no_grad(), first_order_input_gradients():
            if solver == "fixed":
                y, calls, steps = _torchode_solve(
                    lambda t, y, u=u, field=field: field(t, y, u),
                    y0,
                    dq.gamma_start,
                    s.gamma_max,
                    rtol,
                    atol,
                )
                sum_nfe += int(nfe_of_steps(steps).sum())
            elif solver == "scipy":
                y, calls = _scipy_flat(field, u, y0, dq.gamma_start, s.gamma_max, rtol, atol)
                sum_nfe = None
            else:
                y, calls = _torchdiffeq(field, u, y0, dq.gamma_start, s.gamma_max, rtol, atol)
                sum_nfe = None
        wall += time.perf_counter() - t0
        rows += calls * m
        logp = gaussian_log_prob(y[:, :d], s.sigma2_max) + y[:, d]
        bpds.append(_bpd(fx, dq, logp))
    return PathRun(torch.cat(bpds), rows, sum_nfe, wall)


def _scipy_flat(field, u, y0, g0, g1, rtol, atol):
    from scipy.integrate import solve_ivp

    b, n = y0.shape
    calls = [0]

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        calls[0] += 1
        state = torch.from_numpy(y).reshape(b, n)
        gamma = torch.full((b,), t, dtype=torch.float64)
        return field(gamma, state, u).numpy().reshape(-1)

    sol = solve_ivp(fun, (g0, g1), y0.numpy().reshape(-1), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"scipy solve_ivp failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(b, n), calls[0]


def _torchdiffeq(field, u, y0, g0, g1, rtol, atol):
    from torchdiffeq import odeint

    calls = [0]

    def f(t, y):
        calls[0] += 1
        return field(t.expand(y.shape[0]), y, u)

    times = torch.tensor([g0, g1], dtype=torch.float64)
    return odeint(f, y0, times, rtol=rtol, atol=atol, method="dopri5")[-1], calls[0]


def row_seconds(fx: Fixture, batch: int, repeats: int = 8) -> float:
    """Median time of one forward + VJP row, on a full batch of ``batch`` rows."""
    shape, d = tuple(fx.x.shape[1:]), fx.x[0].numel()
    m = min(batch, len(fx.x))
    idx = list(range(m))
    u, dq = _draws(fx, idx, "truncated_normal", 0)
    field = augmented_field(fx.model, "rademacher", shape)
    y = torch.cat([dq.z.flatten(1), torch.zeros(m, 1, dtype=torch.float64)], 1)
    times = []
    with eval_mode(fx.model), torch.no_grad(), first_order_input_gradients():
        for g in np.linspace(fx.model.schedule.gamma_min, 0.0, repeats + 1):
            t0 = time.perf_counter()
            field(torch.full((m,), float(g), dtype=torch.float64), y, u)
            times.append(time.perf_counter() - t0)
    del d
    return statistics.median(times[2:]) / m  # the first calls warm up


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def reference(fx: Fixture, deq: str, tol: float, seed: int, n: int | None = None) -> Tensor:
    """Per-image bits/dim of a tight solve of the first n images: rtol = atol = logp_atol = tol."""
    t0 = time.perf_counter()
    sub = Fixture(fx.name, fx.model, fx.x[:n], fx.num_levels, fx.about)
    run = run_continuous(sub, deq, len(sub.x), tol, tol, seed, "logp", tol)
    print(f"  reference {deq} at {tol:g}: {run.sum_nfe / len(sub.x):.0f} NFE/image, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return run.bpd


def throughput_lines(fx: Fixture, args, lines: list[str]) -> list[str]:
    """Appends to ``lines`` (and saves them after every table: a long run keeps its output)."""
    n = len(fx.x)
    lines += [f"### {fx.name}: {fx.about}", ""]
    for deq in args.dequantizations:
        ref = reference(fx, deq, args.ref_tol, args.seed, args.ref_images)
        nr = len(ref)
        per_batch: dict[int, Tensor] = {}
        for batch in args.batches:
            t_row = row_seconds(fx, batch)
            lines += [
                f"**{deq}, batch {batch}** ({n} images; rtol = atol = {args.tol:g}; reference: "
                f"rtol = atol = logp_atol = {args.ref_tol:g}; one "
                f"forward + VJP row at batch {min(batch, n)}: {1e3 * t_row:.2f} ms)",
                "",
                "| path | images/s | rows evaluated / image | sum NFE / image | ratio "
                f"| wall / (sum NFE x row time) | bits/dim (mean) | max abs dbpd vs ref "
                f"(first {nr} images) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for path in args.paths:
                run = run_path(fx, path, deq, batch, args)
                if path == "continuous":
                    per_batch[batch] = run.bpd
                rows_img = run.rows / n
                nfe_img = run.sum_nfe / n if run.sum_nfe is not None else float("nan")
                ratio = run.rows / run.sum_nfe if run.sum_nfe else float("nan")
                pred = run.sum_nfe * t_row if run.sum_nfe is not None else run.rows * t_row
                err = (run.bpd[:nr] - ref).abs().max().item()
                lines.append(
                    f"| {LABELS[path]} | {n / run.wall:.2f} | {rows_img:.1f} | "
                    f"{_fmt(nfe_img, '.1f')} | {_fmt(ratio, '.3f')} | "
                    f"{run.wall / pred:.2f} | {run.bpd.mean().item():.4f} | {err:.4f} |"
                )  # fmt: skip
                print(f"  {fx.name} {deq} B={batch} {path}: {run.wall:.1f} s", file=sys.stderr,
                      flush=True)  # fmt: skip
            lines.append("")
            save(args, lines)
        if len(per_batch) > 1:
            vals = list(per_batch.values())
            diff = max((v - vals[0]).abs().max().item() for v in vals[1:])
            lines += [
                f"continuous, {deq}: largest per-image |bpd(batch {args.batches[0]}) - "
                f"bpd(other batch sizes)| = {diff:.2e}",
                "",
            ]
    return lines


LABELS = {
    "fixed": "idode fixed batches (before; torchode, paper tolerance)",
    "continuous-paper": 'idode continuous batching, tolerance="paper"',
    "continuous": 'idode continuous batching, tolerance="logp" (default)',
    "scipy": "scipy RK45, flat batch vector",
    "torchdiffeq": "torchdiffeq dopri5, [B, d + 1] batch",
}


def run_path(fx: Fixture, path: str, deq: str, batch: int, args) -> PathRun:
    if path == "continuous":
        return run_continuous(fx, deq, batch, args.tol, args.tol, args.seed)
    if path == "continuous-paper":
        return run_continuous(fx, deq, batch, args.tol, args.tol, args.seed, "paper")
    return _batch_paths(fx, deq, batch, args.tol, args.tol, args.seed, path)


def work_precision_lines(fx: Fixture, args, lines: list[str]) -> list[str]:
    d = fx.x[0].numel()
    lines += [f"### {fx.name}: {fx.about}", ""]
    settings = [("paper", tol, None) for tol in args.wp_paper]
    settings += [("logp", tol, bpd_tol) for tol in args.wp_logp for bpd_tol in args.wp_logp_bpd]
    for deq in args.dequantizations:
        ref = reference(fx, deq, args.ref_tol, args.seed)
        lines += [
            f"**{deq}** ({len(fx.x)} images; reference: rtol = atol = {args.ref_tol:g}, "
            f"logp_atol = {args.ref_tol:g} nats)",
            "",
            "| tolerance | rtol = atol | logp_atol [bits/dim x d ln 2] | NFE / image "
            "| mean abs dbpd | max abs dbpd | images within 0.002 | solver estimate (mean) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for tolerance, tol, bpd_tol in settings:
            logp_atol = None if bpd_tol is None else bpd_tol * d * math.log(2.0)
            res = idode.bits_per_dim(
                fx.model, fx.x, fx.num_levels, deq, rtol=tol, atol=tol, batch_size=len(fx.x),
                generator=example_generators(args.seed, range(len(fx.x))), tolerance=tolerance,
                logp_atol=logp_atol,
            )  # fmt: skip
            err = (res.bpd - ref).abs()
            lines.append(
                f"| {tolerance} | {tol:g} | {_fmt(bpd_tol, 'g')} | "
                f"{res.nfe_per_example.double().mean().item():.0f} | {err.mean().item():.4f} | "
                f"{err.max().item():.4f} | {int((err <= 0.002).sum())}/{len(err)} | "
                f"{res.solver_error_bpd.mean().item():.4f} |"
            )
            print(f"  wp {fx.name} {deq} {tolerance} {tol:g} {bpd_tol}: "
                  f"{res.nfe_per_example.double().mean().item():.0f} NFE, max err "
                  f"{err.max().item():.4f}", file=sys.stderr, flush=True)  # fmt: skip
            save(args, lines)
        lines.append("")
    return lines


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,cifar", help="comma list of digits, cifar")
    p.add_argument("--dequantizations", default="truncated_normal,uniform")
    p.add_argument("--batches", default="64,256", help="comma list of batch sizes (64,256)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma subset of {PATHS}")
    p.add_argument("--digits-images", type=int, default=300, help="digits test images (300)")
    p.add_argument("--cifar-images", type=int, default=64, help="synthetic CIFAR images (64)")
    p.add_argument("--cifar-width", type=int, default=16, help="ScoreUNet n_embd (16)")
    p.add_argument("--cifar-layers", type=int, default=1, help="ScoreUNet n_layers (1)")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of the timed runs")
    p.add_argument("--ref-tol", type=float, default=1e-8, help="the reference's tolerance")
    p.add_argument("--ref-images", type=int, default=None, help="reference: first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1)")
    p.add_argument("--work-precision", action="store_true", help="the work-precision tables")
    p.add_argument("--wp-paper", default="1e-4,1e-5,1e-6,3e-7,1e-7", help="paper rtol = atol")
    p.add_argument("--wp-logp", default="1e-5,1e-6,3e-7,1e-7", help="logp rtol = atol")
    p.add_argument("--wp-logp-bpd", default="1e-4,1e-5", help="logp_atol / (d ln 2) values")
    p.add_argument("--out", default=None, help="also write the output (markdown) here")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.models = [m for m in args.models.split(",") if m]
    args.dequantizations = [m for m in args.dequantizations.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.paths = [m for m in args.paths.split(",") if m]
    for key in ("wp_paper", "wp_logp", "wp_logp_bpd"):
        setattr(args, key, [float(v) for v in getattr(args, key).split(",") if v])
    for m in args.paths:
        if m not in PATHS:
            p.error(f"unknown path {m!r}; valid: {', '.join(PATHS)}")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s); python {platform.python_version()}",
        "",
    ]
    for name in args.models:
        if name == "digits":
            fx = digits_fixture(args.digits_images)
        else:
            fx = cifar_fixture(args.cifar_images, args.cifar_width, args.cifar_layers)
        make = work_precision_lines if args.work_precision else throughput_lines
        make(fx, args, lines)
    text = "\n".join(lines)
    print(text)
    save(args, lines)
    return text


def save(args, lines: list[str]) -> None:
    """Write the output so far to ``--out`` with the command line and date."""
    if not args.out:
        return
    cmd = " ".join(["python", "benchmarks/eval_throughput.py", *args.argv])
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = "Work-precision" if args.work_precision else "Evaluation throughput"
    text = "\n".join(lines)
    Path(args.out).write_text(f"# {title}\n\n`{cmd}` ({stamp})\n\n{text}\n")


if __name__ == "__main__":
    main()
