"""Work-precision of the likelihood solve on trained models: NFE per image against |dbpd|.

For a trained model (``benchmarks/train_models.py``: digits, mnist or photos) and its first N
test images, every row solves the same augmented ODE d(z, l)/dgamma = (h, u^T dh/dz u) from the
same truncated-normal dequantized points with the same Rademacher probes (per-example
generators, as ``idode.bits_per_dim`` draws them) and reports, per image: NFE (its own
``(stages - 1) x steps + 2``), |bpd - reference|, and the solver's local estimate (the sum of
|local error of l| over the steps, in bits/dim: what ``BPDResult.solver_error_bpd`` reports).

A row is ``method/variable/controller/norm/protocol/net@tol``:

- method: an embedded pair of ``idode.tableaus`` (dopri5, tsit5, bs3, vern6);
- variable: the integration time. ``gamma`` (idode's); ``t`` (the VP time, affine in gamma
  here, so the same solve up to rounding); ``logsigma`` (log sigma, sigma^2 = sigmoid(gamma));
  ``edm`` (sigma/alpha = exp(gamma/2), the EDM / DDIM time). The field is multiplied by
  dgamma/ds: the same ODE in another time;
- controller: ``i`` (idode's) or ``pi``; norm: ``rms`` or ``max`` over z;
- protocol: ``paper`` (one RMS over (z, l)) or ``logp`` (l's own test, logp_atol = 1e-4 bits/dim
  x d ln 2, idode's default);
- net: ``f32`` (the network in float32, gamma cast to float32 before the embedding, as
  idode did), ``f32e`` (float32 network, gamma and the sinusoidal embedding in float64, cast to
  float32 after), ``f64`` (the whole network in float64);
- tol: rtol = atol; ``TOL:INNER:LO:HI`` solves with INNER on gamma in [LO, HI] and TOL
  elsewhere (the solve restarts at LO and HI).

The reference (``--ref``) is the network in float64 solved with vern6 at a tight tolerance
(paper protocol), cross-checked by dopri5 with the PI controller; the table states how far they
are apart per image. The check columns give what idode's solver check (``idode.certify``) would
report for the row: each job re-solved with dopri5 at 100x tighter tolerances with the network
in float64, |bpd(row) - bpd(check)| (max over images), and that solve's NFE over the row's (the
per-job ratio: an evaluation's overhead is that times the checked fraction, max(8 jobs, 2 %)).

    python benchmarks/work_precision.py --model digits --images 16 \\
        --out benchmarks/results/work_precision_digits_levers_cpu.md
    python benchmarks/work_precision.py --model digits --profile dopri5/gamma/i/rms/paper/f32@1e-6
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import train_models  # noqa: E402

from idode.augmented import augmented_field, gaussian_log_prob  # noqa: E402
from idode.checkpoint import load_model  # noqa: E402
from idode.continuous import _JobSource, bpd_columns  # noqa: E402
from idode.data import dataset_from_config  # noqa: E402
from idode.divergence import first_order_input_gradients  # noqa: E402
from idode.protocol import Protocol, solver_tolerances  # noqa: E402
from idode.rng import example_generators  # noqa: E402
from idode.rundir import write_json_atomic  # noqa: E402
from idode.solvers import Jobs, SolverStats, nfe_of_steps, solve_stream  # noqa: E402

TARGET = 0.002  # bits/dim per image
REF = "vern6/gamma/i/rms/paper/f64@1e-9,dopri5/gamma/i/rms/paper/f64@1e-9"


# --------------------------------------------------------------------------------------------------
# the same ODE in another time: gamma = g(s), d/ds = g'(s) d/dgamma
# --------------------------------------------------------------------------------------------------


def _vp_maps(name: str):
    """(s(gamma), gamma(s), dgamma/ds(s)) for the VP schedule (sigma^2 = sigmoid(gamma))."""
    if name == "gamma":
        return (lambda g: g), (lambda s: s), (lambda s: torch.ones_like(s))
    if name == "t":  # the VP time of gamma(t) = gamma_min + (gamma_max - gamma_min) t: affine
        return None
    if name == "logsigma":  # s = log sigma = -softplus(-gamma)/2; gamma = 2s - log(-expm1(2s))
        return (
            lambda g: -0.5 * torch.nn.functional.softplus(-g),
            lambda s: 2 * s - torch.log(-torch.expm1(2 * s)),
            lambda s: -2.0 / torch.expm1(2 * s),
        )
    if name == "edm":  # s = sigma/alpha = exp(gamma/2)
        return (lambda g: torch.exp(0.5 * g)), (lambda s: 2 * torch.log(s)), (lambda s: 2.0 / s)
    raise SystemExit(f"unknown variable {name!r}")


def time_maps(name: str, schedule):
    if name == "t":
        g0, width = schedule.gamma_min, schedule.gamma_max - schedule.gamma_min
        return (
            lambda g: (g - g0) / width,
            lambda s: g0 + width * s,
            lambda s: torch.full_like(s, width),
        )
    return _vp_maps(name)


def in_time(field, maps):
    """The field f(gamma, y, aux) as a field in s: f(g(s), y, aux) g'(s)."""
    _, g_of, dg = maps

    def field_s(s: Tensor, y: Tensor, aux: Tensor | None = None) -> Tensor:
        return field(g_of(s), y, aux) * dg(s)[:, None]

    return field_s


