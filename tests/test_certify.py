"""The measured solver error and the calibration (idode.certify) against closed forms.

Gaussian data x0 ~ N(0, s2 I) with the optimal network: the probability-flow ODE is linear,
z_end = z sqrt(v_max / v_min), and a Rademacher probe gives the exact divergence of its
c(gamma) I Jacobian, so log p_ODE(z) = log N(z_end; 0, sigma_max^2 I) + d/2 log(v_max / v_min)
exactly, whatever the probe.
"""

import json
import math

import pytest
import torch
from problems import GaussianOptimalNet, InDtype, marginal_variance

import idode
from idode import calibration, certify, rng
from idode.continuous import draw_jobs, iter_bits_per_dim
from idode.dequantization import dequantize
from idode.divergence import sample_probes

S2, D = 0.5, 16


def _models():
    s = idode.VPSchedule()
    f32 = idode.DiffusionODE(InDtype(GaussianOptimalNet(s, S2, "eps"), torch.float32), s, "eps")
    f64 = idode.DiffusionODE(GaussianOptimalNet(s, S2, "eps"), s, "eps")  # an independent copy
    return f32, f64


def _images(n, seed=0):
    return torch.randint(0, 256, (n, D), generator=torch.Generator().manual_seed(seed))


def _starts(model, x, seed):
    """Each example's probe, then its draw, from its own stream: as an evaluation draws them."""
    gens = rng.example_generators(seed, range(len(x)), purpose="dequantization")
    probes = torch.stack([sample_probes((1, D), "rademacher", generator=g)[0] for g in gens])
    dq = dequantize("truncated_normal", x, 256, model.schedule, generator=gens)
    return dq.z, probes, dq.gamma_start


def _exact_log_p(model, z, gamma_start):
    """The closed-form log p_ODE of the Gaussian problem (prior N(0, sigma_max^2 I))."""
    s = model.schedule
    v0 = float(marginal_variance(s, gamma_start, S2))
    v1 = float(marginal_variance(s, s.gamma_max, S2))
    z_end = z.double() * math.sqrt(v1 / v0)
    prior = -0.5 * D * math.log(2 * math.pi * s.sigma2_max) - 0.5 * z_end.square().sum(1) / (
        s.sigma2_max
    )
    return prior + 0.5 * D * math.log(v1 / v0)


def _bpd(nats):
    return nats / (D * math.log(2))


