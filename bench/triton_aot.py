"""Compile, for a GPU and without one, every Triton kernel launch that the CPU test suite makes.

    python bench/triton_aot.py                         # the Triton tests, sm_90 (H100 / H200)
    python bench/triton_aot.py --pytest "tests/test_match.py -k triton" --jobs 2
    python bench/triton_aot.py --launches L.jsonl      # compile an earlier recording only

CI runs the Triton kernels through ``TRITON_INTERPRET=1``, which executes them with NumPy and
never compiles them: code the compiler rejects (``tl.dot`` below 16 x 16, a block over the
shared memory, a type mix the interpreter widens, an API that the installed Triton does not
have) passes there and fails on the first GPU call. This closes that gap off-device:

1. **record**: the tests run as usual under the interpreter, in a pytest process whose
   ``InterpretedFunction.run`` also writes, for every distinct launch, the specialisation that
   Triton's JIT would compile for it (argument types, 16-byte alignment and divisibility,
   constexpr values, launch options such as ``num_warps``), computed by the JIT's own binder
   for the target below (``tests/conftest.py`` installs :func:`install_recorder` when
   ``SSLD_TRITON_RECORD`` names a file);
2. **compile**: a fresh process without the interpreter compiles each recorded
   specialisation with ``triton.compile`` for ``GPUTarget("cuda", --arch, 32)``, using the
   ``ptxas`` bundled with the triton wheel (no CUDA toolkit or GPU needed), and checks what
   would fail at launch: shared memory over the per-block limit and registers x threads over
   the register file. Spills are reported, not failed.

The exit code is 1 when any launch fails to compile or would not launch. The JSON (``--out``)
holds the Triton version, the target and one record per launch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_ENV = "SSLD_TRITON_RECORD"
SPAWN = multiprocessing.get_context("spawn")
# Per-block shared memory (the opt-in maximum) and registers per block, by compute capability
# (CUDA programming guide, "Technical Specifications per Compute Capability").
LIMITS = {
    80: {"smem": 163 * 1024, "regs_per_block": 65536},  # A100
    86: {"smem": 99 * 1024, "regs_per_block": 65536},
    89: {"smem": 99 * 1024, "regs_per_block": 65536},  # L4, L40
    90: {"smem": 227 * 1024, "regs_per_block": 65536},  # H100, H200
}
DEFAULT_PYTEST = (
    "tests/test_divergence.py tests/test_divergence_sparse.py tests/test_divergence_launches.py "
    "tests/test_divergence_triton_configs.py tests/test_match.py tests/test_fused_linear.py "
    "-k triton"
)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


# ------------------------------------------------------------------------------- record
def _jsonable(x):
    if isinstance(x, dict):
        return [[_jsonable(k), _jsonable(v)] for k, v in x.items()]
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if type(x).__name__ == "constexpr":  # tl.constexpr(value)
        return _jsonable(x.value)
    raise TypeError(f"cannot record {type(x).__name__} {x!r}")


@functools.cache
def _binder(fn, arch: int):
    """(JITFunction, backend, binder) of a kernel's Python function: its parameters and the
    JIT's argument binder for the target; nothing is compiled."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(fn)
    backend = make_backend(_target(arch))
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


def specialization(fn, args: tuple, kwargs: dict, arch: int) -> dict:
    """What Triton's JIT compiles for ``fn[grid](*args, **kwargs)`` on sm_``arch``: the
    signature, constexprs and attributes from its own binder, and the launch options."""
    jit, backend, binder = _binder(fn, arch)
    bound, spec, _ = binder(*args, **kwargs)
    names = set(jit.arg_names)
    opts = {k: v for k, v in kwargs.items() if k not in names}
    _, signature, constexprs, attrs = jit._pack_args(backend, opts, bound, spec, {})
    return {
        "kernel": f"{fn.__module__}:{fn.__qualname__}",
        "signature": _jsonable(signature),
        "constexprs": _jsonable(constexprs),
        "attrs": _jsonable(attrs),
        "options": _jsonable(opts),
    }


