"""Benchmark exact descriptor matching (SIFT-like uint8, D=128) against OpenCV, torch and FAISS.

    python bench/bench_match.py [--device cpu|cuda] [--sizes 1000x10000,100000x100000] [--k 2]
        [--pairs 4096 --pair-size 512x512 --ratio 0.8] [--providers ...] [--max-seconds 60]
        [--quick] [--out FILE] [--plot]

Cases (random uint8 descriptors, seed 0):
  knn    ``match_knn(q, db, k)`` for each ``--sizes`` NQxNDB (default CPU: 1000x10000,
         5000x20000, 100000x100000; GPU: 100000x100000, 1000000x1000000).
  pairs  ``match_pairs`` over ``--pairs`` image pairs of ``--pair-size`` NAxNB descriptors
         with Lowe's ratio test (default 4096 pairs of 512x512; ``--ragged`` draws sizes).

Providers (``--providers`` picks; missing libraries are skipped with the reason):
  ssld-<backend>    the ssld backends available for the device (cpu/torch on CPU;
                    cuda/triton/torch on GPU; triton on CPU only when named and
                    TRITON_INTERPRET=1, it is for testing)
  torch-cdist-topk  float32 torch.cdist + topk, in query blocks (pairs: batched over padded
                    pairs; padding is masked/far, a speed reference only)
  opencv-bf         cv2.BFMatcher(NORM_L2).knnMatch on float32 copies (pairs: per-pair loop)
  faiss-flat        faiss.IndexFlatL2 on float32 copies (CPU)
  faiss-gpu-fp32/-fp16  faiss.GpuIndexFlatL2, useFloat16 False/True (GPU builds of faiss)
  kornia-snn        kornia.feature.match_snn (full distance matrix), where installed

Metrics: median / p20 / p80 ms, descriptors (queries) per second, pairs per second (pairs
case), G MAC/s = nq * ndb * D / s, TOPS = 2 * nq * ndb * D / s, on GPU the fraction of
the device's dense int8 tensor-core peak and the torch allocator's peak above the inputs.

Exactness is checked before timing on a prefix of the queries (pairs): every provider
against the first available ssld backend (cuda, triton, cpu, torch); ssld backends must be
bit-identical (``exact``), the float providers must agree in distances within tolerance.

Budget: each provider is first run on a growing prefix (this is also the check) and its
full-size time is extrapolated; a provider whose ``--min-reps`` calls would take longer
than ``--max-seconds``, or whose memory estimate exceeds ``--max-mem-gb``, is recorded as
skipped with the reason and the estimate, not run. Times are compared with the best ssld
backend of the same shape, estimates included (marked), and the issue's targets printed.
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment,
    parse_providers,
    time_calls,
    time_fn,
    write_results_extra,
)

import ssld_kernels as sk  # noqa: E402
from ssld_kernels._backends import _op_status  # noqa: E402

SSLD_ORDER = ("cuda", "triton", "cpu", "torch")  # the first available one is the reference
KNOWN_PROVIDERS = (*(f"ssld-{b}" for b in SSLD_ORDER), "torch-cdist-topk", "torch-cdist-topk-fp16",
                   "opencv-bf", "faiss-flat", "faiss-gpu-fp32", "faiss-gpu-fp16", "kornia-snn")  # fmt: skip
CPU_SIZES = "1000x10000,5000x20000,100000x100000"
GPU_SIZES = "100000x100000,1000000x1000000"
QUICK = {
    "sizes": "256x1000,500x2000",
    "pairs": 16,
    "pair_size": "64x64",
    "max_seconds": 2.0,
    "rep_ms": 100.0,
    "calib_seconds": 0.05,
}
# Dense (no sparsity) int8 tensor-core peaks from the vendor datasheets, TOPS, matched by
# substring of torch.cuda.get_device_properties().name, first match wins.
INT8_PEAK_TOPS = (
    ("H100 PCIe", 1513.0),
    ("H100 NVL", 1671.0),
    ("H100", 1979.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 1979.0),
    ("H200", 1979.0),
    ("A100", 624.0),
)
PEAK_TARGET = 0.40  # of the int8 peak, at 1M x 1M
PEAK_TARGET_PAIRS = 1e12  # knn shapes with nq * ndb >= this are held to PEAK_TARGET
SENTINEL = 1.0e4  # far value for padded database rows (descriptors are 0..255)
DEFAULTS = {
    "pairs": 4096,
    "pair_size": "512x512",
    "max_seconds": 60.0,
    "rep_ms": 1000.0,
    "calib_seconds": 0.25,
}
CALIB_START = {"knn": 8, "pairs": 2}
CALIB_CAP = {"knn": 1 << 16, "pairs": 1 << 12}


class Provider:
    """One way of computing a case: ``fn_for(m)`` runs the first m queries (knn) or pairs."""

    def __init__(
        self, name, fn_for, norm, *, ssld=False, compute="float32", rtol=1e-5, mem=None, notes=""
    ):
        self.name, self.fn_for, self.norm = name, fn_for, norm
        self.ssld, self.compute, self.rtol = ssld, compute, rtol
        self.mem = mem or (lambda m: 0)  # bytes needed for the first m units (beyond inputs)
        self.notes = notes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tile_bytes(device):
    return (1 << 30) if device.type == "cuda" else (1 << 28)


def _ssld_backends(device, wanted):
    """(backends to time, {provider: reason} for the missing ones)."""
    status = _op_status("match", device.type)
    use, missing = [], {}
    for b in SSLD_ORDER:
        ok, why = status[b]
        if b == "triton" and device.type == "cpu" and f"ssld-{b}" not in wanted:
            ok, why = False, "the Triton interpreter on CPU is for testing (name ssld-triton)"
        (use.append(b) if ok else missing.__setitem__(f"ssld-{b}", why))
    return use, missing


# ---------------------------------------------------------------------------------- knn


# fp16 cdist works on descriptors scaled to [0, 1]: raw uint8 squared norms (up to 8.3e6)
# overflow float16; distances are scaled back in float32 after the top-k.
FP16_SCALE = 1.0 / 255.0


def _cdist_topk(q, db, k, block, dtype=torch.float32):
    scale = FP16_SCALE if dtype == torch.float16 else 1.0
    dbf = db.to(dtype) * scale if scale != 1.0 else db.to(dtype)
    vals, idx = [], []
    for i in range(0, q.shape[0], block):
        qi = q[i : i + block].to(dtype)
        qi = qi * scale if scale != 1.0 else qi
        v, j = torch.cdist(qi, dbf).topk(k, dim=1, largest=False)
        vals.append((v.float() / scale).pow_(2))
        idx.append(j)
    return torch.cat(vals), torch.cat(idx)


def _norm_knn_torch(out):
    return out[0].float().cpu(), out[1].long().cpu()


def _faiss_gpu(device, dbf, fp16, res):
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in/out of search)
    from faiss.contrib.torch_utils import using_stream

    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = device.index if device.index is not None else torch.cuda.current_device()
    cfg.useFloat16 = fp16
    index = faiss.GpuIndexFlatL2(res, dbf.shape[1], cfg)
    index.add(dbf)

    def search(x, k):
        with using_stream(res):  # faiss works on torch's stream: CUDA events time it
            return index.search(x, k)

    return search


def knn_providers(q, db, k, device, wanted, skipped):
    """Providers for match_knn(q, db, k); unavailable ones go to ``skipped``."""
    ndb, dim = db.shape[0], q.shape[1]
    provs = []
    backends, missing = _ssld_backends(device, wanted)
    skipped.update(missing)
    for b in backends:
        provs.append(
            Provider(
                f"ssld-{b}",
                lambda m, b=b: lambda: sk.match_knn(q[:m], db, k, backend=b),
                _norm_knn_torch,
                ssld=True,
                compute="uint8",
                notes="exact integer squared L2, top-k fused (the public match_knn call)",
            )
        )
    block = max(1, min(4096, _tile_bytes(device) // (4 * ndb)))
    provs.append(
        Provider(
            "torch-cdist-topk",
            lambda m: lambda: _cdist_topk(q[:m], db, k, block),
            _norm_knn_torch,
            mem=lambda m: 3 * 4 * min(m, block) * ndb,
            notes=f"float32 torch.cdist in blocks of {block} queries + topk(k); "
            "the uint8->float32 conversion is timed; the expansion is inexact",
        )
    )
    if device.type == "cuda":
        provs.append(
            Provider(
                "torch-cdist-topk-fp16",
                lambda m: lambda: _cdist_topk(q[:m], db, k, block, torch.float16),
                _norm_knn_torch,
                rtol=2e-2,
                mem=lambda m: 3 * 2 * min(m, block) * ndb,
                notes=f"float16 torch.cdist (descriptors scaled by 1/255) in blocks of {block} "
                "queries + topk(k); conversion timed; inexact, a speed reference",
            )
        )
    qf = dbf = None
    if device.type == "cpu":
        qf, dbf = q.numpy().astype(np.float32), db.numpy().astype(np.float32)
        try:
            import cv2

            cv2.setNumThreads(torch.get_num_threads())
            matcher = cv2.BFMatcher(cv2.NORM_L2)

            def norm_cv(out):
                d = torch.full((len(out), k), float("inf"))
                i = torch.full((len(out), k), -1, dtype=torch.int64)
                for r, ms in enumerate(out):
                    for c, mt in enumerate(ms[:k]):
                        d[r, c], i[r, c] = float(mt.distance) ** 2, mt.trainIdx
                return d, i

            provs.append(
                Provider(
                    "opencv-bf",
                    lambda m: lambda: matcher.knnMatch(qf[:m], dbf, k=k),
                    norm_cv,
                    notes=f"cv2 {cv2.__version__} BFMatcher(NORM_L2).knnMatch on float32 "
                    f"copies (conversion not timed), DMatch objects out, "
                    f"{cv2.getNumThreads()} threads",
                )
            )
        except ImportError as e:
            skipped["opencv-bf"] = f"opencv not installed ({e})"
        try:
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())
            index = faiss.IndexFlatL2(dim)
            index.add(dbf)
            provs.append(
                Provider(
                    "faiss-flat",
                    lambda m: lambda: index.search(qf[:m], k),
                    lambda out: (torch.from_numpy(out[0]), torch.from_numpy(out[1])),
                    notes=f"faiss {faiss.__version__} IndexFlatL2.search on float32 copies "
                    f"(conversion and add not timed), {torch.get_num_threads()} OpenMP threads",
                )
            )
        except ImportError as e:
            skipped["faiss-flat"] = f"faiss not installed ({e}); pip install faiss-cpu"
    else:
        qf, dbf = q.float(), db.float()
        try:
            import faiss

            if not hasattr(faiss, "StandardGpuResources"):
                raise ImportError("this faiss build has no GPU support (faiss-cpu)")
            res = faiss.StandardGpuResources()
            for fp16 in (False, True):
                name = f"faiss-gpu-{'fp16' if fp16 else 'fp32'}"
                try:
                    search = _faiss_gpu(device, dbf, fp16, res)
                except Exception as e:  # e.g. a wheel built for another CUDA
                    skipped[name] = f"faiss GPU index failed: {e!r}"[:300]
                    continue
                provs.append(
                    Provider(
                        name,
                        lambda m, search=search: lambda: search(qf[:m], k),
                        _norm_knn_torch,
                        compute="float16" if fp16 else "float32",
                        rtol=1e-3 if fp16 else 1e-5,
                        notes=f"faiss {faiss.__version__} GpuIndexFlatL2(useFloat16={fp16}) "
                        "on float32 CUDA tensors (conversion and add not timed); faiss "
                        "allocates outside torch's allocator (peak memory not measured)",
                    )
                )
        except ImportError as e:
            for n in ("faiss-gpu-fp32", "faiss-gpu-fp16"):
                skipped[n] = f"faiss with GPU support not importable ({e})"
    try:
        from kornia.feature import match_snn

        qk, dbk = q.float(), db.float()

        def norm_kornia(out):
            # match_snn returns the 1st/2nd distance ratio, not a distance: the exact
            # squared distance of each returned pair is recomputed from the data.
            _, idxs = out
            idxs = idxs.long()
            n = int(idxs[:, 0].max()) + 1 if idxs.numel() else 0
            d = torch.full((n, 1), float("inf"))
            i = torch.full((n, 1), -1, dtype=torch.int64)
            d2 = (qk[idxs[:, 0]].double() - dbk[idxs[:, 1]].double()).pow(2).sum(1)
            d[idxs[:, 0].cpu(), 0] = d2.float().cpu()
            i[idxs[:, 0].cpu(), 0] = idxs[:, 1].cpu()
            return d, i

        provs.append(
            Provider(
                "kornia-snn",
                lambda m: lambda: match_snn(qk[:m], dbk, th=1.0),
                norm_kornia,
                mem=lambda m: 3 * 4 * m * ndb,
                notes="kornia.feature.match_snn(th=1.0) on float32 copies (conversion not "
                "timed): full distance matrix + top-2; it returns the nearest neighbour and the "
                "distance ratio, so the check compares the exact distance of that neighbour",
            )
        )
    except ImportError as e:
        skipped["kornia-snn"] = f"kornia not installed ({e})"
    return provs


# -------------------------------------------------------------------------------- pairs


def _cdist_pairs(A, B, na, ratio, chunk, scale=1.0):
    """Batched ratio test over padded pairs: (keep (P, na_max), best j, best distance)."""
    rows = torch.arange(A.shape[1], device=A.device)
    keep, jj, dd = [], [], []
    for c in range(0, A.shape[0], chunk):
        v, j = torch.cdist(A[c : c + chunk], B[c : c + chunk]).topk(2, dim=2, largest=False)
        v = v.float() / scale
        keep.append((v[..., 0] < ratio * v[..., 1]) & (rows < na[c : c + chunk, None]))
        jj.append(j[..., 0])
        dd.append(v[..., 0])
    return torch.cat(keep), torch.cat(jj), torch.cat(dd)


def _norm_pairs_torch(out):
    return [(p.cpu(), d.float().cpu()) for p, d in out]


def _pair_dist2(a, b, ij):
    """Exact squared distances of index pairs ``ij`` (m, 2) between uint8 rows, on the CPU."""
    a, b, ij = a.cpu().long(), b.cpu().long(), ij.cpu()
    return (a[ij[:, 0]] - b[ij[:, 1]]).pow(2).sum(1).float()


def pair_providers(a_list, b_list, ratio, device, wanted, skipped):
    provs = []
    backends, missing = _ssld_backends(device, wanted)
    skipped.update(missing)
    for b in backends:
        provs.append(
            Provider(
                f"ssld-{b}",
                lambda m, b=b: (
                    lambda: sk.match_pairs(a_list[:m], b_list[:m], ratio=ratio, backend=b)
                ),
                _norm_pairs_torch,
                ssld=True,
                compute="uint8",
                notes="one match_pairs call over the ragged pairs (lists of uint8 tensors)",
            )
        )
    n_pairs, dim = len(a_list), a_list[0].shape[1]
    na = torch.tensor([x.shape[0] for x in a_list], device=device)
    na_max, nb_max = int(na.max()), max(x.shape[0] for x in b_list)
    A = torch.zeros(n_pairs, na_max, dim, device=device)
    B = torch.full((n_pairs, nb_max, dim), SENTINEL, device=device)
    for p, (a, b) in enumerate(zip(a_list, b_list)):
        A[p, : a.shape[0]] = a.float()
        B[p, : b.shape[0]] = b.float()
    chunk = max(1, _tile_bytes(device) // (4 * na_max * nb_max))

    def norm_cdist(out):
        keep, j, d = (t.cpu() for t in out)
        res = []
        for p in range(keep.shape[0]):
            i = keep[p].nonzero()[:, 0]
            res.append((torch.stack([i, j[p, i]], 1), d[p, i] ** 2))
        return res

    provs.append(
        Provider(
            "torch-cdist-topk",
            lambda m: lambda: _cdist_pairs(A[:m], B[:m], na[:m], ratio, chunk),
            norm_cdist,
            notes=f"batched float32 torch.cdist + topk(2) over pairs padded to {na_max}x"
            f"{nb_max}, {chunk} pairs per chunk; padded queries masked, padded database rows "
            f"set to a far sentinel ({SENTINEL:g}); zero padding could self-match, so this is "
            "only a speed reference; padding/conversion not timed; per-pair lists not built",
        )
    )
    if device.type == "cuda":
        A16, B16 = (A * FP16_SCALE).half(), (B.clamp(max=255.0 * 8) * FP16_SCALE).half()
        provs.append(
            Provider(
                "torch-cdist-topk-fp16",
                lambda m: lambda: _cdist_pairs(A16[:m], B16[:m], na[:m], ratio, chunk, FP16_SCALE),
                norm_cdist,
                rtol=2e-2,
                notes="as torch-cdist-topk in float16 on descriptors scaled by 1/255 (sentinel "
                "clamped to 2040 so that squared norms stay finite); a speed reference only",
            )
        )
    if device.type == "cpu":
        try:
            import cv2

            cv2.setNumThreads(torch.get_num_threads())
            matcher = cv2.BFMatcher(cv2.NORM_L2)
            af = [x.numpy().astype(np.float32) for x in a_list]
            bf = [x.numpy().astype(np.float32) for x in b_list]

            def cv_loop(m):
                out = []
                for a, b in zip(af[:m], bf[:m]):
                    ms = matcher.knnMatch(a, b, k=2)
                    out.append(
                        [p[0] for p in ms if len(p) == 2 and p[0].distance < ratio * p[1].distance]
                    )
                return out

            def norm_cv(out):
                return [
                    (
                        torch.tensor(
                            [[mt.queryIdx, mt.trainIdx] for mt in ms], dtype=torch.int64
                        ).reshape(-1, 2),
                        torch.tensor([float(mt.distance) ** 2 for mt in ms], dtype=torch.float32),
                    )
                    for ms in out
                ]

            provs.append(
                Provider(
                    "opencv-bf",
                    lambda m: lambda: cv_loop(m),
                    norm_cv,
                    notes=f"cv2 {cv2.__version__} per-pair Python loop of BFMatcher(NORM_L2)"
                    ".knnMatch(k=2) + ratio test on its float32 distances (conversion not timed)",
                )
            )
        except ImportError as e:
            skipped["opencv-bf"] = f"opencv not installed ({e})"
    try:
        from kornia.feature import match_snn

        af_t = [x.float() for x in a_list]
        bf_t = [x.float() for x in b_list]

        def kornia_loop(m):
            return [match_snn(a, b, th=ratio) for a, b in zip(af_t[:m], bf_t[:m])]

        provs.append(
            Provider(
                "kornia-snn",
                lambda m: lambda: kornia_loop(m),
                lambda out: [
                    (i.long().cpu(), _pair_dist2(a_list[p], b_list[p], i.long()))
                    for p, (_, i) in enumerate(out)
                ],
                notes="per-pair loop of kornia.feature.match_snn(th=ratio) on float32 copies "
                "(keeps ratio <= th, ssld keeps < ratio; distances recomputed for the check)",
            )
        )
    except ImportError as e:
        skipped["kornia-snn"] = f"kornia not installed ({e})"
    return provs


# ------------------------------------------------------------------------------- checks


def check_knn(got, ref, prov):
    d, i = got
    kk = d.shape[1]
    rd, ri = ref[0][: d.shape[0], :kk], ref[1][: d.shape[0], :kk]
    exact = torch.equal(d, rd) and torch.equal(i, ri)
    scale = max(float(rd[torch.isfinite(rd)].max()) if rd.numel() else 1.0, 1.0)
    err = float((d.double() - rd.double()).abs().max()) if d.numel() else 0.0
    agree = float((i[:, 0] == ri[:, 0]).double().mean()) if i.numel() else 1.0
    ok = exact if prov.ssld else err <= prov.rtol * scale
    return {
        "exact": exact,
        "ok": ok,
        "max_abs_dist2_err": err,
        "max_rel_dist2_err": err / scale,
        "rtol": 0.0 if prov.ssld else prov.rtol,
        "top1_index_agree": agree,
        "checked_rows": d.shape[0],
    }


def check_pairs(got, ref, prov):
    exact = len(got) == len(ref) and all(
        torch.equal(p, rp) and torch.equal(d, rd) for (p, d), (rp, rd) in zip(got, ref)
    )
    mine, theirs, err, scale = {}, {}, 0.0, 1.0
    for g, ((p, d), (rp, rd)) in enumerate(zip(got, ref)):
        mine.update({(g, *map(int, pq)): float(x) for pq, x in zip(p.tolist(), d.tolist())})
        theirs.update({(g, *map(int, pq)): float(x) for pq, x in zip(rp.tolist(), rd.tolist())})
        if rd.numel():
            scale = max(scale, float(rd.max()))
    common = mine.keys() & theirs.keys()
    union = mine.keys() | theirs.keys()
    for key in common:
        err = max(err, abs(mine[key] - theirs[key]))
    agree = len(common) / len(union) if union else 1.0
    ok = exact if prov.ssld else err <= prov.rtol * scale and agree >= 0.99
    return {
        "exact": exact,
        "ok": ok,
        "match_agree": agree,
        "matches": len(mine),
        "ref_matches": len(theirs),
        "max_abs_dist2_err": err,
        "max_rel_dist2_err": err / scale,
        "rtol": 0.0 if prov.ssld else prov.rtol,
        "checked_pairs": len(got),
    }


# ------------------------------------------------------------------------------ running


def calibrate(prov, mode, units, work, args, device):
    """Run growing prefixes until one takes calib_seconds: (m, output, seconds, est seconds).

    Each prefix is timed twice and the faster call kept (a loaded machine has hiccups); the
    estimate scales that time by the work ratio, so fixed per-call costs make it high.
    """
    m = min(units, CALIB_START[mode])
    cap = min(units, CALIB_CAP[mode])
    first = True
    while True:
        fn = prov.fn_for(m)
        if first or device.type == "cuda":
            fn()  # warm-up / compile for this shape
            _sync(device)
            first = False
        dt = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            dt = min(dt, time.perf_counter() - t0)
            if dt >= 10 * args.calib_seconds:
                break
        if dt >= args.calib_seconds or m >= cap:
            return m, out, dt, dt * work(units) / work(m)
        m = min(cap, m * 4)


def run_case(mode, provs, units, work, meta, ref_fn, check, args, device, env, rows):
    """Check, budget and time every provider of one shape; rows appended to ``rows``."""
    ref_cache = {}
    shape_rows = []
    for prov in provs:
        base = {
            **meta,
            "provider": prov.name,
            "mode": mode,
            "compute": prov.compute,
            "device": device.type,
            "git_sha": env["git_sha"],
            "notes": prov.notes,
        }
        try:
            m, out, dt, est = calibrate(prov, mode, units, work, args, device)
            if m not in ref_cache:
                ref_cache[m] = ref_fn(m)
            chk = check(prov.norm(out), ref_cache[m], prov)
            del out
            r = {
                **base,
                "exact": chk["exact"],
                "check": chk,
                "calib": {"units": m, "ms": dt * 1e3},
                "est_median_ms": est * 1e3,
            }
            calls = args.min_reps + (1 if device.type == "cuda" else 0)
            need = prov.mem(units)
            if est * calls > args.max_seconds:
                r["skipped"] = (
                    f"estimated {est:.3g} s per call (extrapolated from {m} of {units}) x "
                    f"{calls} calls > --max-seconds {args.max_seconds:g}"
                )
            elif need > args.max_mem_bytes:
                r["skipped"] = (
                    f"needs ~{need / 2**30:.1f} GiB > --max-mem-gb {args.max_mem_bytes / 2**30:.1f}"
                )
            else:
                fn = prov.fn_for(units)
                peak = None
                if device.type == "cuda":  # full-size warm-up that also measures memory
                    torch.cuda.synchronize(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    fn()
                    torch.cuda.synchronize(device)
                    peak = torch.cuda.max_memory_allocated(device) - before
                if est * 1e3 <= args.rep_ms / args.min_reps:
                    t = time_fn(fn, device, rep_ms=args.rep_ms, min_reps=args.min_reps)
                else:
                    t = time_calls(fn, device, reps=args.min_reps)
                r.update(t)
                r["peak_extra_bytes"] = peak
                _rates(r, r["median_ms"], meta, env, "")
            if "skipped" in r:
                _rates(r, r["est_median_ms"], meta, env, "est_")
        except Exception as e:  # a provider that cannot run a case is reported, not fatal
            r = {**base, "error": repr(e)[:300]}
        shape_rows.append(r)
        rows.append(r)
        _print_row(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _ratios(shape_rows)


def _rates(r, ms, meta, env, prefix):
    s = ms * 1e-3
    evals = meta["dist_evals"]
    dim = meta["shape"][-1]
    r[prefix + "gmacs"] = evals * dim / s / 1e9
    r[prefix + "tops"] = 2 * evals * dim / s / 1e12
    r[prefix + "descriptors_per_s"] = meta["n_queries"] / s
    if "n_pairs" in meta:
        r[prefix + "pairs_per_s"] = meta["n_pairs"] / s
    if env.get("int8_peak_tops"):
        r[prefix + "frac_int8_peak"] = r[prefix + "tops"] / env["int8_peak_tops"]


def _time_of(r):
    """(ms, estimated?) of a row: measured median, else the extrapolation of a skipped row."""
    if "median_ms" in r:
        return r["median_ms"], False
    if "est_median_ms" in r:
        return r["est_median_ms"], True
    return None, False


def _ratios(shape_rows):
    ssld = [r for r in shape_rows if r["provider"].startswith("ssld-") and "median_ms" in r]
    if not ssld:
        return
    best = min(ssld, key=lambda r: r["median_ms"])
    for r in shape_rows:
        ms, est = _time_of(r)
        if ms is not None:
            r["ssld_best"] = best["provider"]
            r["time_vs_ssld_best"] = ms / best["median_ms"]
            r["time_vs_ssld_best_estimated"] = est


def _shape_str(r):
    return "x".join(str(v) for v in r["shape"])


def _print_row(r):
    head = f"{r['provider']:17s} {r['mode']:5s} {_shape_str(r):22s}"
    if "error" in r:
        print(f"{head} ERROR {r['error']}", flush=True)
        return
    chk = r["check"]
    tag = "exact" if chk["exact"] else ("ok" if chk["ok"] else "MISMATCH")
    tag += f" (rel err {chk['max_rel_dist2_err']:.1e})" if not chk["exact"] else ""
    if "skipped" in r:
        print(f"{head} skipped: {r['skipped']}; est {r['est_tops']:.3g} TOPS; {tag}", flush=True)
        return
    peak = f" {100 * r['frac_int8_peak']:5.1f}% int8 peak" if "frac_int8_peak" in r else ""
    mem = "" if r["peak_extra_bytes"] is None else f" extra {r['peak_extra_bytes'] / 2**20:.0f} MiB"
    pairs = f" {r['pairs_per_s']:.3g} pairs/s" if "pairs_per_s" in r else ""
    print(
        f"{head} {r['median_ms']:10.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] "
        f"{r['descriptors_per_s']:9.3g} desc/s{pairs} {r['gmacs']:8.1f} GMAC/s "
        f"{r['tops']:7.3f} TOPS{peak}{mem}  {tag}",
        flush=True,
    )


def print_ratios(rows):
    print("\ntime / time of the best ssld backend at the same shape (>1: ssld is faster):")
    for mode in ("knn", "pairs"):
        for shape in _shapes(rows, mode):
            rs = [r for r in rows if r["mode"] == mode and r["shape"] == shape]
            best = next((r.get("ssld_best") for r in rs if r.get("ssld_best")), None)
            if best is None:
                continue
            print(f"  {mode} {'x'.join(map(str, shape))} (best: {best})")
            for r in rs:
                if "time_vs_ssld_best" in r:
                    est = " (estimated, not run)" if r["time_vs_ssld_best_estimated"] else ""
                    print(f"    {r['provider']:17s} {r['time_vs_ssld_best']:9.2f}x{est}")


def _shapes(rows, mode):
    out = []
    for r in rows:
        if r["mode"] == mode and r["shape"] not in out:
            out.append(r["shape"])
    return out


def targets(rows, device, env):
    """The issue's targets, evaluated per shape (estimates are marked)."""
    out = []

    def row(rs, name):
        return next((r for r in rs if r["provider"] == name), None)

    for mode in ("knn", "pairs"):
        for shape in _shapes(rows, mode):
            rs = [r for r in rows if r["mode"] == mode and r["shape"] == shape]
            key = {"mode": mode, "shape": shape}
            if device.type == "cpu":
                mine = row(rs, "ssld-cpu")
                if mine is None or "median_ms" not in mine:
                    continue
                for other, need in (("opencv-bf", 1.0), ("torch-cdist-topk", 2.0)):
                    o = row(rs, other)
                    ms, est = _time_of(o) if o else (None, False)
                    out.append(
                        {
                            **key,
                            "target": f"ssld-cpu >= {need:g}x {other}"
                            + (" (faster)" if need == 1.0 else ""),
                            "value": None if ms is None else ms / mine["median_ms"],
                            "threshold": need,
                            "estimated": est,
                        }
                    )
            else:
                gpu = [
                    r
                    for r in rs
                    if r["provider"] in ("ssld-cuda", "ssld-triton") and "median_ms" in r
                ]
                if not gpu:
                    continue
                mine = min(gpu, key=lambda r: r["median_ms"])
                for other in ("faiss-gpu-fp32", "faiss-gpu-fp16"):
                    o = row(rs, other)
                    ms, est = _time_of(o) if o else (None, False)
                    out.append(
                        {
                            **key,
                            "target": f"{mine['provider']} >= 3x {other}",
                            "value": None if ms is None else ms / mine["median_ms"],
                            "threshold": 3.0,
                            "estimated": est,
                        }
                    )
                big = mode == "knn" and shape[0] * shape[1] >= PEAK_TARGET_PAIRS
                if big and mine.get("frac_int8_peak") is not None:
                    out.append(
                        {
                            **key,
                            "target": f"{mine['provider']} >= {PEAK_TARGET:.0%} of the int8 "
                            f"peak ({env['int8_peak_tops']:g} TOPS)",
                            "value": mine["frac_int8_peak"],
                            "threshold": PEAK_TARGET,
                            "estimated": False,
                        }
                    )
    for t in out:
        t["pass"] = None if t["value"] is None else t["value"] >= t["threshold"]
    return out


