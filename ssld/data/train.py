"""Training data: T (class folders) ∪ U (unlabeled list), deterministic augmentation, and a
resumable distributed sampler.

Augmentation randomness is a pure function of (seed, epoch, sample index), so a sample looks
the same whichever worker, process or resumed run decodes it; the sample order is a pure
function of (seed, epoch), so a run resumed at step s sees exactly the batches an
uninterrupted run would have seen from step s on.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ssld._io import is_image, list_images, read_list
from ssld.data import load_chw


def class_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(relative path, label)]) of a folder with one subfolder per class."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class subfolders")
    items = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if is_image(p):
                items.append((p.relative_to(root).as_posix(), label))
    if not items:
        raise ValueError(f"{root} holds no images")
    return classes, items


def unlabeled_list(path: str | os.PathLike, root=None) -> tuple[Path, list[str]]:
    """(root, relative paths) of U: an `ssld select` CSV (column ``path``), a text list of
    paths, or a folder of images."""
    path = Path(path)
    if path.is_dir():
        return (Path(root) if root else path), list_images(path)
    base = Path(root) if root else path.parent
    with open(path, newline="") as f:
        first = f.readline()
    if first.strip().split(",")[0] == "path":
        with open(path, newline="") as f:
            paths = [row["path"] for row in csv.DictReader(f)]
    else:
        paths = read_list(path)
    if not paths:
        raise ValueError(f"{path} lists no images")
    return base, paths


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(size, scale=(min_scale, 1), ratio=(3/4, 4/3)) + horizontal flip,
    drawn from a generator seeded by (seed, epoch, index); uint8 RGB out."""

    size: int = 224
    min_scale: float = 0.08
    hflip: bool = True
    seed: int = 0

    def params(self, h: int, w: int, epoch: int, index: int):
        """(y, x, ch, cw, flip) of the crop, as torchvision's RandomResizedCrop draws it."""
        rng = np.random.default_rng([self.seed, epoch, index])
        area = h * w
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(self.min_scale, 1.0)
            ratio = math.exp(rng.uniform(*log_ratio))
            cw = round(math.sqrt(target * ratio))
            ch = round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                y = int(rng.integers(0, h - ch + 1))
                x = int(rng.integers(0, w - cw + 1))
                return y, x, ch, cw, bool(self.hflip and rng.random() < 0.5)
        # fallback: central crop at the clamped aspect ratio
        in_ratio = w / h
        if in_ratio < 3 / 4:
            cw, ch = w, round(w / (3 / 4))
        elif in_ratio > 4 / 3:
            ch, cw = h, round(h * (4 / 3))
        else:
            cw, ch = w, h
        ch, cw = min(ch, h), min(cw, w)
        return (h - ch) // 2, (w - cw) // 2, ch, cw, bool(self.hflip and rng.random() < 0.5)

    def __call__(self, rgb: np.ndarray, epoch: int, index: int) -> np.ndarray:
        import cv2

        y, x, ch, cw, flip = self.params(rgb.shape[0], rgb.shape[1], epoch, index)
        out = cv2.resize(
            rgb[y : y + ch, x : x + cw], (self.size, self.size), interpolation=cv2.INTER_LINEAR
        )
        return out[:, ::-1] if flip else out


class TeacherRows(NamedTuple):
    """Cached teacher rows (:mod:`ssld.train.teacher_cache`): of one item's view, or of a
    batch (stacked); ``probs``/``ids`` are zeros where not ``filled``."""

    filled: bool | torch.Tensor  # bool, or bool (N,)
    probs: torch.Tensor  # (m,) or (N, m) in the cache dtype, top-m decreasing
    ids: torch.Tensor  # int32, their class ids


