import json

import pytest
import torch

from idode.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from idode.model import build_model
from idode.nets import count_parameters
from idode.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_official_hyperparameters():
    c = get_preset("cifar10")
    assert (c.model.n_embd, c.model.n_layers, c.model.dropout) == (128, 32, 0.1)
    t = c.train
    assert (t.lr, t.beta1, t.beta2, t.adam_eps, t.weight_decay) == (2e-4, 0.9, 0.99, 1e-8, 0.01)
    assert (t.warmup_steps, t.ema_decay, t.batch_size, t.grad_clip) == (100, 0.9999, 128, None)
    assert t.importance_sampling and t.antithetic and c.model.parameterization == "velocity"
    assert (c.model.schedule, c.model.gamma_min, c.model.gamma_max) == ("VP", -13.3, 5.0)
    a = get_preset("cifar10_aug")
    assert (a.model.n_embd, a.model.with_attention, a.model.dropout) == (256, True, 0.05)
    assert a.train.batch_size == 1024 and a.data.augment and a.eval.num_samples == 20
    assert get_preset("imagenet32").data.version == "new"
    assert get_preset("imagenet32_old").data.version == "old"
    assert get_preset("imagenet32_old").train.batch_size == 512


def test_cifar10_preset_builds_the_30_6m_parameter_unet():
    with torch.device("meta"):
        model = build_model(get_preset("cifar10"), (3, 32, 32), 256)
    assert round(count_parameters(model) / 1e6, 2) == 30.58
    assert model.net.fourier_freqs == (6.0, 7.0)  # VDM's 2^6, 2^7 for 256 levels


def test_overrides_are_typed():
    cfg = apply_overrides(
        get_preset("digits_cpu"),
        [
            "train.steps=1e3",
            "train.grad_clip=1.5",
            "data.root=/data",
            "train.antithetic=false",
            "model.fourier_levels=none",
        ],
    )
    assert cfg.train.steps == 1000 and cfg.train.grad_clip == 1.5 and cfg.data.root == "/data"
    assert cfg.train.antithetic is False and cfg.model.fourier_levels is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; valid keys in 'train': .*steps"),
        ("trian.steps=3", "unknown config section 'trian'"),
        ("steps=3", "needs a section"),
        ("train.steps", "expects key=value"),
        ("train.steps=many", "expected int"),
        ("model.schedule=cosine", "unknown model.schedule 'cosine'; valid: 'VP', 'SP'"),
        ("train.precision=fp16", "not supported"),
        ("train.batch_size=10", None),  # fine alone
        ("model.parameterization=eps", None),
    ],
)
def test_bad_overrides_get_one_clear_error(override, message):
    base = get_preset("digits_cpu")
    if message is None:
        apply_overrides(base, [override])
        return
    with pytest.raises(ConfigError, match=message):
        apply_overrides(base, [override])


def test_inconsistent_config_is_refused():
    with pytest.raises(ConfigError, match="needs model.parameterization=velocity"):
        apply_overrides(
            get_preset("digits_cpu"),
            ["model.parameterization=eps", "train.second_order_weight=0.1"],
        )
    with pytest.raises(ConfigError, match="divisible"):
        apply_overrides(get_preset("digits_cpu"), ["train.grad_accum=3"])
    d = config_to_dict(get_preset("digits_cpu"))
    d["train"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="'learning_rate'"):
        config_from_dict(d)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.rtol=0", "eval.rtol must be > 0"),
        ("eval.atol=-1e-5", "eval.atol must be > 0"),
        ("train.lr=-0.001", "train.lr must be > 0"),
        ("train.lr=nan", "train.lr=nan must be a finite number"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("train.beta2=1.0", r"train.beta2 must be in \[0, 1\)"),
        ("train.grad_clip=0", "train.grad_clip must be > 0 or None"),
        ("train.eval_every=-5", "train.eval_every must be >= 0"),
        ("model.dropout=1.5", r"model.dropout must be in \[0, 1\)"),
        ("model.n_layers=-1", "model.n_layers must be >= 0"),
        ("model.fourier_levels=1", "model.fourier_levels must be >= 2"),
        ("data.eval_examples=0", "data.eval_examples must be >= 1"),
        ("data.max_train_examples=0", "data.max_train_examples must be a positive integer"),
        ("eval.num_samples=0", "eval.num_samples must be >= 1"),
        ("eval.dequantization=gaussian", "unknown eval.dequantization 'gaussian'; valid: 'trunc"),
        ("eval.divergence=hutch", "unknown eval.divergence 'hutch'; valid: 'exact'"),
        ("train.device=gpu", "'gpu' is not a device for train.device; valid: auto, cpu, cuda"),
    ],
)
def test_every_field_is_validated_up_front(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("digits_cpu"), [override])


def test_config_from_a_file_with_a_bad_value_is_refused():
    from idode.config import config_from_dict, config_to_dict

    d = config_to_dict(get_preset("digits_cpu"))
    d["eval"]["rtol"] = 0.0
    with pytest.raises(ConfigError, match="eval.rtol must be > 0"):
        config_from_dict(d)
    d["eval"]["rtol"] = "1e-5"  # a string where a float belongs
    with pytest.raises(ConfigError, match="eval.rtol='1e-5' must be of type float"):
        config_from_dict(d)


def test_renamed_keys_of_older_config_files_still_load():
    d = config_to_dict(get_preset("digits_cpu"))
    assert "checkpoint" not in d["model"] and d["model"]["activation_checkpointing"] is False
    del d["model"]["activation_checkpointing"]
    d["model"]["checkpoint"] = True  # as a 0.1.0 config.json names it
    assert config_from_dict(d).model.activation_checkpointing is True
    d["model"]["activation_checkpointing"] = False  # both names: which one is meant?
    with pytest.raises(ConfigError, match="both 'model.checkpoint' and its new name"):
        config_from_dict(d)
    cfg = apply_overrides(get_preset("digits_cpu"), ["model.checkpoint=true"])
    assert cfg.model.activation_checkpointing is True


def test_the_format_1_checkpoint_fixture_config_loads_under_the_new_name():
    import json
    from pathlib import Path

    meta = json.loads((Path(__file__).parent / "data/checkpoint_v1/meta.json").read_text())
    assert "checkpoint" in meta["config"]["model"]  # written before the rename
    cfg = config_from_dict(meta["config"])
    assert cfg.model.activation_checkpointing is meta["config"]["model"]["checkpoint"]
