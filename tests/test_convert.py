"""idode convert: official Flax checkpoints, written here in flax's msgpack layout from known
weights, must convert to networks that reproduce the official ScoreUNet (numpy reference in
official_unet_numpy.py, written from the official formulas)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import numpy as np
import official_unet_numpy as ref
import pytest
import torch

import idode
from idode.cli import main as cli_main
from idode.config import apply_overrides
from idode.convert import ConversionError, FlaxMsgpackError, convert_checkpoint
from idode.convert.flax_msgpack import flatten_tree, read_flax_msgpack, write_flax_msgpack
from idode.nets.embedding import gamma_embedding
from idode.presets import get_preset

# (in_channels, n_embd, n_layers, with_attention, fourier_features, conditioning)
CONFIGS = [
    (3, 32, 1, False, True, False),
    (3, 32, 2, True, True, True),
    (1, 64, 1, True, False, False),
    (1, 32, 2, False, False, True),
    (3, 64, 1, False, True, True),
]


def _cfg(c, n, layers, attn, fourier, extra=()):
    sets = [f"model.n_embd={n}", f"model.n_layers={layers}", f"model.with_attention={attn}"]
    sets.append(f"model.fourier_features={fourier}")
    return apply_overrides(get_preset("cifar10" if c == 3 else "digits"), sets + list(extra))


def _write(path, c, n, layers, attn, fourier, step=7, seed=0, gamma=None, **kw):
    rng = np.random.default_rng(seed)
    raw = ref.random_params(rng, c, n, layers, attn, fourier, **kw)
    ema = ref.random_params(rng, c, n, layers, attn, fourier, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_flax_msgpack(path, ref.train_state(raw, ema, step, gamma))
    return raw, ema


def _inputs(rng, c, cond, b=3, hw=8):
    z = rng.standard_normal((b, c, hw, hw))
    gamma = rng.uniform(-13.3, 5.0, b)
    cvec = rng.integers(0, 2, b).astype(np.float64) if cond else np.zeros(b)
    return z, gamma, cvec


def _run(net, z, gamma, cvec, cond, dtype):
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        return net(t(z), t(gamma), conditioning=t(cvec) if cond else None).numpy()


def _reference(tree, z, gamma, cvec, n, layers, attn, fourier, **kw):
    out = ref.score_unet(tree, z.transpose(0, 2, 3, 1), gamma, cvec, n_embd=n, n_layers=layers,
                         with_attention=attn, fourier=fourier, **kw)  # fmt: skip
    return out.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("c,n,layers,attn,fourier,cond", CONFIGS)
def test_converted_network_reproduces_the_official_one(tmp_path, c, n, layers, attn, fourier, cond):
    raw, ema = _write(tmp_path / "ckpt-7.flax", c, n, layers, attn, fourier)
    out = convert_checkpoint(
        tmp_path / "ckpt-7.flax", tmp_path / "run", _cfg(c, n, layers, attn, fourier)
    )
    rng = np.random.default_rng(1)
    for use_ema, tree in ((True, ema), (False, raw)):
        model, info = idode.load_model(out, ema=use_ema)
        assert not model.training and info.step == 7
        z, gamma, cvec = _inputs(rng, c, cond)
        want = _reference(tree, z, gamma, cvec, n, layers, attn, fourier)
        # float64: every convention exact (only summation order differs)
        got64 = _run(model.net.double(), z, gamma, cvec, cond, torch.float64)
        np.testing.assert_allclose(got64, want, rtol=0, atol=1e-10)
        # float32, as the official network runs: equal to float32 rounding
        got32 = _run(model.net.float(), z, gamma, cvec, cond, torch.float32)
        scale = np.abs(want - z).max()
        assert scale > 0.5  # the network does something beyond the identity
        np.testing.assert_allclose(got32, want, rtol=0, atol=1e-4 * max(1.0, scale))
    # raw and EMA weights went to different slots
    a, _ = idode.load_model(out, ema=True)
    b, _ = idode.load_model(out, ema=False)
    assert not torch.equal(a.net.conv_in.weight, b.net.conv_in.weight)


def test_official_conventions_whatever_the_config_says(tmp_path):
    """A config with another gamma embedding scale (digits_cpu's 100) still converts to the
    official network: the converter sets the official conventions itself."""
    c, n, layers, attn, fourier, cond = 1, 32, 1, False, True, False
    _, ema = _write(tmp_path / "ckpt-7.flax", c, n, layers, attn, fourier)
    extra = ("model.time_embedding_scale=100",)
    out = convert_checkpoint(
        tmp_path / "ckpt-7.flax", tmp_path / "run", _cfg(c, n, layers, attn, fourier, extra)
    )
    model, _ = idode.load_model(out)
    assert model.net.time_scale == 1000.0
    z, gamma, cvec = _inputs(np.random.default_rng(1), c, cond)
    want = _reference(ema, z, gamma, cvec, n, layers, attn, fourier)
    got = _run(model.net.double(), z, gamma, cvec, cond, torch.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One converted 3-channel attention model (n_embd 64), its EMA tree, and the model."""
    d = tmp_path_factory.mktemp("conv")
    _, ema = _write(d / "ckpt-3.flax", 3, 64, 1, True, True)
    out = convert_checkpoint(d / "ckpt-3.flax", d / "run", _cfg(3, 64, 1, True, True))
    model, _ = idode.load_model(out)
    return ema, model.net.double()


def _t(a):
    return torch.tensor(np.asarray(a, np.float64))


def _nchw(x):
    return x.transpose(0, 3, 1, 2)


def test_conv_kernels_are_nhwc_cross_correlations(converted):
    tree, net = converted
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 15))  # 3 channels + 12 Fourier
    got = net.conv_in(_t(_nchw(x))).detach().numpy()
    np.testing.assert_allclose(got, _nchw(ref.conv3x3(tree["conv_in"], x)), atol=1e-10)


