"""The official ScoreUNet's Flax parameter tree <-> idode's ``ScoreUNet`` state dict.

The official network (VDM's ``ScoreUNet``, kept unchanged by thu-ml/i-DODE) computes in NHWC with
Flax layers; idode's runs the same graph channel-first. Per layer, the conventions that differ:

* ``nn.Conv`` kernel ``(kh, kw, in, out)`` (cross-correlation, SAME padding) -> ``Conv2d``
  weight ``(out, in, kh, kw)``;
* ``nn.Dense`` kernel ``(in, out)`` -> ``Linear`` ``(out, in)``; the up blocks' ``nin_shortcut``
  is a Dense over channels, i.e. a 1x1 ``Conv2d`` ``(out, in, 1, 1)``;
* attention has separate ``q``, ``k``, ``v`` Dense layers; idode fuses them into one ``qkv``
  Linear whose output rows are ``[q; k; v]``;
* ``GroupNorm`` ``scale`` / ``bias`` -> ``weight`` / ``bias`` (32 groups of contiguous channels,
  eps 1e-6 on both sides; idode must use flax's group rule, ``min_group_size=1``);
* module names: ``down.block_i`` / ``down.attn_i`` -> ``down.i.resnet`` / ``down.i.attn``,
  ``mid.block_1``, ``mid.attn_1``, ``mid.block_2`` -> ``mid.0.resnet``, ``mid.0.attn``,
  ``mid.1.resnet``; ``up`` likewise; the last ``GroupNorm_0`` -> ``norm_out``; inside a block
  ``GroupNorm_0`` / ``GroupNorm_1`` -> ``norm1`` / ``norm2``.

The Fourier features (channel-major ``[z_c w_f]`` blocks, sin then cos), the timestep embedding
and the conditioning scalar appended to it are computed the same way by ``ScoreUNet`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from idode.validation import InputError

__all__ = [
    "ConversionError",
    "FlaxParam",
    "official_layout",
    "official_to_state_dict",
    "vdm_schedule_ends",
]

Kind = Literal["conv", "dense", "nin", "vector", "qkv_kernel", "qkv_bias"]


class ConversionError(InputError):
    """An official checkpoint that does not fit the requested config (or idode's network)."""


@dataclass(frozen=True)
class FlaxParam:
    """One leaf of the official tree: its Flax path, shape, and where it goes in idode."""

    path: str  # e.g. "down.block_0/conv1/kernel", relative to score_model
    shape: tuple[int, ...]
    torch_key: str  # e.g. "down.0.resnet.conv1.weight"
    kind: Kind
    slot: int = 0  # q, k, v -> rows 0, 1, 2 of the fused qkv


def _dense(path: str, key: str, c_in: int, c_out: int, bias: bool = True) -> list[FlaxParam]:
    out = [FlaxParam(f"{path}/kernel", (c_in, c_out), f"{key}.weight", "dense")]
    if bias:
        out.append(FlaxParam(f"{path}/bias", (c_out,), f"{key}.bias", "vector"))
    return out


def _conv(path: str, key: str, c_in: int, c_out: int) -> list[FlaxParam]:
    return [
        FlaxParam(f"{path}/kernel", (3, 3, c_in, c_out), f"{key}.weight", "conv"),
        FlaxParam(f"{path}/bias", (c_out,), f"{key}.bias", "vector"),
    ]


def _norm(path: str, key: str, c: int) -> list[FlaxParam]:
    return [
        FlaxParam(f"{path}/scale", (c,), f"{key}.weight", "vector"),
        FlaxParam(f"{path}/bias", (c,), f"{key}.bias", "vector"),
    ]


def _resnet(path: str, key: str, c_in: int, n: int) -> list[FlaxParam]:
    ps = _norm(f"{path}/GroupNorm_0", f"{key}.norm1", c_in)
    ps += _conv(f"{path}/conv1", f"{key}.conv1", c_in, n)
    ps += _dense(f"{path}/cond_proj", f"{key}.cond_proj", 4 * n, n, bias=False)
    ps += _norm(f"{path}/GroupNorm_1", f"{key}.norm2", n)
    ps += _conv(f"{path}/conv2", f"{key}.conv2", n, n)
    if c_in != n:
        ps.append(
            FlaxParam(f"{path}/nin_shortcut/kernel", (c_in, n), f"{key}.nin_shortcut.weight", "nin")
        )
        ps.append(
            FlaxParam(f"{path}/nin_shortcut/bias", (n,), f"{key}.nin_shortcut.bias", "vector")
        )
    return ps


def _attn(path: str, key: str, n: int) -> list[FlaxParam]:
    ps = _norm(f"{path}/GroupNorm_0", f"{key}.norm", n)
    for slot, name in enumerate("qkv"):
        ps.append(
            FlaxParam(f"{path}/{name}/kernel", (n, n), f"{key}.qkv.weight", "qkv_kernel", slot)
        )
        ps.append(FlaxParam(f"{path}/{name}/bias", (n,), f"{key}.qkv.bias", "qkv_bias", slot))
    ps += _dense(f"{path}/proj_out", f"{key}.proj_out", n, n)
    return ps


def official_layout(
    in_channels: int, n_embd: int, n_layers: int, with_attention: bool, fourier_features: bool
) -> list[FlaxParam]:
    """Every leaf of the official ScoreUNet's tree for this configuration, in forward order."""
    n, c = n_embd, in_channels
    c_feat = c * (1 + 2 * 2) if fourier_features else c  # Base2FourierFeatures(6, 8): 2 freqs
    ps = _dense("dense0", "dense0", n + 1, 4 * n) + _dense("dense1", "dense1", 4 * n, 4 * n)
    ps += _conv("conv_in", "conv_in", c_feat, n)
    for i in range(n_layers):
        ps += _resnet(f"down.block_{i}", f"down.{i}.resnet", n, n)
        if with_attention:
            ps += _attn(f"down.attn_{i}", f"down.{i}.attn", n)
    ps += _resnet("mid.block_1", "mid.0.resnet", n, n)
    ps += _attn("mid.attn_1", "mid.0.attn", n)
    ps += _resnet("mid.block_2", "mid.1.resnet", n, n)
    for i in range(n_layers + 1):
        ps += _resnet(f"up.block_{i}", f"up.{i}.resnet", 2 * n, n)
        if with_attention:
            ps += _attn(f"up.attn_{i}", f"up.{i}.attn", n)
    ps += _norm("GroupNorm_0", "norm_out", n)
    ps += _conv("conv_out", "conv_out", n, c)
    return ps


def _file_knobs(flat: dict[str, np.ndarray]) -> dict[str, object]:
    """What the file's tree says about the knobs most likely to differ (None: cannot tell)."""
    downs = {int(m.group(1)) for k in flat if (m := re.match(r"down\.block_(\d+)/", k))}
    conv_in = flat.get("conv_in/kernel")
    return {
        "model.n_layers": max(downs) + 1 if downs else 0,
        "model.n_embd": int(conv_in.shape[3]) if getattr(conv_in, "ndim", 0) == 4 else None,
        "model.with_attention": any(re.match(r"(down|up)\.attn_\d+/", k) for k in flat),
    }


def _mismatch(what: str, flat: dict[str, np.ndarray], wanted: dict[str, object]) -> ConversionError:
    file_knobs = _file_knobs(flat)
    diffs = [
        f"{k}={file_knobs[k]!r} (the config has {wanted[k]!r})"
        for k in ("model.n_embd", "model.n_layers", "model.with_attention")
        if file_knobs[k] is not None and file_knobs[k] != wanted[k]
    ]
    if diffs:
        hint = (
            "the file looks like "
            + ", ".join(diffs)
            + "; convert with --set "
            + " --set ".join(d.split(" ")[0] for d in diffs)
        )
    elif "conv_in/kernel" in what or "conv_out/" in what:
        hint = (
            "the input channels differ: check model.fourier_features and the data's channels "
            "(data.name)"
        )
    else:
        hint = "check model.n_embd, model.n_layers and model.with_attention"
    return ConversionError(f"{what}; {hint}")


def official_to_state_dict(
    flat: dict[str, np.ndarray],
    layout: list[FlaxParam],
    knobs: dict[str, object],
    where: str,
    source: str = "official checkpoint",
) -> dict[str, Tensor]:
    """Map a flattened score_model tree onto idode's ScoreUNet state dict (float32 tensors).

    flat: {"conv_in/kernel": array, ...} as in the file; layout: ``official_layout(...)`` of the
    config; knobs: the config's n_embd / n_layers / with_attention (for the error message);
    where: the tree's path in the file (``ema_params/score_model``); source: the file's name.
    Raises ConversionError naming the first missing, mis-shaped or unexpected key.
    """
    expected = {p.path: p for p in layout}
    for p in layout:
        if p.path not in flat:
            raise _mismatch(
                f"{source}: missing key {where}/{p.path} (expected shape {p.shape})", flat, knobs
            )
        got = tuple(np.shape(flat[p.path]))
        if got != p.shape:
            raise _mismatch(
                f"{source}: key {where}/{p.path} has shape {got}, the config expects {p.shape}",
                flat,
                knobs,
            )
    for k, v in flat.items():
        if k not in expected:
            raise _mismatch(
                f"{source}: unexpected key {where}/{k} (shape {tuple(np.shape(v))}; the config "
                f"has no such parameter)",
                flat,
                knobs,
            )
    sd: dict[str, Tensor] = {}
    qkv: dict[str, list] = {}
    for p in layout:
        a = torch.from_numpy(np.array(flat[p.path], dtype=np.float32))  # a writable copy
        if p.kind == "conv":
            sd[p.torch_key] = a.permute(3, 2, 0, 1).contiguous()  # (kh,kw,in,out)->(out,in,kh,kw)
        elif p.kind == "dense":
            sd[p.torch_key] = a.t().contiguous()  # (in, out) -> (out, in)
        elif p.kind == "nin":
            sd[p.torch_key] = a.t().contiguous()[:, :, None, None]  # Dense over C = 1x1 conv
        elif p.kind in ("qkv_kernel", "qkv_bias"):
            qkv.setdefault(p.torch_key, [None, None, None])[p.slot] = (
                a.t() if p.kind == "qkv_kernel" else a
            )
        else:
            sd[p.torch_key] = a
    for key, parts in qkv.items():
        sd[key] = torch.cat(parts, dim=0).contiguous()  # rows [q; k; v]
    return sd


def vdm_schedule_ends(gamma_tree: dict, where: str) -> tuple[float, float]:
    """(gamma(0), gamma(1)) of VDM's learned linear schedule: b and b + |w| (NoiseSchedule_Scalar).

    gamma_tree: the ``params/gamma`` subtree ``{"w": (1,), "b": (1,)}``. VDM's nonlinear learned
    schedule (``learnable_nnet``: ``l1``, ``l2``, ``l3``) has no linear equivalent and is refused.
    """
    keys = set(gamma_tree)
    if keys != {"w", "b"}:
        raise ConversionError(
            f"{where} holds the schedule parameters {sorted(keys)}: only VDM's learnable_scalar "
            f"schedule (w, b: gamma(t) = b + |w| t) maps onto idode's linear schedules; the "
            f"learnable_nnet schedule (l1, l2, l3, VDM's cifar10_aug config) does not"
        )
    w = np.asarray(gamma_tree["w"], dtype=np.float32).reshape(-1)
    b = np.asarray(gamma_tree["b"], dtype=np.float32).reshape(-1)
    if w.size != 1 or b.size != 1:
        raise ConversionError(f"{where}/w and b must hold one number each, got {w.size}, {b.size}")
    return float(b[0]), float(b[0] + np.abs(w[0]))  # in float32, as the official code