def install_recorder(path: str, arch: int = 90) -> None:
    """Make every interpreted launch of this process also append its specialisation (once per
    distinct one) to the JSON-lines file ``path``. The launch itself runs unchanged."""
    from triton.runtime.interpreter import InterpretedFunction

    real_run = InterpretedFunction.run
    seen: set[str] = set()

    def run(self, *args, grid, warmup, **kwargs):
        try:
            rec = specialization(self.fn, args, kwargs, arch)
        except Exception as exc:  # recorded as a failure of its own, the launch still runs
            rec = {"kernel": f"{self.fn.__module__}:{self.fn.__qualname__}",
                   "record_error": f"{type(exc).__name__}: {exc}"[:500]}  # fmt: skip
        line = json.dumps(rec, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:  # one write per line: xdist workers share the file
                f.write(line + "\n")
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def record(pytest_args: str, path: Path, arch: int, workers: int) -> int:
    """Run the tests under the interpreter with the recorder; pytest's exit code."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env[RECORD_ENV], env[RECORD_ENV + "_ARCH"] = str(path), str(arch)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           *shlex.split(pytest_args)]  # fmt: skip
    if workers > 1:
        cmd += ["-n", str(workers)]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


# ------------------------------------------------------------------------------ compile
def _untuple(pairs):
    return {tuple(k): v for k, v in pairs}


def _init_worker(cache_dir: str) -> None:
    """triton_sass's fresh-compile setup (private cache, ptxas -v log), imported only once
    TRITON_INTERPRET is gone, since triton reads it at import."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from triton_sass import init_worker

    init_worker(cache_dir)


def compile_one(rec: dict, arch: int) -> dict:
    """Compile one recorded launch; the record with regs, spills, smem and errors added."""
    import triton
    from triton.compiler import ASTSource
    from triton_sass import PTXAS_REGS, PTXAS_SPILLS

    out = dict(rec)
    if "record_error" in rec:
        out["error"] = "could not record: " + rec["record_error"]
        return out
    module, name = rec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    attrs = {k: [tuple(a) for a in v] for k, v in _untuple(rec["attrs"]).items()}
    src = ASTSource(fn=fn, signature=dict(rec["signature"]), constexprs=_untuple(rec["constexprs"]),
                    attrs=attrs)  # fmt: skip
    options = dict(rec["options"])
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=_target(arch), options=options)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    ptxas = log.getvalue()
    regs, spills = PTXAS_REGS.search(ptxas), PTXAS_SPILLS.search(ptxas)
    out["regs"] = int(regs.group(1)) if regs else getattr(kernel, "n_regs", None)
    out["spill_bytes"] = int(spills.group(2)) + int(spills.group(3)) if spills else None
    out["smem"] = kernel.metadata.shared
    out["num_warps"] = kernel.metadata.num_warps
    lim = LIMITS.get(arch)
    if lim and out["smem"] > lim["smem"]:
        out["error"] = f"shared memory {out['smem']} B > the {lim['smem']} B per block of sm_{arch}"
    threads = 32 * out["num_warps"]
    if lim and out["regs"] and out["regs"] * threads > lim["regs_per_block"]:
        out["error"] = (f"{out['regs']} registers x {threads} threads > the register file "
                        f"({lim['regs_per_block']}): the launch would fail")  # fmt: skip
    return out


def compile_all(records: list[dict], arch: int, jobs: int) -> list[dict]:
    with (
        tempfile.TemporaryDirectory() as cache,
        # spawned: a fresh triton import without TRITON_INTERPRET, whatever this process has
        ProcessPoolExecutor(jobs, SPAWN, initializer=_init_worker, initargs=(cache,)) as pool,
    ):
        return list(pool.map(compile_one, records, [arch] * len(records)))