def test_dense_kernels_are_transposed(converted):
    tree, net = converted
    x = np.random.default_rng(3).standard_normal((4, 65))
    np.testing.assert_allclose(
        net.dense0(_t(x)).detach().numpy(), ref.dense(tree["dense0"], x), atol=1e-10
    )
    y = np.random.default_rng(4).standard_normal((4, 256))
    got = net.mid[0].resnet.cond_proj(_t(y)).detach().numpy()  # Dense without bias
    np.testing.assert_allclose(got, ref.dense(tree["mid.block_1"]["cond_proj"], y), atol=1e-10)


def test_attention_q_k_v_order(converted):
    tree, net = converted
    x = np.random.default_rng(5).standard_normal((2, 4, 4, 64))
    got = net.mid[0].attn(_t(_nchw(x))).detach().numpy()
    np.testing.assert_allclose(got, _nchw(ref.attn_block(tree["mid.attn_1"], x)), atol=1e-10)


def test_groupnorm_has_flax_groups_and_epsilon(converted):
    tree, net = converted
    assert net.norm_out.num_groups == 32 and net.norm_out.eps == 1e-6  # 2 channels per group
    # a small spread, so that the epsilon matters to the result
    x = 1e-3 * np.random.default_rng(6).standard_normal((2, 4, 4, 64))
    got = net.norm_out(_t(_nchw(x))).detach().numpy()
    want = ref.group_norm(tree["GroupNorm_0"], x)
    np.testing.assert_allclose(got, _nchw(want), atol=1e-9)
    assert not np.allclose(want, ref.group_norm(tree["GroupNorm_0"], x, eps=1e-5), atol=1e-3)


def test_resnet_block_with_nin_shortcut(converted):
    tree, net = converted
    rng = np.random.default_rng(7)
    x, cond = rng.standard_normal((2, 4, 4, 128)), rng.standard_normal((2, 256))
    got = net.up[0].resnet(_t(_nchw(x)), _t(cond)).detach().numpy()
    np.testing.assert_allclose(got, _nchw(ref.resnet_block(tree["up.block_0"], x, cond, 64)),
                               atol=1e-10)  # fmt: skip


