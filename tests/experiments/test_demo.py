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
