"""Exact-likelihood cost: idode's per-example torchode path vs score_sde_pytorch's scipy path.

Prints a markdown table for a fixed small ``ScoreUNet`` on a batch of 32x32x3 images: NFE, wall
time per image, the time inside the network's forward + VJP and outside it, the mean bits/dim and
the mean and largest per-example |log p| error against a tight-tolerance reference.

Every path integrates the same augmented ODE d(z, l)/dgamma = (h, u^T dh/dz u) of method.md §6.1
from gamma_min to gamma_max with the same fixed Rademacher probes u, the same drift callable
``DiffusionODE.drift`` (network in float32, state in float64) and the same rtol/atol:

  idode        ``idode.log_likelihood``: torchode Dopri5, one step size and error norm per
               example; the state never leaves the device.
  scipy        score_sde_pytorch's approach: ``scipy.integrate.solve_ivp(method="RK45")`` on one
               flat float64 numpy array of size B*d + B (one step size for the batch); every
               evaluation copies the state to a tensor and drift + divergence back to numpy.
               score_sde runs a second forward pass for the drift; here the drift shares the
               divergence's forward (one forward + one VJP per NFE, like the other paths), which
               favours scipy.
  torchdiffeq  ``torchdiffeq.odeint(method="dopri5")`` on the [B, d + 1] float64 batch: one step
               size and one RMS error norm for the batch, on the device (another reference).

"Network time" is the wall time of the drift + Hutchinson-divergence callable (forward + VJP,
including the float32 <-> float64 casts in ``DiffusionODE.predict``), summed over calls with
``perf_counter`` (plus ``torch.cuda.synchronize()`` on both sides on CUDA). For the idode path
that callable is timed by wrapping ``idode.likelihood.hutchinson_divergence`` for the duration of
the call; the library is not modified. Everything else (solver bookkeeping, cat/reshape, host
copies) is "outside". On CUDA the timer's synchronisations would slow the asynchronous paths, so
the wall time there comes from separate untimed runs.

The network is ``ScoreUNet`` without attention, dropout or (by default) Fourier features, seeded
with ``--seed``. VDM zero-initialises the last layer of every residual branch (``conv2``,
``cond_proj``) and the output convolution, so a fresh network is exactly z -> z, ignores gamma,
and the ODE is trivially smooth. We re-draw those layers LeCun-normal (the init of every other
layer) and scale the output convolution by ``--out-scale``. Fourier features are off by default
because a random network's response to sin(2^7 2 pi z) oscillates on a z-scale of ~0.01 and makes
the ODE extremely stiff (no solve finished in 15 minutes); a trained network learns to use them
only at low noise.

The reference is idode at rtol = atol = 1e-7: on the quick configuration it differs from a
1e-8 solve by 0.025 nats per image, against ~2-4 nats for the 1e-5 solves, and costs 60 % of the
1e-8 solve's NFE (1484 vs 2498), which keeps the default run under ~10 minutes on 2 cores.

On CPU, ``--threads 1`` (the default) keeps timings stable when other processes share the cores:
with 2 intra-op threads on 2 busy cores, OpenMP waits made each network call 3-4x slower.

Run ``python benchmarks/likelihood.py --help``; ``--quick`` is a ~2 minute smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import idode
import idode.likelihood as idode_likelihood
from idode.augmented import gaussian_log_prob
from idode.dequantization import bits_per_dim_from_nats
from idode.divergence import first_order_input_gradients, hutchinson_divergence, sample_probes
from idode.nets import ScoreUNet, count_parameters
from idode.nets.unet import lecun_normal_

PATHS: tuple[str, ...] = ("idode", "scipy", "torchdiffeq")
NUM_LEVELS = 256
SHAPE = (3, 32, 32)
OUTSIDE_TARGET = 0.15  # the issue's target: <= 15 % of the time outside the network


# --------------------------------------------------------------------------------------------------
# Fixtures: the network and the data
# --------------------------------------------------------------------------------------------------


def build_model(
    width: int,
    layers: int,
    out_scale: float,
    seed: int,
    device: torch.device,
    fourier: bool = False,
) -> idode.DiffusionODE:
    """A fixed ScoreUNet with its zero-initialised layers re-drawn; VP schedule, velocity."""
    torch.manual_seed(seed)
    net = ScoreUNet(
        in_channels=3, n_embd=width, n_layers=layers, dropout=0.0, with_fourier_features=fourier
    )
    with torch.no_grad():
        for module in net.modules():
            w = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not w.any():
                lecun_normal_(w)
        net.conv_out.weight.mul_(out_scale)
    model = idode.DiffusionODE(net, idode.VPSchedule(), "velocity").to(device)
    return model.eval()


def make_images(batch: int, seed: int) -> Tensor:
    """Smooth synthetic 8-bit images [B, 3, 32, 32]: bicubic-upsampled 4x4 noise plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, SHAPE[0], 4, 4, generator=g)
    img = F.interpolate(coarse, size=SHAPE[1:], mode="bicubic", align_corners=False)
    img = img + 0.02 * torch.randn(batch, *SHAPE, generator=g)
    return (img.clamp(0, 1) * (NUM_LEVELS - 1)).round().long()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class NetTimer:
    """Sums the wall time of the callables it wraps (forward + VJP); a no-op when disabled."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.sync = device.type == "cuda"
        self.enabled = enabled
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        if not self.enabled:
            return fn

        def timed(*args, **kwargs):
            if self.sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out

        return timed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    logp: Tensor  # [B] float64 nats, on the CPU
    nfe: int  # batched evaluations of drift + divergence
    nfe_per_example: float  # mean evaluations an example needed alone (= nfe for shared steps)
    wall: float  # seconds for the whole batch
    net_seconds: float  # seconds inside drift + divergence (0 when not timed)


# --------------------------------------------------------------------------------------------------
# The three paths
# --------------------------------------------------------------------------------------------------


def run_idode(model, z, probes, g0, rtol, atol, timer: NetTimer) -> Run:
    """idode.log_likelihood, with its divergence callable timed for the duration of the call."""
    original = idode_likelihood.hutchinson_divergence
    idode_likelihood.hutchinson_divergence = timer.wrap(original)
    try:
        synchronize(z.device)
        t0 = time.perf_counter()
        res = idode.log_likelihood(
            model, z, "rademacher", rtol, atol, gamma_start=g0, probes=probes
        )
        synchronize(z.device)
        wall = time.perf_counter() - t0
    finally:
        idode_likelihood.hutchinson_divergence = original
    per_example = float((6 * res.steps + 2).double().mean())
    return Run(res.logp.cpu(), res.nfe, per_example, wall, timer.seconds)


def run_scipy(model, z, probes, g0, rtol, atol, timer: NetTimer) -> Run:
    """score_sde_pytorch's approach: solve_ivp RK45 on one flat float64 numpy system of B*d + B."""
    from scipy.integrate import solve_ivp

    b, shape, d = z.shape[0], tuple(z.shape[1:]), z[0].numel()
    s, device = model.schedule, z.device
    divergence = timer.wrap(hutchinson_divergence)
    nfe = 0

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        state = torch.from_numpy(y).to(device)
        x = state[: b * d].reshape(b, *shape)
        gamma = torch.full((b,), t, dtype=torch.float64, device=device)
        out, div = divergence(lambda x_: model.drift(x_, gamma), x, probes)
        return np.concatenate([out.detach().cpu().numpy().reshape(-1), div.detach().cpu().numpy()])

    y0 = np.concatenate([z.detach().to(torch.float64).cpu().numpy().reshape(-1), np.zeros(b)])
    synchronize(device)
    t0 = time.perf_counter()
    # the same network speed-up idode uses (fused attention: one VJP per step), for a fair race
    with torch.no_grad(), first_order_input_gradients():
        sol = solve_ivp(fun, (g0, s.gamma_max), y0, method="RK45", rtol=rtol, atol=atol)
    wall = time.perf_counter() - t0
    if not sol.success:
        raise RuntimeError(f"scipy solve_ivp failed: {sol.message}")
    y_end = torch.from_numpy(sol.y[:, -1])
    z_end, delta = y_end[: b * d].reshape(b, *shape), y_end[b * d :]
    logp = gaussian_log_prob(z_end, s.sigma2_max) + delta
    return Run(logp, nfe, float(nfe), wall, timer.seconds)


