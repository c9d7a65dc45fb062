import json

from idode.cli import main


def test_demo_quick_writes_a_readable_report(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file\n")  # --overwrite writes next to it, never over
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "a user's file\n"
    assert f"Report: {(out / 'report.md').resolve()}" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for needle in (
        "truncated-normal",
        "uniform",
        "variational",
        "SDE bound",
        "95% interval",
        "bpd_by_dequantization.png",
        "learning_curves.png",
        "samples.png",
        "real_digits.png",
        "--quick",
    ):
        assert needle in report, needle
    for png in (
        "bpd_by_dequantization.png",
        "learning_curves.png",
        "samples.png",
        "real_digits.png",
    ):
        assert (out / png).stat().st_size > 1000, png
    res = json.loads((out / "demo_results.json").read_text())["results"]
    assert set(res) == {"truncated_normal", "variational", "uniform"}
    assert all(r["bpd"]["n"] == 24 for r in res.values())
    assert res["truncated_normal"]["elbo"]["n"] == 24
    # the measured solver error beside the interval: 3 of the 24 images in a quick run
    assert all(r["solver_error"]["checked"] == 3 for r in res.values())
    se = res["truncated_normal"]["solver_error"]
    assert f"{se['max_abs_bpd']:.4f} (3)" in report


def test_demo_reuses_its_own_finished_run_and_says_so(tmp_path, capsys):
    from idode.config import apply_overrides
    from idode.experiments.demo import _prepare, _timing
    from idode.presets import get_preset

    out = tmp_path / "demo"
    argv = ["train", "--config", "digits_cpu", "--set", "train.steps=2", "--no-progress"]
    assert main([*argv, "--set", "train.checkpoint_every=2", "--out", str(out)]) == 0
    demo_cfg = lambda steps: apply_overrides(  # noqa: E731
        get_preset("digits_cpu"), [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
    )
    assert _prepare(out, demo_cfg(2), overwrite=False) == ("reuse", 2)
    assert _prepare(out, demo_cfg(3), overwrite=True) == ("fresh", 0)
    # a reused model's training time is the earlier run's, never this run's few seconds
    assert _timing(600.0, 60.0, 660.0, "reuse", 2) == (
        "11.0 minutes: training 10.0 min (by an earlier run of the demo), evaluation 1.0 min"
    )
    assert "trained by an earlier `idode demo`" in _timing(None, 60.0, 60.0, "reuse", 2)
