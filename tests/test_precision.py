"""The network's precision policy and torch.compile: model.precision / model.compile.

bf16 is checked against an independent bfloat16 computation of the same layer, compile against
the eager network (forward and the likelihood's VJP), the fallback with a compiler that fails.
"""

import copy
import json
import signal
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import idode
from idode.checkpoint import load_model
from idode.config import ConfigError, apply_overrides, config_from_dict, config_to_dict
from idode.divergence import first_order_input_gradients
from idode.likelihood import augmented_field
from idode.model import build_model
from idode.parameterization import DiffusionODE
from idode.precision import precision_scope, tf32_switches
from idode.presets import get_preset

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v1"


@pytest.fixture(autouse=True)
def _keep_sigint_handler():
    # torch.compile's worker pools and the in-process training may leave another SIGINT handler
    # in this process; later tests (run safety) expect the default one
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


class Affine(nn.Module):
    """z -> z + tanh(W z + b + gamma): a net with one matmul (autocast's bf16 target)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        nn.init.normal_(self.lin.weight, std=0.3)

    def forward(self, z, gamma):
        return z + torch.tanh(self.lin(z) + gamma[:, None])


def _model(precision="fp32", compile=False, d=6):
    torch.manual_seed(0)
    return DiffusionODE(Affine(d), idode.VPSchedule(), precision=precision, compile=compile)


# --- config: the settings moved from train.* to model.* -------------------------------------------


def test_old_train_keys_load_as_model_keys():
    d = config_to_dict(get_preset("digits_cpu"))
    d["train"]["precision"], d["train"]["compile"] = "bf16", True
    del d["model"]["precision"], d["model"]["compile"]
    cfg = config_from_dict(d)
    assert (cfg.model.precision, cfg.model.compile) == ("bf16", True)
    cfg = apply_overrides(get_preset("digits_cpu"), ["train.precision=tf32", "train.compile=1"])
    assert (cfg.model.precision, cfg.model.compile) == ("tf32", True)


def test_committed_v1_checkpoint_loads_with_fp32_eager():
    meta = json.loads((FIXTURE / "meta.json").read_text())
    assert "precision" in json.dumps(meta)  # the fixture holds the old train.precision key
    model, ck = load_model(FIXTURE)
    assert (ck.config.model.precision, ck.config.model.compile) == ("fp32", False)
    assert (model.precision, model.net_compile) == ("fp32", False)
    model, _ = load_model(FIXTURE, precision="bf16", compile=True)
    assert (model.precision, model.net_compile) == ("bf16", True)


def test_bad_precision_is_one_config_error():
    with pytest.raises(ConfigError, match="model.precision"):
        apply_overrides(get_preset("digits_cpu"), ["model.precision=fp8"])


# --- precision ------------------------------------------------------------------------------------


def test_bf16_rounds_the_network_like_an_independent_bfloat16_layer():
    model = _model("bf16")
    z = torch.randn(5, 6, dtype=torch.float64)
    g = torch.linspace(-3, 3, 5, dtype=torch.float64)
    out = model.predict(z, g)
    assert out.dtype == torch.float64  # the ODE state's dtype, whatever the network ran in
    lin = model.net.lin
    bf = torch.bfloat16
    pre = nn.functional.linear(z.float().to(bf), lin.weight.to(bf), lin.bias.to(bf))
    expect = z.float() + torch.tanh(pre.float() + g.float()[:, None])
    torch.testing.assert_close(out.float(), expect, rtol=0, atol=1e-6)
    fp32 = _model("fp32").predict(z, g)
    torch.testing.assert_close(
        fp32.float(), z.float() + torch.tanh(lin(z.float()) + g.float()[:, None])
    )
    assert (fp32 - out).abs().max() > 1e-4  # bf16 did round


def test_tf32_switches_are_set_inside_and_restored_after():
    def read():
        if hasattr(torch.backends.cudnn, "conv"):
            return (
                torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision,
            )
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    before = read()
    for enabled in (True, False):
        with tf32_switches(enabled):
            inside = read()
            assert inside in (
                (("tf32", "tf32"), (True, True)) if enabled else (("ieee", "ieee"), (False, False))
            )
        assert read() == before
    with precision_scope("tf32", "cpu"):  # TF32 is CUDA-only: the CPU switches stay as they were
        assert read() == before


def test_bf16_field_keeps_float64_state_and_its_vjp_differs_by_bf16_rounding():
    z = torch.randn(4, 6, dtype=torch.float64)
    t = torch.full((4,), -1.0, dtype=torch.float64)
    u = torch.randint(0, 2, (4, 6)).double() * 2 - 1
    y = torch.cat([z, torch.zeros(4, 1, dtype=torch.float64)], 1)
    outs = {}
    for p in ("fp32", "bf16"):
        with torch.no_grad():
            outs[p] = augmented_field(_model(p), "rademacher", (6,))(t, y, u)
        assert outs[p].dtype == torch.float64
    rel = (outs["bf16"] - outs["fp32"]).abs().max() / outs["fp32"].abs().max()
    assert 1e-5 < rel < 3e-2  # bfloat16 keeps 8 bits: errors of about 2^-8, not garbage


# --- torch.compile --------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_forward_and_vjp_equal_eager_to_float32_rounding():
    z = torch.randn(8, 6, dtype=torch.float64)
    t = torch.linspace(-5, 4, 8, dtype=torch.float64)
    u = torch.randint(0, 2, (8, 6)).double() * 2 - 1
    y = torch.cat([z, torch.zeros(8, 1, dtype=torch.float64)], 1)
    eager, compiled = _model(), _model(compile=True)
    with torch.no_grad(), first_order_input_gradients():  # as the likelihood calls it
        a = augmented_field(eager, "rademacher", (6,))(t, y, u)
        b = augmented_field(compiled, "rademacher", (6,))(t, y, u)
    assert compiled.net_compile and compiled._compiled is not None  # it did compile
    assert all(p.requires_grad for p in compiled.parameters())  # frozen only during the call
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # no "_compiled." keys
    twin = copy.deepcopy(compiled)  # the EMA copy: the compiled wrapper is rebuilt, not copied
    assert twin._compiled is None and twin.net_compile


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    calls = []

    def broken_compile(net, **kw):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, eager = _model(compile=True), _model()
    z = torch.randn(3, 6, dtype=torch.float64)
    g = torch.zeros(3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = model.predict(z, g)
        second = model.predict(z, g)
    assert [str(w.message) for w in caught if "torch.compile" in str(w.message)] == [
        str(caught[0].message)
    ]
    assert "backend exploded" in str(caught[0].message) and len(calls) == 1
    torch.testing.assert_close(first, eager.predict(z, g))
    torch.testing.assert_close(second, first)
    assert not model.net_compile


def test_an_input_error_is_not_hidden_as_a_compile_failure(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda net, **kw: net)
    model = _model(compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning may be raised
        with pytest.raises(RuntimeError):
            model.predict(torch.randn(3, 5, dtype=torch.float64), torch.zeros(3))  # 5 != 6
    assert model.net_compile


def test_build_model_takes_the_config_settings_and_overrides():
    cfg = apply_overrides(get_preset("digits_cpu"), ["model.precision=bf16"])
    m = build_model(cfg, (1, 8, 8), 17)
    assert (m.precision, m.net_compile) == ("bf16", False)
    m = build_model(cfg, (1, 8, 8), 17, precision="fp32", compile=True)
    assert (m.precision, m.net_compile) == ("fp32", True)


def test_eval_records_a_non_default_precision_in_its_settings(tmp_path):
    from idode.evaluate import evaluate

    kw = dict(max_examples=2, rtol=1e-3, atol=1e-3, with_elbo=False, progress=False)
    bf = evaluate(FIXTURE, tmp_path / "bf16", precision="bf16", **kw)
    fp = evaluate(FIXTURE, tmp_path / "fp32", **kw)
    assert bf["settings"]["precision"] == "bf16" and "precision" not in fp["settings"]
    assert bf["bpd"]["mean"] != fp["bpd"]["mean"]
    with pytest.raises(ConfigError, match="precision"):
        evaluate(FIXTURE, tmp_path / "bad", precision="fp16", **kw)
