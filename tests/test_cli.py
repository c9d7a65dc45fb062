"""Each subcommand end to end on tiny settings, through the same entry point users call."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from idode.cli import main

FAST_EVAL = [
    "--max-examples",
    "6",
    "--batch-size",
    "3",
    "--rtol",
    "1e-3",
    "--atol",
    "1e-3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """A copy of conftest's shared run (trained by ``idode train``), for tests that resume it."""
    return shutil.copytree(trained_run, tmp_path_factory.mktemp("cli") / "run", symlinks=True)


def test_train_writes_a_run(run):
    assert (run / "checkpoint" / "meta.json").is_file()
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()


def test_dry_run_prints_the_resolved_config(capsys, tmp_path):
    assert (
        main(
            [
                "train",
                "--config",
                "mnist_cpu",
                "--set",
                "train.lr=3e-4",
                "--out",
                str(tmp_path / "x"),
                "--dry-run",
            ]
        )
        == 0
    )
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 3e-4 and cfg["data"]["name"] == "mnist"
    assert not (tmp_path / "x").exists()


def test_train_refuses_to_overwrite_and_resumes(run, capsys):
    assert main(["train", "--config", "digits_cpu", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (
        main(["train", "--out", str(run), "--resume", "--set", "train.steps=22", "--no-progress"])
        == 0
    )
    assert "checkpoints/step_00000022" in capsys.readouterr().out


def test_finetune_eval_sample(run, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--from",
                str(run / "checkpoint"),
                "--out",
                str(ft),
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((ft / "checkpoint" / "meta.json").read_text())
    assert meta["config"]["train"]["second_order_weight"] == 0.1
    out = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ft / "checkpoint"),
                "--out",
                str(out),
                "--dequantization",
                "uniform",
                *FAST_EVAL,
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["bpd"]["n"] == 6 and result["settings"]["dequantization"] == "uniform"
    assert "uniform bits/dim" in capsys.readouterr().out
    prefix = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(ft),
                "-n",
                "4",
                "--out",
                str(prefix),
                "--rtol",
                "1e-3",
                "--atol",
                "1e-3",
                "--no-progress",
            ]
        )
        == 0
    )
    s = np.load(f"{prefix}.npz")["samples"]
    assert s.shape == (4, 1, 8, 8) and s.max() < 17
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_clear_errors(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "digits_cpu",
                "--set",
                "train.stepz=3",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                "cifar10_cpu",
                "--set",
                f"data.root={tmp_path}/none",
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "CIFAR-10" in err and "data_batch_1" in err
    assert main(["train", "--config", "no_such_preset", "--out", str(tmp_path / "c")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x", "--dequantization", "flowpp"])


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "idode", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "finetune", "eval", "sample", "demo", "ablate"):
        assert cmd in out.stdout
