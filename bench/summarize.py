"""Turn bench/results/*.json into markdown tables (used for bench/README.md).

python bench/summarize.py bench/results/divergence-*.json
"""

import json
import sys
from collections import defaultdict


def table(path):
    data = json.loads(open(path).read())
    env = data["env"]
    rows = [r for r in data["results"] if "median_ms" in r]
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


if __name__ == "__main__":
    args = sys.argv[1:]
    plot = "--plot" in args
    for path in [a for a in args if a != "--plot"]:
        table(path)
        if plot:
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_divergence import _plot

            _plot(json.loads(open(path).read())["results"], Path(path).with_suffix(".png"))
