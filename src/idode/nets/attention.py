"""Softmax attention whose backward can be differentiated again (for the second-order loss).

The fused ``scaled_dot_product_attention`` kernels (CPU flash, CUDA flash / memory-efficient)
have no double backward; the second-order objective differentiates a VJP w.r.t. z (method.md
§5.2). ``attention(..., twice_differentiable=True)`` keeps the fused forward and writes the
backward in plain, differentiable ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention"]


class _TwiceDifferentiableAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(C)) v: fused SDPA forward, backward in plain (differentiable) ops.

    The fused SDPA kernels (CPU flash, CUDA flash / memory-efficient) have no double backward;
    this backward recomputes P = softmax(S) and is itself recorded under ``create_graph=True``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # [..., N, N]
        grad_v = p.transpose(-2, -1) @ grad_out
        grad_p = grad_out @ v.transpose(-2, -1)
        # softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O)
        grad_s = p * (grad_p - (grad_out * out).sum(-1, keepdim=True)) * scale
        return grad_s @ k, grad_s.transpose(-2, -1) @ q, grad_v


def attention(q: Tensor, k: Tensor, v: Tensor, twice_differentiable: bool = False) -> Tensor:
    """Softmax attention softmax(q k^T / sqrt(C)) v over the second-to-last axis.

    Shapes: q, k, v [..., N, C] -> [..., N, C]. With ``twice_differentiable`` the backward is
    written in differentiable ops so ``create_graph=True`` gradients can be differentiated again.
    """
    if twice_differentiable:
        return _TwiceDifferentiableAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
