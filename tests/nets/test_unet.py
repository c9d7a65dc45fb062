"""ScoreUNet (method.md §8.1): structure, parameter counts, embeddings, autograd, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from idode.nets import MLP, NET_KINDS, ScoreUNet, count_parameters, make_net
from idode.nets.attention import attention
from idode.nets.embedding import gamma_embedding, normalized_gamma, timestep_embedding
from idode.nets.unet import lecun_normal_

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def tiny_unet(**kwargs) -> ScoreUNet:
    defaults = dict(in_channels=1, n_embd=16, n_layers=2, dropout=0.0)
    return ScoreUNet(**{**defaults, **kwargs})


def perturb_zero_inits(net: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every all-zero weight a random value so every path of the network is live."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def random_gamma(batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * torch.rand(batch, generator=gen, dtype=dtype)


# --- parameter counts (method.md §8.1) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("n_embd", "with_attention", "millions", "exact"),
    [(128, False, 30.58, 30_578_179), (256, False, 122.14, 122_137_603), (256, True, 139.28, None)],
)
def test_parameter_counts_match_vdm(n_embd, with_attention, millions, exact):
    with torch.device("meta"):
        net = ScoreUNet(n_embd=n_embd, n_layers=32, with_attention=with_attention)
    count = count_parameters(net)
    assert round(count / 1e6, 2) == millions
    if exact is not None:
        assert count == exact


def test_parameter_count_by_hand_for_a_small_net():
    n, layers, c = 32, 3, 3
    net = ScoreUNet(in_channels=c, n_embd=n, n_layers=layers, with_attention=True)

    def conv3(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out + c_out

    def resnet(c_in: int) -> int:  # GN1, conv1, cond_proj (no bias), GN2, conv2, nin_shortcut
        shortcut = c_in * n + n if c_in != n else 0
        return 2 * c_in + conv3(c_in, n) + 4 * n * n + 2 * n + conv3(n, n) + shortcut

    attn = 2 * n + 4 * (n * n + n)
    expected = (
        (n + 1) * 4 * n + 4 * n + (4 * n) ** 2 + 4 * n  # dense0, dense1
        + conv3(5 * c, n)  # conv_in on z + 12 Fourier channels
        + layers * (resnet(n) + attn)
        + 2 * resnet(n) + attn  # middle
        + (layers + 1) * (resnet(2 * n) + attn)
        + 2 * n + conv3(n, c)  # norm_out, conv_out
    )  # fmt: skip
    assert count_parameters(net) == expected
    assert net.conv_in.in_channels == 15


# --- output shape and identity at initialisation --------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((1, 8, 8), {}),
        ((1, 28, 28), {"n_layers": 1}),
        ((3, 32, 32), {"n_layers": 1, "with_attention": True}),
        ((3, 5, 7), {"with_fourier_features": False}),
    ],
)
def test_output_shape_and_identity_at_init(shape, kwargs):
    torch.manual_seed(0)
    net = tiny_unet(in_channels=shape[0], **kwargs)
    z = torch.randn(2, *shape)
    out = net(z, random_gamma(2))
    assert out.shape == z.shape
    assert torch.equal(out, z)  # conv_out is zero-initialised: F = z exactly (§2.5)
    out_c = net(z, random_gamma(2), conditioning=torch.ones(2))
    assert torch.equal(out_c, z)


def test_output_depends_on_gamma_conditioning_and_z_once_trained():
    torch.manual_seed(0)
    net = tiny_unet()
    perturb_zero_inits(net)
    z, g = torch.randn(2, 1, 8, 8), random_gamma(2)
    base = net(z, g)
    assert not torch.allclose(base, z)
    assert not torch.allclose(base, net(z, g + 1.0))
    assert not torch.allclose(base, net(z, g, conditioning=torch.ones(2)))
    assert torch.equal(base, net(z, g, conditioning=torch.zeros(2)))  # None means 0


def test_examples_are_independent_of_batch_mates():
    torch.manual_seed(0)
    net = tiny_unet(with_attention=True).eval()
    perturb_zero_inits(net)
    z, g = torch.randn(3, 1, 8, 8), random_gamma(3)
    full = net(z, g)
    for i in range(3):
        torch.testing.assert_close(net(z[i : i + 1], g[i : i + 1]), full[i : i + 1])


# --- embeddings ---------------------------------------------------------------------------------
def test_timestep_embedding_by_hand():
    dim, half = 8, 4
    freqs = [math.exp(-j * math.log(10000.0) / (half - 1)) for j in range(half)]
    gamma = torch.tensor([GAMMA_MIN, GAMMA_MAX, -4.15, -10.0], dtype=torch.float64)
    emb = gamma_embedding(gamma, dim, GAMMA_MIN, GAMMA_MAX)
    assert emb.shape == (4, dim) and emb.dtype == torch.float64
    for row, g in zip(emb, gamma.tolist(), strict=True):
        t_in = (g - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN)
        args = [1000.0 * t_in * f for f in freqs]
        hand = [math.sin(a) for a in args] + [math.cos(a) for a in args]
        torch.testing.assert_close(row, torch.tensor(hand, dtype=torch.float64))
    # gamma_min -> t_in = 0 -> [0]*half + [1]*half; the midpoint -> t_in = 0.5
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    assert normalized_gamma(gamma, GAMMA_MIN, GAMMA_MAX)[2].item() == pytest.approx(0.5)
    # an odd dimension is zero-padded by one column, as in VDM
    odd = timestep_embedding(torch.tensor([0.3]), 9)
    assert odd.shape == (1, 9) and odd[0, -1] == 0
    torch.testing.assert_close(odd[:, :8], timestep_embedding(torch.tensor([0.3]), 8))


def test_time_embedding_scale_reaches_the_network():
    """model.time_embedding_scale sets sin/cos(scale t_in f_j) in the network's conditioning."""
    from idode.config import apply_overrides
    from idode.model import build_model
    from idode.presets import get_preset

    cfg = apply_overrides(get_preset("digits"), ["model.time_embedding_scale=100"])
    net = build_model(cfg, (1, 8, 8), 17).net
    seen = {}
    net.dense0.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    g = torch.tensor([-13.3, -4.0, 5.0])
    net(torch.zeros(3, 1, 8, 8), g)
    half = net.n_embd // 2
    freqs = [math.exp(-j * math.log(10000.0) / (half - 1)) for j in range(half)]
    t_in = (g.double() + 13.3) / 18.3
    hand = torch.stack([torch.sin(100.0 * t_in * f) for f in freqs]
                       + [torch.cos(100.0 * t_in * f) for f in freqs], 1)  # fmt: skip
    torch.testing.assert_close(seen["x"][:, :-1], hand.float(), atol=1e-5, rtol=0)
    # the default is the paper's 1000; digits_cpu's 100
    assert build_model(get_preset("digits"), (1, 8, 8), 17).net.time_scale == 1000.0
    assert build_model(get_preset("digits_cpu"), (1, 8, 8), 17).net.time_scale == 100.0


