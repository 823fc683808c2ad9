"""Turn bench/results/*.json into markdown tables; render README.md's numbers from them.

python bench/summarize.py bench/results/divergence-*.json
python bench/summarize.py bench/results/match-*.json --plot   # + PNG of TOPS per provider
python bench/summarize.py --write-readme    # README.md + bench/README.md generated blocks
python bench/summarize.py --check-readme    # exit 1 if a generated block is out of date

Every measured number in README.md and bench/README.md lives between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers and is written here from a
committed results file, which each block names with its device, versions, commit and date
(``BLOCKS`` below). tests/test_readme_numbers.py checks the blocks are current and that no
measured number appears outside them.
"""

import contextlib
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


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


# ------------------------------------------------------------------ README generated blocks


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _env(data: dict) -> dict:
    return data.get("env") or data.get("meta") or {}


def source_line(*paths: Path) -> str:
    """'Source: file (device, versions, commit, date)' for each results file of a block."""
    parts = []
    for path in paths:
        env = _env(_load(path))
        bits = [env.get("device") or env.get("target")]
        if env.get("ssld_cpu_isa"):
            bits.append(f"cpu kernels {env['ssld_cpu_isa']}")
        if env.get("torch"):
            bits.append(f"torch {env['torch']}")
        if env.get("triton"):
            bits.append(f"triton {env['triton']}")
        bits += [f"commit {env.get('git_sha')}", (env.get("time") or "")[:10]]
        parts.append(f"`{_rel(path)}` ({', '.join(b for b in bits if b)})")
    return "Source: " + "; ".join(parts) + "."


def newest(pattern: str, where=None) -> Path:
    """The newest results file (by its recorded time) matching ``pattern`` and ``where``."""
    found = []
    for path in RESULTS.glob(pattern):
        data = _load(path)
        if where is None or where(data):
            found.append(((_env(data).get("time") or ""), path.name, path))
    if not found:
        raise FileNotFoundError(f"no committed `bench/results/{pattern}`")
    return max(found)[2]


def _is_cpu(data):
    return _env(data).get("device", "").find("NVIDIA") < 0


def _row(data, provider, mode, shape, dtype="float32"):
    for r in data["results"]:
        if (r.get("provider"), r.get("mode"), r.get("dtype")) == (provider, mode, dtype) and list(
            r.get("shape", [])
        ) == list(shape):
            return r
    return None


