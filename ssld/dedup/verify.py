"""Verification of candidate image pairs: exact descriptor matching, votes, geometry.

For a candidate pair (query entry, reference entry):

  1. every query descriptor's two nearest reference descriptors, exactly
     (:func:`ssld_kernels.match_pairs`, many pairs per call), Lowe's ratio test;
  2. one-to-one: of several query descriptors matched to the same reference descriptor only
     the closest is kept (repetitive texture otherwise piles up votes);
  3. ``matches`` = the surviving votes; pairs with at least ``min_matches`` go to a
     geometric check with OpenCV: a similarity transform (``cv2.estimateAffinePartial2D``,
     RANSAC) or a homography (``cv2.findHomography``, USAC MAGSAC++) between the keypoint
     positions at extraction resolution, tolerance ``reproj_px`` pixels;
  4. ``inliers`` = the matches consistent with that transform. A pair is a duplicate when
     ``inliers >= min_inliers``.

RANSAC is seeded (``cv2.setRNGSeed``) per pair, so results repeat exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import ssld_kernels as sk

GEOMETRIES = ("similarity", "homography", "none")


@dataclass(frozen=True)
class VerifyConfig:
    ratio: float = 0.8
    mutual: bool = False
    min_matches: int = 12
    min_inliers: int = 12
    geometry: str = "similarity"
    reproj_px: float = 6.0
    batch_pairs: int = 1024

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        for name in ("min_matches", "min_inliers", "batch_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if not self.reproj_px > 0:
            raise ValueError(f"reproj_px must be > 0, got {self.reproj_px!r}")


class Features:
    """Extracted features (see :func:`ssld.dedup.extract.load_features`) with the
    descriptors on ``device`` and the keypoints scaled to extraction resolution."""

    def __init__(self, feats: dict, device: str | torch.device = "cpu"):
        self.offsets = feats["offsets"]
        self.image = feats["image"]
        self.flipped = feats["flipped"]
        self.size = feats["size"]
        self.images = feats["images"]
        self.desc = torch.from_numpy(np.ascontiguousarray(feats["desc"])).to(device)
        max_side = feats["config"]["max_side"]
        scale = np.minimum(1.0, max_side / np.maximum(self.size.max(1), 1)).astype(np.float32)
        per_desc = np.repeat(scale, np.diff(self.offsets))
        self.kpts = feats["kpts"]
        self.xy = feats["kpts"][:, :2] * per_desc[:, None]  # extraction-resolution pixels

    def __len__(self) -> int:
        return len(self.image)

    def entry(self, e: int) -> slice:
        return slice(int(self.offsets[e]), int(self.offsets[e + 1]))


def one_to_one(pairs: np.ndarray, dist2: np.ndarray) -> np.ndarray:
    """Rows of ``pairs`` kept when, per reference index, only the closest match survives
    (ties to the lower query index)."""
    if len(pairs) == 0:
        return pairs
    order = np.lexsort((pairs[:, 0], dist2, pairs[:, 1]))
    first = np.ones(len(order), bool)
    first[1:] = pairs[order[1:], 1] != pairs[order[:-1], 1]
    return pairs[np.sort(order[first])]


def geometric_inliers(src: np.ndarray, dst: np.ndarray, cfg: VerifyConfig) -> np.ndarray:
    """Boolean inlier mask of the correspondences src[i] -> dst[i] under cfg.geometry."""
    import cv2

    n = len(src)
    if cfg.geometry == "none":
        return np.ones(n, bool)
    need = 4 if cfg.geometry == "homography" else 2
    if n < need:
        return np.zeros(n, bool)
    src = np.ascontiguousarray(src, np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(dst, np.float32).reshape(-1, 1, 2)
    cv2.setRNGSeed(0)
    if cfg.geometry == "homography":
        model, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, cfg.reproj_px)
    else:
        model, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.reproj_px, maxIters=4000
        )
    if model is None or mask is None:
        return np.zeros(n, bool)
    return mask.reshape(-1).astype(bool)


def match_entries(
    query: Features,
    reference: Features,
    pairs: np.ndarray,
    cfg: VerifyConfig,
    backend: str | None = None,
) -> list[np.ndarray]:
    """For each (query entry, reference entry) row of ``pairs``: the one-to-one ratio-test
    matches as an int64 (m, 2) array of global descriptor rows (query row, reference row)."""
    out = []
    for b0 in range(0, len(pairs), cfg.batch_pairs):
        batch = pairs[b0 : b0 + cfg.batch_pairs]
        qs = [query.entry(e) for e in batch[:, 0]]
        rs = [reference.entry(e) for e in batch[:, 1]]
        got = sk.match_pairs(
            [query.desc[s] for s in qs],
            [reference.desc[s] for s in rs],
            ratio=cfg.ratio,
            mutual=cfg.mutual,
            backend=backend,
        )
        for (p, d2), qsl, rsl in zip(got, qs, rs):
            p = one_to_one(p.cpu().numpy(), d2.cpu().numpy())
            out.append(np.stack([p[:, 0] + qsl.start, p[:, 1] + rsl.start], 1))
    return out


def verify(
    query: Features,
    reference: Features,
    pairs: np.ndarray,
    cfg: VerifyConfig,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(matches, inliers) int64 arrays, one value per row of ``pairs`` (entry indices)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    matches = np.zeros(len(pairs), np.int64)
    inliers = np.zeros(len(pairs), np.int64)
    for i, m in enumerate(match_entries(query, reference, pairs, cfg, backend)):
        matches[i] = len(m)
        if len(m) >= cfg.min_matches:
            inliers[i] = geometric_inliers(query.xy[m[:, 0]], reference.xy[m[:, 1]], cfg).sum()
    return matches, inliers