def test_unet_conditioning_vector_is_embedding_then_conditioning_scalar():
    net = tiny_unet(n_embd=16)
    seen = {}
    net.dense0.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    z, g, c = torch.zeros(3, 1, 4, 4), random_gamma(3), torch.tensor([0.0, 1.0, 0.5])
    net(z, g, conditioning=c)
    expected = torch.cat([gamma_embedding(g, 16, GAMMA_MIN, GAMMA_MAX), c[:, None]], dim=1)
    torch.testing.assert_close(seen["x"], expected)


def test_fourier_feature_channel_ordering():
    net = tiny_unet(in_channels=3)
    z = torch.randn(2, 3, 4, 4)
    feats = net.fourier_features(z)
    assert feats.shape == (2, 12, 4, 4)
    w = {f: 2.0**f * 2 * math.pi for f in (6, 7)}
    # sin block: [z0 w6, z0 w7, z1 w6, z1 w7, z2 w6, z2 w7]; then the cos block in the same order
    order = [(c, f) for c in range(3) for f in (6, 7)]
    for k, (c, f) in enumerate(order):
        torch.testing.assert_close(feats[:, k], torch.sin(w[f] * z[:, c]))
        torch.testing.assert_close(feats[:, 6 + k], torch.cos(w[f] * z[:, c]))
    # the network input is concat(z, sin block, cos block)
    seen = {}
    net.conv_in.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    net(z, random_gamma(2))
    torch.testing.assert_close(seen["x"], torch.cat([z, feats], dim=1))


# --- initialisation ------------------------------------------------------------------------------
def test_lecun_normal_matches_flax_statistics():
    torch.manual_seed(0)
    w = lecun_normal_(torch.empty(256, 64, 3, 3))
    fan_in = 64 * 9
    assert w.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.02)
    assert w.abs().max().item() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-7


