"""The generic job scheduler on toy jobs (no diffusion): order, dependencies, workers, failures."""

import os

import pytest

from idode.experiments.ablate.scheduler import Job, JobFailed, run_jobs


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def boom(msg: str) -> None:
    raise ValueError(msg)


def _diamond() -> list[Job]:
    return [
        Job("a", square, (3,), cost=1.0),
        Job("b", square, (4,), deps=("a",), cost=5.0),
        Job("c", add, (1, 2), deps=("a",), cost=9.0),
        Job("d", add, (10, 20), deps=("b", "c"), cost=1.0),
        Job("e", square, (5,), cost=0.5),
    ]


def test_in_process_order_respects_deps_then_cost():
    order = []
    done = run_jobs(_diamond(), 1, progress=False, on_done=lambda j, _: order.append(j.key))
    assert {k: r.result for k, r in done.items()} == {"a": 9, "b": 16, "c": 3, "d": 30, "e": 25}
    # the ready jobs by decreasing cost: a (1) before e (0.5); then c (9), b (5); then d (1)
    # became ready and costs more than e
    assert order == ["a", "c", "b", "d", "e"]
    for r in done.values():
        assert r.wall_s >= 0 and r.start > 0


def test_worker_processes_give_the_same_results():
    seen: list[tuple[str, set[str]]] = []

    def on_done(job, finished):
        seen.append((job.key, set(finished)))

    jobs = [*_diamond(), Job("pid", pid)]
    done = run_jobs(jobs, 2, progress=False, on_done=on_done)
    pid_here = done.pop("pid").result
    assert {k: r.result for k, r in done.items()} == {"a": 9, "b": 16, "c": 3, "d": 30, "e": 25}
    # every job finished after its dependencies
    deps = {j.key: j.deps for j in jobs}
    for key, finished in seen:
        assert set(deps[key]) <= finished - {key}
    assert pid_here != os.getpid()  # the jobs ran in worker processes


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_names_itself(workers):
    jobs = [Job("ok", square, (2,)), Job("bad", boom, ("no luck",), deps=("ok",))]
    with pytest.raises(JobFailed, match="job bad failed: no luck") as info:
        run_jobs(jobs, workers, progress=False)
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_graphs_are_refused_before_running():
    with pytest.raises(ValueError, match="unknown job"):
        run_jobs([Job("a", square, (1,), deps=("z",))], 1, progress=False)
    with pytest.raises(ValueError, match="unique"):
        run_jobs([Job("a", square, (1,)), Job("a", square, (2,))], 1, progress=False)
    ran = []
    cycle = [Job("a", square, (1,), deps=("b",)), Job("b", square, (2,), deps=("a",))]
    with pytest.raises(ValueError, match="cycle"):
        run_jobs(cycle, 1, progress=False, on_done=lambda j, _: ran.append(j.key))
    assert ran == []
