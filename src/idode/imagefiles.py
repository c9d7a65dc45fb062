"""Readers of the image file formats on disk, as validated integer numpy arrays.

The dataset logic (splits, sources, ``ImageDataset``) is in ``idode.data``; this module knows the
bytes: MNIST IDX, CIFAR-10 python batches, the header of an npz entry and its image layouts, and
folders of PNG / JPEG / WebP / BMP files (read with Pillow).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from idode.validation import DatasetError

__all__ = [
    "IMAGE_SUFFIXES",
    "image_files",
    "npz_header",
    "npz_images",
    "npz_num_levels",
    "read_cifar_batch",
    "read_idx_images",
    "read_image_folder",
]


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 ubyte image file (magic 2051) as uint8 [N, 1, rows, cols], validated."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # truncated gzip: EOFError; bad gzip: OSError
        raise DatasetError(f"MNIST file {path} is corrupt or truncated: {e}") from e
    if len(raw) < 16:
        raise DatasetError(
            f"MNIST file {path} is truncated: {len(raw)} bytes, shorter than the header"
        )
    magic, n, rows, cols = struct.unpack(">iiii", raw[:16])
    if magic != 2051:
        raise DatasetError(
            f"MNIST file {path} is not an IDX image file: magic number {magic}, expected 2051 "
            f"(unsigned bytes, 3 dimensions){'; this is a label file' if magic == 2049 else ''}"
        )
    expected = 16 + n * rows * cols
    if n <= 0 or rows <= 0 or cols <= 0 or len(raw) != expected:
        raise DatasetError(
            f"MNIST file {path} is truncated or corrupt: its header says {n} images of "
            f"{rows}x{cols} ({expected} bytes), the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, rows, cols).copy()


class _RefusedPickle(pickle.UnpicklingError):
    """A pickle that names something a CIFAR-10 batch never holds (a class, a function)."""


def _dtype(spec: object, *args: object) -> np.dtype:
    if spec not in _CIFAR_DTYPES:  # never 'O': an object array would hold arbitrary objects
        raise _RefusedPickle(f"an array of dtype {spec!r}")
    return np.dtype(spec)


def _latin1(text: object, encoding: object = "latin1") -> bytes:
    # how a Python 3 pickle of protocol <= 2 spells bytes: _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding != "latin1":
        raise _RefusedPickle("_codecs.encode of something other than a latin-1 string")
    return text.encode("latin1")


_CIFAR_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "<i4", "<i8")
# the only names a CIFAR-10 batch pickle refers to: numpy's array reconstruction (protocols <= 4
# and 5; numpy 1 and 2 spell its module differently) and the bytes spelling above
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy.core.numeric", "_frombuffer"): np.ndarray.__reduce_ex__(np.zeros(1), 5)[0],
    ("numpy._core.numeric", "_frombuffer"): np.ndarray.__reduce_ex__(np.zeros(1), 5)[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, bytes, numbers and integer numpy arrays: a
    crafted batch file cannot run code (``pickle.load`` would call whatever the file names)."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedPickle(f"{module}.{name}")
        return found

    def persistent_load(self, pid: object) -> object:
        raise _RefusedPickle("a persistent id")


def read_cifar_batch(path: Path, hint: str) -> np.ndarray:
    """One CIFAR-10 python batch file as uint8 [n, 3, 32, 32]; ``hint`` ends every error.

    Read with ``_CifarUnpickler``: a dict of bytes keys, one uint8 array, lists of ints and
    bytes, nothing else (a file naming any other class or function is refused, unexecuted).
    """
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()  # the official python-2 pickles
    except _RefusedPickle as e:
        raise DatasetError(
            f"{path} is not a CIFAR-10 python batch: it asks to build {e}, which a CIFAR-10 "
            f"batch never holds (refused unexecuted: no code runs from a data file); replace it "
            f"with the file from the official cifar-10-python.tar.gz"
        ) from None
    except Exception as e:  # a damaged pickle can fail in many ways; all mean the same here
        msg = f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
        raise DatasetError(msg + hint) from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(
            f"{path} is not a CIFAR-10 python batch (no uint8 b'data' [n, 3072]); " + hint
        )
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: b'data' has shape {data.shape}, expected [n, 3072]")
    return data.reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024), row-major


def npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz, reading only its header (no decompression)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    return shape, dtype


def npz_num_levels(nl: np.ndarray, path: Path) -> int:
    if nl.ndim != 0 or not np.issubdtype(nl.dtype, np.integer) or int(nl) < 2:
        raise DatasetError(
            f"{path}['num_levels'] must be a scalar integer >= 2 (e.g. np.int64(256)), got {nl!r}"
        )
    return int(nl)


def npz_images(x: np.ndarray, num_levels: int, name: str) -> tuple[np.ndarray, str]:
    """One split's array of an npz checked and laid out [N, C, H, W]; and its layout name."""
    if not np.issubdtype(x.dtype, np.integer):
        fix = f"convert with np.round(x * {num_levels - 1}).astype(np.uint8) if it holds [0, 1]"
        raise DatasetError(
            f"{name} has dtype {x.dtype}; it must hold integer grey levels (uint8 0..255), not "
            f"{'booleans' if x.dtype == np.bool_ else 'scaled values'}: {fix}"
        )
    if x.ndim == 3:
        layout, x = "NHW", x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        layout, x = "NHWC", x.transpose(0, 3, 1, 2)
    elif x.ndim == 4:
        layout = "NCHW"
    else:
        raise DatasetError(
            f"{name} has shape {x.shape} ({x.ndim} dimensions); images must be [N, H, W], "
            f"[N, C, H, W] or [N, H, W, C]: reshape, e.g. x.reshape(N, H, W) for flat rows"
        )
    if x.size == 0:
        raise DatasetError(f"{name} is empty (shape {x.shape}); store at least one image")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0:
        raise DatasetError(
            f"{name} has negative values (min {lo}); grey levels run from 0 to num_levels - 1: "
            f"shift them, e.g. x - x.min()"
        )
    if hi >= num_levels:
        raise DatasetError(
            f"{name} has values up to {hi} but num_levels={num_levels} allows 0..{num_levels - 1}; "
            f"store the number of levels in the file: np.savez(..., num_levels={hi + 1})"
        )
    x = np.ascontiguousarray(x, dtype=np.uint8 if num_levels <= 256 else np.int32)
    return x, layout


