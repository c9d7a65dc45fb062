"""Residual MLP: shapes, identity at init, shared gamma embedding, dropout, errors, autograd."""

from __future__ import annotations

import pytest
import torch

from idode.nets import MLP, count_parameters
from idode.nets.embedding import gamma_embedding

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def gammas(batch: int) -> torch.Tensor:
    return torch.linspace(GAMMA_MIN, GAMMA_MAX, batch)


def perturb_output_layer(net: MLP) -> None:
    with torch.no_grad():
        net.out.weight.normal_(std=0.1)
        net.out.bias.normal_(std=0.1)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8), (3, 4)])
def test_output_shape_and_identity_at_init(shape):
    torch.manual_seed(0)
    net = MLP(shape, hidden=32, depth=2, time_embed_dim=16)
    z = torch.randn(5, *shape)
    out = net(z, gammas(5))
    assert out.shape == z.shape
    assert torch.equal(out, z)
    assert torch.equal(net(z, gammas(5), conditioning=torch.ones(5)), z)


def test_parameter_count():
    d, hidden, depth, emb = 64, 32, 3, 16
    net = MLP((1, 8, 8), hidden=hidden, depth=depth, time_embed_dim=emb)
    expected = (d + emb + 1) * hidden + hidden + depth * (hidden**2 + hidden) + hidden * d + d
    assert count_parameters(net) == expected


def test_uses_the_shared_gamma_embedding():
    net = MLP((2,), hidden=8, time_embed_dim=16)
    seen = {}
    net.inp.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    z, g, c = torch.randn(4, 2), gammas(4), torch.tensor([0.0, 1.0, 0.0, 1.0])
    net(z, g, conditioning=c)
    emb = gamma_embedding(g, 16, GAMMA_MIN, GAMMA_MAX)
    torch.testing.assert_close(seen["x"], torch.cat([z, emb, c[:, None]], dim=1))


def test_depends_on_gamma_once_trained():
    torch.manual_seed(0)
    net = MLP((2,), hidden=16, depth=1, time_embed_dim=8)
    perturb_output_layer(net)
    z = torch.randn(3, 2)
    assert not torch.allclose(net(z, gammas(3)), net(z, gammas(3) + 1.0))


def test_dropout_active_in_train_and_inactive_in_eval():
    torch.manual_seed(0)
    net = MLP((1, 8, 8), hidden=32, depth=2, time_embed_dim=8, dropout=0.5)
    perturb_output_layer(net)
    z = torch.randn(3, 1, 8, 8)
    net.train()
    assert not torch.allclose(net(z, gammas(3)), net(z, gammas(3)))
    net.eval()
    assert torch.equal(net(z, gammas(3)), net(z, gammas(3)))


@pytest.mark.parametrize(
    ("z_shape", "gamma", "match"),
    [
        ((4, 3), torch.zeros(4), "MLP built for z of shape"),
        ((4, 1, 2), torch.zeros(4), "MLP built for z of shape"),
        ((4, 2), torch.zeros(4, 1), "gamma must have shape"),
        ((4, 2), torch.zeros(3), "gamma must have shape"),
    ],
)
def test_forward_rejects_bad_inputs(z_shape, gamma, match):
    net = MLP((2,), hidden=8, time_embed_dim=8)
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(z_shape), gamma)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        MLP(())
    with pytest.raises(ValueError, match="time_embed_dim"):
        MLP((2,), time_embed_dim=2)


def test_double_backward_reaches_the_parameters():
    torch.manual_seed(0)
    net = MLP((2,), hidden=16, depth=2, time_embed_dim=8)
    perturb_output_layer(net)
    z = torch.randn(6, 2, requires_grad=True)
    probe = torch.randint(0, 2, z.shape).float() * 2 - 1
    (vjp,) = torch.autograd.grad((net(z, gammas(6)) * probe).sum(), z, create_graph=True)
    (vjp * probe).sum().pow(2).backward()
    for name, p in net.named_parameters():
        if name == "out.bias":  # a constant shift has no Jacobian
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), name
