"""The official ScoreUNet (VDM / thu-ml i-DODE ``model_vdm.py``) in numpy, NHWC, float64.

Written from the official formulas, independently of ``idode.convert``: it consumes the nested
Flax parameter tree exactly as the official module names it (``down.block_0/conv1/kernel`` ...),
so a test can build a tree here, write it in flax's msgpack layout, convert it, and compare the
converted PyTorch network's output with ``score_unet`` below.
"""

from __future__ import annotations

import numpy as np

GROUPS, GN_EPS = 32, 1e-6  # flax.linen.GroupNorm defaults
FOURIER_FREQS = (6, 7)  # Base2FourierFeatures(start=6, stop=8, step=1)


# --- layers -------------------------------------------------------------------------------------
def swish(x):
    return x / (1.0 + np.exp(-x))


def dense(p, x):
    """nn.Dense: x [..., in] @ kernel (in, out) + bias."""
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def conv3x3(p, x):
    """nn.Conv(kernel (3, 3, in, out), stride 1, SAME) on NHWC x: a cross-correlation."""
    k = p["kernel"]
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((b, h, w, k.shape[3]))
    for di in range(3):
        for dj in range(3):
            y += xp[:, di : di + h, dj : dj + w, :] @ k[di, dj]
    return y + p["bias"]