class Batch(NamedTuple):
    """One item of a :class:`TrainSet` (or synthetic data), or a batch of them: a
    DataLoader collates these into a Batch of tensors."""

    images: torch.Tensor  # uint8 (3, S, S), or (N, 3, S, S)
    labels: int | torch.Tensor  # class, -1 for U
    ok: bool | torch.Tensor  # False: an unreadable file (zero image, masked out of the loss)
    index: int | torch.Tensor | None  # position in the TrainSet (None: synthetic data)

    @property
    def cached(self) -> TeacherRows | None:
        """No cached teacher rows (see :class:`CachedBatch`)."""
        return None


class CachedBatch(NamedTuple):
    """A :class:`Batch` with the cached teacher rows of its items (a teacher cache is on)."""

    images: torch.Tensor
    labels: int | torch.Tensor
    ok: bool | torch.Tensor
    index: int | torch.Tensor
    cached: TeacherRows


class TrainSet(torch.utils.data.Dataset):
    """T ∪ U: a :class:`Batch` item (image uint8 (3, S, S), label (-1 for U), ok, index) for
    keys ``(index, epoch)``; with a teacher cache reader a :class:`CachedBatch`, whose
    ``cached`` rows (of the item's view) are read in the worker.

    An unreadable file gives a zero image with ok=False (the loss masks it out), so a broken
    file never stops a 360-epoch run. ``replay = R >= 1`` makes epoch e use the crop/flip of
    epoch ``e % R`` (the view; R distinct augmented views per image); 0 turns replay off.
    """

    def __init__(
        self,
        sources: list[tuple[Path, list[str], list[int]]],
        transform,
        replay: int = 0,
        cache=None,
    ):
        self.roots, self.paths, self.labels, self.source = [], [], [], []
        for s, (root, paths, labels) in enumerate(sources):
            self.roots.append(Path(root))
            self.paths += paths
            self.labels += labels
            self.source += [s] * len(paths)
        self.transform = transform
        self.replay = replay
        self.cache = cache  # an object with read(index, view) -> TeacherRows, or None

    def __len__(self) -> int:
        return len(self.paths)

    def view(self, epoch: int) -> int:
        """The augmentation epoch (view) of ``epoch``: ``epoch % replay`` when replaying."""
        return epoch % self.replay if self.replay else epoch

    def image(self, index: int, epoch: int) -> tuple[torch.Tensor, bool]:
        """(uint8 (3, S, S), ok) of one image as epoch ``epoch`` augments it."""
        view = self.view(epoch)
        return load_chw(
            self.roots[self.source[index]] / self.paths[index],
            lambda rgb: self.transform(rgb, view, index),
            self.transform.size,
        )

    def __getitem__(self, key):
        index, epoch = key
        img, ok = self.image(index, epoch)
        if self.cache is None:
            return Batch(img, self.labels[index], ok, index)
        return CachedBatch(
            img, self.labels[index], ok, index, self.cache.read(index, self.view(epoch))
        )


class ResumableSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)`` keys of this rank's share of one epoch, from a start step.

    Epoch e uses ``randperm(n)`` from a generator seeded with (seed, e); the permutation is
    cut to a whole number of global batches (``drop_last``), global batch b is
    ``perm[b * B : (b + 1) * B]`` and rank r takes its elements ``r::world``. ``start_batch``
    skips the batches already trained on (resume).
    """

    def __init__(self, n: int, global_batch: int, world: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by {world} processes")
        if n < global_batch:
            raise ValueError(
                f"the training set has {n} images, fewer than one batch of {global_batch}"
            )
        self.n, self.B, self.world, self.rank, self.seed = n, global_batch, world, rank, seed
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.B

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.B // self.world)

    def _perm(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self):
        perm = self._perm()[: self.batches_per_epoch * self.B]
        mine = perm.view(-1, self.B)[self.start_batch :, self.rank :: self.world].reshape(-1)
        for i in mine.tolist():
            yield (i, self.epoch)

    def dropped(self) -> list[int]:
        """This rank's share of the indices the current epoch leaves out (``drop_last``)."""
        return self._perm()[self.batches_per_epoch * self.B :][self.rank :: self.world].tolist()
