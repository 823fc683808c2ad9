"""Run `ssld demo` (and its --ablation) and keep the results with the machine and the commit.

    python bench/bench_demo.py [--ablation] [--device cpu] [--seeds N] [--out FILE]

Writes results/demo-<device>-<sha>.json (or demo-ablation-...): the environment record
(device, versions, git revision, date), the demo's own results.json / ablation.json
contents, and the wall time. README.md's demo and ablation tables are rendered from these
files by `python bench/summarize.py --write-readme`.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results_extra  # noqa: E402

from ssld.demo import run_demo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    env = environment(torch.device(args.device))
    name = "demo-ablation" if args.ablation else "demo"
    with tempfile.TemporaryDirectory(prefix="ssld-bench-demo-") as d:
        t0 = time.time()
        results = run_demo(Path(d), args.device, seeds=args.seeds, ablation=args.ablation)
        seconds = time.time() - t0
    results = json.loads(json.dumps(results, default=str))
    out = write_results_extra(name, env, results, {"seconds": round(seconds, 1)}, args.out)
    print(f"wrote {out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
