"""Checkpoints on disk: safetensors for tensors, JSON for the rest; save, find, verify and load.

A checkpoint is a directory ``RUN/checkpoints/step_00001000/`` holding ``state.safetensors``
(weights, EMA weights, optimizer moments, RNG states) and ``meta.json`` (config, step, optimizer
hyperparameters, data-loader position, metrics, and the sha256 checksum of the state file). It is
written into a temporary directory ``checkpoints/.tmp_step_*`` and renamed into place, so a crash
never leaves a half-written checkpoint; ``RUN/checkpoint`` is a symlink to the newest one,
replaced atomically. No pickled code is ever stored.

Format 2 (this writer) adds the checksum, verified on every load so that bytes damaged on disk
are refused; format 1 (no checksum) still loads. Old-checkpoint cleanup deletes only the two
files the writer wrote: a step folder that holds anything else is left in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idode.config import Config, ConfigError, config_differences, config_from_dict, config_to_dict
from idode.model import build_model
from idode.parameterization import DiffusionODE
from idode.precision import Precision

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "checkpoint_candidates",
    "find_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_newest_intact",
    "run_folder",
    "save_checkpoint",
    "step_folders",
]

FORMAT_VERSION = 2  # 2: meta.json records the sha256 of the state file
READABLE_FORMATS = (1, 2)
STATE_FILE, META_FILE = "state.safetensors", "meta.json"
OWN_FILES = frozenset({STATE_FILE, META_FILE})  # all a step folder holds when the writer made it
TMP_PREFIX = ".tmp_step_"  # the writer's temporary folders: .tmp_step_00001000_<random>
_STEP_DIR = re.compile(r"step_(\d{8})")
TMP_DIR = re.compile(re.escape(TMP_PREFIX) + r"\d{8}_\w+")
_warned: set[str] = set()  # step folders already reported as holding other files


class CheckpointError(RuntimeError):
    """A missing, incomplete, corrupt or unfitting checkpoint."""


def _warn(message: str) -> None:
    print(f"idode: warning: {message}", file=sys.stderr, flush=True)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# the folders of a run
# --------------------------------------------------------------------------------------------------


def step_folders(run_dir: str | os.PathLike) -> list[Path]:
    """``run_dir/checkpoints/step_NNNNNNNN`` folders (named as the writer names them), by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.fullmatch(folder.name).group(1))


