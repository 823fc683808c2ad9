"""Turn bench/results/*.json into markdown tables (used for bench/README.md).

python bench/summarize.py bench/results/divergence-*.json
python bench/summarize.py bench/results/match-*.json --plot   # + PNG of TOPS per provider
"""

import json
import sys
from collections import defaultdict


def match_table(path, data):
    """Match results: per case, providers x shapes; older files (no mode/TOPS) work too."""
    env = data["env"]
    rows = [dict(r, mode=r.get("mode", "knn")) for r in data["results"]]
    peak = env.get("int8_peak_tops")
    print(f"### {env['device']} ({path.split('/')[-1]})\n")
    print(
        f"torch {env['torch']}, triton {env.get('triton')}, git {env['git_sha']}"
        + (f", dense int8 peak {peak:g} TOPS" if peak else "")
        + (f", {env['threads']} threads" if "threads" in env else "")
        + "\n"
    )
    for mode in ("knn", "pairs"):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        shapes = []
        for r in rs:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        what = f"k-NN, k={rs[0].get('k', 2)}" if mode == "knn" else "pairs, ratio test"
        print(
            f"**{what}** (median ms; TOPS = 2 nq ndb D / s"
            + (", % of int8 peak" if peak else "")
            + "; x = time / best ssld backend's; est. = not run, extrapolated)\n"
        )
        print("| provider | " + " | ".join("x".join(map(str, s[:-1])) for s in shapes) + " |")
        print("|---|" + "---|" * len(shapes))
        for p in sorted({r["provider"] for r in rs}):
            cells = []
            for sh in shapes:
                r = next((r for r in rs if r["provider"] == p and r["shape"] == sh), None)
                cells.append(_match_cell(r, peak, rs, sh))
            print(f"| {p} | " + " | ".join(cells) + " |")
        print()
    for t in data.get("targets", []):
        v = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        verdict = {True: "pass", False: "FAIL", None: "-"}[t["pass"]]
        est = " (estimate)" if t["estimated"] else ""
        shape = "x".join(map(str, t["shape"][:-1]))
        print(f"- {t['mode']} {shape}: {t['target']}: {v} {verdict}{est}")
    if data.get("targets"):
        print()


def _match_cell(r, peak, rs, shape):
    if r is None:
        return ""
    if "error" in r:
        return "error"
    ms = r.get("median_ms", r.get("est_median_ms"))
    if ms is None:
        return ""
    x = r.get("time_vs_ssld_best")
    if x is None:  # older files: relative to the fastest ssld row of the shape
        best = [
            o["median_ms"]
            for o in rs
            if o["shape"] == shape and o["provider"].startswith("ssld-") and "median_ms" in o
        ]
        x = ms / min(best) if best else None
    evals = r.get("dist_evals") or r["shape"][0] * r["shape"][1]  # older files: knn only
    tops = 2 * evals * r["shape"][-1] / (ms * 1e-3) / 1e12
    cell = f"{ms:.4g} ms, {tops:.3g} TOPS"
    if peak:
        cell += f" ({100 * tops / peak:.0f}%)"
    if x is not None:
        cell += f", {x:.2f}x"
    if "skipped" in r:
        cell = f"est. {cell}"
    elif r.get("exact") is False and not r.get("provider", "").startswith("ssld-"):
        cell += " (inexact)"
    return cell


