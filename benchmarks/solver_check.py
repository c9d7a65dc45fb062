"""What the solver-error check of ``idode eval`` costs, measured again on a finished evaluation.

Reads an evaluation folder (``per_example.jsonl`` and ``eval.json``, any idode version that
wrote ``log_p_model_nats`` and ``steps_per_draw`` per row), loads its checkpoint and split, and
runs ``idode.certify.check_rows`` (the check ``idode eval`` runs at its end) with today's code:
the reference 100x tighter with the network in float64, and its own check against a second
method. Prints where the check's NFE go and its overhead, for the default check size and for
larger splits (the default is max(8, 2 %) of the jobs: the minimum of 8 jobs dominates small
splits).

    python benchmarks/solver_check.py --eval-dir /tmp/certify/ev_1e5 \\
        --checkpoint /tmp/certify/digits
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from idode import certify  # noqa: E402
from idode.checkpoint import load_model  # noqa: E402
from idode.data import dataset_from_config  # noqa: E402
from idode.evalfiles import read_per_example  # noqa: E402
from idode.protocol import Protocol  # noqa: E402


def _protocol(settings: dict) -> Protocol:
    names = set(Protocol.field_names())
    return Protocol.from_json({k: v for k, v in settings.items() if k in names})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-dir", required=True, help="a finished evaluation folder")
    p.add_argument("--checkpoint", required=True, help="its checkpoint or run folder")
    p.add_argument("--check", default=None, help="solver_check: a count or a fraction")
    p.add_argument("--out", default=None, help="write the report (markdown) here too")
    args = p.parse_args(argv)
    ev_dir = Path(args.eval_dir)
    settings = json.loads((ev_dir / "eval.json").read_text())["settings"]
    check = None if args.check is None else float(args.check)
    protocol = _protocol(settings).replace(solver_check=check)
    model, ck = load_model(args.checkpoint, ema=settings.get("ema", True))
    ds = dataset_from_config(ck.config.data, settings["split"])
    rows = sorted(read_per_example(ev_dir).values(), key=lambda r: r["index"])
    x_all = ds.as_tensor()
    report = certify.check_rows(model, x_all, rows, ds.num_levels, protocol,
                                num_examples=len(rows), batch_size=64, warn=False)  # fmt: skip
    se = report.as_dict()
    conv = se["reference"]["convergence"]
    ref_nfe = sum(j["reference_nfe"] for j in se["jobs"])
    own_nfe = sum(j["nfe"] for j in se["jobs"])
    per_job = ref_nfe / own_nfe  # a checked job's reference over its own evaluation NFE
    n_jobs = len(rows) * protocol.num_samples
    mean_nfe = se["eval_nfe"] / n_jobs
    lines = [
        f"`python benchmarks/solver_check.py --eval-dir {args.eval_dir} --checkpoint "
        f"{args.checkpoint}" + (f" --check {args.check}" if args.check else "") + "` "
        f"({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s))",
        "",
        f"Evaluation: {len(rows)} images of {ds.name}/{settings['split']}, rtol {protocol.rtol:g},"
        f" atol {protocol.atol:g}, tolerance {protocol.tolerance}; {se['eval_nfe']:,} NFE "
        f"({mean_nfe:.0f} per job).",
        "",
        "| | value |",
        "|---|---:|",
        f"| checked jobs | {se['checked']} of {n_jobs} |",
        f"| measured error max / mean abs / mean signed (bits/dim) | {se['max_abs_bpd']:.4f} / "
        f"{se['mean_abs_bpd']:.4f} / {se['mean_signed_bpd']:+.4f} |",
        f"| reference ({se['reference']['method']}, rtol {se['reference']['rtol']:g}, float64) "
        f"NFE | {ref_nfe:,} ({per_job:.2f}x the checked jobs' own {own_nfe:,}) |",
        f"| reference's own check ({conv.get('method')} at the same tolerances, "
        f"{conv['jobs']} jobs) NFE | {conv.get('nfe', 0):,}; max gap "
        f"{conv.get('max_abs_diff_bpd', 0):.2g} bits/dim |",
        f"| check NFE / evaluation NFE | {se['check_nfe']:,} / {se['eval_nfe']:,} = "
        f"**{100 * se['nfe_overhead']:.1f} %** |",
        f"| wall (check) | {se['seconds']:.0f} s |",
        "",
        "Projected overhead of the default check (max(8, 2 %) of N jobs at this per-job ratio, "
        "plus the fixed convergence solves):",
        "",
        "| N jobs | checked | overhead |",
        "|---:|---:|---:|",
    ]
    for n in (300, 1000, 3000, 10000, 50000):
        m = certify.num_check_jobs(n)
        frac = (m * per_job * mean_nfe + conv.get("nfe", 0)) / (n * mean_nfe)
        lines.append(f"| {n:,} | {m} | {100 * frac:.1f} % |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: se[k] for k in ("checked", "max_abs_bpd", "nfe_overhead")}),
          file=sys.stderr)  # fmt: skip
    assert math.isfinite(se["max_abs_bpd"])


if __name__ == "__main__":
    main()