def _foreign(folder: Path) -> list[str]:
    """Names in a step folder that the checkpoint writer did not write."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.name not in OWN_FILES)
    except OSError:
        return []


def _prune(run_dir: Path, current: int, keep: int) -> None:
    """Delete step folders older than ``current`` beyond the newest ``keep`` (``current`` counts).

    Deletes only the writer's own two files and then the empty folder; a folder that holds
    anything else (an evaluation, samples, a user's file) is left in place, with one warning.
    """
    older = [p for p in step_folders(run_dir) if _step_of(p) < current]
    for p in older[: max(0, len(older) - (keep - 1))]:
        foreign = _foreign(p)
        if not foreign:
            for name in OWN_FILES:
                (p / name).unlink(missing_ok=True)
            try:
                p.rmdir()
                continue
            except OSError:  # something appeared meanwhile
                foreign = _foreign(p)
        if str(p) not in _warned:
            _warned.add(str(p))
            _warn(
                f"old checkpoint {p} was not deleted: it holds files idode's checkpoint writer "
                f"did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                f"move them out (e.g. to {p.parent.parent / 'evals'}) and delete the folder"
            )


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, keeping files of others in ``final``."""
    if not final.exists():
        os.rename(tmp, final)
    elif not _foreign(final):  # re-saving the same step (e.g. a resumed run that ends there)
        shutil.rmtree(final)
        os.rename(tmp, final)
    else:  # swap only our files; without meta.json the folder reads as incomplete meanwhile
        (final / META_FILE).unlink(missing_ok=True)
        os.replace(tmp / STATE_FILE, final / STATE_FILE)
        os.replace(tmp / META_FILE, final / META_FILE)
        tmp.rmdir()


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    cfg: Config,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; point ``run_dir/checkpoint`` at it; prune old ones.

    Pruning keeps the ``keep`` newest (this one included) and deletes only what the writer wrote.
    """
    from safetensors.torch import save

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for prefix, mod in (("model", model), ("ema", ema)):
        if mod is not None:
            for k, v in mod.state_dict().items():
                tensors[f"{prefix}/{k}"] = v.detach().cpu().contiguous()
    optim_meta = None
    if optimizer is not None:
        t, optim_meta = _optimizer_tensors(optimizer)
        tensors.update(t)
    for k, v in (rng or {}).items():
        tensors[f"rng/{k}"] = v.detach().cpu().contiguous()
    state = save(tensors, metadata={"format": "idode", "step": str(step)})
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config": config_to_dict(cfg),
        "optimizer": optim_meta,
        "extra": extra or {},
        "checksums": {STATE_FILE: _sha256(state)},
    }
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"{TMP_PREFIX}{step:08d}_{os.urandom(6).hex()}"  # not mkdtemp: umask mode
    tmp.mkdir()
    try:
        _write_durable(tmp / STATE_FILE, state)
        _write_durable(tmp / META_FILE, json.dumps(meta, indent=1).encode())
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link, tmp_link = run_dir / "checkpoint", run_dir / ".checkpoint.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(Path("checkpoints") / final.name, tmp_link)
    os.replace(tmp_link, link)
    _prune(run_dir, step, keep)
    return final


# --------------------------------------------------------------------------------------------------
# finding
# --------------------------------------------------------------------------------------------------


def run_folder(checkpoint_dir: str | os.PathLike) -> Path:
    """The folder that owns a checkpoint's results: RUN for RUN/checkpoints/step_N, else itself.

    Evaluations and samples go there (RUN/evals, RUN/samples), never inside a step folder, which
    old-checkpoint cleanup deletes.
    """
    p = Path(checkpoint_dir).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints, best first: the ``checkpoint`` link's target, then newest step first.

    The link is replaced only after a checkpoint is complete, so it names the newest finished
    write; the others are the fall-backs if it turns out to be damaged.
    """
    run_dir = Path(run_dir)
    out: list[Path] = []
    link = run_dir / "checkpoint"
    if link.is_symlink() and link.resolve().is_dir():
        out.append(link.resolve())
    elif link.is_dir():
        out.append(link)
    for p in reversed(step_folders(run_dir)):
        if p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def _is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and (
        (p / META_FILE).exists() or (p / STATE_FILE).exists() or bool(_STEP_DIR.fullmatch(p.name))
    )


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a checkpoint directory, a run directory (its newest checkpoint) or a state file."""
    p = Path(path)
    if p.is_file() and p.name in (STATE_FILE, META_FILE):
        p = p.parent
    if _is_checkpoint_dir(p):
        return p.resolve() if p.is_symlink() else p
    found = checkpoint_candidates(p) if p.is_dir() else []
    if found:
        return found[0]
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} does not exist")
    raise CheckpointError(
        f"no checkpoint in {p}: expected {p}/{META_FILE} and {p}/{STATE_FILE}, or a run directory "
        f"with checkpoints/step_*/ (written by `idode train`)"
    )


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """What a checkpoint carries, typed: weights by section, the config, and the run's state."""

    path: Path  # the step directory
    step: int  # optimizer steps taken
    config: Config
    tensors: dict[str, Tensor]  # "model/...", "ema/...", "optim/...", "rng/rank{r}/..."
    meta: dict  # meta.json as written (format_version, step, config, optimizer, extra, checksums)
    data_shape: tuple[int, ...] = ()  # one example's shape [C, H, W]
    num_levels: int = 256  # grey levels of the data it was trained on
    world_size: int = 1  # processes that wrote it (resume needs the same number)
    loader_states: list[dict] = field(default_factory=list)  # per rank, for an exact resume
    dataset: dict = field(default_factory=dict)  # name and file info of the training data
    metrics: dict = field(default_factory=dict)  # the last logged metrics
    checksum: str = ""  # "sha256:<hex>" of the state file: the weights' identity, not their path

    def section(self, prefix: str) -> dict[str, Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}

    def load_into(self, module: nn.Module, prefix: str, config: Config | None = None) -> None:
        """Copy the ``prefix`` weights into ``module``: one CheckpointError line if they contain
        NaN/inf or do not fit (naming the first such tensor and, given the config the module was
        built from, the settings that differ from the checkpoint's)."""
        sd = self.section(prefix)
        if not sd:
            raise CheckpointError(f"checkpoint {self.path} holds no '{prefix}' weights")
        own = module.state_dict()
        order = [k for k in own if k in sd] + sorted(k for k in sd if k not in own)
        for k in order:
            v = sd[k]
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad = int((~torch.isfinite(v)).sum())
                raise CheckpointError(
                    f"checkpoint {self.path} holds non-finite weights: {prefix}/{k} has {bad} "
                    f"NaN/inf value(s) of {v.numel()}; the run diverged before this checkpoint "
                    f"was written: use an earlier checkpoint of the run"
                )
        problem = _first_mismatch(own, sd)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model: {problem}; "
                f"{_setting_hint(self.config, config)}"
            )
        module.load_state_dict(sd)

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        om = self.meta.get("optimizer")
        if om is None:
            raise CheckpointError(f"checkpoint {self.path} holds no optimizer state")
        state: dict[int, dict[str, Any]] = {}
        for k, v in self.section("optim").items():
            pid, name = k.split("/", 1)
            state.setdefault(int(pid), {})[name] = v
        for k, v in om["scalars"].items():
            pid, name = k.split("/", 1)
            state.setdefault(int(pid), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": om["param_groups"]})


def _first_mismatch(own: dict[str, Tensor], saved: dict[str, Tensor]) -> str | None:
    """The first parameter whose shape differs, or that one side lacks, in words."""
    for k, v in own.items():
        if k not in saved:
            return f"parameter {k!r} {list(v.shape)} of this model is not in the checkpoint"
        if tuple(saved[k].shape) != tuple(v.shape):
            return (
                f"parameter {k!r} is {list(saved[k].shape)} in the checkpoint but "
                f"{list(v.shape)} in this model"
            )
    extra = [k for k in saved if k not in own]
    if extra:
        return f"the checkpoint's parameter {extra[0]!r} does not exist in this model"
    return None


def _setting_hint(saved: Config, now: Config | None) -> str:
    diff = config_differences(saved, now) if now is not None else []
    if diff:
        return (
            f"the likely cause, settings that differ from the checkpoint's: {'; '.join(diff[:3])} "
            f"(use the checkpoint's values: drop those --set overrides)"
        )
    return "the model must be built from the checkpoint's own settings (its meta.json config)"


def _read_state(ckpt: Path, meta: dict) -> tuple[dict[str, Tensor], str]:
    """The tensors of ``ckpt`` and their file's checksum, the bytes checked against meta.json's
    record (format >= 2; format 1 records none, so it is computed)."""
    from safetensors.torch import load

    path = ckpt / STATE_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(
            f"incomplete checkpoint {ckpt}: cannot read {STATE_FILE}: {e}"
        ) from None
    actual = _sha256(data)
    if meta["format_version"] >= 2:
        expected = (meta.get("checksums") or {}).get(STATE_FILE)
        if expected != actual:
            raise CheckpointError(
                f"corrupt checkpoint tensors {path}: its checksum is {actual} but {META_FILE} "
                f"records {expected} (the file changed on disk after it was written); do not use "
                f"it: take an earlier checkpoint of the run (--resume falls back by itself) or "
                f"restore the file from a backup"
            )
    try:
        return load(data), actual
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"corrupt checkpoint tensors {path}: {e}") from None


