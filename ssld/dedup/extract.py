"""SIFT extraction into packed, resumable shards.

Every image of a folder is decoded with OpenCV, resized so its longest side is at most
``max_side``, and described by the ``max_keypoints`` strongest SIFT keypoints (optionally
RootSIFT, optionally also its horizontal mirror, since SIFT is not flip invariant). Images
are processed in shards of ``shard_size``; each shard is one ``.npz`` written atomically
(temporary file + rename), so an interrupted run resumes where it stopped and a finished
shard is never rewritten. Unreadable images are skipped and listed, never fatal.

Shard layout (``OUT/shard-00000.npz``)::

    desc     uint8  (N, 128)   descriptors of all entries, packed
    kpts     float32 (N, 4)    x, y, size in full-resolution pixels (of the mirror for
                               flipped entries), angle in degrees
    offsets  int64  (E + 1,)   entry e owns desc[offsets[e]:offsets[e+1]]
    image    int64  (E,)       index into OUT/images.txt
    flipped  bool   (E,)       entry describes the mirrored image
    failed   int64  (F,)       indices of images that could not be read

``OUT/manifest.json`` records the configuration and the image count; resuming with another
configuration or another image list is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class ExtractConfig:
    max_side: int = 640
    max_keypoints: int = 512
    root_sift: bool = False
    flip: bool = False
    shard_size: int = 1000

    def __post_init__(self):
        for name in ("max_side", "max_keypoints", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files below ``root`` as sorted POSIX paths relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _sift():
    import cv2

    return cv2.SIFT_create()


def describe(image_bgr: np.ndarray, cfg: ExtractConfig, sift=None):
    """(kpts float32 (n, 4), desc uint8 (n, 128)) of one decoded image, strongest first."""
    import cv2

    gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY) if image_bgr.ndim == 3 else image_bgr
    h, w = gray.shape
    scale = min(1.0, cfg.max_side / max(h, w))
    if scale < 1.0:
        gray = cv2.resize(
            gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    sift = sift or _sift()
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or not keypoints:
        return np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8)
    # strongest first; ties broken by position so the order is deterministic
    order = sorted(range(len(keypoints)), key=lambda i: (-keypoints[i].response, keypoints[i].pt))
    order = order[: cfg.max_keypoints]
    kpts = np.array(
        [
            (
                keypoints[i].pt[0] / scale,
                keypoints[i].pt[1] / scale,
                keypoints[i].size / scale,
                keypoints[i].angle,
            )
            for i in order
        ],
        dtype=np.float32,
    ).reshape(-1, 4)
    d = desc[order].astype(np.float32)
    if cfg.root_sift:  # Arandjelovic & Zisserman: L1-normalise, square root; scaled to uint8
        d = np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-12)) * 255.0
    return kpts, np.clip(np.rint(d), 0, 255).astype(np.uint8)


def _describe_file(args):
    path, cfg = args
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        return None
    out = [(False, *describe(image, cfg))]
    if cfg.flip:
        out.append((True, *describe(cv2.flip(image, 1), cfg)))
    return out


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.npz"


def extract(
    root: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ExtractConfig = ExtractConfig(),
    *,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Extract SIFT of every image below ``root`` into shards under ``out``; resumable.

    Returns a summary: images, shards written now / reused, failed image paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = list_images(root)
    manifest = {"config": asdict(cfg), "images": len(images), "root": str(Path(root).resolve())}
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old.get("config") != manifest["config"] or old.get("images") != len(images):
            raise ValueError(
                f"{out} holds features of another configuration or image list "
                f"({old.get('config')}, {old.get('images')} images); use a new --out"
            )
        listed = (out / "images.txt").read_text().splitlines()
        if listed != images:
            raise ValueError(f"{out}/images.txt differs from the images below {root}")
    else:
        _atomic_write_text(out / "images.txt", "\n".join(images) + ("\n" if images else ""))
        _atomic_write_text(mpath, json.dumps(manifest, indent=1))
    n_shards = (len(images) + cfg.shard_size - 1) // cfg.shard_size
    todo = [s for s in range(n_shards) if not _shard_path(out, s).exists()]

    def shard_range(s):
        return range(s * cfg.shard_size, min(len(images), (s + 1) * cfg.shard_size))

    bar = _progress(sum(len(shard_range(s)) for s in todo), progress)
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    try:
        for s in todo:
            idx = shard_range(s)
            jobs = [(str(Path(root) / images[i]), cfg) for i in idx]
            results: Iterable = (
                pool.map(_describe_file, jobs, chunksize=8) if pool else map(_describe_file, jobs)
            )
            _write_shard(_shard_path(out, s), idx, results, bar)
    finally:
        if pool:
            pool.shutdown()
        if bar is not None:
            bar.close()
    all_failed = sorted(
        {images[i] for s in range(n_shards) for i in np.load(_shard_path(out, s))["failed"]}
    )
    _atomic_write_text(out / "failed.txt", "\n".join(all_failed) + ("\n" if all_failed else ""))
    return {"images": len(images), "shards": n_shards, "written": len(todo), "failed": all_failed}


def _write_shard(path, idx, results, bar):
    desc, kpts, offsets, image, flipped, bad = [], [], [0], [], [], []
    for i, res in zip(idx, results):
        if bar is not None:
            bar.update(1)
        if res is None:
            bad.append(i)
            continue
        for is_flip, k, d in res:
            desc.append(d)
            kpts.append(k)
            offsets.append(offsets[-1] + len(d))
            image.append(i)
            flipped.append(is_flip)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        desc=np.concatenate(desc) if desc else np.zeros((0, 128), np.uint8),
        kpts=np.concatenate(kpts) if kpts else np.zeros((0, 4), np.float32),
        offsets=np.asarray(offsets, np.int64),
        image=np.asarray(image, np.int64),
        flipped=np.asarray(flipped, bool),
        failed=np.asarray(bad, np.int64),
    )
    os.replace(tmp, path)


def load_features(out: str | os.PathLike):
    """All shards of ``out`` concatenated: dict of desc, kpts, offsets, image, flipped, images."""
    out = Path(out)
    images = (out / "images.txt").read_text().splitlines()
    manifest = json.loads((out / "manifest.json").read_text())
    n_shards = (manifest["images"] + manifest["config"]["shard_size"] - 1) // manifest["config"][
        "shard_size"
    ]
    parts = []
    for s in range(n_shards):
        p = _shard_path(out, s)
        if not p.exists():
            raise FileNotFoundError(
                f"{p} is missing: the extraction did not finish (run it again to resume)"
            )
        parts.append(np.load(p))
    base = 0
    offsets = [np.zeros(1, np.int64)]
    for z in parts:
        offsets.append(z["offsets"][1:] + base)
        base += len(z["desc"])
    cat = lambda key, empty: np.concatenate([z[key] for z in parts]) if parts else empty  # noqa: E731
    return {
        "desc": cat("desc", np.zeros((0, 128), np.uint8)),
        "kpts": cat("kpts", np.zeros((0, 4), np.float32)),
        "offsets": np.concatenate(offsets),
        "image": cat("image", np.zeros(0, np.int64)),
        "flipped": cat("flipped", np.zeros(0, bool)),
        "images": images,
    }


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _progress(total, enabled):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="sift", unit="img", leave=False)