# --------------------------------------------------------------------------------------------------
# the network's precision
# --------------------------------------------------------------------------------------------------


class GammaFloat64:
    """A float32 network called with gamma in float64 (the embedding is computed in float64)."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        m = self.model
        net = m.net

        def predict(z, gamma, **kw):
            return net(z.to(torch.float32), gamma.to(torch.float64), **kw).to(z.dtype)

        m.predict = predict
        return m

    def __exit__(self, *exc) -> None:
        del self.model.predict


def model_for(model, net: str):
    if net == "f64":
        return copy.deepcopy(model).double()
    return model


# --------------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    method: str = "dopri5"
    variable: str = "gamma"
    controller: str = "i"
    norm: str = "rms"
    protocol: str = "paper"
    net: str = "f32"
    tol: float = 1e-5
    inner: float | None = None  # rtol = atol on [lo, hi] of gamma (tol elsewhere)
    region: tuple[float, float] | None = None

    @staticmethod
    def parse(text: str) -> Spec:
        """``.../net@TOL`` or ``.../net@TOL:INNER:LO:HI`` (INNER on gamma in [LO, HI])."""
        body, _, tol = text.partition("@")
        parts = body.split("/")
        keys = ("method", "variable", "controller", "norm", "protocol", "net")
        t = [float(v) for v in (tol or "1e-5").split(":")]
        if len(t) not in (1, 4):
            raise SystemExit(f"{text!r}: expected @TOL or @TOL:INNER:LO:HI")
        inner, region = (t[1], (t[2], t[3])) if len(t) == 4 else (None, None)
        return Spec(**dict(zip(keys, parts, strict=False)), tol=t[0], inner=inner, region=region)

    def label(self) -> str:
        return "/".join((self.method, self.variable, self.controller, self.norm, self.protocol,
                         self.net))  # fmt: skip

    def tol_text(self) -> str:
        if self.region is None:
            return f"{self.tol:g}"
        return f"{self.tol:g}:{self.inner:g}:{self.region[0]:g}:{self.region[1]:g}"

    def tol_cell(self) -> str:
        if self.region is None:
            return f"{self.tol:g}"
        return f"{self.tol:g}; {self.inner:g} on [{self.region[0]:g}, {self.region[1]:g}]"

    def segments(self) -> list[tuple[float | None, float | None, float]]:
        """(gamma from, gamma to, tolerance); None: the job's own start / end."""
        if self.region is None:
            return [(None, None, self.tol)]
        lo, hi = self.region
        return [(None, lo, self.tol), (lo, hi, self.inner), (hi, None, self.tol)]

    def check_spec(self) -> Spec | None:
        """What idode's solver check re-solves a job with: dopri5, I controller, the network in
        float64, tolerances 100x tighter (``idode.certify``; None where it has no equivalent)."""
        if self.region is not None or self.protocol != "paper":
            return None  # logp: the check scales logp_atol too, which a row spec cannot say
        return Spec("dopri5", "gamma", "i", "rms", self.protocol, "f64", self.tol / 100)


