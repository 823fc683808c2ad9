"""Benchmark the fused softmax-divergence loss against eager PyTorch, torch.compile and Liger.

    python bench/bench_divergence.py [--device cpu|cuda] [--dtypes float32,bfloat16]
        [--shapes 256x1000,1024x32000] [--kind jsd] [--providers ...] [--out FILE] [--plot]

Modes: ``fwd`` (loss only), ``fwdbwd`` (loss + autograd backward), ``fused``
(``softmax_divergence_and_grad``: loss and gradient from one kernel). Minimum traffic: read
both logits (+ write one gradient for fwdbwd/fused), i.e. 6 B/element in bf16 and 12 in fp32
for training. GB/s is that minimum over the median time. Ratios are against eager PyTorch in
the same run. Peak extra memory (GPU only) is the allocator's peak above the inputs.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, time_fn, write_results  # noqa: E402

import ssld_kernels as sk  # noqa: E402

GPU_SHAPES = [
    (256, 1000),
    (1024, 1000),
    (4096, 21841),
    (8192, 32000),
    (4096, 128256),
    (512, 262144),
]
CPU_SHAPES = [(256, 1000), (1024, 1000), (1024, 32000)]


def eager_divergence(s, t, kind="jsd", beta=0.5):
    """The usual composition: log_softmax x2, the mixture's logsumexp, kl_div (TRL style)."""
    ls = F.log_softmax(s.float(), -1)
    lt = F.log_softmax(t.float(), -1)
    if kind == "kl":
        return F.kl_div(ls, lt, reduction="batchmean", log_target=True)
    if kind == "sym_kl":
        return 0.5 * (
            F.kl_div(ls, lt, reduction="batchmean", log_target=True)
            + F.kl_div(lt, ls, reduction="batchmean", log_target=True)
        )
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
    return beta * F.kl_div(lm, lt, reduction="batchmean", log_target=True) + (1 - beta) * F.kl_div(
        lm, ls, reduction="batchmean", log_target=True
    )


def _liger(kind, beta):
    if kind != "jsd":
        return None
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return None
    jsd = LigerJSD(beta=beta)
    # Liger takes log-probabilities (student first); its log_softmax is part of the cost.
    return lambda s, t: jsd(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))


def providers(device, kind, beta, wanted):
    out = {}
    for b in sk.available_backends(device):
        if b == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests, not timing
        out[f"ssld-{b}"] = (
            lambda s, t, b=b: sk.softmax_divergence(s, t, kind=kind, beta=beta, backend=b),
            lambda s, t, b=b: sk.softmax_divergence_and_grad(s, t, kind=kind, beta=beta, backend=b),
        )
    out["eager"] = (lambda s, t: eager_divergence(s, t, kind, beta), None)
    out["compile"] = (torch.compile(lambda s, t: eager_divergence(s, t, kind, beta)), None)
    liger = _liger(kind, beta)
    if liger is not None and device.type == "cuda":
        out["liger"] = (liger, None)
    if wanted:
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def run_case(device, n, c, dtype, provider, fns, mode):
    fwd, fused = fns
    if mode == "fused" and fused is None:
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(n, c, generator=gen) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(n, c, generator=gen) * 3).to(device=device, dtype=dtype)
    if mode == "fwdbwd":
        s.requires_grad_(True)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fwd(s, t)
        if mode == "fused":
            return fused(s, t)
        s.grad = None
        loss = fwd(s, t)
        loss.backward()
        return loss

    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = None
    timing = time_fn(step, device)
    esize = torch.finfo(dtype).bits // 8
    min_bytes = n * c * esize * (2 if mode == "fwd" else 3)
    return {
        "op": "softmax_divergence",
        "provider": provider,
        "mode": mode,
        "shape": [n, c],
        "dtype": str(dtype).replace("torch.", ""),
        "device": device.type,
        **timing,
        "min_bytes": min_bytes,
        "gbps": min_bytes / (timing["median_ms"] * 1e-3) / 1e9,
        "peak_extra_bytes": extra,
    }


