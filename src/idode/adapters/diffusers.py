"""Hugging Face diffusers models (UNet2DModel + DDPM/DDIM scheduler) as an idode ``DiffusionODE``.

A discrete-time diffusers model is trained at timesteps i = 0..T-1 on
``z = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps``, which is idode's VP state at
gamma_i = log((1 - abar_i) / abar_i) (method.md §1.2: alpha^2 = sigmoid(-gamma) = abar). The adapter
is VP on [gamma_0, gamma_{T-1}] and feeds the network the *fractional* timestep whose gamma,
interpolated linearly between neighbouring training timesteps, is the solver's gamma: the drift is
continuous in gamma, and at gamma_i the network sees exactly timestep i.

diffusers' three prediction types are idode's three parameterizations: epsilon -> "eps",
sample -> "x0", v_prediction -> "velocity" (diffusers' v = sqrt(abar) eps - sqrt(1 - abar) x0 is
idode's VP velocity F = alpha eps - sigma x0), so every conversion uses idode's own formulas.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from idode.parameterization import DiffusionODE
from idode.schedules import VPSchedule
from idode.validation import InputError, check_choice

__all__ = [
    "PREDICTION_TYPES",
    "DiffusersNet",
    "ModelFolderError",
    "check_data_shape",
    "from_diffusers",
    "gammas_from_alphas_cumprod",
    "is_model_folder",
    "load_model_folder",
]


class ModelFolderError(InputError):
    """A diffusers model folder that cannot be read as it is (missing, damaged or unsafe files)."""


PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: dict[str, str] = {"epsilon": "eps", "v_prediction": "velocity", "sample": "x0"}
_SCHEDULER_FILE = "scheduler_config.json"


def gammas_from_alphas_cumprod(alphas_cumprod: Tensor) -> tuple[Tensor, int, int]:
    """gamma_i = log((1 - abar_i) / abar_i) [T] float64, and the first/last finite index.

    Stable: log(1 - abar) = log(-expm1(log abar)), so abar near 1 loses no digits beyond abar's own.
    A zero-terminal-SNR end (abar = 0, gamma = +inf) or abar = 1 at the start (gamma = -inf) is
    left out of [first, last].
    """
    abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if abar.ndim != 1 or abar.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-d tensor of >= 2 training timesteps, got shape "
            f"{tuple(abar.shape)}"
        )
    if not bool(((abar >= 0) & (abar <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in [0, 1]; check the scheduler's betas")
    log_abar = torch.log(abar)
    gammas = torch.log(-torch.expm1(log_abar)) - log_abar
    finite = torch.isfinite(gammas).nonzero().flatten()
    if finite.numel() < 2:
        raise ValueError("the scheduler has fewer than two timesteps with 0 < alphas_cumprod < 1")
    first, last = int(finite[0]), int(finite[-1])
    g = gammas[first : last + 1]
    if not (torch.isfinite(g).all() and bool((g[1:] > g[:-1]).all())):
        raise ValueError(
            "the scheduler's gamma = log((1 - alphas_cumprod) / alphas_cumprod) must increase "
            "strictly over the training timesteps (every beta in (0, 1)); check trained_betas"
        )
    return gammas, first, last


class DiffusersNet(nn.Module):
    """``net(z, gamma)`` for idode: calls ``unet(z, timestep(gamma)).sample`` (first C channels).

    Args:
        unet: a diffusers ``UNet2DModel`` or any module called as ``unet(sample, timestep)``
            returning an object with ``.sample``, a tuple or a tensor; timestep is a float [B].
        gammas: [T] float64 gamma of every training timestep (finite on [first, last]).
        first, last: the training timesteps at the two ends of the ODE's gamma range.
    """

    def __init__(self, unet: nn.Module, gammas: Tensor, first: int, last: int) -> None:
        super().__init__()
        self.unet = unet
        # a plain attribute, not a buffer: module.half() must not round the grid
        self.gammas = gammas[first : last + 1].to(torch.float64)
        self.first = first
        self._grids: dict[
            tuple, Tensor
        ] = {}  # the grid per (device, dtype): one copy, not one per call

    def _grid(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (str(device), dtype)
        if key not in self._grids:
            self._grids[key] = self.gammas.to(device, dtype)
        return self._grids[key]

    def timestep(self, gamma: Tensor) -> Tensor:
        """The fractional training timestep [B] whose interpolated gamma is ``gamma`` [B].

        Piecewise linear in gamma between training timesteps, clamped to [first, last]; computed
        in gamma's dtype (at least float32), so gamma_i in that dtype maps to exactly i.
        """
        dtype = torch.promote_types(gamma.dtype, torch.float32)
        grid = self._grid(gamma.device, dtype)
        g = gamma.to(dtype)
        idx = (torch.searchsorted(grid, g, right=True) - 1).clamp(0, grid.numel() - 2)
        g0, g1 = grid[idx], grid[idx + 1]
        frac = ((g - g0) / (g1 - g0)).clamp(0.0, 1.0)
        return (idx + self.first).to(dtype) + frac

    def forward(self, z: Tensor, gamma: Tensor, **net_kwargs) -> Tensor:
        # diffusers casts a Python-number timestep to an integer: pass a float tensor
        t = self.timestep(gamma).to(torch.promote_types(z.dtype, torch.float32))
        out = self.unet(z, t, **net_kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        c = z.shape[1]
        if out.ndim == z.ndim and out.shape[1] == 2 * c:  # learned variance: [eps | variance]
            out = out[:, :c]
        return out


def _unet_config(unet: Any) -> dict:
    cfg = getattr(unet, "config", None)
    return dict(cfg) if cfg is not None else {}


def _check_unet(unet: Any) -> None:
    if not callable(unet):
        raise TypeError(f"unet must be callable as unet(sample, timestep), got {type(unet)}")
    kind = _unet_config(unet).get("time_embedding_type", "positional")
    if kind == "learned":
        raise ValueError(
            "this UNet embeds timesteps with a lookup table (time_embedding_type='learned'), "
            "which cannot take the fractional timesteps an ODE solver needs"
        )
    if kind == "fourier":
        raise ValueError(
            "this UNet uses time_embedding_type='fourier' (a variance-exploding score model "
            "taking sigma, not a DDPM timestep); wrap it as a denoiser and use "
            "idode.adapters.from_denoiser"
        )


def from_diffusers(
    unet: nn.Module, scheduler: Any, *, prediction_type: PredictionType | None = None
) -> DiffusionODE:
    """A diffusers UNet and its DDPM/DDIM scheduler as a VP ``DiffusionODE``.

    The schedule is VP on [gamma of the first, gamma of the last training timestep], from the
    scheduler's ``alphas_cumprod`` (any beta_schedule or trained_betas); a zero-terminal-SNR end
    is clipped to the last timestep with abar > 0, with a warning. ``prediction_type`` defaults to
    ``scheduler.config.prediction_type``. ``model.eps_hat(z, gamma_i)`` is the eps the UNet
    predicts at training timestep i; z is [B, C, H, W] in the UNet's data scale ([-1, 1] images).
    """
    _check_unet(unet)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(
            f"scheduler must be a diffusers noise scheduler with alphas_cumprod (DDPMScheduler, "
            f"DDIMScheduler, ...), got {type(scheduler).__name__}"
        )
    cfg = getattr(scheduler, "config", {})
    if prediction_type is None:
        prediction_type = cfg.get("prediction_type", "epsilon")
    check_choice("prediction_type", prediction_type, tuple(PREDICTION_TYPES))
    gammas, first, last = gammas_from_alphas_cumprod(abar)
    t_count = gammas.numel()
    if last < t_count - 1:
        warnings.warn(
            f"the scheduler has zero terminal SNR (alphas_cumprod[{t_count - 1}] = 0, gamma = "
            f"+inf); the ODE ends at training timestep {last} (gamma_max = "
            f"{float(gammas[last]):.4f}) with the prior N(0, sigmoid(gamma_max) I), and "
            f"timesteps {last + 1}..{t_count - 1} are not used",
            stacklevel=2,
        )
    if first > 0:
        warnings.warn(
            f"alphas_cumprod[0..{first - 1}] = 1 (no noise, gamma = -inf); the ODE starts at "
            f"training timestep {first} (gamma_min = {float(gammas[first]):.4f})",
            stacklevel=2,
        )
    schedule = VPSchedule(gamma_min=float(gammas[first]), gamma_max=float(gammas[last]))
    net = DiffusersNet(unet, gammas, first, last)
    return DiffusionODE(net, schedule, parameterization=PREDICTION_TYPES[prediction_type])


# --------------------------------------------------------------------------------------------------
# a diffusers model folder on disk (``save_pretrained`` / a Hub snapshot), for ``idode eval``
# --------------------------------------------------------------------------------------------------


def _folder_files(path: Path) -> tuple[Path, Path] | None:
    """(unet folder, scheduler config file) of a pipeline or model folder, or None."""
    if (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
        candidates = [path / "scheduler" / _SCHEDULER_FILE]
    elif (path / "config.json").is_file():
        unet_dir = path
        candidates = [
            path / _SCHEDULER_FILE,
            path / "scheduler" / _SCHEDULER_FILE,
            path.parent / "scheduler" / _SCHEDULER_FILE,
        ]
    else:
        return None
    for c in candidates:
        if c.is_file():
            return unet_dir, c
    return unet_dir, candidates[0]


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a diffusers model or pipeline folder (a UNet ``config.json``)."""
    p = Path(path)
    if not p.is_dir():
        return False
    found = _folder_files(p)
    if found is None:
        return False
    try:
        cfg = json.loads((found[0] / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and ("_diffusers_version" in cfg or "_class_name" in cfg)


def load_model_folder(
    path: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[DiffusionODE, dict[str, Any]]:
    """Load a diffusers model folder as a ``DiffusionODE`` in eval mode, with a description.

    ``path`` holds ``unet/`` and ``scheduler/`` (a pipeline saved with ``save_pretrained``), or
    the UNet's ``config.json`` + weights with ``scheduler_config.json`` beside it (or in
    ``../scheduler/``). Nothing is downloaded. The info dict records the classes, the prediction
    type, the gamma range and the image shape the UNet expects.
    """
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            'reading a diffusers model folder needs diffusers: pip install "idode[adapters]"'
        ) from e

    root = Path(path)
    found = _folder_files(root) if root.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"{root} is not a diffusers model folder: expected unet/config.json (a pipeline "
            f"folder) or config.json with the UNet's weights"
        )
    unet_dir, sched_file = found
    if not sched_file.is_file():
        raise FileNotFoundError(
            f"{unet_dir} holds a UNet but no {_SCHEDULER_FILE} was found beside it, in "
            f"scheduler/ or in ../scheduler/; save the scheduler with "
            f"scheduler.save_pretrained(...) next to the UNet"
        )
    ucfg, scfg = _read_json(unet_dir / "config.json"), _read_json(sched_file)
    unet_cls = _diffusers_class(diffusers, ucfg.get("_class_name", "UNet2DModel"), "UNet")
    sched_cls = _diffusers_class(diffusers, scfg.get("_class_name", "DDPMScheduler"), "scheduler")
    if ucfg.get("num_class_embeds") is not None or ucfg.get("class_embed_type") is not None:
        raise ModelFolderError(
            f"{unet_dir}: a class-conditional UNet needs class labels, which idode eval does not "
            f"pass; evaluate it from Python with idode.adapters.from_diffusers and "
            f"net_kwargs={{'class_labels': ...}}"
        )
    unet = _load_unet(unet_cls, unet_dir)
    if device is not None:
        unet = unet.to(device)
    try:
        scheduler = sched_cls.from_config(scfg)
        model = from_diffusers(unet, scheduler)
    except (ValueError, TypeError, KeyError) as e:  # a scheduler or UNet idode cannot use
        raise ModelFolderError(f"{root}: {' '.join(str(e).split())}") from None
    model.eval()
    size = ucfg.get("sample_size")
    if isinstance(size, int):
        size = [size, size]
    info = {
        "kind": "diffusers",
        "path": str(root.resolve()),
        "unet": str(unet_dir.resolve()),
        "scheduler": str(sched_file.resolve()),
        "unet_class": unet_cls.__name__,
        "scheduler_class": sched_cls.__name__,
        "prediction_type": scheduler.config.get("prediction_type", "epsilon"),
        "beta_schedule": scheduler.config.get("beta_schedule"),
        "num_train_timesteps": int(scheduler.alphas_cumprod.numel()),
        "gamma_min": model.schedule.gamma_min,
        "gamma_max": model.schedule.gamma_max,
        "in_channels": ucfg.get("in_channels"),
        "sample_size": size,
        "diffusers_version": diffusers.__version__,
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "checksum": _folder_checksum(unet_dir, sched_file),
    }
    return model, info


def _folder_checksum(unet_dir: Path, sched_file: Path) -> str:
    """'sha256:<hex>' of the UNet folder's files (names and bytes) and the scheduler config: the
    model's identity wherever the folder lies."""
    h = hashlib.sha256()
    for p in [*sorted(q for q in unet_dir.iterdir() if q.is_file()), sched_file]:
        h.update(f"{p.name}|{p.stat().st_size}|".encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def check_data_shape(info: dict[str, Any], shape: tuple[int, ...] | list[int], name: str) -> None:
    """Raise one clear error unless images of ``shape`` (C, H, W) fit the folder's UNet."""
    c, size = info.get("in_channels"), info.get("sample_size")
    if (c is not None and c != shape[0]) or (size is not None and list(size) != list(shape[1:])):
        raise ValueError(
            f"{name} has images {tuple(shape)} but the UNet in {info['path']} takes "
            f"{c} channels at {size}; pass the dataset the model was trained on (--data)"
        )


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is not readable JSON ({e}); save it again") from None
    if not isinstance(obj, dict):
        raise ModelFolderError(f"{path} must hold a JSON object; save it again")
    return obj


def _load_unet(unet_cls: Any, unet_dir: Path) -> nn.Module:
    """The UNet from safetensors weights only: a pickled .bin could run code, so it is refused."""
    if not any(unet_dir.glob("*.safetensors")):
        pickled = sorted(p.name for p in unet_dir.glob("*.bin"))
        what = f"only {pickled[0]}, a pickle (which can run code)" if pickled else "no weights"
        raise ModelFolderError(
            f"{unet_dir} holds {what}: idode reads UNet weights from .safetensors only; save "
            f"the model with unet.save_pretrained(DIR) (safetensors by default) from a source "
            f"you trust"
        )
    # without accelerate, diffusers warns on every load unless told not to try it
    lean = importlib.util.find_spec("accelerate") is not None
    try:
        return unet_cls.from_pretrained(str(unet_dir), use_safetensors=True, low_cpu_mem_usage=lean)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = " ".join(str(e).split())[:200]
        raise ModelFolderError(
            f"the UNet weights in {unet_dir} do not load ({type(e).__name__}: {first}); the "
            f"files are damaged or do not match config.json: save the model again"
        ) from None


def _diffusers_class(module: Any, name: str, what: str) -> Any:
    cls = getattr(module, str(name), None)
    if cls is None or not isinstance(cls, type):
        raise ModelFolderError(
            f"{what} class {name!r} is not in diffusers {module.__version__}; upgrade diffusers "
            f"or check the folder's config"
        )
    return cls
