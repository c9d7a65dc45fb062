"""Files of a run folder: atomic text, JSON, arrays and figures, append-only JSON lines, the
metrics log (write and read).

Every result file idode writes goes through here, so every one is either complete or absent:
it is written to a hidden temporary file, fsynced and renamed over the target (``atomic_path``
for writers that take a file name: np.savez, savefig); JSON lines are appended and fsynced, and
a line cut by a kill is dropped on the next read or append.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MetricsLog",
    "append_jsonl",
    "atomic_path",
    "jsonable",
    "read_json",
    "read_jsonl",
    "read_metrics",
    "truncate_partial_line",
    "write_bytes_atomic",
    "write_figure_atomic",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]


def jsonable(obj: Any) -> Any:
    """obj with numpy arrays/scalars, tuples, paths and dict keys turned into JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _fsync_replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path beside ``path``, with its suffix, for writers that take a file name
    (``np.savez``, ``Figure.savefig``): on success it is fsynced and renamed over ``path``, so
    ``path`` is complete or untouched; on an error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """text -> path, complete or not at all: a hidden temporary file, fsync, rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """data -> path, complete or not at all: a hidden temporary file, fsync, rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_figure_atomic(path: str | os.PathLike, fig: Any, **savefig: Any) -> Path:
    """A matplotlib figure -> path (format from the suffix), complete or not at all."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    return write_bytes_atomic(path, buf.getvalue())


def write_json_atomic(
    path: str | os.PathLike, obj: Any, indent: int | None = 1, allow_nan: bool = True
) -> Path:
    """Write obj as JSON to path: complete or not at all (temporary file, fsync, rename).

    allow_nan=False refuses NaN/inf (for result files where a NaN is a bug, not a number).
    """
    path = Path(path)
    text = json.dumps(jsonable(obj), indent=indent, allow_nan=allow_nan) + "\n"
    return write_text_atomic(path, text)


def read_json(path: str | os.PathLike) -> Any:
    """JSON file -> object (a missing or unparsable file raises with the path named)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or restore it") from None


def truncate_partial_line(path: str | os.PathLike) -> None:
    """Cut a last line without its newline (left by a kill mid-write) so appends start clean."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows as JSON lines, flushed and fsynced (after cutting a partial last line)."""
    text = "".join(json.dumps(jsonable(r)) + "\n" for r in rows)
    if not text:
        return
    truncate_partial_line(path)
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Replace a JSON-lines file by ``rows``: complete or not at all (temporary file, rename)."""
    path = Path(path)
    return write_text_atomic(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete JSON-object lines of a file (a line cut by a kill is skipped); [] if absent."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {name: [(step, value), ...]} (numbers only; the last row of a step wins)."""
    by_step: dict[str, dict[int, float]] = {}
    for row in read_jsonl(path):
        if "step" not in row:
            continue
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool):
                by_step.setdefault(k, {})[int(row["step"])] = float(v)
    return {k: sorted(v.items()) for k, v in by_step.items()}


class MetricsLog:
    """Metrics as JSON lines (``metrics.jsonl``) and TensorBoard scalars (``tb/``), rank 0 only."""

    FILE = "metrics.jsonl"

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ) -> None:
        """purge_step: TensorBoard drops earlier events at steps >= it (a resumed run's redo)."""
        self.enabled = enabled
        self.path = Path(run_dir) / self.FILE
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step)
            except ImportError:  # tensorboard is a dependency, but keep training without it
                self.tb = None

    def write(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, [{"step": step, "time": time.time(), **values}])
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
