"""Continuous batching of bits/dim: every (example, dequantization draw) is one solver job.

``iter_bits_per_dim`` keeps at most ``batch_size`` rows in each network call and gives a row to
the next job as soon as its solve ends (``solvers.solve_stream``), so a set of images costs the
sum of its jobs' own NFE instead of batches running until their slowest member finishes. It yields
examples as they finish (all K draws done), which lets ``idode.evaluate`` append per-example rows
while the pass runs.

Randomness: with one generator per example (``rng.example_generators``) an example's probe and
dequantization draws come from its own stream in the same order as when it is solved alone
(probe, then draw 0, 1, ...), so its result does not depend on the batch size, the order of the
other jobs, or the number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from idode.augmented import augmented_field, eval_mode, gaussian_log_prob, hutchinson_probes
from idode.dequantization import dequantization_bounds, dequantize
from idode.divergence import first_order_input_gradients
from idode.protocol import Protocol
from idode.rng import Generators
from idode.solvers import Jobs, SolverStats, nfe_of_steps, solve_stream

__all__ = ["ExampleBPD", "bpd_columns", "draw_jobs", "iter_bits_per_dim", "stack_examples"]


@dataclass
class ExampleBPD:
    """One finished example: per-draw terms [K] (float64, CPU) and its solver work."""

    index: int  # position in x_int
    log_p_model: Tensor  # [K] log p_ODE(z_k) at gamma_start, nats
    prior_logp: Tensor  # [K]
    delta_logp: Tensor  # [K]
    log_q: Tensor  # [K]
    log_decoder: Tensor  # [K]
    expected_log_q: float
    steps: Tensor  # [K] int64 solver steps per draw
    logp_error: Tensor  # [K] solver's error estimate of log p (sum of |local errors|), nats
    gamma_start: float  # where the ODE starts (set by the dequantization)

    @property
    def nfe(self) -> int:
        """Network evaluations this example needed, summed over its K draws."""
        return int(nfe_of_steps(self.steps).sum())


def stack_examples(examples: list[ExampleBPD], name: str) -> Tensor:
    """One per-draw field of several examples: [len(examples), K]."""
    return torch.stack([getattr(e, name) for e in examples])


# the old name of the one assembly of per-draw terms into bounds
bpd_columns = dequantization_bounds


class _JobSource:
    """Draws each job's probe and dequantization when it is admitted, in per-example order."""

    def __init__(
        self,
        model,
        x_int: Tensor,
        num_levels: int,
        protocol: Protocol,
        generator: Generators,
        example_major: bool,
        record: dict | None = None,
    ) -> None:
        n = x_int.shape[0]
        if isinstance(generator, Sequence) and len(generator) != n:
            raise ValueError(f"got {len(generator)} per-example generators for {n} examples")
        self.model, self.x, self.levels, self.kind = (
            model,
            x_int,
            num_levels,
            protocol.dequantization,
        )
        self.divergence, self.num_probes, self.gen = (
            protocol.divergence,
            protocol.num_probes,
            generator,
        )
        self.gamma_u, self.k = protocol.uniform_gamma_start, protocol.num_samples
        ex, dr = range(n), range(self.k)
        self.order = (
            [(i, k) for i in ex for k in dr] if example_major else [(i, k) for k in dr for i in ex]
        )
        self.pos = 0
        self.probes: dict[int, Tensor] = {}
        self.meta: dict[tuple[int, int], tuple[float, float]] = {}
        self.expected_log_q: dict[int, float] = {}
        self.gamma_start: float | None = None
        self.record = record  # (example, draw) -> its Jobs row, for the keys it holds

    def _gens(self, idx: list[int]) -> Generators:
        return [self.gen[i] for i in idx] if isinstance(self.gen, Sequence) else self.gen

    def __call__(self, m: int) -> Jobs | None:
        keys = self.order[self.pos : self.pos + m]
        if not keys:
            return None
        self.pos += len(keys)
        idx = [i for i, _ in keys]
        shape, dev = tuple(self.x.shape[1:]), self.x.device
        new = [i for i, k in keys if k == 0]
        if self.divergence != "exact" and new:  # an example's probe: its first draw
            u = hutchinson_probes(
                self.num_probes, (len(new), *shape), self.divergence, self._gens(new), dev
            )
            u = u.transpose(0, 1) if self.num_probes > 1 else u
            self.probes.update(zip(new, u, strict=True))
        x = self.x[torch.tensor(idx, device=dev)]
        dq = dequantize(
            self.kind,
            x,
            self.levels,
            self.model.schedule,
            generator=self._gens(idx),
            uniform_gamma_start=self.gamma_u,
        )
        self.gamma_start = dq.gamma_start
        lq, dec, elq = (v.tolist() for v in (dq.log_q, dq.log_decoder, dq.expected_log_q))
        for j, key in enumerate(keys):
            self.meta[key] = (lq[j], dec[j])
            self.expected_log_q[key[0]] = elq[j]
        y0 = torch.cat([dq.z.flatten(1), dq.z.new_zeros(len(keys), 1)], 1)
        t0 = torch.full((len(keys),), dq.gamma_start, dtype=torch.float64, device=dev)
        t1 = torch.full_like(t0, self.model.schedule.gamma_max)
        aux = None
        if self.divergence != "exact":
            aux = torch.stack([self.probes[i] for i in idx])
            for i, k in keys:
                if k == self.k - 1:
                    del self.probes[i]  # its last draw: the probe is no longer needed
        jobs = Jobs(list(keys), y0, t0, t1, aux)
        if self.record:
            _record(self.record, jobs)
        return jobs


