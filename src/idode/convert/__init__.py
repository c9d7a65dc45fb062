"""Official i-DODE and VDM Flax checkpoints -> ordinary idode checkpoints (``idode convert``).

A clu ``ckpt-N.flax`` file is ``flax.serialization.to_bytes(TrainState)``: a msgpack map with
``step``, ``params`` and ``ema_params`` (each ``{"score_model": TREE}``, plus ``gamma`` for VDM's
learned schedule) and ``opt_state`` (ignored). ``convert_checkpoint`` reads it with ``msgpack``
alone (no JAX), maps ``ema_params`` to idode's EMA weights and ``params`` to the raw weights, and
writes a run directory that ``idode eval``, ``idode sample`` and ``idode finetune --from`` accept.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from idode.config import Config
from idode.convert.flax_msgpack import FlaxMsgpackError, flatten_tree, read_flax_msgpack
from idode.convert.official import ConversionError, official_layout, official_to_state_dict
from idode.presets import get_preset

__all__ = [
    "ConversionError",
    "FlaxMsgpackError",
    "convert_checkpoint",
    "find_flax_checkpoint",
    "official_config",
]

_CKPT_RE = re.compile(r"^ckpt-(\d+)\.flax$")
# image shape and grey levels of the datasets with fixed geometry (others are read from disk)
_GEOMETRY = {
    "cifar10": ((3, 32, 32), 256),
    "imagenet32": ((3, 32, 32), 256),
    "mnist": ((1, 28, 28), 256),
}


def find_flax_checkpoint(path: str | os.PathLike) -> Path:
    """A ``ckpt-N.flax`` file itself, or the newest (largest N) one in a directory.

    A directory without any is searched one level down (a workdir holding ``checkpoints-0/``).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"official checkpoint not found: {p} does not exist")
    for d in (p, *sorted(q for q in p.iterdir() if q.is_dir())):
        found = [(int(m.group(1)), q) for q in d.iterdir() if (m := _CKPT_RE.match(q.name))]
        if found:
            return max(found)[1]
    raise FileNotFoundError(
        f"no ckpt-N.flax in {p} (nor in its subdirectories): pass the .flax file of a clu "
        f"checkpoint, or the checkpoints directory holding it"
    )


def official_config(cfg: Config) -> Config:
    """``cfg`` with the conventions the official network has whatever the preset says.

    A UNet whose Fourier features use base-2 exponents 6 and 7 (``fourier_levels=256``),
    flax's GroupNorm grouping (``min_group_size=1``: 32 groups at every width) and the gamma
    embedding sin/cos(1000 t f_j) (``time_embedding_scale=1000``; ``digits_cpu`` has 100).
    """
    model = replace(cfg.model, net="unet", fourier_levels=256, min_group_size=1,
                    time_embedding_scale=1000.0)  # fmt: skip
    return replace(cfg, model=model).validate()


def _data_geometry(cfg: Config) -> tuple[tuple[int, ...], int]:
    d = cfg.data
    if d.name in _GEOMETRY:
        return _GEOMETRY[d.name]
    from idode.data import load_dataset

    ds = load_dataset(d.name, d.eval_split, d.root, version=d.version, path=d.path)
    return ds.shape, ds.num_levels


def _score_tree(state: dict, slot: str, src: Path) -> dict | None:
    tree = state.get(slot)
    if tree is None:
        return None
    if not isinstance(tree, dict) or not isinstance(tree.get("score_model"), dict):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ConversionError(
            f"{src}: '{slot}' has no 'score_model' map (found {found}); is this an i-DODE or VDM "
            f"checkpoint?"
        )
    return tree