@dataclass
class RowResult:
    bpd: Tensor  # [N] float64
    nfe: Tensor  # [N] int64
    local: Tensor  # [N] sum |local error of l|, bits/dim
    rows: int
    wall: float
    evals: list | None = None  # per call: (s [b], keys) when profiling


def job_source(model, x: Tensor, levels: int, seed: int) -> _JobSource:
    """The jobs of ``idode.bits_per_dim``'s default protocol (truncated-normal dequantization,
    one Rademacher probe, K = 1), with per-example generators."""
    gens = example_generators(seed, range(x.shape[0]))
    return _JobSource(model, x, levels, Protocol(), gens, example_major=True)


def solve(fx, spec: Spec, seed: int, record: bool = False) -> RowResult:
    """bpd of every image of the fixture under one row's solver settings (K = 1 draw). A row
    with a region tolerance restarts the solve at the region's edges (2 NFE each)."""
    model = model_for(fx.model, spec.net)
    n, shape, d = fx.x.shape[0], tuple(fx.x.shape[1:]), fx.x[0].numel()
    source = job_source(model, fx.x, fx.levels, seed)
    maps = time_maps(spec.variable, model.schedule)
    s_of = maps[0]
    stats = SolverStats()
    evals = [] if record else None
    nfe = torch.zeros(n, dtype=torch.long)
    local = torch.zeros(n, dtype=torch.float64)
    t0 = time.perf_counter()
    ctx = GammaFloat64(model) if spec.net == "f32e" else _Null(model)
    with ctx as m, torch.no_grad(), first_order_input_gradients():
        m.eval()
        field = in_time(augmented_field(m, "rademacher", shape), maps)
        if record:
            inner = field

            def field(s, y, aux=None):  # noqa: F811
                evals.append(s.clone())
                return inner(s, y, aux)

        jobs = source(n)
        y = jobs.y0
        for a, b, tol in spec.segments():
            t_a = jobs.t0 if a is None else torch.full_like(jobs.t0, a)
            t_b = jobs.t1 if b is None else torch.full_like(jobs.t1, b)
            pend = [Jobs(list(range(n)), y, s_of(t_a), s_of(t_b), jobs.aux)]
            tols = solver_tolerances(spec.protocol, tol, tol, None, d)
            out = y.clone()
            for done in solve_stream(field, lambda k, p=pend: p.pop() if p else None,
                                     batch_size=n, stats=stats, method=spec.method,
                                     controller=spec.controller, norm=spec.norm,
                                     **tols):  # fmt: skip
                idx = torch.tensor(done.keys)
                out[idx] = done.y
                nfe[idx] += nfe_of_steps(done.steps, spec.method)
                local[idx] += done.last_error.double().cpu()
            y = out
        prior = gaussian_log_prob(y[:, :d].reshape(n, *shape), m.schedule.sigma2_max)
        logp = (prior + y[:, d]).double().cpu()[:, None]
    wall = time.perf_counter() - t0
    meta = [source.meta[(i, 0)] for i in range(n)]
    lq = torch.tensor([[a] for a, _ in meta], dtype=torch.float64)
    dec = torch.tensor([[b] for _, b in meta], dtype=torch.float64)
    elq = torch.tensor([source.expected_log_q[i] for i in range(n)], dtype=torch.float64)
    bpd = bpd_columns(logp, dec, lq, elq, d)["bpd_mean_of_bounds"]
    return RowResult(bpd, nfe, local / (d * math.log(2)), stats.rows, wall, evals)


class _Null:
    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        return None


# --------------------------------------------------------------------------------------------------
# fixtures and tables
# --------------------------------------------------------------------------------------------------


