"""Cheap global similarity to choose which (query, reference) image pairs to verify.

VLAD (Jegou et al. 2010) over the SIFT descriptors that extraction already produced:

  1. a k-means codebook of ``clusters`` centroids learned on (a sample of) the reference
     descriptors (RootSIFT-normalised floats), Lloyd iterations with exact assignment by
     :func:`ssld_kernels.match_knn` (k=1), deterministic for a given seed;
  2. per image entry: v_c = sum over its descriptors x assigned to centroid c of (x - mu_c),
     signed square root, per-centroid L2 normalisation (intra-normalisation), global L2;
  3. optionally a PCA projection learned on the reference VLADs (then L2 again), so that the
     vectors stay small at ImageNet scale;
  4. every query entry's ``k`` nearest reference vectors by exact L2 (:func:`match_knn`),
     which on unit vectors is the same ranking as cosine similarity.

A user-supplied embedding (one row per image, e.g. the teacher's pooled features) replaces
steps 1-3. All tensors here are float32; heavy steps run on ``device``.
"""

from __future__ import annotations

import numpy as np
import torch

import ssld_kernels as sk

__all__ = ["Codebook", "learn_codebook", "vlad", "search", "normalize"]


def _root_sift(desc: torch.Tensor) -> torch.Tensor:
    """uint8 SIFT -> float32 RootSIFT rows (L1 normalise, square root), unit L2 norm."""
    x = desc.float()
    return torch.sqrt(x / x.sum(1, keepdim=True).clamp(min=1e-12))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


