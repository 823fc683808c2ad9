"""Benchmark fused_linear_divergence (LLM distillation: lm-heads + JSD, chunked) against eager
PyTorch with materialised logits, TRL's chunked-checkpoint approach and Liger-Kernel.

    python bench/bench_fused_linear.py [--device cpu|cuda] [--shape NxHxV] [--dtype ...]
        [--providers eager,trl-chunked,ssld,liger] [--reps 3] [--out FILE]

Defaults: CPU N=2048, H=H'=1024, V=32000, float32; GPU N=8192, H=4096, V=128256, bfloat16
(weights and hidden states in bf16, as a bf16 model holds them). One step = loss + backward into
the student's hidden states and head weight (teacher frozen), generalized JSD with beta=0.5,
T=1, labels with 1 row in 10 ignored, mean over the kept rows.

Providers:
  eager        logits = h @ W.T for both models, then TRL's generalized_jsd_loss formula
               (log_softmax, the mixture's logsumexp, kl_div per element, labels mask, sum /
               count), autograd backward: (N, V) logits and several (N, V) intermediates live.
  trl-chunked  the same formula on chunks of rows, each chunk's lm-head + loss under
               torch.utils.checkpoint (non-reentrant), summed then divided by the count: the
               forward keeps no logits, the backward recomputes one chunk at a time (same rows
               per chunk as ssld's automatic chunk size).
  ssld         ssld_kernels.fused_linear_divergence (backend auto: the C++ kernel on CPU).
  liger        liger_kernel's LigerFusedLinearJSD, when importable (GPU).

Peak extra memory, the high-water mark of one step above what exists before it (the inputs):
  CPU: each provider runs in a fresh subprocess with glibc's mmap threshold pinned to 64 KiB
  (MALLOC_MMAP_THRESHOLD_), so every tensor buffer is its own mapping, returned to the system
  when freed. After one warm-up step the kernel's peak-RSS counter is reset
  (``echo 5 > /proc/self/clear_refs``); extra = VmHWM after one more step - VmRSS before it.
  This counts every byte made resident during the step, including the gradients it produces
  (the same (V, H) + (N, H) for every provider).
  GPU: torch.cuda.max_memory_allocated() after the step - memory_allocated() before it.
Timing: median of --reps steps after one warm-up (time.perf_counter on CPU; CUDA events via
triton.testing.do_bench on GPU). Ratios are eager's time / memory over the provider's.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment,
    parse_providers,
    time_calls,
    time_fn,
    write_results_extra,
)

import ssld_kernels as sk  # noqa: E402
from ssld_kernels.fused_linear import auto_chunk_size  # noqa: E402

BETA = 0.5
PROVIDERS = ("eager", "trl-chunked", "ssld", "liger")
DEFAULT_SHAPE = {"cpu": (2048, 1024, 32000), "cuda": (8192, 4096, 128256)}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
TARGETS = {"cpu_mem_x_eager": 10.0, "cpu_time_x_eager": 1.0}


# ----------------------------------------------------------------------------------------------
# the providers
# ----------------------------------------------------------------------------------------------


def trl_jsd_elements(s: torch.Tensor, t: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """TRL's generalized_jsd_loss per-element terms at T=1 (trl/experimental/gkd)."""
    ls = torch.log_softmax(s, dim=-1)
    lt = torch.log_softmax(t, dim=-1)
    b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
    kl = torch.nn.functional.kl_div
    return b * kl(lm, lt, reduction="none", log_target=True) + (1 - b) * kl(
        lm, ls, reduction="none", log_target=True
    )


def eager_loss(hs, ws, ht, wt, labels, chunk):
    s = hs @ ws.t()
    with torch.no_grad():
        t = ht @ wt.t()
    mask = labels != -100
    jsd = trl_jsd_elements(s, t)[mask]
    return jsd.sum() / mask.sum().clamp_min(1)


def _chunk_sum(h, w, h_t, w_t, labels):
    s = h @ w.t()
    with torch.no_grad():
        t = h_t @ w_t.t()
    mask = labels != -100
    return (trl_jsd_elements(s, t) * mask[:, None]).sum()


def trl_chunked_loss(hs, ws, ht, wt, labels, chunk):
    total = 0.0
    for i in range(0, hs.shape[0], chunk):
        sl = slice(i, i + chunk)
        total = total + checkpoint(
            _chunk_sum, hs[sl], ws, ht[sl], wt, labels[sl], use_reentrant=False
        )
    return total / (labels != -100).sum().clamp_min(1)


def ssld_loss(hs, ws, ht, wt, labels, chunk):
    return sk.fused_linear_divergence(hs, ws, ht, wt, labels=labels, beta=BETA)


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    return LigerFusedLinearJSD(jsd_beta=BETA)


def liger_loss(hs, ws, ht, wt, labels, chunk):
    return _LIGER(hs, ws, ht, wt, labels)


_LIGER = None
LOSSES = {"eager": eager_loss, "trl-chunked": trl_chunked_loss, "ssld": ssld_loss,
          "liger": liger_loss}  # fmt: skip


def make_inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    hs = rnd(n, h).requires_grad_(True)
    ws = rnd(v, h, scale=2.0 / math.sqrt(h)).requires_grad_(True)
    ht, wt = rnd(n, h), rnd(v, h, scale=2.5 / math.sqrt(h))
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::10] = -100
    return hs, ws, ht, wt, labels.to(device)


