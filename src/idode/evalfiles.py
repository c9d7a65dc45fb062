"""The folder of an evaluation: its settings fingerprint, per-example JSON lines, eval.json.

``OUT/eval_settings.json`` holds the fingerprint of the settings that define a result; other
settings in the same folder are refused. Per-example rows are appended to ``per_example.jsonl``
(``per_example.rank{r}.jsonl`` on rank r of a multi-process run) as examples finish; a line cut by
a kill is dropped and recomputed. Rank 0 merges every file into one sorted ``per_example.jsonl``
before it writes ``eval.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from idode.rundir import jsonable, read_jsonl, write_json_atomic, write_jsonl_atomic

__all__ = [
    "EXAMPLES_FILE",
    "RESULT_FILE",
    "SETTINGS_FILE",
    "merge_examples",
    "prepare_out_dir",
    "read_per_example",
]

SETTINGS_FILE, RESULT_FILE, EXAMPLES_FILE = "eval_settings.json", "eval.json", "per_example.jsonl"
_ROW_KEYS = ("index", "bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "steps", "nfe")


def prepare_out_dir(out: Path, fingerprint: dict, overwrite: bool) -> str | None:
    """Start or resume ``out``; an error message if it holds results of other settings."""
    if out.exists() and not out.is_dir():
        return f"the output directory {out} is a file; name a directory (or leave --out out)"
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    if path.exists() and not overwrite:
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved != jsonable(fingerprint):
            if not isinstance(saved, dict):
                return (
                    f"{path} is unreadable; pick another output directory or use --overwrite "
                    f"to start over"
                )
            diff = sorted(k for k in {**saved, **fingerprint} if saved.get(k) != fingerprint.get(k))
            pairs = "; ".join(
                f"{k}: saved {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff
            )
            return (
                f"{out} holds an evaluation with other settings ({pairs}). Pick another output "
                f"directory, or use --overwrite to discard those results"
            )
        return None
    if not overwrite and _example_files(out):
        return (
            f"{out} holds per-example results but no {SETTINGS_FILE}, so they cannot be trusted "
            f"to match these settings; pick another output directory or use --overwrite to "
            f"discard them"
        )
    for p in [out / RESULT_FILE, *_example_files(out)]:
        p.unlink(missing_ok=True)
    write_json_atomic(path, fingerprint)
    return None


def _example_files(out: Path) -> list[Path]:
    files = sorted(out.glob("per_example.rank*.jsonl"))
    return ([out / EXAMPLES_FILE] if (out / EXAMPLES_FILE).exists() else []) + files


def read_per_example(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """All complete per-example rows in ``out_dir`` (every rank's file), by example index.

    A line that does not parse (cut by a kill) or lacks a field is ignored: it is recomputed.
    """
    rows: dict[int, dict[str, Any]] = {}
    for p in _example_files(Path(out_dir)):
        for row in read_jsonl(p):
            if all(k in row for k in _ROW_KEYS):
                rows.setdefault(int(row["index"]), row)
    return rows


def merge_examples(out: Path, n: int) -> list[dict[str, Any]]:
    """Rank 0: all files -> one sorted ``per_example.jsonl``; the rows of examples 0..n-1."""
    done = read_per_example(out)
    missing = [i for i in range(n) if i not in done]
    if missing:
        raise RuntimeError(f"evaluation incomplete: no result for examples {missing[:10]} in {out}")
    rank_files = sorted(out.glob("per_example.rank*.jsonl"))
    write_jsonl_atomic(out / EXAMPLES_FILE, [done[i] for i in sorted(done)])
    for p in rank_files:  # now in per_example.jsonl
        p.unlink()
    return [done[i] for i in range(n)]
