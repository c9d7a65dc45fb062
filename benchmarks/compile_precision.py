"""torch.compile and the network's precision policy, measured on this machine (issue 18, 1-2).

Tables:

1. **compile**: per network, one likelihood field call (forward + VJP, ``augmented_field``, the
   call the solver makes) and one AdamW training step, eager vs ``model.compile=true``: the
   first call (the compiled one includes compiling), the median of ``--reps`` more, and the
   largest |compiled - eager| of the field's output relative to its largest entry.
2. **memory**: bytes autograd keeps per row for the VJP (fp32, bf16) of the ``cifar10`` preset's
   ScoreUNet, and its eager forward + VJP time on this CPU (``--full-cifar``).
3. **precision**: per trained model, per-image bits/dim and NFE of the adaptive solve with the
   network in bf16 (``torch.autocast``; on the CPU too: bfloat16's rounding is the same, up to
   the kernels' summation order) against fp32, same dequantization noise and probes, under the
   checkpoint's own protocol and the CIFAR presets' (rtol = atol = 1e-5, the log-density's own
   test). TF32 only exists on CUDA tensor cores: on the CPU it is fp32 (``benchmarks/gpu_suite.py``
   measures it).

    python benchmarks/compile_precision.py --out benchmarks/results/compile_precision_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbench import (  # noqa: E402
    NetSpec,
    activation_bytes_per_row,
    bpd_per_image,
    field_output,
    fmt_s,
    forward_vjp,
    train_step,
    with_protocol,
)

from idode.checkpoint import find_checkpoint, load_model  # noqa: E402
from idode.data import load_dataset  # noqa: E402

NETS = {
    "digits_cpu": NetSpec("digits_cpu", "digits_cpu", (1, 8, 8), 17),
    "digits": NetSpec("digits", "digits", (1, 8, 8), 17),
    "cifar_small": NetSpec(
        "cifar_small", "cifar10", (3, 32, 32), 256, ("model.n_embd=32", "model.n_layers=2")
    ),
}
FULL = NetSpec("cifar10", "cifar10", (3, 32, 32), 256)
CACHE = Path.home() / ".cache" / "idode-bench"


def compile_lines(args, dev) -> list[str]:
    lines = [
        "| network | params | rows | field eager first / median | field compiled first "
        "(compiles) / median | speed-up | max rel diff | train step eager first / median | "
        "train step compiled first / median | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.nets.split(","):
        spec = NETS[name]
        rows, train_rows = (args.batch_cifar, args.batch_cifar) if "cifar" in name else (64, 64)
        eager, comp = spec.build(dev), spec.build(dev, compile="true")
        fe = forward_vjp(eager, spec.shape, rows, dev, args.reps)
        fc = forward_vjp(comp, spec.shape, rows, dev, args.reps)
        a, b = field_output(eager, spec.shape, rows, dev), field_output(comp, spec.shape, rows, dev)
        rel = float((a - b).abs().max() / a.abs().max())
        te = tc = (math.nan, math.nan)
        if not args.field_only:
            te = train_step(spec.build(dev), spec.shape, train_rows, dev, args.reps)
            tc = train_step(spec.build(dev, compile="true"), spec.shape, train_rows, dev, args.reps)
        lines.append(
            f"| {name} {spec.shape} | {spec.params():,} | {rows} | {fmt_s(fe[0])} / "
            f"{fmt_s(fe[1])} | {fmt_s(fc[0])} / {fmt_s(fc[1])} | {fe[1] / fc[1]:.2f}x | "
            f"{rel:.1e} | {fmt_s(te[0])} / {fmt_s(te[1])} | {fmt_s(tc[0])} / {fmt_s(tc[1])} | "
            f"{te[1] / tc[1]:.2f}x |"
        )
        print(lines[-1], flush=True)
    return lines


def memory_lines(args, dev) -> list[str]:
    lines = ["| network | params | precision | autograd bytes / row (VJP) | rows in 139 GiB |",
             "|---|---|---|---|---|"]  # fmt: skip
    for p in ("fp32", "bf16"):
        model = FULL.build(dev, precision=p)
        b = activation_bytes_per_row(model, FULL.shape, dev)
        lines.append(
            f"| cifar10 ScoreUNet | {FULL.params():,} | {p} | {b / 2**20:.0f} MiB | "
            f"{int(139 * 2**30 // b)} |"
        )
    if args.full_cifar:
        first, med = forward_vjp(FULL.build(dev), FULL.shape, 2, dev, 1)
        lines += [
            "",
            f"Eager forward + VJP of the full cifar10 ScoreUNet on this CPU, 2 rows: first "
            f"{fmt_s(first)}, then {fmt_s(med)} ({fmt_s(med / 2)} per row).",
        ]
    return lines


def _trained_runs(args) -> list[Path]:
    runs = [Path(p) for p in args.models.split(",")] if args.models else sorted(CACHE.iterdir())
    out = []
    for r in runs:
        try:
            find_checkpoint(r)
            out.append(r)
        except Exception:  # noqa: BLE001 - not a run folder (data files, unfinished runs)
            continue
    return out


class _Stopped(Exception):
    pass


def _guarded_bpd(model, x, levels, ev, batch: int, seconds: int):
    """(bpd [N], NFE/img [N]) or (None, rows per image so far) when the solve is stopped."""
    rows = [0]
    hook = model.net.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + len(o)))

    def stop(*_):
        raise _Stopped

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return bpd_per_image(model, x, levels, ev, batch)
    except _Stopped:
        return None, torch.tensor([rows[0] / len(x)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        hook.remove()


def precision_lines(args, dev) -> list[str]:
    lines = [
        f"Same dequantization noise and probes for both; a solve still running after "
        f"{args.max_seconds} s is stopped and its NFE/img given as '>= rows so far'.",
        "",
        "| model (step) | protocol | images | bpd fp32 | bpd bf16 | mean abs dbpd | max abs dbpd |"
        " NFE/img fp32 | NFE/img bf16 | NFE ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in _trained_runs(args):
        m32, ck = load_model(run, device=dev, precision="fp32")
        m16, _ = load_model(run, device=dev, precision="bf16")
        ds = load_dataset(ck.config.data.name, "test", root=ck.config.data.root)
        x = ds.as_tensor()[: args.images]
        own = ck.config.eval
        for rtol, tolerance in args.protocols:
            ev = with_protocol(own, rtol=rtol, atol=rtol, tolerance=tolerance, logp_atol=None)
            label = f"rtol=atol={rtol:g} {tolerance}"
            b32, n32 = _guarded_bpd(m32, x, ds.num_levels, ev, args.batch_eval, args.max_seconds)
            b16, n16 = _guarded_bpd(m16, x, ds.num_levels, ev, args.batch_eval, args.max_seconds)
            if b32 is None or b16 is None:
                f32 = f"{n32.mean():.0f}" if b32 is not None else f">= {n32.mean():.0f}"
                f16 = f"{n16.mean():.0f}" if b16 is not None else f">= {n16.mean():.0f}"
                lines.append(f"| {run.name} ({ck.step}) | {label} | {len(x)} | - | - | - | - | "
                             f"{f32} | {f16} | stopped |")  # fmt: skip
            else:
                diff = (b16 - b32).abs()
                lines.append(
                    f"| {run.name} ({ck.step}) | {label} | {len(x)} | {b32.mean():.4f} | "
                    f"{b16.mean():.4f} | {diff.mean():.1e} | {diff.max():.1e} | "
                    f"{n32.mean():.0f} | {n16.mean():.0f} | {n16.mean() / n32.mean():.3f} |"
                )
            print(lines[-1], flush=True)
    return lines


def _protocols(text: str) -> list[tuple[float, str]]:
    out = []
    for item in text.split(","):
        rtol, tolerance = item.split(":")
        out.append((float(rtol), tolerance))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the tables (markdown) here")
    p.add_argument("--nets", default="digits_cpu,cifar_small", help=f"of {', '.join(NETS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-cifar", type=int, default=8, help="rows of the CIFAR-shaped nets")
    p.add_argument("--batch-eval", type=int, default=64)
    p.add_argument("--images", type=int, default=64, help="test images per trained model")
    p.add_argument("--models", help="run folders (default: the runs in ~/.cache/idode-bench)")
    p.add_argument("--full-cifar", action="store_true", help="time the 30.6M UNet eagerly")
    p.add_argument("--skip", default="", help="sections to skip: compile,memory,precision")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--field-only", action="store_true", help="compile: no training step")
    p.add_argument("--max-seconds", type=int, default=600, help="stop a solve after this long")
    p.add_argument(
        "--protocols",
        type=_protocols,
        default=_protocols("1e-5:logp,1e-5:paper,1e-6:paper,1e-7:paper"),
        help="rtol:tolerance,... (rtol = atol; logp | paper)",
    )
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    cmd = "python benchmarks/compile_precision.py " + " ".join(sys.argv[1:])
    out = [
        "# torch.compile and the precision policy on the CPU",
        "",
        f"`{cmd}` on {datetime.date.today()}: {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), torch {torch.__version__}, shared 2-core machine under load "
        "(compare rows of one table, not absolute times).",
    ]
    skip = set(args.skip.split(","))
    sections = (("compile", compile_lines), ("memory", memory_lines),
                ("precision", precision_lines))  # fmt: skip
    for name, fn in sections:
        if name in skip:
            continue
        out += ["", f"## {name}", ""] + fn(args, dev)
        if args.out:
            Path(args.out).write_text("\n".join(out) + "\n")
    text = "\n".join(out) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