def group_norm(p, x, groups=GROUPS, eps=GN_EPS):
    """flax GroupNorm on NHWC: contiguous channel groups, var = E[x^2] - E[x]^2 as flax computes."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = (g * g).mean(axis=(1, 2, 4), keepdims=True) - mean * mean
    y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return y * p["scale"] + p["bias"]


def timestep_embedding(t, dim):
    """get_timestep_embedding: t * 1000, half = dim // 2 log-spaced frequencies, [sin, cos]."""
    t = t * 1000.0
    half = dim // 2
    freqs = np.exp(np.arange(half) * -(np.log(10000.0) / (half - 1)))
    arg = t[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_features(z):
    """Base2FourierFeatures(6, 8): tile w over channels, repeat z per frequency, [sin, cos]."""
    w = 2.0 ** np.asarray(FOURIER_FREQS, dtype=np.float64) * 2 * np.pi
    w = np.tile(w[None, :], (1, z.shape[-1]))  # [1, C*F]: w6, w7, w6, w7, ...
    h = np.repeat(z, len(FOURIER_FREQS), axis=-1) * w  # z0 w6, z0 w7, z1 w6, ...
    return np.concatenate([np.sin(h), np.cos(h)], axis=-1)


def resnet_block(p, x, cond, out_ch):
    h = conv3x3(p["conv1"], swish(group_norm(p["GroupNorm_0"], x)))
    h = h + dense(p["cond_proj"], cond)[:, None, None, :]
    h = conv3x3(p["conv2"], swish(group_norm(p["GroupNorm_1"], h)))
    if x.shape[-1] != out_ch:
        x = dense(p["nin_shortcut"], x)
    return x + h


def attn_block(p, x):
    b, hh, ww, c = x.shape
    h = group_norm(p["GroupNorm_0"], x)
    q, k, v = (dense(p[n], h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    logits = (q / np.sqrt(c)) @ k.transpose(0, 2, 1)  # [B, HW, HW]
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    h = (weights @ v).reshape(b, hh, ww, c)
    return x + dense(p["proj_out"], h)


# --- the network --------------------------------------------------------------------------------
def score_unet(params, z, g_t, conditioning, *, n_embd, n_layers, with_attention, fourier,
               gamma_min=-13.3, gamma_max=5.0):  # fmt: skip
    """ScoreUNet.__call__: z [B, H, W, C] NHWC, g_t [B], conditioning [B] -> [B, H, W, C]."""
    z = np.asarray(z, np.float64)
    t = (np.asarray(g_t, np.float64) - gamma_min) / (gamma_max - gamma_min)
    temb = timestep_embedding(t, n_embd)
    cond = np.concatenate([temb, np.asarray(conditioning, np.float64)[:, None]], axis=1)
    cond = swish(dense(params["dense0"], cond))
    cond = swish(dense(params["dense1"], cond))
    h = np.concatenate([z, fourier_features(z)], axis=-1) if fourier else z
    hs = [conv3x3(params["conv_in"], h)]
    for i in range(n_layers):
        h = resnet_block(params[f"down.block_{i}"], hs[-1], cond, n_embd)
        if with_attention:
            h = attn_block(params[f"down.attn_{i}"], h)
        hs.append(h)
    h = hs[-1]
    h = resnet_block(params["mid.block_1"], h, cond, h.shape[-1])
    h = attn_block(params["mid.attn_1"], h)
    h = resnet_block(params["mid.block_2"], h, cond, h.shape[-1])
    for i in range(n_layers + 1):
        h = resnet_block(params[f"up.block_{i}"], np.concatenate([h, hs.pop()], -1), cond, n_embd)
        if with_attention:
            h = attn_block(params[f"up.attn_{i}"], h)
    assert not hs
    h = swish(group_norm(params["GroupNorm_0"], h))
    return conv3x3(params["conv_out"], h) + z


# --- a random parameter tree in the official layout ----------------------------------------------
def random_params(rng, in_ch, n_embd, n_layers, with_attention, fourier, out_scale=1.0):
    """A tree with the official module's names and shapes, every leaf random (float32).

    Layers the official code zero-initialises get random values too, so each one is exercised;
    ``out_scale`` scales conv_out (small: a gentle network for ODE solves).
    """
    f32 = np.float32

    def w(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(f32)

    def vec(c, mean=0.0, scale=0.1):
        return (mean + scale * rng.standard_normal(c)).astype(f32)

    def dense_p(cin, cout, bias=True):
        p = {"kernel": w(cin, cout, fan_in=cin)}
        if bias:
            p["bias"] = vec(cout)
        return p

    def conv_p(cin, cout, scale=1.0):
        return {"kernel": scale * w(3, 3, cin, cout, fan_in=9 * cin), "bias": vec(cout)}

    def norm_p(c):
        return {"scale": vec(c, 1.0, 0.2), "bias": vec(c)}

    def resnet_p(cin, n):
        p = {
            "GroupNorm_0": norm_p(cin),
            "conv1": conv_p(cin, n),
            "cond_proj": dense_p(4 * n, n, bias=False),
            "GroupNorm_1": norm_p(n),
            "conv2": conv_p(n, n, 0.5),
        }
        if cin != n:
            p["nin_shortcut"] = dense_p(cin, n)
        return p

    def attn_p(n):
        return {"GroupNorm_0": norm_p(n), **{k: dense_p(n, n) for k in ("q", "k", "v")},
                "proj_out": dense_p(n, n)}  # fmt: skip

    n = n_embd
    c_feat = in_ch * (1 + 2 * len(FOURIER_FREQS)) if fourier else in_ch
    p = {"dense0": dense_p(n + 1, 4 * n), "dense1": dense_p(4 * n, 4 * n)}
    p["conv_in"] = conv_p(c_feat, n)
    for i in range(n_layers):
        p[f"down.block_{i}"] = resnet_p(n, n)
        if with_attention:
            p[f"down.attn_{i}"] = attn_p(n)
    p["mid.block_1"], p["mid.attn_1"], p["mid.block_2"] = resnet_p(n, n), attn_p(n), resnet_p(n, n)
    for i in range(n_layers + 1):
        p[f"up.block_{i}"] = resnet_p(2 * n, n)
        if with_attention:
            p[f"up.attn_{i}"] = attn_p(n)
    p["GroupNorm_0"] = norm_p(n)
    p["conv_out"] = conv_p(n, in_ch, out_scale)
    return p


def train_state(params, ema_params, step, gamma=None):
    """flax to_state_dict of the official TrainState: step, params, ema_params, opt_state.

    opt_state is optax adamw's chain state ((ScaleByAdamState(count, mu, nu), ...) as flax writes
    tuples and namedtuples: maps keyed "0", "1", ... and by field name).
    """

    def wrap(tree):
        out = {"score_model": tree}
        if gamma is not None:
            out["gamma"] = {k: np.asarray(v, np.float32).reshape(1) for k, v in gamma.items()}
        return out

    def zeros_like(tree):
        return {k: zeros_like(v) if isinstance(v, dict) else np.zeros_like(v)
                for k, v in tree.items()}  # fmt: skip

    raw = wrap(params)
    adam = {"count": np.asarray(step, np.int32), "mu": zeros_like(raw), "nu": zeros_like(raw)}
    return {
        "step": np.asarray(step, np.int32),  # a replicated jax int32 scalar, unreplicated
        "params": raw,
        "ema_params": wrap(ema_params),
        "opt_state": {"0": adam, "1": {}, "2": {}},
    }