def test_fourier_feature_channel_order(converted):
    _, net = converted
    z = np.random.default_rng(8).standard_normal((2, 8, 8, 3))
    got = net.fourier_features(_t(_nchw(z))).numpy()
    np.testing.assert_allclose(got, _nchw(ref.fourier_features(z)), atol=1e-9)


def test_timestep_embedding_of_gamma():
    gamma = np.array([-13.3, -4.0, 0.0, 5.0, 7.5])
    t = (gamma + 13.3) / 18.3
    for dim in (64, 128, 33):
        got = gamma_embedding(_t(gamma), dim, -13.3, 5.0).numpy()
        np.testing.assert_allclose(got, ref.timestep_embedding(t, dim), atol=1e-9)


def test_conditioning_enters_dense0_as_the_last_input(converted):
    tree, net = converted
    rng = np.random.default_rng(9)
    z, gamma, _ = _inputs(rng, 3, False, b=2)
    outs = []
    for c in (0.0, 1.0):
        cvec = np.full(2, c)
        got = _run(net, z, gamma, cvec, True, torch.float64)
        want = _reference(tree, z, gamma, cvec, 64, 1, True, True)
        np.testing.assert_allclose(got, want, atol=1e-10)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


# --- the file format ---------------------------------------------------------------------------


def test_reader_round_trips_flax_types_and_chunks(tmp_path):
    rng = np.random.default_rng(10)
    tree = {
        "step": np.int64(12),  # numpy scalar: extension type 3
        "params": {"a": {"kernel": rng.standard_normal((5, 7)).astype(np.float32)},
                   "b": rng.integers(0, 9, (3,)).astype(np.int32), "c": np.float32(2.5)},
        "opt_state": {"0": {"count": np.asarray(4, np.int32)}},
    }  # fmt: skip
    write_flax_msgpack(tmp_path / "f.flax", tree, chunk_bytes=24)  # kernel: 140 bytes -> 6 chunks
    raw = msgpack.unpackb((tmp_path / "f.flax").read_bytes(), raw=False, strict_map_key=False)
    kernel_entry = raw["params"]["a"]["kernel"]
    assert kernel_entry["__msgpack_chunked_array__"] and len(kernel_entry["chunks"]) == 6
    assert isinstance(raw["step"], msgpack.ExtType) and raw["step"].code == 3
    back = read_flax_msgpack(tmp_path / "f.flax")
    flat, want = flatten_tree(back), flatten_tree(tree)
    assert list(flat) == list(want)
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k])
        assert np.asarray(flat[k]).dtype == np.asarray(want[k]).dtype
    assert set(read_flax_msgpack(tmp_path / "f.flax", keys=["step"])) == {"step"}


