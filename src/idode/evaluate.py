"""Bits/dim of a checkpoint over a dataset split: resumable, sharded over ranks, with error bars.

Every example's result depends only on (seed, example index, settings): its dequantization noise,
Hutchinson probe and ELBO noise come from its own generators (``idode.rng``) and the ODE solver
controls the error of each example separately. So an evaluation can be cut into batches, shards
and restarts freely (up to float rounding of batched network calls):

- the protocol (``idode.Protocol``: dequantization, K, bound, divergence, solver, ELBO, seed) and
  the batch size are the checkpoint's ``eval`` config, each argument given overriding it;
- examples stream through continuous batching (``idode.continuous``): at most ``batch_size``
  rows per network call, a finished row taking the next (example, draw) at once;
- per-example results are appended to ``OUT/per_example.jsonl`` (``per_example.rank{r}.jsonl``
  on rank r of a multi-process run) as examples finish, flushed and fsynced; a restart with the
  same settings skips the examples already done (any file, any world size), and a line cut by a
  kill is dropped and recomputed. ``OUT/eval_settings.json`` holds what the numbers depend on
  (protocol, model checksum, data; ``evalfiles``), each row its image's hash; a resume with any
  of them changed is refused with one line naming it, a copied or moved folder resumes.
- under ``torchrun`` rank r of W evaluates examples r, r + W, ... with the plain (unwrapped)
  model and no collective inside the ODE solve; rank 0 then merges all files into
  ``per_example.jsonl`` (sorted, deduplicated) and writes ``eval.json`` atomically.

Batch size, device index, world size and ``max_examples`` are not part of the identity, so an
evaluation can be extended to more examples (the rows already done are checked image by image),
or resumed with another batch size or on more GPUs. The device *type* is part of it: CPU and
CUDA generators draw different streams.
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

from idode.calibration import CALIBRATION_EXAMPLES, LADDER, calibrate
from idode.certify import check_rows
from idode.checkpoint import LoadedCheckpoint, find_checkpoint, load_model
from idode.config import Config, ConfigError, EvalConfig
from idode.continuous import iter_bits_per_dim, stack_examples
from idode.data import (
    DatasetName,
    Split,
    dataset_from_config,
    parse_subset,
    select_examples,
)
from idode.dequantization import bits_per_dim_from_nats
from idode.distributed import bar_setter, broadcast, progress_bar, setup
from idode.evalexports import export_examples
from idode.evalfiles import (
    EXAMPLES_FILE,
    RESULT_FILE,
    SETTINGS_FILE,
    default_eval_dir,
    identity,
    image_hash,
    merge_examples,
    prepare_out_dir,
    read_per_example,
    saved_calibration,
)
from idode.evalinputs import check_folder_data, eval_data_config, load_model_folder
from idode.likelihood import elbo
from idode.precision import PRECISIONS, Precision
from idode.protocol import Protocol
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

# the settings of EvalConfig that arguments (and `idode eval` flags) override: the protocol's
EVAL_FLAGS = (*Protocol.field_names(), "batch_size")


class EvalSettingsError(ConfigError):
    """An output directory that holds results of other settings."""


def resolve_settings(
    cfg: Config, protocol: Protocol | None = None, **flags: Any
) -> tuple[EvalConfig, dict[str, str]]:
    """The evaluation protocol: the checkpoint's ``eval`` config, overridden by ``protocol`` (all
    its settings) and then by each flag that is not None. Returns the settings and, per setting,
    where it came from."""
    given = _given(protocol, flags)
    ev = replace(cfg.eval, **given)
    replace(Config(), eval=ev).validate()  # one ConfigError naming eval.<knob>
    return ev, {k: "argument" if k in given else "checkpoint" for k in EVAL_FLAGS}


def _given(protocol: Protocol | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The settings an evaluation's arguments give: all of ``protocol``'s, then each flag not
    None; an unknown flag is refused, listing the valid ones."""
    unknown = set(flags) - set(EVAL_FLAGS)
    if unknown:
        raise ConfigError(
            f"unknown evaluation setting(s) {', '.join(sorted(unknown))}; valid: "
            f"{', '.join(EVAL_FLAGS)}"
        )
    base = {} if protocol is None else {n: getattr(protocol, n) for n in Protocol.field_names()}
    return {**base, **{k: v for k, v in flags.items() if v is not None}}


