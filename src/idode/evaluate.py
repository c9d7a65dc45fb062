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

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idode.checkpoint import find_checkpoint, load_model
from idode.config import ConfigError
from idode.continuous import bpd_columns, iter_bits_per_dim, stack_examples
from idode.data import load_dataset
from idode.dequantization import DEQUANTIZATIONS, bits_per_dim_from_nats
from idode.likelihood import DIVERGENCES, TOLERANCES, elbo
from idode.rng import example_generators
from idode.solvers import SolverStats
from idode.train import DistEnv, dist_env, resolve_device

__all__ = ["EvalSettingsError", "evaluate", "read_per_example", "summarize"]

SETTINGS_FILE, RESULT_FILE, EXAMPLES_FILE = "eval_settings.json", "eval.json", "per_example.jsonl"
_ROW_KEYS = ("index", "bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "steps", "nfe")


class EvalSettingsError(ConfigError):
    """An output directory that holds results of other settings."""


def evaluate(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    dequantization: str = "truncated_normal",
    num_samples: int = 1,
    importance_weighted: bool = False,
    divergence: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int = 256,
    seed: int = 0,
    tolerance: str = "logp",
    logp_atol: float | None = None,
    max_examples: int | None = None,
    data_root: str | None = None,
    with_elbo: bool = True,
    ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """ODE bits/dim (and the SDE bound) of every example of ``split``; returns eval.json's content.

    checkpoint: a checkpoint or run directory. out_dir: where the per-example results, the
    settings fingerprint and eval.json go; rerunning into the same out_dir resumes.
    max_examples: only the first N examples of the split. overwrite: discard earlier results in
    out_dir instead of resuming (needed when the settings changed). batch_size: rows per network
    call; a row whose solve ends takes the next (example, draw) at once (continuous batching).
    tolerance, logp_atol: the solver's error control (``likelihood.TOLERANCES``).
    """
    t0 = time.perf_counter()
    _check(dequantization, divergence, split, num_samples, batch_size, max_examples)
    if tolerance not in TOLERANCES:
        raise ConfigError(f"tolerance={tolerance!r} is not valid; choose one of {TOLERANCES}")
    ckpt_dir = find_checkpoint(checkpoint).resolve()
    dev_kind = (
        "cuda"
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    env = dist_env(dev_kind)
    dev = resolve_device(device, env, key="--device")
    model, ck = load_model(ckpt_dir, ema=ema, device=dev)
    cfg = ck.config
    root = data_root if data_root is not None else cfg.data.root
    ds = load_dataset(
        cfg.data.name,
        split,
        root,
        version=cfg.data.version,
        path=cfg.data.path,
        max_examples=max_examples,
    )
    extra = ck.meta.get("extra", {})
    if list(ds.shape) != list(extra.get("data_shape", ds.shape)) or ds.num_levels != int(
        extra.get("num_levels", ds.num_levels)
    ):
        raise ConfigError(
            f"{ds.name}/{split} has images {ds.shape} with {ds.num_levels} levels, but the "
            f"checkpoint {ckpt_dir} was trained on {extra.get('data_shape')} with "
            f"{extra.get('num_levels')} levels"
        )
    n = len(ds)
    fingerprint = {
        "checkpoint": str(ckpt_dir),
        "checkpoint_step": ck.step,
        "ema": ema,
        "dataset": cfg.data.name,
        "version": cfg.data.version,
        "npz_path": cfg.data.path,
        "split": split,
        "dequantization": dequantization,
        "num_samples": num_samples,
        "importance_weighted": importance_weighted,
        "divergence": divergence,
        "num_probes": 1,
        "analytic_entropy": True,
        "rtol": rtol,
        "atol": atol,
        "tolerance": tolerance,
        "logp_atol": logp_atol,
        "seed": seed,
        "with_elbo": with_elbo,
        "elbo": {"antithetic": False, "importance_sampling": True, "prior": "sigma_max"},
        "device_type": dev.type,
    }
    out = Path(out_dir)
    # rank 0 checks (or starts) the output directory; every rank raises its verdict together
    err = _prepare_out_dir(out, fingerprint, overwrite) if env.is_main else None
    err = _broadcast(err, env)
    if err is not None:
        raise EvalSettingsError(err)

    done = read_per_example(out)
    mine = list(range(env.rank, n, env.world_size))
    own = out / (EXAMPLES_FILE if not env.distributed else f"per_example.rank{env.rank}.jsonl")
    _truncate_partial_line(own)
    x_all = ds.as_tensor()
    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n,
            initial=sum(i in done for i in range(n)),
            desc=f"eval {dequantization}"
            + (f" (x{env.world_size} ranks)" if env.distributed else ""),
            unit="img",
            dynamic_ncols=True,
            disable=os.environ.get("IDODE_NO_PROGRESS") == "1",
        )
    try:
        stream = _evaluate_stream(
            model,
            x_all,
            [i for i in mine if i not in done],
            dev,
            ds.num_levels,
            dequantization=dequantization,
            num_samples=num_samples,
            importance_weighted=importance_weighted,
            divergence=divergence,
            rtol=rtol,
            atol=atol,
            tolerance=tolerance,
            logp_atol=logp_atol,
            batch_size=batch_size,
            seed=seed,
            with_elbo=with_elbo,
        )
        for rows in stream:  # examples as they finish: a kill loses only the running ones
            _append_rows(own, rows)
            if bar is not None:
                bar.update(min(len(rows) * env.world_size, bar.total - bar.n))
    finally:
        if bar is not None:
            bar.close()

    env.barrier()
    result = None
    if env.is_main:
        rows = _merge(out, n)
        result = summarize(rows, n, num_samples)
        result.update(
            solver_error=_solver_error(rows),
            wall_seconds=time.perf_counter() - t0,
            settings={
                **fingerprint,
                "batch_size": batch_size,
                "max_examples": max_examples,
                "data_root": None if root is None else str(root),
                "device": str(dev),
                "world_size": env.world_size,
            },
            checkpoint={"path": str(ckpt_dir), "step": ck.step},
            dataset={
                "name": ds.name,
                "split": ds.split,
                "num_examples": n,
                "shape": list(ds.shape),
                "num_dims": ds.num_dims,
                "num_levels": ds.num_levels,
                "info": _jsonable(ds.info),
            },
            torch_version=torch.__version__,
            device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            files={"per_example": str(out / EXAMPLES_FILE), "settings": str(out / SETTINGS_FILE)},
        )
        _write_json_atomic(out / RESULT_FILE, result)
    result = _broadcast(result, env)
    env.barrier()
    return result


# --------------------------------------------------------------------------------------------------
# one batch
# --------------------------------------------------------------------------------------------------


def _elbo_generators(seed: int, indices: list[int], device: torch.device) -> list[torch.Generator]:
    # a stream of its own for the SDE bound, so it shares no draws with the dequantization noise
    gens = []
    for i in indices:
        h = hashlib.sha256(f"idode/elbo/{seed}/{i}".encode()).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(h[:8], "little") % (2**63 - 1))
        gens.append(g)
    return gens


def _evaluate_stream(
    model,
    x_all: Tensor,
    indices: list[int],
    dev: torch.device,
    num_levels: int,
    *,
    dequantization: str,
    num_samples: int,
    importance_weighted: bool,
    divergence: str,
    rtol: float,
    atol: float,
    tolerance: str,
    logp_atol: float | None,
    batch_size: int,
    seed: int,
    with_elbo: bool,
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
        dequantization,
        num_samples,
        divergence,
        rtol=rtol,
        atol=atol,
        tolerance=tolerance,
        logp_atol=logp_atol,
        batch_size=batch_size,
        generator=example_generators(seed, indices, dev),
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
            "bpd_importance_weighted" if importance_weighted else "bpd_mean_of_bounds"
        ]
        cols["solver_error_bpd"] = bits_per_dim_from_nats(-err.mean(1), d)
        if with_elbo:
            e = elbo(
                model,
                x[torch.tensor(pos, device=dev)],
                num_levels,
                antithetic=False,
                generator=_elbo_generators(seed, idx, dev),
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
                f"non-finite bits/dim for example(s) {bad[:10]} of this split (rtol={rtol}, "
                f"atol={atol}); the checkpoint may be diverged"
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
    """The solver's own per-example error estimate of bits/dim: mean and largest."""
    errs = [r["solver_error_bpd"] for r in rows if "solver_error_bpd" in r]
    if not errs:
        return None
    return {
        "bpd_mean": statistics.fmean(errs),
        "bpd_max": max(errs),
        "note": "per example: sum over solver steps of |local error estimate of log p|, "
        "averaged over draws, in bits/dim",
    }


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def _check(dequantization, divergence, split, num_samples, batch_size, max_examples) -> None:
    for key, val, valid in (
        ("dequantization", dequantization, DEQUANTIZATIONS),
        ("divergence", divergence, DIVERGENCES),
        ("split", split, ("train", "test")),
    ):
        if val not in valid:
            raise ConfigError(f"{key}={val!r} is not valid; choose one of {', '.join(valid)}")
    for key, val in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{key} must be a positive integer, got {val!r}")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}")


def _prepare_out_dir(out: Path, fingerprint: dict, overwrite: bool) -> str | None:
    """Start or resume ``out``; an error message if it holds results of other settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    if path.exists() and not overwrite:
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved != _jsonable(fingerprint):
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
    _write_json_atomic(path, fingerprint)
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
        with open(p) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and all(k in row for k in _ROW_KEYS):
                    rows.setdefault(int(row["index"]), row)
    return rows


def _truncate_partial_line(path: Path) -> None:
    # a kill mid-write leaves a line without its newline: cut it so the next append starts clean
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _merge(out: Path, n: int) -> list[dict[str, Any]]:
    """Rank 0: all files -> one sorted ``per_example.jsonl``; the rows of examples 0..n-1."""
    done = read_per_example(out)
    missing = [i for i in range(n) if i not in done]
    if missing:
        raise RuntimeError(f"evaluation incomplete: no result for examples {missing[:10]} in {out}")
    rank_files = sorted(out.glob("per_example.rank*.jsonl"))
    tmp = out / f".{EXAMPLES_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / EXAMPLES_FILE)
    for p in rank_files:  # now in per_example.jsonl
        p.unlink()
    return [done[i] for i in range(n)]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _broadcast(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean, standard error (sample std / sqrt n) and the normal 95% interval mean +- 1.96 SE."""
    n = len(values)
    mean = math.fsum(values) / n
    std = statistics.stdev(values) if n > 1 else None
    se = std / math.sqrt(n) if std is not None else None
    ci = [mean - 1.96 * se, mean + 1.96 * se] if se is not None else None
    return {"mean": mean, "stderr": se, "ci95": ci, "std": std, "n": n}


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
