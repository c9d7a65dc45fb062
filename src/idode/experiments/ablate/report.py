"""The ablation report (results.md), rendered from a loaded results.json alone, one function per
section. A summary without an interval (n = 1) is shown as its value and "n = 1"."""

from __future__ import annotations

from collections.abc import Callable

from idode.experiments.ablate.figures import FIGURES
from idode.experiments.ablate.grid import DEQ_LABELS, FT1, FT2, MODEL_LABELS
from idode.stats import Z95

__all__ = ["render_results_md"]

_NO_CI = "(n = 1: the interval needs n >= 2)"


def _ci(stat: dict, nd: int = 3) -> str:
    if stat["ci95"] is None:
        return _NO_CI
    lo, hi = stat["ci95"]
    return f"[{lo:+.{nd}f}, {hi:+.{nd}f}]"


def _pm(stat: dict, nd: int = 3) -> str:
    if stat["stderr"] is None:
        return f"{stat['mean']:.{nd}f} {_NO_CI}"
    return f"{stat['mean']:.{nd}f} ± {Z95 * stat['stderr']:.{nd}f}"


def _diff(stat: dict, nd: int = 3) -> str:
    return f"{stat['mean']:+.{nd}f} {_ci(stat, nd)}"


def _effect(c: dict) -> str:
    """The effect of a claim with its 95% interval."""
    unit, ci = c["unit"], c["ci95"]
    nd = 0 if unit == "NFE" else 3
    if ci is None:
        return f"{c['effect']:.{nd}f} {unit} {_NO_CI}"
    lo, hi = ci
    if unit == "x":
        return f"ratio {c['effect']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{c['effect']:+.{nd}f} {unit} [{lo:+.{nd}f}, {hi:+.{nd}f}]"


def _claim_c1(results: dict) -> str:
    """The numbers behind claim C1 (velocity vs eps)."""
    r = results["runs"]
    cmp_ = results["parameterization"]["velocity_vs_eps_is"]
    od = results["parameterization"]["ode_eps_is_minus_velocity_is"]
    vdm = results["parameterization"]["velocity_vs_eps_uniform"]["curve_average"]
    return (
        f"final SDE bound velocity_is {_pm(r['velocity_is']['final_sde'])} vs eps_is "
        f"{_pm(r['eps_is']['final_sde'])}; final ODE bits/dim difference "
        f"{_diff(od)}; velocity_is reached eps_is's final SDE bound at step "
        f"{cmp_['steps_to_reach_final_of_worse'] or 'n/a'} of "
        f"{results['settings']['steps']}; with uniform gamma (VDM-like) the curve-average "
        f"gap is {_diff(vdm)}"
    )


def _claim_c2a(results: dict) -> str:
    """The numbers behind claim C2a (the variance of the objective)."""
    v = results["variance"]
    ti, tr = (
        v["init"]["ratio_uniform_over_importance"],
        v["trained"]["ratio_uniform_over_importance"],
    )
    return (
        f"var(loss) IS {v['trained']['importance']['loss_var']:.4g} vs uniform "
        f"{v['trained']['uniform']['loss_var']:.4g} (bits/dim)^2 over "
        f"{v['trained']['batches']} batches; ratio of tr Cov(grad) "
        f"{_ratio(tr['grad_trace_var'])}, of var(grad norm) {_ratio(tr['grad_norm_var'])}; "
        f"at initialisation var(loss) ratio {_ratio(ti['loss_var'])}"
    )


def _claim_c2b(results: dict) -> str:
    """The numbers behind claim C2b (the speed of convergence with IS gamma)."""
    r = results["runs"]
    od = results["time_sampling"]["ode_velocity_uniform_minus_is"]
    eps = results["time_sampling"]["eps_is_vs_uniform"]["curve_average"]
    return (
        f"final SDE bound velocity_is {_pm(r['velocity_is']['final_sde'])} vs "
        f"velocity_uniform {_pm(r['velocity_uniform']['final_sde'])}; final ODE bits/dim "
        f"difference {_diff(od)}; for eps-prediction (eps_uniform - eps_is) {_diff(eps)}"
    )


def _claim_c3a(results: dict) -> str:
    """The numbers behind claim C3a (finetuning and bits/dim)."""
    ode = results["ode"]
    ft = results["finetune"]
    return (
        f"ODE bits/dim second order {_pm(ode[FT2]['bpd'])} vs first order "
        f"{_pm(ode[FT1]['bpd'])} vs base {_pm(ode['velocity_is']['bpd'])}; "
        f"base - second order {_diff(ft['bpd_base_minus_second'])}"
    )


