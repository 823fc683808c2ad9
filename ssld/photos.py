"""A near-duplicate benchmark from the real photos that scikit-image ships (no download).

``make_photo_set(root)`` writes

    root/reference/<name>.png          originals: the "validation set"
    root/query/copies/<name>_<t>.<ext>  transformed copies of every original: crop, rescale,
                                       rotation, JPEG recompression, colour jitter, flip,
                                       blur and a flip + crop + rescale combination
    root/query/unrelated/<name>_<t>.png other photos and textures, with a few transforms
    root/truth.csv                     query,reference for every copy (paths relative to the
                                       query and reference folders)

so that ``ssld dedup --query root/query --reference root/reference`` can be scored for
precision and recall. ``motorcycle`` is the left image of ``stereo_motorcycle``; ``cat`` is
the same photo as ``chelsea`` and the right motorcycle image is the other half of the stereo
pair, so neither is used as an unrelated photo. ``clock`` is left out: it is so smooth that
SIFT finds two keypoints in it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

REFERENCE = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "motorcycle",
    "retina",
)
UNRELATED = (
    "page",
    "text",
    "moon",
    "brick",
    "grass",
    "gravel",
    "cell",
    "colorwheel",
    "logo",
    "shepp_logan_phantom",
)
COPY_TRANSFORMS = ("crop", "rescale", "rotate", "jpeg", "jitter", "flip", "blur", "flipcrop")
UNRELATED_TRANSFORMS = ("orig", "flip")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image photo as a BGR uint8 image (grey photos become 3 equal channels)."""
    import cv2

    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is a test/demo dependency
        raise ImportError("the photo set needs scikit-image: pip install scikit-image") from e
    img = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        img = (255 * (img - img.min()) / max(img.max() - img.min(), 1e-12)).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR)


def transform(img: np.ndarray, kind: str, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(transformed image, cv2.imwrite params) for one of COPY_TRANSFORMS or "orig"."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    if kind == "orig":
        return img, {}
    if kind == "crop":  # keep ~60% of the area, off-centre
        ch, cw = int(h * 0.75), int(w * 0.8)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return img[y : y + ch, x : x + cw].copy(), {}
    if kind == "rescale":
        return cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA), {}
    if kind == "rotate":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 15.0, 1.0)
        return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT), {}
    if kind == "jpeg":
        return img, {"ext": ".jpg", "params": [cv2.IMWRITE_JPEG_QUALITY, 20]}
    if kind == "jitter":
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + 12) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * 0.7, 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
        return np.clip(out * 1.25 - 20, 0, 255).astype(np.uint8), {}
    if kind == "flip":
        return cv2.flip(img, 1), {}
    if kind == "blur":
        return cv2.GaussianBlur(img, (0, 0), 1.5), {}
    if kind == "flipcrop":
        out, _ = transform(cv2.flip(img, 1), "crop", seed + 1)
        oh, ow = out.shape[:2]
        return cv2.resize(out, (int(ow * 0.7), int(oh * 0.7)), interpolation=cv2.INTER_AREA), {}
    raise ValueError(f"unknown transform {kind!r}; expected one of {COPY_TRANSFORMS}")


def _write(path: Path, img: np.ndarray, params: dict) -> Path:
    import cv2

    path = path.with_suffix(params.get("ext", ".png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img, params.get("params", [])):
        raise OSError(f"could not write {path}")
    return path


def make_photo_set(
    root: str | os.PathLike,
    reference=REFERENCE,
    unrelated=UNRELATED,
    copy_transforms=COPY_TRANSFORMS,
    unrelated_transforms=UNRELATED_TRANSFORMS,
) -> dict:
    """Write the reference / query folders and truth.csv under ``root``; returns their paths
    and the true (query, reference) pairs."""
    root = Path(root)
    ref_dir, query_dir = root / "reference", root / "query"
    truth = []
    for i, name in enumerate(reference):
        img = load_photo(name)
        _write(ref_dir / name, img, {})
        for j, kind in enumerate(copy_transforms):
            out, params = transform(img, kind, seed=100 * i + j)
            path = _write(query_dir / "copies" / f"{name}_{kind}", out, params)
            truth.append((path.relative_to(query_dir).as_posix(), f"{name}.png"))
    negatives = []
    for i, name in enumerate(unrelated):
        img = load_photo(name)
        for j, kind in enumerate(unrelated_transforms):
            out, params = transform(img, kind, seed=1000 + 100 * i + j)
            path = _write(query_dir / "unrelated" / f"{name}_{kind}", out, params)
            negatives.append(path.relative_to(query_dir).as_posix())
    with open(root / "truth.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "reference"])
        writer.writerows(truth)
    return {"reference": ref_dir, "query": query_dir, "truth": truth, "negatives": negatives}


def score(duplicates: list[tuple[str, str]], truth: list[tuple[str, str]]) -> dict:
    """Pair-level precision / recall of flagged (query, reference) pairs against the truth."""
    found, want = set(duplicates), set(truth)
    tp = len(found & want)
    return {
        "true_positives": tp,
        "false_positives": len(found - want),
        "false_negatives": len(want - found),
        "precision": tp / len(found) if found else 1.0,
        "recall": tp / len(want) if want else 1.0,
    }