@dataclass
class Fixture:
    name: str
    model: object
    x: Tensor
    levels: int
    about: str
    inputs: str  # the weights' checksum and the test set's content hash: a store's identity


def fixture(name: str, n: int) -> Fixture:
    run = train_models.run_dir(name)
    if not (run / "checkpoint").exists():
        raise SystemExit(f"no trained {name} model in {run}: run benchmarks/train_models.py")
    model, ck = load_model(run / "checkpoint")
    ds = dataset_from_config(ck.config.data, "test")
    x = ds.as_tensor()[:n]
    params = sum(p.numel() for p in model.net.parameters())
    about = (f"{name}: {ck.config.preset} config trained {ck.step} steps ({params:,} params, EMA) "
             f"in {run}; {ds.name} test split, first {len(x)} images, d = {x[0].numel()}, "
             f"{ds.num_levels} levels")  # fmt: skip
    inputs = f"model {ck.checksum}; data {ds.content_hash()}"
    return Fixture(name, model, x, ds.num_levels, about, inputs)


def reference_lines(specs: list[Spec], runs: list[RowResult]) -> list[str]:
    """The reference (the first spec) and how far each cross-check is from it."""
    first = f"{specs[0].label()} @ {specs[0].tol:g} ({runs[0].nfe.float().mean():.0f} NFE/image)"
    lines = [f"Reference (the table compares with it): {first}.", ""]
    for spec, r in zip(specs[1:], runs[1:], strict=True):
        gap = (runs[0].bpd - r.bpd).abs()
        lines += [f"- cross-check {spec.label()} @ {spec.tol:g} ({r.nfe.float().mean():.0f} "
                  f"NFE/image): differs from it by max {gap.max():.1e} bits/dim per image "
                  f"(mean {gap.mean():.1e})"]  # fmt: skip
    return lines + [""]