def _claim_c3b(results: dict) -> str:
    """The numbers behind claim C3b (finetuning and NFE)."""
    ode = results["ode"]
    ft = results["finetune"]
    return (
        f"NFE/image second order {_pm(ode[FT2]['nfe'], 1)} vs first order "
        f"{_pm(ode[FT1]['nfe'], 1)} vs base {_pm(ode['velocity_is']['nfe'], 1)}; "
        f"cost per step {ft['second_order']['s_per_step']:.3f} s vs "
        f"{ft['first_order']['s_per_step']:.3f} s "
        f"({ft['cost_ratio_second_over_first']:.2f}x)"
    )


def _claim_c4a(results: dict) -> str:
    """The numbers behind claim C4a (truncated normal vs uniform)."""
    e = results["dequantization"]["entries"]
    return (
        f"uniform {_pm(e['uniform']['bpd'])} vs truncated normal "
        f"{_pm(e['tn_k1_first_draw']['bpd'])} bits/dim on "
        f"{results['dequantization']['n']} test images (variational "
        f"{_pm(e['variational']['bpd'])})"
    )


def _claim_c4b(results: dict) -> str:
    """The numbers behind claim C4b (the importance-weighted bound)."""
    k = results["settings"]["k_max"]
    e = results["dequantization"]["entries"]
    p = results["dequantization"]["paired"]
    return (
        f"TN K=1 {_pm(e['tn_k1']['bpd'])}, IW K=4 {_pm(e['iw_k4']['bpd'])}, IW K={k} "
        f"{_pm(e[f'iw_k{k}']['bpd'])}; TN K=1 - IW K=4 {_diff(p['tn_k1_minus_iw_k4'])}"
        if "iw_k4" in e and k > 4
        else f"TN K=1 {_pm(e['tn_k1']['bpd'])}, IW K={k} {_pm(e[f'iw_k{k}']['bpd'])}"
    )


def _claim_c5(results: dict) -> str:
    """The numbers behind claim C5 (VP vs SP)."""
    ode = results["ode"]
    sc = results["schedule"]
    return (
        f"ODE bits/dim VP {_pm(ode['velocity_is']['bpd'])} vs SP "
        f"{_pm(ode['velocity_is_sp']['bpd'])}; SDE-bound curve average SP - VP "
        f"{_diff(sc['vp_vs_sp']['curve_average'])}; NFE SP - VP "
        f"{_diff(sc['nfe_sp_minus_vp'], 1)}"
    )


_CLAIM_NUMBERS: dict[str, Callable[[dict], str]] = {
    "C1": _claim_c1,
    "C2a": _claim_c2a,
    "C2b": _claim_c2b,
    "C3a": _claim_c3a,
    "C3b": _claim_c3b,
    "C4a": _claim_c4a,
    "C4b": _claim_c4b,
    "C5": _claim_c5,
}


def _claim_line(c: dict, results: dict) -> str:
    """One line per claim: verdict, effect with 95% interval, and the numbers behind it."""
    cid = c["id"]
    nums = _CLAIM_NUMBERS[cid](results)
    verdict = c["verdict"]
    word = verdict[0].upper() + verdict[1:]
    claim = c["claim"][0].upper() + c["claim"][1:]
    return f"- **{cid} — {word}.** {claim}: {c['metric']} = {_effect(c)}; {nums}."


