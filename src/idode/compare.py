"""Paired comparison of two evaluations of the same examples (``idode compare EVAL_A EVAL_B``).

Two evaluation folders (``idode eval --out``) are compared example by example: the difference
A - B of each example's bits/dim (and of its SDE bound and NFE, when both sides have them) is
summarized by ``idode.stats.paired`` (mean, standard error, 95% interval), the interval the
ablation study uses too; per-example noise shared by both sides cancels in it.

The examples must be the same, or the comparison is refused with one line:

- eval.json's ``dataset.content_hash`` (the evaluated images, in evaluation order) must be equal;
- the rows must carry the same example indices (and image file names, where present).

Evaluations of different sizes (another ``--max-examples`` or ``--subset``) have different
hashes and are refused, even when one holds the other's examples: their content hashes cannot
show that the shared examples are the same images, so nothing is matched on trust. Evaluate
both with the same ``--max-examples`` and ``--subset``.

Output (``--out``, default ``compare_A_vs_B`` beside EVAL_A): ``report.md``, ``compare.json``
and ``scatter.png``, each written atomically; a folder holding any of these three files that
``idode compare`` did not write is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from idode.evalfiles import RESULT_FILE, read_per_example
from idode.rundir import (
    jsonable,
    read_json,
    write_bytes_atomic,
    write_figure_atomic,
    write_json_atomic,
)
from idode.stats import paired, summarize, verdict
from idode.validation import InputError

__all__ = ["CompareError", "Evaluation", "compare", "default_compare_dir", "load_evaluation"]

REPORT_FILE, JSON_FILE, SCATTER_FILE = "report.md", "compare.json", "scatter.png"
KIND = "idode compare"
# the per-example values compared, when both evaluations have them: (row key, label)
METRICS = (("bpd", "bits/dim (ODE)"), ("elbo_bpd", "SDE bound, bits/dim"), ("nfe", "NFE"))
_RERUN = "evaluate both with the same data, split, --max-examples and --subset"


class CompareError(InputError):
    """Two evaluations that cannot be compared (other examples, unfinished, unreadable)."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A finished evaluation: its folder, eval.json, and its rows in evaluation order."""

    path: Path
    result: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def content_hash(self) -> str:
        return str(self.result["dataset"]["content_hash"])


def load_evaluation(path: str | os.PathLike) -> Evaluation:
    """An evaluation folder (or its eval.json) with the rows eval.json summarizes."""
    p = Path(path).expanduser()
    folder = p.parent if p.name == RESULT_FILE else p
    if not (folder / RESULT_FILE).is_file():
        what = "does not exist" if not folder.exists() else f"holds no {RESULT_FILE}"
        raise CompareError(
            f"{folder} {what}, so it is no finished evaluation; name the folder `idode eval "
            f"--out` wrote (rerun that command to finish an interrupted one)"
        )
    try:
        result = read_json(folder / RESULT_FILE)
    except ValueError as e:
        raise CompareError(f"{e}") from None
    dataset = result.get("dataset") if isinstance(result, dict) else None
    if not isinstance(dataset, dict) or "content_hash" not in dataset:
        raise CompareError(
            f"{folder / RESULT_FILE} records no dataset content hash (an older idode wrote it), "
            f"so its examples cannot be matched; evaluate again with this idode"
        )
    info = dataset.get("info") or {}
    ids = (info.get("subset") or {}).get("indices") or range(int(dataset["num_examples"]))
    done = read_per_example(folder)
    missing = [i for i in ids if i not in done]
    if missing:
        raise CompareError(
            f"{folder} lacks the per-example results of examples {missing[:5]} that its "
            f"{RESULT_FILE} summarizes; rerun its `idode eval` to recompute them"
        )
    return Evaluation(folder, result, [done[i] for i in ids])