HEADER = [
    "| method/variable/controller/norm/protocol/net | tol | NFE / image (mean) | NFE max | "
    "mean abs dbpd | max abs dbpd | within 0.002 | local estimate (mean, bits/dim) | "
    "check's error (max, bits/dim) | check NFE / row NFE |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def row_line(spec: Spec, r: RowResult, ref: Tensor, check: RowResult | None) -> str:
    """One table row; ``check``: the row's jobs solved as ``idode.certify`` re-solves them."""
    err = (r.bpd - ref).abs()
    ok = int((err <= TARGET).sum())
    nfe = f"{r.nfe.float().mean():.0f} | {int(r.nfe.max())}"
    cells = "- | -"
    if check is not None:
        ratio = (check.nfe.double() / r.nfe.double()).mean()
        cells = f"{(r.bpd - check.bpd).abs().max():.4f} | {ratio:.1f}"
    return (f"| {spec.label()} | {spec.tol_cell()} | {nfe} | {err.mean():.4f} | {err.max():.4f} "
            f"| {ok}/{len(err)} | {r.local.mean():.4f} | {cells} |")  # fmt: skip


def profile_lines(fx: Fixture, spec: Spec, seed: int, bins: int) -> list[str]:
    """Where the evaluations go: per image, evaluations per 1/bins of the gamma range."""
    lines = [f"### where the NFE goes: {spec.label()} @ {spec.tol:g}", ""]
    s = fx.model.schedule
    edges = torch.linspace(s.gamma_min, s.gamma_max, bins + 1, dtype=torch.float64)
    e = edges.tolist()
    head = " | ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(e[:-1], e[1:], strict=True))
    lines += [f"| image | NFE | {head} |", "|---" * (bins + 2) + "|"]
    g_of = time_maps(spec.variable, s)[1]
    for i in range(len(fx.x)):
        sub = Fixture(fx.name, fx.model, fx.x[i : i + 1], fx.levels, fx.about)
        r = solve(sub, spec, seed, record=True)
        g = g_of(torch.cat(r.evals).double())
        counts = torch.histogram(g.clamp(s.gamma_min, s.gamma_max), edges).hist.long()
        lines.append(f"| {i} | {int(r.nfe[0])} | " + " | ".join(map(str, counts.tolist())) + " |")
    return lines + [""]


def noise_lines(fx: Fixture, seed: int) -> list[str]:
    """The drift's relative change over a gamma step delta, per network precision: a smooth
    field changes ~linearly in delta; rounding noise shows as a floor at small delta."""
    from idode.dequantization import dequantize

    m, n = fx.model, min(len(fx.x), 4)
    gens = example_generators(seed, range(n))
    z = dequantize("truncated_normal", fx.x[:n], fx.levels, m.schedule, generator=gens).z
    deltas = (1e-7, 1e-6, 1e-5, 1e-4)
    lines = [f"### the field's noise in gamma ({n} images): max over images of "
             "|h(z, g + delta) - h(z, g)| / |h(z, g)|", "",
             "| gamma | net | " + " | ".join(f"delta = {v:g}" for v in deltas) + " |",
             "|---|---" + "|---:" * len(deltas) + "|"]  # fmt: skip
    for g0 in (-13.0, -8.0, -2.0, 3.0):
        for net in ("f32", "f32e", "f64"):
            mm = model_for(m, net)
            with GammaFloat64(mm) if net == "f32e" else _Null(mm) as mod, torch.no_grad():
                g = torch.full((n,), g0, dtype=torch.float64)
                base = mod.drift(z, g)
                rel = [((mod.drift(z, g + v) - base).flatten(1).norm(dim=1)
                        / base.flatten(1).norm(dim=1)).max() for v in deltas]  # fmt: skip
            lines.append(f"| {g0:g} | {net} | " + " | ".join(f"{float(r):.1e}" for r in rel) + " |")
    return lines + [""]


def region_lines(
    fx: Fixture, ref: Tensor, edges: list[float], loose: float, tight: float, seed: int
) -> list[str]:
    """Where the error is made: dopri5 at ``loose`` on one gamma region and ``tight`` elsewhere
    (the solve restarts at the region's edges, 2 NFE each), one row per region."""
    s = fx.model.schedule
    bounds = [s.gamma_min, *edges, s.gamma_max]
    lines = [f"### where the error is made: dopri5, rtol = atol = {loose:g} on one region of "
             f"gamma, {tight:g} elsewhere ({len(fx.x)} images)", "",
             "| loose region | NFE / image | mean abs dbpd | max abs dbpd |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        r = solve(fx, Spec(tol=tight, inner=loose, region=(a, b)), seed)
        err = (r.bpd - ref[: len(fx.x)]).abs()
        lines.append(f"| [{a:.1f}, {b:.1f}] | {r.nfe.float().mean():.0f} | "
                     f"{err.mean():.4f} | {err.max():.4f} |")  # fmt: skip
        print(lines[-1], file=sys.stderr, flush=True)
    return lines + [""]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="digits", choices=train_models.MODELS)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rows", default=None, help="comma-separated specs (see the module doc)")
    p.add_argument("--ref", default=REF, help="specs: the reference, then its cross-checks")
    p.add_argument("--profile", default=None, help="a spec: evaluations over gamma per image")
    p.add_argument("--bins", type=int, default=9)
    p.add_argument("--noise", action="store_true", help="the drift's rounding noise in gamma")
    p.add_argument(
        "--regions",
        default=None,
        help="LOOSE,TIGHT:EDGE,EDGE,...: where the error is made (needs --ref)",
    )
    p.add_argument("--check", action="store_true",
                   help="solve each row's check (dopri5, float64 network, 100x tighter, as "
                        "idode.certify) for the check columns; without it they are filled "
                        "from the store where it holds them")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default=None,
                   help="JSON file of per-image results: solved rows are appended, rows and "
                        "references already in it are not solved again (several processes may "
                        "fill their own stores; --merge names more to read)")  # fmt: skip
    p.add_argument("--merge", default="", help="comma-separated stores to read as well")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _key(spec: Spec, images: int, seed: int) -> str:
    return f"{spec.label()}@{spec.tol_text()}|{images}|{seed}"


