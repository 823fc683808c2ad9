"""``ssld dedup``: flag query (gallery) images that are near-duplicates of reference images.

Stages, each resumable, all state under OUT:

  extract    SIFT of both folders into OUT/features/{query,reference}/shard-*.npz; the
             query side also describes the mirrored image (``flip``), since SIFT is not
             flip invariant.
  shortlist  candidate (query image, reference image) pairs: the ``shortlist_k`` nearest
             reference images of every query entry by VLAD (k-means codebook learned on the
             reference descriptors, cached in OUT/work/codebook.npz), by user-supplied
             embeddings (.npy), or all pairs (``exhaustive``).
  verify     every entry of the query image (original, mirror) against the candidate:
             exact matching + ratio test + one-to-one + geometric check
             (:mod:`ssld.dedup.verify`). Results per query feature shard in
             OUT/work/verify-NNNNN.npz, so a run resumes per shard and several processes
             (``shard=(i, n)``, or torchrun ranks) split the query shards between them.
  report     when every query shard is verified: OUT/duplicates.csv
             (query,reference,matches,inliers; one row per flagged pair, best orientation),
             OUT/keep.txt (query images not flagged and readable), OUT/failed.txt,
             OUT/report.md (counts, timings per stage, extrapolation to ImageNet-22k vs the
             ImageNet-1k validation set) and OUT/matches/*.png (inlier matches of the
             strongest pairs).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ssld._io import atomic_savez, atomic_write_json, atomic_write_lines, list_images, read_bgr
from ssld._resume import refuse_changed
from ssld.dedup import shortlist as sl
from ssld.dedup.extract import (
    ExtractConfig,
    extract,
    failed_images,
    load_features,
    num_shards,
)
from ssld.dedup.verify import Features, VerifyConfig, geometric_inliers, match_entries, verify

SHORTLISTS = ("vlad", "embeddings", "exhaustive")
# ImageNet-22k (fall 2011 release) and the ImageNet-1k validation set: the SSLD setting
IMAGENET22K_IMAGES = 14_197_122
IMAGENET1K_VAL_IMAGES = 50_000
MAX_DRAWN_MATCHES = 60


@dataclass(frozen=True)
class DedupConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    flip: bool = True
    shortlist: str = "vlad"
    shortlist_k: int = 5
    clusters: int = 64
    vlad_dim: int = 256
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    pictures: int = 8

    def __post_init__(self):
        if self.shortlist not in SHORTLISTS:
            raise ValueError(f"shortlist must be one of {SHORTLISTS}, got {self.shortlist!r}")
        for name in ("shortlist_k", "clusters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.vlad_dim, int) or self.vlad_dim < 0:
            raise ValueError(f"vlad_dim must be an integer >= 0 (0: no PCA), got {self.vlad_dim}")
        if not isinstance(self.pictures, int) or self.pictures < 0:
            raise ValueError(f"pictures must be an integer >= 0, got {self.pictures!r}")
        if self.extract.flip:
            raise ValueError("set DedupConfig.flip, not extract.flip (it applies to queries only)")


class _Timer:
    """Records (stage, items, seconds) of work done by this process in OUT/work/timings."""

    def __init__(self, work: Path, device: torch.device):
        self.dir = work / "timings"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.records = []

    def __call__(self, stage: str, items: int, t0: float, **extra) -> None:
        if self.device.type == "cuda":  # per stage, not per step: count the GPU work too
            torch.cuda.synchronize(self.device)
        if items:
            self.records.append({"stage": stage, "items": int(items), "seconds": time.time() - t0})
            self.records[-1].update(extra)

    def save(self, tag: str) -> None:
        if self.records:
            atomic_write_json(self.dir / f"{tag}-{os.getpid()}-{time.time_ns()}.json", self.records)


@dataclass(frozen=True)
class _Job:
    """What the stages of one :func:`run_dedup` call share: the inputs, the output folder,
    the settings and where the work runs."""

    query: Path
    reference: Path
    out: Path
    cfg: DedupConfig
    device: torch.device
    backend: str | None
    embeddings: tuple | None  # (query.npy, reference.npy) of shortlist="embeddings"
    timer: _Timer

    @property
    def work(self) -> Path:
        return self.out / "work"


def _params(cfg: DedupConfig, embeddings) -> dict:
    p = asdict(cfg)
    p["verify"].pop("min_inliers")  # applied when the report is written: may change
    p["verify"].pop("batch_pairs")
    p.pop("pictures")
    if cfg.shortlist == "embeddings":
        p["embeddings"] = [str(Path(e).resolve()) for e in embeddings]
    return p


def _load_embeddings(path, folder, images: list[str], name: str) -> torch.Tensor:
    """Rows of the .npy at ``path`` are the images of ``folder`` in sorted order; returned
    L2-normalised in the order of ``images`` (the feature store's order)."""
    emb = np.load(path, mmap_mode="r")
    listed = list_images(folder)
    if emb.ndim != 2 or emb.shape[0] != len(listed):
        raise ValueError(
            f"{name} {path} must have one row per image of {folder} ({len(listed)} images, "
            f"sorted by relative path); got shape {emb.shape}"
        )
    row = {p: i for i, p in enumerate(listed)}
    missing = [p for p in images if p not in row]
    if missing:
        raise ValueError(f"{name}: no row for {missing[0]} (the image is no longer in {folder})")
    return sl.normalize(torch.from_numpy(np.asarray(emb[[row[p] for p in images]], np.float32)))


class _Shortlister:
    """Candidate reference *images* for each query entry (``q_images``: the query images in
    the feature store's order)."""

    def __init__(self, job: _Job, ref: Features, q_images: list[str]):
        cfg, device, tm = job.cfg, job.device, job.timer
        self.cfg, self.ref, self.device, self.backend = cfg, ref, device, job.backend
        self.n_ref_images = len(ref.images)
        if cfg.shortlist == "exhaustive":
            return
        if cfg.shortlist == "embeddings":
            q_npy, r_npy = job.embeddings
            self.q_emb = _load_embeddings(q_npy, job.query, q_images, "query_embeddings")
            self.r_emb = _load_embeddings(
                r_npy, job.reference, ref.images, "reference_embeddings"
            ).to(device)
            return
        work = job.work
        path = work / "codebook.npz"
        ref_feats = {"desc": ref.desc.cpu().numpy(), "offsets": ref.offsets}
        if path.exists():
            self.codebook = sl.Codebook.load(path)
            t0 = time.time()
            self.r_vlad = sl.vlad(ref_feats["desc"], ref.offsets, self.codebook, device=device)
            tm("vlad", len(ref), t0)
        else:
            t0 = time.time()
            codebook = sl.learn_codebook(ref_feats["desc"], cfg.clusters, device=device)
            tm("codebook", len(ref_feats["desc"]), t0)
            t0 = time.time()
            full = sl.vlad(ref_feats["desc"], ref.offsets, codebook, device=device)
            self.codebook = sl.fit_pca(codebook, full, cfg.vlad_dim)
            self.r_vlad = sl.project(full, self.codebook)
            tm("vlad", len(ref), t0)
            tmp = work / f"codebook.{os.getpid()}.tmp.npz"
            self.codebook.save(tmp)
            os.replace(tmp, path)

    def candidates(self, q: Features, tm) -> np.ndarray:
        """int64 (P, 2) rows (query entry, reference entry) to verify."""
        n_ref_entries = len(self.ref)
        if self.cfg.shortlist == "exhaustive":
            e = np.arange(len(q))
            f = np.arange(n_ref_entries)
            return np.stack(np.meshgrid(e, f, indexing="ij"), -1).reshape(-1, 2)
        t0 = time.time()
        if self.cfg.shortlist == "embeddings":
            qv = self.q_emb[q.image].to(self.device)  # the image's embedding for every entry
            rv = self.r_emb
        else:
            qv = sl.vlad(q.desc.cpu().numpy(), q.offsets, self.codebook, device=self.device)
            tm("vlad", len(q), t0)
            t0 = time.time()
            rv = self.r_vlad
        _, idx = sl.search(qv, rv, self.cfg.shortlist_k, self.backend)
        tm("search", len(q) * len(rv), t0, dim=int(rv.shape[1]))
        idx = idx.cpu().numpy()
        # reference entries hold one entry per readable image; every candidate image is
        # verified against every entry of the query image (original and mirror)
        ref_image = self.ref.image[idx]
        per_image: dict[int, set] = {}
        for e, cands in enumerate(ref_image):
            per_image.setdefault(int(q.image[e]), set()).update(cands.tolist())
        entries_of = {}
        for e, img in enumerate(q.image):
            entries_of.setdefault(int(img), []).append(e)
        ref_entry_of = {int(img): f for f, img in enumerate(self.ref.image)}
        rows = [
            (e, ref_entry_of[r])
            for img, cands in sorted(per_image.items())
            for r in sorted(cands)
            for e in entries_of[img]
        ]
        return np.asarray(rows, np.int64).reshape(-1, 2)


def _verify_path(work: Path, s: int) -> Path:
    return work / f"verify-{s:05d}.npz"


def run_dedup(
    query: str | os.PathLike,
    reference: str | os.PathLike,
    out: str | os.PathLike,
    cfg: DedupConfig = DedupConfig(),
    *,
    shard: tuple[int, int] = (0, 1),
    device: str | torch.device = "cpu",
    backend: str | None = None,
    workers: int = 0,
    progress: bool = True,
    embeddings: tuple | None = None,
    write_report: bool = True,
    log=print,
) -> dict:
    """Run (or resume) the whole dedup pipeline; returns a summary dict.

    ``shard=(i, n)`` processes the query feature shards s with s % n == i; whichever process
    finds every shard verified writes the outputs (``write_report=False`` leaves that to a
    coordinator, e.g. rank 0 under torchrun).
    """
    log = log or (lambda *a: None)
    i_shard, n_shard = shard
    if not (isinstance(n_shard, int) and n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    if cfg.shortlist == "embeddings" and (embeddings is None or len(embeddings) != 2):
        raise ValueError("shortlist='embeddings' needs embeddings=(query.npy, reference.npy)")
    query, reference, out = Path(query), Path(reference), Path(out)
    device = torch.device(device)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    params = _params(cfg, embeddings)
    ppath = work / "params.json"
    if ppath.exists():
        remedy = "use a new --out, or the same settings"
        refuse_changed(json.loads(ppath.read_text()), params, where=f"{out}", remedy=remedy)
    else:
        atomic_write_json(ppath, params)
    tm = _Timer(work, device)
    job = _Job(query, reference, out, cfg, device, backend, embeddings, tm)

    t0 = time.time()
    rs = extract(
        reference,
        out / "features" / "reference",
        cfg.extract,
        workers=workers,
        progress=progress,
        start=i_shard,
    )
    tm("extract", rs["extracted"], t0)
    qcfg = replace(cfg.extract, flip=cfg.flip)
    mine = lambda s: s % n_shard == i_shard  # noqa: E731
    t0 = time.time()
    qs = extract(
        query, out / "features" / "query", qcfg, workers=workers, progress=progress, shards=mine
    )
    tm("extract", qs["extracted"], t0)
    log(
        f"features: {rs['images']} reference, {qs['images']} query images "
        f"({len(rs['failed'])} + {len(qs['failed'])} unreadable)"
    )

    todo = [s for s in range(qs["shards"]) if mine(s) and not _verify_path(work, s).exists()]
    if todo:
        ref = Features(load_features(out / "features" / "reference"), device)
        q_images = (out / "features" / "query" / "images.txt").read_text().splitlines()
        shortlister = _Shortlister(job, ref, q_images)
        for s in todo:
            _verify_shard(job, s, ref, shortlister)
    tm.save(f"shard{i_shard}of{n_shard}")
    done = sum(_verify_path(work, s).exists() for s in range(qs["shards"]))
    summary = {"query_shards": qs["shards"], "verified_shards": done, "written": False}
    if done == qs["shards"] and write_report:
        summary.update(write_outputs(query, reference, out, cfg, device=device, backend=backend))
        summary["written"] = True
    elif done < qs["shards"]:
        log(f"{done} of {qs['shards']} query shards verified; the last process writes the report")
    return summary


def _verify_shard(job: _Job, s: int, ref: Features, shortlister: _Shortlister) -> None:
    """Verify the candidates of query feature shard ``s``; results in work/verify-s.npz."""
    q = Features(load_features(job.out / "features" / "query", shards=[s]), job.device)
    pairs = shortlister.candidates(q, job.timer)
    t0 = time.time()
    matches, inliers = verify(q, ref, pairs, job.cfg.verify, job.backend)
    job.timer("verify", len(pairs), t0)
    q_img = q.image[pairs[:, 0]] if len(pairs) else np.zeros(0, np.int64)
    r_img = ref.image[pairs[:, 1]] if len(pairs) else np.zeros(0, np.int64)
    flipped = q.flipped[pairs[:, 0]] if len(pairs) else np.zeros(0, bool)
    atomic_savez(
        _verify_path(job.work, s),
        query=q_img,
        reference=r_img,
        flipped=flipped,
        matches=matches,
        inliers=inliers,
        query_entries=np.int64(len(q)),
        query_images=np.int64(len(np.unique(q.image))),
    )


def _best_per_pair(rows: dict) -> dict:
    """(query image, reference image) -> (inliers, matches, flipped), best orientation."""
    best = {}
    for qi, ri, fl, m, n in zip(
        rows["query"], rows["reference"], rows["flipped"], rows["matches"], rows["inliers"]
    ):
        key = (int(qi), int(ri))
        cand = (int(n), int(m), bool(fl))
        if key not in best or cand[:2] > best[key][:2]:
            best[key] = cand
    return best


def write_outputs(query, reference, out, cfg: DedupConfig, *, device="cpu", backend=None) -> dict:
    """Merge the per-shard results into duplicates.csv, keep.txt, failed.txt, report.md and
    the match pictures. Returns counts."""
    query, reference, out = Path(query), Path(reference), Path(out)
    work = out / "work"
    q_images = (out / "features" / "query" / "images.txt").read_text().splitlines()
    r_images = (out / "features" / "reference" / "images.txt").read_text().splitlines()
    q_cfg = json.loads((out / "features" / "query" / "manifest.json").read_text())["config"]
    n_q_shards = num_shards(len(q_images), q_cfg["shard_size"])
    parts = [np.load(_verify_path(work, s)) for s in range(n_q_shards)]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("query", "reference", "flipped")}
    cat.update({k: np.concatenate([p[k] for p in parts]) for k in ("matches", "inliers")})
    q_entries = sum(int(p["query_entries"]) for p in parts)
    best = _best_per_pair(cat)
    v = cfg.verify
    dup = sorted(
        ((qi, ri, m, n, fl) for (qi, ri), (n, m, fl) in best.items() if n >= v.min_inliers),
        key=lambda t: (q_images[t[0]], -t[3], r_images[t[1]]),
    )
    with open(out / f"duplicates.csv.{os.getpid()}.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "reference", "matches", "inliers"])
        w.writerows((q_images[qi], r_images[ri], m, n) for qi, ri, m, n, _ in dup)
    os.replace(out / f"duplicates.csv.{os.getpid()}.tmp", out / "duplicates.csv")
    failed = set(failed_images(out / "features" / "query"))
    flagged = {q_images[qi] for qi, *_ in dup}
    present = set(list_images(query))
    keep = [p for p in q_images if p in present and p not in flagged and p not in failed]
    atomic_write_lines(out / "keep.txt", keep)
    atomic_write_lines(out / "failed.txt", sorted(failed))
    pictures = _draw_pictures(query, reference, out, cfg, dup, device, backend)
    timings = _timings(work)
    if "search" in timings:
        # at ImageNet scale the VLADs are PCA-reduced to vlad_dim (too few references here)
        dim = timings["search"]["dim"]
        if cfg.shortlist == "vlad" and 0 < cfg.vlad_dim < dim:
            dim = timings["search"]["dim"] = cfg.vlad_dim
        timings["search"]["calibrated"] = calibrate_search(dim, device, backend)
    counts = {
        "query_images": len(q_images),
        "reference_images": len(r_images),
        "query_entries": q_entries,
        "failed": len(failed),
        "candidate_pairs": len(cat["query"]),
        "candidate_image_pairs": len(best),
        "duplicate_pairs": len(dup),
        "flagged_images": len(flagged),
        "kept_images": len(keep),
        "pictures": pictures,
    }
    (out / "report.md").write_text(_report(cfg, counts, timings, dup, q_images, r_images))
    return counts


def _timings(work: Path) -> dict:
    agg = {}
    for p in sorted(glob.glob(str(work / "timings" / "*.json"))):
        for r in json.loads(Path(p).read_text()):
            a = agg.setdefault(r["stage"], {"items": 0, "seconds": 0.0})
            a["items"] += r["items"]
            a["seconds"] += r["seconds"]
            if "dim" in r:
                a["dim"] = r["dim"]
    return agg


def _draw_pictures(query, reference, out, cfg, dup, device, backend) -> list[str]:
    """Side-by-side pictures of the inlier matches of the ``cfg.pictures`` strongest pairs."""
    import cv2

    if not cfg.pictures or not dup:
        return []
    pic_dir = out / "matches"
    pic_dir.mkdir(exist_ok=True)
    for old in pic_dir.glob("*.png"):
        old.unlink()
    strongest = sorted(dup, key=lambda t: (-t[3], t[0], t[1]))[: cfg.pictures]
    # only the shards holding the drawn images: the stores can be ImageNet-22k sized
    q = Features(_shards_of(out / "features" / "query", [t[0] for t in strongest]), device)
    r = Features(_shards_of(out / "features" / "reference", [t[1] for t in strongest]), device)
    names = []
    for rank, (qi, ri, _m, _n, fl) in enumerate(strongest):
        e = int(np.flatnonzero((q.image == qi) & (q.flipped == fl))[0])
        f = int(np.flatnonzero(r.image == ri)[0])
        (mt,) = match_entries(q, r, np.array([[e, f]]), cfg.verify, backend)
        inl = geometric_inliers(q.xy[mt[:, 0]], r.xy[mt[:, 1]], cfg.verify)
        qimg = _read_scaled(query / q.images[qi], cfg.extract.max_side, fl)
        rimg = _read_scaled(reference / r.images[ri], cfg.extract.max_side, False)
        if qimg is None or rimg is None:
            continue
        shown = mt[inl][:: max(1, int(inl.sum()) // MAX_DRAWN_MATCHES)]  # readable pictures
        kq = [cv2.KeyPoint(float(x), float(y), 4) for x, y in q.xy[shown[:, 0]]]
        kr = [cv2.KeyPoint(float(x), float(y), 4) for x, y in r.xy[shown[:, 1]]]
        dm = [cv2.DMatch(i, i, 0.0) for i in range(len(kq))]
        canvas = cv2.drawMatches(
            qimg, kq, rimg, kr, dm, None, matchColor=(0, 255, 0), singlePointColor=(0, 0, 255)
        )
        name = f"{rank:02d}.png"
        cv2.imwrite(str(pic_dir / name), canvas)
        names.append(name)
    return names


def _shards_of(folder: Path, images) -> dict:
    """load_features of just the shards that hold the given image indices."""
    size = json.loads((folder / "manifest.json").read_text())["config"]["shard_size"]
    return load_features(folder, shards=sorted({int(i) // size for i in images}))


def _read_scaled(path: Path, max_side: int, flip: bool):
    import cv2

    img = read_bgr(path)
    if img is None:
        return None
    if flip:
        img = cv2.flip(img, 1)
    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        img = cv2.resize(
            img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
        )
    return img


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def calibrate_search(dim: int, device="cpu", backend=None, nq=1024, nr=16384) -> float:
    """Seconds per (query, reference) vector pair of the shortlist search, measured on a
    synthetic (nq x nr) search of ``dim``-dimensional vectors (small real searches are
    dominated by call overhead and would overstate the time at scale)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(nq, dim, generator=gen).to(device)
    r = torch.randn(nr, dim, generator=gen).to(device)
    best = float("inf")
    for _ in range(3):
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        t0 = time.perf_counter()
        sl.search(q, r, 5, backend)
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        best = min(best, time.perf_counter() - t0)
    return best / (nq * nr)


def extrapolate(cfg: DedupConfig, counts: dict, timings: dict) -> list[tuple[str, str, float]]:
    """(stage, what scales, seconds) for ImageNet-22k vs ImageNet-1k val at measured rates.

    The search rate is the calibrated one (``timings["search"]["calibrated"]``) when present.
    """
    nq, nr = IMAGENET22K_IMAGES, IMAGENET1K_VAL_IMAGES
    entries_per_q = counts["query_entries"] / max(1, counts["query_images"] - counts["failed"])
    q_entries = nq * entries_per_q

    def rate(stage):
        t = timings[stage]
        return t.get("calibrated", t["seconds"] / t["items"])

    rows = []
    if "extract" in timings:
        rows.append(("extract", f"{nq + nr:,} images", (nq + nr) * rate("extract")))
    if cfg.shortlist == "vlad" and "vlad" in timings:
        rows.append(("vlad", f"{q_entries + nr:,.0f} entries", (q_entries + nr) * rate("vlad")))
    if "search" in timings:
        n = q_entries * nr
        rows.append(("search", f"{n:.3g} vector pairs", n * rate("search")))
    if "verify" in timings:
        k = cfg.shortlist_k if cfg.shortlist != "exhaustive" else nr
        n = q_entries * k
        rows.append(("verify", f"{n:.3g} candidate pairs", n * rate("verify")))
        n_all = q_entries * nr
        rows.append(("(exhaustive verify)", f"{n_all:.3g} pairs", n_all * rate("verify")))
    return rows


def _report(cfg, counts, timings, dup, q_images, r_images) -> str:
    v = cfg.verify
    lines = [
        "# ssld dedup report",
        "",
        "## Counts",
        "",
        "| | |",
        "|---|---|",
        f"| query images | {counts['query_images']} ({counts['failed']} unreadable) |",
        f"| reference images | {counts['reference_images']} |",
        f"| query entries (with mirrors: {cfg.flip}) | {counts['query_entries']} |",
        f"| candidate entry pairs verified | {counts['candidate_pairs']} |",
        f"| candidate image pairs | {counts['candidate_image_pairs']} |",
        f"| duplicate pairs (inliers >= {v.min_inliers}) | {counts['duplicate_pairs']} |",
        f"| query images flagged | {counts['flagged_images']} |",
        f"| query images kept (keep.txt) | {counts['kept_images']} |",
        "",
        "## Settings",
        "",
        f"- extraction: longest side {cfg.extract.max_side}, {cfg.extract.max_keypoints} "
        f"keypoints, RootSIFT {cfg.extract.root_sift}, query mirrors {cfg.flip}",
        f"- shortlist: {cfg.shortlist}"
        + (
            f", {cfg.shortlist_k} nearest reference images per query entry"
            if cfg.shortlist != "exhaustive"
            else ""
        )
        + (
            f" (codebook {cfg.clusters} centroids, PCA to {cfg.vlad_dim})"
            if cfg.shortlist == "vlad"
            else ""
        ),
        f"- verification: ratio {v.ratio}, mutual {v.mutual}, one-to-one, geometry "
        f"{v.geometry} ({v.reproj_px} px), min matches {v.min_matches}, "
        f"min inliers {v.min_inliers}",
        "",
        "## Timings (this output folder, all processes)",
        "",
        "| stage | items | seconds | per item |",
        "|---|---|---|---|",
    ]
    for stage, t in timings.items():
        per = t["seconds"] / t["items"] if t["items"] else float("nan")
        lines.append(f"| {stage} | {t['items']:,} | {t['seconds']:.2f} | {per * 1e3:.4g} ms |")
    lines += [
        "",
        "Extraction time is wall time with its worker processes; verification includes the",
        "geometric check. GPU stages are timed with a device synchronisation at stage ends.",
        *(
            [
                f"The search is extrapolated at "
                f"{timings['search']['calibrated'] * 1e9:.3g} ns per vector pair, measured on a "
                f"1024 x 16384 search of {timings['search']['dim']}-d vectors."
            ]
            if "calibrated" in timings.get("search", {})
            else []
        ),
        "",
        f"## Extrapolation: ImageNet-22k ({IMAGENET22K_IMAGES:,}) vs ImageNet-1k val "
        f"({IMAGENET1K_VAL_IMAGES:,})",
        "",
        "At the rates measured above, on this machine, with one process:",
        "",
        "| stage | work | time |",
        "|---|---|---|",
    ]
    for stage, what, seconds in extrapolate(cfg, counts, timings):
        lines.append(f"| {stage} | {what} | {_fmt_seconds(seconds)} |")
    lines += ["", "## Strongest pairs", ""]
    for name, (qi, ri, m, n, fl) in zip(
        counts["pictures"], sorted(dup, key=lambda t: (-t[3], t[0], t[1]))
    ):
        lines.append(
            f"- `{q_images[qi]}`{' (mirrored)' if fl else ''} ~ `{r_images[ri]}`: "
            f"{m} matches, {n} inliers  \n  ![](matches/{name})"
        )
    if not dup:
        lines.append("No duplicates found.")
    return "\n".join(lines) + "\n"