def _ms(r):
    if r is None or "median_ms" not in r:
        return "-"
    ms = r["median_ms"]
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def block_loss() -> str:
    """README: the loss table (JSD forward+backward) from the GPU runs and the newest CPU run."""
    gpu = [
        (RESULTS / "divergence-H100-run1.json", "float32", "ssld-cuda", "cuda backend"),
        (RESULTS / "divergence-H100-run2-bf16.json", "bfloat16", "ssld-triton", "triton backend"),
    ]
    cpu = newest(
        "divergence-*.json",
        lambda d: (
            _is_cpu(d)
            and d.get("benchmark") == "divergence"
            and _env(d).get("hugepages") is not True  # the default (off), not an A/B run
            and any(r.get("provider") == "eager" for r in d["results"])
        ),
    )
    out = [
        "| JSD, forward+backward | ssld | ssld fused | eager | torch.compile | Liger JSD |",
        "|---|---|---|---|---|---|",
    ]
    for path, dtype, prov, what in gpu:
        d = _load(path)
        dev = _env(d)["device"].replace("NVIDIA ", "").split(" ")[0]
        sh = [8192, 32000]
        r = _row(d, prov, "fwdbwd", sh, dtype)
        gb = f" ({r['gbps']:.0f} GB/s)" if r and "gbps" in r else ""
        out.append(
            f"| {dev}, {dtype}, 8192x32000 ({what}, commit {_env(d)['git_sha']}) | {_ms(r)}{gb} "
            f"| {_ms(_row(d, prov, 'fused', sh, dtype))} | {_ms(_row(d, 'eager', 'fwdbwd', sh, dtype))} "
            f"| {_ms(_row(d, 'compile', 'fwdbwd', sh, dtype))} "
            f"| {_ms(_row(d, 'liger', 'fwdbwd', sh, dtype))} |"
        )
    d = _load(cpu)
    env = _env(d)
    auto = (
        "ssld-auto" if any(r.get("provider") == "ssld-auto" for r in d["results"]) else "ssld-cpu"
    )
    for sh in ([1024, 32000], [256, 1000]):
        out.append(
            f"| {env['device']}, float32, {sh[0]}x{sh[1]} (cpu backend, commit {env['git_sha']}) "
            f"| {_ms(_row(d, auto, 'fwdbwd', sh))} | {_ms(_row(d, auto, 'fused', sh))} "
            f"| {_ms(_row(d, 'eager', 'fwdbwd', sh))} | {_ms(_row(d, 'compile', 'fwdbwd', sh))} | - |"
        )
    lat = [
        r
        for r in d["results"]
        if r.get("provider") == auto and r.get("mode", "").endswith("-latency") and "host_us" in r
    ]
    out.append("")
    if lat:
        cells = ", ".join(
            f"{r['mode'].removesuffix('-latency')} {r['host_us']:.0f} us"
            for r in lat
            if r["dtype"] == "float32"
        )
        shape = "x".join(map(str, lat[0]["shape"]))
        out.append(
            f"Host time per call on the CPU at {shape} (float32, what a small GPU step pays "
            f"besides its kernels): {cells}."
        )
        out.append("")
    out.append(source_line(*(p for p, *_ in gpu), cpu))
    return "\n".join(out)


def block_match() -> str:
    """README: the CPU matching sentence from the newest run that timed OpenCV and torch too."""
    path = newest(
        "match-*.json",
        lambda d: _is_cpu(d) and any(r.get("provider") == "opencv-bf" for r in d["results"]),
    )
    d = _load(path)
    rows = [dict(r, mode=r.get("mode", "knn")) for r in d["results"]]
    knn = [
        r for r in rows if r["mode"] == "knn" and r["provider"] == "ssld-cpu" and "median_ms" in r
    ]
    big = max(knn, key=lambda r: r["shape"][0] * r["shape"][1])
    tops = (
        2 * big["shape"][0] * big["shape"][1] * big["shape"][2] / (big["median_ms"] * 1e-3) / 1e12
    )

    def measured_ratios(provider):
        xs = [
            r["time_vs_ssld_best"]
            for r in rows
            if r["mode"] == "knn" and r["provider"] == provider and "skipped" not in r
            and r.get("time_vs_ssld_best")
        ]  # fmt: skip
        return f"{min(xs):.1f}-{max(xs):.1f}x" if xs else "not measured"

    n = big["shape"][0]
    return (
        f"On {_env(d)['device']} `match_knn` ran {n // 1000}k x {n // 1000}k (k = 2) in "
        f"{big['median_ms'] / 1e3:.2f} s ({tops:.2f} TOPS), {measured_ratios('opencv-bf')} "
        f"faster than OpenCV's BFMatcher and {measured_ratios('torch-cdist-topk')} faster than "
        "`torch.cdist` + `topk` where those were timed (smaller shapes; the larger ones are "
        "extrapolated in the file, not counted here).\n\n" + source_line(path)
    )


def block_demo() -> str:
    path = newest("demo-*.json", lambda d: d.get("benchmark") == "demo")
    d = _load(path)
    res = d["results"]
    from ssld.demo import table

    return (
        table(res, markdown=True)
        + f"\n\nDedup on the demo's photo set: precision {res['dedup_precision']:.2f}, recall "
        f"{res['dedup_recall']:.2f}. Seeds: {res['seeds']}.\n\n" + source_line(path)
    )


