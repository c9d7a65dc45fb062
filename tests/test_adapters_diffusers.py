"""from_diffusers: the schedule from alphas_cumprod, fractional timesteps, exact eps/likelihood."""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from adapter_problems import (
    gaussian_data,
    posterior_means,
    sample_marginal,
    tiny_diffusers_unet,
    truncated_flow_log_density,
    vp_coefficients,
)

import idode
import idode.adapters

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a test extra: pip install diffusers"
)

PRED_TYPES = ["epsilon", "v_prediction", "sample"]


def reference_gammas(scheduler) -> np.ndarray:
    """gamma_i = log((1 - abar_i) / abar_i) from the scheduler's alphas_cumprod, in numpy."""
    abar = scheduler.alphas_cumprod.double().numpy()
    with np.errstate(divide="ignore"):  # abar = 0 at a zero-terminal-SNR end: gamma = +inf
        return np.log1p(-abar) - np.log(abar)


def eps_from_diffusers_output(out, z, abar, prediction_type):
    """The eps implied by a diffusers output (the formulas of DDPMScheduler.step)."""
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":  # v = a eps - s x0  =>  eps = a v + s z
        return a * out + s * z
    return (z - a * out) / s  # sample: x0


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_eps_hat_at_training_timesteps_is_the_unets_eps(prediction_type):
    unet = tiny_diffusers_unet()
    sched = diffusers.DDPMScheduler(prediction_type=prediction_type)
    model = idode.adapters.from_diffusers(unet, sched)
    gam = reference_gammas(sched)
    assert model.schedule.name == "VP"
    assert model.schedule.gamma_min == pytest.approx(gam[0], abs=1e-12)
    assert model.schedule.gamma_max == pytest.approx(gam[-1], abs=1e-12)
    z = torch.randn(3, 1, 8, 8)
    abar = sched.alphas_cumprod.double().numpy()
    for i in (0, 1, 417, 998, 999):
        with torch.no_grad():
            out = unet(z, torch.full((3,), i, dtype=torch.long)).sample  # as the pipelines call it
            eps = model.eps_hat(z, torch.full((3,), gam[i], dtype=torch.float64))
        expected = eps_from_diffusers_output(out.double(), z.double(), abar[i], prediction_type)
        torch.testing.assert_close(eps.double(), expected, rtol=1e-4, atol=1e-5)


class RecordingUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[torch.Tensor] = []

    def forward(self, sample, timestep):
        self.timesteps.append(timestep)
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_between_training_timesteps_the_timestep_is_fractional_and_continuous():
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    gam = reference_gammas(sched)
    rec = RecordingUNet()
    model = idode.adapters.from_diffusers(rec, sched)
    g = torch.tensor([gam[10] + 0.25 * (gam[11] - gam[10]), gam[500] + 1e-3, gam[0], gam[-1]])
    model.eps_hat(torch.zeros(4, 1, 2, 2, dtype=torch.float64), g.double())
    t = rec.timesteps[-1]
    assert t.dtype.is_floating_point and t.shape == (4,)
    expected = np.interp(g.numpy(), gam, np.arange(len(gam)))
    np.testing.assert_allclose(t.numpy(), expected, rtol=0, atol=1e-9)
    assert 10 < t[0] < 11 and 500 < t[1] < 501 and t[2] == 0 and t[3] == 999
    # continuous: a sweep of gamma gives a monotone timestep with no jumps
    sweep = torch.linspace(gam[0], gam[-1], 4001, dtype=torch.float64)
    ts = model.net.timestep(sweep)
    assert (ts.diff() >= 0).all() and ts.diff().max() < 2.0


class ExactGaussianUNet(torch.nn.Module):
    """A fake "unet" predicting the exact eps / v / x0 for Gaussian data at a (fractional)
    timestep, whose gamma it finds by linear interpolation of the training gammas (numpy)."""

    def __init__(self, mu, s2, gammas, prediction_type) -> None:
        super().__init__()
        self.mu, self.s2 = torch.as_tensor(mu), torch.as_tensor(s2)
        self.gammas, self.prediction_type = gammas, prediction_type

    def forward(self, sample, timestep):
        g = np.interp(timestep.double().numpy(), np.arange(len(self.gammas)), self.gammas)
        ab = np.array([vp_coefficients(float(x)) for x in g])
        a = torch.as_tensor(ab[:, 0]).reshape(-1, 1, 1, 1)
        s = torch.as_tensor(ab[:, 1]).reshape(-1, 1, 1, 1)
        x0, eps = posterior_means(sample, a, s, self.mu, self.s2)
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}
        return SimpleNamespace(sample=out[self.prediction_type])