# --------------------------------------------------------------------------------------------------
# folders of image files
# --------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Pillow modes read as they are (L grey, RGB) or converted without loss: palette images to RGB
# (their colours), 1-bit images to L (0 / 255), and an alpha channel that is opaque everywhere
# dropped. Anything else (transparency, 16-bit, CMYK) is refused.
_MODES = {"L": "L", "RGB": "RGB", "P": "RGB", "1": "L", "LA": "L", "RGBA": "RGB"}
_FIX_MODE = "convert it, e.g. Image.open(f).convert('RGB').save(f) (or 'L' for grey)"


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (suffixes IMAGE_SUFFIXES, any case), sorted by
    name; hidden files are skipped."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 [C, H, W] (C = 1 grey or 3 RGB), never resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = _MODES.get(im.mode)
            if mode is None:
                raise DatasetError(
                    f"image {path} has Pillow mode {im.mode!r} (alpha, 16-bit or another colour "
                    f"space); images must be 8-bit grey (L) or RGB: {_FIX_MODE}"
                )
            if im.mode in ("LA", "RGBA") and im.getchannel("A").getextrema() != (255, 255):
                raise DatasetError(
                    f"image {path} is transparent in places (mode {im.mode}); images must be "
                    f"opaque 8-bit grey (L) or RGB: {_FIX_MODE}"
                )
            im = im.convert(mode) if im.mode != mode else im
            x = np.asarray(im, dtype=np.uint8)  # decodes the whole file
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports a damaged file as any of these, depending on the format and the damage
        raise DatasetError(
            f"image {path} is corrupt or not an image ({type(e).__name__}: {e}); "
            f"replace it or remove it from the folder"
        ) from e
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def _describe(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    return f"{'grey' if c == 1 else 'RGB'} {w}x{h} (width x height)"


def read_image_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    """The image files of a folder (``image_files``) as uint8 [N, C, H, W] and their names.

    Every image must have the shape and colour mode of the first (sorted) one: nothing is
    resized or converted between grey and RGB. Errors name the file and the fix.
    """
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(
            f"image folder {folder} {what}: data.path must name a folder of "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files (--set data.path=DIR)"
        )
    files = image_files(folder)
    if not files:
        raise DatasetError(
            f"image folder {folder} holds no image files (accepted: "
            f"{', '.join(IMAGE_SUFFIXES)}); put the images directly in it, not in subfolders"
        )
    first = _read_image(files[0])
    out = np.empty((len(files), *first.shape), np.uint8)
    out[0] = first
    for i, p in enumerate(files[1:], start=1):
        x = _read_image(p)
        if x.shape != first.shape:
            raise DatasetError(
                f"image {p} is {_describe(x.shape)} but {files[0].name}, the first file, is "
                f"{_describe(first.shape)}; all images of a folder need one size and mode "
                f"(nothing is resized): convert them first, e.g. with Pillow "
                f"Image.open(f).convert('{'L' if first.shape[0] == 1 else 'RGB'}')"
                f".resize(({first.shape[2]}, {first.shape[1]}))"
            )
        out[i] = x
    return out, [p.name for p in files]
