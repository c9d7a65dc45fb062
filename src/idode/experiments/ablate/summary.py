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
    """results.json's summary of per-example values (``Summary.to_json``: mean, stderr, ci95,
    std, n; stderr, ci95 and std are None for a single value)."""
    return summarize(np.asarray(values, dtype=np.float64).ravel()).to_json()


def paired_stat(a: Any, b: Any) -> dict[str, Any]:
    """results.json's summary of the paired differences a - b [n], with the two means."""
    return {**paired(a, b).to_json(), "a_mean": float(np.mean(a)), "b_mean": float(np.mean(b))}
