"""Networks mapping (z, gamma[, conditioning]) to a tensor shaped like z; they know no diffusion.

``ScoreUNet`` is VDM's no-downsampling UNet for images [B, C, H, W] (method.md §8.1); ``MLP`` is a
small residual MLP for flat or small data. Both return ``z + net(...)`` with a zero-initialised
last layer (§2.5), so they are the identity at initialisation.
"""

from __future__ import annotations

from torch import nn

from idode.choices import NET_KINDS, NetKind
from idode.nets.mlp import MLP
from idode.nets.unet import ScoreUNet

__all__ = [
    "MLP",
    "ScoreUNet",
    "NET_KINDS",
    "NetKind",
    "make_net",
    "count_parameters",
]


def make_net(kind: NetKind, shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build a network for per-example data ``shape``: "unet" needs (C, H, W), "mlp" takes any.

    ``kwargs`` go to the constructor (``ScoreUNet`` gets ``in_channels=shape[0]``).
    """
    shape = tuple(int(s) for s in shape)
    if kind == "unet":
        if len(shape) != 3:
            raise ValueError(f"kind 'unet' needs an image shape (C, H, W), got {shape}")
        return ScoreUNet(in_channels=shape[0], **kwargs)
    if kind == "mlp":
        return MLP(shape, **kwargs)
    raise ValueError(f"unknown net kind {kind!r}; valid: {', '.join(map(repr, NET_KINDS))}")


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
