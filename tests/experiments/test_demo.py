import json

from idode.cli import main


def test_demo_quick_writes_a_readable_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert f"Report: {(out / 'report.md').resolve()}" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for needle in (
        "truncated-normal",
        "uniform",
        "variational",
        "SDE bound",
        "95% interval",
        "solver error, max",
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
