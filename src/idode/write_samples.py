"""ODE samples of a checkpoint to disk (an .npz of integer images and a PNG grid).

Sample i starts from noise drawn from its own generator (``example_generators(seed, [i])``), so
a sample does not depend on the batch size it was drawn with.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from idode.rundir import atomic_path
from idode.validation import InputError, check_rtol

__all__ = ["sample_to_files", "save_image_grid"]


def sample_to_files(
    checkpoint: str | os.PathLike,
    out_prefix: str | os.PathLike | None = None,
    num_samples: int = 64,
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int = 64,
    device: str = "auto",
    ema: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Draw ``num_samples`` ODE samples; write ``{out_prefix}.npz`` and ``{out_prefix}.png``.

    The npz holds ``samples`` [N, C, H, W] (uint8, or int32 for more than 256 levels),
    ``num_levels``, ``nfe`` (total batched network evaluations) and the settings that define the
    samples (``seed``, ``rtol``, ``atol``, ``step``); the PNG shows the first 256. Existing files
    are refused unless ``overwrite`` (the default prefix names the seed). Returns the paths, the
    NFE and the wall time.
    """
    from idode.checkpoint import CheckpointError, load_model
    from idode.distributed import DistEnv, resolve_device

    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_rtol(rtol, warn_biased=False)
    tic = time.perf_counter()
    dev = resolve_device(device, DistEnv(), key="--device")
    model, ck = load_model(checkpoint, ema=ema, device=dev)
    extra = ck.meta.get("extra", {})
    if "data_shape" not in extra or "num_levels" not in extra:
        raise CheckpointError(f"checkpoint {ck.path} does not record data_shape and num_levels")
    shape, num_levels = tuple(int(s) for s in extra["data_shape"]), int(extra["num_levels"])
    dtype = np.uint8 if num_levels <= 256 else np.int32
    _check_memory(num_samples, shape, dtype)
    # by default in the run folder, never inside a checkpoint folder that cleanup deletes
    prefix = Path(out_prefix) if out_prefix is not None else default_sample_prefix(ck, seed)
    npz_path = prefix.with_name(prefix.name + ".npz")
    png_path = prefix.with_name(prefix.name + ".png")
    taken = [p for p in (npz_path, png_path) if p.exists()]
    if taken and not overwrite:
        raise InputError(
            f"{taken[0]} already exists (earlier samples); choose another --out PREFIX, or "
            f"--overwrite to replace them"
        )
    samples, nfe_per_batch = _draw(
        model, num_samples, shape, num_levels, seed, rtol, atol, batch_size, dev, progress
    )
    nfe = int(sum(nfe_per_batch))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(npz_path) as tmp:
        np.savez_compressed(
            tmp,
            samples=samples,
            num_levels=np.int64(num_levels),
            nfe=np.int64(nfe),
            nfe_per_batch=np.asarray(nfe_per_batch, dtype=np.int64),
            seed=np.int64(seed),
            rtol=np.float64(rtol),
            atol=np.float64(atol),
            step=np.int64(ck.step),
        )
    title = f"ODE samples, step {ck.step}, seed {seed} ({nfe} NFE)"
    save_image_grid(samples[:256], num_levels, png_path, title=title)
    return {
        "npz": npz_path,
        "png": png_path,
        "num_samples": num_samples,
        "nfe": nfe,
        "nfe_per_batch": nfe_per_batch,
        "checkpoint": ck.path,
        "step": ck.step,
        "seed": seed,
        "seconds": time.perf_counter() - tic,
    }


def _draw(model, n, shape, num_levels, seed, rtol, atol, batch_size, device, progress):
    """n ODE samples [n, *shape] as integers (uint8, or int32 over 256 levels) in batches, each
    sample from its own generator, kept small as they come (-n can be large); and the NFE of
    each batch."""
    from idode.distributed import progress_bar
    from idode.ode_sampling import ode_sample
    from idode.rng import example_generators

    dtype = np.uint8 if num_levels <= 256 else np.int32
    bar = progress_bar(n, "sample", enabled=progress, unit="img")
    parts, nfe_per_batch = [], []
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            res = ode_sample(
                model,
                len(idx),
                shape,
                num_levels=num_levels,
                rtol=rtol,
                atol=atol,
                generator=example_generators(seed, idx, device, purpose="sample"),
                device=device,
            )
            parts.append(res.samples.cpu().numpy().astype(dtype))
            nfe_per_batch.append(res.nfe)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(parts), nfe_per_batch


def default_sample_prefix(ck, seed: int = 0) -> Path:
    """RUN/samples/step_N_seedS (files .npz and .png) for a loaded checkpoint and a seed."""
    from idode.checkpoint import run_folder

    return run_folder(ck.path) / "samples" / f"step_{ck.step:08d}_seed{seed}"


def _check_memory(num_samples: int, shape: tuple[int, ...], dtype) -> None:
    """One line before anything runs if the samples cannot fit in the memory available."""
    from idode.distributed import available_memory

    need = num_samples * math.prod(shape) * np.dtype(dtype).itemsize
    free = available_memory()
    if free is not None and need > free // 2:  # None: unknown on this platform, no check
        raise InputError(
            f"-n {num_samples} samples of {list(shape)} need {need / 1e9:.1f} GB of memory, more "
            f"than half of the {free / 1e9:.1f} GB available; draw fewer, in several runs with "
            f"different --seed values"
        )


def save_image_grid(
    images_int: np.ndarray | Tensor,
    num_levels: int,
    path: str | os.PathLike,
    nrow: int | None = None,
    title: str | None = None,
) -> Path:
    """Integer images [N, C, H, W] (C = 1 or 3; or [N, H, W]) in [0, L) as one PNG grid.

    Level k is shown as k / (L - 1) in [0, 1], grey for one channel, RGB for three; ``nrow``
    images per row (default ceil(sqrt(N))), one pixel of white between images.
    """
    from matplotlib.figure import Figure

    x = images_int.detach().cpu().numpy() if isinstance(images_int, Tensor) else images_int
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(
            f"images must be [N, C, H, W] with C in (1, 3) and N >= 1, got shape {x.shape}"
        )
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    n, c, h, w = x.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    pad = 1
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.float64)
    vals = np.clip(x.astype(np.float64) / (num_levels - 1), 0.0, 1.0).transpose(0, 2, 3, 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = vals[i]
    # small images (8x8 digits) get an integer number of screen pixels per image pixel
    scale = max(1, math.ceil(256 / max(grid.shape[:2])))
    gh, gw = grid.shape[0] * scale / 100, grid.shape[1] * scale / 100
    fig = Figure(figsize=(max(gw, 1.0), max(gh, 1.0) + (0.35 if title else 0.0)), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, gh / (gh + (0.35 if title else 0.0))))
    if c == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, y=0.99)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path
