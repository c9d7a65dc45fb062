"""Run a graph of jobs in worker processes: dependencies first, the longest ready job first.

The scheduler knows nothing of what the jobs compute. A job is a module-level function of
picklable arguments (it runs in a spawned process) that returns a picklable value; a job starts
once every job it depends on has finished. With ``workers <= 1`` the jobs run one after another
in this process, in the same order rule, so a result never depends on the number of workers
unless the jobs themselves share state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "JobFailed", "JobRecord", "run_jobs"]


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(*args)`` once the jobs named in ``deps`` have finished.

    ``stage`` and ``group`` are free labels for the caller (e.g. to merge the chunks of one
    group); ``cost`` is a rough duration in seconds, to start long jobs first.
    """

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    deps: tuple[str, ...] = ()
    cost: float = 1.0
    stage: str = ""
    group: str = ""


@dataclass(frozen=True)
class JobRecord:
    """A finished job: its return value, its wall time in seconds and its start (Unix time)."""

    result: Any
    wall_s: float
    start: float


class JobFailed(RuntimeError):
    """A job raised; the message names the job and the original error is its cause."""


def _timed(fn: Callable[..., Any], *args: Any) -> JobRecord:
    start = time.time()
    tic = time.perf_counter()
    result = fn(*args)
    return JobRecord(result=result, wall_s=time.perf_counter() - tic, start=start)


def _check_graph(jobs: list[Job]) -> None:
    keys = [j.key for j in jobs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"job keys must be unique; repeated: {dup}")
    known = set(keys)
    for j in jobs:
        missing = [d for d in j.deps if d not in known]
        if missing:
            raise ValueError(f"job {j.key!r} depends on unknown job(s) {missing}")
    # a cycle leaves jobs that never become ready: find them before running anything
    done: set[str] = set()
    pending = {j.key: j for j in jobs}
    while pending:
        ready = [k for k, j in pending.items() if all(d in done for d in j.deps)]
        if not ready:
            raise ValueError(f"the job dependencies form a cycle among {sorted(pending)}")
        for k in ready:
            done.add(k)
            del pending[k]


def run_jobs(
    jobs: list[Job],
    workers: int,
    *,
    progress: bool = True,
    on_done: Callable[[Job, dict[str, JobRecord]], None] | None = None,
    initializer: Callable[[], None] | None = None,
    desc: str = "jobs",
) -> dict[str, JobRecord]:
    """Run ``jobs`` in dependency order, the costliest ready job first, in ``workers`` spawned
    processes (``initializer`` runs once in each) or, with workers <= 1, in this process.

    ``on_done(job, finished)`` is called in this process after each job. Returns
    {job key: JobRecord}. A failing job cancels the ones not yet started and raises JobFailed.
    """
    from tqdm.auto import tqdm

    _check_graph(jobs)
    done: dict[str, JobRecord] = {}
    pending = {j.key: j for j in jobs}
    bar = tqdm(
        total=len(jobs),
        desc=desc,
        unit="job",
        dynamic_ncols=True,
        disable=not progress or os.environ.get("IDODE_NO_PROGRESS") == "1",
    )

    def ready() -> list[Job]:
        r = [j for j in pending.values() if all(d in done for d in j.deps)]
        return sorted(r, key=lambda j: -j.cost)

    def finish(job: Job, record: JobRecord) -> None:
        done[job.key] = record
        bar.update(1)
        bar.set_postfix_str(f"{job.key} {record.wall_s:.0f}s", refresh=False)
        if on_done is not None:
            on_done(job, done)

    try:
        if workers <= 1:
            while pending:
                job = ready()[0]
                del pending[job.key]
                try:
                    record = _timed(job.fn, *job.args)
                except Exception as e:
                    raise JobFailed(f"job {job.key} failed: {e}") from e
                finish(job, record)
            return done
        _run_pool(pending, workers, ready, finish, initializer)
        return done
    finally:
        bar.close()


def _run_pool(
    pending: dict[str, Job],
    workers: int,
    ready: Callable[[], list[Job]],
    finish: Callable[[Job, JobRecord], None],
    initializer: Callable[[], None] | None,
) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # never fork a process that holds (torch) threads
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer) as pool:
        running: dict[Any, Job] = {}
        while pending or running:
            for job in ready():
                if len(running) >= workers:
                    break
                del pending[job.key]
                running[pool.submit(_timed, job.fn, *job.args)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    record = fut.result()
                except Exception as e:
                    for f in running:
                        f.cancel()
                    raise JobFailed(f"job {job.key} failed: {e}") from e
                finish(job, record)
