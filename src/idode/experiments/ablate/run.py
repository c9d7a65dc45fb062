"""The ablation driver: plan the grid, run its jobs, collect results.json, render the report.

Outputs: ``OUT/results.json`` (every number of the report, the settings and the timings),
``OUT/per_example.json`` (the per-image values behind the intervals), ``OUT/figures/*.png``,
``OUT/results.md`` and the runs in ``OUT/runs/``. ``idode ablate --render OUT/results.json
--docs docs`` regenerates the figures and ``docs/results.md`` from the JSON alone.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from idode.experiments.ablate.grid import RUNS, AblationSettings, Preset, ablation_settings

__all__ = ["render_docs", "run_ablation"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _default_workers() -> int:
    env = os.environ.get("IDODE_ABLATE_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


def _meta(
    settings: AblationSettings, preset: str, command: str, out: Path, t0: float, workers: int, load
) -> dict[str, Any]:
    """Provenance of the run: commands, machine, versions and wall time."""
    import numpy as np
    import torch

    docs = "docs" if preset == "digits" else f"docs/{preset}"
    return {
        "command": command,
        "render_command": f"idode ablate --render {out}/results.json --docs {docs}",
        "preset": preset,
        "quick": settings.quick,
        "started_unix": t0,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)),
        "wall_s": time.time() - t0,
        "workers": workers,
        "threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "load_average_at_start": list(load) if load else None,
        "load_average_at_end": list(os.getloadavg()) if load else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_ablation(
    preset: Preset | str = "digits",
    out: str | os.PathLike = "runs/ablate",
    *,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
    workers: int | None = None,
    docs_dir: str | os.PathLike | None = None,
) -> Path:
    """Train and evaluate the grid; write results.json, per_example.json, figures/ and
    results.md into ``out`` (its runs/ are replaced). Returns the path of results.json.

    workers: processes with one thread each (default: min(2, cpu count), or the environment
        variable IDODE_ABLATE_WORKERS). docs_dir: also write results.json, figures/ and
        results.md there (see ``render_docs``).
    """
    from tqdm.auto import tqdm

    from idode.experiments.ablate.collect import collect, stage_line
    from idode.experiments.ablate.jobs import init_worker, plan
    from idode.experiments.ablate.scheduler import Job, JobRecord, run_jobs
    from idode.rundir import write_json_atomic

    settings = ablation_settings(preset, steps=steps, quick=quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = _default_workers() if workers is None else max(1, int(workers))
    jobs = plan(settings, out)
    command = f"idode ablate --preset {preset}" + (f" --steps {steps}" if steps else "")
    command += (" --quick" if quick else "") + f" --out {out}"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.time()
    print(
        f"[idode ablate] {settings.dataset}: {len(RUNS)} runs x {settings.steps} steps, "
        f"{len(jobs)} jobs on {workers} worker(s) into {out}",
        flush=True,
    )
    remaining: dict[str, int] = {}
    for j in jobs:
        remaining[j.stage] = remaining.get(j.stage, 0) + 1

    def on_done(job: Job, done: dict[str, JobRecord]) -> None:
        remaining[job.stage] -= 1
        if remaining[job.stage] == 0:
            tqdm.write(stage_line(job.stage, jobs, done))

    done = run_jobs(
        jobs, workers, progress=progress, on_done=on_done, initializer=init_worker, desc="ablate"
    )
    meta = _meta(settings, str(preset), command, out, t0, workers, load)
    results, raw = collect(settings, jobs, done, meta)
    # allow_nan=False: a NaN anywhere in the results is a bug, not a number to report
    write_json_atomic(out / "per_example.json", raw, indent=None, allow_nan=False)
    write_json_atomic(out / "results.json", results.to_json(), allow_nan=False)
    render_docs(out / "results.json", out)  # figures and report from the JSON on disk alone
    print(f"[idode ablate] done in {meta['wall_s'] / 60:.1f} min: {out / 'results.md'}", flush=True)
    if docs_dir is not None:
        render_docs(out / "results.json", docs_dir)
    return out / "results.json"


def render_docs(results_json: str | os.PathLike, docs_dir: str | os.PathLike) -> Path:
    """Copy results.json into ``docs_dir`` and regenerate figures/ and results.md from it."""
    from idode.experiments.ablate.figures import make_figures
    from idode.experiments.ablate.report import render_results_md
    from idode.rundir import read_json, write_text_atomic

    src = Path(results_json)
    results = read_json(src)
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    dst = docs / "results.json"
    if not dst.exists() or not os.path.samefile(src, dst):
        write_text_atomic(dst, src.read_text())
    make_figures(results, docs / "figures")
    return write_text_atomic(docs / "results.md", render_results_md(results, "figures"))
