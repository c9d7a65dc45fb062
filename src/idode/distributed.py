"""Processes and devices: torchrun's environment, the CPU/CUDA choice, collectives, progress bars.

One process per device; under ``torchrun`` the process group uses NCCL on GPUs and Gloo on CPUs.
Every loop (train, evaluate, sample) gets its device and rank from here, and only rank 0 shows a
progress bar (``IDODE_NO_PROGRESS=1`` hides it everywhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from idode.config import ConfigError
from idode.validation import check_device

__all__ = [
    "DistEnv",
    "all_gather",
    "available_memory",
    "bar_setter",
    "memory_line",
    "broadcast",
    "device_kind",
    "dist_env",
    "progress_bar",
    "resolve_device",
    "setup",
    "training_memory",
]


@dataclass
class DistEnv:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def device_kind(spec: str) -> str:
    """'cuda' or 'cpu': the kind of device a spec ('auto', 'cpu', 'cuda', 'cuda:N') asks for."""
    if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def dist_env(device_kind: str) -> DistEnv:
    """Read torchrun's environment and start the process group (NCCL on GPU, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return env


def resolve_device(spec: str, env: DistEnv, key: str = "train.device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device (cuda means this rank's local GPU)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(spec, key, error=ConfigError)
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={spec!r} but CUDA is not available; use cpu")
        if spec == "cuda":
            spec = f"cuda:{env.local_rank}"
        try:
            torch.cuda.set_device(torch.device(spec))
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"{key}={spec!r}: {e}") from None
    return torch.device(spec)


def setup(spec: str, key: str = "train.device") -> tuple[DistEnv, torch.device]:
    """This process's DistEnv (starting the process group under torchrun) and its device."""
    env = dist_env(device_kind(spec))
    return env, resolve_device(spec, env, key)


def broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; no-op in one process)."""
    if not env.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not env.distributed:
        return [obj]
    parts: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(parts, obj)
    return parts


def training_memory(model: torch.nn.Module, shape: tuple[int, ...], batch: int,
                    second_order: bool = False) -> int:  # fmt: skip
    """Rough bytes one training process holds for ``model`` (a DiffusionODE) at ``batch`` images.

    Weights, EMA, gradients and two Adam moments (5 copies), plus the activations kept for the
    backward pass: every leaf module's output for one image (measured by one forward), times the
    batch (x1.5 for the functional ops between modules), three times over with the second-order
    term's double backward. An evaluation row
    (forward + one VJP, no weight gradients) holds no more than a training image does.
    """
    leaves = [m for m in model.net.modules() if not any(True for _ in m.children())]
    sizes: list[int] = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in leaves]
    p = next(model.parameters())
    try:
        with torch.no_grad():
            z = torch.zeros(1, *shape, device=p.device, dtype=p.dtype)
            model.net(z, torch.zeros(1, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    # x1.5: autograd also keeps tensors of functional ops (activations, sums) no leaf returns
    return 5 * weights + int(1.5 * sum(sizes)) * batch * (3 if second_order else 1)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def available_memory() -> int | None:
    """Bytes of memory available to a new process (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_line(model, shape: tuple[int, ...], batch: int, second_order: bool, name: str) -> str:
    """'NAME: N parameters; training needs about X GB ...' (``training_memory``), with a warning
    when that is more than the model's device has available."""
    need = training_memory(model, shape, batch, second_order)
    n = sum(p.numel() for p in model.parameters())
    dev = next(model.parameters()).device
    gpu = dev.type == "cuda"
    avail = torch.cuda.mem_get_info(dev)[0] if gpu else available_memory()
    line = (
        f"[idode] {name}: {n / 1e6:.2f}M parameters; training needs about {_size(need)} "
        f"of {'GPU ' if gpu else ''}memory per process (batch {batch} of {list(shape)}; "
        f"evaluations during training use at most that batch)"
    )
    if avail is not None and need > avail:
        line += (
            f". idode: warning: that is more than the {_size(avail)} available: lower "
            f"train.batch_size (raise train.grad_accum) or use a *_cpu preset"
        )
    return line


def progress_bar(
    total: int,
    desc: str,
    *,
    env: DistEnv | None = None,
    initial: int = 0,
    enabled: bool = True,
    unit: str = "it",
    fractional: bool = False,
):
    """A tqdm bar on rank 0 (None elsewhere, when disabled, or with IDODE_NO_PROGRESS=1).

    ``fractional``: the count moves in fractions (``bar_setter``) and is shown rounded."""
    if not enabled or (env is not None and not env.is_main):
        return None
    if os.environ.get("IDODE_NO_PROGRESS") == "1":
        return None
    from tqdm.auto import tqdm

    fmt = None
    if fractional:
        fmt = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, bar_format=fmt
    )


def bar_setter(bar, start: float = 0.0, scale: int = 1):
    """``set(x)``: move ``bar`` (or nothing, for None) to ``start + scale * x``, never back.

    For progress measured as an amount done (fractional), not as increments."""

    def set_(x: float) -> None:
        if bar is None:
            return
        target = min(float(bar.total), start + scale * x)
        if target > bar.n:
            bar.update(target - bar.n)

    return set_