def test_chunked_checkpoint_converts_identically(tmp_path):
    _write(tmp_path / "a" / "ckpt-1.flax", 3, 32, 1, False, True)
    state = read_flax_msgpack(tmp_path / "a" / "ckpt-1.flax")
    (tmp_path / "b").mkdir()
    write_flax_msgpack(tmp_path / "b" / "ckpt-1.flax", state, chunk_bytes=1000)
    cfg = _cfg(3, 32, 1, False, True)
    ma, _ = idode.load_model(convert_checkpoint(tmp_path / "a", tmp_path / "ra", cfg))
    mb, _ = idode.load_model(convert_checkpoint(tmp_path / "b", tmp_path / "rb", cfg))
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_directory_picks_the_newest_checkpoint(tmp_path):
    d = tmp_path / "checkpoints-0"
    for step in (2, 10, 9):  # 10 is newest: numeric, not lexicographic, order
        _write(d / f"ckpt-{step}.flax", 3, 32, 1, False, True, step=step, seed=step)
    (d / "ckpt-10.index").write_text("tensorflow input pipeline state")
    out = convert_checkpoint(tmp_path, tmp_path / "run", _cfg(3, 32, 1, False, True))
    model, info = idode.load_model(out)
    assert info.step == 10
    src = info.meta["extra"]["converted_from"]
    assert src["file"].endswith("ckpt-10.flax") and src["format"] == "i-DODE"
    assert info.meta["optimizer"] is None  # optimizer state is not carried over


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_cfg,conf_cfg,phrases",
    [
        ((32, 2, False), (32, 1, False), ["unexpected key", "down.block_1", "model.n_layers=2"]),
        ((32, 1, False), (32, 2, False), ["missing key", "down.block_1", "model.n_layers=1"]),
        ((32, 1, True), (32, 1, False), ["unexpected key", "attn_0", "model.with_attention=True"]),
        ((32, 1, False), (64, 1, False),
         ["dense0/kernel", "(33, 128)", "(65, 256)", "model.n_embd=32"]),
    ],
)  # fmt: skip
def test_mismatch_names_key_shapes_and_knob(tmp_path, file_cfg, conf_cfg, phrases):
    _write(tmp_path / "ckpt-1.flax", 3, *file_cfg, True)
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(tmp_path, tmp_path / "run", _cfg(3, *conf_cfg, True))
    for p in phrases:
        assert p in str(e.value), (p, str(e.value))
    assert not (tmp_path / "run").exists()


def test_fourier_mismatch_points_at_input_channels(tmp_path):
    _write(tmp_path / "ckpt-1.flax", 3, 32, 1, False, True)
    with pytest.raises(ConversionError, match=r"conv_in/kernel.*\(3, 3, 15, 32\).*fourier"):
        convert_checkpoint(tmp_path, tmp_path / "run", _cfg(3, 32, 1, False, False))


@pytest.mark.parametrize("content", [b"hello, not msgpack", msgpack.packb([1, 2, 3]), b""])
def test_not_a_flax_msgpack_file(tmp_path, content):
    (tmp_path / "ckpt-1.flax").write_bytes(content)
    with pytest.raises(FlaxMsgpackError, match="not a Flax msgpack"):
        convert_checkpoint(tmp_path / "ckpt-1.flax", tmp_path / "run", "cifar10")
    assert not (tmp_path / "run").exists()


