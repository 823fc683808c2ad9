"""Benchmark exact k-NN descriptor matching (SIFT-like uint8, D=128) against OpenCV and torch.

    python bench/bench_match.py [--sizes 2000x20000,5000x50000] [--k 2] [--out FILE]

Providers: ssld backends (cpu, torch), OpenCV's ``cv2.BFMatcher(NORM_L2).knnMatch`` (float32,
the usual way SIFT descriptors are matched) and, for the float32 reference point, a blocked
``torch.cdist`` + ``topk`` (inexact: the expansion cancels). Rate = nq * ndb * D
multiply-adds over the median time. Results are checked against each other before timing.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, time_fn, write_results  # noqa: E402

import ssld_kernels as sk  # noqa: E402
from ssld_kernels._backends import _op_status  # noqa: E402


def _cdist_topk(q, db, k, block=4096):
    qf, dbf = q.float(), db.float()
    out = [
        torch.cdist(qf[i : i + block], dbf).pow_(2).topk(k, largest=False)
        for i in range(0, len(qf), block)
    ]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def run_size(nq, ndb, args, gen, rows):
    q = torch.randint(0, 256, (nq, args.dim), generator=gen, dtype=torch.uint8)
    db = torch.randint(0, 256, (ndb, args.dim), generator=gen, dtype=torch.uint8)
    provs = {}
    status = _op_status("match", "cpu")
    for b in ("cpu", "torch"):
        if status[b][0] and not (b == "torch" and nq * ndb > 2e7):
            provs[f"ssld-{b}"] = lambda b=b: sk.match_knn(q, db, args.k, backend=b)
    provs["torch-cdist-topk"] = lambda: _cdist_topk(q, db, args.k)
    try:
        import cv2

        qf, dbf = q.numpy().astype(np.float32), db.numpy().astype(np.float32)
        matcher = cv2.BFMatcher(cv2.NORM_L2)
        provs["opencv-bf"] = lambda: matcher.knnMatch(qf, dbf, k=args.k)
    except ImportError:
        pass
    ref = sk.match_knn(q, db, args.k, backend="torch") if "ssld-torch" in provs else None
    for name, fn in provs.items():
        if ref is not None and name == "ssld-cpu":
            got = fn()
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (
                "cpu != torch reference"
            )
        t = time_fn(fn, torch.device("cpu"), rep_ms=1000, min_reps=3)
        macs = nq * ndb * args.dim
        r = {
            "op": "match_knn",
            "provider": name,
            "shape": [nq, ndb, args.dim],
            "k": args.k,
            "dtype": "uint8",
            "device": "cpu",
            **t,
            "gmacs": macs / (t["median_ms"] * 1e-3) / 1e9,
        }
        rows.append(r)
        print(
            f"{name:18s} {nq}x{ndb}x{args.dim} k={args.k}  {t['median_ms']:10.2f} ms  {r['gmacs']:8.1f} G MAC/s",
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000x10000,5000x20000")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    env = environment(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes.split(","):
        nq, ndb = (int(v) for v in size.split("x"))
        run_size(nq, ndb, args, gen, rows)
    base = {tuple(r["shape"]): r["median_ms"] for r in rows if r["provider"] == "opencv-bf"}
    for r in rows:
        b = base.get(tuple(r["shape"]))
        if b and r["provider"] != "opencv-bf":
            r["speedup_vs_opencv"] = b / r["median_ms"]
            print(
                f"  {r['provider']:18s} {tuple(r['shape'])}  {r['speedup_vs_opencv']:6.1f}x OpenCV BFMatcher"
            )
    path = write_results("match", env, rows, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
