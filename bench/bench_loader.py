"""Training-loader throughput: the DataLoader path against the DALI loader, same samples.

    python bench/bench_loader.py --images 1024 --workers 2             # CPU: torch, dali-cpu
    python bench/bench_loader.py --images 20000 --workers 16           # GPU: + dali-gpu

Images: a generated folder of ImageNet-like JPEGs (500 x 375, quality 90, crops of the
scikit-image photos, each image different) read through the page cache, so this measures
decoding + RandomResizedCrop(224) + flip + the host->device copy, not the disk.

Providers (``ssld.train`` loaders, same ResumableSampler order and crops):
  torch     DataLoader, OpenCV decode + resize in ``--workers`` processes, pinned uint8
            batches copied to the device (what the trainer does)
  dali-cpu  DaliLoader(decode="cpu"): DALI CPU decoder/resize, ``--workers`` threads
  dali-gpu  DaliLoader(decode="gpu"): nvJPEG (+ hardware decoder) ROI decode, GPU resize
Reported: img/s (after a warm-up of 3 batches: worker start-up excluded), img/s per worker,
the ratio to torch. Writes bench/results/loader-<device>-<sha>.json.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results_extra  # noqa: E402

from ssld.data.train import ResumableSampler, TrainSet, TrainTransform  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct 500 x 375 JPEGs (q90) cut from the scikit-image photos."""
    import cv2
    from skimage import data

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.hubble_deep_field(),
    ]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = cv2.resize(p[y : y + ch, x : x + cw], (500, 375), interpolation=cv2.INTER_AREA)
        rel = f"img{i:06d}.jpg"
        cv2.imwrite(str(folder / rel), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(rel)
    return paths


def _loader(kind, ds, sampler, batch, workers, device):
    if kind == "torch":
        from ssld.data import worker_options

        return torch.utils.data.DataLoader(
            ds, batch_size=batch, sampler=sampler, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None, **worker_options(workers),
        )  # fmt: skip
    from ssld.data.dali import DaliLoader

    decode = kind.split("-")[1]
    return DaliLoader(ds, sampler, batch, device=device, decode=decode, workers=workers)


def measure(kind, ds, batch, workers, device, warmup=3) -> dict:
    sampler = ResumableSampler(len(ds), batch, seed=0)
    loader = _loader(kind, ds, sampler, batch, workers, device)
    n_batches = len(sampler) // batch
    sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):
        imgs = next(it)[0].to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    done = 0
    for batch_ in it:
        imgs = batch_[0].to(device, non_blocking=True)
        done += imgs.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    del it, loader
    return {
        "provider": kind,
        "images": done,
        "batches": n_batches - warmup,
        "seconds": dt,
        "img_per_s": done / dt,
        "img_per_s_per_worker": done / dt / max(1, workers),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--providers", default="auto", help="comma list or auto")
    ap.add_argument("--folder", default=None, help="reuse/keep the generated images here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    providers = args.providers.split(",") if args.providers != "auto" else ["torch"]
    if args.providers == "auto":
        try:
            import nvidia.dali  # noqa: F401

            providers += ["dali-cpu"] + (["dali-gpu"] if device.type == "cuda" else [])
        except ImportError:
            print("DALI not installed: measuring the DataLoader only")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in folder.glob("img*.jpg"))
        paths = existing if len(existing) >= args.images else make_images(folder, args.images)
        paths = paths[: args.images]
        tf = TrainTransform(args.input_size, 0.08, True, seed=0)
        ds = TrainSet([(folder, paths, [-1] * len(paths))], tf)
        rows = []
        for kind in providers:
            row = measure(kind, ds, args.batch_size, args.workers, device)
            row.update(workers=args.workers, batch=args.batch_size, input_size=args.input_size)
            rows.append(row)
    base = next((r["img_per_s"] for r in rows if r["provider"] == "torch"), None)
    print(f"{'provider':10s} {'img/s':>9s} {'per worker':>11s} {'vs torch':>9s}")
    for r in rows:
        ratio = r["img_per_s"] / base if base else float("nan")
        r["vs_torch"] = ratio
        print(
            f"{r['provider']:10s} {r['img_per_s']:9.0f} {r['img_per_s_per_worker']:11.0f} "
            f"{ratio:8.2f}x"
        )
    env = environment(device)
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    path = write_results_extra(
        "loader", env, rows, {"images": args.images, "jpeg": "500x375 q90"},
        Path(args.out) if args.out else None,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
