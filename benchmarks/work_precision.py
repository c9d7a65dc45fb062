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
  float32 after), ``f64`` (the whole network in float64).

The reference (``--ref``) is the network in float64 solved with vern6 at a tight tolerance,
cross-checked by dopri5 (paper protocol, 1e-9); the table states how far they are apart per image.

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
from idode.protocol import solver_tolerances  # noqa: E402
from idode.rng import example_generators  # noqa: E402
from idode.solvers import SolverStats, nfe_of_steps, solve_stream  # noqa: E402

TARGET = 0.002  # bits/dim per image
REF = "vern6/gamma/i/rms/logp/f64@1e-8,dopri5/gamma/i/rms/paper/f64@1e-9"


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

    @staticmethod
    def parse(text: str) -> Spec:
        body, _, tol = text.partition("@")
        parts = body.split("/")
        keys = ("method", "variable", "controller", "norm", "protocol", "net")
        return Spec(**dict(zip(keys, parts, strict=False)), tol=float(tol or 1e-5))

    def label(self) -> str:
        return "/".join((self.method, self.variable, self.controller, self.norm, self.protocol,
                         self.net))  # fmt: skip


@dataclass
class RowResult:
    bpd: Tensor  # [N] float64
    nfe: Tensor  # [N] int64
    local: Tensor  # [N] sum |local error of l|, bits/dim
    rows: int
    wall: float
    evals: list | None = None  # per call: (s [b], keys) when profiling


