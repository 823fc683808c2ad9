"""Benchmark `ssld select`: what the selection machinery costs on top of teacher inference.

    python bench/bench_select.py                     # GPU: timm resnet50 + resnext101_32x16d
    python bench/bench_select.py --models tiny --batch-size 32 --input-size 64   # CPU smoke

Modes, per model, same batch size and precision (bf16 autocast + channels_last on GPU):
  model             the teacher's forward on a ready, normalised device tensor: its own
                    inference throughput, the ceiling
  select-synthetic  ssld.select.consume() on uint8 batches already in pinned host memory:
                    host->device copy, normalisation, forward, softmax, per-class top-k table
  merge             one merge of a full buffer into the per-class table (happens once per
                    max(classes * k, 4096) images; reported amortised per image)
  select-decode     the whole `run_select` on a folder of generated JPEGs (ImageNet-like
                    sizes), decoding and resizing in DataLoader workers

Target (issue 5): select-synthetic within 10% of model (ratio >= 0.90). Timm models get
random weights (speed only); `tiny` is ssld.models.tiny_resnet (CPU machines without timm).
Writes bench/results/select-<device>-<sha>.json.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from ssld import select as sel  # noqa: E402
from ssld.data import EvalTransform  # noqa: E402


def build(name: str, num_classes: int):
    if name == "tiny":
        from ssld.models import tiny_resnet

        return tiny_resnet(num_classes)
    try:
        import timm
    except ImportError:
        raise SystemExit(
            f"model {name!r} needs timm (pip install timm); use --models tiny"
        ) from None
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(model, cfg, device, steps, warmup):
    """Images/s of the bare forward on a normalised channels_last device tensor."""
    s = cfg.transform.input_size
    x = torch.randn(cfg.batch_size, 3, s, s, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), amp:
        for _ in range(warmup):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
    return cfg.batch_size * steps / (time.perf_counter() - t0)


def bench_synthetic(model, cfg, device, steps, warmup):
    s = cfg.transform.input_size
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (cfg.batch_size, 3, s, s), generator=gen, dtype=torch.uint8)
    if device.type == "cuda":
        imgs = imgs.pin_memory()
    ok = torch.ones(cfg.batch_size, dtype=torch.bool)

    def batches(n, base=0):
        for b in range(n):
            ids = torch.arange(cfg.batch_size) + (base + b) * cfg.batch_size
            yield imgs, ids, ok

    state = {"table": None, "done_batches": 0}
    sel.consume(model, batches(warmup), cfg, device, state, set())
    _sync(device)
    tp = sel.consume(model, batches(steps, warmup), cfg, device, state, set())
    return tp.images / tp.seconds, tp


def bench_merge(cfg, classes, device):
    """ms of one merge of a full buffer into the (classes, k) table; the buffer holds
    max(classes * k, 4096) images, so per image the merge costs ms / capacity."""
    table = sel.ClassTopK(classes, cfg.k, device, cfg.topm)
    gen = torch.Generator().manual_seed(1)
    n = table.cap
    cls = torch.randint(0, classes, (n,), generator=gen).to(device)
    score = torch.rand(n, generator=gen).to(device)
    ids = torch.randperm(n, generator=gen).to(device)
    times = []
    for _ in range(3):
        table.add(cls, score, ids)
        _sync(device)
        t0 = time.perf_counter()
        table.flush()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), n


def make_jpegs(folder: Path, n: int):
    """n JPEGs of ImageNet-like size (about 500 x 375) cut from the scikit-image photos."""
    import cv2
    import numpy as np

    from ssld.photos import REFERENCE, load_photo

    photos = [load_photo(p) for p in REFERENCE]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        img = cv2.resize(img, (500, 375), interpolation=cv2.INTER_AREA)
        img = np.roll(img, int(rng.integers(0, 500)), axis=1)
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def bench_decode(model, cfg, device, folder, workers):
    paths, root = sel.gallery_paths(folder)
    with tempfile.TemporaryDirectory() as d:
        s = sel.run_select(
            model,
            paths,
            root,
            Path(d) / "sel.csv",
            cfg,
            device=device,
            workers=workers,
            progress=False,
            log=None,
        )
    tp = s["throughput"]
    return tp["images"] / tp["seconds"], tp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    ap.add_argument("--models", default="resnet50,resnext101_32x16d" if gpu else "tiny")
    ap.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    ap.add_argument("--input-size", type=int, default=224 if gpu else 64)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=30 if gpu else 10)
    ap.add_argument("--warmup", type=int, default=5 if gpu else 2)
    ap.add_argument("--decode-images", type=int, default=4096 if gpu else 256)
    ap.add_argument("--workers", type=int, default=8 if gpu else 2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    env = environment(device)
    cfg = sel.SelectConfig(
        k=args.k,
        batch_size=args.batch_size,
        transform=EvalTransform(args.input_size),
        compile=args.compile,
        checkpoint_seconds=0,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        if args.decode_images:
            make_jpegs(folder, args.decode_images)
        for name in args.models.split(","):
            model = sel.prepare_teacher(build(name, args.classes), cfg, device)
            base = bench_model(model, cfg, device, args.steps, args.warmup)
            synth, tp = bench_synthetic(model, cfg, device, args.steps, args.warmup)
            common = {
                "op": "select",
                "model": name,
                "batch": args.batch_size,
                "input": args.input_size,
                "classes": args.classes,
                "k": args.k,
                "device": env["device"],
                "git_sha": env["git_sha"],
            }
            merge_ms, cap = bench_merge(cfg, args.classes, device)
            rows.append({**common, "mode": "model", "images_per_s": base})
            rows.append(
                {
                    **common,
                    "mode": "merge",
                    "merge_ms": merge_ms,
                    "buffer_images": cap,
                    "amortized_us_per_image": merge_ms * 1e3 / cap,
                }
            )
            rows.append(
                {
                    **common,
                    "mode": "select-synthetic",
                    "images_per_s": synth,
                    "ratio_vs_model": synth / base,
                    "data_wait_s": tp.data_wait,
                }
            )
            line = (
                f"{name:22s} model {base:9.1f} img/s | select-synthetic {synth:9.1f} img/s "
                f"({synth / base:.2f}x of model; target >= 0.90) | merge {merge_ms:.1f} ms per "
                f"{cap} images ({merge_ms * 1e3 / cap:.3f} us/img)"
            )
            if args.decode_images:
                dec, tpd = bench_decode(model, cfg, device, folder, args.workers)
                rows.append(
                    {
                        **common,
                        "mode": "select-decode",
                        "images_per_s": dec,
                        "ratio_vs_model": dec / base,
                        "workers": args.workers,
                        "data_wait_s": tpd["data_wait"],
                        "compute_s": tpd["compute"],
                        "seconds": tpd["seconds"],
                    }
                )
                line += (
                    f" | select-decode {dec:8.1f} img/s ({args.workers} workers, data wait "
                    f"{tpd['data_wait']:.1f} of {tpd['seconds']:.1f} s)"
                )
            print(line, flush=True)
    path = write_results("select", env, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
