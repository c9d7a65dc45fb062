"""Checkpoint files: checksums, the format-1 fixture, cleanup that deletes only its own files,
fall-back past damaged checkpoints, and one-line refusals of NaN or unfitting weights."""

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from idode.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_candidates,
    find_checkpoint,
    load_checkpoint,
    load_model,
    load_newest_intact,
    save_checkpoint,
)
from idode.config import apply_overrides
from idode.likelihood import bits_per_dim
from idode.model import build_model
from idode.presets import get_preset
from idode.runguard import remove_partial_writes

DATA = Path(__file__).parent / "data"
SHAPE, LEVELS = (1, 8, 8), 17


def _cfg(*extra):
    return apply_overrides(
        get_preset("digits_cpu"), ["model.net=mlp", "model.mlp_hidden=16", *extra]
    )


def _save(run, step, keep=2, model=None, cfg=None):
    cfg = cfg or _cfg()
    model = model or build_model(cfg, SHAPE, LEVELS)
    extra = {"data_shape": list(SHAPE), "num_levels": LEVELS}
    ema = copy.deepcopy(model)
    return save_checkpoint(run, step=step, cfg=cfg, model=model, ema=ema, extra=extra, keep=keep)


def _tensor_offset(path: Path, key: str) -> int:
    """Byte offset of a tensor's data in a safetensors file (8-byte header length + header)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[key]["data_offsets"][0]


# --------------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------------


def test_meta_records_the_sha256_of_the_state_file(tmp_path):
    ck = _save(tmp_path / "run", 1)
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2
    digest = hashlib.sha256((ck / "state.safetensors").read_bytes()).hexdigest()
    assert meta["checksums"]["state.safetensors"] == f"sha256:{digest}"


def test_damaged_bytes_are_refused_with_both_checksums(tmp_path):
    ck = _save(tmp_path / "run", 1)
    state = ck / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[_tensor_offset(state, "ema/net.inp.weight") + 3] ^= 0x40  # one bit: still a valid file
    state.write_bytes(bytes(raw))
    expected = json.loads((ck / "meta.json").read_text())["checksums"]["state.safetensors"]
    actual = "sha256:" + hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ck)
    msg = str(err.value)
    assert str(state) in msg and expected in msg and actual in msg and "earlier checkpoint" in msg
    # without the checksum the damage would go unnoticed: the file still parses (format 1 path)
    meta = json.loads((ck / "meta.json").read_text())
    meta["format_version"] = 1
    del meta["checksums"]
    (ck / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(ck).step == 1


def test_format_1_fixture_loads_and_evaluates_as_recorded():
    exp = json.loads((DATA / "checkpoint_v1_expected.json").read_text())
    model, ck = load_model(DATA / "checkpoint_v1")
    assert ck.meta["format_version"] == 1 and "checksums" not in ck.meta and ck.step == 3
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(exp["net_input_seed"]))
    gamma = torch.tensor(exp["gamma"])
    with torch.no_grad():
        out = model.net(z, gamma)
    torch.testing.assert_close(out, torch.tensor(exp["net_output"]), rtol=0, atol=1e-6)
    # uniform dequantization draws noise, and the fixture does not record its stream: a fresh
    # exact-divergence solve is finite and within the spread of single-draw estimates
    x = torch.tensor(exp["x_int"])
    res = bits_per_dim(
        model, x, exp["num_levels"], "uniform", 1, "exact", 1e-7, 1e-7,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for got, want in zip(res.bpd.tolist(), exp["bpd_uniform_exact_1e-7"], strict=True):
        assert math.isfinite(got) and abs(got - want) < 0.25


def test_unknown_format_is_refused(tmp_path):
    ck = _save(tmp_path / "run", 1)
    meta = json.loads((ck / "meta.json").read_text())
    meta["format_version"] = 3
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not an idode checkpoint of format 1 or 2"):
        load_checkpoint(ck)


# --------------------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------------------


def test_pruning_keeps_folders_holding_other_files_and_warns_once(tmp_path, capsys):
    run = tmp_path / "run"
    first = _save(run, 1, keep=1)
    (first / "eval_test").mkdir()
    (first / "eval_test" / "eval.json").write_text("{}")  # an old-style evaluation
    (first / "samples.png").write_bytes(b"png")
    _save(run, 2, keep=1)
    _save(run, 3, keep=1)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000003"]  # step 2 (only own files) deleted
    assert (first / "eval_test" / "eval.json").read_text() == "{}"
    assert (first / "samples.png").read_bytes() == b"png"
    err = capsys.readouterr().err
    assert err.count("step_00000001") == 1 and "was not deleted" in err and "eval_test" in err


def test_resaving_a_step_keeps_others_files(tmp_path):
    run = tmp_path / "run"
    ck = _save(run, 5)
    old = load_checkpoint(ck).section("model")["net.inp.weight"]
    (ck / "notes.txt").write_text("mine")
    model = build_model(_cfg(), SHAPE, LEVELS)
    _save(run, 5, model=model)
    assert (ck / "notes.txt").read_text() == "mine"
    new = load_checkpoint(ck).section("model")["net.inp.weight"]
    assert torch.equal(new, model.state_dict()["net.inp.weight"]) and not torch.equal(new, old)


def test_remove_partial_writes_takes_only_the_writers_temporary_folders(tmp_path):
    run = tmp_path / "run"
    _save(run, 1)
    root = run / "checkpoints"
    partial = root / ".tmp_step_00000002_ab12cd"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"half")
    other = root / ".tmp_mine"
    other.mkdir()
    assert remove_partial_writes(run) == [partial]
    assert not partial.exists() and other.is_dir() and (root / "step_00000001").is_dir()


# --------------------------------------------------------------------------------------------------
# finding the newest intact checkpoint
# --------------------------------------------------------------------------------------------------


def test_damaged_newest_checkpoint_is_named_with_the_newest_intact_one(tmp_path):
    run = tmp_path / "run"
    _save(run, 2)
    newest = _save(run, 4)
    assert checkpoint_candidates(run) == [newest, run / "checkpoints" / "step_00000002"]
    (newest / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(run)
    msg = str(err.value)
    assert str(newest / "state.safetensors") in msg
    assert "newest intact checkpoint of this run is" in msg and "step_00000002 (step 2)" in msg
    ck, refused = load_newest_intact(run)
    assert ck.step == 2 and [p for p, _ in refused] == [newest]


def test_incomplete_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save(run, 2)
    newest = _save(run, 4)
    (newest / "meta.json").unlink()
    assert find_checkpoint(run) == newest  # the link still names it: it is reported, not hidden
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*step_00000004.*step 2"):
        load_checkpoint(run)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        load_newest_intact(run)


# --------------------------------------------------------------------------------------------------
# weights that cannot be used
# --------------------------------------------------------------------------------------------------


def test_non_finite_weights_are_refused_naming_checkpoint_and_tensor(tmp_path):
    model = build_model(_cfg(), SHAPE, LEVELS)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    ck = _save(tmp_path / "run", 7, model=model)
    with pytest.raises(CheckpointError) as err:
        load_model(ck)
    msg = str(err.value)
    assert str(ck) in msg and f"ema/{name} has 1 NaN/inf" in msg and "\n" not in msg


def test_unfitting_weights_name_the_parameter_shapes_and_setting(tmp_path):
    ck = load_checkpoint(_save(tmp_path / "run", 1))
    wider_cfg = _cfg("model.mlp_hidden=24")
    wider = build_model(wider_cfg, SHAPE, LEVELS)
    with pytest.raises(CheckpointError) as err:
        ck.load_into(wider, "model", wider_cfg)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert "'net.inp.weight' is [16, 129] in the checkpoint but [24, 129] in this model" in msg
    assert "model.mlp_hidden (checkpoint 16, now 24)" in msg
