"""idode: maximum-likelihood diffusion ODEs (i-DODE, Zheng et al., ICML 2023) in PyTorch.

The public API::

    sched = idode.VPSchedule()                                   # or idode.SPSchedule()
    model = idode.DiffusionODE(net, sched, parameterization="velocity")
    loss = idode.diffusion_loss(model, x)                          # [B] nats
    ll = idode.log_likelihood(model, z, divergence="exact")        # ll.logp [B], ll.nfe
    res = idode.bits_per_dim(model, x_int, num_levels=256)         # res.bpd [B], res.nfe
    p = idode.Protocol(num_samples=5, rtol=1e-6)                   # every setting of a bits/dim
    res = idode.bits_per_dim(model, x_int, 256, protocol=p)        # its seed's per-image noise
    elbo = idode.elbo_bits_per_dim(model, x_int, num_levels=256)   # [B]
    samples = idode.sample(model, num_samples=16, shape=(3, 32, 32))
    model, info = idode.load_model("RUN_DIR", ema=True)           # a checkpoint, in eval mode
    model = idode.adapters.from_diffusers(unet, scheduler)       # models from other libraries
"""

from idode import (
    adapters,  # light: diffusers is imported only when a model folder is read
    nets,  # idode.nets.ScoreUNet / MLP, as the README uses them
)
from idode.checkpoint import load_model
from idode.dequantization import (
    DEQUANTIZATIONS,
    bin_centers,
    bits_per_dim_from_nats,
    dequantize,
)
from idode.likelihood import (
    BPDResult,
    ELBOResult,
    LogLikelihoodResult,
    bits_per_dim,
    elbo,
    elbo_bits_per_dim,
    log_likelihood,
)
from idode.losses import LossTerms, diffusion_loss, diffusion_loss_terms
from idode.ode_sampling import SampleResult, ode_sample, sample
from idode.parameterization import PARAMETERIZATIONS, DiffusionODE
from idode.protocol import Protocol
from idode.schedules import Schedule, SPSchedule, VPSchedule, make_schedule

__version__ = "0.1.0"

__all__ = [
    "nets",
    "BPDResult",
    "DEQUANTIZATIONS",
    "DiffusionODE",
    "ELBOResult",
    "LogLikelihoodResult",
    "LossTerms",
    "PARAMETERIZATIONS",
    "Protocol",
    "SPSchedule",
    "SampleResult",
    "Schedule",
    "VPSchedule",
    "adapters",
    "bin_centers",
    "bits_per_dim",
    "bits_per_dim_from_nats",
    "dequantize",
    "diffusion_loss",
    "diffusion_loss_terms",
    "elbo",
    "elbo_bits_per_dim",
    "load_model",
    "log_likelihood",
    "make_schedule",
    "ode_sample",
    "sample",
]