def _check_same_examples(a: Evaluation, b: Evaluation) -> None:
    """One line when a and b did not evaluate the same examples."""
    na, nb = len(a.rows), len(b.rows)
    if na != nb:
        raise CompareError(
            f"{a.path} evaluated {na} examples and {b.path} {nb}: a paired comparison needs the "
            f"same examples; {_RERUN}"
        )
    if a.content_hash != b.content_hash:
        da, db = a.result["dataset"], b.result["dataset"]
        raise CompareError(
            f"{a.path} and {b.path} evaluated different images ({da.get('name')}/"
            f"{da.get('split')} {a.content_hash[:19]}... vs {db.get('name')}/{db.get('split')} "
            f"{b.content_hash[:19]}...); {_RERUN}"
        )
    for ra, rb in zip(a.rows, b.rows, strict=True):
        if ra["index"] != rb["index"] or ra.get("file") != rb.get("file"):
            raise CompareError(
                f"{a.path} and {b.path} hold the same images but as other examples (example "
                f"{ra['index']} {ra.get('file') or ''} vs {rb['index']} {rb.get('file') or ''}); "
                f"{_RERUN}"
            )


def default_compare_dir(a: str | os.PathLike, b: str | os.PathLike) -> Path:
    """compare_<A>_vs_<B> beside the folder of A."""
    fa, fb = (Path(p).parent if Path(p).name == RESULT_FILE else Path(p) for p in (a, b))
    return fa.resolve().parent / f"compare_{fa.resolve().name}_vs_{fb.resolve().name}"


