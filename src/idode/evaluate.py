"""Bits/dim of a checkpoint over a dataset split: resumable, sharded over ranks, with error bars.

Every example's result depends only on (seed, example index, settings): its dequantization noise,
Hutchinson probe and ELBO noise come from its own generators (``idode.rng``) and the ODE solver
controls the error of each example separately. So an evaluation can be cut into batches, shards
and restarts freely (up to float rounding of batched network calls):

- the protocol (dequantization, K, importance weighting, divergence, tolerances, batch size,
  seed) is the checkpoint's ``eval`` config, each argument given overriding it;
- examples stream through continuous batching (``idode.continuous``): at most ``batch_size``
  rows per network call, a finished row taking the next (example, draw) at once;
- per-example results are appended to ``OUT/per_example.jsonl`` (``per_example.rank{r}.jsonl``
  on rank r of a multi-process run) as examples finish, flushed and fsynced; a restart with the
  same settings skips the examples already done (any file, any world size), and a line cut by a
  kill is dropped and recomputed. ``OUT/eval_settings.json`` holds the fingerprint of the
  settings that define a result; other settings in the same OUT are refused (``evalfiles``).
- under ``torchrun`` rank r of W evaluates examples r, r + W, ... with the plain (unwrapped)
  model and no collective inside the ODE solve; rank 0 then merges all files into
  ``per_example.jsonl`` (sorted, deduplicated) and writes ``eval.json`` atomically.

Batch size, device index, world size and ``max_examples`` are not part of the fingerprint, so an
evaluation can be extended to more examples, or resumed with another batch size or on more GPUs.
The device *type* is part of it: CPU and CUDA generators draw different streams.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor

from idode import calibration, certify
from idode.checkpoint import LoadedCheckpoint, find_checkpoint, load_model, run_folder
from idode.config import Config, ConfigError, DataConfig, EvalConfig, apply_overrides
from idode.continuous import bpd_columns, iter_bits_per_dim, stack_examples
from idode.data import DATASETS, DatasetName, Split, dataset_from_config
from idode.dequantization import Dequantization, bits_per_dim_from_nats
from idode.distributed import broadcast, progress_bar, setup
from idode.evalfiles import (
    EXAMPLES_FILE,
    RESULT_FILE,
    SETTINGS_FILE,
    merge_examples,
    prepare_out_dir,
    read_per_example,
)
from idode.likelihood import Divergence, Tolerance, elbo
from idode.rng import example_generators
from idode.rundir import (
    append_jsonl,
    truncate_partial_line,
    write_json_atomic,
)
from idode.solvers import SolverStats
from idode.stats import summarize as summarize_values
from idode.validation import check_choice

__all__ = [
    "EvalSettingsError",
    "default_eval_dir",
    "evaluate",
    "evaluate_stream",
    "read_per_example",
    "resolve_settings",
    "summarize",
]

# the settings of EvalConfig that `idode eval` flags override
EVAL_FLAGS = ("dequantization", "num_samples", "importance_weighted", "divergence", "rtol", "atol",
              "batch_size", "seed", "tolerance", "logp_atol")  # fmt: skip


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
        "tolerance": ev.tolerance,
        "logp_atol": ev.logp_atol,
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
    tolerance: Tolerance | None = None,
    logp_atol: float | None = None,
    max_examples: int | None = None,
    data_root: str | None = None,
    data: DatasetName | None = None,
    overrides: list[str] | None = None,
    with_elbo: bool = True,
    ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    max_solver_error: float | None = None,
    solver_check: int | float | None = None,
) -> dict[str, Any]:
    """ODE bits/dim (and the SDE bound) of every example of ``split``; returns eval.json's content.

    checkpoint: a checkpoint or run directory. The evaluation protocol (dequantization, K =
    num_samples, importance_weighted, divergence, rtol, atol, batch_size, seed) is the
    checkpoint's ``eval`` config; each argument that is not None overrides it, and eval.json's
    ``settings_source`` says which came from where. out_dir: where the per-example results, the
    settings fingerprint and eval.json go (default ``default_eval_dir``); rerunning into the same
    out_dir resumes. max_examples: only the first N examples of the split. overwrite: discard
    earlier results in out_dir instead of resuming (needed when the settings changed).
    max_solver_error (bits/dim per image): calibrate rtol/atol/logp_atol for it first (eval.json
    "calibration"). solver_check: how many (int) or what fraction of the jobs are solved again
    for the measured "solver_error" (``idode.certify``; None: max(8, 2 %); 0: off).
    """
    t0 = time.perf_counter()
    flags = dict(dequantization=dequantization, num_samples=num_samples,
                 importance_weighted=importance_weighted, divergence=divergence, rtol=rtol,
                 atol=atol, batch_size=batch_size, seed=seed, tolerance=tolerance,
                 logp_atol=logp_atol)  # fmt: skip
    _check_arguments(split, max_examples, flags)
    certify.check_arguments(max_solver_error, solver_check)  # InputError
    env, dev, model, ck, ds = _load(
        checkpoint, ema, device, split, data_root, max_examples, data, overrides
    )
    ev, source = resolve_settings(ck.config, **flags)
    cal = None
    if max_solver_error is not None:
        ev, source, cal = _calibrate(model, ds, ev, source, max_solver_error, dev, env)
    out = Path(out_dir) if out_dir is not None else default_eval_dir(ck, split, ev)
    fingerprint = _fingerprint(ck, ema, split, ev, with_elbo, dev)
    if max_solver_error is not None:
        fingerprint["max_solver_error"] = max_solver_error
    # rank 0 checks (or starts) the output directory; every rank raises its verdict together
    err = prepare_out_dir(out, fingerprint, overwrite) if env.is_main else None
    err = broadcast(err, env)
    if err is not None:
        raise EvalSettingsError(err)
    n = len(ds)
    _evaluate_examples(model, ds, out, ev, with_elbo, env, progress)
    env.barrier()
    result = None
    if env.is_main:
        rows = merge_examples(out, n)
        result = summarize(rows, n, ev.num_samples)
        result.update(
            solver_error=_check_solver(model, ds, rows, ev, solver_check, max_solver_error, dev),
            local_error_estimate=_solver_error(rows),
            calibration=cal,
            wall_seconds=time.perf_counter() - t0,
            settings={**fingerprint, "batch_size": ev.batch_size, "max_examples": max_examples,
                      "data_root": data_root, "device": str(dev), "world_size": env.world_size},
            settings_source=source,
            checkpoint={"path": str(ck.path), "step": ck.step},
            model_folder=ck.meta.get("model_folder"),
            dataset={"name": ds.name, "split": ds.split, "num_examples": n,
                     "shape": list(ds.shape), "num_dims": ds.num_dims,
                     "num_levels": ds.num_levels, "content_hash": ds.content_hash(),
                     "info": ds.info},
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
        stream = evaluate_stream(
            model, x_all, [i for i in mine if i not in done], dev, ds.num_levels, ev, with_elbo
        )
        for rows in stream:  # examples as they finish: a kill loses only the running ones
            append_jsonl(own, rows)
            if bar is not None:
                bar.update(min(len(rows) * env.world_size, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------------
# the measured solver error and the calibration (idode.certify)
# --------------------------------------------------------------------------------------------------


def _calibrate(model, ds, ev: EvalConfig, source: dict, max_solver_error: float, dev, env):
    """(settings, their sources, eval.json's "calibration"): rank 0 calibrates on a few test
    images, every rank evaluates with its choice."""
    cal = None
    if env.is_main:
        cal = calibration.calibrate(
            model, ds.as_tensor(), ds.num_levels, ev.dequantization, ev.divergence,
            max_solver_error=max_solver_error, seed=ev.seed, batch_size=ev.batch_size, device=dev,
            base=certify.Tolerances(ev.rtol, ev.atol, ev.tolerance, ev.logp_atol),
        ).as_dict()  # fmt: skip
    cal = broadcast(cal, env)
    c = cal["chosen"]
    ev = replace(ev, rtol=c["rtol"], atol=c["atol"], logp_atol=c["logp_atol"])
    return ev, {**source, **dict.fromkeys(("rtol", "atol", "logp_atol"), "calibration")}, cal


def _check_solver(model, ds, rows, ev: EvalConfig, check, max_solver_error, dev) -> dict:
    """eval.json's "solver_error": chosen jobs solved again at the reference (rank 0)."""
    return certify.check_rows(
        model, ds.as_tensor(), rows, ds.num_levels, ev.dequantization, ev.num_samples,
        ev.divergence, certify.Tolerances(ev.rtol, ev.atol, ev.tolerance, ev.logp_atol),
        seed=ev.seed, check=check, max_solver_error=max_solver_error, batch_size=ev.batch_size,
        device=dev,
    ).as_dict()  # fmt: skip


# --------------------------------------------------------------------------------------------------
# one batch
# --------------------------------------------------------------------------------------------------


def _elbo_generators(seed: int, indices: list[int], device: torch.device) -> list[torch.Generator]:
    # a stream of its own for the SDE bound, so it shares no draws with the dequantization noise
    return example_generators(seed, indices, device, purpose="elbo")


def evaluate_stream(
    model, x_all: Tensor, indices: list[int], dev, num_levels: int, ev: EvalConfig, with_elbo: bool
) -> Iterator[list[dict[str, Any]]]:
    """Per-example result rows (bits/dim, solver work and error, ELBO terms) as examples finish.

    One continuous-batched pass over ``indices``: at most ``batch_size`` rows per network call.
    """
    if not indices:
        return
    x = x_all[indices].to(dev)
    d = x[0].numel()
    stats = SolverStats()
    stream = iter_bits_per_dim(
        model,
        x,
        num_levels,
        ev.dequantization,
        ev.num_samples,
        ev.divergence,
        rtol=ev.rtol,
        atol=ev.atol,
        tolerance=ev.tolerance,
        logp_atol=ev.logp_atol,
        batch_size=ev.batch_size,
        generator=example_generators(ev.seed, indices, dev, purpose="dequantization"),
        stats=stats,
    )
    tic, calls = time.perf_counter(), 0
    for group in stream:
        pos = [e.index for e in group]
        idx = [indices[j] for j in pos]
        lp, dec, lq, err = (
            stack_examples(group, k) for k in ("log_p_model", "log_decoder", "log_q", "logp_error")
        )
        elq = torch.tensor([e.expected_log_q for e in group], dtype=torch.float64)
        cols = bpd_columns(lp, dec, lq, elq, d)
        cols["bpd"] = cols[
            "bpd_importance_weighted" if ev.importance_weighted else "bpd_mean_of_bounds"
        ]
        cols["solver_error_bpd"] = bits_per_dim_from_nats(-err.mean(1), d)
        if with_elbo:
            e = elbo(
                model,
                x[torch.tensor(pos, device=dev)],
                num_levels,
                antithetic=False,
                generator=_elbo_generators(ev.seed, idx, dev),
            )
            cols.update(
                elbo_bpd=e.bpd,
                elbo_reconstruction_nats=e.reconstruction,
                elbo_prior_kl_nats=e.prior_kl,
                elbo_diffusion_nats=e.diffusion,
            )
        vals = {k: v.detach().double().cpu().tolist() for k, v in cols.items()}
        bad = [i for j, i in enumerate(idx) if not all(math.isfinite(v[j]) for v in vals.values())]
        if bad:
            raise FloatingPointError(
                f"non-finite bits/dim for example(s) {bad[:10]} of this split (rtol={ev.rtol}, "
                f"atol={ev.atol}); the checkpoint may be diverged"
            )
        now = time.perf_counter()
        rows = []
        for j, (i, ex) in enumerate(zip(idx, group, strict=True)):
            row: dict[str, Any] = {"index": int(i)}
            row.update({k: v[j] for k, v in vals.items()})
            row.update(
                steps=float(ex.steps.double().mean()),
                steps_per_draw=ex.steps.tolist(),
                nfe=ex.nfe,
                log_p_model_nats=ex.log_p_model.tolist(),
                logp_error_nats=ex.logp_error.tolist(),
                # the network calls since the last group, shared by this group's examples
                batch_nfe=stats.calls - calls,
                batch_len=len(group),
                seconds=(now - tic) / len(group),
            )
            rows.append(row)
        tic, calls = now, stats.calls
        yield rows


def _solver_error(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The solver's own per-example *local* error estimate of bits/dim: mean and largest (it
    underestimates the error 10-40x on trained models; "solver_error" is the measured one)."""
    errs = [r["solver_error_bpd"] for r in rows if "solver_error_bpd" in r]
    if not errs:
        return None
    return {
        "bpd_mean": statistics.fmean(errs),
        "bpd_max": max(errs),
        "note": "a local estimate, not the error: per example, the sum over solver steps of "
        "|local error estimate of log p|, averaged over draws, in bits/dim",
    }


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
