"""Benchmark the SSLD training step against a naive distillation loop, same run, same data.

    python bench/bench_train.py                        # GPU: the paper's two pairs (timm)
    python bench/bench_train.py --pairs tiny:tiny --batch-size 32 --input-size 64   # CPU

Providers, synthetic uint8 data already on the device, global batch 256 by default:
  ssld   ssld.train.Trainer: bf16 autocast, channels_last, fused JSD kernel
         (softmax_divergence_and_grad), fused SGD, teacher under inference_mode, no host sync
         per step; phase times (teacher / student / loss / optimizer / data) from CUDA events
  naive  the usual loop: fp32, NCHW, teacher under no_grad, JSD composed from log_softmax +
         kl_div (autograd), plain SGD, ``loss.item()`` every step

Reported: img/s, the ssld/naive ratio (target >= 1.5x), the share of the ssld step outside
teacher + student compute (target <= 10%), and the projected wall clock of one 5.2M-image
epoch (ImageNet-1k + 4M unlabeled) on 8 GPUs assuming linear scaling. Student/teacher come
from timm with random weights (speed only); `tiny` is ssld.models.tiny_resnet.
Writes bench/results/train-<device>-<sha>.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from ssld.config import load_config  # noqa: E402
from ssld.train import Trainer  # noqa: E402

EPOCH_IMAGES = 5_200_000


def _model_spec(name: str, tmp: Path, role: str):
    """(spec, weights path or None) for the config; timm teachers get saved random weights."""
    if name == "tiny":
        return "ssld.models:tiny_resnet", None
    if role == "teacher":
        import timm

        path = tmp / f"{name}.pt"
        torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
        return name, str(path)
    return name, None


def bench_ssld(student, teacher, args, tmp: Path, device):
    s_spec, s_w = _model_spec(student, tmp, "student")
    t_spec, t_w = _model_spec(teacher, tmp, "teacher")
    n = args.steps
    over = [
        f"student.name={s_spec}",
        f"teacher.name={t_spec}",
        "data.synthetic=true",
        f"data.synthetic_size={args.batch_size * (2 * n + 2)}",
        f"data.input_size={args.input_size}",
        f"run.batch_size={args.batch_size}",
        f"run.log_every={n}",
        f"run.max_steps={2 * n}",
        f"run.ckpt_every={10 * n}",
        "run.progress=false",
        f"run.compile={'true' if args.compile else 'false'}",
        f"run.out={tmp / f'run-{student}'}",
        f"run.device={device.type}",
        "optim.epochs=1",
    ]
    if s_w:
        over.append(f"student.weights={s_w}")
    if t_w:
        over.append(f"teacher.weights={t_w}")
    if device.type == "cpu":
        over += ["run.amp=none", "run.channels_last=false"]
    if student == "tiny":
        over += ["student.num_classes=1000", "student.kwargs={widths: [16, 32, 64]}"]
    if teacher == "tiny":
        over += ["teacher.num_classes=1000", "teacher.kwargs={widths: [32, 64, 128]}"]
    tr = Trainer(load_config(None, over), log=None)
    tr.fit()
    recs = [json.loads(x) for x in open(tmp / f"run-{student}" / "metrics.jsonl")]
    last = [r for r in recs if r.get("kind") == "train"][-1]  # steps n+1 .. 2n: warm
    total = n * args.batch_size / last["img_per_s"]
    phases = {p: last[f"t_{p}"] for p in ("data", "teacher", "student", "loss", "optimizer")}
    outside = max(0.0, total - phases["teacher"] - phases["student"]) / total
    return last["img_per_s"], phases, outside, total


def _jsd_naive(s, t, beta=0.5):
    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    log_m = torch.logsumexp(
        torch.stack(
            [log_pt + torch.log(torch.tensor(beta)), log_ps + torch.log(torch.tensor(1 - beta))]
        ),
        0,
    )
    kl_t = F.kl_div(log_m, log_pt, reduction="batchmean", log_target=True)
    kl_s = F.kl_div(log_m, log_ps, reduction="batchmean", log_target=True)
    return beta * kl_t + (1 - beta) * kl_s


def bench_naive(student, teacher, args, device):
    def build(name, width):
        if name == "tiny":
            from ssld.models import tiny_resnet

            return tiny_resnet(1000, widths=width)
        import timm

        return timm.create_model(name, pretrained=False)

    s = build(student, (16, 32, 64)).to(device).train()
    t = build(teacher, (32, 64, 128)).to(device).eval()
    opt = torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)

    def step():
        with torch.no_grad():
            tl = t(x)
        loss = _jsd_naive(s(x), tl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.steps):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main():
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pairs",
        default="resnet50d:resnext101_32x16d,mobilenetv3_large_100:resnet50d"
        if gpu
        else "tiny:tiny",
        help="student:teacher,...",
    )
    ap.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    ap.add_argument("--input-size", type=int, default=224 if gpu else 64)
    ap.add_argument("--steps", type=int, default=20 if gpu else 5)
    ap.add_argument("--gpus", type=int, default=8, help="for the projected epoch time")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    env = environment(device)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for pair in args.pairs.split(","):
            student, teacher = pair.split(":")
            ips, phases, outside, total = bench_ssld(student, teacher, args, Path(d), device)
            naive = bench_naive(student, teacher, args, device)
            epoch_h = EPOCH_IMAGES / (ips * args.gpus) / 3600
            row = {
                "op": "train_step",
                "student": student,
                "teacher": teacher,
                "batch": args.batch_size,
                "input": args.input_size,
                "device": env["device"],
                "git_sha": env["git_sha"],
                "ssld_img_per_s": ips,
                "naive_img_per_s": naive,
                "speedup_vs_naive": ips / naive,
                "phases_s": phases,
                "measured_s": total,
                "outside_model_share": outside,
                "projected_epoch_h": epoch_h,
                "projected_gpus": args.gpus,
            }
            rows.append(row)
            print(
                f"{student} <- {teacher}: ssld {ips:.1f} img/s, naive {naive:.1f} img/s "
                f"({ips / naive:.2f}x; target >= 1.5x); outside teacher+student "
                f"{100 * outside:.1f}% (target <= 10%); one 5.2M-image epoch on {args.gpus} "
                f"such devices: {epoch_h:.2f} h (linear scaling)",
                flush=True,
            )
            print("  phases (s):", {k: round(v, 4) for k, v in phases.items()})
    path = write_results("train", env, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
