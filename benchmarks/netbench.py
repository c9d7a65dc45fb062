"""Measurements shared by ``compile_precision.py`` (the CPU record) and ``gpu_suite.py``.

Every timing synchronises the device around the timed call; the first call (which compiles,
when the network is compiled) is reported apart from the median of the rest.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

import idode
from idode.augmented import augmented_field, eval_mode
from idode.config import Config, apply_overrides
from idode.dequantization import bin_centers, nats_to_bits_per_dim
from idode.divergence import first_order_input_gradients
from idode.losses import diffusion_loss_terms
from idode.model import build_model
from idode.nets import count_parameters
from idode.nets.unet import lecun_normal_
from idode.presets import get_preset
from idode.rng import example_generators


class Stopped(Exception):
    """A measurement that ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``Stopped`` in the main thread after ``seconds`` (<= 0: no limit)."""
    if seconds <= 0:
        yield
        return

    def stop(*_):
        raise Stopped

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``reps`` further calls)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) if times else first


def redraw_zero_layers_(model: idode.DiffusionODE, out_scale: float = 0.3, seed: int = 0):
    """A fresh ScoreUNet is z -> z (VDM zero-inits); re-draw those layers so it is a real field.

    As ``benchmarks/likelihood.py``: LeCun-normal, the output convolution scaled by out_scale.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.net.modules():
            w = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not w.any():
                lecun_normal_(w)
        if hasattr(model.net, "conv_out"):
            model.net.conv_out.weight.mul_(out_scale)
    return model


@dataclass
class NetSpec:
    """A network to time: a preset's model, possibly shrunk, on data of a shape."""

    name: str
    preset: str
    shape: tuple[int, int, int]
    num_levels: int
    overrides: tuple[str, ...] = ()

    def config(self, **model_settings) -> Config:
        sets = list(self.overrides) + [f"model.{k}={v}" for k, v in model_settings.items()]
        return apply_overrides(get_preset(self.preset), sets)

    def build(self, device: torch.device, **model_settings) -> idode.DiffusionODE:
        torch.manual_seed(0)
        model = build_model(self.config(**model_settings), self.shape, self.num_levels)
        return redraw_zero_layers_(model).to(device)

    def params(self) -> int:
        return count_parameters(build_model(self.config(), self.shape, self.num_levels).net)


def field_inputs(shape, batch: int, device: torch.device, seed: int = 0):
    """(t [B], y [B, d + 1], probes [B, ...]): likelihood-like rows, z in [-1, 1], gamma spread."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(batch, *shape, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.linspace(-13.0, 4.0, batch, dtype=torch.float64)
    u = (torch.randint(0, 2, (batch, *shape), generator=g) * 2 - 1).double()
    y = torch.cat([z.flatten(1), torch.zeros(batch, 1, dtype=torch.float64)], 1)
    return t.to(device), y.to(device), u.to(device)


def forward_vjp(model: idode.DiffusionODE, shape, batch: int, device, reps: int):
    """(first call s, median s) of one likelihood field call: forward + VJP on ``batch`` rows."""
    field = augmented_field(model, "rademacher", tuple(shape))
    t, y, u = field_inputs(shape, batch, device)
    with eval_mode(model), torch.no_grad(), first_order_input_gradients():
        return timed(lambda: field(t, y, u), reps, device)


def field_output(model: idode.DiffusionODE, shape, batch: int, device) -> Tensor:
    field = augmented_field(model, "rademacher", tuple(shape))
    t, y, u = field_inputs(shape, batch, device)
    with eval_mode(model), torch.no_grad(), first_order_input_gradients():
        return field(t, y, u).cpu()


def train_step(
    model: idode.DiffusionODE, shape, batch: int, device, reps: int, second_order: float = 0.0
):
    """(first call s, median s) of one AdamW step of the i-DODE loss on ``batch`` images."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen = torch.Generator(device=device).manual_seed(0)
    x_int = torch.randint(0, 256, (batch, *shape), generator=gen, device=device)
    x = bin_centers(x_int, 256, validate=False)
    d = math.prod(shape)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with model.precision_scope(device, autocast=False):
            terms = diffusion_loss_terms(
                model, x, second_order_weight=second_order, generator=gen, validate=False
            )
            loss = nats_to_bits_per_dim(terms.loss.float().mean(), d)
            loss.backward()
        opt.step()

    out = timed(step, reps, device)
    model.eval()
    return out


def bpd_per_image(
    model: idode.DiffusionODE, x_int: Tensor, num_levels: int, ev, batch: int, seed: int = 0
):
    """(bits/dim [N], NFE per image [N]) under the eval protocol ``ev``, per-image noise/probes."""
    dev = next(model.parameters()).device
    gens = example_generators(seed, list(range(len(x_int))), dev, purpose="dequantization")
    res = idode.bits_per_dim(
        model,
        x_int.to(dev),
        num_levels,
        ev.dequantization,
        ev.num_samples,
        ev.divergence,
        ev.rtol,
        ev.atol,
        tolerance=ev.tolerance,
        logp_atol=ev.logp_atol,
        batch_size=batch,
        generator=gens,
    )
    return res.bpd.double().cpu(), res.nfe_per_example.double().cpu()


def with_protocol(ev, **kw):
    return replace(ev, **kw)


def _saved_bytes(model: idode.DiffusionODE, shape, rows: int, device) -> int:
    """Bytes of the distinct tensors autograd saves for the VJP of ``rows`` rows."""
    seen: set[tuple[int, int]] = set()

    def pack(t: Tensor):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen.add(key)
        return t

    t, y, _ = field_inputs(shape, rows, device)
    z = y[:, :-1].reshape(rows, *shape).float().requires_grad_(True)
    with eval_mode(model), first_order_input_gradients(), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with model.precision_scope(device):
                model.net(z, t.float())
    return sum(n for _, n in seen)


def activation_bytes_per_row(model: idode.DiffusionODE, shape, device) -> int:
    """Bytes autograd keeps per row for the VJP: saved tensors of 2 rows minus those of 1.

    The difference drops what does not grow with the batch (weights, autocast's weight copies).
    """
    return _saved_bytes(model, shape, 2, device) - _saved_bytes(model, shape, 1, device)


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"
