"""The prepared GPU run (issue 18): one command, markdown tables written as each section ends.

    pip install -e . && python benchmarks/gpu_suite.py --out OUT        # one GPU, ~8 minutes
    python benchmarks/gpu_suite.py --tiny --device cpu --out OUT        # CI: every code path, tiny

Sections (files in OUT, and all of them in OUT/summary.md):

1. ``correctness.md``: a digits model trained here on the device (single process), its
   checkpoint loaded on the CPU (weights equal?), and per-image bits/dim on the device in
   fp32 / tf32 / bf16 / fp32 compiled against a CPU float64 run of the same model, with the
   same dequantization noise and probes (drawn on the CPU and copied), target <= 1e-4 bits/dim.
2. ``torchrun.md``: ``torchrun --standalone --nproc_per_node 1 -m idode train`` on the device,
   and an NCCL all-reduce in a one-rank group (idode starts a process group only for 2+ ranks).
3. ``throughput.md``: the ``cifar10`` preset's 30.58M-parameter ScoreUNet (untrained, zero
   layers re-drawn): network rows/s of forward + VJP at batch 64 / 256 / 512 in fp32 / tf32 /
   bf16, eager; out-of-memory cells say so.
4. ``projection.md``: a real continuous-batched bits/dim pass (bf16, 256 rows) on synthetic
   CIFAR-shaped images (rtol = atol = 1e-5, logp): NFE per image and the time outside the
   network; with each precision's rows/s, images per hour and the hours of the paper's protocol
   (10,000 test images x 5 draws) at the measured NFE and at 200 and 400.
5. ``training.md``: images/s and peak memory of first- and second-order training steps at the
   preset's batch size (128).
6. ``compiled.md``: the throughput cells compiled (inductor) at 256 rows, fp32 and bf16, last,
   since a compile of the large UNet may take minutes; a cell starts only with 120 s of budget
   left. ``--skip correctness,torchrun,throughput,projection,training`` runs them alone.

``--budget`` seconds (default 480) bounds the run: a cell that would start after it is written
as "skipped: time budget". The exit status is 1 if any section raised (its table says where).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbench import (  # noqa: E402
    NetSpec,
    Stopped,
    fmt_s,
    forward_vjp,
    synchronize,
    time_limit,
    train_step,
)

import idode  # noqa: E402
from idode.checkpoint import load_model  # noqa: E402
from idode.config import apply_overrides  # noqa: E402
from idode.data import load_dataset  # noqa: E402
from idode.dequantization import dequantize  # noqa: E402
from idode.divergence import sample_probes  # noqa: E402
from idode.loader import ImageLoader  # noqa: E402
from idode.presets import get_preset  # noqa: E402
from idode.rng import example_generators  # noqa: E402
from idode.solvers import nfe_of_steps  # noqa: E402
from idode.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "tf32", "bf16")
PROTOCOL_IMAGES, PROTOCOL_DRAWS = 10_000, 5  # the paper's CIFAR-10 test protocol


class Suite:
    def __init__(self, args) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.dev = torch.device(args.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections: list[tuple[str, list[str]]] = []
        self.failed: list[str] = []
        self.rows_per_s: dict[tuple[int, str, str], float] = {}  # (rows, precision, mode)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def write(self, name: str, title: str, lines: list[str]) -> None:
        text = "\n".join([f"## {title}", "", *lines]) + "\n"
        (self.out / f"{name}.md").write_text(text)
        self.sections.append((name, text))
        summary = [self.header(), *[t for _, t in self.sections]]
        (self.out / "summary.md").write_text("\n".join(summary))
        print(text, flush=True)

    def header(self) -> str:
        a, dev = self.args, self.dev
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        cuda = f", CUDA {torch.version.cuda}" if dev.type == "cuda" else ""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        return (
            f"# idode GPU suite{' (tiny)' if a.tiny else ''}\n\n`python benchmarks/gpu_suite.py "
            f"{' '.join(sys.argv[1:])}` on {now} UTC: {name or dev.type}{cuda}, torch "
            f"{torch.__version__}, {time.perf_counter() - self.t0:.0f} s so far.\n"
        )

    def run(self, name: str, title: str, fn) -> None:
        try:
            lines = fn()
        except Exception as e:  # noqa: BLE001 - a failing section must not stop the others
            traceback.print_exc()
            self.failed.append(name)
            lines = [f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        self.write(name, title, lines)


def compiled_copy(model: idode.DiffusionODE, backend: str) -> idode.DiffusionODE:
    """``model`` with its network compiled (``backend``: inductor; eager in --tiny CI runs)."""
    model.net_compile = True
    object.__setattr__(model, "_compiled", torch.compile(model.net, backend=backend))
    return model


# --- 1. correctness -------------------------------------------------------------------------------


def train_digits(s: Suite) -> tuple[Path, idode.DiffusionODE, float]:
    a = s.args
    sets = [f"train.steps={a.train_steps}", f"train.checkpoint_every={a.train_steps}",
            "train.eval_every=0", "train.ode_eval_every=0", f"train.device={a.device}",
            "train.log_every=10"]  # fmt: skip
    cfg = apply_overrides(get_preset("digits_cpu"), sets)
    if a.tiny:
        cfg = apply_overrides(cfg, ["model.n_embd=8", "model.n_layers=1"])
    t0 = time.perf_counter()
    res = train(cfg, s.out / "digits_run", progress=False, overwrite=True)
    return res.checkpoint, res.ema, time.perf_counter() - t0


def correctness(s: Suite) -> list[str]:
    a, dev = s.args, s.dev
    ckpt, ema, secs = train_digits(s)
    cpu_model, ck = load_model(ckpt, device="cpu")
    same = all(
        torch.equal(p.detach().cpu(), q)
        for p, q in zip(ema.parameters(), cpu_model.parameters(), strict=True)
    )
    lines = [f"Trained digits_cpu for {a.train_steps} steps on {dev} in {secs:.1f} s; its "
             f"checkpoint loads on the CPU with {'identical' if same else 'DIFFERENT'} weights.",
             ""]  # fmt: skip
    if not same:
        s.failed.append("correctness: checkpoint weights differ after loading on the CPU")
    loader = ImageLoader(torch.zeros(8, 1, 2, 2), 4, shuffle=True, seed=0, drop_last=True,
                         pin_memory=dev.type == "cuda")  # fmt: skip
    pinned = next(iter(loader)).is_pinned()
    lines[0] += f" Training batches {'are' if pinned else 'are not'} in pinned memory."
    if dev.type == "cuda" and not pinned:
        s.failed.append("correctness: training batches are not pinned on CUDA")
    ds = load_dataset("digits", "test")
    x = ds.as_tensor()[: a.images]
    n, d, shape = len(x), x[0].numel(), tuple(x.shape[1:])
    gens = example_generators(0, list(range(n)), "cpu", purpose="dequantization")
    u = sample_probes((n, *shape), "rademacher", generator=gens)  # drawn on the CPU, copied
    dq = dequantize("truncated_normal", x, ds.num_levels, cpu_model.schedule, generator=gens)
    tol = dict(rtol=a.rtol, atol=a.rtol, tolerance="paper")
    ref = idode.log_likelihood(cpu_model.double(), dq.z, "rademacher", probes=u, **tol)
    lines += [f"{n} digits test images, truncated-normal noise and Rademacher probes drawn once on "
              f"the CPU; rtol = atol = {a.rtol:g} (one RMS norm). Reference: CPU float64, NFE/img "
              f"{float(nfe_of_steps(ref.steps).double().mean()):.0f}.", "",
              "| run | NFE/img | mean abs dbpd vs CPU float64 | max abs dbpd | <= 1e-4 |",
              "|---|---|---|---|---|"]  # fmt: skip
    runs = [("cpu", "fp32", False)] if dev.type != "cpu" else []
    runs += [(dev.type, p, False) for p in PRECISIONS]
    runs.append((dev.type, "fp32", True))
    for where, prec, comp in runs:
        if prec == "tf32" and where != "cuda":
            lines.append(f"| {where} tf32 | - | - | - | skipped: TF32 needs CUDA |")
            continue
        m, _ = load_model(ckpt, device=where, precision=prec)
        if comp:
            m = compiled_copy(m, a.backend)
        try:  # bf16's rounding can multiply the NFE at tight tolerances: bounded
            with time_limit(a.solve_seconds):
                r = idode.log_likelihood(m, dq.z.to(where), "rademacher", probes=u.to(where), **tol)
        except Stopped:
            lines.append(f"| {where} {prec}{' compiled' if comp else ''} | - | - | - | "
                         f"stopped after {a.solve_seconds:g} s |")  # fmt: skip
            continue
        dbpd = (r.logp.cpu() - ref.logp).abs() / (d * math.log(2))
        ok = "yes" if float(dbpd.max()) <= 1e-4 else "no"
        lines.append(
            f"| {where} {prec}{' compiled' if comp else ''} | "
            f"{float(nfe_of_steps(r.steps).double().mean()):.0f} | {float(dbpd.mean()):.1e} | "
            f"{float(dbpd.max()):.1e} | {ok} |"
        )
        print(lines[-1], flush=True)
    return lines


# --- 2. torchrun ----------------------------------------------------------------------------------

_NCCL = """
import os, torch, torch.distributed as dist
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else "cpu"
t = torch.ones(4, device=dev)
dist.all_reduce(t)
print("backend", dist.get_backend(), "sum", t.tolist())
dist.destroy_process_group()
"""


def torchrun(s: Suite) -> list[str]:
    a = s.args
    if s.dev.type != "cuda" and not a.tiny:
        return ["skipped: needs CUDA"]
    run = s.out / "torchrun_run"
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    n = 5 if a.tiny else 20
    sets = [f"train.steps={n}", f"train.checkpoint_every={n}", "train.eval_every=0",
            "train.ode_eval_every=0", f"train.device={a.device}",
            "train.batch_size=32"]  # fmt: skip
    if a.tiny:
        sets += ["model.n_embd=8", "model.n_layers=1"]
    cmd = [*base, "-m", "idode", "train", "--config", "digits_cpu", "--out", str(run),
           "--overwrite", "--no-progress"] + [x for kv in sets for x in ("--set", kv)]  # fmt: skip
    lines = ["| run | result | seconds |", "|---|---|---|"]
    script = s.out / "allreduce.py"
    script.write_text(_NCCL)
    runs = [("idode train (1 rank)", cmd), ("NCCL all-reduce (1 rank)", [*base, str(script)])]
    if s.dev.type != "cuda":
        lines.append("| NCCL all-reduce (1 rank) | skipped: needs CUDA | - |")
        runs = runs[:1]
    for label, c in runs:
        t0 = time.perf_counter()
        p = subprocess.run(c, capture_output=True, text=True, env=env, timeout=240)
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        ok = p.returncode == 0
        if not ok:
            s.failed.append(f"torchrun: {label}")
        lines.append(f"| {label} | {'ok' if ok else 'FAILED'}: {tail[0][:160]} | "
                     f"{time.perf_counter() - t0:.1f} |")  # fmt: skip
    if (run / "checkpoint").exists():
        lines.append(f"\nThe torchrun run wrote {(run / 'checkpoint').resolve().name}.")
    return lines


# --- 3. throughput --------------------------------------------------------------------------------


def unet(s: Suite, fourier: bool = True) -> NetSpec:
    """The cifar10 preset's ScoreUNet (tiny: the same code, a tiny UNet on 8x8 images).

    ``fourier=False``: without the input Fourier features, whose response in an untrained net
    oscillates at the scale of one grey level and makes the ODE stiff (benchmarks/README.md).
    """
    sets = () if fourier else ("model.fourier_features=false",)
    if s.args.tiny:
        sets += ("model.n_embd=8", "model.n_layers=1")
    return NetSpec("cifar10", "cifar10", (3, 8, 8) if s.args.tiny else (3, 32, 32), 256, sets)


def _cell(s: Suite, fn, min_left: float = 20.0) -> str | float:
    if s.left() < min_left:
        return "skipped: time budget"
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


def throughput(s: Suite, compiled: bool = False) -> list[str]:
    a, dev, spec = s.args, s.dev, unet(s)
    lines = [f"ScoreUNet of the cifar10 preset ({spec.params():,} parameters), forward + VJP of "
             f"the likelihood field (one call = one row per image), median of {a.reps} calls "
             "after a warm-up call (the compiled one includes compiling); rows/s = rows / "
             "seconds per call.", "",
             "| rows | precision | mode | first call | s / call | rows / s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    if compiled:
        cells = [(a.compile_batch, p, True) for p in a.compile_precisions]
    else:
        cells = [(b, p, False) for b in a.batches for p in PRECISIONS]
    for b, p, comp in cells:
        mode = "compiled" if comp else "eager"
        if p == "tf32" and dev.type != "cuda":
            lines.append(f"| {b} | tf32 | {mode} | - | - | skipped: TF32 needs CUDA |")
            continue

        def measure(b=b, p=p, comp=comp):
            m = spec.build(dev, precision=p)
            m = compiled_copy(m, a.backend) if comp else m
            out = forward_vjp(m, spec.shape, b, dev, a.reps)
            del m
            return out

        # a compile of the 30.6M UNet may take minutes: start one only with time to finish it
        r = _cell(s, measure, a.compile_min_left if comp else 10.0)
        if isinstance(r, str):
            lines.append(f"| {b} | {p} | {mode} | - | - | {r} |")
        else:
            s.rows_per_s[(b, p, mode)] = b / r[1]
            lines.append(f"| {b} | {p} | {mode} | {fmt_s(r[0])} | {fmt_s(r[1])} | "
                         f"{b / r[1]:.1f} |")  # fmt: skip
        print(lines[-1], flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return lines


# --- 4. projection --------------------------------------------------------------------------------


def projection(s: Suite) -> list[str]:
    """One real pass (NFE, time outside the network), then hours per precision from rows/s."""
    a, dev, spec = s.args, s.dev, unet(s, fourier=False)
    p = a.projection_precision
    model = spec.build(dev, precision=p).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (a.proj_images, *spec.shape), generator=g)
    # smooth images, as benchmarks/likelihood.py: a field that needs a few hundred NFE
    x = torch.nn.functional.avg_pool2d(x.float(), 5, 1, 2).round().long().to(dev)
    gens = example_generators(0, list(range(len(x))), dev, purpose="dequantization")
    tol = dict(rtol=a.proj_rtol, atol=a.proj_rtol)
    synchronize(dev)
    t0 = time.perf_counter()
    try:
        with time_limit(a.proj_seconds):
            res = idode.bits_per_dim(model, x, 256, batch_size=a.proj_batch, generator=gens, **tol)
    except Stopped:
        return [f"stopped: the pass over {len(x)} images ran past {a.proj_seconds:g} s"]
    synchronize(dev)
    wall = time.perf_counter() - t0
    nfe = float(res.nfe_per_example.double().mean())
    row = forward_vjp(model, spec.shape, a.proj_batch, dev, a.reps)[1] / a.proj_batch
    outside = max(0.0, wall - res.rows * row) / res.rows  # per row: solver, refills, host reads
    lines = [
        f"{len(x)} smoothed random {'x'.join(map(str, spec.shape))} images, untrained UNet "
        f"without Fourier features ({spec.params():,} parameters), {p}, continuous batching at "
        f"{a.proj_batch} rows, rtol = atol = {a.proj_rtol:g} (logp): {wall:.1f} s for "
        f"{res.rows} rows, NFE/img {nfe:.0f}; a forward + VJP row {fmt_s(row)}; outside the "
        f"network {fmt_s(outside)} per row ({outside * res.rows / wall:.1%} of the time).",
        "",
        "Projection: seconds per row = 1 / (rows/s of the precision at "
        f"{a.proj_batch} rows, eager, from throughput.md) + the time outside per row above. "
        "An untrained net's NFE is not a trained one's: read the row of the NFE you expect "
        "(and bf16's NFE is 11-22 % above fp32's at this tolerance, "
        "benchmarks/results/compile_precision_cpu.md).",
        "",
        "| precision | NFE / image | images / hour | paper protocol (10,000 x 5 draws), hours |",
        "|---|---|---|---|",
    ]
    for q in PRECISIONS:
        rate = s.rows_per_s.get((a.proj_batch, q, "eager"))
        if rate is None:
            continue
        per_row = 1 / rate + outside
        for n in sorted({round(nfe), 200, 400}):
            img_h = 3600 / (n * per_row)
            hours = PROTOCOL_IMAGES * PROTOCOL_DRAWS / img_h
            lines.append(f"| {q} | {n}{' (measured)' if n == round(nfe) else ''} | "
                         f"{img_h:.0f} | {hours:.2f} |")  # fmt: skip
    return lines


# --- 5. training ----------------------------------------------------------------------------------


def training(s: Suite) -> list[str]:
    a, dev, spec = s.args, s.dev, unet(s)
    lines = [f"AdamW steps of the i-DODE loss at batch {a.train_batch} (the cifar10 preset's), "
             f"median of {a.reps} after a warm-up step.", "",
             "| step | precision | s / step | images / s | peak memory |",
             "|---|---|---|---|---|"]  # fmt: skip
    for order, weight in (("first-order", 0.0), ("second-order (lambda_2 = 0.1)", 0.1)):
        for p in PRECISIONS:
            if p == "tf32" and dev.type != "cuda":
                continue

            def measure(p=p, weight=weight):
                m = spec.build(dev, precision=p)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                r = train_step(m, spec.shape, a.train_batch, dev, a.reps, weight)
                mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
                return r, mem

            r = _cell(s, measure)
            if isinstance(r, str):
                lines.append(f"| {order} | {p} | - | - | {r} |")
                continue
            (first, med), mem = r
            lines.append(f"| {order} | {p} | {fmt_s(med)} | {a.train_batch / med:.1f} | "
                         f"{'-' if mem is None else f'{mem:.1f} GiB'} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the markdown tables")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny nets and few rows (CI, CPU)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later cells are skipped")
    p.add_argument("--skip", default="", help="sections to skip, e.g. torchrun,training")
    args = p.parse_args(argv)
    big = dict(train_steps=1000, images=32, rtol=1e-7, reps=3, batches=(64, 256, 512),
               compile_batch=256, proj_images=256, proj_batch=256, train_batch=128,
               projection_precision="bf16", backend="inductor", compile_min_left=120.0,
               solve_seconds=40.0, proj_seconds=150.0,
               compile_precisions=("fp32", "bf16"), proj_rtol=1e-5)  # fmt: skip
    tiny = dict(train_steps=10, proj_rtol=1e-3, images=4, rtol=1e-4, reps=1, batches=(2, 4),
                compile_batch=2,
                proj_images=2, proj_batch=2, train_batch=2, projection_precision="fp32",
                compile_min_left=0.0, solve_seconds=0.0, proj_seconds=0.0,
                backend="eager", compile_precisions=("fp32",))  # fmt: skip
    for k, v in (tiny if args.tiny else big).items():
        setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    s = Suite(args)
    sections = [("correctness", "1. CUDA correctness", correctness),
                ("torchrun", "2. torchrun", torchrun),
                ("throughput", "3. likelihood throughput, eager", throughput),
                ("projection", "4. images per hour and the paper protocol", projection),
                ("training", "5. training", training),
                ("compiled", "6. likelihood throughput, compiled",
                 lambda s: throughput(s, compiled=True))]  # fmt: skip
    skip = set(args.skip.split(","))
    for name, title, fn in sections:
        if name not in skip:
            s.run(name, title, lambda fn=fn: fn(s))
    (s.out / "summary.md").write_text("\n".join([s.header(), *[t for _, t in s.sections]]))
    if s.failed:
        print(f"gpu_suite: failed: {', '.join(s.failed)}", file=sys.stderr)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
