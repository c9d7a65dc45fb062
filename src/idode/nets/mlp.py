"""A small residual MLP for flat or small data (2-D toys, 8x8 digits).

Input: flatten(z), the sinusoidal gamma embedding shared with ``ScoreUNet`` and the conditioning
scalar (0 when None). Hidden layers are residual ``h + Linear(Dropout(SiLU(h)))``; the output
layer is zero-initialised, so at initialisation the network returns z exactly (method.md §2.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idode.nets.embedding import check_gamma_and_conditioning, gamma_embedding

__all__ = ["MLP"]


class MLP(nn.Module):
    """Residual MLP: output = z + out(SiLU(h)) reshaped to z's shape.

    Args:
        shape: per-example data shape, e.g. (2,) or (1, 8, 8); z is [B, *shape].
        hidden: width of the hidden layers.
        depth: number of residual hidden layers.
        time_embed_dim: size of the sinusoidal embedding of time_scale * t_in (>= 4).
        dropout: dropout rate before each hidden Linear (train mode only).
        gamma_min, gamma_max: the log-SNR range mapped to t_in in [0, 1].
        time_scale: the embedding's scale (1000, §8.1.1).

    ``forward(z [B, *shape], gamma [B], conditioning [B] or None) -> [B, *shape]``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden: int = 256,
        depth: int = 3,
        time_embed_dim: int = 64,
        dropout: float = 0.0,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
        if hidden < 1 or depth < 0 or time_embed_dim < 4:
            raise ValueError(
                f"need hidden >= 1, depth >= 0, time_embed_dim >= 4; got hidden={hidden}, "
                f"depth={depth}, time_embed_dim={time_embed_dim}"
            )
        if not gamma_max > gamma_min:
            raise ValueError(f"need gamma_max > gamma_min, got [{gamma_min}, {gamma_max}]")
        self.time_embed_dim = time_embed_dim
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.time_scale = float(time_scale)
        d = math.prod(self.shape)
        self.inp = nn.Linear(d + time_embed_dim + 1, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, gamma_range=[{self.gamma_min}, {self.gamma_max}]"

    def forward(self, z: Tensor, gamma: Tensor, conditioning: Tensor | None = None) -> Tensor:
        """z [B, *shape], gamma [B], conditioning [B] (0 when None) -> z + MLP(...) [B, *shape]."""
        if not isinstance(z, Tensor) or tuple(z.shape[1:]) != self.shape:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"MLP built for z of shape [B, {self.shape}], got {got}")
        check_gamma_and_conditioning(z, gamma, conditioning)
        dtype = self.inp.weight.dtype
        if conditioning is None:
            conditioning = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        emb = gamma_embedding(
            gamma, self.time_embed_dim, self.gamma_min, self.gamma_max, self.time_scale
        )
        h = torch.cat([z.flatten(1), emb.to(dtype), conditioning.to(dtype)[:, None]], dim=1)
        h = self.inp(h)
        for layer in self.layers:
            h = h + layer(self.dropout(F.silu(h)))
        return z + self.out(F.silu(h)).view_as(z)
