"""Tests for idode.loader: the cifar10_aug augmentation and the resumable loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idode.data import ImageDataset
from idode.loader import ImageLoader, augment_batch, make_loader

# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def test_augment_batch_distribution_and_conditioning() -> None:
    b = 4000
    img = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(1, 2, 4, 4)  # no symmetry at all
    x = img.expand(b, -1, -1, -1).contiguous()
    out, cond = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and cond.dtype == torch.float32 and cond.shape == (b,)
    # the 8 outcomes rot90^j(hflip^f(x)); all distinct for this image
    outcomes = {
        (f, j): torch.rot90(img.flip(-1) if f else img, j, dims=(-2, -1))[0]
        for f in (0, 1)
        for j in range(4)
    }
    counts = dict.fromkeys(outcomes, 0)
    for i in range(b):
        match = [key for key, o in outcomes.items() if torch.equal(out[i], o)]
        assert len(match) == 1
        counts[match[0]] += 1
        assert cond[i] == float(match[0] != (0, 0))  # conditioning <=> the image changed
    frac = {k: v / b for k, v in counts.items()}
    assert abs(sum(v for (f, _), v in frac.items() if f) - 0.5) < 0.04  # reflected half the time
    assert abs(frac[(0, 0)] - 0.25) < 0.03  # untouched: no flip and no rotation
    assert abs(frac[(1, 0)] - 0.25) < 0.03  # the pure horizontal flip (along W)
    for j in (1, 2, 3):
        assert abs(frac[(0, j)] - 1 / 12) < 0.02
    # deterministic given the generator
    out2, cond2 = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, out2) and torch.equal(cond, cond2)
    with pytest.raises(ValueError, match="square"):
        augment_batch(torch.zeros(2, 1, 4, 6, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------


def _ids_dataset(n: int) -> ImageDataset:
    """Image i has every pixel equal to i, so a batch reveals its indices."""
    x = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None, None, None], (n, 1, 2, 2))
    return ImageDataset(np.ascontiguousarray(x).astype(np.int32), n, "npz", "train")


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def test_loader_epochs_deterministic_and_complete() -> None:
    ds = _ids_dataset(23)
    loader = make_loader(ds, 5, shuffle=True, seed=7, drop_last=False)
    assert len(loader) == 5
    e0 = [_ids(b) for b in loader]
    e1 = [_ids(b) for b in loader]  # the next pass is the next epoch: a fresh permutation
    assert sorted(sum(e0, [])) == list(range(23)) and [len(b) for b in e0] == [5, 5, 5, 5, 3]
    assert e0 != e1 and sorted(sum(e1, [])) == list(range(23))
    again = make_loader(ds, 5, shuffle=True, seed=7, drop_last=False)
    assert [_ids(b) for b in again] == e0
    ordered = make_loader(ds, 10, shuffle=False, seed=0, drop_last=True)
    assert [_ids(b) for b in ordered] == [list(range(10)), list(range(10, 20))]
    batch = next(iter(ordered))
    assert batch.dtype == torch.int32 and batch.shape == (10, 1, 2, 2)


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_shards_are_disjoint(drop_last: bool) -> None:
    ds, w = _ids_dataset(50), 3
    seen = []
    for rank in range(w):
        loader = make_loader(
            ds, 4, shuffle=True, seed=1, drop_last=drop_last, rank=rank, world_size=w
        )
        seen.append(sum((_ids(b) for b in loader), []))
    flat = sum(seen, [])
    assert len(flat) == len(set(flat))  # disjoint
    if drop_last:
        assert all(len(s) == 16 for s in seen)  # 16 = 4 full batches of 4 from 50 // 3 = 16
    else:
        assert sorted(flat) == list(range(50))  # every example exactly once


def test_loader_resume_gives_the_same_batches() -> None:
    ds = _ids_dataset(30)
    kw = dict(shuffle=True, seed=11, drop_last=True, infinite=True)
    reference = make_loader(ds, 4, **kw)
    it = iter(reference)
    ref = [_ids(next(it)) for _ in range(40)]  # 7 batches per epoch: crosses several epochs
    for stop in (3, 7, 13):
        first = make_loader(ds, 4, **kw)
        it = iter(first)
        got = [_ids(next(it)) for _ in range(stop)]
        state = first.state_dict()
        resumed = make_loader(ds, 4, **kw)
        resumed.load_state_dict(state)
        it = iter(resumed)
        got += [_ids(next(it)) for _ in range(40 - stop)]
        assert got == ref, stop
    assert make_loader(ds, 4, **kw).state_dict()["epoch"] == 0
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 5, **kw).load_state_dict(state)


def test_finite_loader_resume_mid_and_end_of_epoch() -> None:
    ds = _ids_dataset(12)
    ref_loader = make_loader(ds, 4, shuffle=True, seed=0, drop_last=True)
    ref = [[_ids(b) for b in ref_loader] for _ in range(3)]
    for stop in (1, 3):  # stop=3 saves after the last batch of epoch 0
        a = make_loader(ds, 4, shuffle=True, seed=0, drop_last=True)
        got = []
        for i, b in enumerate(a):
            got.append(_ids(b))
            if i + 1 == stop:
                break
        resumed = make_loader(ds, 4, shuffle=True, seed=0, drop_last=True)
        resumed.load_state_dict(a.state_dict())
        rest = [_ids(b) for b in resumed]  # what the next `for` over `a` would give
        assert rest == [_ids(b) for b in a]
        if stop == 3:
            assert got == ref[0] and rest == ref[1]
        else:
            assert got + rest == ref[0] and [_ids(b) for b in resumed] == ref[1]


def test_loader_rejects_bad_settings() -> None:
    ds = _ids_dataset(5)
    with pytest.raises(ValueError, match="no batch"):
        make_loader(ds, 8, shuffle=False, seed=0, drop_last=True)
    with pytest.raises(ValueError, match="rank"):
        make_loader(ds, 2, shuffle=False, seed=0, drop_last=True, rank=2, world_size=2)


def test_pin_memory_gives_the_same_batches_and_pins_only_with_cuda():
    images = torch.arange(40, dtype=torch.uint8).reshape(10, 1, 2, 2)
    kw = dict(shuffle=True, seed=3, drop_last=True)
    plain = list(ImageLoader(images, 4, **kw))
    pinned_loader = ImageLoader(images, 4, pin_memory=True, **kw)
    pinned = list(pinned_loader)
    assert all(torch.equal(a, b) for a, b in zip(plain, pinned, strict=True))
    assert pinned_loader.pin_memory == torch.cuda.is_available()
    assert all(b.is_pinned() == torch.cuda.is_available() for b in pinned)
