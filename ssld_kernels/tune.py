"""Measure the GPU backends of the divergence loss on this GPU and write the table "auto" uses.

    python -m ssld_kernels.tune [--out FILE] [--dtypes bf16,fp32] [--rows 256,4096]
        [--classes 1000,4096,21841,32000,128256,262144] [--backends cuda,triton]
        [--kind jsd] [--warmup MS] [--rep MS]
    python -m ssld_kernels.tune --show [--out FILE]

For each dtype, class count C and row count it times, per backend, two modes with
``triton.testing.do_bench`` (CUDA events; median, p20, p80 of many calls):

  fwdbwd  ``softmax_divergence`` + ``loss.backward()`` (the autograd path)
  fused   ``softmax_divergence_and_grad`` (loss and gradient from one kernel)

Each backend is also timed with the launch configs of ``LAUNCH_CONFIGS`` (Triton: chunk
size, warps, programs per SM; CUDA: shared-memory row cache, threads, blocks per SM;
``--no-launch-configs`` skips them). A config is timed only after its loss and gradients
matched the backend's default launch on this GPU (``check_variant``; a mismatch is recorded
as an error). The fastest config stands for its backend in the entry and is stored as the
entry's ``<backend>_config``, which the launcher then uses for that bucket (default launch
when absent).

Buckets: the measured class counts c_1 < ... < c_k split the C axis at the geometric
midpoints ceil(sqrt(c_i * c_i+1)); the entry of c_i covers c_lo <= C < c_hi, the first from
C = 1, the last unbounded (c_hi null). A backend's time in an entry is the geometric mean over
the row counts of its median times (every row count weighs the same, whatever its size); the
entry's ``backend`` is the fastest. A backend that failed at some row count is left out of
that entry. The loss kind (default jsd) is recorded but not looked up: the kinds cost alike.

The table (format in :mod:`ssld_kernels._tune_table`) is written atomically to ``--out``, else
``$SSLD_KERNELS_TUNE_FILE``, else ``~/.cache/ssld_kernels/tune-<device name>.json``. It is used
only with the same GPU model and the same torch, triton and ssld_kernels versions; rerun this
after upgrading any of them. ``python -m ssld_kernels`` says whether a table is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ssld_kernels import _backends, _tune_table

DEFAULT_DTYPES = "bf16,fp32"
DEFAULT_ROWS = "256,4096"
DEFAULT_CLASSES = "1000,4096,21841,32000,128256,262144"
TUNED_BACKENDS = ("cuda", "triton")
_DTYPE_ALIASES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float": torch.float32,
    "float32": torch.float32,
}


def parse_dtypes(text: str) -> list[torch.dtype]:
    out = []
    for item in text.split(","):
        key = item.strip().lower().replace("torch.", "")
        if key not in _DTYPE_ALIASES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {item!r}; use bf16, fp16 or fp32 (GPU backends only)"
            )
        if _DTYPE_ALIASES[key] not in out:
            out.append(_DTYPE_ALIASES[key])
    return out


def parse_ints(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {e}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def bucket_bounds(classes: list[int]) -> list[tuple[int, int, int | None]]:
    """(c, c_lo, c_hi) per measured class count: the C axis split at the geometric midpoints
    of neighbours, ``ceil(sqrt(c_i * c_i+1))``; first c_lo = 1, last c_hi = None."""
    cs = sorted(set(classes))
    if not cs or cs[0] < 1:
        raise ValueError(f"class counts must be positive, got {classes!r}")
    cuts = []
    for a, b in zip(cs, cs[1:]):
        r = math.isqrt(a * b)
        cuts.append(r if r * r == a * b else r + 1)  # a < cut <= b
    lows = [1] + cuts
    highs = cuts + [None]
    return list(zip(cs, lows, highs))


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def build_entries(results: list[dict], classes: list[int], rows: list[int]) -> list[dict]:
    """Table entries from per-case results ({mode, dtype, rows, classes, backend, median_ms,
    p20_ms, p80_ms} or {..., error}); see the module docstring for the rules."""
    entries = []
    modes = [m for m in _tune_table.TUNE_MODES if any(r["mode"] == m for r in results)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    for mode in modes:
        for dtype in dtypes:
            for c, c_lo, c_hi in bucket_bounds(classes):
                cases = [
                    r
                    for r in results
                    if r["mode"] == mode and r["dtype"] == dtype and r["classes"] == c
                ]
                cases = [
                    dict(r, backend=_variant_name(r["backend"], r.get("config"))) for r in cases
                ]
                by_rows: dict[str, dict] = {}
                for r in cases:
                    timing = (
                        {"error": r["error"]}
                        if "error" in r
                        else {k: r[k] for k in ("median_ms", "p20_ms", "p80_ms")}
                    )
                    by_rows.setdefault(str(r["rows"]), {})[r["backend"]] = timing
                names = list(dict.fromkeys(r["backend"] for r in cases))
                ms = {}
                for name in names:
                    times = [by_rows.get(str(n), {}).get(name, {}).get("median_ms") for n in rows]
                    if all(isinstance(t, float) and t > 0 for t in times):
                        ms[name] = geometric_mean(times)
                if not ms:
                    continue
                entry = {"op": "divergence", "mode": mode, "dtype": dtype, "c_lo": c_lo,
                         "c_hi": c_hi, "c": c}  # fmt: skip
                for backend in _tune_table.LAUNCH_CONFIG_KEYS:
                    # launch configs: the fastest stands for the backend and is stored
                    variants = {k: v for k, v in ms.items() if k.startswith(backend + "@")}
                    if not variants:
                        continue
                    best = min(variants, key=variants.get)
                    if backend not in ms or variants[best] < ms[backend]:
                        ms[backend] = variants[best]
                        entry[f"{backend}_config"] = json.loads(best.split("@", 1)[1])
                    entry[f"{backend}_configs_ms"] = dict(
                        sorted(variants.items(), key=lambda kv: kv[1])
                    )
                ms = {k: v for k, v in ms.items() if "@" not in k}
                entry.update(backend=min(ms, key=ms.get), ms=ms, ms_by_rows=by_rows)
                entries.append(entry)
    return entries


def _variant_name(backend: str, config: dict | None) -> str:
    """``triton`` for the default launch, ``triton@{"block": ...}`` for a measured config."""
    return backend if not config else f"{backend}@{json.dumps(config, sort_keys=True)}"


# Launch configs measured besides each backend's defaults (keys: _tune_table.LAUNCH_CONFIG_KEYS).
# Triton (default: one program per row, chunks of up to 4096 classes over 8 warps): bigger
# chunks (rows up to 8192 classes whole in registers; 16 warps keep 16 values per thread,
# no spills per bench/triton_sass.py) and programs looping over rows, 1-4 per SM, which bounds
# the rows in flight and so the L2 footprint of the passes that re-read a row.
# CUDA (default: one block per row, 256/512/1024 threads by C, no row cache): the row cached
# in shared memory (one global read of each logit where it fits), and fewer, larger blocks.
LAUNCH_CONFIGS = {
    "triton": (
        {"block": 8192, "num_warps": 16},
        {"block": 8192, "num_warps": 16, "programs_per_sm": 1},
        {"block": 4096, "num_warps": 8, "programs_per_sm": 2},
        {"block": 2048, "num_warps": 4, "programs_per_sm": 4},
    ),
    "cuda": (
        {"row_cache": 1},
        {"row_cache": 1, "threads": 1024},
        {"threads": 1024, "blocks_per_sm": 1},
        {"threads": 512, "blocks_per_sm": 2},
    ),
}


def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def make_table(
    device_name: str, entries: list[dict], meta: dict, versions: dict | None = None
) -> dict:
    versions = _tune_table.tune_versions() if versions is None else versions
    return {
        "format": _tune_table.TUNE_FORMAT,
        "device": device_name,
        **versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
        "entries": entries,
    }


def write_table(path: Path, table: dict) -> Path:
    """Write ``table`` as JSON to ``path`` atomically (temporary file + os.replace)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def time_case(backend, mode, dtype, n, c, kind="jsd", warmup=25.0, rep=100.0) -> dict:
    """Median / p20 / p80 ms of one (backend, mode, dtype, n x C) case on the current GPU."""
    from triton.testing import do_bench

    from ssld_kernels.divergence import softmax_divergence, softmax_divergence_and_grad

    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, c, device="cuda", generator=gen).mul_(3).to(dtype)
    t = torch.randn(n, c, device="cuda", generator=gen).mul_(3).to(dtype)
    if mode == "fwdbwd":
        s.requires_grad_(True)

        def step():
            softmax_divergence(s, t, kind=kind, backend=backend).backward()

        grad_to_none = [s]
    elif mode == "fused":

        def step():
            softmax_divergence_and_grad(s, t, kind=kind, backend=backend)

        grad_to_none = None
    else:
        raise ValueError(f"mode must be one of {_tune_table.TUNE_MODES}, got {mode!r}")
    step()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    q = do_bench(step, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}


