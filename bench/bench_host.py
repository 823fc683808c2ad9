"""Host time per call of the divergence loss's Python layer, at shapes where the kernel is
negligible (the paper's per-GPU batch is latency bound; see DESIGN.md section 4).

Each case is one training-style call (forward + backward, forward only, fused loss-and-grad)
at a tiny shape on the CPU, where the whole call is host time. A case runs ``--rounds`` rounds
of ``--calls`` back-to-back calls; the row records, over rounds, the minimum microseconds per
call (on a shared machine other work only ever adds time, so the least disturbed round is the
closest to the cost itself) and the median with p20/p80. Baselines measured in the same
run: the same math as eager PyTorch ops (``eager``), and the bare extension launch with
preallocated outputs (``floor``: what the Python layer adds is the difference).

    python bench/bench_host.py [--processes 3] [--compare OTHER_CHECKOUT] [--out FILE]

Each process is fresh (``--processes`` per checkout; with ``--compare`` the two checkouts'
processes alternate), because on a shared VM the spread between processes (placement,
frequency, heap layout) exceeds the spread between rounds; a row keeps the least minimum
over the processes and the median of their medians.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

import ssld_kernels as sk  # noqa: E402


def _eager_jsd(s, t):
    """JSD(beta=0.5) as plain PyTorch ops (the baseline a user would write)."""
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    lm = torch.logsumexp(torch.stack([ls, lt]), 0) - 0.6931471805599453
    ps, pt = ls.exp(), lt.exp()
    return (0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)).mean()


def cases(n: int, c: int):
    """name -> zero-argument step; each builds its inputs once."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, c, generator=g).requires_grad_(True)
    t = torch.randn(n, c, generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    loss_fn = sk.JSDLoss()

    def fwdbwd(backend):
        def step():
            s.grad = None
            sk.softmax_divergence(s, t, backend=backend).backward()

        return step

    def fwd(backend):
        def step():
            with torch.no_grad():
                sk.softmax_divergence(s, t, backend=backend)

        return step

    def fused(backend):
        sd = s.detach()
        return lambda: sk.softmax_divergence_and_grad(sd, t, backend=backend)

    def module():
        s.grad = None
        loss_fn(s, t).backward()

    def masked():
        s.grad = None
        sk.softmax_divergence(s, t, mask=mask, backend="cpu").backward()

    def eager():
        s.grad = None
        _eager_jsd(s, t).backward()

    out = {
        "ssld-cpu fwdbwd": fwdbwd("cpu"),
        "ssld-auto fwdbwd": fwdbwd(None),
        "ssld-cpu fwd": fwd("cpu"),
        "ssld-cpu fused": fused("cpu"),
        "ssld-cpu module fwdbwd": module,
        "ssld-cpu masked fwdbwd": masked,
        "ssld-torch fwdbwd": fwdbwd("torch"),
        "eager fwdbwd": eager,
    }
    floor = _floor(s.detach(), t)
    if floor is not None:
        out["floor fused"] = floor
    return out


def _floor(s, t):
    """The bare C++ launch of the fused kernel with preallocated outputs (no validation,
    no autograd, no reduction): the least any Python entry point can cost."""
    try:
        from ssld_kernels._backends import ext

        e = ext()
    except Exception:  # noqa: BLE001 - no compiled extension
        return None
    from ssld_kernels.reference import make_spec

    n, c = s.shape
    p = e.DivParams()
    p.s, p.s_dtype, p.s_stride = s.data_ptr(), 0, c  # float32 (dtype code 0), contiguous
    p.t, p.t_dtype, p.t_stride = t.data_ptr(), 0, c
    p.n_rows, p.n_cols = n, c
    p.mode, p.beta, p.coef_a, p.coef_b, p.inv_temp = make_spec("jsd", 0.5, 1.0)
    p.loss_scale, p.grad_scale, p.num_threads = 1.0, 1.0, torch.get_num_threads()
    row_loss, stats = torch.empty(n), torch.empty(n, 8)
    grad_rows, grad_s = torch.full((n,), 1.0 / n), torch.empty(n, c)
    p.row_loss, p.stats = row_loss.data_ptr(), stats.data_ptr()
    p.grad_rows, p.grad_rows_stride = grad_rows.data_ptr(), 1
    p.grad_s, p.grad_s_stride = grad_s.data_ptr(), c
    keep = (s, t, row_loss, stats, grad_rows, grad_s)  # alive as long as the step

    def step(p=p, keep=keep):
        e.divergence_forward_cpu(p)

    return step


def measure(step, rounds: int, calls: int) -> dict:
    for _ in range(max(10, calls // 10)):
        step()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    per_call.sort()
    return {
        "min_us": per_call[0],  # the least disturbed round: the cost itself on a shared machine
        "host_us": statistics.median(per_call),
        "p20_us": per_call[int(0.2 * (rounds - 1))],
        "p80_us": per_call[int(0.8 * (rounds - 1))],
        "rounds": rounds,
        "calls": calls,
    }


def run_cases(shape: str, rounds: int, calls: int) -> list:
    """Every case in this process: one row each."""
    n, c = (int(v) for v in shape.split("x"))
    rows = []
    for name, step in cases(n, c).items():
        provider, mode = name.rsplit(" ", 1)
        rows.append({"op": "softmax_divergence", "provider": provider, "mode": mode + "-host",
                     "shape": [n, c], "dtype": "float32", "device": "cpu",
                     **measure(step, rounds, calls)})  # fmt: skip
    return rows


def _revision(root: Path) -> str:
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _child(root: Path, args) -> list:
    """The cases in a fresh process importing ssld_kernels from checkout ``root``."""
    import json
    import os
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--shape", args.shape,
           "--rounds", str(args.rounds), "--calls", str(args.calls),
           "--threads", str(args.threads)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _merge(runs: list, revision: str) -> list:
    """One row per case over the processes: the least minimum, the median of the medians."""
    rows = []
    for k, first in enumerate(runs[0]):
        per = [run[k] for run in runs]
        rows.append({**first, "revision": revision,
                     "min_us": min(r["min_us"] for r in per),
                     "host_us": statistics.median(r["host_us"] for r in per),
                     "p20_us": statistics.median(r["p20_us"] for r in per),
                     "p80_us": statistics.median(r["p80_us"] for r in per),
                     "processes": len(per),
                     "process_min_us": [round(r["min_us"], 2) for r in per]})  # fmt: skip
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4x16", help="rows x classes, e.g. 4x16")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: host cost only)")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per checkout")
    ap.add_argument(
        "--compare",
        default=None,
        help="another checkout (with its extension built): its processes alternate with this "
        "one's, one JSON holds both (e.g. before / after a refactor)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        import json

        print(json.dumps(run_cases(args.shape, args.rounds, args.calls)))
        return None
    here = Path(__file__).resolve().parent.parent
    roots = [Path(args.compare).resolve(), here] if args.compare else [here]
    runs = {root: [] for root in roots}
    for _ in range(args.processes):  # alternate: slow drift of the machine hits both alike
        for root in roots:
            runs[root].append(_child(root, args))
    rows = []
    for root in roots:
        rev = _revision(root)
        merged = _merge(runs[root], rev)
        rows += merged
        print(f"== {rev} ({root}), {args.processes} processes")
        for r in merged:
            print(
                f"{r['provider']:18s} {r['mode'].removesuffix('-host'):7s} min {r['min_us']:7.1f} "
                f"us/call, median {r['host_us']:.1f} (processes' minima {r['process_min_us']})"
            )
    if args.compare:
        new, old = (_merge(runs[r], "")[0:] for r in (here, roots[0]))
        for a, b in zip(new, old):
            print(
                f"{a['provider']:18s} {a['mode']:12s} min new/old {a['min_us'] / b['min_us']:.3f}"
            )
    env = environment(torch.device("cpu"))
    path = write_results("host", env, rows, Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