def _record(record: dict, jobs: Jobs) -> None:
    """Store the start (one-row ``Jobs``) of each job whose key ``record`` holds."""
    for j, key in enumerate(jobs.keys):
        if key in record:
            aux = None if jobs.aux is None else jobs.aux[j : j + 1].clone()
            row = slice(j, j + 1)
            record[key] = Jobs([key], jobs.y0[row].clone(), jobs.t0[row], jobs.t1[row], aux)


def draw_jobs(
    model, x_int: Tensor, num_levels: int, protocol: Protocol, *, generator: Generators = None
) -> Jobs:
    """The starts of all N * K jobs of x_int [N, ...] under ``protocol``, example by example,
    without solving. With one generator per example (in their state before an evaluation)
    these are exactly the jobs ``iter_bits_per_dim`` solved."""
    source = _JobSource(model, x_int, num_levels, protocol, generator, example_major=True)
    return source(x_int.shape[0] * protocol.num_samples)


def iter_bits_per_dim(
    model,
    x_int: Tensor,
    num_levels: int,
    protocol: Protocol,
    *,
    batch_size: int | None = None,
    generator: Generators = None,
    net_kwargs: dict | None = None,
    stats: SolverStats | None = None,
    progress: Callable[[float], None] | None = None,
    record: dict | None = None,
) -> Iterator[list[ExampleBPD]]:
    """Yield groups of finished examples of x_int [N, ...] (validated by the caller).

    ``protocol``: the dequantization, K draws, divergence and tolerances of every job.
    ``batch_size``: at most this many rows per network call, refilled as rows finish, the jobs
    taken example by example; None: N rows, the jobs taken draw by draw (all first draws, then
    all second draws, ...), like solving the K draws one after the other. ``progress(e)`` is
    told, at most twice a second, how many examples' worth of work is done (``_Progress``).
    ``record``: a dict whose keys are (example, draw) jobs; each gets that job's start (a one-row
    ``Jobs``), so it can be solved again with the same noise and probe (``idode.certify``).
    """
    n, shape, d = x_int.shape[0], tuple(x_int.shape[1:]), x_int[0].numel()
    tols = protocol.solver_options(d)
    source = _JobSource(
        model, x_int, num_levels, protocol, generator, batch_size is not None, record
    )
    num_samples = protocol.num_samples
    field_ = augmented_field(model, protocol.divergence, shape, net_kwargs)
    meter = _Progress(progress, num_samples, source, model.schedule.gamma_max)
    var = model.schedule.sigma2_max
    parts: dict[int, dict[int, tuple]] = {}
    with eval_mode(model), torch.no_grad(), first_order_input_gradients():
        rows = batch_size or n
        for done in solve_stream(meter.wrap(field_), source, batch_size=rows, stats=stats, **tols):
            meter.finished += len(done.keys)
            z_end = done.y[:, :d].reshape(len(done.keys), *shape)
            prior = gaussian_log_prob(z_end, var).cpu()
            delta, steps = done.y[:, d].cpu(), done.steps.cpu()
            err = done.last_error.cpu()
            for j, (i, k) in enumerate(done.keys):
                parts.setdefault(i, {})[k] = (prior[j], delta[j], steps[j], err[j])
            finished = sorted({i for i, _ in done.keys if len(parts[i]) == num_samples})
            if finished:
                yield [_example(i, parts.pop(i), source) for i in finished]


class _Progress:
    """Examples' worth of work done: finished jobs plus each running row's share of its solve,
    (gamma - gamma_start) / (gamma_max - gamma_start), over K jobs per example. Read from the
    gammas the field is called at, at most every ``every`` seconds (one host read each)."""

    every = 0.5  # seconds between reports

    def __init__(self, report, k: int, source: _JobSource, gamma_max: float) -> None:
        self.report, self.k, self.source, self.gamma_max = report, k, source, float(gamma_max)
        self.last, self.finished = time.monotonic(), 0

    def wrap(self, field_):
        if self.report is None:
            return field_

        def observed(t: Tensor, *args):
            now = time.monotonic()
            if now - self.last >= self.every:
                self.last = now
                g0 = float(self.source.gamma_start)
                share = ((t.double() - g0) / (self.gamma_max - g0)).clamp(0.0, 1.0).sum()
                self.report((self.finished + float(share)) / self.k)
            return field_(t, *args)

        return observed


def _example(i: int, draws: dict[int, tuple], source: _JobSource) -> ExampleBPD:
    k = len(draws)
    prior, delta, steps, err = (torch.stack([draws[j][c] for j in range(k)]) for c in range(4))
    meta = [source.meta.pop((i, j)) for j in range(k)]
    lq, dec = (torch.tensor([m[c] for m in meta], dtype=torch.float64) for c in range(2))
    elq = source.expected_log_q.pop(i)
    return ExampleBPD(
        i, prior + delta, prior, delta, lq, dec, elq, steps, err, float(source.gamma_start)
    )
