"""results.json's summary of per-example values and of paired differences.

Below both the jobs (the variance job summarises its batches) and ``collect`` (every paired
comparison), so that neither imports the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from idode.stats import paired, summarize

__all__ = ["paired_stat", "stat"]


def stat(values: Any) -> dict[str, Any]:
    """results.json's summary of per-example values: mean, se, ci95, sd, n (se, ci95 and sd are
    None for a single value)."""
    s = summarize(np.asarray(values, dtype=np.float64).ravel())
    ci = list(s.ci95) if s.ci95 is not None else None
    return {"mean": s.mean, "se": s.stderr, "ci95": ci, "sd": s.std, "n": s.n}


def paired_stat(a: Any, b: Any) -> dict[str, Any]:
    """results.json's summary of the paired differences a - b [n], with the two means."""
    s = paired(a, b)
    ci = list(s.ci95) if s.ci95 is not None else None
    return {
        "mean": s.mean,
        "se": s.stderr,
        "ci95": ci,
        "sd": s.std,
        "n": s.n,
        "a_mean": float(np.mean(a)),
        "b_mean": float(np.mean(b)),
    }
