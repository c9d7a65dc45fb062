"""flax.serialization's msgpack format, read (and written, for tests) with ``msgpack`` alone.

``flax.serialization.to_bytes(state)`` packs the state dict (nested maps with string keys) with
three extension types, each of whose payload is itself a msgpack value:

* type 1, an array: ``[shape (array of ints), dtype name (str), raw C-order little-endian bytes]``;
* type 2, a Python complex: ``[real, imag]``;
* type 3, a numpy scalar: as type 1 with shape ``[]``.

Arrays over flax's chunk size (2**30 bytes) are stored as a map
``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat0, ...}}`` whose
flat chunks concatenate, in key order, to the C-order array. The reader streams the file and skips
the top-level entries it is not asked for (a TrainState's optimizer moments are twice the weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from idode.validation import InputError

__all__ = [
    "FLAX_CHUNK_BYTES",
    "FlaxMsgpackError",
    "flatten_tree",
    "read_flax_msgpack",
    "write_flax_msgpack",
]

FLAX_CHUNK_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_BFLOAT16 = "bfloat16"  # jax's dtype, unknown to numpy: decoded by hand below


class FlaxMsgpackError(InputError):
    """A file that is not (or not entirely) a flax.serialization msgpack state dict."""


def _decode_array(payload: bytes, where: str) -> np.ndarray:
    import msgpack

    try:
        shape, dtype_name, buf = msgpack.unpackb(payload, raw=True)
        dtype_name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
        shape = tuple(int(s) for s in shape)
    except Exception as e:  # a garbled payload raises any of several msgpack/Python errors
        raise FlaxMsgpackError(f"{where}: bad flax array payload ({e})") from None
    if dtype_name == _BFLOAT16:
        # bfloat16 is the top half of a float32: widen by shifting the 16 bits up
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    try:
        dtype = np.dtype(dtype_name).newbyteorder("<")
    except TypeError:
        raise FlaxMsgpackError(f"{where}: unknown array dtype {dtype_name!r}") from None
    if len(buf) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise FlaxMsgpackError(
            f"{where}: array of shape {shape} and dtype {dtype_name} needs "
            f"{dtype.itemsize * int(np.prod(shape, dtype=np.int64))} bytes, the file has {len(buf)}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _ext_hook(code: int, payload: bytes) -> Any:
    import msgpack

    if code == _EXT_NDARRAY:
        return _decode_array(payload, "array")
    if code == _EXT_NPSCALAR:
        return _decode_array(payload, "numpy scalar")[()]
    if code == _EXT_COMPLEX:
        re, im = msgpack.unpackb(payload)
        return complex(re, im)
    raise FlaxMsgpackError(f"unknown msgpack extension type {code} (flax uses 1, 2 and 3)")


def _unchunk(tree: Any) -> Any:
    """Replace every chunked-array map in ``tree`` by the array it encodes (recursively)."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED):
        try:
            shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
            chunks = [np.asarray(tree["chunks"][str(i)]) for i in range(len(tree["chunks"]))]
        except (KeyError, TypeError, ValueError) as e:
            raise FlaxMsgpackError(f"malformed chunked array (missing {e})") from None
        flat = np.concatenate([c.reshape(-1) for c in chunks]) if chunks else np.zeros(0)
        if flat.size != int(np.prod(shape, dtype=np.int64)):
            raise FlaxMsgpackError(
                f"chunked array of shape {shape} has {flat.size} elements in its chunks"
            )
        return flat.reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def read_flax_msgpack(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict:
    """The state dict in a flax msgpack file, arrays as read-only numpy arrays.

    keys: read only these top-level entries (others are skipped without decoding); None: all.
    Raises FlaxMsgpackError for a file that is not a flax msgpack map.
    """
    import msgpack

    path = Path(path)
    wanted = None if keys is None else set(keys)
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        up = msgpack.Unpacker(
            f, ext_hook=_ext_hook, raw=False, max_buffer_size=2**31 - 1, strict_map_key=False
        )
        not_flax = (
            f"{path} is not a Flax msgpack checkpoint (flax.serialization.to_bytes writes one "
            f"map at the top, e.g. a clu ckpt-N.flax file)"
        )
        try:
            n = up.read_map_header()
        except (msgpack.UnpackException, ValueError, msgpack.OutOfData, FlaxMsgpackError):
            raise FlaxMsgpackError(not_flax) from None
        try:
            for _ in range(n):
                key = up.unpack()
                if not isinstance(key, str):
                    raise FlaxMsgpackError(f"{not_flax}: top-level key {key!r} is not a string")
                if wanted is None or key in wanted:
                    out[key] = _unchunk(up.unpack())
                else:
                    up.skip()
        except msgpack.OutOfData:
            raise FlaxMsgpackError(f"{path} is truncated (the msgpack data ends early)") from None
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            if isinstance(e, FlaxMsgpackError):
                raise FlaxMsgpackError(f"{path}: {e}") from None
            raise FlaxMsgpackError(f"{not_flax} ({type(e).__name__}: {e})") from None
    return out


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested maps -> {"a/b/c": leaf}, keys joined by "/" in the file's order."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            flat.update(flatten_tree(v, name))
        else:
            flat[name] = v
    return flat


# --- writing (tests build checkpoints in the genuine layout with this) --------------------------


def _encode_array(arr: np.ndarray) -> bytes:
    import msgpack

    arr = np.asarray(arr)  # not ascontiguousarray: it turns a 0-d array into shape (1,)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _default(obj: Any) -> Any:
    import msgpack

    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, _encode_array(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _encode_array(np.asarray(obj)))
    if isinstance(obj, complex):
        return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb((obj.real, obj.imag)))
    raise TypeError(f"cannot serialise {type(obj).__name__} in the flax msgpack format")


def _chunk_leaves(tree: Any, chunk_bytes: int) -> Any:
    if isinstance(tree, dict):
        return {k: _chunk_leaves(v, chunk_bytes) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.nbytes > chunk_bytes:
        step = max(1, chunk_bytes // tree.dtype.itemsize)
        flat = tree.reshape(-1)
        chunks = [flat[i : i + step] for i in range(0, flat.size, step)]
        return {
            _CHUNKED: True,
            "shape": {str(i): int(d) for i, d in enumerate(tree.shape)},
            "chunks": {str(i): c for i, c in enumerate(chunks)},
        }
    return tree


def write_flax_msgpack(
    path: str | os.PathLike, tree: dict, chunk_bytes: int = FLAX_CHUNK_BYTES
) -> None:
    """Write ``tree`` as flax.serialization.to_bytes would (arrays over chunk_bytes chunked)."""
    import msgpack

    data = msgpack.packb(_chunk_leaves(tree, chunk_bytes), default=_default, strict_types=True)
    Path(path).write_bytes(data)
