"""Statistics of per-example values: mean, standard error, the 95% interval, paired differences,
the bootstrap, log-mean-exp and the verdict of a claim. The one home of the 95% z value.

Intervals are normal intervals, mean +- Z95 standard errors, with the standard error of the mean
from the sample standard deviation (ddof = 1). One value has no spread: its standard error and
interval are ``None`` (a report then says the interval needs n >= 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "VERDICTS",
    "Z95",
    "Summary",
    "Verdict",
    "bootstrap",
    "logmeanexp",
    "paired",
    "percentile_interval",
    "summarize",
    "verdict",
]

# two-sided 95% quantile of the standard normal: Phi^-1(0.975)
Z95 = 1.959963984540054

Verdict = Literal["held", "did not hold", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("held", "did not hold", "inconclusive")


@dataclass(frozen=True)
class Summary:
    """Mean, standard error (std / sqrt n), 95% interval and standard deviation of n values;
    stderr, ci95 and std are None when n < 2."""

    mean: float
    stderr: float | None
    ci95: tuple[float, float] | None
    std: float | None
    n: int

    def to_json(self) -> dict[str, Any]:
        """The one JSON layout of a summary (eval.json, results.json): mean, stderr, ci95 (a
        list), std, n; None where n < 2."""
        ci = list(self.ci95) if self.ci95 is not None else None
        return {"mean": self.mean, "stderr": self.stderr, "ci95": ci, "std": self.std, "n": self.n}

    @property
    def halfwidth(self) -> float | None:
        """Half the width of the 95% interval (Z95 standard errors), None when n < 2."""
        return None if self.stderr is None else Z95 * self.stderr


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what} is empty: a summary needs at least one value")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"{what} holds {bad} non-finite value(s); a NaN or inf is a bug upstream")
    return x


def summarize(values: Sequence[float] | np.ndarray) -> Summary:
    """Summary of independent per-example values [n] (float64; exactly rounded sums)."""
    x = _values(values, "values")
    n = len(x)
    mean = math.fsum(x) / n
    if n < 2:
        return Summary(mean=mean, stderr=None, ci95=None, std=None, n=n)
    # corrected two-pass: the mean of values far from 0 may not be representable, and its rounding
    # error delta adds n delta^2 to sum (x - mean)^2; (sum d)^2 / n takes it out again (the
    # deviations d are exact, Sterbenz, and both sums exactly rounded)
    d = x - mean
    std = math.sqrt(max(math.fsum(d * d) - math.fsum(d) ** 2 / n, 0.0) / (n - 1))
    se = std / math.sqrt(n)
    return Summary(mean=mean, stderr=se, ci95=(mean - Z95 * se, mean + Z95 * se), std=std, n=n)


def paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> Summary:
    """Summary of the per-example differences a - b (a [n], b [n] measured on the same examples):
    the paired interval, much narrower than the two separate ones when a and b co-vary."""
    xa, xb = _values(a, "a"), _values(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(
            f"paired values must have one value per example on both sides, got {len(xa)} and "
            f"{len(xb)}"
        )
    return summarize(xa - xb)


def bootstrap(
    statistic: Callable[[np.ndarray], float | Sequence[float]],
    n: int,
    resamples: int,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """statistic(idx) over ``resamples`` bootstrap index sets idx [n] (n draws with replacement
    from range(n)); [resamples] or [resamples, m] float64. Passing the same idx to several
    statistics gives a paired bootstrap."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs n >= 1 and resamples >= 1, got n={n}, {resamples=}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return np.asarray(
        [statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=np.float64
    )


def percentile_interval(samples: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap samples [R] (linear interpolation)."""
    x = _values(samples, "bootstrap samples")
    return float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))


def logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(mean(exp(x))) along ``axis`` without overflow (the max is factored out)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).mean(axis=axis, keepdims=True))).squeeze(axis)


def verdict(ci: Sequence[float] | None, null: float = 0.0) -> Verdict:
    """held: the interval lies above ``null`` (the claimed side); did not hold: below it;
    inconclusive: it contains ``null`` (or there is no interval, n < 2)."""
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    if lo > null:
        return "held"
    if hi < null:
        return "did not hold"
    return "inconclusive"
