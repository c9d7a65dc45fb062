"""The model a config describes: network + schedule + parameterization, for data of a given shape.

Training builds it from the run's config and dataset; loading a checkpoint builds it from the
config, shape and number of grey levels the checkpoint records.
"""

from __future__ import annotations

import math

from idode.config import Config
from idode.parameterization import DiffusionODE
from idode.precision import Precision
from idode.schedules import make_schedule

__all__ = ["build_model", "fourier_freqs"]


def fourier_freqs(num_levels: int) -> tuple[float, float]:
    """Fourier feature exponents f: periods of 2 bins and 1 bin of L grey levels (256: 6, 7)."""
    return (math.log2(num_levels / 4), math.log2(num_levels / 2))


def build_model(
    cfg: Config,
    data_shape: tuple[int, ...],
    num_levels: int = 256,
    *,
    compile: bool | None = None,
    precision: Precision | None = None,
) -> DiffusionODE:
    """The DiffusionODE (network + schedule + parameterization) a config describes.

    ``compile`` / ``precision``: the network's ``torch.compile`` and arithmetic (None: the
    config's ``model.compile`` / ``model.precision``).
    """
    from idode.nets import make_net

    m = cfg.model
    # the network's gamma input range: the schedule's unless set apart (VDM's learned ends)
    net_lo = m.gamma_min if m.net_gamma_min is None else m.net_gamma_min
    net_hi = m.gamma_max if m.net_gamma_max is None else m.net_gamma_max
    common = dict(dropout=m.dropout, gamma_min=net_lo, gamma_max=net_hi,
                  time_scale=m.time_embedding_scale)  # fmt: skip
    if m.net == "unet":
        # Fourier periods of 2 bins and 1 bin of the data's grey levels (VDM: 2^6, 2^7 for 256)
        net = make_net(
            "unet",
            data_shape,
            n_embd=m.n_embd,
            n_layers=m.n_layers,
            with_attention=m.with_attention,
            with_fourier_features=m.fourier_features,
            fourier_freqs=fourier_freqs(m.fourier_levels or num_levels),
            checkpoint=m.activation_checkpointing,
            min_group_size=m.min_group_size,
            **common,
        )
    else:
        net = make_net("mlp", data_shape, hidden=m.mlp_hidden, depth=m.mlp_depth, **common)
    schedule = make_schedule(m.schedule, m.gamma_min, m.gamma_max)
    return DiffusionODE(
        net,
        schedule,
        m.parameterization,
        precision=m.precision if precision is None else precision,
        compile=m.compile if compile is None else compile,
    )
