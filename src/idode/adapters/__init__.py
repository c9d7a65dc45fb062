"""Bring your own model: diffusers, k-diffusion / EDM and flow-matching models as ``DiffusionODE``.

Each adapter returns an ``idode.DiffusionODE``, so ``bits_per_dim`` (every dequantization),
``elbo_bits_per_dim``, ``log_likelihood``, ``sample`` and ``idode eval`` work unchanged, and report
bits/dim of the data with every change of variables inside the model::

    model = idode.adapters.from_diffusers(unet, scheduler)   # VP, model.eps_hat(z, gamma)
    model = idode.adapters.from_denoiser(denoiser, sigma_min=0.002, sigma_max=80.0)
    model = idode.adapters.from_velocity(velocity_fn)        # flow matching, t = 1 is data
    model, info = idode.adapters.load_model_folder(DIR)      # a diffusers folder on disk

diffusers is imported only by ``load_model_folder`` (``pip install "idode[adapters]"``).
"""

from idode.adapters.denoiser import from_denoiser
from idode.adapters.diffusers import (
    PREDICTION_TYPES,
    check_data_shape,
    from_diffusers,
    is_model_folder,
    load_model_folder,
)
from idode.adapters.velocity import from_velocity

__all__ = [
    "PREDICTION_TYPES",
    "check_data_shape",
    "from_denoiser",
    "from_diffusers",
    "from_velocity",
    "is_model_folder",
    "load_model_folder",
]