def peak_copy_gbps(device):
    """Device-to-device copy bandwidth (read + write bytes), the practical ceiling."""
    if device.type != "cuda":
        return None
    x = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default=None, help="e.g. 256x1000,1024x32000")
    ap.add_argument("--kind", default="jsd", choices=["jsd", "sym_kl", "kl"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--modes", default="fwd,fwdbwd,fused")
    ap.add_argument("--providers", default="", help="comma list, e.g. ssld-cpu,eager")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true", help="write a PNG of time vs C (matplotlib)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    wanted = [p for p in args.providers.split(",") if p]
    provs = providers(device, args.kind, args.beta, wanted)
    env = environment(device)
    env["peak_copy_gbps"] = peak_copy_gbps(device)
    rows = []
    out_path = Path(args.out) if args.out else None
    for dtype in dtypes:
        for n, c in shapes:
            for mode in args.modes.split(","):
                for name, fns in provs.items():
                    try:
                        r = run_case(device, n, c, dtype, name, fns, mode)
                    except (
                        Exception
                    ) as e:  # a provider that cannot run a case is reported, not fatal
                        r = {
                            "provider": name,
                            "mode": mode,
                            "shape": [n, c],
                            "error": repr(e)[:300],
                            "dtype": str(dtype).replace("torch.", ""),
                        }
                    if r is not None:
                        r["kind"] = args.kind
                        rows.append(r)
                        _print_row(r, env)
                write_results("divergence", env, rows, out_path)  # partial results survive a kill
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    _print_ratios(rows)
    path = write_results("divergence", env, rows, out_path)
    print(f"wrote {path}")
    if args.plot:
        _plot(rows, path.with_suffix(".png"))
    return rows


def _print_row(r, env):
    if "error" in r:
        print(
            f"{r['provider']:14s} {r['mode']:7s} {str(tuple(r['shape'])):16s} {r['dtype']:9s} ERROR {r['error']}"
        )
        return
    pct = ""
    if env.get("peak_copy_gbps"):
        pct = f" {100 * r['gbps'] / env['peak_copy_gbps']:5.1f}% of copy"
    mem = (
        "" if r["peak_extra_bytes"] is None else f" extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB"
    )
    print(
        f"{r['provider']:14s} {r['mode']:7s} {str(tuple(r['shape'])):16s} {r['dtype']:9s} "
        f"{r['median_ms']:9.4f} ms {r['gbps']:8.1f} GB/s{pct}{mem}",
        flush=True,
    )


def _print_ratios(rows):
    base = {
        (tuple(r["shape"]), r["dtype"], r["mode"]): r["median_ms"]
        for r in rows
        if r.get("provider") == "eager" and "median_ms" in r
    }
    print("\nspeed-up over eager PyTorch (same run; fused vs eager fwdbwd):")
    for r in rows:
        if "median_ms" not in r or r["provider"] == "eager":
            continue
        key_mode = "fwdbwd" if r["mode"] == "fused" else r["mode"]
        b = base.get((tuple(r["shape"]), r["dtype"], key_mode))
        if b:
            r["speedup_vs_eager"] = b / r["median_ms"]
            print(
                f"  {r['provider']:14s} {r['mode']:7s} {str(tuple(r['shape'])):16s} {r['dtype']:9s} {r['speedup_vs_eager']:6.2f}x"
            )


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    modes = sorted({r["mode"] for r in rows if "median_ms" in r})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for prov in sorted({r["provider"] for r in rows}):
            for dt in sorted({r["dtype"] for r in rows}):
                pts = sorted(
                    (r["shape"][0] * r["shape"][1], r["median_ms"])
                    for r in rows
                    if r.get("mode") == mode
                    and r["provider"] == prov
                    and r["dtype"] == dt
                    and "median_ms" in r
                )
                if pts:
                    ax.loglog(*zip(*pts), marker="o", label=f"{prov} {dt}")
        ax.set_title(mode)
        ax.set_xlabel("rows x classes")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
