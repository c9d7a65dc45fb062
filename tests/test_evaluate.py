import json
import math
import shutil

import numpy as np
import pytest
from scipy.stats import norm

from idode import evaluate as evaluate_module
from idode.checkpoint import CheckpointError, find_checkpoint
from idode.config import ConfigError, apply_overrides
from idode.evaluate import EvalSettingsError, evaluate, read_per_example
from idode.presets import get_preset
from idode.train import train

TINY = [
    "train.steps=20",
    "train.eval_every=0",
    "train.checkpoint_every=20",
    "model.n_embd=8",
    "model.n_layers=1",
    "model.fourier_features=false",
]
# 12 test digits, at most 5 rows per network call; loose tolerances keep the solves short
FAST = dict(max_examples=12, batch_size=5, rtol=1e-3, atol=1e-3, device="cpu", progress=False)
COLUMNS = ("bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "elbo_bpd")


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return trained_run  # conftest's shared run (20 steps): read only


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_reference")
    return out, evaluate(ckpt, out, **FAST)


@pytest.fixture
def count_batches(monkeypatch):
    """Record how many examples each bits/dim stream gets; optionally kill after n finished."""
    calls: list[int] = []
    real = evaluate_module.iter_bits_per_dim
    state = {"kill_after": None}

    def counting(model, x_int, *args, **kwargs):
        calls.append(len(x_int))
        done = 0
        for group in real(model, x_int, *args, **kwargs):
            yield group
            done += len(group)
            if state["kill_after"] is not None and done >= state["kill_after"]:
                raise RuntimeError("simulated kill")

    monkeypatch.setattr(evaluate_module, "iter_bits_per_dim", counting)
    return calls, state


def _rows(out):
    return [json.loads(line) for line in (out / "per_example.jsonl").read_text().splitlines()]


def _assert_rows_close(rows, ref_rows):
    assert [r["index"] for r in rows] == [r["index"] for r in ref_rows]
    for key in COLUMNS:
        np.testing.assert_allclose(
            [r[key] for r in rows], [r[key] for r in ref_rows], rtol=0, atol=1e-6, err_msg=key
        )


def test_eval_json_matches_the_per_example_file(reference, ckpt):
    out, res = reference
    assert json.loads((out / "eval.json").read_text()) == res
    rows = _rows(out)
    assert [r["index"] for r in rows] == list(range(12))
    assert not list(out.glob("per_example.rank*"))
    for key, col in (("bpd", "bpd"), ("elbo", "elbo_bpd"), ("bpd_mean_of_bounds", None)):
        vals = np.array([r[col or key] for r in rows])
        s = res[key]
        assert s["n"] == 12
        assert s["mean"] == pytest.approx(vals.mean(), rel=1e-12)
        se = vals.std(ddof=1) / math.sqrt(12)
        z = norm.ppf(0.975)  # the two-sided 95% normal quantile
        assert s["stderr"] == pytest.approx(se, rel=1e-9)
        assert s["ci95"] == pytest.approx([vals.mean() - z * se, vals.mean() + z * se])
    assert all(np.isfinite(r["bpd"]) and np.isfinite(r["elbo_bpd"]) for r in rows)
    # K = 1, not importance weighted: all three estimates coincide up to log q vs E log q
    assert res["bpd"]["mean"] == res["bpd_mean_of_bounds"]["mean"]
    nfe = [r["nfe"] for r in rows]
    assert nfe == [6 * r["steps_per_draw"][0] + 2 for r in rows]
    assert res["nfe"]["per_example_mean"] == pytest.approx(np.mean(nfe))
    assert res["nfe"]["per_example_median"] == pytest.approx(np.median(nfe))
    assert res["nfe"]["per_example_max"] == max(nfe)
    assert res["nfe"]["batched_total"] >= max(nfe)
    # the solver's own (local) error estimate, per example and summarised
    assert all(r["solver_error_bpd"] > 0 for r in rows)
    errs = [r["solver_error_bpd"] for r in rows]
    assert res["local_error_estimate"]["bpd_max"] == max(errs)
    assert res["local_error_estimate"]["bpd_mean"] == pytest.approx(np.mean(errs))
    # the measured error: the default check, max(8, 2 %) of the 12 jobs
    assert res["solver_error"]["checked"] == 8
    assert res["settings"]["tolerance"] == "paper"  # the digits preset's protocol
    assert res["checkpoint"]["step"] == 20
    assert res["checkpoint"]["path"] == str(find_checkpoint(ckpt).resolve())
    assert res["dataset"]["name"] == "digits" and res["dataset"]["split"] == "test"
    assert res["dataset"]["num_levels"] == 17 and res["dataset"]["num_examples"] == 12
    assert "source" in res["dataset"]["info"]
    st = res["settings"]
    assert st["dequantization"] == "truncated_normal" and st["divergence"] == "rademacher"
    assert st["rtol"] == 1e-3 and st["batch_size"] == 5 and st["seed"] == 0 and st["ema"]
    assert res["torch_version"] and res["device"] == "cpu" and res["wall_seconds"] > 0


def test_resume_after_a_kill_computes_only_the_rest(ckpt, reference, tmp_path, count_batches):
    calls, state = count_batches
    out = tmp_path / "eval"
    state["kill_after"] = 5  # killed once 5 examples have finished (rows hold the others)
    with pytest.raises(RuntimeError, match="simulated kill"):
        evaluate(ckpt, out, **FAST)
    saved = sorted(read_per_example(out))
    assert 5 <= len(saved) < 12
    assert not (out / "eval.json").exists()
    calls.clear()
    state["kill_after"] = None
    res = evaluate(ckpt, out, **FAST)
    assert calls == [12 - len(saved)]  # only the examples not saved
    _assert_rows_close(_rows(out), _rows(reference[0]))
    assert res["bpd"]["mean"] == pytest.approx(reference[1]["bpd"]["mean"], abs=1e-6)
    calls.clear()
    evaluate(ckpt, out, **FAST)  # all done: nothing to solve
    assert calls == []


def test_truncated_last_line_is_recomputed(ckpt, reference, tmp_path, count_batches):
    calls, _ = count_batches
    out = tmp_path / "eval"
    out.mkdir()
    shutil.copy(reference[0] / "eval_settings.json", out)
    lines = (reference[0] / "per_example.jsonl").read_text().splitlines(keepends=True)
    (out / "per_example.jsonl").write_text("".join(lines[:7]) + lines[7][: len(lines[7]) // 2])
    assert sorted(read_per_example(out)) == list(range(7))
    evaluate(ckpt, out, **FAST)
    assert calls == [5]  # 7 (cut) to 11
    _assert_rows_close(_rows(out), _rows(reference[0]))


def test_more_examples_extend_an_evaluation(ckpt, reference, tmp_path, count_batches):
    calls, _ = count_batches
    out = tmp_path / "eval"
    shutil.copytree(reference[0], out)
    res = evaluate(ckpt, out, **{**FAST, "max_examples": 14})
    assert calls == [2] and res["bpd"]["n"] == 14
    _assert_rows_close(_rows(out)[:12], _rows(reference[0]))


def test_other_settings_in_the_same_directory_are_refused(ckpt, reference, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(reference[0], out)
    with pytest.raises(
        EvalSettingsError, match=r"differs in protocol \(seed: saved 0, now 1\); .*--overwrite"
    ):
        evaluate(ckpt, out, **{**FAST, "seed": 1})
    assert len(read_per_example(out)) == 12  # untouched
    res = evaluate(ckpt, out, **{**FAST, "seed": 1, "max_examples": 2, "overwrite": True})
    assert res["bpd"]["n"] == 2 and res["settings"]["seed"] == 1
    assert sorted(read_per_example(out)) == [0, 1]
    assert json.loads((out / "eval_settings.json").read_text())["protocol"]["seed"] == 1
    (out / "eval_settings.json").unlink()
    with pytest.raises(EvalSettingsError, match="no eval_settings.json"):
        evaluate(ckpt, out, **FAST)


def test_missing_or_corrupt_checkpoint(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(tmp_path / "nowhere", tmp_path / "e1", **FAST)
    bad = tmp_path / "bad"
    shutil.copytree(find_checkpoint(ckpt), bad)
    state = bad / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint tensors"):
        evaluate(bad, tmp_path / "e2", **FAST)
    with pytest.raises(
        ConfigError, match="unknown eval.dequantization 'gauss'; valid: 'truncated_normal'"
    ):
        evaluate(ckpt, tmp_path / "e3", **{**FAST, "dequantization": "gauss"})


@pytest.fixture(scope="module")
def protocol_ckpt(tmp_path_factory):
    """A run whose config carries a non-default evaluation protocol (K = 2 uniform, IW)."""
    run = tmp_path_factory.mktemp("protocol") / "run"
    cfg = apply_overrides(
        get_preset("digits_cpu"),
        [
            *TINY,
            "eval.dequantization=uniform",
            "eval.num_samples=2",
            "eval.importance_weighted=true",
            "eval.rtol=1e-3",
            "eval.atol=1e-3",
            "eval.seed=3",
            "train.ode_eval_every=20",
            "data.ode_eval_examples=2",
        ],
    )
    train(cfg, run, progress=False)
    return run


def test_eval_takes_its_protocol_from_the_checkpoint(protocol_ckpt):
    res = evaluate(protocol_ckpt, max_examples=3, device="cpu", progress=False, with_elbo=False)
    st = res["settings"]
    assert (st["dequantization"], st["num_samples"], st["importance_weighted"]) == (
        "uniform",
        2,
        True,
    )
    assert (st["rtol"], st["atol"], st["seed"]) == (1e-3, 1e-3, 3)
    assert set(res["settings_source"].values()) == {"checkpoint"}
    rows = _rows(evaluate_module.Path(res["out_dir"]))
    # the reported number is the importance-weighted bound, as the protocol says
    assert [r["bpd"] for r in rows] == [r["bpd_importance_weighted"] for r in rows]
    assert all(len(r["steps_per_draw"]) == 2 for r in rows)
    # default output: in the run folder, never inside a checkpoint folder (cleanup owns those)
    out = evaluate_module.Path(res["out_dir"])
    assert out.parent == protocol_ckpt / "evals"
    assert out.name == "step_00000020_test_uniform_k2_iw"


def test_flags_override_the_checkpoint_protocol_and_say_so(protocol_ckpt, tmp_path):
    res = evaluate(
        protocol_ckpt,
        tmp_path / "e",
        max_examples=2,
        device="cpu",
        progress=False,
        with_elbo=False,
        num_samples=1,
        importance_weighted=False,
    )
    st, src = res["settings"], res["settings_source"]
    assert (st["dequantization"], st["num_samples"], st["importance_weighted"]) == (
        "uniform",
        1,
        False,
    )
    assert src["num_samples"] == src["importance_weighted"] == "argument"
    assert src["dequantization"] == src["rtol"] == "checkpoint"


def test_periodic_evaluation_follows_the_protocol(protocol_ckpt):
    from idode.rundir import read_metrics

    m = read_metrics(protocol_ckpt / "metrics.jsonl")
    assert "eval/ode_bpd_uniform" in m and "eval/ode_bpd_tn" not in m
    # K = 2 draws per image: at least 2 x (6 steps + 2) evaluations per image
    assert m["eval/ode_nfe"][-1][1] >= 2 * 8
    # the measured solver error: all 2 x 2 jobs (fewer than the default 8) solved again
    err_max, err_mean = (
        m["eval/ode_solver_error_max"][-1][1],
        m["eval/ode_solver_error_mean"][-1][1],
    )
    assert err_max >= err_mean > 0


def test_bad_arguments_are_refused_before_anything_is_written(protocol_ckpt, tmp_path):
    out = tmp_path / "never"
    for kwargs, message in (
        ({"rtol": 0.0}, "eval.rtol must be > 0"),
        ({"num_samples": 0}, "eval.num_samples must be >= 1"),
        ({"dequantization": "gaussian"}, "unknown eval.dequantization 'gaussian'"),
        ({"max_examples": 0}, "max_examples must be a positive integer"),
    ):
        with pytest.raises(ConfigError, match=message):
            evaluate(protocol_ckpt, out, device="cpu", progress=False, **kwargs)
    assert not out.exists()


def test_a_copied_run_resumes_its_evaluation(ckpt, reference, tmp_path, count_batches):
    """No path in the identity: the run and its evaluation moved elsewhere resume as they are."""
    calls, _ = count_batches
    run, out = tmp_path / "moved" / "run", tmp_path / "moved" / "eval"
    shutil.copytree(ckpt, run)
    shutil.copytree(reference[0], out)
    res = evaluate(run, out, **FAST)
    assert calls == []  # every row reused
    assert res["bpd"] == reference[1]["bpd"]
    assert res["checkpoint"]["checksum"] == reference[1]["checkpoint"]["checksum"]
    assert res["checkpoint"]["checksum"].startswith("sha256:")


def test_other_data_under_the_same_name_is_refused(ckpt, reference, tmp_path, count_batches):
    """The case of the issue: rows of one data file, then the same name with other images."""
    from idode.data import load_dataset

    calls, _ = count_batches
    digits = load_dataset("digits", "test")
    file_a, file_b = tmp_path / "a.npz", tmp_path / "b.npz"
    levels = np.int64(digits.num_levels)
    np.savez(file_a, x_test=digits.images[:6], num_levels=levels)
    np.savez(file_b, x_test=digits.images[6:12], num_levels=levels)
    out = tmp_path / "eval"
    common = {**FAST, "max_examples": 3, "data": "npz", "with_elbo": False}
    first = evaluate(ckpt, out, overrides=[f"data.path={file_a}"], **common)
    assert first["bpd"]["n"] == 3
    calls.clear()
    with pytest.raises(EvalSettingsError) as e:
        evaluate(ckpt, out, data_root=str(file_b), **{**common, "max_examples": 6})
    message = str(e.value)
    assert "\n" not in message and "differs in data" in message and "--overwrite" in message
    assert "example 0" in message and calls == []
    assert sorted(read_per_example(out)) == [0, 1, 2]  # untouched
    # the same images in another file resume, and extend to more examples
    copy = tmp_path / "elsewhere" / "a.npz"
    copy.parent.mkdir()
    shutil.copy(file_a, copy)
    res = evaluate(ckpt, out, overrides=[f"data.path={copy}"], **{**common, "max_examples": 6})
    assert calls == [3] and res["bpd"]["n"] == 6
    assert res["dataset"]["content_hash"] == load_dataset("npz", "test", path=file_a).content_hash()


def test_another_checkpoint_in_the_same_directory_is_refused(ckpt, reference, tmp_path):
    other = tmp_path / "other"
    train(apply_overrides(get_preset("digits_cpu"), [*TINY, "train.seed=2"]), other, progress=False)
    out = tmp_path / "eval"
    shutil.copytree(reference[0], out)
    with pytest.raises(EvalSettingsError, match=r"differs in model \(checksum: saved 'sha256:"):
        evaluate(other, out, **FAST)
    with pytest.raises(EvalSettingsError, match=r"differs in model \(ema: saved True, now False"):
        evaluate(ckpt, out, **{**FAST, "ema": False})


def test_an_identity_file_of_an_older_idode_is_refused(ckpt, reference, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(reference[0], out)
    (out / "eval_settings.json").write_text(json.dumps({"checkpoint": "/x", "seed": 0}))
    with pytest.raises(EvalSettingsError, match="older idode.*--overwrite"):
        evaluate(ckpt, out, **FAST)


def test_a_protocol_replaces_all_of_the_checkpoints(protocol_ckpt, tmp_path):
    from idode.protocol import Protocol

    p = Protocol(rtol=1e-3, atol=1e-3, tolerance="paper", seed=4)
    res = evaluate(
        protocol_ckpt, tmp_path / "e", protocol=p, max_examples=2, device="cpu",
        progress=False, with_elbo=False, num_samples=2,
    )  # fmt: skip
    st, src = res["settings"], res["settings_source"]
    assert Protocol.from_json({k: st[k] for k in Protocol.field_names()}) == p.replace(
        num_samples=2
    )
    assert st["protocol_fingerprint"] == p.replace(num_samples=2).fingerprint()
    assert src["dequantization"] == src["num_samples"] == "argument"
    assert src["batch_size"] == "checkpoint"
    saved = json.loads((tmp_path / "e" / "eval_settings.json").read_text())
    assert Protocol.from_json(saved["protocol"]) == p.replace(num_samples=2)
