"""Image lists, decoding in DataLoader workers, normalisation on the device.

Workers decode with OpenCV and return uint8 (3, S, S) RGB tensors (4x less host->device
traffic than float); :class:`Normalize` turns a batch into a normalised float
channels-last tensor on the device. An unreadable image becomes a zero image with
``ok = False``, so batch composition never depends on which files are broken.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssld._io import opencv_fork_safe, read_rgb
from ssld._io import read_bgr as read_bgr  # importable from here as before
from ssld._io import read_list as read_list

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``round(input_size / crop_pct)``, centre-crop
    ``input_size`` (the ImageNet evaluation policy: 256 -> 224)."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not isinstance(self.input_size, int) or self.input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        interp = {
            "bilinear": cv2.INTER_LINEAR,
            "bicubic": cv2.INTER_CUBIC,
            "area": cv2.INTER_AREA,
            "nearest": cv2.INTER_NEAREST,
        }[self.interpolation]
        size = self.input_size
        short = max(size, round(size / self.crop_pct))
        h, w = rgb.shape[:2]
        scale = short / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
        y, x = (nh - size) // 2, (nw - size) // 2
        return rgb[y : y + size, x : x + size]


def load_chw(path, transform, size: int) -> tuple[torch.Tensor, bool]:
    """(uint8 (3, size, size) tensor of ``transform(rgb)``, ok); a file that cannot be decoded
    or transformed gives zeros and ok=False."""
    rgb = read_rgb(path)
    ok = rgb is not None
    if ok:
        try:
            rgb = transform(rgb)
        except Exception:  # noqa: BLE001 - degenerate images (0-sized...) count as bad
            ok = False
    if not ok:
        return torch.zeros(3, size, size, dtype=torch.uint8), False
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), True


class ImageList(torch.utils.data.Dataset):
    """Items ``(image uint8 (3, S, S), index int64, ok bool)`` for ``paths`` below ``root``.

    ``indices`` (optional) are the global ids returned with each item (default 0..n-1).
    """

    def __init__(self, paths, root, transform: EvalTransform, indices=None):
        self.paths = list(paths)
        self.root = Path(root)
        self.transform = transform
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)
        if len(self.indices) != len(self.paths):
            raise ValueError("indices must have one entry per path")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        img, ok = load_chw(self.root / self.paths[i], self.transform, self.transform.input_size)
        return img, self.indices[i], ok


class Normalize(torch.nn.Module):
    """uint8 (N, 3, H, W) -> float ((x / 255 - mean) / std), channels_last, on its device."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        mean, std = torch.tensor(mean), torch.tensor(std)
        if mean.shape != (3,) or std.shape != (3,) or bool((std <= 0).any()):
            raise ValueError(f"mean and std must be 3 numbers (std > 0), got {mean}, {std}")
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last).float()
        return torch.addcmul(self.shift, x, self.scale)


def worker_options(workers: int) -> dict:
    """DataLoader arguments for ``workers`` worker processes (``worker_init``), making this
    process safe to fork first (:func:`opencv_fork_safe`)."""
    if workers:
        opencv_fork_safe()
    return dict(num_workers=workers, worker_init_fn=worker_init if workers else None)


def worker_init(_worker_id: int) -> None:
    """DataLoader worker setup: one thread each for OpenCV and torch (the workers are the
    parallelism; nested thread pools only oversubscribe the cores)."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
