"""The folder of an evaluation: what its numbers depend on, per-example rows, eval.json.

``OUT/eval_settings.json`` holds the identity of an evaluation (``identity``): the protocol
(``idode.Protocol``), the model (its weights' checksum, step, EMA or raw: never its path), the
data (dataset, split, image shape and grey levels), whether the SDE bound is computed and the
device type. Each per-example row carries ``image_hash``, the hash of the image it was computed
on. A resume is accepted only when the identity is the same and every saved row's image is the
image at that index now; otherwise it is refused with one line naming what differs (protocol,
model, data, ...) and the fix. So a run folder copied or moved elsewhere resumes, an evaluation
can be extended to more examples (``max_examples`` is not part of the identity: the rows already
done are checked image by image), and data with other content under the same name is refused.

Per-example rows are appended to ``per_example.jsonl`` (``per_example.rank{r}.jsonl`` on rank r
of a multi-process run) as examples finish; a line cut by a kill is dropped and recomputed. Rank
0 merges every file into one sorted ``per_example.jsonl`` before it writes ``eval.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from idode.checkpoint import LoadedCheckpoint, run_folder
from idode.protocol import Protocol
from idode.rundir import jsonable, read_jsonl, write_json_atomic, write_jsonl_atomic

__all__ = [
    "EXAMPLES_FILE",
    "RESULT_FILE",
    "SETTINGS_FILE",
    "identity",
    "default_eval_dir",
    "image_hash",
    "merge_examples",
    "prepare_out_dir",
    "read_per_example",
    "saved_calibration",
]

SETTINGS_FILE, RESULT_FILE, EXAMPLES_FILE = "eval_settings.json", "eval.json", "per_example.jsonl"
_ROW_KEYS = ("index", "bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "steps", "nfe")
IDENTITY_FORMAT = 2  # 2: protocol + weights checksum + data; 1 (unversioned): paths, no data
_FIX = "pick another output directory (--out), or pass --overwrite to discard them"


def default_eval_dir(ck: LoadedCheckpoint, split: str, ev: Protocol) -> Path:
    """RUN/evals/step_N_SPLIT_DEQ[_kK][_iw]: in the run folder, never inside a checkpoint folder
    (old-checkpoint cleanup deletes those); for a diffusers model folder, which idode did not
    write, ./evals/FOLDER_DATA_SPLIT_DEQ... in the working directory."""
    name = f"step_{ck.step:08d}_{split}_{ev.dequantization}"
    name += f"_k{ev.num_samples}" if ev.num_samples > 1 else ""
    name += "_iw" if ev.importance_weighted else ""
    if "model_folder" in ck.meta:  # another library's model (maybe a read-only hub cache): ./evals
        return Path("evals") / (f"{Path(ck.path).name}_{ck.config.data.name}_" + name[14:])
    return run_folder(ck.path) / "evals" / name


def image_hash(image: Tensor | np.ndarray) -> str:
    """The first 16 hex digits of the sha256 of one integer image (its shape and its values as
    little-endian int64): which image a per-example row was computed on."""
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    x = np.ascontiguousarray(image, dtype="<i8")
    return hashlib.sha256(f"{list(x.shape)}|".encode() + x.tobytes()).hexdigest()[:16]


def identity(
    protocol: Protocol,
    model: dict[str, Any],
    data: dict[str, Any],
    with_elbo: bool,
    device_type: str,
) -> dict[str, Any]:
    """eval_settings.json: what an evaluation's numbers depend on. ``model``: checksum, step,
    ema; ``data``: name, split, shape, num_levels (the images themselves: the rows' hashes)."""
    return {
        "format": IDENTITY_FORMAT,
        "protocol": Protocol.of(protocol).to_json(),
        "model": model,
        "data": data,
        "with_elbo": with_elbo,
        "device_type": device_type,
    }


def prepare_out_dir(
    out: Path, ident: dict[str, Any], overwrite: bool, image_hashes: Mapping[int, str]
) -> str | None:
    """Start or resume ``out``; an error message if it holds results that ``ident`` (and the
    images whose ``image_hash`` are ``image_hashes``, by example index) would not reproduce."""
    if out.exists() and not out.is_dir():
        return f"the output directory {out} is a file; name a directory (or leave --out out)"
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    if path.exists() and not overwrite:
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        problem = _differences(saved, jsonable(ident)) or _other_images(out, image_hashes)
        return None if problem is None else f"{out} holds {problem}; {_FIX}"
    if not overwrite and _example_files(out):
        return (
            f"{out} holds per-example results but no {SETTINGS_FILE}, so they cannot be trusted "
            f"to match these settings; {_FIX}"
        )
    for p in [out / RESULT_FILE, *_example_files(out)]:
        p.unlink(missing_ok=True)
    write_json_atomic(path, ident)
    return None


def saved_calibration(
    out: Path, base: dict[str, Any], identity_with: Callable[[dict], dict[str, Any]]
) -> dict[str, Any] | None:
    """The calibration ``out`` was evaluated with (its identity's "calibration"), when it was
    calibrated from the same ``base`` (tolerances given, ladder) and ``identity_with(its chosen
    tolerances)`` is the saved identity: a resume reuses it instead of calibrating again (which
    on a split extended since could choose other images and so other tolerances)."""
    try:
        saved = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    cal = saved.get("calibration") if isinstance(saved, dict) else None
    if not isinstance(cal, dict) or cal.get("base") != jsonable(base):
        return None
    now = jsonable(identity_with(cal["chosen"]))
    return cal if _differences(saved, now) is None else None


def _differences(saved: Any, now: dict[str, Any]) -> str | None:
    """What differs between a saved identity and this one, in words (None: nothing)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("protocol"), dict):
        return (
            f"results whose {SETTINGS_FILE} is unreadable or written by an older idode (it "
            f"identifies neither the weights nor the data), so they cannot be checked"
        )
    try:
        changed = Protocol.from_json(saved["protocol"]).differences(
            Protocol.from_json(now["protocol"])
        )
    except (TypeError, ValueError) as e:
        changed = [f"unreadable: {e}"]
    parts = [f"protocol ({'; '.join(changed)})"] if changed else []
    for key in ("model", "data"):
        a, b = saved.get(key) or {}, now[key]
        diff = [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in b if a.get(k) != b.get(k)]
        parts += [f"{key} ({'; '.join(diff)})"] if diff else []
    other = [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in ("with_elbo", "device_type", "precision")  # precision: absent for fp32
        if saved.get(k) != now.get(k)
    ]
    parts += [f"settings ({'; '.join(other)})"] if other else []
    return "an evaluation that differs in " + "; and ".join(parts) if parts else None


def _other_images(out: Path, image_hashes: Mapping[int, str]) -> str | None:
    """Saved rows whose image is not the image at their index now, in words (None: none)."""
    rows = read_per_example(out)
    bad = [i for i in sorted(rows) if i in image_hashes]
    bad = [i for i in bad if rows[i].get("image_hash") != image_hashes[i]]
    if not bad:
        return None
    return (
        f"an evaluation that differs in data ({len(bad)} saved example(s) were computed on "
        f"other images than those at their index now, the first: example {bad[0]}; another "
        f"--data-root, or files that changed?)"
    )


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


def merge_examples(out: Path, n: int | Sequence[int]) -> list[dict[str, Any]]:
    """Rank 0: all files -> one sorted ``per_example.jsonl``; the rows of examples 0..n-1 (or of
    the example indices ``n``, in that order)."""
    done = read_per_example(out)
    ids = range(n) if isinstance(n, int) else n
    missing = [i for i in ids if i not in done]
    if missing:
        raise RuntimeError(f"evaluation incomplete: no result for examples {missing[:10]} in {out}")
    rank_files = sorted(out.glob("per_example.rank*.jsonl"))
    write_jsonl_atomic(out / EXAMPLES_FILE, [done[i] for i in sorted(done)])
    for p in rank_files:  # now in per_example.jsonl
        p.unlink()
    return [done[i] for i in ids]
