"""The public API of the core issue, by name: external checks call exactly these."""

import inspect

import idode


def test_public_names_are_callables_not_modules():
    for name in (
        "VPSchedule",
        "SPSchedule",
        "DiffusionODE",
        "diffusion_loss",
        "log_likelihood",
        "bits_per_dim",
        "elbo_bits_per_dim",
        "sample",
    ):
        obj = getattr(idode, name)
        assert callable(obj) and not inspect.ismodule(obj), name
    # importing every submodule must not shadow a public function (idode.sample!)
    import importlib
    import pkgutil

    for mod in pkgutil.walk_packages(idode.__path__, "idode."):
        if mod.name != "idode.__main__":
            importlib.import_module(mod.name)
    assert inspect.isfunction(idode.sample)


def test_public_signatures():
    p = inspect.signature(idode.diffusion_loss).parameters
    assert list(p)[:4] == ["model", "x", "importance_sampling", "second_order_weight"]
    assert p["importance_sampling"].default is True and p["second_order_weight"].default == 0.0
    p = inspect.signature(idode.log_likelihood).parameters
    assert list(p)[:5] == ["model", "z", "divergence", "rtol", "atol"]
    assert p["divergence"].default == "exact" and p["rtol"].default == 1e-5
    p = inspect.signature(idode.bits_per_dim).parameters
    assert list(p)[:8] == [
        "model",
        "x_int",
        "num_levels",
        "dequantization",
        "num_samples",
        "divergence",
        "rtol",
        "atol",
    ]
    assert p["num_levels"].default == 256 and p["dequantization"].default == "truncated_normal"
    assert p["divergence"].default == "rademacher" and p["num_samples"].default == 1
    p = inspect.signature(idode.sample).parameters
    assert list(p)[:3] == ["model", "num_samples", "shape"]
    p = inspect.signature(idode.elbo_bits_per_dim).parameters
    assert list(p)[:3] == ["model", "x_int", "num_levels"]
    p = inspect.signature(idode.DiffusionODE).parameters
    assert list(p)[:3] == ["net", "schedule", "parameterization"]
    assert p["parameterization"].default == "velocity"
    p = inspect.signature(idode.VPSchedule).parameters
    assert p["gamma_min"].default == -13.3 and p["gamma_max"].default == 5.0
