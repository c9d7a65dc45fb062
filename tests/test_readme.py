"""The README's Python blocks run as written, and its quickstart stays two commands."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import idode

README = Path(__file__).parents[1] / "README.md"
QUICKSTART = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    'pip install -e ".[test]" && pip install --no-deps k-diffusion==0.1.1.post1 && idode demo',
    "python -m pytest -q",
]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_quickstart_is_the_two_documented_commands() -> None:
    assert _blocks("bash")[0].splitlines() == QUICKSTART


def test_python_blocks_run_as_written() -> None:
    blocks = _blocks("python")
    assert blocks, "the README has no python block"
    for code in blocks:
        namespace: dict = {"__name__": "readme"}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    # the library example's results are what its comments say
    levels, res, ll, samples = (namespace[k] for k in ("L", "res", "ll", "samples"))
    assert res.bpd.shape == (8,) and bool(torch.isfinite(res.bpd).all()) and res.nfe > 0
    assert namespace["elbo"].shape == (8,) and bool(torch.isfinite(ll.logp).all())
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.int64
    assert int(samples.min()) >= 0 and int(samples.max()) < levels
    # and its training works: the trained model beats the untrained one on the same test digits
    # (the README's MLP is the identity at initialisation, whatever the seed)
    x_test, sched = namespace["x_test"], namespace["sched"]
    untrained = idode.DiffusionODE(idode.nets.MLP(shape=(1, 8, 8), hidden=128, depth=2), sched)
    bpd = {}
    for name, model in (("trained", namespace["model"]), ("untrained", untrained.eval())):
        g = torch.Generator().manual_seed(0)
        bpd[name] = idode.bits_per_dim(model, x_test, levels, rtol=1e-4, atol=1e-4, generator=g)
    assert float(bpd["trained"].bpd.mean()) < float(bpd["untrained"].bpd.mean()) - 0.5, bpd
