"""Figures for the reports of the studies: learning curves and bits/dim bars (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from idode.rundir import atomic_path

__all__ = ["new_figure", "plot_bars", "plot_learning_curves", "pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.0)):
    """(figure, axes) at the reports' size and resolution; ``ncols`` axes side by side."""
    return pyplot().subplots(1, ncols, figsize=figsize, dpi=120)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    pyplot().close(fig)
    return path


def plot_learning_curves(
    curves: dict[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    ylabel: str = "bits/dim",
    reference: tuple[str, float] | None = None,
) -> Path:
    """One line per named series of (step, value); an optional horizontal reference line."""
    fig, ax = new_figure()
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 15 else None, ms=3)
    if reference is not None:
        ax.axhline(reference[1], color="grey", ls="--", lw=1, label=reference[0])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(
    labels: Sequence[str],
    values: Sequence[float],
    errors: Sequence[float] | None,
    path: str | os.PathLike,
    *,
    title: str = "",
    ylabel: str = "bits/dim",
    reference: tuple[str, float] | None = None,
) -> Path:
    """Bars with 95% error bars (``errors`` are half-widths) and value labels."""
    fig, ax = new_figure()
    xs = range(len(labels))
    bars = ax.bar(xs, values, yerr=errors, capsize=4, color="#4C72B0")
    for rect, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:.3f}",
            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    if reference is not None:
        ax.axhline(reference[1], color="grey", ls="--", lw=1, label=reference[0])
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), labels, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