def _check_out(out: Path) -> None:
    """Refuse a folder whose report files were not written by ``idode compare``."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; name a folder")
    ours = out / JSON_FILE
    if ours.is_file():
        try:
            if read_json(ours).get("kind") == KIND:
                return
        except (ValueError, AttributeError):
            pass
    taken = [n for n in (REPORT_FILE, JSON_FILE, SCATTER_FILE) if (out / n).exists()]
    if taken:
        raise CompareError(
            f"{out} holds {', '.join(taken)} that idode compare did not write; choose another "
            f"--out (nothing there was changed)"
        )


def _side(e: Evaluation) -> dict[str, Any]:
    r = e.result
    return {
        "path": str(e.path),
        "checkpoint": r.get("checkpoint"),
        "settings": r.get("settings", {}),
        "solver_error": r.get("solver_error"),
    }


def _metric(a: list[float], b: list[float]) -> dict[str, Any]:
    d = paired(a, b)
    reading = {"held": "A higher", "did not hold": "A lower", "inconclusive": "no difference"}
    return {
        "a": dataclasses.asdict(summarize(a)),
        "b": dataclasses.asdict(summarize(b)),
        "a_minus_b": dataclasses.asdict(d),
        # the interval of A - B above 0: A higher; below 0: A lower; containing 0 (or n < 2):
        # no difference shown at this n
        "verdict": reading[verdict(d.ci95)],
    }


def compare(
    eval_a: str | os.PathLike, eval_b: str | os.PathLike, out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The paired comparison A - B of two evaluations of the same examples; writes report.md,
    compare.json and scatter.png into ``out`` (default ``default_compare_dir``) and returns
    compare.json's content. Raises ``CompareError`` (one line) when the examples differ."""
    a, b = load_evaluation(eval_a), load_evaluation(eval_b)
    _check_same_examples(a, b)
    out_dir = Path(out).expanduser() if out is not None else default_compare_dir(eval_a, eval_b)
    _check_out(out_dir)
    metrics = {
        key: _metric([float(r[key]) for r in a.rows], [float(r[key]) for r in b.rows])
        for key, _ in METRICS
        if all(key in r for r in a.rows + b.rows)
    }
    sa, sb = a.result.get("settings", {}), b.result.get("settings", {})
    differ = {k: [sa.get(k), sb.get(k)] for k in sorted({*sa, *sb}) if sa.get(k) != sb.get(k)}
    ds = a.result["dataset"]
    report = {
        "kind": KIND,
        "a": _side(a),
        "b": _side(b),
        "examples": {"n": len(a.rows), "content_hash": a.content_hash, "dataset": ds.get("name"),
                     "split": ds.get("split"), "subset": (ds.get("info") or {}).get("subset")},
        "metrics": metrics,
        "settings_that_differ": differ,
        "note": "A - B per example; interval: mean +- 1.96 standard errors of the paired "
        "differences (idode.stats.paired)",
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    report["files"] = {
        "report": str(out_dir / REPORT_FILE),
        "json": str(out_dir / JSON_FILE),
        "scatter": str(_scatter(out_dir / SCATTER_FILE, a, b, metrics["bpd"])),
    }
    report = jsonable(report)
    write_bytes_atomic(out_dir / REPORT_FILE, _markdown(report).encode())
    write_json_atomic(out_dir / JSON_FILE, report)
    return report


def _scatter(path: Path, a: Evaluation, b: Evaluation, bpd: dict[str, Any]) -> Path:
    from matplotlib.figure import Figure

    xa, xb = [r["bpd"] for r in a.rows], [r["bpd"] for r in b.rows]
    fig = Figure(figsize=(4.6, 4.4), dpi=120)
    ax = fig.add_subplot()
    ax.scatter(xa, xb, s=10, alpha=0.6, color="#4c72b0", linewidths=0)
    lo, hi = min(min(xa), min(xb)), max(max(xa), max(xb))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--", label="A = B")
    ax.set_xlabel(f"A: {a.path.name}  (bits/dim)", fontsize=8)
    ax.set_ylabel(f"B: {b.path.name}  (bits/dim)", fontsize=8)
    ax.set_title(f"per example, n={len(xa)}; {_diff_text(bpd['a_minus_b'])}", fontsize=8)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return write_figure_atomic(path, fig)


def _diff_text(d: dict[str, Any]) -> str:
    """'A - B = +0.0123 (95% CI +0.0045 .. +0.0201)' (the interval needs n >= 2)."""
    if d["ci95"] is None:
        return f"A - B = {d['mean']:+.4g} (n=1: no interval)"
    lo, hi = d["ci95"]
    return f"A - B = {d['mean']:+.4g} (95% CI {lo:+.4g} .. {hi:+.4g})"


def summary_line(report: dict[str, Any]) -> str:
    """The one line ``idode compare`` prints: the paired bits/dim difference and its reading."""
    m = report["metrics"]["bpd"]
    d = m["a_minus_b"]
    return f"bits/dim {_diff_text(d)}, n={d['n']}, paired: {m['verdict']}"


def _pm(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f}" + ("" if s["stderr"] is None else f" ± {s['stderr']:.4f}")


def _ci(s: dict[str, Any]) -> str:
    return "n < 2" if s["ci95"] is None else f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "—" if v is None else str(v).replace("|", "\\|")


def _markdown(r: dict[str, Any]) -> str:
    ex, a, b = r["examples"], r["a"], r["b"]
    lines = [
        "# Paired comparison of two evaluations",
        "",
        f"- A: `{a['path']}`" + (f" (checkpoint step {a['checkpoint'].get('step')})"
                                 if isinstance(a["checkpoint"], dict) else ""),
        f"- B: `{b['path']}`" + (f" (checkpoint step {b['checkpoint'].get('step')})"
                                 if isinstance(b["checkpoint"], dict) else ""),
        f"- the same {ex['n']} examples of {ex['dataset']}/{ex['split']} on both sides "
        f"(content hash `{ex['content_hash']}`)",
        "",
        "| per example | A: mean ± SE | B: mean ± SE | A − B (paired) | 95% interval | reading |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, label in METRICS:
        if key in r["metrics"]:
            m = r["metrics"][key]
            d = m["a_minus_b"]
            lines.append(
                f"| {label} | {_pm(m['a'])} | {_pm(m['b'])} | {_pm(d)} | {_ci(d)} | "
                f"{m['verdict']} |"
            )
    lines += ["", f'{r["note"]}; "no difference": the interval contains 0.', ""]
    lines += ["## Solver error", "", "| field | A | B |", "|---|---|---|"]
    ea, eb = a["solver_error"] or {}, b["solver_error"] or {}
    # the scalar fields; the per-job rows and the reference's settings stay in compare.json
    keys = [k for k, v in {**ea, **eb}.items() if k != "note" and not isinstance(v, dict | list)]
    lines += [f"| {k} | {_cell(ea.get(k))} | {_cell(eb.get(k))} |" for k in keys]
    if not keys:
        lines.append("| (none recorded) | | |")
    lines += [f"\n{side}: {e['note']}" for side, e in (("A", ea), ("B", eb)) if e.get("note")]
    lines += ["", "## Settings that differ", ""]
    if r["settings_that_differ"]:
        lines += ["| setting | A | B |", "|---|---|---|"]
        lines += [
            f"| {k} | {_cell(va)} | {_cell(vb)} |"
            for k, (va, vb) in r["settings_that_differ"].items()
        ]
    else:
        lines.append("(none)")
    lines += ["", f"![per-example bits/dim, A vs B]({SCATTER_FILE})", ""]
    return "\n".join(lines)