def _ratio(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"


def render_results_md(results: dict, figures_dir_rel: str = "figures") -> str:
    """The report, from a loaded results.json; figures are linked under ``figures_dir_rel``."""
    fig = figures_dir_rel.rstrip("/")

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({fig}/{FIGURES[key]})"

    L = [
        *_intro(results),
        *_provenance(results),
        *_parameterization(results, img),
        *_variance(results, img),
        *_finetune(results, img),
        *_dequantization(results, img),
        *_schedule(results),
        *_settings(results),
    ]
    return "\n".join(L)


def _intro(results: dict) -> list[str]:
    """Title, the method of the comparisons, and one line per claim."""
    s = results["settings"]
    L: list[str] = []
    add = L.append
    add(f"# i-DODE ablations on {s['dataset']} (CPU scale)")
    add("")
    if s["quick"]:
        add(
            "> **This is a `--quick` smoke run**: a few training steps, a tiny network, a "
            "handful of images and loose ODE tolerances. Its numbers exercise the pipeline "
            "and mean nothing about the method."
        )
        add("")
    add(
        "The qualitative claims of the paper (method.md §9) tested on a small model, with shared "
        "seeds and 95% intervals. Every training run starts from the same initial weights and "
        "sees the same data order; every evaluation draws its noise from per-example generators, "
        "so all models see the same noise on the same image and each difference between two "
        "models is **paired per image**: effect = mean paired difference, 95% interval = "
        "±1.96 standard errors of the paired differences. Variance ratios get a paired "
        "bootstrap interval over batches. A claim **held** when its 95% interval lies on the "
        "claimed side of zero (of one, for ratios), **did not hold** when it lies on the other "
        "side, and is **inconclusive** when it contains it. Nothing was tuned per claim."
    )
    add("")
    add("## Claims")
    add("")
    for c in results["claims"]:
        add(_claim_line(c, results))
    add("")
    return L


def _provenance(results: dict) -> list[str]:
    """The commands, the machine and the time of every stage."""
    m = results["meta"]
    L: list[str] = []
    add = L.append
    add("## How this was produced")
    add("")
    add("```")
    add(m["command"])
    add(m["render_command"])
    add("```")
    add("")
    load = m.get("load_average_at_start")
    load_txt = f", load average {load[0]:.1f} at the start" if load else ""
    add(
        f"Wall time **{m['wall_s'] / 60:.1f} minutes** on {m['cpu_count']} CPU cores "
        f"({m['cpu']}; {m['workers']} worker process(es) with {m['threads_per_worker']} "
        f"thread(s) each{load_txt}), torch {m['torch']}, Python {m['python']}, started "
        f"{m['started']}. Rerunning the command reproduces every number within its interval "
        f"(identical seeds; float rounding in batched network calls aside)."
    )
    add("")
    add("| stage | jobs | worker time (s) | wall span (min) |")
    add("|---|---|---|---|")
    for stage, st in results["timing"]["stages"].items():
        a, b = st["span_s"]
        add(f"| {stage} | {st['jobs']} | {st['worker_s']:.0f} | {a / 60:.1f} – {b / 60:.1f} |")
    add("")
    return L


def _parameterization(results: dict, img: Callable[[str, str], str]) -> list[str]:
    """Section 1: eps vs velocity (and the 2x2 grid with gamma sampling)."""
    s, r, ode = results["settings"], results["runs"], results["ode"]
    P, T, S = results["parameterization"], results["time_sampling"], results["schedule"]
    L: list[str] = []
    add = L.append
    add("## 1. ε vs velocity parameterization (and the 2×2 grid with γ sampling)")
    add("")
    add(
        f"Five runs of the `{s['preset']}` preset for {s['steps']} steps each (overrides: "
        f"{_overrides_text(s)}); the held-out SDE bound of the EMA weights is measured after "
        f"every {s['steps'] // s['segments']} steps on {s['curve_examples']} held-out images "
        f"({s['curve_draws']} draws of (γ, ε) per image, importance-sampled γ for every model: "
        f"the same estimator of the same bound). The final ODE bits/dim uses the truncated-"
        f"normal dequantization (K=1), one Rademacher probe, rtol = atol = {s['rtol']:g}, on "
        f"{s['ode_examples']} test images; NFE per image = 6 × solver steps + 2."
    )
    add("")
    add("| run | training | final SDE bound | ODE bits/dim (TN) | NFE / image | s / step |")
    add("|---|---|---|---|---|---|")
    for name, run in r.items():
        add(
            f"| `{name}` | {run['label']} | {_pm(run['final_sde'])} | {_pm(ode[name]['bpd'])} "
            f"| {_pm(ode[name]['nfe'], 0)} | {run['s_per_step']:.3f} |"
        )
    add("")
    add(
        "Paired differences (first minus second named run; > 0 means the second is better). "
        "*Curve average*: the per-image difference averaged over all learning-curve points."
    )
    add("")
    add(
        "| comparison | curve average | at the last step | ODE bits/dim | reached the other's "
        "final bound at step |"
    )
    add("|---|---|---|---|---|")
    for cmp_, od in (
        (P["velocity_vs_eps_is"], P["ode_eps_is_minus_velocity_is"]),
        (P["velocity_vs_eps_uniform"], P["ode_eps_uniform_minus_velocity_uniform"]),
        (T["velocity_is_vs_uniform"], T["ode_velocity_uniform_minus_is"]),
        (T["eps_is_vs_uniform"], T["ode_eps_uniform_minus_is"]),
        (S["vp_vs_sp"], S["ode_sp_minus_vp"]),
    ):
        reach = cmp_["steps_to_reach_final_of_worse"]
        add(
            f"| `{cmp_['worse']}` − `{cmp_['better']}` | {_diff(cmp_['curve_average'])} | "
            f"{_diff(cmp_['final'])} | {_diff(od)} | {reach if reach is not None else 'never'} |"
        )
    add("")
    add(img("learning_curves", "learning curves"))
    add("")
    add(img("curve_differences", "paired differences along the learning curves"))
    add("")
    add(img("ode_bpd", "ODE bits/dim of every model"))
    add("")
    return L


def _variance(results: dict, img: Callable[[str, str], str]) -> list[str]:
    """Section 2: uniform vs importance-sampled gamma at fixed parameters."""
    s = results["settings"]
    L: list[str] = []
    add = L.append
    v = results["variance"]
    add("## 2. Uniform vs importance-sampled γ")
    add("")
    add(
        f"At fixed parameters (the initial weights, and the trained raw weights of "
        f"`velocity_is`; dropout off) the training loss is evaluated on {v['trained']['batches']} "
        f"batches of {v['trained']['batch_size']} training images, each batch once with "
        f"importance-sampled and once with uniform γ, with the same images, the same "
        f"antithetic quantiles and the same ε. Both estimate the same objective (their means "
        f"agree within noise); the importance-sampled one should vary less. Intervals: paired "
        f"bootstrap over batches ({s['bootstrap']} resamples)."
    )
    add("")
    add("| weights | sampler | mean loss (bits/dim) | var(loss) | var(‖grad‖) | tr Cov(grad) |")
    add("|---|---|---|---|---|---|")
    for label in ("init", "trained"):
        for sampler in ("importance", "uniform"):
            x = v[label][sampler]
            add(
                f"| {label} | {sampler} | {x['loss_mean']:.4f} | {x['loss_var']:.4g} | "
                f"{x['grad_norm_var']:.4g} | {x['grad_trace_var']:.4g} |"
            )
        rr = v[label]["ratio_uniform_over_importance"]
        add(
            f"| {label} | **ratio uniform / IS** | "
            f"{_diff(v[label]['loss_mean_uniform_minus_importance'], 4)} (difference) | "
            f"**{_ratio(rr['loss_var'])}** | {_ratio(rr['grad_norm_var'])} | "
            f"{_ratio(rr['grad_trace_var'])} |"
        )
    add("")
    add(img("variance", "variance ratios"))
    add("")
    add(
        "Learning curves of `velocity_is` vs `velocity_uniform` and `eps_is` vs `eps_uniform` are "
        "in section 1; the training losses below show the per-batch noise of each sampler."
    )
    add("")
    add(img("train_loss", "training losses"))
    add("")
    return L


def _finetune(results: dict, img: Callable[[str, str], str]) -> list[str]:
    """Section 3: second-order finetuning vs more first-order training."""
    s, ode = results["settings"], results["ode"]
    L: list[str] = []
    add = L.append
    ft = results["finetune"]
    add("## 3. Second-order finetuning vs more first-order training")
    add("")
    add(
        f"From the final checkpoint of `velocity_is` (step {ft['from_step']}: weights, EMA, "
        f"optimizer), {ft['extra_steps']} more steps with λ₂ = {ft['second_order_weight']} "
        f"(`finetune_config`), and the same {ft['extra_steps']} steps of first-order training "
        f"(λ₂ = 0). Both are evaluated like every model (truncated normal, K=1, rtol = atol = "
        f"{s['rtol']:g}, {s['ode_examples']} images, paired)."
    )
    add("")
    add("| model | ODE bits/dim (TN) | NFE / image | SDE bound | s / step |")
    add("|---|---|---|---|---|")
    for name, key in (("velocity_is", "base"), (FT1, "first_order"), (FT2, "second_order")):
        add(
            f"| {MODEL_LABELS[name]} | {_pm(ode[name]['bpd'])} | {_pm(ode[name]['nfe'], 1)} | "
            f"{_pm(ft[key]['sde'])} | {ft[key]['s_per_step']:.3f} |"
        )
    add("")
    add("| paired difference | bits/dim | NFE / image |")
    add("|---|---|---|")
    add(
        f"| first order − second order | {_diff(ft['bpd_first_minus_second'])} | "
        f"{_diff(ft['nfe_first_minus_second'], 1)} |"
    )
    add(
        f"| base − second order | {_diff(ft['bpd_base_minus_second'])} | "
        f"{_diff(ft['nfe_base_minus_second'], 1)} |"
    )
    add(
        f"| base − first order | {_diff(ft['bpd_base_minus_first'])} | "
        f"{_diff(ft['nfe_base_minus_first'], 1)} |"
    )
    add("")
    add(
        f"Cost per step: second order {ft['second_order']['s_per_step']:.3f} s, first order "
        f"{ft['first_order']['s_per_step']:.3f} s "
        f"(**{ft['cost_ratio_second_over_first']:.2f}×**; wall time of the run / steps, one "
        f"thread)."
    )
    add("")
    add(img("finetune", "finetuning"))
    add("")
    return L


def _dequantization(results: dict, img: Callable[[str, str], str]) -> list[str]:
    """Section 4: dequantization and the importance-weighted bound."""
    s = results["settings"]
    L: list[str] = []
    add = L.append
    dq = results["dequantization"]
    e = dq["entries"]
    add("## 4. Dequantization and the importance-weighted bound")
    add("")
    add(
        f"On `{dq['model']}` (the base model, not finetuned), on the first {dq['n']} evaluation "
        f"images, one shared Rademacher probe per image, rtol = atol = {s['rtol']:g}. Uniform "
        f"starts the ODE at γ = −11.8 (as the official code); variational and truncated normal "
        f"at γ_min. Truncated normal is drawn {s['k_max']} times per image: *TN K=1* is the "
        f"single-draw bound with the analytic entropy averaged over those draws (the same "
        f"expectation as one draw, less noise), *TN K=1 (one draw)* is the first draw alone; "
        f"*IW K* is log(1/K Σ exp bound_k) with per-draw log q and the −log K, averaged over the "
        f"{s['k_max']}/K disjoint groups of draws. NFE / image counts all K solves."
    )
    add("")
    add("| bound | bits/dim | NFE / image | paired difference |")
    add("|---|---|---|---|")
    p = dq["paired"]
    rel = {
        "uniform": ("uniform − TN (one draw)", p["uniform_minus_tn_k1"]),
        "variational": ("variational − TN (one draw)", p["variational_minus_tn_k1"]),
        "iw_k1": ("IW K=1 − TN K=1", p["iw_k1_minus_tn_k1"]),
    }
    for k in dq["k_values"][1:]:
        rel[f"iw_k{k}"] = (f"TN K=1 − IW K={k}", p[f"tn_k1_minus_iw_k{k}"])
    for key, val in e.items():
        note = f"{rel[key][0]}: {_diff(rel[key][1])}" if key in rel else ""
        add(f"| {DEQ_LABELS.get(key, key)} | {_pm(val['bpd'])} | {_pm(val['nfe'], 0)} | {note} |")
    add("")
    add(img("dequantization", "dequantization bounds"))
    add("")
    return L


def _schedule(results: dict) -> list[str]:
    """Section 5: VP vs SP."""
    ode, S = results["ode"], results["schedule"]
    L: list[str] = []
    add = L.append
    add("## 5. VP vs SP schedule (velocity + importance sampling)")
    add("")
    add(
        f"`velocity_is` (VP) vs `velocity_is_sp` (SP, same γ range): ODE bits/dim "
        f"{_pm(ode['velocity_is']['bpd'])} vs {_pm(ode['velocity_is_sp']['bpd'])}, paired SP − VP "
        f"{_diff(S['ode_sp_minus_vp'])}; NFE / image {_pm(ode['velocity_is']['nfe'], 0)} vs "
        f"{_pm(ode['velocity_is_sp']['nfe'], 0)}; SDE-bound curve average SP − VP "
        f"{_diff(S['vp_vs_sp']['curve_average'])}. Method.md §9 states no claim about the "
        f"schedule; the paper's main results use VP."
    )
    add("")
    return L


def _settings(results: dict) -> list[str]:
    """Every setting of the grid and the overrides of every run."""
    s = results["settings"]
    L: list[str] = []
    add = L.append
    add("## Settings")
    add("")
    add("| setting | value |")
    add("|---|---|")
    for k, val in s.items():
        shown = (", ".join(map(str, val)) or "(none)") if isinstance(val, list) else val
        add(f"| `{k}` | `{shown}` |")
    add("")
    add(
        "Run overrides on top of the preset: "
        + "; ".join(
            f"`{n}`: {', '.join(f'`{o}`' for o in ov) or '(none)'}"
            for n, ov in results["run_configs"].items()
        )
        + ". Every run's resolved config is in `runs/NAME/config.json` of the output folder; "
        "the per-image values behind every interval are in `per_example.json`."
    )
    add("")
    return L


def _overrides_text(s: dict) -> str:
    ov = list(s["overrides"])
    return ", ".join(f"`{o}`" for o in ov) if ov else "none"