class Codebook:
    """k-means centroids (float32 (clusters, 128)) plus the optional PCA of the VLADs."""

    def __init__(self, centroids, pca_mean=None, pca_proj=None):
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        self.pca_mean = None if pca_mean is None else torch.as_tensor(pca_mean)
        self.pca_proj = None if pca_proj is None else torch.as_tensor(pca_proj)

    @property
    def dim(self) -> int:
        if self.pca_proj is not None:
            return self.pca_proj.shape[1]
        return self.centroids.numel()

    def save(self, path) -> None:
        arrays = {"centroids": self.centroids.numpy()}
        if self.pca_proj is not None:
            arrays.update(pca_mean=self.pca_mean.numpy(), pca_proj=self.pca_proj.numpy())
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> Codebook:
        with np.load(path) as z:
            return cls(z["centroids"], z.get("pca_mean"), z.get("pca_proj"))


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    out = [sk.match_knn(x[i : i + chunk], centroids, 1)[1][:, 0] for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


def learn_codebook(
    desc: np.ndarray,
    clusters: int = 64,
    *,
    iters: int = 20,
    sample: int = 200_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Codebook:
    """k-means (Lloyd, k-means++ seeding) on up to ``sample`` RootSIFT descriptors.

    Centroid sums are accumulated in float64 on the CPU, so the codebook is the same on every
    run and every process. Clusters that empty out are re-seeded with the point farthest from
    its centroid.
    """
    if len(desc) == 0:
        raise ValueError("cannot learn a codebook: the reference set has no descriptors")
    if not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be a positive integer, got {clusters!r}")
    rng = np.random.default_rng(seed)
    if len(desc) > sample:
        desc = desc[np.sort(rng.choice(len(desc), sample, replace=False))]
    x = _root_sift(torch.from_numpy(np.ascontiguousarray(desc)))
    clusters = min(clusters, len(x))
    # k-means++ seeding on a subsample (exact, deterministic with the seeded generator)
    seed_pool = x[torch.from_numpy(rng.permutation(len(x))[: max(20 * clusters, 2000)])]
    centroids = [seed_pool[int(rng.integers(len(seed_pool)))]]
    d2 = ((seed_pool - centroids[0]) ** 2).sum(1).double()
    for _ in range(1, clusters):
        p = (d2 / d2.sum()).numpy() if d2.sum() > 0 else None
        c = seed_pool[int(rng.choice(len(seed_pool), p=p))]
        centroids.append(c)
        d2 = torch.minimum(d2, ((seed_pool - c) ** 2).sum(1).double())
    cent = torch.stack(centroids)
    xd = x.to(device)
    for _ in range(iters):
        assign = _assign(xd, cent.to(device)).cpu()
        sums = torch.zeros(clusters, x.shape[1], dtype=torch.float64).index_add_(
            0, assign, x.double()
        )
        counts = torch.bincount(assign, minlength=clusters)
        new = (sums / counts.clamp(min=1)[:, None]).float()
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = ((x - new[assign]) ** 2).sum(1).argsort(descending=True, stable=True)
            new[empty] = x[far[: len(empty)]]
        if torch.equal(new, cent):
            break
        cent = new
    return Codebook(cent)


def vlad(
    desc: np.ndarray,
    offsets: np.ndarray,
    codebook: Codebook,
    *,
    device: str | torch.device = "cpu",
    chunk: int = 4096,
) -> torch.Tensor:
    """VLAD vectors (n_entries, codebook.dim) float32 on ``device``, one per entry.

    Entry e owns ``desc[offsets[e]:offsets[e+1]]``; an entry without descriptors gets a zero
    vector (it matches nothing).
    """
    cent = codebook.centroids.to(device)
    n_entries, (k, d) = len(offsets) - 1, cent.shape
    out = []
    for e0 in range(0, n_entries, chunk):
        e1 = min(n_entries, e0 + chunk)
        lo, hi = int(offsets[e0]), int(offsets[e1])
        x = _root_sift(torch.from_numpy(np.ascontiguousarray(desc[lo:hi])).to(device))
        owner = torch.repeat_interleave(
            torch.arange(e1 - e0, device=device),
            torch.from_numpy(np.diff(offsets[e0 : e1 + 1])).to(device),
        )
        a = _assign(x, cent) if len(x) else torch.zeros(0, dtype=torch.int64, device=device)
        v = torch.zeros((e1 - e0) * k, d, device=device).index_add_(0, owner * k + a, x - cent[a])
        v = v.view(e1 - e0, k, d)
        v = v.sign() * v.abs().sqrt()  # power normalisation
        v = v / v.norm(dim=2, keepdim=True).clamp(min=1e-12)  # intra-normalisation
        v = normalize(v.reshape(e1 - e0, k * d))
        out.append(project(v, codebook))
    return torch.cat(out) if out else torch.zeros(0, codebook.dim, device=device)


def project(v: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    if codebook.pca_proj is None:
        return v
    zero = v.abs().sum(1, keepdim=True) == 0
    p = normalize((v - codebook.pca_mean.to(v.device)) @ codebook.pca_proj.to(v.device))
    return torch.where(zero, torch.zeros_like(p), p)


def fit_pca(codebook: Codebook, reference_vlad: torch.Tensor, dim: int) -> Codebook:
    """The codebook plus a PCA to ``dim`` learned on the reference VLADs.

    Skipped (the codebook is returned as is) when there are too few reference vectors to
    estimate ``dim`` directions (fewer than 2 * dim) or when ``dim`` is not smaller.
    """
    n, full = reference_vlad.shape
    if dim <= 0 or dim >= full or n < 2 * dim:
        return codebook
    x = reference_vlad.double().cpu()
    mean = x.mean(0)
    # top right-singular vectors of the centred data, exact (no randomised solver)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return Codebook(codebook.centroids, mean.float(), vh[:dim].T.contiguous().float())


def search(
    queries: torch.Tensor, reference: torch.Tensor, k: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query vector's ``k`` nearest reference vectors: (dist2, index), exact L2."""
    k = min(k, len(reference))
    if len(queries) == 0 or k == 0:
        return (
            torch.zeros(len(queries), 0, device=queries.device),
            torch.zeros(len(queries), 0, dtype=torch.int64, device=queries.device),
        )
    return sk.match_knn(queries.float(), reference.float(), k, backend=backend)
