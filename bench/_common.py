"""Shared benchmark plumbing: environment record, timing, JSON output."""

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return os.environ.get("SSLD_GIT_SHA", "unknown")


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["cuda"] = torch.version.cuda
        env["sm_count"] = props.multi_processor_count
    else:
        env["device"] = _cpu_name()
        env["threads"] = torch.get_num_threads()
        env["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["hugepages"] = os.environ.get("SSLD_KERNELS_HUGEPAGES", "0") == "1"
        try:
            from ssld_kernels._backends import ext

            env["ssld_cpu_isa"] = ext().cpu_isa()
        except Exception:  # noqa: BLE001 - no compiled extension
            env["ssld_cpu_isa"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "cpu"


def time_fn(fn, device: torch.device, warmup_ms=50.0, rep_ms=300.0, min_reps=5):
    """Median / p20 / p80 milliseconds of fn() (CUDA events via do_bench on GPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    fn()  # warm-up / compile
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(min_reps, min(200, int(rep_ms / 1e3 / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _quantiles(times: list) -> dict:
    """Median / p20 / p80 of per-call milliseconds."""
    times = sorted(times)
    return {
        "median_ms": statistics.median(times),
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1))],
    }


def parse_providers(spec: str, known, bench: str) -> list[str]:
    """The comma list of ``--providers`` (empty: all), each checked against ``known``.

    A misspelt name would otherwise just be missing from the results; on a lent GPU with
    minutes of device time that is a wasted run, so it stops the benchmark before anything
    is timed.
    """
    wanted = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [p for p in wanted if p not in known]
    if bad:
        raise SystemExit(f"{bench}: unknown --providers {bad}; known: {', '.join(sorted(known))}")
    return wanted


def write_results(name: str, env: dict, rows: list, out: Path | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = env["device"].replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "")
    path = out or RESULTS / f"{name}-{dev}-{env['git_sha']}.json"
    path.write_text(json.dumps({"benchmark": name, "env": env, "results": rows}, indent=1))
    return path


def time_calls(fn, device: torch.device, reps: int = 3, warmup: int = 0) -> dict:
    """Median / p20 / p80 ms of exactly ``reps`` timed calls (CUDA events on GPU).

    For calls too slow for :func:`time_fn` (do_bench makes at least 8 calls); the caller
    warms up. ``reps`` is recorded in the result.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {**_quantiles(times), "reps": len(times)}


def write_results_extra(
    name: str, env: dict, rows: list, extra: dict, out: Path | None = None
) -> Path:
    """:func:`write_results` with more top-level keys (e.g. targets, provider status)."""
    path = write_results(name, env, rows, out)
    data = json.loads(path.read_text())
    data.update(extra)
    path.write_text(json.dumps(data, indent=1, default=str))
    return path