def _check_arguments(split: str, max_examples: int | None, given: dict[str, Any]) -> None:
    """Every argument checked before anything is loaded or written."""
    check_choice("split", split, get_args(Split), error=ConfigError)
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    replace(Config(), eval=replace(EvalConfig(), **given)).validate()


def _check_one_data_root(data_root: str | None, overrides: list[str] | None) -> None:
    """--data-root and --set data.root= (or data.path=) name one thing twice: refuse both."""
    keys = [o.split("=", 1)[0].strip() for o in overrides or []]
    both = [k for k in keys if k in ("data.root", "data.path")]
    if data_root is not None and both:
        raise ConfigError(
            f"--data-root {data_root} and --set {both[0]}=... both say where the data is; "
            f"give only one of them"
        )


def _load(checkpoint, ema: bool, device: str, split: str, data_root, max_examples, data, overrides,
          net: dict | None = None):  # fmt: skip
    """(env, device, model, checkpoint record, dataset), the dataset checked against the model.

    ``checkpoint`` may also be a diffusers model folder (``idode.adapters``); it names no dataset,
    so ``data`` must; ``data`` / ``overrides`` (data.* only) replace a checkpoint's data config.
    """
    from idode.adapters import is_model_folder

    env, dev = setup(device, key="--device")
    if is_model_folder(checkpoint):
        model, ck = load_model_folder(checkpoint, dev, data, overrides, data_root)
    else:
        path = find_checkpoint(checkpoint).resolve()
        model, ck = load_model(path, ema=ema, device=dev, **(net or {}))
        data_cfg = eval_data_config(ck.config.data, data, overrides, data_root)
        if data_root is not None and data_cfg.name in ("npz", "folder"):
            data_cfg = replace(data_cfg, path=None)  # --data-root FILE.npz|DIR replaces data.path
        ck = replace(ck, config=replace(ck.config, data=data_cfg))
    ds = _dataset(ck, split, data_root, max_examples)
    if "model_folder" in ck.meta:
        check_folder_data(ck.meta["model_folder"], ds)
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
        stored = data.path if data.name in ("npz", "folder") else data.root
        raise FileNotFoundError(
            f"{e} [the checkpoint {ck.path} was trained on data at {stored}; if the data is "
            f"elsewhere now, pass its location with `idode eval --data-root "
            f"{'FILE.npz' if data.name == 'npz' else 'DIR'}`]"
        ) from None


def _identity(ck, ema: bool, ds, ev: EvalConfig, with_elbo: bool, dev, net) -> dict[str, Any]:
    """eval_settings.json (``evalfiles.identity``): no path, so a moved run folder resumes; the
    network's precision only when it is not fp32 (older folders resume)."""
    model = {"checksum": ck.checksum, "step": ck.step, "ema": ema}
    data = {"name": ds.name, "split": ds.split, "shape": list(ds.shape),
            "num_levels": ds.num_levels}  # fmt: skip
    # solver_check changes which jobs are re-solved at the end, never a row: a resume may change it
    protocol = ev.protocol.replace(solver_check=Protocol.solver_check)
    ident = identity(protocol, model, data, with_elbo, dev.type)
    if getattr(net, "precision", "fp32") != "fp32":
        ident["precision"] = net.precision
    return ident