def _forced(backend: str, config: dict | None):
    """Context in which ``backend`` launches with ``config`` ({} / None: its defaults)."""
    if backend not in _tune_table.LAUNCH_CONFIG_KEYS:
        return contextlib.nullcontext()
    return _tune_table.forced_launch_config(
        backend, _tune_table.resolve_per_sm(config, _sm_count())
    )


def check_variant(backend, config, dtype, n, c, kind="jsd") -> None:
    """Raise unless ``backend`` with launch ``config`` gives the loss and gradient of its
    default launch (the one the test suite checks): a variant is only ever timed, and so
    only ever chosen, once its results are right on this GPU."""
    from ssld_kernels.divergence import softmax_divergence, softmax_divergence_and_grad

    gen = torch.Generator(device="cuda").manual_seed(1)
    s = torch.randn(n, c, device="cuda", generator=gen).mul_(3).to(dtype)
    t = torch.randn(n, c, device="cuda", generator=gen).mul_(3).to(dtype)
    with _forced(backend, {}):
        want = softmax_divergence_and_grad(s, t, kind=kind, backend=backend)
    with _forced(backend, config):
        got = softmax_divergence_and_grad(s, t, kind=kind, backend=backend)
        s.requires_grad_(True)
        loss = softmax_divergence(s, t, kind=kind, backend=backend)
        (grad,) = torch.autograd.grad(loss, s)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a in (("fused loss", got[0]), ("loss", loss.detach())):
        torch.testing.assert_close(
            a, want[0], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    atol = rtol * float(want[1].float().abs().max())
    for name, g in (("fused gradient", got[1]), ("autograd gradient", grad)):
        torch.testing.assert_close(
            g.float(),
            want[1].float(),
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def run(args) -> tuple[dict, Path]:
    """Measure every case, write the table, return (table, path)."""
    if not torch.cuda.is_available():
        raise SystemExit("ssld_kernels.tune needs a CUDA GPU (torch.cuda.is_available() is False)")
    status = _backends.backend_status("cuda")
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in wanted:
        if b not in _backends.BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {_backends.BACKENDS}")
    backends = [b for b in wanted if status[b][0]]
    for b in wanted:
        if not status[b][0]:
            print(f"skipping backend {b}: {status[b][1]}", file=sys.stderr)
    if not backends:
        raise SystemExit("no GPU backend to tune is available here (see `python -m ssld_kernels`)")
    if len(backends) == 1:
        print(f"only {backends[0]} is available: the table will rank it alone", file=sys.stderr)
    device_name = torch.cuda.get_device_name()
    path = Path(args.out).expanduser() if args.out else _tune_table.tune_path(device_name)
    if path is None:
        raise SystemExit(f"{_tune_table.TUNE_ENV_VAR} disables tables; pass --out FILE")
    print(f"tuning on {device_name}: {', '.join(backends)} -> {path}", flush=True)
    variants = [(b, None) for b in backends]
    if not args.no_launch_configs:
        variants += [(b, cfg) for b in backends for cfg in LAUNCH_CONFIGS.get(b, ())]
    results = []
    for dtype in args.dtypes:
        dname = _tune_table.dtype_name(dtype)
        for c in args.classes:
            checked: set = set()
            for n in args.rows:
                for mode in _tune_table.TUNE_MODES:
                    for b, config in variants:
                        case = {"mode": mode, "dtype": dname, "rows": n, "classes": c, "backend": b}
                        if config:
                            case["config"] = config
                        name = _variant_name(b, config)
                        try:
                            if config and (name, n) not in checked:  # once per shape
                                check_variant(b, config, dtype, n, c, args.kind)
                                checked.add((name, n))
                            with _forced(b, config):
                                case.update(time_case(
                                    b, mode, dtype, n, c, args.kind, args.warmup, args.rep
                                ))  # fmt: skip
                            msg = f"{case['median_ms']:9.4f} ms"
                        except Exception as e:  # OOM, unsupported shape: recorded, not fatal
                            case["error"] = repr(e)[:300]
                            msg = f"ERROR {case['error']}"
                        results.append(case)
                        print(f"{mode:6s} {dname:8s} {n:6d} x {c:<7d} {name} {msg}", flush=True)
                torch.cuda.empty_cache()
    meta = {
        "cuda": torch.version.cuda,
        "kind": args.kind,
        "backends": backends,
        "dtypes": [_tune_table.dtype_name(d) for d in args.dtypes],
        "rows": args.rows,
        "classes": args.classes,
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "launch_configs": {} if args.no_launch_configs else LAUNCH_CONFIGS,
        "bucketing": "geometric midpoints of the measured class counts",
        "ms": "geometric mean over rows of do_bench medians",
    }
    table = make_table(device_name, build_entries(results, args.classes, args.rows), meta)
    write_table(path, table)
    _tune_table.clear_tune_cache()
    return table, path


def summary(table: dict) -> str:
    lines = [
        f"{table.get('device')} (torch {table.get('torch')}, triton {table.get('triton')}, "
        f"ssld_kernels {table.get('ssld_kernels')}, {table.get('created', '?')})"
    ]
    for e in table.get("entries", []):
        hi = "inf" if e["c_hi"] is None else e["c_hi"]
        times = "  ".join(f"{k} {v:.4f}" for k, v in sorted(e["ms"].items(), key=lambda kv: kv[1]))
        cfgs = "".join(
            f"; {b} config {e[b + '_config']}"
            for b in _tune_table.LAUNCH_CONFIG_KEYS
            if e.get(b + "_config")
        )
        lines.append(
            f"  {e['mode']:6s} {e['dtype']:8s} C in [{e['c_lo']}, {hi}): {e['backend']:6s} "
            f"(ms: {times}{cfgs})"
        )
    return "\n".join(lines)


def show(args) -> int:
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if args.out:
        path = Path(args.out).expanduser()
    elif device_name is not None:
        path = _tune_table.tune_path(device_name)
    else:
        print("no CUDA device: pass --out FILE to show a table", file=sys.stderr)
        return 2
    if path is None or not path.exists():
        print(f"no tune table at {path}", file=sys.stderr)
        return 1
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        print(f"{path}: corrupt JSON ({e})", file=sys.stderr)
        return 1
    print(f"{path}:")
    if isinstance(data, dict):
        try:
            print(summary(data))
        except (KeyError, TypeError, AttributeError) as e:
            print(f"  malformed entries ({e!r})")
    if device_name is not None:
        _, why = _tune_table.parse_tune_table(data, device_name, _tune_table.tune_versions())
        print(f"usable here: {'yes' if not why else 'no: ' + why}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ssld_kernels.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default=None, help="table file (default: see above)")
    ap.add_argument("--dtypes", type=parse_dtypes, default=parse_dtypes(DEFAULT_DTYPES))
    ap.add_argument("--rows", type=parse_ints, default=parse_ints(DEFAULT_ROWS))
    ap.add_argument("--classes", type=parse_ints, default=parse_ints(DEFAULT_CLASSES))
    ap.add_argument("--backends", default=",".join(TUNED_BACKENDS))
    ap.add_argument("--kind", default="jsd", choices=["jsd", "sym_kl", "kl"])
    ap.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench measuring time, ms")
    ap.add_argument(
        "--no-launch-configs",
        action="store_true",
        help="time only each backend's default launch (not the LAUNCH_CONFIGS variants)",
    )
    ap.add_argument("--show", action="store_true", help="print the table and exit")
    args = ap.parse_args(argv)
    if args.show:
        return show(args)
    table, path = run(args)
    print(f"\nwrote {path}\n{summary(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