def block_ablation() -> str:
    path = newest("demo-ablation-*.json")
    d = _load(path)
    res = d["results"]
    out = ["| ablation | settings -> digits top-1 | paper's trend here |", "|---|---|---|"]
    for name, r in res.items():
        if not isinstance(r, dict) or "rows" not in r:
            continue
        cells = ", ".join(f"{x['value']}: {x['top1']:.1f} ± {x['top1_std']:.1f}" for x in r["rows"])
        means = [x["top1"] for x in r["rows"]]
        noise = max(x["top1_std"] for x in r["rows"])
        verdict = "reproduced" if r["reproduced"] else "**not reproduced**"
        if max(means) - min(means) < noise:
            verdict += " (spread within the seed-to-seed std)"
        out.append(f"| {name} ({r.get('what', '')}) | {cells} | {verdict} |")
    out += ["", f"Seeds: {res['seeds']}.", "", source_line(path)]
    return "\n".join(out)


def block_fused_linear() -> str:
    """README: fused lm-head + divergence against eager and chunked checkpointing."""
    path = newest("fused_linear-*.json")
    d = _load(path)
    out = [
        "| provider | forward+backward | peak extra memory | vs eager: time, memory |",
        "|---|---|---|---|",
    ]
    for r in d["results"]:
        if "median_ms" not in r:
            continue
        out.append(
            f"| {r['provider']} | {_ms(r)} | {r['peak_extra_mb']:.0f} MiB "
            f"| {r['x_eager_time']:.2f}x, {r['x_eager_mem']:.1f}x |"
        )
    n, h, v = d["results"][0]["shape"]
    skipped = "; ".join(f"{k}: {why}" for k, why in d.get("skipped", {}).items())
    out += [
        "",
        f"N = {n} rows, H = {h}, V = {v}, {d['results'][0]['dtype']}, median of "
        f"{d['results'][0]['reps']} steps; memory: {d['memory_method']}."
        + (f" Not run: {skipped}." if skipped else ""),
        "",
        source_line(path),
    ]
    return "\n".join(out)


def block_tables() -> str:
    """bench/README.md: every divergence, match and loader results file, newest first."""
    out = []
    paths = sorted(
        (p for p in RESULTS.glob("*.json") if _load(p).get("benchmark") in ("divergence", "match")),
        key=lambda p: _env(_load(p)).get("time") or "",
        reverse=True,
    )
    for path in paths:
        out.append(render(path).rstrip())
        out.append(source_line(path) + "\n")
    return "\n\n".join(out)


def block_host() -> str:
    """bench/README: host microseconds per call of the Python layer from the newest host run,
    one column per checkout it measured (``--compare``: before and after, the older first)."""
    path = newest("host-*.json")
    d = _load(path)
    sha = _env(d)["git_sha"]
    revs = list(dict.fromkeys(r.get("revision", sha) for r in d["results"]))
    by = {(r.get("revision", sha), r["provider"], r["mode"]): r for r in d["results"]}
    first = d["results"][0]
    procs = first.get("processes", 1)
    shape = "x".join(map(str, first["shape"]))
    out = [
        f"| {shape} float32, CPU, 1 thread: us per call, least minimum (median) over "
        f"{procs} processes | " + " | ".join(f"commit {r}" for r in revs) + " |",
        "|---|" + "---:|" * len(revs),
    ]
    for r in d["results"]:
        if r.get("revision", sha) != revs[-1]:
            continue
        cells = []
        for rev in revs:
            x = by.get((rev, r["provider"], r["mode"]))
            cells.append("-" if x is None else f"{x['min_us']:.1f} ({x['host_us']:.1f})")
        what = f"{r['provider']} {r['mode'].removesuffix('-host')}"
        out.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n\n" + source_line(path)