def solve(fx, spec: Spec, seed: int, record: bool = False) -> RowResult:
    """bpd of every image of the fixture under one row's solver settings (K = 1 draw)."""
    model = model_for(fx.model, spec.net)
    n, shape, d = fx.x.shape[0], tuple(fx.x.shape[1:]), fx.x[0].numel()
    source = _JobSource(model, fx.x, fx.levels, "truncated_normal", 1, "rademacher", 1,
                        example_generators(seed, range(n)), 0.0, True)  # fmt: skip
    tols = solver_tolerances(spec.protocol, spec.tol, spec.tol, None, d)
    maps = time_maps(spec.variable, model.schedule)
    s_of = maps[0]

    def take(m):
        jobs = source(m)
        if jobs is not None:
            jobs.t0, jobs.t1 = s_of(jobs.t0), s_of(jobs.t1)
        return jobs

    stats = SolverStats()
    out: dict[int, tuple] = {}
    evals = [] if record else None
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

        for done in solve_stream(field, take, batch_size=n, stats=stats, method=spec.method,
                                 controller=spec.controller, norm=spec.norm, **tols):  # fmt: skip
            z_end = done.y[:, :d].reshape(len(done.keys), *shape)
            prior = gaussian_log_prob(z_end, m.schedule.sigma2_max)
            for j, (i, _) in enumerate(done.keys):
                out[i] = (float(prior[j] + done.y[j, d]), int(done.steps[j]),
                          float(done.last_error[j]))  # fmt: skip
    wall = time.perf_counter() - t0
    logp = torch.tensor([[out[i][0]] for i in range(n)], dtype=torch.float64)
    meta = [source.meta[(i, 0)] for i in range(n)]
    lq = torch.tensor([[a] for a, _ in meta], dtype=torch.float64)
    dec = torch.tensor([[b] for _, b in meta], dtype=torch.float64)
    elq = torch.tensor([source.expected_log_q[i] for i in range(n)], dtype=torch.float64)
    bpd = bpd_columns(logp, dec, lq, elq, d)["bpd_mean_of_bounds"]
    steps = torch.tensor([out[i][1] for i in range(n)])
    local = torch.tensor([out[i][2] for i in range(n)], dtype=torch.float64) / (d * math.log(2))
    return RowResult(bpd, nfe_of_steps(steps, spec.method), local, stats.rows, wall, evals)


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
    return Fixture(name, model, x, ds.num_levels, about)


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
    "mean abs dbpd | max abs dbpd | within 0.002 | local estimate (mean, bits/dim) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def row_line(spec: Spec, r: RowResult, ref: Tensor) -> str:
    err = (r.bpd - ref).abs()
    ok = int((err <= TARGET).sum())
    nfe = f"{r.nfe.float().mean():.0f} | {int(r.nfe.max())}"
    return (f"| {spec.label()} | {spec.tol:g} | {nfe} | {err.mean():.4f} | {err.max():.4f} "
            f"| {ok}/{len(err)} | {r.local.mean():.4f} |")  # fmt: skip


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
    (the solve restarts at each region edge, 2 NFE each), one row per region."""
    from idode.solvers import Jobs

    m, n, shape, d = fx.model, len(fx.x), tuple(fx.x.shape[1:]), fx.x[0].numel()
    s = m.schedule
    bounds = [s.gamma_min, *edges, s.gamma_max]
    lines = [f"### where the error is made: dopri5, rtol = atol = {loose:g} on one region of "
             f"gamma, {tight:g} elsewhere ({n} images)", "",
             "| loose region | NFE / image | mean abs dbpd | max abs dbpd |",
             "|---|---:|---:|---:|"]  # fmt: skip
    field = augmented_field(m, "rademacher", shape)
    for r in range(len(bounds) - 1):
        src = _JobSource(m, fx.x, fx.levels, "truncated_normal", 1, "rademacher", 1,
                         example_generators(seed, range(n)), 0.0, True)  # fmt: skip
        jobs = src(n)
        y, nfe = jobs.y0, torch.zeros(n, dtype=torch.long)
        with torch.no_grad(), first_order_input_gradients():
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                tol = loose if i == r else tight
                t_a, t_b = (torch.full((n,), v, dtype=torch.float64) for v in (a, b))
                pend = [Jobs(list(range(n)), y, t_a, t_b, jobs.aux)]
                out = y.clone()
                for done in solve_stream(field, lambda k, p=pend: p.pop() if p else None,
                                         batch_size=n, rtol=tol, atol=tol):  # fmt: skip
                    idx = torch.tensor(done.keys)
                    out[idx], nfe[idx] = done.y, nfe[idx] + nfe_of_steps(done.steps)
                y = out
        prior = gaussian_log_prob(y[:, :d].reshape(n, *shape), s.sigma2_max)
        meta = [src.meta[(i, 0)] for i in range(n)]
        cols = bpd_columns(
            (prior + y[:, d])[:, None],
            torch.tensor([[b] for _, b in meta], dtype=torch.float64),
            torch.tensor([[a] for a, _ in meta], dtype=torch.float64),
            torch.tensor([src.expected_log_q[i] for i in range(n)], dtype=torch.float64),
            d,
        )
        err = (cols["bpd_mean_of_bounds"] - ref[:n]).abs()
        lines.append(f"| [{bounds[r]:.1f}, {bounds[r + 1]:.1f}] | {nfe.float().mean():.0f} | "
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default=None,
                   help="JSON file of per-image results: solved rows are appended, rows and "
                        "references already in it are not solved again (several processes may "
                        "fill their own stores; --merge names more to read)")  # fmt: skip
    p.add_argument("--merge", default="", help="comma-separated stores to read as well")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _key(spec: Spec, images: int, seed: int) -> str:
    return f"{spec.label()}@{spec.tol:g}|{images}|{seed}"


class Store:
    """Per-image results by row, in JSON (bpd, nfe, local, wall), so a table can be re-rendered
    and rows solved by several processes."""

    def __init__(self, path: str | None, merge: str) -> None:
        self.path, self.data = path, {}
        for p in [*filter(None, merge.split(",")), path]:
            if p and Path(p).exists():
                self.data.update(json.loads(Path(p).read_text()))
        self.own = json.loads(Path(path).read_text()) if path and Path(path).exists() else {}

    def get(self, fx: Fixture, spec: Spec, seed: int) -> RowResult:
        key = _key(spec, len(fx.x), seed)
        if key not in self.data:
            r = solve(fx, spec, seed)
            assert r.rows == int(r.nfe.sum())  # continuous batching: no wasted row
            row = {"bpd": r.bpd.tolist(), "nfe": r.nfe.tolist(), "local": r.local.tolist(),
                   "wall": r.wall}  # fmt: skip
            self.data[key] = self.own[key] = row
            if self.path:
                Path(self.path).write_text(json.dumps(self.own))
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
    store = Store(args.store, args.merge)
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
        if refs:
            lines.append(row_line(spec, r, results[refs[0]].bpd))
            print(lines[-1], f"({r.wall:.0f} s)", file=sys.stderr, flush=True)
            _save(args.out, lines)
    _save(args.out, lines)
    print("\n".join(lines))


def _save(out: str | None, lines: list[str]) -> None:
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
