"""Bits/dim of a checkpoint over a dataset split: resumable, sharded over ranks, with error bars.

Every example's result depends only on (seed, example index, settings): its dequantization noise,
Hutchinson probe and ELBO noise come from its own generators (``idode.rng``) and the ODE solver
controls the error of each example separately. So an evaluation can be cut into batches, shards
and restarts freely (up to float rounding of batched network calls):

- per-example results are appended to ``OUT/per_example.jsonl`` (``per_example.rank{r}.jsonl``
  on rank r of a multi-process run) after every batch, flushed and fsynced; a restart with the
  same settings skips the examples already done (any file, any world size), and a line cut by a
  kill is dropped and recomputed. ``OUT/eval_settings.json`` holds the fingerprint of the
  settings that define a result; other settings in the same OUT are refused.
- under ``torchrun`` rank r of W evaluates examples r, r + W, ... with the plain (unwrapped)
  model and no collective inside the ODE solve; rank 0 then merges all files into
  ``per_example.jsonl`` (sorted, deduplicated) and writes ``eval.json`` atomically.

Batch size, device index, world size and ``max_examples`` are not part of the fingerprint, so an
evaluation can be extended to more examples, or resumed with another batch size or on more GPUs.
The device *type* is part of it: CPU and CUDA generators draw different streams.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor

from idode.checkpoint import LoadedCheckpoint, find_checkpoint, load_model, run_folder
from idode.config import Config, ConfigError, DataConfig, EvalConfig, apply_overrides
from idode.data import DATASETS, DatasetName, Split, dataset_from_config
from idode.dequantization import Dequantization
from idode.distributed import broadcast, progress_bar, setup
from idode.likelihood import Divergence, bits_per_dim, elbo
from idode.rng import example_generators
from idode.rundir import (
    append_jsonl,
    jsonable,
    read_jsonl,
    truncate_partial_line,
    write_json_atomic,
    write_jsonl_atomic,
)
from idode.stats import summarize as summarize_values
from idode.validation import check_choice

__all__ = [
    "EvalSettingsError",
    "default_eval_dir",
    "evaluate",
    "read_per_example",
    "resolve_settings",
    "summarize",
]

SETTINGS_FILE, RESULT_FILE, EXAMPLES_FILE = "eval_settings.json", "eval.json", "per_example.jsonl"
# the settings of EvalConfig that `idode eval` flags override
EVAL_FLAGS = ("dequantization", "num_samples", "importance_weighted", "divergence", "rtol", "atol",
              "batch_size", "seed")  # fmt: skip
_ROW_KEYS = ("index", "bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "steps", "nfe")


class EvalSettingsError(ConfigError):
    """An output directory that holds results of other settings."""


def resolve_settings(cfg: Config, **flags: Any) -> tuple[EvalConfig, dict[str, str]]:
    """The evaluation protocol: the checkpoint's ``eval`` config, with each flag that is not None
    overriding it. Returns the settings and, per setting, where it came from."""
    unknown = set(flags) - set(EVAL_FLAGS)
    if unknown:
        raise TypeError(f"unknown evaluation setting(s) {sorted(unknown)}; valid: {EVAL_FLAGS}")
    given = {k: v for k, v in flags.items() if v is not None}
    ev = replace(cfg.eval, **given)
    replace(Config(), eval=ev).validate()  # one ConfigError naming eval.<knob>
    return ev, {k: "argument" if k in given else "checkpoint" for k in EVAL_FLAGS}


def default_eval_dir(ck: LoadedCheckpoint, split: str, ev: EvalConfig) -> Path:
    """RUN/evals/step_N_SPLIT_DEQ[_kK][_iw]: in the run folder, never inside a checkpoint folder
    (old-checkpoint cleanup deletes those)."""
    name = f"step_{ck.step:08d}_{split}_{ev.dequantization}"
    name += f"_k{ev.num_samples}" if ev.num_samples > 1 else ""
    name += "_iw" if ev.importance_weighted else ""
    return run_folder(ck.path) / "evals" / name


def _check_arguments(split: str, max_examples: int | None, flags: dict[str, Any]) -> None:
    """Every argument checked before anything is loaded or written."""
    check_choice("split", split, get_args(Split), error=ConfigError)
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    given = {k: v for k, v in flags.items() if v is not None}
    replace(Config(), eval=replace(EvalConfig(), **given)).validate()


def _load(checkpoint, ema: bool, device: str, split: str, data_root, max_examples, data, overrides):
    """(env, device, model, checkpoint record, dataset), the dataset checked against the model.

    ``checkpoint`` may also be a diffusers model folder (``idode.adapters``); it names no dataset,
    so ``data`` must; ``data`` / ``overrides`` (data.* only) replace a checkpoint's data config.
    """
    from idode.adapters import is_model_folder

    env, dev = setup(device, key="--device")
    if is_model_folder(checkpoint):
        model, ck = _load_model_folder(checkpoint, dev, data, overrides)
    else:
        model, ck = load_model(find_checkpoint(checkpoint).resolve(), ema=ema, device=dev)
        data_cfg = _eval_data_config(ck.config.data, data, overrides)
        if data_root is not None and data_cfg.name == "npz":
            data_cfg = replace(data_cfg, path=None)  # --data-root FILE.npz replaces data.path
        ck = replace(ck, config=replace(ck.config, data=data_cfg))
    ds = _dataset(ck, split, data_root, max_examples)
    if "model_folder" in ck.meta:
        _check_folder_data(ck.meta["model_folder"], ds)
        ck = replace(ck, data_shape=tuple(ds.shape), num_levels=ds.num_levels)
    if tuple(ds.shape) != tuple(ck.data_shape) or ds.num_levels != ck.num_levels:
        raise ConfigError(
            f"{ds.name}/{split} has images {ds.shape} with {ds.num_levels} levels, but the "
            f"checkpoint {ck.path} was trained on {list(ck.data_shape)} with "
            f"{ck.num_levels} levels"
        )
    return env, dev, model, ck, ds


def _dataset(ck: LoadedCheckpoint, split: str, data_root: str | None, max_examples: int | None):
    """The split of the record's dataset; a missing one names ``idode eval --data-root``."""
    data = ck.config.data
    try:
        return dataset_from_config(data, split, root=data_root, max_examples=max_examples)
    except FileNotFoundError as e:
        if data_root is not None or "model_folder" in ck.meta:
            raise
        stored = data.path if data.name == "npz" else data.root
        raise FileNotFoundError(
            f"{e} [the checkpoint {ck.path} was trained on data at {stored}; if the data is "
            f"elsewhere now, pass its location with `idode eval --data-root "
            f"{'FILE.npz' if data.name == 'npz' else 'DIR'}`]"
        ) from None


