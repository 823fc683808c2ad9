"""SIFT extraction into packed, resumable shards.

Every image of a folder is decoded with OpenCV, resized so its longest side is at most
``max_side``, and described by the ``max_keypoints`` strongest SIFT keypoints (optionally
RootSIFT, optionally also its horizontal mirror, since SIFT is not flip invariant). Images
are processed in shards of ``shard_size``; each shard is one ``.npz`` written atomically
(temporary file + rename), so an interrupted run resumes where it stopped and a finished
shard is never rewritten. Images added to the folder later are appended (new shards).
Unreadable images are skipped and listed, never fatal.

Shard layout (``OUT/shard-00000.npz``)::

    desc     uint8  (N, 128)   descriptors of all entries, packed
    kpts     float32 (N, 4)    x, y, size in full-resolution pixels (of the mirror for
                               flipped entries), angle in degrees
    offsets  int64  (E + 1,)   entry e owns desc[offsets[e]:offsets[e+1]]
    image    int64  (E,)       index into OUT/images.txt
    flipped  bool   (E,)       entry describes the mirrored image
    size     int64  (E, 2)     height, width of the image
    failed   int64  (F,)       indices of images that could not be read
    stop     int64  ()         the shard covers images [index * shard_size, stop)

``OUT/images.txt`` lists the images in extraction order (sorted, then appended ones);
``OUT/manifest.json`` records the configuration and the image count; resuming with another
configuration is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ssld._io import (
    atomic_savez,
    atomic_write_lines,
    atomic_write_text,
    list_images,
    opencv_fork_safe,
    progress_bar,
    read_bgr,
)
from ssld._resume import refuse_changed


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

    image = read_bgr(path)
    if image is None:
        return None
    hw = image.shape[:2]
    out = [(False, hw, *describe(image, cfg))]
    if cfg.flip:
        out.append((True, hw, *describe(cv2.flip(image, 1), cfg)))
    return out


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.npz"


def _shard_complete(path: Path, stop: int) -> bool:
    """A shard file exists and covers images up to ``stop`` (a grown image list reopens it)."""
    if not path.exists():
        return False
    with np.load(path) as z:
        return "stop" in z.files and int(z["stop"]) == stop


def extract(
    root: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ExtractConfig = ExtractConfig(),
    *,
    workers: int = 0,
    progress: bool = True,
    shards: Callable[[int], bool] | None = None,
    start: int = 0,
) -> dict:
    """Extract SIFT of every image below ``root`` into shards under ``out``.

    Resumable (finished shards are kept) and appendable: images that appeared below ``root``
    since the last run are added at the end of ``images.txt`` and get new shards (a partly
    filled last shard is redone). Images that disappeared keep their features and are
    reported as ``missing``. ``shards`` restricts the work to the shard indices it accepts
    (several processes can share one ``out``: writes are atomic and per-process), ``start``
    rotates the order so that such processes begin on different shards.

    Returns a summary: images, shards, shards written and images extracted by this call,
    failed and missing image paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = list_images(root)
    images = _update_image_list(out, current, cfg)
    n_shards = num_shards(len(images), cfg.shard_size)

    def shard_range(s):
        return range(s * cfg.shard_size, min(len(images), (s + 1) * cfg.shard_size))

    selected = [s for s in range(n_shards) if shards is None or shards(s)]
    if selected:
        r = start % len(selected)
        selected = selected[r:] + selected[:r]
    todo = [s for s in selected if not _shard_complete(_shard_path(out, s), shard_range(s).stop)]
    bar = progress_bar(sum(len(shard_range(s)) for s in todo), progress, "sift", "img", leave=False)
    pool = None
    if workers > 0:
        opencv_fork_safe()
        pool = ProcessPoolExecutor(workers)
    written = extracted = 0
    try:
        for s in todo:
            idx = shard_range(s)
            if _shard_complete(_shard_path(out, s), idx.stop):  # done by another process
                if bar is not None:
                    bar.update(len(idx))
                continue
            jobs = [(str(Path(root) / images[i]), cfg) for i in idx]
            results: Iterable = (
                pool.map(_describe_file, jobs, chunksize=8) if pool else map(_describe_file, jobs)
            )
            _write_shard(_shard_path(out, s), idx, results, bar)
            written += 1
            extracted += len(idx)
    finally:
        if pool:
            pool.shutdown()
        if bar is not None:
            bar.close()
    failed = sorted(
        images[i]
        for s in selected
        if _shard_path(out, s).exists()
        for i in np.load(_shard_path(out, s))["failed"]
    )
    if shards is None:
        atomic_write_lines(out / "failed.txt", failed)
    missing = sorted(set(images) - set(current))
    return {
        "images": len(images),
        "shards": n_shards,
        "written": written,
        "extracted": extracted,
        "failed": failed,
        "missing": missing,
    }


