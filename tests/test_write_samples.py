import numpy as np
import pytest
import torch
from matplotlib.image import imread

from idode.write_samples import sample_to_files, save_image_grid

FAST = dict(rtol=1e-3, atol=1e-3, device="cpu", progress=False)


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return trained_run  # conftest's shared run: read only


def test_sample_to_files_writes_npz_and_png(ckpt, tmp_path):
    res = sample_to_files(ckpt, tmp_path / "out" / "samples", 7, batch_size=4, **FAST)
    assert res["npz"] == tmp_path / "out" / "samples.npz"
    assert res["png"] == tmp_path / "out" / "samples.png"
    with np.load(res["npz"]) as f:
        x, levels, nfe = f["samples"], int(f["num_levels"]), int(f["nfe"])
    assert x.shape == (7, 1, 8, 8) and x.dtype == np.uint8
    assert levels == 17 and 0 <= x.min() and x.max() < 17
    assert nfe == res["nfe"] == sum(res["nfe_per_batch"]) and len(res["nfe_per_batch"]) == 2
    img = imread(res["png"])
    assert img.ndim == 3 and img.shape[0] >= 64 and img.shape[1] >= 64
    # sample i comes from its own noise: the batch size does not change it (up to rounding)
    again = sample_to_files(ckpt, tmp_path / "again", 7, batch_size=7, **FAST)
    with np.load(again["npz"]) as f:
        assert np.mean(f["samples"] != x) < 0.01
    other = sample_to_files(ckpt, tmp_path / "other", 7, batch_size=7, seed=1, **FAST)
    with np.load(other["npz"]) as f:
        assert np.mean(f["samples"] != x) > 0.1


def test_save_image_grid(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4, 4))
    p = save_image_grid(torch.from_numpy(rgb), 256, tmp_path / "rgb.png", nrow=2, title="rgb")
    assert imread(p).shape[-1] in (3, 4)
    grey = np.arange(4 * 8 * 8).reshape(4, 8, 8) % 17  # [N, H, W] is one channel
    assert save_image_grid(grey, 17, tmp_path / "grey.png").exists()
    with pytest.raises(ValueError, match="C in"):
        save_image_grid(np.zeros((2, 2, 4, 4), dtype=int), 17, tmp_path / "bad.png")
