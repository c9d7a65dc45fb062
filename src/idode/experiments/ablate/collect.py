"""The finished jobs -> results.json (``AblationResults``) and per_example.json.

Every difference between two models is paired per image (``idode.stats.paired``): effect = mean
paired difference, 95% interval = +-Z95 standard errors of the paired differences. Variance ratios
carry the paired bootstrap interval computed by the variance job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from idode.experiments.ablate.grid import CLAIMS, FT1, FT2, MODEL_LABELS, RUN_LABELS, RUNS
from idode.experiments.ablate.jobs import (
    FinetuneOutcome,
    OdeOutcome,
    TrainOutcome,
    VarianceOutcome,
)
from idode.experiments.ablate.scheduler import Job, JobRecord
from idode.experiments.ablate.summary import paired_stat, stat
from idode.stats import summarize, verdict

__all__ = ["AblationResults", "Claim", "collect", "stage_line"]


def ode_bpd(m: OdeOutcome, draws: int | None = None, group: int | None = None):
    """Bits/dim of the bounds of ``m`` by the library's one assembly of per-draw terms
    (``dequantization_bounds``): its ``bpd_mean_of_bounds`` and ``bpd_importance_weighted``
    columns over the first ``draws`` draws (all: None) [n], or per group of ``group``
    consecutive draws [n, K / group]."""
    import torch

    from idode.dequantization import dequantization_bounds

    terms = [torch.from_numpy(np.asarray(v, np.float64)[:, :draws]) for v in
             (m.log_p_model, m.log_decoder, m.log_q)]  # fmt: skip
    elq = torch.from_numpy(np.asarray(m.expected_log_q, np.float64))
    if group is not None:
        terms = [t.reshape(len(t), -1, group) for t in terms]
        elq = elq[:, None].expand(terms[0].shape[:2])
    cols = dequantization_bounds(*terms, elq, m.num_dims)
    return {k: v.numpy() for k, v in cols.items()}


def first_draw_bpd(m: OdeOutcome) -> np.ndarray:
    """[n] bits/dim of each image's first draw (analytic entropy)."""
    return ode_bpd(m, draws=1)["bpd_mean_of_bounds"]


@dataclass(frozen=True)
class Claim:
    """One claim of method.md §9 with its effect, 95% interval and verdict."""

    id: str
    claim: str
    metric: str
    unit: str
    effect: float
    ci95: list[float] | None
    null: float
    verdict: str


