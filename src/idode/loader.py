"""The resumable in-memory loader of integer images, and the cifar10_aug augmentation.

Batches stay integer grey levels [B, C, H, W] (uint8, or int32 when L > 256); the model scales
them with ``idode.bin_centers``. The loader's (epoch, position) goes into every checkpoint, so
that a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from idode.data import ImageDataset
from idode.validation import InputError

__all__ = ["ImageLoader", "augment_batch", "make_loader"]


def augment_batch(x_int: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The cifar10_aug augmentation (method.md §8.3), independently per image.

    Horizontal flip with p = 1/2 and, independently with p = 1/2, rot90 by k uniform in {1, 2, 3}
    (the code's k = ceil(3u)) over (H, W). x_int: [B, C, H, W] integers (H = W); returns the
    augmented batch (same dtype) and conditioning [B] float32: 1.0 where an augmentation was
    applied, else 0.0. The random draws come from ``generator`` (on its device).
    """
    if x_int.ndim != 4 or x_int.shape[-1] != x_int.shape[-2]:
        raise ValueError(
            f"augment_batch needs square images [B, C, H, H], got {tuple(x_int.shape)}"
        )
    b = x_int.shape[0]
    dev = generator.device if generator is not None else x_int.device
    flip, rot = (torch.rand(2, b, generator=generator, device=dev) < 0.5).to(x_int.device)
    k = torch.randint(1, 4, (b,), generator=generator, device=dev).to(x_int.device)
    flipped = torch.where(flip[:, None, None, None], x_int.flip(-1), x_int)
    out = flipped.clone()
    for r in (1, 2, 3):
        sel = rot & (k == r)
        out[sel] = torch.rot90(flipped[sel], r, dims=(-2, -1))
    return out, (flip | rot).to(torch.float32)


class ImageLoader:
    """Batches of integer images [B, C, H, W] from an in-memory dataset; resumable.

    Epoch e uses the permutation ``torch.randperm(N, generator=seed + e)`` (or 0..N-1 without
    shuffling). Rank r of W takes every W-th index from r. With ``drop_last`` the permutation is
    first cut to a multiple of W and each rank keeps only full batches, so all ranks take the
    same number of steps (training under DDP); without it the ranks cover every example exactly
    once (evaluation), their counts differing by at most one. Iterating runs from the saved
    (epoch, position) to the end of the epoch, then advances the epoch; ``infinite`` goes on
    forever. ``state_dict()`` after consuming a batch resumes at the next one. Use one iterator at
    a time. ``pin_memory`` (when CUDA is available) hands out page-locked batches, so that
    ``batch.to(cuda, non_blocking=True)`` copies while the GPU is still busy with the last step.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.images = images
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.infinite = rank, world_size, infinite
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._epoch, self._position = 0, 0
        self._cache: tuple[int, Tensor] | None = None
        if self.num_batches == 0:
            raise ValueError(
                f"{len(images)} examples give no batch of {batch_size} per rank on {world_size} "
                f"rank(s) with drop_last={drop_last}"
            )

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch (before dropping a last partial batch)."""
        n, w = len(self.images), self.world_size
        return n // w if self.drop_last else len(range(self.rank, n, w))

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank."""
        div = self.num_examples // self.batch_size
        return div if self.drop_last else -(-self.num_examples // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def _indices(self, epoch: int) -> Tensor:
        # this rank's indices for an epoch, cached since an epoch is asked for once per batch
        if self._cache is None or self._cache[0] != epoch:
            n = len(self.images)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(n, generator=g)
            else:
                perm = torch.arange(n)
            if self.drop_last:
                perm = perm[: n - n % self.world_size]
            self._cache = (epoch, perm[self.rank :: self.world_size])
        return self._cache[1]

    def _normalize(self) -> None:
        if self._position >= self.num_batches:
            self._epoch, self._position = self._epoch + 1, 0

    def __iter__(self) -> Iterator[Tensor]:
        self._normalize()
        while True:
            idx, bs = self._indices(self._epoch), self.batch_size
            while self._position < self.num_batches:
                batch = self.images[idx[self._position * bs : (self._position + 1) * bs]]
                self._position += 1
                yield batch.pin_memory() if self.pin_memory else batch
            self._epoch, self._position = self._epoch + 1, 0
            if not self.infinite:
                return

    def state_dict(self) -> dict[str, Any]:
        """(epoch, position) of the next batch, plus the settings a resume must match."""
        epoch, position = self._epoch, self._position
        if position >= self.num_batches:
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_dataset_examples": len(self.images),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` was taken; the settings must match (else a resume would drift)."""
        mine = self.state_dict()
        diff = [k for k in mine if k not in ("epoch", "position") and state.get(k) != mine[k]]
        if diff:
            pairs = ", ".join(f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in diff)
            raise InputError(
                f"the saved data order does not fit this run's data ({pairs}); resume with the "
                f"data and batch settings the run was started with, or start a new run"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    infinite: bool = False,
    pin_memory: bool = False,
) -> ImageLoader:
    """An ``ImageLoader`` over the dataset's integer images (CPU tensors, uint8 or int32)."""
    return ImageLoader(
        dataset.as_tensor(),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        infinite=infinite,
        pin_memory=pin_memory,
    )
