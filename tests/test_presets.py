"""Presets: overrides of one base config, carrying the official hyperparameters and protocols."""

import dataclasses

import pytest

from idode.config import Config, ConfigError, config_to_dict
from idode.presets import PRESET_OVERRIDES, PRESETS, get_preset


def test_official_evaluation_protocols():
    # official base configs: 5 single-draw truncated-normal bounds averaged (repeat-5) ...
    for name in ("cifar10", "imagenet32", "imagenet32_old"):
        ev = get_preset(name).eval
        assert (ev.dequantization, ev.num_samples, ev.importance_weighted) == (
            "truncated_normal",
            5,
            False,
        ), name
    # ... and cifar10_aug's K = 20 importance-weighted bound
    ev = get_preset("cifar10_aug").eval
    assert (ev.dequantization, ev.num_samples, ev.importance_weighted) == (
        "truncated_normal",
        20,
        True,
    )


@pytest.mark.parametrize("name", list(PRESET_OVERRIDES))
def test_every_preset_is_its_parent_plus_its_overrides(name):
    parent, overrides = PRESET_OVERRIDES[name]
    base = config_to_dict(Config() if parent is None else PRESETS[parent])
    got = config_to_dict(PRESETS[name])
    assert got["preset"] == name
    for section in ("data", "model", "train", "eval"):
        for key, value in got[section].items():
            expected = overrides.get(f"{section}.{key}", base[section][key])
            assert value == expected, f"{name}: {section}.{key}"


def test_presets_are_frozen_and_unknown_names_are_refused():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["cifar10"].eval.num_samples = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown preset 'cifar100'; valid: cifar10"):
        get_preset("cifar100")
