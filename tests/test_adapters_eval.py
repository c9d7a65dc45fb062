"""A diffusers model folder through ``idode eval``, as a new user would run it."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from adapter_problems import tiny_diffusers_unet

import idode.adapters
from idode.cli import main

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test extra: pip install diffusers"
)

FAST = ["--max-examples", "4", "--batch-size", "4", "--rtol", "1e-3", "--atol", "1e-3"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pipeline folder as ``save_pretrained`` writes it: unet/ and scheduler/."""
    root = tmp_path_factory.mktemp("ddpm") / "pipe"
    tiny_diffusers_unet().save_pretrained(root / "unet")
    diffusers.DDPMScheduler(
        num_train_timesteps=1000, prediction_type="v_prediction"
    ).save_pretrained(root / "scheduler")
    return root


def test_idode_eval_of_a_diffusers_folder_gives_bits_per_dim_with_an_interval(
    pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(pipeline_dir), "--data", "digits", "--out", str(out)]
    assert main([*argv, *FAST, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "95% CI" in printed
    res = json.loads((out / "eval.json").read_text())
    bpd = res["bpd"]
    assert bpd["n"] == 4 and math.isfinite(bpd["mean"]) and bpd["mean"] > 0
    assert bpd["ci95"][0] < bpd["mean"] < bpd["ci95"][1]
    assert math.isfinite(res["elbo"]["mean"])
    info = res["model_folder"]
    assert info["unet_class"] == "UNet2DModel" and info["scheduler_class"] == "DDPMScheduler"
    assert info["prediction_type"] == "v_prediction"
    assert res["settings"]["dataset"] == "digits" and res["dataset"]["num_levels"] == 17
    assert len((out / "per_example.jsonl").read_text().splitlines()) == 4


def test_uniform_dequantization_starts_at_the_first_timestep(pipeline_dir, tmp_path):
    """DDPM's ODE starts at gamma_0 = -9.21 > -11.8: uniform dequantization starts there."""
    out = tmp_path / "eval_u"
    argv = ["eval", "--checkpoint", str(pipeline_dir), "--data", "digits", "--out", str(out)]
    assert main([*argv, *FAST, "--dequantization", "uniform", "--no-elbo", "--no-progress"]) == 0
    assert math.isfinite(json.loads((out / "eval.json").read_text())["bpd"]["mean"])


def test_load_model_folder_layouts_and_the_loaded_model(pipeline_dir, tmp_path):
    model, info = idode.adapters.load_model_folder(pipeline_dir)
    assert idode.adapters.is_model_folder(pipeline_dir)
    abar0 = float(np.float32(1 - 1e-4))  # diffusers keeps alphas_cumprod in float32
    assert info["gamma_min"] == pytest.approx(math.log((1 - abar0) / abar0), abs=1e-9)
    assert info["sample_size"] == [8, 8] and info["in_channels"] == 1
    # the model folder itself, with the scheduler config beside it (the Hub's flat layout)
    flat = tmp_path / "flat"
    unet = tiny_diffusers_unet()
    unet.save_pretrained(flat)
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_config(flat)
    flat_model, _ = idode.adapters.load_model_folder(flat)
    # and unet/ pointed at directly, finding ../scheduler/
    sub_model, sub_info = idode.adapters.load_model_folder(pipeline_dir / "unet")
    # the weights' identity (the resume guard of idode eval): the files, not where they lie
    assert sub_info["checksum"] == info["checksum"] and info["checksum"].startswith("sha256:")
    moved = tmp_path / "moved"
    shutil.copytree(pipeline_dir, moved)
    assert idode.adapters.load_model_folder(moved)[1]["checksum"] == info["checksum"]
    z = torch.randn(2, 1, 8, 8)
    g = torch.tensor([-3.0, 2.5])
    with torch.no_grad():
        ref = unet.eval()(z, model.net.timestep(g)).sample
        for m in (model, flat_model, sub_model):
            torch.testing.assert_close(m.velocity_hat(z, g), ref)


def test_clear_errors(pipeline_dir, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(pipeline_dir), "--out", str(tmp_path / "e"), *FAST]
    assert main([*argv, "--no-progress"]) == 2
    assert "--data NAME" in capsys.readouterr().err
    assert main([*argv, "--data", "digits", "--set", "model.n_embd=4", "--no-progress"]) == 2
    assert "data.* keys only" in capsys.readouterr().err
    # 16x16 images for an 8x8 UNet
    npz = tmp_path / "x.npz"
    x = np.random.default_rng(0).integers(0, 256, (6, 1, 16, 16), dtype=np.uint8)
    np.savez(npz, x_train=x, x_test=x)
    bad = ["--data", "npz", "--set", f"data.path={npz}", "--no-progress"]
    assert main([*argv, *bad]) == 2
    assert "takes 1 channels at [8, 8]" in capsys.readouterr().err
    no_sched = tmp_path / "no_sched"
    tiny_diffusers_unet().save_pretrained(no_sched)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        idode.adapters.load_model_folder(no_sched)
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        idode.adapters.load_model_folder(tmp_path)


def test_eval_data_config_applies_data_name_and_data_overrides():
    from idode.config import ConfigError, DataConfig
    from idode.evalinputs import eval_data_config

    base = DataConfig(name="mnist", root="/a")
    assert eval_data_config(base, None, None) is base
    assert eval_data_config(base, None, ["data.root=/b"]) == DataConfig(name="mnist", root="/b")
    got = eval_data_config(base, "npz", ["data.path=/x.npz"])
    assert (got.name, got.root, got.path) == ("npz", "/a", "/x.npz")
    with pytest.raises(ConfigError, match="unknown data.name|data.name"):
        eval_data_config(base, "imagenet64", None)
    with pytest.raises(ConfigError, match="data.\\* keys only"):
        eval_data_config(base, None, ["train.steps=3"])
