"""Where the likelihood solve's work goes: how fast a trained model's drift varies in gamma.

Dopri5's local error per step is about C dt^5 |d^5 y / dgamma^5|, and along the probability-flow
ODE y' = h(z, gamma), so the step size a tolerance allows is set by the fifth derivative of the
drift along the trajectory. This script follows trajectories of the first N test images (the
network in float64; classic RK4 on a fine uniform grid of gamma, accurate far beyond what is
measured here), records the drift h at every grid point and prints

- the drift's power spectrum over gamma (detrended, Hann window), as energy fractions per band
  of angular frequency omega (rad per unit gamma), beside the sinusoidal time embedding's
  fastest frequency (``idode.nets.embedding``: 1000 rad per unit normalized gamma, i.e.
  time_scale / (gamma_max - gamma_min) per unit gamma);
- per ninth of the gamma range: mean |h|, mean |d^5 h / dgamma^5| (fifth finite difference) and
  omega_eff = (|d^5 h| / |h|)^(1/5), the frequency a pure sinusoid would need to have that
  fifth derivative.

    python benchmarks/field_spectrum.py --model digits --images 4 --grid 4096 \\
        --out benchmarks/results/field_spectrum_digits_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import train_models  # noqa: E402

from idode.checkpoint import load_model  # noqa: E402
from idode.data import dataset_from_config  # noqa: E402
from idode.dequantization import dequantize  # noqa: E402
from idode.rng import example_generators  # noqa: E402

BANDS = ((0, 2), (2, 5), (5, 10), (10, 20), (20, 40), (40, 70), (70, math.inf))


def trajectories(model, z0: torch.Tensor, g0: float, g1: float, n: int):
    """The drift at n + 1 uniform points of [g0, g1] along each row's trajectory (RK4)."""
    shape = z0.shape[1:]

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gam = t.expand(y.shape[0]).to(y.dtype)
        return model.drift(y.reshape(-1, *shape), gam).flatten(1)

    grid = torch.linspace(g0, g1, n + 1, dtype=torch.float64)
    z, out = z0.flatten(1).double(), []
    with torch.no_grad():
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            dt = float(b - a)
            k1 = f(a, z)
            out.append(k1)
            k2 = f(a + dt / 2, z + dt / 2 * k1)
            k3 = f(a + dt / 2, z + dt / 2 * k2)
            k4 = f(b, z + dt * k3)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(f(grid[-1], z))
    return grid, torch.stack(out)  # [n + 1], [n + 1, B, d]


def report(grid: torch.Tensor, h: torch.Tensor, embed_omega: float) -> list[str]:
    n, dg = len(grid) - 1, float(grid[1] - grid[0])
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)[:, None, None]
    detrended = h - (h[0] + (h[-1] - h[0]) * ramp)
    window = torch.hann_window(n + 1, periodic=False, dtype=torch.float64)[:, None, None]
    power = torch.fft.rfft(detrended * window, dim=0).abs().square().sum((1, 2))
    omega = 2 * math.pi * torch.fft.rfftfreq(n + 1, d=dg, dtype=torch.float64)
    lines = [f"The embedding's fastest frequency: {embed_omega:.1f} rad per unit gamma.", "",
             "| omega (rad / unit gamma) | energy fraction of the detrended drift |",
             "|---|---:|"]  # fmt: skip
    for lo, hi in BANDS:
        m = (omega >= lo) & (omega < hi)
        lines.append(f"| [{lo}, {hi}) | {float(power[m].sum() / power.sum()):.2e} |")
    d5 = h.diff(n=5, dim=0).abs().mean((1, 2)) / dg**5
    size = h.abs().mean((1, 2))
    lines += ["", "| gamma | mean abs h | mean abs d5h/dgamma5 | omega_eff |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for k in range(9):
        i0, i1 = k * n // 9, (k + 1) * n // 9
        a, b = float(d5[i0 : min(i1, len(d5))].mean()), float(size[i0:i1].mean())
        lines.append(f"| {float(grid[i0]):.1f}..{float(grid[i1]):.1f} | {b:.2e} | {a:.2e} | "
                     f"{(a / b) ** 0.2:.0f} |")  # fmt: skip
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits", choices=train_models.MODELS)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--grid", type=int, default=4096, help="uniform gamma intervals")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = train_models.run_dir(args.model)
    model, ck = load_model(run / "checkpoint")
    model = model.to(torch.float64)
    ds = dataset_from_config(ck.config.data, "test")
    x = ds.as_tensor()[: args.images]
    gens = example_generators(0, range(len(x)), purpose="dequantization")
    dq = dequantize("truncated_normal", x, ds.num_levels, model.schedule, generator=gens)
    s = model.schedule
    g0, g1 = float(dq.gamma_start), s.gamma_max
    grid, h = trajectories(model, dq.z, g0, g1, args.grid)
    head = (f"`python benchmarks/field_spectrum.py --model {args.model} --images {args.images} "
            f"--grid {args.grid}` ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()}, torch {torch.__version__}, 1 thread); {args.model}: "
            f"{ck.config.preset} trained {ck.step} steps, first {len(x)} test images, network "
            f"in float64, gamma {g0:.2f}..{g1:.2f}")  # fmt: skip
    fastest = model.net.time_scale / (s.gamma_max - s.gamma_min)
    text = "\n".join([head, "", *report(grid, h, fastest)])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