def failed_images(out: str | os.PathLike) -> list[str]:
    """Images of the feature folder ``out`` that could not be read (all finished shards)."""
    out = Path(out)
    images = (out / "images.txt").read_text().splitlines()
    size = json.loads((out / "manifest.json").read_text())["config"]["shard_size"]
    failed = []
    for s in range(num_shards(len(images), size)):
        if _shard_path(out, s).exists():
            with np.load(_shard_path(out, s)) as z:
                failed.extend(images[i] for i in z["failed"])
    return sorted(failed)


def num_shards(n_images: int, shard_size: int) -> int:
    return (n_images + shard_size - 1) // shard_size


def _update_image_list(out: Path, current: list[str], cfg: ExtractConfig) -> list[str]:
    """The image list of ``out``: the recorded one plus new images of ``current`` at its end."""
    mpath, ipath = out / "manifest.json", out / "images.txt"
    config = asdict(cfg)
    images = current
    if mpath.exists():
        old = json.loads(mpath.read_text())
        refuse_changed(
            old.get("config") or {}, config, where=f"{out}", remedy="use a new output folder"
        )
        images = ipath.read_text().splitlines() if ipath.exists() else []
        if len(images) != old.get("images"):
            raise ValueError(f"{ipath} does not match {mpath}: the folder is damaged")
        known = set(images)
        images = images + [p for p in current if p not in known]
        if len(images) == old.get("images"):
            return images
    atomic_write_lines(ipath, images)
    atomic_write_text(mpath, json.dumps({"config": config, "images": len(images)}, indent=1))
    return images


def _write_shard(path, idx, results, bar):
    desc, kpts, offsets, image, flipped, size, bad = [], [], [0], [], [], [], []
    for i, res in zip(idx, results):
        if bar is not None:
            bar.update(1)
        if res is None:
            bad.append(i)
            continue
        for is_flip, hw, k, d in res:
            desc.append(d)
            kpts.append(k)
            offsets.append(offsets[-1] + len(d))
            image.append(i)
            flipped.append(is_flip)
            size.append(hw)
    atomic_savez(
        path,
        desc=np.concatenate(desc) if desc else np.zeros((0, 128), np.uint8),
        kpts=np.concatenate(kpts) if kpts else np.zeros((0, 4), np.float32),
        offsets=np.asarray(offsets, np.int64),
        image=np.asarray(image, np.int64),
        flipped=np.asarray(flipped, bool),
        size=np.asarray(size, np.int64).reshape(-1, 2),
        failed=np.asarray(bad, np.int64),
        stop=np.int64(idx.stop),
    )


def load_features(out: str | os.PathLike, shards: Iterable[int] | None = None) -> dict:
    """Shards of ``out`` (all, or the given indices) concatenated into one dict.

    Keys: desc, kpts, offsets (entry e owns desc[offsets[e]:offsets[e+1]]), image (index into
    ``images``), flipped, size ((height, width) of the image), images (all image paths).
    """
    out = Path(out)
    mpath = out / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{out} holds no extracted features (no manifest.json)")
    images = (out / "images.txt").read_text().splitlines()
    manifest = json.loads(mpath.read_text())
    size = manifest["config"]["shard_size"]
    n_shards = num_shards(len(images), size)
    parts = []
    for s in range(n_shards) if shards is None else shards:
        p = _shard_path(out, s)
        if not _shard_complete(p, min(len(images), (s + 1) * size)):
            raise FileNotFoundError(
                f"{p} is missing or stale: the extraction did not finish (run it again to resume)"
            )
        with np.load(p) as z:
            parts.append({k: z[k] for k in z.files})
    base = 0
    offsets = [np.zeros(1, np.int64)]
    for z in parts:
        offsets.append(z["offsets"][1:] + base)
        base += len(z["desc"])
    empty = {
        "desc": np.zeros((0, 128), np.uint8),
        "kpts": np.zeros((0, 4), np.float32),
        "image": np.zeros(0, np.int64),
        "flipped": np.zeros(0, bool),
        "size": np.zeros((0, 2), np.int64),
    }
    feats = {k: np.concatenate([z[k] for z in parts]) if parts else v for k, v in empty.items()}
    feats["offsets"] = np.concatenate(offsets)
    feats["images"] = images
    feats["config"] = manifest["config"]
    return feats
