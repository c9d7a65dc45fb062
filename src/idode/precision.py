"""The network's arithmetic: fp32, TF32 or bf16 autocast, as one scoped policy.

Only the network runs under the policy; the ODE state, the log-densities and the solver stay
float64 (``DiffusionODE.predict`` casts at its one call site). The policy is entered around the
network's forward (``predict``) and around the VJP / backward that follows it, since the
backward kernels read the TF32 switches when they run.

- ``fp32``: IEEE float32 everywhere. On CUDA this turns TF32 *off* for matmuls and cuDNN
  convolutions inside the scope (PyTorch's default lets cuDNN convolutions use TF32).
- ``tf32``: TF32 tensor cores for float32 matmuls and convolutions (CUDA, Ampere and later);
  a no-op on the CPU.
- ``bf16``: ``torch.autocast`` to bfloat16 (CUDA and CPU; the rounding is that of bfloat16 on
  both, up to kernel choice); reductions autocast keeps in float32 stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from idode.choices import PRECISIONS, Precision

__all__ = ["PRECISIONS", "Precision", "precision_scope", "tf32_switches"]


def _new_api() -> bool:
    # torch >= 2.9: per-backend fp32_precision ("ieee" | "tf32"); mixing it with the legacy
    # allow_tf32 switches raises, so use whichever this torch has, never both
    return hasattr(torch.backends.cudnn, "conv") and hasattr(
        torch.backends.cuda.matmul, "fp32_precision"
    )


@contextlib.contextmanager
def tf32_switches(enabled: bool) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions with TF32 on or off inside the block, then restored."""
    if _new_api():
        backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            for b, v in zip(backends, saved, strict=True):
                b.fp32_precision = v
        return
    saved_legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy


@contextlib.contextmanager
def precision_scope(
    precision: Precision, device_type: str, *, autocast: bool = True
) -> Iterator[None]:
    """Run the network under ``precision`` on ``device_type``.

    ``autocast=False`` is for a backward / VJP: its kernels follow the dtypes autocast chose in
    the forward, and only the TF32 switches apply. On the CPU fp32 and tf32 change nothing; bf16
    autocasts there too.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    with contextlib.ExitStack() as stack:
        if device_type == "cuda":
            stack.enter_context(tf32_switches(precision == "tf32"))
        if precision == "bf16" and autocast:
            stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        yield