INPUTS_KEY = "_inputs"


class Store:
    """Per-image results by row, in JSON (bpd, nfe, local, wall), so a table can be re-rendered
    and rows solved by several processes."""

    def __init__(self, path: str | None, merge: str, inputs: str) -> None:
        self.path, self.inputs, self.data = path, inputs, {}
        self.own = self._read(path) if path and Path(path).exists() else {}
        for p in filter(None, merge.split(",")):
            if Path(p).exists():
                self.data.update(self._read(p))
        self.data.update(self.own)  # this run's own store wins over the merged ones

    def _read(self, path: str) -> dict:
        """A store's rows, refused when they were solved for other weights or other images."""
        data = json.loads(Path(path).read_text())
        made = data.pop(INPUTS_KEY, "not recorded (a store from before 2026-12-06)")
        if made != self.inputs:
            raise SystemExit(f"store {path} was solved with other inputs ({made}), not this "
                             f"run's ({self.inputs}): name a new --store")  # fmt: skip
        return data

    def has(self, fx: Fixture, spec: Spec, seed: int) -> bool:
        return _key(spec, len(fx.x), seed) in self.data

    def get(self, fx: Fixture, spec: Spec, seed: int) -> RowResult:
        key = _key(spec, len(fx.x), seed)
        if key not in self.data:
            r = solve(fx, spec, seed)
            assert r.rows == int(r.nfe.sum())  # continuous batching: no wasted row
            row = {"bpd": r.bpd.tolist(), "nfe": r.nfe.tolist(), "local": r.local.tolist(),
                   "wall": r.wall}  # fmt: skip
            self.data[key] = self.own[key] = row
            if self.path:
                write_json_atomic(self.path, {INPUTS_KEY: self.inputs, **self.own}, indent=None)
        row = self.data[key]
        f64 = torch.float64
        return RowResult(torch.tensor(row["bpd"], dtype=f64), torch.tensor(row["nfe"]),
                         torch.tensor(row["local"], dtype=f64), 0, row["wall"])  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    fx = fixture(args.model, args.images)
    cmd = "python benchmarks/work_precision.py " + " ".join(sys.argv[1:])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Work-precision: {args.model}", "", f"`{cmd}` ({now})", "",
             f"CPU ({platform.machine()}), torch {torch.__version__}, 1 thread; {fx.about}",
             ""]  # fmt: skip
    if args.noise:
        lines += noise_lines(fx, args.seed)
    if args.profile:
        lines += profile_lines(fx, Spec.parse(args.profile), args.seed, args.bins)
    store = Store(args.store, args.merge, fx.inputs)
    refs = [Spec.parse(t) for t in args.ref.split(",")] if args.ref else []
    results = {}
    for spec in refs:
        results[spec] = r = store.get(fx, spec, args.seed)
        print(f"  reference {spec.label()} @ {spec.tol:g}: {r.nfe.float().mean():.0f} "
              f"NFE/image, {r.wall:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    if args.regions and refs:
        tols, _, edges = args.regions.partition(":")
        loose, tight = (float(v) for v in tols.split(","))
        ref = results[refs[0]].bpd
        lines += region_lines(fx, ref, [float(e) for e in edges.split(",")], loose, tight,
                              args.seed)  # fmt: skip
    specs = [Spec.parse(t) for t in args.rows.split(",")] if args.rows else []
    if refs and specs:
        lines += reference_lines(refs, [results[s] for s in refs]) + HEADER
    for spec in specs:
        r = store.get(fx, spec, args.seed)
        c = spec.check_spec()
        check = (
            store.get(fx, c, args.seed)
            if c and (args.check or store.has(fx, c, args.seed))
            else None
        )
        if refs:
            lines.append(row_line(spec, r, results[refs[0]].bpd, check))
            print(lines[-1], f"({r.wall:.0f} s)", file=sys.stderr, flush=True)
            _save(args.out, lines)
    _save(args.out, lines)
    print("\n".join(lines))


def _save(out: str | None, lines: list[str]) -> None:
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