# --------------------------------------------------------------------------------------------------
# models and data from other libraries (idode.adapters) and --data / --set data.*
# --------------------------------------------------------------------------------------------------


def _eval_data_config(base: DataConfig, name: str | None, overrides: list[str] | None):
    """The data config of an evaluation: ``base`` with --data NAME and --set data.KEY=VALUE."""
    bad = [o for o in overrides or [] if not o.strip().startswith("data.")]
    if bad:
        raise ConfigError(
            f"idode eval --set takes data.* keys only (e.g. data.root=DIR), got {', '.join(bad)}"
        )
    if name is None and not overrides:
        return base
    cfg = Config(data=base if name is None else replace(base, name=name))
    return apply_overrides(cfg, overrides).data


def _load_model_folder(path, dev: torch.device, data: str | None, overrides: list[str] | None):
    """(model, a stand-in checkpoint record) of a diffusers model folder; data must be named.

    The record carries the default evaluation protocol and the named dataset; its shape and
    grey levels are those of the dataset once it is loaded.
    """
    from idode.adapters import load_model_folder

    if data is None:
        raise ConfigError(
            f"{path} is a diffusers model folder, which names no dataset: pass --data NAME "
            f"({', '.join(DATASETS)}) and --set data.root=DIR (or data.path=FILE.npz)"
        )
    data_cfg = _eval_data_config(DataConfig(), data, overrides)
    model, info = load_model_folder(path, device=dev)
    meta = {"model_folder": info}
    ck = LoadedCheckpoint(Path(info["path"]), 0, Config(data=data_cfg), {}, meta, num_levels=0)
    return model, ck