def test_zero_inits_and_biases():
    net = tiny_unet(with_attention=True)
    assert not net.conv_out.weight.any() and not net.conv_out.bias.any()
    for layer in [*net.down, *net.mid, *net.up]:
        assert layer.resnet.cond_proj.bias is None and not layer.resnet.cond_proj.weight.any()
        assert not layer.resnet.conv2.weight.any()
        assert not layer.resnet.conv1.bias.any() and layer.resnet.conv1.weight.any()
        if layer.attn is not None:
            assert not layer.attn.proj_out.weight.any()
    assert net.mid[0].attn is not None and net.mid[1].attn is None  # middle attention always
    assert net.norm_out.eps == 1e-6


@pytest.mark.parametrize(
    ("n_embd", "groups_n", "groups_2n"), [(128, 32, 32), (256, 32, 32), (64, 16, 32), (16, 4, 8)]
)
def test_group_norm_groups(n_embd, groups_n, groups_2n):
    # flax's 32 groups for VDM's widths; narrow layers keep >= 4 channels per group
    with torch.device("meta"):
        net = ScoreUNet(n_embd=n_embd, n_layers=1)
    up = net.up[0].resnet
    assert (up.norm1.num_channels, up.norm1.num_groups) == (2 * n_embd, groups_2n)
    assert (up.norm2.num_channels, up.norm2.num_groups) == (n_embd, groups_n)
    assert net.norm_out.num_groups == groups_n


def test_group_norm_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        ScoreUNet(n_embd=132, n_layers=1)


# --- dropout --------------------------------------------------------------------------------------
def test_dropout_active_in_train_and_inactive_in_eval():
    torch.manual_seed(0)
    net = tiny_unet(dropout=0.5)
    perturb_zero_inits(net)
    z, g = torch.randn(2, 1, 8, 8), random_gamma(2)
    net.train()
    assert not torch.allclose(net(z, g), net(z, g))
    net.eval()
    assert torch.equal(net(z, g), net(z, g))


# --- input errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("z_shape", "gamma", "conditioning", "match"),
    [
        ((2, 1, 8, 8), torch.zeros(2, 1), None, "gamma must have shape"),
        ((2, 1, 8, 8), torch.zeros(3), None, "gamma must have shape"),
        ((2, 1, 8, 8), torch.tensor(0.0), None, "gamma must have shape"),
        ((2, 1, 8, 8), 0.5, None, "gamma must be a tensor"),
        ((2, 1, 8, 8), torch.zeros(2), torch.zeros(2, 1), "conditioning must have shape"),
        ((2, 3, 8, 8), torch.zeros(2), None, "in_channels=1"),
        ((2, 8, 8, 1), torch.zeros(2), None, "channel-first"),
        ((2, 64), torch.zeros(2), None, "channel-first"),
    ],
)
def test_forward_rejects_bad_inputs(z_shape, gamma, conditioning, match):
    net = tiny_unet()
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(z_shape), gamma, conditioning)


# --- autograd: attention, double backward, checkpointing ------------------------------------------
def test_twice_differentiable_attention_matches_sdpa_and_passes_gradgradcheck():
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2, 1, 5, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    qkv = [t.requires_grad_() for t in qkv]
    torch.testing.assert_close(attention(*qkv, True), F.scaled_dot_product_attention(*qkv))
    fn = lambda q, k, v: attention(q, k, v, twice_differentiable=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, qkv)
    assert torch.autograd.gradgradcheck(fn, qkv)
    # float32 gradients agree with the fused kernel's backward
    q, k, v = [t.detach().float().requires_grad_() for t in qkv]
    u = torch.randn(2, 1, 5, 3, generator=gen)
    mine = torch.autograd.grad((attention(q, k, v, True) * u).sum(), (q, k, v))
    ref = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v) * u).sum(), (q, k, v))
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b)


