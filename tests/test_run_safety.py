"""Nothing lost: results survive cleanup, interrupted writes are tidied, a damaged newest
checkpoint is skipped, SIGINT/SIGTERM leave an exactly resumable checkpoint, metrics are not
duplicated, earlier runs are not clobbered, and bad resumes are one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from idode import train as train_module
from idode.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from idode.cli import main
from idode.config import apply_overrides
from idode.evaluate import evaluate
from idode.presets import get_preset
from idode.rundir import read_jsonl
from idode.runguard import RunFolderError
from idode.train import TrainingStopped, train
from idode.write_samples import sample_to_files

SRC = Path(__file__).resolve().parent.parent / "src"
TINY = [
    "model.net=mlp",
    "model.mlp_hidden=16",
    "train.batch_size=16",
    "train.eval_every=0",
    "train.ode_eval_every=0",
    "train.log_every=1",
    "data.max_train_examples=64",
    "data.eval_examples=8",
]
FAST_EVAL = dict(max_examples=2, batch_size=2, rtol=1e-3, atol=1e-3, with_elbo=False,
                 dequantization="uniform", device="cpu", progress=False)  # fmt: skip


def _cfg(*extra):
    return apply_overrides(get_preset("digits_cpu"), TINY + list(extra))


def _steps(cfg, n):
    return replace(cfg, train=replace(cfg.train, steps=n))


def _same_weights(a, b):
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------
# results survive cleanup; interrupted writes are removed
# --------------------------------------------------------------------------------------------------


def test_eval_and_sample_results_survive_continued_training(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg("train.checkpoint_every=2", "train.keep_checkpoints=1")
    train(_steps(cfg, 2), run, progress=False)
    res = evaluate(run, **FAST_EVAL)  # default: RUN/evals/...
    old_style = evaluate(run, find_checkpoint(run) / "eval_test", **FAST_EVAL)
    smp = sample_to_files(run, None, 2, rtol=1e-3, atol=1e-3, device="cpu", progress=False)
    train(_steps(cfg, 6), run, resume=True, progress=False)
    for path in (Path(res["out_dir"]) / "eval.json", Path(old_style["out_dir"]) / "eval.json"):
        assert json.loads(path.read_text())["bpd"]["n"] == 2
    assert smp["npz"].is_file() and smp["png"].is_file()
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000006"]  # 4 deleted; 2 holds the old-style eval
    err = capsys.readouterr().err
    assert err.count("step_00000002 was not deleted") == 1


def test_interrupted_checkpoint_writes_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg("train.checkpoint_every=2")
    train(_steps(cfg, 2), run, progress=False)
    partial = run / "checkpoints" / ".tmp_step_00000004_x1y2"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"\0" * 100)
    mine = run / "checkpoints" / ".tmp_notes"
    mine.mkdir()
    train(_steps(cfg, 4), run, resume=True, progress=False)
    assert not partial.exists() and mine.is_dir()


# --------------------------------------------------------------------------------------------------
# resume: fall back past a damaged checkpoint; metrics without duplicates
# --------------------------------------------------------------------------------------------------


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capfd):
    cfg = _cfg("train.checkpoint_every=2")
    full = train(_steps(cfg, 6), tmp_path / "full", progress=False)
    run = tmp_path / "run"
    train(_steps(cfg, 4), run, progress=False)
    newest = run / "checkpoints" / "step_00000004"
    state = newest / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-5] ^= 0x01
    state.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"step_00000004.*intact.*step_00000002"):
        load_checkpoint(run)  # what `idode eval --checkpoint RUN` reports
    res = train(_steps(cfg, 6), run, resume=True, progress=False)
    err = capfd.readouterr().err
    assert f"not resuming from {newest}" in err and "checksum" in err
    assert "resuming from the newest intact checkpoint" in err and "step 2" in err
    _same_weights(res.model, full.model)
    _same_weights(res.ema, full.ema)


def _crash_after(monkeypatch, n):
    calls = {"n": 0}
    real = train_module.ema_update

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "ema_update", crash)
    return real


def test_metrics_have_no_duplicated_steps_after_a_resume(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = _cfg("train.steps=8", "train.checkpoint_every=3")
    real = _crash_after(monkeypatch, 6)  # steps 1..5 logged, checkpoint at 3
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False)
    monkeypatch.setattr(train_module, "ema_update", real)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # TensorBoard reads event files in name order, and a name holds the second it was opened: a
    # resumed run (a new process, later) sorts after the killed one, so its purge applies
    time.sleep(1.1)
    train(cfg, run, resume=True, progress=False)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 9))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss_bpd")] == list(range(1, 9))


# --------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------------


def test_sigint_writes_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    cfg = _cfg("train.steps=7", "train.checkpoint_every=100")
    full = train(cfg, tmp_path / "full", progress=False)
    calls = {"n": 0}
    real = train_module.ema_update

    def interrupt_at_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # lands in the middle of step 3
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "ema_update", interrupt_at_3)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    with pytest.raises(TrainingStopped) as stop:
        train(cfg, run, progress=False)
    monkeypatch.setattr(train_module, "ema_update", real)
    e = stop.value
    assert e.signum == signal.SIGINT and e.step == 3 and load_checkpoint(run).step == 3
    assert str(e) == (
        f"stopped by SIGINT at step 3; checkpoint {run / 'checkpoints' / 'step_00000003'}; "
        f"continue with --resume"
    )
    assert signal.getsignal(signal.SIGINT) is before  # restored
    res = train(cfg, run, resume=True, progress=False)
    _same_weights(res.model, full.model)
    _same_weights(res.ema, full.ema)


def test_sigterm_stops_the_cli_with_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "run"
    sets = [a for s in TINY + ["train.steps=100000", "train.checkpoint_every=100000"]
            for a in ("--set", s)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "idode", "train", "--config", "digits_cpu", *sets]
    proc = subprocess.Popen(
        [*cmd, "--out", str(run), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not read_jsonl(run / "metrics.jsonl"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    ck = load_checkpoint(run)
    last = err.strip().splitlines()[-1]
    assert last == (
        f"idode train: stopped by SIGTERM at step {ck.step}; checkpoint {ck.path}; "
        f"continue with --resume"
    )
    assert "Traceback" not in err
    cfg = _steps(ck.config, ck.step + 3)
    resumed = train(cfg, run, resume=True, progress=False)
    full = train(cfg, tmp_path / "full", progress=False)
    _same_weights(resumed.model, full.model)
    _same_weights(resumed.ema, full.ema)


# --------------------------------------------------------------------------------------------------
# run folders: earlier runs, finetune guards
# --------------------------------------------------------------------------------------------------


def test_fresh_start_into_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg("train.steps=2", "train.checkpoint_every=2")
    train(cfg, run, progress=False)
    (run / "evals").mkdir()
    (run / "evals" / "keep.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"already holds a run .*--resume.*--overwrite"):
        train(cfg, run, progress=False)
    (run / "checkpoints" / "step_00000002" / "mine.txt").write_text("x")
    with pytest.raises(RunFolderError, match=r"step_00000002, which holds files.*mine.txt"):
        train(cfg, run, progress=False, overwrite=True)
    assert load_checkpoint(run).step == 2  # nothing deleted
    (run / "checkpoints" / "step_00000002" / "mine.txt").unlink()
    assert main(["train", "--config", "digits_cpu", "--out", str(run), "--no-progress",
                 *[a for s in TINY + ["train.steps=1"] for a in ("--set", s)],
                 "--overwrite"]) == 0  # fmt: skip
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert (run / "evals" / "keep.json").is_file()


def test_metrics_alone_count_as_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunFolderError, match=r"already holds a run \(metrics.jsonl\)"):
        train(_cfg("train.steps=1"), run, progress=False)


def test_finetune_has_the_run_guards(tmp_path, capsys):
    src = tmp_path / "src"
    train(_cfg("train.steps=2", "train.checkpoint_every=2"), src, progress=False)
    out = tmp_path / "ft"
    base = ["finetune", "--from", str(src), "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit) as stop:  # a usage error: argparse exits with 2
        main([*base, "--steps", "0"])
    assert stop.value.code == 2
    assert "--steps: must be a positive integer, got 0" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--steps", "1"]) == 0
    assert main([*base, "--steps", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*base, "--steps", "2", "--overwrite"]) == 0
    assert load_checkpoint(out).step == 4
    # --overwrite never deletes the checkpoint being finetuned
    assert main(["finetune", "--from", str(src), "--out", str(src), "--overwrite"]) == 2
    assert "would delete the checkpoint being finetuned" in capsys.readouterr().err
    assert load_checkpoint(src).step == 2


# --------------------------------------------------------------------------------------------------
# resuming or finetuning something that does not fit; NaN weights; data paths
# --------------------------------------------------------------------------------------------------


def test_resume_with_a_changed_model_is_one_line(tmp_path):
    run = tmp_path / "run"
    train(_cfg("train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    with pytest.raises(CheckpointError) as err:
        train(_cfg("train.steps=4", "model.mlp_hidden=24"), run, resume=True, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 500
    assert "'net.inp.weight' is [16, 129] in the checkpoint but [24, 129]" in msg
    assert "model.mlp_hidden (checkpoint 16, now 24)" in msg


def test_finetune_on_another_dataset_is_one_line(trained_run, tmp_path):
    src = trained_run  # conftest's shared digits run: refused before anything is written
    rng = np.random.default_rng(0)
    npz = tmp_path / "other.npz"
    np.savez(npz, train=rng.integers(0, 256, (32, 8, 8), np.uint8),
             test=rng.integers(0, 256, (8, 8, 8), np.uint8))  # fmt: skip
    cfg = _cfg("train.steps=4", "data.name=npz", f"data.path={npz}")
    with pytest.raises(CheckpointError) as err:
        train(cfg, tmp_path / "ft", init_from=src, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "[1, 8, 8] with 17 levels" in msg and "with 256" in msg
    assert "data.name (checkpoint 'digits', now 'npz')" in msg


def test_nan_weights_are_refused_for_finetune_eval_and_sample(tmp_path):
    src = tmp_path / "src"
    res = train(_cfg("train.steps=2", "train.checkpoint_every=2"), src, progress=False)
    ck = load_checkpoint(src)
    name = next(iter(res.model.state_dict()))
    with torch.no_grad():
        res.model.state_dict()[name].view(-1)[0] = float("inf")
        res.ema.state_dict()[name].view(-1)[0] = float("nan")
    bad = tmp_path / "bad"
    path = save_checkpoint(bad, step=2, cfg=ck.config, model=res.model, ema=res.ema,
                           extra=ck.meta["extra"])  # fmt: skip
    for call in (
        lambda: train(_cfg("train.steps=3"), tmp_path / "ft", init_from=bad, progress=False),
        lambda: evaluate(bad, **FAST_EVAL),
        lambda: sample_to_files(bad, tmp_path / "s", 1, device="cpu", progress=False),
    ):
        with pytest.raises(CheckpointError, match=rf"{path}.*non-finite.*/{name} has 1 NaN/inf"):
            call()


def test_relative_data_path_is_stored_absolute_and_eval_names_data_root(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    work = tmp_path / "work"
    work.mkdir()
    np.savez(work / "d.npz", train=rng.integers(0, 17, (32, 8, 8), np.uint8),
             test=rng.integers(0, 17, (8, 8, 8), np.uint8), num_levels=17)  # fmt: skip
    monkeypatch.chdir(work)
    cfg = _cfg("train.steps=1", "data.name=npz", "data.path=d.npz")
    train(cfg, tmp_path / "run", progress=False)
    stored = load_checkpoint(tmp_path / "run").config.data.path
    assert stored == str(work / "d.npz")
    monkeypatch.chdir(tmp_path)
    assert evaluate(tmp_path / "run", **FAST_EVAL)["bpd"]["n"] == 2  # from another folder
    moved = tmp_path / "moved.npz"
    (work / "d.npz").rename(moved)
    with pytest.raises(FileNotFoundError, match=r"idode eval --data-root"):
        evaluate(tmp_path / "run", tmp_path / "e2", **FAST_EVAL)
    res = evaluate(tmp_path / "run", tmp_path / "e3", data_root=str(moved), **FAST_EVAL)
    assert res["bpd"]["n"] == 2


def test_eval_out_naming_a_file_is_refused_and_the_file_kept(trained_run, tmp_path):
    from idode.evaluate import EvalSettingsError

    run = trained_run  # conftest's shared run: refused before anything is written
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    with pytest.raises(EvalSettingsError, match=r"notes.txt is a file; name a directory"):
        evaluate(run, note, **FAST_EVAL)
    assert note.read_text() == "mine"