@pytest.mark.parametrize(
    "prediction_type,scheduler",
    [
        ("epsilon", "ddpm-linear"),
        ("v_prediction", "ddim-cosine"),
        ("sample", "ddpm-scaled_linear"),
        ("epsilon", "ddpm-trained_betas"),
    ],
)
def test_exact_predictor_gives_the_closed_form_likelihood(prediction_type, scheduler):
    kind, betas = scheduler.split("-")
    kw: dict = {"prediction_type": prediction_type}
    if betas == "trained_betas":
        kw["trained_betas"] = np.linspace(1e-4, 0.03, 200) ** 1.5 + 1e-4
    else:
        kw["beta_schedule"] = "squaredcos_cap_v2" if betas == "cosine" else betas
    cls = diffusers.DDIMScheduler if kind == "ddim" else diffusers.DDPMScheduler
    sched = cls(**kw)
    gam = reference_gammas(sched)
    mu, s2 = gaussian_data((1, 2, 2))
    model = idode.adapters.from_diffusers(ExactGaussianUNet(mu, s2, gam, prediction_type), sched)
    start, end = vp_coefficients(gam[0]), vp_coefficients(gam[-1])
    x = sample_marginal(mu, s2, *start, n=3)
    ll = idode.log_likelihood(model, torch.as_tensor(x), "exact", rtol=1e-8, atol=1e-8)
    exact = truncated_flow_log_density(x, mu, s2, start, end, prior_var=end[1] ** 2)
    np.testing.assert_allclose(ll.logp.numpy(), exact, rtol=0, atol=2e-5)


def test_exact_predictor_bits_per_dim_against_the_exact_value():
    """Truncated-normal bits/dim of each draw: -(log p_model(z) - log q(z)) / (d ln 2), with the
    model's closed-form log-density at the replayed dequantization draw z."""
    sched = diffusers.DDPMScheduler()
    gam = reference_gammas(sched)
    mu = np.zeros((1, 2, 2))
    s2 = np.full((1, 2, 2), 0.3)
    model = idode.adapters.from_diffusers(ExactGaussianUNet(mu, s2, gam, "epsilon"), sched)
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (6, 1, 2, 2), generator=gen)
    res = idode.bits_per_dim(
        model,
        k,
        256,
        divergence="exact",
        analytic_entropy=False,
        rtol=1e-7,
        atol=1e-7,
        generator=torch.Generator().manual_seed(1),
    )
    # replay the same draws: z = alpha_min c(k) + sigma_min eps with the same generator
    dq = idode.dequantize(
        "truncated_normal", k, 256, model.schedule, generator=torch.Generator().manual_seed(1)
    )
    start, end = vp_coefficients(gam[0]), vp_coefficients(gam[-1])
    logp = truncated_flow_log_density(dq.z.numpy(), mu, s2, start, end, prior_var=end[1] ** 2)
    expected = -(logp - dq.log_q.numpy()) / (4 * math.log(2))
    np.testing.assert_allclose(res.bpd.numpy(), expected, rtol=0, atol=1e-5)


def test_learned_variance_uses_the_first_channels():
    unet = tiny_diffusers_unet(out_channels=2)
    sched = diffusers.DDPMScheduler(variance_type="learned_range")
    model = idode.adapters.from_diffusers(unet, sched)
    z = torch.randn(2, 1, 8, 8)
    i = 300
    g = torch.full((2,), reference_gammas(sched)[i], dtype=torch.float64)
    with torch.no_grad():
        out = unet(z, torch.full((2,), i)).sample
        eps = model.eps_hat(z, g)
    assert out.shape[1] == 2 and eps.shape == z.shape
    torch.testing.assert_close(eps, out[:, :1], rtol=1e-4, atol=1e-5)


def test_zero_terminal_snr_is_clipped_with_a_warning():
    sched = diffusers.DDPMScheduler(rescale_betas_zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) == 0.0
    with pytest.warns(UserWarning, match=r"zero terminal SNR.*timestep 998"):
        model = idode.adapters.from_diffusers(RecordingUNet(), sched)
    gam = reference_gammas(sched)
    assert model.schedule.gamma_max == pytest.approx(gam[998], abs=1e-9)
    assert math.isfinite(model.schedule.sigma2_max)


def test_no_warning_for_an_ordinary_schedule_and_clear_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idode.adapters.from_diffusers(RecordingUNet(), diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="unknown prediction_type"):
        idode.adapters.from_diffusers(
            RecordingUNet(), diffusers.DDPMScheduler(), prediction_type="score"
        )
    with pytest.raises(TypeError, match="alphas_cumprod"):
        idode.adapters.from_diffusers(RecordingUNet(), object())
    learned = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        time_embedding_type="learned",
        num_train_timesteps=1000,
    )
    with pytest.raises(ValueError, match="fractional timesteps"):
        idode.adapters.from_diffusers(learned, diffusers.DDPMScheduler())