def _read_meta(ckpt: Path) -> tuple[dict, Config]:
    """meta.json of one step folder and its config, checked (the tensors are not read)."""
    if not (ckpt / META_FILE).is_file():
        missing = META_FILE if (ckpt / STATE_FILE).is_file() else f"{META_FILE} and {STATE_FILE}"
        raise CheckpointError(f"incomplete checkpoint {ckpt}: {missing} missing")
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {ckpt / META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{ckpt / META_FILE} is not an idode checkpoint of format "
            f"{' or '.join(map(str, READABLE_FORMATS))}"
        )
    try:
        cfg = config_from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has an invalid config: {e}") from None
    if type(step := meta.get("step")) is not int or step < 0:  # bool, float, str: corrupt
        bad = f"corrupt checkpoint metadata {ckpt / META_FILE}: step {step!r} is not an integer"
        raise CheckpointError(bad + " >= 0; use another checkpoint of the run")
    return meta, cfg


def read_config(path: str | os.PathLike) -> tuple[Path, int, Config]:
    """(step folder, step, config) from meta.json alone, the tensors neither read nor verified:
    for commands that need the settings before ``train`` loads the checkpoint. For a run folder:
    its newest checkpoint whose metadata reads."""
    for ckpt in checkpoint_candidates(path) if Path(path).is_dir() else []:
        with contextlib.suppress(CheckpointError):
            meta, cfg = _read_meta(ckpt)
            return ckpt, int(meta["step"]), cfg
    ckpt = find_checkpoint(path)  # none reads: the error of the one find_checkpoint picks
    meta, cfg = _read_meta(ckpt)
    return ckpt, int(meta["step"]), cfg