def run_torchdiffeq(model, z, probes, g0, rtol, atol, timer: NetTimer) -> Run:
    """torchdiffeq dopri5 on the [B, d + 1] float64 batch: one step size, one RMS norm."""
    from torchdiffeq import odeint

    b, shape, d = z.shape[0], tuple(z.shape[1:]), z[0].numel()
    s, device = model.schedule, z.device
    divergence = timer.wrap(hutchinson_divergence)
    nfe = 0

    def f(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        x = y[:, :d].reshape(b, *shape)
        gamma = t.expand(b)
        out, div = divergence(lambda x_: model.drift(x_, gamma), x, probes)
        return torch.cat([out.detach().flatten(1), div.detach()[:, None]], dim=1)

    y0 = torch.cat([z.detach().to(torch.float64).flatten(1), z.new_zeros(b, 1)], dim=1)
    times = torch.tensor([g0, s.gamma_max], dtype=torch.float64, device=device)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad(), first_order_input_gradients():
        y_end = odeint(f, y0, times, rtol=rtol, atol=atol, method="dopri5")[-1]
    synchronize(device)
    wall = time.perf_counter() - t0
    z_end, delta = y_end[:, :d].reshape(b, *shape), y_end[:, d]
    logp = gaussian_log_prob(z_end, s.sigma2_max) + delta
    return Run(logp.cpu(), nfe, float(nfe), wall, timer.seconds)


RUNNERS = {"idode": run_idode, "scipy": run_scipy, "torchdiffeq": run_torchdiffeq}


def measure(args, model, z, probes, g0, device) -> dict[str, tuple[Run, float | None]]:
    """Per path, the fastest of ``args.repeats`` timed runs and, on CUDA, the fastest untimed wall.

    Repeats interleave the paths (idode, scipy, ..., idode, scipy, ...) so that a slow spell on a
    shared machine hits them alike.
    """
    timed: dict[str, list[Run]] = {name: [] for name in args.paths}
    untimed: dict[str, list[float]] = {name: [] for name in args.paths}
    for _ in range(args.repeats):
        for name in args.paths:
            run = RUNNERS[name](model, z, probes, g0, args.rtol, args.atol, NetTimer(device))
            timed[name].append(run)
            print(f"{name}: NFE {run.nfe}, {run.wall:.1f} s", file=sys.stderr, flush=True)
            if device.type == "cuda":
                bare = NetTimer(device, enabled=False)
                untimed[name].append(
                    RUNNERS[name](model, z, probes, g0, args.rtol, args.atol, bare).wall
                )
    return {
        name: (min(timed[name], key=lambda r: r.wall), min(untimed[name], default=None))
        for name in args.paths
    }


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 4; quick 1)")
    p.add_argument("--width", type=int, default=32, help="ScoreUNet n_embd (default 32)")
    p.add_argument(
        "--layers", type=int, default=None, help="ScoreUNet n_layers (default 2; quick 1)"
    )
    p.add_argument(
        "--out-scale", type=float, default=0.3, help="scale of the re-drawn conv_out (0.3)"
    )
    p.add_argument(
        "--fourier", action="store_true", help="keep VDM's Fourier features (very stiff ODE)"
    )
    p.add_argument("--rtol", type=float, default=1e-5, help="(default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-5, help="(default 1e-5)")
    p.add_argument(
        "--ref-tol",
        type=float,
        default=1e-7,
        help="rtol = atol of the idode reference solve (default 1e-7); 0 skips it",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller batch and net, about 2 min on CPU")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per path, fastest kept (1)")
    p.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated subset of idode,scipy,torchdiffeq"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1); 0 = torch's")
    p.add_argument("--seed", type=int, default=0, help="seed of the net, images, probes (0)")
    p.add_argument(
        "--sweep",
        default="",
        help="comma list of rtol = atol values for an extra work-precision table (NFE, error)",
    )
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    args.batch = args.batch if args.batch is not None else (1 if args.quick else 4)
    args.layers = args.layers if args.layers is not None else (1 if args.quick else 2)
    args.sweep = [float(tol) for tol in args.sweep.split(",") if tol.strip()]
    args.paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    for name in args.paths:
        if name not in PATHS:
            p.error(f"unknown path {name!r}; valid: {', '.join(PATHS)}")
    if args.repeats < 1 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def fmt(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    model = build_model(
        args.width, args.layers, args.out_scale, args.seed, device, fourier=args.fourier
    )
    s = model.schedule
    x_int = make_images(args.batch, args.seed + 1).to(device)
    g = torch.Generator(device=device).manual_seed(args.seed + 2)
    dq = idode.dequantize("truncated_normal", x_int, NUM_LEVELS, s, generator=g)
    z, g0, d = dq.z, dq.gamma_start, x_int[0].numel()
    probes = sample_probes(z.shape, "rademacher", generator=g, device=device)

    # warm-up: one drift + divergence call (kernels, allocator, autograd)
    with torch.no_grad():
        gamma = torch.full((args.batch,), g0, dtype=torch.float64, device=device)
        hutchinson_divergence(lambda x_: model.drift(x_, gamma), z, probes)
    synchronize(device)

    ref = None
    if args.ref_tol > 0:
        timer = NetTimer(device, enabled=False)
        ref_run = run_idode(model, z, probes, g0, args.ref_tol, args.ref_tol, timer)
        ref = ref_run.logp
        print(
            f"reference: idode at rtol=atol={args.ref_tol:g}, NFE {ref_run.nfe}, "
            f"{ref_run.wall:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    rows = []
    results = measure(args, model, z, probes, g0, device)
    for name, (run, untimed) in results.items():
        wall = untimed if untimed is not None else run.wall
        bpd = bits_per_dim_from_nats(run.logp - dq.log_q.cpu(), d).mean().item()
        err = (run.logp - ref).abs() if ref is not None else torch.full_like(run.logp, math.nan)
        errs = (err.mean().item(), err.max().item())
        rows.append((name, run, wall, 1.0 - run.net_seconds / run.wall, bpd, errs))

    scipy_wall = next((wall for name, _, wall, *_ in rows if name == "scipy"), None)
    ref_text = f"idode at rtol=atol={args.ref_tol:g}" if ref is not None else "none"
    lines = [
        f"device: {device_name(device)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s); python {platform.python_version()}",
        f"ScoreUNet n_embd={args.width}, n_layers={args.layers}, Fourier features "
        f"{'on' if args.fourier else 'off'} ({count_parameters(model.net):,} params, "
        f"conv_out x{args.out_scale:g}); VP, velocity; B={args.batch}, d={d}; "
        f"truncated-normal dequantization; 1 Rademacher probe; seed {args.seed}",
        f"rtol={args.rtol:g}, atol={args.atol:g}; reference: {ref_text}; "
        f"repeats={args.repeats} (fastest kept)",
        "",
        "| path | NFE (batched) | NFE / example (mean) | wall / image [s] | net / NFE [ms] "
        "| outside / NFE [ms] | outside net | speed vs scipy | bits/dim (mean) "
        "| abs dlogp vs ref, mean / max [nats] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run, wall, outside, bpd, err in rows:
        speed = f"{scipy_wall / wall:.2f}x" if scipy_wall else "n/a"
        net_ms = 1e3 * run.net_seconds / run.nfe
        out_ms = 1e3 * (run.wall - run.net_seconds) / run.nfe
        lines.append(
            f"| {name} | {run.nfe} | {run.nfe_per_example:.1f} | {wall / args.batch:.3f} | "
            f"{net_ms:.1f} | {out_ms:.2f} | {100 * outside:.1f} % | {speed} | {bpd:.5f} | "
            f"{fmt(err[0], '.2f')} / {fmt(err[1], '.2f')} |"
        )
    lines += ["", *target_lines(rows)]
    if args.sweep:
        lines += ["", *sweep_lines(args, model, z, probes, g0, device, ref)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = " ".join(["python", "benchmarks/likelihood.py", *(argv or sys.argv[1:])])
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        with open(args.out, "w") as fh:
            fh.write(f"# Likelihood benchmark\n\n`{cmd}` ({stamp})\n\n{table}\n")
    return table


def sweep_lines(args, model, z, probes, g0, device, ref: Tensor | None) -> list[str]:
    """Work-precision table: per tolerance and path, batched NFE and |log p - ref| mean / max."""
    head = "| rtol = atol | " + " | ".join(f"{n} NFE | {n} abs dlogp [nats]" for n in args.paths)
    lines = [
        "Work-precision (untimed; abs dlogp vs the reference, mean / max over the batch):",
        "",
        head + " |",
        "|---:|" + "---:|---:|" * len(args.paths),
    ]
    for tol in args.sweep:
        cells = []
        for name in args.paths:
            run = RUNNERS[name](model, z, probes, g0, tol, tol, NetTimer(device, enabled=False))
            print(f"sweep {tol:g} {name}: NFE {run.nfe}", file=sys.stderr, flush=True)
            if ref is None:
                cells += [str(run.nfe), "n/a"]
            else:
                err = (run.logp - ref).abs()
                cells += [str(run.nfe), f"{err.mean().item():.2f} / {err.max().item():.2f}"]
        lines.append(f"| {tol:g} | " + " | ".join(cells) + " |")
    return lines


def target_lines(rows) -> list[str]:
    """The issue's two targets for the idode path, met or MISSED."""
    by_name = {row[0]: row for row in rows}
    out = []
    if "idode" in by_name and "scipy" in by_name:
        mine, theirs = by_name["idode"][1], by_name["scipy"][1]
        ok = mine.nfe <= theirs.nfe
        out.append(
            f"- NFE target (idode <= scipy at equal tolerance): {'met' if ok else 'MISSED'} "
            f"({mine.nfe} vs {theirs.nfe}; {mine.nfe_per_example:.1f} per example)"
        )
    if "idode" in by_name:
        outside = by_name["idode"][3]
        ok = outside <= OUTSIDE_TARGET
        out.append(
            f"- outside-network target (<= {100 * OUTSIDE_TARGET:.0f} %): "
            f"{'met' if ok else 'MISSED'} ({100 * outside:.1f} %)"
        )
    return out


if __name__ == "__main__":
    main()