def make_step(provider, inputs, chunk):
    hs, ws = inputs[0], inputs[1]
    fn = LOSSES[provider]
    out = {}

    def step():
        hs.grad = ws.grad = None
        loss = fn(*inputs, chunk)
        loss.backward()
        out["loss"] = loss.detach()

    return step, out


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------


def _proc_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1))


def child(args) -> None:
    """One provider in this (fresh) process: warm-up step, reset the peak RSS, one step."""
    device = torch.device(args.device)
    n, h, v = args.shape
    inputs = make_inputs(n, h, v, getattr(torch, args.dtype), device)
    step, out = make_step(args.child, inputs, args.chunk)
    step()
    inputs[0].grad = inputs[1].grad = None
    out.clear()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_kb("VmRSS")
    step()
    extra = (_proc_kb("VmHWM") - before) * 1024
    print(json.dumps({"peak_extra_bytes": extra, "loss": float(out["loss"])}))


def cpu_peak_extra(provider, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", provider, "--device", "cpu", "--shape",
           "x".join(map(str, args.shape)), "--dtype", args.dtype, "--chunk", str(args.chunk)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{provider} memory run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def gpu_peak_extra(step, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="NxHxV (default: per device, see above)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: per device)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--reps", type=int, default=3, help="timed CPU steps per provider")
    p.add_argument("--chunk", type=int, default=0, help="trl-chunked rows (0: ssld's auto)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.providers = parse_providers(args.providers, PROVIDERS, "bench_fused_linear")
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    args.shape = (
        tuple(int(x) for x in args.shape.lower().split("x")) if args.shape else DEFAULT_SHAPE[dev]
    )
    if len(args.shape) != 3:
        p.error(f"--shape must be NxHxV, got {args.shape!r}")
    args.dtype = args.dtype or DEFAULT_DTYPE[dev]
    if args.chunk <= 0:
        args.chunk = auto_chunk_size(*args.shape, dev)
    return args


def main(argv=None) -> None:
    global _LIGER
    args = parse_args(argv)
    if args.child:
        return child(args)
    device = torch.device(args.device)
    n, h, v = args.shape
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    _LIGER = _liger() if device.type == "cuda" else None
    rows, skipped = [], {}
    inputs = make_inputs(n, h, v, dtype, device)
    for provider in args.providers or PROVIDERS:
        if provider == "liger" and _LIGER is None:
            skipped[provider] = "liger_kernel not importable (or not a GPU run)"
            continue
        step, out = make_step(provider, inputs, args.chunk)
        if device.type == "cuda":
            t = time_fn(step, device)
            mem = {"peak_extra_bytes": gpu_peak_extra(step, device), "loss": float(out["loss"])}
        else:
            t = time_calls(step, device, reps=args.reps, warmup=1)
            mem = cpu_peak_extra(provider, args)
        row = {
            "op": "fused_linear_jsd", "provider": provider, "mode": "fwdbwd",
            "shape": [n, h, v], "dtype": args.dtype, "device": env["device"],
            "git_sha": env["git_sha"], "chunk": args.chunk if provider != "eager" else None,
            **t, "peak_extra_mb": mem["peak_extra_bytes"] / 2**20, "loss": mem["loss"],
        }  # fmt: skip
        rows.append(row)
        print(f"{provider:12s} {t['median_ms']:10.1f} ms  peak extra {row['peak_extra_mb']:9.1f} MiB"
              f"  loss {row['loss']:.6f}", flush=True)  # fmt: skip
        inputs[0].grad = inputs[1].grad = None
    eager = next((r for r in rows if r["provider"] == "eager"), None)
    if eager:
        for r in rows:
            r["x_eager_time"] = eager["median_ms"] / r["median_ms"]
            r["x_eager_mem"] = eager["peak_extra_mb"] / max(r["peak_extra_mb"], 1e-9)
            r["loss_rel_diff_vs_eager"] = abs(r["loss"] - eager["loss"]) / abs(eager["loss"])
        print("\nvs eager:  provider   time x   memory x   |loss - eager| / eager")
        for r in rows:
            print(f"  {r['provider']:12s} {r['x_eager_time']:7.2f} {r['x_eager_mem']:9.1f}"
                  f"   {r['loss_rel_diff_vs_eager']:.1e}")  # fmt: skip
    targets = {}
    ssld = next((r for r in rows if r["provider"] == "ssld"), None)
    if device.type == "cpu" and eager and ssld:
        targets = {
            "peak_extra_memory_10x_less_than_eager": {
                "want": TARGETS["cpu_mem_x_eager"], "got": ssld["x_eager_mem"],
                "met": ssld["x_eager_mem"] >= TARGETS["cpu_mem_x_eager"],
            },
            "faster_than_eager": {
                "want": TARGETS["cpu_time_x_eager"], "got": ssld["x_eager_time"],
                "met": ssld["x_eager_time"] > TARGETS["cpu_time_x_eager"],
            },
        }  # fmt: skip
    extra = {
        "targets": targets,
        "skipped": skipped,
        "memory_method": (
            "GPU: torch.cuda.max_memory_allocated after one step minus memory_allocated before"
            if device.type == "cuda"
            else "CPU: fresh subprocess per provider, MALLOC_MMAP_THRESHOLD_=65536, one warm-up "
            "step, /proc/self/clear_refs=5, then VmHWM after one step minus VmRSS before it"
        ),
        "config": {
            "beta": BETA,
            "temperature": 1.0,
            "ignored_rows": "1 in 10",
            "teacher_hidden": h,
            "reps": args.reps,
        },  # fmt: skip
    }
    out = Path(args.out) if args.out else None
    path = write_results_extra("fused_linear", env, rows, extra, out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
