"""from_denoiser against k-diffusion's own ODE likelihood (k_diffusion.sampling.log_likelihood).

k-diffusion is a test-only dependency, installed by the README's set-up without its heavy
requirements (its package __init__ imports torchvision, CLIP and wandb; ``k_diffusion.sampling``
needs none of them, only the test extra's torchdiffeq, torchsde and trampoline):

    pip install -e ".[test]" && pip install --no-deps k-diffusion==0.1.1.post1

so the test loads ``k_diffusion/utils.py`` and ``k_diffusion/sampling.py`` from the installed
package without running its ``__init__``. torchvision is only used by utils' PIL helpers; when it
is absent an empty stand-in module satisfies that one import while utils loads.
"""

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import idode
import idode.adapters

_NAME = "_k_diffusion_for_tests"
_INSTALL = 'the README set-up: pip install -e ".[test]" && pip install --no-deps k-diffusion'
_INSTALL += "==0.1.1.post1"


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"{_NAME}.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    setattr(sys.modules[_NAME], name, mod)
    return mod


@pytest.fixture(scope="module")
def k_sampling():
    spec = importlib.util.find_spec("k_diffusion")  # locates the package, does not import it
    if spec is None or spec.origin is None:
        pytest.skip(f"k-diffusion is not installed ({_INSTALL})")
    for dep in ("torchdiffeq", "torchsde", "PIL", "safetensors", "scipy"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"k_diffusion.sampling needs {dep} ({_INSTALL})")
    root = Path(spec.origin).parent
    if _NAME in sys.modules:
        return sys.modules[f"{_NAME}.sampling"]
    pkg = types.ModuleType(_NAME)
    pkg.__path__ = [str(root)]
    sys.modules[_NAME] = pkg
    stubs = []
    if importlib.util.find_spec("torchvision") is None:
        names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        mods = [types.ModuleType(n) for n in names]
        mods[0].transforms, mods[1].functional = mods[1], mods[2]
        stubs = list(names)
        sys.modules.update(dict(zip(names, mods, strict=True)))
    try:
        _load("utils", root / "utils.py")
    finally:
        for n in stubs:
            sys.modules.pop(n, None)
    return _load("sampling", root / "sampling.py")


class TinyEDMDenoiser(torch.nn.Module):
    """A small random net with EDM's preconditioning: D = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, sigma_data: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sigma_data = sigma_data
        self.conv_in = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.emb = torch.nn.Linear(1, 8)
        self.conv_out = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (s**2 + sd2), s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in, c_noise = 1 / (s**2 + sd2).sqrt(), s.log().reshape(-1, 1) / 4
        h = torch.tanh(self.conv_in(c_in * x) + self.emb(c_noise)[:, :, None, None])
        return c_skip * x + c_out * self.conv_out(h)


def test_from_denoiser_equals_k_diffusion_log_likelihood_with_the_same_probe(k_sampling):
    den = TinyEDMDenoiser().double().eval()
    sigma_min, sigma_max = 0.002, 80.0
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1).round(decimals=1)
    x = x + sigma_min * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    # k-diffusion draws its Rademacher probe first thing with torch.randint_like(x, 2) * 2 - 1
    torch.manual_seed(123)
    probe = torch.randint_like(x, 2) * 2 - 1
    torch.manual_seed(123)
    ll_k, info = k_sampling.log_likelihood(den, x, sigma_min, sigma_max, atol=1e-8, rtol=1e-8)

    model = idode.adapters.from_denoiser(den, sigma_min=sigma_min, sigma_max=sigma_max)
    alpha_min, d = model.schedule.alpha_min, x[0].numel()
    ll = idode.log_likelihood(
        model, alpha_min * x, "rademacher", rtol=1e-8, atol=1e-8, probes=probe
    )
    ll_ve = ll.logp + d * math.log(alpha_min)  # log p_VE(x) = log p_VP(alpha_min x) + d log alpha
    assert info["fevals"] > 10 and ll.nfe > 10
    torch.testing.assert_close(ll_ve, ll_k, rtol=0, atol=1e-5)
    # a different probe gives a different Hutchinson estimate: the agreement is not by accident
    ll_other = idode.log_likelihood(
        model, alpha_min * x, "rademacher", rtol=1e-8, atol=1e-8, probes=-probe.roll(1, -1)
    )
    assert (ll_other.logp + d * math.log(alpha_min) - ll_k).abs().max() > 1e-3