def _schedule_from_checkpoint(
    cfg: Config, trees: dict[str, dict], src: Path
) -> tuple[Config, dict]:
    """VDM's learned schedule ends (``params/gamma``) -> cfg; i-DODE's fixed one: cfg as is."""
    from idode.convert.official import vdm_schedule_ends

    slot = "ema_params" if "gamma" in trees.get("ema_params", {}) else "params"
    if "gamma" not in trees.get(slot, {}):
        return cfg, {"format": "i-DODE", "schedule": "fixed (from the config)"}
    g0, g1 = vdm_schedule_ends(trees[slot]["gamma"], f"{src}: {slot}/gamma")
    if cfg.model.parameterization != "eps":
        raise ConversionError(
            f"{src} is a VDM checkpoint ({slot}/gamma holds its learned noise schedule) and VDM's "
            f"network predicts eps: convert with --set model.parameterization=eps"
        )
    m = cfg.model
    # the network keeps the config's fixed input range; only the schedule ends are learned
    model = replace(
        m,
        gamma_min=g0,
        gamma_max=g1,
        net_gamma_min=m.gamma_min if m.net_gamma_min is None else m.net_gamma_min,
        net_gamma_max=m.gamma_max if m.net_gamma_max is None else m.net_gamma_max,
    )
    info = {"format": "VDM", "schedule": f"learned linear, from {slot}/gamma", "gamma": [g0, g1]}
    return replace(cfg, model=model).validate(), info


def convert_checkpoint(
    ckpt: str | os.PathLike, out: str | os.PathLike, config: Config | str
) -> Path:
    """Convert an official i-DODE / VDM ``ckpt-N.flax`` (or its directory) into run dir ``out``.

    config: a preset name or a Config giving the architecture and data (cifar10, cifar10_aug,
    imagenet32, imagenet32_old; see docs/models.md). ``out`` must not exist; it is written in a
    temporary sibling directory and renamed, so it is complete or absent. Returns ``out``.
    """
    from idode.checkpoint import save_checkpoint
    from idode.config import dumps
    from idode.model import build_model

    out = Path(out).expanduser()
    if out.exists():
        raise ConversionError(f"{out} already exists: choose a new --out directory")
    src = find_flax_checkpoint(ckpt)
    cfg = official_config(get_preset(config) if isinstance(config, str) else config)
    state = read_flax_msgpack(src, keys=("step", "params", "ema_params"))
    trees = {s: t for s in ("ema_params", "params") if (t := _score_tree(state, s, src))}
    if not trees:
        raise ConversionError(
            f"{src} holds no 'params' or 'ema_params' (top-level keys: {sorted(state)}): not an "
            f"i-DODE / VDM TrainState"
        )
    cfg, info = _schedule_from_checkpoint(cfg, trees, src)
    shape, num_levels = _data_geometry(cfg)
    m = cfg.model
    layout = official_layout(shape[0], m.n_embd, m.n_layers, m.with_attention, m.fourier_features)
    knobs = {"model.n_embd": m.n_embd, "model.n_layers": m.n_layers}
    knobs["model.with_attention"] = m.with_attention
    step = int(np.asarray(state.pop("step", 0)))
    state.clear()  # the trees are consumed one at a time below, freeing their arrays
    models: dict[str, torch.nn.Module] = {}
    for slot in ("ema_params", "params"):
        if slot not in trees:
            continue
        flat = flatten_tree(trees.pop(slot)["score_model"])
        sd = official_to_state_dict(flat, layout, knobs, f"{slot}/score_model", str(src))
        del flat
        # one random initialisation (slow at full size), then copies that are overwritten
        model = (
            copy.deepcopy(models["ema_params"]) if models else build_model(cfg, shape, num_levels)
        )
        model.net.load_state_dict(sd, strict=True)
        models[slot] = model.eval()
        del sd
    # one slot missing: both idode slots get the weights there are (recorded in the metadata)
    ema = models.get("ema_params", models.get("params"))
    raw = models.get("params", ema)
    info.update(
        file=str(src.resolve()),
        step=step,
        ema_weights_from="ema_params" if "ema_params" in models else "params",
        raw_weights_from="params" if "params" in models else "ema_params",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(
            tmp,
            step=step,
            cfg=cfg,
            model=raw,
            ema=ema,
            extra={
                "data_shape": list(shape),
                "num_levels": num_levels,
                "world_size": 1,
                "converted_from": info,
                "metrics": {},
            },
        )
        (tmp / "config.json").write_text(dumps(cfg) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