def table(path):
    data = json.loads(open(path).read())
    if data.get("benchmark") == "match":
        match_table(path, data)
        return
    env = data["env"]
    rows = [r for r in data["results"] if "median_ms" in r and "gbps" in r]
    peak = env.get("peak_copy_gbps")
    print(f"### {env['device']} ({path.split('/')[-1]})\n")
    print(
        f"torch {env['torch']}, triton {env.get('triton')}, git {env['git_sha']}"
        + (f", measured copy bandwidth {peak:.0f} GB/s" if peak else "")
        + (f", {env['threads']} threads" if "threads" in env else "")
        + "\n"
    )
    eager = {
        (tuple(r["shape"]), r["dtype"], r["mode"]): r["median_ms"]
        for r in rows
        if r["provider"] == "eager"
    }
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["mode"])].append(r)
    for (dtype, mode), rs in sorted(groups.items()):
        print(
            f"**{dtype}, {mode}** (median ms; GB/s of the minimum traffic; x = speed-up over eager {'fwdbwd' if mode == 'fused' else mode})\n"
        )
        shapes = sorted({tuple(r["shape"]) for r in rs}, key=lambda s: s[0] * s[1])
        provs = sorted({r["provider"] for r in rs})
        print("| provider | " + " | ".join(f"{n}x{c}" for n, c in shapes) + " |")
        print("|---|" + "---|" * len(shapes))
        for p in provs:
            cells = []
            for sh in shapes:
                r = next((r for r in rs if r["provider"] == p and tuple(r["shape"]) == sh), None)
                if r is None:
                    cells.append("")
                    continue
                base = eager.get((sh, dtype, "fwdbwd" if mode == "fused" else mode))
                x = f", {base / r['median_ms']:.1f}x" if base else ""
                pct = f" ({100 * r['gbps'] / peak:.0f}%)" if peak else ""
                cells.append(f"{r['median_ms']:.4g} ms, {r['gbps']:.0f} GB/s{pct}{x}")
            print(f"| {p} | " + " | ".join(cells) + " |")
        print()
    latency_table(data["results"])
    divergence_targets(data.get("targets"))


def latency_table(results):
    """Small-shape latency rows: host us per call, device us per step in a CUDA graph."""
    rs = [r for r in results if r.get("mode", "").endswith("-latency") and "host_us" in r]
    if not rs:
        return
    print(
        "**small-shape latency** (host: us per call issued back to back; graph: device us "
        "per step replayed from a CUDA graph)\n"
    )
    print("| provider | mode | shape | dtype | host us/call | graph us/step |")
    print("|---|---|---|---|---|---|")
    for r in rs:
        dev = f"{r['median_ms'] * 1e3:.1f}" if "median_ms" in r else "-"
        shape = "x".join(map(str, r["shape"]))
        mode = r["mode"].removesuffix("-latency")
        print(f"| {r['provider']} | {mode} | {shape} | {r['dtype']} | {r['host_us']:.1f} | {dev} |")
    print()


def divergence_targets(targets):
    if not targets:
        return
    th = targets["thresholds"]
    print(
        f"**targets** (ssld-auto at C >= {th['min_classes']}: >= {th['pct_of_copy']:g}% of "
        f"copy, >= {th['x_eager']:g}x eager, >= {th['x_liger']:g}x Liger, "
        f">= {th['x_compile']:g}x torch.compile, all against their fwdbwd)\n"
    )
    for c in targets["cases"]:
        vals = ", ".join(
            f"{k} {c[k]:.2f}" for k in ("pct_of_copy", "x_eager", "x_liger", "x_compile") if k in c
        )
        shape = "x".join(map(str, c["shape"]))
        print(f"- {c['mode']} {shape} {c['dtype']}: {vals}: {'met' if c['met'] else 'MISSED'}")
    for b in targets["beaten"]:
        shape = "x".join(map(str, b["shape"]))
        print(f"- auto beaten by {b['by']} at {b['mode']} {shape} {b['dtype']} ({b['ratio']:.2f}x)")
    print()


if __name__ == "__main__":
    args = sys.argv[1:]
    plot = "--plot" in args
    for path in [a for a in args if a != "--plot"]:
        table(path)
        if plot:
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            data = json.loads(open(path).read())
            if data.get("benchmark") == "match":
                from bench_match import _plot as match_plot

                match_plot(data["results"], Path(path).with_suffix(".png"), data["env"])
            else:
                from bench_divergence import _plot

                _plot(data["results"], Path(path).with_suffix(".png"))
