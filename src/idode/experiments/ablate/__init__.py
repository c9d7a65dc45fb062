"""``idode ablate``: the paper's claims (method.md §9) tested at CPU scale, with error bars.

- ``grid``: the training runs, the claims and the settings (``ablation_settings``);
- ``jobs``: the job functions (train, finetune, ODE bounds, variance) and the plan of the grid;
- ``scheduler``: a generic dependency-ordered job runner over worker processes;
- ``summary``: results.json's summary of values and of paired differences (jobs and collect);
- ``collect``: the finished jobs -> ``AblationResults`` (results.json) with paired intervals;
- ``report`` and ``figures``: results.md and its figures, from results.json alone;
- ``run``: ``run_ablation`` and ``render_docs`` (``idode ablate --render``).
"""

from idode.experiments.ablate.figures import FIGURES, make_figures
from idode.experiments.ablate.grid import CLAIMS, RUNS, AblationSettings, ablation_settings
from idode.experiments.ablate.report import render_results_md
from idode.experiments.ablate.run import render_docs, run_ablation

__all__ = [
    "CLAIMS",
    "FIGURES",
    "RUNS",
    "AblationSettings",
    "ablation_settings",
    "make_figures",
    "render_docs",
    "render_results_md",
    "run_ablation",
]
