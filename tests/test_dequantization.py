import math

import pytest
import torch
from scipy import stats

import idode
from idode.dequantization import (
    bin_centers,
    bits_per_dim_from_nats,
    decoder_log_prob,
    dequantize,
    sample_truncated_normal,
    truncated_normal_log_mass,
    truncated_normal_second_moment,
    truncation_point,
    uniform_log_q,
)


def test_bin_centers_contract():
    k = torch.arange(256)
    c = bin_centers(k, 256)
    assert c[0].item() == pytest.approx(-1 + 1 / 256) and c[-1].item() == pytest.approx(1 - 1 / 256)
    torch.testing.assert_close(c[1:] - c[:-1], torch.full((255,), 2 / 256))


def test_truncation_point_matches_method(schedule):
    # tau = alpha_min / (256 sigma_min) = e^{-gamma_min/2} / 256 = 3.018689 for both schedules
    assert truncation_point(schedule, 256) == pytest.approx(3.018689, rel=1e-6)
    tau = truncation_point(schedule, 256)
    assert math.exp(truncated_normal_log_mass(tau)) == pytest.approx(0.997461, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 3.018689, 8.0, 45.4])
def test_truncated_normal_against_scipy(tau):
    ref = stats.truncnorm(-tau, tau)
    assert math.exp(truncated_normal_log_mass(tau)) == pytest.approx(
        stats.norm.cdf(tau) - stats.norm.cdf(-tau), rel=1e-12
    )
    assert truncated_normal_second_moment(tau) == pytest.approx(ref.var(), rel=1e-9)
    eps = sample_truncated_normal((200_000,), tau, generator=torch.Generator().manual_seed(0))
    assert eps.dtype == torch.float64 and eps.abs().max() <= tau
    assert stats.kstest(eps.numpy(), ref.cdf).pvalue > 1e-3


def test_truncated_normal_log_q_and_entropy_against_scipy(schedule):
    x_int = torch.randint(0, 256, (3, 2, 2, 2))
    d = 8
    dq = dequantize(
        "truncated_normal", x_int, 256, schedule, generator=torch.Generator().manual_seed(1)
    )
    tau = truncation_point(schedule, 256)
    a_min, s_min = schedule.alpha_min, schedule.sigma_min
    eps = (dq.z - a_min * bin_centers(x_int, 256, torch.float64)) / s_min
    # the draw stays inside its own scaled bin
    assert eps.abs().max() <= tau + 1e-6
    ref = stats.truncnorm(-tau, tau, scale=s_min)
    log_q = ref.logpdf((s_min * eps).flatten(1).numpy()).sum(1)
    torch.testing.assert_close(dq.log_q, torch.from_numpy(log_q), rtol=1e-9, atol=1e-6)
    # -E[log q] is the entropy: d * H(TN(0, sigma_min^2; +-tau sigma_min))
    torch.testing.assert_close(
        dq.expected_log_q,
        torch.full((3,), -d * float(ref.entropy()), dtype=torch.float64),
        rtol=1e-10,
        atol=0,
    )
    # method.md §7.3: E log q = 7.568787 bits/dim for VP (7.570651 SP), vs exactly 7 for uniform
    ref_bits = 7.568787 if schedule.name == "VP" else 7.570651
    assert (dq.expected_log_q[0] / (d * math.log(2))).item() == pytest.approx(ref_bits, abs=2e-6)


def test_uniform_and_variational(schedule):
    x_int = torch.randint(0, 256, (4, 3))
    dq = dequantize("uniform", x_int, 256, schedule)
    assert dq.gamma_start == -11.8
    lo = bin_centers(x_int, 256, torch.float64) - 1 / 256
    assert ((dq.z >= lo) & (dq.z < lo + 2 / 256)).all()
    # the "+7" of 8-bit data: uniform density 128^d in [-1, 1] space
    assert uniform_log_q(3, 256) == pytest.approx(3 * 7 * math.log(2))
    torch.testing.assert_close(
        dq.log_q, torch.full((4,), uniform_log_q(3, 256), dtype=torch.float64)
    )
    dv = dequantize("variational", x_int, 256, schedule)
    assert dv.gamma_start == schedule.gamma_min
    eps = (dv.z - schedule.alpha_min * bin_centers(x_int, 256, torch.float64)) / schedule.sigma_min
    expect = stats.norm(scale=schedule.sigma_min).logpdf((schedule.sigma_min * eps).numpy()).sum(1)
    torch.testing.assert_close(dv.log_q, torch.from_numpy(expect), rtol=1e-9, atol=1e-6)
    assert (dv.log_decoder <= 0).all()


@pytest.mark.parametrize("num_levels", [4, 17, 256])
def test_decoder_is_a_normalised_softmax(schedule, num_levels):
    z = torch.randn(2, 3, dtype=torch.float64) * 0.5
    total = torch.zeros(2, 3, dtype=torch.float64)
    prec = math.exp(-schedule.gamma_min)
    c = bin_centers(torch.arange(num_levels), num_levels, torch.float64)
    for j in range(num_levels):
        k = torch.full((2, 3), j)
        # decoder_log_prob sums over dims; compare one dim at a time against a direct softmax
        for i in range(3):
            y = z[:, i] / schedule.alpha_min
            logits = -0.5 * prec * (y[:, None] - c[None]) ** 2
            direct = logits.log_softmax(1)[:, j]
            zi = z[:, i : i + 1]
            torch.testing.assert_close(
                decoder_log_prob(zi, k[:, i : i + 1], num_levels, schedule), direct
            )
        total += torch.stack(
            [
                decoder_log_prob(z[:, i : i + 1], k[:, i : i + 1], num_levels, schedule)
                for i in range(3)
            ],
            1,
        ).exp()
    torch.testing.assert_close(total, torch.ones_like(total))


def test_nats_to_bits_per_dim():
    assert bits_per_dim_from_nats(torch.tensor([-10 * math.log(2)]), 10).item() == pytest.approx(
        1.0
    )


def test_unknown_dequantization():
    with pytest.raises(ValueError, match="valid: 'truncated_normal', 'uniform', 'variational'"):
        dequantize("flow++", torch.zeros(1, 2, dtype=torch.long), 256, idode.VPSchedule())
