"""Files of an evaluation folder to open elsewhere: ``per_example.csv`` and two histograms.

Written by rank 0 at the end of an evaluation, each atomically (``idode.rundir``), from the rows
that eval.json summarizes (in evaluation order):

- ``per_example.csv``: one row per example, the scalar fields of its JSON line (``index``, the
  image ``file`` of a folder dataset, ``bpd`` and each bound, ``elbo_bpd``, ``nfe``, the solver
  error fields, ...; a field holding a dict of scalars gives one column per key, ``field.key``);
  lists (per-draw values) stay in the JSON lines. Numbers are written as
  Python's shortest round-trip repr, so the CSV holds exactly the values of the JSON lines.
- ``hist_bpd.png`` and ``hist_nfe.png``: histograms of per-example bits/dim and NFE.

For a dataset with per-example file names (``info["example_files"]``), each row gets its ``file``,
also in ``per_example.jsonl`` (rewritten atomically).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idode.evalfiles import EXAMPLES_FILE
from idode.rundir import read_jsonl, write_bytes_atomic, write_figure_atomic, write_jsonl_atomic

__all__ = ["CSV_FILE", "HISTOGRAMS", "csv_columns", "export_examples", "read_csv"]

CSV_FILE = "per_example.csv"
HISTOGRAMS = {"bpd": "hist_bpd.png", "nfe": "hist_nfe.png"}
# the columns first in the CSV, when present; every other scalar field follows in first-seen order
_LEADING = ("index", "file", "bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "elbo_bpd",
            "nfe", "steps", "solver_error_bpd")  # fmt: skip


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """The row's scalar fields, a dict-valued field's scalars as ``field.key``."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{q}": w for q, w in v.items() if _scalar(w)})
        elif _scalar(v):
            out[k] = v
    return out


def csv_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The CSV's columns: the leading ones present, then the other scalar fields of the rows."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in _flat(r):
            seen.setdefault(k)
    return [k for k in _LEADING if k in seen] + [k for k in seen if k not in _LEADING]


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    cols = csv_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in map(_flat, rows):
        w.writerow(["" if r.get(k) is None else r[k] for k in cols])
    return write_bytes_atomic(path, buf.getvalue().encode())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """per_example.csv -> one dict of strings per example (the values as written)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _histogram(path: Path, values: list[float], xlabel: str, integer: bool) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.2), dpi=120)
    ax = fig.add_subplot()
    lo, hi = min(values), max(values)
    if integer and hi - lo < 60:  # one bar per value
        bins: Any = [v - 0.5 for v in range(int(lo), int(hi) + 2)]
    else:
        bins = min(60, max(5, math.ceil(math.sqrt(len(values)))))
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.4)
    mean = math.fsum(values) / len(values)
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.set_title(f"{len(values)} examples", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return write_figure_atomic(path, fig)


def _label_files(out: Path, rows: list[dict[str, Any]], files: Sequence[str]) -> None:
    """Each row's ``file`` (in place), and per_example.jsonl rewritten with them."""
    if len(files) != len(rows):
        raise ValueError(f"{len(files)} file names for {len(rows)} rows")
    if all(r.get("file") == f for r, f in zip(rows, files, strict=True)):
        return
    for r, f in zip(rows, files, strict=True):
        r["file"] = f
    by_index = {r["index"]: r for r in rows}
    merged = read_jsonl(out / EXAMPLES_FILE)
    write_jsonl_atomic(out / EXAMPLES_FILE, [by_index.get(r["index"], r) for r in merged])


def export_examples(
    out: str | Path, rows: list[dict[str, Any]], files: Sequence[str] | None = None
) -> dict[str, str]:
    """per_example.csv and the histograms of ``rows`` (eval.json's examples, in order) in
    ``out``; ``files`` names each row's image (a folder dataset). Returns {what: path}."""
    out = Path(out)
    if files is not None:
        _label_files(out, rows, files)
    written = {"per_example_csv": _write_csv(out / CSV_FILE, rows)}
    bpd = [float(r["bpd"]) for r in rows]
    written["hist_bpd"] = _histogram(out / HISTOGRAMS["bpd"], bpd, "bits/dim per example", False)
    nfe = [float(r["nfe"]) for r in rows]
    label = "NFE per example (network calls, all draws)"
    written["hist_nfe"] = _histogram(out / HISTOGRAMS["nfe"], nfe, label, True)
    return {k: str(v) for k, v in written.items()}