def test_truncated_file(tmp_path):
    _write(tmp_path / "full.flax", 3, 32, 1, False, True)
    data = (tmp_path / "full.flax").read_bytes()
    (tmp_path / "ckpt-1.flax").write_bytes(data[: len(data) // 3])
    with pytest.raises(FlaxMsgpackError, match="truncated"):
        convert_checkpoint(tmp_path / "ckpt-1.flax", tmp_path / "run", "cifar10")


def test_no_half_written_directory(tmp_path, monkeypatch):
    import idode.checkpoint

    _write(tmp_path / "ckpt-1.flax", 3, 32, 1, False, True)
    real = idode.checkpoint.save_checkpoint

    def crash(run_dir, **kw):
        real(run_dir, **kw)  # everything written ... then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(idode.checkpoint, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tmp_path, tmp_path / "out" / "run", _cfg(3, 32, 1, False, True))
    assert list((tmp_path / "out").iterdir()) == []  # neither DIR nor a temporary folder
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(tmp_path, tmp_path / "taken", _cfg(3, 32, 1, False, True))


# --- VDM ---------------------------------------------------------------------------------------


def test_vdm_checkpoint_learned_schedule_and_eps(tmp_path):
    w, b = np.float32(18.1), np.float32(-13.1)  # gamma(t) = b + |w| t, stored as params/gamma
    _, ema = _write(tmp_path / "ckpt-5.flax", 3, 32, 1, False, True, gamma={"w": -w, "b": b})
    cfg = _cfg(3, 32, 1, False, True)
    with pytest.raises(ConversionError, match="model.parameterization=eps"):
        convert_checkpoint(tmp_path, tmp_path / "run", cfg)
    cfg = apply_overrides(cfg, ["model.parameterization=eps"])
    model, info = idode.load_model(convert_checkpoint(tmp_path, tmp_path / "run", cfg))
    m = info.config.model
    assert (m.gamma_min, m.gamma_max) == (float(b), float(np.float32(b + w)))
    assert (m.net_gamma_min, m.net_gamma_max) == (-13.3, 5.0)
    assert model.parameterization == "eps"
    assert math.isclose(model.schedule.gamma_min, float(b))
    # the network still maps gamma to t with the config's fixed range, as VDM's ScoreUNet does
    z, gamma, cvec = _inputs(np.random.default_rng(11), 3, False)
    want = _reference(ema, z, gamma, cvec, 32, 1, False, True)
    got = _run(model.net.double(), z, gamma, cvec, False, torch.float64)
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_vdm_nonlinear_schedule_is_refused(tmp_path):
    state = read_flax_msgpack(_write_and_path(tmp_path))
    state["ema_params"]["gamma"] = {"l1": {"kernel": np.ones((1, 1), np.float32)}}
    write_flax_msgpack(tmp_path / "ckpt-2.flax", state)
    cfg = apply_overrides(_cfg(3, 32, 1, False, True), ["model.parameterization=eps"])
    with pytest.raises(ConversionError, match="learnable_nnet"):
        convert_checkpoint(tmp_path / "ckpt-2.flax", tmp_path / "run", cfg)


def _write_and_path(tmp_path):
    _write(tmp_path / "ckpt-1.flax", 3, 32, 1, False, True)
    return tmp_path / "ckpt-1.flax"


# --- end to end through the CLI ----------------------------------------------------------------


def test_cli_convert_eval_sample_finetune(tmp_path, capsys):
    # a gentle 1-channel 8x8 network (small conv_out) so the ODE solves take few steps
    _write(tmp_path / "official" / "ckpt-40.flax", 1, 32, 1, False, True, step=40, out_scale=0.05)
    run = tmp_path / "converted"
    sets = ["model.n_embd=32", "model.n_layers=1"]
    argv = ["convert", str(tmp_path / "official"), "--config", "digits", "--out", str(run)]
    assert cli_main(argv + sum((["--set", s] for s in sets), [])) == 0
    assert cli_main(argv + ["--set", "model.n_embd=64"]) == 2  # DIR exists: a clear error
    assert "already exists" in capsys.readouterr().err

    ev = tmp_path / "eval"
    tol = ["--rtol", "1e-3", "--atol", "1e-3", "--no-progress"]
    assert cli_main(["eval", "--checkpoint", str(run), "--out", str(ev), "--max-examples", "4",
                     "--batch-size", "4", *tol]) == 0  # fmt: skip
    res = json.loads((ev / "eval.json").read_text())
    assert res["bpd"]["n"] == 4 and math.isfinite(res["bpd"]["mean"])
    assert math.isfinite(res["elbo"]["mean"])

    assert cli_main(["sample", "--checkpoint", str(run), "-n", "2", "--out",
                     str(tmp_path / "s"), *tol]) == 0  # fmt: skip
    assert np.load(tmp_path / "s.npz")["samples"].shape[0] == 2

    ft = tmp_path / "finetuned"
    assert cli_main(["finetune", "--from", str(run), "--out", str(ft), "--steps", "2",
                     "--set", "train.batch_size=4", "--set", "train.eval_every=0",
                     "--set", "train.ode_eval_every=0", "--no-progress"]) == 0  # fmt: skip
    model, info = idode.load_model(ft)
    assert info.step == 42 and info.meta["optimizer"] is not None
    assert info.config.train.second_order_weight == 0.1
    # it started from the converted weights (EMA decay 0.9999: two steps barely move them)
    start, _ = idode.load_model(run)
    for (k, v), (_, w) in zip(model.state_dict().items(), start.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, atol=1e-3, rtol=0, msg=k)