def evaluate(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    split: Split = "test",
    protocol: Protocol | None = None,
    max_examples: int | None = None,
    subset: str = "first",
    data_root: str | None = None,
    data: DatasetName | None = None,
    overrides: list[str] | None = None,
    with_elbo: bool = True,
    ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    compile: bool | None = None,
    precision: Precision | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """ODE bits/dim (and the SDE bound) of every example of ``split``; returns eval.json's content.

    checkpoint: a checkpoint or run directory (or a diffusers model folder, with ``data``). The
    evaluation protocol (``idode.Protocol``) and ``batch_size`` are the checkpoint's ``eval``
    config; ``protocol`` replaces all of the protocol's settings, and ``settings`` (any of
    ``EVAL_FLAGS``: ``num_samples=5``, ``rtol=1e-6``, ``batch_size=64``, ...) that are not None
    override single ones; eval.json's ``settings_source`` says which came from where.
    out_dir: where the per-example results, the identity file and eval.json go (default
    ``default_eval_dir``); rerunning into the same out_dir resumes, and is refused if the
    protocol, the model's weights or the data differ (``evalfiles``). max_examples: only N
    examples of the split, the first N or (subset "random" or "random:SEED") N at random; rows
    keep their index in the split. overwrite: discard earlier results in out_dir instead.
    compile: torch.compile the network (None: the checkpoint's model.compile). precision: the
    network's arithmetic, fp32 unless given: bf16 moves a digit's bits/dim by ~0.02
    (benchmarks/results/compile_precision_cpu.md), whatever the model was trained in.
    """
    t0 = time.perf_counter()
    given = _given(protocol, settings)
    _check_arguments(split, max_examples, given)
    _check_one_data_root(data_root, overrides)
    if precision is not None:
        check_choice("precision", precision, PRECISIONS, error=ConfigError)
    net = dict(compile=compile, precision=precision or "fp32")  # reported numbers: fp32
    first_n = max_examples if parse_subset(subset, max_examples)[0] == "first" else None
    env, dev, model, ck, ds = _load(
        checkpoint, ema, device, split, data_root, first_n, data, overrides, net
    )
    ds = select_examples(ds, max_examples, subset)
    ev, source = resolve_settings(ck.config, protocol, **settings)
    x_all, cal = ds.as_tensor(), None
    out = Path(out_dir) if out_dir is not None else default_eval_dir(ck, split, ev)
    ident_of = lambda e: _identity(ck, ema, ds, e, with_elbo, dev, model)  # noqa: E731
    if ev.max_solver_error is not None:  # rank 0 calibrates (or reuses out's), every rank uses it
        ev, cal = _calibrate(model, x_all, ds, ev, dev, out, overwrite, ident_of, env)
        source.update(dict.fromkeys(("rtol", "atol", "logp_atol"), "calibration"))
    ident = ident_of(ev)
    if cal is not None:  # what a resume needs to reuse it (not compared: the tolerances are)
        ident["calibration"] = {k: v for k, v in cal.items() if k != "reused_from"}
    # rank 0 checks (or starts) the output directory; every rank raises its verdict together
    err = None
    if env.is_main:
        hashes = {i: image_hash(x) for i, x in zip(ds.example_ids, x_all, strict=True)}
        err = prepare_out_dir(out, ident, overwrite, hashes)
    if (err := broadcast(err, env)) is not None:
        raise EvalSettingsError(err)
    _evaluate_examples(model, ds, x_all, out, ev, with_elbo, env, progress)
    env.barrier()
    result = None
    if env.is_main:
        run = {"batch_size": ev.batch_size, "max_examples": max_examples, "subset": subset,
               "data_root": data_root, "device": str(dev),
               "world_size": env.world_size}  # fmt: skip
        result = _result(model, ck, ema, split, ds, x_all, ev, with_elbo, dev, out, run, source)
        result.update(calibration=cal, wall_seconds=time.perf_counter() - t0)
        if "precision" in ident:  # a non-fp32 network: the numbers are not fp32's
            result["settings"]["precision"] = ident["precision"]
        write_json_atomic(out / RESULT_FILE, result)
    result = broadcast(result, env)
    env.barrier()
    return result


def _result(model, ck, ema, split, ds, x_all, ev, with_elbo, dev, out: Path, run, source):
    """Rank 0, once every rank is done: the rows merged and exported, eval.json's statistics,
    description and the measured solver error (``certify.check_rows``)."""
    rows = merge_examples(out, ds.example_ids)
    exports = export_examples(out, rows, ds.info.get("example_files"))
    result = summarize(rows, len(ds), ev.num_samples)
    result.update(_record(ck, ema, split, ds, ev, with_elbo, dev, out, rows, run, source))
    result["solver_error"] = check_rows(
        model, x_all, rows, ds.num_levels, ev.protocol, num_examples=len(ds),
        ids=ds.example_ids, batch_size=ev.batch_size, device=dev,
    ).as_dict()  # fmt: skip
    result["files"].update(exports)
    return result


def _record(ck, ema, split, ds, ev: EvalConfig, with_elbo, dev, out: Path, rows, run, source):
    """eval.json's description of the evaluation (its statistics come from ``summarize``)."""
    cfg, protocol = ck.config, ev.protocol
    settings = {
        **protocol.to_json(), "protocol_fingerprint": protocol.fingerprint(),
        "checkpoint": str(ck.path), "checkpoint_step": ck.step,
        "checkpoint_checksum": ck.checksum, "ema": ema, "dataset": cfg.data.name,
        "version": cfg.data.version, "npz_path": cfg.data.path, "split": split,
        "with_elbo": with_elbo, "elbo": protocol.elbo_options(), "device_type": dev.type, **run,
    }  # fmt: skip
    return dict(
        local_error_estimate=_solver_error(rows),
        settings=settings,
        settings_source=source,
        checkpoint={"path": str(ck.path), "step": ck.step, "checksum": ck.checksum},
        model_folder=ck.meta.get("model_folder"),
        dataset={
            "name": ds.name,
            "split": ds.split,
            "num_examples": len(ds),
            "shape": list(ds.shape),
            "num_dims": ds.num_dims,
            "num_levels": ds.num_levels,
            "content_hash": ds.content_hash(),
            "info": ds.info,
        },  # fmt: skip
        torch_version=torch.__version__,
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        out_dir=str(out),
        files={"per_example": str(out / EXAMPLES_FILE), "settings": str(out / SETTINGS_FILE)},
    )


def _calibrate(model, x_all, ds, ev: EvalConfig, dev, out: Path, overwrite, ident_of, env):
    """``ev`` with the tolerances for its ``max_solver_error``, and eval.json's "calibration":
    ``out``'s when it was calibrated from the same tolerances and all else is the same (a
    resume), else a new one by rank 0."""

    def with_tols(t: dict) -> EvalConfig:
        return replace(ev, rtol=t["rtol"], atol=t["atol"], logp_atol=t["logp_atol"])

    base = dict(rtol=ev.rtol, atol=ev.atol, logp_atol=ev.logp_atol, ladder=list(LADDER),
                examples=CALIBRATION_EXAMPLES)  # fmt: skip
    cal, kw = None, dict(batch_size=ev.batch_size, device=dev)
    if env.is_main:
        same = lambda t: ident_of(with_tols(t))  # noqa: E731
        saved = None if overwrite else saved_calibration(out, base, same)
        cal = {**saved, "reused_from": str(out / SETTINGS_FILE)} if saved else None
        if cal is None:
            c = calibrate(model, x_all, ds.num_levels, ev.protocol, **kw)
            cal = {**c.as_dict(), "base": base}
    cal = broadcast(cal, env)
    return with_tols(cal["chosen"]), cal


def _evaluate_examples(model, ds, x_all, out: Path, ev: EvalConfig, with_elbo: bool, env, progress):
    """This rank's examples (r, r + W, ...) not yet in ``out``, appended to its JSON-lines file."""
    n, dev, ids = len(ds), next(model.parameters()).device, ds.example_ids  # ids: index in split
    done = read_per_example(out)
    mine = [p for p in range(env.rank, n, env.world_size) if ids[p] not in done]  # positions
    own = out / (EXAMPLES_FILE if not env.distributed else f"per_example.rank{env.rank}.jsonl")
    truncate_partial_line(own)
    desc = f"eval {ev.dequantization}" + (f" (x{env.world_size} ranks)" if env.distributed else "")
    bar = progress_bar(n, desc, env=env, enabled=progress, unit="img", fractional=True)
    start = sum(i in done for i in ids)
    # the bar moves with the running solves, not only when examples end (x W: other ranks alike)
    advance = bar_setter(bar, start, env.world_size)
    advance(0.0)
    try:
        stream = evaluate_stream(
            model, x_all, mine, dev, ds.num_levels, ev.protocol, with_elbo,
            batch_size=ev.batch_size, ids=[ids[p] for p in mine], progress=advance,
        )  # fmt: skip
        finished = 0
        for rows in stream:  # examples as they finish: a kill loses only the running ones
            append_jsonl(own, rows)
            finished += len(rows)
            advance(finished)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------------
# one batch
# --------------------------------------------------------------------------------------------------


def evaluate_stream(
    model,
    x_all: Tensor,
    indices: list[int],
    dev,
    num_levels: int,
    protocol: Protocol,
    with_elbo: bool,
    *,
    batch_size: int | None = None,
    ids: list[int] | None = None,
    progress=None,
) -> Iterator[list[dict[str, Any]]]:
    """Per-example result rows (bits/dim, solver work and error, ELBO terms, the image's hash)
    as examples finish.

    One continuous-batched pass over x_all[indices]: at most ``batch_size`` rows per network call
    (None: all at once). ``ids``: each example's index in its split (default ``indices``), which
    seeds its noise from the protocol's streams and is its row's ``index``, so a row does not
    depend on which others are evaluated with it.
    """
    if not indices:
        return
    ids = indices if ids is None else ids
    x = x_all[indices].to(dev)
    d = x[0].numel()
    stats = SolverStats()
    stream = iter_bits_per_dim(
        model, x, num_levels, protocol, batch_size=batch_size, stats=stats,
        generator=protocol.generators(ids, dev), progress=progress,
    )  # fmt: skip
    tic, calls = time.perf_counter(), 0
    for group in stream:
        pos = [e.index for e in group]
        idx = [ids[j] for j in pos]
        lp, dec, lq, err = (
            stack_examples(group, k) for k in ("log_p_model", "log_decoder", "log_q", "logp_error")
        )
        elq = torch.tensor([e.expected_log_q for e in group], dtype=torch.float64)
        cols = protocol.bounds(lp, dec, lq, elq, d)
        cols["solver_error_bpd"] = bits_per_dim_from_nats(-err.mean(1), d)
        if with_elbo:
            gens = protocol.generators(idx, dev, purpose="elbo")
            e = elbo(model, x[torch.tensor(pos, device=dev)], num_levels,
                     **protocol.elbo_options(), generator=gens)  # fmt: skip
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
                f"non-finite bits/dim for example(s) {bad[:10]} of this split (rtol="
                f"{protocol.rtol}, atol={protocol.atol}); the checkpoint may be diverged"
            )
        now = time.perf_counter()
        rows = [
            _row(i, ex, {k: v[j] for k, v in vals.items()}, x[pos[j]], len(group), now - tic)
            for j, (i, ex) in enumerate(zip(idx, group, strict=True))
        ]
        for row in rows:  # the network calls since the last group, shared by its examples
            row["batch_nfe"] = stats.calls - calls
        tic, calls = now, stats.calls
        yield rows


def _row(i: int, ex, values: dict[str, float], image: Tensor, group: int, seconds: float) -> dict:
    """One per_example.jsonl row: index, the bound columns, the solver's work, the image hash."""
    row: dict[str, Any] = {"index": int(i), **values}
    row.update(
        steps=float(ex.steps.double().mean()),
        steps_per_draw=ex.steps.tolist(),
        nfe=ex.nfe,
        log_p_model_nats=ex.log_p_model.tolist(),
        logp_error_nats=ex.logp_error.tolist(),
        batch_nfe=0,
        batch_len=group,
        seconds=seconds / group,
        image_hash=image_hash(image),
    )
    return row


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
    return summarize_values(values).to_json()


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