def print_targets(tg):
    if not tg:
        return
    print("\nissue targets:")
    for t in tg:
        v = "n/a (provider missing)" if t["value"] is None else f"{t['value']:.2f}"
        verdict = {True: "PASS", False: "FAIL", None: "-"}[t["pass"]]
        est = " (estimate: the other provider was not run)" if t["estimated"] else ""
        shape = "x".join(map(str, t["shape"]))
        print(f"  {t['mode']:5s} {shape:22s} {t['target']:48s} {v:>8s}  {verdict}{est}")


def int8_peak(name, override):
    if override:
        return override, "--peak-tops"
    for key, tops in INT8_PEAK_TOPS:
        if key in name:
            return tops, f"datasheet dense int8 for '{key}'"
    return None, "unknown device: pass --peak-tops"


def _mem_limit(device, gb):
    if gb:
        return gb * 2**30
    if device.type == "cuda":
        return 0.8 * torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _rand(gen, n, dim, device):
    return torch.randint(0, 256, (n, dim), generator=gen, dtype=torch.uint8).to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help="NQxNDB list for knn; '' skips the knn case")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=None, help="image pairs (4096); 0 skips")
    ap.add_argument("--pair-size", default=None, help="NAxNB descriptors per pair (512x512)")
    ap.add_argument("--ragged", action="store_true", help="draw pair sizes in [N/2, N]")
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--providers", default="", help="comma list, e.g. ssld-cpu,opencv-bf")
    ap.add_argument(
        "--max-seconds", type=float, default=None, help="timing budget per provider and shape (60)"
    )
    ap.add_argument("--max-mem-gb", type=float, default=None, help="default: 0.8 GPU free, 0.5 RAM")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--rep-ms", type=float, default=None, help="timing window of fast calls (1000)")
    ap.add_argument("--calib-seconds", type=float, default=None, help="calibration target (0.25)")
    ap.add_argument("--peak-tops", type=float, default=None, help="int8 peak of the GPU")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and budgets (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true", help="write a PNG of TOPS per provider")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    defaults = dict(DEFAULTS, sizes=GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    for key, val in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:  # explicit flags win over --quick
            setattr(args, key, val)
    wanted = parse_providers(args.providers, KNOWN_PROVIDERS, "bench_match")
    args.max_mem_bytes = _mem_limit(device, args.max_mem_gb)
    env = environment(device)
    if device.type == "cuda":
        env["int8_peak_tops"], env["int8_peak_source"] = int8_peak(env["device"], args.peak_tops)
    config = dict(vars(args))
    out_path = Path(args.out) if args.out else None
    if args.quick and out_path is None:  # smoke runs stay out of bench/results
        out_path = Path(tempfile.gettempdir()) / "bench_match_quick.json"
    gen = torch.Generator().manual_seed(args.seed)
    rows, skipped = [], {}

    def keep(provs):
        return [p for p in provs if not wanted or p.name in wanted]

    def unavailable():
        return {k: v for k, v in skipped.items() if not wanted or k in wanted}

    def save():
        extra = {
            "config": config,
            "unavailable": unavailable(),
            "targets": targets(rows, device, env),
        }
        return write_results_extra("match", env, rows, extra, out_path)

    ref_backend = _ssld_backends(device, [])[0][0]  # compiled first; no interpreter
    for size in [s for s in args.sizes.split(",") if s]:
        nq, ndb = (int(v) for v in size.split("x"))
        q, db = _rand(gen, nq, args.dim, device), _rand(gen, ndb, args.dim, device)
        meta = {
            "op": "match_knn",
            "shape": [nq, ndb, args.dim],
            "k": args.k,
            "dtype": "uint8",
            "n_queries": nq,
            "dist_evals": nq * ndb,
        }
        provs = keep(knn_providers(q, db, args.k, device, wanted, skipped))
        run_case(
            "knn",
            provs,
            nq,
            lambda m, ndb=ndb: m * ndb,
            meta,
            lambda m, q=q, db=db: _norm_knn_torch(
                sk.match_knn(q[:m], db, args.k, backend=ref_backend)
            ),
            check_knn,
            args,
            device,
            env,
            rows,
        )
        del provs, q, db
        save()  # partial results survive a kill
    if args.pairs > 0:
        na, nb = (int(v) for v in args.pair_size.split("x"))
        if args.ragged:
            sizes = [
                (
                    int(torch.randint(na // 2, na + 1, (1,), generator=gen)),
                    int(torch.randint(max(2, nb // 2), nb + 1, (1,), generator=gen)),
                )
                for _ in range(args.pairs)
            ]
        else:
            sizes = [(na, nb)] * args.pairs
        a_list = [_rand(gen, x, args.dim, device) for x, _ in sizes]
        b_list = [_rand(gen, y, args.dim, device) for _, y in sizes]
        cum = np.concatenate([[0], np.cumsum([x * y for x, y in sizes])])
        meta = {
            "op": "match_pairs",
            "shape": [args.pairs, na, nb, args.dim],
            "ratio": args.ratio,
            "ragged": args.ragged,
            "dtype": "uint8",
            "n_pairs": args.pairs,
            "n_queries": sum(x for x, _ in sizes),
            "dist_evals": int(cum[-1]),
        }
        provs = keep(pair_providers(a_list, b_list, args.ratio, device, wanted, skipped))
        run_case(
            "pairs",
            provs,
            args.pairs,
            lambda m: int(cum[m]),
            meta,
            lambda m: _norm_pairs_torch(
                sk.match_pairs(a_list[:m], b_list[:m], ratio=args.ratio, backend=ref_backend)
            ),
            check_pairs,
            args,
            device,
            env,
            rows,
        )
    if unavailable():
        print("\nunavailable providers:")
        for name, why in unavailable().items():
            print(f"  {name:17s} {why}")
    print_ratios(rows)
    tg = targets(rows, device, env)
    print_targets(tg)
    path = save()
    print(f"wrote {path}")
    if args.plot:
        _plot(rows, path.with_suffix(".png"), env)
    off = sorted({r["provider"] for r in rows if r.get("check") and not r["check"]["ok"]})
    bad = [p for p in off if p.startswith("ssld-")]
    if off:
        print(f"results differ from the reference beyond tolerance: {off} (see 'check')")
    if bad:  # ssld backends must be bit-identical: that is a bug, not a number
        sys.exit(1)
    return rows


def _plot(rows, path, env=None):
    """Bars of TOPS per provider (hatched: extrapolated for a skipped provider), per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    env = env or {}
    rows = [dict(r, mode=r.get("mode", "knn")) for r in rows]
    modes = [m for m in ("knn", "pairs") if any(r["mode"] == m for r in rows)]
    if not modes:
        return
    colour = {p: f"C{i % 10}" for i, p in enumerate(sorted({r["provider"] for r in rows}))}
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rs = [r for r in rows if r["mode"] == mode]
        shapes = _shapes(rs, mode)
        provs = sorted({r["provider"] for r in rs})
        width = 0.8 / max(1, len(provs))
        for pi, prov in enumerate(provs):
            for si, shape in enumerate(shapes):
                r = next((r for r in rs if r["provider"] == prov and r["shape"] == shape), None)
                if r is None:
                    continue
                tops, est = _tops_of(r)
                if tops is None:
                    continue
                ax.bar(
                    si + (pi - (len(provs) - 1) / 2) * width,
                    tops,
                    width,
                    color=colour[prov],
                    alpha=0.35 if est else 1.0,
                    hatch="//" if est else None,
                    label=prov,
                )
        labels = []
        for shape in shapes:
            labels.append("x".join(map(str, shape[:-1])))
        ax.set_xticks(range(len(shapes)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("TOPS (2 nq ndb D / s)")
        ax.set_title(f"{mode}: {env.get('device', '')}  (hatched: estimated, not run)", fontsize=9)
        peak = env.get("int8_peak_tops")
        if peak:
            ax.axhline(PEAK_TARGET * peak, color="k", ls="--", lw=0.8)
            ax.text(0, PEAK_TARGET * peak, f" {PEAK_TARGET:.0%} int8 peak", fontsize=7, va="bottom")
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _tops_of(r):
    """(TOPS, estimated?) of a row; rows of older JSON files have no TOPS, only the time."""
    if "tops" in r:
        return r["tops"], False
    if "est_tops" in r:
        return r["est_tops"], True
    if "median_ms" in r and len(r.get("shape", [])) == 3:
        nq, ndb, dim = r["shape"]
        return 2 * nq * ndb * dim / (r["median_ms"] * 1e-3) / 1e12, False
    return None, False


if __name__ == "__main__":
    main()