def hutchinson_double_backward(net, z, gamma, probe):
    """The second-order loss pattern (§5.2): div = u^T d<F, u>/dz, then backward into params."""
    z = z.detach().requires_grad_()
    out = net(z, gamma)
    (vjp,) = torch.autograd.grad((out * probe).sum(), z, create_graph=True)
    div = (vjp * probe).flatten(1).sum(1)
    net.zero_grad()
    (div.pow(2).sum() + out.pow(2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), div.detach(), grads


def test_double_backward_gives_finite_nonzero_parameter_grads():
    torch.manual_seed(0)
    net = tiny_unet(with_attention=True)
    perturb_zero_inits(net)
    z, g = torch.randn(2, 1, 6, 6), random_gamma(2)
    probe = torch.randint(0, 2, z.shape).float() * 2 - 1
    _, div, grads = hutchinson_double_backward(net, z, g, probe)
    assert torch.isfinite(div).all()
    names = {n for n, _ in net.named_parameters()}
    assert set(grads) == names  # every parameter is reached
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.any(), name


def test_batched_vjp_through_attention_matches_a_loop():
    # divergence.exact_divergence uses is_grads_batched (vmap over the backward)
    torch.manual_seed(0)
    net = tiny_unet(with_attention=True).double()
    perturb_zero_inits(net)
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    out = net(z, random_gamma(2, dtype=torch.float64))
    basis = torch.eye(3, 2 * 16, dtype=torch.float64).reshape(3, *z.shape)
    (batched,) = torch.autograd.grad(out, z, basis, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        (single,) = torch.autograd.grad(out, z, basis[i], retain_graph=True)
        torch.testing.assert_close(batched[i], single)


def test_checkpoint_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tiny_unet(with_attention=True, dropout=0.3).double().train()
    perturb_zero_inits(plain)
    ckpt = tiny_unet(with_attention=True, dropout=0.3, checkpoint=True).double().train()
    ckpt.load_state_dict(plain.state_dict())
    z, g = torch.randn(2, 1, 6, 6, dtype=torch.float64), random_gamma(2, dtype=torch.float64)
    probe = torch.randint(0, 2, z.shape).double() * 2 - 1
    results = []
    for net in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks; checkpoint replays the RNG state
        results.append(hutchinson_double_backward(net, z, g, probe))
    (out_a, div_a, grads_a), (out_b, div_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(div_a, div_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    # first-order training path (z without grad: fused attention) agrees too
    for net in (plain, ckpt):
        net.zero_grad()
        torch.manual_seed(2)
        net(z, g).pow(2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# --- factory --------------------------------------------------------------------------------------
def test_make_net():
    unet = make_net("unet", (1, 8, 8), n_embd=16, n_layers=1)
    assert isinstance(unet, ScoreUNet) and unet.in_channels == 1 and unet.n_layers == 1
    mlp = make_net("mlp", (2,), hidden=8)
    assert isinstance(mlp, MLP)
    assert NET_KINDS == ("unet", "mlp")
    with pytest.raises(ValueError, match="'unet', 'mlp'"):
        make_net("transformer", (1, 8, 8))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        make_net("unet", (64,))


def test_first_order_input_gradients_uses_fused_attention_with_the_same_divergence():
    from idode.divergence import (
        exact_divergence,
        first_order_input_gradients,
        hutchinson_divergence,
        sample_probes,
    )

    torch.manual_seed(0)
    net = ScoreUNet(in_channels=1, n_embd=8, n_layers=1, with_attention=True, dropout=0.0)
    for p in net.parameters():  # leave the zero-init: a non-trivial map
        torch.nn.init.normal_(p, std=0.2)
    net = net.double()
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    g = torch.tensor([-3.0, 1.0], dtype=torch.float64)
    fn = lambda x: net(x, g)  # noqa: E731
    u = sample_probes(z.shape, "rademacher", dtype=torch.float64)
    _, ref_h = hutchinson_divergence(fn, z, u)
    _, ref_e = exact_divergence(fn, z, chunk_size=5)
    with first_order_input_gradients():
        _, fast_h = hutchinson_divergence(fn, z, u)
        _, fast_e = exact_divergence(fn, z, chunk_size=5)
        with pytest.raises(RuntimeError):  # the fused kernel has no double backward
            _, div = hutchinson_divergence(fn, z, u, create_graph=True)
            torch.autograd.grad(div.sum(), list(net.parameters()))
    torch.testing.assert_close(fast_h, ref_h)
    torch.testing.assert_close(fast_e, ref_e)


def test_mnist_cpu_has_no_input_fourier_features_the_paper_network_has():
    """mnist_cpu leaves out the input Fourier features (its likelihood solve did not converge
    with them); the mnist preset keeps the paper's sin/cos(2^f 2 pi z), f = 6, 7."""
    from idode.model import build_model
    from idode.presets import get_preset

    def input_channels(preset: str) -> int:
        net = build_model(get_preset(preset), (1, 28, 28), 256).net
        seen = {}
        net.conv_in.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
        net(torch.zeros(2, 1, 28, 28), torch.zeros(2))
        return seen["x"].shape[1]

    assert input_channels("mnist_cpu") == 1
    assert input_channels("mnist") == 1 + 2 * 2  # z, then sin and cos at two frequencies
