"""The model and data of an evaluation that a checkpoint does not fix: ``idode eval --data`` and
``--set data.*`` (a replaced data config) and diffusers model folders (``idode.adapters``), which
name no dataset and come with a stand-in checkpoint record."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from idode.checkpoint import LoadedCheckpoint
from idode.config import Config, ConfigError, DataConfig, apply_overrides
from idode.data import DATASETS

__all__ = ["check_folder_data", "eval_data_config", "load_model_folder"]


def eval_data_config(base: DataConfig, name: str | None, overrides: list[str] | None, root=None):
    """The data config of an evaluation: ``base`` with --data NAME and --set data.KEY=VALUE
    (for npz data, --data-root FILE.npz is its file)."""
    bad = [o for o in overrides or [] if not o.strip().startswith("data.")]
    if bad:
        raise ConfigError(
            f"idode eval --set takes data.* keys only (e.g. data.root=DIR), got {', '.join(bad)}"
        )
    if name is None and not overrides:
        return base
    cfg = Config(data=base if name is None else replace(base, name=name))
    if root is not None and cfg.data.name == "npz":
        cfg = replace(cfg, data=replace(cfg.data, path=str(root)))
    return apply_overrides(cfg, overrides).data


def load_model_folder(path, dev, data: str | None, overrides: list[str] | None, root=None):
    """(model, a stand-in checkpoint record) of a diffusers model folder; data must be named.

    The record carries the default evaluation protocol and the named dataset; its shape and
    grey levels are those of the dataset once it is loaded.
    """
    from idode.adapters import load_model_folder as load_folder

    if data is None:
        raise ConfigError(
            f"{path} is a diffusers model folder, which names no dataset: pass --data NAME "
            f"({', '.join(DATASETS)}) and --set data.root=DIR (or data.path=FILE.npz)"
        )
    data_cfg = eval_data_config(DataConfig(), data, overrides, root)
    model, info = load_folder(path, device=dev)
    meta = {"model_folder": info}
    ck = LoadedCheckpoint(
        Path(info["path"]), 0, Config(data=data_cfg), {}, meta, num_levels=0,
        checksum=info["checksum"],
    )  # fmt: skip
    return model, ck


def check_folder_data(info: dict[str, Any], ds) -> None:
    from idode.adapters import check_data_shape

    try:
        check_data_shape(info, ds.shape, f"{ds.name}/{ds.split}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