def _load_dir(ckpt: Path) -> LoadedCheckpoint:
    """Read and verify one step folder."""
    meta, cfg = _read_meta(ckpt)
    tensors, checksum = _read_state(ckpt, meta)
    extra = meta.get("extra") or {}
    return LoadedCheckpoint(
        ckpt,
        int(meta["step"]),
        cfg,
        tensors,
        meta,
        data_shape=tuple(int(s) for s in extra.get("data_shape") or ()),
        num_levels=int(extra.get("num_levels", 256)),
        world_size=int(extra.get("world_size", 1)),
        loader_states=list(extra.get("loader") or []),
        dataset=dict(extra.get("dataset") or {}),
        metrics=dict(extra.get("metrics") or {}),
        checksum=checksum,
    )


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read and verify a checkpoint (paths as in ``find_checkpoint``).

    A damaged or incomplete one raises one CheckpointError naming it and, for a checkpoint of a
    run, the newest intact checkpoint of that run.
    """
    ckpt = find_checkpoint(path)
    try:
        return _load_dir(ckpt)
    except CheckpointError as e:
        if Path(ckpt).resolve().parent.name != "checkpoints":
            raise
        for other in checkpoint_candidates(run_folder(ckpt)):
            if other.resolve() == Path(ckpt).resolve():
                continue
            try:
                ok = _load_dir(other)
            except CheckpointError:
                continue
            raise CheckpointError(
                f"{e}. The newest intact checkpoint of this run is {other} (step {ok.step}): "
                f"use that one"
            ) from None
        raise


def load_newest_intact(
    run_dir: str | os.PathLike,
) -> tuple[LoadedCheckpoint, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that loads and verifies, and each newer one refused (path,
    reason). For resuming: the caller reports the refused ones."""
    bad: list[tuple[Path, str]] = []
    for p in checkpoint_candidates(run_dir):
        try:
            return _load_dir(p), bad
        except CheckpointError as e:
            bad.append((p, str(e)))
    if bad:
        raise CheckpointError(
            f"no intact checkpoint in {run_dir}: " + "; ".join(reason for _, reason in bad)
        )
    find_checkpoint(run_dir)  # raises the not-found error
    raise CheckpointError(f"no checkpoint in {run_dir}")


def load_model(
    path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu",
    compile: bool | None = None, precision: Precision | None = None,
) -> tuple[DiffusionODE, LoadedCheckpoint]:  # fmt: skip
    """The model of a checkpoint with its EMA (default) or raw weights, in eval mode.

    Refuses ``ema=True`` without EMA weights, and weights holding NaN/inf. ``compile`` /
    ``precision``: None takes the checkpoint's ``model.compile`` / ``model.precision``.
    """
    ck = load_checkpoint(path)
    if not ck.data_shape:
        raise CheckpointError(f"checkpoint {ck.path} does not record the data shape")
    cfg, shape = ck.config, ck.data_shape
    model = build_model(cfg, shape, ck.num_levels, compile=compile, precision=precision)
    ck.load_into(model, "ema" if ema else "model")
    return model.to(device).eval(), ck