def test_reported_error_is_the_difference_of_two_solves():
    """solver_error's rows are the evaluation's solve minus an independent reference solve."""
    f32, f64 = _models()
    x, n = _images(6), 6
    gens = rng.example_generators(0, range(n), purpose="dequantization")
    res = idode.bits_per_dim(f32, x, rtol=1e-2, atol=1e-2, solver_check=n, generator=gens)
    se = res.solver_error
    assert se["checked"] == n and [(j["index"], j["draw"]) for j in se["jobs"]] == [
        (i, 0) for i in range(n)
    ]
    ref = se["reference"]
    assert ref["rtol"] == pytest.approx(1e-4) and ref["network_dtype"] == "float64"
    # the reference, solved again here with log_likelihood on the same noise and probes
    z, probes, g0 = _starts(f32, x, 0)
    ll = idode.log_likelihood(
        f64, z, "rademacher", ref["rtol"], ref["atol"], gamma_start=g0, probes=probes,
        logp_atol=ref["logp_atol"],
    )  # fmt: skip
    assert (ref["method"], ref["controller"]) == ("dopri5", "i")
    want = _bpd(ll.logp - res.log_p_model[:, 0])  # eval minus reference, bits/dim
    got = torch.tensor([j["diff_bpd"] for j in se["jobs"]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    # ... and that difference is the true error of the evaluation (closed form)
    true = _bpd(_exact_log_p(f32, z, g0) - res.log_p_model[:, 0])
    assert true.abs().max() > 1e-3  # a loose solve: a visible error
    torch.testing.assert_close(got, true, rtol=0, atol=1e-4)
    assert se["max_abs_bpd"] == pytest.approx(got.abs().max().item(), rel=1e-12)
    assert se["mean_abs_bpd"] == pytest.approx(got.abs().mean().item(), rel=1e-12)
    assert se["mean_signed_bpd"] == pytest.approx(got.mean().item(), rel=1e-12)
    conv = se["reference"]["convergence"]
    assert conv["method"] == "vern6" and conv["rtol"] == ref["rtol"] and conv["jobs"] == 2
    # the second method agrees with the reference on the closed form's scale
    assert 0 < conv["max_abs_diff_bpd"] < 1e-4
    assert se["check_nfe"] == sum(j["reference_nfe"] for j in se["jobs"]) + conv["nfe"]
    assert se["nfe_overhead"] == se["check_nfe"] / int(res.nfe_per_example.sum())
    json.dumps(se)  # eval.json material


def test_check_jobs_are_seeded_and_independent_of_batch_size():
    assert certify.num_check_jobs(100) == 8 and certify.num_check_jobs(1000) == 20
    assert certify.num_check_jobs(5) == 5 and certify.num_check_jobs(1000, 0.1) == 100
    assert certify.num_check_jobs(1000, 3) == 3 and certify.choose_check_jobs(1000, 0) == []
    a = certify.choose_check_jobs(1000, None, seed=3)
    assert a == certify.choose_check_jobs(1000, None, seed=3) == sorted(set(a)) and len(a) == 20
    assert a != certify.choose_check_jobs(1000, None, seed=4)
    # calibration picks its images from a stream of its own: not the images the check re-solves
    assert a != certify.choose_check_jobs(1000, None, seed=3, purpose="calibration")
    # Protocol.solver_check is a float: an integral value >= 1 is a count
    assert certify.num_check_jobs(1000, 8.0) == 8 and certify.num_check_jobs(1000, 1.0) == 1
    for bad in (-1, 1.5, -0.5, True, "8", math.inf):
        with pytest.raises(ValueError, match="solver_check"):
            certify.num_check_jobs(10, bad)
    # the same jobs and the same measured errors whatever the batch size
    f32, _ = _models()
    x = _images(5, seed=1)
    out = []
    for bs in (None, 2):
        gens = rng.example_generators(7, range(5), purpose="dequantization")
        res = idode.bits_per_dim(f32, x, num_samples=2, rtol=1e-3, atol=1e-3, solver_check=4,
                                 generator=gens, batch_size=bs)  # fmt: skip
        out.append(res.solver_error["jobs"])
    assert [(j["index"], j["draw"]) for j in out[0]] == [(j["index"], j["draw"]) for j in out[1]]
    for a, b in zip(*out, strict=True):
        assert a["diff_bpd"] == pytest.approx(b["diff_bpd"], abs=1e-7)


def test_regenerated_starts_equal_the_recorded_ones():
    """draw_jobs (what the check of an evaluation uses) = the starts the evaluation solved."""
    f32, _ = _models()
    x = _images(4, seed=2)
    record = dict.fromkeys([(0, 1), (2, 0), (3, 1)])
    gens = rng.example_generators(5, range(4), purpose="dequantization")
    p = idode.Protocol(num_samples=2, rtol=1e-2, atol=1e-2)
    for _ in iter_bits_per_dim(f32, x, 256, p, batch_size=3, generator=gens, record=record):
        pass
    gens = rng.example_generators(5, range(4), purpose="dequantization")
    drawn = draw_jobs(f32, x, 256, p, generator=gens)
    again = certify.select_jobs(drawn, list(record))
    assert torch.equal(again.y0, certify.stack_jobs(list(record.values())).y0)
    assert torch.equal(again.aux, certify.stack_jobs(list(record.values())).aux)


def test_calibration_meets_the_target_on_a_gaussian():
    """The chosen tolerance meets EPS on fresh images (closed form), and looser rungs did not."""
    f32, _ = _models()
    eps = 1e-4
    cal = calibration.calibrate(f32, _images(8), 256, max_solver_error=eps, num_examples=4)
    assert cal.met and cal.ladder[-1]["passed"] and cal.ladder[-1]["rtol"] == cal.chosen.rtol
    assert not cal.ladder[0]["passed"] and cal.ladder[0]["max_abs_bpd"] > eps / 2
    assert [r["rtol"] for r in cal.ladder] == list(calibration.LADDER[: len(cal.ladder)])
    # the library path: calibrate, record the choice, solve, check
    x, n = _images(6, seed=9), 6
    gens = rng.example_generators(0, range(n), purpose="dequantization")
    res = idode.bits_per_dim(f32, x, max_solver_error=eps, generator=gens)
    st = res.settings
    assert st["max_solver_error"] == eps and st["calibration"]["chosen"]["rtol"] == st["rtol"]
    assert st["rtol"] == cal.chosen.rtol < 1e-5
    z, _, g0 = _starts(f32, x, 0)
    true = _bpd(_exact_log_p(f32, z, g0) - res.log_p_model[:, 0])
    assert true.abs().max() <= eps
    assert res.solver_error["checked"] == n and res.solver_error["within_target"]


def test_warnings_when_the_target_is_missed():
    f32, _ = _models()
    with pytest.warns(certify.SolverErrorWarning, match="no tolerance down to rtol=0.01"):
        cal = calibration.calibrate(f32, _images(4), 256, max_solver_error=1e-6, ladder=(1e-2,),
                                num_examples=2)  # fmt: skip
    assert not cal.met and cal.chosen.rtol == 1e-2
    x = _images(3)
    gens = rng.example_generators(0, range(3), purpose="dequantization")
    res = idode.bits_per_dim(f32, x, rtol=1e-2, atol=1e-2, solver_check=3, generator=gens)
    gens = rng.example_generators(0, range(3), purpose="dequantization")
    jobs = draw_jobs(f32, x, 256, idode.Protocol(), generator=gens)
    lp, steps, tols = res.log_p_model[:, 0], res.steps[:, 0], certify.Tolerances(1e-2, 1e-2)
    with pytest.warns(certify.SolverErrorWarning, match=r"exceeds max_solver_error=1e-06"):
        rep = certify.check_jobs(f32, jobs, lp, steps, "rademacher", (D,), tols, eval_nfe=100,
                                 max_solver_error=1e-6)  # fmt: skip
    assert rep.as_dict()["within_target"] is False
    assert rep.as_dict()["max_abs_bpd"] == pytest.approx(res.solver_error["max_abs_bpd"])
    assert "EXCEEDED" in certify.summary_line(rep.as_dict())


# --------------------------------------------------------------------------------------------------
# idode eval on a tiny trained checkpoint
# --------------------------------------------------------------------------------------------------

TINY = ["train.steps=20", "train.eval_every=0", "train.checkpoint_every=20", "model.n_embd=8",
        "model.n_layers=1", "model.fourier_features=false"]  # fmt: skip
EVAL = ["--max-examples", "6", "--rtol", "1e-3", "--atol", "1e-3", "--no-elbo", "--no-progress",
        "--device", "cpu"]  # fmt: skip
CONTRACT = {"checked", "mean_abs_bpd", "max_abs_bpd", "mean_signed_bpd", "reference"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from idode.config import apply_overrides
    from idode.presets import get_preset
    from idode.train import train

    path = tmp_path_factory.mktemp("certify") / "run"
    train(apply_overrides(get_preset("digits_cpu"), TINY), path, progress=False)
    return path


def test_idode_eval_reports_the_measured_error(run, tmp_path, capsys):
    from idode.cli import main

    out = tmp_path / "e"
    assert main(["eval", "--checkpoint", str(run), "--out", str(out), *EVAL,
                 "--solver-check", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    se = res["solver_error"]
    assert CONTRACT <= set(se) and se["checked"] == 3 and len(se["jobs"]) == 3
    assert se["reference"]["rtol"] == pytest.approx(1e-5)  # 100x tighter than the run
    assert se["max_abs_bpd"] == max(abs(j["diff_bpd"]) for j in se["jobs"])
    # the evaluated log p of each checked job is the one in per_example.jsonl
    rows = {
        r["index"]: r for r in map(json.loads, (out / "per_example.jsonl").read_text().splitlines())
    }
    for j in se["jobs"]:
        assert j["log_p_nats"] == rows[j["index"]]["log_p_model_nats"][j["draw"]]
    assert res["local_error_estimate"]["bpd_max"] > 0 and res["calibration"] is None
    assert f"solver error max {se['max_abs_bpd']:.4f}" in printed and "95% CI" in printed
    # off
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "off"), *EVAL,
                 "--solver-check", "0"]) == 0  # fmt: skip
    off = json.loads((tmp_path / "off" / "eval.json").read_text())["solver_error"]
    assert off["checked"] == 0 and off["max_abs_bpd"] is None
    assert "solver error not measured" in capsys.readouterr().out
    # the check is not part of the resume guard (it changes no row): a resume may change it
    assert main(["eval", "--checkpoint", str(run), "--out", str(out), *EVAL,
                 "--solver-check", "2"]) == 0  # fmt: skip
    again = json.loads((out / "eval.json").read_text())
    assert again["solver_error"]["checked"] == 2 and again["bpd"] == res["bpd"]
    assert again["settings"]["solver_check"] == 2.0


def test_idode_eval_calibrates_for_a_target(run, tmp_path, capsys, monkeypatch):
    from idode.cli import main

    out = tmp_path / "cal"
    assert main(["eval", "--checkpoint", str(run), "--out", str(out), *EVAL,
                 "--max-solver-error", "0.05", "--solver-check", "0.5"]) == 0  # fmt: skip
    res = json.loads((out / "eval.json").read_text())
    cal, st = res["calibration"], res["settings"]
    assert cal["max_solver_error"] == 0.05 and cal["ladder"][-1]["passed"]
    assert st["rtol"] == cal["chosen"]["rtol"] == cal["ladder"][-1]["rtol"]
    assert res["settings_source"]["rtol"] == "calibration" and st["max_solver_error"] == 0.05
    se = res["solver_error"]
    assert se["checked"] == 3 and se["max_solver_error"] == 0.05
    assert se["within_target"] == (se["max_abs_bpd"] <= 0.05)
    # a resume, here extended to 8 images, reuses the folder's calibration (calibrating again
    # could pick other images, hence other tolerances, and be refused); other given tolerances
    # or another target calibrate anew
    import idode.evaluate as evaluate_module

    calls = []
    real = evaluate_module.calibrate
    monkeypatch.setattr(
        evaluate_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    more = [a if a != "6" else "8" for a in EVAL]
    assert main(["eval", "--checkpoint", str(run), "--out", str(out), *more,
                 "--max-solver-error", "0.05", "--solver-check", "0.5"]) == 0  # fmt: skip
    again = json.loads((out / "eval.json").read_text())
    assert calls == [] and again["calibration"]["reused_from"] == str(out / "eval_settings.json")
    assert again["calibration"]["chosen"] == cal["chosen"]
    assert again["dataset"]["num_examples"] == 8 and again["settings"]["rtol"] == st["rtol"]
    capsys.readouterr()
    # atol twice rtol: calibrated anew, then refused (the tolerances differ)
    code = main(["eval", "--checkpoint", str(run), "--out", str(out), *more, "--atol", "2e-3",
                 "--max-solver-error", "0.05"])  # fmt: skip
    assert code == 2 and calls == [1] and "atol" in capsys.readouterr().err
    for bad in (["--solver-check", "1.5"], ["--solver-check", "-2"], ["--max-solver-error", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--checkpoint", str(run), *EVAL, *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("idode: error:") and len(err.strip().splitlines()) == 1


def test_the_protocol_carries_the_check_and_the_target():
    """solver_check / max_solver_error are Protocol fields: keywords, protocol= and eval.* agree."""
    from idode.config import ConfigError, apply_overrides
    from idode.presets import get_preset

    f32, _ = _models()
    x = _images(3, seed=4)
    p = idode.Protocol(rtol=1e-3, atol=1e-3, solver_check=2)
    a = idode.bits_per_dim(f32, x, protocol=p)
    gens = p.generators(range(3))
    b = idode.bits_per_dim(f32, x, rtol=1e-3, atol=1e-3, solver_check=2, generator=gens)
    assert a.settings["solver_check"] == 2.0 and a.solver_error["checked"] == 2
    for ja, jb in zip(a.solver_error["jobs"], b.solver_error["jobs"], strict=True):
        assert (ja["index"], ja["draw"]) == (jb["index"], jb["draw"])
        assert ja["diff_bpd"] == pytest.approx(jb["diff_bpd"], abs=1e-9)
    assert idode.bits_per_dim(f32, x, rtol=1e-3, atol=1e-3).solver_error is None  # library: off
    with pytest.raises(ValueError, match="neither a count nor a fraction"):
        idode.Protocol(solver_check=2.5).validate()
    cfg = apply_overrides(get_preset("digits_cpu"), ["eval.solver_check=0.02",
                                                     "eval.max_solver_error=0.002"])  # fmt: skip
    assert cfg.eval.solver_check == 0.02 and cfg.eval.protocol.max_solver_error == 0.002
    with pytest.raises(ConfigError, match="eval.solver_check"):
        apply_overrides(get_preset("digits_cpu"), ["eval.solver_check=2.5"]).validate()