def block_loader() -> str:
    path = newest("loader-*.json")
    d = _load(path)
    out = ["| loader | img/s | vs torch DataLoader |", "|---|---:|---:|"]
    out += [
        f"| {r['provider']} | {r['img_per_s']:.0f} | {r['vs_torch']:.2f}x |" for r in d["results"]
    ]
    out.append("")
    out.append(
        f"{d['images']} generated {d['jpeg']} JPEGs, {d['results'][0]['workers']} workers, batch "
        f"{d['results'][0]['batch']}, RandomResizedCrop {d['results'][0]['input_size']}."
    )
    return "\n".join(out) + "\n\n" + source_line(path)


def block_sass() -> str:
    path = newest("triton-sass-*.json")
    d = _load(path)
    recs = [r for r in d["records"] if r.get("loops")]
    out = [
        "| kernel | dtype | MODE | block/warps | one chunk | regs | spills | SASS instructions "
        "per element, per loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        loops = ", ".join(
            f"{lp['name']} {lp['counts']['total'] / r['ept']:.1f}" for lp in r["loops"]
        )
        grad = " + grad" if r.get("write_grad_s") else ""
        out.append(
            f"| {r['kernel']}{grad} | {r['dtype']} | {r['mode']} | {r['block']}/{r['num_warps']} "
            f"| {'yes' if r.get('single') else 'no'} | {r['regs']} "
            f"| {r['spill_st'] + r['spill_ld']} | {loops} |"
        )
    meta = d["meta"]
    return (
        "\n".join(out) + f"\n\nTriton {meta['triton']}, {meta['ptxas']}, target {meta['target']}, "
        f"n_cols {meta['n_cols']}.\n\n" + source_line(path)
    )


def render(path: Path) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        table(str(path))
    return buf.getvalue()


NOT_MEASURED = "Not measured yet"
WRITERS = {
    "demo": "python bench/bench_demo.py",
    "ablation": "python bench/bench_demo.py --ablation",
    "fused-linear": "python bench/bench_fused_linear.py",
    "host": "python bench/bench_host.py",
}

# (file, block name) -> renderer
BLOCKS = {
    ("README.md", "demo"): block_demo,
    ("README.md", "ablation"): block_ablation,
    ("README.md", "match"): block_match,
    ("README.md", "loss"): block_loss,
    ("README.md", "fused-linear"): block_fused_linear,
    ("bench/README.md", "loader"): block_loader,
    ("bench/README.md", "host"): block_host,
    ("bench/README.md", "sass"): block_sass,
    ("bench/README.md", "tables"): block_tables,
}
MARK = re.compile(
    r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S
)


def readme_blocks(text: str) -> list:
    return [m.group("name") for m in MARK.finditer(text)]


def rewrite(fname: str, text: str) -> str:
    """``text`` with every generated block of ``fname`` rendered anew."""
    names = readme_blocks(text)
    for f, name in BLOCKS:
        if f == fname and name not in names:
            raise SystemExit(f"{fname}: no <!-- results:{name} --> block")
    unknown = [n for n in names if (fname, n) not in BLOCKS]
    if unknown:
        raise SystemExit(f"{fname}: unknown results blocks {unknown}")

    def sub(m):
        try:
            body = BLOCKS[(fname, m.group("name"))]().rstrip() + "\n"
        except FileNotFoundError as e:  # measured later: the block says so, no number
            cmd = WRITERS.get(m.group("name"), "the matching script in bench/")
            body = f"{NOT_MEASURED}: {e}; `{cmd}` writes it.\n"
        return m.group(1) + body + m.group(4)

    return MARK.sub(sub, text)


def write_readmes(check: bool) -> int:
    stale = []
    for fname in sorted({f for f, _ in BLOCKS}):
        path = ROOT / fname
        old = path.read_text()
        new = rewrite(fname, old)
        if new != old:
            stale.append(fname)
            if not check:
                path.write_text(new)
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run python bench/summarize.py --write-readme")
        return 1
    print(("up to date: " if check else "written: ") + ", ".join(sorted({f for f, _ in BLOCKS})))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--write-readme" in args or "--check-readme" in args:
        sys.path.insert(0, str(ROOT))
        sys.exit(write_readmes(check="--check-readme" in args))
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
