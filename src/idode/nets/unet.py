"""VDM's no-downsampling ScoreUNet in PyTorch, channel-first (method.md §8.1).

Every layer runs at the input resolution. Layout: Fourier features -> conv_in -> L ResnetBlocks
(kept as skips) -> Resnet, Attn, Resnet -> L+1 ResnetBlocks on concat(h, skip) -> GN, SiLU,
zero-initialised conv_out -> ``z + out`` (§2.5). Initialisation follows flax: LeCun-normal kernels
(truncated at 2 std), zero biases, zero-init where VDM has it, GroupNorm(32, eps=1e-6)
(fewer groups in layers narrower than 128 channels, so every group has >= 4 channels).

Two things are added for PyTorch: attention runs through ``scaled_dot_product_attention`` with
a backward that is itself differentiable when input gradients are requested (``attention.py``;
the second-order loss differentiates a VJP w.r.t. z, §5.2, and the fused kernels have no double
backward), and optional activation checkpointing per block (``checkpoint=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from idode.divergence import first_order_only
from idode.nets.attention import attention
from idode.nets.embedding import check_gamma_and_conditioning, gamma_embedding

__all__ = [
    "ScoreUNet",
    "ResnetBlock",
    "AttnBlock",
    "lecun_normal_",
]

# std of a unit normal truncated to [-2, 2]; dividing by it makes the truncated variance exact
_TRUNC_STD = 0.87962566103423978
_MIN_GROUP_SIZE = 4


# --- initialisation (flax defaults) ------------------------------------------------------------
@torch.no_grad()
def lecun_normal_(weight: Tensor) -> Tensor:
    """In place: flax ``lecun_normal`` (variance 1/fan_in, normal truncated at +-2 std).

    fan_in = in_features (Linear [out, in]) or in_channels * kh * kw (Conv2d [out, in, kh, kw]).
    """
    fan_in = math.prod(weight.shape[1:])
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def _init(layer: nn.Conv2d | nn.Linear, zero: bool = False) -> nn.Conv2d | nn.Linear:
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        lecun_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv3x3(c_in: int, c_out: int, zero: bool = False) -> nn.Conv2d:
    # padding=1 is flax's SAME for a 3x3 kernel at stride 1
    return _init(nn.Conv2d(c_in, c_out, 3, padding=1), zero)


def _group_norm(
    channels: int, num_groups: int, min_group_size: int = _MIN_GROUP_SIZE
) -> nn.GroupNorm:
    # At least _MIN_GROUP_SIZE channels per group: a group of one channel would normalise away
    # the per-channel conditioning shift added after conv1 (gamma would have no effect at all).
    # Leaves VDM's configs (n >= 128: 32 groups of >= 4 channels) as flax has them;
    # min_group_size=1 is flax's rule at every width (converted official checkpoints).
    groups = max(1, min(num_groups, channels // min_group_size))
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm needs channels divisible by groups: {channels} channels, {groups} groups; "
            f"choose n_embd divisible by num_groups={num_groups} (or by {min_group_size} when "
            f"narrower than {min_group_size * num_groups})"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


# --- blocks ------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """VDM ResnetBlock (§8.1): GN, SiLU, conv1, + cond_proj(cond), GN, SiLU, dropout, conv2, skip.

    Shapes: x [B, c_in, H, W], cond [B, cond_dim] -> [B, c_out, H, W]. ``cond_proj`` (no bias) and
    ``conv2`` are zero-initialised; a 1x1 ``nin_shortcut`` (with bias) maps x when c_in != c_out.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        cond_dim: int,
        dropout: float,
        num_groups: int = 32,
        min_group_size: int = _MIN_GROUP_SIZE,
    ) -> None:
        super().__init__()
        self.norm1 = _group_norm(c_in, num_groups, min_group_size)
        self.conv1 = _conv3x3(c_in, c_out)
        self.cond_proj = _init(nn.Linear(cond_dim, c_out, bias=False), zero=True)
        self.norm2 = _group_norm(c_out, num_groups, min_group_size)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(c_out, c_out, zero=True)
        # a Dense over channels is a 1x1 convolution in channel-first layout
        self.nin_shortcut = _init(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else None

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond_proj(cond)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """VDM AttnBlock (§8.1): single-head self-attention over the H*W positions, residual.

    GN, then q, k, v = Dense(C) (one fused [C -> 3C] layer, same parameters as three), attention
    with scale 1/sqrt(C), zero-initialised ``proj_out``. Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
        self, channels: int, num_groups: int = 32, min_group_size: int = _MIN_GROUP_SIZE
    ) -> None:
        super().__init__()
        self.norm = _group_norm(channels, num_groups, min_group_size)
        self.qkv = _init(nn.Linear(channels, 3 * channels))
        self.proj_out = _init(nn.Linear(channels, channels), zero=True)

    def forward(self, x: Tensor, twice_differentiable: bool = False) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, HW, C] each: one head
        h = attention(q, k, v, twice_differentiable).squeeze(1)
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, height, width)
        return x + h


class _Layer(nn.Module):
    """One checkpointing unit: a ResnetBlock on concat(h, skip) (skip optional), then AttnBlock."""

    def __init__(self, resnet: ResnetBlock, attn: AttnBlock | None) -> None:
        super().__init__()
        self.resnet = resnet
        self.attn = attn

    def forward(
        self, h: Tensor, cond: Tensor, skip: Tensor | None, twice_differentiable: bool
    ) -> Tensor:
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.resnet(h, cond)
        if self.attn is not None:
            h = self.attn(h, twice_differentiable)
        return h


# --- the network -------------------------------------------------------------------------------
class ScoreUNet(nn.Module):
    """VDM's no-downsampling ScoreUNet (method.md §8.1); output = z + UNet(z, gamma) (§2.5).

    Args:
        in_channels: channels C of z (3 for RGB, 1 for grey); any spatial size H x W works.
        n_embd: width n of every layer; the conditioning vector has 4n features.
        n_layers: number L of down ResnetBlocks (there are L + 1 up blocks).
        with_attention: add an AttnBlock after every down / up block (the middle always has one).
        dropout: dropout rate inside every ResnetBlock (active in ``train()`` mode only).
        with_fourier_features: append sin / cos(2^f 2 pi z) channels for f in ``fourier_freqs``.
        fourier_freqs: base-2 frequency exponents (VDM: 6 and 7, i.e. periods of 2 and 1 bins
            of 8-bit data; ``log2(L/4), log2(L/2)`` generalises this to L grey levels).
        gamma_min, gamma_max: the log-SNR range mapped to t_in in [0, 1] for the embedding.
        time_scale: the embedding's scale, sin/cos(time_scale t_in f_j) (1000, §8.1.1).
        num_groups: GroupNorm groups; layers narrower than 4 * num_groups channels use
            channels // 4 groups (never one channel per group, which would erase gamma).
        checkpoint: recompute each block's activations in backward (non-reentrant checkpointing);
            same outputs and gradients, less memory, about one extra forward of compute.
        min_group_size: fewest channels per GroupNorm group (default 4, see ``num_groups``);
            1 is flax's rule (``num_groups`` groups at every width), as official checkpoints need.

    ``forward(z [B, C, H, W], gamma [B], conditioning [B] or None) -> [B, C, H, W]`` in the
    parameters' dtype. When z requires grad (divergence, second-order loss) attention uses a
    twice-differentiable backward; otherwise the fused SDPA kernels are used end to end.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_embd: int = 128,
        n_layers: int = 32,
        with_attention: bool = False,
        dropout: float = 0.1,
        with_fourier_features: bool = True,
        fourier_freqs: Sequence[float] = (6, 7),
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        num_groups: int = 32,
        checkpoint: bool = False,
        min_group_size: int = _MIN_GROUP_SIZE,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_embd < 4 or n_layers < 0:
            raise ValueError(
                f"need in_channels >= 1, n_embd >= 4, n_layers >= 0; got in_channels="
                f"{in_channels}, n_embd={n_embd}, n_layers={n_layers}"
            )
        if min_group_size < 1:
            raise ValueError(f"need min_group_size >= 1, got {min_group_size}")
        if not gamma_max > gamma_min:
            raise ValueError(f"need gamma_max > gamma_min, got [{gamma_min}, {gamma_max}]")
        self.in_channels = in_channels
        self.n_embd = n_embd
        self.n_layers = n_layers
        self.with_attention = with_attention
        self.with_fourier_features = with_fourier_features
        self.fourier_freqs = tuple(float(f) for f in fourier_freqs) if with_fourier_features else ()
        # w_f = 2^f 2 pi (§8.1.3); a buffer follows .to(device), no host copy per call. Kept in
        # float64 (cast to z's dtype in use), so a float64 network gets w_f unrounded too.
        w = torch.tensor([2.0**f * 2 * math.pi for f in self.fourier_freqs], dtype=torch.float64)
        self.register_buffer("fourier_w", w, persistent=False)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.time_scale = float(time_scale)
        self.checkpoint = checkpoint

        n, cond_dim = n_embd, 4 * n_embd
        # §8.1.2: cond = SiLU(Dense 4n(SiLU(Dense 4n([emb(1000 t_in), conditioning]))))
        self.dense0 = _init(nn.Linear(n + 1, cond_dim))
        self.dense1 = _init(nn.Linear(cond_dim, cond_dim))

        c_feat = in_channels * (1 + 2 * len(self.fourier_freqs))
        self.conv_in = _conv3x3(c_feat, n)

        def layer(c_in: int, attn: bool) -> _Layer:
            resnet = ResnetBlock(c_in, n, cond_dim, dropout, num_groups, min_group_size)
            return _Layer(resnet, AttnBlock(n, num_groups, min_group_size) if attn else None)

        self.down = nn.ModuleList(layer(n, with_attention) for _ in range(n_layers))
        self.mid = nn.ModuleList([layer(n, True), layer(n, False)])
        self.up = nn.ModuleList(layer(2 * n, with_attention) for _ in range(n_layers + 1))
        self.norm_out = _group_norm(n, num_groups, min_group_size)
        self.conv_out = _conv3x3(n, in_channels, zero=True)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_embd={self.n_embd}, n_layers={self.n_layers}, "
            f"with_attention={self.with_attention}, fourier_freqs={self.fourier_freqs}, "
            f"gamma_range=[{self.gamma_min}, {self.gamma_max}], checkpoint={self.checkpoint}"
        )

    def fourier_features(self, z: Tensor) -> Tensor:
        """[sin block, cos block] of w_f z, w_f = 2^f 2 pi (§8.1.3), channel-major within a block.

        Shapes: z [B, C, H, W] -> [B, 2 C F, H, W], F = len(fourier_freqs); the sin block is ordered
        [z_0 w_f0, z_0 w_f1, z_1 w_f0, ...] as in VDM's ``Base2FourierFeatures``.
        """
        w = self.fourier_w.to(z.dtype)
        h = (z[:, :, None] * w[:, None, None]).flatten(1, 2)  # [B, C*F, H, W]
        return torch.cat([torch.sin(h), torch.cos(h)], dim=1)

    def _check_inputs(self, z: Tensor, gamma: Tensor, conditioning: Tensor | None) -> None:
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.in_channels:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"ScoreUNet expects z of shape [B, {self.in_channels}, H, W] (channel-first, "
                f"built with in_channels={self.in_channels}), got {got}"
            )
        check_gamma_and_conditioning(z, gamma, conditioning)

    def _run(
        self, layer: _Layer, h: Tensor, cond: Tensor, skip: Tensor | None, twice: bool
    ) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return _checkpoint(layer, h, cond, skip, twice, use_reentrant=False)
        return layer(h, cond, skip, twice)

    def forward(self, z: Tensor, gamma: Tensor, conditioning: Tensor | None = None) -> Tensor:
        """z [B, C, H, W], gamma [B], conditioning [B] (0 if None) -> z + UNet(...), like z."""
        self._check_inputs(z, gamma, conditioning)
        dtype = self.dense0.weight.dtype
        if conditioning is None:
            conditioning = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        emb = gamma_embedding(gamma, self.n_embd, self.gamma_min, self.gamma_max, self.time_scale)
        cond = torch.cat([emb.to(dtype), conditioning.to(dtype)[:, None]], dim=1)
        cond = F.silu(self.dense1(F.silu(self.dense0(cond))))

        h = torch.cat([z, self.fourier_features(z)], dim=1) if self.fourier_freqs else z
        # the fused attention kernels cannot be differentiated twice; only pay for that when
        # gradients w.r.t. z may be differentiated again (the second-order loss)
        twice = torch.is_grad_enabled() and z.requires_grad and not first_order_only()
        h = self.conv_in(h)
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, cond, None, twice)
            hs.append(h)
        for layer in self.mid:
            h = self._run(layer, h, cond, None, twice)
        for layer in self.up:
            h = self._run(layer, h, cond, hs.pop(), twice)
        h = self.conv_out(F.silu(self.norm_out(h)))
        # §2.5 base measure: the network predicts a residual around z
        return z + h