def _check_folder_data(info: dict[str, Any], ds) -> None:
    from idode.adapters import check_data_shape

    try:
        check_data_shape(info, ds.shape, f"{ds.name}/{ds.split}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _fingerprint(ck, ema: bool, split: str, ev: EvalConfig, with_elbo: bool, dev) -> dict:
    """The settings that define a result (an output folder holds results of one fingerprint)."""
    cfg = ck.config
    return {
        "checkpoint": str(ck.path),
        "checkpoint_step": ck.step,
        "ema": ema,
        "dataset": cfg.data.name,
        "version": cfg.data.version,
        "npz_path": cfg.data.path,
        "split": split,
        "dequantization": ev.dequantization,
        "num_samples": ev.num_samples,
        "importance_weighted": ev.importance_weighted,
        "divergence": ev.divergence,
        "num_probes": 1,
        "analytic_entropy": True,
        "rtol": ev.rtol,
        "atol": ev.atol,
        "seed": ev.seed,
        "with_elbo": with_elbo,
        "elbo": {"antithetic": False, "importance_sampling": True, "prior": "sigma_max"},
        "device_type": dev.type,
    }


def evaluate(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    split: Split = "test",
    dequantization: Dequantization | None = None,
    num_samples: int | None = None,
    importance_weighted: bool | None = None,
    divergence: Divergence | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    max_examples: int | None = None,
    data_root: str | None = None,
    data: DatasetName | None = None,
    overrides: list[str] | None = None,
    with_elbo: bool = True,
    ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """ODE bits/dim (and the SDE bound) of every example of ``split``; returns eval.json's content.

    checkpoint: a checkpoint or run directory. The evaluation protocol (dequantization, K =
    num_samples, importance_weighted, divergence, rtol, atol, batch_size, seed) is the
    checkpoint's ``eval`` config; each argument that is not None overrides it, and eval.json's
    ``settings_source`` says which came from where. out_dir: where the per-example results, the
    settings fingerprint and eval.json go (default ``default_eval_dir``); rerunning into the same
    out_dir resumes. max_examples: only the first N examples of the split. overwrite: discard
    earlier results in out_dir instead of resuming (needed when the settings changed).
    """
    t0 = time.perf_counter()
    flags = dict(dequantization=dequantization, num_samples=num_samples,
                 importance_weighted=importance_weighted, divergence=divergence, rtol=rtol,
                 atol=atol, batch_size=batch_size, seed=seed)  # fmt: skip
    _check_arguments(split, max_examples, flags)
    env, dev, model, ck, ds = _load(
        checkpoint, ema, device, split, data_root, max_examples, data, overrides
    )
    ev, source = resolve_settings(ck.config, **flags)
    out = Path(out_dir) if out_dir is not None else default_eval_dir(ck, split, ev)
    fingerprint = _fingerprint(ck, ema, split, ev, with_elbo, dev)
    # rank 0 checks (or starts) the output directory; every rank raises its verdict together
    err = _prepare_out_dir(out, fingerprint, overwrite) if env.is_main else None
    err = broadcast(err, env)
    if err is not None:
        raise EvalSettingsError(err)
    n = len(ds)
    _evaluate_examples(model, ds, out, ev, with_elbo, env, progress)
    env.barrier()
    result = None
    if env.is_main:
        result = summarize(_merge(out, n), n, ev.num_samples)
        result.update(
            wall_seconds=time.perf_counter() - t0,
            settings={**fingerprint, "batch_size": ev.batch_size, "max_examples": max_examples,
                      "data_root": data_root, "device": str(dev), "world_size": env.world_size},
            settings_source=source,
            checkpoint={"path": str(ck.path), "step": ck.step},
            model_folder=ck.meta.get("model_folder"),
            dataset={"name": ds.name, "split": ds.split, "num_examples": n,
                     "shape": list(ds.shape), "num_dims": ds.num_dims,
                     "num_levels": ds.num_levels, "info": ds.info},
            torch_version=torch.__version__,
            device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            out_dir=str(out),
            files={"per_example": str(out / EXAMPLES_FILE), "settings": str(out / SETTINGS_FILE)},
        )  # fmt: skip
        write_json_atomic(out / RESULT_FILE, result)
    result = broadcast(result, env)
    env.barrier()
    return result


def _evaluate_examples(model, ds, out: Path, ev: EvalConfig, with_elbo: bool, env, progress):
    """This rank's examples (r, r + W, ...) not yet in ``out``, appended to its JSON-lines file."""
    n, dev = len(ds), next(model.parameters()).device
    done = read_per_example(out)
    mine = list(range(env.rank, n, env.world_size))
    own = out / (EXAMPLES_FILE if not env.distributed else f"per_example.rank{env.rank}.jsonl")
    truncate_partial_line(own)
    x_all = ds.as_tensor()
    desc = f"eval {ev.dequantization}" + (f" (x{env.world_size} ranks)" if env.distributed else "")
    bar = progress_bar(n, desc, env=env, enabled=progress, unit="img")
    if bar is not None:
        bar.update(sum(i in done for i in range(n)))
    try:
        for start in range(0, len(mine), ev.batch_size):
            todo = [i for i in mine[start : start + ev.batch_size] if i not in done]
            if not todo:
                continue
            rows = _evaluate_batch(
                model,
                x_all[todo].to(dev),
                todo,
                ds.num_levels,
                dequantization=ev.dequantization,
                num_samples=ev.num_samples,
                importance_weighted=ev.importance_weighted,
                divergence=ev.divergence,
                rtol=ev.rtol,
                atol=ev.atol,
                seed=ev.seed,
                with_elbo=with_elbo,
            )
            append_jsonl(own, rows)
            if bar is not None:
                bar.update(min(len(todo) * env.world_size, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------------
# one batch
# --------------------------------------------------------------------------------------------------


def _elbo_generators(seed: int, indices: list[int], device: torch.device) -> list[torch.Generator]:
    # a stream of its own for the SDE bound, so it shares no draws with the dequantization noise
    return example_generators(seed, indices, device, purpose="elbo")


def _evaluate_batch(
    model,
    x_int: Tensor,
    indices: list[int],
    num_levels: int,
    *,
    dequantization: str,
    num_samples: int,
    importance_weighted: bool,
    divergence: str,
    rtol: float,
    atol: float,
    seed: int,
    with_elbo: bool,
) -> list[dict[str, Any]]:
    """Per-example result rows of one batch (bits/dim, ODE steps and NFE, ELBO terms)."""
    tic = time.perf_counter()
    dev = x_int.device
    res = bits_per_dim(
        model,
        x_int,
        num_levels,
        dequantization,
        num_samples,
        divergence,
        rtol,
        atol,
        importance_weighted=importance_weighted,
        generator=example_generators(seed, indices, dev, purpose="dequantization"),
    )
    cols: dict[str, Tensor] = {
        "bpd": res.bpd,
        "bpd_mean_of_bounds": res.bpd_mean_of_bounds,
        "bpd_importance_weighted": res.bpd_importance_weighted,
    }
    if with_elbo:
        e = elbo(
            model,
            x_int,
            num_levels,
            antithetic=False,
            generator=_elbo_generators(seed, indices, dev),
        )
        cols.update(
            elbo_bpd=e.bpd,
            elbo_reconstruction_nats=e.reconstruction,
            elbo_prior_kl_nats=e.prior_kl,
            elbo_diffusion_nats=e.diffusion,
        )
    vals = {k: v.detach().double().cpu().tolist() for k, v in cols.items()}
    bad = [i for j, i in enumerate(indices) if not all(math.isfinite(v[j]) for v in vals.values())]
    if bad:
        raise FloatingPointError(
            f"non-finite bits/dim for example(s) {bad[:10]} of this split (rtol={rtol}, "
            f"atol={atol}); the checkpoint may be diverged"
        )
    steps = res.steps.detach().cpu().long()  # [B, K]
    nfe = (6 * steps + 2).sum(1).tolist()  # per example, over its K solves (solvers.py)
    log_p = res.log_p_model.detach().double().cpu().tolist()
    seconds = (time.perf_counter() - tic) / len(indices)
    rows = []
    for j, i in enumerate(indices):
        row: dict[str, Any] = {"index": int(i)}
        row.update({k: v[j] for k, v in vals.items()})
        row.update(
            steps=float(steps[j].double().mean()),
            steps_per_draw=steps[j].tolist(),
            nfe=int(nfe[j]),
            log_p_model_nats=log_p[j],
            batch_nfe=int(res.nfe),
            batch_len=len(indices),
            seconds=seconds,
        )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def _prepare_out_dir(out: Path, fingerprint: dict, overwrite: bool) -> str | None:
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
                    f"{path} is unreadable; pick another output directory or pass "
                    f"overwrite=True (--overwrite) to start over"
                )
            diff = sorted(k for k in {**saved, **fingerprint} if saved.get(k) != fingerprint.get(k))
            pairs = "; ".join(
                f"{k}: saved {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff
            )
            return (
                f"{out} holds an evaluation with other settings ({pairs}). Pick another output "
                f"directory, or pass overwrite=True (--overwrite) to discard those results"
            )
        return None
    if not overwrite and _example_files(out):
        return (
            f"{out} holds per-example results but no {SETTINGS_FILE}, so they cannot be trusted "
            f"to match these settings; pick another output directory or pass overwrite=True "
            f"(--overwrite) to discard them"
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


def _merge(out: Path, n: int) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    """eval.json's summary of per-example values (``idode.stats.summarize``; None below n = 2)."""
    s = summarize_values(values)
    ci = list(s.ci95) if s.ci95 is not None else None
    return {"mean": s.mean, "stderr": s.stderr, "ci95": ci, "std": s.std, "n": s.n}


def summarize(rows: list[dict[str, Any]], n: int | None = None, num_samples: int = 1) -> dict:
    """eval.json's statistics from per-example rows (the first ``n`` examples)."""
    rows = rows[:n] if n is not None else rows
    out: dict[str, Any] = {
        "bpd": _stats([r["bpd"] for r in rows]),
        "bpd_mean_of_bounds": _stats([r["bpd_mean_of_bounds"] for r in rows]),
        "bpd_importance_weighted": _stats([r["bpd_importance_weighted"] for r in rows]),
        "elbo": _stats([r["elbo_bpd"] for r in rows]) if "elbo_bpd" in rows[0] else None,
    }
    nfe = [r["nfe"] for r in rows]
    # each batch's NFE is spread over its rows; summing the shares gives the total
    batched = math.fsum(r["batch_nfe"] / r["batch_len"] for r in rows)
    out["nfe"] = {
        "per_example_mean": statistics.fmean(nfe),
        "per_example_median": statistics.median(nfe),
        "per_example_max": max(nfe),
        "per_example_min": min(nfe),
        "per_example_note": f"6 * solver steps + 2, summed over the {num_samples} "
        f"dequantization draw(s) of an example; each is one forward + one VJP",
        "batched_total": round(batched),
    }
    out["compute_seconds"] = math.fsum(r.get("seconds", 0.0) for r in rows)
    return out