@dataclass
class AblationResults:
    """Everything results.json holds, section by section (``asdict`` is the file's layout)."""

    meta: dict[str, Any]
    settings: dict[str, Any]
    run_configs: dict[str, list[str]]
    runs: dict[str, dict[str, Any]]
    ode: dict[str, dict[str, Any]]
    parameterization: dict[str, dict[str, Any]]
    time_sampling: dict[str, dict[str, Any]]
    variance: dict[str, VarianceOutcome]
    finetune: dict[str, Any]
    dequantization: dict[str, Any]
    schedule: dict[str, dict[str, Any]]
    claims: list[Claim]
    timing: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The results.json object (plain dicts and lists)."""
        return asdict(self)


def merge_ode(jobs: list[Job], done: dict[str, JobRecord], stage: str, group: str) -> OdeOutcome:
    """The ODE chunks of one group, concatenated in image order."""
    parts: list[OdeOutcome] = sorted(
        (done[j.key].result for j in jobs if j.stage == stage and j.group == group),
        key=lambda r: int(r.positions[0]),
    )
    return OdeOutcome(
        positions=np.concatenate([p.positions for p in parts]),
        log_p_model=np.concatenate([p.log_p_model for p in parts]),
        log_decoder=np.concatenate([p.log_decoder for p in parts]),
        log_q=np.concatenate([p.log_q for p in parts]),
        expected_log_q=np.concatenate([p.expected_log_q for p in parts]),
        nfe=np.concatenate([p.nfe for p in parts]),
        num_dims=parts[0].num_dims,
        batched_nfe=sum(p.batched_nfe for p in parts),
    )


def curve_compare(curves: dict[str, TrainOutcome], better: str, worse: str) -> dict[str, Any]:
    """Paired held-out SDE bound, ``worse`` minus ``better``, along the learning curve."""
    a, b = curves[better].sde, curves[worse].sde
    diff = b - a  # [S, n], > 0 where ``better`` is lower
    final_b = float(b[-1].mean())
    steps = curves[better].steps
    reach = next((st for st, row in zip(steps, a, strict=True) if row.mean() <= final_b), None)
    return {
        "better": better,
        "worse": worse,
        "steps": list(steps),
        "per_step": [stat(row) for row in diff],
        "curve_average": stat(diff.mean(0)),
        "final": stat(diff[-1]),
        "steps_to_reach_final_of_worse": reach,
    }


def _claim(cid: str, s: dict, unit: str, metric: str, null: float = 0.0) -> Claim:
    effect = s["ratio"] if "ratio" in s else s["mean"]
    ci = s["ci95"]
    v: str = verdict(ci, null)
    if cid == "C5":  # no claimed direction: positive = VP lower
        v = {"held": "VP lower", "did not hold": "SP lower", "inconclusive": "no difference"}[v]
    return Claim(cid, CLAIMS[cid], metric, unit, effect, list(ci) if ci else None, null, v)


def _runs(curves: dict[str, TrainOutcome]) -> dict[str, dict[str, Any]]:
    runs = {}
    for name, r in curves.items():
        runs[name] = {
            "label": RUN_LABELS[name],
            "overrides": list(RUNS[name]),
            "train_wall_s": r.train_s,
            "s_per_step": r.s_per_step,
            "curve": {
                "steps": r.steps,
                "mean": r.sde.mean(1).tolist(),
                "ci95_halfwidth": [summarize(row).halfwidth for row in r.sde],
            },
            "final_sde": stat(r.sde[-1]),
            "train_loss": r.train_loss,
            "train_grad_norm": r.train_grad_norm,
        }
    return runs


def _comparisons(curves: dict[str, TrainOutcome], o: dict[str, dict[str, np.ndarray]]):
    """The parameterization, time-sampling and schedule sections."""
    parameterization = {
        "velocity_vs_eps_is": curve_compare(curves, "velocity_is", "eps_is"),
        "velocity_vs_eps_uniform": curve_compare(curves, "velocity_uniform", "eps_uniform"),
        "ode_eps_is_minus_velocity_is": paired_stat(o["eps_is"]["bpd"], o["velocity_is"]["bpd"]),
        "ode_eps_uniform_minus_velocity_uniform": paired_stat(
            o["eps_uniform"]["bpd"], o["velocity_uniform"]["bpd"]
        ),
    }
    sampling = {
        "velocity_is_vs_uniform": curve_compare(curves, "velocity_is", "velocity_uniform"),
        "eps_is_vs_uniform": curve_compare(curves, "eps_is", "eps_uniform"),
        "ode_velocity_uniform_minus_is": paired_stat(
            o["velocity_uniform"]["bpd"], o["velocity_is"]["bpd"]
        ),
        "ode_eps_uniform_minus_is": paired_stat(o["eps_uniform"]["bpd"], o["eps_is"]["bpd"]),
    }
    schedule = {
        "vp_vs_sp": curve_compare(curves, "velocity_is", "velocity_is_sp"),
        "ode_sp_minus_vp": paired_stat(o["velocity_is_sp"]["bpd"], o["velocity_is"]["bpd"]),
        "nfe_sp_minus_vp": paired_stat(o["velocity_is_sp"]["nfe"], o["velocity_is"]["nfe"]),
    }
    return parameterization, sampling, schedule


def _finetune(settings, done, curves, runs, o) -> dict[str, Any]:
    """Second-order finetuning vs first-order continuation from the same checkpoint."""
    ft2: FinetuneOutcome = done[f"finetune/{FT2}"].result
    ft1: FinetuneOutcome = done[f"finetune/{FT1}"].result
    out: dict[str, Any] = {
        "from_step": settings.steps,
        "extra_steps": settings.finetune_steps,
        "second_order_weight": settings.second_order_weight,
    }
    for key, ft in (("second_order", ft2), ("first_order", ft1)):
        out[key] = {"s_per_step": ft.s_per_step, "train_wall_s": ft.train_s, "sde": stat(ft.sde)}
    base_sde = curves["velocity_is"].sde[-1]
    out["base"] = {"s_per_step": runs["velocity_is"]["s_per_step"], "sde": stat(base_sde)}
    out["cost_ratio_second_over_first"] = ft2.s_per_step / ft1.s_per_step
    for name, a, b in (
        ("first_minus_second", FT1, FT2),
        ("base_minus_second", "velocity_is", FT2),
        ("base_minus_first", "velocity_is", FT1),
    ):
        out[f"bpd_{name}"] = paired_stat(o[a]["bpd"], o[b]["bpd"])
        out[f"nfe_{name}"] = paired_stat(o[a]["nfe"], o[b]["nfe"])
    return out


def _dequantization(settings, jobs, done, raw) -> dict[str, Any]:
    """Uniform, variational, truncated normal (K=1) and the IW bounds on the same images."""
    s = settings
    un = merge_ode(jobs, done, "dequantization", "uniform")
    va = merge_ode(jobs, done, "dequantization", "variational")
    tn = merge_ode(jobs, done, "dequantization", "truncated_normal")
    n = len(tn.log_q)
    ks = [k for k in (1, 4, 16, 64, 256) if k <= s.k_max and s.k_max % k == 0]
    per: dict[str, np.ndarray] = {
        "uniform": first_draw_bpd(un),
        "variational": first_draw_bpd(va),
        "tn_k1_first_draw": first_draw_bpd(tn),
        # the K=1 bound averaged over all k_max draws: the same expectation, less noise
        "tn_k1": ode_bpd(tn)["bpd_mean_of_bounds"],
    }
    nfe: dict[str, np.ndarray] = {
        "uniform": un.nfe[:, 0],
        "variational": va.nfe[:, 0],
        "tn_k1_first_draw": tn.nfe[:, 0],
        "tn_k1": tn.nfe.mean(1),
    }
    for k in ks:
        # IW bound with K draws (per-draw log q, minus log K), averaged over k_max / K groups
        per[f"iw_k{k}"] = ode_bpd(tn, group=k)["bpd_importance_weighted"].mean(1)
        nfe[f"iw_k{k}"] = tn.nfe.reshape(n, s.k_max // k, k).sum(2).mean(1)
    raw["dequantization"] = {"per_example_bpd": per, "per_example_nfe": nfe}
    entries = {k: {"bpd": stat(v), "nfe": stat(nfe[k])} for k, v in per.items()}
    pairs = {
        "uniform_minus_tn_k1": paired_stat(per["uniform"], per["tn_k1_first_draw"]),
        "variational_minus_tn_k1": paired_stat(per["variational"], per["tn_k1_first_draw"]),
        "iw_k1_minus_tn_k1": paired_stat(per["iw_k1"], per["tn_k1"]),
    }
    for k in ks[1:]:
        pairs[f"tn_k1_minus_iw_k{k}"] = paired_stat(per["tn_k1"], per[f"iw_k{k}"])
    for k0, k1 in zip(ks[1:], ks[2:], strict=False):
        pairs[f"iw_k{k0}_minus_iw_k{k1}"] = paired_stat(per[f"iw_k{k0}"], per[f"iw_k{k1}"])
    return {"model": "velocity_is", "n": n, "k_values": ks, "entries": entries, "paired": pairs}


def _timing(jobs: list[Job], done: dict[str, JobRecord], t0: float) -> dict[str, Any]:
    """Jobs, worker seconds and wall span (seconds after ``t0``) of every stage."""
    stages: dict[str, dict] = {}
    for job in jobs:
        r = done[job.key]
        st = stages.setdefault(job.stage, {"jobs": 0, "worker_s": 0.0, "first": 1e30, "last": 0.0})
        st["jobs"] += 1
        st["worker_s"] += r.wall_s
        st["first"] = min(st["first"], r.start)
        st["last"] = max(st["last"], r.start + r.wall_s)
    return {
        "stages": {
            k: {
                "jobs": v["jobs"],
                "worker_s": v["worker_s"],
                "span_s": [v["first"] - t0, v["last"] - t0],
            }
            for k, v in stages.items()
        },
        "jobs": {j.key: {"wall_s": done[j.key].wall_s} for j in jobs},
    }


def _claims(settings, P, T, S, variance, finetune, deq) -> list[Claim]:
    k = settings.k_max
    var_t = asdict(variance["trained"].ratio_uniform_over_importance["loss_var"])
    return [
        _claim(
            "C1",
            P["velocity_vs_eps_is"]["curve_average"],
            "bits/dim",
            "eps_is - velocity_is, held-out SDE bound, curve average",
        ),
        _claim("C2a", var_t, "x", "var(per-batch loss) uniform / IS, trained weights", null=1.0),
        _claim(
            "C2b",
            T["velocity_is_vs_uniform"]["curve_average"],
            "bits/dim",
            "velocity_uniform - velocity_is, SDE bound, curve avg",
        ),
        _claim("C3a", finetune["bpd_first_minus_second"], "bits/dim", "first - second order, ODE"),
        _claim("C3b", finetune["nfe_first_minus_second"], "NFE", "first - second order, NFE/image"),
        _claim("C4a", deq["paired"]["uniform_minus_tn_k1"], "bits/dim", "uniform - TN (K=1)"),
        _claim("C4b", deq["paired"][f"tn_k1_minus_iw_k{k}"], "bits/dim", f"TN (K=1) - IW (K={k})"),
        _claim("C5", S["ode_sp_minus_vp"], "bits/dim", "SP - VP, ODE bits/dim (TN)"),
    ]


def collect(settings, jobs: list[Job], done: dict[str, JobRecord], meta: dict):
    """(AblationResults, the per-example values behind every interval) from the finished jobs."""
    curves: dict[str, TrainOutcome] = {name: done[f"train/{name}"].result for name in RUNS}
    raw: dict[str, Any] = {"curves": {}, "ode": {}, "dequantization": {}}
    for name, r in curves.items():
        raw["curves"][name] = {"steps": r.steps, "sde": r.sde}
    runs = _runs(curves)
    ode: dict[str, dict] = {}
    for name in [*RUNS, FT2, FT1]:
        m = merge_ode(jobs, done, "ode", name)
        bpd, nfe = first_draw_bpd(m), m.nfe[:, 0]
        raw["ode"][name] = {"bpd": bpd, "nfe": nfe}
        ode[name] = {"label": MODEL_LABELS[name], "bpd": stat(bpd), "nfe": stat(nfe)}
    P, T, S = _comparisons(curves, raw["ode"])
    variance = {label: done[f"variance/{label}"].result for label in ("init", "trained")}
    finetune = _finetune(settings, done, curves, runs, raw["ode"])
    deq = _dequantization(settings, jobs, done, raw)
    results = AblationResults(
        meta=meta,
        settings=asdict(settings),
        run_configs={name: list(RUNS[name]) for name in RUNS},
        runs=runs,
        ode=ode,
        parameterization=P,
        time_sampling=T,
        variance=variance,
        finetune=finetune,
        dequantization=deq,
        schedule=S,
        claims=_claims(settings, P, T, S, variance, finetune, deq),
        timing=_timing(jobs, done, meta["started_unix"]),
    )
    return results, raw


def stage_line(stage: str, jobs: list[Job], done: dict[str, JobRecord]) -> str:
    """A one-line summary of a finished stage, for the console."""
    mine = [j for j in jobs if j.stage == stage]
    worker_s = sum(done[j.key].wall_s for j in mine)
    head = f"[idode ablate] {stage}: {len(mine)} jobs, {worker_s:.0f} worker-s"
    if stage == "train":
        parts = [f"{j.group} {np.mean(done[j.key].result.sde[-1]):.3f}" for j in mine]
        return f"{head}; held-out SDE bound (bits/dim): " + ", ".join(parts)
    if stage == "finetune":
        parts = [f"{j.group} {done[j.key].result.s_per_step:.3f} s/step" for j in mine]
        return f"{head}; " + ", ".join(parts)
    if stage == "variance":
        parts = []
        for j in mine:
            r = done[j.key].result.ratio_uniform_over_importance["loss_var"].ratio
            parts.append(f"{j.group} {r:.2f}")
        return f"{head}; var(loss) uniform/IS: " + ", ".join(parts)
    parts = []
    for g in dict.fromkeys(j.group for j in mine):
        m = merge_ode(jobs, done, stage, g)
        parts.append(f"{g} {first_draw_bpd(m).mean():.3f}")
    return f"{head}; bits/dim (first draw): " + ", ".join(parts)
