"""The low I/O layer every stage imports (and which imports no ``ssld`` package): image
files (listing, reading, lists of paths), atomic file writes, optional progress bars and
plotting. OpenCV, tqdm and matplotlib are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# ---- image files ----


def is_image(path: Path) -> bool:
    """A file whose extension is one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files below ``root`` as sorted POSIX paths relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if is_image(p))


def read_list(path: str | os.PathLike) -> list[str]:
    """Non-empty, non-comment lines of a text file of image paths."""
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def read_bgr(path: str | os.PathLike) -> np.ndarray | None:
    """HWC uint8 BGR (OpenCV's order, EXIF orientation applied), or None when the file cannot
    be decoded (OpenCV raises instead of returning None for some files, e.g. headers claiming
    more than 2^30 pixels: those count as undecodable too)."""
    import cv2

    try:
        return cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def read_rgb(path: str | os.PathLike) -> np.ndarray | None:
    """HWC uint8 RGB, or None when the file cannot be decoded."""
    import cv2

    img = read_bgr(path)
    if img is None:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def opencv_fork_safe() -> None:
    """Stop OpenCV's thread pool in this process before it forks workers.

    The pool's threads are not copied by fork, but its state is: a forked child that calls
    ``cv2.setNumThreads`` or runs a parallel OpenCV function waits forever for them. So any
    process that has run OpenCV in parallel (a large resize, a fallback decode) would hang
    its next DataLoader / process pool. The processes that fork keep OpenCV to one thread:
    their own OpenCV work is light, the workers do the decoding.
    """
    import cv2

    cv2.setNumThreads(1)


# ---- atomic writes ----


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a per-process temporary file next to ``path``, then rename: readers
    (and a resumed run after a kill) see the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def atomic_write_lines(path: str | os.PathLike, lines) -> None:
    atomic_write_text(path, "".join(f"{x}\n" for x in lines))


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """``np.savez(path, **arrays)`` through a per-process temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ---- optional extras ----


def progress_bar(total: int, enabled: bool, desc: str, unit: str, **kwargs):
    """A tqdm bar, or None when disabled, empty, or tqdm is missing."""
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, **kwargs)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