def constexprs_by_name(rec: dict) -> dict:
    """A recorded launch's constexprs by parameter name (recorded by argument path: ``[i]``,
    or ``[i, j]`` inside a tuple argument, named ``name[j]``)."""
    names = [name for name, _ in rec["signature"]]
    return {names[p[0]] + "".join(f"[{i}]" for i in p[1:]): v for p, v in rec["constexprs"]}


def _short(rec: dict) -> str:
    """The launch's upper-case constexprs, warps and None arguments, for the report."""
    consts = constexprs_by_name(rec)
    upper = " ".join(f"{k}={v}" for k, v in consts.items() if k.isupper())
    nones = ",".join(k for k, v in consts.items() if v is None)
    return f"{upper} w={dict(rec['options']).get('num_warps', '-')} none=[{nones}]"


def report(results: list[dict]) -> int:
    failed = [r for r in results if "error" in r]
    by_kernel: dict[str, list[dict]] = {}
    for r in results:
        by_kernel.setdefault(r["kernel"].split(":")[1], []).append(r)
    print(f"\n{'kernel':28s} {'launches':>8s} {'ok':>4s} {'regs':>9s} {'spill B':>8s} "
          f"{'smem KiB':>9s} {'compile s':>9s}")  # fmt: skip
    for name, rs in sorted(by_kernel.items()):
        ok = [r for r in rs if "error" not in r]
        regs = [r["regs"] for r in ok if r.get("regs")]
        spill = max((r.get("spill_bytes") or 0 for r in ok), default=0)
        smem = max((r["smem"] for r in ok), default=0) / 1024
        cs = sum(r.get("compile_s", 0) for r in ok)
        rr = f"{min(regs)}-{max(regs)}" if regs else "-"
        print(f"{name:28s} {len(rs):8d} {len(ok):4d} {rr:>9s} {spill:8d} {smem:9.1f} {cs:9.1f}")
    for r in results:
        if r.get("spill_bytes"):
            print(f"  spills {r['spill_bytes']} B: {r['kernel'].split(':')[1]} {_short(r)}")
    for r in failed:
        print(f"\nFAILED {r['kernel']} {_short(r) if 'signature' in r else ''}\n  {r['error']}")
    print(
        f"\n{len(results) - len(failed)}/{len(results)} launches compile for the target"
        + (f"; {len(failed)} FAILED" if failed else "")
    )
    return 1 if failed else 0


def _ptxas_version() -> str | None:
    try:
        from triton import knobs

        out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]
    except Exception:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytest", default=DEFAULT_PYTEST, help="the tests to record launches from")
    ap.add_argument("--launches", default=None, help="compile this recording (no tests run)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist workers for recording")
    ap.add_argument("--out", default=None, help="JSON of every launch's result")
    args = ap.parse_args(argv)

    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.launches) if args.launches else Path(tmp) / "launches.jsonl"
        if not args.launches:
            rc = record(args.pytest, path, args.arch, args.workers)
            if rc != 0:
                print(f"the recorded tests failed (pytest exit {rc})")
                return 1
        lines = path.read_text().splitlines() if path.exists() else []
    records = sorted({line: json.loads(line) for line in lines}.values(), key=lambda r: r["kernel"])
    if not records:
        print("no Triton launch was recorded (are the selected tests Triton tests?)")
        return 1
    print(f"compiling {len(records)} distinct launches for sm_{args.arch} "
          f"with triton {triton.__version__}, {args.jobs} jobs", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    results = compile_all(records, args.arch, args.jobs)
    rc = report(results)
    print(f"compiled in {time.perf_counter() - t0:.0f} s")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import git_sha

        meta = {"triton": triton.__version__, "ptxas": _ptxas_version(), "arch": args.arch,
                "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "pytest": None if args.launches else args.pytest}  # fmt: skip
        lines = ",\n".join(json.dumps(r, sort_keys=True) for r in results)  # a launch per line
        Path(args.out).write_text(f'{{"meta": {json.dumps(meta)},\n"launches": [\n{lines}\n]}}\n')
        print(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
