"""A tiny real labeled dataset as image folders: scikit-learn's handwritten digits.

``write_digits(root)`` writes the 1797 8x8 digits (upscaled, as RGB PNGs) into

    root/train/<class>/NNNN.png     labeled set T
    root/unlabeled/NNNN.png         unlabeled set U (labels withheld)
    root/val/<class>/NNNN.png       validation set V

with a fixed, class-stratified split; it is what the tests and `ssld demo` train on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CLASSES = [str(i) for i in range(10)]


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 8, 8) in 0..255, labels int (n,)) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def write_digits(
    root: str | os.PathLike,
    size: int = 32,
    fractions: tuple[float, float, float] = (0.4, 0.4, 0.2),
    seed: int = 0,
) -> dict:
    """Write T / U / V folders under ``root`` (fractions of every class); returns the paths
    and counts. Idempotent: existing files are overwritten with identical content."""
    import cv2

    images, labels = load_digits_array()
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "unlabeled": 0, "val": 0}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_t = int(round(fractions[0] * len(idx)))
        n_u = int(round(fractions[1] * len(idx)))
        parts = {"train": idx[:n_t], "unlabeled": idx[n_t : n_t + n_u], "val": idx[n_t + n_u :]}
        for split, ids in parts.items():
            folder = root / split if split == "unlabeled" else root / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                img = cv2.resize(images[i], (size, size), interpolation=cv2.INTER_CUBIC)
                cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
            counts[split] += len(ids)
    return {
        "train": root / "train",
        "unlabeled": root / "unlabeled",
        "val": root / "val",
        "counts": counts,
    }
